//! What a shard directory found after a crash means, and the one repair allowed: truncating a
//! torn tail.
//!
//! Owns three steps, kept apart so the decision is testable as a table:
//! 1. `scan_segment`: pure, over one segment's bytes -> `SegmentFacts`;
//! 2. `classify`: pure, over all segments' facts -> `Decision`;
//! 3. `recover`: the IO around them (list, open, scan, classify, then act per `RecoveryPolicy`).
//!
//! The server (`Wal::open_covered`), `WalReader::open_covered` and every `stormledger-recover`
//! subcommand go through `recover`; they differ only in the policy (and pass the lsn their
//! snapshot covers, where they know it).
//!
//! Must never: truncate anything but a torn tail of the *last* segment, write under
//! `RecoveryPolicy::ReadOnly`, or guess past a record it cannot verify.
//!
//! Rules (the writer's protocol is what makes them sound; see docs/wal-format.md):
//! - The writer syncs a segment before the next one exists, so only the last segment may end in
//!   a bad record. A bad record anywhere else is corruption.
//! - A bad record followed by any valid record of this shard with a later lsn is corruption:
//!   truncating there would drop records that were written (and maybe acknowledged) after it.
//! - Segment files appear under their final name only after their header is synced (they are
//!   prepared as `.wal.tmp` and renamed), so a bad segment header is corruption, never a tear.
//! - The worker syncs the log before it writes a snapshot, so every record up to the newest
//!   valid snapshot's lsn (`covered_lsn`, passed in by the caller) was durable: a bad last record
//!   at or below it is damage, never a tear, and truncating it would leave a log that ends before
//!   its snapshot (a directory that never starts again, its bytes gone).

use std::path::{Path, PathBuf};

use crate::error::{WalCorruption, WalError};
use crate::storage::{OpenMode, Storage, StorageFile};

use super::record::{decode_record, decode_segment_header, Frame, SegmentInfo, RECORD_ALIGN, SEGMENT_HEADER_SIZE};
use super::{parse_segment_file_name, parse_spare_file_name};

/// Whether recovery may write.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum RecoveryPolicy {
    /// Zero a torn tail and remove stale spare files (the server, `stormledger-recover recover`).
    TruncateTornTail,
    /// Never write; report what would be truncated (verify, inspect, `recover --dry-run`).
    ReadOnly,
}

/// How the end of one segment looks after its last valid record.
#[derive(Clone, PartialEq, Eq, Debug)]
pub enum Tail {
    /// Only zeros follow.
    Clean,
    /// Something that is not a valid record follows, up to `dirty_end` (one past the last
    /// non-zero byte). `valid_after` is the offset of a valid record of this shard found after
    /// it, if any.
    Bad { reason: WalCorruption, dirty_end: u64, valid_after: Option<u64> },
    /// A record whose checksums verify but which the writer cannot have written here (wrong
    /// shard, lsn out of sequence). Never a tear.
    Fatal { offset: u64, reason: WalCorruption },
}

/// What the scan of one segment found: the input of `classify`.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct SegmentFacts {
    pub index: u64,
    pub path: PathBuf,
    /// The header's first lsn, or why the header is unusable.
    pub header: Result<u64, WalCorruption>,
    pub records: u64,
    pub last_lsn: Option<u64>,
    /// Offset one past the last valid record (the header size if none).
    pub valid_end: u64,
    pub tail: Tail,
}

/// The verdict over a whole shard directory.
#[derive(Clone, PartialEq, Eq, Debug)]
pub enum Decision {
    /// No segment files.
    Empty,
    /// Every segment verifies and ends in zeros.
    Clean,
    /// The last segment ends in a torn record: zero `bytes` bytes from `offset`.
    TruncateTail { segment: u64, path: PathBuf, offset: u64, bytes: u64 },
    /// Refuse to start.
    Corrupt { file: PathBuf, offset: u64, reason: WalCorruption },
}

/// Scans one segment. Pure: reads only `bytes`.
pub fn scan_segment(index: u64, path: &Path, bytes: &[u8], shard_id: u32) -> SegmentFacts {
    let mut facts = SegmentFacts {
        index,
        path: path.to_path_buf(),
        header: Err(WalCorruption::BadMagic),
        records: 0,
        last_lsn: None,
        valid_end: 0,
        tail: Tail::Clean,
    };
    let info = match check_header(index, bytes, shard_id) {
        Ok(info) => info,
        Err(reason) => {
            facts.header = Err(reason);
            return facts;
        }
    };
    facts.header = Ok(info.first_lsn);
    let mut offset = SEGMENT_HEADER_SIZE;
    let mut expected_lsn = info.first_lsn;
    let mut bad = None;
    loop {
        let rest = usize::try_from(offset).ok().and_then(|o| bytes.get(o..)).unwrap_or_default();
        match decode_record(rest) {
            Frame::Valid(r) => {
                let fatal = if r.shard_id != shard_id {
                    Some(WalCorruption::ShardMismatch { expected: shard_id, found: r.shard_id })
                } else if r.lsn != expected_lsn {
                    Some(WalCorruption::LsnGap { expected: expected_lsn, found: r.lsn })
                } else {
                    None
                };
                if let Some(reason) = fatal {
                    facts.valid_end = offset;
                    facts.tail = Tail::Fatal { offset, reason };
                    return facts;
                }
                facts.records += 1;
                facts.last_lsn = Some(r.lsn);
                expected_lsn += 1;
                offset += r.size;
            }
            Frame::Empty => break,
            Frame::Invalid(reason) => {
                bad = Some(reason);
                break;
            }
        }
    }
    facts.valid_end = offset;
    let dirty_end = dirty_end(bytes, offset);
    if bad.is_none() && dirty_end == offset {
        return facts;
    }
    let reason = bad.unwrap_or(WalCorruption::NonZeroAfterLastRecord);
    let valid_after = find_valid_record(bytes, offset + RECORD_ALIGN, dirty_end, shard_id, expected_lsn);
    facts.tail = Tail::Bad { reason, dirty_end, valid_after };
    facts
}

fn check_header(index: u64, bytes: &[u8], shard_id: u32) -> Result<SegmentInfo, WalCorruption> {
    let info = decode_segment_header(bytes)?;
    if info.shard_id != shard_id {
        return Err(WalCorruption::ShardMismatch { expected: shard_id, found: info.shard_id });
    }
    if info.segment_index != index {
        return Err(WalCorruption::SegmentIndex { expected: index, found: info.segment_index });
    }
    if info.segment_size != bytes.len() as u64 {
        return Err(WalCorruption::SegmentSize { expected: info.segment_size, found: bytes.len() as u64 });
    }
    Ok(info)
}

/// One past the last non-zero byte at or after `from` (or `from` if all zero).
fn dirty_end(bytes: &[u8], from: u64) -> u64 {
    let Some(rest) = usize::try_from(from).ok().and_then(|f| bytes.get(f..)) else {
        return from;
    };
    // Whole-chunk zero checks first: the tail of a live segment is megabytes of zeros.
    const CHUNK: usize = 4096;
    let mut end = rest.len();
    while end > 0 {
        let start = end.saturating_sub(CHUNK);
        let chunk = rest.get(start..end).unwrap_or_default();
        if let Some(p) = chunk.iter().rposition(|&b| b != 0) {
            return from + (start + p + 1) as u64;
        }
        end = start;
    }
    from
}

/// The first offset in `[start, end)` (stepping by the record alignment) holding a valid record
/// of this shard with an lsn at or after `min_lsn`: proof that the bad bytes before it are not
/// a torn tail. Requiring the shard and lsn keeps a payload that happens to contain a frame from
/// counting, though such a payload could only make recovery stricter, never truncate more.
fn find_valid_record(bytes: &[u8], start: u64, end: u64, shard_id: u32, min_lsn: u64) -> Option<u64> {
    let mut offset = start;
    while offset < end {
        let rest = usize::try_from(offset).ok().and_then(|o| bytes.get(o..)).unwrap_or_default();
        if let Frame::Valid(r) = decode_record(rest) {
            if r.shard_id == shard_id && r.lsn >= min_lsn {
                return Some(offset);
            }
        }
        offset += RECORD_ALIGN;
    }
    None
}

/// Decides what a shard directory means. Pure. `segments` must be sorted by index.
/// `covered_lsn` is the lsn the newest valid snapshot covers (0 without one): a bad last record
/// at or below it was synced, so it is corruption, not a torn tail.
pub fn classify(segments: &[SegmentFacts], covered_lsn: u64) -> Decision {
    let Some(last_position) = segments.len().checked_sub(1) else {
        return Decision::Empty;
    };
    let mut expected_index: Option<u64> = None;
    let mut expected_lsn: Option<u64> = None;
    for (position, s) in segments.iter().enumerate() {
        let corrupt = |offset, reason| Decision::Corrupt { file: s.path.clone(), offset, reason };
        if let Some(index) = expected_index.filter(|&i| i != s.index) {
            return corrupt(0, WalCorruption::MissingSegment { index });
        }
        let first_lsn = match &s.header {
            Ok(first_lsn) => *first_lsn,
            Err(reason) => return corrupt(0, reason.clone()),
        };
        // Segment 0 starts the log at lsn 1; later first segments exist after retention.
        let want = expected_lsn.or((s.index == 0).then_some(1));
        if let Some(expected) = want.filter(|&e| e != first_lsn) {
            return corrupt(0, WalCorruption::LsnGap { expected, found: first_lsn });
        }
        match &s.tail {
            Tail::Clean => {}
            Tail::Fatal { offset, reason } => return corrupt(*offset, reason.clone()),
            Tail::Bad { reason, dirty_end, valid_after } => {
                if let Some(valid_offset) = valid_after {
                    return corrupt(
                        s.valid_end,
                        WalCorruption::ValidRecordAfterBadRecord {
                            valid_file: s.path.clone(),
                            valid_offset: *valid_offset,
                            reason: Box::new(reason.clone()),
                        },
                    );
                }
                if position != last_position {
                    let later = segments.iter().skip(position + 1).find(|l| l.records > 0);
                    let reason = match later {
                        Some(l) => WalCorruption::ValidRecordAfterBadRecord {
                            valid_file: l.path.clone(),
                            valid_offset: SEGMENT_HEADER_SIZE,
                            reason: Box::new(reason.clone()),
                        },
                        None => WalCorruption::BadRecordInSealedSegment { reason: Box::new(reason.clone()) },
                    };
                    return corrupt(s.valid_end, reason);
                }
                // The lsn the bad record has (or the next record would have had).
                let lsn = s.last_lsn.map_or(first_lsn, |l| l + 1);
                if lsn <= covered_lsn {
                    return corrupt(
                        s.valid_end,
                        WalCorruption::BadRecordCoveredBySnapshot {
                            lsn,
                            snapshot_lsn: covered_lsn,
                            reason: Box::new(reason.clone()),
                        },
                    );
                }
                return Decision::TruncateTail {
                    segment: s.index,
                    path: s.path.clone(),
                    offset: s.valid_end,
                    bytes: dirty_end - s.valid_end,
                };
            }
        }
        expected_index = Some(s.index + 1);
        expected_lsn = Some(s.last_lsn.map_or(first_lsn, |l| l + 1));
    }
    Decision::Clean
}

/// One segment as recovery left it.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct SegmentSummary {
    pub index: u64,
    pub path: PathBuf,
    pub first_lsn: u64,
    pub records: u64,
    pub last_lsn: Option<u64>,
    /// Offset one past the last valid record: where the next record of this segment goes.
    pub valid_end: u64,
    pub size: u64,
}

/// What recovery did (or, read-only, would do).
#[derive(Clone, PartialEq, Eq, Debug)]
pub enum RecoveryOutcome {
    /// No segments: a new log.
    Empty,
    /// Every record verified; nothing after the last one.
    Clean,
    /// A torn tail was zeroed.
    TruncatedTail { segment: u64, path: PathBuf, offset: u64, bytes: u64 },
    /// A torn tail was found; the policy was `ReadOnly`, so nothing was written.
    WouldTruncateTail { segment: u64, path: PathBuf, offset: u64, bytes: u64 },
}

/// The result of recovery over one shard directory.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct RecoveryReport {
    pub dir: PathBuf,
    pub shard_id: u32,
    pub segments: Vec<SegmentSummary>,
    /// The first lsn the log holds (1 for a new log; later after retention).
    pub first_lsn: u64,
    /// The lsn the next append gets.
    pub next_lsn: u64,
    /// Valid records in the log.
    pub records: u64,
    pub outcome: RecoveryOutcome,
    /// Pre-allocated spares (`*.wal.tmp`) found: never part of the log.
    pub stale_spares: Vec<PathBuf>,
    /// Whether they were removed (`TruncateTornTail`) or left (`ReadOnly`).
    pub stale_spares_removed: bool,
}

impl RecoveryReport {
    /// The lsn of the last valid record, if any.
    pub fn last_lsn(&self) -> Option<u64> {
        (self.next_lsn > self.first_lsn).then(|| self.next_lsn - 1)
    }
}

/// Recovery's result plus the read-only handles it opened, in segment order, for the reader.
pub(crate) struct Recovered {
    pub report: RecoveryReport,
    pub files: Vec<Box<dyn StorageFile>>,
}

/// Runs recovery over the shard directory `dir`: scan every segment, classify, then act as
/// `policy` allows. A `Corrupt` decision is returned as `WalError::Corrupt`. Knows of no
/// snapshot: where one exists, use `recover_covered` with its lsn.
pub fn recover(
    dir: &Path,
    shard_id: u32,
    storage: &dyn Storage,
    policy: RecoveryPolicy,
) -> Result<RecoveryReport, WalError> {
    recover_covered(dir, shard_id, storage, policy, 0)
}

/// `recover` for a shard whose newest valid snapshot covers the log up to `covered_lsn`: a bad
/// last record at or below it is refused (`WalCorruption::BadRecordCoveredBySnapshot`) and
/// nothing is written.
pub fn recover_covered(
    dir: &Path,
    shard_id: u32,
    storage: &dyn Storage,
    policy: RecoveryPolicy,
    covered_lsn: u64,
) -> Result<RecoveryReport, WalError> {
    run(dir, shard_id, storage, policy, covered_lsn).map(|r| r.report)
}

pub(crate) fn run(
    dir: &Path,
    shard_id: u32,
    storage: &dyn Storage,
    policy: RecoveryPolicy,
    covered_lsn: u64,
) -> Result<Recovered, WalError> {
    let names = storage.list(dir)?;
    let mut indexes: Vec<u64> = names.iter().filter_map(|n| parse_segment_file_name(n)).collect();
    indexes.sort_unstable();
    let mut stale_spares: Vec<PathBuf> =
        names.iter().filter(|n| parse_spare_file_name(n).is_some()).map(|n| dir.join(n)).collect();
    stale_spares.sort();

    let mut files = Vec::with_capacity(indexes.len());
    let mut facts = Vec::with_capacity(indexes.len());
    for &index in &indexes {
        let path = dir.join(super::segment_file_name(index));
        let file = storage.open(&path, OpenMode::ReadOnly)?;
        facts.push(scan_segment(index, &path, file.bytes(), shard_id));
        files.push(file);
    }

    // The writer allocates the spare of segment k + 1 only once segment k exists, and a spare
    // becomes a segment by a rename: a spare beyond the newest segment's successor shows that
    // the newest segments were lost, which no gap in the sequence can show.
    let next_index = indexes.last().map_or(0, |&newest| newest + 1);
    let spare = names.iter().filter_map(|n| parse_spare_file_name(n)).max();
    if let Some(spare) = spare.filter(|&spare| spare > next_index) {
        let file = dir.join(format!("{}.tmp", super::segment_file_name(spare)));
        return Err(WalError::Corrupt { file, offset: 0, reason: WalCorruption::MissingSegment { index: next_index } });
    }

    let outcome = match classify(&facts, covered_lsn) {
        Decision::Corrupt { file, offset, reason } => return Err(WalError::Corrupt { file, offset, reason }),
        Decision::Empty => RecoveryOutcome::Empty,
        Decision::Clean => RecoveryOutcome::Clean,
        Decision::TruncateTail { segment, path, offset, bytes } => match policy {
            RecoveryPolicy::ReadOnly => RecoveryOutcome::WouldTruncateTail { segment, path, offset, bytes },
            RecoveryPolicy::TruncateTornTail => {
                zero_range(storage, &path, offset, bytes)?;
                RecoveryOutcome::TruncatedTail { segment, path, offset, bytes }
            }
        },
    };

    let stale_spares_removed = policy == RecoveryPolicy::TruncateTornTail && !stale_spares.is_empty();
    if stale_spares_removed {
        for spare in &stale_spares {
            storage.remove(spare)?;
        }
        storage.sync_dir(dir)?;
    }

    let segments: Vec<SegmentSummary> = facts
        .iter()
        .zip(&files)
        .map(|(f, file)| SegmentSummary {
            index: f.index,
            path: f.path.clone(),
            // classify() accepted every header, so this is the header's first lsn.
            first_lsn: f.header.clone().unwrap_or_default(),
            records: f.records,
            last_lsn: f.last_lsn,
            valid_end: f.valid_end,
            size: file.size(),
        })
        .collect();
    let first_lsn = segments.first().map_or(1, |s| s.first_lsn);
    let next_lsn = segments.last().map_or(1, |s| s.last_lsn.map_or(s.first_lsn, |l| l + 1));
    let records = segments.iter().map(|s| s.records).sum();
    let report = RecoveryReport {
        dir: dir.to_path_buf(),
        shard_id,
        segments,
        first_lsn,
        next_lsn,
        records,
        outcome,
        stale_spares,
        stale_spares_removed,
    };
    Ok(Recovered { report, files })
}

/// Zeroes `[offset, offset + len)` of `path` and syncs it, so the torn bytes can never be read
/// as part of a later record.
fn zero_range(storage: &dyn Storage, path: &Path, offset: u64, len: u64) -> Result<(), WalError> {
    let mut file = storage.open(path, OpenMode::ReadWrite)?;
    let zeros = vec![0u8; 64 << 10];
    let mut done = 0;
    while done < len {
        let n = (len - done).min(zeros.len() as u64);
        let chunk = zeros.get(..n as usize).unwrap_or_default();
        file.write(offset + done, chunk)?;
        done += n;
    }
    file.sync(offset, len)?;
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    //! The decision table: one line per case, read top to bottom.
    use super::*;

    const P: &str = "/s";

    fn seg(index: u64, first: u64, records: u64, tail: Tail) -> SegmentFacts {
        SegmentFacts {
            index,
            path: PathBuf::from(format!("{P}/{index:08}.wal")),
            header: Ok(first),
            records,
            last_lsn: (records > 0).then(|| first + records - 1),
            valid_end: 64 + records * 64,
            tail,
        }
    }

    fn bad(dirty_end: u64) -> Tail {
        Tail::Bad { reason: WalCorruption::PayloadChecksum, dirty_end, valid_after: None }
    }

    fn bad_then_valid(dirty_end: u64, valid_after: u64) -> Tail {
        Tail::Bad { reason: WalCorruption::PayloadChecksum, dirty_end, valid_after: Some(valid_after) }
    }

    fn path(index: u64) -> PathBuf {
        PathBuf::from(format!("{P}/{index:08}.wal"))
    }

    fn corrupt_at(index: u64, offset: u64) -> impl Fn(&Decision) -> bool {
        move |d| matches!(d, Decision::Corrupt { file, offset: o, .. } if *file == path(index) && *o == offset)
    }

    #[test]
    fn decision_table() {
        use Tail::Clean;
        type Check = Box<dyn Fn(&Decision) -> bool>;
        let cases: Vec<(&str, Vec<SegmentFacts>, Check)> = vec![
            ("no segments", vec![], Box::new(|d| *d == Decision::Empty)),
            ("one empty segment", vec![seg(0, 1, 0, Clean)], Box::new(|d| *d == Decision::Clean)),
            ("records, zeros after", vec![seg(0, 1, 3, Clean)], Box::new(|d| *d == Decision::Clean)),
            (
                "two segments, contiguous",
                vec![seg(0, 1, 3, Clean), seg(1, 4, 2, Clean)],
                Box::new(|d| *d == Decision::Clean),
            ),
            (
                "retention removed the first segments",
                vec![seg(7, 100, 3, Clean), seg(8, 103, 0, Clean)],
                Box::new(|d| *d == Decision::Clean),
            ),
            (
                "torn tail in the last segment",
                vec![seg(0, 1, 3, Clean), seg(1, 4, 2, bad(300))],
                Box::new(|d| *d == Decision::TruncateTail { segment: 1, path: path(1), offset: 192, bytes: 108 }),
            ),
            (
                "torn first record of a fresh segment",
                vec![seg(0, 1, 3, Clean), seg(1, 4, 0, bad(100))],
                Box::new(|d| matches!(d, Decision::TruncateTail { segment: 1, offset: 64, bytes: 36, .. })),
            ),
            (
                "bad record followed by a valid one",
                vec![seg(0, 1, 3, bad_then_valid(900, 512))],
                Box::new(corrupt_at(0, 256)),
            ),
            (
                "bad record in a sealed segment, later segment has records",
                vec![seg(0, 1, 3, bad(900)), seg(1, 4, 1, Clean)],
                Box::new(corrupt_at(0, 256)),
            ),
            (
                "bad record in a sealed segment, later segment empty",
                vec![seg(0, 1, 3, bad(900)), seg(1, 4, 0, Clean)],
                Box::new(corrupt_at(0, 256)),
            ),
            (
                "missing middle segment",
                vec![seg(0, 1, 3, Clean), seg(2, 4, 1, Clean)],
                Box::new(|d| matches!(d, Decision::Corrupt { reason: WalCorruption::MissingSegment { index: 1 }, .. })),
            ),
            (
                "lsn gap across segments",
                vec![seg(0, 1, 3, Clean), seg(1, 5, 1, Clean)],
                Box::new(|d| {
                    matches!(d, Decision::Corrupt { reason: WalCorruption::LsnGap { expected: 4, found: 5 }, .. })
                }),
            ),
            (
                "segment 0 not starting at lsn 1",
                vec![seg(0, 2, 3, Clean)],
                Box::new(|d| matches!(d, Decision::Corrupt { reason: WalCorruption::LsnGap { .. }, .. })),
            ),
            (
                "lsn gap inside a segment",
                vec![seg(
                    0,
                    1,
                    3,
                    Tail::Fatal { offset: 256, reason: WalCorruption::LsnGap { expected: 4, found: 6 } },
                )],
                Box::new(corrupt_at(0, 256)),
            ),
            (
                "bad segment header, even the last one",
                vec![
                    seg(0, 1, 3, Clean),
                    SegmentFacts { header: Err(WalCorruption::HeaderChecksum), ..seg(1, 4, 0, Clean) },
                ],
                Box::new(corrupt_at(1, 0)),
            ),
        ];
        for (name, facts, check) in cases {
            let d = classify(&facts, 0);
            assert!(check(&d), "case {name:?}: got {d:?}");
        }
    }

    #[test]
    fn decision_table_with_a_snapshot() {
        // A snapshot covering lsn `covered` proves every record up to it was synced. Segment 1
        // holds lsns 4 and 5; its bad bytes are where lsn 6 goes.
        let covered = |lsn: u64| {
            move |d: &Decision| {
                matches!(d, Decision::Corrupt {
                    file, offset: 192,
                    reason: WalCorruption::BadRecordCoveredBySnapshot { lsn: 6, snapshot_lsn, .. },
                } if *file == path(1) && *snapshot_lsn == lsn)
            }
        };
        type Check = Box<dyn Fn(&Decision) -> bool>;
        let torn = || vec![seg(0, 1, 3, Clean), seg(1, 4, 2, bad(300))];
        let truncate = |d: &Decision| matches!(d, Decision::TruncateTail { segment: 1, offset: 192, bytes: 108, .. });
        use Tail::Clean;
        let cases: Vec<(&str, Vec<SegmentFacts>, u64, Check)> = vec![
            ("bad last record after the snapshot: a tear", torn(), 5, Box::new(truncate)),
            ("bad last record the snapshot covers: damage", torn(), 6, Box::new(covered(6))),
            ("the snapshot covers beyond it: damage", torn(), 9, Box::new(covered(9))),
            (
                "torn first record of a fresh segment the snapshot covers",
                vec![seg(0, 1, 3, Clean), seg(1, 4, 0, bad(100))],
                4,
                Box::new(|d| {
                    matches!(
                        d,
                        Decision::Corrupt {
                            offset: 64,
                            reason: WalCorruption::BadRecordCoveredBySnapshot { lsn: 4, snapshot_lsn: 4, .. },
                            ..
                        }
                    )
                }),
            ),
            (
                "a clean log is clean whatever the snapshot (load_shard checks it reaches it)",
                vec![seg(0, 1, 3, Clean)],
                9,
                Box::new(|d| *d == Decision::Clean),
            ),
        ];
        for (name, facts, covered_lsn, check) in cases {
            let d = classify(&facts, covered_lsn);
            assert!(check(&d), "case {name:?}: got {d:?}");
        }
    }
}
