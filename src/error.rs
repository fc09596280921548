//! Typed errors of the IO layers: storage, write-ahead log, snapshot.
//!
//! Owns: one `#[non_exhaustive]` enum per layer, each message naming the file (and the offset
//! where one applies) so an operator can act on it without a debugger.
//!
//! Must never hold business outcomes (insufficient funds, duplicate ids, ...): those are status
//! values of the ledger, not errors. Nothing here is boxed; callers match on variants.

use std::fmt;
use std::io;
use std::path::PathBuf;

/// A failure of the file layer underneath the log (`storage`).
#[derive(Debug)]
#[non_exhaustive]
pub enum StorageError {
    /// An operating-system call failed. `op` names the call ("open", "msync", "rename", ...).
    Io { op: &'static str, path: PathBuf, source: io::Error },
    /// Reserving disk space for a new file failed (a full disk shows up here, never as a SIGBUS
    /// on a later write to the mapping).
    Allocate { path: PathBuf, len: u64, source: io::Error },
    /// Another process (or another handle in this one) holds the data-directory lock.
    AlreadyLocked { path: PathBuf },
    /// A write or sync outside the file, or a write through a read-only handle: a caller bug,
    /// reported instead of corrupting memory.
    OutOfBounds { path: PathBuf, offset: u64, len: u64, file_len: u64 },
    /// A write through a handle opened read-only.
    ReadOnly { path: PathBuf },
}

impl fmt::Display for StorageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Io { op, path, source } => write!(f, "{op} {}: {source}", path.display()),
            Self::Allocate { path, len, source } => {
                write!(f, "cannot allocate {len} bytes for {}: {source}", path.display())
            }
            Self::AlreadyLocked { path } => write!(
                f,
                "data directory is locked by another process ({}); is a server already running?",
                path.display()
            ),
            Self::OutOfBounds { path, offset, len, file_len } => {
                write!(f, "access of {len} bytes at offset {offset} is outside {} ({file_len} bytes)", path.display())
            }
            Self::ReadOnly { path } => write!(f, "{} is open read-only", path.display()),
        }
    }
}

impl std::error::Error for StorageError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Io { source, .. } | Self::Allocate { source, .. } => Some(source),
            _ => None,
        }
    }
}

impl StorageError {
    /// The underlying OS error kind, if this error came from the OS.
    pub fn io_kind(&self) -> Option<io::ErrorKind> {
        match self {
            Self::Io { source, .. } | Self::Allocate { source, .. } => Some(source.kind()),
            _ => None,
        }
    }

    /// The raw OS error number (`ENOSPC`, ...), if any.
    pub fn raw_os_error(&self) -> Option<i32> {
        match self {
            Self::Io { source, .. } | Self::Allocate { source, .. } => source.raw_os_error(),
            _ => None,
        }
    }
}

/// Why a log file was judged corrupt. Every variant is a state the writer never produces, so
/// recovery refuses to start rather than guess.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum WalCorruption {
    /// A segment or record header does not start with the expected magic bytes.
    BadMagic,
    /// A header names a format version this build does not read.
    UnsupportedVersion { found: u16 },
    /// A header's own checksum does not match.
    HeaderChecksum,
    /// A segment header's first lsn is 0 or above `wal::LSN_MAX` (no log reaches it: the header
    /// was made by something else than the writer).
    LsnOutOfRange { first_lsn: u64 },
    /// A record's payload checksum does not match.
    PayloadChecksum,
    /// A record claims a payload that runs past the end of its segment.
    RecordPastSegmentEnd { len: u64 },
    /// A segment file is shorter than its header, or its size differs from the header's.
    SegmentSize { expected: u64, found: u64 },
    /// The segment header names a different segment index than its file name.
    SegmentIndex { expected: u64, found: u64 },
    /// The file belongs to another shard.
    ShardMismatch { expected: u32, found: u32 },
    /// Record lsns are not contiguous (within a segment or across a segment boundary).
    LsnGap { expected: u64, found: u64 },
    /// A segment file is missing from the sequence.
    MissingSegment { index: u64 },
    /// A bad record is followed by a valid one (at `valid_offset` in `valid_file`): this is not a
    /// torn tail, and truncating would drop acknowledged records.
    ValidRecordAfterBadRecord { valid_file: PathBuf, valid_offset: u64, reason: Box<WalCorruption> },
    /// A bad record in a segment that is not the last one. The writer syncs a segment before it
    /// starts the next, so only the last segment can have a torn tail.
    BadRecordInSealedSegment { reason: Box<WalCorruption> },
    /// The bytes after the last valid record are not all zero although no record header starts
    /// there (a record whose header was torn away, or damage).
    NonZeroAfterLastRecord,
    /// A bad last record (or bytes where it should be) at `lsn`, which the newest valid snapshot
    /// covers (it includes every record up to `snapshot_lsn`). The worker syncs the log before it
    /// writes a snapshot, so the record was durable: this is damage, not a torn tail, and
    /// truncating it would leave a log that ends before its snapshot.
    BadRecordCoveredBySnapshot { lsn: u64, snapshot_lsn: u64, reason: Box<WalCorruption> },
}

impl fmt::Display for WalCorruption {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::BadMagic => f.write_str("bad magic"),
            Self::UnsupportedVersion { found } => write!(f, "unsupported format version {found}"),
            Self::HeaderChecksum => f.write_str("header checksum mismatch"),
            Self::LsnOutOfRange { first_lsn } => {
                write!(f, "segment header's first lsn {first_lsn} is outside 1..=2^62")
            }
            Self::PayloadChecksum => f.write_str("payload checksum mismatch"),
            Self::RecordPastSegmentEnd { len } => {
                write!(f, "record of {len} bytes runs past the end of the segment")
            }
            Self::SegmentSize { expected, found } => {
                write!(f, "segment size is {found} bytes, header says {expected}")
            }
            Self::SegmentIndex { expected, found } => {
                write!(f, "segment header names index {found}, file name says {expected}")
            }
            Self::ShardMismatch { expected, found } => {
                write!(f, "belongs to shard {found}, expected shard {expected}")
            }
            Self::LsnGap { expected, found } => {
                write!(f, "lsn gap: expected {expected}, found {found}")
            }
            Self::MissingSegment { index } => write!(f, "segment {index:08} is missing"),
            Self::ValidRecordAfterBadRecord { valid_file, valid_offset, reason } => write!(
                f,
                "{reason}, and a valid record follows at {}:{valid_offset} (not a torn tail)",
                valid_file.display()
            ),
            Self::BadRecordInSealedSegment { reason } => {
                write!(f, "{reason} in a sealed segment (only the last segment may have a torn tail)")
            }
            Self::NonZeroAfterLastRecord => f.write_str("non-zero bytes after the last record"),
            Self::BadRecordCoveredBySnapshot { lsn, snapshot_lsn, reason } => write!(
                f,
                "the last record, lsn {lsn}, is bad ({reason}) but the snapshot covers it (up to lsn {snapshot_lsn}): \
                 it was synced before the snapshot was written, so this is damage, not a torn tail"
            ),
        }
    }
}

/// A failure of the write-ahead log.
#[derive(Debug)]
#[non_exhaustive]
pub enum WalError {
    /// The file layer failed. The writer is poisoned if this happened on a write, sync or
    /// allocation.
    Storage(StorageError),
    /// An earlier write, sync or allocation failed; the state of the log on disk is unknown, so
    /// the writer accepts nothing until the process restarts and recovery has run.
    Poisoned,
    /// A batch payload larger than fits in one segment. Nothing was written.
    PayloadTooLarge { len: u64, max: u64 },
    /// The log is damaged in a way recovery must not repair automatically.
    Corrupt { file: PathBuf, offset: u64, reason: WalCorruption },
    /// A configuration value is out of range.
    InvalidConfig { reason: String },
    /// The caller asked for records that retention has already removed.
    LsnUnavailable { requested: u64, first_available: u64 },
}

impl fmt::Display for WalError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Storage(e) => write!(f, "wal storage error: {e}"),
            Self::Poisoned => {
                f.write_str("wal refuses writes after an earlier write/sync failure; restart to run recovery")
            }
            Self::PayloadTooLarge { len, max } => {
                write!(f, "wal batch payload of {len} bytes exceeds the maximum of {max} bytes")
            }
            Self::Corrupt { file, offset, reason } => {
                write!(f, "wal corrupt at {}:{offset}: {reason}", file.display())
            }
            Self::InvalidConfig { reason } => write!(f, "invalid wal configuration: {reason}"),
            Self::LsnUnavailable { requested, first_available } => {
                write!(f, "wal lsn {requested} is no longer available (first available is {first_available})")
            }
        }
    }
}

impl std::error::Error for WalError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Storage(e) => Some(e),
            _ => None,
        }
    }
}

impl From<StorageError> for WalError {
    fn from(e: StorageError) -> Self {
        Self::Storage(e)
    }
}

/// A failure to write, find or verify a snapshot.
#[derive(Debug)]
#[non_exhaustive]
pub enum SnapshotError {
    /// An operating-system call failed.
    Io { op: &'static str, path: PathBuf, source: io::Error },
    /// The file is shorter than its header says (a torn or truncated copy).
    Truncated { path: PathBuf, expected_len: u64, actual_len: u64 },
    /// A checksum, magic, version or layout check failed at `offset`.
    Corrupt { path: PathBuf, offset: u64, reason: String },
    /// The snapshot does not fit the format's limits (too many sections, ...). Nothing written.
    TooLarge { reason: String },
    /// An intact snapshot (header checksum verified) of a format version this build cannot read.
    UnsupportedVersion { path: PathBuf, version: u16, supported: u16 },
    /// Snapshots exist but none verifies; each rejection is listed, newest first.
    NoneValid { dir: PathBuf, rejected: Vec<SnapshotError> },
}

impl fmt::Display for SnapshotError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Io { op, path, source } => {
                write!(f, "snapshot {op} {}: {source}", path.display())
            }
            Self::Truncated { path, expected_len, actual_len } => {
                write!(f, "snapshot {} is truncated: {actual_len} bytes, header says {expected_len}", path.display())
            }
            Self::Corrupt { path, offset, reason } => {
                write!(f, "snapshot {} corrupt at offset {offset}: {reason}", path.display())
            }
            Self::TooLarge { reason } => write!(f, "snapshot too large: {reason}"),
            Self::UnsupportedVersion { path, version, supported } => write!(
                f,
                "snapshot {} has format version {version}; this build reads only version {supported}",
                path.display()
            ),
            Self::NoneValid { dir, rejected } => {
                write!(f, "no valid snapshot in {} ({} rejected", dir.display(), rejected.len())?;
                for e in rejected {
                    write!(f, "; {e}")?;
                }
                f.write_str(")")
            }
        }
    }
}

impl std::error::Error for SnapshotError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Io { source, .. } => Some(source),
            _ => None,
        }
    }
}
