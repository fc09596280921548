//! The in-process engine under the gift-storm workload: throughput (storm vs uniform, per
//! durability mode), acknowledgement latency, balance-read latency while the storm runs, and
//! resident memory per account. Prints a table; `cargo bench --bench engine`.
//!
//! Environment (defaults in brackets): BENCH_USERS [1000000], BENCH_STREAMERS [1000],
//! BENCH_TIPS [4000000], BENCH_HOT [50,0: the percent of tips to streamer 0, a run each; the
//! storm/uniform ratio is printed for the pairs], BENCH_WARMUP [0: tips applied, untimed, between the setup and the
//! timed tips: with 2 x users the setup's ids have left the idempotency window and the rings
//! are resident, as in a server that has run for a while], BENCH_SHARDS [cores], BENCH_BATCH [8192], BENCH_WINDOW [8],
//! BENCH_MODES [memory,sync/mmap,sync/pwrite: a durability, then optionally `/` and how the log
//! writes its segments, `wal::LogWrite`], BENCH_LOG_PREFILL [1; 0: the log's spare segments
//! are not zero-filled ahead, `NodeConfig::log_prefill`], BENCH_MEM_ACCOUNTS [2000000], BENCH_DIR [a temp dir]. Smaller
//! defaults in a smoke run (`cargo test --benches`, see `common`).
//!
//! Then acknowledgement latency at fixed offered rates (open loop: batches are sent on a
//! schedule, whatever came back, and a batch's latency counts from when it was due, so a stall
//! shows in every batch it delays): BENCH_PACED [sync/pwrite: modes as above; empty: skip],
//! BENCH_PACED_RATES [250000,500000,1000000 tips/s], BENCH_PACED_BATCH [1024],
//! BENCH_PACED_SECS [3 a rate]. Each rate also prints the shards' journal-append latency
//! (append + sync of one batch, in the metrics' power-of-two buckets: an upper bound). One node
//! per mode, set up once; before the first rate it takes BENCH_PACED_WARMUP [2 x users] tips as
//! fast as it can, so that the idempotency window has turned over (the setup's ids are evicted)
//! and the rates see a server in steady state.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::bounded;
use hdrhistogram::Histogram;
use stormledger::config::{LedgerConfig, ShardLimits};
use stormledger::engine::{Engine, EngineConfig};
use stormledger::layout::CommandRecord;
use stormledger::ledger::state_machine::accounts_max_for;
use stormledger::node::{Durability, Node, NodeConfig};
use stormledger::shard::stats::{Histogram as Buckets, JOURNAL_BUCKETS};
use stormledger::wal::LogWrite;
use stormledger::workload::{SplitMix64, StormSpec, STREAMER_BASE};

mod common;
use common::size;

fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm.split_whitespace().nth(1).and_then(|p| p.parse().ok()).unwrap_or(0);
    pages * 4096
}

/// Submits `batches` keeping `window` in flight; returns per-batch ack latencies (us) and wall time.
fn drive(
    engine: &Engine,
    batches: Vec<Vec<CommandRecord>>,
    window: usize,
    hist: &mut Histogram<u64>,
) -> (Duration, u64) {
    let (tx, rx) = bounded::<(Instant, u64)>(window * 2);
    let ok = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let mut in_flight = 0;
    for batch in batches {
        if in_flight == window {
            let (sent, _) = rx.recv().unwrap();
            hist.record(sent.elapsed().as_micros() as u64).ok();
            in_flight -= 1;
        }
        let tx = tx.clone();
        let ok = ok.clone();
        let sent = Instant::now();
        engine.submit(
            batch,
            Box::new(move |replies| {
                let n = replies.iter().filter(|r| r.status.get() == 0).count() as u64;
                ok.fetch_add(n, Ordering::Relaxed);
                let _ = tx.send((sent, n));
            }),
        );
        in_flight += 1;
    }
    while in_flight > 0 {
        let (sent, _) = rx.recv().unwrap();
        hist.record(sent.elapsed().as_micros() as u64).ok();
        in_flight -= 1;
    }
    (start.elapsed(), ok.load(Ordering::Relaxed))
}

fn engine_config(spec: &StormSpec, shards: u16) -> EngineConfig {
    let per_shard = accounts_max_for(spec.users / shards as u64 * 5 / 4, spec.streamers + 64, shards);
    EngineConfig {
        shards,
        ledger: LedgerConfig {
            topup_custom_max_fen: 10_000_000,
            daily_cap_coins: 1_000_000_000,
            ..LedgerConfig::default()
        },
        // A smoke run keeps the bounds that follow from the window small (pending top-ups per
        // shard: 4 096), so its setup meets them as a full run's does.
        limits: ShardLimits {
            accounts_max: per_shard as u32,
            history_max: 1 << 20,
            ids_max: if common::smoke() { 1 << 14 } else { 1 << 20 },
        },
        ..EngineConfig::default()
    }
}

struct Row {
    name: String,
    tips: u64,
    ok: u64,
    secs: f64,
    ack: Histogram<u64>,
    reads: Option<Histogram<u64>>,
}

/// A fresh node in `dir` with the workload's users, streamers and top-ups set up (batches of
/// `batch`, `window` in flight).
fn open_set_up(
    spec: &StormSpec,
    mode: Durability,
    log_write: Option<LogWrite>,
    shards: u16,
    dir: &std::path::Path,
    batch: usize,
    window: usize,
) -> (Node, Arc<Engine>) {
    let _ = std::fs::remove_dir_all(dir);
    let mut config = NodeConfig::new(dir);
    config.engine = engine_config(spec, shards);
    config.durability = mode;
    config.log_write = log_write.unwrap_or_default();
    config.log_prefill = std::env::var("BENCH_LOG_PREFILL").map_or(true, |v| v != "0");
    config.snapshot_every_bytes = 0;
    let node = Node::open(config).expect("open node");
    let engine = node.engine().clone();
    let mut setup_hist = Histogram::new(3).unwrap();
    for phase in spec.setup_phases() {
        let records: Vec<CommandRecord> = phase.iter().map(|c| c.to_record()).collect();
        let batches = records.chunks(batch).map(|c| c.to_vec()).collect();
        let (_, ok) = drive(&engine, batches, window, &mut setup_hist);
        assert_eq!(ok as usize, phase.len(), "setup phase failed");
    }
    (node, engine)
}

#[allow(clippy::too_many_arguments)]
fn run(
    spec: &StormSpec,
    mode: Durability,
    log_write: Option<LogWrite>,
    shards: u16,
    tips: u64,
    warmup: u64,
    batch: usize,
    window: usize,
    base: &std::path::Path,
) -> Row {
    let mode_name = match log_write {
        Some(w) => format!("{}/{w}", mode.name()),
        None => mode.name().to_string(),
    };
    let dir = base.join(format!("{}-{}", mode_name.replace('/', "-"), spec.hot_percent));
    let (node, engine) = open_set_up(spec, mode, log_write, shards, &dir, batch, window);
    let mut gen = spec.tips();
    if warmup > 0 {
        let batches: Vec<Vec<CommandRecord>> = (0..warmup.div_ceil(batch as u64))
            .map(|_| (0..batch).map(|_| gen.next_tip().to_record()).collect())
            .collect();
        drive(&engine, batches, window, &mut Histogram::new(3).unwrap());
    }
    let batches: Vec<Vec<CommandRecord>> =
        (0..tips.div_ceil(batch as u64)).map(|_| (0..batch).map(|_| gen.next_tip().to_record()).collect()).collect();

    // A reader samples balances (random users and the hot streamer) while the storm runs.
    let stop = Arc::new(AtomicBool::new(false));
    let reader = {
        let (engine, stop, users) = (engine.clone(), stop.clone(), spec.users);
        std::thread::spawn(move || {
            let mut hist = Histogram::<u64>::new(3).unwrap();
            let mut rng = SplitMix64(7);
            while !stop.load(Ordering::Relaxed) {
                for _ in 0..64 {
                    let id = if rng.below(2) == 0 { STREAMER_BASE } else { 1 + rng.below(users) };
                    let t = Instant::now();
                    std::hint::black_box(engine.balance(id));
                    hist.record(t.elapsed().as_nanos() as u64).ok();
                }
                std::thread::sleep(Duration::from_micros(200));
            }
            hist
        })
    };
    let mut ack = Histogram::new(3).unwrap();
    let (elapsed, ok) = drive(&engine, batches, window, &mut ack);
    stop.store(true, Ordering::Relaxed);
    let reads = reader.join().unwrap();
    drop(engine);
    node.shutdown();
    let _ = std::fs::remove_dir_all(&dir);
    let name = format!("{mode_name} hot={}% shards={shards}", spec.hot_percent);
    Row { name, tips, ok, secs: elapsed.as_secs_f64(), ack, reads: Some(reads) }
}

fn memory(accounts: u64, shards: u16) -> (u64, f64) {
    let spec = StormSpec { users: accounts, streamers: 1, ..StormSpec::default() };
    // The baseline is taken before the input exists; the input is consumed (and freed) by
    // the engine, so what remains resident afterwards is the engine's.
    let before = rss_bytes();
    let batches: Vec<Vec<CommandRecord>> = (0..accounts.div_ceil(8192))
        .map(|b| {
            (b * 8192 + 1..=((b + 1) * 8192).min(accounts))
                .map(|u| {
                    let kind = stormledger::ledger::AccountKind::User;
                    stormledger::ledger::Command::CreateAccount { account: u, kind, flags: 1, union: 0 }.to_record()
                })
                .collect()
        })
        .collect();
    let mut hist = Histogram::new(3).unwrap();
    // Capacity for the accounts plus 3 % for the hash spread over shards, and the sixteenth
    // kept for striped accounts (`striped_reserve`): the index and the account array are sized
    // by capacity, so this measures a shard that is nearly full.
    let mut config = engine_config(&spec, shards);
    config.limits.accounts_max = accounts_max_for(accounts / shards as u64 * 103 / 100 + 64, 0, shards) as u32;
    let engine = Engine::in_memory(config).unwrap();
    let (_, ok) = drive(&engine, batches, 8, &mut hist);
    assert_eq!(ok, accounts);
    let after = rss_bytes();
    engine.shutdown();
    (after.saturating_sub(before), after.saturating_sub(before) as f64 / accounts as f64)
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2) as u64;
    let users = size("BENCH_USERS", 1_000_000, 20_000);
    let streamers = size("BENCH_STREAMERS", 1_000, 10);
    let tips = size("BENCH_TIPS", 4_000_000, 20_000);
    let shards = size("BENCH_SHARDS", cores, cores) as u16;
    let batch = size("BENCH_BATCH", 8192, 1024) as usize;
    let window = size("BENCH_WINDOW", 8, 8) as usize;
    let warmup = size("BENCH_WARMUP", 0, 0);
    let modes = std::env::var("BENCH_MODES").unwrap_or_else(|_| "memory,sync/mmap,sync/pwrite".into());
    let base = std::env::var("BENCH_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|_| std::env::temp_dir().join("stormledger-bench"));
    println!(
        "engine bench: {users} users, {streamers} streamers, {tips} tips after {warmup} untimed, {shards} shards, batch {batch}, window {window}, {cores} cores"
    );
    // Memory first: the storm runs leave freed memory in the allocator, which would hide what
    // the accounts cost.
    let accounts = size("BENCH_MEM_ACCOUNTS", 2_000_000, 10_000);
    if accounts > 0 {
        let (bytes, per) = memory(accounts, shards);
        println!("memory: {accounts} user accounts -> {} MiB resident, {per:.1} bytes/account", bytes >> 20);
    }
    // After the memory measurement: the tuned allocator keeps freed input buffers resident,
    // which would be counted against the accounts.
    if std::env::var("BENCH_NO_TUNE").is_err() {
        stormledger::tune_allocator();
    }
    let hots: Vec<u32> = std::env::var("BENCH_HOT")
        .unwrap_or_else(|_| "50,0".into())
        .split(',')
        .map(|h| h.trim().parse().expect("BENCH_HOT: percents"))
        .collect();
    let mut rows = Vec::new();
    for mode in modes.split(',').filter(|m| !m.is_empty()) {
        let (mode, log_write) = match mode.split_once('/') {
            Some((mode, write)) => (mode, Some(write.parse::<LogWrite>().expect("log write method"))),
            None => (mode, None),
        };
        let mode: Durability = mode.parse().expect("mode");
        for &hot in &hots {
            let spec = StormSpec { users, streamers, hot_percent: hot, topup_yuan: 100_000, ..StormSpec::default() };
            let row = run(&spec, mode, log_write, shards, tips, warmup, batch, window, &base);
            rows.push(row);
        }
    }
    println!(
        "{:<32} {:>12} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10}",
        "run", "tips/s", "ack p50us", "ack p99us", "ack p999", "read p50ns", "read p99ns", "read p999"
    );
    for r in &rows {
        let reads = r.reads.as_ref().unwrap();
        println!(
            "{:<32} {:>12.0} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10}",
            r.name,
            r.ok as f64 / r.secs,
            r.ack.value_at_quantile(0.5),
            r.ack.value_at_quantile(0.99),
            r.ack.value_at_quantile(0.999),
            reads.value_at_quantile(0.5),
            reads.value_at_quantile(0.99),
            reads.value_at_quantile(0.999)
        );
        assert!(r.ok * 10 >= r.tips * 9, "most tips must be accepted ({} of {})", r.ok, r.tips);
    }
    for pair in rows.chunks(hots.len()) {
        if let [storm, uniform] = pair {
            println!(
                "storm / uniform ({}): {:.2}",
                storm.name,
                (storm.ok as f64 / storm.secs) / (uniform.ok as f64 / uniform.secs)
            );
        }
    }

    let paced_modes = std::env::var("BENCH_PACED").unwrap_or_else(|_| "sync/pwrite".into());
    let rates: Vec<u64> = std::env::var("BENCH_PACED_RATES")
        .unwrap_or_else(|_| if common::smoke() { "20000".into() } else { "250000,500000,1000000".into() })
        .split(',')
        .map(|r| r.trim().parse().expect("BENCH_PACED_RATES: tips/s, comma-separated"))
        .collect();
    let paced_batch = size("BENCH_PACED_BATCH", 1024, 256) as usize;
    let secs = size("BENCH_PACED_SECS", 3, 1);
    let warmup = size("BENCH_PACED_WARMUP", 2 * users, 2 * users);
    for mode in paced_modes.split(',').filter(|m| !m.is_empty()) {
        let spec = StormSpec { users, streamers, hot_percent: 50, topup_yuan: 100_000, ..StormSpec::default() };
        paced(&spec, mode, shards, &rates, paced_batch, secs, warmup, &base);
    }
}

/// The open-loop runs of one mode (see the module docs): prints a row per rate.
#[allow(clippy::too_many_arguments)]
fn paced(
    spec: &StormSpec,
    mode_name: &str,
    shards: u16,
    rates: &[u64],
    batch: usize,
    secs: u64,
    warmup: u64,
    base: &std::path::Path,
) {
    let (mode, log_write) = match mode_name.split_once('/') {
        Some((mode, write)) => (mode, Some(write.parse::<LogWrite>().expect("log write method"))),
        None => (mode_name, None),
    };
    let dir = base.join(format!("paced-{}", mode_name.replace('/', "-")));
    let (node, engine) = open_set_up(spec, mode.parse().expect("mode"), log_write, shards, &dir, 8192, 8);
    let mut hist = Histogram::new(3).unwrap();
    let mut gen = spec.tips();
    let mut next_batch = |n: usize| -> Vec<CommandRecord> { (0..n).map(|_| gen.next_tip().to_record()).collect() };
    let warm: Vec<Vec<CommandRecord>> = (0..warmup.div_ceil(8192)).map(|_| next_batch(8192)).collect();
    drive(&engine, warm, 8, &mut hist);
    println!("paced runs, {mode_name}, batch {batch}, {secs} s a rate, after {warmup} warm-up tips:");
    println!(
        "{:>12} {:>12} {:>10} {:>10} {:>10} {:>10} {:>10} {:>8} {:>10} {:>10} {:>10}",
        "offered",
        "acked/s",
        "ack p50us",
        "ack p90us",
        "ack p99us",
        "ack p999",
        "ack max",
        "inflight",
        "log p50<=",
        "log p99<=",
        "log max<="
    );
    for &rate in rates {
        let count = (rate * secs).div_ceil(batch as u64) as usize;
        let batches: Vec<Vec<CommandRecord>> = (0..count).map(|_| next_batch(batch)).collect();
        let interval = Duration::from_secs_f64(batch as f64 / rate as f64);
        // (latency in us, measured when the replies arrive; accepted tips)
        let (tx, rx) = crossbeam_channel::unbounded::<(u64, u64)>();
        let mut hist = Histogram::<u64>::new(3).unwrap();
        let (mut ok, mut in_flight, mut in_flight_max, mut received) = (0u64, 0usize, 0usize, 0usize);
        // Beyond this many batches in flight the engine has fallen behind the rate for good.
        const IN_FLIGHT_MAX: usize = 512;
        let journal_before = journal_buckets(&engine);
        let start = Instant::now();
        let mut overloaded = false;
        for (k, records) in batches.into_iter().enumerate() {
            let due = start + interval.mul_f64(k as f64);
            while let Some(wait) = due.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
            while let Ok((latency, n)) = rx.try_recv() {
                hist.record(latency).ok();
                ok += n;
                in_flight -= 1;
                received += 1;
            }
            if in_flight >= IN_FLIGHT_MAX {
                overloaded = true;
                break;
            }
            let tx = tx.clone();
            engine.submit(
                records,
                Box::new(move |replies| {
                    let latency = due.elapsed().as_micros() as u64;
                    let n = replies.iter().filter(|r| r.status.get() == 0).count() as u64;
                    let _ = tx.send((latency, n));
                }),
            );
            in_flight += 1;
            in_flight_max = in_flight_max.max(in_flight);
        }
        while in_flight > 0 {
            let (latency, n) = rx.recv().unwrap();
            hist.record(latency).ok();
            ok += n;
            in_flight -= 1;
            received += 1;
        }
        let elapsed = start.elapsed().as_secs_f64();
        let journal: Vec<u64> =
            journal_buckets(&engine).iter().zip(&journal_before).map(|(after, before)| after - before).collect();
        assert!(ok * 10 >= (received * batch) as u64 * 9, "most tips must be accepted ({ok} of {})", received * batch);
        println!(
            "{:>12} {:>12.0} {:>10} {:>10} {:>10} {:>10} {:>10} {:>8} {:>10} {:>10} {:>10}{}",
            rate,
            ok as f64 / elapsed,
            hist.value_at_quantile(0.5),
            hist.value_at_quantile(0.9),
            hist.value_at_quantile(0.99),
            hist.value_at_quantile(0.999),
            hist.max(),
            in_flight_max,
            bucket_quantile(&journal, 0.5),
            bucket_quantile(&journal, 0.99),
            bucket_quantile(&journal, 1.0),
            if overloaded { "  (fell behind: stopped at the in-flight bound)" } else { "" }
        );
    }
    drop(engine);
    node.shutdown();
    let _ = std::fs::remove_dir_all(&dir);
}

/// The engine's journal-append latency histogram (`stormledger_engine_journal_append_microseconds`:
/// each shard's append + sync of one batch), bucket by bucket.
fn journal_buckets(engine: &Engine) -> Vec<u64> {
    let h = engine.stats().journal_latency();
    (0..JOURNAL_BUCKETS).map(|i| h.bucket(i)).collect()
}

/// The upper bound (us, a power of two) of the bucket holding quantile `q` of `buckets`
/// (`-` if empty, `inf` past the last bound).
fn bucket_quantile(buckets: &[u64], q: f64) -> String {
    let total: u64 = buckets.iter().sum();
    if total == 0 {
        return "-".into();
    }
    let rank = ((total as f64 * q).ceil() as u64).max(1);
    let mut seen = 0;
    for (i, n) in buckets.iter().enumerate() {
        seen += n;
        if seen >= rank {
            return Buckets::<JOURNAL_BUCKETS>::bound(i).map_or("inf".into(), |b| b.to_string());
        }
    }
    "inf".into()
}
