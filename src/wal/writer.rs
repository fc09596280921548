//! Appending batches to a shard's log and making them durable.
//!
//! Owns: the active segment, the pre-allocated spare (and the helper thread zero-filling it,
//! `WalConfig::prefill`), the next lsn, and the poisoned state.
//!
//! Must never: write after a failed write, sync or allocation (the on-disk state is unknown,
//! and after a failed fsync the kernel may already have dropped the dirty pages, so "retry and
//! carry on" can acknowledge data that is gone: the writer stays poisoned until restart and
//! recovery); split a record across segments; let a segment exist under its final name before
//! its header is durable; start a new segment before the previous one is durable.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use zerocopy::IntoBytes;

use crate::error::WalError;
use crate::storage::{OpenMode, Storage, StorageFile};

use super::record::{
    encode_record_header, encode_segment_header, record_size, SegmentInfo, RECORD_HEADER_SIZE, SEGMENT_HEADER_SIZE,
};
use super::recovery::{self, RecoveryPolicy, RecoveryReport};
use super::{segment_file_name, spare_file_name, LogWrite, PersistMode, WalConfig, MAX_SEGMENT_INDEX};

/// A segment of this log, oldest first; the last one is the active segment.
#[derive(Clone, Copy, Debug)]
struct SegmentRef {
    index: u64,
    first_lsn: u64,
}

/// The writer of one shard's log. Single-threaded by design: one thread at a time uses it, the
/// shard worker, or in sync mode the shard's log thread (behind the `LogStage`'s mutex).
pub struct Wal {
    dir: PathBuf,
    shard_id: u32,
    config: WalConfig,
    storage: Arc<dyn Storage>,
    segments: VecDeque<SegmentRef>,
    active: Box<dyn StorageFile>,
    /// Where the next record goes in the active segment.
    write_offset: u64,
    /// Everything in the active segment before this offset is durable.
    synced_offset: u64,
    next_lsn: u64,
    /// The next segment, allocated ahead of need as `NNNNNNNN.wal.tmp`.
    spare: Option<Box<dyn StorageFile>>,
    /// The helper thread writing the spare's zeros out (`WalConfig::prefill`), if running.
    prefill: Option<PrefillJob>,
    poisoned: bool,
}

/// A spare segment being zero-filled on its own thread (`storage::Prefill`).
struct PrefillJob {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<()>,
}

impl Drop for Wal {
    fn drop(&mut self) {
        self.stop_prefill();
    }
}

impl std::fmt::Debug for Wal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Wal")
            .field("dir", &self.dir)
            .field("shard_id", &self.shard_id)
            .field("config", &self.config)
            .field("active_segment", &self.active_index())
            .field("write_offset", &self.write_offset)
            .field("next_lsn", &self.next_lsn)
            .field("poisoned", &self.poisoned)
            .finish()
    }
}

impl Wal {
    /// Opens (creating if needed) the log of shard `shard_id` in the shard directory `dir`.
    ///
    /// Runs recovery first with `RecoveryPolicy::TruncateTornTail`: opening the writer is
    /// consent to repair a torn tail (the same code path as `stormledger-recover recover`), and
    /// a corrupt log is refused with `WalError::Corrupt`. Records the previous process left in
    /// the page cache but never synced are made durable before the first new append, so a new
    /// durable record can never sit after a lost one.
    pub fn open(
        dir: &Path,
        shard_id: u32,
        config: WalConfig,
        storage: Arc<dyn Storage>,
    ) -> Result<(Wal, RecoveryReport), WalError> {
        Self::open_covered(dir, shard_id, config, storage, 0)
    }

    /// `open` for a shard whose newest valid snapshot covers the log up to `covered_lsn`: a bad
    /// last record at or below it was synced, so it is refused as corruption
    /// (`WalCorruption::BadRecordCoveredBySnapshot`) and nothing is written.
    pub fn open_covered(
        dir: &Path,
        shard_id: u32,
        config: WalConfig,
        storage: Arc<dyn Storage>,
        covered_lsn: u64,
    ) -> Result<(Wal, RecoveryReport), WalError> {
        config.validate()?;
        storage.create_dir_all(dir)?;
        let recovered = recovery::run(dir, shard_id, storage.as_ref(), RecoveryPolicy::TruncateTornTail, covered_lsn)?;
        // The read-only handles are not needed: the writer reopens the last segment read-write.
        drop(recovered.files);
        let report = recovered.report;

        let mut segments: VecDeque<SegmentRef> =
            report.segments.iter().map(|s| SegmentRef { index: s.index, first_lsn: s.first_lsn }).collect();
        let (active, write_offset) = match report.segments.last() {
            Some(last) => {
                let mut file = storage.open(&last.path, OpenMode::ReadWrite)?;
                file.sync(0, last.valid_end)?;
                (file, last.valid_end)
            }
            None => {
                let file = install_segment(storage.as_ref(), dir, shard_id, None, config.segment_size, 0, 1)?;
                segments.push_back(SegmentRef { index: 0, first_lsn: 1 });
                (file, SEGMENT_HEADER_SIZE)
            }
        };
        let mut wal = Wal {
            dir: dir.to_path_buf(),
            shard_id,
            config,
            storage,
            segments,
            active,
            write_offset,
            synced_offset: write_offset,
            next_lsn: report.next_lsn,
            spare: None,
            prefill: None,
            poisoned: false,
        };
        wal.spare = Some(wal.allocate_spare()?);
        wal.start_prefill();
        Ok((wal, report))
    }

    /// Appends one batch record and returns its lsn. Not durable until `sync` returns Ok.
    ///
    /// A payload larger than `config.max_payload()` is refused with `PayloadTooLarge` and
    /// nothing is written. Any storage failure poisons the writer.
    pub fn append(&mut self, kind: u16, timestamp: u64, payload: &[u8]) -> Result<u64, WalError> {
        if self.poisoned {
            return Err(WalError::Poisoned);
        }
        let max = self.config.max_payload();
        if payload.len() as u64 > max {
            return Err(WalError::PayloadTooLarge { len: payload.len() as u64, max });
        }
        let result = self.append_unchecked(kind, timestamp, payload);
        if result.is_err() {
            self.poisoned = true;
        }
        result
    }

    fn append_unchecked(&mut self, kind: u16, timestamp: u64, payload: &[u8]) -> Result<u64, WalError> {
        let size = record_size(payload.len() as u64);
        if self.write_offset + size > self.active.size() {
            self.roll_over()?;
        }
        let lsn = self.next_lsn;
        let header = encode_record_header(self.shard_id, kind, lsn, timestamp, payload);
        let body = self.write_offset + RECORD_HEADER_SIZE;
        match self.config.write {
            LogWrite::Mmap => {
                self.active.write(self.write_offset, header.as_bytes())?;
                self.active.write(body, payload)?;
            }
            LogWrite::Pwrite => {
                self.active.write_unmapped(self.write_offset, header.as_bytes())?;
                self.active.write_unmapped(body, payload)?;
            }
        }
        // Padding is not written: the segment was allocated as zeros and is never reused.
        self.write_offset += size;
        self.next_lsn += 1;
        Ok(lsn)
    }

    /// Makes every appended record durable as the persist mode defines it: in `Sync` mode
    /// `msync(MS_SYNC)` of the unsynced range; in `Buffered` mode nothing (see `PersistMode`).
    pub fn sync(&mut self) -> Result<(), WalError> {
        if self.poisoned {
            return Err(WalError::Poisoned);
        }
        match self.config.persist_mode {
            PersistMode::Sync => self.sync_durable(),
            PersistMode::Buffered => Ok(()),
        }
    }

    /// Makes every appended record durable whatever the persist mode (shutdown, before a
    /// snapshot is taken).
    pub fn sync_durable(&mut self) -> Result<(), WalError> {
        if self.poisoned {
            return Err(WalError::Poisoned);
        }
        let result = self.sync_active();
        if result.is_err() {
            self.poisoned = true;
        }
        result
    }

    fn sync_active(&mut self) -> Result<(), WalError> {
        if self.synced_offset < self.write_offset {
            self.active.sync(self.synced_offset, self.write_offset - self.synced_offset)?;
            self.synced_offset = self.write_offset;
        }
        Ok(())
    }

    /// Seals the active segment and makes the spare the new active segment.
    fn roll_over(&mut self) -> Result<(), WalError> {
        // Seal first, in every persist mode: recovery treats a bad record in a segment that is
        // not the last as corruption, which is only sound if sealed segments are durable.
        self.sync_active()?;
        // The helper must be done with the spare before the log writes it.
        self.stop_prefill();
        let index = self.active_index() + 1;
        let file = install_segment(
            self.storage.as_ref(),
            &self.dir,
            self.shard_id,
            self.spare.take(),
            self.config.segment_size,
            index,
            self.next_lsn,
        )?;
        self.active = file;
        self.segments.push_back(SegmentRef { index, first_lsn: self.next_lsn });
        self.write_offset = SEGMENT_HEADER_SIZE;
        self.synced_offset = SEGMENT_HEADER_SIZE;
        // Reserve the next one now, so a full disk shows up here, a segment ahead, and the
        // append that needs it later only writes a header and renames.
        self.spare = Some(self.allocate_spare()?);
        self.start_prefill();
        Ok(())
    }

    /// Starts zero-filling the spare on a helper thread, if configured and the storage offers
    /// it. Best effort: the spare is a valid segment-to-be without it (see `storage::Prefill`),
    /// so a failure is reported and the log carries on.
    fn start_prefill(&mut self) {
        // Without a sync per batch the extent changes are written back with the data, off any
        // acknowledgement's path: nothing to win.
        if !self.config.prefill || self.config.persist_mode != PersistMode::Sync {
            return;
        }
        let Some(job) = self.spare.as_ref().and_then(|spare| spare.prefill()) else { return };
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let shard = self.shard_id;
        let spawned = std::thread::Builder::new().name(format!("log-prefill-{shard}")).spawn(move || {
            if let Err(error) = job.run(&flag) {
                crate::log_line!(
                    "shard {shard}: zero-filling {} stopped: {error} (the log carries on; its syncs in that segment are slower)",
                    job.path().display()
                );
            }
        });
        match spawned {
            Ok(thread) => self.prefill = Some(PrefillJob { stop, thread }),
            Err(error) => crate::log_line!("shard {shard}: no thread to zero-fill the spare segment: {error}"),
        }
    }

    /// Stops the spare's zero-fill between two chunks (if still running) and waits for it.
    fn stop_prefill(&mut self) {
        if let Some(job) = self.prefill.take() {
            job.stop.store(true, Ordering::Release);
            job.thread.thread().unpark();
            // A panic there changes nothing on disk that matters; the log's own writes follow.
            let _ = job.thread.join();
        }
    }

    fn allocate_spare(&self) -> Result<Box<dyn StorageFile>, WalError> {
        let index = self.active_index() + 1;
        if index > MAX_SEGMENT_INDEX {
            return Err(WalError::InvalidConfig { reason: format!("segment index {index} exceeds 8 digits") });
        }
        Ok(self.storage.allocate(&self.dir.join(spare_file_name(index)), self.config.segment_size)?)
    }

    fn active_index(&self) -> u64 {
        self.segments.back().map_or(0, |s| s.index)
    }

    /// Removes segment files whose records all have lsns below `lsn` (the engine calls this
    /// once a snapshot covers them), oldest first so the remaining files stay contiguous even
    /// if this stops half way; then syncs the directory. The active segment is never removed.
    /// Returns the removed segment indexes. A failure here does not poison the writer: the
    /// files are redundant either way.
    pub fn retire_segments_before(&mut self, lsn: u64) -> Result<Vec<u64>, WalError> {
        let mut removed = Vec::new();
        while let (Some(oldest), Some(next)) = (self.segments.front().copied(), self.segments.get(1).copied()) {
            // Every record of `oldest` has an lsn below the next segment's first lsn.
            if next.first_lsn > lsn {
                break;
            }
            self.storage.remove(&self.dir.join(segment_file_name(oldest.index)))?;
            self.segments.pop_front();
            removed.push(oldest.index);
        }
        if !removed.is_empty() {
            self.storage.sync_dir(&self.dir)?;
        }
        Ok(removed)
    }

    /// The lsn the next `append` will return.
    pub fn next_lsn(&self) -> u64 {
        self.next_lsn
    }

    /// The first lsn still held by the log (after retention).
    pub fn first_lsn(&self) -> u64 {
        self.segments.front().map_or(self.next_lsn, |s| s.first_lsn)
    }

    /// True after a failed write, sync or allocation; every later call fails with `Poisoned`.
    pub fn is_poisoned(&self) -> bool {
        self.poisoned
    }

    pub fn config(&self) -> &WalConfig {
        &self.config
    }

    pub fn shard_id(&self) -> u32 {
        self.shard_id
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Indexes of the segment files in the log, oldest first.
    pub fn segment_indexes(&self) -> Vec<u64> {
        self.segments.iter().map(|s| s.index).collect()
    }
}

/// Puts segment `index` in place: header written into the (given or newly allocated) spare and
/// synced, then renamed to its final name and the directory synced. A crash anywhere in here
/// leaves either no `NNNNNNNN.wal` or a complete one with a durable header.
fn install_segment(
    storage: &dyn Storage,
    dir: &Path,
    shard_id: u32,
    spare: Option<Box<dyn StorageFile>>,
    segment_size: u64,
    index: u64,
    first_lsn: u64,
) -> Result<Box<dyn StorageFile>, WalError> {
    let tmp = dir.join(spare_file_name(index));
    let mut file = match spare {
        Some(f) => f,
        None => storage.allocate(&tmp, segment_size)?,
    };
    let info = SegmentInfo { shard_id, segment_index: index, first_lsn, segment_size: file.size() };
    file.write(0, encode_segment_header(info).as_bytes())?;
    file.sync(0, SEGMENT_HEADER_SIZE)?;
    let path = dir.join(segment_file_name(index));
    storage.rename(&tmp, &path)?;
    file.set_path(path);
    storage.sync_dir(dir)?;
    Ok(file)
}
