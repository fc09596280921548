//! The async client, built on `protocol` only.
//!
//! One `Client` is one authenticated connection, shared by any number of tasks (it is `Clone`).
//! Calls from all tasks go into one queue; a batcher task turns queued calls into as few frames as
//! possible: while the connection's in-flight window (announced by the server in `AuthOk`) is
//! full, calls accumulate, and the next frame carries all of them (up to the per-frame limit).
//! So a thousand tasks each tipping once produce a handful of frames, not a thousand, and the
//! latency of an idle connection stays one round trip. A reader task matches answers to calls by
//! request id; answers may arrive in any order.
//!
//! Retrying is safe because command ids are idempotency keys: resubmitting a command with the
//! same id and payload returns its original result (reply flag bit 0 set) instead of applying it
//! again, and the same id with a different payload answers `exists_with_different_fields`. Any
//! error other than a reply (`Io`, `Closed`, `Server`, `Protocol`) leaves the outcome of the
//! affected commands unknown: reconnect and resubmit them unchanged.
//!
//! What must never happen here: giving a caller a reply that belongs to another call, or leaving
//! a caller waiting after the connection is gone.
//!
//! `watch::Watcher` follows the event feed on a connection of its own.
//!
//! With `ClientConfig::tls` every connection (calls, watch, retries) does the TLS handshake
//! right after TCP connect; the protocol above it is the same.

pub mod retry;
pub mod watch;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpStream, ToSocketAddrs};
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};

use crate::layout::{CommandRecord, QueryRecord, ReplyRecord};
use crate::protocol::{
    AuthOk, ErrorBody, Frame, FrameReadError, FrameReader, FrameWriter, Hello, Payload, ProtocolError, QueryAnswer,
    Role, COMMANDS_PER_FRAME_MAX, QUERIES_PER_FRAME_MAX, QUERY_KIND_BALANCE,
};
use crate::server::ADMIN_KIND_MIN;
pub use crate::tls::TlsClientConfig;

/// Why a client call failed.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub enum ClientError {
    /// The socket failed (connect, read or write). Outcome of in-flight commands unknown.
    Io(Arc<std::io::Error>),
    /// The server refused the token or the requested role.
    Auth(ErrorBody),
    /// The server sent bytes that are not valid protocol; the connection is closed.
    Protocol(ProtocolError),
    /// The server answered this request (or the whole connection) with an error frame, e.g.
    /// `forbidden`, `internal`, `idle_timeout`, `shutting_down`, `too_many_connections`.
    Server(ErrorBody),
    /// The connection is closed. Outcome of in-flight commands unknown.
    Closed,
    /// The call cannot be sent (e.g. a token longer than the protocol allows, or an admin
    /// command kind on a client-role connection); nothing of it was sent.
    InvalidRequest(&'static str),
    /// No TLS and the server is not on a loopback address: the token was not sent (see
    /// `ClientConfig::allow_remote_plaintext`).
    PlaintextToRemote(std::net::SocketAddr),
    /// The TLS handshake failed: the server's certificate is not trusted or not for the expected
    /// name, or the server does not speak TLS. Retrying will not help.
    Tls(Arc<std::io::Error>),
}

impl core::fmt::Display for ClientError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            ClientError::Io(error) => write!(f, "io: {error}"),
            ClientError::Auth(error) => {
                write!(f, "authentication failed: {} {}", error.code, error.message)
            }
            ClientError::Protocol(error) => write!(f, "protocol: {error}"),
            ClientError::Server(error) => {
                write!(f, "server error: {} {}", error.code, error.message)
            }
            ClientError::Closed => write!(f, "connection closed"),
            ClientError::InvalidRequest(reason) => write!(f, "invalid request: {reason}"),
            ClientError::PlaintextToRemote(addr) => write!(
                f,
                "refusing to send the token in clear text to {addr}, which is not a loopback address: connect \
                 with TLS, or allow plaintext explicitly"
            ),
            ClientError::Tls(error) => {
                write!(f, "TLS handshake failed: {error}{}", crate::tls::handshake_hint(error))
            }
        }
    }
}

impl std::error::Error for ClientError {}

impl From<std::io::Error> for ClientError {
    fn from(error: std::io::Error) -> ClientError {
        ClientError::Io(Arc::new(error))
    }
}

impl From<FrameReadError> for ClientError {
    fn from(error: FrameReadError) -> ClientError {
        match error {
            FrameReadError::Io(error) => error.into(),
            FrameReadError::Protocol(error) => ClientError::Protocol(error),
            _ => ClientError::Closed,
        }
    }
}

/// Connection settings.
#[derive(Clone)]
pub struct ClientConfig {
    pub token: String,
    pub role: Role,
    /// Bound on TCP connect, the TLS handshake and the authentication round trip.
    pub connect_timeout: Duration,
    /// Bound on one `submit`/`queries` call, from its start to its last answer (queueing
    /// included). When it passes, the call fails with `ClientError::Io` (`TimedOut`, retryable:
    /// its commands may or may not have been applied) and the connection is closed, failing
    /// every other call on it the same way: a server that stopped answering without closing
    /// (a hung host, a partition) would otherwise keep them waiting forever.
    pub request_timeout: Duration,
    /// Calls queued before `submit`/`query` themselves wait (back-pressure on the callers).
    pub queue_max: usize,
    /// Connect over TLS (`TlsClientConfig::from_ca_file`); `None`: plaintext.
    pub tls: Option<TlsClientConfig>,
    /// Without TLS, send the token to a server that is not on a loopback address anyway. Off by
    /// default: a plaintext connection to another host is refused before the token is sent
    /// (`ClientError::PlaintextToRemote`), because the token would cross the network in clear.
    pub allow_remote_plaintext: bool,
}

impl core::fmt::Debug for ClientConfig {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("ClientConfig")
            .field("token", &"<redacted>")
            .field("role", &self.role)
            .field("connect_timeout", &self.connect_timeout)
            .field("request_timeout", &self.request_timeout)
            .field("queue_max", &self.queue_max)
            .field("tls", &self.tls)
            .field("allow_remote_plaintext", &self.allow_remote_plaintext)
            .finish()
    }
}

impl ClientConfig {
    /// Client role, 5 s connect timeout, 30 s request timeout, 65 536 queued calls, plaintext.
    pub fn new(token: impl Into<String>) -> ClientConfig {
        ClientConfig {
            token: token.into(),
            role: Role::Client,
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(30),
            queue_max: 1 << 16,
            tls: None,
            allow_remote_plaintext: false,
        }
    }
}

/// Where the answers of one call go.
type Done<R> = oneshot::Sender<Result<Vec<R>, ClientError>>;
type CommandsDone = Done<ReplyRecord>;
type QueriesDone = Done<QueryAnswer>;

enum Call {
    Commands(Vec<CommandRecord>, CommandsDone),
    Queries(Vec<QueryRecord>, QueriesDone),
}

impl Call {
    fn fail(self, error: ClientError) {
        match self {
            Call::Commands(_, done) => drop(done.send(Err(error))),
            Call::Queries(_, done) => drop(done.send(Err(error))),
        }
    }
}

/// The callers waiting on one frame, with how many records each contributed, in frame order.
enum Waiters {
    Commands(Vec<(usize, CommandsDone)>),
    Queries(Vec<(usize, QueriesDone)>),
}

impl Waiters {
    fn fail(self, error: &ClientError) {
        match self {
            Waiters::Commands(waiters) => waiters.into_iter().for_each(|(_, done)| drop(done.send(Err(error.clone())))),
            Waiters::Queries(waiters) => waiters.into_iter().for_each(|(_, done)| drop(done.send(Err(error.clone())))),
        }
    }
}

struct Pending {
    waiters: Waiters,
    /// Held until the answer arrives: one slot of the server's in-flight window.
    _slot: OwnedSemaphorePermit,
}

struct Shared {
    pending: Mutex<HashMap<u64, Pending>>,
    /// The in-flight window. Closed when the connection dies, which wakes and fails the batcher.
    window: Arc<Semaphore>,
    /// Why the connection died, once it has.
    closed: Mutex<Option<ClientError>>,
    /// The connection's two tasks, aborted (dropping the socket) when a call times out.
    tasks: Mutex<Vec<tokio::task::AbortHandle>>,
}

impl Shared {
    /// Marks the connection dead and fails every waiting call.
    fn close(&self, error: ClientError) {
        {
            let mut closed = self.closed.lock();
            if closed.is_none() {
                *closed = Some(error);
            }
        }
        self.window.close();
        let error = self.closed_error();
        let pending: Vec<Pending> = self.pending.lock().drain().map(|(_, pending)| pending).collect();
        for pending in pending {
            pending.waiters.fail(&error);
        }
    }

    fn closed_error(&self) -> ClientError {
        self.closed.lock().clone().unwrap_or(ClientError::Closed)
    }

    /// `close`, and the socket closed too: the tasks reading and writing it are aborted.
    fn abandon(&self, error: ClientError) {
        self.close(error);
        for task in self.tasks.lock().drain(..) {
            task.abort();
        }
    }
}

/// A connection to a stormledger server. Cheap to clone; all clones share the connection and its
/// batching. The connection closes when the last clone is dropped.
#[derive(Clone)]
pub struct Client {
    calls: mpsc::Sender<Call>,
    session: AuthOk,
    shared: Arc<Shared>,
    request_timeout: Duration,
}

impl core::fmt::Debug for Client {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Client").field("session", &self.session).finish()
    }
}

impl Client {
    /// Connects and authenticates with the client role.
    pub async fn connect(addr: impl ToSocketAddrs, token: &str) -> Result<Client, ClientError> {
        Client::connect_with(addr, ClientConfig::new(token)).await
    }

    /// Connects and authenticates with explicit settings.
    pub async fn connect_with(addr: impl ToSocketAddrs, config: ClientConfig) -> Result<Client, ClientError> {
        tokio::time::timeout(config.connect_timeout, Client::handshake(addr, &config))
            .await
            .map_err(|_| ClientError::from(std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out")))?
    }

    async fn handshake(addr: impl ToSocketAddrs, config: &ClientConfig) -> Result<Client, ClientError> {
        let (reader, writer, session) = authenticate(addr, config).await?;
        // Trust the server's window but keep it sane: at least one frame, and never so many that a
        // misbehaving server could make the client pin unbounded memory.
        let window = (session.in_flight_max as usize).clamp(1, 1 << 16);
        let shared = Arc::new(Shared {
            pending: Mutex::new(HashMap::new()),
            window: Arc::new(Semaphore::new(window)),
            closed: Mutex::new(None),
            tasks: Mutex::new(Vec::new()),
        });
        let (calls, calls_rx) = mpsc::channel(config.queue_max.max(1));
        let limits = Limits {
            commands: (session.commands_per_frame_max as usize).clamp(1, COMMANDS_PER_FRAME_MAX),
            queries: (session.queries_per_frame_max as usize).clamp(1, QUERIES_PER_FRAME_MAX),
        };
        let reading = tokio::spawn(read_loop(reader, shared.clone())).abort_handle();
        let writing = tokio::spawn(batch_loop(calls_rx, writer, shared.clone(), limits)).abort_handle();
        shared.tasks.lock().extend([reading, writing]);
        Ok(Client { calls, session, shared, request_timeout: config.request_timeout })
    }

    /// What the server granted: role, limits, connection id.
    pub fn session(&self) -> AuthOk {
        self.session
    }

    /// True once the connection has failed or closed; every further call fails.
    pub fn is_closed(&self) -> bool {
        self.shared.closed.lock().is_some()
    }

    /// Submits commands; one reply per command, same order. Concurrent calls are coalesced into
    /// shared frames. A call larger than one frame is split (the parts may be applied in
    /// different batches).
    ///
    /// On a client-role connection a call with an admin kind (`server::ADMIN_KIND_MIN` and up) is
    /// refused here, whole and unsent, with `ClientError::InvalidRequest`: the server refuses
    /// every frame holding one, so coalesced with other calls it would fail them too.
    pub async fn submit(&self, commands: Vec<CommandRecord>) -> Result<Vec<ReplyRecord>, ClientError> {
        if self.session.role != Role::Admin && commands.iter().any(|command| command.kind >= ADMIN_KIND_MIN) {
            return Err(ClientError::InvalidRequest("admin command kinds need an admin connection"));
        }
        let limit = (self.session.commands_per_frame_max as usize).clamp(1, COMMANDS_PER_FRAME_MAX);
        self.in_frames(commands, limit, Call::Commands).await
    }

    /// Runs queries; one answer per query, same order.
    pub async fn queries(&self, queries: Vec<QueryRecord>) -> Result<Vec<QueryAnswer>, ClientError> {
        let limit = (self.session.queries_per_frame_max as usize).clamp(1, QUERIES_PER_FRAME_MAX);
        self.in_frames(queries, limit, Call::Queries).await
    }

    /// Sends `items` as calls of at most `limit` each and gathers the answers in order, within
    /// `request_timeout` (see `ClientConfig::request_timeout`).
    async fn in_frames<T, R>(
        &self,
        items: Vec<T>,
        limit: usize,
        call: fn(Vec<T>, Done<R>) -> Call,
    ) -> Result<Vec<R>, ClientError> {
        match tokio::time::timeout(self.request_timeout, self.in_frames_unbounded(items, limit, call)).await {
            Ok(result) => result,
            Err(_) => {
                let error = ClientError::from(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!(
                        "no answer within {:?}: the connection is closed, and what was sent on it may or may not have \
                         been applied (retry it unchanged)",
                        self.request_timeout
                    ),
                ));
                self.shared.abandon(error.clone());
                Err(error)
            }
        }
    }

    async fn in_frames_unbounded<T, R>(
        &self,
        items: Vec<T>,
        limit: usize,
        call: fn(Vec<T>, Done<R>) -> Call,
    ) -> Result<Vec<R>, ClientError> {
        let mut receivers = Vec::new();
        let mut rest = items;
        while !rest.is_empty() {
            let tail = rest.split_off(rest.len().min(limit));
            let (done, receiver) = oneshot::channel();
            self.enqueue(call(rest, done)).await?;
            receivers.push(receiver);
            rest = tail;
        }
        let mut answers = Vec::new();
        for receiver in receivers {
            answers.extend(receiver.await.map_err(|_| self.shared.closed_error())??);
        }
        Ok(answers)
    }

    /// Runs one query.
    pub async fn query(&self, query: QueryRecord) -> Result<QueryAnswer, ClientError> {
        self.queries(vec![query]).await?.pop().ok_or(ClientError::Closed)
    }

    /// The committed balance of `account`: status ok/not_found, value = balance.
    pub async fn balance(&self, account: u64) -> Result<ReplyRecord, ClientError> {
        let mut query = QueryRecord { kind: QUERY_KIND_BALANCE, ..QueryRecord::default() };
        query.key.set(account);
        Ok(self.query(query).await?.reply)
    }

    async fn enqueue(&self, call: Call) -> Result<(), ClientError> {
        if let Some(error) = self.shared.closed.lock().clone() {
            return Err(error);
        }
        self.calls.send(call).await.map_err(|_| self.shared.closed_error())
    }
}

#[derive(Clone, Copy)]
struct Limits {
    commands: usize,
    queries: usize,
}

/// Takes a call apart if it is of the wanted kind, else hands it back.
type SplitCall<T, D> = fn(Call) -> Result<(Vec<T>, D), Call>;

/// Adds queued calls of the same kind to `records` while they fit in `limit`; the first call of
/// another kind, or one that does not fit, is left in `deferred` for the next frame.
#[allow(clippy::too_many_arguments)]
fn coalesce<T, D>(
    records: &mut Vec<T>,
    waiters: &mut Vec<(usize, D)>,
    limit: usize,
    calls: &mut mpsc::Receiver<Call>,
    deferred: &mut Option<Call>,
    split: SplitCall<T, D>,
    join: fn(Vec<T>, D) -> Call,
) {
    while records.len() < limit {
        let Ok(call) = calls.try_recv() else { break };
        match split(call) {
            Ok((more, done)) if records.len() + more.len() <= limit => {
                waiters.push((more.len(), done));
                records.extend(more);
            }
            Ok((more, done)) => {
                *deferred = Some(join(more, done));
                break;
            }
            Err(other) => {
                *deferred = Some(other);
                break;
            }
        }
    }
}

/// Turns queued calls into frames. Waiting for a window slot is what makes batches: while this
/// task waits, calls pile up in the queue, and the next frame takes all that fit.
async fn batch_loop(
    mut calls: mpsc::Receiver<Call>,
    mut writer: FrameWriter<WriteHalf>,
    shared: Arc<Shared>,
    limits: Limits,
) {
    let mut deferred: Option<Call> = None;
    let mut next_request_id: u64 = 1;
    loop {
        let first = match deferred.take() {
            Some(call) => call,
            None => match calls.recv().await {
                Some(call) => call,
                None => break, // every Client clone is gone
            },
        };
        let Ok(slot) = shared.window.clone().acquire_owned().await else {
            first.fail(shared.closed_error());
            break;
        };
        let (payload, waiters) = match first {
            Call::Commands(mut records, done) => {
                let mut waiters = vec![(records.len(), done)];
                let split = |call| match call {
                    Call::Commands(records, done) => Ok((records, done)),
                    other => Err(other),
                };
                let limit = limits.commands;
                coalesce(&mut records, &mut waiters, limit, &mut calls, &mut deferred, split, Call::Commands);
                (Payload::Commands(records), Waiters::Commands(waiters))
            }
            Call::Queries(mut records, done) => {
                let mut waiters = vec![(records.len(), done)];
                let split = |call| match call {
                    Call::Queries(records, done) => Ok((records, done)),
                    other => Err(other),
                };
                let limit = limits.queries;
                coalesce(&mut records, &mut waiters, limit, &mut calls, &mut deferred, split, Call::Queries);
                (Payload::Query(records), Waiters::Queries(waiters))
            }
        };
        let request_id = next_request_id;
        next_request_id += 1;
        let frame = Frame::new(request_id, payload);
        if let Err(error) = writer.queue(&frame) {
            waiters.fail(&ClientError::Protocol(error));
            continue;
        }
        // Register before writing: the answer can arrive before `flush` returns.
        shared.pending.lock().insert(request_id, Pending { waiters, _slot: slot });
        // The read side may have closed the connection since the slot was taken: `close` marks
        // it closed, then fails every registered request, so one registered after that would
        // wait forever (a write into a connection the peer just reset can still succeed).
        if shared.closed.lock().is_some() {
            if let Some(pending) = shared.pending.lock().remove(&request_id) {
                pending.waiters.fail(&shared.closed_error());
            }
            break;
        }
        if let Err(error) = writer.flush().await {
            shared.close(error.into());
            break;
        }
    }
    // Fail whatever is still queued so no caller waits forever, then close our side.
    if let Some(call) = deferred {
        call.fail(shared.closed_error());
    }
    calls.close();
    while let Some(call) = calls.recv().await {
        call.fail(shared.closed_error());
    }
    let _ = writer.shutdown().await;
}

/// The read side of a connection, plaintext or TLS.
pub(crate) type ReadHalf = Box<dyn AsyncRead + Send + Unpin>;
/// The write side of a connection, plaintext or TLS.
pub(crate) type WriteHalf = Box<dyn AsyncWrite + Send + Unpin>;

/// TCP connect, then the TLS handshake if configured.
async fn open(addr: impl ToSocketAddrs, config: &ClientConfig) -> Result<(ReadHalf, WriteHalf), ClientError> {
    let stream = TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let Some(tls) = &config.tls else {
        let peer = stream.peer_addr()?;
        if !plaintext_allowed(peer.ip(), config.allow_remote_plaintext) {
            return Err(ClientError::PlaintextToRemote(peer));
        }
        let (read_half, write_half) = stream.into_split();
        return Ok((Box::new(read_half), Box::new(write_half)));
    };
    let connector = tokio_rustls::TlsConnector::from(tls.config.clone());
    let stream = connector.connect(tls.server_name.clone(), stream).await.map_err(|error| {
        if crate::tls::is_tls_error(&error) {
            ClientError::Tls(Arc::new(error))
        } else {
            error.into()
        }
    })?;
    let (read_half, write_half) = tokio::io::split(stream);
    Ok((Box::new(read_half), Box::new(write_half)))
}

/// Whether a plaintext connection to `peer` may carry the token: only to a loopback address,
/// unless the caller allowed it explicitly.
pub fn plaintext_allowed(peer: std::net::IpAddr, allow_remote_plaintext: bool) -> bool {
    peer.to_canonical().is_loopback() || allow_remote_plaintext
}

/// Connects, sends Hello with the token and waits for AuthOk: the start of every connection.
pub(crate) async fn authenticate(
    addr: impl ToSocketAddrs,
    config: &ClientConfig,
) -> Result<(FrameReader<ReadHalf>, FrameWriter<WriteHalf>, AuthOk), ClientError> {
    if config.token.len() > crate::protocol::TOKEN_LEN_MAX {
        return Err(ClientError::InvalidRequest("token longer than 120 bytes"));
    }
    let (read_half, write_half) = open(addr, config).await?;
    let mut reader = FrameReader::new(read_half);
    let mut writer = FrameWriter::new(write_half);
    let hello = Hello { role: config.role, token: config.token.as_bytes().to_vec() };
    writer.write_frame(&Frame::new(0, Payload::Hello(hello))).await?;
    let session = match reader.read_frame().await? {
        Some(Frame { payload: Payload::AuthOk(session), .. }) => session,
        Some(Frame { payload: Payload::AuthFailed(error), .. }) => return Err(ClientError::Auth(error)),
        Some(Frame { payload: Payload::Error(error), .. }) => return Err(ClientError::Server(error)),
        Some(frame) => {
            return Err(ClientError::Protocol(ProtocolError::UnexpectedFrame { kind: frame.payload.kind() as u16 }))
        }
        None => return Err(ClientError::Closed),
    };
    Ok((reader, writer, session))
}

/// Matches answers to waiting calls until the connection ends, then fails the rest.
async fn read_loop(mut reader: FrameReader<ReadHalf>, shared: Arc<Shared>) {
    let error = loop {
        let frame = match reader.read_frame().await {
            Ok(Some(frame)) => frame,
            Ok(None) => break ClientError::Closed,
            Err(error) => break error.into(),
        };
        let request_id = frame.request_id;
        let kind = frame.payload.kind() as u16;
        match frame.payload {
            Payload::Pong => continue,
            Payload::Error(error) if request_id == 0 => break ClientError::Server(error),
            payload => {
                let Some(pending) = shared.pending.lock().remove(&request_id) else {
                    // An answer to nothing we asked: the stream can no longer be trusted.
                    break ClientError::Protocol(ProtocolError::UnexpectedFrame { kind });
                };
                if let Err(error) = deliver(pending.waiters, payload, kind) {
                    break error;
                }
            }
        }
    };
    shared.close(error);
}

/// Hands each waiter its slice of an answer frame. `Err` when the answer does not fit the
/// request (wrong kind or count), which means the connection is broken.
fn deliver(waiters: Waiters, payload: Payload, kind: u16) -> Result<(), ClientError> {
    let mismatch =
        ClientError::Protocol(ProtocolError::InvalidBody { kind, reason: "answer does not match the request" });
    match (waiters, payload) {
        (waiters, Payload::Error(error)) => {
            waiters.fail(&ClientError::Server(error));
            Ok(())
        }
        (Waiters::Commands(waiters), Payload::Replies(replies)) => {
            if waiters.iter().map(|(len, _)| len).sum::<usize>() != replies.len() {
                Waiters::Commands(waiters).fail(&mismatch);
                return Err(mismatch);
            }
            let mut replies = replies.into_iter();
            for (len, done) in waiters {
                let _ = done.send(Ok(replies.by_ref().take(len).collect()));
            }
            Ok(())
        }
        (Waiters::Queries(waiters), Payload::QueryAnswer(answers)) => {
            if waiters.iter().map(|(len, _)| len).sum::<usize>() != answers.len() {
                Waiters::Queries(waiters).fail(&mismatch);
                return Err(mismatch);
            }
            let mut answers = answers.into_iter();
            for (len, done) in waiters {
                let _ = done.send(Ok(answers.by_ref().take(len).collect()));
            }
            Ok(())
        }
        (waiters, _) => {
            waiters.fail(&mismatch);
            Err(mismatch)
        }
    }
}
