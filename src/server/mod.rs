//! The TCP server: accepts connections, authenticates them, and moves frames between sockets and
//! the `Backend`.
//!
//! Shape (as in mini-redis): `run` owns a `Listener` loop; each accepted socket gets a
//! `connection` handler made of two tasks, a reader (this connection's frames -> backend) and a
//! writer (replies -> socket), joined by a bounded channel. No thread per connection: backend
//! callbacks run on engine threads and only push a reply into a channel slot reserved in advance,
//! which never blocks.
//!
//! Limits: `connections_max` connections (more are answered `too_many_connections` and closed;
//! at most `REFUSALS_IN_FLIGHT_MAX` such answers, each a TLS handshake on a TLS server, are in
//! progress at once, and connections beyond that are closed without one),
//! `in_flight_per_connection_max` unanswered frames per connection, answer bytes held per
//! connection (`answer_bytes_per_connection_max`) and across connections (`answer_bytes_max`)
//! (at any of these the reader stops reading, so TCP back-pressure reaches the client), and idle,
//! handshake and slow-writer timeouts.
//!
//! Transport: with `ServerConfig::tls` every connection does the TLS handshake first (inside the
//! handshake timeout, holding a connection slot), then the same protocol runs over the TLS
//! stream. Without it, plaintext is taken only from loopback peers unless
//! `allow_remote_plaintext` says otherwise (`connection::admit`).
//!
//! Shutdown: when the `shutdown` future completes, the listener stops accepting, every reader
//! stops reading, frames already submitted finish and their replies are written (bounded by
//! `drain_timeout`), and `run` returns once every connection has closed.
//!
//! What must never happen here: interpreting commands (beyond refusing admin kinds to client
//! connections), submitting anything from a frame that failed to parse, or blocking a runtime
//! thread on the engine.

pub mod backend;
mod connection;

/// Most refusals (`too_many_connections` answers) in progress at once. On a TLS server each one
/// costs a handshake, so a flood of connections over the limit could otherwise keep the network
/// threads busy with handshakes for connections that will be closed anyway; beyond this the
/// socket is closed at once (counted in `connections_refused` all the same).
pub const REFUSALS_IN_FLIGHT_MAX: usize = 64;
pub mod stats;

use std::future::Future;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch, Semaphore};

pub use backend::{AnswerCallback, Backend, ReplyCallback, ADMIN_KIND_MIN};
pub use stats::{ServerStats, StatsSnapshot};

use crate::protocol::TOKEN_LEN_MAX;

/// Server settings. `ServerConfig::new` gives production defaults.
#[derive(Clone)]
pub struct ServerConfig {
    /// Token of ordinary (client-role) connections.
    pub client_token: String,
    /// Token of operator (admin-role) connections; `None` disables the admin role over TCP.
    pub admin_token: Option<String>,
    /// Most simultaneous connections; further connections are refused with an error frame.
    pub connections_max: usize,
    /// Most frames a connection may have submitted whose answers the writer has not yet taken
    /// from the reply channel. Bounds the engine work one connection can have queued; the reader
    /// stops reading at the limit. Announced to clients in `AuthOk`.
    pub in_flight_per_connection_max: usize,
    /// Most bytes of answers one connection may hold: answers being computed (counted at the
    /// largest the request allows), queued for the writer, or being written to the socket (until
    /// the write completes). Bounds the memory one connection can pin, however slowly it reads;
    /// the reader stops reading at the limit. A frame whose answer may be larger than this waits
    /// for the whole budget and runs alone.
    pub answer_bytes_per_connection_max: usize,
    /// The same, across all connections: bounds the memory all clients together can pin. At the
    /// limit every connection's reader waits for answers to be written (no connection is
    /// refused); a connection that does not read gives its share back when `write_timeout`
    /// drops it.
    pub answer_bytes_max: usize,
    /// Time allowed between accept and a valid `Hello` (the TLS handshake included).
    pub handshake_timeout: Duration,
    /// A connection with nothing received and nothing in flight for this long is closed.
    pub idle_timeout: Duration,
    /// A connection whose peer does not accept a write for this long is dropped (a slow reader
    /// must not pin replies and engine capacity forever).
    pub write_timeout: Duration,
    /// At shutdown or close, time allowed for in-flight frames to be answered and written.
    pub drain_timeout: Duration,
    /// Serve TLS (`crate::tls::server_config`): every connection does the TLS handshake first,
    /// within `handshake_timeout`; a plaintext client is answered `tls_required`.
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// Without `tls`: also take plaintext connections from non-loopback peers (their token
    /// crosses the network in clear text). Off by default: such peers are answered
    /// `tls_required` before anything is read.
    pub allow_remote_plaintext: bool,
}

impl core::fmt::Debug for ServerConfig {
    // Tokens are secrets: keep them out of logs.
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("ServerConfig")
            .field("client_token", &"<redacted>")
            .field("admin_token", &self.admin_token.as_ref().map(|_| "<redacted>"))
            .field("connections_max", &self.connections_max)
            .field("in_flight_per_connection_max", &self.in_flight_per_connection_max)
            .field("answer_bytes_per_connection_max", &self.answer_bytes_per_connection_max)
            .field("answer_bytes_max", &self.answer_bytes_max)
            .field("handshake_timeout", &self.handshake_timeout)
            .field("idle_timeout", &self.idle_timeout)
            .field("write_timeout", &self.write_timeout)
            .field("drain_timeout", &self.drain_timeout)
            .field("tls", &self.tls.is_some())
            .field("allow_remote_plaintext", &self.allow_remote_plaintext)
            .finish()
    }
}

impl ServerConfig {
    /// Defaults: 1024 connections, 64 frames in flight and 4 MiB of answers per connection,
    /// 256 MiB of answers in all, 10 s handshake, 5 min idle, 10 s write, 30 s drain; no admin
    /// token; plaintext, from loopback peers only.
    pub fn new(client_token: impl Into<String>) -> ServerConfig {
        ServerConfig {
            client_token: client_token.into(),
            admin_token: None,
            connections_max: 1024,
            in_flight_per_connection_max: 64,
            answer_bytes_per_connection_max: 4 << 20,
            answer_bytes_max: 256 << 20,
            handshake_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(300),
            write_timeout: Duration::from_secs(10),
            drain_timeout: Duration::from_secs(30),
            tls: None,
            allow_remote_plaintext: false,
        }
    }

    /// Checks the settings and how they relate; called by `Server::new`.
    pub fn validate(&self) -> Result<(), ServerError> {
        let bad = |reason: &str| Err(ServerError::Config(reason.to_string()));
        let token_ok = |token: &str| !token.is_empty() && token.len() <= TOKEN_LEN_MAX;
        if !token_ok(&self.client_token) {
            return bad("client token must be 1..=120 bytes");
        }
        if let Some(admin) = &self.admin_token {
            if !token_ok(admin) {
                return bad("admin token must be 1..=120 bytes");
            }
            // With equal tokens every client could act as an operator.
            if admin == &self.client_token {
                return bad("admin token must differ from the client token");
            }
        }
        if self.connections_max == 0 || self.connections_max > Semaphore::MAX_PERMITS {
            return bad("connections_max must be at least 1");
        }
        // The reply channel reserves one slot per in-flight frame; tokio caps channel sizes.
        if self.in_flight_per_connection_max == 0 || self.in_flight_per_connection_max > 1 << 16 {
            return bad("in_flight_per_connection_max must be in 1..=65536");
        }
        // Budgets are semaphores taken with `acquire_many`, which counts in u32.
        let budget_ok = |bytes: usize| bytes > 0 && bytes <= u32::MAX as usize;
        if !budget_ok(self.answer_bytes_per_connection_max) || !budget_ok(self.answer_bytes_max) {
            return bad("answer_bytes_per_connection_max and answer_bytes_max must be in 1..=4294967295");
        }
        let zero = Duration::ZERO;
        if self.handshake_timeout == zero || self.idle_timeout == zero || self.write_timeout == zero {
            return bad("timeouts must be positive");
        }
        Ok(())
    }
}

/// Why the server could not run.
#[derive(Debug)]
#[non_exhaustive]
pub enum ServerError {
    /// The configuration is invalid.
    Config(String),
}

impl core::fmt::Display for ServerError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            ServerError::Config(reason) => write!(f, "invalid server configuration: {reason}"),
        }
    }
}

impl std::error::Error for ServerError {}

/// State shared by the listener and every connection.
pub(crate) struct Shared {
    pub(crate) backend: Arc<dyn Backend>,
    pub(crate) config: ServerConfig,
    pub(crate) stats: Arc<ServerStats>,
    pub(crate) next_connection_id: AtomicU64,
    /// The answer bytes of all connections (`ServerConfig::answer_bytes_max`).
    pub(crate) answer_bytes: Arc<Semaphore>,
}

impl Shared {
    pub(crate) fn new(backend: Arc<dyn Backend>, config: ServerConfig) -> Shared {
        let answer_bytes = Arc::new(Semaphore::new(config.answer_bytes_max));
        Shared { backend, config, stats: Arc::default(), next_connection_id: AtomicU64::new(1), answer_bytes }
    }
}

/// A configured server, before it runs. Holds the stats so the caller can export them.
pub struct Server {
    shared: Arc<Shared>,
}

impl Server {
    pub fn new(backend: Arc<dyn Backend>, config: ServerConfig) -> Result<Server, ServerError> {
        config.validate()?;
        Ok(Server { shared: Arc::new(Shared::new(backend, config)) })
    }

    /// The live counters of this server.
    pub fn stats(&self) -> Arc<ServerStats> {
        self.shared.stats.clone()
    }

    /// Serves `listener` until `shutdown` completes, then drains and returns.
    pub async fn run(self, listener: TcpListener, shutdown: impl Future) -> Result<(), ServerError> {
        let limit = Arc::new(Semaphore::new(self.shared.config.connections_max));
        let refusals = Arc::new(Semaphore::new(REFUSALS_IN_FLIGHT_MAX));
        let (notify_shutdown, shutdown_rx) = watch::channel(false);
        // Every connection task holds a clone of `done_tx`; when all are dropped `recv` returns
        // None, which is how `run` knows every connection has finished.
        let (done_tx, mut done_rx) = mpsc::channel::<()>(1);
        let mut accept_backoff = Duration::from_millis(1);

        tokio::pin!(shutdown);
        loop {
            let accepted = tokio::select! {
                _ = &mut shutdown => break,
                accepted = listener.accept() => accepted,
            };
            let (socket, peer) = match accepted {
                Ok(accepted) => {
                    accept_backoff = Duration::from_millis(1);
                    accepted
                }
                Err(error) => {
                    // Accept errors are usually transient (EMFILE, ECONNABORTED). Back off rather
                    // than spin, and never give up: a ledger that stops accepting is an outage.
                    crate::log_line!("stormledger: accept failed: {error}; retrying in {accept_backoff:?}");
                    tokio::select! {
                        _ = &mut shutdown => break,
                        _ = tokio::time::sleep(accept_backoff) => {}
                    }
                    accept_backoff = (accept_backoff * 2).min(Duration::from_secs(1));
                    continue;
                }
            };
            stats::add(&self.shared.stats.connections_accepted, 1);
            let shared = self.shared.clone();
            let done = done_tx.clone();
            match limit.clone().try_acquire_owned() {
                Ok(permit) => {
                    let shutdown_rx = shutdown_rx.clone();
                    tokio::spawn(async move {
                        connection::serve(socket, peer, shared, shutdown_rx).await;
                        drop(permit);
                        drop(done);
                    });
                }
                Err(_) => {
                    // Refuse explicitly instead of leaving the client hanging in the backlog: it
                    // learns why and can back off or try another node.
                    stats::add(&self.shared.stats.connections_refused, 1);
                    if let Ok(refusing) = refusals.clone().try_acquire_owned() {
                        tokio::spawn(async move {
                            connection::refuse(socket, &shared).await;
                            drop(refusing);
                            drop(done);
                        });
                    }
                }
            }
        }

        drop(listener);
        let _ = notify_shutdown.send(true);
        drop(done_tx);
        let _ = done_rx.recv().await;
        Ok(())
    }
}

/// Serves `listener` with `backend` until `shutdown` completes; see `Server` to read the stats.
pub async fn run(
    listener: TcpListener,
    backend: Arc<dyn Backend>,
    config: ServerConfig,
    shutdown: impl Future,
) -> Result<(), ServerError> {
    Server::new(backend, config)?.run(listener, shutdown).await
}
