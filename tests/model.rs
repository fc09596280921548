//! Property test: random command sequences against a plain map-based reference ledger. The
//! engine (1 shard and 3 shards) must give the same status for every command and the same
//! balances; every shard must balance (debits = credits) at the end. Each runs twice: with an
//! idempotency window larger than any case, and with the smallest one allowed (16 ids a shard),
//! where the model forgets ids as the shards do.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;

use proptest::prelude::*;
use stormledger::config::{LedgerConfig, ShardLimits};
use stormledger::engine::{Engine, EngineConfig};
use stormledger::layout::text_field;
use stormledger::ledger::command::{flags, Command, FailReason, SYSTEM_PAYOUT, SYSTEM_PLATFORM};
use stormledger::ledger::{AccountKind, Channel, ShardState, Status};
use stormledger::shard::router::home_shard;
use stormledger::shard::worker::{Journal, ManualClock, NullJournal};

const T0: u64 = 1_795_752_000_000_000_000; // mid-day in Beijing

#[derive(Clone, Debug)]
struct MAccount {
    kind: AccountKind,
    flags: u8,
    balance: i64,
    union: u64,
    spent: u64,
    cap: u64,
    methods: u32,
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum MState {
    Pending,
    Succeeded,
    Failed(FailReason),
    /// A confirmation after the failure: the money goes back to the channel. The failure's
    /// reason stays, so that a repeated failure callback still gets its original answer.
    Refunded(FailReason),
}

#[derive(Clone, Debug)]
struct MTopUp {
    user: u64,
    method: u64,
    /// The shard that began it (where its id is held after its record leaves the window).
    shard: u16,
    fen: u64,
    coins: u64,
    state: MState,
    confirm: Option<([u8; 24], u64, Status)>,
}

/// One shard's idempotency window: the last `ids_max` remembered commands, oldest first.
/// A record is `None` for a settlement's replica, which the other shards remember under the
/// settlement's id (no command equals it).
#[derive(Default)]
struct Window {
    ring: VecDeque<(u64, u64, Option<Command>)>,
    /// id -> (sequence number, record, status) of its newest record.
    remembered: BTreeMap<u64, (u64, Option<Command>, Status)>,
    /// Ids of top-ups whose begin left the window: still taken.
    held: BTreeSet<u64>,
}

/// The reference: obvious code, one balance per account. The only sharded part is what the
/// shards remember: one window per shard, and which shard owns each id.
#[derive(Default)]
struct Model {
    config: LedgerConfig,
    shards: u16,
    ids_max: usize,
    accounts: BTreeMap<u64, MAccount>,
    methods: BTreeMap<(u64, u64), Channel>,
    windows: Vec<Window>,
    /// Which shard an id's commands go to: claimed by the first command under it (its
    /// payer's shard), freed when that shard forgets the id.
    owner: BTreeMap<u64, u16>,
    seq: u64,
    topups: BTreeMap<u64, MTopUp>,
    platform: i64,
    payout: i64,
}

/// The account whose shard runs a command with a transfer id, unless the id is owned.
fn payer(cmd: &Command) -> u64 {
    match *cmd {
        Command::TopUpBegin { user, .. } => user,
        Command::Tip { from, .. } | Command::Gift { from, .. } | Command::PayEvent { from, .. } => from,
        Command::Settle { account, .. } => account,
        _ => unreachable!("no transfer id: {cmd:?}"),
    }
}

impl Model {
    fn new(shards: u16, ids_max: usize, config: LedgerConfig) -> Model {
        let windows = (0..shards).map(|_| Window::default()).collect();
        Model { config, shards, ids_max, windows, ..Model::default() }
    }

    /// Remembers `record` under `id` on `shard`, forgetting the oldest record of a full window:
    /// its id is freed, unless it began a top-up, whose id stays held by the shard.
    fn remember(&mut self, shard: u16, id: u64, record: Option<Command>, status: Status) {
        let (seq, ids_max) = (self.seq, self.ids_max);
        self.seq += 1;
        let w = &mut self.windows[shard as usize];
        if w.ring.len() >= ids_max {
            let (old, old_seq, old_record) = w.ring.pop_front().unwrap();
            if w.remembered.get(&old).is_some_and(|r| r.0 == old_seq) {
                w.remembered.remove(&old);
            }
            let began = matches!(old_record, Some(Command::TopUpBegin { .. }))
                && self.topups.get(&old).is_some_and(|t| t.shard == shard);
            if began {
                w.held.insert(old);
            } else if self.owner.get(&old) == Some(&shard) {
                self.owner.remove(&old);
            }
        }
        w.ring.push_back((id, seq, record));
        w.remembered.insert(id, (seq, record, status));
    }

    fn user_ok(&self, id: u64) -> Result<(), Status> {
        let a = &self.accounts[&id];
        if a.kind != AccountKind::User {
            return Err(Status::WrongAccountKind);
        }
        if a.flags & flags::FROZEN != 0 {
            return Err(Status::AccountFrozen);
        }
        if a.flags & flags::MINOR != 0 {
            return Err(Status::UserIsMinor);
        }
        if a.flags & flags::REAL_NAME == 0 {
            return Err(Status::UserNotVerified);
        }
        Ok(())
    }

    fn apply(&mut self, cmd: &Command) -> Status {
        let Some(id) = cmd.transfer_id() else { return self.fresh(cmd, 0) };
        let shard = *self.owner.entry(id).or_insert(home_shard(payer(cmd), self.shards));
        let w = &self.windows[shard as usize];
        if w.held.contains(&id) {
            let t = &self.topups[&id];
            return match *cmd {
                Command::TopUpBegin { user, method, fen, .. } if (user, method, fen) == (t.user, t.method, t.fen) => {
                    Status::Ok
                }
                _ => Status::ExistsWithDifferentFields,
            };
        }
        if let Some((_, record, s)) = w.remembered.get(&id) {
            return if *record == Some(*cmd) { *s } else { Status::ExistsWithDifferentFields };
        }
        let s = self.fresh(cmd, shard);
        self.remember(shard, id, Some(*cmd), s);
        if matches!(cmd, Command::Settle { .. }) && s == Status::Ok {
            for other in (0..self.shards).filter(|&o| o != shard) {
                self.remember(other, id, None, Status::Ok);
            }
        }
        s
    }

    /// A command nothing remembers, on `shard` (its id's).
    fn fresh(&mut self, cmd: &Command, shard: u16) -> Status {
        use Status::*;
        match *cmd {
            Command::CreateAccount { account, kind, flags: f, union } => {
                if let Some(a) = self.accounts.get(&account) {
                    return if a.kind == kind && a.union == union && a.flags & 3 == f {
                        Ok
                    } else {
                        ExistsWithDifferentFields
                    };
                }
                if union != 0 {
                    if kind != AccountKind::Streamer {
                        return InvalidKind;
                    }
                    if self.accounts.get(&union).map(|u| u.kind) != Some(AccountKind::Union) {
                        return UnionNotFound;
                    }
                }
                let a = MAccount { kind, flags: f, balance: 0, union, spent: 0, cap: 0, methods: 0 };
                self.accounts.insert(account, a);
                Ok
            }
            Command::BindMethod { user, method, channel } => {
                let Some(a) = self.accounts.get(&user) else { return AccountNotFound };
                if a.kind != AccountKind::User {
                    return WrongAccountKind;
                }
                if let Some(&c) = self.methods.get(&(user, method)) {
                    return if c == channel { Ok } else { ExistsWithDifferentFields };
                }
                if a.flags & flags::FROZEN != 0 {
                    return AccountFrozen;
                }
                if a.methods >= self.config.methods_per_user_max {
                    return TooManyMethods;
                }
                self.methods.insert((user, method), channel);
                self.accounts.get_mut(&user).unwrap().methods += 1;
                Ok
            }
            Command::TopUpBegin { id, user, method, fen } => {
                if !self.accounts.contains_key(&user) {
                    return AccountNotFound;
                }
                if let Err(s) = self.user_ok(user) {
                    return s;
                }
                if !self.methods.contains_key(&(user, method)) {
                    return MethodNotBound;
                }
                let c = &self.config;
                if !c.topup_presets_fen.contains(&fen)
                    && !(c.topup_custom_min_fen..=c.topup_custom_max_fen).contains(&fen)
                {
                    return AmountNotAllowed;
                }
                if !(fen * c.coins_per_yuan).is_multiple_of(100) {
                    return AmountNotCoinMultiple;
                }
                let coins = fen * c.coins_per_yuan / 100;
                let t = MTopUp { user, method, shard, fen, coins, state: MState::Pending, confirm: None };
                self.topups.insert(id, t);
                Ok
            }
            Command::TopUpConfirm { id, fen, channel_txn, paid_by: _ } => {
                // Routed to the owner of the id: a top-up's id stays owned while it is kept.
                let Some(t) = self.topups.get(&id).cloned() else { return NotFound };
                match t.state {
                    MState::Succeeded | MState::Refunded(_) => {
                        let (txn, f, s) = t.confirm.unwrap();
                        if txn == channel_txn && f == fen {
                            s
                        } else {
                            ExistsWithDifferentFields
                        }
                    }
                    MState::Pending => {
                        if fen != t.fen {
                            return AmountMismatch;
                        }
                        self.accounts.get_mut(&t.user).unwrap().balance += t.coins as i64;
                        let t = self.topups.get_mut(&id).unwrap();
                        t.state = MState::Succeeded;
                        t.confirm = Some((channel_txn, fen, Ok));
                        Ok
                    }
                    MState::Failed(reason) => {
                        let t = self.topups.get_mut(&id).unwrap();
                        t.state = MState::Refunded(reason);
                        t.confirm = Some((channel_txn, fen, TopUpRefunded));
                        TopUpRefunded
                    }
                }
            }
            Command::TopUpFail { id, reason } => {
                let Some(t) = self.topups.get_mut(&id) else { return NotFound };
                match t.state {
                    MState::Pending => {
                        t.state = MState::Failed(reason);
                        Ok
                    }
                    MState::Failed(r) | MState::Refunded(r) if r == reason => Ok,
                    MState::Failed(_) => ExistsWithDifferentFields,
                    MState::Succeeded => TopUpAlreadySucceeded,
                    MState::Refunded(_) => TopUpNotPending,
                }
            }
            Command::Tip { from, to, coins, .. } | Command::PayEvent { from, to, coins, .. } => {
                self.spend(from, to, coins)
            }
            Command::Gift { from, to, gift, count, .. } => match self.config.gifts.iter().find(|g| g.0 == gift) {
                None => GiftNotFound,
                Some(&(_, price)) => self.spend(from, to, price * count),
            },
            Command::Settle { account, .. } => {
                let Some(a) = self.accounts.get_mut(&account) else { return AccountNotFound };
                if !matches!(a.kind, AccountKind::Streamer | AccountKind::Union) {
                    return WrongAccountKind;
                }
                if a.flags & flags::FROZEN != 0 {
                    return AccountFrozen;
                }
                self.payout += a.balance;
                a.balance = 0;
                Ok
            }
            Command::SetDailyCap { user, coins } => {
                let Some(a) = self.accounts.get_mut(&user) else { return AccountNotFound };
                if a.kind != AccountKind::User {
                    return WrongAccountKind;
                }
                if coins > self.config.daily_cap_coins {
                    return InvalidAmount;
                }
                a.cap = coins;
                Ok
            }
            Command::Freeze { account, frozen } => {
                let Some(a) = self.accounts.get_mut(&account) else { return AccountNotFound };
                if frozen {
                    a.flags |= flags::FROZEN
                } else {
                    a.flags &= !flags::FROZEN
                }
                Ok
            }
            _ => unreachable!(),
        }
    }

    fn spend(&mut self, from: u64, to: u64, coins: u64) -> Status {
        use Status::*;
        if !self.accounts.contains_key(&from) {
            return AccountNotFound;
        }
        if let Err(s) = self.user_ok(from) {
            return s;
        }
        let Some(s) = self.accounts.get(&to) else { return CounterpartyNotFound };
        if s.kind == AccountKind::User {
            return CounterpartyNotFound;
        }
        if s.kind != AccountKind::Streamer {
            return WrongAccountKind;
        }
        if s.flags & flags::FROZEN != 0 {
            return CounterpartyFrozen;
        }
        let union = s.union;
        if union != 0 && self.accounts[&union].flags & flags::FROZEN != 0 {
            return CounterpartyFrozen;
        }
        if coins > self.config.spend_max_coins {
            return ExceedsTipMax;
        }
        let payer = &self.accounts[&from];
        let cap = if payer.cap == 0 { self.config.daily_cap_coins } else { payer.cap };
        if payer.spent + coins > cap {
            return ExceedsDailyCap;
        }
        if (payer.balance as u64) < coins {
            return InsufficientFunds;
        }
        let s_share = coins * self.config.streamer_share_bp / 10_000;
        let u_share = if union != 0 { coins * self.config.union_share_bp / 10_000 } else { 0 };
        let p = self.accounts.get_mut(&from).unwrap();
        p.balance -= coins as i64;
        p.spent += coins;
        self.accounts.get_mut(&to).unwrap().balance += s_share as i64;
        if union != 0 {
            self.accounts.get_mut(&union).unwrap().balance += u_share as i64;
        }
        self.platform += (coins - s_share - u_share) as i64;
        Ok
    }
}

const USERS: [u64; 4] = [1, 2, 3, 4];
const STREAMERS: [u64; 3] = [101, 102, 103];

fn arb_command() -> impl Strategy<Value = Command> {
    let user = prop::sample::select(USERS.to_vec());
    let any_account = prop::sample::select(vec![1u64, 2, 3, 4, 5, 101, 102, 103, 201]);
    let streamer = prop::sample::select(vec![101u64, 102, 103, 201, 1]);
    let id = 1000u64..1030;
    let fen = prop::sample::select(vec![600u64, 3_000, 1_234, 50, 2_000]);
    let coins = prop::sample::select(vec![1u64, 7, 50, 99, 400, 5_000]);
    prop_oneof![
        3 => (user.clone(), prop::sample::select(vec![0u8, flags::REAL_NAME, flags::MINOR | flags::REAL_NAME]))
            .prop_map(|(account, flags)| Command::CreateAccount { account, kind: AccountKind::User, flags, union: 0 }),
        2 => (prop::sample::select(STREAMERS.to_vec()), prop::sample::select(vec![0u64, 201]))
            .prop_map(|(account, union)| Command::CreateAccount { account, kind: AccountKind::Streamer, flags: 0, union }),
        1 => Just(Command::CreateAccount { account: 201, kind: AccountKind::Union, flags: 0, union: 0 }),
        2 => (user.clone(), 1u64..3, prop::sample::select(vec![Channel::Alipay, Channel::Wechat]))
            .prop_map(|(user, method, channel)| Command::BindMethod { user, method, channel }),
        4 => (id.clone(), user.clone(), 1u64..3, fen.clone()).prop_map(|(id, user, method, fen)| Command::TopUpBegin { id, user, method, fen }),
        4 => (id.clone(), fen, prop::sample::select(vec!["A", "B"]))
            .prop_map(|(id, fen, t)| Command::TopUpConfirm { id, fen, channel_txn: text_field(t).unwrap(), paid_by: 0 }),
        1 => (id.clone(), prop::sample::select(vec![FailReason::Declined, FailReason::Timeout]))
            .prop_map(|(id, reason)| Command::TopUpFail { id, reason }),
        8 => (id.clone(), user.clone(), streamer.clone(), coins.clone()).prop_map(|(id, from, to, coins)| Command::Tip { id, from, to, coins }),
        2 => (id.clone(), user.clone(), streamer.clone(), 1u64..8, 1u64..4)
            .prop_map(|(id, from, to, gift, count)| Command::Gift { id, from, to, gift, count }),
        1 => (id.clone(), user.clone(), streamer, coins.clone()).prop_map(|(id, from, to, coins)| Command::PayEvent { id, from, to, event: 9, coins }),
        1 => (id, any_account.clone()).prop_map(|(id, account)| Command::Settle { id, account }),
        1 => (user, coins).prop_map(|(user, coins)| Command::SetDailyCap { user, coins }),
        1 => (any_account, any::<bool>()).prop_map(|(account, frozen)| Command::Freeze { account, frozen }),
    ]
}

/// A window larger than any case's command count (nothing is forgotten), and the smallest.
const WIDE: u32 = 4096;
const NARROW: u32 = 16;

fn engine(shards: u16, ids_max: u32) -> Engine {
    let config = EngineConfig {
        shards,
        ledger: LedgerConfig { spend_max_coins: 1_000, daily_cap_coins: 3_000, ..LedgerConfig::default() },
        limits: ShardLimits { accounts_max: 256, history_max: 1024, ids_max },
        ..EngineConfig::default()
    };
    let states =
        (0..shards).map(|s| ShardState::new(s, shards, config.ledger.clone(), config.limits.clone())).collect();
    let journals = (0..shards).map(|_| Box::new(NullJournal) as Box<dyn Journal>).collect();
    Engine::start(&config, states, journals, Arc::new(ManualClock::new(T0, 1_000)))
}

fn check(shards: u16, ids_max: u32, commands: &[Command]) {
    let engine = engine(shards, ids_max);
    let config = LedgerConfig { spend_max_coins: 1_000, daily_cap_coins: 3_000, ..LedgerConfig::default() };
    let mut model = Model::new(shards, ids_max as usize, config);
    for (i, cmd) in commands.iter().enumerate() {
        let expected = model.apply(cmd);
        let got = engine.execute(&[*cmd])[0];
        assert_eq!(
            Status::from_code(got.status.get()),
            Some(expected),
            "command {i}: {cmd:?} ({shards} shards, window {ids_max})"
        );
    }
    assert_eq!(engine.directory_len(), model.owner.len(), "ids in the directory ({shards} shards, window {ids_max})");
    for (id, a) in &model.accounts {
        assert_eq!(engine.balance(*id), Some(a.balance), "balance of {id} ({shards} shards)");
    }
    assert_eq!(engine.balance(SYSTEM_PLATFORM), Some(model.platform));
    assert_eq!(engine.balance(SYSTEM_PAYOUT), Some(model.payout));
    for summary in engine.audit() {
        assert_eq!(summary.unit_sums, [0, 0], "shard {} balances", summary.shard);
    }
    for state in engine.shutdown() {
        state.check_invariants();
    }
}

/// 128 cases in CI; `PROPTEST_CASES=N` runs more (a config with its own count ignores it).
fn cases() -> u32 {
    std::env::var("PROPTEST_CASES").ok().and_then(|n| n.parse().ok()).unwrap_or(128)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), ..ProptestConfig::default() })]

    #[test]
    fn one_shard_matches_the_model(commands in prop::collection::vec(arb_command(), 1..200)) {
        check(1, WIDE, &commands);
    }

    #[test]
    fn three_shards_match_the_model(commands in prop::collection::vec(arb_command(), 1..200)) {
        check(3, WIDE, &commands);
    }

    #[test]
    fn one_shard_with_the_smallest_window_matches_the_model(commands in prop::collection::vec(arb_command(), 1..200)) {
        check(1, NARROW, &commands);
    }

    #[test]
    fn three_shards_with_the_smallest_window_match_the_model(commands in prop::collection::vec(arb_command(), 1..200)) {
        check(3, NARROW, &commands);
    }
}
