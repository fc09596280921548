//! stormledger: an in-memory, durable, sharded ledger for a live-streaming wallet.
//!
//! Modules in reading order:
//! - `config`: every limit and business parameter, validated at startup.
//! - `layout`: the fixed little-endian records shared by the log and the wire (command, reply,
//!   query, history, event and watch records).
//! - `ledger`: the deterministic wallet state machine (no IO, no clock, no randomness).
//! - `shard`: routing, the id directory, bounded queues and the single-writer worker loop.
//! - `engine`: the facade that starts the workers and routes commands and reads.
//! - `feed`: the event feed: per-shard bounded rings of committed events, positions, cursors.
//! - `node`: a durable node: data-directory lock, recovery, the engine over per-shard logs.
//! - `wal`: the memory-mapped write-ahead log: segments, batch records, reader, recovery.
//! - `storage`: the narrow file trait the log writes through (real, fault-injecting, crash image).
//! - `snapshot`: the checksummed snapshot container (write tmp, fsync, rename, fsync dir; load),
//!   and `snapshot::state`, the shard-state codec.
//! - `error`: typed errors of the IO layers (storage, wal, snapshot).
//! - `protocol`: the wire format (frame header, codec, async framing); the only module that
//!   knows wire bytes. Normative description in `docs/protocol.md`.
//! - `server`: TCP listener and per-connection reader/writer tasks over the `server::Backend`
//!   trait the engine implements.
//! - `client`: the async client (batching, pipelining, request-id matching) built on `protocol`.
//! - `tls`: optional TLS under the framing (rustls on ring): PEM loading for server and client.
//! - `workload`: the seeded gift-storm workload shared by benches, the storm tool and tests.
//! - `mem`: huge-page hints for the big tables, and the allocator tuning (`tune_allocator`).
//! - `cli`: the `stormledger` binary: `serve` (config, signals, metrics) and the client CLI.

/// `eprintln!` that never panics, for the server's threads (shard workers, log threads, the
/// engine, connection tasks): `eprintln!` panics when stderr fails, as it does for good once the
/// process reading the server's log has gone (EPIPE), and a shard whose thread dies answers
/// every write `busy` from then on. The message is lost instead.
#[macro_export]
macro_rules! log_line {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}

pub mod cli;
pub mod client;
pub mod config;
pub mod engine;
pub mod error;
pub mod feed;
pub mod layout;
pub mod ledger;
pub mod mem;
pub mod node;
pub mod protocol;
pub mod server;
pub mod shard;
pub mod snapshot;
pub mod storage;
pub mod tls;
pub mod wal;
pub mod workload;

/// Keeps the C allocator from returning large freed blocks to the kernel between batches.
///
/// Batches of thousands of commands allocate buffers of hundreds of KiB per stage; with glibc's
/// defaults some of them come from fresh `mmap`s that are unmapped again when freed, and every
/// unmap is a page-fault storm plus a TLB shootdown on the other cores. Called once at the start
/// of the server and the tools; harmless elsewhere.
pub fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters; called before heavy allocation.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 4 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 64 << 20);
    }
}
