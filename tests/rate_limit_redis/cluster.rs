//! A Redis Cluster for the store's tests: three masters and three replicas of the
//! Debian `redis-server`, on free loopback ports and a temporary directory, made into a
//! cluster with `redis-cli --cluster create`, killed by pid on drop.

use std::collections::BTreeSet;
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use redis::AsyncConnectionConfig;
use redis::aio::MultiplexedConnection;
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use tokio::time::{Instant, sleep};

/// One node of the cluster.
struct Node {
    port: u16,
    child: Option<Child>,
}

/// A node as `CLUSTER NODES` describes it.
#[derive(Debug, Clone)]
pub struct NodeInfo {
    pub id: String,
    pub port: u16,
    pub master: bool,
    pub failed: bool,
    /// The ranges of slots a master serves.
    pub slots: Vec<(u16, u16)>,
}

/// Six `redis-server`s in one cluster; every process is killed on drop.
pub struct RedisCluster {
    nodes: Vec<Node>,
    dir: PathBuf,
}

/// How long a node waits for another before counting it as failed: short, so that a
/// killed master's replica takes over within a couple of seconds.
const NODE_TIMEOUT_MS: u64 = 1000;

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("a free port")
        .port()
}

impl RedisCluster {
    /// Starts six nodes and makes them a cluster of three masters with a replica each;
    /// returns when every node reports `cluster_state:ok`.
    pub async fn start() -> Self {
        let dir = std::env::temp_dir().join(format!(
            "palisade-redis-cluster-{}-{}",
            std::process::id(),
            free_port()
        ));
        std::fs::create_dir_all(&dir).expect("a temporary directory");
        let mut cluster = Self {
            nodes: Vec::new(),
            dir,
        };
        for _ in 0..6 {
            let node = cluster.launch().await;
            cluster.nodes.push(node);
        }
        let addresses: Vec<String> = cluster
            .nodes
            .iter()
            .map(|node| format!("127.0.0.1:{}", node.port))
            .collect();
        let created = Command::new("redis-cli")
            .arg("--cluster")
            .arg("create")
            .args(&addresses)
            .args(["--cluster-replicas", "1", "--cluster-yes"])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .output()
            .expect("redis-cli on PATH (scripts/test installs it)");
        assert!(
            created.status.success(),
            "redis-cli --cluster create failed: {}",
            String::from_utf8_lossy(&created.stderr)
        );
        cluster.wait_until_ok().await;
        cluster.wait_until_replicas_synced().await;
        cluster
    }

    /// Waits until every replica has synced with its master: until then, a replica
    /// whose master dies refuses to take over (its data is too old).
    async fn wait_until_replicas_synced(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        for node in &self.nodes {
            loop {
                let mut connection = self.node(node.port).await;
                let info: String = redis::cmd("INFO")
                    .arg("replication")
                    .query_async(&mut connection)
                    .await
                    .expect("INFO replication");
                if info.contains("role:master") || info.contains("master_link_status:up") {
                    break;
                }
                assert!(Instant::now() < deadline, "a replica did not sync: {info}");
                sleep(Duration::from_millis(50)).await;
            }
        }
    }

    /// Spawns one cluster-enabled node on free ports (its data port and its bus port),
    /// again on other ports if a concurrent test took one meanwhile.
    async fn launch(&self) -> Node {
        for _ in 0..5 {
            let (port, bus) = (free_port(), free_port());
            let child = Command::new("redis-server")
                .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
                .args(["--cluster-enabled", "yes"])
                .args(["--cluster-port", &bus.to_string()])
                .args(["--cluster-config-file", &format!("nodes-{port}.conf")])
                .args(["--cluster-node-timeout", &NODE_TIMEOUT_MS.to_string()])
                // A replica that has not synced yet may not take over: sync at once.
                .args(["--repl-diskless-sync-delay", "0"])
                .args(["--save", "", "--appendonly", "no", "--dir"])
                .arg(&self.dir)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("redis-server on PATH (scripts/test installs it)");
            let mut node = Node {
                port,
                child: Some(child),
            };
            if node.answers().await {
                return node;
            }
            node.kill();
        }
        panic!("no cluster node would start");
    }

    /// The URLs of every node: what a cluster client starts from.
    pub fn urls(&self) -> Vec<String> {
        self.nodes
            .iter()
            .map(|node| format!("redis://127.0.0.1:{}/", node.port))
            .collect()
    }

    /// A cluster connection as a store uses it: a store's own timeout bounds each
    /// request, so the client's is off, and it gives up on a dead node quickly.
    pub async fn connection(&self) -> ClusterConnection {
        ClusterClient::builder(self.urls())
            .connection_timeout(Duration::from_millis(200))
            .response_timeout(Duration::from_secs(2))
            .retries(3)
            .min_retry_wait(10)
            .max_retry_wait(100)
            .build()
            .expect("a cluster client")
            .get_async_connection()
            .await
            .expect("a cluster connection")
    }

    /// A plain connection to the node on `port`, for the tests' own commands.
    pub async fn node(&self, port: u16) -> MultiplexedConnection {
        node_connection(port).await.expect("the node answers")
    }

    /// Every node as `CLUSTER NODES` (asked of a live node) lists it.
    pub async fn nodes(&self) -> Vec<NodeInfo> {
        let port = self.live_port();
        let mut connection = self.node(port).await;
        let text: String = redis::cmd("CLUSTER")
            .arg("NODES")
            .query_async(&mut connection)
            .await
            .expect("CLUSTER NODES");
        text.lines().map(parse_node).collect()
    }

    /// The live masters, each with its slots.
    pub async fn masters(&self) -> Vec<NodeInfo> {
        self.nodes()
            .await
            .into_iter()
            .filter(|node| node.master && !node.failed && !node.slots.is_empty())
            .collect()
    }

    /// The master that serves `slot`.
    pub async fn master_of(&self, slot: u16) -> NodeInfo {
        self.masters()
            .await
            .into_iter()
            .find(|node| {
                node.slots
                    .iter()
                    .any(|&(start, end)| (start..=end).contains(&slot))
            })
            .expect("every slot has a master")
    }

    /// The slot of `key`, as the cluster computes it.
    pub async fn slot_of(&self, key: &str) -> u16 {
        let mut connection = self.node(self.live_port()).await;
        redis::cmd("CLUSTER")
            .arg("KEYSLOT")
            .arg(key)
            .query_async(&mut connection)
            .await
            .expect("CLUSTER KEYSLOT")
    }

    /// The distinct masters that hold the keys matching `pattern`.
    pub async fn masters_holding(&self, pattern: &str) -> BTreeSet<u16> {
        let mut holding = BTreeSet::new();
        for master in self.masters().await {
            let mut connection = self.node(master.port).await;
            let keys: Vec<String> = redis::cmd("KEYS")
                .arg(pattern)
                .query_async(&mut connection)
                .await
                .expect("KEYS");
            if !keys.is_empty() {
                holding.insert(master.port);
            }
        }
        holding
    }

    /// Kills the node on `port` by its pid, as a crash would.
    pub fn kill(&mut self, port: u16) {
        if let Some(node) = self.nodes.iter_mut().find(|node| node.port == port) {
            node.kill();
        }
    }

    fn live_port(&self) -> u16 {
        self.nodes
            .iter()
            .find(|node| node.child.is_some())
            .expect("a live node")
            .port
    }

    /// Waits until every live node reports `cluster_state:ok` and every slot is served
    /// by a live master.
    pub async fn wait_until_ok(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if self.is_ok().await {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the cluster did not become ok: {:#?}",
                self.nodes().await
            );
            sleep(Duration::from_millis(50)).await;
        }
    }

    async fn is_ok(&self) -> bool {
        for node in self.nodes.iter().filter(|node| node.child.is_some()) {
            let Ok(mut connection) = node_connection(node.port).await else {
                return false;
            };
            let info: Result<String, _> = redis::cmd("CLUSTER")
                .arg("INFO")
                .query_async(&mut connection)
                .await;
            if !info.is_ok_and(|info| info.contains("cluster_state:ok")) {
                return false;
            }
        }
        let served: u32 = self
            .masters()
            .await
            .iter()
            .filter(|master| self.is_live(master.port))
            .flat_map(|master| master.slots.iter())
            .map(|&(start, end)| u32::from(end - start) + 1)
            .sum();
        served == 16384
    }

    fn is_live(&self, port: u16) -> bool {
        self.nodes
            .iter()
            .any(|node| node.port == port && node.child.is_some())
    }
}

impl Node {
    /// Whether this node's process answers on its port (not another test's server).
    async fn answers(&mut self) -> bool {
        let deadline = Instant::now() + Duration::from_secs(10);
        let Some(pid) = self.child.as_ref().map(Child::id) else {
            return false;
        };
        while Instant::now() < deadline {
            if let Some(child) = self.child.as_mut()
                && child.try_wait().expect("redis-server's status").is_some()
            {
                self.child = None;
                return false;
            }
            if process_id(self.port).await == Some(pid) {
                return true;
            }
            sleep(Duration::from_millis(10)).await;
        }
        false
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

async fn node_connection(port: u16) -> redis::RedisResult<MultiplexedConnection> {
    let config = AsyncConnectionConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(2)))
        .set_response_timeout(Some(Duration::from_secs(5)));
    redis::Client::open(format!("redis://127.0.0.1:{port}/"))?
        .get_multiplexed_async_connection_with_config(&config)
        .await
}

async fn process_id(port: u16) -> Option<u32> {
    let mut connection = node_connection(port).await.ok()?;
    let info: String = redis::cmd("INFO")
        .arg("server")
        .query_async(&mut connection)
        .await
        .ok()?;
    info.lines()
        .find_map(|line| line.strip_prefix("process_id:")?.trim().parse().ok())
}

/// One line of `CLUSTER NODES`: `<id> <ip:port@bus> <flags> <master> <ping> <pong>
/// <epoch> <link> <slot> <slot>...`.
fn parse_node(line: &str) -> NodeInfo {
    let fields: Vec<&str> = line.split_whitespace().collect();
    let port = fields[1]
        .split(['@', ','])
        .next()
        .and_then(|address| address.rsplit(':').next())
        .and_then(|port| port.parse().ok())
        .expect("a node address");
    let flags = fields[2];
    let slots = fields[8..]
        .iter()
        // Slots being imported or migrated are listed in brackets.
        .filter(|range| !range.starts_with('['))
        .map(|range| match range.split_once('-') {
            Some((start, end)) => (start.parse().unwrap(), end.parse().unwrap()),
            None => {
                let slot = range.parse().unwrap();
                (slot, slot)
            }
        })
        .collect();
    NodeInfo {
        id: fields[0].to_owned(),
        port,
        master: flags.contains("master"),
        failed: flags.contains("fail"),
        slots,
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            node.kill();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
