//! The sharded engine: cross-shard behaviour, reads, back-pressure, maintenance, concurrency.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Barrier};

use stormledger::config::{LedgerConfig, ShardLimits};
use stormledger::engine::{query_kind, Engine, EngineConfig};
use stormledger::layout::{text_field, CommandRecord, QueryRecord, ReplyRecord};
use stormledger::ledger::command::{flags, kind, Command, SYSTEM_PAYOUT};
use stormledger::ledger::{AccountKind, Channel, ShardState, Status};
use stormledger::shard::router::home_shard;
use stormledger::shard::worker::{Journal, JournalError, ManualClock, NullJournal};

const T0: u64 = 1_795_752_000_000_000_000;

fn config(shards: u16) -> EngineConfig {
    EngineConfig {
        shards,
        limits: ShardLimits { accounts_max: 1 << 16, history_max: 1 << 14, ids_max: 1 << 16 },
        ..EngineConfig::default()
    }
}

fn start(config: &EngineConfig, journals: Vec<Box<dyn Journal>>) -> Engine {
    let states = (0..config.shards)
        .map(|s| ShardState::new(s, config.shards, config.ledger.clone(), config.limits.clone()))
        .collect();
    Engine::start(config, states, journals, Arc::new(ManualClock::new(T0, 1_000)))
}

fn null_journals(n: u16) -> Vec<Box<dyn Journal>> {
    (0..n).map(|_| Box::new(NullJournal) as Box<dyn Journal>).collect()
}

fn status(engine: &Engine, cmd: Command) -> Status {
    Status::from_code(engine.execute(&[cmd])[0].status.get()).unwrap()
}

/// Users 1..=users funded with `coins` each through real top-ups; streamer 1_000_000 in union 2_000_000.
fn setup(engine: &Engine, users: u64, coins: u64) {
    let mut cmds = vec![Command::CreateAccount { account: 2_000_000, kind: AccountKind::Union, flags: 0, union: 0 }];
    assert!(engine.execute(&cmds).iter().all(|r| r.status.get() == 0));
    cmds = vec![Command::CreateAccount { account: 1_000_000, kind: AccountKind::Streamer, flags: 0, union: 2_000_000 }];
    for u in 1..=users {
        cmds.push(Command::CreateAccount { account: u, kind: AccountKind::User, flags: flags::REAL_NAME, union: 0 });
        cmds.push(Command::BindMethod { user: u, method: 1, channel: Channel::Wechat });
    }
    assert!(engine.execute(&cmds).iter().all(|r| r.status.get() == 0));
    let fen = coins * 10;
    let begins: Vec<Command> =
        (1..=users).map(|u| Command::TopUpBegin { id: 10_000_000 + u, user: u, method: 1, fen }).collect();
    assert!(engine.execute(&begins).iter().all(|r| r.status.get() == 0));
    let confirms: Vec<Command> = (1..=users)
        .map(|u| Command::TopUpConfirm {
            id: 10_000_000 + u,
            fen,
            channel_txn: text_field(&format!("W{u}")).unwrap(),
            paid_by: 0,
        })
        .collect();
    assert!(engine.execute(&confirms).iter().all(|r| r.status.get() == 0));
}

#[test]
fn striped_streamer_earns_on_every_shard_and_settles_atomically() {
    let engine = start(&config(3), null_journals(3));
    setup(&engine, 60, 100);
    let tips: Vec<Command> = (1..=60).map(|u| Command::Tip { id: u, from: u, to: 1_000_000, coins: 10 }).collect();
    let replies = engine.execute(&tips);
    assert!(replies.iter().all(|r| r.status.get() == 0));
    // 60 tips x 10 coins: 5 each to the streamer, 1 to the union.
    assert_eq!(engine.balance(1_000_000), Some(300));
    assert_eq!(engine.balance(2_000_000), Some(60));
    // Users are spread over the shards, so the streamer has a stripe on each.
    let shards: std::collections::BTreeSet<u16> = (1..=60).map(|u| home_shard(u, 3)).collect();
    assert_eq!(shards.len(), 3);

    let settle = engine.execute(&[Command::Settle { id: 77, account: 1_000_000 }])[0];
    assert_eq!(settle.status.get(), 0);
    assert_eq!(settle.value.get(), 300, "the reply sums every shard's part");
    assert_eq!(settle.value2.get(), 3, "and counts every shard");
    assert_eq!(engine.balance(1_000_000), Some(0));
    assert_eq!(engine.balance(SYSTEM_PAYOUT), Some(300));
    let retry = engine.execute(&[Command::Settle { id: 77, account: 1_000_000 }])[0];
    assert_eq!((retry.status.get(), retry.value.get(), retry.flags), (0, 300, 1), "retry: original total");

    let mut q = QueryRecord { kind: query_kind::LOOKUP, ..QueryRecord::default() };
    q.key.set(77);
    let answer = engine.query_blocking(q);
    assert_eq!(answer.reply.value.get(), 300);
    assert_eq!(answer.command.unwrap().kind, 9);
    for s in engine.audit() {
        assert_eq!(s.unit_sums, [0, 0]);
    }
}

#[test]
fn a_retried_settlement_gets_its_total_after_the_other_shards_forgot_their_parts() {
    // Windows of 16 ids a shard. The settlement's home shard logs its total once every part is
    // applied; the other shard then forgets its part under newer tips, and a retry (and a
    // lookup) still answer the original total, from the home shard's record alone.
    let mut cfg = config(2);
    cfg.limits.ids_max = 16;
    let engine = start(&cfg, null_journals(2));
    setup(&engine, 8, 1_000);
    let home = home_shard(1_000_000, 2);
    let on = |shard: u16| (1..=8u64).filter(move |&u| home_shard(u, 2) == shard);
    let tips: Vec<Command> =
        (1..=8u64).map(|u| Command::Tip { id: 500 + u, from: u, to: 1_000_000, coins: 10 }).collect();
    assert!(engine.execute(&tips).iter().all(|r| r.status.get() == 0));
    let earned = engine.balance(1_000_000).unwrap();
    let settle = Command::Settle { id: 77, account: 1_000_000 };
    let first = engine.execute(&[settle])[0];
    assert_eq!((first.status.get(), first.value.get(), first.value2.get()), (0, earned, 2));
    // A write on the home shard after the reply: the total, sent to it before, is applied.
    let home_user = on(home).next().unwrap();
    assert_eq!(status(&engine, Command::Tip { id: 600, from: home_user, to: 1_000_000, coins: 1 }), Status::Ok);
    let other_user = on(1 - home).next().unwrap();
    for id in 700..720 {
        assert_eq!(status(&engine, Command::Tip { id, from: other_user, to: 1_000_000, coins: 1 }), Status::Ok);
    }
    let retry = engine.execute(&[settle])[0];
    assert_eq!((retry.status.get(), retry.value.get(), retry.value2.get(), retry.flags), (0, earned, 2, 1));
    let mut q = QueryRecord { kind: query_kind::LOOKUP, ..QueryRecord::default() };
    q.key.set(77);
    let answer = engine.query_blocking(q);
    assert_eq!((answer.reply.value.get(), answer.reply.value2.get()), (earned, 2));
}

#[test]
fn retried_id_with_another_payer_is_refused_across_shards() {
    let engine = start(&config(4), null_journals(4));
    setup(&engine, 8, 100);
    let (a, b) = (1..=8)
        .flat_map(|a| (1..=8).map(move |b| (a, b)))
        .find(|(a, b)| home_shard(*a, 4) != home_shard(*b, 4))
        .unwrap();
    assert_eq!(status(&engine, Command::Tip { id: 5, from: a, to: 1_000_000, coins: 10 }), Status::Ok);
    assert_eq!(
        status(&engine, Command::Tip { id: 5, from: b, to: 1_000_000, coins: 10 }),
        Status::ExistsWithDifferentFields
    );
    assert_eq!(engine.balance(b), Some(100), "nothing moved for the refused retry");
    // A top-up callback finds its top-up by id alone.
    let mut q = QueryRecord { kind: query_kind::TOPUP_STATUS, ..QueryRecord::default() };
    q.key.set(10_000_000 + b);
    let answer = engine.query_blocking(q);
    assert_eq!((answer.reply.status.get(), answer.reply.value.get(), answer.reply.value2.get()), (0, 2, 1000));
    q.key.set(424242);
    assert_eq!(engine.query_blocking(q).reply.status.get(), Status::NotFound.code());
}

#[test]
fn history_of_a_striped_account_is_merged_newest_first_with_a_cursor() {
    let engine = start(&config(2), null_journals(2));
    setup(&engine, 10, 100);
    for u in 1..=10 {
        assert_eq!(status(&engine, Command::Tip { id: 100 + u, from: u, to: 1_000_000, coins: 2 }), Status::Ok);
    }
    let mut q = QueryRecord { kind: query_kind::HISTORY, ..QueryRecord::default() };
    q.key.set(1_000_000);
    q.limit.set(4);
    let mut seen = Vec::new();
    loop {
        let page = engine.query_blocking(q);
        assert_eq!(page.reply.status.get(), 0);
        seen.extend(page.history.iter().map(|h| h.id.get()));
        if page.next_before_ts == 0 {
            break;
        }
        q.before_ts.set(page.next_before_ts);
        q.before_shard.set(page.next_before_shard);
    }
    assert_eq!(seen, (101..=110).rev().collect::<Vec<_>>(), "newest first, no gap, no duplicate");
    // A cursor's shard past u16 is past every shard (as u16::MAX), not wrapped to an earlier
    // one: 65 536 used to be taken for shard 0 and skip shard 1's entries at that instant.
    let newest = {
        q.before_ts.set(0);
        engine.query_blocking(q).history[0]
    };
    q.before_ts.set(newest.timestamp.get());
    for past in [u64::from(u16::MAX), 1 << 16, u64::MAX] {
        q.before_shard.set(past);
        assert_eq!(engine.query_blocking(q).history[0].id, newest.id, "before_shard {past}");
    }
    q.before_shard.set(u64::from(newest.shard));
    assert_ne!(engine.query_blocking(q).history[0].id, newest.id, "the cursor's own entry is not before it");
    q.key.set(999_999);
    q.before_ts.set(0);
    assert_eq!(engine.query_blocking(q).reply.status.get(), Status::NotFound.code());
}

#[test]
fn maintenance_refuses_writes_and_keeps_reads() {
    let engine = start(&config(2), null_journals(2));
    setup(&engine, 2, 100);
    engine.set_maintenance(true);
    assert_eq!(status(&engine, Command::Tip { id: 1, from: 1, to: 1_000_000, coins: 1 }), Status::Maintenance);
    assert_eq!(engine.balance(1), Some(100));
    engine.set_maintenance(false);
    // Nothing was recorded under the id: the retry is applied now.
    assert_eq!(status(&engine, Command::Tip { id: 1, from: 1, to: 1_000_000, coins: 1 }), Status::Ok);
}

/// A journal that blocks its `n`th append until the test has passed the barrier twice: lets a
/// test fill a shard's queues.
struct GateNth(Arc<Barrier>, u32);

impl Journal for GateNth {
    fn append_batch(&mut self, _: u64, _: &[CommandRecord]) -> Result<u64, JournalError> {
        if self.1 > 0 {
            self.1 -= 1;
            if self.1 == 0 {
                self.0.wait();
                self.0.wait();
            }
        }
        Ok(0)
    }
}

#[test]
fn a_full_queue_answers_busy_and_changes_nothing() {
    let mut cfg = config(1);
    cfg.queue_depth_max = 2;
    let gate = Arc::new(Barrier::new(2));
    let engine = start(&cfg, vec![Box::new(GateNth(gate.clone(), 1))]);
    // The first batch blocks in the journal ...
    let first = Arc::new(AtomicU64::new(u64::MAX));
    let f = first.clone();
    let cmd = Command::CreateAccount { account: 1, kind: AccountKind::User, flags: flags::REAL_NAME, union: 0 };
    engine.submit(vec![cmd.to_record()], Box::new(move |r| f.store(r[0].status.get() as u64, Ordering::SeqCst)));
    gate.wait();
    // ... so two more parts fill the queue, and the next is refused.
    for account in [2, 3] {
        let cmd = Command::CreateAccount { account, kind: AccountKind::User, flags: 0, union: 0 };
        engine.submit(vec![cmd.to_record()], Box::new(|_| {}));
    }
    let refused = engine.execute(&[Command::CreateAccount { account: 4, kind: AccountKind::User, flags: 0, union: 0 }]);
    assert_eq!(refused[0].status.get(), Status::Busy.code());
    assert_eq!(engine.stats().busy_refusals(0), 1);
    assert_eq!(engine.queue_depths(), [2], "two parts wait behind the blocked batch");
    gate.wait();
    // Wait until the queued parts are applied (reads are lock-free, so poll).
    while engine.balance(3).is_none() {
        std::thread::yield_now();
    }
    assert_eq!(
        status(&engine, Command::CreateAccount { account: 5, kind: AccountKind::User, flags: 0, union: 0 }),
        Status::Ok
    );
    assert_eq!(first.load(Ordering::SeqCst), 0);
    assert_eq!(engine.balance(4), None, "the refused command changed nothing");
    assert_eq!(engine.balance(3), Some(0));
}

/// A journal that fails on its second append.
struct FailingJournal(u32);

impl Journal for FailingJournal {
    fn append_batch(&mut self, _: u64, _: &[CommandRecord]) -> Result<u64, JournalError> {
        self.0 += 1;
        if self.0 >= 2 {
            return Err("injected: disk on fire".into());
        }
        Ok(0)
    }
}

#[test]
fn a_failed_journal_stops_writes_and_keeps_reads() {
    let engine = start(&config(1), vec![Box::new(FailingJournal(0))]);
    let user = Command::CreateAccount { account: 1, kind: AccountKind::User, flags: flags::REAL_NAME, union: 0 };
    assert_eq!(status(&engine, user), Status::Ok);
    let user2 = Command::CreateAccount { account: 2, kind: AccountKind::User, flags: 0, union: 0 };
    assert_eq!(status(&engine, user2), Status::Unavailable);
    assert_eq!(engine.balance(2), None, "not applied: it was never durable");
    assert_eq!(status(&engine, user2), Status::Unavailable, "poisoned until restart");
    assert_eq!(engine.balance(1), Some(0));
    assert_eq!(engine.stats().poisoned_shards(), 1);
    assert_eq!(engine.stats().commands(kind::CREATE_ACCOUNT, Status::Unavailable), 2);
}

#[test]
fn engine_metrics_count_commands_batches_and_reads() {
    let engine = Engine::in_memory(config(2)).unwrap();
    setup(&engine, 4, 100);
    let stats = engine.stats();
    assert_eq!(stats.commands(kind::CREATE_ACCOUNT, Status::Ok), 6);
    assert_eq!(stats.commands(kind::TOPUP_CONFIRM, Status::Ok), 4);
    let tips: Vec<Command> = (1..=4).map(|u| Command::Tip { id: u, from: u, to: 1_000_000, coins: 10 }).collect();
    assert!(engine.execute(&tips).iter().all(|r| r.status.get() == 0));
    let poor: Vec<Command> =
        (1..=3).map(|u| Command::Tip { id: 10 + u, from: u, to: 1_000_000, coins: 1_000 }).collect();
    assert!(engine.execute(&poor).iter().all(|r| r.status.get() == Status::InsufficientFunds.code()));
    engine.set_maintenance(true);
    assert_eq!(status(&engine, Command::Tip { id: 20, from: 1, to: 1_000_000, coins: 1 }), Status::Maintenance);
    engine.set_maintenance(false);

    assert_eq!(stats.commands(kind::TIP, Status::Ok), 4);
    assert_eq!(stats.commands(kind::TIP, Status::InsufficientFunds), 3);
    assert_eq!(stats.commands(kind::TIP, Status::Maintenance), 1);
    assert_eq!(stats.commands(kind::GIFT, Status::Ok), 0);
    // Workers answered everything but the maintenance refusal.
    let replies: u64 = (0..2).map(|s| stats.replies(s)).sum();
    assert_eq!(replies, 1 + 9 + 4 + 4 + 4 + 3);
    let batches = stats.batch_size().count();
    assert!(batches > 0);
    assert!(stats.batch_size().sum() >= replies, "batches also carry replica messages");
    assert_eq!(stats.journal_latency().count(), batches, "one append per batch");
    assert_eq!((stats.poisoned_shards(), stats.busy_refusals(0) + stats.busy_refusals(1)), (0, 0));
    assert_eq!(engine.queue_depths().len(), 2);

    // Balance reads: 1 in 64 per thread is timed.
    std::thread::scope(|s| {
        s.spawn(|| {
            for _ in 0..64 {
                assert_eq!(engine.balance(4), Some(90));
            }
        });
    });
    assert!(stats.balance_latency().count() >= 1);

    let mut page = String::new();
    stats.render(&mut page, &engine.queue_depths());
    assert!(page.contains("stormledger_engine_commands_total{kind=\"tip\",status=\"ok\"} 4\n"), "{page}");
    assert!(page.contains("stormledger_engine_commands_total{kind=\"tip\",status=\"insufficient_funds\"} 3\n"));
    assert!(!page.contains("kind=\"gift\""), "zero combinations are skipped");
}

#[test]
fn concurrent_tips_and_reads_are_exact() {
    let engine = Arc::new(start(&config(2), null_journals(2)));
    let users = 200u64;
    setup(&engine, users, 1_000);
    let threads: Vec<_> = (0..4u64)
        .map(|t| {
            let engine = engine.clone();
            std::thread::spawn(move || {
                let mut ok = 0u64;
                for round in 0..50u64 {
                    let batch: Vec<Command> = (1..=users)
                        .filter(|u| u % 4 == t)
                        .map(|u| Command::Tip { id: 100_000_000 + round * 1_000 + u, from: u, to: 1_000_000, coins: 3 })
                        .collect();
                    ok += engine.execute(&batch).iter().filter(|r| r.status.get() == 0).count() as u64;
                }
                ok
            })
        })
        .collect();
    let readers: Vec<_> = (0..2)
        .map(|_| {
            let engine = engine.clone();
            std::thread::spawn(move || {
                for i in 0..20_000u64 {
                    let b = engine.balance(1 + i % users).unwrap();
                    assert!((0..=1_000).contains(&b), "a committed balance is never out of range: {b}");
                }
            })
        })
        .collect();
    let ok: u64 = threads.into_iter().map(|t| t.join().unwrap()).sum();
    readers.into_iter().for_each(|r| r.join().unwrap());
    assert_eq!(ok, users * 50);
    for u in 1..=users {
        assert_eq!(engine.balance(u), Some(1_000 - 150));
    }
    // 10 000 tips of 3 coins: floor(1.5)=1 to the streamer, floor(0.3)=0 to the union.
    assert_eq!(engine.balance(1_000_000), Some(10_000));
    for s in engine.audit() {
        assert_eq!(s.unit_sums, [0, 0]);
    }
}

#[test]
fn concurrent_copies_of_one_id_are_applied_on_one_shard_at_most() {
    // Three clients send the same ids at once: a top-up begin by user A that its shard refuses
    // `busy` (its pending top-ups are at their bound) once it claimed the id, a tip by A routed
    // by that claim, and a tip by B on the other shard. Whatever the interleaving, each id ends
    // up applied on one shard at most, and a client never gets two `ok`s for one id. With logs
    // appended inline, and on log threads (a batch in the log while the next is drained).
    concurrent_copies(false);
    concurrent_copies(true);
}

fn concurrent_copies(pipelined: bool) {
    let mut cfg = config(2);
    cfg.limits.ids_max = 1 << 12;
    // Never held: `Held` only for journals appended on log threads (kept while they run).
    let mut held = Vec::new();
    let journals = if pipelined {
        cfg.pipeline_min_batch = 0;
        (0..2)
            .map(|_| {
                let (h, journal) = Held::with(true);
                held.push(h);
                journal
            })
            .collect()
    } else {
        null_journals(2)
    };
    let engine = Arc::new(start(&cfg, journals));
    setup(&engine, 8, 100_000);
    let on = |shard: u16| (1..=8u64).find(|&u| home_shard(u, 2) == shard).unwrap();
    let (a, b) = (on(0), on(1));
    let max = ShardState::new(0, 2, cfg.ledger.clone(), cfg.limits.clone()).topups_max();
    let begin = move |id: u64| Command::TopUpBegin { id, user: a, method: 1, fen: 600 };
    let pending: Vec<Command> = (0..max as u64).map(|i| begin(200_000 + i)).collect();
    assert!(engine.execute(&pending).iter().all(|r| r.status.get() == 0));
    let rounds = 2_000u64;
    let barrier = Arc::new(Barrier::new(3));
    let clients: Vec<_> = (0..3u64)
        .map(|c| {
            let (engine, barrier) = (engine.clone(), barrier.clone());
            std::thread::spawn(move || {
                let mut ok = Vec::new();
                for round in 0..rounds {
                    let id = 50_000_000 + round;
                    let command = match c {
                        0 => begin(id),
                        1 => Command::Tip { id, from: a, to: 1_000_000, coins: 1 },
                        _ => Command::Tip { id, from: b, to: 1_000_000, coins: 1 },
                    };
                    barrier.wait();
                    let reply = engine.execute(&[command])[0];
                    if reply.status.get() == 0 && reply.flags == 0 {
                        ok.push(id);
                    }
                }
                ok
            })
        })
        .collect();
    let mut firsts = std::collections::BTreeMap::<u64, u32>::new();
    for client in clients {
        for id in client.join().unwrap() {
            *firsts.entry(id).or_default() += 1;
        }
    }
    assert!(firsts.values().all(|&n| n == 1), "one first `ok` an id at most");
    let engine = Arc::into_inner(engine).expect("clients done");
    let threaded: u64 = (0..2).map(|s| engine.stats().pipelined_batches(s)).sum();
    assert_eq!(threaded > 0, pipelined, "batches appended on the log threads: {threaded}");
    for s in engine.audit() {
        assert_eq!(s.unit_sums, [0, 0]);
    }
    let states = engine.shutdown();
    for round in 0..rounds {
        let id = 50_000_000 + round;
        let holders = states.iter().filter(|s| s.knows_id(id)).count();
        assert!(holders <= 1, "id {id} applied on {holders} shards");
    }
}

#[test]
fn engine_config_is_validated() {
    let mut c = config(0);
    assert!(c.validate().is_err());
    c.shards = 2;
    c.ledger = LedgerConfig { streamer_share_bp: 9_500, union_share_bp: 1_000, ..LedgerConfig::default() };
    assert!(Engine::in_memory(c).is_err());
}

#[test]
fn a_retry_older_than_the_idempotency_window_is_refused_not_reapplied() {
    let mut cfg = config(1);
    cfg.limits.ids_max = 16;
    let engine = start(&cfg, null_journals(1));
    setup(&engine, 4, 1_000);
    // Fill the window: the top-up ids and the first tips are forgotten.
    for i in 0..40u64 {
        assert_eq!(status(&engine, Command::Tip { id: 500 + i, from: 1, to: 1_000_000, coins: 1 }), Status::Ok);
    }
    let tip =
        |id: u64, sent_at: u64| send(&engine, Command::Tip { id, from: 2, to: 1_000_000, coins: 5 }, sent_at).status();
    // Id 500 was forgotten: a retry that says it was first sent long ago is refused ...
    assert_eq!(tip(500, T0), Status::IdExpired);
    assert_eq!(engine.balance(2), Some(1_000), "nothing moved");
    // ... a remembered id is answered from the record whatever its send time, and so is the
    // id of a top-up the shard still holds after its record left the window ...
    assert_eq!(tip(539, T0), Status::ExistsWithDifferentFields);
    assert_eq!(tip(10_000_001, T0), Status::ExistsWithDifferentFields);
    // ... and a new command sent now (or without a send time) is applied.
    assert_eq!(tip(900, T0 + 3_600_000_000_000), Status::Ok);
    assert_eq!(tip(901, 0), Status::Ok);
    assert_eq!(engine.balance(2), Some(990));
}

/// A top-up begin refused `busy` (the pending top-ups at their bound) is not remembered, so
/// nothing would ever release its id's claim: the directory would fill with abandoned ids
/// until every new id were refused. And a copy of it routed by that claim, which then runs
/// after the claim was released, claims the id again: its callbacks still find the top-up.
#[test]
fn a_begin_refused_busy_leaves_no_claim_and_a_copy_after_it_claims_again() {
    let mut cfg = config(1);
    cfg.limits.ids_max = 16;
    let max = ShardState::new(0, 1, cfg.ledger.clone(), cfg.limits.clone()).topups_max();
    let engine = start(&cfg, null_journals(1));
    setup(&engine, 1, 60);
    let begin = |id: u64| Command::TopUpBegin { id, user: 1, method: 1, fen: 600 };
    let pending: Vec<Command> = (0..max as u64).map(|i| begin(100 + i)).collect();
    assert!(engine.execute(&pending).iter().all(|r| r.status.get() == 0));
    let ids = engine.directory_len();
    for id in 900_000..900_100 {
        assert_eq!(status(&engine, begin(id)), Status::Busy);
    }
    assert_eq!(engine.directory_len(), ids, "no claim outlives a busy begin");

    // One frame: the first begin claims the id and is refused, a failure frees a place, the
    // second begin (routed by the first one's claim, released meanwhile) is applied.
    let fail = Command::TopUpFail { id: 100, reason: stormledger::ledger::command::FailReason::Declined };
    let replies = engine.execute(&[begin(7), fail, begin(7)]);
    let statuses: Vec<Status> = replies.iter().map(|r| Status::from_code(r.status.get()).unwrap()).collect();
    assert_eq!(statuses, [Status::Busy, Status::Ok, Status::Ok]);
    assert_eq!(engine.directory_len(), ids + 1);
    let confirm = Command::TopUpConfirm { id: 7, fen: 600, channel_txn: text_field("W7").unwrap(), paid_by: 0 };
    assert_eq!(status(&engine, confirm), Status::Ok, "the callback finds its top-up");
    assert_eq!(engine.balance(1), Some(120));
}

#[test]
fn a_history_page_a_shard_cannot_serve_is_busy_not_silently_short() {
    let mut cfg = config(1);
    cfg.query_depth_max = 1;
    let gate = Arc::new(Barrier::new(2));
    let engine = start(&cfg, vec![Box::new(GateNth(gate.clone(), 2))]);
    let user = Command::CreateAccount { account: 1, kind: AccountKind::User, flags: flags::REAL_NAME, union: 0 };
    assert_eq!(status(&engine, user), Status::Ok);
    // The shard blocks in its second append; one history query fills its read queue ...
    let other = Command::CreateAccount { account: 2, kind: AccountKind::User, flags: 0, union: 0 };
    engine.submit(vec![other.to_record()], Box::new(|_| {}));
    gate.wait();
    let mut q = QueryRecord { kind: query_kind::HISTORY, ..QueryRecord::default() };
    q.key.set(1);
    let (tx, rx) = crossbeam_channel::bounded(2);
    let first = tx.clone();
    engine.query(q, Box::new(move |a| first.send(a.reply.status.get()).unwrap()));
    // ... so the next is answered `busy` at once, not an empty `ok` page.
    engine.query(q, Box::new(move |a| tx.send(a.reply.status.get()).unwrap()));
    assert_eq!(rx.recv().unwrap(), Status::Busy.code());
    gate.wait();
    assert_eq!(rx.recv().unwrap(), Status::Ok.code());
}

/// A journal that asks for a log thread of its own, as the write-ahead log does in sync mode.
/// It tells the test the number of every append it starts, holds the append numbered `hold_at`
/// until the test releases it, and fails the one numbered `fail_at`.
struct HeldJournal {
    pipelined: bool,
    appends: u32,
    hold_at: Arc<AtomicU32>,
    fail_at: Arc<AtomicU32>,
    started: crossbeam_channel::Sender<u32>,
    release: crossbeam_channel::Receiver<()>,
}

struct Held {
    hold_at: Arc<AtomicU32>,
    fail_at: Arc<AtomicU32>,
    started: crossbeam_channel::Receiver<u32>,
    release: crossbeam_channel::Sender<()>,
    /// Appends started so far (read from `started`).
    seen: u32,
}

impl Held {
    fn new() -> (Held, Box<dyn Journal>) {
        Held::with(true)
    }

    /// `pipelined: false`: appended inline on the shard thread, as a buffered log is.
    fn with(pipelined: bool) -> (Held, Box<dyn Journal>) {
        let (hold_at, fail_at) = (Arc::new(AtomicU32::new(0)), Arc::new(AtomicU32::new(0)));
        let (started_tx, started) = crossbeam_channel::unbounded();
        let (release, release_rx) = crossbeam_channel::unbounded();
        let journal = HeldJournal {
            pipelined,
            appends: 0,
            hold_at: hold_at.clone(),
            fail_at: fail_at.clone(),
            started: started_tx,
            release: release_rx,
        };
        (Held { hold_at, fail_at, started, release, seen: 0 }, Box::new(journal))
    }

    /// Notes the appends started so far; returns the number the next one will have.
    fn next(&mut self) -> u32 {
        while let Ok(n) = self.started.try_recv() {
            self.seen = n;
        }
        self.seen + 1
    }

    /// Waits until append `n` has started.
    fn wait_started(&mut self, n: u32) {
        while self.seen < n {
            self.seen = self.started.recv_timeout(std::time::Duration::from_secs(60)).expect("append started");
        }
    }
}

impl Journal for HeldJournal {
    fn append_batch(&mut self, _: u64, _: &[CommandRecord]) -> Result<u64, JournalError> {
        self.appends += 1;
        let n = self.appends;
        self.started.send(n).unwrap();
        if self.hold_at.load(Ordering::SeqCst) == n {
            self.release.recv().unwrap();
        }
        if self.fail_at.load(Ordering::SeqCst) == n {
            return Err("injected: the disk went away".into());
        }
        Ok(n as u64)
    }

    fn pipelined(&self) -> bool {
        self.pipelined
    }
}

/// Where the reply of one submitted command arrives.
struct Pending(crossbeam_channel::Receiver<ReplyRecord>);

impl Pending {
    fn reply(&self) -> ReplyRecord {
        self.0.recv().unwrap()
    }

    fn status(&self) -> Status {
        Status::from_code(self.reply().status.get()).unwrap()
    }

    fn answered(&self) -> bool {
        !self.0.is_empty()
    }
}

/// Submits one command, first sent at `sent_at` (0: not said).
fn send(engine: &Engine, cmd: Command, sent_at: u64) -> Pending {
    let mut record = cmd.to_record();
    record.timestamp.set(sent_at);
    let (tx, rx) = crossbeam_channel::bounded(1);
    engine.submit(vec![record], Box::new(move |r| tx.send(r[0]).unwrap()));
    Pending(rx)
}

/// Waits until `done` holds. The minute is a guard against hanging CI if it never does, not a
/// timing the test asserts.
fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let give_up = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !done() {
        assert!(std::time::Instant::now() < give_up, "never: {what}");
        std::thread::yield_now();
    }
}

/// Waits until the shard took every queued part, i.e. handed them to its log.
fn wait_drained(engine: &Engine) {
    wait_until("the shard takes its queued batches", || engine.queue_depths().iter().all(|&d| d == 0));
}

/// Three one-command batches G, A and B, with G held in the log while A and B are queued: the
/// shard hands A to the log, and then B while A is still held, so B's write overlaps A's.
/// Returns the append numbers of A and the reply receivers of G, A and B.
fn pipeline_three(engine: &Engine, held: &mut Held, a: Command, b: (Command, u64)) -> (u32, [Pending; 3]) {
    let g_at = held.next();
    held.hold_at.store(g_at, Ordering::SeqCst);
    let g = send(engine, Command::Tip { id: 7_000, from: 1, to: 1_000_000, coins: 1 }, 0);
    held.wait_started(g_at);
    let (ra, rb) = (send(engine, a, 0), send(engine, b.0, b.1));
    held.hold_at.store(g_at + 1, Ordering::SeqCst);
    held.release.send(()).unwrap();
    held.wait_started(g_at + 1);
    (g_at + 1, [g, ra, rb])
}

fn pipelined_engine(ids_max: u32) -> (Engine, Held) {
    let mut cfg = config(1);
    cfg.batch_commands_max = 1;
    // Every batch with work queued behind it goes through the log thread.
    cfg.pipeline_min_batch = 1;
    cfg.limits.ids_max = ids_max;
    let (held, journal) = Held::new();
    let engine = start(&cfg, vec![journal]);
    setup(&engine, 2, 1_000);
    (engine, held)
}

#[test]
fn a_pipelined_log_takes_the_next_batch_but_applies_nothing_before_its_own_sync() {
    let (engine, mut held) = pipelined_engine(1 << 10);
    let a = Command::Tip { id: 7_001, from: 1, to: 1_000_000, coins: 10 };
    let b = Command::Tip { id: 7_002, from: 2, to: 1_000_000, coins: 20 };
    let pipelined = engine.stats().pipelined_batches(0);
    let (a_at, [g, ra, rb]) = pipeline_three(&engine, &mut held, a, (b, 0));
    assert_eq!(g.status(), Status::Ok);
    // A is held in the log; the shard still takes B off its queue (to log it behind A) ...
    wait_drained(&engine);
    // ... but neither is applied or answered before its own append is done.
    assert!(!ra.answered() && !rb.answered());
    assert_eq!(engine.balance(1), Some(1_000 - 1));
    assert_eq!(engine.balance(2), Some(1_000));
    held.release.send(()).unwrap();
    assert_eq!(ra.status(), Status::Ok);
    assert_eq!(rb.status(), Status::Ok);
    held.wait_started(a_at + 1);
    assert_eq!(held.seen, a_at + 1, "one append each, in order");
    // A and B went through the log thread (G, with nothing queued behind it, inline).
    assert_eq!(engine.stats().pipelined_batches(0), pipelined + 2);
    assert_eq!(engine.balance(1), Some(1_000 - 11));
    assert_eq!(engine.balance(2), Some(1_000 - 20));
}

#[test]
fn a_failed_append_in_a_pipelined_log_fails_the_batch_behind_it_too() {
    let (engine, mut held) = pipelined_engine(1 << 10);
    let a = Command::Tip { id: 7_001, from: 1, to: 1_000_000, coins: 10 };
    let b = Command::Tip { id: 7_002, from: 2, to: 1_000_000, coins: 20 };
    let a_at = held.next() + 1;
    held.fail_at.store(a_at, Ordering::SeqCst);
    let (_, [g, ra, rb]) = pipeline_three(&engine, &mut held, a, (b, 0));
    assert_eq!(g.status(), Status::Ok);
    wait_drained(&engine);
    held.release.send(()).unwrap();
    // A's append failed. B's would succeed, but it was logged behind an unknown state.
    assert_eq!(ra.status(), Status::Unavailable);
    assert_eq!(rb.status(), Status::Unavailable);
    assert_eq!(engine.balance(1), Some(1_000 - 1));
    assert_eq!(engine.balance(2), Some(1_000));
    assert_eq!(
        send(&engine, Command::Tip { id: 7_003, from: 2, to: 1_000_000, coins: 1 }, 0).status(),
        Status::Unavailable
    );
    assert_eq!(engine.stats().poisoned_shards(), 1);
}

#[test]
fn a_pipelined_retry_of_an_id_the_batch_ahead_forgets_is_refused_not_reapplied() {
    // A window of 16 ids, full of tips 500..=515 after the set-up.
    let (engine, mut held) = pipelined_engine(16);
    for id in 500..516 {
        assert_eq!(status(&engine, Command::Tip { id, from: 2, to: 1_000_000, coins: 1 }), Status::Ok);
    }
    // G (tip 7 000) forgets 500, A forgets 501. B retries 501, first sent long ago: checked
    // before A is applied, 501 would still be known and B would tip a second time.
    let a = Command::Tip { id: 7_001, from: 1, to: 1_000_000, coins: 10 };
    let b = Command::Tip { id: 501, from: 2, to: 1_000_000, coins: 1 };
    let (_, [g, ra, rb]) = pipeline_three(&engine, &mut held, a, (b, T0));
    assert_eq!(g.status(), Status::Ok);
    held.release.send(()).unwrap();
    assert_eq!(ra.status(), Status::Ok);
    assert_eq!(rb.status(), Status::IdExpired);
    assert_eq!(engine.balance(2), Some(1_000 - 16), "501 tipped once");
    // Refused before the log, and counted in the metrics all the same.
    assert_eq!(engine.stats().commands(kind::TIP, Status::IdExpired), 1);
}

#[test]
fn a_copy_drained_while_its_claim_holder_is_in_the_log_takes_the_claim() {
    // A (a top-up begin) claims id 9 001 and is refused `busy` when applied (the pending
    // top-ups are at their bound); B, a tip under the same id, was routed by A's claim and is
    // drained while A is in the log. B takes A's claim: A's refusal leaves it, and B is applied
    // under it, with nothing released in between.
    let (engine, mut held) = pipelined_engine(1 << 10);
    let mut cfg = config(1);
    cfg.limits.ids_max = 1 << 10;
    let max = ShardState::new(0, 1, cfg.ledger.clone(), cfg.limits.clone()).topups_max();
    let begin = |id: u64| Command::TopUpBegin { id, user: 1, method: 1, fen: 600 };
    // In frames of 64: this engine's batches are one command, and its queue is bounded.
    let pending: Vec<Command> = (0..max as u64).map(|i| begin(100_000 + i)).collect();
    for frame in pending.chunks(64) {
        assert!(engine.execute(frame).iter().all(|r| r.status.get() == 0));
    }
    let ids = engine.directory_len();
    let tip = Command::Tip { id: 9_001, from: 2, to: 1_000_000, coins: 5 };
    let (_, [g, ra, rb]) = pipeline_three(&engine, &mut held, begin(9_001), (tip, 0));
    assert_eq!(g.status(), Status::Ok);
    wait_drained(&engine);
    held.release.send(()).unwrap();
    assert_eq!(ra.status(), Status::Busy);
    assert_eq!(rb.status(), Status::Ok);
    assert_eq!(engine.balance(2), Some(1_000 - 5));
    assert_eq!(engine.directory_len(), ids + 2, "tips 7 000 and 9 001");
    assert_eq!(send(&engine, tip, 0).reply().flags, 1, "a retry is the duplicate");
}

#[test]
fn a_copy_routed_by_a_held_top_up_id_the_batch_ahead_releases_is_refused_busy() {
    // A window of 16 ids and 4 096 kept top-ups at most. After the set-up's two top-ups and
    // 4 110 more (begun and confirmed), the kept ones are exactly at their bound, the oldest
    // being the set-up's 10 000 001 and 10 000 002, held outside the window. G's tip pushes a
    // begin out of the window, its top-up is kept and 10 000 001 dropped; A's tip drops
    // 10 000 002 the same way, and with it the shard's claim on the id. B, a tip under
    // 10 000 002, was routed here by that claim and is drained while A is in the log. Checked
    // before A is applied, the id would look held; B would then run under an id this shard no
    // longer owns (another shard may claim it meanwhile): it must be refused `busy` instead.
    let (engine, mut held) = pipelined_engine(16);
    let mut cfg = config(1);
    cfg.limits.ids_max = 16;
    let max = ShardState::new(0, 1, cfg.ledger.clone(), cfg.limits.clone()).topups_max() as u64;
    assert_eq!(max, 4_096);
    for first in (0..max + 14).step_by(32) {
        let ids = first..(first + 32).min(max + 14);
        let begins: Vec<Command> =
            ids.clone().map(|i| Command::TopUpBegin { id: 100_000 + i, user: 1, method: 1, fen: 600 }).collect();
        assert!(engine.execute(&begins).iter().all(|r| r.status.get() == 0));
        let confirms: Vec<Command> = ids
            .map(|i| Command::TopUpConfirm {
                id: 100_000 + i,
                fen: 600,
                channel_txn: text_field(&format!("T{i}")).unwrap(),
                paid_by: 0,
            })
            .collect();
        assert!(engine.execute(&confirms).iter().all(|r| r.status.get() == 0));
    }
    let tip = Command::Tip { id: 10_000_002, from: 2, to: 1_000_000, coins: 5 };
    assert_eq!(status(&engine, tip), Status::ExistsWithDifferentFields, "the id is held by its top-up");
    let a = Command::Tip { id: 7_001, from: 1, to: 1_000_000, coins: 10 };
    let (_, [g, ra, rb]) = pipeline_three(&engine, &mut held, a, (tip, 0));
    assert_eq!(g.status(), Status::Ok);
    wait_drained(&engine);
    held.release.send(()).unwrap();
    assert_eq!(ra.status(), Status::Ok);
    assert_eq!(rb.status(), Status::Busy);
    assert_eq!(engine.balance(2), Some(1_000), "B not applied");
    // The id is free: a retry claims it anew and is applied once.
    assert_eq!(status(&engine, tip), Status::Ok);
    assert_eq!(send(&engine, tip, 0).reply().flags, 1, "a second retry is the duplicate");
    assert_eq!(engine.balance(2), Some(1_000 - 5));
}

#[test]
fn shutdown_finishes_cross_shard_work_in_flight() {
    // A settlement is in its home shard's log when the shutdown starts; the other shard, with
    // nothing queued, would stop at once, before the settlement's part reaches it. The shutdown
    // waits for it: the settlement is swept on both shards and answered with its total.
    let home = home_shard(1_000_000, 2);
    let (mut held, journal) = Held::with(true);
    let journals: Vec<Box<dyn Journal>> =
        if home == 0 { vec![journal, Box::new(NullJournal)] } else { vec![Box::new(NullJournal), journal] };
    let engine = start(&config(2), journals);
    setup(&engine, 4, 100);
    let tips: Vec<Command> =
        (1..=4u64).map(|u| Command::Tip { id: 7_000 + u, from: u, to: 1_000_000, coins: 50 }).collect();
    assert!(engine.execute(&tips).iter().all(|r| r.status.get() == 0));
    let earned = engine.balance(1_000_000).unwrap();
    let at = held.next();
    held.hold_at.store(at, Ordering::SeqCst);
    let settle = send(&engine, Command::Settle { id: 9_000, account: 1_000_000 }, 0);
    held.wait_started(at);
    let release = held.release.clone();
    let releaser = std::thread::spawn(move || {
        // Give the other shard time to stop if the shutdown does not wait (not an assertion).
        std::thread::sleep(std::time::Duration::from_millis(50));
        release.send(()).unwrap();
    });
    let states = engine.shutdown();
    releaser.join().unwrap();
    let reply = settle.reply();
    assert_eq!((Status::from_code(reply.status.get()), reply.value.get()), (Some(Status::Ok), earned));
    assert!(states.iter().all(|s| s.account(1_000_000).map(|a| a.balance) == Some(0)), "swept on every shard");
}

#[test]
fn a_copy_that_took_the_claim_and_failed_in_the_log_leaves_the_applied_id_owned() {
    // A (tip 9 001) is in the log; B, a copy, takes its claim. A is applied; B's append fails.
    // B's failure must not release the id A was applied under: another shard could then take
    // it too.
    let (engine, mut held) = pipelined_engine(1 << 10);
    let tip = Command::Tip { id: 9_001, from: 2, to: 1_000_000, coins: 5 };
    let a_at = held.next() + 1;
    held.fail_at.store(a_at + 1, Ordering::SeqCst);
    let (_, [g, ra, rb]) = pipeline_three(&engine, &mut held, tip, (tip, 0));
    assert_eq!(g.status(), Status::Ok);
    wait_drained(&engine);
    let ids = engine.directory_len();
    held.release.send(()).unwrap();
    assert_eq!(ra.status(), Status::Ok);
    assert_eq!(rb.status(), Status::Unavailable);
    assert_eq!(engine.directory_len(), ids, "9 001 still owned by the shard that applied it");
}

#[test]
fn an_id_a_batch_forgets_after_a_copy_took_its_claim_is_released() {
    // One shard, a window of 16, one frame: a tip, a copy of it (which takes its claim), then
    // 20 more tips, which push the first out of the window. The id must leave the directory
    // with it: kept there, every later command under it would be refused `busy` for good.
    let mut cfg = config(1);
    cfg.limits.ids_max = 16;
    let engine = start(&cfg, null_journals(1));
    setup(&engine, 2, 1_000);
    let tip = |id: u64, from: u64| Command::Tip { id, from, to: 1_000_000, coins: 1 };
    let mut frame = vec![tip(9_001, 1).to_record(), tip(9_001, 1).to_record()];
    frame.extend((0..20).map(|i| tip(9_100 + i, 1).to_record()));
    let replies = submit_batch(&engine, frame);
    assert!(replies.iter().all(|r| r.status.get() == 0));
    assert_eq!(replies[1].flags, 1, "the copy is the duplicate");
    assert_eq!(engine.directory_len(), 16 + 2, "the window's ids and the set-up's two kept top-ups");
    assert_eq!(status(&engine, tip(9_001, 2)), Status::Ok, "a forgotten id is free again");
}

#[test]
fn a_retried_settlement_counts_the_sweep_another_shard_has_queued_but_not_applied() {
    // The streamer's home shard (A) sweeps its stripe and sends the other shard (B) the
    // replica; a retry of the settlement is answered by A plus a lookup on B. B is held in an
    // append while both reach it: its answer must wait for the replica it received first.
    for pipelined in [true, false] {
        settlement_retry_while_the_replica_is_queued(pipelined);
    }
}

fn settlement_retry_while_the_replica_is_queued(pipelined: bool) {
    let home = home_shard(1_000_000, 2);
    let (_held_a, journal_a) = Held::with(pipelined);
    let (mut held_b, journal_b) = Held::with(pipelined);
    let journals = if home == 0 { vec![journal_a, journal_b] } else { vec![journal_b, journal_a] };
    let engine = start(&EngineConfig { pipeline_min_batch: 0, ..config(2) }, journals);
    setup(&engine, 8, 100);
    let tips: Vec<Command> = (1..=8).map(|u| Command::Tip { id: u, from: u, to: 1_000_000, coins: 10 }).collect();
    assert!(engine.execute(&tips).iter().all(|r| r.status.get() == 0));
    let on_b = (1..=8).find(|&u| home_shard(u, 2) != home).expect("a user on each shard");
    let g_at = held_b.next();
    held_b.hold_at.store(g_at, Ordering::SeqCst);
    let g = send(&engine, Command::Tip { id: 100, from: on_b, to: 1_000_000, coins: 10 }, 0);
    held_b.wait_started(g_at);
    let settle = Command::Settle { id: 200, account: 1_000_000 };
    let first = send(&engine, settle, 0);
    // A applies the settlement, then its retry (a duplicate): both have reached B once A
    // counted them.
    wait_until("A applies the settlement", || engine.stats().commands(kind::SETTLE, Status::Ok) >= 1);
    let retry = send(&engine, settle, 0);
    wait_until("A applies the retry", || engine.stats().commands(kind::SETTLE, Status::Ok) >= 2);
    held_b.release.send(()).unwrap();
    assert_eq!(g.status(), Status::Ok);
    let (first, retry) = (first.reply(), retry.reply());
    // 9 tips of 10 coins, 5 of each to the streamer.
    assert_eq!((first.status.get(), first.value.get()), (0, 45));
    assert_eq!(
        (retry.status.get(), retry.value.get(), retry.flags),
        (0, 45, 1),
        "the retry's answer is the original's"
    );
    assert_eq!(engine.balance(1_000_000), Some(0));
}

#[test]
fn a_settlements_total_in_the_same_batch_does_not_count_as_forgetting_an_id() {
    // A shard drains a settlement's total (a replica message that remembers no id) with a
    // retry of the oldest id in its full window. The drain-time checks count only entries that
    // may forget an id: the retry is the duplicate, not refused `busy` (as the model test
    // caught when the total was counted).
    let home = home_shard(1_000_000, 2);
    let (mut held_h, journal_h) = Held::with(false);
    let (mut held_b, journal_b) = Held::with(false);
    let journals = if home == 0 { vec![journal_h, journal_b] } else { vec![journal_b, journal_h] };
    let mut cfg = config(2);
    cfg.limits.ids_max = 16;
    let engine = start(&cfg, journals);
    setup(&engine, 8, 100);
    let on_h = (1..=8).find(|&u| home_shard(u, 2) == home).unwrap();
    // B holds the settlement's part in its log while the home shard's window fills with tips
    // 600..=615 (600 the oldest).
    let b_at = held_b.next();
    held_b.hold_at.store(b_at, Ordering::SeqCst);
    let settle = send(&engine, Command::Settle { id: 200, account: 1_000_000 }, 0);
    held_b.wait_started(b_at);
    let tip = |id: u64| Command::Tip { id, from: on_h, to: 1_000_000, coins: 1 };
    for id in 600..616 {
        assert_eq!(status(&engine, tip(id)), Status::Ok);
    }
    // The home shard holds a command that remembers no id in its log; B applies its part, and
    // the total reaches the home shard's queue, then the retry.
    let h_at = held_h.next();
    held_h.hold_at.store(h_at, Ordering::SeqCst);
    let cap = send(&engine, Command::SetDailyCap { user: on_h, coins: 400 }, 0);
    held_h.wait_started(h_at);
    held_b.release.send(()).unwrap();
    assert_eq!(settle.status(), Status::Ok);
    let retry = send(&engine, tip(600), 0);
    held_h.release.send(()).unwrap();
    assert_eq!(cap.status(), Status::Ok);
    let retry = retry.reply();
    assert_eq!((Status::from_code(retry.status.get()), retry.flags), (Some(Status::Ok), 1), "the duplicate");
    held_h.wait_started(h_at + 1);
    assert_eq!(held_h.seen, h_at + 1, "the total and the retry in one batch");
}

#[test]
fn a_shard_full_of_wallets_still_takes_every_striped_account_created_elsewhere() {
    // Each shard holds a stripe of every streamer and union. A shard whose wallets filled it
    // used to take no more stripes: the replicated create of a streamer made on another shard
    // then stopped it, at once and again at every replay. Wallets now leave a sixteenth of
    // each shard to striped accounts, which their home shards share.
    let mut config = config(2);
    config.limits.accounts_max = 256;
    let engine = start(&config, null_journals(2));
    let user = |account| Command::CreateAccount { account, kind: AccountKind::User, flags: flags::REAL_NAME, union: 0 };
    let streamer = |account| Command::CreateAccount { account, kind: AccountKind::Streamer, flags: 0, union: 0 };
    // Shard 1 full of wallets: 256 - 9 system accounts - 16 kept.
    let mut wallets = 0;
    for id in (1..).filter(|&id| home_shard(id, 2) == 1) {
        match status(&engine, user(id)) {
            Status::Ok => wallets += 1,
            Status::CapacityExhausted => break,
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(wallets, 256 - 9 - 16);
    // Shard 0 makes streamers until its share of the kept slots is used up (8 of 16); each
    // takes a stripe on the full shard 1 too.
    let mut made = Vec::new();
    for id in (1_000_000..).filter(|&id| home_shard(id, 2) == 0) {
        match status(&engine, streamer(id)) {
            Status::Ok => made.push(id),
            Status::CapacityExhausted => break,
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(made.len(), 8);
    // Both shards are alive: a wallet on the full shard tips the last streamer.
    let payer = (1..).find(|&id| home_shard(id, 2) == 1).unwrap();
    assert_eq!(status(&engine, Command::BindMethod { user: payer, method: 1, channel: Channel::Alipay }), Status::Ok);
    let begin = Command::TopUpBegin { id: 77, user: payer, method: 1, fen: 600 };
    assert_eq!(status(&engine, begin), Status::Ok);
    let confirm = Command::TopUpConfirm { id: 77, fen: 600, channel_txn: text_field("T77").unwrap(), paid_by: 0 };
    assert_eq!(status(&engine, confirm), Status::Ok);
    let tip = Command::Tip { id: 78, from: payer, to: *made.last().unwrap(), coins: 10 };
    assert_eq!(status(&engine, tip), Status::Ok);
    for s in engine.audit() {
        assert!(!s.poisoned);
        assert_eq!(s.unit_sums, [0, 0]);
    }
}

/// Submits `records` as one frame (one batch on their shard) and waits for the replies.
fn submit_batch(engine: &Engine, records: Vec<CommandRecord>) -> Vec<ReplyRecord> {
    let (tx, rx) = crossbeam_channel::bounded(1);
    engine.submit(records, Box::new(move |r| tx.send(r.to_vec()).unwrap()));
    rx.recv().unwrap()
}

#[test]
fn an_id_forgotten_and_named_again_within_one_batch() {
    // A window of 16 ids a shard. A batch of a new tip and then a retry of the oldest id still
    // remembered: the new tip forgets it before the retry runs.
    let mut cfg = config(2);
    cfg.limits.ids_max = 16;
    let engine = start(&cfg, null_journals(2));
    setup(&engine, 8, 1_000);
    let on = |shard: u16| (1..=8u64).find(|&u| home_shard(u, 2) == shard).unwrap();
    let (payer, other) = (on(0), on(1));
    let tip = |id: u64, from: u64| Command::Tip { id, from, to: 1_000_000, coins: 1 };
    for id in 600..640 {
        assert_eq!(status(&engine, tip(id, payer)), Status::Ok);
    }
    let before = engine.balance(payer).unwrap();
    // Said to be first sent long ago: refused as a retry the window may have forgotten by the
    // time it runs, not applied a second time.
    let mut retry = tip(624, payer).to_record();
    retry.timestamp.set(T0);
    let replies = submit_batch(&engine, vec![tip(7_001, payer).to_record(), retry]);
    let statuses: Vec<_> = replies.iter().map(|r| Status::from_code(r.status.get()).unwrap()).collect();
    assert_eq!(statuses, [Status::Ok, Status::IdExpired]);
    assert_eq!(engine.balance(payer), Some(before - 1), "only the new tip moved money");
    // Without a send time: routed to the shard by the id's old claim, which the new tip's
    // eviction gives up before it runs, it is refused `busy` (another shard could claim the id
    // meanwhile). Its retry claims the id anew and is applied again (the documented risk of a
    // reused forgotten id), and its shard owns it: the same id from a payer on the other shard
    // is refused there, not applied a second time on another shard.
    let replies = submit_batch(&engine, vec![tip(7_002, payer).to_record(), tip(625, payer).to_record()]);
    let statuses: Vec<_> = replies.iter().map(|r| Status::from_code(r.status.get()).unwrap()).collect();
    assert_eq!(statuses, [Status::Ok, Status::Busy]);
    assert_eq!(engine.balance(payer), Some(before - 2));
    assert_eq!(status(&engine, tip(625, payer)), Status::Ok);
    assert_eq!(engine.balance(payer), Some(before - 3));
    assert_eq!(status(&engine, tip(625, other)), Status::ExistsWithDifferentFields);
}

/// The first account id homed on `shard` of two.
fn first_on(shard: u16) -> u64 {
    (1..).find(|&id| home_shard(id, 2) == shard).unwrap()
}

fn verified_user(account: u64) -> Command {
    Command::CreateAccount { account, kind: AccountKind::User, flags: flags::REAL_NAME, union: 0 }
}

/// Two shards whose shard 1 has failed its log (its second append), once the engine knows.
fn with_shard_1_failed() -> Engine {
    let engine = start(&config(2), vec![Box::new(NullJournal), Box::new(FailingJournal(0))]);
    assert_eq!(status(&engine, verified_user(first_on(1))), Status::Ok);
    let second = (first_on(1) + 1..).find(|&id| home_shard(id, 2) == 1).unwrap();
    assert_eq!(status(&engine, verified_user(second)), Status::Unavailable);
    wait_until("shard 1 reports its failed log", || engine.stats().poisoned_shards() == 1);
    engine
}

#[test]
fn a_copy_routed_by_a_claim_that_was_given_up_is_refused_busy_not_applied() {
    // One frame: a settlement claims id 77 on shard 0 and is refused at once (shard 1's log
    // has failed: cross-shard work is refused), which releases the claim; a top-up under the
    // same id was routed to shard 0 by that claim. Applied there, it would own an id another
    // shard could have claimed in between (in another frame, on another connection): it is
    // refused `busy` before the log and changes nothing, and its retry claims the id anew.
    let engine = with_shard_1_failed();
    let payer = first_on(0);
    assert_eq!(status(&engine, verified_user(payer)), Status::Ok);
    assert_eq!(status(&engine, Command::BindMethod { user: payer, method: 1, channel: Channel::Alipay }), Status::Ok);
    let ids = engine.directory_len();
    let settle = Command::Settle { id: 77, account: (1_000_000..).find(|&id| home_shard(id, 2) == 0).unwrap() };
    let begin = Command::TopUpBegin { id: 77, user: payer, method: 1, fen: 600 };
    let replies = submit_batch(&engine, vec![settle.to_record(), begin.to_record()]);
    let statuses: Vec<_> = replies.iter().map(|r| Status::from_code(r.status.get()).unwrap()).collect();
    assert_eq!(statuses, [Status::Unavailable, Status::Busy]);
    assert_eq!(engine.directory_len(), ids, "no claim left behind");
    let mut q = QueryRecord { kind: query_kind::TOPUP_STATUS, ..QueryRecord::default() };
    q.key.set(77);
    assert_eq!(engine.query_blocking(q).reply.status.get(), Status::NotFound.code(), "nothing applied");
    assert_eq!(status(&engine, begin), Status::Ok, "the retry claims the id anew");
    assert_eq!(engine.directory_len(), ids + 1);
}

#[test]
fn cross_shard_work_is_refused_while_a_shard_refuses_writes() {
    // Shard 1's log fails. Work every shard must apply (a striped account's creation, freeze or
    // settlement) would be applied on shard 0 only and wait in its bounded outbox for shard 1's
    // restart: it is refused instead, and nothing of it is applied. Shard 0's own work goes on.
    let engine = with_shard_1_failed();
    let streamer = (1_000_000..).find(|&id| home_shard(id, 2) == 0).unwrap();
    let create = Command::CreateAccount { account: streamer, kind: AccountKind::Streamer, flags: 0, union: 0 };
    assert_eq!(status(&engine, create), Status::Unavailable);
    assert_eq!(engine.balance(streamer), None, "not created anywhere");
    assert_eq!(status(&engine, verified_user(first_on(0))), Status::Ok, "a shard's own work goes on");
}

#[test]
fn account_0_has_no_balance() {
    // No account has id 0 (it marks an empty index entry); its balance is not found, not the
    // platform's revenue summed over the shards.
    let engine = Engine::in_memory(config(2)).unwrap();
    setup(&engine, 4, 100);
    assert_eq!(engine.balance(0), None);
}

/// Reads far down a long history do not hold up the writes. A history read walks the account's
/// entries from its newest, so its cost is its depth, not its `limit`: it now stops at
/// `HISTORY_DEPTH_MAX` entries (a cursor below them reads as the end of the history), and a
/// shard answers reads worth `READ_VISITS_PER_ROUND` records between two batches. Before, one
/// frame of such queries was answered all at once, the shard's writes waiting (seconds).
#[test]
fn history_reads_far_down_a_long_history_do_not_hold_up_the_writes() {
    use stormledger::ledger::state_machine::HISTORY_DEPTH_MAX;
    use stormledger::shard::worker::READ_VISITS_PER_ROUND;
    let mut cfg = config(1);
    cfg.limits.history_max = 2 * HISTORY_DEPTH_MAX as u32;
    let engine = Arc::new(start(&cfg, null_journals(1)));
    let user = Command::CreateAccount { account: 1, kind: AccountKind::User, flags: flags::REAL_NAME, union: 0 };
    let streamer = Command::CreateAccount { account: 100, kind: AccountKind::Streamer, flags: 0, union: 0 };
    assert!(engine.execute(&[user, streamer]).iter().all(|r| r.status.get() == 0));
    // Tips the user cannot pay: a history entry each.
    let entries = HISTORY_DEPTH_MAX as u64 + 5_000;
    let tip = |id| Command::Tip { id, from: 1, to: 100, coins: 1 };
    for first in (1..=entries).step_by(8_192) {
        let batch: Vec<Command> = (first..(first + 8_192).min(entries + 1)).map(tip).collect();
        let replies = engine.execute(&batch);
        assert!(replies.iter().all(|r| r.status.get() == Status::InsufficientFunds.code()));
    }
    let mut newest = QueryRecord { kind: query_kind::HISTORY, ..QueryRecord::default() };
    newest.key.set(1);
    let page = engine.query_blocking(newest);
    assert_eq!((page.history.len(), page.history[0].id.get()), (1_000, entries), "the newest page");
    assert_ne!(page.next_before_ts, 0);
    // Older than every entry: the walk gives up at the depth bound, an empty last page.
    let mut deep = newest;
    deep.before_ts.set(1);
    let page = engine.query_blocking(deep);
    assert_eq!(page.reply.status.get(), Status::Ok.code());
    assert_eq!((page.history.len(), page.next_before_ts), (0, 0));

    // Reads worth eight rounds queued; a write sent as the first is answered (on the shard's
    // thread, so it is queued while the others wait) is applied before the last is answered.
    let reads = 8 * READ_VISITS_PER_ROUND / HISTORY_DEPTH_MAX;
    let (tx, rx) = crossbeam_channel::unbounded();
    for k in 0..reads {
        let (tx, engine2) = (tx.clone(), engine.clone());
        engine.query(
            deep,
            Box::new(move |a| {
                assert_eq!(a.reply.status.get(), Status::Ok.code());
                if k == 0 {
                    let tx = tx.clone();
                    let write = vec![tip(entries + 1).to_record()];
                    engine2.submit(write, Box::new(move |_| tx.send("write").unwrap()));
                }
                tx.send("read").unwrap();
            }),
        );
    }
    let order: Vec<&str> = (0..=reads).map(|_| rx.recv().unwrap()).collect();
    let write_at = order.iter().position(|e| *e == "write").unwrap();
    assert!(write_at < reads, "the write waited for every read: {order:?}");
}

/// A top-up's callback finds a begin earlier in the same frame: callbacks are routed after the
/// frame's ids are claimed. It used to be looked up before, and answered `not_found`.
#[test]
fn a_callback_after_its_begin_in_one_frame_finds_the_top_up() {
    let engine = start(&config(2), null_journals(2));
    let setup = engine.execute(&[
        Command::CreateAccount { account: 1, kind: AccountKind::User, flags: flags::REAL_NAME, union: 0 },
        Command::BindMethod { user: 1, method: 1, channel: Channel::Alipay },
    ]);
    assert!(setup.iter().all(|r| r.status.get() == 0));
    let replies = engine.execute(&[
        Command::TopUpConfirm { id: 76, fen: 600, channel_txn: text_field("T76").unwrap(), paid_by: 0 },
        Command::TopUpBegin { id: 77, user: 1, method: 1, fen: 600 },
        Command::TopUpConfirm { id: 77, fen: 600, channel_txn: text_field("T77").unwrap(), paid_by: 0 },
        Command::TopUpBegin { id: 78, user: 1, method: 1, fen: 600 },
        Command::TopUpFail { id: 78, reason: stormledger::ledger::FailReason::Declined },
        // Before its begin in the frame: the shard has no such top-up yet.
        Command::TopUpFail { id: 79, reason: stormledger::ledger::FailReason::Declined },
        Command::TopUpBegin { id: 79, user: 1, method: 1, fen: 600 },
    ]);
    let got: Vec<Status> = replies.iter().map(|r| Status::from_code(r.status.get()).unwrap()).collect();
    use Status::{NotFound, Ok};
    assert_eq!(got, vec![NotFound, Ok, Ok, Ok, Ok, NotFound, Ok]);
    assert_eq!(engine.balance(1), Some(60));
}
