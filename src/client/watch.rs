//! Following the event feed: one dedicated connection per subscription.
//!
//! `Watcher::connect` authenticates, sends one `Watch` frame and reads the server's
//! acknowledgement (the resolved start position of every shard). `next` then yields the events
//! of each `Event` frame, oldest first per shard, and keeps the cursor: after any error, a new
//! `Watcher` from `cursor()` resumes with no gap and no duplicate (or is told
//! `position_too_old` when the server no longer retains that position).

use tokio::net::ToSocketAddrs;

use super::{ClientConfig, ClientError, ReadHalf, WriteHalf};
use crate::feed::{watch_mode, watch_record, Cursor, Position, ALL_SHARDS};
use crate::layout::EventRecord;
use crate::protocol::{Frame, FrameReader, FrameWriter, Payload, ProtocolError};

/// Where a subscription starts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WatchFrom {
    /// Only events committed from now on.
    Now,
    /// Every event the server still retains.
    Earliest,
    /// Strictly after this cursor (shards it does not name start from now).
    After(Cursor),
}

/// A subscription to the event feed.
pub struct Watcher {
    reader: FrameReader<ReadHalf>,
    // Kept open: closing the write side would end the subscription.
    _writer: FrameWriter<WriteHalf>,
    cursor: Cursor,
}

impl Watcher {
    /// Connects, authenticates and subscribes.
    pub async fn connect(
        addr: impl ToSocketAddrs,
        config: &ClientConfig,
        from: WatchFrom,
    ) -> Result<Watcher, ClientError> {
        let timeout = config.connect_timeout;
        tokio::time::timeout(timeout, Watcher::subscribe(addr, config, from))
            .await
            .map_err(|_| ClientError::from(std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out")))?
    }

    async fn subscribe(
        addr: impl ToSocketAddrs,
        config: &ClientConfig,
        from: WatchFrom,
    ) -> Result<Watcher, ClientError> {
        if let WatchFrom::After(cursor) = &from {
            // One record a shard: more than a frame holds can never be sent (not worth a retry).
            if cursor.0.len() > crate::protocol::WATCH_RECORDS_MAX {
                return Err(ClientError::InvalidRequest("the cursor names more shards than a Watch frame holds"));
            }
        }
        let (mut reader, mut writer, _) = super::authenticate(addr, config).await?;
        let request = match &from {
            WatchFrom::Now => vec![watch_record(ALL_SHARDS, watch_mode::TAIL, Position::default())],
            WatchFrom::Earliest => vec![watch_record(ALL_SHARDS, watch_mode::EARLIEST, Position::default())],
            WatchFrom::After(cursor) if cursor.0.is_empty() => {
                vec![watch_record(ALL_SHARDS, watch_mode::TAIL, Position::default())]
            }
            WatchFrom::After(cursor) => cursor.to_records(),
        };
        writer.write_frame(&Frame::new(1, Payload::Watch(request))).await?;
        let cursor = match reader.read_frame().await? {
            Some(Frame { payload: Payload::Watch(records), .. }) => Cursor::from_records(&records),
            Some(Frame { payload: Payload::Error(error), .. }) => return Err(ClientError::Server(error)),
            Some(frame) => return Err(unexpected(frame)),
            None => return Err(ClientError::Closed),
        };
        Ok(Watcher { reader, _writer: writer, cursor })
    }

    /// The position after the last event returned (what to resume from).
    pub fn cursor(&self) -> &Cursor {
        &self.cursor
    }

    /// The next events (at least one). `Err(Server(_))` carries the server's reason
    /// (`subscriber_too_slow`, `shutting_down`, ...); `Err(Closed)` a disconnect.
    pub async fn next(&mut self) -> Result<Vec<EventRecord>, ClientError> {
        match self.reader.read_frame().await? {
            Some(Frame { payload: Payload::Event(events), .. }) => {
                for event in &events {
                    self.cursor.advance(event);
                }
                Ok(events)
            }
            Some(Frame { payload: Payload::Error(error), .. }) => Err(ClientError::Server(error)),
            Some(frame) => Err(unexpected(frame)),
            None => Err(ClientError::Closed),
        }
    }
}

fn unexpected(frame: Frame) -> ClientError {
    ClientError::Protocol(ProtocolError::UnexpectedFrame { kind: frame.payload.kind() as u16 })
}
