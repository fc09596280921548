//! Snapshot codec: a shard restored from its snapshot behaves exactly like the original. Random
//! command sequences (every kind) run on a shard; its state is encoded and decoded; then the same
//! further commands run on both with the same timestamps: every reply, balance, history page,
//! idempotency record and top-up must be identical. Seeded; the seed is printed on failure.
//! Seeds 0..200 by default; `STORMLEDGER_SNAPSHOT_SEEDS=N` runs 0..N.

use stormledger::config::{LedgerConfig, ShardLimits};
use stormledger::layout::text_field;
use stormledger::ledger::command::{flags, Origin};
use stormledger::ledger::{AccountKind, Channel, Command, FailReason, ShardState};
use stormledger::workload::SplitMix64;

/// Remembers begun top-ups so that confirmations mostly name one (with its amount).
struct Gen {
    rng: SplitMix64,
    begun: Vec<(u64, u64)>,
    /// For shard 0 of two: the last replica message from shard 1 (`None`: one shard, no replicas).
    replica_seq: Option<u64>,
}

impl Gen {
    fn new(seed: u64) -> Gen {
        Gen { rng: SplitMix64(seed), begun: Vec::new(), replica_seq: None }
    }

    fn next(&mut self) -> Command {
        if let Some(seq) = self.replica_seq.as_mut() {
            // What shard 1 sends about the striped accounts (creates, freezes, settlements), and
            // the totals of this shard's settlements.
            if self.rng.below(30) == 0 {
                // The total of one of this shard's settlements (changes its record).
                let (id, total) = (3_000 + self.rng.below(300), self.rng.below(1_000) as i64);
                // `at` 1: the settlement's own ingest time (set by `run`); 0: none's (no change).
                return Command::SettleTotal { id, total, shards: 2, at: (self.rng.below(4) > 0) as u64 };
            }
            if self.rng.below(6) == 0 {
                *seq += 1;
                let origin = Origin { shard: 1, seq: *seq };
                let account = [100, 101, 102, 103, 200][self.rng.below(5) as usize];
                return match self.rng.below(4) {
                    0 => Command::ReplicaCreate {
                        account,
                        kind: if account == 200 { AccountKind::Union } else { AccountKind::Streamer },
                        flags: 0,
                        union: 0,
                        origin,
                    },
                    1 | 2 => Command::ReplicaFreeze { account, frozen: self.rng.below(2) == 0, origin },
                    _ => Command::ReplicaSettle { id: 4_000 + self.rng.below(300), account, origin },
                };
            }
        }
        let command = random_command(&mut self.rng);
        match command {
            Command::TopUpBegin { id, fen, .. } => self.begun.push((id, fen)),
            Command::TopUpConfirm { channel_txn, .. } if !self.begun.is_empty() && self.rng.below(5) > 0 => {
                let (id, fen) = self.begun[self.rng.below(self.begun.len() as u64) as usize];
                return Command::TopUpConfirm { id, fen, channel_txn, paid_by: 0 };
            }
            _ => {}
        }
        command
    }
}

fn random_command(rng: &mut SplitMix64) -> Command {
    let user = 1 + rng.below(12);
    let streamer = 100 + rng.below(4);
    let id = 1_000 + rng.below(300);
    let fens = [600, 3_000, 9_800, 1_234, 2_000];
    match rng.below(19) {
        0 => Command::CreateAccount {
            account: user,
            kind: AccountKind::User,
            flags: [flags::REAL_NAME, flags::REAL_NAME, flags::REAL_NAME, 0, flags::MINOR | flags::REAL_NAME]
                [rng.below(5) as usize],
            union: 0,
        },
        1 => Command::CreateAccount {
            account: streamer,
            kind: AccountKind::Streamer,
            flags: 0,
            union: [0, 200][rng.below(2) as usize],
        },
        2 => Command::CreateAccount { account: 200, kind: AccountKind::Union, flags: 0, union: 0 },
        3 => Command::BindMethod { user, method: 1 + rng.below(2), channel: Channel::ALL[rng.below(4) as usize] },
        4 | 5 => Command::TopUpBegin { id, user, method: 1 + rng.below(2), fen: fens[rng.below(5) as usize] },
        6 | 7 => Command::TopUpConfirm {
            id,
            fen: fens[rng.below(5) as usize],
            channel_txn: text_field(["A", "B"][rng.below(2) as usize]).unwrap(),
            paid_by: 0,
        },
        8 => Command::TopUpFail { id, reason: FailReason::ALL[rng.below(4) as usize] },
        9 | 10 | 14 | 15 | 16 => Command::Tip { id: id + 1_000, from: user, to: streamer, coins: 1 + rng.below(30) },
        11 => {
            Command::Gift { id: id + 1_000, from: user, to: streamer, gift: 1 + rng.below(4), count: 1 + rng.below(3) }
        }
        12 => Command::Settle { id: id + 2_000, account: [streamer, 200][rng.below(2) as usize] },
        17 => Command::SetDailyCap { user, coins: [0, 40, 400][rng.below(3) as usize] },
        _ => Command::Freeze { account: [user, streamer][rng.below(2) as usize], frozen: rng.below(4) == 0 },
    }
}

fn shard() -> ShardState {
    shard_0_of(1)
}

/// Shard 0 of `shards`, with small rings so that eviction and wrap-around are part of what is
/// snapshotted.
fn shard_0_of(shards: u16) -> ShardState {
    let limits = ShardLimits { accounts_max: 128, history_max: 64, ids_max: 48 };
    let config = LedgerConfig { topup_ttl_seconds: 30, ..LedgerConfig::default() };
    ShardState::new(0, shards, config, limits)
}

fn restore(state: &ShardState) -> ShardState {
    let sections = stormledger::snapshot::state::encode(state);
    let find = |tag: u32| sections.iter().find(|(t, _)| *t == tag).map(|(_, b)| b.as_slice());
    let limits = ShardLimits { accounts_max: 128, history_max: 64, ids_max: 48 };
    let config = LedgerConfig { topup_ttl_seconds: 30, ..LedgerConfig::default() };
    stormledger::snapshot::state::decode(find, config, limits).expect("decode")
}

fn same(a: &ShardState, b: &ShardState, seed: u64) {
    assert_eq!(a.accounts(), b.accounts(), "seed {seed}: accounts");
    assert_eq!(a.account_counts(), b.account_counts(), "seed {seed}: account counts");
    for account in a.accounts() {
        assert_eq!(a.history(account.id, 1000, None), b.history(account.id, 1000, None), "seed {seed}: history");
        assert_eq!(a.index().balance(account.id), b.index().balance(account.id), "seed {seed}: published");
    }
    for id in 1_000..3_300 {
        assert_eq!(a.id_record(id), b.id_record(id), "seed {seed}: id record {id}");
        assert_eq!(a.topup(id), b.topup(id), "seed {seed}: top-up {id}");
    }
    assert_eq!(a.last_timestamp(), b.last_timestamp());
    assert_eq!(a.id_horizon(), b.id_horizon());
}

#[test]
fn a_restored_shard_behaves_exactly_like_the_original() {
    let (mut ok_spends, mut evictions) = (0u32, 0u64);
    let seeds: u64 = std::env::var("STORMLEDGER_SNAPSHOT_SEEDS").ok().and_then(|n| n.parse().ok()).unwrap_or(200);
    for seed in 0..seeds {
        let mut rng = Gen::new(seed);
        let mut original = shard();
        let mut ts = 1_795_752_000_000_000_000u64;
        for _ in 0..rng.rng.below(400) {
            ts += 1 + rng.rng.below(200_000_000);
            original.apply(ts, &rng.next());
            original.drain_evicted();
        }
        let mut restored = restore(&original);
        same(&original, &restored, seed);
        let encoded = stormledger::snapshot::state::encode(&original);
        assert_eq!(stormledger::snapshot::state::encode(&restored), encoded, "seed {seed}: re-encoding");
        for _ in 0..300 {
            ts += 1 + rng.rng.below(200_000_000);
            let command = rng.next();
            let a = original.apply(ts, &command);
            let b = restored.apply(ts, &command);
            assert_eq!(a, b, "seed {seed}: {command:?}");
            if matches!(command, Command::Tip { .. } | Command::Gift { .. }) && a.0.status.code() == 0 && !a.0.duplicate
            {
                ok_spends += 1;
            }
            evictions += original.drain_evicted().len() as u64;
            restored.drain_evicted();
        }
        same(&original, &restored, seed);
        original.check_invariants();
        restored.check_invariants();
        // Encoding is deterministic: the same state gives the same bytes.
        assert_eq!(stormledger::snapshot::state::encode(&original), stormledger::snapshot::state::encode(&restored));
    }
    // The generator reaches the interesting paths: money moves and ids leave the window.
    assert!(ok_spends > 300, "{ok_spends} tips and gifts applied");
    assert!(evictions > 1_000, "{evictions} ids evicted");
}

#[test]
fn bindings_behave_the_same_before_and_after_a_restore() {
    // Loaded bindings (sorted arrays) and bindings made after the load (a map) answer alike:
    // duplicates, conflicting channels, the per-user maximum counting both, unknown methods.
    let limits = ShardLimits { accounts_max: 128, history_max: 64, ids_max: 48 };
    let config = LedgerConfig { methods_per_user_max: 3, topup_ttl_seconds: 30, ..LedgerConfig::default() };
    let mut original = ShardState::new(0, 1, config.clone(), limits.clone());
    let mut ts = 1_795_752_000_000_000_000u64;
    let bind = |user, method, channel| Command::BindMethod { user, method, channel };
    for user in [1, 2] {
        let create =
            Command::CreateAccount { account: user, kind: AccountKind::User, flags: flags::REAL_NAME, union: 0 };
        for command in [create, bind(user, 10, Channel::Alipay), bind(user, 5, Channel::Wechat)] {
            ts += 1;
            assert_eq!(original.apply(ts, &command).0.status.name(), "ok");
        }
    }
    let sections = stormledger::snapshot::state::encode(&original);
    let find = |tag: u32| sections.iter().find(|(t, _)| *t == tag).map(|(_, b)| b.as_slice());
    let mut restored = stormledger::snapshot::state::decode(find, config, limits).unwrap();
    let begin = |id, user, method| Command::TopUpBegin { id, user, method, fen: 600 };
    let steps = [
        (bind(1, 10, Channel::Alipay), "ok", true),
        (bind(1, 5, Channel::Wechat), "ok", true),
        (bind(1, 10, Channel::Wechat), "exists_with_different_fields", false),
        (begin(1_000, 1, 7), "method_not_bound", false),
        (bind(1, 7, Channel::BankCard), "ok", false),
        (bind(1, 7, Channel::BankCard), "ok", true),
        (bind(1, 7, Channel::Alipay), "exists_with_different_fields", false),
        (bind(1, 8, Channel::BankCard), "too_many_methods", false),
        (bind(1, 1, Channel::BankCard), "too_many_methods", false),
        (bind(2, 1, Channel::AppleIap), "ok", false),
        (bind(2, 11, Channel::AppleIap), "too_many_methods", false),
        (begin(1_001, 1, 10), "ok", false),
        (begin(1_002, 1, 7), "ok", false),
        (begin(1_003, 2, 1), "ok", false),
        (begin(1_004, 2, 5), "ok", false),
        (begin(1_005, 2, 11), "method_not_bound", false),
        (begin(1_006, 3, 10), "account_not_found", false),
    ];
    for (command, status, duplicate) in steps {
        ts += 1;
        let a = original.apply(ts, &command);
        let b = restored.apply(ts, &command);
        assert_eq!(a, b, "{command:?}");
        assert_eq!((a.0.status.name(), a.0.duplicate), (status, duplicate), "{command:?}");
    }
    for id in 1_001..=1_004 {
        assert_eq!(original.topup(id), restored.topup(id));
    }
    assert_eq!(restored.topup(1_002).unwrap().channel, Channel::BankCard);
    assert_eq!(restored.topup(1_003).unwrap().channel, Channel::AppleIap);
    assert_eq!(restored.topup(1_004).unwrap().channel, Channel::Wechat);
    assert_eq!(stormledger::snapshot::state::encode(&original), stormledger::snapshot::state::encode(&restored));
}

/// A snapshot encoded while the shard goes on (`begin_encoding`, then `step`s between commands,
/// as the worker does) is the snapshot of the state where it began, byte for byte: the records
/// the rings evict meanwhile, before the encoder reaches them, are kept for it. The shard's own
/// answers do not change either. Each seed runs on one shard, and on shard 0 of two, which also
/// applies the other shard's replica messages (creates, freezes, settlements of striped
/// accounts) while pinned.
#[test]
fn a_snapshot_encoded_while_the_shard_goes_on_is_the_state_where_it_began() {
    use stormledger::snapshot::state::{begin_encoding, encode, Progress, SectionBuffers};
    let seeds: u64 = std::env::var("STORMLEDGER_SNAPSHOT_SEEDS").ok().and_then(|n| n.parse().ok()).unwrap_or(200);
    let mut pinned_evictions = 0u64;
    // Top-ups changed while pinned, before the encoder took them (the most at once, summed
    // over the snapshots).
    let mut topups_kept = 0usize;
    // Snapshots whose payment methods thawed as they were, and compacted.
    let mut thawed = [0u32; 2];
    // Replica messages (from shard 1 of two) applied while pinned.
    let mut pinned_replicas = 0u64;
    for (seed, shards) in (0..seeds).flat_map(|seed| [(seed, 1), (seed, 2)]) {
        let mut rng = Gen::new(seed);
        if shards == 2 {
            rng.replica_seq = Some(0);
        }
        let (mut state, mut twin) = (shard_0_of(shards), shard_0_of(shards));
        let mut ts = 1_795_752_000_000_000_000u64;
        let run = |state: &mut ShardState, twin: &mut ShardState, ts: &mut u64, rng: &mut Gen| {
            *ts += 1 + rng.rng.below(200_000_000);
            let mut command = rng.next();
            if let Command::SettleTotal { id, total, shards, at: 1 } = command {
                let at = state.id_record(id).map_or(0, |r| r.timestamp);
                command = Command::SettleTotal { id, total, shards, at };
            }
            assert_eq!(
                state.apply(*ts, &command),
                twin.apply(*ts, &command),
                "seed {seed}, {shards} shards: {command:?}"
            );
            state.drain_evicted();
            twin.drain_evicted();
        };
        for _ in 0..rng.rng.below(400) {
            run(&mut state, &mut twin, &mut ts, &mut rng);
        }
        // Two snapshots: the first compacts the payment methods into sorted arrays (all were
        // bound since genesis), the second usually does not (few were bound since).
        for round in 0..2 {
            let expected = encode(&state);
            // Budgets from one record a step (the rings evict most records before the encoder
            // gets to them) to more than a ring holds.
            let budget = [1, 2, 5, 64][(seed as usize + round) % 4];
            let mut encoding = begin_encoding(&mut state, SectionBuffers::default());
            let remembered_before = state.remembered();
            let replicas_before = rng.replica_seq.unwrap_or(0);
            let mut kept = 0;
            // Some commands before the first step, so that the first accounts (the system
            // ones, which every spend touches) change before the encoder takes them.
            for _ in 0..rng.rng.below(30) {
                run(&mut state, &mut twin, &mut ts, &mut rng);
            }
            loop {
                for _ in 0..rng.rng.below(4) {
                    run(&mut state, &mut twin, &mut ts, &mut rng);
                }
                kept = state.pinned_kept()[4].max(kept);
                match encoding.step(&mut state, budget) {
                    Progress::Done => break,
                    Progress::Waiting => std::thread::yield_now(),
                    Progress::Steps => {}
                }
            }
            pinned_evictions += state.remembered() - remembered_before;
            pinned_replicas += rng.replica_seq.unwrap_or(0) - replicas_before;
            topups_kept += kept;
            let (sections, replaced) = encoding.finish(&mut state);
            thawed[usize::from(replaced.is_some())] += 1;
            assert_eq!(sections, expected, "seed {seed}, {shards} shards, round {round}, budget {budget}");
            for _ in 0..rng.rng.below(100) {
                run(&mut state, &mut twin, &mut ts, &mut rng);
            }
        }
        // Pinning changed nothing the shard answers, and the shard snapshots again as usual.
        for _ in 0..50 {
            run(&mut state, &mut twin, &mut ts, &mut rng);
        }
        same(&state, &twin, seed);
        assert_eq!(encode(&state), encode(&twin), "seed {seed}, {shards} shards");
    }
    assert!(pinned_evictions > 1_000, "{pinned_evictions} commands remembered while pinned");
    assert!(topups_kept > 50, "{topups_kept} top-ups changed while pinned");
    assert!(pinned_replicas > 1_000, "{pinned_replicas} replica messages applied while pinned");
    assert!(thawed[0] > 10 && thawed[1] > 10, "snapshots not compacting / compacting the methods: {thawed:?}");
}

/// Top-ups that end before their deadline leave no growing queue of deadlines behind: a user
/// who begins and fails top-ups in a loop (no money moves) used to add a 16-byte entry each,
/// kept for the whole TTL and in every snapshot. The queue is compacted at `2 * topups_max`
/// entries, also while a snapshot's encoder has it pinned, which still gets the queue as it was.
#[test]
fn top_ups_ended_before_their_deadline_do_not_grow_the_deadline_queue() {
    use stormledger::snapshot::state::{begin_encoding, encode, Progress, SectionBuffers, SECTION_PENDING};
    let (mut state, mut twin) = (shard(), shard());
    let mut ts = 1_795_752_000_000_000_000u64;
    let mut run = |state: &mut ShardState, twin: &mut ShardState, command: Command| {
        ts += 1_000; // 1 us apart: nothing reaches its deadline (30 s)
        let reply = state.apply(ts, &command);
        assert_eq!(reply, twin.apply(ts, &command), "{command:?}");
        assert_eq!(reply.0.status.name(), "ok", "{command:?}");
        state.drain_evicted();
        twin.drain_evicted();
    };
    let create = Command::CreateAccount { account: 1, kind: AccountKind::User, flags: flags::REAL_NAME, union: 0 };
    run(&mut state, &mut twin, create);
    run(&mut state, &mut twin, Command::BindMethod { user: 1, method: 1, channel: Channel::Alipay });
    let queued = |state: &ShardState| {
        let sections = encode(state);
        sections.iter().find(|(t, _)| *t == SECTION_PENDING).unwrap().1.len() / 16
    };
    let bound = 2 * state.topups_max();
    let mut id = 10_000u64;
    let mut begin_and_fail = |state: &mut ShardState, twin: &mut ShardState, pending: bool| {
        id += 1;
        run(state, twin, Command::TopUpBegin { id, user: 1, method: 1, fen: 600 });
        if !pending {
            run(state, twin, Command::TopUpFail { id, reason: FailReason::Declined });
        }
    };
    // Some top-ups stay pending throughout: their deadlines must survive every compaction.
    for k in 0..bound + 100 {
        begin_and_fail(&mut state, &mut twin, k % 1000 == 0);
        assert!(queued(&state) <= bound, "{} deadlines queued after {k} begins", queued(&state));
    }
    let live = queued(&state);
    assert!(live < 200, "{live} deadlines: 100 begun since the compaction, and the pending ones");
    // A compaction while a snapshot is being encoded, one record a step.
    while queued(&state) < bound - 10 {
        begin_and_fail(&mut state, &mut twin, false);
    }
    let expected = encode(&state);
    let mut encoding = begin_encoding(&mut state, SectionBuffers::default());
    for _ in 0..40 {
        begin_and_fail(&mut state, &mut twin, false);
        assert!(matches!(encoding.step(&mut state, 1), Progress::Steps | Progress::Waiting));
    }
    loop {
        match encoding.step(&mut state, 1) {
            Progress::Done => break,
            Progress::Waiting => std::thread::yield_now(),
            Progress::Steps => {}
        }
    }
    let (sections, _) = encoding.finish(&mut state);
    assert_eq!(sections, expected, "the snapshot is of the state where it began");
    assert!(queued(&state) < 100, "compacted while pinned: {}", queued(&state));
    assert_eq!(encode(&state), encode(&twin), "pinned or not, the same state");
    state.check_invariants();
    // The pending ones still expire at their deadlines.
    ts += 31_000_000_000;
    let tick = Command::Tick;
    state.apply(ts, &tick);
    state.drain_evicted();
    assert_eq!(queued(&state), 0);
    assert!((10_001..=id).step_by(1000).all(|id| state.topup(id).is_none_or(|t| t.state.name() != "pending")));
}
