//! The retry middleware (in progress).
