//! The frame header, frame kinds, protocol limits and the cheap completeness check.
//!
//! A frame is a fixed 40-byte little-endian header followed by a body of `body_len` bytes:
//!
//! ```text
//! offset size field
//!  0     4    magic        b"SLDG"
//!  4     2    version      PROTOCOL_VERSION (1)
//!  6     2    kind         FrameKind code
//!  8     2    flags        zero in version 1
//! 10     2    reserved     zero
//! 12     4    count        number of records in the body (per-kind meaning, see FrameKind)
//! 16     8    request_id   chosen by the requester, echoed in the answer
//! 24     4    body_len     bytes after the header
//! 28     4    body_crc     crc32c of the body (0 for an empty body)
//! 32     4    reserved2    zero
//! 36     4    header_crc   crc32c of header bytes 0..36
//! ```
//!
//! `check` looks only at the header, so a frame that is too large or inconsistent is refused
//! before its body is buffered. It never allocates and never reads past the header.
//!
//! What must never happen here: trusting any header field before magic, version and the header
//! checksum have been verified, and panicking on any input.

use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use crate::layout::{COMMAND_RECORD_SIZE, EVENT_RECORD_SIZE, QUERY_RECORD_SIZE, REPLY_RECORD_SIZE, WATCH_RECORD_SIZE};

/// The first four bytes of every frame. A peer that is not speaking this protocol (an HTTP
/// probe, a TLS client hello) is told apart immediately.
pub const MAGIC: [u8; 4] = *b"SLDG";
/// The protocol version this build speaks. Magic and version never move: a future version may
/// change everything after offset 6, so they are checked before anything else is trusted.
pub const PROTOCOL_VERSION: u16 = 1;
/// Size of the frame header in bytes.
pub const HEADER_SIZE: usize = 40;
/// Header bytes covered by `header_crc`: everything before the checksum itself.
const HEADER_CRC_COVERS: usize = 36;

/// Largest accepted body. 1 MiB holds a full batch of commands (8192 x 80 B = 640 KiB) with
/// room to spare, while bounding what one connection can make the server buffer.
pub const BODY_BYTES_MAX: usize = 1 << 20;
/// Largest frame on the wire, header included.
pub const FRAME_BYTES_MAX: usize = HEADER_SIZE + BODY_BYTES_MAX;
/// Most commands in one `Commands` frame (and so replies in one `Replies` frame). Large enough
/// to amortise a log append; small enough that one frame cannot monopolise a shard queue.
pub const COMMANDS_PER_FRAME_MAX: usize = 8192;
/// Most queries in one `Query` frame. Lower than for commands because every answer carries a
/// reply, an index entry and possibly a command record (144 B) and must fit in one frame.
pub const QUERIES_PER_FRAME_MAX: usize = 4096;
/// Most events in one `Event` frame (4096 x 96 B = 384 KiB).
pub const EVENTS_PER_FRAME_MAX: usize = 4096;
/// Most positions in one `Watch` frame: one per shard (at most 64) plus the default record.
pub const WATCH_RECORDS_MAX: usize = 65;

const _: () = assert!(core::mem::size_of::<FrameHeader>() == HEADER_SIZE);
const _: () = assert!(COMMANDS_PER_FRAME_MAX * COMMAND_RECORD_SIZE <= BODY_BYTES_MAX);
const _: () = assert!(COMMANDS_PER_FRAME_MAX * REPLY_RECORD_SIZE <= BODY_BYTES_MAX);
const _: () = assert!(QUERIES_PER_FRAME_MAX * QUERY_RECORD_SIZE <= BODY_BYTES_MAX);
// Every answer's fixed part (reply 32 + index 32 + lookup command 80) must fit for a full query frame.
const _: () = assert!(QUERIES_PER_FRAME_MAX * (32 + 32 + COMMAND_RECORD_SIZE) <= BODY_BYTES_MAX);
const _: () = assert!(FRAME_BYTES_MAX <= u32::MAX as usize);
const _: () = assert!(EVENTS_PER_FRAME_MAX * EVENT_RECORD_SIZE <= BODY_BYTES_MAX);

/// The fixed frame header. See the module docs for the byte diagram.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct FrameHeader {
    pub magic: [u8; 4],
    pub version: U16,
    pub kind: U16,
    pub flags: U16,
    pub reserved: U16,
    pub count: U32,
    pub request_id: U64,
    pub body_len: U32,
    pub body_crc: U32,
    pub reserved2: U32,
    pub header_crc: U32,
}

impl FrameHeader {
    /// A header for `kind` with the checksums filled in over `body`.
    pub fn new(kind: FrameKind, request_id: u64, count: u32, body: &[u8]) -> FrameHeader {
        let mut header = FrameHeader {
            magic: MAGIC,
            version: U16::new(PROTOCOL_VERSION),
            kind: U16::new(kind as u16),
            flags: U16::new(0),
            reserved: U16::new(0),
            count: U32::new(count),
            request_id: U64::new(request_id),
            // Callers never build bodies larger than BODY_BYTES_MAX (< u32::MAX); saturate rather
            // than wrap so a bug shows up as a refused frame, not a mis-framed stream.
            body_len: U32::new(u32::try_from(body.len()).unwrap_or(u32::MAX)),
            body_crc: U32::new(crc32c::crc32c(body)),
            reserved2: U32::new(0),
            header_crc: U32::new(0),
        };
        header.header_crc = U32::new(header.compute_crc());
        header
    }

    /// Recomputes `header_crc` after fields were changed (e.g. by a test crafting a bad frame).
    pub fn seal(&mut self) {
        self.header_crc = U32::new(self.compute_crc());
    }

    fn compute_crc(&self) -> u32 {
        let bytes = self.as_bytes();
        crc32c::crc32c(bytes.get(..HEADER_CRC_COVERS).unwrap_or(bytes))
    }

    /// The frame kind, if the code is one this version knows.
    pub fn frame_kind(&self) -> Option<FrameKind> {
        FrameKind::from_code(self.kind.get())
    }

    /// Total length of the frame on the wire (header + body).
    pub fn frame_len(&self) -> usize {
        HEADER_SIZE + self.body_len.get() as usize
    }
}

/// The kind of a frame. Codes are stable; new kinds need a new protocol version.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Hash)]
#[repr(u16)]
pub enum FrameKind {
    /// client -> server, first frame of a connection: token and requested role. count = 1.
    Hello = 1,
    /// server -> client: authentication succeeded; the session limits. count = 1.
    AuthOk = 2,
    /// server -> client: authentication failed; the server closes the connection. count = 1.
    AuthFailed = 3,
    /// client -> server: `count` CommandRecords (80 B each).
    Commands = 4,
    /// server -> client: `count` ReplyRecords (32 B each), one per command, same order.
    Replies = 5,
    /// client -> server: `count` QueryRecords (32 B each).
    Query = 6,
    /// server -> client: `count` answers, one per query, same order (variable layout).
    QueryAnswer = 7,
    /// either direction: a connection- or request-level error. count = 1.
    Error = 8,
    /// client -> server: subscribe to the event feed; `count` WatchRecords (16 B each), the start
    /// position per shard. server -> client: the subscription is accepted; the resolved start
    /// position of every shard. After it the connection only carries Event frames (and a final
    /// Error).
    Watch = 9,
    /// server -> client: `count` EventRecords (96 B each), committed events after the position.
    Event = 10,
    /// client -> server: liveness probe; empty body. Answered by `Pong` with the same request id.
    Ping = 11,
    /// server -> client: answer to `Ping`; empty body.
    Pong = 12,
}

impl FrameKind {
    /// The kind for a wire code, if known.
    pub fn from_code(code: u16) -> Option<FrameKind> {
        Some(match code {
            1 => FrameKind::Hello,
            2 => FrameKind::AuthOk,
            3 => FrameKind::AuthFailed,
            4 => FrameKind::Commands,
            5 => FrameKind::Replies,
            6 => FrameKind::Query,
            7 => FrameKind::QueryAnswer,
            8 => FrameKind::Error,
            9 => FrameKind::Watch,
            10 => FrameKind::Event,
            11 => FrameKind::Ping,
            12 => FrameKind::Pong,
            _ => return None,
        })
    }

    /// How `count` and `body_len` must relate for this kind, checkable from the header alone.
    fn shape(self) -> Shape {
        match self {
            FrameKind::Hello | FrameKind::AuthFailed | FrameKind::Error => Shape::One(128),
            FrameKind::AuthOk => Shape::One(32),
            FrameKind::Commands => Shape::Records { size: COMMAND_RECORD_SIZE, max: COMMANDS_PER_FRAME_MAX },
            FrameKind::Replies => Shape::Records { size: REPLY_RECORD_SIZE, max: COMMANDS_PER_FRAME_MAX },
            FrameKind::Query => Shape::Records { size: QUERY_RECORD_SIZE, max: QUERIES_PER_FRAME_MAX },
            // Each answer is at least a reply record and an index record; the exact length is
            // validated when the body is parsed.
            FrameKind::QueryAnswer => Shape::AtLeast { size: 64, max: QUERIES_PER_FRAME_MAX },
            FrameKind::Ping | FrameKind::Pong => Shape::Empty,
            FrameKind::Watch => Shape::Records { size: WATCH_RECORD_SIZE, max: WATCH_RECORDS_MAX },
            FrameKind::Event => Shape::Records { size: EVENT_RECORD_SIZE, max: EVENTS_PER_FRAME_MAX },
        }
    }
}

enum Shape {
    /// Exactly one record of this size.
    One(usize),
    /// 1..=max records of this size.
    Records { size: usize, max: usize },
    /// 1..=max entries of at least `size` bytes each.
    AtLeast { size: usize, max: usize },
    /// count = 0 and no body.
    Empty,
}

/// Why bytes from a peer are not a valid frame. Every variant is fatal for the connection: after
/// a framing error the receiver cannot know where the next frame starts, and after a checksum
/// error it cannot trust anything the peer sent.
#[derive(Clone, PartialEq, Eq, Debug)]
#[non_exhaustive]
pub enum ProtocolError {
    /// The first four bytes are not `MAGIC`: the peer does not speak this protocol.
    BadMagic { found: [u8; 4] },
    /// The peer speaks a protocol version this build does not.
    UnsupportedVersion { found: u16 },
    /// The header checksum does not match: the header is corrupt.
    HeaderChecksum,
    /// The body checksum does not match: the body is corrupt.
    BodyChecksum,
    /// The kind code is not defined in this version.
    UnknownKind { kind: u16 },
    /// The kind is reserved for a later version (the event feed) and not served.
    ReservedKind { kind: u16 },
    /// Flags or reserved header fields are not zero.
    ReservedBits,
    /// `body_len` exceeds `BODY_BYTES_MAX`.
    BodyTooLarge { body_len: usize, max: usize },
    /// `count` exceeds the per-kind maximum, or is zero where at least one record is required.
    BadCount { kind: u16, count: usize, max: usize },
    /// `body_len` does not match `count` records of the kind's record size.
    LengthMismatch { kind: u16, count: usize, body_len: usize },
    /// The body is the right size but its content violates the layout (e.g. a token length past
    /// the token field, an answer index that does not add up).
    InvalidBody { kind: u16, reason: &'static str },
    /// The frame is valid but not acceptable here (e.g. a server-to-client kind sent to the
    /// server, or a second Hello).
    UnexpectedFrame { kind: u16 },
}

impl core::fmt::Display for ProtocolError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            ProtocolError::BadMagic { found } => write!(f, "bad magic {found:02x?}"),
            ProtocolError::UnsupportedVersion { found } => {
                write!(f, "unsupported protocol version {found} (this side speaks {PROTOCOL_VERSION})")
            }
            ProtocolError::HeaderChecksum => write!(f, "header checksum mismatch"),
            ProtocolError::BodyChecksum => write!(f, "body checksum mismatch"),
            ProtocolError::UnknownKind { kind } => write!(f, "unknown frame kind {kind}"),
            ProtocolError::ReservedKind { kind } => {
                write!(f, "frame kind {kind} is reserved and not served")
            }
            ProtocolError::ReservedBits => {
                write!(f, "flags or reserved header fields are not zero")
            }
            ProtocolError::BodyTooLarge { body_len, max } => {
                write!(f, "body of {body_len} bytes exceeds {max}")
            }
            ProtocolError::BadCount { kind, count, max } => {
                write!(f, "record count {count} out of range 1..={max} for frame kind {kind}")
            }
            ProtocolError::LengthMismatch { kind, count, body_len } => {
                write!(f, "body of {body_len} bytes does not hold {count} records of frame kind {kind}")
            }
            ProtocolError::InvalidBody { kind, reason } => {
                write!(f, "invalid body for frame kind {kind}: {reason}")
            }
            ProtocolError::UnexpectedFrame { kind } => {
                write!(f, "frame kind {kind} not expected here")
            }
        }
    }
}

impl std::error::Error for ProtocolError {}

/// The result of the cheap completeness check.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Check {
    /// More bytes are needed; `needed` is the total length known so far (the header size until
    /// the header has arrived, then the whole frame). Use it to size the read buffer.
    Incomplete { needed: usize },
    /// A whole, header-valid frame of `len` bytes is at the start of the buffer.
    Complete { header: FrameHeader, len: usize },
}

/// Checks whether `buf` starts with a complete frame, validating everything the header alone can
/// tell: magic, version, header checksum, kind, reserved fields, size limits and the count/length
/// relation. The body checksum and body content are verified by `codec::decode`.
///
/// Errors are reported as soon as the header has arrived, so an oversized or inconsistent frame
/// is refused without waiting for (or buffering) its body.
pub fn check(buf: &[u8]) -> Result<Check, ProtocolError> {
    let Ok((header, _)) = FrameHeader::read_from_prefix(buf) else {
        return Ok(Check::Incomplete { needed: HEADER_SIZE });
    };
    validate_header(&header)?;
    let len = header.frame_len();
    if buf.len() < len {
        return Ok(Check::Incomplete { needed: len });
    }
    Ok(Check::Complete { header, len })
}

/// Header validation, in the order that makes each step's inputs trustworthy.
pub(crate) fn validate_header(header: &FrameHeader) -> Result<(), ProtocolError> {
    if header.magic != MAGIC {
        return Err(ProtocolError::BadMagic { found: header.magic });
    }
    let version = header.version.get();
    if version != PROTOCOL_VERSION {
        return Err(ProtocolError::UnsupportedVersion { found: version });
    }
    if header.header_crc.get() != header.compute_crc() {
        return Err(ProtocolError::HeaderChecksum);
    }
    let code = header.kind.get();
    let kind = FrameKind::from_code(code).ok_or(ProtocolError::UnknownKind { kind: code })?;
    // Version 1 defines no flags; rejecting unknown bits means a future flag that changes the
    // meaning of a frame can never be silently ignored by an old peer.
    if header.flags.get() != 0 || header.reserved.get() != 0 || header.reserved2.get() != 0 {
        return Err(ProtocolError::ReservedBits);
    }
    let body_len = header.body_len.get() as usize;
    if body_len > BODY_BYTES_MAX {
        return Err(ProtocolError::BodyTooLarge { body_len, max: BODY_BYTES_MAX });
    }
    let count = header.count.get() as usize;
    let mismatch = ProtocolError::LengthMismatch { kind: code, count, body_len };
    match kind.shape() {
        Shape::One(size) => {
            if count != 1 {
                return Err(ProtocolError::BadCount { kind: code, count, max: 1 });
            }
            if body_len != size {
                return Err(mismatch);
            }
        }
        Shape::Records { size, max } => {
            if count == 0 || count > max {
                return Err(ProtocolError::BadCount { kind: code, count, max });
            }
            // count <= max keeps this product far from overflow.
            if body_len != count * size {
                return Err(mismatch);
            }
        }
        Shape::AtLeast { size, max } => {
            if count == 0 || count > max {
                return Err(ProtocolError::BadCount { kind: code, count, max });
            }
            if body_len < count * size {
                return Err(mismatch);
            }
        }
        Shape::Empty => {
            if count != 0 {
                return Err(ProtocolError::BadCount { kind: code, count, max: 0 });
            }
            if body_len != 0 {
                return Err(mismatch);
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header_bytes(kind: FrameKind, count: u32, body: &[u8]) -> Vec<u8> {
        FrameHeader::new(kind, 7, count, body).as_bytes().to_vec()
    }

    #[test]
    fn incomplete_until_header_and_body_arrive() {
        let body = [0u8; 80];
        let mut bytes = header_bytes(FrameKind::Commands, 1, &body);
        bytes.extend_from_slice(&body);
        for cut in 0..HEADER_SIZE {
            assert_eq!(check(bytes.get(..cut).unwrap_or_default()), Ok(Check::Incomplete { needed: HEADER_SIZE }));
        }
        for cut in HEADER_SIZE..bytes.len() {
            assert_eq!(check(bytes.get(..cut).unwrap_or_default()), Ok(Check::Incomplete { needed: 120 }));
        }
        assert!(matches!(check(&bytes), Ok(Check::Complete { len: 120, .. })));
    }

    #[test]
    fn oversize_is_refused_from_the_header_alone() {
        let mut header = FrameHeader::new(FrameKind::Commands, 1, 1, &[]);
        header.body_len = U32::new(u32::MAX);
        header.header_crc = U32::new(header.compute_crc());
        assert!(matches!(check(header.as_bytes()), Err(ProtocolError::BodyTooLarge { .. })));
    }

    #[test]
    fn every_kind_code_round_trips() {
        for code in 0..=u16::MAX {
            if let Some(kind) = FrameKind::from_code(code) {
                assert_eq!(kind as u16, code);
            }
        }
    }
}
