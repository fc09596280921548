//! Recovery speed: log replay (commands per second through `node::load_shard`: one shard, then
//! every shard of a multi-shard log at once as `Node::open` does), and writing / loading a
//! snapshot of a large shard. Prints a table; `cargo bench --bench recovery`.
//!
//! Environment: BENCH_REPLAY_TIPS [2000000] (per shard), BENCH_REPLAY_USERS [100000] (in all),
//! BENCH_REPLAY_SHARDS [2] (the parallel replay; 1: skip it), BENCH_REPLAY_ROUNDS [1] (times
//! the parallel replay runs, each into a fresh state: for a profiler), BENCH_SNAPSHOT_ACCOUNTS [10000000; 0: skip the snapshot shapes],
//! BENCH_SNAPSHOT_LOADS [3] (loads from the page cache per shape), BENCH_SNAPSHOT_ACTIVE [1] (0: only
//! the fresh shape), BENCH_STALL_USERS [500000] and BENCH_STALL_TIPS [2000000] (the snapshot
//! stall after a storm; 0 users: skip it), BENCH_DIR. Smaller defaults in a smoke run (`cargo test --benches`).

use std::path::Path;
use std::time::Instant;

use stormledger::config::{LedgerConfig, ShardLimits};
use stormledger::engine::EngineConfig;
use stormledger::layout::CommandRecord;
use stormledger::ledger::state_machine::accounts_max_for;
use stormledger::ledger::{AccountKind, Command, ShardState};
use stormledger::node::{load_shard, Durability, Node, NodeConfig};
use stormledger::shard::worker::SNAPSHOT_RECORDS_PER_STEP;
use stormledger::snapshot;
use stormledger::snapshot::state::SectionBuffers;
use stormledger::workload::StormSpec;

mod common;
use common::size;

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    // As the server and the recovery tool start (and the engine bench runs).
    stormledger::tune_allocator();
    let base = std::env::var("BENCH_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|_| std::env::temp_dir().join("stormledger-bench-recovery"));
    let _ = std::fs::remove_dir_all(&base);
    let ledger =
        LedgerConfig { topup_custom_max_fen: 10_000_000, daily_cap_coins: 1_000_000_000, ..LedgerConfig::default() };

    // Replay: one shard's log of setup + tips, loaded the way the server starts; then a log of
    // several shards, all loaded at once (one thread each, as `Node::open` does).
    let tips = size("BENCH_REPLAY_TIPS", 2_000_000, 20_000);
    let users = size("BENCH_REPLAY_USERS", 100_000, 2_000);
    let limits = ShardLimits { accounts_max: (2 * users).max(200_000) as u32, history_max: 1 << 20, ids_max: 1 << 20 };
    let dir = base.join("replay");
    write_log(&dir, 1, users, tips, &ledger, &limits);
    let (start, cpu) = (Instant::now(), cpu_secs());
    let loaded = load_shard(&dir, 0, 1, &ledger, &limits, &mut |_| {}).unwrap();
    let (secs, cpu) = (start.elapsed().as_secs_f64(), cpu_secs() - cpu);
    println!(
        "replay, 1 shard: {} commands in {} batches in {:.2} s = {:.0} commands/s (cpu {:.2} s)",
        loaded.commands_replayed,
        loaded.batches_replayed,
        secs,
        loaded.commands_replayed as f64 / secs,
        cpu,
    );
    drop(loaded);
    let shards = size("BENCH_REPLAY_SHARDS", 2, 2) as u16;
    if shards > 1 {
        let dir = base.join(format!("replay-{shards}"));
        write_log(&dir, shards, users, tips * shards as u64, &ledger, &limits);
        for _ in 0..size("BENCH_REPLAY_ROUNDS", 1, 1) {
            replay_all(&dir, shards, &ledger, &limits);
        }
    }

    let users = size("BENCH_STALL_USERS", 500_000, 2_000);
    if users > 0 {
        snapshot_stall(users, size("BENCH_STALL_TIPS", 2_000_000, 20_000), &ledger);
    }

    // Snapshot: a shard holding N accounts, written and loaded, in two shapes: "fresh" (users
    // just created: every field but id, kind and flags zero) and "active" (each user then bound
    // a payment method, topped up a varying amount and tipped once today: balance, spending,
    // history and methods set).
    let accounts = size("BENCH_SNAPSHOT_ACCOUNTS", 10_000_000, 20_000);
    if accounts == 0 {
        let _ = std::fs::remove_dir_all(&base);
        return;
    }
    let rounds = size("BENCH_SNAPSHOT_LOADS", 3, 1);
    let limits =
        ShardLimits { accounts_max: accounts_max_for(accounts, 0, 1) as u32, history_max: 1 << 16, ids_max: 1 << 16 };
    let mut state = ShardState::new(0, 1, ledger.clone(), limits.clone());
    for account in 1..=accounts {
        let create = Command::CreateAccount { account, kind: AccountKind::User, flags: 1, union: 0 };
        state.apply(account, &create);
    }
    snapshot_round("fresh", &mut state, &base.join("snapshot-fresh"), &ledger, &limits, rounds);
    if size("BENCH_SNAPSHOT_ACTIVE", 1, 1) == 0 {
        let _ = std::fs::remove_dir_all(&base);
        return;
    }
    let streamer = 1 << 40;
    // One command a millisecond: pending top-ups expire (15 minutes) as they would in a day.
    let mut ts = 1_795_752_000_000_000_000u64;
    let mut apply = |state: &mut ShardState, command: Command| {
        ts += 1_000_000;
        state.apply(ts, &command);
        state.drain_evicted();
    };
    apply(&mut state, Command::CreateAccount { account: streamer, kind: AccountKind::Streamer, flags: 0, union: 0 });
    for user in 1..=accounts {
        let (id, fen) = ((1 << 48) + user, 100 * (50 + user % 1000));
        let txn = stormledger::layout::text_field("T").unwrap();
        apply(&mut state, Command::BindMethod { user, method: 1, channel: stormledger::ledger::Channel::Alipay });
        apply(&mut state, Command::TopUpBegin { id, user, method: 1, fen });
        apply(&mut state, Command::TopUpConfirm { id, fen, channel_txn: txn, paid_by: 0 });
        apply(&mut state, Command::Tip { id: (1 << 49) + user, from: user, to: streamer, coins: 1 + user % 97 });
    }
    let user = state.account(accounts / 2).unwrap();
    assert!(user.balance > 0 && user.spent_today > 0 && user.history_head > 0 && user.methods != 0, "{user:?}");
    snapshot_round("active", &mut state, &base.join("snapshot-active"), &ledger, &limits, rounds);
    let _ = std::fs::remove_dir_all(&base);
}

/// How long a snapshot stalls a shard's worker (the encode; the write runs on a thread of its
/// own): one shard of `users` users and 1 000 streamers, funded, after `tips` storm tips, at the
/// default limits (idempotency and history windows of 2^20, full after a million commands).
/// Encodes four times, each after the first into the buffers of the one before, as the worker does.
fn snapshot_stall(users: u64, tips: u64, ledger: &LedgerConfig) {
    let spec = StormSpec { users, streamers: 1_000, topup_yuan: 100_000, ..StormSpec::default() };
    let limits = ShardLimits { accounts_max: accounts_max_for(users, 2_000, 1) as u32, ..ShardLimits::default() };
    let mut state = ShardState::new(0, 1, ledger.clone(), limits);
    let mut ts = 1_795_752_000_000_000_000u64;
    let mut gen = spec.tips();
    let commands = spec.setup_phases().into_iter().flatten().chain((0..tips).map(|_| gen.next_tip()));
    for command in commands {
        ts += 1;
        state.apply(ts, &command);
        state.clear_evicted();
    }
    let (took, bytes) = encode_as_the_worker(&mut state, SectionBuffers::default(), 4);
    let show = |(begin, steps, longest, total): &(f64, usize, f64, f64)| {
        format!("{begin:.3} s, then {steps} steps of at most {:.1} ms ({total:.3} s in all)", longest * 1e3)
    };
    println!(
        "snapshot stall, one shard after a storm ({users} users, {tips} tips, default limits, {:.1} MiB): the encode's start {} the first; into the buffers of the one before: {}",
        bytes as f64 / (1 << 20) as f64,
        show(&took[0]),
        took[1..].iter().map(show).collect::<Vec<_>>().join(" / "),
    );

    // Once more with the storm going on: a batch of 8 192 tips between two steps, as the worker
    // applies them. What the pins hold aside meanwhile is the memory a snapshot costs on top.
    let start = Instant::now();
    let mut encoding = snapshot::state::begin_encoding(&mut state, SectionBuffers::default());
    let (mut batches, mut peak) = (0u64, [0usize; 5]);
    loop {
        for _ in 0..8_192 {
            ts += 1;
            state.apply(ts, &gen.next_tip());
        }
        state.clear_evicted();
        batches += 1;
        let kept = state.pinned_kept();
        for (p, k) in peak.iter_mut().zip(kept) {
            *p = (*p).max(k);
        }
        if encoding.step(&mut state, SNAPSHOT_RECORDS_PER_STEP) == snapshot::state::Progress::Done {
            break;
        }
    }
    let (sections, _) = encoding.finish(&mut state);
    drop(sections);
    println!(
        "snapshot during a storm, the same shard: {batches} batches of 8 192 tips between the steps, {:.2} s; held aside at most: {} accounts ({:.1} MiB at 72 bytes each, before the map's overhead), {} idempotency records, {} history entries, {} pending top-up deadlines, {} top-ups",
        start.elapsed().as_secs_f64(),
        peak[0],
        (peak[0] * (std::mem::size_of::<stormledger::ledger::account::Account>() + 8)) as f64 / (1 << 20) as f64,
        peak[1],
        peak[2],
        peak[3],
        peak[4],
    );
}

/// Encodes `state` `times` times as a shard's worker does (`begin_encoding`, then steps of
/// `SNAPSHOT_RECORDS_PER_STEP` records, each a pause between two batches), the first into
/// `buffers`, each later one into the sections of the one before. Returns for each the seconds
/// of its start, its number of steps, the seconds of its longest step and of all of it; and the
/// bytes of the last.
fn encode_as_the_worker(
    state: &mut ShardState,
    mut buffers: SectionBuffers,
    times: usize,
) -> (Vec<(f64, usize, f64, f64)>, usize) {
    let (mut took, mut bytes) = (Vec::new(), 0);
    for _ in 0..times {
        let start = Instant::now();
        let mut encoding = snapshot::state::begin_encoding(state, buffers);
        let begin = start.elapsed().as_secs_f64();
        let (mut steps, mut longest) = (0, 0f64);
        loop {
            let step = Instant::now();
            let progress = encoding.step(state, SNAPSHOT_RECORDS_PER_STEP);
            longest = longest.max(step.elapsed().as_secs_f64());
            // Polls that found only the methods' thread left do not count as steps.
            steps += usize::from(progress != snapshot::state::Progress::Waiting);
            match progress {
                snapshot::state::Progress::Done => break,
                // The payment methods' thread: the worker would apply commands meanwhile.
                snapshot::state::Progress::Waiting => std::thread::sleep(std::time::Duration::from_micros(100)),
                snapshot::state::Progress::Steps => {}
            }
        }
        let (sections, replaced) = encoding.finish(state);
        took.push((begin, steps, longest, start.elapsed().as_secs_f64()));
        drop(replaced);
        bytes = sections.iter().map(|(_, b)| b.len()).sum();
        buffers = SectionBuffers::new(sections);
    }
    (took, bytes)
}

/// Encodes and writes a snapshot of `state`, then loads it `rounds` times from the page cache
/// and once after dropping the file's pages from the cache (`POSIX_FADV_DONTNEED`). Prints wall
/// and CPU (user + system, all threads) seconds of each load.
fn snapshot_round(
    shape: &str,
    state: &mut ShardState,
    dir: &Path,
    ledger: &LedgerConfig,
    limits: &ShardLimits,
    rounds: u64,
) {
    let start = Instant::now();
    let sections = stormledger::snapshot::state::encode(state);
    let encoded = start.elapsed().as_secs_f64();
    let refs: Vec<(u32, &[u8])> = sections.iter().map(|(t, b)| (*t, b.as_slice())).collect();
    let meta = snapshot::SnapshotMeta { lsns: vec![1], timestamp: 1 };
    let sizes: Vec<String> = refs.iter().map(|(t, b)| format!("{t}:{}", b.len())).collect();
    let written = snapshot::write_snapshot(dir, &meta, &refs).unwrap();
    let write_secs = start.elapsed().as_secs_f64();
    // As a shard's worker encodes every snapshot after its first: into the last one's buffers.
    // The first also compacts the payment methods (they were all made after the load), the
    // second finds them compacted.
    let (again, _) = encode_as_the_worker(state, SectionBuffers::new(sections), 2);
    let load = || {
        let (start, cpu) = (Instant::now(), cpu_secs());
        let snap = snapshot::load_latest(dir).unwrap().unwrap();
        let restored =
            stormledger::snapshot::state::decode(|t| snap.section(t), ledger.clone(), limits.clone()).unwrap();
        let took = format!("{:.2} (cpu {:.2})", start.elapsed().as_secs_f64(), cpu_secs() - cpu);
        (took, restored)
    };
    let mut hot = Vec::new();
    for _ in 0..rounds {
        let (took, restored) = load();
        hot.push(took);
        assert!(restored.accounts() == state.accounts(), "restored accounts differ");
    }
    let file = std::fs::File::open(&written.path).unwrap();
    // SAFETY: plain syscall on an open descriptor; only advice.
    let dropped =
        unsafe { libc::posix_fadvise(std::os::fd::AsRawFd::as_raw_fd(&file), 0, 0, libc::POSIX_FADV_DONTNEED) };
    assert_eq!(dropped, 0);
    let (cold, restored) = load();
    for id in [1, state.accounts().len() as u64 / 2] {
        assert_eq!(restored.index().balance(id), state.index().balance(id));
    }
    println!(
        "snapshot {shape}: {} accounts, {:.1} MiB ({:.1} B/account): encode {encoded:.2} s, encode+write+fsync {write_secs:.2} s, encode again as the worker does, into the same buffers, compacting the payment methods, {:.2} s (a pause of {:.3} s, then steps of at most {:.1} ms), then {:.2} s ({:.3} s, steps of at most {:.1} ms); load+verify+decode {} s (page cache), {cold} s (file dropped from the page cache)",
        state.accounts().len(),
        written.len as f64 / (1 << 20) as f64,
        written.len as f64 / state.accounts().len() as f64,
        again[0].3,
        again[0].0,
        again[0].2 * 1e3,
        again[1].3,
        again[1].0,
        again[1].2 * 1e3,
        hot.join(" / "),
    );
    println!("  section sizes (tag:bytes): {}", sizes.join(" "));
}

/// Loads every shard of the log in `dir` at once, a thread each (as `Node::open` does), and
/// prints the rate.
fn replay_all(dir: &Path, shards: u16, ledger: &LedgerConfig, limits: &ShardLimits) {
    let (start, cpu) = (Instant::now(), cpu_secs());
    let loaded: Vec<_> = std::thread::scope(|s| {
        let threads: Vec<_> = (0..shards)
            .map(|shard| s.spawn(move || load_shard(dir, shard, shards, ledger, limits, &mut |_| {}).unwrap()))
            .collect();
        threads.into_iter().map(|t| t.join().unwrap()).collect()
    });
    let (secs, cpu) = (start.elapsed().as_secs_f64(), cpu_secs() - cpu);
    let commands: u64 = loaded.iter().map(|l| l.commands_replayed).sum();
    println!(
        "replay, {shards} shards at once: {commands} commands in {:.2} s = {:.0} commands/s (cpu {:.2} s)",
        secs,
        commands as f64 / secs,
        cpu,
    );
}

/// Writes a log of `shards` shards: the storm's setup (`users` users, 1 000 streamers, funded
/// through real top-ups; 10 streamers in a smoke run) and then `tips` tips, in batches of 8 192
/// with 8 in flight.
fn write_log(dir: &Path, shards: u16, users: u64, tips: u64, ledger: &LedgerConfig, limits: &ShardLimits) {
    let streamers = if common::smoke() { 10 } else { 1_000 };
    let spec = StormSpec { users, streamers, topup_yuan: 100_000, ..StormSpec::default() };
    let mut config = NodeConfig::new(dir);
    config.engine = EngineConfig { shards, ledger: ledger.clone(), limits: limits.clone(), ..EngineConfig::default() };
    config.durability = Durability::Buffered;
    config.snapshot_every_bytes = 0;
    let node = Node::open(config).unwrap();
    for phase in spec.setup_phases() {
        for chunk in phase.chunks(8192) {
            node.engine().execute(chunk);
        }
    }
    let mut gen = spec.tips();
    let mut pending = Vec::new();
    for _ in 0..tips.div_ceil(8192) {
        let batch: Vec<CommandRecord> = (0..8192).map(|_| gen.next_tip().to_record()).collect();
        let (tx, rx) = std::sync::mpsc::channel();
        node.engine().submit(batch, Box::new(move |_| tx.send(()).unwrap()));
        pending.push(rx);
        if pending.len() > 8 {
            pending.remove(0).recv().unwrap();
        }
    }
    pending.into_iter().for_each(|rx| rx.recv().unwrap());
    node.shutdown();
    // The log was written without syncs (buffered): write it back now, or the replay timed
    // next shares the disk and the CPU with the writeback of what was just written.
    // SAFETY: sync(2) takes no arguments and cannot fail.
    unsafe { libc::sync() };
}

/// User + system CPU time of this process so far (all threads).
fn cpu_secs() -> f64 {
    // SAFETY: getrusage only fills the struct it is given.
    let usage = unsafe {
        let mut usage = std::mem::zeroed::<libc::rusage>();
        libc::getrusage(libc::RUSAGE_SELF, &mut usage);
        usage
    };
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 * 1e-6;
    secs(usage.ru_utime) + secs(usage.ru_stime)
}
