//! Reading a shard's log back in lsn order: replay at startup and `stormledger-recover inspect`.
//!
//! Owns: iteration over the valid prefix recovery established, payloads borrowed from the
//! mapping without copying.
//!
//! Must never: write (it runs recovery with `RecoveryPolicy::ReadOnly` and maps files read-only),
//! or yield a record past a torn tail.

use std::path::Path;

use crate::error::{WalCorruption, WalError};
use crate::storage::{Storage, StorageFile};

use super::record::{decode_record, Frame, SEGMENT_HEADER_SIZE};
use super::recovery::{self, RecoveryPolicy, RecoveryReport, SegmentSummary};

/// One batch record, its payload borrowed from the segment mapping.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Record<'a> {
    pub lsn: u64,
    pub kind: u16,
    pub timestamp: u64,
    pub payload: &'a [u8],
    /// Where it is, for tools: segment index and byte offset of the record header.
    pub segment: u64,
    pub offset: u64,
}

/// A read-only view of a shard's log as recovery found it.
pub struct WalReader {
    shard_id: u32,
    segments: Vec<(SegmentSummary, Box<dyn StorageFile>)>,
    first_lsn: u64,
    next_lsn: u64,
}

impl WalReader {
    /// Runs read-only recovery over the shard directory `dir` and opens its valid records.
    /// A torn tail is reported (`RecoveryOutcome::WouldTruncateTail`) and not read; a corrupt
    /// log is an error.
    pub fn open(dir: &Path, shard_id: u32, storage: &dyn Storage) -> Result<(WalReader, RecoveryReport), WalError> {
        Self::open_covered(dir, shard_id, storage, 0)
    }

    /// `open` for a shard whose newest valid snapshot covers the log up to `covered_lsn`: a bad
    /// last record at or below it is an error (`WalCorruption::BadRecordCoveredBySnapshot`),
    /// not a torn tail.
    pub fn open_covered(
        dir: &Path,
        shard_id: u32,
        storage: &dyn Storage,
        covered_lsn: u64,
    ) -> Result<(WalReader, RecoveryReport), WalError> {
        let recovered = recovery::run(dir, shard_id, storage, RecoveryPolicy::ReadOnly, covered_lsn)?;
        let report = recovered.report;
        let segments = report.segments.iter().cloned().zip(recovered.files).collect();
        let reader = WalReader { shard_id, segments, first_lsn: report.first_lsn, next_lsn: report.next_lsn };
        Ok((reader, report))
    }

    /// The first lsn the log holds.
    pub fn first_lsn(&self) -> u64 {
        self.first_lsn
    }

    /// One past the last valid lsn.
    pub fn next_lsn(&self) -> u64 {
        self.next_lsn
    }

    /// Every valid record, in lsn order.
    pub fn iter(&self) -> Records<'_> {
        Records { reader: self, segment: 0, offset: SEGMENT_HEADER_SIZE, from_lsn: self.first_lsn }
    }

    /// Valid records with lsn >= `from_lsn`. Asking for lsns retention has removed is an error
    /// (replay from a snapshot needs every record after it); past the end is an empty iterator.
    pub fn iter_from(&self, from_lsn: u64) -> Result<Records<'_>, WalError> {
        if from_lsn < self.first_lsn {
            return Err(WalError::LsnUnavailable { requested: from_lsn, first_available: self.first_lsn });
        }
        // The last segment whose first lsn is <= from_lsn holds it (or it is past the end).
        let segment = self.segments.partition_point(|(s, _)| s.first_lsn <= from_lsn).saturating_sub(1);
        Ok(Records { reader: self, segment, offset: SEGMENT_HEADER_SIZE, from_lsn })
    }
}

/// Iterator over the records of a `WalReader`.
pub struct Records<'a> {
    reader: &'a WalReader,
    segment: usize,
    offset: u64,
    from_lsn: u64,
}

impl<'a> Iterator for Records<'a> {
    type Item = Result<Record<'a>, WalError>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            let (summary, file) = self.reader.segments.get(self.segment)?;
            if self.offset >= summary.valid_end {
                self.segment += 1;
                self.offset = SEGMENT_HEADER_SIZE;
                continue;
            }
            let bytes: &'a [u8] = file.bytes();
            let rest = usize::try_from(self.offset).ok().and_then(|o| bytes.get(o..)).unwrap_or_default();
            // Recovery verified these bytes; checking again costs one crc pass and turns a file
            // changed behind our back into an error instead of a wrong replay.
            let record = match decode_record(rest) {
                Frame::Valid(r) if r.shard_id == self.reader.shard_id => r,
                other => {
                    let reason = match other {
                        Frame::Invalid(reason) => reason,
                        Frame::Valid(r) => {
                            WalCorruption::ShardMismatch { expected: self.reader.shard_id, found: r.shard_id }
                        }
                        Frame::Empty => WalCorruption::BadMagic,
                    };
                    // Stop for good: nothing after an unreadable record is trustworthy.
                    self.segment = self.reader.segments.len();
                    return Some(Err(WalError::Corrupt { file: summary.path.clone(), offset: self.offset, reason }));
                }
            };
            let offset = self.offset;
            self.offset += record.size;
            if record.lsn < self.from_lsn {
                continue;
            }
            return Some(Ok(Record {
                lsn: record.lsn,
                kind: record.kind,
                timestamp: record.timestamp,
                payload: record.payload,
                segment: summary.index,
                offset,
            }));
        }
    }
}
