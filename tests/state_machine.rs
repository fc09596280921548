//! Table-style tests of the state machine: one line per command and its expected status, read
//! top to bottom. Each table runs on a fresh single shard with timestamps 1 s apart.

use stormledger::config::{LedgerConfig, ShardLimits};
use stormledger::layout::text_field;
use stormledger::ledger::command::{flags, Command, FailReason, SYSTEM_PAYOUT, SYSTEM_PLATFORM, SYSTEM_SUSPENSE};
use stormledger::ledger::{AccountKind, Channel, Reply, ShardState, Status, TopUpState};

const SEC: u64 = 1_000_000_000;
/// 2026-11-27 04:00 UTC = 12:00 in Beijing: far from a business-day boundary.
const T0: u64 = 1_795_752_000 * SEC;

struct Ledger {
    state: ShardState,
    now: u64,
}

impl Ledger {
    fn new() -> Ledger {
        Ledger::with(LedgerConfig::default())
    }
    fn with(config: LedgerConfig) -> Ledger {
        Ledger::sized(config, ShardLimits { accounts_max: 1024, history_max: 64, ids_max: 64 })
    }
    fn sized(config: LedgerConfig, limits: ShardLimits) -> Ledger {
        Ledger { state: ShardState::new(0, 1, config, limits), now: T0 }
    }
    /// Applies `cmd` one second after the previous command.
    fn run(&mut self, cmd: Command) -> Reply {
        self.at(self.now + SEC, cmd)
    }
    /// Applies `cmd` at `timestamp` (after every command so far).
    fn at(&mut self, timestamp: u64, cmd: Command) -> Reply {
        self.now = timestamp;
        let (reply, _) = self.state.apply(timestamp, &cmd);
        self.state.check_invariants();
        reply
    }
    fn ok(&mut self, cmd: Command) -> Reply {
        let reply = self.run(cmd);
        assert_eq!(reply.status, Status::Ok, "{cmd:?} -> {reply:?}");
        reply
    }
    /// Credits `user` (with method 1 bound) `fen` worth of coins through a top-up.
    fn top_up(&mut self, id: u64, user: u64, fen: u64) -> Reply {
        self.ok(begin(id, user, fen));
        self.ok(confirm(id, fen, &format!("T{id}")))
    }
    /// Runs a table: each command must get its status (and value, where given).
    fn table(&mut self, rows: &[(Command, Status, Option<i64>)]) {
        for (i, (cmd, status, value)) in rows.iter().enumerate() {
            let reply = self.run(*cmd);
            assert_eq!(reply.status, *status, "row {i}: {cmd:?} -> {reply:?}");
            if let Some(v) = value {
                assert_eq!(reply.value, *v, "row {i}: value of {cmd:?} -> {reply:?}");
            }
        }
    }
    fn balance(&self, id: u64) -> i64 {
        self.state.account(id).map(|a| a.balance).unwrap_or(i64::MIN)
    }
    fn advance(&mut self, seconds: u64) {
        self.now += seconds * SEC;
    }
}

fn user(account: u64) -> Command {
    Command::CreateAccount { account, kind: AccountKind::User, flags: flags::REAL_NAME, union: 0 }
}
fn streamer(account: u64, union: u64) -> Command {
    Command::CreateAccount { account, kind: AccountKind::Streamer, flags: 0, union }
}
fn union(account: u64) -> Command {
    Command::CreateAccount { account, kind: AccountKind::Union, flags: 0, union: 0 }
}
fn bind(user: u64, method: u64) -> Command {
    Command::BindMethod { user, method, channel: Channel::Alipay }
}
fn begin(id: u64, user: u64, fen: u64) -> Command {
    Command::TopUpBegin { id, user, method: 1, fen }
}
fn confirm(id: u64, fen: u64, txn: &str) -> Command {
    Command::TopUpConfirm { id, fen, channel_txn: text_field(txn).unwrap(), paid_by: 0 }
}
fn tip(id: u64, from: u64, to: u64, coins: u64) -> Command {
    Command::Tip { id, from, to, coins }
}

use Status::*;

/// A user 10 with 1000 coins (100 yuan), streamer 20 without union, streamer 21 in union 30.
fn funded() -> Ledger {
    let mut l = Ledger::new();
    l.table(&[
        (user(10), Ok, None),
        (union(30), Ok, None),
        (streamer(20, 0), Ok, None),
        (streamer(21, 30), Ok, None),
        (bind(10, 1), Ok, None),
        (begin(1000, 10, 10_000), Ok, Some(1000)),
        (confirm(1000, 10_000, "T1000"), Ok, Some(1000)),
    ]);
    assert_eq!(l.balance(10), 1000);
    l
}

#[test]
fn accounts() {
    let mut l = Ledger::new();
    l.table(&[
        (user(1), Ok, None),
        (user(1), Ok, None), // the same create again: its original result
        (streamer(1, 0), ExistsWithDifferentFields, None),
        (
            Command::CreateAccount { account: 1, kind: AccountKind::User, flags: flags::MINOR, union: 0 },
            ExistsWithDifferentFields,
            None,
        ),
        (streamer(2, 99), UnionNotFound, None),
        (streamer(2, 1), UnionNotFound, None), // 1 is a user, not a union
        (union(3), Ok, None),
        (streamer(2, 3), Ok, None),
        (Command::CreateAccount { account: 4, kind: AccountKind::User, flags: 0, union: 3 }, InvalidKind, None),
    ]);
    assert!(l.run(user(1)).duplicate);
}

#[test]
fn payment_methods() {
    let mut l = Ledger::with(LedgerConfig { methods_per_user_max: 2, ..LedgerConfig::default() });
    l.table(&[
        (bind(1, 1), AccountNotFound, None),
        (user(1), Ok, None),
        (streamer(2, 0), Ok, None),
        (bind(2, 1), WrongAccountKind, None),
        (bind(1, 1), Ok, None),
        (bind(1, 1), Ok, None),
        (Command::BindMethod { user: 1, method: 1, channel: Channel::Wechat }, ExistsWithDifferentFields, None),
        (Command::BindMethod { user: 1, method: 2, channel: Channel::BankCard }, Ok, None),
        (bind(1, 3), TooManyMethods, None),
    ]);
}

#[test]
fn topup_begin_rules() {
    let mut l = Ledger::new();
    l.table(&[
        (begin(1, 10, 600), AccountNotFound, None),
        (user(10), Ok, None),
        (Command::CreateAccount { account: 11, kind: AccountKind::User, flags: 0, union: 0 }, Ok, None),
        (
            Command::CreateAccount {
                account: 12,
                kind: AccountKind::User,
                flags: flags::REAL_NAME | flags::MINOR,
                union: 0,
            },
            Ok,
            None,
        ),
        (bind(11, 1), Ok, None),
        (bind(12, 1), Ok, None),
        (begin(2, 10, 600), MethodNotBound, None),
        (bind(10, 1), Ok, None),
        (begin(3, 11, 600), UserNotVerified, None),
        (begin(4, 12, 600), UserIsMinor, None),
        (begin(5, 10, 600), Ok, Some(60)),          // preset 6 yuan = 60 coins
        (begin(6, 10, 64_800), Ok, Some(6480)),     // preset 648 yuan
        (begin(7, 10, 99), AmountNotAllowed, None), // below the custom minimum
        (begin(8, 10, 5_000_001), AmountNotAllowed, None),
        (begin(9, 10, 1_234), AmountNotCoinMultiple, None), // 12.34 yuan = 123.4 coins
        (begin(10, 10, 1_230), Ok, Some(123)),
        (begin(5, 10, 600), Ok, Some(60)), // retry: original result
        (begin(5, 10, 3_000), ExistsWithDifferentFields, None), // same id, other amount
        (begin(3, 11, 600), UserNotVerified, None), // a rejection is also the original result
    ]);
    assert_eq!(l.balance(10), 0, "nothing is credited before the channel confirms");
    assert_eq!(l.state.topup(5).unwrap().state, TopUpState::Pending);
}

#[test]
fn topup_callbacks_are_idempotent_and_out_of_order_safe() {
    let mut l = Ledger::new();
    l.table(&[
        (user(10), Ok, None),
        (bind(10, 1), Ok, None),
        (begin(1, 10, 3_000), Ok, Some(300)),
        (confirm(99, 3_000, "X"), NotFound, None),
        (confirm(1, 600, "T1"), AmountMismatch, None),
        (confirm(1, 3_000, "T1"), Ok, Some(300)),
        (confirm(1, 3_000, "T1"), Ok, Some(300)), // duplicate callback: never credits twice
        (confirm(1, 3_000, "T2"), ExistsWithDifferentFields, None),
        (Command::TopUpFail { id: 1, reason: FailReason::Timeout }, TopUpAlreadySucceeded, None),
        // A failure, then the channel's late "paid": recorded and refunded, not credited.
        (begin(2, 10, 600), Ok, None),
        (Command::TopUpFail { id: 2, reason: FailReason::Declined }, Ok, None),
        (Command::TopUpFail { id: 2, reason: FailReason::Declined }, Ok, None),
        (Command::TopUpFail { id: 2, reason: FailReason::NetworkError }, ExistsWithDifferentFields, None),
        (confirm(2, 600, "T3"), TopUpRefunded, Some(600)),
        (confirm(2, 600, "T3"), TopUpRefunded, Some(600)),
        (Command::TopUpFail { id: 2, reason: FailReason::Declined }, Ok, None), // a repeat: the original answer
        (Command::TopUpFail { id: 2, reason: FailReason::NetworkError }, TopUpNotPending, None),
    ]);
    assert_eq!(l.balance(10), 300);
    assert_eq!(l.state.topup(2).unwrap().state, TopUpState::Refunded);
    assert_eq!(l.balance(Channel::Alipay.clearing_account()), -3_000, "the channel owes what it confirmed");
}

#[test]
fn pending_topups_expire() {
    let mut l = Ledger::new();
    l.table(&[(user(10), Ok, None), (bind(10, 1), Ok, None), (begin(1, 10, 600), Ok, None)]);
    l.advance(15 * 60);
    l.table(&[
        (Command::Tick, Ok, None),
        (Command::TopUpFail { id: 1, reason: FailReason::Timeout }, TopUpNotPending, None),
        (confirm(1, 600, "LATE"), TopUpRefunded, Some(600)),
    ]);
    assert_eq!(l.balance(10), 0);
}

/// A confirmation that says the channel was paid before the deadline (`paid_by`: the engine
/// fills it with the callback's first-send time) credits a top-up that expired while the
/// callback could not get through (maintenance, an outage); paid at or after the deadline, or
/// not saying, it is refunded as before. Either way a repeat gets the first answer.
#[test]
fn a_confirmation_paid_before_the_deadline_credits_an_expired_top_up() {
    let paid = |id: u64, txn: &str, paid_by: u64| Command::TopUpConfirm {
        id,
        fen: 600,
        channel_txn: text_field(txn).unwrap(),
        paid_by,
    };
    let mut l = Ledger::new();
    l.table(&[(user(10), Ok, None), (bind(10, 1), Ok, None)]);
    let ttl = 15 * 60 * SEC;
    let begun = [1u64, 2, 3].map(|id| {
        l.ok(begin(id, 10, 600));
        l.now
    });
    // A payment time from before the begin (past 10 minutes of skew) is no payment time: the
    // unit slips (seconds, milliseconds for ns) are refused, pending or expired, and change
    // nothing; within the skew it is accepted.
    for slip in [1, begun[0] / 1_000_000_000, begun[0] / 1_000_000, begun[0] - 600 * SEC - 1] {
        assert_eq!(l.run(paid(1, "T1", slip)).status, InvalidPaidBy, "paid_by {slip}");
    }
    assert_eq!(l.state.topup(1).unwrap().state, TopUpState::Pending);
    // Long after every deadline (the server was paused or down).
    l.advance(3 * 3600);
    l.ok(Command::Tick);
    for id in 1..=3 {
        assert_eq!(l.state.topup(id).unwrap().state, TopUpState::Expired);
    }
    let clearing = l.balance(Channel::Alipay.clearing_account());
    assert_eq!(l.run(paid(1, "T1", begun[0] / 1_000_000)).status, InvalidPaidBy, "expired: still refused");
    assert_eq!(l.state.topup(1).unwrap().state, TopUpState::Expired);
    // Paid one nanosecond before its deadline: credited, as if confirmed in time.
    let on_time = paid(1, "T1", begun[0] + ttl - 1);
    assert_eq!(l.run(on_time).status, Ok);
    assert_eq!(l.balance(10), 60);
    assert_eq!(l.state.topup(1).unwrap().state, TopUpState::Succeeded);
    assert_eq!(l.balance(Channel::Alipay.clearing_account()), clearing - 600);
    // Its repeat, whatever it says about the time: the first answer, no second credit.
    let again = l.run(paid(1, "T1", 0));
    assert_eq!((again.status, again.duplicate, again.value), (Ok, true, 60));
    assert_eq!(l.balance(10), 60);
    // A different amount while expired: still the amount check of a pending top-up.
    let wrong = Command::TopUpConfirm { id: 2, fen: 3_000, channel_txn: text_field("T2").unwrap(), paid_by: begun[1] };
    assert_eq!(l.run(wrong).status, AmountMismatch);
    // Paid at its deadline: too late, refunded (the user is not credited).
    assert_eq!(l.run(paid(2, "T2", begun[1] + ttl)).status, TopUpRefunded);
    // Not saying when (0): refunded.
    assert_eq!(l.run(paid(3, "T3", 0)).status, TopUpRefunded);
    // Ended: a repeat is answered from the state, whatever its time says.
    assert_eq!(l.run(paid(3, "T3", 1)).status, TopUpRefunded);
    assert_eq!(l.balance(10), 60);
    assert_eq!(l.balance(SYSTEM_SUSPENSE), 0);
    // A top-up that failed stays failed: the channel said so, whatever the time.
    l.ok(begin(4, 10, 600));
    let begun4 = l.now;
    l.ok(Command::TopUpFail { id: 4, reason: FailReason::Declined });
    assert_eq!(l.run(paid(4, "T4", begun4)).status, TopUpRefunded);
    assert_eq!(l.balance(10), 60);
}

#[test]
fn tips_split_and_reject() {
    let mut l = funded();
    l.table(&[
        (tip(1, 10, 20, 100), Ok, Some(900)),
        (tip(2, 10, 21, 101), Ok, Some(799)),
        (tip(2, 10, 21, 101), Ok, Some(799)), // retry: the original result, nothing moves
        (tip(2, 10, 20, 101), ExistsWithDifferentFields, None),
        (tip(3, 10, 20, 800), InsufficientFunds, Some(799)),
        (tip(4, 10, 99, 1), CounterpartyNotFound, None),
        (tip(5, 99, 20, 1), AccountNotFound, None),
        (tip(6, 10, 30, 1), WrongAccountKind, None), // a union is not tippable
        (tip(7, 20, 21, 1), WrongAccountKind, None), // a streamer cannot spend earnings
        (tip(3, 10, 20, 800), InsufficientFunds, Some(799)), // a rejection is the original result too
        (tip(3, 10, 20, 1), ExistsWithDifferentFields, None),
    ]);
    // 100 coins to a streamer without union: 50 streamer, 50 platform.
    // 101 coins to a streamer in a union: floor(50.5)=50 streamer, floor(10.1)=10 union, 41 platform.
    assert_eq!(l.balance(20), 50);
    assert_eq!(l.balance(21), 50);
    assert_eq!(l.balance(30), 10);
    assert_eq!(l.balance(SYSTEM_PLATFORM), 91);
    assert_eq!(l.balance(10), 799);
}

#[test]
fn protection_limits() {
    let mut l = Ledger::with(LedgerConfig { spend_max_coins: 300, daily_cap_coins: 500, ..LedgerConfig::default() });
    l.table(&[
        (user(10), Ok, None),
        (streamer(20, 0), Ok, None),
        (bind(10, 1), Ok, None),
        (begin(1, 10, 19_800), Ok, None),
        (confirm(1, 19_800, "T"), Ok, Some(1980)),
        (tip(101, 10, 20, 301), ExceedsTipMax, None),
        (tip(102, 10, 20, 300), Ok, None),
        (tip(103, 10, 20, 201), ExceedsDailyCap, Some(200)),
        (Command::SetDailyCap { user: 10, coins: 501 }, InvalidAmount, None), // only lower than the platform's
        (Command::SetDailyCap { user: 10, coins: 350 }, Ok, None),
        (tip(104, 10, 20, 51), ExceedsDailyCap, Some(50)),
        (tip(105, 10, 20, 50), Ok, None),
        (Command::Freeze { account: 10, frozen: true }, Ok, None),
        (tip(106, 10, 20, 1), AccountFrozen, None),
        (Command::Freeze { account: 10, frozen: false }, Ok, None),
        (Command::Freeze { account: 20, frozen: true }, Ok, None),
        (tip(107, 10, 20, 1), CounterpartyFrozen, None),
        (Command::Settle { id: 108, account: 20 }, AccountFrozen, None),
        (Command::Freeze { account: 20, frozen: false }, Ok, None),
    ]);
    // The next business day, the cap starts again.
    l.advance(86_400);
    l.table(&[(tip(109, 10, 20, 300), Ok, None)]);
    // A frozen union takes no share of its streamers' tips either.
    l.table(&[
        (union(30), Ok, None),
        (streamer(21, 30), Ok, None),
        (Command::Freeze { account: 30, frozen: true }, Ok, None),
        (tip(110, 10, 21, 1), CounterpartyFrozen, None),
        (Command::Freeze { account: 30, frozen: false }, Ok, None),
        (tip(111, 10, 21, 1), Ok, None),
    ]);
}

#[test]
fn minors_and_unverified_users_cannot_spend() {
    let mut l = funded();
    l.table(&[
        (Command::CreateAccount { account: 11, kind: AccountKind::User, flags: 0, union: 0 }, Ok, None),
        (
            Command::CreateAccount {
                account: 12,
                kind: AccountKind::User,
                flags: flags::MINOR | flags::REAL_NAME,
                union: 0,
            },
            Ok,
            None,
        ),
        (tip(1, 11, 20, 1), UserNotVerified, None),
        (tip(2, 12, 20, 1), UserIsMinor, None),
    ]);
}

#[test]
fn gifts_and_events() {
    let mut l = funded();
    l.table(&[
        (Command::Gift { id: 1, from: 10, to: 20, gift: 2, count: 3 }, Ok, Some(970)), // 3 x 10 coins
        (Command::Gift { id: 2, from: 10, to: 20, gift: 999, count: 1 }, GiftNotFound, None),
        (Command::Gift { id: 3, from: 10, to: 20, gift: 6, count: 1 }, InsufficientFunds, Some(970)),
        (Command::PayEvent { id: 4, from: 10, to: 21, event: 7, coins: 70 }, Ok, Some(900)),
    ]);
}

#[test]
fn settlement_sweeps_earnings() {
    let mut l = funded();
    l.table(&[
        (tip(1, 10, 21, 200), Ok, None),
        (Command::Settle { id: 2, account: 21 }, Ok, Some(100)),
        (Command::Settle { id: 2, account: 21 }, Ok, Some(100)), // retry
        (Command::Settle { id: 3, account: 30 }, Ok, Some(20)),
        (Command::Settle { id: 4, account: 21 }, Ok, Some(0)),
        (Command::Settle { id: 5, account: 10 }, WrongAccountKind, None),
        (Command::Settle { id: 6, account: 77 }, AccountNotFound, None),
    ]);
    assert_eq!(l.balance(21), 0);
    assert_eq!(l.balance(SYSTEM_PAYOUT), 120);
}

#[test]
fn history_is_newest_first_and_bounded() {
    let mut l = funded();
    for i in 0..10 {
        assert_eq!(l.run(tip(100 + i, 10, 20, 1)).status, Ok);
    }
    let h = l.state.history(10, 3, None);
    assert_eq!(h.iter().map(|e| e.id).collect::<Vec<_>>(), vec![109, 108, 107]);
    assert_eq!(h[0].balance_after, 990);
    assert_eq!(h[0].amount, -1);
    let before = Some((h[2].timestamp, 0));
    let next = l.state.history(10, 3, before);
    assert_eq!(next.iter().map(|e| e.id).collect::<Vec<_>>(), vec![106, 105, 104]);
    // The ring holds 64 entries: old ones are gone, never wrong.
    for i in 0..100 {
        l.run(tip(200 + i, 10, 20, 1));
    }
    assert!(l.state.history(10, 1000, None).len() <= 64);
}

#[test]
fn a_history_read_walks_at_most_the_depth_bound() {
    use stormledger::ledger::state_machine::HISTORY_DEPTH_MAX;
    let limits = ShardLimits { accounts_max: 1024, history_max: 2 * HISTORY_DEPTH_MAX as u32, ids_max: 64 };
    let mut state = ShardState::new(0, 1, LedgerConfig::default(), limits);
    let user = Command::CreateAccount { account: 10, kind: AccountKind::User, flags: flags::REAL_NAME, union: 0 };
    let streamer = Command::CreateAccount { account: 20, kind: AccountKind::Streamer, flags: 0, union: 0 };
    let mut now = T0;
    for command in [user, streamer] {
        now += 1;
        assert_eq!(state.apply(now, &command).0.status, Ok);
    }
    // Tips the user cannot pay, a history entry each, one nanosecond apart.
    let first = now + 1;
    let entries = HISTORY_DEPTH_MAX as u64 + 100;
    for id in 1..=entries {
        now += 1;
        assert_eq!(state.apply(now, &tip(id, 10, 20, 1)).0.status, InsufficientFunds);
    }
    // Below the newest 64 entries: a full page.
    let (page, visited) = state.history_visiting(10, 10, Some((now - 63, 0)));
    assert_eq!((page.len(), visited, page[0].timestamp), (10, 74, now - 64));
    // A page that reaches the bound ends there, short; one below it is empty.
    let at_depth = |depth: u64| Some((first + entries - depth, 0));
    let (page, visited) = state.history_visiting(10, 1_000, at_depth(HISTORY_DEPTH_MAX as u64 - 30));
    assert_eq!((page.len(), visited), (30, HISTORY_DEPTH_MAX));
    let (page, visited) = state.history_visiting(10, 1_000, at_depth(HISTORY_DEPTH_MAX as u64 + 50));
    assert_eq!((page.len(), visited), (0, HISTORY_DEPTH_MAX));
}

#[test]
fn idempotency_window_is_bounded() {
    let mut l = funded();
    for i in 0..200 {
        l.run(tip(10_000 + i, 10, 20, 1));
    }
    assert!(l.state.id_record(10_000).is_none(), "evicted after 64 newer ids");
    assert!(l.state.id_record(10_199).is_some());
    let evicted = l.state.drain_evicted();
    assert!(evicted.contains(&10_000));
}

#[test]
fn the_horizon_bound_holds_for_every_window_fill_and_batch_length() {
    // The worker relies on it to check a batch while the one before is applied (worker.rs,
    // "Pipelining"): after n more commands the horizon is at most `id_horizon_within(n)`, and
    // exactly the current one while nothing can be forgotten.
    let mut l = funded();
    let mut id = 50_000;
    for step in 0..150usize {
        let n = step % 9;
        let (now, bound) = (l.state.id_horizon(), l.state.id_horizon_within(n));
        let fills = l.state.id_horizon() == 0 && l.state.id_horizon_within(n) == 0;
        for _ in 0..n {
            id += 1;
            l.run(tip(id, 10, 20, 1));
        }
        assert!(l.state.id_horizon() <= bound, "step {step}: {} > {bound}", l.state.id_horizon());
        assert!(now <= bound);
        if fills {
            assert_eq!(l.state.id_horizon(), 0, "step {step}: nothing could be forgotten");
        }
    }
    assert!(l.state.id_horizon() > 0, "the window filled and forgot");
}

#[test]
fn shape_checks_on_records() {
    use stormledger::ledger::command::RESERVED_ID_MIN;
    let bad = [
        (tip(0, 10, 20, 1), InvalidId),
        (tip(1, 10, 20, 0), InvalidAmount),
        (tip(1, RESERVED_ID_MIN, 20, 1), InvalidId),
        (begin(1, 10, 0), InvalidAmount),
        (Command::Gift { id: 1, from: 10, to: 20, gift: 1, count: 0 }, InvalidAmount),
    ];
    for (cmd, status) in bad {
        assert_eq!(Command::from_record(&cmd.to_record()), Err(status), "{cmd:?}");
    }
    let mut r = tip(1, 10, 20, 1).to_record();
    r.kind = 77;
    assert_eq!(Command::from_record(&r), Err(InvalidKind));
    // Every command round-trips through its record.
    for cmd in [user(5), bind(1, 2), begin(1, 2, 600), confirm(1, 600, "A"), tip(1, 2, 3, 4)] {
        assert_eq!(Command::from_record(&cmd.to_record()), std::result::Result::Ok(cmd));
    }
}

#[test]
fn status_codes_are_stable_and_named() {
    for s in Status::ALL {
        assert_eq!(Status::from_code(s.code()), Some(*s));
        assert_eq!(Status::from_name(s.name()), Some(*s));
    }
    assert_eq!(Ok.code(), 0);
    assert_eq!(InsufficientFunds.code(), 15);
}

#[test]
fn a_held_top_up_answers_lookup_with_its_begin_and_refuses_a_begin_with_another_method() {
    let mut l = funded();
    l.run(bind(10, 1));
    l.run(bind(10, 2)); // the same channel (Alipay) as method 1
    let begin_at = l.now + SEC;
    assert_eq!(l.run(begin(7101, 10, 600)).status, Ok);
    let in_window = l.state.lookup(7101).expect("in the window");
    for i in 0..70 {
        l.run(tip(21_000 + i, 10, 20, 1));
    }
    assert!(l.state.id_record(7101).is_none(), "the id record left the window");
    // The lookup answers from the top-up: the same record as while its id was in the window.
    let held = l.state.lookup(7101).expect("the top-up is held");
    assert_eq!(held, in_window);
    assert_eq!(held.timestamp, begin_at);
    assert_eq!(held.command, begin(7101, 10, 600));
    assert_eq!((held.reply.status, held.reply.value, held.reply.value2, held.reply.duplicate), (Ok, 60, 600, false));
    // A begin under its id naming another method of the same channel is another command.
    let other_method = Command::TopUpBegin { id: 7101, user: 10, method: 2, fen: 600 };
    assert_eq!(l.run(other_method).status, ExistsWithDifferentFields);
    assert!(l.run(begin(7101, 10, 600)).duplicate);
    // Ids nobody used, and tips that left the window, are not found.
    assert!(l.state.lookup(99_999).is_none() && l.state.lookup(21_000).is_none());
}

#[test]
fn a_top_up_outlives_its_id_record_so_late_and_repeated_callbacks_still_find_it() {
    let mut l = funded();
    l.run(bind(10, 1));
    // Three top-ups begun, then 64 tips push their ids out of the 64-id window.
    assert_eq!(l.run(begin(7001, 10, 600)).status, Ok);
    assert_eq!(l.run(begin(7002, 10, 600)).status, Ok);
    assert_eq!(l.run(begin(7003, 10, 600)).status, Ok);
    assert_eq!(l.run(confirm(7003, 600, "T7003")).status, Ok);
    for i in 0..70 {
        l.run(tip(20_000 + i, 10, 20, 1));
    }
    assert!(l.state.id_record(7001).is_none() && l.state.id_record(7003).is_none());
    let evicted = l.state.drain_evicted();
    assert!(!evicted.contains(&7001) && !evicted.contains(&7003), "their ids stay taken: {evicted:?}");
    let before = l.balance(10);
    // The channel's callback comes after the id left the window: the top-up is still there.
    let ok = l.run(confirm(7001, 600, "T7001"));
    assert_eq!((ok.status, ok.value, ok.duplicate), (Ok, 60, false));
    assert_eq!(l.balance(10), before + 60);
    // ... and again: the original answer, no second credit.
    let again = l.run(confirm(7001, 600, "T7001"));
    assert_eq!((again.status, again.value, again.duplicate), (Ok, 60, true));
    let done_earlier = l.run(confirm(7003, 600, "T7003"));
    assert_eq!((done_earlier.status, done_earlier.duplicate), (Ok, true));
    assert_eq!(l.balance(10), before + 60);
    // A retried begin is answered by the top-up, not started over; other fields are refused.
    let retried = l.run(begin(7001, 10, 600));
    assert_eq!((retried.status, retried.value, retried.duplicate), (Ok, 60, true));
    assert_eq!(l.run(begin(7001, 10, 3000)).status, ExistsWithDifferentFields);
    let retried = l.run(begin(7001, 10, 600));
    assert_eq!((retried.status, retried.duplicate), (Ok, true), "a refused other begin is not remembered over it");
    assert!(l.run(confirm(7001, 600, "T7001")).duplicate, "still succeeded, once");
    assert_eq!(l.balance(10), before + 60);
    // A late failure of the one still pending, then its late confirmation: refunded, not credited.
    assert_eq!(l.run(Command::TopUpFail { id: 7002, reason: FailReason::Timeout }).status, Ok);
    assert_eq!(l.run(confirm(7002, 600, "T7002")).status, TopUpRefunded);
    assert_eq!(l.balance(10), before + 60);
    // The failure callback repeated after that still gets its original answer.
    let failed_again = l.run(Command::TopUpFail { id: 7002, reason: FailReason::Timeout });
    assert_eq!((failed_again.status, failed_again.duplicate), (Ok, true));
    assert_eq!(l.run(Command::TopUpFail { id: 7002, reason: FailReason::Declined }).status, TopUpNotPending);
    // The ids stay taken: a tip or a settlement under one of them is refused and moves nothing.
    let payer = l.balance(10);
    assert_eq!(l.run(tip(7001, 10, 20, 1)).status, ExistsWithDifferentFields);
    assert_eq!(l.run(tip(7002, 10, 20, 1)).status, ExistsWithDifferentFields);
    assert_eq!(l.run(Command::Settle { id: 7003, account: 20 }).status, ExistsWithDifferentFields);
    assert_eq!(l.balance(10), payer);
}

#[test]
fn ended_top_ups_kept_outside_the_window_are_bounded_oldest_first() {
    let mut l = funded();
    let kept = l.state.topups_max() as u64;
    for id in 0..kept + 3 {
        assert_eq!(l.run(begin(8000 + id, 10, 600)).status, Ok);
        assert_eq!(l.run(confirm(8000 + id, 600, &format!("T{id}"))).status, Ok);
    }
    for i in 0..70 {
        l.run(tip(30_000 + i, 10, 20, 1));
    }
    // The three oldest are forgotten (their ids released), the rest still answer.
    let released = l.state.drain_evicted();
    for id in 0..3 {
        assert_eq!(l.run(confirm(8000 + id, 600, &format!("T{id}"))).status, NotFound);
        assert!(released.contains(&(8000 + id)));
    }
    for id in 3..kept + 3 {
        assert!(l.run(confirm(8000 + id, 600, &format!("T{id}"))).duplicate);
        assert!(!released.contains(&(8000 + id)));
    }
}

#[test]
fn a_top_up_under_a_reused_id_expires_at_its_own_deadline() {
    let mut l = funded();
    let fail = |id| Command::TopUpFail { id, reason: FailReason::Declined };
    // Top-up 7000 fails at once; its pending queue entry (its deadline) stays behind.
    assert_eq!(l.run(begin(7000, 10, 600)).status, Ok);
    assert_eq!(l.run(fail(7000)).status, Ok);
    // More ended top-ups than are kept outside the window, a nanosecond apart: 7000, the
    // oldest, is forgotten and its id released (the last 64 ids are still in the window).
    for id in 0..l.state.topups_max() as u64 + 100 {
        for cmd in [begin(100_000 + id, 10, 600), fail(100_000 + id)] {
            l.now += 1;
            assert_eq!(l.state.apply(l.now, &cmd).0.status, Ok);
        }
    }
    assert!(l.state.drain_evicted().contains(&7000));
    // Ten minutes later the id begins a new top-up, whose deadline is ten minutes after the
    // first one's. When the first deadline passes, the new top-up is still pending.
    l.advance(10 * 60);
    assert_eq!(l.run(begin(7000, 10, 600)).status, Ok);
    l.advance(6 * 60);
    assert_eq!(l.run(Command::Tick).status, Ok);
    assert_eq!(l.state.topup(7000).unwrap().state, TopUpState::Pending);
    assert_eq!(l.run(confirm(7000, 600, "T7000")).status, Ok);
    assert_eq!(l.balance(10), 1060);
}

#[test]
fn pending_top_ups_are_bounded_per_shard() {
    let mut l = funded();
    let max = l.state.topups_max() as u64;
    // All begun within one top-up lifetime (a nanosecond apart), none ended.
    for id in 0..max {
        l.now += 1;
        assert_eq!(l.state.apply(l.now, &begin(100_000 + id, 10, 600)).0.status, Ok);
    }
    // One more waits for one of them to end: `busy`, nothing recorded under its id.
    assert_eq!(l.run(begin(9999, 10, 600)).status, Busy);
    assert!(l.state.id_record(9999).is_none());
    assert_eq!(l.run(confirm(100_000, 600, "T100000")).status, Ok);
    assert_eq!(l.run(begin(9999, 10, 600)).status, Ok);
}

/// A replay defers publishing balances to readers and publishes them all at its end: the
/// ledger's own balances are the same either way, and after `publish_all` so are the readers'.
#[test]
fn deferred_publishing_publishes_every_balance_at_the_end() {
    let mut l = funded();
    l.state.defer_publishing();
    l.now += SEC;
    l.state.apply(l.now, &tip(2000, 10, 21, 100));
    l.now += SEC;
    l.state.apply(l.now, &user(11));
    assert_eq!(l.balance(10), 900);
    assert_eq!(l.state.index().balance(10), Some(1000), "readers still see the balance before the deferral");
    assert!(l.balance(21) > 0 && l.state.index().balance(21) == Some(0));
    l.state.publish_all();
    l.state.check_invariants();
    for id in [10, 11, 20, 21, 30, SYSTEM_PLATFORM] {
        assert_eq!(l.state.index().balance(id), Some(l.balance(id)), "account {id}");
    }
}

#[test]
fn a_settlements_total_is_recorded_only_for_the_settlement_it_names() {
    // Shard 0 of two: a settlement's reply counts this shard's part (`value2` 1) until the
    // engine logs its total, which names the settlement by its ingest time; a total for
    // another settlement under the same id (an older one, long forgotten) changes nothing.
    let limits = ShardLimits { accounts_max: 1024, history_max: 64, ids_max: 64 };
    let mut state = ShardState::new(0, 2, LedgerConfig::default(), limits);
    let home = stormledger::shard::router::home_shard;
    let account = (1..).find(|&a| home(a, 2) == 0).unwrap();
    let mut now = T0;
    let mut run = |state: &mut ShardState, cmd: Command| {
        now += SEC;
        (now, state.apply(now, &cmd))
    };
    assert_eq!(run(&mut state, streamer(account, 0)).1 .0.status, Status::Ok);
    let settle = Command::Settle { id: 9, account };
    let (settled_at, (first, _)) = run(&mut state, settle);
    assert_eq!((first.status, first.value2), (Status::Ok, 1));
    let total = |at: u64| Command::SettleTotal { id: 9, total: 500, shards: 2, at };
    run(&mut state, total(settled_at - SEC));
    let (_, (retry, fanout)) = run(&mut state, settle);
    assert_eq!((retry.value, retry.value2, retry.duplicate), (0, 1, true), "unchanged by another's total");
    assert!(matches!(fanout, stormledger::ledger::Fanout::GatherSettlement { id: 9, at } if at == settled_at));
    run(&mut state, total(settled_at));
    let (_, (retry, fanout)) = run(&mut state, settle);
    assert_eq!((retry.value, retry.value2, retry.duplicate), (500, 2, true), "its own total");
    assert!(matches!(fanout, stormledger::ledger::Fanout::None), "answered from the record alone");
}

/// Business rules at their edges: the boundaries, orders and reply values that the tables above
/// and the model (`tests/model.rs`) do not pin down. Each test was written against a planted
/// mistake (session 18's mutation testing of the ledger rules) that the rest of the suite let
/// through: a cap one off, a status order swapped, a reply value taken from the wrong field, a
/// decode bound loosened.
mod edges {
    use super::{begin, bind, confirm, streamer, tip, union, user, Ledger, SEC, T0};
    use stormledger::config::{LedgerConfig, ShardLimits};
    use stormledger::ledger::amount::FEN_MAX;
    use stormledger::ledger::command::{
        flags, Command, FailReason, COINS_MAX, GIFT_COUNT_MAX, RESERVED_ID_MIN, SYSTEM_SUSPENSE,
    };
    use stormledger::ledger::state_machine::users_max;
    use stormledger::ledger::{AccountKind, Channel, ShardState, Status, TopUpState};

    /// The start of the next business day after `T0`: 00:00 in Beijing, 16:00 UTC.
    const NEXT_DAY: u64 = T0 + 12 * 3600 * SEC;

    fn user_flagged(account: u64, flags: u8) -> Command {
        Command::CreateAccount { account, kind: AccountKind::User, flags, union: 0 }
    }
    fn fail(id: u64) -> Command {
        Command::TopUpFail { id, reason: FailReason::Declined }
    }
    fn cap(user: u64, coins: u64) -> Command {
        Command::SetDailyCap { user, coins }
    }

    /// User 10 (verified, method 1 bound) with `fen` worth of coins, streamer 20 without a union.
    fn funded_with(config: LedgerConfig, fen: u64) -> Ledger {
        config.validate().expect("a valid configuration");
        let mut l = Ledger::with(config);
        l.ok(user(10));
        l.ok(streamer(20, 0));
        l.ok(bind(10, 1));
        l.top_up(900_000, 10, fen);
        l
    }

    // ---- who may pay ---------------------------------------------------------------------------

    #[test]
    fn a_minor_is_refused_as_a_minor_even_when_not_verified() {
        // `user_is_minor` is checked before `real_name` (docs/protocol.md, "Account flags").
        let mut l = funded_with(LedgerConfig::default(), 10_000);
        l.ok(user_flagged(11, flags::MINOR));
        l.ok(user_flagged(12, 0));
        l.ok(bind(11, 1));
        l.ok(bind(12, 1));
        assert_eq!(l.run(begin(1, 11, 600)).status, Status::UserIsMinor);
        assert_eq!(l.run(tip(2, 11, 20, 1)).status, Status::UserIsMinor);
        assert_eq!(
            l.run(Command::PayEvent { id: 3, from: 11, to: 20, event: 1, coins: 1 }).status,
            Status::UserIsMinor
        );
        // Not a minor, not verified: the other status.
        assert_eq!(l.run(begin(4, 12, 600)).status, Status::UserNotVerified);
        assert_eq!(l.run(tip(5, 12, 20, 1)).status, Status::UserNotVerified);
    }

    #[test]
    fn a_user_can_spend_exactly_the_whole_balance() {
        let mut l = funded_with(LedgerConfig::default(), 600); // 60 coins
        assert_eq!(l.run(tip(1, 10, 20, 61)).status, Status::InsufficientFunds);
        let all = l.ok(tip(2, 10, 20, 60));
        assert_eq!((all.value, all.value2), (0, 60));
        assert_eq!(l.balance(10), 0);
        let refused = l.run(tip(3, 10, 20, 1));
        assert_eq!((refused.status, refused.value), (Status::InsufficientFunds, 0));
    }

    // ---- daily caps ----------------------------------------------------------------------------

    #[test]
    fn the_daily_cap_starts_again_at_midnight_in_beijing_not_before() {
        let config = LedgerConfig { daily_cap_coins: 100, ..LedgerConfig::default() };
        let mut l = funded_with(config, 10_000); // 1000 coins
        assert_eq!(l.ok(tip(1, 10, 20, 100)).value2, 100);
        assert_eq!(l.run(tip(2, 10, 20, 1)).status, Status::ExceedsDailyCap);
        // 16:00 Beijing (08:00 UTC) is the same business day.
        let afternoon = T0 + 4 * 3600 * SEC;
        let refused = l.at(afternoon, tip(3, 10, 20, 1));
        assert_eq!((refused.status, refused.value), (Status::ExceedsDailyCap, 0));
        // One second before midnight in Beijing: still today.
        assert_eq!(l.at(NEXT_DAY - SEC, tip(4, 10, 20, 1)).status, Status::ExceedsDailyCap);
        // Midnight in Beijing (16:00 UTC): a new business day, the whole cap again.
        assert_eq!(l.at(NEXT_DAY, tip(5, 10, 20, 100)).status, Status::Ok);
        let refused = l.run(tip(6, 10, 20, 1));
        assert_eq!((refused.status, refused.value), (Status::ExceedsDailyCap, 0));
        assert_eq!(l.balance(10), 800);
    }

    #[test]
    fn a_user_may_set_a_daily_cap_equal_to_the_platforms() {
        let config = LedgerConfig { daily_cap_coins: 500, ..LedgerConfig::default() };
        let mut l = funded_with(config, 10_000);
        let set = l.ok(cap(10, 500));
        assert_eq!((set.value, set.value2), (500, 0));
        let over = l.run(cap(10, 501));
        assert_eq!((over.status, over.value), (Status::InvalidAmount, 500), "the reply carries the platform cap");
        assert_eq!(l.ok(cap(10, 1)).value, 1);
        assert_eq!(l.run(tip(1, 10, 20, 2)).status, Status::ExceedsDailyCap);
    }

    #[test]
    fn only_a_user_has_a_daily_cap() {
        let mut l = funded_with(LedgerConfig::default(), 600);
        l.ok(union(30));
        assert_eq!(l.run(cap(20, 100)).status, Status::WrongAccountKind);
        assert_eq!(l.run(cap(30, 100)).status, Status::WrongAccountKind);
        assert_eq!(l.run(cap(99, 100)).status, Status::AccountNotFound);
    }

    // ---- top-up amounts ------------------------------------------------------------------------

    #[test]
    fn the_custom_range_includes_both_its_ends() {
        let mut l = funded_with(LedgerConfig::default(), 600);
        let min = l.ok(begin(1, 10, 100)); // 1 yuan: the custom minimum
        assert_eq!((min.value, min.value2), (10, 100));
        let max = l.ok(begin(2, 10, 5_000_000)); // 50 000 yuan: the custom maximum
        assert_eq!((max.value, max.value2), (500_000, 5_000_000));
        assert_eq!(l.run(begin(3, 10, 5_000_010)).status, Status::AmountNotAllowed);
        assert_eq!(l.run(begin(4, 10, 90)).status, Status::AmountNotAllowed);
        let credited = l.ok(confirm(2, 5_000_000, "MAX"));
        assert_eq!(credited.value, 500_000);
    }

    #[test]
    fn a_preset_pack_outside_the_custom_range_is_allowed() {
        let config = LedgerConfig {
            topup_presets_fen: vec![600, 20_000_000],
            topup_custom_min_fen: 1_000,
            topup_custom_max_fen: 10_000,
            ..LedgerConfig::default()
        };
        let mut l = Ledger::with(config);
        l.ok(user(10));
        l.ok(bind(10, 1));
        assert_eq!(l.ok(begin(1, 10, 600)).value, 60);
        assert_eq!(l.ok(begin(2, 10, 20_000_000)).value, 2_000_000);
        assert_eq!(l.run(begin(3, 10, 700)).status, Status::AmountNotAllowed);
        assert_eq!(l.run(begin(4, 10, 10_010)).status, Status::AmountNotAllowed);
        assert_eq!(l.ok(begin(5, 10, 1_000)).value, 100);
    }

    #[test]
    fn coins_follow_the_configured_rate() {
        let config = LedgerConfig { coins_per_yuan: 7, ..LedgerConfig::default() };
        let mut l = Ledger::with(config);
        l.ok(user(10));
        l.ok(bind(10, 1));
        let begun = l.ok(begin(1, 10, 600)); // 6 yuan x 7 = 42 coins
        assert_eq!((begun.value, begun.value2), (42, 600));
        let confirmed = l.ok(confirm(1, 600, "T1"));
        assert_eq!((confirmed.value, confirmed.value2), (42, 42));
        assert_eq!(l.balance(10), 42);
        // 6.50 yuan x 7 = 45.5 coins.
        assert_eq!(l.run(begin(2, 10, 650)).status, Status::AmountNotCoinMultiple);
        assert_eq!(l.ok(begin(3, 10, 700)).value, 49);
    }

    // ---- top-up callbacks ----------------------------------------------------------------------

    #[test]
    fn a_confirmation_answers_the_coins_and_the_balance_after() {
        let mut l = funded_with(LedgerConfig::default(), 10_000); // 1000 coins
        l.ok(begin(1, 10, 3_000));
        let confirmed = l.ok(confirm(1, 3_000, "T1"));
        assert_eq!((confirmed.value, confirmed.value2), (300, 1_300));
        let again = l.run(confirm(1, 3_000, "T1"));
        assert_eq!((again.status, again.value, again.value2, again.duplicate), (Status::Ok, 300, 1_300, true));
    }

    #[test]
    fn a_repeated_confirmation_with_another_amount_is_another_command() {
        let mut l = funded_with(LedgerConfig::default(), 600);
        l.ok(begin(1, 10, 3_000));
        l.ok(confirm(1, 3_000, "T1"));
        assert_eq!(l.run(confirm(1, 600, "T1")).status, Status::ExistsWithDifferentFields);
        assert_eq!(l.run(confirm(1, 9_800, "T1")).status, Status::ExistsWithDifferentFields);
        assert!(l.run(confirm(1, 3_000, "T1")).duplicate);
        assert_eq!(l.balance(10), 60 + 300);
    }

    #[test]
    fn a_late_confirmation_refunds_the_amount_the_channel_names() {
        let mut l = funded_with(LedgerConfig::default(), 600);
        l.ok(begin(1, 10, 600));
        l.ok(fail(1));
        let clearing = l.balance(Channel::Alipay.clearing_account());
        // The channel says it took 30 yuan for a 6-yuan top-up that had failed: 30 yuan go back.
        let refunded = l.run(confirm(1, 3_000, "LATE"));
        assert_eq!((refunded.status, refunded.value, refunded.value2), (Status::TopUpRefunded, 3_000, 0));
        let again = l.run(confirm(1, 3_000, "LATE"));
        assert_eq!((again.status, again.value, again.duplicate), (Status::TopUpRefunded, 3_000, true));
        assert_eq!(l.run(confirm(1, 600, "LATE")).status, Status::ExistsWithDifferentFields);
        let topup = l.state.topup(1).expect("kept");
        assert_eq!((topup.state, topup.fen, topup.confirmed_fen), (TopUpState::Refunded, 600, 3_000));
        // The money passed through suspense and went back: nothing is owed, nothing credited.
        assert_eq!(l.balance(Channel::Alipay.clearing_account()), clearing);
        assert_eq!(l.balance(SYSTEM_SUSPENSE), 0);
        assert_eq!(l.balance(10), 60);
        let entry = l.state.history(10, 1, None)[0];
        assert_eq!((entry.id, entry.amount, entry.detail), (1, 0, 3_000));
    }

    #[test]
    fn a_top_up_expires_exactly_at_its_deadline() {
        let mut l = funded_with(LedgerConfig::default(), 600);
        let begun_at = l.now + SEC;
        l.at(begun_at, begin(1, 10, 600));
        l.at(begun_at + SEC, begin(2, 10, 600));
        let ttl = 15 * 60 * SEC;
        // One nanosecond before its deadline it is still pending ...
        assert_eq!(l.at(begun_at + ttl - 1, Command::Tick).status, Status::Ok);
        assert_eq!(l.state.topup(1).map(|t| t.state), Some(TopUpState::Pending));
        // ... at its deadline it has expired: the confirmation is refunded, not credited.
        assert_eq!(l.at(begun_at + ttl, confirm(1, 600, "AT-DEADLINE")).status, Status::TopUpRefunded);
        // The second one's deadline is a second later: just before it, it is credited.
        assert_eq!(l.at(begun_at + SEC + ttl - 1, confirm(2, 600, "IN-TIME")).status, Status::Ok);
        assert_eq!(l.balance(10), 120);
    }

    // ---- accounts ------------------------------------------------------------------------------

    #[test]
    fn a_streamers_union_must_be_a_union() {
        let mut l = Ledger::new();
        l.ok(streamer(20, 0));
        l.ok(user(10));
        assert_eq!(l.run(streamer(21, 20)).status, Status::UnionNotFound, "a streamer is not a union");
        assert_eq!(l.run(streamer(21, 10)).status, Status::UnionNotFound, "a user is not a union");
        assert!(l.state.account(21).is_none());
        l.ok(union(30));
        l.ok(streamer(21, 30));
    }

    #[test]
    fn a_shard_takes_exactly_its_user_capacity() {
        let limits = ShardLimits { accounts_max: 64, history_max: 64, ids_max: 64 };
        let most = users_max(&limits) as u64;
        let mut l = Ledger::sized(LedgerConfig::default(), limits);
        for id in 1..=most {
            l.ok(user(id));
        }
        assert_eq!(l.run(user(most + 1)).status, Status::CapacityExhausted);
        assert!(l.state.account(most + 1).is_none());
        assert_eq!(l.state.account_counts()[0] as u64, most);
        // Creating an existing one again is still its original answer.
        assert!(l.ok(user(1)).duplicate);
    }

    #[test]
    fn freezing_twice_is_a_duplicate_and_so_is_unfreezing_an_unfrozen_account() {
        let mut l = funded_with(LedgerConfig::default(), 600);
        let freeze = |frozen| Command::Freeze { account: 10, frozen };
        assert!(!l.ok(freeze(true)).duplicate);
        assert!(l.ok(freeze(true)).duplicate);
        assert!(!l.ok(freeze(false)).duplicate);
        assert!(l.ok(freeze(false)).duplicate);
        assert_eq!(l.ok(tip(1, 10, 20, 1)).value, 59);
    }

    #[test]
    fn freezing_a_striped_account_replicates_only_a_change() {
        let limits = ShardLimits { accounts_max: 1024, history_max: 64, ids_max: 64 };
        let mut state = ShardState::new(0, 2, LedgerConfig::default(), limits);
        let home = stormledger::shard::router::home_shard;
        let account = (1..).find(|&a| home(a, 2) == 0).expect("an id homed on shard 0");
        let mut now = T0;
        let mut run = |state: &mut ShardState, cmd: Command| {
            now += SEC;
            state.apply(now, &cmd)
        };
        assert_eq!(run(&mut state, streamer(account, 0)).0.status, Status::Ok);
        let freeze = Command::Freeze { account, frozen: true };
        let (first, fanout) = run(&mut state, freeze);
        assert!(!first.duplicate && matches!(fanout, stormledger::ledger::Fanout::Replicate(_)));
        let (again, fanout) = run(&mut state, freeze);
        assert!(again.duplicate && matches!(fanout, stormledger::ledger::Fanout::None));
    }

    // ---- decoding ------------------------------------------------------------------------------

    /// Makes a command carrying the given amount.
    type MakeCommand = fn(u64) -> Command;

    fn decoded(cmd: Command) -> Result<Command, Status> {
        Command::from_record(&cmd.to_record())
    }

    #[test]
    fn an_account_cannot_be_created_frozen() {
        assert_eq!(decoded(user_flagged(1, flags::FROZEN)), Err(Status::InvalidKind));
        assert_eq!(decoded(user_flagged(1, flags::REAL_NAME | flags::FROZEN)), Err(Status::InvalidKind));
        assert_eq!(decoded(user_flagged(1, 1 << 3)), Err(Status::InvalidKind));
        let adult = user_flagged(1, flags::REAL_NAME | flags::MINOR);
        assert_eq!(decoded(adult), Ok(adult));
    }

    #[test]
    fn amounts_are_refused_at_zero_and_above_their_maximum_and_accepted_at_it() {
        let gift = |count| Command::Gift { id: 1, from: 2, to: 3, gift: 1, count };
        let event = |coins| Command::PayEvent { id: 1, from: 2, to: 3, event: 4, coins };
        let cases: [(MakeCommand, u64); 6] = [
            (|fen| begin(1, 2, fen), FEN_MAX),
            (|fen| confirm(1, fen, "T"), FEN_MAX),
            (|coins| tip(1, 2, 3, coins), COINS_MAX),
            (gift, GIFT_COUNT_MAX),
            (event, COINS_MAX),
            (|coins| cap(2, coins), COINS_MAX),
        ];
        for (make, max) in cases {
            for amount in [1, max] {
                assert_eq!(decoded(make(amount)), Ok(make(amount)), "{:?}", make(amount));
            }
            for amount in [0, max + 1] {
                assert_eq!(decoded(make(amount)), Err(Status::InvalidAmount), "{:?}", make(amount));
            }
        }
    }

    #[test]
    fn ids_are_refused_at_zero_and_from_the_reserved_range() {
        let last = RESERVED_ID_MIN - 1;
        assert_eq!(decoded(tip(last, last, last, 1)), Ok(tip(last, last, last, 1)));
        for bad in [0, RESERVED_ID_MIN, u64::MAX] {
            assert_eq!(decoded(tip(bad, 2, 3, 1)), Err(Status::InvalidId));
            assert_eq!(decoded(Command::Settle { id: 1, account: bad }), Err(Status::InvalidId));
            assert_eq!(decoded(cap(bad, 1)), Err(Status::InvalidId));
        }
    }
}
