//! Append + sync throughput of the write-ahead log, by batch size and persist mode.
//!
//! One iteration is what the shard worker does per batch: one `append` of a payload of N
//! 80-byte command records, then one `sync`. Real files (mmap + msync) in a temporary directory;
//! `sync/mmap` copies into the mapping, `sync/pwrite` writes with `pwrite` (`wal::LogWrite`).
//! The appends go to a log's first segment, whose blocks are reserved, not zero-filled
//! (`WalConfig::prefill` zero-fills the segments after it); `cargo bench --bench disk_sync`
//! times the disk alone both ways.

use std::sync::Arc;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use stormledger::layout::COMMAND_RECORD_SIZE;
use stormledger::storage::MmapStorage;
use stormledger::wal::{LogWrite, PersistMode, Wal, WalConfig};

fn append_sync(c: &mut Criterion) {
    let mut group = c.benchmark_group("wal_append_sync");
    group.measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_secs(1)).sample_size(10);
    for (mode, write) in [
        (PersistMode::Sync, LogWrite::Mmap),
        (PersistMode::Sync, LogWrite::Pwrite),
        (PersistMode::Buffered, LogWrite::Mmap),
    ] {
        for records in [1usize, 64, 1024] {
            let tmp = tempfile::tempdir().expect("tempdir");
            let config = WalConfig { segment_size: 64 << 20, persist_mode: mode, write, ..WalConfig::default() };
            let (mut wal, _) = Wal::open(tmp.path(), 0, config, Arc::new(MmapStorage)).expect("open");
            let payload = vec![0x5a_u8; records * COMMAND_RECORD_SIZE];
            group.throughput(Throughput::Elements(records as u64));
            let name = format!("{mode}/{write}");
            group.bench_with_input(BenchmarkId::new(name, records), &payload, |b, payload| {
                b.iter(|| {
                    let lsn = wal.append(1, 0, payload).expect("append");
                    wal.sync().expect("sync");
                    std::hint::black_box(lsn)
                })
            });
        }
    }
    group.finish();
}

criterion_group!(benches, append_sync);
criterion_main!(benches);
