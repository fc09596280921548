//! Power loss, process kill and torn writes under a running two-shard node, simulated. The
//! logs and snapshots live in an in-memory crash image (`storage::MemStorage`), so a crash
//! keeps exactly what a real one would: every write (process kill), only what was synced
//! (power loss), or that plus a prefix of the unsynced writes in issue order (a torn
//! write-back). `kill -9` of a real server (`tests/crash.rs`) never loses the page cache; this
//! does.
//!
//! Each cycle drives tips, settlements (a settlement sweeps a striped streamer on every shard:
//! cross-shard work), top-up begins and the channel's confirmations of acknowledged begins
//! (some sent twice) with up to 8 batches in flight (the node's runs take turns at how eagerly
//! a shard hands batches to its log thread, `EngineConfig::pipeline_min_batch`); in every fourth cycle a sync fails first
//! (`storage::FaultyStorage`), so a shard stops taking writes. It takes a crash image after a
//! seeded number of commands and restarts a node on it. Then: every command acknowledged before the image is
//! there with its original reply; every in-doubt one, sent again, gets one answer that stays
//! the same; at the end the balances equal a model built from the answers (a top-up credited
//! once however often it was confirmed) and every shard's money invariants hold.
//!
//! Cycles: 12 by default; STORMLEDGER_SIM_CYCLES=N for more, STORMLEDGER_SIM_SEED=S to
//! reproduce (the seed is printed).

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use stormledger::config::ShardLimits;
use stormledger::engine::EngineConfig;
use stormledger::layout::{text_field, ReplyRecord};
use stormledger::ledger::command::flags;
use stormledger::ledger::{AccountKind, Channel, Command, Status};
use stormledger::node::{Node, NodeConfig};
use stormledger::shard::worker::PIPELINE_MIN_BATCH;
use stormledger::storage::{Crash, FaultyStorage, MemStorage, SharedStorage};
use stormledger::workload::SplitMix64;

mod common;

const USERS: u64 = 16;
const STREAMERS: [u64; 2] = [1_000_001, 1_000_002];
const UNION: u64 = 2_000_000;
/// Ten 648-yuan top-ups per user.
const TOPUPS: u64 = 10;
const FUNDED: i64 = TOPUPS as i64 * 6_480;
/// Commands sent per cycle at most: every id stays in its shard's idempotency window.
const PER_CYCLE: u64 = 4_000;

/// `run`: which run of the node this is (0 before the first crash). The runs take turns at how
/// eagerly the shards hand batches to their log threads (`EngineConfig::pipeline_min_batch`):
/// every batch, the larger ones with work queued behind them, or the default's.
fn config(dir: &Path, storage: &FaultyStorage, cycles: u64, run: u64) -> NodeConfig {
    let mut c = NodeConfig::new(dir);
    let ids_max = (cycles * PER_CYCLE + 4096) as u32;
    c.engine = EngineConfig {
        shards: 2,
        limits: ShardLimits { accounts_max: 1024, history_max: 4096, ids_max },
        pipeline_min_batch: [0, 32, PIPELINE_MIN_BATCH][(run % 3) as usize],
        ..EngineConfig::default()
    };
    // Small segments and frequent snapshots: crashes land in rollovers, snapshot writes and
    // log retirement, and restarts load snapshots and replay the log after them.
    c.segment_size = 128 * 1024;
    c.snapshot_every_bytes = 96 * 1024;
    c.storage = SharedStorage(Arc::new(storage.clone()));
    c
}

/// Every command sent, by request number, with the reply it is known to have.
#[derive(Default)]
struct Book {
    commands: BTreeMap<u64, (Command, Option<ReplyRecord>)>,
    /// Top-ups whose begin was acknowledged `ok`: the payment channel may confirm them.
    begun: Vec<u64>,
    /// Requests answered `busy` or `unavailable` (in doubt until resolved).
    retryable: std::collections::BTreeSet<u64>,
    /// Of those, how many turned out applied after the restart.
    retryable_applied: usize,
    /// Replies that arrive after the crash image was taken are not evidence: ignored.
    closed: bool,
}

impl Book {
    fn answered(&mut self, key: u64, reply: ReplyRecord) {
        // `busy`/`unavailable` promise nothing: the command may have been applied (a
        // cross-shard one on its home shard; or its log write reached the disk although the sync
        // failed). It stays in doubt and is resolved by sending it again.
        if Status::from_code(reply.status.get()).is_some_and(Status::is_retryable) {
            self.retryable.insert(key);
            return;
        }
        let entry = self.commands.get_mut(&key).expect("sent");
        entry.1 = Some(reply);
        if let (Command::TopUpBegin { id, .. }, 0) = (entry.0, reply.status.get()) {
            self.begun.push(id);
        }
    }
}

fn same_reply(a: &ReplyRecord, b: &ReplyRecord) -> bool {
    (a.status.get(), a.value.get(), a.value2.get()) == (b.status.get(), b.value.get(), b.value2.get())
}

/// Sends random tips, settlements, top-up begins and the channel's confirmations of acknowledged
/// begins (some twice), up to 8 batches in flight, and takes a crash image of `storage` once
/// `crash_after` more commands have been sent (batches are still in flight).
fn drive(
    node: &Node,
    storage: &MemStorage,
    crash: Crash,
    book: &Arc<Mutex<Book>>,
    rng: &mut SplitMix64,
    next_id: &mut u64,
    crash_after: u64,
) -> MemStorage {
    let in_flight = Arc::new(AtomicUsize::new(0));
    let crash_at = *next_id + crash_after;
    let image = loop {
        if *next_id >= crash_at {
            // The image is taken with the book locked: every reply recorded so far was sent
            // after its sync, so before this instant; later ones prove nothing.
            let mut b = book.lock().unwrap();
            b.closed = true;
            break storage.crash(crash);
        }
        if in_flight.load(Ordering::Acquire) >= 8 {
            std::thread::yield_now();
            continue;
        }
        let mut b = book.lock().unwrap();
        let batch: Vec<(u64, Command)> = (0..1 + rng.below(64))
            .map(|_| {
                *next_id += 1;
                let id = *next_id;
                let streamer = STREAMERS[rng.below(2) as usize];
                let command = match rng.below(40) {
                    0 => Command::Settle { id, account: streamer },
                    1 | 2 => Command::TopUpBegin { id, user: 1 + rng.below(USERS), method: 1, fen: 600 },
                    3 | 4 if !b.begun.is_empty() => {
                        let topup = b.begun[rng.below(b.begun.len() as u64) as usize];
                        let channel_txn = text_field(&format!("C{topup}")).unwrap();
                        Command::TopUpConfirm { id: topup, fen: 600, channel_txn, paid_by: 0 }
                    }
                    _ => Command::Tip { id, from: 1 + rng.below(USERS), to: streamer, coins: 1 + rng.below(30) },
                };
                (id, command)
            })
            .collect();
        for (key, c) in &batch {
            b.commands.insert(*key, (*c, None));
        }
        drop(b);
        in_flight.fetch_add(1, Ordering::AcqRel);
        let (book, in_flight) = (book.clone(), in_flight.clone());
        let keys: Vec<u64> = batch.iter().map(|(key, _)| *key).collect();
        node.engine().submit(
            batch.iter().map(|(_, c)| c.to_record()).collect(),
            Box::new(move |replies| {
                let mut b = book.lock().unwrap();
                if !b.closed {
                    for (key, r) in keys.iter().zip(replies) {
                        b.answered(*key, r);
                    }
                }
                in_flight.fetch_sub(1, Ordering::AcqRel);
            }),
        );
    };
    while in_flight.load(Ordering::Acquire) > 0 {
        std::thread::yield_now();
    }
    image
}

/// After a restart: the commands sent from request `first` on. Acknowledged ones answer as
/// before (a repeated confirmation too); in-doubt ones get a final answer. Returns how many
/// in-doubt ones were answered as already applied.
fn resolve(node: &Node, book: &Mutex<Book>, first: u64) -> usize {
    let mut survived = 0;
    let mut b = book.lock().unwrap();
    let keys: Vec<u64> = b.commands.range(first..).map(|(key, _)| *key).collect();
    for chunk in keys.chunks(512) {
        let commands: Vec<Command> = chunk.iter().map(|id| b.commands[id].0).collect();
        let replies = node.engine().execute(&commands);
        for (id, r) in chunk.iter().zip(replies) {
            let (command, known) = b.commands[id];
            match known {
                Some(original) => {
                    assert!(
                        same_reply(&original, &r) && r.flags & 1 == 1,
                        "acknowledged {command:?} lost or changed: {original:?} then {r:?}"
                    );
                }
                None => {
                    assert!(Status::from_code(r.status.get()).is_some_and(|s| !s.is_retryable()), "{r:?}");
                    survived += (r.flags & 1) as usize;
                    if b.retryable.remove(id) && r.flags & 1 == 1 {
                        b.retryable_applied += 1;
                    }
                    b.answered(*id, r);
                }
            }
        }
    }
    b.closed = false;
    survived
}

fn expected(book: &Book) -> BTreeMap<u64, i64> {
    let mut balances: BTreeMap<u64, i64> = (1..=USERS).map(|u| (u, FUNDED)).collect();
    // A top-up is credited once (60 coins for 6 yuan), however many confirmations said ok.
    let users: BTreeMap<u64, u64> = book
        .commands
        .values()
        .filter_map(|(c, _)| match *c {
            Command::TopUpBegin { id, user, .. } => Some((id, user)),
            _ => None,
        })
        .collect();
    let mut credited = std::collections::BTreeSet::new();
    for (c, r) in book.commands.values() {
        if let (Command::TopUpConfirm { id, .. }, Some(r)) = (c, r) {
            if r.status.get() == Status::Ok.code() && credited.insert(*id) {
                *balances.entry(users[id]).or_default() += 60;
            }
        }
    }
    for (c, r) in book.commands.values() {
        common::apply_to_model(&mut balances, c, &r.expect("every command resolved"), UNION);
    }
    balances
}

#[test]
fn power_loss_and_torn_writes_lose_nothing_acknowledged() {
    let cycles: u64 = std::env::var("STORMLEDGER_SIM_CYCLES").ok().and_then(|v| v.parse().ok()).unwrap_or(12);
    let seed: u64 = std::env::var("STORMLEDGER_SIM_SEED").ok().and_then(|v| v.parse().ok()).unwrap_or(0x51_0f);
    eprintln!("power-loss simulation: {cycles} cycles, seed {seed} (STORMLEDGER_SIM_SEED to reproduce)");
    let dir = tempfile::tempdir().unwrap();
    let mut rng = SplitMix64(seed);
    let mut storage = MemStorage::new();
    let mut faults = FaultyStorage::new(Arc::new(storage.clone()));
    let mut node = Node::open(config(dir.path(), &faults, cycles, 0)).unwrap();

    let mut setup = vec![Command::CreateAccount { account: UNION, kind: AccountKind::Union, flags: 0, union: 0 }];
    for s in STREAMERS {
        setup.push(Command::CreateAccount { account: s, kind: AccountKind::Streamer, flags: 0, union: UNION });
    }
    for u in 1..=USERS {
        setup.push(Command::CreateAccount { account: u, kind: AccountKind::User, flags: flags::REAL_NAME, union: 0 });
        setup.push(Command::BindMethod { user: u, method: 1, channel: Channel::Alipay });
        for t in 0..TOPUPS {
            let id = 9_000_000_000 + u * 100 + t;
            setup.push(Command::TopUpBegin { id, user: u, method: 1, fen: 64_800 });
            let txn = text_field(&format!("S{id}")).unwrap();
            setup.push(Command::TopUpConfirm { id, fen: 64_800, channel_txn: txn, paid_by: 0 });
        }
    }
    for c in setup {
        assert_eq!(node.engine().execute(&[c])[0].status.get(), 0, "{c:?}");
    }

    let book = Arc::new(Mutex::new(Book::default()));
    let mut next_id = 0;
    let (mut in_doubt_total, mut survived_total, mut pipelined_total) = (0, 0, 0);
    for cycle in 0..cycles {
        let first = next_id + 1;
        let crash = match cycle % 3 {
            0 => Crash::PowerLoss,
            1 => Crash::TornWrite { keep_bytes: rng.below(64 * 1024) },
            _ => Crash::ProcessKill,
        };
        let crash_after = 64 + rng.below(PER_CYCLE - 128);
        // Every fourth cycle a sync fails first (a disk error): its shard stops taking writes.
        if cycle % 4 == 3 {
            faults.fail_nth_sync(1 + rng.below(64));
        }
        let image = drive(&node, &storage, crash, &book, &mut rng, &mut next_id, crash_after);
        in_doubt_total += book.lock().unwrap().commands.range(first..).filter(|(_, (_, r))| r.is_none()).count();
        pipelined_total += (0..2).map(|s| node.engine().stats().pipelined_batches(s)).sum::<u64>();
        node.shutdown();
        // Every fourth cycle from the second, the node is stopped cleanly before the power goes:
        // its clean-stop mark, with every log's end, must survive with the logs and let it start
        // (the commands answered after the mid-storm image are resolved like in-doubt ones).
        let clean_stop = cycle % 4 == 1;
        storage = if clean_stop { storage.crash(Crash::PowerLoss) } else { image };
        let marked = stormledger::node::CleanStop::read(&storage, dir.path()).is_some();
        assert_eq!(marked, clean_stop, "cycle {cycle}: the mark is there after a clean stop only");
        faults = FaultyStorage::new(Arc::new(storage.clone()));
        node = Node::open(config(dir.path(), &faults, cycles, cycle / 3 + 1))
            .unwrap_or_else(|e| panic!("cycle {cycle} ({crash:?}): {e}"));
        survived_total += resolve(&node, &book, first);
        node.engine().audit();
    }

    let b = book.lock().unwrap();
    assert!(b.commands.len() > 1_000, "the storm ran ({} commands)", b.commands.len());
    assert!(pipelined_total > 0, "batches went through the log threads");
    let confirms = b.commands.values().filter(|(c, _)| matches!(c, Command::TopUpConfirm { .. })).count();
    eprintln!(
        "{} commands ({confirms} payment confirmations for {} top-ups); {in_doubt_total} in doubt at a crash, \
         of which {survived_total} were answered as already applied ({} of them had been answered `unavailable`); \
         {pipelined_total} batches appended on a log thread",
        b.commands.len(),
        b.begun.len(),
        b.retryable_applied
    );
    for (account, coins) in expected(&b) {
        assert_eq!(node.engine().balance(account), Some(coins), "balance of {account}");
    }
    drop(b);
    node.shutdown();
}

/// Buffered durability syncs the log before a snapshot: the snapshot says the log is durable
/// up to its lsn, and a power loss right after it keeps both. Without that sync the restart
/// found a log ending before its snapshot (acknowledged records missing) and refused to start.
#[test]
fn a_buffered_snapshot_and_the_log_it_covers_survive_a_power_loss() {
    let dir = tempfile::tempdir().unwrap();
    let storage = MemStorage::new();
    let faults = FaultyStorage::new(Arc::new(storage.clone()));
    let mut config = config(dir.path(), &faults, 1, 0);
    config.durability = stormledger::node::Durability::Buffered;
    config.snapshot_every_bytes = 0;
    let node = Node::open(config.clone()).unwrap();
    let mut commands = vec![Command::CreateAccount { account: UNION, kind: AccountKind::Union, flags: 0, union: 0 }];
    commands.push(Command::CreateAccount {
        account: STREAMERS[0],
        kind: AccountKind::Streamer,
        flags: 0,
        union: UNION,
    });
    for u in 1..=USERS {
        commands.push(Command::CreateAccount {
            account: u,
            kind: AccountKind::User,
            flags: flags::REAL_NAME,
            union: 0,
        });
        commands.push(Command::BindMethod { user: u, method: 1, channel: Channel::Alipay });
        let id = 9_000_000_000 + u;
        commands.push(Command::TopUpBegin { id, user: u, method: 1, fen: 64_800 });
        let channel_txn = text_field(&format!("B{id}")).unwrap();
        commands.push(Command::TopUpConfirm { id, fen: 64_800, channel_txn, paid_by: 0 });
    }
    for c in commands {
        assert_eq!(node.engine().execute(&[c])[0].status.get(), 0, "{c:?}");
    }
    for k in 0..2_000u64 {
        let tip = Command::Tip { id: 1 + k, from: 1 + k % USERS, to: STREAMERS[0], coins: 1 };
        assert_eq!(node.engine().execute(&[tip])[0].status.get(), 0);
    }
    let snapshot =
        stormledger::layout::CommandRecord { kind: stormledger::ledger::command::kind::SNAPSHOT, ..Default::default() };
    let (tx, rx) = std::sync::mpsc::channel();
    node.engine().submit(vec![snapshot], Box::new(move |r| tx.send(r[0].status.get()).unwrap()));
    assert_eq!(rx.recv().unwrap(), 0, "snapshot taken");
    let before: Vec<Option<i64>> = (1..=USERS).chain([STREAMERS[0]]).map(|a| node.engine().balance(a)).collect();
    let image = storage.crash(Crash::PowerLoss);
    node.shutdown();
    config.storage = SharedStorage(Arc::new(image));
    let node = Node::open(config).unwrap_or_else(|e| panic!("after the power loss: {e}"));
    let after: Vec<Option<i64>> = (1..=USERS).chain([STREAMERS[0]]).map(|a| node.engine().balance(a)).collect();
    assert_eq!(after, before);
    node.shutdown();
}

/// A start that fails before its first append (here: the log writer's first sync, as a
/// read-only or failing disk would make it) keeps the clean-stop mark: the next start still
/// knows the stop was clean, and refuses a damaged last record instead of truncating it.
#[test]
fn a_start_that_fails_before_writing_keeps_the_clean_stop_mark() {
    let dir = tempfile::tempdir().unwrap();
    let storage = MemStorage::new();
    let faults = FaultyStorage::new(Arc::new(storage.clone()));
    let node = Node::open(config(dir.path(), &faults, 1, 0)).unwrap();
    let create = Command::CreateAccount { account: 1, kind: AccountKind::User, flags: flags::REAL_NAME, union: 0 };
    assert_eq!(node.engine().execute(&[create])[0].status.get(), 0);
    node.shutdown();
    assert!(stormledger::node::CleanStop::read(&storage, dir.path()).is_some());
    // Opening the logs fails (their first sync); nothing was appended.
    let faults = FaultyStorage::new(Arc::new(storage.clone()));
    faults.fail_nth_sync(1);
    assert!(Node::open(config(dir.path(), &faults, 1, 0)).is_err(), "the start fails");
    assert!(stormledger::node::CleanStop::read(&storage, dir.path()).is_some(), "the mark is kept");
    // And a start that succeeds removes it.
    let faults = FaultyStorage::new(Arc::new(storage.clone()));
    let node = Node::open(config(dir.path(), &faults, 1, 0)).unwrap();
    assert!(stormledger::node::CleanStop::read(&storage, dir.path()).is_none());
    assert_eq!(node.engine().balance(1), Some(0));
    node.shutdown();
}
