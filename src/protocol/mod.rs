//! The wire protocol: the only module that knows how bytes on a socket are laid out.
//!
//! - `frame`: the 40-byte frame header, frame kinds, limits, the cheap completeness check
//!   (`check`) and the typed `ProtocolError`.
//! - `codec`: frame bodies (`Payload`) to and from bytes: the records of `crate::layout` plus the
//!   few protocol-only records (hello, auth-ok, error, answer index).
//! - `stream`: buffered async reading and writing of whole frames over any `AsyncRead`/`AsyncWrite`.
//!
//! What must never happen here: knowledge of what a command *means* (that is `ledger`), any
//! policy about connections (that is `server` and `client`), or a panic on peer input. Every
//! byte that arrives is untrusted, so indexing and unwrapping are denied in this module: a
//! malformed frame is a `ProtocolError`, never a crash, and never a partially decoded batch.
//! `docs/protocol.md` is the normative description; keep it and this module in step.

#![deny(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, clippy::panic)]

pub mod codec;
pub mod frame;
pub mod stream;

pub use codec::{
    answers_body_len, decode, AnswerIndexRecord, AuthOk, AuthOkRecord, ErrorBody, ErrorCode, ErrorRecord, Frame, Hello,
    HelloRecord, Payload, QueryAnswer, Role, ERROR_MESSAGE_LEN, QUERY_KIND_BALANCE, QUERY_KIND_HISTORY,
    QUERY_KIND_LOOKUP, QUERY_KIND_TOPUP_STATUS, TOKEN_LEN_MAX,
};
pub use frame::{
    check, Check, FrameHeader, FrameKind, ProtocolError, BODY_BYTES_MAX, COMMANDS_PER_FRAME_MAX, EVENTS_PER_FRAME_MAX,
    FRAME_BYTES_MAX, HEADER_SIZE, MAGIC, PROTOCOL_VERSION, QUERIES_PER_FRAME_MAX, WATCH_RECORDS_MAX,
};
pub use stream::{FrameReadError, FrameReader, FrameWriter};
