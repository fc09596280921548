//! Durability through the real node: restart, snapshots and log retirement, the data-directory
//! lock, damaged files, and completion of cross-shard work cut off by a crash.

use std::path::Path;
use std::sync::Arc;

use stormledger::config::ShardLimits;
use stormledger::engine::{Engine, EngineConfig};
use stormledger::layout::CommandRecord;
use stormledger::ledger::command::kind;
use stormledger::ledger::{AccountKind, Command, Fanout, ShardState, Status};
use stormledger::node::{Durability, Node, NodeConfig, NodeError};
use stormledger::shard::router::home_shard;
use stormledger::shard::worker::{Journal, ManualClock, NullJournal};
use stormledger::workload::{StormSpec, STREAMER_BASE};

fn node_config(dir: &Path, shards: u16) -> NodeConfig {
    let mut c = NodeConfig::new(dir);
    c.engine = EngineConfig {
        shards,
        limits: ShardLimits { accounts_max: 4096, history_max: 4096, ids_max: 8192 },
        ..EngineConfig::default()
    };
    c.segment_size = 256 * 1024;
    c.snapshot_every_bytes = 0;
    c
}

fn spec() -> StormSpec {
    StormSpec { users: 300, streamers: 5, topup_yuan: 6, ..StormSpec::default() }
}

fn setup(engine: &Engine, spec: &StormSpec) {
    for phase in spec.setup_phases() {
        for r in engine.execute(&phase) {
            assert_eq!(r.status.get(), 0);
        }
    }
}

fn storm(engine: &Engine, spec: &StormSpec, batches: usize, skip: usize) {
    let mut tips = spec.tips();
    for _ in 0..skip * 100 {
        tips.next_tip();
    }
    for _ in 0..batches {
        let batch: Vec<Command> = (0..100).map(|_| tips.next_tip()).collect();
        engine.execute(&batch);
    }
}

/// A node of `shards` shards on `dir`: set up, `batches` of 100 tips, stopped cleanly; the
/// balances it stopped with.
fn stormed_and_stopped(dir: &Path, shards: u16, spec: &StormSpec, batches: usize) -> Vec<Option<i64>> {
    let node = Node::open(node_config(dir, shards)).unwrap();
    setup(node.engine(), spec);
    storm(node.engine(), spec, batches, 0);
    let b = balances(node.engine(), spec);
    node.shutdown();
    b
}

fn balances(engine: &Engine, spec: &StormSpec) -> Vec<Option<i64>> {
    let mut ids: Vec<u64> = (1..=spec.users).collect();
    ids.extend((0..spec.streamers).map(|s| STREAMER_BASE + s));
    ids.iter().map(|&id| engine.balance(id)).collect()
}

/// A 2-shard node whose shards remember only their last 64 ids, with the storm's accounts set up.
fn set_up_with_a_64_id_window(dir: &Path) -> (NodeConfig, Node, StormSpec) {
    let mut config = node_config(dir, 2);
    config.engine.limits.ids_max = 64;
    let spec = spec();
    let node = Node::open(config.clone()).unwrap();
    setup(node.engine(), &spec);
    (config, node, spec)
}

fn admin(engine: &Engine, kind: u8) -> u16 {
    submit_one(engine, CommandRecord { kind, ..CommandRecord::default() })
}

fn submit_one(engine: &Engine, record: CommandRecord) -> u16 {
    let (tx, rx) = std::sync::mpsc::channel();
    engine.submit(vec![record], Box::new(move |r| tx.send(r[0].status.get()).unwrap()));
    rx.recv().unwrap()
}

#[test]
fn restart_recovers_every_acknowledged_command() {
    let dir = tempfile::tempdir().unwrap();
    let spec = spec();
    let before = stormed_and_stopped(dir.path(), 2, &spec, 20);
    let node = Node::open(node_config(dir.path(), 2)).unwrap();
    assert_eq!(balances(node.engine(), &spec), before);
    // The same tips again are retries: original results, nothing moves.
    storm(node.engine(), &spec, 20, 0);
    assert_eq!(balances(node.engine(), &spec), before);
    for s in node.engine().audit() {
        assert_eq!(s.unit_sums, [0, 0]);
    }
}

#[test]
fn snapshots_retire_the_log_and_restart_from_them() {
    let dir = tempfile::tempdir().unwrap();
    let spec = spec();
    let mut config = node_config(dir.path(), 2);
    config.snapshot_every_bytes = 64 * 1024;
    let before = {
        let node = Node::open(config.clone()).unwrap();
        setup(node.engine(), &spec);
        storm(node.engine(), &spec, 150, 0);
        assert_eq!(admin(node.engine(), kind::SNAPSHOT), 0);
        storm(node.engine(), &spec, 10, 150);
        let b = balances(node.engine(), &spec);
        node.shutdown();
        b
    };
    let shard0 = dir.path().join("shard-00");
    let snaps = std::fs::read_dir(shard0.join("snapshots")).unwrap().count();
    assert_eq!(snaps, 2, "two snapshots are kept");
    let first_segment = std::fs::read_dir(&shard0)
        .unwrap()
        .filter_map(|e| e.unwrap().file_name().into_string().ok())
        .filter(|n| n.ends_with(".wal"))
        .min()
        .unwrap();
    assert_ne!(first_segment, "00000000.wal", "covered segments were retired");
    let node = Node::open(config).unwrap();
    assert_eq!(balances(node.engine(), &spec), before);
}

/// The log since the newest snapshot counts toward `snapshot_every_bytes` across restarts: a
/// server restarted more often than that much log is written still snapshots (and retires
/// its log), instead of counting from zero at every start and never reaching the threshold.
#[test]
fn restarts_do_not_put_the_next_snapshot_off() {
    let dir = tempfile::tempdir().unwrap();
    let spec = spec();
    let mut config = node_config(dir.path(), 2);
    let node = Node::open(config.clone()).unwrap();
    setup(node.engine(), &spec);
    node.shutdown();
    let snapshots = |shard: &str| {
        std::fs::read_dir(dir.path().join(shard).join("snapshots"))
            .map_or(0, |d| d.filter(|e| e.as_ref().unwrap().file_name().to_string_lossy().ends_with(".snap")).count())
    };
    assert_eq!((snapshots("shard-00"), snapshots("shard-01")), (0, 0));
    // Each run writes far less than the threshold; the setup's log alone is more than it.
    let record = std::mem::size_of::<CommandRecord>() as u64;
    config.snapshot_every_bytes = 300 * record;
    let mut before = Vec::new();
    let mut written = 0;
    for run in 0..3 {
        let node = Node::open(config.clone()).unwrap();
        storm(node.engine(), &spec, 1, run);
        before = balances(node.engine(), &spec);
        let engine = node.engine().clone();
        node.shutdown();
        written += engine.stats().snapshots(0) + engine.stats().snapshots(1);
        // The log ends the metrics show are the ones the clean stop recorded.
        let mark = stormledger::node::CleanStop::read(&stormledger::storage::MmapStorage, dir.path()).unwrap();
        assert_eq!(engine.stats().log_next_lsns(), mark.next_lsn);
    }
    assert!(written >= 2, "the snapshots are counted ({written})");
    assert!(snapshots("shard-00") > 0 && snapshots("shard-01") > 0, "no snapshot after three restarts");
    let node = Node::open(config).unwrap();
    assert_eq!(balances(node.engine(), &spec), before);
}

#[test]
fn a_second_node_on_the_same_directory_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::open(node_config(dir.path(), 1)).unwrap();
    match Node::open(node_config(dir.path(), 1)) {
        Err(NodeError::Locked { .. }) => {}
        other => panic!("expected Locked, got {:?}", other.err()),
    }
    node.shutdown();
}

#[test]
fn the_shard_count_and_rules_of_a_directory_are_kept() {
    let dir = tempfile::tempdir().unwrap();
    let spec = spec();
    let before = {
        let node = Node::open(node_config(dir.path(), 3)).unwrap();
        setup(node.engine(), &spec);
        let b = balances(node.engine(), &spec);
        node.shutdown();
        b
    };
    let node = Node::open(node_config(dir.path(), 1)).unwrap();
    assert_eq!(node.engine().shards(), 3);
    assert_eq!(balances(node.engine(), &spec), before);
}

#[test]
fn the_limits_that_decide_results_are_kept_with_the_directory() {
    let dir = tempfile::tempdir().unwrap();
    let (mut config, node, spec) = set_up_with_a_64_id_window(dir.path());
    let tip = |coins| Command::Tip { id: 5_000_001, from: 7, to: STREAMER_BASE, coins };
    assert_eq!(node.engine().execute(&[tip(1)])[0].status.get(), 0);
    // The tip's id leaves the 64-id window; the same id with other fields is then a new command.
    storm(node.engine(), &spec, 10, 0);
    assert_eq!(node.engine().execute(&[tip(2)])[0].status.get(), 0);
    let before = balances(node.engine(), &spec);
    node.shutdown();
    // Restarted with larger limits, the log is still replayed under its own: under a 8 192-id
    // window the reused id would be remembered, refused, and the balances would differ.
    config.engine.limits = ShardLimits { accounts_max: 8192, history_max: 4096, ids_max: 8192 };
    let node = Node::open(config.clone()).unwrap();
    assert_eq!(balances(node.engine(), &spec), before);
    node.engine().audit();
    node.shutdown();
    let cluster = |dir: &Path| stormledger::node::read_data_dir(dir).unwrap().unwrap().0;
    assert_eq!((cluster(dir.path()).accounts_max, cluster(dir.path()).ids_max), (Some(4096), Some(64)));

    // Recorded limits no start could have recorded are refused, naming the file.
    std::fs::write(dir.path().join("cluster.json"), r#"{"format": 1, "shards": 2, "accounts_max": 8, "ids_max": 64}"#)
        .unwrap();
    let err = Node::open(config.clone()).err().expect("refused").to_string();
    assert!(err.contains("cluster.json") && err.contains("accounts_max"), "{err}");

    // A directory from before the limits were recorded records those of its next start.
    std::fs::write(dir.path().join("cluster.json"), r#"{"format": 1, "shards": 2}"#).unwrap();
    config.engine.limits.ids_max = 64;
    config.engine.limits.accounts_max = 4096;
    let node = Node::open(config).unwrap();
    assert_eq!(balances(node.engine(), &spec), before);
    node.shutdown();
    assert_eq!((cluster(dir.path()).accounts_max, cluster(dir.path()).ids_max), (Some(4096), Some(64)));
}

/// A directory of data format 1 (written before a `topup_confirm`'s `d` decided its answer)
/// starts, and is upgraded to this build's format before anything is written, so that a
/// rollback to a build that would replay its log to other answers is refused. A format newer
/// than this build's is refused, saying which build to use, and is left as it is; so is an
/// older one whose start is refused for another reason.
#[test]
fn an_older_format_is_upgraded_at_its_start_and_a_newer_one_refused() {
    use stormledger::node::{read_data_dir, DATA_FORMAT_VERSION};
    let dir = tempfile::tempdir().unwrap();
    let (config, node, spec) = set_up_with_a_64_id_window(dir.path());
    let before = balances(node.engine(), &spec);
    node.shutdown();
    let path = dir.path().join("cluster.json");
    let with_format = |format: u32| {
        let mut cluster: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        cluster["format"] = format.into();
        std::fs::write(&path, serde_json::to_vec(&cluster).unwrap()).unwrap();
    };
    assert_eq!(DATA_FORMAT_VERSION, 2);

    with_format(3);
    let err = Node::open(config.clone()).err().expect("refused").to_string();
    assert!(err.contains("data format 3, newer than this build's (2)") && err.contains("cluster.json"), "{err}");
    assert!(read_data_dir(dir.path()).is_err(), "the tool refuses it too");
    assert!(std::fs::read_to_string(&path).unwrap().contains("\"format\":3"), "left as it was");

    // Format 1, with a start refused for another reason (the shard count's directory lost):
    // still format 1, for the build that wrote it.
    with_format(1);
    let shard = dir.path().join("shard-01");
    let aside = dir.path().join("shard-01.aside");
    std::fs::rename(&shard, &aside).unwrap();
    assert!(Node::open(config.clone()).is_err());
    assert_eq!(read_data_dir(dir.path()).unwrap().unwrap().0.format, 1);
    std::fs::rename(&aside, &shard).unwrap();

    let node = Node::open(config).unwrap();
    assert_eq!(read_data_dir(dir.path()).unwrap().unwrap().0.format, 2, "upgraded at the start");
    assert_eq!(balances(node.engine(), &spec), before);
    node.shutdown();
}

/// A start whose clock is more than a minute behind the log's newest command (an earlier run's
/// clock was ahead, or this one is behind) is refused, saying why and how to start anyway:
/// started, it would stamp every command after the log's time until the clock caught up (no
/// top-up expiry, no new business day, correct clients refused). `allow_clock_behind` starts
/// it, and timestamps still only grow. A clock up to a minute behind starts as before.
#[test]
fn a_clock_far_behind_the_log_refuses_the_start_unless_allowed() {
    use stormledger::node::{NodeClock, NodeError};
    use stormledger::shard::worker::{Clock, ManualClock, SystemClock};
    let dir = tempfile::tempdir().unwrap();
    let day = 86_400_000_000_000u64;
    let real = SystemClock.now_ns();
    let mut config = node_config(dir.path(), 2);
    // A run with the clock a day ahead.
    config.clock = NodeClock(std::sync::Arc::new(ManualClock::new(real + day, 1_000)));
    let spec = spec();
    let node = Node::open(config.clone()).unwrap();
    setup(node.engine(), &spec);
    let before = balances(node.engine(), &spec);
    let logged = node.engine().audit().iter().map(|a| a.last_timestamp).max().unwrap();
    assert!(logged > real + day);
    node.shutdown();

    config.clock = NodeClock::default();
    match Node::open(config.clone()) {
        Err(error @ NodeError::ClockBehind { .. }) => {
            let message = error.to_string();
            assert!(message.contains("s behind the newest command in the log"), "{message}");
            assert!(message.contains("--allow-clock-behind"), "{message}");
        }
        Err(other) => panic!("refused for another reason: {other}"),
        Ok(_) => panic!("started a day behind the log"),
    }
    // Half a minute behind is within the margin.
    config.clock = NodeClock(std::sync::Arc::new(ManualClock::new(logged - 30_000_000_000, 1_000)));
    Node::open(config.clone()).expect("half a minute behind starts").shutdown();

    config.clock = NodeClock::default();
    config.allow_clock_behind = true;
    let node = Node::open(config).unwrap();
    assert_eq!(balances(node.engine(), &spec), before);
    storm(node.engine(), &spec, 1, 0);
    let after = node.engine().audit().iter().map(|a| a.last_timestamp).max().unwrap();
    assert!(after > logged, "timestamps still grow: {after} after {logged}");
    node.shutdown();
}

/// A directory that lost `cluster.json` but holds a log is refused, naming the file and
/// changing nothing: started as a new directory, it would replay its log under whatever shard
/// count, limits and rules the start was given, and rewrite `ledger.json` with them.
#[test]
fn a_ledger_without_its_cluster_file_refuses_to_start() {
    let dir = tempfile::tempdir().unwrap();
    let (config, node, spec) = set_up_with_a_64_id_window(dir.path());
    let before = balances(node.engine(), &spec);
    node.shutdown();
    let cluster = std::fs::read(dir.path().join("cluster.json")).unwrap();
    let ledger = std::fs::read(dir.path().join("ledger.json")).unwrap();
    std::fs::remove_file(dir.path().join("cluster.json")).unwrap();
    for shards in [2, 4] {
        let mut other = config.clone();
        other.engine.shards = shards;
        let err = Node::open(other).err().expect("refused").to_string();
        assert!(err.contains("cluster.json is missing") && err.contains("shard-0"), "{err}");
    }
    let err = stormledger::node::read_data_dir(dir.path()).expect_err("refused").to_string();
    assert!(err.contains("cluster.json"), "{err}");
    // Nothing was changed or added.
    assert!(!dir.path().join("cluster.json").exists());
    assert_eq!(std::fs::read(dir.path().join("ledger.json")).unwrap(), ledger);
    assert!(!dir.path().join("shard-02").exists());
    // With the file back, the ledger starts as it was.
    std::fs::write(dir.path().join("cluster.json"), cluster).unwrap();
    let node = Node::open(config).unwrap();
    assert_eq!(balances(node.engine(), &spec), before);
    node.shutdown();
}

#[test]
fn the_segment_size_may_change_between_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let spec = spec();
    let mut config = node_config(dir.path(), 2);
    let node = Node::open(config.clone()).unwrap();
    setup(node.engine(), &spec);
    storm(node.engine(), &spec, 20, 0);
    node.shutdown();
    let mut expected = None;
    for (round, segment_size) in [(1, 64 * 1024), (2, 1 << 20), (3, 128 * 1024)] {
        config.segment_size = segment_size;
        let node = Node::open(config.clone()).unwrap();
        if let Some(expected) = &expected {
            assert_eq!(&balances(node.engine(), &spec), expected, "segment size {segment_size}");
        }
        storm(node.engine(), &spec, 30, round * 30);
        expected = Some(balances(node.engine(), &spec));
        node.engine().audit();
        node.shutdown();
    }
    let node = Node::open(config).unwrap();
    assert_eq!(Some(balances(node.engine(), &spec)), expected);
    // Segments of different sizes, all replayed (each is as large as when it was made).
    let shard0 = stormledger::wal::shard_dir(dir.path(), 0);
    let sizes: std::collections::BTreeSet<u64> =
        segments(&shard0).iter().map(|p| std::fs::metadata(p).unwrap().len()).collect();
    assert!(sizes.len() >= 2, "{sizes:?}");
}

fn segments(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "wal"))
        .collect();
    v.sort();
    v
}

#[test]
fn a_flipped_bit_mid_log_refuses_to_start_and_names_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let spec = spec();
    {
        let node = Node::open(node_config(dir.path(), 1)).unwrap();
        setup(node.engine(), &spec);
        storm(node.engine(), &spec, 20, 0);
        node.shutdown();
    }
    let seg = segments(&dir.path().join("shard-00"))[0].clone();
    let mut bytes = std::fs::read(&seg).unwrap();
    bytes[4096 + 200] ^= 0x10;
    std::fs::write(&seg, bytes).unwrap();
    match Node::open(node_config(dir.path(), 1)) {
        Err(NodeError::Corrupt(msg)) => assert!(msg.contains("00000000.wal"), "{msg}"),
        other => panic!("expected Corrupt, got {:?}", other.err()),
    }
}

#[test]
fn an_undecodable_command_in_a_checksummed_batch_refuses_to_start_and_names_the_batch() {
    // A record whose checksum holds but one of whose commands is no command (a bug of the
    // writer, or bytes written by something else): corruption, not a command skipped.
    use stormledger::storage::MmapStorage;
    use stormledger::wal::{shard_dir, Wal, WalConfig};
    use zerocopy::IntoBytes;
    let dir = tempfile::tempdir().unwrap();
    Node::open(node_config(dir.path(), 1)).unwrap().shutdown();
    let (mut wal, _) = Wal::open(&shard_dir(dir.path(), 0), 0, WalConfig::default(), Arc::new(MmapStorage)).unwrap();
    let ts = 1_795_752_000_000_000_000u64;
    let mut records: Vec<CommandRecord> = (0..40u64)
        .map(|k| {
            let mut r =
                Command::CreateAccount { account: k + 1, kind: AccountKind::User, flags: 1, union: 0 }.to_record();
            r.timestamp = (ts + k).into();
            r
        })
        .collect();
    records[30].kind = 250;
    let lsn = wal.append(stormledger::node::RECORD_KIND_COMMANDS, ts, records.as_bytes()).unwrap();
    wal.sync().unwrap();
    drop(wal);
    match Node::open(node_config(dir.path(), 1)) {
        Err(NodeError::Corrupt(msg)) => {
            assert!(msg.contains(&format!("undecodable command at lsn {lsn}")), "{msg}")
        }
        other => panic!("expected Corrupt, got {:?}", other.err()),
    }
}

#[test]
fn a_missing_segment_refuses_to_start() {
    let dir = tempfile::tempdir().unwrap();
    let spec = spec();
    {
        let node = Node::open(node_config(dir.path(), 1)).unwrap();
        setup(node.engine(), &spec);
        storm(node.engine(), &spec, 80, 0);
        node.shutdown();
    }
    let segs = segments(&dir.path().join("shard-00"));
    assert!(segs.len() >= 3, "{segs:?}");
    std::fs::remove_file(&segs[1]).unwrap();
    assert!(matches!(Node::open(node_config(dir.path(), 1)), Err(NodeError::Corrupt(_))));
}

#[test]
fn a_log_that_ends_before_its_snapshot_refuses_to_start() {
    // Every log segment lost next to a snapshot: starting would begin a new log at lsn 1, and
    // the next restart would skip those records as covered by the snapshot. Nor may the newest
    // segments alone be lost. The spare segment the log allocated ahead shows the loss first;
    // without it (lost too), the snapshot's lsn does.
    for (lose_all, lose_spare) in [(true, false), (false, false), (true, true), (false, true)] {
        let dir = tempfile::tempdir().unwrap();
        let spec = spec();
        {
            let node = Node::open(node_config(dir.path(), 1)).unwrap();
            setup(node.engine(), &spec);
            storm(node.engine(), &spec, 80, 0);
            assert_eq!(admin(node.engine(), kind::SNAPSHOT), 0);
            node.shutdown();
        }
        let segs = segments(&dir.path().join("shard-00"));
        assert!(segs.len() >= 3, "{segs:?}");
        let lost = if lose_all { &segs[..] } else { &segs[1..] };
        for seg in lost {
            std::fs::remove_file(seg).unwrap();
        }
        let shard_dir = dir.path().join("shard-00");
        let spare = std::fs::read_dir(&shard_dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .find(|p| p.to_string_lossy().ends_with(".wal.tmp"));
        if lose_spare {
            std::fs::remove_file(spare.expect("the log keeps a spare segment ahead")).unwrap();
        }
        let expected = if lose_spare {
            "acknowledged records are missing".to_string()
        } else {
            format!("segment {:08} is missing", if lose_all { 0 } else { 1 })
        };
        match Node::open(node_config(dir.path(), 1)) {
            Err(NodeError::Corrupt(message)) => assert!(message.contains(&expected), "{message}"),
            other => panic!("expected Corrupt, got {:?}", other.err()),
        }
    }
}

/// The log ending exactly one record before the lsn its snapshot covers (its last records
/// zeroed, as a lost write-back of the log's last pages would leave them): starting would write
/// the next batch under the snapshot's lsn, which the restart after skips as covered.
#[test]
fn a_log_one_record_short_of_its_snapshot_refuses_to_start() {
    use stormledger::storage::MmapStorage;
    use stormledger::wal::{shard_dir, WalReader};
    let dir = tempfile::tempdir().unwrap();
    let spec = spec();
    {
        let node = Node::open(node_config(dir.path(), 1)).unwrap();
        setup(node.engine(), &spec);
        storm(node.engine(), &spec, 5, 0);
        assert_eq!(admin(node.engine(), kind::SNAPSHOT), 0);
        node.shutdown();
    }
    let sdir = shard_dir(dir.path(), 0);
    let covered = stormledger::snapshot::load_latest(&sdir.join("snapshots")).unwrap().unwrap().meta.lsns[0];
    let (reader, _) = WalReader::open(&sdir, 0, &MmapStorage).unwrap();
    let record = reader.iter().map(|r| r.unwrap()).find(|r| r.lsn == covered).expect("the covered record");
    let (path, offset) = (sdir.join(format!("{:08}.wal", record.segment)), record.offset as usize);
    drop(reader);
    assert_eq!(segments(&sdir).last(), Some(&path), "one segment: no later one to miss");
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[offset..].fill(0);
    std::fs::write(&path, bytes).unwrap();
    match Node::open(node_config(dir.path(), 1)) {
        Err(NodeError::Corrupt(message)) => {
            let expected = format!("the log ends at lsn {} but the snapshot covers up to {covered}", covered - 1);
            assert!(message.contains(&expected), "{message}")
        }
        other => panic!("expected Corrupt, got {:?}", other.err()),
    }
}

/// The last segment cut short (a copy or restore that stopped early): its size no longer
/// matches its header. Refused, naming the file, never read as a log that ends there (a cut
/// inside a record would have been truncated as a torn tail).
#[test]
fn a_segment_cut_short_refuses_to_start_and_names_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let spec = spec();
    {
        let node = Node::open(node_config(dir.path(), 1)).unwrap();
        setup(node.engine(), &spec);
        storm(node.engine(), &spec, 5, 0);
        node.shutdown();
    }
    let seg = segments(&dir.path().join("shard-00")).last().unwrap().clone();
    let file = std::fs::OpenOptions::new().write(true).open(&seg).unwrap();
    let len = file.metadata().unwrap().len();
    file.set_len(len / 2).unwrap();
    drop(file);
    match Node::open(node_config(dir.path(), 1)) {
        Err(NodeError::Corrupt(message)) => assert!(message.contains("00000000.wal"), "{message}"),
        other => panic!("expected Corrupt, got {:?}", other.err()),
    }
}

/// The last record of shard 0's log: its file, offset and lsn.
fn last_record(dir: &Path) -> (std::path::PathBuf, u64, u64) {
    use stormledger::storage::MmapStorage;
    use stormledger::wal::{shard_dir, WalReader};
    let sdir = shard_dir(dir, 0);
    let (reader, _) = WalReader::open(&sdir, 0, &MmapStorage).unwrap();
    let last = reader.iter().map(|r| r.unwrap()).last().unwrap();
    (sdir.join(format!("{:08}.wal", last.segment)), last.offset, last.lsn)
}

/// Flips a bit in the payload of the record at `offset` of `path`; returns the file's new bytes.
fn damage_record(path: &Path, offset: u64) -> Vec<u8> {
    let mut bytes = std::fs::read(path).unwrap();
    bytes[offset as usize + 48 + 10] ^= 0x01;
    std::fs::write(path, &bytes).unwrap();
    bytes
}

/// A clean stop records where every shard's log ended: a log found shorter at the next start
/// (its last record zeroed, as a lost write-back or a wrong `dd` would leave it, which reads
/// as a clean end) lost acknowledged records, and the start is refused instead of continuing
/// without them.
#[test]
fn a_log_shorter_than_at_its_clean_stop_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let spec = spec();
    let before = stormed_and_stopped(dir.path(), 1, &spec, 2);
    let mark = dir.path().join(stormledger::node::CLEAN_STOP_FILE);
    let (path, offset, lsn) = last_record(dir.path());
    let recorded = stormledger::node::CleanStop::read(&stormledger::storage::MmapStorage, dir.path()).expect("marked");
    assert_eq!(recorded.next_lsn, vec![lsn + 1], "the mark holds the log's end");
    // The healthy directory starts (and a start removes the mark before it writes).
    let node = Node::open(node_config(dir.path(), 1)).unwrap();
    assert!(!mark.exists());
    assert_eq!(balances(node.engine(), &spec), before);
    node.shutdown();
    // Now the last record is zeroed: the log reads clean, one record short.
    let (path2, offset2, lsn2) = last_record(dir.path());
    assert_eq!((path2, offset2, lsn2), (path.clone(), offset, lsn), "nothing was logged by the start");
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[offset as usize..].fill(0);
    std::fs::write(&path, &bytes).unwrap();
    let err = Node::open(node_config(dir.path(), 1)).err().expect("refused").to_string();
    assert!(err.contains("stopped cleanly") && err.contains("missing"), "{err}");
    assert_eq!(std::fs::read(&path).unwrap(), bytes, "nothing written");
    assert!(mark.exists());
}

#[test]
fn a_damaged_last_record_the_snapshot_covers_is_refused_and_never_truncated() {
    // `admin snapshot` then a stop: the log ends exactly at the snapshot's lsn. The snapshot
    // proves its last record was synced, so a bad one is damage, not a tear: zeroing it would
    // leave a log that ends before its snapshot, a directory that never starts again.
    let dir = tempfile::tempdir().unwrap();
    let spec = spec();
    {
        let node = Node::open(node_config(dir.path(), 1)).unwrap();
        setup(node.engine(), &spec);
        storm(node.engine(), &spec, 2, 0);
        assert_eq!(admin(node.engine(), kind::SNAPSHOT), 0);
        node.shutdown();
    }
    let snapdir = dir.path().join("shard-00/snapshots");
    let snapshot_lsn = stormledger::snapshot::load_latest(&snapdir).unwrap().unwrap().meta.lsns[0];
    let (path, offset, lsn) = last_record(dir.path());
    assert_eq!(lsn, snapshot_lsn, "the snapshot covers the last record");
    let damaged = damage_record(&path, offset);
    for _ in 0..2 {
        match Node::open(node_config(dir.path(), 1)) {
            Err(NodeError::Corrupt(message)) => {
                let file = path.file_name().unwrap().to_str().unwrap();
                assert!(message.contains(&format!("{file}:{offset}")), "names the file and offset: {message}");
                assert!(message.contains("snapshot covers it"), "{message}");
                assert!(message.contains("snapshot-"), "names the snapshot: {message}");
            }
            other => panic!("expected Corrupt, got {:?}", other.err()),
        }
        assert_eq!(std::fs::read(&path).unwrap(), damaged, "nothing written: the bytes stay as found");
    }
}

#[test]
fn a_torn_last_record_after_the_snapshot_is_still_truncated_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let spec = spec();
    let before = {
        let node = Node::open(node_config(dir.path(), 1)).unwrap();
        setup(node.engine(), &spec);
        storm(node.engine(), &spec, 2, 0);
        assert_eq!(admin(node.engine(), kind::SNAPSHOT), 0);
        storm(node.engine(), &spec, 2, 2);
        let b = balances(node.engine(), &spec);
        // The last batch, torn below.
        storm(node.engine(), &spec, 1, 4);
        assert_ne!(balances(node.engine(), &spec), b);
        node.shutdown();
        b
    };
    let snapdir = dir.path().join("shard-00/snapshots");
    let snapshot_lsn = stormledger::snapshot::load_latest(&snapdir).unwrap().unwrap().meta.lsns[0];
    let (path, offset, lsn) = last_record(dir.path());
    assert!(lsn > snapshot_lsn);
    damage_record(&path, offset);
    // The node stopped cleanly, so the record was not torn by a crash: it was acknowledged and
    // damaged since. Refused, naming the mark, and nothing changed.
    let mark = dir.path().join(stormledger::node::CLEAN_STOP_FILE);
    assert!(mark.exists(), "a clean shutdown marks the directory");
    let err = Node::open(node_config(dir.path(), 1)).err().expect("refused").to_string();
    assert!(err.contains("stopped cleanly") && err.contains("acknowledged"), "{err}");
    assert!(mark.exists());
    let (_, report) =
        stormledger::wal::WalReader::open(&dir.path().join("shard-00"), 0, &stormledger::storage::MmapStorage).unwrap();
    assert!(matches!(report.outcome, stormledger::wal::RecoveryOutcome::WouldTruncateTail { .. }), "{report:?}");
    // Without the mark (a crash, as `kill -9` leaves it) it is a torn write: truncated.
    std::fs::remove_file(&mark).unwrap();
    let node = Node::open(node_config(dir.path(), 1)).unwrap();
    assert_eq!(balances(node.engine(), &spec), before, "the torn batch is gone, nothing else");
    // A start removes the mark before it writes; a crash now leaves none.
    assert!(!mark.exists());
    node.shutdown();
    assert!(mark.exists());
    // Zeroed at the start: the log reads clean (anything logged since went in its place).
    let (_, report) =
        stormledger::wal::WalReader::open(&dir.path().join("shard-00"), 0, &stormledger::storage::MmapStorage).unwrap();
    assert_eq!(report.outcome, stormledger::wal::RecoveryOutcome::Clean);
}

#[test]
fn a_start_that_fails_on_one_shard_writes_nothing_on_the_others() {
    // Shard 0 ends in a torn record (repairable), shard 1's log is damaged mid-way (not): the
    // start is refused before any shard's torn tail is zeroed.
    let dir = tempfile::tempdir().unwrap();
    let spec = spec();
    {
        let node = Node::open(node_config(dir.path(), 2)).unwrap();
        setup(node.engine(), &spec);
        storm(node.engine(), &spec, 5, 0);
        node.shutdown();
    }
    let (path, offset, _) = last_record(dir.path());
    let torn = damage_record(&path, offset);
    let other = segments(&dir.path().join("shard-01"))[0].clone();
    let mut bytes = std::fs::read(&other).unwrap();
    bytes[4096 + 200] ^= 0x10;
    std::fs::write(&other, bytes).unwrap();
    match Node::open(node_config(dir.path(), 2)) {
        Err(NodeError::Corrupt(message)) => assert!(message.contains("shard-01"), "{message}"),
        other => panic!("expected Corrupt, got {:?}", other.err()),
    }
    assert_eq!(std::fs::read(&path).unwrap(), torn, "shard 0's torn tail is left as found");
}

/// `account`'s history, newest first: (timestamp, id, amount) of every entry a read still sees.
fn history(engine: &Engine, account: u64) -> Vec<(u64, u64, i64)> {
    use stormledger::engine::query_kind;
    use stormledger::layout::QueryRecord;
    let mut q = QueryRecord { kind: query_kind::HISTORY, ..QueryRecord::default() };
    q.key.set(account);
    q.limit.set(100);
    let mut seen = Vec::new();
    loop {
        let page = engine.query_blocking(q);
        assert_eq!(page.reply.status.get(), 0);
        seen.extend(page.history.iter().map(|h| (h.timestamp.get(), h.id.get(), h.amount.get())));
        if page.next_before_ts == 0 {
            return seen;
        }
        q.before_ts.set(page.next_before_ts);
        q.before_shard.set(page.next_before_shard);
    }
}

#[test]
fn history_max_may_be_lowered_between_starts() {
    // `history_max` bounds only what history reads still see: a snapshot retaining more entries
    // than the new ring holds loads with the oldest dropped.
    let dir = tempfile::tempdir().unwrap();
    let spec = spec();
    let streamer = STREAMER_BASE;
    let before = {
        let node = Node::open(node_config(dir.path(), 1)).unwrap();
        setup(node.engine(), &spec);
        storm(node.engine(), &spec, 2, 0);
        assert_eq!(admin(node.engine(), kind::SNAPSHOT), 0);
        let h = history(node.engine(), streamer);
        node.shutdown();
        h
    };
    let mut config = node_config(dir.path(), 1);
    config.engine.limits.history_max = 64;
    let node = match Node::open(config.clone()) {
        Ok(node) => node,
        Err(e) => panic!("restart with a smaller history_max refused: {e}"),
    };
    let after = history(node.engine(), streamer);
    assert!(!after.is_empty() && after.len() < before.len(), "{} of {}", after.len(), before.len());
    assert_eq!(after[..], before[..after.len()], "the newest entries, none of the dropped ones");
    // A snapshot of the smaller ring, and a start from it with the ring grown again.
    assert_eq!(admin(node.engine(), kind::SNAPSHOT), 0);
    node.shutdown();
    config.engine.limits.history_max = 4096;
    let node = Node::open(config).unwrap();
    assert_eq!(history(node.engine(), streamer), after);
    node.shutdown();
}

#[test]
fn a_snapshot_with_a_zero_top_up_id_is_refused_not_a_panic() {
    // Written through `write_snapshot`, so every checksum holds: the decoder must refuse it (a
    // snapshot that verifies but does not decode refuses the start, naming the file).
    use stormledger::snapshot::state::SECTION_TOPUPS;
    let dir = tempfile::tempdir().unwrap();
    let spec = StormSpec { users: 5, streamers: 1, topup_yuan: 6, ..StormSpec::default() };
    {
        let node = Node::open(node_config(dir.path(), 1)).unwrap();
        setup(node.engine(), &spec);
        assert_eq!(admin(node.engine(), kind::SNAPSHOT), 0);
        node.shutdown();
    }
    let snapdir = dir.path().join("shard-00/snapshots");
    let snap = stormledger::snapshot::load_latest(&snapdir).unwrap().unwrap();
    let mut sections: Vec<(u32, Vec<u8>)> = snap.sections().map(|(t, b)| (t, b.to_vec())).collect();
    let meta = snap.meta.clone();
    drop(snap);
    let topups = &mut sections.iter_mut().find(|(t, _)| *t == SECTION_TOPUPS).unwrap().1;
    assert!(topups.len() >= 96);
    topups[..8].copy_from_slice(&0u64.to_le_bytes());
    let refs: Vec<(u32, &[u8])> = sections.iter().map(|(t, b)| (*t, b.as_slice())).collect();
    let written = stormledger::snapshot::write_snapshot(&snapdir, &meta, &refs).unwrap();
    let outcome = std::panic::catch_unwind(|| Node::open(node_config(dir.path(), 1)).map(drop));
    match outcome {
        Ok(Err(NodeError::Corrupt(message))) => {
            assert!(message.contains("top-up id 0"), "{message}");
            assert!(message.contains(&written.path.display().to_string()), "names the file: {message}");
        }
        Ok(other) => panic!("expected Corrupt, got {other:?}"),
        Err(_) => panic!("loading the snapshot panicked"),
    }
}

#[test]
fn a_corrupt_newest_snapshot_falls_back_to_the_older_one_and_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let spec = spec();
    let mut config = node_config(dir.path(), 1);
    config.retire_log = true;
    // Small segments, several between the snapshots: the second snapshot retires the log
    // before the first, and only that (the fallback needs the log after the first).
    config.segment_size = 64 * 1024;
    let before = {
        let node = Node::open(config.clone()).unwrap();
        setup(node.engine(), &spec);
        storm(node.engine(), &spec, 20, 0);
        assert_eq!(admin(node.engine(), kind::SNAPSHOT), 0);
        storm(node.engine(), &spec, 20, 20);
        assert_eq!(admin(node.engine(), kind::SNAPSHOT), 0);
        storm(node.engine(), &spec, 5, 40);
        let b = balances(node.engine(), &spec);
        node.shutdown();
        b
    };
    let segs = segments(&dir.path().join("shard-00"));
    assert!(
        !segs.iter().any(|p| p.ends_with("00000000.wal")),
        "the log before the first snapshot is retired: {segs:?}"
    );
    let snapdir = dir.path().join("shard-00/snapshots");
    let mut snaps: Vec<_> = std::fs::read_dir(&snapdir).unwrap().map(|e| e.unwrap().path()).collect();
    snaps.sort();
    let newest = snaps.last().unwrap();
    let len = std::fs::metadata(newest).unwrap().len();
    std::fs::OpenOptions::new().write(true).open(newest).unwrap().set_len(len / 2).unwrap();
    let node = Node::open(config).unwrap();
    assert_eq!(balances(node.engine(), &spec), before, "older snapshot + longer replay gives the same state");
}

#[test]
fn buffered_mode_survives_a_restart_too() {
    let dir = tempfile::tempdir().unwrap();
    let spec = spec();
    let mut config = node_config(dir.path(), 2);
    config.durability = Durability::Buffered;
    let before = {
        let node = Node::open(config.clone()).unwrap();
        setup(node.engine(), &spec);
        storm(node.engine(), &spec, 10, 0);
        let b = balances(node.engine(), &spec);
        node.shutdown();
        b
    };
    let node = Node::open(config).unwrap();
    assert_eq!(balances(node.engine(), &spec), before);
}

#[test]
fn replication_cut_off_by_a_crash_is_completed_at_start() {
    // Shard 0 applied a streamer's creation (and logged it) but the crash came before shard 1
    // received its replica: at start the engine re-sends it from shard 0's outbox.
    let config = EngineConfig {
        shards: 2,
        limits: ShardLimits { accounts_max: 256, history_max: 64, ids_max: 64 },
        ..EngineConfig::default()
    };
    let streamer = (1..).find(|&id| stormledger::shard::router::home_shard(id, 2) == 0).unwrap();
    let mut home = ShardState::new(0, 2, config.ledger.clone(), config.limits.clone());
    let other = ShardState::new(1, 2, config.ledger.clone(), config.limits.clone());
    let create = Command::CreateAccount { account: streamer, kind: AccountKind::Streamer, flags: 0, union: 0 };
    let (reply, fanout) = home.apply(1, &create);
    assert_eq!(reply.status, Status::Ok);
    assert!(matches!(fanout, Fanout::Replicate(_)));
    assert!(other.account(streamer).is_none());
    let journals = vec![Box::new(NullJournal) as Box<dyn Journal>, Box::new(NullJournal) as Box<dyn Journal>];
    let engine = Engine::start(&config, vec![home, other], journals, Arc::new(ManualClock::new(10, 1)));
    engine.audit(); // both shards have drained what was queued before
    let states = engine.shutdown();
    assert!(states[1].account(streamer).is_some(), "the replica was completed");
    assert_eq!(states[1].replica_in(0), 1);
}

#[test]
fn a_top_up_callback_after_its_id_left_the_window_is_routed_and_applied_across_restarts() {
    use stormledger::layout::text_field;
    let dir = tempfile::tempdir().unwrap();
    let (config, node, spec) = set_up_with_a_64_id_window(dir.path());
    let user = 7u64;
    let status = |engine: &Engine, command: Command| engine.execute(&[command])[0];
    let begin = Command::TopUpBegin { id: 4_000_001, user, method: 1, fen: 600 };
    let confirm =
        Command::TopUpConfirm { id: 4_000_001, fen: 600, channel_txn: text_field("LATE-1").unwrap(), paid_by: 0 };
    assert_eq!(status(node.engine(), begin).status.get(), 0);
    // A storm pushes the begin out of its shard's 64-id window (and of the directory's).
    storm(node.engine(), &spec, 10, 0);
    let before = node.engine().balance(user).unwrap();
    node.shutdown();
    // After a restart (replay of the log) the callback is still routed to its top-up.
    let node = Node::open(config.clone()).unwrap();
    let reply = status(node.engine(), confirm);
    assert_eq!((reply.status.get(), reply.value.get(), reply.flags), (0, 60, 0));
    assert_eq!(node.engine().balance(user), Some(before + 60));
    storm(node.engine(), &spec, 10, 10);
    let before = node.engine().balance(user).unwrap();
    assert_eq!(admin(node.engine(), kind::SNAPSHOT), 0);
    node.shutdown();
    // After a restart from a snapshot: the repeated callback gets the original answer, once.
    let node = Node::open(config).unwrap();
    // `lookup` of its id still answers with the begin, rebuilt from the top-up.
    let mut q =
        stormledger::layout::QueryRecord { kind: stormledger::engine::query_kind::LOOKUP, ..Default::default() };
    q.key.set(4_000_001);
    let answer = node.engine().query_blocking(q);
    assert_eq!((answer.reply.status.get(), answer.reply.value.get()), (0, 60));
    assert_eq!(Command::from_record(&answer.command.unwrap()).unwrap(), begin);
    let reply = status(node.engine(), confirm);
    assert_eq!((reply.status.get(), reply.value.get(), reply.flags), (0, 60, 1));
    let retried_begin = status(node.engine(), begin);
    assert_eq!((retried_begin.status.get(), retried_begin.flags), (0, 1));
    assert_eq!(node.engine().balance(user), Some(before));
    // Its id stays taken: a tip under it is refused, whichever shard the payer lives on.
    for payer in 1..=4 {
        let tip = Command::Tip { id: 4_000_001, from: payer, to: STREAMER_BASE, coins: 1 };
        assert_eq!(status(node.engine(), tip).status.get(), Status::ExistsWithDifferentFields.code(), "payer {payer}");
    }
    assert_eq!(node.engine().balance(user), Some(before));
    node.engine().audit();
    node.shutdown();
}

#[test]
fn maintenance_mode_survives_a_restart_until_switched_off() {
    let dir = tempfile::tempdir().unwrap();
    let spec = spec();
    let node = Node::open(node_config(dir.path(), 2)).unwrap();
    setup(node.engine(), &spec);
    let on = CommandRecord { kind: kind::MAINTENANCE, flags: 1, ..CommandRecord::default() };
    let off = CommandRecord { kind: kind::MAINTENANCE, flags: 0, ..CommandRecord::default() };
    let tip = Command::Tip { id: 77_000_001, from: 1, to: STREAMER_BASE, coins: 1 };
    assert_eq!(submit_one(node.engine(), on), 0);
    assert_eq!(node.engine().execute(&[tip])[0].status.get(), Status::Maintenance.code());
    // A crash (no shutdown) while paused: the node comes back paused, reads still work.
    drop(node);
    let node = Node::open(node_config(dir.path(), 2)).unwrap();
    assert!(node.engine().maintenance());
    assert_eq!(node.engine().execute(&[tip])[0].status.get(), Status::Maintenance.code());
    assert!(node.engine().balance(1).is_some());
    assert_eq!(submit_one(node.engine(), off), 0);
    assert_eq!(node.engine().execute(&[tip])[0].status.get(), 0);
    node.shutdown();
    let node = Node::open(node_config(dir.path(), 2)).unwrap();
    assert!(!node.engine().maintenance());
    node.shutdown();
}

#[test]
fn a_snapshot_taken_right_after_a_restart_covers_the_recovered_log() {
    // A restarted shard that has applied no new batch yet still holds everything up to its
    // log's last record: a snapshot taken then must say so, or the next start replays the log
    // onto a state that already has it.
    let dir = tempfile::tempdir().unwrap();
    let spec = spec();
    let config = node_config(dir.path(), 2);
    let before = {
        let node = Node::open(config.clone()).unwrap();
        setup(node.engine(), &spec);
        storm(node.engine(), &spec, 20, 0);
        let b = balances(node.engine(), &spec);
        node.shutdown();
        b
    };
    {
        let node = Node::open(config.clone()).unwrap();
        assert_eq!(admin(node.engine(), kind::SNAPSHOT), 0);
        node.shutdown();
    }
    let node = Node::open(config).unwrap();
    assert_eq!(balances(node.engine(), &spec), before);
    for s in node.engine().audit() {
        assert_eq!(s.unit_sums, [0, 0]);
    }
}

#[test]
fn a_lost_shard_directory_refuses_to_start_and_verify_creates_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let spec = spec();
    let config = node_config(dir.path(), 2);
    {
        let node = Node::open(config.clone()).unwrap();
        setup(node.engine(), &spec);
        node.shutdown();
    }
    let lost = dir.path().join("shard-01");
    std::fs::remove_dir_all(&lost).unwrap();
    // What the recovery tool's verify and replay run: an error, and nothing written.
    let (ledger, limits) = (&config.engine.ledger, &config.engine.limits);
    match stormledger::node::load_shard(dir.path(), 1, 2, ledger, limits, &mut |_| {}) {
        Err(NodeError::Corrupt(message)) => assert!(message.contains("shard 1"), "{message}"),
        other => panic!("expected Corrupt, got {:?}", other.err()),
    }
    assert!(!lost.exists(), "loading a shard creates nothing");
    // The server does not start that shard empty.
    match Node::open(config) {
        Err(NodeError::Corrupt(message)) => assert!(message.contains("shard 1"), "{message}"),
        other => panic!("expected Corrupt, got {:?}", other.err()),
    }
    assert!(!lost.exists());
}

#[test]
fn a_damaged_snapshot_is_set_aside_so_retention_keeps_the_one_to_fall_back_on() {
    let dir = tempfile::tempdir().unwrap();
    let spec = spec();
    let mut config = node_config(dir.path(), 1);
    config.retire_log = true;
    let snapdir = dir.path().join("shard-00/snapshots");
    let snapshots = || {
        let mut names: Vec<String> =
            std::fs::read_dir(&snapdir).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
        names.sort();
        names
    };
    let halve = |name: &str| {
        let path = snapdir.join(name);
        let len = std::fs::metadata(&path).unwrap().len();
        std::fs::OpenOptions::new().write(true).open(&path).unwrap().set_len(len / 2).unwrap();
    };
    {
        let node = Node::open(config.clone()).unwrap();
        setup(node.engine(), &spec);
        assert_eq!(admin(node.engine(), kind::SNAPSHOT), 0);
        storm(node.engine(), &spec, 5, 0);
        assert_eq!(admin(node.engine(), kind::SNAPSHOT), 0);
        node.shutdown();
    }
    let [older, newest] = <[String; 2]>::try_from(snapshots()).unwrap();
    halve(&newest);
    let before = {
        // Starts from the older one and sets the damaged one aside; the next snapshot keeps it.
        let node = Node::open(config.clone()).unwrap();
        assert_eq!(snapshots(), [older.clone(), format!("{newest}.damaged")]);
        storm(node.engine(), &spec, 5, 5);
        assert_eq!(admin(node.engine(), kind::SNAPSHOT), 0);
        storm(node.engine(), &spec, 5, 10);
        let b = balances(node.engine(), &spec);
        node.shutdown();
        b
    };
    // The snapshot to fall back on is kept, and the new one takes a sequence number of its own:
    // one the damaged file does not have.
    let damaged = format!("{newest}.damaged");
    let new = stormledger::snapshot::snapshot_file_name(3);
    assert_eq!(snapshots(), [older.clone(), damaged.clone(), new.clone()]);
    // The newest damaged as well: the older one and the log still give every balance, and it
    // is set aside next to the first (whose evidence stays).
    halve(&new);
    let node = Node::open(config).unwrap();
    assert_eq!(balances(node.engine(), &spec), before);
    assert_eq!(snapshots(), [older, damaged, format!("{new}.damaged")]);
}

#[test]
fn a_settlements_total_survives_restarts_and_snapshots_after_its_parts_are_forgotten() {
    // The home shard logs a settlement's total once every part is applied: a restart (from the
    // log, then from a snapshot) still answers a retry with it after the other shard forgot
    // its part under newer tips (windows of 64 ids).
    let dir = tempfile::tempdir().unwrap();
    let (config, node, spec) = set_up_with_a_64_id_window(dir.path());
    storm(node.engine(), &spec, 5, 0);
    let streamer = STREAMER_BASE;
    let settle = Command::Settle { id: 4_000_000, account: streamer };
    let first = node.engine().execute(&[settle])[0];
    let total = first.value.get();
    assert_eq!((first.status.get(), first.value2.get()), (0, 2));
    assert!(total > 0);
    node.shutdown();
    let other = 1 - home_shard(streamer, 2);
    let payers: Vec<u64> = (1..=spec.users).filter(|&u| home_shard(u, 2) == other).collect();
    let mut next_id = 5_000_000;
    let mut forget_parts = |engine: &Engine| {
        for payer in payers.iter().take(100) {
            next_id += 1;
            // Remembered whatever its status (some payers ran out of coins in the storm).
            let tip = Command::Tip { id: next_id, from: *payer, to: STREAMER_BASE + 1, coins: 1 };
            let status = Status::from_code(engine.execute(&[tip])[0].status.get()).unwrap();
            assert!(!status.is_retryable(), "{status:?}");
        }
    };
    for snapshot in [false, true] {
        let node = Node::open(config.clone()).unwrap();
        if snapshot {
            assert_eq!(admin(node.engine(), kind::SNAPSHOT), 0);
            node.shutdown();
            continue;
        }
        forget_parts(node.engine());
        let retry = node.engine().execute(&[settle])[0];
        assert_eq!((retry.status.get(), retry.value.get(), retry.value2.get(), retry.flags), (0, total, 2, 1));
        node.shutdown();
    }
    let node = Node::open(config).unwrap();
    forget_parts(node.engine());
    let retry = node.engine().execute(&[settle])[0];
    assert_eq!((retry.status.get(), retry.value.get(), retry.value2.get(), retry.flags), (0, total, 2, 1));
}
