//! The event feed through a real server over 127.0.0.1: resume after a disconnect with no gap
//! and no duplicate, a position older than the ring, a slow subscriber, and a restart.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use stormledger::client::watch::{WatchFrom, Watcher};
use stormledger::client::{ClientConfig, ClientError};
use stormledger::engine::{Engine, EngineConfig};
use stormledger::feed::{event_kind, Cursor, Position};
use stormledger::layout::{text_field, EventRecord};
use stormledger::ledger::command::{flags, AccountKind, Channel, FailReason};
use stormledger::ledger::Command;
use stormledger::node::{Durability, Node, NodeConfig};
use stormledger::protocol::ErrorCode;
use stormledger::server::{Backend, ServerConfig};
use tokio::net::TcpListener;
use tokio::sync::oneshot;

const TOKEN: &str = "feed-secret";
const STREAMER: u64 = 1_000_000;
const UNION: u64 = 2_000_000;
const DEADLINE: Duration = Duration::from_secs(30);

struct Running {
    addr: std::net::SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl Running {
    async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let _ = self.task.await;
    }
}

async fn serve(backend: Arc<dyn Backend>) -> Running {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        stormledger::server::run(listener, backend, ServerConfig::new(TOKEN), async {
            let _ = stopped.await;
        })
        .await
        .unwrap();
    });
    Running { addr, stop: Some(stop), task }
}

fn engine(shards: u16, feed_events_max: usize) -> Arc<Engine> {
    let config = EngineConfig { shards, feed_events_max, ..EngineConfig::default() };
    Arc::new(Engine::in_memory(config).unwrap())
}

fn ok(engine: &Engine, commands: &[Command]) {
    for (reply, command) in engine.execute(commands).iter().zip(commands) {
        assert_eq!(reply.status.get(), 0, "{command:?}");
    }
}

/// Users 1..=users with 980 coins each (real top-ups); STREAMER in UNION. Returns the events it
/// produced (top-ups succeeded).
fn setup(engine: &Engine, users: u64) -> u64 {
    ok(engine, &[Command::CreateAccount { account: UNION, kind: AccountKind::Union, flags: 0, union: 0 }]);
    let mut cmds =
        vec![Command::CreateAccount { account: STREAMER, kind: AccountKind::Streamer, flags: 0, union: UNION }];
    for u in 1..=users {
        cmds.push(Command::CreateAccount { account: u, kind: AccountKind::User, flags: flags::REAL_NAME, union: 0 });
        cmds.push(Command::BindMethod { user: u, method: 1, channel: Channel::Wechat });
    }
    ok(engine, &cmds);
    let begins: Vec<Command> =
        (1..=users).map(|u| Command::TopUpBegin { id: 10_000_000 + u, user: u, method: 1, fen: 9_800 }).collect();
    ok(engine, &begins);
    let confirms: Vec<Command> = (1..=users)
        .map(|u| Command::TopUpConfirm {
            id: 10_000_000 + u,
            fen: 9_800,
            channel_txn: text_field(&format!("W{u}")).unwrap(),
            paid_by: 0,
        })
        .collect();
    ok(engine, &confirms);
    users
}

fn tips(ids: std::ops::Range<u64>, users: u64) -> Vec<Command> {
    ids.map(|id| Command::Tip { id, from: 1 + id % users, to: STREAMER, coins: 1 + id % 3 }).collect()
}

fn config() -> ClientConfig {
    ClientConfig::new(TOKEN)
}

/// Reads until `n` events arrived in this session.
async fn read_n(watcher: &mut Watcher, n: usize) -> Vec<EventRecord> {
    let mut out = Vec::new();
    while out.len() < n {
        let batch = tokio::time::timeout(DEADLINE, watcher.next()).await.expect("events in time").expect("stream");
        out.extend(batch);
    }
    out
}

/// No duplicate position, per-shard positions strictly increasing, splits add up.
fn check_stream(events: &[EventRecord]) {
    let mut last: BTreeMap<u16, Position> = BTreeMap::new();
    for e in events {
        let p = Position::of(e);
        if let Some(prev) = last.insert(e.shard.get(), p) {
            assert!(p > prev, "shard {}: {p} after {prev}", e.shard.get());
        }
        if matches!(e.kind, event_kind::TIP | event_kind::GIFT | event_kind::EVENT_PAYMENT) {
            let split = e.streamer_share.get() + e.union_share.get() + e.platform_share.get();
            assert_eq!(split, e.amount.get());
            assert_eq!(e.counterparty.get(), STREAMER);
            assert_eq!(e.union.get(), UNION);
            assert!(e.union_share.get() > 0 || e.amount.get() < 10);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_after_disconnect_has_no_gap_and_no_duplicate() {
    let engine = engine(2, 1 << 16);
    let server = serve(engine.clone()).await;
    let users = setup(&engine, 20);
    // A failed top-up, a refunded late confirmation, gifts, an event payment, a rejected tip, a
    // retried tip (no second event) and a settlement (one event per shard).
    ok(&engine, &[Command::TopUpBegin { id: 30_000_001, user: 1, method: 1, fen: 600 }]);
    ok(&engine, &[Command::TopUpFail { id: 30_000_001, reason: FailReason::Declined }]);
    let refunded = engine.execute(&[Command::TopUpConfirm {
        id: 30_000_001,
        fen: 600,
        channel_txn: text_field("LATE").unwrap(),
        paid_by: 0,
    }]);
    assert_ne!(refunded[0].status.get(), 0);
    ok(&engine, &tips(1..101, users));
    ok(&engine, &[Command::Gift { id: 200, from: 2, to: STREAMER, gift: 2, count: 3 }]);
    ok(&engine, &[Command::PayEvent { id: 201, from: 3, to: STREAMER, event: 9, coins: 30 }]);
    let rejected = engine.execute(&[Command::Tip { id: 202, from: 4, to: STREAMER, coins: 1_000_000 }]);
    assert_ne!(rejected[0].status.get(), 0);
    let retry = engine.execute(&tips(1..2, users));
    assert_eq!(retry[0].flags & 1, 1, "a duplicate");
    ok(&engine, &[Command::Settle { id: 300, account: STREAMER }]);
    let before = users as usize + 2 + 100 + 2 + 2;

    // First session: read part of the stream, then disconnect mid-stream.
    let mut watcher = Watcher::connect(server.addr, &config(), WatchFrom::Earliest).await.unwrap();
    // A frame carries many events; the subscriber processed (and printed the position of) only
    // the first 60 when the connection broke.
    let mut seen = read_n(&mut watcher, 60).await;
    seen.truncate(60);
    // The cursor a client keeps: the start position of every shard, advanced per event.
    let mut cursor: Cursor = "0:0.0,1:0.0".parse().unwrap();
    for e in &seen {
        cursor.advance(e);
    }
    let cursor: Cursor = cursor.to_string().parse().unwrap();
    drop(watcher);

    // More events while disconnected, then resume from the printed cursor.
    ok(&engine, &tips(1_000..1_050, users));
    let total = before + 50;
    let mut resumed = Watcher::connect(server.addr, &config(), WatchFrom::After(cursor)).await.unwrap();
    let rest = read_n(&mut resumed, total - seen.len()).await;
    seen.extend(rest);
    // Nothing more is pending.
    assert!(tokio::time::timeout(Duration::from_millis(300), resumed.next()).await.is_err());

    assert_eq!(seen.len(), total);
    check_stream(&seen);
    let positions: BTreeSet<(u16, Position)> = seen.iter().map(|e| (e.shard.get(), Position::of(e))).collect();
    assert_eq!(positions.len(), total, "no duplicate position");
    let count = |kind: u8| seen.iter().filter(|e| e.kind == kind).count();
    assert_eq!(count(event_kind::TOPUP_SUCCEEDED), users as usize);
    assert_eq!(count(event_kind::TOPUP_FAILED), 1);
    assert_eq!(count(event_kind::TOPUP_REFUNDED), 1);
    assert_eq!(count(event_kind::GIFT), 1);
    assert_eq!(count(event_kind::EVENT_PAYMENT), 1);
    assert_eq!(count(event_kind::SETTLE), 2);
    let tip_ids: BTreeSet<u64> = seen.iter().filter(|e| e.kind == event_kind::TIP).map(|e| e.id.get()).collect();
    let expected: BTreeSet<u64> = (1..101).chain(1_000..1_050).collect();
    assert_eq!(tip_ids, expected, "exactly the acknowledged tips");
    assert_eq!(count(event_kind::TIP), expected.len());
    let gift = seen.iter().find(|e| e.kind == event_kind::GIFT).unwrap();
    assert_eq!((gift.amount.get(), gift.detail.get()), (30, 2));
    let swept: u64 = seen.iter().filter(|e| e.kind == event_kind::SETTLE).map(|e| e.amount.get()).sum();
    let streamer_earned: u64 = seen
        .iter()
        .filter(|e| e.kind != event_kind::SETTLE && e.id.get() < 1_000)
        .map(|e| if e.kind >= event_kind::TIP { e.streamer_share.get() } else { 0 })
        .sum();
    assert_eq!(swept, streamer_earned, "the settlement swept what the streamer earned before it");
    drop(resumed);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_watch_from_now_sees_only_new_events() {
    let engine = engine(2, 1 << 16);
    let server = serve(engine.clone()).await;
    let users = setup(&engine, 10);
    let mut watcher = Watcher::connect(server.addr, &config(), WatchFrom::Now).await.unwrap();
    let producer = {
        let engine = engine.clone();
        tokio::task::spawn_blocking(move || {
            for chunk in 0..20u64 {
                ok(&engine, &tips(1 + chunk * 10..1 + chunk * 10 + 10, users));
            }
        })
    };
    let events = read_n(&mut watcher, 200).await;
    producer.await.unwrap();
    check_stream(&events);
    assert!(events.iter().all(|e| e.kind == event_kind::TIP));
    let ids: BTreeSet<u64> = events.iter().map(|e| e.id.get()).collect();
    assert_eq!(ids, (1..201).collect());
    drop(watcher);
    server.stop().await;
}

fn server_error(result: Result<impl Sized, ClientError>) -> ErrorCode {
    match result {
        Err(ClientError::Server(error)) => error.code,
        Err(other) => panic!("expected a server error, got {other}"),
        Ok(_) => panic!("expected a server error"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_position_older_than_the_ring_is_refused_clearly() {
    let engine = engine(2, 16);
    let server = serve(engine.clone()).await;
    let users = setup(&engine, 10);
    ok(&engine, &tips(1..200, users));
    let old: Cursor = "0:0.0,1:0.0".parse().unwrap();
    let refused = Watcher::connect(server.addr, &config(), WatchFrom::After(old)).await;
    assert_eq!(server_error(refused), ErrorCode::POSITION_TOO_OLD);
    // A shard this server does not have.
    let alien: Cursor = "7:1.0".parse().unwrap();
    let refused = Watcher::connect(server.addr, &config(), WatchFrom::After(alien)).await;
    assert_eq!(server_error(refused), ErrorCode::INVALID_POSITION);
    // Earliest still works: it starts at what the ring retains.
    let mut watcher = Watcher::connect(server.addr, &config(), WatchFrom::Earliest).await.unwrap();
    let events = read_n(&mut watcher, 32).await;
    check_stream(&events);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_subscriber_is_dropped_while_the_ledger_keeps_acknowledging() {
    let engine = engine(2, 8);
    let server = serve(engine.clone()).await;
    let users = setup(&engine, 50);
    let mut watcher = Watcher::connect(server.addr, &config(), WatchFrom::Now).await.unwrap();
    ok(&engine, &tips(1..5, users));
    let first = read_n(&mut watcher, 1).await;
    // The subscriber stops reading; the ledger does not wait for it: every tip is acknowledged.
    for chunk in 0..20u64 {
        ok(&engine, &tips(100 + chunk * 500..100 + (chunk + 1) * 500, users));
    }
    let mut seen = first;
    let end = loop {
        match tokio::time::timeout(DEADLINE, watcher.next()).await.expect("the server ends the stream") {
            Ok(events) => seen.extend(events),
            Err(error) => break error,
        }
    };
    match &end {
        ClientError::Server(error) => {
            assert_eq!(error.code, ErrorCode::SUBSCRIBER_TOO_SLOW);
            assert!(error.message.contains("resync from balances"), "{}", error.message);
        }
        other => panic!("expected subscriber_too_slow, got {other}"),
    }
    check_stream(&seen);
    // Resuming from the last position: that position is gone too, and the client is told so.
    let cursor = watcher.cursor().clone();
    let resumed = Watcher::connect(server.addr, &config(), WatchFrom::After(cursor)).await;
    assert_eq!(server_error(resumed), ErrorCode::POSITION_TOO_OLD);
    server.stop().await;
}

/// A node of 2 shards in `dir`, buffered, with small log segments.
fn node_config(dir: &std::path::Path) -> NodeConfig {
    let mut config = NodeConfig::new(dir);
    config.engine = EngineConfig { shards: 2, ..EngineConfig::default() };
    config.durability = Durability::Buffered;
    config.segment_size = 1 << 20;
    config
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_after_the_snapshot_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let node_config = node_config(dir.path());

    let node = Node::open(node_config.clone()).unwrap();
    let engine = node.engine().clone();
    let users = setup(&engine, 10);
    ok(&engine, &tips(1..101, users));
    let total = users as usize + 100;
    let server = serve(engine.clone()).await;
    let mut watcher = Watcher::connect(server.addr, &config(), WatchFrom::Earliest).await.unwrap();
    let before = read_n(&mut watcher, total).await;
    check_stream(&before);
    // A subscriber that saw only part of it.
    let mut partial: Cursor = "0:0.0,1:0.0".parse().unwrap();
    for e in &before[..40] {
        partial.advance(e);
    }
    drop(watcher);
    server.stop().await;
    drop(engine);
    node.shutdown();

    let node = Node::open(node_config).unwrap();
    let engine = node.engine().clone();
    let server = serve(engine.clone()).await;
    let mut watcher = Watcher::connect(server.addr, &config(), WatchFrom::Earliest).await.unwrap();
    let after = read_n(&mut watcher, total).await;
    assert_eq!(after, before, "the same events at the same positions after the restart");
    drop(watcher);

    let mut resumed = Watcher::connect(server.addr, &config(), WatchFrom::After(partial.clone())).await.unwrap();
    ok(&engine, &tips(500..510, users));
    let rest = read_n(&mut resumed, total - 40 + 10).await;
    let expected_positions: BTreeSet<(u16, Position)> = before
        .iter()
        .filter(|e| partial.get(e.shard.get()).is_none_or(|p| Position::of(e) > p))
        .map(|e| (e.shard.get(), Position::of(e)))
        .collect();
    let got: BTreeSet<(u16, Position)> = rest.iter().map(|e| (e.shard.get(), Position::of(e))).collect();
    assert!(expected_positions.is_subset(&got));
    assert_eq!(got.len(), rest.len(), "no duplicates");
    assert_eq!(rest.len(), expected_positions.len() + 10);
    let mut all = before[..40].to_vec();
    all.extend(rest);
    check_stream(&all);
    drop(resumed);
    server.stop().await;
    drop(engine);
    node.shutdown();
}

/// A restart from a snapshot: the snapshot kept the shard's newest events (up to
/// `FEED_EVENTS_IN_SNAPSHOT`), so a subscriber that was behind it resumes where it was, with no
/// gap and no duplicate, instead of `position_too_old`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_behind_the_snapshot_resumes_after_a_restart_from_it() {
    let dir = tempfile::tempdir().unwrap();
    let node_config = NodeConfig { snapshot_every_bytes: 0, ..node_config(dir.path()) };

    let node = Node::open(node_config.clone()).unwrap();
    let engine = node.engine().clone();
    let users = setup(&engine, 10);
    ok(&engine, &tips(1..101, users));
    let server = serve(engine.clone()).await;
    let mut watcher = Watcher::connect(server.addr, &config(), WatchFrom::Earliest).await.unwrap();
    let mut before = read_n(&mut watcher, users as usize + 100).await;
    let mut partial: Cursor = "0:0.0,1:0.0".parse().unwrap();
    for e in &before[..40] {
        partial.advance(e);
    }
    let snapshot =
        stormledger::layout::CommandRecord { kind: stormledger::ledger::command::kind::SNAPSHOT, ..Default::default() };
    let (tx, rx) = std::sync::mpsc::channel();
    engine.submit(vec![snapshot], Box::new(move |r| tx.send(r[0].status.get()).unwrap()));
    assert_eq!(rx.recv().unwrap(), 0, "snapshot taken");
    ok(&engine, &tips(101..121, users));
    before.extend(read_n(&mut watcher, 20).await);
    drop(watcher);
    server.stop().await;
    drop(engine);
    node.shutdown();
    for shard in ["shard-00", "shard-01"] {
        let snapshots = std::fs::read_dir(dir.path().join(shard).join("snapshots")).unwrap().count();
        assert_eq!(snapshots, 1, "{shard} restarts from its snapshot");
    }

    let node = Node::open(node_config).unwrap();
    let engine = node.engine().clone();
    let server = serve(engine.clone()).await;
    let by_position = |events: &[EventRecord]| -> BTreeMap<(u16, Position), EventRecord> {
        events.iter().map(|e| ((e.shard.get(), Position::of(e)), *e)).collect()
    };
    let mut earliest = Watcher::connect(server.addr, &config(), WatchFrom::Earliest).await.unwrap();
    let after = read_n(&mut earliest, before.len()).await;
    assert_eq!(by_position(&after), by_position(&before), "every event, before and after the snapshot");
    drop(earliest);

    let mut resumed = Watcher::connect(server.addr, &config(), WatchFrom::After(partial.clone())).await.unwrap();
    let expected: Vec<EventRecord> =
        before.iter().filter(|e| partial.get(e.shard.get()).is_none_or(|p| Position::of(e) > p)).copied().collect();
    let rest = read_n(&mut resumed, expected.len()).await;
    assert_eq!(rest.len(), expected.len(), "no duplicates");
    assert_eq!(by_position(&rest), by_position(&expected), "no gap");
    let mut all = before[..40].to_vec();
    all.extend(rest);
    check_stream(&all);
    drop(resumed);
    server.stop().await;
    drop(engine);
    node.shutdown();
}

type RawConnection = (
    stormledger::protocol::FrameReader<tokio::net::tcp::OwnedReadHalf>,
    stormledger::protocol::FrameWriter<tokio::net::tcp::OwnedWriteHalf>,
);

/// A one-shard engine with five tips, served, and a connection authenticated by a Hello of
/// request id `hello_id`; also the request id its AuthOk carried.
async fn one_shard_with_tips_and_a_raw_connection(hello_id: u64) -> (Arc<Engine>, Running, RawConnection, u64) {
    use stormledger::protocol::{Frame, FrameReader, FrameWriter, Hello, Payload, Role};
    let engine = engine(1, 1 << 10);
    let users = setup(&engine, 3);
    ok(&engine, &tips(1..6, users));
    let server = serve(engine.clone()).await;
    let (r, w) = tokio::net::TcpStream::connect(server.addr).await.unwrap().into_split();
    let (mut r, mut w) = (FrameReader::new(r), FrameWriter::new(w));
    let hello = Hello { role: Role::Client, token: TOKEN.as_bytes().to_vec() };
    w.write_frame(&Frame::new(hello_id, Payload::Hello(hello))).await.unwrap();
    let auth = r.read_frame().await.unwrap().unwrap();
    assert!(matches!(auth.payload, Payload::AuthOk(_)), "{auth:?}");
    (engine, server, (r, w), auth.request_id)
}

/// docs/protocol.md: a `shard = 0xFFFF` record sets the mode for every shard not listed, and
/// mode 1 is "after (lsn, index)": its position counts, where it used to be taken as 0.0 (a
/// subscriber got the events it asked to skip).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_all_shards_after_record_starts_after_its_own_position() {
    use stormledger::feed::{watch_mode, watch_record, ALL_SHARDS};
    use stormledger::protocol::{Frame, Payload};
    let (engine, server, (mut r, mut w), _) = one_shard_with_tips_and_a_raw_connection(0).await;
    let newest = engine.feed().shard(0).last();
    // Not 0.0 (what the record was taken for), and not past the newest event.
    let asked = Position::new(newest.lsn, 0);
    assert!(asked > Position::default());
    let request = watch_record(ALL_SHARDS, watch_mode::AFTER, asked);
    w.write_frame(&Frame::new(1, Payload::Watch(vec![request]))).await.unwrap();
    let Payload::Watch(resolved) = r.read_frame().await.unwrap().unwrap().payload else { panic!("no Watch answer") };
    assert_eq!(Cursor::from_records(&resolved).get(0), Some(asked));
    drop((r, w));
    server.stop().await;
}

/// docs/protocol.md: every frame of a watch stream carries the `Watch` frame's request id, the
/// `shutting_down` that ends it too (it used to carry 0, as a connection-level error does).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shutting_down_that_ends_a_watch_stream_carries_its_request_id() {
    use stormledger::feed::{watch_mode, watch_record, ALL_SHARDS};
    use stormledger::protocol::{ErrorCode, Frame, Payload};
    let (_engine, server, (mut r, mut w), auth_id) = one_shard_with_tips_and_a_raw_connection(3).await;
    assert_eq!(auth_id, 3, "AuthOk echoes the Hello's request id");
    let request = watch_record(ALL_SHARDS, watch_mode::EARLIEST, Position::default());
    w.write_frame(&Frame::new(42, Payload::Watch(vec![request]))).await.unwrap();
    // The stream has begun (a shutdown before the server read the Watch ends the connection,
    // not a stream: request id 0).
    let accepted = r.read_frame().await.unwrap().unwrap();
    assert!(matches!(accepted.payload, Payload::Watch(_)) && accepted.request_id == 42, "{accepted:?}");
    let stop = tokio::spawn(server.stop());
    let last = loop {
        let frame = r.read_frame().await.unwrap().expect("an error before the close");
        assert_eq!(frame.request_id, 42, "{frame:?}");
        if let Payload::Error(error) = frame.payload {
            break error;
        }
    };
    assert_eq!(last.code, ErrorCode::SHUTTING_DOWN);
    stop.await.unwrap();
}

/// A cursor that names more shards than a server can have is refused where it is parsed, and
/// one the caller built by hand is refused by the client before it connects: neither can ever
/// be sent, so neither is a retryable I/O error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cursor_of_more_shards_than_a_frame_holds_is_an_invalid_request() {
    assert!("64:1.0".parse::<Cursor>().is_err(), "shard 64 is past engine::SHARDS_MAX");
    assert!("63:1.0".parse::<Cursor>().is_ok());
    let engine = engine(1, 1 << 10);
    let server = serve(engine.clone()).await;
    let cursor = Cursor((0..70u16).map(|s| (s, Position::new(1, 0))).collect());
    match Watcher::connect(server.addr, &config(), WatchFrom::After(cursor)).await {
        Err(error @ ClientError::InvalidRequest(_)) => {
            assert!(!stormledger::client::retry::is_retryable(&error))
        }
        Err(other) => panic!("expected InvalidRequest, got {other}"),
        Ok(_) => panic!("a 70-shard cursor was subscribed"),
    }
    server.stop().await;
}

/// Under `--durability memory` a restart starts empty; positions used to restart at 1, so a
/// cursor of the previous run was taken for one of this run and its events up to it were
/// skipped unseen. Now the run's positions start after its start time: the old cursor is
/// refused `position_too_old`, and a subscriber from the earliest position sees every event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_memory_mode_restart_refuses_a_cursor_of_the_previous_run() {
    let dir = tempfile::tempdir().unwrap();
    let mut node_config = NodeConfig::new(dir.path());
    node_config.engine = EngineConfig { shards: 1, ..EngineConfig::default() };
    node_config.durability = Durability::InMemory;

    let node = Node::open(node_config.clone()).unwrap();
    let engine = node.engine().clone();
    let users = setup(&engine, 3);
    ok(&engine, &tips(1..11, users));
    let server = serve(engine.clone()).await;
    let mut watcher = Watcher::connect(server.addr, &config(), WatchFrom::Earliest).await.unwrap();
    read_n(&mut watcher, 3 + 10).await;
    let cursor = watcher.cursor().clone();
    drop(watcher);
    server.stop().await;
    drop(engine);
    node.shutdown();

    let node = Node::open(node_config).unwrap();
    let engine = node.engine().clone();
    let users = setup(&engine, 3);
    ok(&engine, &tips(1..21, users));
    let server = serve(engine.clone()).await;
    let resumed = Watcher::connect(server.addr, &config(), WatchFrom::After(cursor)).await;
    assert_eq!(server_error(resumed), ErrorCode::POSITION_TOO_OLD);
    let mut earliest = Watcher::connect(server.addr, &config(), WatchFrom::Earliest).await.unwrap();
    let events = read_n(&mut earliest, 3 + 20).await;
    assert_eq!(events.len(), 23);
    check_stream(&events);
    drop(earliest);
    server.stop().await;
    drop(engine);
    node.shutdown();
}
