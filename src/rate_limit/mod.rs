//! The rate limiting middleware (in progress).

mod error;

pub use self::error::RateLimited;
