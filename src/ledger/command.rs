//! The commands the ledger applies, and their mapping to the fixed `CommandRecord` layout.
//!
//! `Command` is the domain type the state machine matches on; `CommandRecord` (in `layout`) is
//! the byte layout shared by the log and the wire. The per-kind meaning of the generic record
//! fields is defined here and only here (`to_record` / `from_record`).

use crate::layout::{CommandRecord, TEXT_LEN};
use crate::ledger::status::Status;

/// Ids at or above this value are reserved for system accounts and internal use.
pub const RESERVED_ID_MIN: u64 = 1 << 62;

/// What an account is for. Codes are stable (log and wire).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, PartialOrd, Ord)]
#[repr(u8)]
pub enum AccountKind {
    /// A viewer's coin wallet: the only kind that spends. Lives on one shard.
    User = 1,
    /// A streamer's earnings, in coins. Striped over every shard.
    Streamer = 2,
    /// A union (agency) payable, in coins. Striped over every shard.
    Union = 3,
    /// Platform revenue (coins). System account, striped.
    Platform = 4,
    /// A payment channel's clearing account (fen). System account, striped.
    Channel = 5,
    /// Suspense for money that cannot be credited (late confirmations), in fen. System, striped.
    Suspense = 6,
    /// Where settlements sweep earnings to (coins). System account, striped.
    Payout = 7,
    /// Coins issued against top-ups (goes negative as coins are sold). System account, striped.
    Issuance = 8,
    /// Yuan received for coins sold (fen). System account, striped.
    CoinSales = 9,
}

impl AccountKind {
    pub const fn from_code(code: u16) -> Option<AccountKind> {
        Some(match code {
            1 => AccountKind::User,
            2 => AccountKind::Streamer,
            3 => AccountKind::Union,
            4 => AccountKind::Platform,
            5 => AccountKind::Channel,
            6 => AccountKind::Suspense,
            7 => AccountKind::Payout,
            8 => AccountKind::Issuance,
            9 => AccountKind::CoinSales,
            _ => return None,
        })
    }

    pub const fn name(self) -> &'static str {
        match self {
            AccountKind::User => "user",
            AccountKind::Streamer => "streamer",
            AccountKind::Union => "union",
            AccountKind::Platform => "platform",
            AccountKind::Channel => "channel",
            AccountKind::Suspense => "suspense",
            AccountKind::Payout => "payout",
            AccountKind::Issuance => "issuance",
            AccountKind::CoinSales => "coin_sales",
        }
    }

    pub fn from_name(name: &str) -> Option<AccountKind> {
        (1..=9).filter_map(AccountKind::from_code).find(|k| k.name() == name)
    }

    /// Striped accounts exist on every shard; each shard holds a part of the balance.
    pub const fn is_striped(self) -> bool {
        !matches!(self, AccountKind::User)
    }

    /// Money unit of the account: fen (money) or coins.
    pub const fn unit(self) -> Unit {
        match self {
            AccountKind::Channel | AccountKind::Suspense | AccountKind::CoinSales => Unit::Fen,
            _ => Unit::Coin,
        }
    }
}

/// The two ledgers: money (fen) and the virtual currency (coins). Each balances on its own.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Unit {
    Fen = 0,
    Coin = 1,
}

/// A payment channel. Codes are stable.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, PartialOrd, Ord)]
#[repr(u8)]
pub enum Channel {
    Alipay = 1,
    Wechat = 2,
    BankCard = 3,
    AppleIap = 4,
}

impl Channel {
    pub const ALL: [Channel; 4] = [Channel::Alipay, Channel::Wechat, Channel::BankCard, Channel::AppleIap];

    pub const fn from_code(code: u16) -> Option<Channel> {
        Some(match code {
            1 => Channel::Alipay,
            2 => Channel::Wechat,
            3 => Channel::BankCard,
            4 => Channel::AppleIap,
            _ => return None,
        })
    }

    pub const fn name(self) -> &'static str {
        match self {
            Channel::Alipay => "alipay",
            Channel::Wechat => "wechat",
            Channel::BankCard => "bank_card",
            Channel::AppleIap => "apple_iap",
        }
    }

    pub fn from_name(name: &str) -> Option<Channel> {
        Channel::ALL.into_iter().find(|c| c.name() == name)
    }

    /// The channel's clearing account id.
    pub const fn clearing_account(self) -> u64 {
        SYSTEM_CHANNEL_BASE + self as u64
    }
}

/// Why a payment channel says a top-up failed. Codes are stable.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[repr(u8)]
pub enum FailReason {
    ChannelInsufficientFunds = 1,
    NetworkError = 2,
    Declined = 3,
    Timeout = 4,
}

impl FailReason {
    pub const ALL: [FailReason; 4] =
        [FailReason::ChannelInsufficientFunds, FailReason::NetworkError, FailReason::Declined, FailReason::Timeout];

    pub const fn from_code(code: u16) -> Option<FailReason> {
        Some(match code {
            1 => FailReason::ChannelInsufficientFunds,
            2 => FailReason::NetworkError,
            3 => FailReason::Declined,
            4 => FailReason::Timeout,
            _ => return None,
        })
    }

    pub const fn name(self) -> &'static str {
        match self {
            FailReason::ChannelInsufficientFunds => "insufficient_funds",
            FailReason::NetworkError => "network_error",
            FailReason::Declined => "declined",
            FailReason::Timeout => "timeout",
        }
    }

    pub fn from_name(name: &str) -> Option<FailReason> {
        FailReason::ALL.into_iter().find(|r| r.name() == name)
    }
}

/// System account ids (reserved range), created on every shard at genesis.
pub const SYSTEM_PLATFORM: u64 = RESERVED_ID_MIN + 1;
pub const SYSTEM_PAYOUT: u64 = RESERVED_ID_MIN + 2;
pub const SYSTEM_ISSUANCE: u64 = RESERVED_ID_MIN + 3;
pub const SYSTEM_COIN_SALES: u64 = RESERVED_ID_MIN + 4;
pub const SYSTEM_SUSPENSE: u64 = RESERVED_ID_MIN + 5;
pub const SYSTEM_CHANNEL_BASE: u64 = RESERVED_ID_MIN + 16;

/// The system accounts every shard starts with, in creation order.
pub const SYSTEM_ACCOUNTS: [(u64, AccountKind); 9] = [
    (SYSTEM_PLATFORM, AccountKind::Platform),
    (SYSTEM_PAYOUT, AccountKind::Payout),
    (SYSTEM_ISSUANCE, AccountKind::Issuance),
    (SYSTEM_COIN_SALES, AccountKind::CoinSales),
    (SYSTEM_SUSPENSE, AccountKind::Suspense),
    (SYSTEM_CHANNEL_BASE + 1, AccountKind::Channel),
    (SYSTEM_CHANNEL_BASE + 2, AccountKind::Channel),
    (SYSTEM_CHANNEL_BASE + 3, AccountKind::Channel),
    (SYSTEM_CHANNEL_BASE + 4, AccountKind::Channel),
];

/// Command kind codes. Stable: they are in the log and on the wire.
pub mod kind {
    pub const CREATE_ACCOUNT: u8 = 1;
    pub const BIND_METHOD: u8 = 2;
    pub const TOPUP_BEGIN: u8 = 3;
    pub const TOPUP_CONFIRM: u8 = 4;
    pub const TOPUP_FAIL: u8 = 5;
    pub const TIP: u8 = 6;
    pub const GIFT: u8 = 7;
    pub const PAY_EVENT: u8 = 8;
    pub const SETTLE: u8 = 9;
    pub const SET_DAILY_CAP: u8 = 10;
    /// Internal: advances time on an idle shard so pending top-ups expire.
    pub const TICK: u8 = 100;
    /// Internal: a striped account's creation, replicated from its home shard.
    pub const REPLICA_CREATE: u8 = 101;
    /// Internal: a striped account's freeze flag, replicated from its home shard.
    pub const REPLICA_FREEZE: u8 = 102;
    /// Internal: one shard's part of a settlement, replicated from the home shard.
    pub const REPLICA_SETTLE: u8 = 103;
    /// Internal: a settlement's total over every shard, logged on its home shard once every
    /// part is applied; a retry or lookup is then answered from its record alone.
    pub const SETTLE_TOTAL: u8 = 104;
    /// Admin: freeze an account.
    pub const FREEZE: u8 = 200;
    /// Admin: unfreeze an account.
    pub const UNFREEZE: u8 = 201;

    /// Operator: maintenance mode on (`flags` = 1) or off (`flags` = 0). Not logged.
    pub const MAINTENANCE: u8 = 210;
    /// Operator: take a snapshot now. Not logged.
    pub const SNAPSHOT: u8 = 211;

    /// Kinds a client may send (internal kinds are produced only by the engine).
    pub const fn is_client_kind(kind: u8) -> bool {
        matches!(kind, 1..=10 | 200 | 201 | 210 | 211)
    }

    /// Kinds that need the admin role.
    pub const fn is_admin_kind(kind: u8) -> bool {
        kind >= 200
    }

    pub const fn name(kind: u8) -> &'static str {
        match kind {
            CREATE_ACCOUNT => "create_account",
            BIND_METHOD => "bind_method",
            TOPUP_BEGIN => "topup_begin",
            TOPUP_CONFIRM => "topup_confirm",
            TOPUP_FAIL => "topup_fail",
            TIP => "tip",
            GIFT => "gift",
            PAY_EVENT => "pay_event",
            SETTLE => "settle",
            SET_DAILY_CAP => "set_daily_cap",
            TICK => "tick",
            REPLICA_CREATE => "replica_create",
            REPLICA_FREEZE => "replica_freeze",
            REPLICA_SETTLE => "replica_settle",
            SETTLE_TOTAL => "settle_total",
            FREEZE => "freeze",
            UNFREEZE => "unfreeze",
            MAINTENANCE => "maintenance",
            SNAPSHOT => "snapshot",
            _ => "unknown",
        }
    }
}

/// Account flags (bit set in `CommandRecord::flags` for `CreateAccount`, and on `Account`).
pub mod flags {
    pub const REAL_NAME: u8 = 1 << 0;
    pub const MINOR: u8 = 1 << 1;
    pub const FROZEN: u8 = 1 << 2;
}

/// Where a replicated command came from: the home shard and its replication sequence number.
/// Per (source, destination) pair the sequence is contiguous, which is what lets recovery find
/// and re-send exactly the replica messages a crash cut off.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Origin {
    pub shard: u16,
    pub seq: u64,
}

/// A command, decoded and validated for shape (not yet for business rules).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Command {
    CreateAccount {
        account: u64,
        kind: AccountKind,
        flags: u8,
        union: u64,
    },
    BindMethod {
        user: u64,
        method: u64,
        channel: Channel,
    },
    TopUpBegin {
        id: u64,
        user: u64,
        method: u64,
        fen: u64,
    },
    TopUpConfirm {
        id: u64,
        fen: u64,
        channel_txn: [u8; TEXT_LEN],
        /// When the channel says it was paid, at the latest (ns since the Unix epoch; 0: not
        /// said). A confirmation paid before its top-up's deadline credits the top-up even if
        /// it expired meanwhile (the callback was refused `maintenance`, or the server was
        /// down). The engine fills it at ingest, when 0, with the command's first-send time.
        paid_by: u64,
    },
    TopUpFail {
        id: u64,
        reason: FailReason,
    },
    Tip {
        id: u64,
        from: u64,
        to: u64,
        coins: u64,
    },
    Gift {
        id: u64,
        from: u64,
        to: u64,
        gift: u64,
        count: u64,
    },
    PayEvent {
        id: u64,
        from: u64,
        to: u64,
        event: u64,
        coins: u64,
    },
    Settle {
        id: u64,
        account: u64,
    },
    SetDailyCap {
        user: u64,
        coins: u64,
    },
    Freeze {
        account: u64,
        frozen: bool,
    },
    Tick,
    ReplicaCreate {
        account: u64,
        kind: AccountKind,
        flags: u8,
        union: u64,
        origin: Origin,
    },
    ReplicaFreeze {
        account: u64,
        frozen: bool,
        origin: Origin,
    },
    ReplicaSettle {
        id: u64,
        account: u64,
        origin: Origin,
    },
    /// A settlement's `total` swept over its `shards` parts (see `kind::SETTLE_TOTAL`); `at`
    /// is the settlement's ingest time, which tells it from a later one under the same id.
    SettleTotal {
        id: u64,
        total: i64,
        shards: u16,
        at: u64,
    },
}

impl Command {
    /// The kind code of this command.
    pub const fn kind(&self) -> u8 {
        match self {
            Command::CreateAccount { .. } => kind::CREATE_ACCOUNT,
            Command::BindMethod { .. } => kind::BIND_METHOD,
            Command::TopUpBegin { .. } => kind::TOPUP_BEGIN,
            Command::TopUpConfirm { .. } => kind::TOPUP_CONFIRM,
            Command::TopUpFail { .. } => kind::TOPUP_FAIL,
            Command::Tip { .. } => kind::TIP,
            Command::Gift { .. } => kind::GIFT,
            Command::PayEvent { .. } => kind::PAY_EVENT,
            Command::Settle { .. } => kind::SETTLE,
            Command::SetDailyCap { .. } => kind::SET_DAILY_CAP,
            Command::Freeze { frozen: true, .. } => kind::FREEZE,
            Command::Freeze { frozen: false, .. } => kind::UNFREEZE,
            Command::Tick => kind::TICK,
            Command::ReplicaCreate { .. } => kind::REPLICA_CREATE,
            Command::ReplicaFreeze { .. } => kind::REPLICA_FREEZE,
            Command::ReplicaSettle { .. } => kind::REPLICA_SETTLE,
            Command::SettleTotal { .. } => kind::SETTLE_TOTAL,
        }
    }

    /// The id a reply is labelled with: the idempotency key, or the account for account commands.
    pub const fn reply_id(&self) -> u64 {
        match *self {
            Command::CreateAccount { account, .. } => account,
            Command::BindMethod { method, .. } => method,
            Command::TopUpBegin { id, .. }
            | Command::TopUpConfirm { id, .. }
            | Command::TopUpFail { id, .. }
            | Command::Tip { id, .. }
            | Command::Gift { id, .. }
            | Command::PayEvent { id, .. }
            | Command::Settle { id, .. }
            | Command::ReplicaSettle { id, .. }
            | Command::SettleTotal { id, .. } => id,
            Command::SetDailyCap { user, .. } => user,
            Command::Freeze { account, .. }
            | Command::ReplicaCreate { account, .. }
            | Command::ReplicaFreeze { account, .. } => account,
            Command::Tick => 0,
        }
    }

    /// The transfer-namespace id (idempotency key) if this command carries one.
    pub const fn transfer_id(&self) -> Option<u64> {
        match *self {
            Command::TopUpBegin { id, .. }
            | Command::Tip { id, .. }
            | Command::Gift { id, .. }
            | Command::PayEvent { id, .. }
            | Command::Settle { id, .. } => Some(id),
            _ => None,
        }
    }

    /// Decodes a record. Shape errors (unknown kind or code, zero or reserved ids, zero amounts)
    /// are answered with a status; business rules are the state machine's.
    #[inline]
    pub fn from_record(r: &CommandRecord) -> Result<Command, Status> {
        let id = r.id.get();
        let (a, b, c, d) = (r.a.get(), r.b.get(), r.c.get(), r.d.get());
        let origin = || Origin { shard: c as u16, seq: d };
        let cmd = match r.kind {
            kind::CREATE_ACCOUNT => {
                let kind = AccountKind::from_code(r.code.get()).ok_or(Status::InvalidKind)?;
                if !matches!(kind, AccountKind::User | AccountKind::Streamer | AccountKind::Union) {
                    return Err(Status::InvalidKind);
                }
                if r.flags & !(flags::REAL_NAME | flags::MINOR) != 0 {
                    return Err(Status::InvalidKind);
                }
                check_id(id)?;
                if b != 0 {
                    check_id(b)?;
                }
                Command::CreateAccount { account: id, kind, flags: r.flags, union: b }
            }
            kind::BIND_METHOD => {
                let channel = Channel::from_code(r.code.get()).ok_or(Status::InvalidKind)?;
                check_id(a)?;
                check_id(b)?;
                Command::BindMethod { user: a, method: b, channel }
            }
            kind::TOPUP_BEGIN => {
                check_id(id)?;
                check_id(a)?;
                check_id(b)?;
                check_amount(c, crate::ledger::amount::FEN_MAX)?;
                Command::TopUpBegin { id, user: a, method: b, fen: c }
            }
            kind::TOPUP_CONFIRM => {
                check_id(id)?;
                check_amount(c, crate::ledger::amount::FEN_MAX)?;
                Command::TopUpConfirm { id, fen: c, channel_txn: r.text, paid_by: d }
            }
            kind::TOPUP_FAIL => {
                check_id(id)?;
                let reason = FailReason::from_code(r.code.get()).ok_or(Status::InvalidKind)?;
                Command::TopUpFail { id, reason }
            }
            kind::TIP => {
                check_id(id)?;
                check_id(a)?;
                check_id(b)?;
                check_amount(c, COINS_MAX)?;
                Command::Tip { id, from: a, to: b, coins: c }
            }
            kind::GIFT => {
                check_id(id)?;
                check_id(a)?;
                check_id(b)?;
                check_amount(c, GIFT_COUNT_MAX)?;
                Command::Gift { id, from: a, to: b, count: c, gift: d }
            }
            kind::PAY_EVENT => {
                check_id(id)?;
                check_id(a)?;
                check_id(b)?;
                check_amount(c, COINS_MAX)?;
                Command::PayEvent { id, from: a, to: b, coins: c, event: d }
            }
            kind::SETTLE => {
                check_id(id)?;
                check_id(a)?;
                Command::Settle { id, account: a }
            }
            kind::SET_DAILY_CAP => {
                check_id(a)?;
                check_amount(c, COINS_MAX)?;
                Command::SetDailyCap { user: a, coins: c }
            }
            kind::FREEZE | kind::UNFREEZE => {
                check_id(a)?;
                Command::Freeze { account: a, frozen: r.kind == kind::FREEZE }
            }
            kind::TICK => Command::Tick,
            kind::REPLICA_CREATE => Command::ReplicaCreate {
                account: id,
                kind: AccountKind::from_code(r.code.get()).ok_or(Status::InvalidKind)?,
                flags: r.flags,
                union: b,
                origin: origin(),
            },
            kind::REPLICA_FREEZE => Command::ReplicaFreeze { account: a, frozen: r.flags != 0, origin: origin() },
            kind::REPLICA_SETTLE => Command::ReplicaSettle { id, account: a, origin: origin() },
            kind::SETTLE_TOTAL => {
                check_id(id)?;
                let total = i64::try_from(a).map_err(|_| Status::InvalidAmount)?;
                let shards = u16::try_from(b).ok().filter(|&s| s > 0).ok_or(Status::InvalidAmount)?;
                Command::SettleTotal { id, total, shards, at: c }
            }
            _ => return Err(Status::InvalidKind),
        };
        Ok(cmd)
    }

    /// Encodes into a record (timestamp left zero; the worker sets it at ingest).
    pub fn to_record(&self) -> CommandRecord {
        let mut r = CommandRecord { kind: self.kind(), ..CommandRecord::default() };
        let set = |r: &mut CommandRecord, id: u64, a: u64, b: u64, c: u64, d: u64| {
            r.id.set(id);
            r.a.set(a);
            r.b.set(b);
            r.c.set(c);
            r.d.set(d);
        };
        match *self {
            Command::CreateAccount { account, kind, flags, union } => {
                set(&mut r, account, 0, union, 0, 0);
                r.code.set(kind as u16);
                r.flags = flags;
            }
            Command::BindMethod { user, method, channel } => {
                set(&mut r, 0, user, method, 0, 0);
                r.code.set(channel as u16);
            }
            Command::TopUpBegin { id, user, method, fen } => set(&mut r, id, user, method, fen, 0),
            Command::TopUpConfirm { id, fen, channel_txn, paid_by } => {
                set(&mut r, id, 0, 0, fen, paid_by);
                r.text = channel_txn;
            }
            Command::TopUpFail { id, reason } => {
                set(&mut r, id, 0, 0, 0, 0);
                r.code.set(reason as u16);
            }
            Command::Tip { id, from, to, coins } => set(&mut r, id, from, to, coins, 0),
            Command::Gift { id, from, to, gift, count } => set(&mut r, id, from, to, count, gift),
            Command::PayEvent { id, from, to, event, coins } => set(&mut r, id, from, to, coins, event),
            Command::Settle { id, account } => set(&mut r, id, account, 0, 0, 0),
            Command::SetDailyCap { user, coins } => set(&mut r, 0, user, 0, coins, 0),
            Command::Freeze { account, .. } => set(&mut r, 0, account, 0, 0, 0),
            Command::Tick => {}
            Command::ReplicaCreate { account, kind, flags, union, origin } => {
                set(&mut r, account, 0, union, origin.shard as u64, origin.seq);
                r.code.set(kind as u16);
                r.flags = flags;
            }
            Command::ReplicaFreeze { account, frozen, origin } => {
                set(&mut r, 0, account, 0, origin.shard as u64, origin.seq);
                r.flags = frozen as u8;
            }
            Command::ReplicaSettle { id, account, origin } => {
                set(&mut r, id, account, 0, origin.shard as u64, origin.seq)
            }
            Command::SettleTotal { id, total, shards, at } => set(&mut r, id, total as u64, shards as u64, at, 0),
        }
        r
    }
}

/// Largest coin amount in one command (10^12 coins = 100 billion yuan): sums of these over a
/// shard's lifetime stay far below `i64::MAX`.
pub const COINS_MAX: u64 = 1_000_000_000_000;
/// Largest gift count in one purchase.
pub const GIFT_COUNT_MAX: u64 = 100_000;

fn check_id(id: u64) -> Result<(), Status> {
    if id == 0 || id >= RESERVED_ID_MIN {
        Err(Status::InvalidId)
    } else {
        Ok(())
    }
}

fn check_amount(amount: u64, max: u64) -> Result<(), Status> {
    if amount == 0 || amount > max {
        Err(Status::InvalidAmount)
    } else {
        Ok(())
    }
}
