//! The circuit breaker middleware (in progress).

mod error;

pub use self::error::CircuitOpen;
