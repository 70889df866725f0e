//! The offline tools, each a subcommand: `check` (a configuration against its broker, topics,
//! spool directory and bucket), `verify` (the archive against Kafka, or against itself),
//! `restore` (the archive replayed into a topic) and `bench-store` (the store's raw PUT rate).
//!
//! They depend on the archive contract, the store, the Kafka client configuration and the
//! configuration, never on the daemon's pipeline stages (`tests/architecture.rs` holds to that):
//! a tool reads what the archiver wrote, not how it got there.

pub mod bench;
pub mod check;
pub mod progress;
pub mod restore;
pub mod verify;
