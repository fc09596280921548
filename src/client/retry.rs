//! A client that survives connection failures: it reconnects and resubmits the same commands.
//!
//! Resubmitting is safe only because every command carries its id (the idempotency key): a
//! command that was applied before the connection failed is answered with its original result
//! (reply flag `duplicate`), one that was not is applied now.
//!
//! The idempotency window is bounded, so a retry of an id the shard has already forgotten
//! could be applied twice. To rule that out, `submit` stamps every record whose `timestamp`
//! is 0 with the time of its first submission (ns since the Unix epoch, this host's clock)
//! and resubmits the stamped records unchanged: the server then refuses a forgotten id with
//! `id_expired` instead of applying it again (docs/protocol.md, "Retrying safely"). A record
//! whose `timestamp` the caller set is left as it is (it may come from an earlier process).
//!
//! An error from `submit` does not say that nothing was applied: an earlier attempt may have
//! reached the server before its connection failed, and the last attempt's error (a refused
//! token on the reconnect, the retries used up) is all that is returned. Treat every error but
//! `InvalidRequest` (refused before anything is sent) as "outcome unknown": keep the records
//! and submit them again, unchanged, later.

use std::time::Duration;

use tokio::sync::Mutex;

use super::{Client, ClientConfig, ClientError};
use crate::layout::{CommandRecord, QueryRecord, ReplyRecord};
use crate::protocol::{ErrorCode, QueryAnswer};

/// See the module docs.
pub struct RetryingClient {
    addr: String,
    config: ClientConfig,
    client: Mutex<Option<Client>>,
    /// Attempts after the first (each after a reconnect).
    retries_max: u32,
    /// Wait before the first retry; doubled for each next one.
    backoff: Duration,
}

/// Sets `timestamp = now` on every record that has none: the first-send time the server
/// checks against its idempotency horizon.
pub fn stamp_first_send(commands: &mut [CommandRecord], now: u64) {
    for command in commands.iter_mut().filter(|c| c.timestamp.get() == 0) {
        command.timestamp.set(now);
    }
}

/// Now, in ns since the Unix epoch (this host's clock): the first-send time of a command sent
/// now (`stamp_first_send`; the CLI and the storm tool stamp with it too).
pub fn unix_nanos() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64)
}

/// Failures after which a retry with the same ids may succeed.
pub fn is_retryable(error: &ClientError) -> bool {
    match error {
        ClientError::Io(_) | ClientError::Closed => true,
        ClientError::Server(body) => matches!(
            body.code,
            ErrorCode::INTERNAL | ErrorCode::SHUTTING_DOWN | ErrorCode::IDLE_TIMEOUT | ErrorCode::TOO_MANY_CONNECTIONS
        ),
        _ => false,
    }
}

impl RetryingClient {
    /// A client for `addr` that retries at most `retries_max` times, waiting `backoff`, then
    /// twice that, and so on. Connects lazily.
    pub fn new(addr: impl Into<String>, config: ClientConfig, retries_max: u32, backoff: Duration) -> RetryingClient {
        RetryingClient { addr: addr.into(), config, client: Mutex::new(None), retries_max, backoff }
    }

    async fn connected(&self) -> Result<Client, ClientError> {
        let mut slot = self.client.lock().await;
        if let Some(client) = slot.as_ref().filter(|c| !c.is_closed()) {
            return Ok(client.clone());
        }
        let client = Client::connect_with(self.addr.as_str(), self.config.clone()).await?;
        *slot = Some(client.clone());
        Ok(client)
    }

    async fn forget(&self) {
        *self.client.lock().await = None;
    }

    /// Runs `call` until it succeeds, fails for good, or the retries are used up.
    async fn with_retries<T, F, Fut>(&self, call: F) -> Result<T, ClientError>
    where
        F: Fn(Client) -> Fut,
        Fut: std::future::Future<Output = Result<T, ClientError>>,
    {
        let mut wait = self.backoff;
        let mut attempt = 0;
        loop {
            let result = match self.connected().await {
                Ok(client) => call(client).await,
                Err(e) => Err(e),
            };
            match result {
                Err(e) if is_retryable(&e) && attempt < self.retries_max => {
                    self.forget().await;
                    tokio::time::sleep(wait).await;
                    wait = wait.saturating_mul(2);
                    attempt += 1;
                }
                other => return other,
            }
        }
    }

    /// `Client::submit`, resubmitting the same commands after a connection failure. Records
    /// with `timestamp` 0 are first stamped with the current time (see the module docs).
    pub async fn submit(&self, mut commands: Vec<CommandRecord>) -> Result<Vec<ReplyRecord>, ClientError> {
        stamp_first_send(&mut commands, unix_nanos());
        self.with_retries(|client| {
            let commands = commands.clone();
            async move { client.submit(commands).await }
        })
        .await
    }

    /// `Client::queries`, retried the same way (reads are always safe to repeat).
    pub async fn queries(&self, queries: Vec<QueryRecord>) -> Result<Vec<QueryAnswer>, ClientError> {
        self.with_retries(|client| {
            let queries = queries.clone();
            async move { client.queries(queries).await }
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamps_only_unstamped_records() {
        let mut records = vec![CommandRecord::default(), CommandRecord::default()];
        records[1].timestamp.set(42);
        stamp_first_send(&mut records, 1_000);
        assert_eq!(records[0].timestamp.get(), 1_000);
        assert_eq!(records[1].timestamp.get(), 42, "a caller's first-send time is kept");
        // A retry of the stamped records keeps the first stamp.
        stamp_first_send(&mut records, 2_000);
        assert_eq!(records[0].timestamp.get(), 1_000);
    }
}
