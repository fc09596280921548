//! One logical connection to the ledger: the in-process engine, or one TCP connection that is
//! re-established when it drops. Both answer the same async `submit` and `balances`.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use stormledger::client::retry::is_retryable;
use stormledger::client::{Client, ClientConfig, ClientError, TlsClientConfig};
use stormledger::engine::Engine;
use stormledger::layout::{CommandRecord, QueryRecord, ReplyRecord};
use stormledger::protocol::QUERY_KIND_BALANCE;
use stormledger::server::Backend;

/// How long a link keeps trying to (re)connect before its caller gives up on it.
pub const RECONNECT_FOR: Duration = Duration::from_secs(20);

/// What the tool drives.
#[derive(Clone)]
pub enum Target {
    Engine(Arc<Engine>),
    Tcp { addr: String, token: String, tls: Option<TlsClientConfig>, allow_remote_plaintext: bool },
}

impl Target {
    /// For a TCP target: the address, and the client configuration every connection to it uses.
    pub fn tcp(&self) -> Option<(&str, ClientConfig)> {
        let Target::Tcp { addr, token, tls, allow_remote_plaintext } = self else { return None };
        let config = ClientConfig {
            tls: tls.clone(),
            allow_remote_plaintext: *allow_remote_plaintext,
            ..ClientConfig::new(token.as_str())
        };
        Some((addr.as_str(), config))
    }
}

/// See the module docs.
pub struct Link {
    target: Target,
    client: tokio::sync::Mutex<Option<Client>>,
    connected_once: AtomicBool,
    reconnects: Arc<AtomicU64>,
}

impl Link {
    pub fn new(target: Target, reconnects: Arc<AtomicU64>) -> Link {
        Link { target, client: tokio::sync::Mutex::new(None), connected_once: AtomicBool::new(false), reconnects }
    }

    /// The live client, connecting (with retries for `RECONNECT_FOR`) when there is none.
    /// Only failures that `retry::is_retryable` calls transient are retried.
    async fn client(&self) -> Result<Client, ClientError> {
        let Some((addr, config)) = self.target.tcp() else {
            return Err(ClientError::InvalidRequest("not a TCP link"));
        };
        let mut slot = self.client.lock().await;
        if let Some(client) = slot.as_ref() {
            if !client.is_closed() {
                return Ok(client.clone());
            }
        }
        *slot = None;
        let deadline = Instant::now() + RECONNECT_FOR;
        let mut backoff = Duration::from_millis(10);
        loop {
            match Client::connect_with(addr, config.clone()).await {
                Ok(client) => {
                    if self.connected_once.swap(true, Ordering::Relaxed) {
                        self.reconnects.fetch_add(1, Ordering::Relaxed);
                    }
                    *slot = Some(client.clone());
                    return Ok(client);
                }
                // Wrong token, TLS failure, `tls_required`, not this protocol: retrying won't help.
                Err(error) if !is_retryable(&error) => return Err(error),
                Err(error) if Instant::now() + backoff > deadline => return Err(error),
                Err(_) => {
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_millis(500));
                }
            }
        }
    }

    pub fn target(&self) -> &Target {
        &self.target
    }

    /// Connects now (TCP) so that an unreachable server is reported before anything is sent.
    pub async fn warm_up(&self) -> Result<(), ClientError> {
        match self.target {
            Target::Engine(_) => Ok(()),
            Target::Tcp { .. } => self.client().await.map(|_| ()),
        }
    }

    /// Submits write commands; one reply per command, in order. `Err`: outcome unknown.
    pub async fn submit(&self, records: Vec<CommandRecord>) -> Result<Vec<ReplyRecord>, ClientError> {
        match &self.target {
            Target::Engine(engine) => {
                let (tx, rx) = tokio::sync::oneshot::channel();
                engine.submit(
                    records,
                    Box::new(move |replies| {
                        let _ = tx.send(replies);
                    }),
                );
                rx.await.map_err(|_| ClientError::Closed)
            }
            Target::Tcp { .. } => self.client().await?.submit(records).await,
        }
    }

    /// Committed balances of `keys`: one reply each (status ok / not_found, value = balance).
    pub async fn balances(&self, keys: &[u64]) -> Result<Vec<ReplyRecord>, ClientError> {
        match &self.target {
            Target::Engine(engine) => Ok(keys.iter().map(|&k| Backend::balance(engine.as_ref(), k)).collect()),
            Target::Tcp { .. } => {
                let queries = keys
                    .iter()
                    .map(|&k| {
                        let mut q = QueryRecord { kind: QUERY_KIND_BALANCE, ..QueryRecord::default() };
                        q.key.set(k);
                        q
                    })
                    .collect();
                let answers = self.client().await?.queries(queries).await?;
                Ok(answers.into_iter().map(|a| a.reply).collect())
            }
        }
    }
}
