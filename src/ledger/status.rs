//! Every outcome a command or read can have, as a value with a stable numeric code.
//!
//! Business outcomes are never `Err`: a rejected tip is a `Status`, logged and replayed like an
//! accepted one. Codes are part of the wire protocol and the log format: never renumber, only add.

macro_rules! statuses {
    ($( $(#[$doc:meta])* $name:ident = $code:literal, $text:literal; )*) => {
        /// The result of a command. `Ok` is the only accepting status.
        #[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, PartialOrd, Ord)]
        #[repr(u16)]
        pub enum Status { $( $(#[$doc])* $name = $code, )* }

        impl Status {
            /// All statuses, in code order (for docs and tests).
            pub const ALL: &'static [Status] = &[ $( Status::$name, )* ];

            /// The stable snake_case name printed by the CLI and in JSON.
            pub const fn name(self) -> &'static str {
                match self { $( Status::$name => $text, )* }
            }

            /// Parses a wire code; `None` for a code this version does not know.
            pub const fn from_code(code: u16) -> Option<Status> {
                match code { $( $code => Some(Status::$name), )* _ => None }
            }

            /// Parses the snake_case name.
            pub fn from_name(name: &str) -> Option<Status> {
                match name { $( $text => Some(Status::$name), )* _ => None }
            }
        }
    };
}

statuses! {
    /// Accepted and applied (or, for a read, found).
    Ok = 0, "ok";
    /// The id was already used by a command with different content; nothing changed.
    ExistsWithDifferentFields = 1, "exists_with_different_fields";
    /// A read of something that does not exist.
    NotFound = 2, "not_found";
    /// The shard's queue is full: back-pressure. Nothing changed; retry later with the same id.
    Busy = 3, "busy";
    /// Writes are paused by the operator; reads keep working. Nothing changed.
    Maintenance = 4, "maintenance";
    /// The shard's log failed (IO error); it accepts no writes until restart. Not applied then;
    /// retry with the same id (after a restart it may turn out applied: docs/protocol.md).
    Unavailable = 5, "unavailable";
    /// The id is zero or in the range reserved for system accounts.
    InvalidId = 6, "invalid_id";
    /// Zero, negative, overflowing, or with more decimal places than the currency allows.
    InvalidAmount = 7, "invalid_amount";
    /// Unknown command kind, account kind, channel or reason code.
    InvalidKind = 8, "invalid_kind";
    /// The operation needs the admin role.
    Unauthorized = 9, "unauthorized";
    /// The paying (or target) account does not exist.
    AccountNotFound = 10, "account_not_found";
    /// The receiving account (streamer, union) does not exist.
    CounterpartyNotFound = 11, "counterparty_not_found";
    /// The account exists but is of the wrong kind for this command.
    WrongAccountKind = 12, "wrong_account_kind";
    /// The paying (or target) account is frozen.
    AccountFrozen = 13, "account_frozen";
    /// The receiving account is frozen.
    CounterpartyFrozen = 14, "counterparty_frozen";
    /// The balance is lower than the amount; the reply carries the balance.
    InsufficientFunds = 15, "insufficient_funds";
    /// The user has not completed real-name verification.
    UserNotVerified = 16, "user_not_verified";
    /// The user is a minor: no top-ups, no spending.
    UserIsMinor = 17, "user_is_minor";
    /// The single tip is above the per-tip maximum.
    ExceedsTipMax = 18, "exceeds_tip_max";
    /// The user's spend today would exceed their daily cap; the reply carries what is left.
    ExceedsDailyCap = 19, "exceeds_daily_cap";
    /// The top-up names a payment method that is not bound to this user.
    MethodNotBound = 20, "method_not_bound";
    /// The user already has the maximum number of bound payment methods.
    TooManyMethods = 21, "too_many_methods";
    /// The amount is neither a preset pack nor within the custom range.
    AmountNotAllowed = 22, "amount_not_allowed";
    /// The yuan amount does not convert to a whole number of coins.
    AmountNotCoinMultiple = 23, "amount_not_coin_multiple";
    /// The channel's confirmation names a different amount than the pending top-up.
    AmountMismatch = 24, "amount_mismatch";
    /// The top-up already succeeded: it cannot fail or be refunded.
    TopUpAlreadySucceeded = 25, "topup_already_succeeded";
    /// The channel confirmed a top-up that had already failed or expired: the money was
    /// recorded and refunded to the channel; the wallet was not credited.
    TopUpRefunded = 26, "topup_refunded";
    /// The top-up had already failed or expired.
    TopUpNotPending = 27, "topup_not_pending";
    /// The gift id is not in the catalog.
    GiftNotFound = 28, "gift_not_found";
    /// The union named for a streamer does not exist.
    UnionNotFound = 29, "union_not_found";
    /// A balance would overflow its integer range.
    Overflow = 30, "overflow";
    /// The shard has no room for another account (configured capacity).
    CapacityExhausted = 31, "capacity_exhausted";
    /// The command says it was first sent before the oldest id the shard still remembers, and
    /// its id is not remembered: an earlier attempt may have been applied and forgotten, so it
    /// is refused rather than risk applying it twice. Nothing changed; check with `lookup`
    /// or the account history before sending it again under a new id.
    IdExpired = 32, "id_expired";
    /// A top-up's confirmation says the channel was paid before the top-up was begun (by more
    /// than `PAID_BY_SKEW_NS` of clock skew): a payment time in the wrong unit (seconds,
    /// milliseconds) or a clock far behind. Nothing changed; fix the time and retry.
    InvalidPaidBy = 33, "invalid_paid_by";
}

impl Status {
    /// The wire code.
    pub const fn code(self) -> u16 {
        self as u16
    }

    /// A retry with the same id may succeed later: the command was not applied then (after a
    /// restart an `unavailable` one may turn out applied; the retry then gets its answer).
    pub const fn is_retryable(self) -> bool {
        matches!(self, Status::Busy | Status::Maintenance | Status::Unavailable)
    }
}

impl core::fmt::Display for Status {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(self.name())
    }
}
