//! The circuit_breaker middleware (in progress).
