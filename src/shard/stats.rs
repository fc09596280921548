//! Engine metrics: lock-free counters shared (via `Arc`) by the engine and every shard worker,
//! rendered in Prometheus text format by the `--metrics` endpoint (`cli::metrics`).
//!
//! Hot-path cost is kept tiny:
//! - a worker tallies command outcomes in a private array (`ShardMetrics`, no atomics) and
//!   flushes it once per batch, together with the batch-size and journal-latency observations;
//! - ingest refusals (busy, maintenance, invalid) cost one relaxed `fetch_add` each;
//! - balance reads are timed 1 in `BALANCE_SAMPLE_EVERY` per thread (a thread-local counter, no
//!   shared atomic on the read path).
//!
//! Everything is `Relaxed`: counters are independent and monotonic, and a scrape wants recent
//! values, not a consistent cut across counters. Nothing here allocates after construction.

use std::cell::Cell;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_utils::CachePadded;

use crate::layout::ReplyRecord;
use crate::ledger::command::kind;
use crate::ledger::Status;

/// Command kinds with their own row in the kind x status table, in slot order. Any other code
/// lands in the last slot, rendered `kind="unknown"`.
const KINDS: [u8; 19] = [
    kind::CREATE_ACCOUNT,
    kind::BIND_METHOD,
    kind::TOPUP_BEGIN,
    kind::TOPUP_CONFIRM,
    kind::TOPUP_FAIL,
    kind::TIP,
    kind::GIFT,
    kind::PAY_EVENT,
    kind::SETTLE,
    kind::SET_DAILY_CAP,
    kind::TICK,
    kind::REPLICA_CREATE,
    kind::REPLICA_FREEZE,
    kind::REPLICA_SETTLE,
    kind::SETTLE_TOTAL,
    kind::FREEZE,
    kind::UNFREEZE,
    kind::MAINTENANCE,
    kind::SNAPSHOT,
];

/// Rows of the kind x status table (the known kinds, then "unknown").
pub const KIND_SLOTS: usize = KINDS.len() + 1;

/// Columns of the kind x status table: one per status code (codes are contiguous from 0, checked
/// below), then "unknown" for a code this version does not know.
pub const STATUS_SLOTS: usize = Status::ALL.len() + 1;

const _: () = {
    let mut i = 0;
    while i < Status::ALL.len() {
        assert!(Status::ALL[i].code() as usize == i, "status codes must be contiguous from 0");
        i += 1;
    }
};

/// Kind code -> row, built at compile time.
const KIND_SLOT: [u8; 256] = {
    let mut table = [(KIND_SLOTS - 1) as u8; 256];
    let mut i = 0;
    while i < KINDS.len() {
        table[KINDS[i] as usize] = i as u8;
        i += 1;
    }
    table
};

#[inline]
fn kind_slot(kind: u8) -> usize {
    KIND_SLOT[kind as usize] as usize
}

#[inline]
fn status_slot(code: u16) -> usize {
    (code as usize).min(STATUS_SLOTS - 1)
}

fn kind_label(slot: usize) -> &'static str {
    KINDS.get(slot).map_or("unknown", |&k| kind::name(k))
}

fn status_label(slot: usize) -> &'static str {
    Status::ALL.get(slot).map_or("unknown", |s| s.name())
}

/// Buckets of `stormledger_engine_batch_size`: 1, 2, 4, ..., 65536 (the largest batch), +Inf.
pub const BATCH_BUCKETS: usize = 18;
/// Buckets of `stormledger_engine_journal_append_microseconds`: 1 us .. 2^24 us (~16.8 s), +Inf.
pub const JOURNAL_BUCKETS: usize = 26;
/// Buckets of `stormledger_engine_balance_read_nanoseconds`: 1 ns .. 2^20 ns (~1 ms), +Inf.
pub const BALANCE_BUCKETS: usize = 22;

/// One `Engine::balance` call in this many (per thread) is timed.
pub const BALANCE_SAMPLE_EVERY: u32 = 64;

/// A histogram with fixed power-of-two buckets: bucket `i < N - 1` counts observations in
/// `(2^(i-1), 2^i]` (bucket 0: `[0, 1]`), the last one everything larger (`+Inf`). Buckets are
/// stored non-cumulative; rendering accumulates them.
pub struct Histogram<const N: usize> {
    buckets: [AtomicU64; N],
    sum: AtomicU64,
}

impl<const N: usize> Default for Histogram<N> {
    fn default() -> Self {
        Self::new()
    }
}

impl<const N: usize> Histogram<N> {
    pub const fn new() -> Self {
        Histogram { buckets: [const { AtomicU64::new(0) }; N], sum: AtomicU64::new(0) }
    }

    /// The bucket `value` falls into: the smallest `i` with `value <= 2^i`, or the last one.
    #[inline]
    pub fn bucket_index(value: u64) -> usize {
        let i = if value <= 1 { 0 } else { (64 - (value - 1).leading_zeros()) as usize };
        i.min(N - 1)
    }

    /// The upper bound of bucket `i` (`None` for the last one, `+Inf`).
    pub fn bound(i: usize) -> Option<u64> {
        (i < N - 1).then(|| 1u64 << i)
    }

    /// Two relaxed `fetch_add`s.
    #[inline]
    pub fn record(&self, value: u64) {
        self.buckets[Self::bucket_index(value)].fetch_add(1, Ordering::Relaxed);
        self.sum.fetch_add(value, Ordering::Relaxed);
    }

    /// Observations so far (the sum of the buckets).
    pub fn count(&self) -> u64 {
        self.buckets.iter().map(|b| b.load(Ordering::Relaxed)).sum()
    }

    pub fn sum(&self) -> u64 {
        self.sum.load(Ordering::Relaxed)
    }

    /// Observations in bucket `i` alone (not cumulative).
    pub fn bucket(&self, i: usize) -> u64 {
        self.buckets[i].load(Ordering::Relaxed)
    }

    /// `_bucket{le=...}` (cumulative), `_sum` and `_count`, with HELP and TYPE. `_count` is the
    /// `+Inf` bucket of the same read, so the two always agree within one scrape.
    pub fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = write!(out, "# HELP {name} {help}\n# TYPE {name} histogram\n");
        let mut cumulative = 0u64;
        for i in 0..N {
            cumulative += self.bucket(i);
            match Self::bound(i) {
                Some(le) => {
                    let _ = writeln!(out, "{name}_bucket{{le=\"{le}\"}} {cumulative}");
                }
                None => {
                    let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {cumulative}");
                }
            }
        }
        let _ = write!(out, "{name}_sum {}\n{name}_count {cumulative}\n", self.sum());
    }
}

/// One shard's counters (each shard's block sits on its own cache line).
#[derive(Default)]
struct ShardCounters {
    replies: AtomicU64,
    busy: AtomicU64,
    /// Batches appended on the shard's log thread (`shard::log_stage`), not inline.
    pipelined: AtomicU64,
    poisoned: AtomicBool,
    /// The lsn the shard's log gives its next record (set at start and after every batch).
    log_next_lsn: AtomicU64,
    /// Log bytes (records and frames) since the last snapshot started.
    log_since_snapshot: AtomicU64,
    /// Snapshots written durably since the start.
    snapshots: AtomicU64,
}

/// The engine's metrics. See the module docs and docs/operations.md.
pub struct EngineStats {
    /// Commands answered, by kind slot and status slot.
    commands: [[AtomicU64; STATUS_SLOTS]; KIND_SLOTS],
    shards: Box<[CachePadded<ShardCounters>]>,
    batch_size: Histogram<BATCH_BUCKETS>,
    journal_us: Histogram<JOURNAL_BUCKETS>,
    balance_ns: Histogram<BALANCE_BUCKETS>,
}

thread_local! {
    static BALANCE_READS: Cell<u32> = const { Cell::new(0) };
}

impl EngineStats {
    pub fn new(shards: usize) -> EngineStats {
        EngineStats {
            commands: [const { [const { AtomicU64::new(0) }; STATUS_SLOTS] }; KIND_SLOTS],
            shards: (0..shards).map(|_| CachePadded::new(ShardCounters::default())).collect(),
            batch_size: Histogram::new(),
            journal_us: Histogram::new(),
            balance_ns: Histogram::new(),
        }
    }

    /// Counts replies the engine gives without reaching a worker (refusals at ingest, operator
    /// actions): one relaxed `fetch_add` each.
    pub fn count_immediate(&self, replies: &[(u32, ReplyRecord)]) {
        for (_, reply) in replies {
            self.commands[kind_slot(reply.kind)][status_slot(reply.status.get())].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// `n` commands for `shard` refused `busy` at ingest (queue full or no replication permit).
    pub fn busy(&self, shard: usize, n: usize) {
        self.shards[shard].busy.fetch_add(n as u64, Ordering::Relaxed);
    }

    /// Starts timing a balance read if this one is sampled; the guard records it when dropped.
    #[inline]
    pub fn time_balance_read(&self) -> BalanceTimer<'_> {
        let n = BALANCE_READS.with(|c| {
            let n = c.get().wrapping_add(1);
            c.set(n);
            n
        });
        BalanceTimer { stats: self, started: n.is_multiple_of(BALANCE_SAMPLE_EVERY).then(Instant::now) }
    }

    /// Commands of `kind` answered with `status` so far.
    pub fn commands(&self, kind: u8, status: Status) -> u64 {
        self.commands[kind_slot(kind)][status_slot(status.code())].load(Ordering::Relaxed)
    }

    /// Replies the worker of `shard` produced for client commands.
    pub fn replies(&self, shard: usize) -> u64 {
        self.shards[shard].replies.load(Ordering::Relaxed)
    }

    /// Commands for `shard` refused `busy` at ingest.
    pub fn busy_refusals(&self, shard: usize) -> u64 {
        self.shards[shard].busy.load(Ordering::Relaxed)
    }

    /// Batches of `shard` appended on its log thread while it applied the batch before.
    pub fn pipelined_batches(&self, shard: usize) -> u64 {
        self.shards[shard].pipelined.load(Ordering::Relaxed)
    }

    /// A shard's log end: at its start and after every batch logged (`node::CleanStop`).
    pub fn set_log_next_lsn(&self, shard: u16, next_lsn: u64) {
        self.shards[shard as usize].log_next_lsn.store(next_lsn, Ordering::Relaxed);
    }

    /// A shard's log bytes since its last snapshot started.
    pub fn set_log_since_snapshot(&self, shard: u16, bytes: u64) {
        self.shards[shard as usize].log_since_snapshot.store(bytes, Ordering::Relaxed);
    }

    /// A snapshot of `shard` became durable.
    pub fn snapshot_written(&self, shard: u16) {
        self.shards[shard as usize].snapshots.fetch_add(1, Ordering::Relaxed);
    }

    /// Snapshots `shard` wrote durably since the start.
    pub fn snapshots(&self, shard: u16) -> u64 {
        self.shards[shard as usize].snapshots.load(Ordering::Relaxed)
    }

    /// Every shard's log end (final once its worker stopped: `node::CleanStop`).
    pub fn log_next_lsns(&self) -> Vec<u64> {
        self.shards.iter().map(|s| s.log_next_lsn.load(Ordering::Relaxed)).collect()
    }

    /// Shards whose journal failed (they refuse all writes until restart).
    pub fn poisoned_shards(&self) -> usize {
        self.shards.iter().filter(|s| s.poisoned.load(Ordering::Relaxed)).count()
    }

    pub fn batch_size(&self) -> &Histogram<BATCH_BUCKETS> {
        &self.batch_size
    }

    pub fn journal_latency(&self) -> &Histogram<JOURNAL_BUCKETS> {
        &self.journal_us
    }

    pub fn balance_latency(&self) -> &Histogram<BALANCE_BUCKETS> {
        &self.balance_ns
    }

    /// Appends the Prometheus text of every engine metric. `queue_depths` are the shards' write
    /// queue lengths, sampled by the caller (`Engine::queue_depths`).
    pub fn render(&self, out: &mut String, queue_depths: &[usize]) {
        header(
            out,
            "stormledger_engine_commands_total",
            "counter",
            "Commands answered by the engine, by kind and status (zero combinations omitted).",
        );
        for (k, row) in self.commands.iter().enumerate() {
            for (s, counter) in row.iter().enumerate() {
                let value = counter.load(Ordering::Relaxed);
                if value > 0 {
                    let _ = writeln!(
                        out,
                        "stormledger_engine_commands_total{{kind=\"{}\",status=\"{}\"}} {value}",
                        kind_label(k),
                        status_label(s)
                    );
                }
            }
        }
        let per_shard: [(&str, &str, &str, ShardGetter); 6] = [
            (
                "stormledger_engine_replies_total",
                "counter",
                "Replies a shard worker produced for client commands (every status).",
                |c| c.replies.load(Ordering::Relaxed),
            ),
            (
                "stormledger_engine_busy_refusals_total",
                "counter",
                "Commands refused busy at ingest (write queue full or no replication permit), by target shard.",
                |c| c.busy.load(Ordering::Relaxed),
            ),
            (
                "stormledger_engine_pipelined_batches_total",
                "counter",
                "Journal batches appended on the shard's log thread while it applied the batch before (--pipeline-min-batch); the rest of stormledger_engine_batch_size's count were appended inline.",
                |c| c.pipelined.load(Ordering::Relaxed),
            ),
            (
                "stormledger_engine_log_next_lsn",
                "gauge",
                "The lsn the shard's log gives its next batch (its log end), after the last batch applied.",
                |c| c.log_next_lsn.load(Ordering::Relaxed),
            ),
            (
                "stormledger_engine_log_bytes_since_snapshot",
                "gauge",
                "Log bytes (records with their frames) since the shard's last snapshot started, counted across restarts; a snapshot starts at --snapshot-every-mib.",
                |c| c.log_since_snapshot.load(Ordering::Relaxed),
            ),
            (
                "stormledger_engine_snapshots_total",
                "counter",
                "Snapshots the shard wrote durably since the server started.",
                |c| c.snapshots.load(Ordering::Relaxed),
            ),
        ];
        for (name, kind, help, get) in per_shard {
            header(out, name, kind, help);
            for (shard, counters) in self.shards.iter().enumerate() {
                let _ = writeln!(out, "{name}{{shard=\"{shard}\"}} {}", get(counters));
            }
        }
        header(
            out,
            "stormledger_engine_queue_depth",
            "gauge",
            "Parts (per-shard slices of submitted batches) waiting in a shard's write queue, sampled at scrape time.",
        );
        for (shard, depth) in queue_depths.iter().enumerate() {
            let _ = writeln!(out, "stormledger_engine_queue_depth{{shard=\"{shard}\"}} {depth}");
        }
        header(
            out,
            "stormledger_engine_poisoned_shards",
            "gauge",
            "Shards whose journal failed; they refuse every write (unavailable) until restart.",
        );
        let _ = writeln!(out, "stormledger_engine_poisoned_shards {}", self.poisoned_shards());
        self.batch_size.render(
            out,
            "stormledger_engine_batch_size",
            "Commands per journal batch (client writes, replica messages, ticks), one observation per append.",
        );
        self.journal_us.render(
            out,
            "stormledger_engine_journal_append_microseconds",
            "Journal append+sync latency per batch, in microseconds.",
        );
        self.balance_ns.render(
            out,
            "stormledger_engine_balance_read_nanoseconds",
            "Balance read latency in nanoseconds, sampled: 1 in 64 reads per thread is timed, so _count is about 1/64 of the reads.",
        );
    }
}

type ShardGetter = fn(&ShardCounters) -> u64;

fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = write!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n");
}

/// Times a sampled balance read; records it when dropped.
pub struct BalanceTimer<'a> {
    stats: &'a EngineStats,
    started: Option<Instant>,
}

impl Drop for BalanceTimer<'_> {
    #[inline]
    fn drop(&mut self) {
        if let Some(started) = self.started {
            self.stats.balance_ns.record(started.elapsed().as_nanos() as u64);
        }
    }
}

/// A worker's private tally, flushed into `EngineStats` once per batch. Owned by the shard thread:
/// counting a command is a plain increment.
pub struct ShardMetrics {
    stats: Arc<EngineStats>,
    shard: usize,
    counts: Box<[u32; KIND_SLOTS * STATUS_SLOTS]>,
    /// Indexes into `counts` that are non-zero (capacity for all of them: never reallocates).
    touched: Vec<u16>,
    replies: u64,
}

impl ShardMetrics {
    pub fn new(stats: Arc<EngineStats>, shard: u16) -> ShardMetrics {
        ShardMetrics {
            stats,
            shard: shard as usize,
            counts: Box::new([0; KIND_SLOTS * STATUS_SLOTS]),
            touched: Vec::with_capacity(KIND_SLOTS * STATUS_SLOTS),
            replies: 0,
        }
    }

    /// One client command of `kind` answered with `status` in this batch.
    #[inline]
    pub fn command(&mut self, kind: u8, status: Status) {
        let i = kind_slot(kind) * STATUS_SLOTS + status_slot(status.code());
        if self.counts[i] == 0 {
            self.touched.push(i as u16);
        }
        self.counts[i] += 1;
        self.replies += 1;
    }

    /// One journal append of `commands` records that took `elapsed`, on the shard's log thread
    /// if `pipelined`.
    pub fn batch(&mut self, commands: usize, elapsed: Duration, pipelined: bool) {
        self.stats.batch_size.record(commands as u64);
        self.stats.journal_us.record(elapsed.as_micros() as u64);
        if pipelined {
            self.stats.shards[self.shard].pipelined.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Publishes the batch's tally (call before its replies are delivered, so a client that got
    /// its reply sees it counted).
    pub fn flush(&mut self, poisoned: bool) {
        let stats = &*self.stats;
        for &i in &self.touched {
            let i = i as usize;
            let (k, s) = (i / STATUS_SLOTS, i % STATUS_SLOTS);
            stats.commands[k][s].fetch_add(self.counts[i] as u64, Ordering::Relaxed);
            self.counts[i] = 0;
        }
        self.touched.clear();
        let counters = &stats.shards[self.shard];
        if self.replies > 0 {
            counters.replies.fetch_add(self.replies, Ordering::Relaxed);
            self.replies = 0;
        }
        if poisoned {
            counters.poisoned.store(true, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_powers_of_two() {
        type H = Histogram<5>; // le 1, 2, 4, 8, +Inf
        let cases = [(0, 0), (1, 0), (2, 1), (3, 2), (4, 2), (5, 3), (8, 3), (9, 4), (1 << 40, 4), (u64::MAX, 4)];
        for (value, bucket) in cases {
            assert_eq!(H::bucket_index(value), bucket, "value {value}");
        }
        assert_eq!((0..5).map(H::bound).collect::<Vec<_>>(), [Some(1), Some(2), Some(4), Some(8), None]);
        // Every bound lands in its own bucket, bound + 1 in the next.
        type B = Histogram<BATCH_BUCKETS>;
        for i in 0..BATCH_BUCKETS - 1 {
            let le = B::bound(i).unwrap();
            assert_eq!(B::bucket_index(le), i);
            assert_eq!(B::bucket_index(le + 1), i + 1);
        }
        assert_eq!(B::bound(BATCH_BUCKETS - 2), Some(65_536), "the largest batch has its own bucket");
    }

    #[test]
    fn histogram_renders_cumulative_buckets() {
        let h = Histogram::<4>::new();
        for v in [1, 2, 3, 3, 100] {
            h.record(v);
        }
        assert_eq!((h.count(), h.sum()), (5, 109));
        let mut out = String::new();
        h.render(&mut out, "x", "Help text.");
        assert_eq!(
            out,
            "# HELP x Help text.\n# TYPE x histogram\nx_bucket{le=\"1\"} 1\nx_bucket{le=\"2\"} 2\n\
             x_bucket{le=\"4\"} 4\nx_bucket{le=\"+Inf\"} 5\nx_sum 109\nx_count 5\n"
        );
    }

    #[test]
    fn kind_and_status_slots_round_trip() {
        for (slot, &k) in KINDS.iter().enumerate() {
            assert_eq!(kind_slot(k), slot);
            assert_ne!(kind_label(slot), "unknown");
        }
        assert_eq!(kind_label(kind_slot(77)), "unknown");
        for s in Status::ALL {
            assert_eq!(status_label(status_slot(s.code())), s.name());
        }
        assert_eq!(status_label(status_slot(999)), "unknown");
    }

    #[test]
    fn worker_tally_flushes_once_per_batch() {
        let stats = Arc::new(EngineStats::new(2));
        let mut m = ShardMetrics::new(stats.clone(), 1);
        for _ in 0..3 {
            m.command(kind::TIP, Status::Ok);
        }
        m.command(kind::TIP, Status::InsufficientFunds);
        m.batch(4, Duration::from_micros(30), false);
        m.batch(2, Duration::from_micros(100), true);
        assert_eq!(stats.commands(kind::TIP, Status::Ok), 0, "nothing is published before the flush");
        m.flush(false);
        m.command(kind::GIFT, Status::Ok);
        m.flush(true);
        assert_eq!(stats.commands(kind::TIP, Status::Ok), 3);
        assert_eq!(stats.commands(kind::TIP, Status::InsufficientFunds), 1);
        assert_eq!(stats.commands(kind::GIFT, Status::Ok), 1);
        assert_eq!((stats.replies(0), stats.replies(1)), (0, 5));
        assert_eq!(stats.poisoned_shards(), 1);
        assert_eq!((stats.batch_size().count(), stats.batch_size().sum()), (2, 6));
        assert_eq!((stats.pipelined_batches(0), stats.pipelined_batches(1)), (0, 1));
        assert_eq!(stats.journal_latency().bucket(Histogram::<JOURNAL_BUCKETS>::bucket_index(30)), 1);
    }

    #[test]
    fn render_labels_and_skips_zero_combinations() {
        let stats = EngineStats::new(2);
        let mut tip = ReplyRecord { kind: kind::TIP, ..ReplyRecord::default() };
        tip.status.set(Status::Busy.code());
        stats.count_immediate(&[(0, tip), (1, tip)]);
        stats.busy(1, 2);
        let mut out = String::new();
        stats.render(&mut out, &[3, 0]);
        for line in [
            "# TYPE stormledger_engine_commands_total counter\n",
            "stormledger_engine_commands_total{kind=\"tip\",status=\"busy\"} 2\n",
            "stormledger_engine_busy_refusals_total{shard=\"0\"} 0\n",
            "stormledger_engine_busy_refusals_total{shard=\"1\"} 2\n",
            "stormledger_engine_replies_total{shard=\"1\"} 0\n",
            "stormledger_engine_pipelined_batches_total{shard=\"0\"} 0\n",
            "stormledger_engine_log_next_lsn{shard=\"1\"} 0\n",
            "stormledger_engine_log_bytes_since_snapshot{shard=\"0\"} 0\n",
            "stormledger_engine_snapshots_total{shard=\"1\"} 0\n",
            "stormledger_engine_queue_depth{shard=\"0\"} 3\n",
            "stormledger_engine_poisoned_shards 0\n",
            "# TYPE stormledger_engine_batch_size histogram\n",
            "stormledger_engine_batch_size_bucket{le=\"65536\"} 0\n",
            "stormledger_engine_journal_append_microseconds_count 0\n",
            "stormledger_engine_balance_read_nanoseconds_bucket{le=\"+Inf\"} 0\n",
        ] {
            assert!(out.contains(line), "missing {line:?} in\n{out}");
        }
        assert_eq!(out.matches("stormledger_engine_commands_total{").count(), 1, "zero combinations are skipped");
        // Every sample line belongs to a metric announced by HELP and TYPE.
        for line in out.lines().filter(|l| !l.starts_with('#')) {
            let name = line.split(['{', ' ']).next().unwrap();
            let base = ["_bucket", "_sum", "_count"].iter().fold(name, |n, s| n.strip_suffix(s).unwrap_or(n));
            assert!(out.contains(&format!("# TYPE {base} ")) || out.contains(&format!("# TYPE {name} ")), "{line}");
        }
    }

    #[test]
    fn balance_reads_are_sampled_per_thread() {
        let stats = Arc::new(EngineStats::new(1));
        let s = stats.clone();
        std::thread::spawn(move || {
            for _ in 0..BALANCE_SAMPLE_EVERY * 3 - 1 {
                drop(s.time_balance_read());
            }
        })
        .join()
        .unwrap();
        assert_eq!(stats.balance_latency().count(), 2);
    }
}
