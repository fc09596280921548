//! `--metrics ADDR`: a deliberately tiny HTTP/1.1 endpoint serving Prometheus text format.
//!
//! `GET /metrics` (or `/`) answers the current counters; anything else is 404 (405 for other
//! methods). Each connection serves one request and closes. Requests are bounded (8 KiB of
//! header, 5 s to send it) and at most 16 scrapes run at once, so the endpoint cannot be used to
//! pin the server's memory. The list of metrics is in docs/operations.md.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

use crate::engine::Engine;
use crate::server::ServerStats;

const REQUEST_BYTES_MAX: usize = 8 * 1024;
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
const SCRAPES_MAX: usize = 16;

/// What the endpoint reports.
pub struct Source {
    stats: Arc<ServerStats>,
    engine: Arc<Engine>,
    started: Instant,
    scrapes: AtomicU64,
}

impl Source {
    pub fn new(stats: Arc<ServerStats>, engine: Arc<Engine>) -> Source {
        Source { stats, engine, started: Instant::now(), scrapes: AtomicU64::new(0) }
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let s = self.stats.snapshot();
        let counters: [(&str, &str, u64); 17] = [
            ("connections_accepted_total", "TCP connections accepted.", s.connections_accepted),
            ("connections_refused_total", "Connections refused at the connection limit.", s.connections_refused),
            ("auth_failures_total", "Handshakes refused (wrong token or role).", s.auth_failures),
            ("tls_handshake_failures_total", "TLS handshakes that failed or timed out.", s.tls_handshake_failures),
            (
                "plaintext_refused_total",
                "Plaintext connections answered tls_required (TLS server, or non-loopback peer).",
                s.plaintext_refused,
            ),
            ("frames_received_total", "Protocol frames received.", s.frames_received),
            ("frames_sent_total", "Protocol frames sent.", s.frames_sent),
            ("commands_received_total", "Write commands received.", s.commands_received),
            ("replies_sent_total", "Command replies sent.", s.replies_sent),
            ("queries_received_total", "Read queries received.", s.queries_received),
            ("protocol_errors_total", "Frames that failed to parse (each closes its connection).", s.protocol_errors),
            ("forbidden_frames_total", "Admin command frames refused on client connections.", s.forbidden_frames),
            ("idle_timeouts_total", "Connections closed for idleness.", s.idle_timeouts),
            ("write_timeouts_total", "Connections dropped because the peer did not read.", s.write_timeouts),
            ("internal_errors_total", "Requests the engine dropped without answering.", s.internal_errors),
            ("bytes_received_total", "Bytes read from sockets (added when a connection ends).", s.bytes_received),
            ("bytes_sent_total", "Bytes written to sockets (added when a connection ends).", s.bytes_sent),
        ];
        let gauges: [(&str, &str, f64); 6] = [
            ("connections_active", "Open connections.", s.connections_active as f64),
            ("shards", "Engine shards.", self.engine.shards() as f64),
            (
                "maintenance",
                "1 while writes are paused by `admin maintenance on`.",
                self.engine.maintenance() as u8 as f64,
            ),
            ("transfer_ids", "Transfer ids in the engine's id directory.", self.engine.directory_len() as f64),
            ("uptime_seconds", "Seconds since the server started.", self.started.elapsed().as_secs_f64()),
            (
                "metrics_scrapes",
                "Scrapes of this endpoint, including this one.",
                self.scrapes.load(Ordering::Relaxed) as f64,
            ),
        ];
        let mut out = String::with_capacity(16 * 1024);
        for (name, help, value) in counters {
            let _ = write!(
                out,
                "# HELP stormledger_{name} {help}\n# TYPE stormledger_{name} counter\nstormledger_{name} {value}\n"
            );
        }
        for (name, help, value) in gauges {
            let _ = write!(
                out,
                "# HELP stormledger_{name} {help}\n# TYPE stormledger_{name} gauge\nstormledger_{name} {value}\n"
            );
        }
        self.engine.stats().render(&mut out, &self.engine.queue_depths());
        out
    }
}

/// Serves scrapes until the task is aborted.
pub async fn serve(listener: TcpListener, source: Arc<Source>) {
    let limit = Arc::new(Semaphore::new(SCRAPES_MAX));
    loop {
        let Ok((socket, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let Ok(permit) = limit.clone().try_acquire_owned() else {
            continue; // too many scrapes at once: drop this one
        };
        let source = source.clone();
        tokio::spawn(async move {
            let _ = tokio::time::timeout(REQUEST_TIMEOUT, answer(socket, &source)).await;
            drop(permit);
        });
    }
}

async fn answer(mut socket: TcpStream, source: &Source) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") && !buf.windows(2).any(|w| w == b"\n\n") {
        let n = socket.read(&mut chunk).await?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
        if buf.len() > REQUEST_BYTES_MAX {
            return respond(&mut socket, "431 Request Header Fields Too Large", "request too large\n").await;
        }
    }
    let line = buf.split(|&b| b == b'\n').next().unwrap_or(&[]);
    let line = String::from_utf8_lossy(line);
    let mut parts = line.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = path.split('?').next().unwrap_or("");
    match (method, path) {
        ("GET", "/metrics" | "/") => {
            source.scrapes.fetch_add(1, Ordering::Relaxed);
            respond(&mut socket, "200 OK", &source.render()).await
        }
        ("GET", _) => respond(&mut socket, "404 Not Found", "not found: try /metrics\n").await,
        _ => respond(&mut socket, "405 Method Not Allowed", "only GET is supported\n").await,
    }
}

async fn respond(socket: &mut TcpStream, status: &str, body: &str) -> std::io::Result<()> {
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n",
        body.len()
    );
    socket.write_all(head.as_bytes()).await?;
    socket.write_all(body.as_bytes()).await?;
    socket.shutdown().await
}
