//! A fleet-wide [`Store`](super::Store) on Redis (feature `redis`): the buckets live on
//! the server, so every replica of a service draws from the same ones.
//!
//! By role: [`RedisStore`] and its `Store` implementation (`store.rs`), the
//! [`RedisConnection`] to one node or a cluster (`connection.rs`), its
//! [`RedisOptions`] (`options.rs`), the Lua scripts and their units (`script.rs`), the
//! scripts' reply (`reply.rs`), whether Redis answers (`health.rs`), leased batches
//! (`lease.rs`), how keys become Redis keys (`key.rs`), and the fail-closed rejection
//! (`error.rs`).

mod connection;
mod error;
mod health;
mod key;
mod lease;
mod options;
mod reply;
mod script;
mod store;

pub use self::connection::RedisConnection;
pub use self::error::RedisUnavailable;
pub use self::key::RedisKey;
pub use self::options::{RedisOptions, WhenUnavailable};
pub use self::store::{RedisReservation, RedisRoundTrip, RedisStore};
