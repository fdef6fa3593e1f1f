//! A `redis-server` for the Redis store's tests and bench: started on 127.0.0.1 with a
//! free port and a temporary directory, killed on drop.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use redis::AsyncConnectionConfig;
use redis::aio::{ConnectionManager, ConnectionManagerConfig, MultiplexedConnection};
use tokio::time::{Instant, sleep};

/// A `redis-server` of our own; killed (and its directory removed) on drop.
pub struct RedisServer {
    port: u16,
    dir: PathBuf,
    child: Option<Child>,
}

impl RedisServer {
    /// Starts a server on a free port: another one if a concurrent test took that port
    /// between our probe and the server's bind.
    pub async fn start() -> Self {
        let mut attempts = 0;
        loop {
            let port = TcpListener::bind("127.0.0.1:0")
                .and_then(|listener| listener.local_addr())
                .expect("a free port")
                .port();
            let dir =
                std::env::temp_dir().join(format!("palisade-redis-{}-{port}", std::process::id()));
            std::fs::create_dir_all(&dir).expect("a temporary directory");
            let mut server = Self {
                port,
                dir,
                child: None,
            };
            match server.launch().await {
                Ok(()) => return server,
                Err(status) => {
                    attempts += 1;
                    assert!(attempts < 5, "redis-server exited: {status}");
                }
            }
        }
    }

    /// Starts the server again, on the same port, and waits until it answers.
    pub async fn restart(&mut self) {
        if let Err(status) = self.launch().await {
            panic!("redis-server exited: {status} (port {} taken?)", self.port);
        }
    }

    /// Spawns `redis-server` and waits until it answers on our port, or exits (its port
    /// was taken). The answer must come from our process: a server of another test that
    /// took the port would answer too.
    async fn launch(&mut self) -> Result<(), ExitStatus> {
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--dir"])
            .arg(&self.dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server on PATH (scripts/test installs it)");
        let pid = child.id();
        // Held by `self` meanwhile, so that a failed wait still kills it on drop.
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(child) = self.child.as_mut()
                && let Some(status) = child.try_wait().expect("redis-server's status")
            {
                self.child = None;
                return Err(status);
            }
            if self.process_id().await == Some(pid) {
                return Ok(());
            }
            assert!(Instant::now() < deadline, "redis-server did not answer");
            sleep(Duration::from_millis(10)).await;
        }
    }

    /// The process id of the server answering on our port, if one does.
    async fn process_id(&self) -> Option<u32> {
        let mut connection = self.connection().await.ok()?;
        let info: String = redis::cmd("INFO")
            .arg("server")
            .query_async(&mut connection)
            .await
            .ok()?;
        info.lines()
            .find_map(|line| line.strip_prefix("process_id:")?.trim().parse().ok())
    }

    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// A connection of the test's own, patient with a loaded machine (the client's
    /// default gives up on a reply after 500 ms).
    pub async fn connection(&self) -> redis::RedisResult<MultiplexedConnection> {
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(5)))
            .set_response_timeout(Some(Duration::from_secs(5)));
        redis::Client::open(self.url())?
            .get_multiplexed_async_connection_with_config(&config)
            .await
    }

    /// What a store's layer uses: reconnects quickly, so that the tests need not wait.
    /// How long a request waits for a reply is the store's timeout alone (the client's
    /// default, 500 ms, would fail a request a slow machine gives longer).
    pub async fn manager(&self) -> ConnectionManager {
        let config = ConnectionManagerConfig::new()
            .set_response_timeout(None)
            .set_connection_timeout(Some(Duration::from_secs(1)))
            .set_number_of_retries(1)
            .set_min_delay(Duration::from_millis(10))
            .set_max_delay(Duration::from_millis(20));
        let client = redis::Client::open(self.url()).unwrap();
        ConnectionManager::new_with_config(client, config)
            .await
            .unwrap()
    }

    pub async fn keys(&self, pattern: &str) -> Vec<String> {
        let mut connection = self.connection().await.unwrap();
        let mut keys: Vec<String> = redis::cmd("KEYS")
            .arg(pattern)
            .query_async(&mut connection)
            .await
            .unwrap();
        keys.sort();
        keys
    }

    /// How many scripts the server ran (`EVALSHA` and `EVAL` calls that did not fail):
    /// the store's round trips.
    pub async fn script_runs(&self) -> u64 {
        let mut connection = self.connection().await.unwrap();
        let info: String = redis::cmd("INFO")
            .arg("commandstats")
            .query_async(&mut connection)
            .await
            .unwrap();
        info.lines()
            .filter(|line| {
                line.starts_with("cmdstat_evalsha:") || line.starts_with("cmdstat_eval:")
            })
            .map(|line| stat(line, "calls") - stat(line, "failed_calls"))
            .sum()
    }

    pub async fn get(&self, key: &str) -> Option<String> {
        let mut connection = self.connection().await.unwrap();
        redis::cmd("GET")
            .arg(key)
            .query_async(&mut connection)
            .await
            .unwrap()
    }

    pub async fn pttl(&self, key: &str) -> i64 {
        let mut connection = self.connection().await.unwrap();
        redis::cmd("PTTL")
            .arg(key)
            .query_async(&mut connection)
            .await
            .unwrap()
    }
}

/// `name`'s value in a line such as `cmdstat_get:calls=2,usec=5,failed_calls=0`.
fn stat(line: &str, name: &str) -> u64 {
    line.split([':', ','])
        .find_map(|field| field.strip_prefix(name)?.strip_prefix('='))
        .map_or(0, |value| value.parse().unwrap())
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
