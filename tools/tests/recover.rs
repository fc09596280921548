//! `stormledger-recover` through its binary, on data directories written by a real node.

use std::path::Path;
use std::process::Command as Process;
use std::time::Duration;

use stormledger::config::ShardLimits;
use stormledger::engine::EngineConfig;
use stormledger::ledger::Command;
use stormledger::node::{Node, NodeConfig};
use stormledger::storage::MmapStorage;
use stormledger::wal::{self, RecoveryPolicy};
use stormledger::workload::{StormSpec, STREAMER_BASE};

fn tool(args: &[&str]) -> (i32, String) {
    let out = Process::new(env!("CARGO_BIN_EXE_stormledger-recover")).args(args).output().unwrap();
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A node on `dir` of `shards` shards. No timer ticks in the log: two directories fed the same
/// batches get the same lsns.
fn config(dir: &Path, shards: u16) -> NodeConfig {
    let mut config = NodeConfig::new(dir);
    config.engine = EngineConfig {
        shards,
        limits: ShardLimits { accounts_max: 4096, history_max: 4096, ids_max: 8192 },
        tick_interval: Duration::from_secs(3600),
        ..EngineConfig::default()
    };
    config.segment_size = 256 * 1024;
    config
}

/// A two-shard directory after a small storm.
fn make_dir(dir: &Path) {
    make_dir_of(dir, 2);
}

fn make_dir_of(dir: &Path, shards: u16) {
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

/// Opens the directory made by `make_dir`, takes `count` snapshots of every shard, and stops.
fn take_snapshots(dir: &Path, count: usize) {
    let mut config = NodeConfig::new(dir);
    config.segment_size = 256 * 1024;
    let node = Node::open(config).unwrap();
    for _ in 0..count {
        snapshot(&node);
    }
    node.shutdown();
}

fn last_segment(dir: &Path) -> (std::path::PathBuf, u64) {
    let sdir = wal::shard_dir(dir, 0);
    let report = wal::recover(&sdir, 0, &MmapStorage, RecoveryPolicy::ReadOnly).unwrap();
    let last = report.segments.last().unwrap();
    (last.path.clone(), last.valid_end)
}

#[test]
fn verify_replay_and_inspect_a_healthy_directory() {
    let dir = tempfile::tempdir().unwrap();
    make_dir(dir.path());
    let d = dir.path().to_str().unwrap();
    let (code, out) = tool(&["verify", d, "--json"]);
    assert_eq!(code, 0, "{out}");
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["ok"], true);
    assert_eq!(v["coin_sum"], "0");
    // The balances by kind, for a reconciliation: 100 users topped up 6 yuan each (60 coins at
    // 10 a yuan), every coin issued was sold, and the tips only moved coins between holders.
    let b = |key: &str| v["balances"][key].as_str().unwrap_or_else(|| panic!("{key}: {v}")).parse::<i128>().unwrap();
    assert_eq!(
        (b("issuance_coins"), b("coin_sales_fen"), b("channel_fen"), b("suspense_fen")),
        (-6000, 60_000, -60_000, 0)
    );
    let held = ["user_coins", "streamer_coins", "union_coins", "platform_coins", "payout_coins"];
    assert_eq!(held.iter().map(|k| b(k)).sum::<i128>(), 6000, "{v}");
    assert!(v["shards"][0]["balances"]["user_coins"].is_string(), "per shard too: {v}");
    // It replays under the limits the directory was made with (they decide results).
    assert_eq!(v["limits"], serde_json::json!({"accounts_max": 4096, "ids_max": 8192, "recorded": true}));
    let (code, out) = tool(&["replay", d, "--json"]);
    assert_eq!(code, 0, "{out}");
    // Progress: with stderr not a terminal, plain lines instead of the bars (here, the shards
    // load too fast for a line every two seconds; each says where it loaded from).
    let out = Process::new(env!("CARGO_BIN_EXE_stormledger-recover")).args(["verify", d]).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    for shard in 0..2 {
        assert!(stderr.contains(&format!("shard {shard}: loaded: genesis + ")), "{stderr}");
        assert!(stderr.contains(&format!("shard {shard}: checking every snapshot")), "{stderr}");
    }
    let (code, out) = tool(&["inspect", d, "--account", "7", "--limit", "50", "--json"]);
    assert_eq!(code, 0);
    let lines: Vec<serde_json::Value> = out.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert!(!lines.is_empty());
    for l in &lines {
        // The account is a party; a command's own id is not an account (except in a creation),
        // and a top-up's callback names only the top-up, whose begin names the user.
        let creates = l["kind"] == "create_account" || l["kind"] == "replica_create";
        let callback = l["kind"] == "topup_confirm" || l["kind"] == "topup_fail";
        assert!(l["a"] == 7 || l["b"] == 7 || (creates && l["id"] == 7) || callback, "{l}");
        if callback {
            let begun = lines.iter().any(|b| b["kind"] == "topup_begin" && b["id"] == l["id"] && b["a"] == 7);
            assert!(begun, "a callback of another user's top-up: {l}");
        }
    }
    // The confirm that credited the account is there (it used to be left out).
    assert!(lines.iter().any(|l| l["kind"] == "topup_confirm"), "{out}");
    // Every user binds payment method 1: a method id is not an account, so `--account 1` shows
    // user 1's binding and top-ups, not everyone's.
    let (code, out) = tool(&["inspect", d, "--account", "1", "--limit", "100000", "--json"]);
    assert_eq!(code, 0);
    let lines: Vec<serde_json::Value> = out.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let of = |kind: &str| lines.iter().filter(|l| l["kind"] == kind).collect::<Vec<_>>();
    assert_eq!(of("bind_method").len(), 1, "{out}");
    assert!(!of("topup_begin").is_empty(), "{out}");
    for l in of("bind_method").into_iter().chain(of("topup_begin")) {
        assert_eq!(l["a"], 1, "another user's record: {l}");
    }
    // --from: an lsn on every shard, or a feed position (after it on the shards it names).
    let (code, out) = tool(&["inspect", d, "--limit", "1000000"]);
    assert_eq!(code, 0);
    let all: Vec<serde_json::Value> = out.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let on = |shard: u64| all.iter().filter(move |l| l["shard"] == shard);
    let (pivot_lsn, pivot_index) =
        on(0).nth(5).map(|l| (l["lsn"].as_u64().unwrap(), l["index"].as_u64().unwrap())).unwrap();
    let position = format!("0:{pivot_lsn}.{pivot_index}");
    let (code, out) = tool(&["inspect", d, "--from", &position, "--limit", "1000000"]);
    assert_eq!(code, 0, "{out}");
    let after: Vec<serde_json::Value> = out.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(after.iter().filter(|l| l["shard"] == 0).count(), on(0).count() - 6, "after the 6th of shard 0");
    assert_eq!(after.iter().filter(|l| l["shard"] == 1).count(), on(1).count(), "shard 1 not named: all");
    let (code, out) = tool(&["inspect", d, "--from", &pivot_lsn.to_string(), "--shard", "0", "--limit", "1000000"]);
    assert_eq!(code, 0);
    assert!(out
        .lines()
        .all(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["lsn"].as_u64() >= Some(pivot_lsn)));
    for bad in ["x", "0:5", "0:1.2,0:3.4"] {
        let (code, _) = tool(&["inspect", d, "--from", bad]);
        assert_eq!(code, 2, "--from {bad}");
    }
    let (code, _) = tool(&["verify", "/nonexistent/dir"]);
    assert_eq!(code, 2);
}

#[test]
fn a_directory_without_recorded_limits_is_replayed_with_large_ones_and_says_so() {
    let dir = tempfile::tempdir().unwrap();
    make_dir(dir.path());
    let d = dir.path().to_str().unwrap();
    // As an earlier build wrote it: no limits in cluster.json.
    std::fs::write(dir.path().join("cluster.json"), r#"{"format": 1, "shards": 2}"#).unwrap();
    let (code, out) = tool(&["verify", d, "--json"]);
    assert_eq!(code, 0, "{out}");
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["limits"]["recorded"], false, "{out}");
    assert!(v["limits"]["ids_max"].as_u64().unwrap() >= 8192, "{out}");
    let (code, out) = tool(&["replay", d]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("does not record its limits"), "{out}");
    // Recorded limits no start accepts: refused, naming the file (exit 2, as for a bad directory).
    std::fs::write(dir.path().join("cluster.json"), r#"{"format": 1, "shards": 2, "accounts_max": 1, "ids_max": 64}"#)
        .unwrap();
    let (code, _) = tool(&["verify", d]);
    assert_eq!(code, 2);
}

#[test]
fn a_torn_tail_fails_verify_and_recover_repairs_only_it() {
    let dir = tempfile::tempdir().unwrap();
    make_dir(dir.path());
    let d = dir.path().to_str().unwrap();
    let (path, end) = last_segment(dir.path());
    // A half-written record after the last valid one: what a crash mid-append leaves.
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[end as usize..end as usize + 40].copy_from_slice(&[0xAB; 40]);
    std::fs::write(&path, &bytes).unwrap();

    // The node stopped cleanly (`make_dir`), which a crash mid-append never does: with its mark
    // there, the bad last record is damage to an acknowledged one. Reported, never truncated.
    let mark = dir.path().join(stormledger::node::CLEAN_STOP_FILE);
    assert!(mark.exists());
    let (code, out) = tool(&["verify", d]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("stopped cleanly"), "{out}");
    let (code, out) = tool(&["recover", d, "--json"]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("stopped cleanly") && out.contains("to accept the loss"), "{out}");
    let (code, out) = tool(&["recover", d]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("to accept the loss instead, delete") && out.contains("clean-stop"), "{out}");
    assert_eq!(std::fs::read(&path).unwrap(), bytes, "never truncated");
    // inspect shows the records before it, and exits 1 as verify does.
    let (code, out) = tool(&["inspect", d, "--limit", "100000", "--json"]);
    assert_eq!(code, 1, "{out}");
    let last: serde_json::Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
    assert_eq!((last["status"].as_str(), last["shards"][0]["shard"].as_u64()), (Some("failed"), Some(0)), "{last}");
    assert!(out.lines().count() > 1, "the records before it are shown: {out}");
    // As after a crash: no mark.
    std::fs::remove_file(&mark).unwrap();
    let (code, out) = tool(&["verify", d]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("torn"), "{out}");
    let (code, out) = tool(&["recover", d, "--dry-run"]);
    assert_eq!(code, 0, "{out}");
    assert_eq!(std::fs::read(&path).unwrap(), bytes, "--dry-run writes nothing");
    let (code, out) = tool(&["recover", d, "--json"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("truncated_tail"), "{out}");
    let (code, out) = tool(&["verify", d]);
    assert_eq!(code, 0, "{out}");
}

#[test]
fn corruption_in_the_middle_is_reported_and_never_truncated() {
    let dir = tempfile::tempdir().unwrap();
    make_dir(dir.path());
    let d = dir.path().to_str().unwrap();
    let (path, _) = last_segment(dir.path());
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[4096 + 100] ^= 0x01;
    std::fs::write(&path, &bytes).unwrap();
    let (code, out) = tool(&["verify", d, "--json"]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("00000000.wal"), "names the file: {out}");
    // inspect: damage (exit 1, as verify), not a usage error; the other shard is still shown,
    // and with --json the last line says which shard could not be read.
    let (code, out) = tool(&["inspect", d, "--limit", "100000", "--json"]);
    assert_eq!(code, 1, "{out}");
    let lines: Vec<serde_json::Value> = out.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let (last, records) = lines.split_last().unwrap();
    assert!(!records.is_empty() && records.iter().all(|r| r["shard"] == 1), "{out}");
    assert_eq!((last["status"].as_str(), last["shards"][0]["shard"].as_u64()), (Some("failed"), Some(0)), "{last}");
    assert!(last["shards"][0]["error"].as_str().unwrap().contains("00000000.wal"), "{last}");
    let (code, out) = tool(&["recover", d]);
    assert_eq!(code, 1, "{out}");
    assert_eq!(std::fs::read(&path).unwrap(), bytes, "never truncated");
}

#[test]
fn verify_checks_every_snapshot_and_recover_says_when_a_directory_still_cannot_start() {
    let dir = tempfile::tempdir().unwrap();
    make_dir(dir.path());
    // Two snapshots a shard.
    take_snapshots(dir.path(), 2);
    let d = dir.path().to_str().unwrap();
    let (code, out) = tool(&["verify", d, "--json"]);
    assert_eq!(code, 0, "{out}");
    // The newest snapshot checked against the replay of the log (kept from lsn 1 here).
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    let check = &v["shards"][0]["snapshot_check"];
    assert!(check["to_lsn"].as_u64().unwrap() > 0 && check["matches_log_from_lsn"].is_u64(), "{check}");
    // The older snapshot damaged: what a restart would fall back on is not intact.
    let snapdir = wal::shard_dir(dir.path(), 0).join("snapshots");
    let older = stormledger::snapshot::list_snapshots(&snapdir).unwrap()[0].1.clone();
    let mut bytes = std::fs::read(&older).unwrap();
    let at = bytes.len() - 10;
    bytes[at] ^= 0x40;
    std::fs::write(&older, bytes).unwrap();
    let (code, out) = tool(&["verify", d, "--json"]);
    assert_eq!(code, 1, "{out}");
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["status"], "failed");
    assert!(v["shards"][0]["problems"].to_string().contains("snapshot"), "{v}");
    // Shard 1's whole log lost, spare and all: no torn tail to repair, and the directory still
    // cannot start (its snapshot covers records the log no longer has). Recover says so.
    for entry in std::fs::read_dir(wal::shard_dir(dir.path(), 1)).unwrap() {
        let path = entry.unwrap().path();
        if path.to_string_lossy().contains(".wal") {
            std::fs::remove_file(path).unwrap();
        }
    }
    for args in [vec!["recover", d, "--dry-run", "--json"], vec!["recover", d, "--json"]] {
        let (code, out) = tool(&args);
        assert_eq!(code, 1, "{out}");
        let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
        assert_eq!((v["status"].as_str(), v["startable"].as_bool()), (Some("failed"), Some(false)), "{v}");
        assert!(v["shards"][1]["error"].to_string().contains("acknowledged records are missing"), "{v}");
    }
}

#[test]
fn recover_never_zeroes_a_damaged_last_record_the_snapshot_covers() {
    let dir = tempfile::tempdir().unwrap();
    make_dir(dir.path());
    take_snapshots(dir.path(), 1);
    // Shard 0's last record, which its snapshot covers, damaged (bit rot, not a tear).
    let sdir = wal::shard_dir(dir.path(), 0);
    let snapshot = stormledger::snapshot::load_latest(&sdir.join("snapshots")).unwrap().unwrap();
    let (reader, _) = wal::WalReader::open(&sdir, 0, &MmapStorage).unwrap();
    let last = reader.iter().map(|r| r.unwrap()).last().unwrap();
    assert_eq!(last.lsn, snapshot.meta.lsns[0], "the snapshot covers the last record");
    let (path, offset) = (sdir.join(wal::segment_file_name(last.segment)), last.offset);
    drop((reader, snapshot));
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[offset as usize + 48 + 10] ^= 0x01;
    std::fs::write(&path, &bytes).unwrap();

    let d = dir.path().to_str().unwrap();
    let (code, out) = tool(&["verify", d, "--json"]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("snapshot covers it"), "{out}");
    for args in [vec!["recover", d, "--dry-run", "--json"], vec!["recover", d, "--json"]] {
        let (code, out) = tool(&args);
        assert_eq!(code, 1, "{out}");
        let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
        assert_eq!((v["status"].as_str(), v["startable"].as_bool()), (Some("failed"), Some(false)), "{v}");
        let error = v["shards"][0]["error"].to_string();
        assert!(error.contains(&format!("00000000.wal:{offset}")) && error.contains("snapshot covers it"), "{v}");
        assert_eq!(v["shards"][1]["ok"], true, "{v}");
        assert_eq!(std::fs::read(&path).unwrap(), bytes, "{args:?}: nothing written");
    }
}

#[test]
fn recover_writes_nothing_unless_the_whole_directory_can_then_start() {
    // A torn tail on shard 0 (repairable) and shard 1's log lost (not): no shard is touched.
    let dir = tempfile::tempdir().unwrap();
    make_dir(dir.path());
    // As a crash leaves it: no clean-stop mark (with it, the tail would be damage, not torn).
    std::fs::remove_file(dir.path().join(stormledger::node::CLEAN_STOP_FILE)).unwrap();
    let (path, end) = last_segment(dir.path());
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[end as usize..end as usize + 40].copy_from_slice(&[0xAB; 40]);
    std::fs::write(&path, &bytes).unwrap();
    let segment = wal::shard_dir(dir.path(), 1).join(wal::segment_file_name(0));
    let mut other = std::fs::read(&segment).unwrap();
    other[4096 + 100] ^= 0x01;
    std::fs::write(&segment, &other).unwrap();
    let d = dir.path().to_str().unwrap();
    let (code, out) = tool(&["recover", d, "--json"]);
    assert_eq!(code, 1, "{out}");
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["startable"], false, "{v}");
    assert_eq!(std::fs::read(&path).unwrap(), bytes, "shard 0's torn tail is left as found");
    // Shard 1 restored (here: its damage undone), recover repairs shard 0's tail.
    other[4096 + 100] ^= 0x01;
    std::fs::write(&segment, &other).unwrap();
    let (code, out) = tool(&["recover", d, "--json"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("truncated_tail"), "{out}");
}

#[test]
fn errors_before_a_report_are_json_with_json() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    // Not a data directory, and a usage error clap finds: exit 2, one JSON object each.
    for (args, status) in
        [(vec!["verify", d, "--json"], "error"), (vec!["verify", d, "--json", "--bogus"], "usage_error")]
    {
        let (code, out) = tool(&args);
        assert_eq!(code, 2, "{args:?}: {out}");
        let line: serde_json::Value = serde_json::from_str(out.trim()).expect("one JSON object");
        assert_eq!(line["status"], status, "{line}");
    }
    let (code, out) = tool(&["verify", d]);
    assert_eq!((code, out.as_str()), (2, ""), "without --json: text on stderr only");
}

#[test]
fn the_read_only_subcommands_refuse_a_directory_a_server_is_running_on() {
    let dir = tempfile::tempdir().unwrap();
    make_dir(dir.path());
    let d = dir.path().to_str().unwrap();
    let node = Node::open(NodeConfig::new(dir.path())).unwrap();
    // The server's log would change under the tool's mappings: refused, nothing read.
    for args in [vec!["verify", d], vec!["replay", d], vec!["inspect", d], vec!["recover", d, "--dry-run"]] {
        let (code, _) = tool(&args);
        assert_eq!(code, 2, "{args:?}");
    }
    // With --json the refusal is one JSON object too.
    let (code, out) = tool(&["verify", d, "--json"]);
    assert_eq!(code, 2);
    let line: serde_json::Value = serde_json::from_str(out.trim()).expect("one JSON object");
    assert_eq!(line["status"], "error", "{line}");
    assert!(line["error"].as_str().unwrap().contains("server is running"), "{line}");
    node.shutdown();
    let (code, out) = tool(&["verify", d]);
    assert_eq!(code, 0, "{out}");
}

// Directories whose shards load one by one but are not consistent: a shard that lost what the
// others received from it, a `cluster.json` of no shards, a snapshot that disagrees with the log
// it covers. Each passed `verify` (exit 0) before; the first also made a server panic at start.

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
    make_dir_of(dir.path(), 2);
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
    make_dir_of(dir.path(), 2);
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
    make_dir_of(&a, 1);
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
