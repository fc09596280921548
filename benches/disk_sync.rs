//! The machine's floor for a durable acknowledgement, without stormledger: how long one write
//! plus `fdatasync` of the written data takes on this disk, for a page, a 64 KiB batch and a
//! 640 KiB batch (8 192 tips of 80 bytes), into a pre-allocated file as the log writes, both
//! into blocks only reserved and into blocks zero-filled beforehand. A
//! command acknowledged only after its batch is synced can never be answered faster than this;
//! `docs/benchmarks.md` compares the engine's acknowledgement latency with it.
//! `cargo bench --bench disk_sync`. Environment: BENCH_SYNCS [1500] per size, BENCH_DIR [a temp dir].

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::time::Instant;

use hdrhistogram::Histogram;

mod common;

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let syncs = common::size("BENCH_SYNCS", 1500, 20);
    let base = std::env::var("BENCH_DIR").map(std::path::PathBuf::from).unwrap_or_else(|_| std::env::temp_dir());
    let dir = tempfile::tempdir_in(base).expect("temporary directory");
    for size in [4096u64, 64 << 10, 640 << 10] {
        // Reserved blocks (`posix_fallocate` alone: "unwritten" extents on ext4 and XFS, so a
        // sync of the first write into one also commits the extent change), and blocks zero-
        // filled first, as the log's segments after its first (`WalConfig::prefill`).
        for zero_filled in [false, true] {
            let path = dir.path().join("sync-test");
            let file = OpenOptions::new().read(true).write(true).create_new(true).open(&path).expect("create");
            let len = size * syncs;
            // SAFETY: plain syscall on a valid, owned descriptor.
            let rc = unsafe { libc::posix_fallocate(file.as_raw_fd(), 0, i64::try_from(len).expect("size")) };
            assert_eq!(rc, 0, "posix_fallocate");
            if zero_filled {
                let zeros = vec![0u8; 1 << 20];
                for offset in (0..len).step_by(zeros.len()) {
                    let n = (len - offset).min(zeros.len() as u64) as usize;
                    file.write_all_at(&zeros[..n], offset).expect("write zeros");
                }
            }
            file.sync_all().expect("fsync");
            let data = vec![0x5a_u8; size as usize];
            let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3).unwrap();
            for i in 0..syncs {
                let start = Instant::now();
                file.write_all_at(&data, i * size).expect("write");
                file.sync_data().expect("fdatasync");
                hist.record(start.elapsed().as_nanos().max(1) as u64).unwrap();
            }
            drop(file);
            std::fs::remove_file(&path).expect("remove");
            let us = |q: f64| hist.value_at_quantile(q) as f64 / 1000.0;
            println!(
                "write + fdatasync of {:>6} B into {} blocks: {syncs} syncs, p50 {:.0} us, p90 {:.0} us, p99 {:.0} us, p99.9 {:.0} us, max {:.0} us",
                size,
                if zero_filled { "zero-filled" } else { "reserved" },
                us(0.5),
                us(0.9),
                us(0.99),
                us(0.999),
                hist.max() as f64 / 1000.0
            );
        }
    }
}
