//! One connection: handshake, then a reader task and a writer task joined by a bounded channel.
//!
//! In-flight accounting is the reply channel itself: before a frame is submitted the reader
//! reserves a slot in the channel (`reserve_owned`), and the slot travels with the request into
//! the backend callback. The callback fills the slot with `OwnedPermit::send`, which cannot block
//! and cannot fail, so engine threads never wait on a network task. A slot is free again once
//! the writer has taken the frame out of the channel.
//!
//! Memory accounting is in bytes, on top of that: before the slot, the reader takes the largest
//! answer the frame can have (`answer_bytes_max`) from the connection's budget and from the
//! server's (`Reservation`). The reservation travels with the slot; once the answer exists it
//! shrinks to the answer's size, and the writer gives it back only when the frame has been
//! written to the socket. So answers computed, queued or being written never exceed either
//! budget, whatever the client sends and however slowly it reads. When a slot or a budget is
//! not available the reader stops reading, and TCP flow control pushes back on the client.
//!
//! Before the handshake, `admit` decides the transport: TLS (`accept_tls`), plaintext, or a
//! `tls_required` refusal sent before anything is read. Everything after that is generic over
//! the stream, so TLS and plaintext connections run the same code.
//!
//! What must never happen here: submitting anything from a frame that failed to parse or failed
//! the role check, losing track of a submitted frame (a dropped callback answers `internal`), or
//! reading a token from a connection `admit` refused.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc::{self, OwnedPermit};
use tokio::sync::{oneshot, watch, OwnedSemaphorePermit, Semaphore};
use tokio::time::{timeout, timeout_at, Instant};
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

use super::stats::{add, ServerStats};
use super::Shared;
use crate::layout::{
    QueryRecord, ReplyRecord, COMMAND_RECORD_SIZE, EVENT_RECORD_SIZE, HISTORY_RECORD_SIZE, REPLY_RECORD_SIZE,
    WATCH_RECORD_SIZE,
};
use crate::protocol::{
    AnswerIndexRecord, AuthOk, ErrorBody, ErrorCode, Frame, FrameKind, FrameReadError, FrameReader, FrameWriter, Hello,
    Payload, ProtocolError, QueryAnswer, Role, BODY_BYTES_MAX, COMMANDS_PER_FRAME_MAX, QUERIES_PER_FRAME_MAX,
    QUERY_KIND_BALANCE, QUERY_KIND_HISTORY,
};

/// The writer batches queued replies into one write up to about this many bytes, so a burst of
/// small reply frames costs one syscall instead of one each.
const WRITE_BATCH_BYTES: usize = 256 * 1024;

/// What the writer's buffer keeps allocated between writes: a larger buffer (one big answer) is
/// given back after its write, so an idle connection does not keep the memory of its largest
/// answer.
const WRITE_BUFFER_KEPT: usize = 64 * 1024;

/// Events per `Event` frame of a watch stream (256 x 96 B = 24 KiB a frame). The frames queued
/// for the writer count against the answer budgets like any answer.
const WATCH_EVENTS_PER_FRAME: usize = 256;

/// What an answer frame counts against the budgets besides its records: the header, the frame
/// in the channel, an error message.
const FRAME_BYTES: usize = 256;

/// The encoded size of one query's answer without history entries, at most: reply, answer
/// index and lookup record.
const QUERY_ANSWER_FIXED_BYTES: usize =
    REPLY_RECORD_SIZE + core::mem::size_of::<AnswerIndexRecord>() + COMMAND_RECORD_SIZE;

/// What one query's answer counts besides its history entries: its size in memory or encoded,
/// whichever is larger.
const QUERY_ANSWER_BYTES: usize = if core::mem::size_of::<QueryAnswer>() > QUERY_ANSWER_FIXED_BYTES {
    core::mem::size_of::<QueryAnswer>()
} else {
    QUERY_ANSWER_FIXED_BYTES
};

/// The first byte of a TLS connection: a handshake record (the ClientHello). A plaintext
/// client's first byte is the frame magic's `S`.
const TLS_HANDSHAKE_RECORD: u8 = 0x16;

/// How a new connection is served, from its peer and the server's transport settings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Admission {
    /// TLS handshake first, then the protocol inside TLS.
    Tls,
    /// The protocol in clear text.
    Plaintext,
    /// Answer `tls_required` in clear text and close, reading nothing (so never the token).
    RefusePlaintext,
}

/// The transport rule. A TLS server does TLS with every peer (a client that starts in clear text
/// is refused once its first byte shows it). A plaintext server takes loopback peers, and other
/// peers only if the operator allowed it: their token would cross the network in clear text.
/// An IPv4 peer on a dual-stack socket (`::ffff:127.0.0.1`) counts as its IPv4 address.
pub(crate) fn admit(peer: IpAddr, tls: bool, allow_remote_plaintext: bool) -> Admission {
    if tls {
        Admission::Tls
    } else if peer.to_canonical().is_loopback() || allow_remote_plaintext {
        Admission::Plaintext
    } else {
        Admission::RefusePlaintext
    }
}

/// Answers a connection over the limit with `too_many_connections` and closes it. A TLS client
/// can only read the answer inside TLS, so on a TLS server the handshake (bounded by the
/// handshake timeout) comes first; if it fails the connection is just closed.
pub(super) async fn refuse(socket: TcpStream, shared: &Shared) {
    let error = ErrorBody::new(ErrorCode::TOO_MANY_CONNECTIONS, "connection limit reached; retry later");
    let frame = Frame::new(0, Payload::Error(error));
    match &shared.config.tls {
        None => close_with(&mut FrameWriter::new(socket), &frame, shared).await,
        Some(tls) => {
            let accept = TlsAcceptor::from(tls.clone()).accept(socket);
            match timeout(shared.config.handshake_timeout, accept).await {
                Ok(Ok(stream)) => close_with(&mut FrameWriter::new(stream), &frame, shared).await,
                _ => add(&shared.stats.tls_handshake_failures, 1),
            }
        }
    }
}

/// Serves one accepted connection to the end.
pub(super) async fn serve(
    socket: TcpStream,
    peer: SocketAddr,
    shared: Arc<Shared>,
    mut shutdown: watch::Receiver<bool>,
) {
    add(&shared.stats.connections_active, 1);
    // Replies are small and latency matters more than packet count; the writer already batches.
    let _ = socket.set_nodelay(true);
    // From accept to a valid Hello, the TLS handshake included.
    let deadline = Instant::now() + shared.config.handshake_timeout;
    match admit(peer.ip(), shared.config.tls.is_some(), shared.config.allow_remote_plaintext) {
        Admission::Plaintext => {
            let (read_half, write_half) = socket.into_split();
            serve_stream(read_half, write_half, deadline, &shared, shutdown).await;
        }
        Admission::RefusePlaintext => {
            let message = "plaintext is taken from loopback peers only: the server must serve TLS (--tls-cert) \
                           or allow it (--allow-remote)";
            refuse_plaintext(socket, message, &shared).await;
        }
        Admission::Tls => {
            if let Some(stream) = accept_tls(socket, deadline, &shared, &mut shutdown).await {
                let (read_half, write_half) = tokio::io::split(stream);
                serve_stream(read_half, write_half, deadline, &shared, shutdown).await;
            }
        }
    }
    shared.stats.connections_active.fetch_sub(1, Ordering::Relaxed);
}

/// The TLS handshake, by `deadline`. A client that starts in clear text is answered
/// `tls_required` in clear text (it could not read anything else) instead of a TLS alert.
async fn accept_tls(
    socket: TcpStream,
    deadline: Instant,
    shared: &Shared,
    shutdown: &mut watch::Receiver<bool>,
) -> Option<TlsStream<TcpStream>> {
    let tls = shared.config.tls.clone()?;
    let mut first = [0u8; 1];
    let peeked = tokio::select! {
        _ = shutdown.wait_for(|stop| *stop) => return None,
        peeked = timeout_at(deadline, socket.peek(&mut first)) => peeked,
    };
    match peeked {
        Ok(Ok(1..)) if first[0] == TLS_HANDSHAKE_RECORD => {}
        Ok(Ok(1..)) => {
            refuse_plaintext(socket, "this server takes TLS connections only", shared).await;
            return None;
        }
        // Closed, failed, or silent until the deadline, before starting a handshake.
        Ok(Ok(_)) | Ok(Err(_)) | Err(_) => return None,
    }
    let accepted = tokio::select! {
        _ = shutdown.wait_for(|stop| *stop) => return None,
        accepted = timeout_at(deadline, TlsAcceptor::from(tls).accept(socket)) => accepted,
    };
    match accepted {
        Ok(Ok(stream)) => Some(stream),
        Ok(Err(_)) | Err(_) => {
            add(&shared.stats.tls_handshake_failures, 1);
            None
        }
    }
}

/// Answers `tls_required` in clear text and closes, without reading anything the peer sent.
async fn refuse_plaintext(socket: TcpStream, message: &str, shared: &Shared) {
    add(&shared.stats.plaintext_refused, 1);
    let frame = Frame::new(0, Payload::Error(ErrorBody::new(ErrorCode::TLS_REQUIRED, message)));
    close_with(&mut FrameWriter::new(socket), &frame, shared).await;
}

/// The protocol over one (plaintext or TLS) byte stream, from the Hello on. Generic, so the
/// plaintext path keeps its own split halves and costs nothing extra.
async fn serve_stream<R, W>(
    read_half: R,
    write_half: W,
    deadline: Instant,
    shared: &Arc<Shared>,
    mut shutdown: watch::Receiver<bool>,
) where
    R: AsyncRead + Unpin + Send,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let mut reader = FrameReader::new(read_half);
    let mut writer = FrameWriter::new(write_half);
    let config = &shared.config;
    let stats = &shared.stats;

    // Handshake: the first frame must be a valid Hello with a valid token, within the timeout.
    let first = tokio::select! {
        _ = shutdown.wait_for(|stop| *stop) => return,
        // Only a Hello: another kind is refused from its header, its body unread.
        first = timeout_at(deadline, reader.read_frame_of(FrameKind::Hello)) => first,
    };
    let not_hello = |kind: u16, request_id: u64| {
        add(&stats.protocol_errors, 1);
        let message = format!("the first frame must be Hello, not kind {kind}");
        Err(Frame::new(request_id, Payload::Error(ErrorBody::new(ErrorCode::NOT_AUTHENTICATED, message))))
    };
    let hello_result = match first {
        Err(_elapsed) => return,
        Ok(Ok(None)) | Ok(Err(FrameReadError::Io(_))) | Ok(Err(FrameReadError::TruncatedFrame { .. })) => return,
        Ok(Err(FrameReadError::Protocol(error))) => Err(protocol_error_frame(&error, stats)),
        Ok(Err(FrameReadError::UnexpectedKind { kind, request_id })) => not_hello(kind, request_id),
        Ok(Ok(Some(frame))) => {
            add(&stats.frames_received, 1);
            match frame.payload {
                Payload::Hello(hello) => match authenticate(&hello, shared) {
                    Some(role) => Ok((role, frame.request_id)),
                    None => {
                        add(&stats.auth_failures, 1);
                        let error = ErrorBody::new(ErrorCode::AUTH_FAILED, "authentication failed");
                        Err(Frame::new(frame.request_id, Payload::AuthFailed(error)))
                    }
                },
                other => not_hello(other.kind() as u16, frame.request_id),
            }
        }
    };
    let (role, hello_id) = match hello_result {
        Ok(accepted) => accepted,
        Err(frame) => {
            close_with(&mut writer, &frame, shared).await;
            return;
        }
    };
    let connection_id = shared.next_connection_id.fetch_add(1, Ordering::Relaxed);
    let auth_ok = AuthOk {
        role,
        in_flight_max: config.in_flight_per_connection_max as u32,
        body_bytes_max: BODY_BYTES_MAX as u32,
        commands_per_frame_max: COMMANDS_PER_FRAME_MAX as u32,
        queries_per_frame_max: QUERIES_PER_FRAME_MAX as u32,
        connection_id,
    };
    match timeout(config.write_timeout, writer.write_frame(&Frame::new(hello_id, Payload::AuthOk(auth_ok)))).await {
        Ok(Ok(())) => add(&stats.frames_sent, 1),
        _ => return,
    }

    let (tx, rx) = mpsc::channel::<Outgoing>(config.in_flight_per_connection_max);
    let (last_tx, last_rx) = oneshot::channel::<Frame>();
    let mut writer_task = tokio::spawn(write_loop(writer, rx, last_rx, shared.clone()));
    let budget = Arc::new(Semaphore::new(config.answer_bytes_per_connection_max));
    let handler = Handler { shared: shared.clone(), role, tx, budget };
    handler.read_loop(&mut reader, &mut shutdown, last_tx).await;
    add(&stats.bytes_received, reader.bytes_read());
    // `handler` (and its sender) is gone; the writer ends once every in-flight callback has
    // delivered its reply, or when the drain timeout says the engine is not answering.
    match timeout(config.drain_timeout, &mut writer_task).await {
        Ok(_) => {}
        Err(_elapsed) => writer_task.abort(),
    }
}

/// Sends `frame` (an error or an auth failure) and closes, within the write timeout.
async fn close_with<W: AsyncWrite + Unpin>(writer: &mut FrameWriter<W>, frame: &Frame, shared: &Shared) {
    let _ = timeout(shared.config.write_timeout, async {
        writer.write_frame(frame).await?;
        add(&shared.stats.frames_sent, 1);
        writer.shutdown().await
    })
    .await;
}

/// The last frame when the server stops: connection-level (request id 0), or on a watch stream
/// the `Watch` frame's request id, as every frame of the stream.
fn shutting_down(request_id: u64) -> ReadEnd {
    let error = ErrorBody::new(ErrorCode::SHUTTING_DOWN, "server shutting down");
    ReadEnd::Last(Frame::new(request_id, Payload::Error(error)))
}

/// A framing error: connection-level, so request id 0 (it answers none of the client's requests).
fn protocol_error_frame(error: &ProtocolError, stats: &ServerStats) -> Frame {
    add(&stats.protocol_errors, 1);
    Frame::new(0, Payload::Error(ErrorBody::new(error.code(), error.to_string())))
}

/// Compares the Hello's token with the configured ones; the granted role is the requested one if
/// the token permits it (the admin token also permits the client role).
fn authenticate(hello: &Hello, shared: &Shared) -> Option<Role> {
    let config = &shared.config;
    // Compare against both tokens unconditionally so timing does not reveal which one matched.
    let is_client = constant_time_eq(&hello.token, config.client_token.as_bytes());
    let is_admin = match &config.admin_token {
        Some(admin) => constant_time_eq(&hello.token, admin.as_bytes()),
        None => false,
    };
    match hello.role {
        Role::Admin if is_admin => Some(Role::Admin),
        Role::Client if is_client || is_admin => Some(Role::Client),
        _ => None,
    }
}

/// Equality whose running time depends only on the lengths, not on where the bytes differ, so a
/// remote peer cannot find the token byte by byte by timing failed handshakes.
fn constant_time_eq(given: &[u8], expected: &[u8]) -> bool {
    let len = given.len().max(expected.len());
    let mut diff = (given.len() ^ expected.len()) as u64;
    for i in 0..len {
        let a = given.get(i).copied().unwrap_or(0);
        let b = expected.get(i).copied().unwrap_or(0);
        diff |= u64::from(a ^ b);
    }
    std::hint::black_box(diff) == 0
}

/// Why the read loop ended.
enum ReadEnd {
    /// The peer closed, the socket failed, or the writer gave up: nothing more to say.
    Closed,
    /// The connection ends with this frame, written after the in-flight replies.
    Last(Frame),
}

struct Handler {
    shared: Arc<Shared>,
    role: Role,
    tx: mpsc::Sender<Outgoing>,
    /// This connection's answer bytes (`ServerConfig::answer_bytes_per_connection_max`).
    budget: Arc<Semaphore>,
}

/// A frame for the writer, with the answer bytes reserved for it.
struct Outgoing {
    frame: Frame,
    reservation: Reservation,
}

/// Answer bytes taken from the connection's budget and from the server's, for one frame. Given
/// back when dropped: by the writer once the frame is written to the socket, or with the
/// connection.
struct Reservation {
    connection: OwnedSemaphorePermit,
    server: OwnedSemaphorePermit,
}

impl Reservation {
    /// Gives back what is reserved beyond `bytes` (an answer smaller than the largest the frame
    /// could have had).
    fn shrink_to(&mut self, bytes: usize) {
        for permit in [&mut self.connection, &mut self.server] {
            let excess = permit.num_permits().saturating_sub(bytes);
            if excess > 0 {
                drop(permit.split(excess));
            }
        }
    }
}

impl Handler {
    /// Reads and dispatches frames until the connection must end, then hands the writer the frame
    /// to send last. Consumes the handler so its sender is dropped on return, which (once the
    /// in-flight callbacks are done) lets the writer finish. The last frame is handed over before
    /// that drop, so the writer always finds it when its channel closes.
    async fn read_loop<R: AsyncRead + Unpin>(
        self,
        reader: &mut FrameReader<R>,
        shutdown: &mut watch::Receiver<bool>,
        last: oneshot::Sender<Frame>,
    ) {
        let config = &self.shared.config;
        let stats = &self.shared.stats;
        let mut idle_deadline = Instant::now() + config.idle_timeout;
        let end = loop {
            let read = tokio::select! {
                // A shutdown stops reading at once; a partially received frame is discarded
                // unsubmitted, and frames already submitted drain through the writer.
                _ = shutdown.wait_for(|stop| *stop) => break shutting_down(0),
                // The writer gave up (write timeout or socket error): nothing can be answered.
                _ = self.tx.closed() => break ReadEnd::Closed,
                read = timeout_at(idle_deadline, reader.read_frame()) => read,
            };
            let frame = match read {
                Err(_elapsed) => {
                    // Waiting for the engine is not idleness: only close when nothing is in flight.
                    // A peer trickling a partial frame does not reset the timer (only whole frames
                    // do), so a slow-loris connection is closed like an idle one.
                    if self.in_flight() > 0 {
                        idle_deadline = Instant::now() + config.idle_timeout;
                        continue;
                    }
                    add(&stats.idle_timeouts, 1);
                    let error = ErrorBody::new(ErrorCode::IDLE_TIMEOUT, "idle timeout");
                    break ReadEnd::Last(Frame::new(0, Payload::Error(error)));
                }
                Ok(Ok(Some(frame))) => frame,
                Ok(Ok(None))
                | Ok(Err(FrameReadError::Io(_)))
                | Ok(Err(FrameReadError::TruncatedFrame { .. }))
                | Ok(Err(FrameReadError::UnexpectedKind { .. })) => break ReadEnd::Closed,
                Ok(Err(FrameReadError::Protocol(error))) => break ReadEnd::Last(protocol_error_frame(&error, stats)),
            };
            idle_deadline = Instant::now() + config.idle_timeout;
            add(&stats.frames_received, 1);
            if let Payload::Watch(request) = &frame.payload {
                // The connection becomes an event stream until it ends.
                break self.watch(reader, shutdown, frame.request_id, request).await;
            }
            // Reserve the answer's bytes, then the reply slot, before submitting: these are the
            // memory and in-flight limits. Until both are there, nothing more is read.
            let reservation = tokio::select! {
                _ = shutdown.wait_for(|stop| *stop) => break shutting_down(0),
                _ = self.tx.closed() => break ReadEnd::Closed,
                reservation = self.reserve(answer_bytes_max(&frame.payload)) => match reservation {
                    Some(reservation) => reservation,
                    None => break ReadEnd::Closed,
                },
            };
            let permit = tokio::select! {
                _ = shutdown.wait_for(|stop| *stop) => break shutting_down(0),
                permit = self.tx.clone().reserve_owned() => match permit {
                    Ok(permit) => permit,
                    Err(_) => break ReadEnd::Closed,
                },
            };
            if let Err(fatal) = self.dispatch(frame, permit, reservation) {
                break ReadEnd::Last(fatal);
            }
        };
        if let ReadEnd::Last(frame) = end {
            let _ = last.send(frame);
        }
    }

    /// Streams committed events after the requested position until the peer goes away, the
    /// server shuts down, or the subscriber falls behind the event ring. Never blocks the engine:
    /// events are copied out of the shards' rings; a subscriber that does not drain is either
    /// dropped by the writer's `write_timeout` or, when its position leaves the ring, told
    /// `subscriber_too_slow`.
    async fn watch<R: AsyncRead + Unpin>(
        &self,
        reader: &mut FrameReader<R>,
        shutdown: &mut watch::Receiver<bool>,
        request_id: u64,
        request: &[crate::layout::WatchRecord],
    ) -> ReadEnd {
        use crate::feed::{Position, ResolveError};
        let last = |code: ErrorCode, message: String| {
            ReadEnd::Last(Frame::new(request_id, Payload::Error(ErrorBody::new(code, message))))
        };
        let Some(feed) = self.shared.backend.feed() else {
            return last(ErrorCode::FEED_UNAVAILABLE, "this server has no event feed".into());
        };
        let mut changed = feed.subscribe();
        let mut cursor = match feed.resolve(request) {
            Ok(cursor) => cursor,
            Err(ResolveError::TooOld(too_old)) => {
                return last(ErrorCode::POSITION_TOO_OLD, format!("{too_old}; resync from balances"))
            }
            Err(ResolveError::Invalid(message)) => return last(ErrorCode::INVALID_POSITION, message),
        };
        let frame = Frame::new(request_id, Payload::Watch(cursor.to_records()));
        if let Err(end) = self.send_streamed(frame, shutdown).await {
            return end;
        }
        let mut events = Vec::new();
        loop {
            changed.borrow_and_update();
            let mut sent = false;
            for shard_feed in feed.shards() {
                let shard = shard_feed.shard();
                let after = cursor.get(shard).unwrap_or_default();
                if let Err(too_old) = shard_feed.read_after(after, WATCH_EVENTS_PER_FRAME, &mut events) {
                    return last(
                        ErrorCode::SUBSCRIBER_TOO_SLOW,
                        // At most `ERROR_MESSAGE_LEN` (120) bytes reach the client: short.
                        format!("fell behind at {shard}:{after}; {too_old}; resync from balances"),
                    );
                }
                let Some(newest) = events.last() else { continue };
                cursor.set(shard, Position::of(newest));
                let frame = Frame::new(request_id, Payload::Event(std::mem::take(&mut events)));
                if let Err(end) = self.send_streamed(frame, shutdown).await {
                    return end;
                }
                sent = true;
            }
            if sent {
                continue;
            }
            tokio::select! {
                _ = shutdown.wait_for(|stop| *stop) => return shutting_down(request_id),
                _ = self.tx.closed() => return ReadEnd::Closed,
                result = changed.changed() => if result.is_err() { return ReadEnd::Closed },
                read = reader.read_frame() => match read {
                    Ok(Some(frame)) => {
                        let error = ProtocolError::UnexpectedFrame { kind: frame.payload.kind() as u16 };
                        return ReadEnd::Last(protocol_error_frame(&error, &self.shared.stats));
                    }
                    _ => return ReadEnd::Closed,
                },
            }
        }
    }

    fn in_flight(&self) -> usize {
        self.tx.max_capacity() - self.tx.capacity()
    }

    /// Takes `bytes` from the connection's budget, then from the server's, waiting for them.
    /// Takes at most the whole of a budget, so a frame whose answer may be larger than a budget
    /// still runs, alone. `None` only if a budget is closed (they never are).
    async fn reserve(&self, bytes: usize) -> Option<Reservation> {
        let config = &self.shared.config;
        // `validate` keeps both budgets within u32.
        let take = |budget: usize| u32::try_from(bytes.min(budget)).unwrap_or(u32::MAX);
        let connection = self.budget.clone().acquire_many_owned(take(config.answer_bytes_per_connection_max)).await;
        let server = self.shared.answer_bytes.clone().acquire_many_owned(take(config.answer_bytes_max)).await;
        Some(Reservation { connection: connection.ok()?, server: server.ok()? })
    }

    /// Queues one frame of a watch stream for the writer, once its bytes are reserved and a slot
    /// is free. `Err` carries how the stream ends instead.
    async fn send_streamed(&self, frame: Frame, shutdown: &mut watch::Receiver<bool>) -> Result<(), ReadEnd> {
        let request_id = frame.request_id;
        let reservation = tokio::select! {
            _ = shutdown.wait_for(|stop| *stop) => return Err(shutting_down(request_id)),
            _ = self.tx.closed() => return Err(ReadEnd::Closed),
            reservation = self.reserve(answer_bytes(&frame.payload)) => reservation.ok_or(ReadEnd::Closed)?,
        };
        tokio::select! {
            _ = shutdown.wait_for(|stop| *stop) => Err(shutting_down(request_id)),
            sent = self.tx.send(Outgoing { frame, reservation }) => sent.map_err(|_| ReadEnd::Closed),
        }
    }

    /// Hands one parsed frame to the backend. `Err` carries the error frame for a frame that must
    /// close the connection.
    fn dispatch(&self, frame: Frame, permit: OwnedPermit<Outgoing>, reservation: Reservation) -> Result<(), Frame> {
        let stats = &self.shared.stats;
        let backend = &self.shared.backend;
        let request_id = frame.request_id;
        match frame.payload {
            Payload::Commands(commands) => {
                if self.role != Role::Admin && commands.iter().any(|command| backend.is_admin_kind(command.kind)) {
                    // Refuse the whole frame, not just the admin commands: a batch is submitted
                    // as a unit or not at all. The connection stays usable.
                    add(&stats.forbidden_frames, 1);
                    let error = ErrorBody::new(ErrorCode::FORBIDDEN, "admin command kinds need an admin connection");
                    ReplySlot::new(permit, reservation, request_id, stats.clone()).send(Payload::Error(error));
                    return Ok(());
                }
                add(&stats.commands_received, commands.len() as u64);
                let slot = ReplySlot::new(permit, reservation, request_id, self.shared.stats.clone());
                let expected = commands.len();
                backend.submit(
                    commands,
                    Box::new(move |replies: Vec<ReplyRecord>| {
                        if replies.len() == expected {
                            add(&slot.stats.replies_sent, expected as u64);
                            slot.send(Payload::Replies(replies));
                        } else {
                            // A backend bug; answering a wrong count would misattribute results.
                            slot.fail("the engine answered a different number of replies");
                        }
                    }),
                );
                Ok(())
            }
            Payload::Query(queries) => {
                add(&stats.queries_received, queries.len() as u64);
                let slot = ReplySlot::new(permit, reservation, request_id, self.shared.stats.clone());
                self.dispatch_queries(queries, slot);
                Ok(())
            }
            Payload::Ping => {
                ReplySlot::new(permit, reservation, request_id, stats.clone()).send(Payload::Pong);
                Ok(())
            }
            // Watch/Event never decode (reserved kinds fail in `check`); everything else here is
            // a server-to-client kind or a second Hello.
            other => {
                let error = ProtocolError::UnexpectedFrame { kind: other.kind() as u16 };
                drop(permit);
                Err(protocol_error_frame(&error, stats))
            }
        }
    }

    fn dispatch_queries(&self, mut queries: Vec<QueryRecord>, slot: ReplySlot) {
        let backend = &self.shared.backend;
        // Balance reads are lock-free and answered inline; a frame of only balances (the hot
        // read) is answered without touching the engine's queues.
        if queries.iter().all(|query| query.kind == QUERY_KIND_BALANCE) {
            let answers = queries.iter().map(|query| QueryAnswer::reply(backend.balance(query.key.get()))).collect();
            slot.send(Payload::QueryAnswer(answers));
            return;
        }
        let history_cap = history_cap(queries.len());
        for query in &mut queries {
            if query.kind == QUERY_KIND_HISTORY {
                query.limit.set(history_limit(query, history_cap));
            }
        }
        let collector = Arc::new(Mutex::new(Collector {
            answers: vec![None; queries.len()],
            remaining: queries.len(),
            slot: Some(slot),
            history_limits: queries
                .iter()
                .map(|query| if query.kind == QUERY_KIND_HISTORY { query.limit.get() as usize } else { 0 })
                .collect(),
        }));
        for (position, query) in queries.into_iter().enumerate() {
            if query.kind == QUERY_KIND_BALANCE {
                Collector::fill(&collector, position, QueryAnswer::reply(backend.balance(query.key.get())));
            } else {
                let collector = collector.clone();
                backend.query(query, Box::new(move |answer| Collector::fill(&collector, position, answer)));
            }
        }
    }
}

/// Most history entries one query of a frame of `queries` queries may return so that the whole
/// answer frame fits in `BODY_BYTES_MAX` even if every query also returns a lookup record.
fn history_cap(queries: usize) -> u32 {
    let fixed = queries * QUERY_ANSWER_FIXED_BYTES;
    let per_query = BODY_BYTES_MAX.saturating_sub(fixed) / HISTORY_RECORD_SIZE / queries.max(1);
    per_query.max(1) as u32
}

/// The history entries a query may get: its `limit`, where 0 or more than `history_cap` means
/// `history_cap`.
fn history_limit(query: &QueryRecord, history_cap: u32) -> u32 {
    match query.limit.get() {
        0 => history_cap,
        limit => limit.min(history_cap),
    }
}

/// The most bytes the answer to `request` can take (what the reader reserves before submitting
/// it): a Commands frame's replies, a Query frame's answers with every history query's page full
/// and every answer holding a lookup record; any other frame is answered with a small one.
fn answer_bytes_max(request: &Payload) -> usize {
    match request {
        Payload::Commands(commands) => FRAME_BYTES + commands.len() * REPLY_RECORD_SIZE,
        Payload::Query(queries) => {
            let history_cap = history_cap(queries.len());
            let history = queries
                .iter()
                .filter(|query| query.kind == QUERY_KIND_HISTORY)
                .map(|query| history_limit(query, history_cap) as usize * HISTORY_RECORD_SIZE)
                .sum::<usize>();
            FRAME_BYTES + queries.len() * QUERY_ANSWER_BYTES + history
        }
        _ => FRAME_BYTES,
    }
}

/// The bytes an answer takes (in memory, which is at least its encoded size): what its
/// reservation shrinks to once it exists.
fn answer_bytes(answer: &Payload) -> usize {
    FRAME_BYTES
        + match answer {
            Payload::Replies(replies) => replies.capacity() * REPLY_RECORD_SIZE,
            Payload::QueryAnswer(answers) => {
                answers.iter().map(|answer| QUERY_ANSWER_BYTES + answer.history.capacity() * HISTORY_RECORD_SIZE).sum()
            }
            Payload::Event(events) => events.capacity() * EVENT_RECORD_SIZE,
            Payload::Watch(cursor) => cursor.capacity() * WATCH_RECORD_SIZE,
            _ => 0,
        }
}

/// Gathers the answers of one Query frame; the last callback sends the frame.
struct Collector {
    answers: Vec<Option<QueryAnswer>>,
    remaining: usize,
    slot: Option<ReplySlot>,
    /// The history entries each query may get: its `limit` as submitted for a history query, 0
    /// for the others (what `answer_bytes_max` reserved for).
    history_limits: Vec<usize>,
}

impl Collector {
    fn fill(collector: &Mutex<Collector>, position: usize, mut answer: QueryAnswer) {
        let mut state = collector.lock();
        let limit = state.history_limits.get(position).copied().unwrap_or(0);
        if answer.history.len() > limit {
            // The engine returned more than asked; keep the frame within limits and point the
            // cursor at the last entry kept so the client can page on without a gap.
            answer.history.truncate(limit);
            answer.history.shrink_to_fit();
            if let Some(last) = answer.history.last() {
                answer.next_before_ts = last.timestamp.get();
                answer.next_before_shard = u64::from(last.shard);
            }
        }
        let Some(entry) = state.answers.get_mut(position) else {
            return;
        };
        if entry.is_some() {
            return; // a callback called twice; the first answer stands
        }
        *entry = Some(answer);
        state.remaining -= 1;
        if state.remaining == 0 {
            let mut answers = Vec::with_capacity(state.answers.len());
            answers.extend(state.answers.drain(..).flatten());
            if let Some(slot) = state.slot.take() {
                drop(state);
                slot.send(Payload::QueryAnswer(answers));
            }
        }
    }
}

/// The reserved reply-channel slot of one submitted frame, with the answer bytes reserved for
/// it. Dropping it unused (the backend lost the callback) answers `internal`, so the client can
/// retry instead of waiting forever.
struct ReplySlot {
    reserved: Option<(OwnedPermit<Outgoing>, Reservation)>,
    request_id: u64,
    stats: Arc<ServerStats>,
}

impl ReplySlot {
    fn new(
        permit: OwnedPermit<Outgoing>,
        reservation: Reservation,
        request_id: u64,
        stats: Arc<ServerStats>,
    ) -> ReplySlot {
        ReplySlot { reserved: Some((permit, reservation)), request_id, stats }
    }

    fn send(mut self, payload: Payload) {
        self.send_in_place(payload);
    }

    fn send_in_place(&mut self, payload: Payload) {
        if let Some((permit, mut reservation)) = self.reserved.take() {
            reservation.shrink_to(answer_bytes(&payload));
            permit.send(Outgoing { frame: Frame::new(self.request_id, payload), reservation });
        }
    }

    fn fail(mut self, message: &str) {
        self.fail_in_place(message);
    }

    fn fail_in_place(&mut self, message: &str) {
        if self.reserved.is_some() {
            add(&self.stats.internal_errors, 1);
            self.send_in_place(Payload::Error(ErrorBody::new(ErrorCode::INTERNAL, message)));
        }
    }
}

impl Drop for ReplySlot {
    fn drop(&mut self) {
        self.fail_in_place("the engine dropped the request without answering; retry with the same ids");
    }
}

/// Writes queued frames until every sender is gone (the reader and every in-flight callback),
/// then the connection's last frame if there is one, then closes the write side. Writing the last
/// frame (an error, an idle timeout, a shutdown notice) only after the drain means a client sees
/// the answers to everything the server accepted before it sees why the connection ends.
/// A peer that does not take a write within `write_timeout` is dropped.
///
/// The frames' reservations are given back once their bytes are written to the socket. The
/// writer encodes into a buffer of its own (not `FrameWriter`'s, which keeps its largest size),
/// which shrinks back after a large write.
async fn write_loop<W: AsyncWrite + Unpin>(
    mut writer: FrameWriter<W>,
    mut rx: mpsc::Receiver<Outgoing>,
    mut last: oneshot::Receiver<Frame>,
    shared: Arc<Shared>,
) {
    let config = &shared.config;
    let stats = &shared.stats;
    let mut batch = Batch::default();
    let mut healthy = true;
    while let Some(outgoing) = rx.recv().await {
        let mut next = Some(outgoing);
        while let Some(Outgoing { frame, reservation }) = next.take() {
            batch.queue(&frame, stats);
            batch.reservations.push(reservation);
            if batch.buffer.len() < WRITE_BATCH_BYTES {
                next = rx.try_recv().ok();
            }
        }
        if !batch.write(writer.get_mut(), stats, config.write_timeout).await {
            healthy = false;
            break;
        }
    }
    if healthy {
        if let Ok(frame) = last.try_recv() {
            batch.queue(&frame, stats);
            batch.write(writer.get_mut(), stats, config.write_timeout).await;
        }
    }
    add(&stats.bytes_sent, writer.bytes_written() + batch.written);
    // Replies that arrive after this are dropped with the connection; the client resubmits them
    // with the same ids and gets their original results. Their bytes are given back now, not
    // after the shutdown below.
    rx.close();
    drop(rx);
    drop(batch);
    let _ = timeout(config.write_timeout, writer.shutdown()).await;
}

/// Frames encoded and not yet written, with their reservations.
#[derive(Default)]
struct Batch {
    buffer: Vec<u8>,
    reservations: Vec<Reservation>,
    frames: u64,
    /// Bytes written to the socket so far.
    written: u64,
}

impl Batch {
    fn queue(&mut self, frame: &Frame, stats: &ServerStats) {
        if frame.encode(&mut self.buffer).is_err() {
            // Only a backend answer that breaks a frame limit can fail to encode; the client
            // still gets an answer for its request id.
            add(&stats.internal_errors, 1);
            let error = ErrorBody::new(ErrorCode::INTERNAL, "the answer does not fit in a frame");
            let _ = Frame::new(frame.request_id, Payload::Error(error)).encode(&mut self.buffer);
        }
        self.frames += 1;
    }

    /// Writes and flushes the batch within `limit`, then gives back its reservations. False if
    /// the socket failed or the peer did not take the bytes in time.
    async fn write<W: AsyncWrite + Unpin>(&mut self, writer: &mut W, stats: &ServerStats, limit: Duration) -> bool {
        let written = timeout(limit, async {
            writer.write_all(&self.buffer).await?;
            writer.flush().await
        })
        .await;
        match written {
            Ok(Ok(())) => {
                add(&stats.frames_sent, self.frames);
                self.written += self.buffer.len() as u64;
                self.frames = 0;
                self.buffer.clear();
                self.buffer.shrink_to(WRITE_BUFFER_KEPT);
                self.reservations.clear();
                true
            }
            Ok(Err(_)) => false,
            Err(_elapsed) => {
                add(&stats.write_timeouts, 1);
                false
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{admit, Admission};
    use std::net::{IpAddr, SocketAddr};
    use std::sync::Arc;

    use crate::protocol::{ErrorCode, Frame, FrameReader, FrameWriter, Hello, Payload, Role};
    use crate::server::{Backend, ServerConfig, Shared};

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn tls_servers_shake_hands_with_every_peer() {
        for peer in ["127.0.0.1", "::1", "10.1.2.3", "203.0.113.9", "2001:db8::1"] {
            for allow_remote in [false, true] {
                assert_eq!(admit(ip(peer), true, allow_remote), Admission::Tls, "{peer} {allow_remote}");
            }
        }
    }

    #[test]
    fn plaintext_from_loopback_is_served() {
        for peer in ["127.0.0.1", "127.8.9.10", "::1", "::ffff:127.0.0.1"] {
            assert_eq!(admit(ip(peer), false, false), Admission::Plaintext, "{peer}");
            assert_eq!(admit(ip(peer), false, true), Admission::Plaintext, "{peer}");
        }
    }

    #[test]
    fn plaintext_from_other_peers_needs_allow_remote() {
        for peer in ["10.1.2.3", "192.168.1.1", "203.0.113.9", "0.0.0.0", "2001:db8::1", "::ffff:10.0.0.1", "fe80::1"] {
            assert_eq!(admit(ip(peer), false, false), Admission::RefusePlaintext, "{peer}");
            assert_eq!(admit(ip(peer), false, true), Admission::Plaintext, "{peer}");
        }
    }

    /// Serves one real loopback connection as if it came from `peer`; returns the first frame
    /// the client gets after sending its Hello.
    async fn first_answer(peer: &str, allow_remote_plaintext: bool) -> (Frame, u64) {
        let config = crate::engine::EngineConfig { shards: 1, ..crate::engine::EngineConfig::default() };
        let engine = crate::engine::Engine::in_memory(config).unwrap();
        let backend: Arc<dyn Backend> = Arc::new(engine);
        let config = ServerConfig { allow_remote_plaintext, ..ServerConfig::new("token") };
        let shared = Arc::new(Shared::new(backend, config));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = tokio::net::TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let (socket, _) = listener.accept().await.unwrap();
        let (_stop, shutdown) = tokio::sync::watch::channel(false);
        let peer: SocketAddr = peer.parse().unwrap();
        let server = tokio::spawn(super::serve(socket, peer, shared.clone(), shutdown));
        let (read_half, write_half) = client.into_split();
        let mut writer = FrameWriter::new(write_half);
        let hello = Hello { role: Role::Client, token: b"token".to_vec() };
        writer.write_frame(&Frame::new(0, Payload::Hello(hello))).await.unwrap();
        let frame = FrameReader::new(read_half).read_frame().await.unwrap().expect("an answer");
        drop(writer);
        server.await.unwrap();
        (frame, shared.stats.snapshot().plaintext_refused)
    }

    /// What the reader reserves for a Query frame covers its largest answer, in memory and
    /// encoded, for every frame size, so a reservation never has to grow.
    #[test]
    fn a_query_frame_reserves_at_least_its_largest_answer() {
        use super::{answer_bytes, answer_bytes_max, history_cap};
        use crate::layout::{CommandRecord, HistoryRecord, QueryRecord};
        use crate::protocol::{QueryAnswer, QUERY_KIND_HISTORY, QUERY_KIND_LOOKUP};
        for queries in [1, 2, 16, 100, 4096] {
            let mut query = QueryRecord { kind: QUERY_KIND_HISTORY, ..QueryRecord::default() };
            let mut request = vec![query; queries];
            query.kind = QUERY_KIND_LOOKUP;
            request[0] = query;
            let reserved = answer_bytes_max(&Payload::Query(request));
            let cap = history_cap(queries) as usize;
            let mut answers = vec![
                QueryAnswer {
                    command: Some(CommandRecord::default()),
                    history: vec![HistoryRecord::default(); cap],
                    ..QueryAnswer::default()
                };
                queries
            ];
            answers[0].history = Vec::new();
            let answer = Payload::QueryAnswer(answers);
            let mut encoded = Vec::new();
            Frame::new(1, answer.clone()).encode(&mut encoded).expect("the largest answer fits in a frame");
            assert!(answer_bytes(&answer) <= reserved, "{queries} queries: {} > {reserved}", answer_bytes(&answer));
            assert!(encoded.len() <= reserved, "{queries} queries: encoded {} > {reserved}", encoded.len());
        }
    }

    #[tokio::test]
    async fn a_remote_plaintext_peer_is_refused_before_its_token_is_read() {
        let (frame, refused) = first_answer("203.0.113.9:40000", false).await;
        let Payload::Error(error) = frame.payload else { panic!("expected tls_required, got {frame:?}") };
        assert_eq!(error.code, ErrorCode::TLS_REQUIRED);
        assert!(error.message.contains("--allow-remote"), "{}", error.message);
        assert_eq!(refused, 1);
        // The same peer with --allow-remote, and a loopback peer without it, are served.
        for (peer, allow) in [("203.0.113.9:40000", true), ("127.0.0.1:40000", false)] {
            let (frame, refused) = first_answer(peer, allow).await;
            assert!(matches!(frame.payload, Payload::AuthOk(_)), "{peer}: {frame:?}");
            assert_eq!(refused, 0);
        }
    }
}
