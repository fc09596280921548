//! Recovery speed: log replay (commands per second through `node::load_shard`), and writing /
//! loading a snapshot of a large shard. Prints a table; `cargo bench --bench recovery`.
//!
//! Environment: BENCH_REPLAY_TIPS [2000000], BENCH_SNAPSHOT_ACCOUNTS [10000000], BENCH_DIR.

use std::time::Instant;

use stormledger::config::{LedgerConfig, ShardLimits};
use stormledger::engine::EngineConfig;
use stormledger::layout::CommandRecord;
use stormledger::ledger::{AccountKind, Command, ShardState};
use stormledger::node::{load_shard, Durability, Node, NodeConfig};
use stormledger::snapshot;
use stormledger::workload::StormSpec;

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let base = std::env::var("BENCH_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|_| std::env::temp_dir().join("stormledger-bench-recovery"));
    let _ = std::fs::remove_dir_all(&base);
    let ledger =
        LedgerConfig { topup_custom_max_fen: 10_000_000, daily_cap_coins: 1_000_000_000, ..LedgerConfig::default() };

    // Replay: one shard's log of setup + tips, loaded the way the server starts.
    let tips = env("BENCH_REPLAY_TIPS", 2_000_000);
    let spec = StormSpec { users: 100_000, streamers: 1_000, topup_yuan: 100_000, ..StormSpec::default() };
    let limits = ShardLimits { accounts_max: 200_000, history_max: 1 << 20, ids_max: 1 << 20 };
    let dir = base.join("replay");
    let mut config = NodeConfig::new(&dir);
    config.engine =
        EngineConfig { shards: 1, ledger: ledger.clone(), limits: limits.clone(), ..EngineConfig::default() };
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
    let start = Instant::now();
    let loaded = load_shard(&dir, 0, 1, &ledger, &limits, &mut |_| {}).unwrap();
    let secs = start.elapsed().as_secs_f64();
    println!(
        "replay: {} commands in {} batches in {:.2} s = {:.0} commands/s",
        loaded.commands_replayed,
        loaded.batches_replayed,
        secs,
        loaded.commands_replayed as f64 / secs
    );

    // Snapshot: a shard holding N accounts (users with a balance), written and loaded.
    let accounts = env("BENCH_SNAPSHOT_ACCOUNTS", 10_000_000);
    let limits = ShardLimits { accounts_max: accounts as u32 + 64, history_max: 1 << 16, ids_max: 1 << 16 };
    let mut state = ShardState::new(0, 1, ledger.clone(), limits.clone());
    for account in 1..=accounts {
        let create = Command::CreateAccount { account, kind: AccountKind::User, flags: 1, union: 0 };
        state.apply(account, &create);
    }
    let snapdir = base.join("snapshot");
    let start = Instant::now();
    let sections = stormledger::snapshot::state::encode(&state);
    let encoded = start.elapsed().as_secs_f64();
    let refs: Vec<(u32, &[u8])> = sections.iter().map(|(t, b)| (*t, b.as_slice())).collect();
    let meta = snapshot::SnapshotMeta { lsns: vec![1], timestamp: 1 };
    let written = snapshot::write_snapshot(&snapdir, &meta, &refs).unwrap();
    let write_secs = start.elapsed().as_secs_f64();
    drop(sections);
    drop(state);
    let start = Instant::now();
    let snap = snapshot::load_latest(&snapdir).unwrap().unwrap();
    let restored = stormledger::snapshot::state::decode(|t| snap.section(t), ledger.clone(), limits).unwrap();
    let load_secs = start.elapsed().as_secs_f64();
    assert_eq!(restored.accounts().len() as u64, accounts + 9);
    println!(
        "snapshot: {accounts} accounts, {} MiB: encode {:.2} s, encode+write+fsync {:.2} s, load+verify+decode {:.2} s",
        written.len >> 20,
        encoded,
        write_secs,
        load_secs
    );
    let _ = std::fs::remove_dir_all(&base);
}
