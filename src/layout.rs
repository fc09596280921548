//! Fixed-layout, little-endian command and reply records.
//!
//! These two structs are the only byte layouts of ledger commands: the write-ahead log stores
//! batches of `CommandRecord`s and the wire protocol carries the same records, so a command is
//! never re-encoded between the socket and the disk. Every field is an explicit little-endian
//! integer (`zerocopy::little_endian`), so the structs have alignment 1 and can be read in place
//! from any byte offset (a frame buffer or an mmap) without copying.
//!
//! What must never happen here: any knowledge of what a command *means*. The meaning of the
//! generic fields per kind is defined by `ledger::command` (`Command::to_record`/`from_record`).

use zerocopy::little_endian::{I64, U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

/// Size of one command record in bytes (checked at compile time below).
pub const COMMAND_RECORD_SIZE: usize = 80;
/// Size of one reply record in bytes (checked at compile time below).
pub const REPLY_RECORD_SIZE: usize = 32;
/// Maximum length of the channel transaction id carried by `topup confirm`.
pub const TEXT_LEN: usize = 24;

/// One command, as logged and as sent on the wire. 80 bytes.
///
/// ```text
/// offset size field
///  0     1    kind       CommandKind code
///  1     1    flags      per-kind bit flags
///  2     2    code       per-kind small code (account kind, channel, reason, ...)
///  4     4    reserved   zero
///  8     8    id         idempotency key (transfer id / top-up id / account id)
/// 16     8    a          per-kind (usually the paying or target account)
/// 24     8    b          per-kind (usually the receiving account or method)
/// 32     8    c          per-kind (usually an amount in minor units or coins)
/// 40     8    d          per-kind (gift id, count, event id, ...)
/// 48     8    timestamp  ns since the Unix epoch. On the wire: optional, when the client first
///                        sent this command (0 = not given; see `id_expired`). In the log: the
///                        ingest time the engine assigned.
/// 56    24    text       ASCII, zero padded (channel transaction id)
/// ```
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct CommandRecord {
    pub kind: u8,
    pub flags: u8,
    pub code: U16,
    pub reserved: U32,
    pub id: U64,
    pub a: U64,
    pub b: U64,
    pub c: U64,
    pub d: U64,
    pub timestamp: U64,
    pub text: [u8; TEXT_LEN],
}

/// One reply, as sent on the wire. 32 bytes.
///
/// ```text
/// offset size field
///  0     2    status     Status code (0 = ok)
///  2     1    kind       the CommandKind this answers
///  3     1    flags      bit 0: this is the original result of an earlier command (a retry)
///  4     4    reserved   zero
///  8     8    id         the command's id
/// 16     8    value      per-kind (balance after, amount moved, ...)
/// 24     8    value2     per-kind (second value: timestamp, state, ...)
/// ```
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct ReplyRecord {
    pub status: U16,
    pub kind: u8,
    pub flags: u8,
    pub reserved: U32,
    pub id: U64,
    pub value: I64,
    pub value2: I64,
}

const _: () = assert!(core::mem::size_of::<CommandRecord>() == COMMAND_RECORD_SIZE);
const _: () = assert!(core::mem::size_of::<ReplyRecord>() == REPLY_RECORD_SIZE);
const _: () = assert!(core::mem::align_of::<CommandRecord>() == 1);
const _: () = assert!(core::mem::align_of::<ReplyRecord>() == 1);

impl CommandRecord {
    /// The text field as a string slice, up to the first zero byte.
    pub fn text_str(&self) -> &str {
        let end = self.text.iter().position(|&b| b == 0).unwrap_or(TEXT_LEN);
        core::str::from_utf8(&self.text[..end]).unwrap_or("")
    }
}

/// Encodes `s` into a text field; `None` if it is longer than `TEXT_LEN` or not printable ASCII.
pub fn text_field(s: &str) -> Option<[u8; TEXT_LEN]> {
    if s.len() > TEXT_LEN || !s.bytes().all(|b| b.is_ascii_graphic()) {
        return None;
    }
    let mut out = [0u8; TEXT_LEN];
    out[..s.len()].copy_from_slice(s.as_bytes());
    Some(out)
}

/// Size of one query record in bytes.
pub const QUERY_RECORD_SIZE: usize = 32;
/// Size of one history record in bytes.
pub const HISTORY_RECORD_SIZE: usize = 64;

/// One read request (balance, history, lookup, top-up status). 32 bytes.
///
/// ```text
/// offset size field
///  0     1    kind       QueryKind code (1 balance, 2 history, 3 lookup, 4 top-up status)
///  1     3    reserved   zero
///  4     4    limit      history: maximum records to return
///  8     8    key        the account id (balance, history) or command id (lookup, top-up status)
/// 16     8    before_ts  history cursor: return records strictly older than (before_ts, before_shard);
///                        0 = start from the newest
/// 24     8    before_shard
/// ```
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct QueryRecord {
    pub kind: u8,
    pub reserved: [u8; 3],
    pub limit: U32,
    pub key: U64,
    pub before_ts: U64,
    pub before_shard: U64,
}

/// One entry of an account's history, newest first in answers. 64 bytes.
///
/// ```text
/// offset size field
///  0     8    timestamp      when the command was applied (ns since epoch, assigned at ingest)
///  8     8    id             the command's id
/// 16     8    counterparty   the other account of the movement (0 if none)
/// 24     8    amount         signed change of this account (credit > 0, debit < 0; 0 if rejected)
/// 32     8    balance_after  this account's balance after the command (on its shard stripe for
///                            striped accounts)
/// 40     2    status         the command's Status code
/// 42     1    kind           the CommandKind code
/// 43     1    shard          the shard that applied it (part of the paging cursor)
/// 44     4    reserved       zero
/// 48     8    detail         per-kind (gift id, top-up amount in fen, ...)
/// 56     8    reserved2      zero
/// ```
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct HistoryRecord {
    pub timestamp: U64,
    pub id: U64,
    pub counterparty: U64,
    pub amount: I64,
    pub balance_after: I64,
    pub status: U16,
    pub kind: u8,
    pub shard: u8,
    pub reserved: U32,
    pub detail: U64,
    pub reserved2: U64,
}

const _: () = assert!(core::mem::size_of::<QueryRecord>() == QUERY_RECORD_SIZE);
const _: () = assert!(core::mem::size_of::<HistoryRecord>() == HISTORY_RECORD_SIZE);

/// Size of one event-feed record in bytes.
pub const EVENT_RECORD_SIZE: usize = 96;
/// Size of one watch-position record in bytes.
pub const WATCH_RECORD_SIZE: usize = 16;

/// One committed event of the feed (`crate::feed`), as kept in a shard's event ring and sent in
/// `Event` frames. 96 bytes. Per-kind meaning of the fields in `docs/protocol.md`.
///
/// ```text
/// offset size field
///  0     8    lsn             log position of the batch that committed the command
///  8     4    index           the command's index in that batch; (lsn, index) is the position
/// 12     2    shard           the shard that applied it
/// 14     1    kind            EventKind code (crate::feed::event_kind)
/// 15     1    reserved        zero
/// 16     8    timestamp       the command's ingest timestamp (ns since the Unix epoch)
/// 24     8    id              the command's id (transfer / top-up / settlement id)
/// 32     8    account         payer, top-up user or settled account
/// 40     8    counterparty    streamer (spends), 0 otherwise
/// 48     8    union           the streamer's union (spends), 0 if none
/// 56     8    amount          coins spent / fen of a top-up / coins swept
/// 64     8    streamer_share  spends: coins to the streamer; top-up succeeded: coins credited
/// 72     8    union_share     spends: coins to the union
/// 80     8    platform_share  spends: coins to the platform (the rounding remainder included)
/// 88     8    detail          gift id / event id / fail reason code / channel code
/// ```
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct EventRecord {
    pub lsn: U64,
    pub index: U32,
    pub shard: U16,
    pub kind: u8,
    pub reserved: u8,
    pub timestamp: U64,
    pub id: U64,
    pub account: U64,
    pub counterparty: U64,
    pub union: U64,
    pub amount: U64,
    pub streamer_share: U64,
    pub union_share: U64,
    pub platform_share: U64,
    pub detail: U64,
}

/// One shard's start position of a `Watch` request (and of the server's acknowledgement). 16 bytes.
///
/// ```text
/// offset size field
///  0     8    lsn      with index: the last position already seen (mode AFTER)
///  8     4    index
/// 12     2    shard    the shard, or 0xFFFF = every shard not listed otherwise
/// 14     1    mode     1 = after (lsn, index), 2 = from now (tail), 3 = earliest retained
/// 15     1    reserved zero
/// ```
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct WatchRecord {
    pub lsn: U64,
    pub index: U32,
    pub shard: U16,
    pub mode: u8,
    pub reserved: u8,
}

const _: () = assert!(core::mem::size_of::<EventRecord>() == EVENT_RECORD_SIZE);
const _: () = assert!(core::mem::size_of::<WatchRecord>() == WATCH_RECORD_SIZE);
