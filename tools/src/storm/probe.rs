//! The read probe: what one balance read costs a client while the storm runs.
//!
//! The storm's own reads (`--read-percent`) ride in batches next to the write frames, share the
//! tool's async runtime with them and are timed from the batch's intended start, so they measure
//! the load generator as much as the server. The probe is what an application serving a user's
//! "my balance" screen does: one balance query per round trip, on a thread, runtime and
//! connection of its own, timed from the moment it is sent to the moment its answer is back.
//! Probes are paced (`--probe-reads PER_SEC`) so they add no noticeable load.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use stormledger::client::Client;
use stormledger::layout::QueryRecord;
use stormledger::protocol::QUERY_KIND_BALANCE;
use stormledger::server::Backend;
use stormledger::workload::{SplitMix64, STREAMER_BASE};

use super::link::Target;

/// Latencies in nanoseconds, send to answer.
pub struct ProbeReport {
    pub latency_ns: Histogram<u64>,
    pub failed: u64,
    pub error: Option<String>,
}

/// Fewest probe reads per second (`--probe-reads`, 0 aside): a pause is at most one second.
pub const PER_SEC_MIN: f64 = 1.0;
/// Most probe reads per second (`--probe-reads`).
pub const PER_SEC_MAX: f64 = 100_000.0;
/// Shortest wait before the probe opens its connection again after failing to.
const RECONNECT_PAUSE: Duration = Duration::from_millis(100);

/// A running probe; `finish` stops it and returns what it measured.
pub struct Probe {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<ProbeReport>,
}

/// Starts probing `target` at `per_sec` reads per second (brought into
/// `PER_SEC_MIN..=PER_SEC_MAX`), each a random user in `1..=users` or (one in ten) the hot
/// streamer, like the storm's reads.
pub fn start(target: Target, users: u64, per_sec: f64, seed: u64) -> std::io::Result<Probe> {
    let stop = Arc::new(AtomicBool::new(false));
    // Not `clamp`, which keeps a NaN.
    let per_sec = if per_sec >= PER_SEC_MIN { per_sec.min(PER_SEC_MAX) } else { PER_SEC_MIN };
    let interval = Duration::from_secs_f64(1.0 / per_sec);
    let flag = stop.clone();
    let thread = std::thread::Builder::new()
        .name("read-probe".into())
        .spawn(move || run(target, users, interval, seed, &flag))?;
    Ok(Probe { stop, thread })
}

impl Probe {
    /// Stops the probe, cutting its current pause short, and waits for its last read.
    pub fn finish(self) -> ProbeReport {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.thread().unpark();
        self.thread.join().unwrap_or_else(|_| ProbeReport {
            latency_ns: new_histogram(),
            failed: 0,
            error: Some("the probe thread panicked".into()),
        })
    }
}

/// Waits `interval` on the probe thread, or until `stop` is set (`Probe::finish` unparks the
/// thread): the end of the storm never waits for the rest of a pause. Blocking, not a tokio timer:
/// the probe's runtime has nothing else to run, and a tokio timer would round the pause up to its
/// millisecond wheel.
fn pause(interval: Duration, stop: &AtomicBool) {
    let until = Instant::now() + interval;
    // `park_timeout` may return early (a spurious wake-up): park again for what is left.
    while !stop.load(Ordering::Relaxed) {
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return;
        }
        std::thread::park_timeout(left);
    }
}

fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000_000, 3).expect("histogram bounds")
}

fn run(target: Target, users: u64, interval: Duration, seed: u64, stop: &AtomicBool) -> ProbeReport {
    let mut report = ProbeReport { latency_ns: new_histogram(), failed: 0, error: None };
    let mut rng = SplitMix64(seed ^ 0x9e37_79b9_7f4a_7c15);
    let mut key = move || if rng.below(10) == 0 { STREAMER_BASE } else { 1 + rng.below(users) };
    match &target {
        Target::Engine(engine) => {
            while !stop.load(Ordering::Relaxed) {
                let k = key();
                let start = Instant::now();
                let reply = Backend::balance(engine.as_ref(), k);
                let ns = start.elapsed().as_nanos() as u64;
                std::hint::black_box(reply);
                report.latency_ns.saturating_record(ns.max(1));
                pause(interval, stop);
            }
        }
        Target::Tcp { .. } => {
            let (addr, config) = target.tcp().expect("a TCP target");
            let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                Ok(runtime) => runtime,
                Err(e) => {
                    report.error = Some(format!("probe runtime: {e}"));
                    return report;
                }
            };
            // A lost connection (a server restarted mid-storm) is opened again, at most every
            // `RECONNECT_PAUSE`, until the storm ends: the probe measures the reads after it too.
            runtime.block_on(async {
                let mut client: Option<Client> = None;
                while !stop.load(Ordering::Relaxed) {
                    let c = match client.take().filter(|c| !c.is_closed()) {
                        Some(c) => c,
                        None => match Client::connect_with(addr, config.clone()).await {
                            Ok(c) => c,
                            Err(e) => {
                                report.failed += 1;
                                report.error.get_or_insert_with(|| format!("probe connection: {e}"));
                                pause(interval.max(RECONNECT_PAUSE), stop);
                                continue;
                            }
                        },
                    };
                    let mut query = QueryRecord { kind: QUERY_KIND_BALANCE, ..QueryRecord::default() };
                    query.key.set(key());
                    let start = Instant::now();
                    match c.queries(vec![query]).await {
                        Ok(_) => {
                            let ns = start.elapsed().as_nanos() as u64;
                            report.latency_ns.saturating_record(ns.max(1));
                        }
                        Err(e) => {
                            report.failed += 1;
                            report.error.get_or_insert_with(|| format!("probe read: {e}"));
                        }
                    }
                    client = Some(c);
                    pause(interval, stop);
                }
            });
        }
    }
    report
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stop cuts a long pause short (the storm's end does not wait for it).
    #[test]
    fn a_stop_ends_the_pause() {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let start = Instant::now();
        let sleeper = std::thread::spawn(move || pause(Duration::from_secs(60), &flag));
        std::thread::sleep(Duration::from_millis(20));
        stop.store(true, Ordering::Relaxed);
        sleeper.thread().unpark();
        sleeper.join().unwrap();
        assert!(start.elapsed() < Duration::from_secs(30), "{:?}", start.elapsed());
    }

    /// Without a stop, a pause lasts its interval.
    #[test]
    fn a_pause_lasts_its_interval() {
        let start = Instant::now();
        pause(Duration::from_millis(30), &AtomicBool::new(false));
        assert!(start.elapsed() >= Duration::from_millis(30));
    }
}
