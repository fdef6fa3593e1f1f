//! The rate_limit middleware (in progress).
