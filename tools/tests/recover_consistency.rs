//! `stormledger-recover verify` / `recover --dry-run` and a server's start on directories whose
//! shards load one by one but are not consistent: a shard that lost what the others received
//! from it, a `cluster.json` of no shards, a snapshot that disagrees with the log it covers.
//! Each passed `verify` (exit 0) before; the first also made a server panic at its start.

use std::path::Path;
use std::process::Command as Process;
use std::time::Duration;

use stormledger::config::ShardLimits;
use stormledger::engine::EngineConfig;
use stormledger::ledger::Command;
use stormledger::node::{Node, NodeConfig};
use stormledger::wal;
use stormledger::workload::{StormSpec, STREAMER_BASE};

fn tool(args: &[&str]) -> (i32, String) {
    let out = Process::new(env!("CARGO_BIN_EXE_stormledger-recover")).args(args).output().unwrap();
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stdout).into_owned())
}

fn config(dir: &Path, shards: u16) -> NodeConfig {
    let mut config = NodeConfig::new(dir);
    config.engine = EngineConfig {
        shards,
        limits: ShardLimits { accounts_max: 4096, history_max: 4096, ids_max: 8192 },
        // No timer ticks in the log: two directories fed the same batches get the same lsns.
        tick_interval: Duration::from_secs(3600),
        ..EngineConfig::default()
    };
    config.segment_size = 256 * 1024;
    config
}

/// As tools/tests/recover.rs: a two-shard directory after a small storm.
fn make_dir(dir: &Path, shards: u16) {
    let node = Node::open(config(dir, shards)).unwrap();
    let spec = StormSpec { users: 100, streamers: 3, topup_yuan: 6, ..StormSpec::default() };
    for phase in spec.setup_phases() {
        node.engine().execute(&phase);
    }
    let mut tips = spec.tips();
    for _ in 0..10 {
        let batch: Vec<_> = (0..50).map(|_| tips.next_tip()).collect();
        node.engine().execute(&batch);
    }
    node.shutdown();
}

fn snapshot(node: &Node) {
    let record =
        stormledger::layout::CommandRecord { kind: stormledger::ledger::command::kind::SNAPSHOT, ..Default::default() };
    let (tx, rx) = std::sync::mpsc::channel();
    node.engine().submit(vec![record], Box::new(move |r| tx.send(r[0].status.get()).unwrap()));
    assert_eq!(rx.recv().unwrap(), 0);
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

/// Shard 0's whole log lost (segments and spare; it has no snapshot). Shard 1 has applied
/// replica messages (the striped union/streamer creations) that shard 0 no longer knows it
/// sent: `verify` fails, `recover --dry-run` says the directory cannot start, and a server's
/// start refuses it with `Corrupt` (it panicked in `Engine::start_with_feed`).
#[test]
fn verify_fails_when_a_shard_lost_what_the_other_shards_received_from_it() {
    let dir = tempfile::tempdir().unwrap();
    make_dir(dir.path(), 2);
    let d = dir.path().to_str().unwrap();
    assert_eq!(tool(&["verify", d]).0, 0, "healthy before the damage");
    for entry in std::fs::read_dir(wal::shard_dir(dir.path(), 0)).unwrap() {
        let path = entry.unwrap().path();
        if path.is_file() {
            std::fs::remove_file(path).unwrap();
        }
    }
    let (code, out) = tool(&["verify", d, "--json"]);
    assert_eq!(code, 1, "verify passes a directory that lost shard 0's log: {out}");
    assert!(out.contains("which sent only"), "{out}");
    let (dry_code, dry) = tool(&["recover", d, "--dry-run", "--json"]);
    let v: serde_json::Value = serde_json::from_str(dry.trim()).unwrap();
    assert!(dry_code != 0 && v["startable"] == false, "recover --dry-run calls it startable: {dry}");
    match Node::open(config(dir.path(), 2)) {
        Err(stormledger::node::NodeError::Corrupt(message)) => {
            assert!(message.contains("which sent only"), "{message}")
        }
        Err(other) => panic!("expected Corrupt, got {other}"),
        Ok(_) => panic!("a server started on a directory that lost shard 0's log"),
    }
}

/// A one-bit flip in `cluster.json` ('2' -> '0', 0x32 -> 0x30) leaves `"shards": 0`: verify
/// checked no shard at all and passed, and a server started on it serving an empty ledger. Now
/// both refuse the file.
#[test]
fn verify_does_not_pass_a_directory_whose_cluster_json_says_zero_shards() {
    let dir = tempfile::tempdir().unwrap();
    make_dir(dir.path(), 2);
    let path = dir.path().join("cluster.json");
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(text.contains("\"shards\": 2"), "{text}");
    std::fs::write(&path, text.replace("\"shards\": 2", "\"shards\": 0")).unwrap();
    let d = dir.path().to_str().unwrap();
    let (code, out) = tool(&["verify", d, "--json"]);
    assert_ne!(code, 0, "verify checked no shard and passed: {out}");
    assert!(out.contains("0 shards"), "{out}");
    assert!(matches!(Node::open(config(dir.path(), 2)), Err(stormledger::node::NodeError::Corrupt(_))));
}

/// A valid snapshot whose state disagrees with the log it claims to cover (here: the snapshot
/// of a sibling directory at the same lsn, where the last tip came from another user). The log
/// is kept from lsn 1: verify replays it up to the snapshot and compares (it passed before,
/// replaying only what follows the snapshot). Each copy on its own passes, the check included.
#[test]
fn verify_notices_a_snapshot_that_disagrees_with_the_log() {
    let base = tempfile::tempdir().unwrap();
    let (a, b) = (base.path().join("a"), base.path().join("b"));
    make_dir(&a, 1);
    copy_dir(&a, &b);
    for (dir, nth, coins) in [(&a, 0usize, 1u64), (&b, 1usize, 2u64)] {
        // Default ticks here: the snapshot's encoder steps run between batches (ticks included).
        let mut c = config(dir, 1);
        c.engine.tick_interval = EngineConfig::default().tick_interval;
        let node = Node::open(c).unwrap();
        // The nth user who can still pay 2 coins (the same users in both copies).
        let from = (1..=100u64)
            .filter(|&u| stormledger::server::Backend::balance(node.engine().as_ref(), u).value.get() >= 2)
            .nth(nth)
            .unwrap();
        let tip = Command::Tip { id: 77_000_000_000, from, to: STREAMER_BASE, coins };
        assert_eq!(node.engine().execute(&[tip])[0].status.get(), 0);
        snapshot(&node);
        node.shutdown();
    }
    let snaps = |dir: &Path| stormledger::snapshot::list_snapshots(&wal::shard_dir(dir, 0).join("snapshots")).unwrap();
    let (sa, sb) = (snaps(&a), snaps(&b));
    assert_eq!(sa.len(), 1);
    assert_eq!(sa[0].1.file_name(), sb[0].1.file_name());
    let lsn = |p: &Path| stormledger::snapshot::load_snapshot(p).unwrap().meta.lsns[0];
    assert_eq!(lsn(&sa[0].1), lsn(&sb[0].1), "same position in both logs");
    let d = a.to_str().unwrap();
    let (code, out) = tool(&["verify", d, "--json"]);
    assert_eq!(code, 0, "{out}");
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["shards"][0]["snapshot_check"]["matches_log_from_lsn"], 0, "{out}");
    std::fs::copy(&sb[0].1, &sa[0].1).unwrap();
    let (code, out) = tool(&["verify", d, "--json"]);
    assert_eq!(code, 1, "verify passes a snapshot that disagrees with the log: {out}");
    assert!(out.contains("disagrees with the log"), "{out}");
}
