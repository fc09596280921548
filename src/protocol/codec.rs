//! Frame bodies to and from bytes.
//!
//! Commands, replies, queries and history entries travel as the fixed records of
//! `crate::layout`, byte for byte: a `Commands` body is exactly the slice of `CommandRecord`s the
//! log will store. This module adds the protocol-only records (hello, auth-ok, error and the
//! answer index of a `QueryAnswer`) and the `Frame`/`Payload` types the server and client use.
//!
//! What must never happen here: interpreting command kinds or statuses (that is `ledger`), or
//! returning any part of a frame whose checksum or layout is wrong. `decode` validates the whole
//! frame before it builds a single record, so a frame that fails to parse yields nothing.

use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use super::frame::{
    check, Check, FrameHeader, FrameKind, ProtocolError, BODY_BYTES_MAX, COMMANDS_PER_FRAME_MAX, EVENTS_PER_FRAME_MAX,
    HEADER_SIZE, QUERIES_PER_FRAME_MAX, WATCH_RECORDS_MAX,
};
use crate::layout::{
    CommandRecord, EventRecord, HistoryRecord, QueryRecord, ReplyRecord, WatchRecord, COMMAND_RECORD_SIZE,
    HISTORY_RECORD_SIZE,
};

/// Query kind codes (the `kind` byte of a `QueryRecord`). The server routes balance reads to the
/// lock-free read path and everything else to the engine; it needs no other knowledge of them.
pub const QUERY_KIND_BALANCE: u8 = 1;
/// History of an account, newest first, paged with (before_ts, before_shard).
pub const QUERY_KIND_HISTORY: u8 = 2;
/// One command's record and result, by its id.
pub const QUERY_KIND_LOOKUP: u8 = 3;
/// The state of a top-up, by its id.
pub const QUERY_KIND_TOPUP_STATUS: u8 = 4;

/// Longest token a `Hello` can carry.
pub const TOKEN_LEN_MAX: usize = 120;
/// Longest message an `Error`/`AuthFailed` frame can carry (longer messages are truncated at a
/// character boundary by the sender).
pub const ERROR_MESSAGE_LEN: usize = 120;

/// The role a connection asks for and is granted.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Hash)]
#[repr(u8)]
pub enum Role {
    /// Ordinary wallet traffic: all non-admin commands and all queries.
    Client = 1,
    /// Operator traffic: additionally the admin command kinds.
    Admin = 2,
}

impl Role {
    fn from_code(code: u8) -> Option<Role> {
        match code {
            1 => Some(Role::Client),
            2 => Some(Role::Admin),
            _ => None,
        }
    }
}

/// Body of `Hello`. 128 bytes.
///
/// ```text
/// offset size field
///  0     1    role       requested Role (1 client, 2 admin)
///  1     1    reserved   zero
///  2     2    token_len  bytes of token used, <= 120
///  4     4    reserved2  zero
///  8     120  token      the shared secret, zero padded
/// ```
#[derive(Clone, Copy, PartialEq, Eq, Debug, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct HelloRecord {
    pub role: u8,
    pub reserved: u8,
    pub token_len: U16,
    pub reserved2: U32,
    pub token: [u8; TOKEN_LEN_MAX],
}

/// Body of `AuthOk`: the granted role and the limits of this session. 32 bytes.
///
/// ```text
/// offset size field
///  0     1    role                     granted Role
///  1     3    reserved                 zero
///  4     4    in_flight_max            frames a client may have unanswered on this connection
///  8     4    body_bytes_max           BODY_BYTES_MAX of the server
/// 12     4    commands_per_frame_max   COMMANDS_PER_FRAME_MAX of the server
/// 16     4    queries_per_frame_max    QUERIES_PER_FRAME_MAX of the server
/// 20     4    reserved2                zero
/// 24     8    connection_id            server-assigned, for correlating logs
/// ```
#[derive(Clone, Copy, PartialEq, Eq, Debug, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct AuthOkRecord {
    pub role: u8,
    pub reserved: [u8; 3],
    pub in_flight_max: U32,
    pub body_bytes_max: U32,
    pub commands_per_frame_max: U32,
    pub queries_per_frame_max: U32,
    pub reserved2: U32,
    pub connection_id: U64,
}

/// Body of `Error` and `AuthFailed`. 128 bytes.
///
/// ```text
/// offset size field
///  0     2    code         ErrorCode
///  2     2    message_len  bytes of message used, <= 120
///  4     4    reserved     zero
///  8     120  message      UTF-8, zero padded, for humans only
/// ```
#[derive(Clone, Copy, PartialEq, Eq, Debug, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct ErrorRecord {
    pub code: U16,
    pub message_len: U16,
    pub reserved: U32,
    pub message: [u8; ERROR_MESSAGE_LEN],
}

/// One entry of the index of a `QueryAnswer`: where this answer's extra records are. 32 bytes.
///
/// ```text
/// offset size field
///  0     4    history_count     HistoryRecords belonging to this answer
///  4     1    has_command       1 if a CommandRecord (lookup) belongs to this answer, else 0
///  5     3    reserved          zero
///  8     8    next_before_ts    history paging cursor for the next page; 0 = no more pages
/// 16     8    next_before_shard
/// 24     8    reserved2         zero
/// ```
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct AnswerIndexRecord {
    pub history_count: U32,
    pub has_command: u8,
    pub reserved: [u8; 3],
    pub next_before_ts: U64,
    pub next_before_shard: U64,
    pub reserved2: U64,
}

const _: () = assert!(core::mem::size_of::<HelloRecord>() == 128);
const _: () = assert!(core::mem::size_of::<AuthOkRecord>() == 32);
const _: () = assert!(core::mem::size_of::<ErrorRecord>() == 128);
const _: () = assert!(core::mem::size_of::<AnswerIndexRecord>() == 32);
const REPLY_SIZE: usize = core::mem::size_of::<ReplyRecord>();
const INDEX_SIZE: usize = core::mem::size_of::<AnswerIndexRecord>();

/// Error codes of `Error` and `AuthFailed` frames. A newtype rather than an enum so that a code
/// added by a newer peer still decodes (and is shown as a number).
#[derive(Clone, Copy, PartialEq, Eq, Debug, Hash)]
pub struct ErrorCode(pub u16);

impl ErrorCode {
    pub const BAD_MAGIC: ErrorCode = ErrorCode(1);
    pub const UNSUPPORTED_VERSION: ErrorCode = ErrorCode(2);
    pub const HEADER_CHECKSUM: ErrorCode = ErrorCode(3);
    pub const BODY_CHECKSUM: ErrorCode = ErrorCode(4);
    pub const UNKNOWN_KIND: ErrorCode = ErrorCode(5);
    pub const RESERVED_KIND: ErrorCode = ErrorCode(6);
    pub const RESERVED_BITS: ErrorCode = ErrorCode(7);
    pub const FRAME_TOO_LARGE: ErrorCode = ErrorCode(8);
    pub const BAD_COUNT: ErrorCode = ErrorCode(9);
    pub const LENGTH_MISMATCH: ErrorCode = ErrorCode(10);
    pub const INVALID_BODY: ErrorCode = ErrorCode(11);
    pub const UNEXPECTED_FRAME: ErrorCode = ErrorCode(12);
    /// The first frame was not a Hello.
    pub const NOT_AUTHENTICATED: ErrorCode = ErrorCode(13);
    /// Wrong token, or the token does not permit the requested role.
    pub const AUTH_FAILED: ErrorCode = ErrorCode(14);
    /// A client-role connection sent an admin command kind. The frame was not submitted; the
    /// connection stays open.
    pub const FORBIDDEN: ErrorCode = ErrorCode(15);
    /// The connection limit is reached; the server closes the connection.
    pub const TOO_MANY_CONNECTIONS: ErrorCode = ErrorCode(16);
    /// Nothing was received or in flight for the idle timeout; the server closes the connection.
    pub const IDLE_TIMEOUT: ErrorCode = ErrorCode(17);
    /// The server failed to produce an answer for this request (a bug); its commands may or may
    /// not have been applied, so retry with the same ids.
    pub const INTERNAL: ErrorCode = ErrorCode(18);
    /// The server is shutting down.
    pub const SHUTTING_DOWN: ErrorCode = ErrorCode(19);
    /// Watch: the requested position is older than what the server retains; resync from
    /// balances and watch from now. The server closes the connection.
    pub const POSITION_TOO_OLD: ErrorCode = ErrorCode(20);
    /// Watch: the subscriber fell behind the server's event ring: the events after its last
    /// position are gone, so resuming from it would be `position_too_old`; resync from balances
    /// and watch from now. The server closes the connection.
    pub const SUBSCRIBER_TOO_SLOW: ErrorCode = ErrorCode(21);
    /// Watch: the position names a shard this server does not have, or an unknown mode.
    pub const INVALID_POSITION: ErrorCode = ErrorCode(22);
    /// Watch: this server has no event feed.
    pub const FEED_UNAVAILABLE: ErrorCode = ErrorCode(23);
    /// This connection must use TLS: the server serves TLS only, or it takes plaintext only from
    /// loopback peers. Sent in clear text before anything is read; the server closes.
    pub const TLS_REQUIRED: ErrorCode = ErrorCode(24);

    /// A stable snake_case name, for logs and the CLI.
    pub fn name(self) -> &'static str {
        match self.0 {
            1 => "bad_magic",
            2 => "unsupported_version",
            3 => "header_checksum",
            4 => "body_checksum",
            5 => "unknown_kind",
            6 => "reserved_kind",
            7 => "reserved_bits",
            8 => "frame_too_large",
            9 => "bad_count",
            10 => "length_mismatch",
            11 => "invalid_body",
            12 => "unexpected_frame",
            13 => "not_authenticated",
            14 => "auth_failed",
            15 => "forbidden",
            16 => "too_many_connections",
            17 => "idle_timeout",
            18 => "internal",
            19 => "shutting_down",
            20 => "position_too_old",
            21 => "subscriber_too_slow",
            22 => "invalid_position",
            23 => "feed_unavailable",
            24 => "tls_required",
            _ => "unknown_error",
        }
    }
}

impl core::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "{} ({})", self.name(), self.0)
    }
}

impl ProtocolError {
    /// The error code a receiver sends back before closing on this error.
    pub fn code(&self) -> ErrorCode {
        match self {
            ProtocolError::BadMagic { .. } => ErrorCode::BAD_MAGIC,
            ProtocolError::UnsupportedVersion { .. } => ErrorCode::UNSUPPORTED_VERSION,
            ProtocolError::HeaderChecksum => ErrorCode::HEADER_CHECKSUM,
            ProtocolError::BodyChecksum => ErrorCode::BODY_CHECKSUM,
            ProtocolError::UnknownKind { .. } => ErrorCode::UNKNOWN_KIND,
            ProtocolError::ReservedKind { .. } => ErrorCode::RESERVED_KIND,
            ProtocolError::ReservedBits => ErrorCode::RESERVED_BITS,
            ProtocolError::BodyTooLarge { .. } => ErrorCode::FRAME_TOO_LARGE,
            ProtocolError::BadCount { .. } => ErrorCode::BAD_COUNT,
            ProtocolError::LengthMismatch { .. } => ErrorCode::LENGTH_MISMATCH,
            ProtocolError::InvalidBody { .. } => ErrorCode::INVALID_BODY,
            ProtocolError::UnexpectedFrame { .. } => ErrorCode::UNEXPECTED_FRAME,
        }
    }
}

/// A decoded `Hello`.
#[derive(Clone, PartialEq, Eq)]
pub struct Hello {
    pub role: Role,
    pub token: Vec<u8>,
}

impl core::fmt::Debug for Hello {
    // The token is a secret: never let it reach a log through `{:?}`.
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Hello").field("role", &self.role).field("token", &"<redacted>").finish()
    }
}

/// A decoded `AuthOk`.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct AuthOk {
    pub role: Role,
    pub in_flight_max: u32,
    pub body_bytes_max: u32,
    pub commands_per_frame_max: u32,
    pub queries_per_frame_max: u32,
    pub connection_id: u64,
}

/// A decoded `Error` or `AuthFailed` body.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct ErrorBody {
    pub code: ErrorCode,
    pub message: String,
}

impl ErrorBody {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> ErrorBody {
        ErrorBody { code, message: message.into() }
    }
}

/// The answer to one query.
#[derive(Clone, PartialEq, Eq, Debug, Default)]
pub struct QueryAnswer {
    /// Status and values (balance: value = balance; top-up status: value = state; ...).
    pub reply: ReplyRecord,
    /// Lookup: the command as it was logged (with its ingest timestamp).
    pub command: Option<CommandRecord>,
    /// History: entries newest first.
    pub history: Vec<HistoryRecord>,
    /// History: cursor for the next page, to put in `before_ts`; 0 when there are no more.
    pub next_before_ts: u64,
    /// History: cursor for the next page, to put in `before_shard`.
    pub next_before_shard: u64,
}

impl QueryAnswer {
    /// An answer with only a reply record (balance, status, errors).
    pub fn reply(reply: ReplyRecord) -> QueryAnswer {
        QueryAnswer { reply, ..QueryAnswer::default() }
    }

    fn encoded_len(&self) -> usize {
        REPLY_SIZE
            + INDEX_SIZE
            + if self.command.is_some() { COMMAND_RECORD_SIZE } else { 0 }
            + self.history.len() * HISTORY_RECORD_SIZE
    }
}

/// Bytes a `QueryAnswer` frame needs for `answers` (body only).
pub fn answers_body_len(answers: &[QueryAnswer]) -> usize {
    answers.iter().map(QueryAnswer::encoded_len).sum()
}

/// The content of a frame.
#[derive(Clone, PartialEq, Eq, Debug)]
pub enum Payload {
    Hello(Hello),
    AuthOk(AuthOk),
    AuthFailed(ErrorBody),
    Commands(Vec<CommandRecord>),
    Replies(Vec<ReplyRecord>),
    Query(Vec<QueryRecord>),
    QueryAnswer(Vec<QueryAnswer>),
    Error(ErrorBody),
    Watch(Vec<WatchRecord>),
    Event(Vec<EventRecord>),
    Ping,
    Pong,
}

impl Payload {
    pub fn kind(&self) -> FrameKind {
        match self {
            Payload::Hello(_) => FrameKind::Hello,
            Payload::AuthOk(_) => FrameKind::AuthOk,
            Payload::AuthFailed(_) => FrameKind::AuthFailed,
            Payload::Commands(_) => FrameKind::Commands,
            Payload::Replies(_) => FrameKind::Replies,
            Payload::Query(_) => FrameKind::Query,
            Payload::QueryAnswer(_) => FrameKind::QueryAnswer,
            Payload::Error(_) => FrameKind::Error,
            Payload::Watch(_) => FrameKind::Watch,
            Payload::Event(_) => FrameKind::Event,
            Payload::Ping => FrameKind::Ping,
            Payload::Pong => FrameKind::Pong,
        }
    }
}

/// One frame: the requester's id (echoed in the answer) and the payload.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Frame {
    pub request_id: u64,
    pub payload: Payload,
}

impl Frame {
    pub fn new(request_id: u64, payload: Payload) -> Frame {
        Frame { request_id, payload }
    }

    /// Appends the frame's bytes to `out`.
    ///
    /// Refuses (and leaves `out` unchanged) a frame the receiver would reject: too many records,
    /// a body over `BODY_BYTES_MAX`, an over-long token. Encoding a frame the peer must refuse
    /// would only move the error to the other side of the connection and close it.
    pub fn encode(&self, out: &mut Vec<u8>) -> Result<(), ProtocolError> {
        let start = out.len();
        out.resize(start + HEADER_SIZE, 0);
        let count = match self.encode_body(out) {
            Ok(count) => count,
            Err(error) => {
                out.truncate(start);
                return Err(error);
            }
        };
        let body_start = start + HEADER_SIZE;
        let body = out.get(body_start..).unwrap_or_default();
        let kind = self.payload.kind();
        if body.len() > BODY_BYTES_MAX {
            let body_len = body.len();
            out.truncate(start);
            return Err(ProtocolError::BodyTooLarge { body_len, max: BODY_BYTES_MAX });
        }
        let header = FrameHeader::new(kind, self.request_id, count, body);
        if let Some(slot) = out.get_mut(start..body_start) {
            slot.copy_from_slice(header.as_bytes());
        }
        Ok(())
    }

    /// Appends the body, returns the header's record count.
    fn encode_body(&self, out: &mut Vec<u8>) -> Result<u32, ProtocolError> {
        let kind = self.payload.kind() as u16;
        let records = |count: usize, max: usize| -> Result<u32, ProtocolError> {
            if count == 0 || count > max {
                return Err(ProtocolError::BadCount { kind, count, max });
            }
            Ok(count as u32) // count <= max, which fits u32
        };
        match &self.payload {
            Payload::Hello(hello) => {
                let len = hello.token.len();
                let mut token = [0u8; TOKEN_LEN_MAX];
                let Some(dst) = token.get_mut(..len) else {
                    return Err(ProtocolError::InvalidBody { kind, reason: "token longer than 120 bytes" });
                };
                dst.copy_from_slice(&hello.token);
                let record = HelloRecord {
                    role: hello.role as u8,
                    reserved: 0,
                    token_len: U16::new(len as u16),
                    reserved2: U32::new(0),
                    token,
                };
                out.extend_from_slice(record.as_bytes());
                Ok(1)
            }
            Payload::AuthOk(ok) => {
                let record = AuthOkRecord {
                    role: ok.role as u8,
                    reserved: [0; 3],
                    in_flight_max: U32::new(ok.in_flight_max),
                    body_bytes_max: U32::new(ok.body_bytes_max),
                    commands_per_frame_max: U32::new(ok.commands_per_frame_max),
                    queries_per_frame_max: U32::new(ok.queries_per_frame_max),
                    reserved2: U32::new(0),
                    connection_id: U64::new(ok.connection_id),
                };
                out.extend_from_slice(record.as_bytes());
                Ok(1)
            }
            Payload::AuthFailed(error) | Payload::Error(error) => {
                out.extend_from_slice(error_record(error).as_bytes());
                Ok(1)
            }
            Payload::Commands(commands) => {
                let count = records(commands.len(), COMMANDS_PER_FRAME_MAX)?;
                out.extend_from_slice(commands.as_slice().as_bytes());
                Ok(count)
            }
            Payload::Replies(replies) => {
                let count = records(replies.len(), COMMANDS_PER_FRAME_MAX)?;
                out.extend_from_slice(replies.as_slice().as_bytes());
                Ok(count)
            }
            Payload::Query(queries) => {
                let count = records(queries.len(), QUERIES_PER_FRAME_MAX)?;
                out.extend_from_slice(queries.as_slice().as_bytes());
                Ok(count)
            }
            Payload::QueryAnswer(answers) => {
                let count = records(answers.len(), QUERIES_PER_FRAME_MAX)?;
                let body_len = answers_body_len(answers);
                if body_len > BODY_BYTES_MAX {
                    return Err(ProtocolError::BodyTooLarge { body_len, max: BODY_BYTES_MAX });
                }
                out.reserve(body_len);
                // Struct of arrays: all replies, then all index entries, then the lookup commands,
                // then the history entries, each in query order. Every array is a plain slice of
                // fixed records that a receiver can read in place.
                for answer in answers {
                    out.extend_from_slice(answer.reply.as_bytes());
                }
                for answer in answers {
                    let index = AnswerIndexRecord {
                        // history.len() <= BODY_BYTES_MAX / 64, checked above.
                        history_count: U32::new(answer.history.len() as u32),
                        has_command: u8::from(answer.command.is_some()),
                        reserved: [0; 3],
                        next_before_ts: U64::new(answer.next_before_ts),
                        next_before_shard: U64::new(answer.next_before_shard),
                        reserved2: U64::new(0),
                    };
                    out.extend_from_slice(index.as_bytes());
                }
                for command in answers.iter().filter_map(|a| a.command.as_ref()) {
                    out.extend_from_slice(command.as_bytes());
                }
                for answer in answers {
                    out.extend_from_slice(answer.history.as_slice().as_bytes());
                }
                Ok(count)
            }
            Payload::Watch(positions) => {
                let count = records(positions.len(), WATCH_RECORDS_MAX)?;
                out.extend_from_slice(positions.as_slice().as_bytes());
                Ok(count)
            }
            Payload::Event(events) => {
                let count = records(events.len(), EVENTS_PER_FRAME_MAX)?;
                out.extend_from_slice(events.as_slice().as_bytes());
                Ok(count)
            }
            Payload::Ping | Payload::Pong => Ok(0),
        }
    }
}

fn error_record(error: &ErrorBody) -> ErrorRecord {
    // Truncate at a character boundary so the receiver always sees valid UTF-8.
    let mut len = error.message.len().min(ERROR_MESSAGE_LEN);
    while !error.message.is_char_boundary(len) {
        len -= 1;
    }
    let mut message = [0u8; ERROR_MESSAGE_LEN];
    if let (Some(dst), Some(src)) = (message.get_mut(..len), error.message.as_bytes().get(..len)) {
        dst.copy_from_slice(src);
    }
    ErrorRecord { code: U16::new(error.code.0), message_len: U16::new(len as u16), reserved: U32::new(0), message }
}

/// Decodes the frame at the start of `buf`.
///
/// `Ok(None)`: more bytes are needed. `Ok(Some((frame, len)))`: a frame of `len` bytes was
/// decoded; the caller consumes `len` bytes. `Err`: the bytes are not a valid frame; nothing of
/// the frame is returned, and the stream cannot be resynchronised.
pub fn decode(buf: &[u8]) -> Result<Option<(Frame, usize)>, ProtocolError> {
    match check(buf)? {
        Check::Incomplete { .. } => Ok(None),
        Check::Complete { header, len } => {
            let body = buf.get(HEADER_SIZE..len).unwrap_or_default();
            let frame = decode_body(&header, body)?;
            Ok(Some((frame, len)))
        }
    }
}

/// Decodes a body whose header already passed `check`.
fn decode_body(header: &FrameHeader, body: &[u8]) -> Result<Frame, ProtocolError> {
    let code = header.kind.get();
    if crc32c::crc32c(body) != header.body_crc.get() {
        return Err(ProtocolError::BodyChecksum);
    }
    let invalid = |reason: &'static str| ProtocolError::InvalidBody { kind: code, reason };
    let mismatch =
        ProtocolError::LengthMismatch { kind: code, count: header.count.get() as usize, body_len: body.len() };
    let kind = header.frame_kind().ok_or(ProtocolError::UnknownKind { kind: code })?;
    let payload = match kind {
        FrameKind::Hello => {
            let record = HelloRecord::read_from_bytes(body).map_err(|_| mismatch.clone())?;
            let role = Role::from_code(record.role).ok_or(invalid("unknown role"))?;
            if record.reserved != 0 || record.reserved2.get() != 0 {
                return Err(invalid("reserved field not zero"));
            }
            let (token, padding) = record
                .token
                .split_at_checked(record.token_len.get() as usize)
                .ok_or(invalid("token_len past token"))?;
            // Zero padding keeps the encoding canonical: one frame, one byte string.
            if padding.iter().any(|&byte| byte != 0) {
                return Err(invalid("token padding not zero"));
            }
            Payload::Hello(Hello { role, token: token.to_vec() })
        }
        FrameKind::AuthOk => {
            let record = AuthOkRecord::read_from_bytes(body).map_err(|_| mismatch.clone())?;
            let role = Role::from_code(record.role).ok_or(invalid("unknown role"))?;
            if record.reserved != [0; 3] || record.reserved2.get() != 0 {
                return Err(invalid("reserved field not zero"));
            }
            Payload::AuthOk(AuthOk {
                role,
                in_flight_max: record.in_flight_max.get(),
                body_bytes_max: record.body_bytes_max.get(),
                commands_per_frame_max: record.commands_per_frame_max.get(),
                queries_per_frame_max: record.queries_per_frame_max.get(),
                connection_id: record.connection_id.get(),
            })
        }
        FrameKind::AuthFailed | FrameKind::Error => {
            let record = ErrorRecord::read_from_bytes(body).map_err(|_| mismatch.clone())?;
            let (bytes, padding) = record
                .message
                .split_at_checked(record.message_len.get() as usize)
                .ok_or(invalid("message_len past message"))?;
            if padding.iter().any(|&byte| byte != 0) || record.reserved.get() != 0 {
                return Err(invalid("message padding or reserved field not zero"));
            }
            let message = core::str::from_utf8(bytes).map_err(|_| invalid("message is not UTF-8"))?.to_owned();
            let error = ErrorBody { code: ErrorCode(record.code.get()), message };
            if kind == FrameKind::Error {
                Payload::Error(error)
            } else {
                Payload::AuthFailed(error)
            }
        }
        FrameKind::Commands => {
            Payload::Commands(<[CommandRecord]>::ref_from_bytes(body).map_err(|_| mismatch.clone())?.to_vec())
        }
        FrameKind::Replies => {
            Payload::Replies(<[ReplyRecord]>::ref_from_bytes(body).map_err(|_| mismatch.clone())?.to_vec())
        }
        FrameKind::Query => {
            Payload::Query(<[QueryRecord]>::ref_from_bytes(body).map_err(|_| mismatch.clone())?.to_vec())
        }
        FrameKind::QueryAnswer => Payload::QueryAnswer(decode_answers(header.count.get() as usize, body, code)?),
        FrameKind::Ping => Payload::Ping,
        FrameKind::Pong => Payload::Pong,
        FrameKind::Watch => {
            let records = <[WatchRecord]>::ref_from_bytes(body).map_err(|_| mismatch.clone())?;
            if records.iter().any(|r| r.reserved != 0) {
                return Err(invalid("reserved field not zero"));
            }
            Payload::Watch(records.to_vec())
        }
        FrameKind::Event => {
            let events = <[EventRecord]>::ref_from_bytes(body).map_err(|_| mismatch.clone())?;
            if events.iter().any(|e| e.reserved != 0) {
                return Err(invalid("reserved field not zero"));
            }
            Payload::Event(events.to_vec())
        }
    };
    Ok(Frame { request_id: header.request_id.get(), payload })
}

fn decode_answers(count: usize, body: &[u8], code: u16) -> Result<Vec<QueryAnswer>, ProtocolError> {
    let invalid = |reason: &'static str| ProtocolError::InvalidBody { kind: code, reason };
    let (replies, rest) =
        <[ReplyRecord]>::ref_from_prefix_with_elems(body, count).map_err(|_| invalid("short reply array"))?;
    let (index, rest) =
        <[AnswerIndexRecord]>::ref_from_prefix_with_elems(rest, count).map_err(|_| invalid("short index array"))?;
    // Validate the index completely before touching the variable part, so the lengths below are
    // known to add up exactly to the body.
    let mut commands_total = 0usize;
    let mut history_total = 0usize;
    for entry in index {
        if entry.has_command > 1 || entry.reserved != [0; 3] || entry.reserved2.get() != 0 {
            return Err(invalid("bad answer index entry"));
        }
        commands_total += usize::from(entry.has_command);
        history_total += entry.history_count.get() as usize;
        if history_total > BODY_BYTES_MAX / HISTORY_RECORD_SIZE {
            return Err(invalid("history count exceeds the body"));
        }
    }
    let (commands, rest) = <[CommandRecord]>::ref_from_prefix_with_elems(rest, commands_total)
        .map_err(|_| invalid("short command array"))?;
    let history = <[HistoryRecord]>::ref_from_bytes_with_elems(rest, history_total)
        .map_err(|_| invalid("history array does not match the body length"))?;

    let mut answers = Vec::with_capacity(count);
    let mut commands = commands.iter();
    let mut history = history;
    for (reply, entry) in replies.iter().zip(index) {
        let command = if entry.has_command == 1 { commands.next().copied() } else { None };
        let (mine, rest) = history.split_at_checked(entry.history_count.get() as usize).ok_or(invalid("history"))?;
        history = rest;
        answers.push(QueryAnswer {
            reply: *reply,
            command,
            history: mine.to_vec(),
            next_before_ts: entry.next_before_ts.get(),
            next_before_shard: entry.next_before_shard.get(),
        });
    }
    Ok(answers)
}

#[cfg(test)]
#[allow(clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    fn round_trip(frame: Frame) {
        let mut bytes = Vec::new();
        frame.encode(&mut bytes).expect("encodes");
        let (decoded, len) = decode(&bytes).expect("valid").expect("complete");
        assert_eq!(len, bytes.len());
        assert_eq!(decoded, frame);
    }

    #[test]
    fn every_payload_round_trips() {
        let command = CommandRecord { kind: 3, id: U64::new(42), ..CommandRecord::default() };
        let history = HistoryRecord { id: U64::new(9), ..HistoryRecord::default() };
        round_trip(Frame::new(1, Payload::Hello(Hello { role: Role::Admin, token: b"secret".to_vec() })));
        round_trip(Frame::new(
            0,
            Payload::AuthOk(AuthOk {
                role: Role::Client,
                in_flight_max: 64,
                body_bytes_max: 1 << 20,
                commands_per_frame_max: 8192,
                queries_per_frame_max: 4096,
                connection_id: 5,
            }),
        ));
        round_trip(Frame::new(0, Payload::AuthFailed(ErrorBody::new(ErrorCode::AUTH_FAILED, "no"))));
        round_trip(Frame::new(2, Payload::Commands(vec![command; 3])));
        round_trip(Frame::new(3, Payload::Replies(vec![ReplyRecord::default(); 2])));
        round_trip(Frame::new(4, Payload::Query(vec![QueryRecord::default(); 2])));
        round_trip(Frame::new(
            5,
            Payload::QueryAnswer(vec![
                QueryAnswer::reply(ReplyRecord::default()),
                QueryAnswer { command: Some(command), ..QueryAnswer::default() },
                QueryAnswer {
                    history: vec![history; 3],
                    next_before_ts: 77,
                    next_before_shard: 1,
                    ..QueryAnswer::default()
                },
                QueryAnswer { command: Some(command), history: vec![history], ..QueryAnswer::default() },
            ]),
        ));
        round_trip(Frame::new(6, Payload::Error(ErrorBody::new(ErrorCode::FORBIDDEN, "é".repeat(60)))));
        round_trip(Frame::new(8, Payload::Watch(vec![WatchRecord::default(); 2])));
        round_trip(Frame::new(9, Payload::Event(vec![EventRecord::default(); 3])));
        round_trip(Frame::new(7, Payload::Ping));
        round_trip(Frame::new(7, Payload::Pong));
    }

    #[test]
    fn reserved_fields_of_watch_and_event_records_must_be_zero() {
        let frames = [
            Frame::new(8, Payload::Watch(vec![WatchRecord { reserved: 1, ..WatchRecord::default() }])),
            Frame::new(9, Payload::Event(vec![EventRecord { reserved: 1, ..EventRecord::default() }])),
        ];
        for frame in frames {
            let mut bytes = Vec::new();
            frame.encode(&mut bytes).expect("encodes");
            assert!(matches!(decode(&bytes), Err(ProtocolError::InvalidBody { .. })), "{frame:?}");
        }
    }

    #[test]
    fn long_messages_are_truncated_at_a_char_boundary() {
        let mut bytes = Vec::new();
        Frame::new(0, Payload::Error(ErrorBody::new(ErrorCode::INTERNAL, "é".repeat(100))))
            .encode(&mut bytes)
            .expect("encodes");
        let (frame, _) = decode(&bytes).expect("valid").expect("complete");
        let Payload::Error(error) = frame.payload else { panic!("not an error frame") };
        assert_eq!(error.message, "é".repeat(60));
    }

    #[test]
    fn refuses_to_encode_what_the_peer_would_refuse() {
        let mut bytes = vec![1, 2, 3];
        let too_many = Frame::new(0, Payload::Commands(vec![CommandRecord::default(); COMMANDS_PER_FRAME_MAX + 1]));
        assert!(matches!(too_many.encode(&mut bytes), Err(ProtocolError::BadCount { .. })));
        let empty = Frame::new(0, Payload::Commands(vec![]));
        assert!(matches!(empty.encode(&mut bytes), Err(ProtocolError::BadCount { .. })));
        let token = Frame::new(0, Payload::Hello(Hello { role: Role::Client, token: vec![b'x'; 121] }));
        assert!(matches!(token.encode(&mut bytes), Err(ProtocolError::InvalidBody { .. })));
        let big =
            QueryAnswer { history: vec![HistoryRecord::default(); BODY_BYTES_MAX / 64], ..QueryAnswer::default() };
        assert!(matches!(
            Frame::new(0, Payload::QueryAnswer(vec![big])).encode(&mut bytes),
            Err(ProtocolError::BodyTooLarge { .. })
        ));
        assert_eq!(bytes, vec![1, 2, 3]);
    }
}
