//! The write-ahead log of one shard: fixed-size, pre-allocated, memory-mapped segment files
//! holding checksummed batch records with contiguous lsns.
//!
//! Owns: the segment files in one shard directory (`NNNNNNNN.wal`, plus at most one pre-allocated
//! `NNNNNNNN.wal.tmp` spare), the record format (`record`), appending and syncing (`writer`),
//! reading back (`reader`) and deciding what a directory found after a crash means (`recovery`).
//! The format is described once, in `docs/wal-format.md`.
//!
//! Must never: interpret a batch payload (it is opaque bytes), acknowledge anything itself (the
//! shard worker acknowledges after `Wal::sync` returns), continue writing after a failed write,
//! sync or allocation (the writer poisons itself), or repair anything but a torn tail.
//!
//! Per batch the shard worker hands its records to its journal (`node::WalJournal`, on the
//! shard's log thread in sync mode, `shard::log_stage`): `append` once, `sync` once; the worker
//! applies and replies only after that result.

#![deny(clippy::unwrap_used, clippy::indexing_slicing)]
#![deny(clippy::host_endian_bytes, clippy::big_endian_bytes)]

pub mod reader;
pub mod record;
pub mod recovery;
pub mod writer;

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

pub use reader::{Record, Records, WalReader};
pub use recovery::{recover, recover_covered, RecoveryOutcome, RecoveryPolicy, RecoveryReport, SegmentSummary};
pub use writer::Wal;

/// Default segment size: 64 MiB.
pub const DEFAULT_SEGMENT_SIZE: u64 = 64 << 20;
/// Smallest accepted segment size (one page).
pub const MIN_SEGMENT_SIZE: u64 = 4096;
/// Largest accepted segment size (1 GiB): mappings and offsets stay comfortably in range.
pub const MAX_SEGMENT_SIZE: u64 = 1 << 30;
/// Segment indexes are written with 8 decimal digits.
pub const MAX_SEGMENT_INDEX: u64 = 99_999_999;
/// The largest lsn a log may hold: 2^62, which a million batches a second would reach in
/// 146 000 years. A segment header or snapshot naming a larger one is damage (see
/// `WalCorruption::LsnOutOfRange`), and lsn arithmetic never overflows.
pub const LSN_MAX: u64 = 1 << 62;

/// When an appended batch counts as persisted.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub enum PersistMode {
    /// `sync` returns only after `msync(MS_SYNC)` of the written range: an acknowledged batch
    /// survives process crash, kernel crash and power loss (given a disk that honours flushes).
    #[default]
    Sync,
    /// `sync` returns at once; the batch is in the kernel page cache (the segment's pages).
    /// Survives `kill -9` and any crash of the process. Does NOT survive power loss or a kernel
    /// crash: acknowledged batches since the last write-back are lost, and because write-back
    /// order is not guaranteed, recovery may find a hole and refuse to start (`Corrupt`) instead
    /// of truncating. Segments are still synced when sealed at rollover and on `sync_durable`.
    Buffered,
}

impl PersistMode {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Sync => "sync",
            Self::Buffered => "buffered",
        }
    }
}

impl fmt::Display for PersistMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `"sync"` or `"buffered"` did not match.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParsePersistModeError(pub String);

impl fmt::Display for ParsePersistModeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "unknown durability mode {:?} (expected \"sync\" or \"buffered\")", self.0)
    }
}

impl std::error::Error for ParsePersistModeError {}

impl FromStr for PersistMode {
    type Err = ParsePersistModeError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "sync" => Ok(Self::Sync),
            "buffered" => Ok(Self::Buffered),
            other => Err(ParsePersistModeError(other.to_owned())),
        }
    }
}

/// How an appended batch reaches its segment's pages. Either way the segment is mapped (the
/// reader, recovery, replay and the recovery tool read it through the mapping), the bytes and
/// the file are the same, and a batch is durable after the same `msync(MS_SYNC)` of its range.
///
/// They differ in what the sync costs. A page dirtied through the mapping has to be
/// write-protected again when it is written back, and on a multi-core machine that means a
/// TLB-shootdown interrupt to every other core running the process (a VM exit each, under a
/// hypervisor), plus a page fault on the first store to each page. A page written by `pwrite`
/// was never writable in the process's page tables, so write-back needs neither. On the
/// development VM the durable server's TCP storm ran 36-70 % faster with `pwrite`, and the
/// p99.9 of balance reads during the in-process storm fell from 12-15 us to 1.4-3.5 us
/// (docs/benchmarks.md, sessions 5 and 6). So `pwrite` is the default since session 6.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub enum LogWrite {
    /// A copy into the shared mapping (`MmapMut`).
    Mmap,
    /// `pwrite(2)` on the segment's file descriptor, into the same page cache pages (the
    /// segment stays mapped: everything that reads the log reads the mapping).
    #[default]
    Pwrite,
}

impl LogWrite {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Mmap => "mmap",
            Self::Pwrite => "pwrite",
        }
    }
}

impl FromStr for LogWrite {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "mmap" => Ok(Self::Mmap),
            "pwrite" => Ok(Self::Pwrite),
            other => Err(format!("unknown log write method {other:?} (expected mmap or pwrite)")),
        }
    }
}

impl fmt::Display for LogWrite {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Configuration chosen when a writer opens a log.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct WalConfig {
    /// Size of each new segment file. Existing segments keep the size in their header.
    /// A multiple of 4096 in `MIN_SEGMENT_SIZE..=MAX_SEGMENT_SIZE`. The largest batch payload is
    /// `record::max_payload(segment_size)` (segment size minus 112 bytes of headers).
    pub segment_size: u64,
    pub persist_mode: PersistMode,
    pub write: LogWrite,
    /// With `PersistMode::Sync`, zero-fill each spare segment on a helper thread before the log
    /// needs it (`storage::Prefill`): syncs then overwrite written blocks instead of converting
    /// reserved ones, which costs a journal commit each. Doubles the bytes the log writes.
    pub prefill: bool,
}

impl Default for WalConfig {
    fn default() -> Self {
        Self {
            segment_size: DEFAULT_SEGMENT_SIZE,
            persist_mode: PersistMode::Sync,
            write: LogWrite::default(),
            prefill: true,
        }
    }
}

impl WalConfig {
    /// Checks the limits; `Wal::open` calls this.
    pub fn validate(&self) -> Result<(), crate::error::WalError> {
        let s = self.segment_size;
        if !(MIN_SEGMENT_SIZE..=MAX_SEGMENT_SIZE).contains(&s) || !s.is_multiple_of(4096) {
            return Err(crate::error::WalError::InvalidConfig {
                reason: format!(
                    "segment_size {s} must be a multiple of 4096 between {MIN_SEGMENT_SIZE} and {MAX_SEGMENT_SIZE}"
                ),
            });
        }
        Ok(())
    }

    /// Largest batch payload `append` accepts with this configuration.
    pub fn max_payload(&self) -> u64 {
        record::max_payload(self.segment_size)
    }
}

/// The directory of shard `shard_id` under a data directory: `DATA_DIR/shard-00`, ...
pub fn shard_dir(data_dir: &Path, shard_id: u32) -> PathBuf {
    data_dir.join(format!("shard-{shard_id:02}"))
}

/// `00000042.wal`
pub fn segment_file_name(index: u64) -> String {
    format!("{index:08}.wal")
}

/// `00000042.wal.tmp`: a pre-allocated segment not yet part of the log.
pub fn spare_file_name(index: u64) -> String {
    format!("{index:08}.wal.tmp")
}

fn parse_index(digits: &str) -> Option<u64> {
    (digits.len() == 8 && digits.bytes().all(|b| b.is_ascii_digit())).then(|| digits.parse().ok()).flatten()
}

/// The index of a segment file name, if `name` is one.
pub fn parse_segment_file_name(name: &str) -> Option<u64> {
    name.strip_suffix(".wal").and_then(parse_index)
}

/// The index of a spare file name, if `name` is one.
pub fn parse_spare_file_name(name: &str) -> Option<u64> {
    name.strip_suffix(".wal.tmp").and_then(parse_index)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_roundtrip() {
        assert_eq!(segment_file_name(42), "00000042.wal");
        assert_eq!(parse_segment_file_name("00000042.wal"), Some(42));
        assert_eq!(parse_spare_file_name("00000042.wal.tmp"), Some(42));
        assert_eq!(parse_segment_file_name("00000042.wal.tmp"), None);
        assert_eq!(parse_segment_file_name("0000042.wal"), None);
        assert_eq!(parse_segment_file_name("+0000042.wal"), None);
        assert_eq!(shard_dir(Path::new("/d"), 3), Path::new("/d/shard-03"));
    }

    #[test]
    fn persist_mode_parses() {
        assert_eq!("sync".parse(), Ok(PersistMode::Sync));
        assert_eq!("buffered".parse(), Ok(PersistMode::Buffered));
        assert!("fast".parse::<PersistMode>().is_err());
        assert_eq!(PersistMode::default(), PersistMode::Sync);
    }
}
