//! The correlation middleware (in progress).
