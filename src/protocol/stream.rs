//! Whole frames over an async byte stream.
//!
//! `FrameReader` buffers bytes from any `AsyncRead` and yields decoded frames; `FrameWriter`
//! encodes frames into one buffer and writes it with as few syscalls as possible. Server and
//! client both use them, so framing lives in exactly one place.
//!
//! What must never happen here: timeouts or connection policy (the callers wrap these calls), or
//! returning a frame whose bytes did not fully validate.

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::codec::{decode, Frame};
use super::frame::{check, Check, FrameHeader, FrameKind, ProtocolError, HEADER_SIZE};
use zerocopy::FromBytes;

/// Why `FrameReader::read_frame` failed.
#[derive(Debug)]
#[non_exhaustive]
pub enum FrameReadError {
    /// The socket failed.
    Io(std::io::Error),
    /// The bytes are not a valid frame; the stream cannot be resynchronised.
    Protocol(ProtocolError),
    /// The peer closed the stream in the middle of a frame.
    TruncatedFrame { buffered: usize },
    /// `read_frame_of` was given a header of another kind (its body was not read).
    UnexpectedKind { kind: u16, request_id: u64 },
}

impl core::fmt::Display for FrameReadError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            FrameReadError::Io(error) => write!(f, "io: {error}"),
            FrameReadError::Protocol(error) => write!(f, "protocol: {error}"),
            FrameReadError::TruncatedFrame { buffered } => {
                write!(f, "connection closed in the middle of a frame ({buffered} bytes buffered)")
            }
            FrameReadError::UnexpectedKind { kind, request_id } => {
                write!(f, "a frame of kind {kind} (request {request_id}) where another kind was expected")
            }
        }
    }
}

impl std::error::Error for FrameReadError {}

/// Initial read buffer: enough for a few pipelined frames of a typical batch size.
const READ_BUFFER_INITIAL: usize = 64 * 1024;
/// Consumed bytes at the front of the buffer are only reclaimed past this mark, so that many
/// small pipelined frames do not each cost a memmove of the rest of the buffer.
const COMPACT_THRESHOLD: usize = 64 * 1024;
/// A buffer grown past this by a large frame (up to about twice `FRAME_BYTES_MAX`) goes back to
/// `READ_BUFFER_INITIAL` once it is empty, so an idle connection keeps at most this much. Storm
/// frames (a few tens of KiB, pipelined) never grow it this far.
const KEEP_CAPACITY_MAX: usize = 256 * 1024;

/// Reads frames from a byte stream.
pub struct FrameReader<R> {
    reader: R,
    buffer: Vec<u8>,
    /// Start of the unconsumed bytes in `buffer`.
    start: usize,
    bytes_read: u64,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    pub fn new(reader: R) -> FrameReader<R> {
        FrameReader { reader, buffer: Vec::with_capacity(READ_BUFFER_INITIAL), start: 0, bytes_read: 0 }
    }

    /// Total bytes read from the stream so far.
    pub fn bytes_read(&self) -> u64 {
        self.bytes_read
    }

    /// True if bytes of a not yet complete frame are buffered.
    pub fn has_partial_frame(&self) -> bool {
        self.start < self.buffer.len()
    }

    /// The next frame. `Ok(None)` when the peer closed the stream cleanly between frames.
    ///
    /// Cancel safe: if the future is dropped, buffered bytes are kept and the next call resumes.
    pub async fn read_frame(&mut self) -> Result<Option<Frame>, FrameReadError> {
        self.read_frame_filtered(None).await
    }

    /// `read_frame` where only a frame of `kind` may come (the handshake's Hello): a valid header
    /// of another kind is answered `UnexpectedKind` as soon as it arrives, before its body is
    /// read, so a peer that has not authenticated cannot make the reader buffer a large body.
    /// Cancel safe, as `read_frame`.
    pub async fn read_frame_of(&mut self, kind: FrameKind) -> Result<Option<Frame>, FrameReadError> {
        self.read_frame_filtered(Some(kind as u16)).await
    }

    async fn read_frame_filtered(&mut self, only: Option<u16>) -> Result<Option<Frame>, FrameReadError> {
        loop {
            let unconsumed = self.buffer.get(self.start..).unwrap_or_default();
            // The header is validated as soon as it arrives (inside `check`), so an oversized or
            // malformed frame is refused before its body is read.
            let checked = check(unconsumed).map_err(FrameReadError::Protocol)?;
            // Only in the handshake (`only`): every other frame's header is parsed once, by `check`.
            if let Some(only) = only {
                // Checked: `check` validated the header (or it would have failed above).
                if let Ok((header, _)) = FrameHeader::read_from_prefix(unconsumed) {
                    if header.kind.get() != only {
                        return Err(FrameReadError::UnexpectedKind {
                            kind: header.kind.get(),
                            request_id: header.request_id.get(),
                        });
                    }
                }
            }
            let needed = match checked {
                Check::Complete { .. } => {
                    let (frame, len) = match decode(unconsumed).map_err(FrameReadError::Protocol)? {
                        Some(decoded) => decoded,
                        // `check` said complete; decode agrees by construction.
                        None => continue,
                    };
                    self.consume(len);
                    return Ok(Some(frame));
                }
                Check::Incomplete { needed } => needed.max(HEADER_SIZE),
            };
            self.compact();
            let have = self.buffer.len() - self.start;
            self.buffer.reserve(needed.saturating_sub(have).max(READ_BUFFER_INITIAL / 4));
            let read = self.reader.read_buf(&mut self.buffer).await.map_err(FrameReadError::Io)?;
            if read == 0 {
                let buffered = self.buffer.len() - self.start;
                return if buffered == 0 { Ok(None) } else { Err(FrameReadError::TruncatedFrame { buffered }) };
            }
            self.bytes_read += read as u64;
        }
    }

    fn consume(&mut self, len: usize) {
        self.start += len;
        if self.start == self.buffer.len() {
            self.buffer.clear();
            self.start = 0;
            if self.buffer.capacity() > KEEP_CAPACITY_MAX {
                self.buffer = Vec::with_capacity(READ_BUFFER_INITIAL);
            }
        }
    }

    fn compact(&mut self) {
        if self.start >= COMPACT_THRESHOLD || (self.start > 0 && self.buffer.len() == self.buffer.capacity()) {
            self.buffer.drain(..self.start);
            self.start = 0;
        }
    }
}

/// Encodes frames into a buffer and writes them.
pub struct FrameWriter<W> {
    writer: W,
    buffer: Vec<u8>,
    bytes_written: u64,
}

impl<W: AsyncWrite + Unpin> FrameWriter<W> {
    pub fn new(writer: W) -> FrameWriter<W> {
        FrameWriter { writer, buffer: Vec::with_capacity(READ_BUFFER_INITIAL), bytes_written: 0 }
    }

    /// Encodes `frame` into the pending buffer without writing. Call `flush` to send.
    pub fn queue(&mut self, frame: &Frame) -> Result<(), ProtocolError> {
        frame.encode(&mut self.buffer)
    }

    /// Bytes queued and not yet written.
    pub fn queued_len(&self) -> usize {
        self.buffer.len()
    }

    /// Total bytes written to the stream so far.
    pub fn bytes_written(&self) -> u64 {
        self.bytes_written
    }

    /// Writes everything queued and flushes the stream.
    ///
    /// Not cancel safe: if dropped mid-write the stream may hold part of a frame; callers that
    /// time out a flush must abandon the connection.
    pub async fn flush(&mut self) -> std::io::Result<()> {
        if !self.buffer.is_empty() {
            self.writer.write_all(&self.buffer).await?;
            self.bytes_written += self.buffer.len() as u64;
            self.buffer.clear();
        }
        self.writer.flush().await
    }

    /// Queues and flushes one frame.
    pub async fn write_frame(&mut self, frame: &Frame) -> std::io::Result<()> {
        self.queue(frame).map_err(|error| std::io::Error::new(std::io::ErrorKind::InvalidInput, error))?;
        self.flush().await
    }

    /// Shuts down the write side of the stream (the peer reads end-of-stream).
    pub async fn shutdown(&mut self) -> std::io::Result<()> {
        self.writer.shutdown().await
    }

    pub fn get_mut(&mut self) -> &mut W {
        &mut self.writer
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::layout::CommandRecord;
    use crate::protocol::codec::Payload;
    use crate::protocol::frame::COMMANDS_PER_FRAME_MAX;

    #[test]
    fn the_read_buffer_shrinks_back_after_a_large_frame() {
        let large = Frame::new(1, Payload::Commands(vec![CommandRecord::default(); COMMANDS_PER_FRAME_MAX]));
        let small = Frame::new(2, Payload::Commands(vec![CommandRecord::default(); 4]));
        let mut bytes = Vec::new();
        large.encode(&mut bytes).unwrap();
        small.encode(&mut bytes).unwrap();
        let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
        runtime.block_on(async {
            assert!(bytes.len() > 2 * KEEP_CAPACITY_MAX, "the large frame grows the buffer past the mark");
            let mut reader = FrameReader::new(&bytes[..]);
            assert_eq!(reader.read_frame().await.unwrap(), Some(large));
            assert_eq!(reader.read_frame().await.unwrap(), Some(small));
            assert!(reader.buffer.capacity() <= KEEP_CAPACITY_MAX, "kept {} bytes", reader.buffer.capacity());
            assert_eq!(reader.read_frame().await.unwrap(), None);
        });
    }
}
