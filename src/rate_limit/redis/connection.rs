//! What the store sends its scripts on: one Redis node, or a Redis Cluster.

use ::redis::aio::{ConnectionLike, ConnectionManager};
#[cfg(feature = "redis-cluster")]
use ::redis::cluster_async::ClusterConnection;
use ::redis::{Cmd, Pipeline, RedisFuture, Value};
use std::fmt;

/// The connection a [`RedisStore`](super::RedisStore) runs its scripts on: a single
/// node's [`ConnectionManager`], or (feature `redis-cluster`) a Redis Cluster's
/// [`ClusterConnection`](::redis::cluster_async::ClusterConnection).
///
/// Made with `From`, so [`RedisStore::new`](super::RedisStore::new) takes either
/// connection as it is. Both reconnect on their own; the cluster connection also
/// follows `MOVED` and `ASK` redirections (a slot that moved, or is moving, to another
/// master) and re-reads the cluster's slots when a node fails over. Each decision is
/// one script on one key either way, so the store has one code path for both.
///
/// ```no_run
/// # #[cfg(feature = "redis-cluster")]
/// # async fn run() -> Result<(), tower::BoxError> {
/// use palisade::rate_limit::RedisConnection;
///
/// let nodes = ["redis://10.0.0.1:6379/", "redis://10.0.0.2:6379/", "redis://10.0.0.3:6379/"];
/// let cluster = redis::cluster::ClusterClient::new(nodes.to_vec())?;
/// let connection = RedisConnection::from(cluster.get_async_connection().await?);
/// # drop(connection);
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct RedisConnection(Node);

#[derive(Clone)]
enum Node {
    Single(ConnectionManager),
    #[cfg(feature = "redis-cluster")]
    Cluster(ClusterConnection),
}

impl RedisConnection {
    /// Whether this is a connection to a Redis Cluster.
    pub fn is_cluster(&self) -> bool {
        match self.0 {
            Node::Single(_) => false,
            #[cfg(feature = "redis-cluster")]
            Node::Cluster(_) => true,
        }
    }
}

impl fmt::Debug for RedisConnection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = if self.is_cluster() {
            "cluster"
        } else {
            "single node"
        };
        f.debug_tuple("RedisConnection").field(&kind).finish()
    }
}

impl From<ConnectionManager> for RedisConnection {
    fn from(connection: ConnectionManager) -> Self {
        Self(Node::Single(connection))
    }
}

#[cfg(feature = "redis-cluster")]
#[cfg_attr(docsrs, doc(cfg(feature = "redis-cluster")))]
impl From<ClusterConnection> for RedisConnection {
    fn from(connection: ClusterConnection) -> Self {
        Self(Node::Cluster(connection))
    }
}

impl ConnectionLike for RedisConnection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match &mut self.0 {
            Node::Single(connection) => connection.req_packed_command(cmd),
            #[cfg(feature = "redis-cluster")]
            Node::Cluster(connection) => connection.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match &mut self.0 {
            Node::Single(connection) => connection.req_packed_commands(pipeline, offset, count),
            #[cfg(feature = "redis-cluster")]
            Node::Cluster(connection) => connection.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match &self.0 {
            Node::Single(connection) => connection.get_db(),
            #[cfg(feature = "redis-cluster")]
            Node::Cluster(connection) => connection.get_db(),
        }
    }
}
