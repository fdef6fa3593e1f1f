//! palisade's benches, in `benches/`: each layer against a bare service and against its
//! peers (tower, tower-http, governor, tower_governor, tower-resilience, failsafe) in the
//! same build. A workspace member of its own so that the library's `cargo test` builds
//! no peer crate. Not published.
//!
//! [`stacks`] builds every compared service stack once, for the criterion benches (wall
//! time) and for the instruction counts (`benches/instructions.rs`, callgrind through
//! gungraun; `scripts/instructions` prints the table).

pub mod drive;
pub mod stacks;
