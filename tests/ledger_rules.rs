//! Business rules at their edges: the boundaries, orders and reply values that the table tests
//! (`tests/state_machine.rs`) and the model (`tests/model.rs`) do not pin down. Each test was
//! written against a planted mistake that the rest of the suite let through (a cap one off, a
//! status order swapped, a reply value taken from the wrong field, a decode bound loosened).

use stormledger::config::{LedgerConfig, ShardLimits};
use stormledger::layout::text_field;
use stormledger::ledger::amount::FEN_MAX;
use stormledger::ledger::command::{
    flags, Command, FailReason, COINS_MAX, GIFT_COUNT_MAX, RESERVED_ID_MIN, SYSTEM_SUSPENSE,
};
use stormledger::ledger::state_machine::users_max;
use stormledger::ledger::{AccountKind, Channel, Reply, ShardState, Status, TopUpState};

const SEC: u64 = 1_000_000_000;
/// 2026-11-27 04:00 UTC = 12:00 in Beijing (the default business day starts at 16:00 UTC).
const T0: u64 = 1_795_752_000 * SEC;
/// The start of the next business day after `T0`: 00:00 in Beijing, 16:00 UTC.
const NEXT_DAY: u64 = T0 + 12 * 3600 * SEC;

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
        config.validate().expect("a valid configuration");
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
    fn balance(&self, id: u64) -> i64 {
        self.state.account(id).map(|a| a.balance).expect("the account exists")
    }
    /// Credits `user` (with method 1 bound) `fen` worth of coins through a top-up.
    fn top_up(&mut self, id: u64, user: u64, fen: u64) -> Reply {
        self.ok(begin(id, user, fen));
        self.ok(confirm(id, fen, &format!("T{id}")))
    }
}

fn user(account: u64) -> Command {
    Command::CreateAccount { account, kind: AccountKind::User, flags: flags::REAL_NAME, union: 0 }
}
fn user_flagged(account: u64, flags: u8) -> Command {
    Command::CreateAccount { account, kind: AccountKind::User, flags, union: 0 }
}
fn streamer(account: u64, union: u64) -> Command {
    Command::CreateAccount { account, kind: AccountKind::Streamer, flags: 0, union }
}
fn union(account: u64) -> Command {
    Command::CreateAccount { account, kind: AccountKind::Union, flags: 0, union: 0 }
}
fn bind(user: u64) -> Command {
    Command::BindMethod { user, method: 1, channel: Channel::Alipay }
}
fn begin(id: u64, user: u64, fen: u64) -> Command {
    Command::TopUpBegin { id, user, method: 1, fen }
}
fn confirm(id: u64, fen: u64, txn: &str) -> Command {
    Command::TopUpConfirm { id, fen, channel_txn: text_field(txn).expect("a short text") }
}
fn fail(id: u64) -> Command {
    Command::TopUpFail { id, reason: FailReason::Declined }
}
fn tip(id: u64, from: u64, to: u64, coins: u64) -> Command {
    Command::Tip { id, from, to, coins }
}
fn cap(user: u64, coins: u64) -> Command {
    Command::SetDailyCap { user, coins }
}

/// User 10 (verified, method 1 bound) with `fen` worth of coins, streamer 20 without a union.
fn funded_with(config: LedgerConfig, fen: u64) -> Ledger {
    let mut l = Ledger::with(config);
    l.ok(user(10));
    l.ok(streamer(20, 0));
    l.ok(bind(10));
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
    l.ok(bind(11));
    l.ok(bind(12));
    assert_eq!(l.run(begin(1, 11, 600)).status, Status::UserIsMinor);
    assert_eq!(l.run(tip(2, 11, 20, 1)).status, Status::UserIsMinor);
    assert_eq!(l.run(Command::PayEvent { id: 3, from: 11, to: 20, event: 1, coins: 1 }).status, Status::UserIsMinor);
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
    l.ok(bind(10));
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
    l.ok(bind(10));
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
