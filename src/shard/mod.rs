//! The sharded engine: routing, the id directory, bounded queues and the single-writer workers.
//!
//! Architecture invariant: only `worker.rs` sequences journal-append / apply / reply (the
//! append itself may run on the shard's log thread, `log_stage.rs`), and nothing of a batch
//! leaves a worker before the batch is durable.

pub mod directory;
pub mod log_stage;
pub mod router;
pub mod stats;
pub mod worker;
