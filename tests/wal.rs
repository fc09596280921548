//! Write-ahead log: roundtrips, rollover, crash images, torn tails, corruption, faults.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use proptest::prelude::*;
use stormledger::error::{StorageError, WalCorruption, WalError};
use stormledger::storage::{Crash, FaultyStorage, MemStorage, MmapStorage, Prefill, Storage};
use stormledger::wal::record::{self, RECORD_HEADER_SIZE};
use stormledger::wal::{recover, LogWrite, PersistMode, RecoveryOutcome, RecoveryPolicy, Wal, WalConfig, WalReader};

const SHARD: u32 = 0;
const SEG: u64 = 64 << 10;

fn cfg(mode: PersistMode) -> WalConfig {
    WalConfig { segment_size: SEG, persist_mode: mode, ..WalConfig::default() }
}

fn mem_dir() -> PathBuf {
    PathBuf::from("/mem/shard-00")
}

/// Deterministic payload for an lsn, so a read-back can be checked without keeping copies.
fn payload(lsn: u64, len: usize) -> Vec<u8> {
    (0..len).map(|i| (lsn as usize * 31 + i * 7) as u8).collect()
}

fn len_for(lsn: u64) -> usize {
    // Mix of small batches and near-kilobyte ones; 80-byte records like the engine's.
    80 * (1 + (lsn as usize * 37) % 13)
}

fn append_synced(wal: &mut Wal, n: u64) -> u64 {
    let mut last = 0;
    for _ in 0..n {
        let lsn = wal.next_lsn();
        last = wal.append(1, lsn * 10, &payload(lsn, len_for(lsn))).unwrap();
        assert_eq!(last, lsn);
        wal.sync().unwrap();
    }
    last
}

/// Reads the whole log and checks every record against `payload`.
fn read_all(dir: &Path, storage: &dyn Storage) -> (Vec<u64>, stormledger::wal::RecoveryReport) {
    let (reader, report) = WalReader::open(dir, SHARD, storage).unwrap();
    let mut lsns = Vec::new();
    for r in reader.iter() {
        let r = r.unwrap();
        assert_eq!(r.payload, &payload(r.lsn, len_for(r.lsn))[..], "lsn {}", r.lsn);
        assert_eq!(r.timestamp, r.lsn * 10);
        assert_eq!(r.kind, 1);
        lsns.push(r.lsn);
    }
    (lsns, report)
}

fn expect_corrupt(result: Result<impl std::fmt::Debug, WalError>) -> (PathBuf, u64, WalCorruption) {
    match result {
        Err(WalError::Corrupt { file, offset, reason }) => (file, offset, reason),
        other => panic!("expected Corrupt, got {other:?}"),
    }
}

#[test]
fn roundtrip_across_rollover_and_reopen_on_real_files() {
    // Each way of writing the segments, and a log written one way and continued the other.
    for (first, then) in
        [(LogWrite::Mmap, LogWrite::Mmap), (LogWrite::Pwrite, LogWrite::Pwrite), (LogWrite::Pwrite, LogWrite::Mmap)]
    {
        roundtrip_on_real_files(first, then);
    }
}

fn roundtrip_on_real_files(first: LogWrite, then: LogWrite) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("shard-00");
    let storage: Arc<dyn Storage> = Arc::new(MmapStorage);
    let config = |write| WalConfig { write, ..cfg(PersistMode::Sync) };
    let (mut wal, report) = Wal::open(&dir, SHARD, config(first), storage.clone()).unwrap();
    assert_eq!(report.outcome, RecoveryOutcome::Empty);
    assert_eq!(append_synced(&mut wal, 300), 300);
    assert!(wal.segment_indexes().len() >= 3, "expected rollover: {:?}", wal.segment_indexes());
    drop(wal);

    let (mut wal, report) = Wal::open(&dir, SHARD, config(then), storage.clone()).unwrap();
    assert_eq!(report.outcome, RecoveryOutcome::Clean);
    assert_eq!((report.first_lsn, report.next_lsn, report.records), (1, 301, 300));
    append_synced(&mut wal, 50);
    drop(wal);

    let (lsns, _) = read_all(&dir, storage.as_ref());
    assert_eq!(lsns, (1..=350).collect::<Vec<_>>());
    let (reader, _) = WalReader::open(&dir, SHARD, storage.as_ref()).unwrap();
    let from: Vec<u64> = reader.iter_from(123).unwrap().map(|r| r.unwrap().lsn).collect();
    assert_eq!(from, (123..=350).collect::<Vec<_>>());
    assert_eq!(reader.iter_from(351).unwrap().count(), 0);
    // Exactly one pre-allocated spare exists next to the segments.
    let spares = std::fs::read_dir(&dir)
        .unwrap()
        .filter(|e| e.as_ref().unwrap().file_name().to_string_lossy().ends_with(".wal.tmp"))
        .count();
    assert_eq!(spares, 1);
}

#[test]
fn spare_segments_zero_filled_in_the_background_never_overwrite_records() {
    // Segments of two prefill chunks, filled at full speed: a rollover finds its spare's
    // zero-fill done, half done or not started, and must stop it before writing there.
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("shard-00");
    let storage: Arc<dyn Storage> = Arc::new(MmapStorage);
    let config = WalConfig { segment_size: 2 * Prefill::CHUNK, prefill: true, ..cfg(PersistMode::Sync) };
    let (mut wal, _) = Wal::open(&dir, SHARD, config, storage.clone()).unwrap();
    let mut last = 0;
    while wal.segment_indexes().len() < 6 {
        let lsn = wal.next_lsn();
        wal.append(1, lsn * 10, &payload(lsn, len_for(lsn))).unwrap();
        if lsn % 500 == 0 {
            wal.sync().unwrap();
        }
        if lsn % 5_000 == 0 {
            // Time for the helper to finish a spare now and then.
            std::thread::sleep(std::time::Duration::from_millis(30));
        }
        last = lsn;
    }
    wal.sync().unwrap();
    drop(wal);
    let (lsns, report) = read_all(&dir, storage.as_ref());
    assert_eq!(lsns, (1..=last).collect::<Vec<_>>());
    assert_eq!(report.outcome, RecoveryOutcome::Clean);
}

#[test]
fn only_synced_records_survive_power_loss() {
    let mem = MemStorage::new();
    let (mut wal, _) = Wal::open(&mem_dir(), SHARD, cfg(PersistMode::Sync), Arc::new(mem.clone())).unwrap();
    append_synced(&mut wal, 40);
    for lsn in 41..=45 {
        wal.append(1, lsn * 10, &payload(lsn, len_for(lsn))).unwrap();
    }
    let power = mem.crash(Crash::PowerLoss);
    assert_eq!(read_all(&mem_dir(), &power).0, (1..=40).collect::<Vec<_>>());
    let killed = mem.crash(Crash::ProcessKill);
    assert_eq!(read_all(&mem_dir(), &killed).0, (1..=45).collect::<Vec<_>>());

    // Records recovered from the page cache are made durable when the writer reopens.
    let (wal2, _) = Wal::open(&mem_dir(), SHARD, cfg(PersistMode::Sync), Arc::new(killed.clone())).unwrap();
    drop(wal2);
    let again = killed.crash(Crash::PowerLoss);
    assert_eq!(read_all(&mem_dir(), &again).0, (1..=45).collect::<Vec<_>>());
}

/// Buffered mode syncs only at `sync_durable` (a clean shutdown, a snapshot): it must cover the
/// segments sealed since, not only the active one. Without the seal's sync at a rollover, a
/// power loss after `sync_durable` lost records of a sealed segment under later durable ones.
#[test]
fn buffered_mode_sync_durable_covers_the_segments_sealed_since() {
    let mem = MemStorage::new();
    let (mut wal, _) = Wal::open(&mem_dir(), SHARD, cfg(PersistMode::Buffered), Arc::new(mem.clone())).unwrap();
    let mut last = 0;
    while wal.segment_indexes().len() < 4 {
        let lsn = wal.next_lsn();
        last = wal.append(1, lsn * 10, &payload(lsn, len_for(lsn))).unwrap();
        wal.sync().unwrap(); // buffered: no durability
    }
    wal.sync_durable().unwrap();
    assert_eq!(read_all(&mem_dir(), &mem.crash(Crash::PowerLoss)).0, (1..=last).collect::<Vec<_>>());
}

#[test]
fn buffered_mode_survives_process_kill_not_power_loss() {
    let mem = MemStorage::new();
    let (mut wal, _) = Wal::open(&mem_dir(), SHARD, cfg(PersistMode::Buffered), Arc::new(mem.clone())).unwrap();
    append_synced(&mut wal, 10);
    assert_eq!(read_all(&mem_dir(), &mem.crash(Crash::ProcessKill)).0.len(), 10);
    assert_eq!(read_all(&mem_dir(), &mem.crash(Crash::PowerLoss)).0.len(), 0);
    wal.sync_durable().unwrap();
    assert_eq!(read_all(&mem_dir(), &mem.crash(Crash::PowerLoss)).0.len(), 10);
}

#[test]
fn torn_tail_at_every_byte_is_truncated_and_earlier_records_survive() {
    let mem = MemStorage::new();
    let (mut wal, _) = Wal::open(&mem_dir(), SHARD, cfg(PersistMode::Sync), Arc::new(mem.clone())).unwrap();
    append_synced(&mut wal, 5);
    let lsn = wal.next_lsn();
    let last = payload(lsn, len_for(lsn));
    wal.append(1, lsn * 10, &last).unwrap();
    // Header and payload writes; the padding is never written.
    let written = RECORD_HEADER_SIZE + last.len() as u64;
    for keep in 0..=written {
        let image = mem.crash(Crash::TornWrite { keep_bytes: keep });
        let before = image.read_live(&mem_dir().join("00000000.wal")).unwrap();
        let (lsns, report) = read_all(&mem_dir(), &image);
        // Read-only recovery wrote nothing.
        assert_eq!(image.read_live(&mem_dir().join("00000000.wal")).unwrap(), before);
        if keep == written {
            assert_eq!(lsns, (1..=6).collect::<Vec<_>>());
            assert_eq!(report.outcome, RecoveryOutcome::Clean);
            continue;
        }
        assert_eq!(lsns, (1..=5).collect::<Vec<_>>(), "keep {keep}");
        match (&report.outcome, keep) {
            (RecoveryOutcome::Clean, 0) => {}
            (RecoveryOutcome::WouldTruncateTail { segment: 0, bytes, .. }, _) => assert!(*bytes <= keep),
            (other, _) => panic!("keep {keep}: {other:?}"),
        }
        // The writer truncates, then carries on at lsn 6 where the torn record was.
        let (mut wal, report) = Wal::open(&mem_dir(), SHARD, cfg(PersistMode::Sync), Arc::new(image.clone())).unwrap();
        if keep > 0 {
            assert!(matches!(report.outcome, RecoveryOutcome::TruncatedTail { segment: 0, .. }), "{report:?}");
        }
        assert_eq!(append_synced(&mut wal, 2), 7);
        drop(wal);
        assert_eq!(read_all(&mem_dir(), &image).0, (1..=7).collect::<Vec<_>>());
    }
}

#[test]
fn torn_tail_with_garbage_bytes_on_real_files() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_path_buf();
    let storage: Arc<dyn Storage> = Arc::new(MmapStorage);
    let (mut wal, _) = Wal::open(&dir, SHARD, cfg(PersistMode::Sync), storage.clone()).unwrap();
    append_synced(&mut wal, 8);
    drop(wal);
    let (reader, _) = WalReader::open(&dir, SHARD, storage.as_ref()).unwrap();
    let last = reader.iter().last().unwrap().unwrap();
    let (offset, size) = (last.offset as usize, record::record_size(last.payload.len() as u64) as usize);
    drop(reader);
    let path = dir.join("00000000.wal");
    let pristine = std::fs::read(&path).unwrap();
    for cut in (1..size).step_by(7) {
        // A sector that never made it holds whatever was there: here 0xA5, not zeros.
        let mut bytes = pristine.clone();
        bytes[offset + cut..offset + size].fill(0xA5);
        std::fs::write(&path, &bytes).unwrap();
        let report = recover(&dir, SHARD, storage.as_ref(), RecoveryPolicy::ReadOnly).unwrap();
        assert!(matches!(report.outcome, RecoveryOutcome::WouldTruncateTail { offset: o, .. } if o == offset as u64));
        assert_eq!(std::fs::read(&path).unwrap(), bytes, "read-only recovery wrote");
        let report = recover(&dir, SHARD, storage.as_ref(), RecoveryPolicy::TruncateTornTail).unwrap();
        assert!(matches!(report.outcome, RecoveryOutcome::TruncatedTail { offset: o, .. } if o == offset as u64));
        assert_eq!(report.next_lsn, 8);
        let after = std::fs::read(&path).unwrap();
        assert!(after[offset..].iter().all(|&b| b == 0));
        assert_eq!(after[..offset], pristine[..offset]);
    }
}

/// Writes 3 segments' worth of records and returns the image and the record locations.
fn multi_segment_log() -> (MemStorage, Vec<(u64, u64, u64)>) {
    let mem = MemStorage::new();
    let (mut wal, _) = Wal::open(&mem_dir(), SHARD, cfg(PersistMode::Sync), Arc::new(mem.clone())).unwrap();
    while wal.segment_indexes().len() < 3 {
        append_synced(&mut wal, 1);
    }
    append_synced(&mut wal, 3);
    drop(wal);
    let (reader, _) = WalReader::open(&mem_dir(), SHARD, &mem).unwrap();
    let locations = reader.iter().map(|r| r.unwrap()).map(|r| (r.lsn, r.segment, r.offset)).collect();
    (mem, locations)
}

fn seg_path(index: u64) -> PathBuf {
    mem_dir().join(format!("{index:08}.wal"))
}

#[test]
fn flipped_bit_in_a_middle_record_is_corruption_not_a_tail() {
    let (mem, locations) = multi_segment_log();
    // A record in the middle of the last segment, and one in a sealed segment.
    let in_last = *locations.iter().rev().nth(1).unwrap();
    let in_sealed = *locations.iter().find(|l| l.1 == 1).unwrap();
    for (lsn, segment, offset) in [in_last, in_sealed] {
        let image = mem.crash(Crash::PowerLoss);
        let byte = image.read_live(&seg_path(segment)).unwrap()[offset as usize + 60];
        image.corrupt(&seg_path(segment), offset as usize + 60, &[byte ^ 0x10]);
        let before = image.read_live(&seg_path(segment)).unwrap();
        let (file, at, reason) = expect_corrupt(WalReader::open(&mem_dir(), SHARD, &image).map(|_| ()));
        assert_eq!((file, at), (seg_path(segment), offset), "lsn {lsn}: {reason}");
        let (file, at, _) =
            expect_corrupt(Wal::open(&mem_dir(), SHARD, cfg(PersistMode::Sync), Arc::new(image.clone())));
        assert_eq!((file, at), (seg_path(segment), offset));
        // Never truncated.
        assert_eq!(image.read_live(&seg_path(segment)).unwrap(), before);
        let msg = WalError::Corrupt { file: seg_path(segment), offset, reason }.to_string();
        assert!(msg.contains("00000") && msg.contains(&offset.to_string()), "{msg}");
    }
}

#[test]
fn missing_segment_is_corruption() {
    let (mem, _) = multi_segment_log();
    let image = mem.crash(Crash::PowerLoss);
    image.delete(&seg_path(1));
    let (file, _, reason) = expect_corrupt(WalReader::open(&mem_dir(), SHARD, &image).map(|_| ()));
    assert_eq!(file, seg_path(2));
    assert_eq!(reason, WalCorruption::MissingSegment { index: 1 });
}

#[test]
fn lsn_gaps_are_corruption() {
    use zerocopy::IntoBytes;
    let (mem, locations) = multi_segment_log();

    // Across segments: segment 2's header (valid checksum) claims a later first lsn.
    let image = mem.crash(Crash::PowerLoss);
    let first_of_2 = locations.iter().find(|l| l.1 == 2).unwrap().0;
    let header = record::encode_segment_header(record::SegmentInfo {
        shard_id: SHARD,
        segment_index: 2,
        first_lsn: first_of_2 + 1,
        segment_size: SEG,
    });
    image.corrupt(&seg_path(2), 0, header.as_bytes());
    let (_, _, reason) = expect_corrupt(WalReader::open(&mem_dir(), SHARD, &image).map(|_| ()));
    assert_eq!(reason, WalCorruption::LsnGap { expected: first_of_2, found: first_of_2 + 1 });

    // Inside a segment: a well-formed record carrying the wrong lsn.
    let image = mem.crash(Crash::PowerLoss);
    let (lsn, segment, offset) = locations[2];
    let body = payload(lsn, len_for(lsn));
    let forged = record::encode_record_header(SHARD, 1, lsn + 5, lsn * 10, &body);
    image.corrupt(&seg_path(segment), offset as usize, forged.as_bytes());
    let (file, at, reason) = expect_corrupt(WalReader::open(&mem_dir(), SHARD, &image).map(|_| ()));
    assert_eq!((file, at), (seg_path(segment), offset));
    assert_eq!(reason, WalCorruption::LsnGap { expected: lsn, found: lsn + 5 });
}

#[test]
fn failed_write_poisons_the_writer() {
    for write in [LogWrite::Mmap, LogWrite::Pwrite] {
        let config = WalConfig { write, ..cfg(PersistMode::Sync) };
        let mem = MemStorage::new();
        let faulty = FaultyStorage::new(Arc::new(mem.clone()));
        let (mut wal, _) = Wal::open(&mem_dir(), SHARD, config, Arc::new(faulty.clone())).unwrap();
        append_synced(&mut wal, 3);
        faulty.fail_nth_write(2); // the payload write of the next append
        let err = wal.append(1, 40, &payload(4, len_for(4))).unwrap_err();
        assert!(matches!(&err, WalError::Storage(e) if e.raw_os_error() == Some(libc::EIO)), "{err}");
        assert!(wal.is_poisoned());
        assert!(matches!(wal.append(1, 40, b"x"), Err(WalError::Poisoned)));
        assert!(matches!(wal.sync(), Err(WalError::Poisoned)));
        drop(wal);
        // Restart: the half-written record is a torn tail (it was never synced).
        let image = mem.crash(Crash::ProcessKill);
        let (mut wal, report) = Wal::open(&mem_dir(), SHARD, config, Arc::new(image.clone())).unwrap();
        assert!(matches!(report.outcome, RecoveryOutcome::TruncatedTail { .. }), "{report:?}");
        assert_eq!(append_synced(&mut wal, 1), 4);
    }
}

#[test]
fn failed_sync_poisons_the_writer() {
    let faulty = FaultyStorage::new(Arc::new(MemStorage::new()));
    let (mut wal, _) = Wal::open(&mem_dir(), SHARD, cfg(PersistMode::Sync), Arc::new(faulty.clone())).unwrap();
    append_synced(&mut wal, 3);
    wal.append(1, 40, &payload(4, len_for(4))).unwrap();
    faulty.fail_nth_sync(1);
    assert!(matches!(wal.sync(), Err(WalError::Storage(_))));
    // No retry: a second sync could "succeed" over pages the kernel already dropped.
    assert!(matches!(wal.sync(), Err(WalError::Poisoned)));
    assert!(matches!(wal.append(1, 50, b"x"), Err(WalError::Poisoned)));
}

#[test]
fn full_disk_at_allocation_is_a_typed_error_and_poisons() {
    let faulty = FaultyStorage::new(Arc::new(MemStorage::new()));
    // At open: the first allocation is segment 0 itself.
    faulty.fail_nth_allocation(1);
    let err = Wal::open(&mem_dir(), SHARD, cfg(PersistMode::Sync), Arc::new(faulty.clone())).unwrap_err();
    assert!(matches!(&err, WalError::Storage(StorageError::Allocate { .. })), "{err}");

    let faulty = FaultyStorage::new(Arc::new(MemStorage::new()));
    let (mut wal, _) = Wal::open(&mem_dir(), SHARD, cfg(PersistMode::Sync), Arc::new(faulty.clone())).unwrap();
    // The spare of the first rollover exists; the one allocated during it hits a full disk.
    faulty.fail_nth_allocation(1);
    let mut result = Ok(0);
    for _ in 0..1000 {
        let lsn = wal.next_lsn();
        result = wal.append(1, lsn * 10, &payload(lsn, len_for(lsn))).and_then(|l| wal.sync().map(|()| l));
        if result.is_err() {
            break;
        }
    }
    let err = result.unwrap_err();
    assert!(matches!(&err, WalError::Storage(e) if e.raw_os_error() == Some(libc::ENOSPC)), "{err}");
    assert!(err.to_string().contains("00000002.wal.tmp"), "{err}");
    assert!(matches!(wal.append(1, 0, b"x"), Err(WalError::Poisoned)));
}

#[test]
fn real_allocation_beyond_the_disk_fails_cleanly() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("huge.wal.tmp");
    // 1 PiB: posix_fallocate fails (ENOSPC/EFBIG) instead of a later SIGBUS in the mapping.
    let err = MmapStorage.allocate(&path, 1 << 50).err().expect("1 PiB allocation succeeded");
    assert!(matches!(err, StorageError::Allocate { .. }), "{err}");
    assert!(!path.exists(), "a failed allocation left a file behind");
}

#[test]
fn oversized_payload_is_refused_without_poisoning() {
    let (mut wal, _) = Wal::open(&mem_dir(), SHARD, cfg(PersistMode::Sync), Arc::new(MemStorage::new())).unwrap();
    let max = wal.config().max_payload();
    let err = wal.append(1, 0, &vec![0; max as usize + 1]).unwrap_err();
    assert!(matches!(err, WalError::PayloadTooLarge { len, max: m } if len == max + 1 && m == max));
    assert!(!wal.is_poisoned());
    assert_eq!(wal.append(1, 0, &vec![7; max as usize]).unwrap(), 1);
    assert_eq!(wal.append(1, 0, b"after").unwrap(), 2);
    wal.sync().unwrap();
}

#[test]
fn invalid_config_is_refused() {
    let storage: Arc<dyn Storage> = Arc::new(MemStorage::new());
    for segment_size in [0, 1000, 4097, 2 << 30] {
        let c = WalConfig { segment_size, persist_mode: PersistMode::Sync, ..WalConfig::default() };
        let err = Wal::open(&mem_dir(), SHARD, c, storage.clone()).unwrap_err();
        assert!(matches!(err, WalError::InvalidConfig { .. }));
    }
}

#[test]
fn other_shards_log_is_refused() {
    let (mem, _) = multi_segment_log();
    let (_, _, reason) = expect_corrupt(WalReader::open(&mem_dir(), 7, &mem).map(|_| ()));
    assert_eq!(reason, WalCorruption::ShardMismatch { expected: 7, found: SHARD });
}

#[test]
fn retire_segments_before_removes_only_covered_segments() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_path_buf();
    let storage: Arc<dyn Storage> = Arc::new(MmapStorage);
    let (mut wal, _) = Wal::open(&dir, SHARD, cfg(PersistMode::Sync), storage.clone()).unwrap();
    append_synced(&mut wal, 300);
    let (reader, _) = WalReader::open(&dir, SHARD, storage.as_ref()).unwrap();
    let first_of: Vec<(u64, u64)> = {
        let mut v: Vec<(u64, u64)> = Vec::new();
        for r in reader.iter() {
            let r = r.unwrap();
            if v.last().is_none_or(|l| l.0 != r.segment) {
                v.push((r.segment, r.lsn));
            }
        }
        v
    };
    drop(reader);
    // Covering up to one lsn short of segment 2's first record keeps segment 1.
    let (_, first2) = first_of[2];
    assert_eq!(wal.retire_segments_before(first2 - 1).unwrap(), vec![0]);
    assert_eq!(wal.retire_segments_before(first2).unwrap(), vec![1]);
    assert!(!dir.join("00000000.wal").exists() && !dir.join("00000001.wal").exists());
    // Never the active segment.
    wal.retire_segments_before(u64::MAX).unwrap();
    assert_eq!(wal.segment_indexes().len(), 1);
    append_synced(&mut wal, 5);
    drop(wal);

    let (reader, report) = WalReader::open(&dir, SHARD, storage.as_ref()).unwrap();
    assert_eq!(report.outcome, RecoveryOutcome::Clean);
    assert_eq!(report.first_lsn, first2);
    assert!(matches!(reader.iter_from(1), Err(WalError::LsnUnavailable { requested: 1, .. })));
    let lsns: Vec<u64> = reader.iter().map(|r| r.unwrap().lsn).collect();
    assert_eq!(*lsns.last().unwrap(), 305);
}

/// Crash at every storage operation of a workload with rollovers (by failing it, then losing
/// power), for every crash flavour: recovery must open, keep every acknowledged record, and
/// return exactly the bytes that were appended.
#[test]
fn crash_at_every_operation_keeps_acknowledged_records() {
    let run = |fail: &dyn Fn(&FaultyStorage), crash: Crash| {
        let mem = MemStorage::new();
        let faulty = FaultyStorage::new(Arc::new(mem.clone()));
        let mut acked = 0;
        if let Ok((mut wal, _)) = Wal::open(&mem_dir(), SHARD, cfg(PersistMode::Sync), Arc::new(faulty.clone())) {
            fail(&faulty);
            for _ in 0..120 {
                let lsn = wal.next_lsn();
                let ok = wal.append(1, lsn * 10, &payload(lsn, len_for(lsn))).and_then(|_| wal.sync());
                if ok.is_err() {
                    break;
                }
                acked = lsn;
            }
        }
        let image = mem.crash(crash);
        let (wal, _) = Wal::open(&mem_dir(), SHARD, cfg(PersistMode::Sync), Arc::new(image.clone()))
            .unwrap_or_else(|e| panic!("{crash:?}: {e}"));
        assert!(wal.next_lsn() > acked, "{crash:?}: lost acknowledged lsn {acked}");
        drop(wal);
        let (lsns, _) = read_all(&mem_dir(), &image);
        assert_eq!(lsns.len() as u64, lsns.last().copied().unwrap_or(0));
    };
    let crashes = [Crash::PowerLoss, Crash::ProcessKill, Crash::TornWrite { keep_bytes: 60 }];
    for n in 1..=260 {
        for crash in crashes {
            run(&|f| f.fail_nth_write(n), crash);
        }
    }
    for n in 1..=140 {
        for crash in crashes {
            run(&|f| f.fail_nth_sync(n), crash);
        }
    }
    for n in 1..=4 {
        run(&|f| f.fail_nth_allocation(n), Crash::PowerLoss);
    }
}

/// 48 cases in CI; `PROPTEST_CASES=N` runs more (a config with its own count ignores it).
fn cases() -> u32 {
    std::env::var("PROPTEST_CASES").ok().and_then(|n| n.parse().ok()).unwrap_or(48)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), ..ProptestConfig::default() })]

    #[test]
    fn random_batches_roundtrip(
        batches in prop::collection::vec((any::<u16>(), any::<u64>(), prop::collection::vec(any::<u8>(), 0..3000)), 1..60),
        reopen_at in 0usize..60,
    ) {
        let mem = MemStorage::new();
        let config = WalConfig { segment_size: 8192, persist_mode: PersistMode::Sync, ..WalConfig::default() };
        let (mut wal, _) = Wal::open(&mem_dir(), SHARD, config, Arc::new(mem.clone())).unwrap();
        for (i, (kind, ts, body)) in batches.iter().enumerate() {
            if i == reopen_at {
                drop(wal);
                wal = Wal::open(&mem_dir(), SHARD, config, Arc::new(mem.clone())).unwrap().0;
            }
            prop_assert_eq!(wal.append(*kind, *ts, body).unwrap(), i as u64 + 1);
            wal.sync().unwrap();
        }
        drop(wal);
        let image = mem.crash(Crash::PowerLoss);
        let (reader, report) = WalReader::open(&mem_dir(), SHARD, &image).unwrap();
        prop_assert_eq!(report.outcome, RecoveryOutcome::Clean);
        let got: Vec<(u64, u16, u64, Vec<u8>)> =
            reader.iter().map(|r| r.unwrap()).map(|r| (r.lsn, r.kind, r.timestamp, r.payload.to_vec())).collect();
        let want: Vec<(u64, u16, u64, Vec<u8>)> =
            batches.iter().enumerate().map(|(i, (k, t, b))| (i as u64 + 1, *k, *t, b.clone())).collect();
        prop_assert_eq!(got, want);
    }
}
