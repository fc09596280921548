//! stormledger: an in-memory, durable, sharded ledger for a live-streaming wallet.
//!
//! Modules in reading order:
//! - `layout`: the fixed little-endian command/reply records shared by the log and the wire.
//! - `ledger`: the deterministic wallet state machine (no IO, no clock, no randomness).
//! - `wal`: the memory-mapped write-ahead log: segments, batch records, reader, recovery.
//! - `storage`: the narrow file trait the log writes through (real, fault-injecting, crash image).
//! - `snapshot`: the checksummed snapshot container (write tmp, fsync, rename, fsync dir; load).
//! - `error`: typed errors of the IO layers (storage, wal, snapshot).

pub mod error;
pub mod layout;
pub mod ledger;
pub mod snapshot;
pub mod storage;
pub mod wal;
