//! Counters of the network layer, updated with relaxed atomics on the hot path and read by the
//! metrics exporter. Relaxed ordering is enough: each counter is independent and monotonic (or a
//! gauge), and readers want a recent value, not a consistent cut across counters.

use std::sync::atomic::{AtomicU64, Ordering};

/// Network-layer counters. All counters are monotonic except `connections_active`, a gauge.
#[derive(Debug, Default)]
pub struct ServerStats {
    pub connections_accepted: AtomicU64,
    pub connections_active: AtomicU64,
    /// Refused because `connections_max` was reached.
    pub connections_refused: AtomicU64,
    pub auth_failures: AtomicU64,
    /// TLS handshakes that failed or did not finish within the handshake timeout.
    pub tls_handshake_failures: AtomicU64,
    /// Plaintext connections answered `tls_required`: to a TLS server, or from a non-loopback
    /// peer without `allow_remote_plaintext`.
    pub plaintext_refused: AtomicU64,
    pub frames_received: AtomicU64,
    pub frames_sent: AtomicU64,
    pub commands_received: AtomicU64,
    pub replies_sent: AtomicU64,
    pub queries_received: AtomicU64,
    /// Frames that failed to parse; each closes its connection.
    pub protocol_errors: AtomicU64,
    /// Command frames refused because a client-role connection sent an admin kind.
    pub forbidden_frames: AtomicU64,
    pub idle_timeouts: AtomicU64,
    /// Connections dropped because the peer did not read its replies in time.
    pub write_timeouts: AtomicU64,
    /// Requests the backend dropped without answering (a bug in the backend).
    pub internal_errors: AtomicU64,
    /// Bytes read from and written to sockets; added when each connection ends, so a long-lived
    /// connection shows up here only once it closes.
    pub bytes_received: AtomicU64,
    pub bytes_sent: AtomicU64,
}

/// A plain copy of the counters, for printing or exporting.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default, serde::Serialize)]
pub struct StatsSnapshot {
    pub connections_accepted: u64,
    pub connections_active: u64,
    pub connections_refused: u64,
    pub auth_failures: u64,
    pub tls_handshake_failures: u64,
    pub plaintext_refused: u64,
    pub frames_received: u64,
    pub frames_sent: u64,
    pub commands_received: u64,
    pub replies_sent: u64,
    pub queries_received: u64,
    pub protocol_errors: u64,
    pub forbidden_frames: u64,
    pub idle_timeouts: u64,
    pub write_timeouts: u64,
    pub internal_errors: u64,
    pub bytes_received: u64,
    pub bytes_sent: u64,
}

impl ServerStats {
    pub fn snapshot(&self) -> StatsSnapshot {
        let get = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        StatsSnapshot {
            connections_accepted: get(&self.connections_accepted),
            connections_active: get(&self.connections_active),
            connections_refused: get(&self.connections_refused),
            auth_failures: get(&self.auth_failures),
            tls_handshake_failures: get(&self.tls_handshake_failures),
            plaintext_refused: get(&self.plaintext_refused),
            frames_received: get(&self.frames_received),
            frames_sent: get(&self.frames_sent),
            commands_received: get(&self.commands_received),
            replies_sent: get(&self.replies_sent),
            queries_received: get(&self.queries_received),
            protocol_errors: get(&self.protocol_errors),
            forbidden_frames: get(&self.forbidden_frames),
            idle_timeouts: get(&self.idle_timeouts),
            write_timeouts: get(&self.write_timeouts),
            internal_errors: get(&self.internal_errors),
            bytes_received: get(&self.bytes_received),
            bytes_sent: get(&self.bytes_sent),
        }
    }
}

pub(crate) fn add(counter: &AtomicU64, n: u64) {
    counter.fetch_add(n, Ordering::Relaxed);
}
