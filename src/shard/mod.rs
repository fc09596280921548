//! The sharded engine: routing, the id directory, bounded queues and the single-writer workers.
//!
//! Architecture invariant: only `worker.rs` sequences journal-append / apply / reply, and no
//! reply leaves a worker before its batch is durable.

pub mod directory;
pub mod log_stage;
pub mod router;
pub mod stats;
pub mod worker;
