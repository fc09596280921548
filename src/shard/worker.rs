//! The single-writer loop of one shard: drain a batch -> assign timestamps -> one journal
//! append (durable per the configured mode) -> apply -> reply.
//!
//! A shard's `ShardState` is owned by exactly one thread, this one; other threads reach it only
//! through its queues (writes: bounded; replica messages: an unbounded channel whose client
//! work is admitted by the engine's replication permits, and whose re-sends at start and
//! settlement totals are bounded by the outbox; queries: bounded) and read published balances
//! through the lock-free index.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crossbeam_channel::{Receiver, Select, Sender};
use parking_lot::Mutex;

use crate::layout::{CommandRecord, ReplyRecord};
use crate::ledger::account::HistoryEntry;
use crate::ledger::state_machine::{Fanout, IdRecord, Reply, ShardState, TopUp};
use crate::ledger::{Command, Status};
use crate::shard::directory::{Claim, IdDirectory};
use crate::shard::log_stage::{Appended, LogStage};
use crate::shard::stats::{EngineStats, ShardMetrics};
use crate::snapshot::state::Progress;

/// Makes a batch durable. Implemented by the write-ahead log; `NullJournal` keeps nothing
/// (in-memory engine for tests and the apply-only benchmark).
pub trait Journal: Send + 'static {
    /// Appends one batch (timestamps already set) and returns its log position once it is
    /// durable under the configured mode. An error poisons the shard: it accepts no more writes.
    fn append_batch(&mut self, timestamp: u64, records: &[CommandRecord]) -> Result<u64, JournalError>;

    /// Makes everything appended durable regardless of mode (clean shutdown, before a snapshot).
    fn sync_all(&mut self) -> Result<(), JournalError> {
        Ok(())
    }

    /// Drops log segments whose records all have positions below `lsn` (covered by snapshots).
    fn retire_before(&mut self, _lsn: u64) -> Result<(), JournalError> {
        Ok(())
    }

    /// Whether appends should run on a log thread of their own, so that one batch's write and
    /// sync overlap applying the batch before it (`log_stage`). Worth it when an append waits
    /// for the disk; an inline append costs no thread hand-off.
    fn pipelined(&self) -> bool {
        false
    }

    /// The position of the last record the log held when it was opened (0: none): the shard's
    /// state starts there, recovered, so a snapshot taken before its first new batch covers it.
    fn recovered_lsn(&self) -> u64 {
        0
    }
}

/// A journal failure, as text for the operator (the WAL's typed error is logged where it happens).
pub type JournalError = Box<dyn std::error::Error + Send + Sync>;

/// Keeps nothing: for the in-memory engine.
pub struct NullJournal;

impl Journal for NullJournal {
    fn append_batch(&mut self, _: u64, _: &[CommandRecord]) -> Result<u64, JournalError> {
        Ok(0)
    }
}

/// The source of ingest timestamps (nanoseconds since the Unix epoch).
pub trait Clock: Send + Sync + 'static {
    fn now_ns(&self) -> u64;
}

/// The system's wall clock.
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ns(&self) -> u64 {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(1)
    }
}

/// How far the wall clock may fall behind a shard's newest timestamp: 60 s. Timestamps only
/// grow (a batch is stamped `max(now, last + 1)`), so with the clock further behind, commands
/// are stamped just after that timestamp, not at the clock's time, until it catches up: for
/// that long top-ups do not expire, the business day does not turn, and a client's `timestamp`
/// or `paid_by` from a correct clock looks out of date (`id_expired`, `invalid_paid_by`). A
/// start that finds its clock this far behind the log refuses (`node::NodeError::ClockBehind`);
/// a running shard says so on stderr, once a minute while it lasts.
pub const CLOCK_BEHIND_MAX_NS: u64 = 60_000_000_000;

/// A clock for tests and simulations: starts at a fixed instant and moves forward by `step`
/// nanoseconds on every reading, so runs are reproducible.
pub struct ManualClock {
    now: std::sync::atomic::AtomicU64,
    step: u64,
}

impl ManualClock {
    pub fn new(start_ns: u64, step_ns: u64) -> ManualClock {
        ManualClock { now: std::sync::atomic::AtomicU64::new(start_ns), step: step_ns }
    }

    /// Moves the clock forward (e.g. past a top-up deadline).
    pub fn advance(&self, ns: u64) {
        self.now.fetch_add(ns, Ordering::AcqRel);
    }
}

impl Clock for ManualClock {
    fn now_ns(&self) -> u64 {
        self.now.fetch_add(self.step, Ordering::AcqRel)
    }
}

/// Where the replies of one submitted batch go.
pub type ReplyCallback = Box<dyn FnOnce(Vec<ReplyRecord>) + Send>;

/// Gathers the replies of one submitted batch (possibly spread over several shards) and calls
/// `done` once, when the last one arrives.
pub struct Collector {
    remaining: AtomicUsize,
    replies: Mutex<Vec<ReplyRecord>>,
    done: Mutex<Option<ReplyCallback>>,
}

impl Collector {
    pub fn new(n: usize, done: Box<dyn FnOnce(Vec<ReplyRecord>) + Send>) -> Arc<Collector> {
        Arc::new(Collector {
            remaining: AtomicUsize::new(n),
            replies: Mutex::new(vec![ReplyRecord::default(); n]),
            done: Mutex::new(Some(done)),
        })
    }

    /// Fills replies by tag; the last fill calls `done`.
    pub fn fill(&self, replies: &[(u32, ReplyRecord)]) {
        if replies.is_empty() {
            return;
        }
        {
            let mut slots = self.replies.lock();
            for &(tag, reply) in replies {
                slots[tag as usize] = reply;
            }
        }
        if self.remaining.fetch_sub(replies.len(), Ordering::AcqRel) == replies.len() {
            let replies = std::mem::take(&mut *self.replies.lock());
            if let Some(done) = self.done.lock().take() {
                done(replies);
            }
        }
    }
}

/// One submitted command on its way to a shard.
pub struct WriteItem {
    pub tag: u32,
    pub command: Command,
    /// Holds one of the engine's replication permits (returned when the reply is delivered).
    pub permit: bool,
    /// The engine claimed the id for this shard (released if the command never runs).
    pub claimed: bool,
    /// When the client says it first sent this command (ns since the epoch; 0 = not said).
    pub sent_at: u64,
}

/// The commands of one submitted batch that belong to one shard.
pub struct Part {
    pub items: Vec<WriteItem>,
    pub collector: Arc<Collector>,
}

/// Waits for the other shards' parts of a replicated command, then replies to the client.
pub struct Join {
    remaining: AtomicUsize,
    total: AtomicI64,
    /// Settlements: the shards whose sweep `total` counts.
    counted: AtomicI64,
    failed: AtomicBool,
    reply: Reply,
    command: Command,
    tag: u32,
    collector: Arc<Collector>,
    permits: Arc<AtomicUsize>,
    /// Settlements: the home shard, which logs the total once every part is counted, and the
    /// settlement's ingest time (which names it there).
    home: Option<Sender<Internal>>,
    settled_at: u64,
    shards: u16,
}

impl Join {
    /// Waits for every shard's part of `item`: its home part answered `reply`, and is done
    /// (counting nothing more) once the home shard's batch released its evicted ids, as the
    /// others' parts are; then replies. `at`: a settlement's ingest time (its record's).
    fn new(
        item: &WriteItem,
        reply: Reply,
        collector: &Arc<Collector>,
        peers: &Peers,
        shard: u16,
        at: u64,
    ) -> Arc<Join> {
        let settle = matches!(item.command, Command::Settle { .. });
        Arc::new(Join {
            remaining: AtomicUsize::new(peers.internal.len()),
            total: AtomicI64::new(reply.value),
            // The home part (a record from before `value2` counted shards says 0).
            counted: AtomicI64::new(reply.value2.max(1)),
            failed: AtomicBool::new(false),
            reply,
            command: item.command,
            tag: item.tag,
            collector: collector.clone(),
            permits: peers.permits.clone(),
            home: settle.then(|| peers.internal[shard as usize].clone()),
            settled_at: at,
            shards: peers.internal.len() as u16,
        })
    }

    /// One part done: `value` is what it counts (`None`: nothing, as the home part, or a shard
    /// that no longer remembers its part of a settlement), `ok` false if it failed.
    fn part_done(&self, value: Option<i64>, ok: bool) {
        if let Some(value) = value {
            self.total.fetch_add(value, Ordering::AcqRel);
            self.counted.fetch_add(1, Ordering::AcqRel);
        }
        if !ok {
            self.failed.store(true, Ordering::Release);
        }
        if self.remaining.fetch_sub(1, Ordering::AcqRel) == 1 {
            let mut reply = self.reply;
            if let Command::Settle { id, .. } = self.command {
                reply.value = self.total.load(Ordering::Acquire);
                reply.value2 = self.counted.load(Ordering::Acquire);
                // Every part counted: the home shard logs the total in the settlement's record,
                // so a retry is answered from it even once the other shards forgot their parts
                // (sent before the permit is returned: a shutdown waits for the permits, and
                // the home shard then takes this before it stops).
                let shards = self.shards;
                if !self.failed.load(Ordering::Acquire) && reply.value2 == shards as i64 && reply.status == Status::Ok {
                    if let Some(home) = &self.home {
                        let total = Command::SettleTotal { id, total: reply.value, shards, at: self.settled_at };
                        let _ = home.send(Internal::Replica { command: total, join: None });
                    }
                }
            }
            if self.failed.load(Ordering::Acquire) {
                reply = Reply::status(Status::Unavailable);
            }
            self.permits.fetch_add(1, Ordering::AcqRel);
            self.collector.fill(&[(self.tag, reply_record(&self.command, reply))]);
        }
    }
}

/// A read served by the shard thread (reads that need more than a published balance).
pub enum ShardQuery {
    History {
        account: u64,
        limit: usize,
        before: Option<(u64, u16)>,
    },
    Lookup {
        id: u64,
    },
    TopUp {
        id: u64,
    },
    /// Invariant check and state summary (tests, `verify`).
    Audit,
}

/// The answer to a `ShardQuery`.
pub enum ShardAnswer {
    History(Vec<HistoryEntry>),
    Lookup(Option<IdRecord>),
    TopUp(Option<TopUp>),
    Audit(AuditSummary),
}

/// A shard's state summary.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuditSummary {
    pub shard: u16,
    pub accounts: usize,
    pub unit_sums: [i128; 2],
    pub last_timestamp: u64,
    pub poisoned: bool,
}

/// Messages a worker receives besides writes.
pub enum Internal {
    Replica {
        command: Command,
        join: Option<Arc<Join>>,
    },
    /// Take a snapshot now; `done` gets the log position it covers (or why it failed).
    Snapshot {
        done: Box<dyn FnOnce(Result<u64, String>) + Send>,
    },
    Shutdown,
}

/// When and where a shard writes snapshots.
#[derive(Clone, Debug)]
pub struct SnapshotPolicy {
    pub dir: std::path::PathBuf,
    /// Where the snapshot files live (real files but in simulation tests).
    pub storage: crate::storage::SharedStorage,
    /// Take one after this many bytes of log (0 = only on request).
    pub every_bytes: u64,
    /// Bytes of log records after the newest snapshot when the shard starts (the ones it
    /// replayed): they count toward `every_bytes`, so that restarts more frequent than
    /// `every_bytes` of log do not put the next snapshot off for ever (and the log with it).
    pub logged_since: u64,
    /// Retire log segments covered by the oldest kept snapshot.
    pub retire_log: bool,
    /// Log positions of the snapshots already on disk, oldest first (at most 2).
    pub kept: Vec<u64>,
}

/// A query and where its answer goes.
pub struct QueryMsg {
    pub query: ShardQuery,
    pub done: Box<dyn FnOnce(ShardAnswer) + Send>,
}

/// Everything one worker needs to talk to the other shards.
pub struct Peers {
    pub internal: Vec<Sender<Internal>>,
    pub queries: Vec<Sender<QueryMsg>>,
    pub directory: Arc<IdDirectory>,
    pub permits: Arc<AtomicUsize>,
    pub stats: Arc<EngineStats>,
}

/// Tunables of the loop.
#[derive(Clone, Debug)]
pub struct WorkerConfig {
    pub batch_commands_max: usize,
    pub tick_interval: Duration,
    /// See `EngineConfig::pipeline_min_batch`.
    pub pipeline_min_batch: usize,
    pub snapshot: Option<SnapshotPolicy>,
    /// Where committed events are published (`crate::feed`).
    pub feed: Option<Arc<crate::feed::ShardFeed>>,
}

/// Keeps the directory in step with what a shard remembers, after `item` was applied
/// (`remembered`: `ShardState::remembered` before it). Two cases, both rare:
/// - its id was claimed for it, but the outcome was retryable (`busy`: the pending top-ups are
///   at their bound) and so not remembered: release the claim, or nothing would ever release
///   it (the client may never retry) and the directory would fill with such ids;
/// - it gave its claim to a later copy of the id (`take_claim`) and was remembered: the id is
///   this shard's, and the batch's release of its evicted ids must leave it. Returns true.
///
/// A command routed here by another copy's claim runs only if the shard knows its id or it
/// took that claim (the drain-time check in `run`), so no unclaimed command is remembered
/// under an id another shard may hold meanwhile.
#[inline]
fn keep_directory_true(
    peers: &Peers,
    state: &ShardState,
    item: &WriteItem,
    status: Status,
    remembered: u64,
    shard: u16,
) -> bool {
    if item.claimed {
        if status.is_retryable() {
            give_up_claim(peers, state, item, shard);
        }
    } else if state.remembered() != remembered {
        if let Some(id) = item.command.transfer_id() {
            // The claim this command gave away is still this shard's: only its holder, later
            // on this shard, or an eviction of the id (which is newly remembered) releases it.
            let claim = peers.directory.reclaim(id, shard);
            debug_assert!(matches!(claim, Claim::Existing(s) if s == shard), "id {id}: {claim:?}");
            assert!(claim != Claim::Full, "id directory stripe full past its margin: id {id} left unowned");
            return true;
        }
    }
    false
}

/// Releases the directory claim `item` holds (if it holds one) of a command that will not be
/// remembered: refused before the log, on a failed log, or with a retryable status. Not if the
/// shard knows the id: a copy ahead of this one, which gave it the claim, was applied under it.
fn give_up_claim(peers: &Peers, state: &ShardState, item: &WriteItem, shard: u16) {
    if !item.claimed {
        return;
    }
    let id = item.command.transfer_id().expect("claimed");
    if !state.knows_id(id) {
        peers.directory.release(id, shard);
    }
}

/// Whether applying `entry` may remember an id (and so, with the window full, forget the
/// oldest): a command of the transfer kinds, or a shard's part of a settlement. Counting only
/// these keeps the drain-time checks exact for the rest (a settlement's total, a replicated
/// create or freeze, a tick), which would otherwise refuse a retry of the oldest id.
fn may_remember(parts: &[Part], entry: &Entry) -> bool {
    match entry {
        Entry::Replica(command, _) => matches!(command, Command::ReplicaSettle { .. }),
        Entry::Write(p, i) => parts[*p].items[*i].command.transfer_id().is_some(),
        Entry::Tick => false,
    }
}

/// Passes the directory claim of `id` to a later command: the last command of the pipeline
/// that holds it (this batch's commands drained so far, then the batch in the log) gives it up.
/// False if none holds it. The copies run in order on this shard, so whichever of them is
/// remembered first owns the id, and the claim is released only if the last holder is refused
/// with a retryable status (`keep_directory_true`), not while a copy after it still counts on it.
fn take_claim(ahead: Option<&mut Batch>, batch: &mut Batch, id: u64) -> bool {
    let holder = |b: &mut Batch| {
        let Batch { parts, entries, .. } = b;
        entries.iter().rev().find_map(|e| match *e {
            Entry::Write(p, j) if parts[p].items[j].claimed && parts[p].items[j].command.transfer_id() == Some(id) => {
                Some((p, j))
            }
            _ => None,
        })
    };
    if let Some((p, j)) = holder(batch) {
        batch.parts[p].items[j].claimed = false;
        return true;
    }
    if let Some(ahead) = ahead {
        if let Some((p, j)) = holder(ahead) {
            ahead.parts[p].items[j].claimed = false;
            return true;
        }
    }
    false
}

/// Builds the wire reply of `command`.
pub fn reply_record(command: &Command, reply: Reply) -> ReplyRecord {
    let mut r = ReplyRecord { kind: command.kind(), flags: reply.duplicate as u8, ..ReplyRecord::default() };
    r.status.set(reply.status.code());
    r.id.set(command.reply_id());
    r.value.set(reply.value);
    r.value2.set(reply.value2);
    r
}

/// How far ahead the worker (and replay) prefetches index entries, and accounts.
pub const PREFETCH_FAR: usize = 12;
pub const PREFETCH_NEAR: usize = 6;

/// The default of `EngineConfig::pipeline_min_batch`: batches smaller than this are appended
/// inline even with work queued behind them. Handing a batch to the log thread and back costs
/// two thread wake-ups (tens of microseconds each on this VM) and saves at most the time to
/// apply the batch before it, which for a few hundred commands at 200-300 ns each is about the
/// same (an estimate, not a measured crossover; docs/benchmarks.md, session 8).
pub const PIPELINE_MIN_BATCH: usize = 256;

enum Entry {
    Replica(Command, Option<Arc<Join>>),
    Write(usize, usize),
    Tick,
}

/// One drained batch: its parts, its entries in log order (entry i has timestamp `base + i`),
/// and the commands refused before the log (`id_expired`, `busy`), answered with the batch.
#[derive(Default)]
struct Batch {
    parts: Vec<Part>,
    entries: Vec<Entry>,
    refused: Vec<(usize, u32, ReplyRecord)>,
    /// Entries that may remember an id, and so forget the oldest one (`may_remember`).
    remembering: usize,
    /// A command of this batch took another's claim (`take_claim`): an id evicted earlier in
    /// the batch may be remembered again by it.
    took_claims: bool,
    base: u64,
    /// Handed to the log (false: the shard was poisoned, every command is `unavailable`).
    logged: bool,
}

/// Applying durable batches: the shard's state and everything a batch's effects reach.
struct Applier {
    shard: u16,
    state: ShardState,
    peers: Peers,
    metrics: ShardMetrics,
    events: crate::feed::BatchEvents,
    feed: Option<Arc<crate::feed::ShardFeed>>,
    poisoned: bool,
    /// The log position of the newest applied batch.
    last_lsn: u64,
    /// Log bytes of every applied batch (snapshots are taken by log volume).
    logged_bytes: u64,
    /// Records buffers back from the log, and completed batches, for the next batches.
    spare_records: Vec<Vec<CommandRecord>>,
    spare_batches: Vec<Batch>,
}

impl Applier {
    /// Completes `batch` with the log's result (`None`: it was not logged). Durable: applies
    /// every entry in order, then publishes its feed events, releases evicted ids and replies.
    /// Failed: poisons the shard and answers every command `unavailable`, applying nothing.
    /// The batch's buffers are kept for a later one.
    fn complete(&mut self, mut batch: Batch, appended: Option<Appended>) {
        let shard = self.shard;
        if let Some(appended) = appended {
            match appended.result {
                Ok(lsn) if !self.poisoned => {
                    self.last_lsn = lsn;
                    self.peers.stats.set_log_next_lsn(shard, lsn + 1);
                    // What the log holds of the batch: its records and their frame (header, alignment).
                    let payload = (appended.records.len() * std::mem::size_of::<CommandRecord>()) as u64;
                    self.logged_bytes += crate::wal::record::record_size(payload);
                }
                Ok(_) => {}
                Err(error) => {
                    if !self.poisoned {
                        crate::log_line!("shard {shard}: journal failed, refusing all further writes: {error}");
                    }
                    self.poisoned = true;
                }
            }
            self.metrics.batch(appended.records.len(), appended.elapsed, appended.threaded);
            self.spare_records.push(appended.records);
        }
        let poisoned = self.poisoned;
        let (state, events, peers, metrics) = (&mut self.state, &mut self.events, &self.peers, &mut self.metrics);
        let (parts, entries) = (&batch.parts, &mut batch.entries);

        events.restart(self.last_lsn);
        let mut replies: Vec<Vec<(u32, ReplyRecord)>> =
            parts.iter().map(|p| Vec::with_capacity(p.items.len())).collect();
        for (p, tag, reply) in batch.refused.drain(..) {
            // Counted with the rest: `id_expired` and `busy` before the log are answers too.
            metrics.command(reply.kind, Status::from_code(reply.status.get()).unwrap_or(Status::Busy));
            replies[p].push((tag, reply));
        }
        // Whether a command of this batch claimed its id again (`keep_directory_true`).
        let mut reclaimed = false;
        // The parts of replicated commands this batch completed (other shards' applied here, and
        // the home parts of its own), with their values: done after its evicted ids are released.
        let mut parts_done: Vec<(Arc<Join>, Option<i64>)> = Vec::new();
        // Prefetch in two stages, a few commands ahead, so the cache misses of the next payers
        // overlap with applying this one (hints only: results do not change).
        let command_at = |entries: &[Entry], k: usize| match entries.get(k) {
            Some(Entry::Write(p, j)) => Some(&parts[*p].items[*j].command),
            _ => None,
        };
        for k in 0..PREFETCH_FAR.min(entries.len()) {
            if let Some(c) = command_at(entries, k) {
                state.prefetch_index(c);
            }
        }
        for i in 0..entries.len() {
            if let Some(c) = command_at(entries, i + PREFETCH_FAR) {
                state.prefetch_index(c);
            }
            if let Some(c) = command_at(entries, i + PREFETCH_NEAR) {
                state.prefetch_account(c);
            }
            let entry = std::mem::replace(&mut entries[i], Entry::Tick);
            let ts = batch.base + i as u64;
            match entry {
                Entry::Tick => {
                    if !poisoned {
                        state.apply(ts, &Command::Tick);
                    }
                }
                Entry::Replica(command, join) => {
                    if poisoned {
                        if let Some(join) = join {
                            join.part_done(None, false);
                        }
                        continue;
                    }
                    let (reply, _) = events.apply(state, i, ts, &command);
                    if let Some(join) = join {
                        // Answered after the batch's evicted ids are released (below), as the
                        // shard's own replies are: the part done may be the reply's last.
                        parts_done.push((join, Some(reply.value)));
                    }
                }
                Entry::Write(p, j) => {
                    let item = &parts[p].items[j];
                    if poisoned {
                        metrics.command(item.command.kind(), Status::Unavailable);
                        replies[p].push((item.tag, reply_record(&item.command, Reply::status(Status::Unavailable))));
                        if item.permit {
                            peers.permits.fetch_add(1, Ordering::AcqRel);
                        }
                        give_up_claim(peers, state, item, shard);
                        continue;
                    }
                    let remembered = state.remembered();
                    let (reply, fanout) = events.apply(state, i, ts, &item.command);
                    metrics.command(item.command.kind(), reply.status);
                    reclaimed |= keep_directory_true(peers, state, item, reply.status, remembered, shard);
                    match fanout {
                        Fanout::None => {
                            replies[p].push((item.tag, reply_record(&item.command, reply)));
                            if item.permit {
                                peers.permits.fetch_add(1, Ordering::AcqRel);
                            }
                        }
                        Fanout::Replicate(replica) => {
                            assert!(item.permit, "replicated commands hold a permit");
                            let join = Join::new(item, reply, &parts[p].collector, peers, shard, ts);
                            parts_done.push((join.clone(), None));
                            for (s, tx) in peers.internal.iter().enumerate() {
                                if s != shard as usize {
                                    let msg = Internal::Replica { command: replica, join: Some(join.clone()) };
                                    if tx.send(msg).is_err() {
                                        join.part_done(None, false);
                                    }
                                }
                            }
                        }
                        Fanout::GatherSettlement { id, at } => {
                            assert!(item.permit, "settlements hold a permit");
                            let join = Join::new(item, reply, &parts[p].collector, peers, shard, at);
                            parts_done.push((join.clone(), None));
                            for (s, tx) in peers.queries.iter().enumerate() {
                                if s != shard as usize {
                                    let part_join = join.clone();
                                    let done = Box::new(move |answer: ShardAnswer| {
                                        // Not remembered any more: its part is not counted.
                                        let value = match answer {
                                            ShardAnswer::Lookup(Some(r)) => Some(r.reply.value),
                                            _ => None,
                                        };
                                        part_join.part_done(value, true);
                                    });
                                    if tx.try_send(QueryMsg { query: ShardQuery::Lookup { id }, done }).is_err() {
                                        join.part_done(None, false);
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
        entries.clear();
        if let (Some(feed), false) = (&self.feed, poisoned) {
            feed.publish(events);
        }
        // Before the replies: a client that reuses an id this batch evicted, once it has its
        // answer, must find the id free in the directory. Not an id a later command of the
        // batch was applied under again (`reclaimed`): this shard owns it again.
        if reclaimed || batch.took_claims {
            state.unevict_known();
        }
        if !state.evicted().is_empty() {
            peers.directory.release_many(state.evicted(), shard);
            state.clear_evicted();
        }
        for (join, value) in parts_done {
            join.part_done(value, true);
        }
        metrics.flush(poisoned);
        for (part, replies) in batch.parts.drain(..).zip(replies) {
            part.collector.fill(&replies);
        }
        self.spare_batches.push(batch);
    }

    /// Completes the batch in the log, if there is one, once its result is in.
    fn complete_ahead(&mut self, ahead: &mut Option<Batch>, log: &mut LogStage) {
        if let Some(batch) = ahead.take() {
            self.complete(batch, Some(log.finish()));
        }
    }

    /// Answers the reads that need the shard's state (after the batch: a client sees its own
    /// acknowledged writes, and nothing of a batch still in the log), with what each cost, in
    /// records visited (at least 1; see `READ_VISITS_PER_ROUND`).
    fn answer(&self, query: ShardQuery) -> (ShardAnswer, usize) {
        let state = &self.state;
        match query {
            ShardQuery::History { account, limit, before } => {
                let (entries, visited) = state.history_visiting(account, limit, before);
                (ShardAnswer::History(entries), visited.max(1))
            }
            ShardQuery::Lookup { id } => (ShardAnswer::Lookup(state.lookup(id)), 1),
            ShardQuery::TopUp { id } => (ShardAnswer::TopUp(state.topup(id).copied()), 1),
            ShardQuery::Audit => {
                let accounts = state.accounts().len();
                let audit = AuditSummary {
                    shard: self.shard,
                    accounts,
                    unit_sums: state.unit_sums(),
                    last_timestamp: state.last_timestamp(),
                    poisoned: self.poisoned,
                };
                (ShardAnswer::Audit(audit), accounts.max(1))
            }
        }
    }

    /// Answers the oldest of `queries` until `READ_VISITS_PER_ROUND` records were visited (at
    /// least one read); the rest wait for the next round, after the next batch.
    fn answer_some(&self, queries: &mut VecDeque<QueryMsg>) {
        let mut visits = 0;
        while visits < READ_VISITS_PER_ROUND {
            let Some(QueryMsg { query, done }) = queries.pop_front() else { break };
            let (answer, cost) = self.answer(query);
            done(answer);
            visits += cost;
        }
    }
}

/// The worker loop. Returns the state when shut down (tests inspect it).
///
/// Pipelining: with a journal that waits for the disk (`Journal::pipelined`), batch k+1 is
/// drained, checked, timestamped and handed to the log thread before batch k is applied, so
/// k+1's write and sync run while k is applied (a batch with nothing queued behind it, or smaller
/// than `pipeline_min_batch`, is appended inline: there is little or nothing to overlap). Every
/// batch is still applied only after its own log result, in log order, and nothing of it
/// (replies, balances, feed events, replica messages) leaves the shard before. Drain-time decisions that read the state are the only
/// ones taken before the previous batch is applied; each is safe or falls back:
/// - timestamps continue from the last one assigned, not the last one applied;
/// - a `Tick` is only added to an empty batch, and an empty drain completes batch k first;
/// - the `id_expired` check: batch k can only raise the idempotency horizon, and by at most its
///   own length of ids (`ShardState::id_horizon_within`). A command whose first-send time is
///   at or after that bound passes the check before and after k alike; if any command of k+1 is
///   earlier, batch k is applied first and k+1 is checked exactly;
/// - the claim check of a command routed by another copy's claim: an id the state does not
///   know before k is applied is either claimed by a copy in k (found there, `take_claim`) or
///   not remembered by k at all (only claimed commands are remembered under new ids), and one
///   it knows is still known after k if `knows_id_within` says so.
///
/// Reads through the query queue are answered with no batch ahead (so, after every write and
/// replica message drained before them), and after the replica messages queued before them.
#[allow(clippy::too_many_arguments)]
pub fn run(
    state: ShardState,
    journal: Box<dyn Journal>,
    clock: Arc<dyn Clock>,
    writes: Receiver<Part>,
    internal: Receiver<Internal>,
    queries: Receiver<QueryMsg>,
    peers: Peers,
    config: WorkerConfig,
) -> ShardState {
    let shard = state.shard();
    assert!(!state.publish_deferred, "shard {shard} starts with its balances unpublished (a replay did not end)");
    let recovered_lsn = journal.recovered_lsn();
    let mut log = LogStage::new(journal, shard);
    let mut last_assigned = state.last_timestamp();
    // When the next "clock behind" warning may be printed (once a minute of the clock's time).
    let mut clock_warning_after = 0u64;
    let metrics = ShardMetrics::new(peers.stats.clone(), shard);
    let mut w = Applier {
        shard,
        state,
        peers,
        metrics,
        events: crate::feed::BatchEvents::new(0),
        feed: config.feed.clone(),
        poisoned: false,
        last_lsn: recovered_lsn,
        // The log since the newest snapshot counts from before this start (`logged_since`).
        logged_bytes: config.snapshot.as_ref().map_or(0, |p| p.logged_since),
        spare_records: Vec::new(),
        spare_batches: Vec::new(),
    };
    let mut carry: Option<Part> = None;
    let mut shutting_down = false;
    let mut snapshot_requests: Vec<SnapshotDone> = Vec::new();
    let mut snapshots = config.snapshot.clone().map(|policy| Snapshotter::new(policy, w.peers.stats.clone()));
    w.peers.stats.set_log_next_lsn(shard, recovered_lsn + 1);
    // The batch in the log, applied once its result is in (pipelined journals only).
    let mut ahead: Option<Batch> = None;
    let mut pending_queries: VecDeque<QueryMsg> = VecDeque::new();
    // Reads left over from a round (`answer_some`) stay taken from the queue: taking no more
    // than its depth keeps the queue's bound the bound of reads held (a full queue is `busy`).
    let reads_held_max = queries.capacity().unwrap_or(usize::MAX).max(1);

    loop {
        let mut batch = w.spare_batches.pop().unwrap_or_default();
        // Wait for work (or for the next top-up deadline); with a batch in the log, only take
        // what is already queued.
        if carry.is_none() {
            let mut select = Select::new();
            let i_internal = select.recv(&internal);
            let i_writes = select.recv(&writes);
            let i_queries = select.recv(&queries);
            let encoding = snapshots.as_ref().is_some_and(Snapshotter::has_steps);
            let waiting = snapshots.as_ref().is_some_and(Snapshotter::waiting);
            let ready = if shutting_down || ahead.is_some() || encoding || !pending_queries.is_empty() {
                select.try_ready().ok()
            } else if waiting {
                select.ready_timeout(SNAPSHOT_METHODS_POLL.min(config.tick_interval)).ok()
            } else {
                select.ready_timeout(config.tick_interval).ok()
            };
            match ready {
                None if shutting_down && ahead.is_none() => break,
                None => {}
                Some(i) if i == i_internal => match internal.try_recv() {
                    Ok(Internal::Replica { command, join }) => batch.entries.push(Entry::Replica(command, join)),
                    Ok(Internal::Snapshot { done }) => snapshot_requests.push(done),
                    Ok(Internal::Shutdown) => shutting_down = true,
                    Err(_) => {}
                },
                Some(i) if i == i_writes => {
                    if let Ok(part) = writes.try_recv() {
                        carry = Some(part);
                    }
                }
                Some(i) if i == i_queries && pending_queries.len() < reads_held_max => {
                    if let Ok(q) = queries.try_recv() {
                        pending_queries.push_back(q);
                    }
                }
                Some(_) => {}
            }
        }
        // The reads queued now, then the replica messages: every replica message a read's sender
        // sent before the read is then in this round's batch, which the read waits for (a
        // settlement's gather is a lookup that must see the replica its shard sent first).
        while pending_queries.len() < reads_held_max {
            let Ok(q) = queries.try_recv() else { break };
            pending_queries.push_back(q);
        }
        // Drain more without blocking, up to the batch limit (a restart may have re-sent a few
        // thousand replica messages from every other shard). Cut short by the limit, the drain
        // leaves replica messages queued, and the reads taken above wait for a round whose drain
        // is not.
        let mut internal_drained = false;
        while batch.entries.len() < config.batch_commands_max {
            let Ok(msg) = internal.try_recv() else {
                internal_drained = true;
                break;
            };
            match msg {
                Internal::Replica { command, join } => batch.entries.push(Entry::Replica(command, join)),
                Internal::Snapshot { done } => snapshot_requests.push(done),
                Internal::Shutdown => shutting_down = true,
            }
        }
        let mut count = batch.entries.len();
        loop {
            let part = match carry.take() {
                Some(p) => p,
                None => match writes.try_recv() {
                    Ok(p) => p,
                    Err(_) => break,
                },
            };
            if count > 0 && count + part.items.len() > config.batch_commands_max {
                carry = Some(part);
                break;
            }
            count += part.items.len();
            batch.parts.push(part);
        }

        // The batch in the log is applied now if there is nothing to overlap it with, or this
        // batch's checks depend on its outcome (see "Pipelining" above).
        if let Some(prev) = &ahead {
            let bound = w.state.id_horizon_within(prev.remembering);
            // Also a command routed here by an id a kept top-up holds: the batch ahead may drop
            // that top-up (a hold ends with any command), and release the id, before it runs.
            let depends = batch.parts.iter().flat_map(|p| &p.items).any(|item| {
                (item.sent_at != 0 && item.sent_at < bound)
                    || (!item.claimed && item.command.transfer_id().is_some_and(|id| w.state.holds_topup_id(id)))
            });
            if depends || w.poisoned || (batch.entries.is_empty() && batch.parts.is_empty()) {
                w.complete_ahead(&mut ahead, &mut log);
            }
        }

        // Two refusals before the log (nothing changes, the command is answered with the batch):
        // - A command first sent before the idempotency horizon whose id is not remembered may
        //   retry a forgotten one: `id_expired`, instead of risking a second application. The
        //   check holds for the state each command is applied to: after the batch ahead (if
        //   still in the log) and this batch's commands before it, which may forget the oldest
        //   ids, the one a retry names among them.
        // - A command routed here by another copy's claim (not `claimed`) whose id this shard
        //   will not know when it runs is applied under that claim only if the copy holding it
        //   is in the pipeline before it (the claim then passes to it: `take_claim`). Otherwise
        //   the claim may be gone (the copy was refused busy, the id forgotten) and another
        //   shard may hold the id by now: `busy`, and a retry claims the id anew at ingest.
        // How many entries ahead of each command may forget an id: the batch in the log's, and
        // this batch's so far (replica messages, then its commands).
        let ahead_remembering = ahead.as_ref().map_or(0, |b| b.remembering);
        batch.remembering = batch.entries.iter().filter(|e| may_remember(&batch.parts, e)).count();
        batch.took_claims = false;
        for p in 0..batch.parts.len() {
            for i in 0..batch.parts[p].items.len() {
                let before = ahead_remembering + batch.remembering;
                let item = &batch.parts[p].items[i];
                // The id lookup only for the few commands either check can refuse (a new tip is
                // claimed, and sent after the horizon or not saying when).
                let old = item.sent_at != 0 && item.sent_at < w.state.id_horizon_within(before);
                let unknown = (old || !item.claimed)
                    .then(|| item.command.transfer_id().filter(|&id| !w.state.knows_id_within(id, before)))
                    .flatten();
                let refusal = match unknown {
                    Some(_) if old => Some(Status::IdExpired),
                    Some(id) if !item.claimed => {
                        if take_claim(ahead.as_mut(), &mut batch, id) {
                            batch.parts[p].items[i].claimed = true;
                            batch.took_claims = true;
                            None
                        } else {
                            w.peers.stats.busy(shard as usize, 1);
                            Some(Status::Busy)
                        }
                    }
                    _ => None,
                };
                let item = &batch.parts[p].items[i];
                if let Some(status) = refusal {
                    batch.refused.push((p, item.tag, reply_record(&item.command, Reply::status(status))));
                    give_up_claim(&w.peers, &w.state, item, shard);
                    if item.permit {
                        w.peers.permits.fetch_add(1, Ordering::AcqRel);
                    }
                    continue;
                }
                batch.remembering += item.command.transfer_id().is_some() as usize;
                batch.entries.push(Entry::Write(p, i));
            }
        }
        let now = clock.now_ns();
        if last_assigned > now.saturating_add(CLOCK_BEHIND_MAX_NS) && now >= clock_warning_after {
            crate::log_line!(
                "warning: shard {shard}: the clock is {} s behind this shard's newest timestamp: commands are stamped \
                 after it (top-ups do not expire, the business day does not turn) until the clock catches up",
                (last_assigned - now) / 1_000_000_000
            );
            clock_warning_after = now.saturating_add(CLOCK_BEHIND_MAX_NS);
        }
        let deadline_passed = w.state.next_deadline().is_some_and(|d| d <= now);
        if batch.entries.is_empty() && ahead.is_none() && deadline_passed && !w.poisoned {
            batch.entries.push(Entry::Tick);
        }

        if !batch.entries.is_empty() {
            // Timestamps: strictly increasing per shard, close to the wall clock.
            batch.base = now.max(last_assigned + 1);
            last_assigned = batch.base + batch.entries.len() as u64 - 1;
            batch.logged = !w.poisoned;
            // With nothing queued behind this batch there is nothing to overlap its sync with,
            // and a small one gains less than the hand-off costs: append those inline.
            let queued = carry.is_some() || !writes.is_empty() || !internal.is_empty();
            let eager = config.pipeline_min_batch == 0;
            let inline = ahead.is_none() && !eager && (!queued || batch.entries.len() < config.pipeline_min_batch);
            let mut threaded = false;
            if batch.logged {
                let mut records = w.spare_records.pop().unwrap_or_default();
                records.clear();
                for (i, entry) in batch.entries.iter().enumerate() {
                    let command = match entry {
                        Entry::Replica(c, _) => *c,
                        Entry::Write(p, j) => batch.parts[*p].items[*j].command,
                        Entry::Tick => Command::Tick,
                    };
                    let mut record = command.to_record();
                    record.timestamp.set(batch.base + i as u64);
                    records.push(record);
                }
                threaded = log.submit(batch.base, records, inline);
            }
            // Apply the batch before this one while this one is written and synced.
            w.complete_ahead(&mut ahead, &mut log);
            if threaded {
                ahead = Some(batch);
            } else {
                let appended = batch.logged.then(|| log.finish());
                w.complete(batch, appended);
            }
        } else if !batch.parts.is_empty() {
            // Every command of these parts was refused before the log (`id_expired`, `busy`).
            w.complete(batch, None);
        } else {
            w.spare_batches.push(batch);
        }

        // Snapshots: on request or by log volume, encoded here (the state is ours), written by a
        // helper thread; covered log segments are retired once the file is durable.
        if let Some(s) = snapshots.as_mut() {
            s.poll(&mut log, shard);
            s.step(&mut w.state);
            let since = w.logged_bytes - s.logged_at_start;
            w.peers.stats.set_log_since_snapshot(shard, since);
            let due = s.policy.every_bytes > 0 && since >= s.policy.every_bytes;
            if (due || !snapshot_requests.is_empty()) && !w.poisoned {
                // A snapshot that starts now covers every batch handed to the log.
                if !s.writing() {
                    w.complete_ahead(&mut ahead, &mut log);
                }
                let requests = std::mem::take(&mut snapshot_requests);
                s.start(&mut w.state, w.feed.as_deref(), w.last_lsn, w.logged_bytes, &mut log, requests);
            }
        }
        for done in snapshot_requests.drain(..) {
            // Without a log (in-memory mode) there is nothing to snapshot: say so with lsn 0.
            done(if w.poisoned { Err("the shard's log failed".into()) } else { Ok(0) });
        }

        // Reads after the batch: a client sees its own acknowledged writes, and a settlement's
        // gather sees the replica messages sent before it (taken with the reads, above; reads
        // that came in since wait for the next round's drain). Answering completes the batch
        // ahead first (it may hold them too).
        // At most `READ_VISITS_PER_ROUND` records visited: reads that walk long histories wait
        // for later rounds rather than hold up the writes.
        if !pending_queries.is_empty() && internal_drained {
            w.complete_ahead(&mut ahead, &mut log);
            w.answer_some(&mut pending_queries);
        }
    }
    for QueryMsg { query, done } in pending_queries.drain(..) {
        done(w.answer(query).0);
    }
    if let Some(mut s) = snapshots {
        s.complete(&mut w.state, &mut log);
    }
    assert!(!w.state.pinned(), "shard {shard}: a snapshot's encoding was left unfinished");
    if !w.poisoned {
        if let Err(error) = log.sync_all() {
            crate::log_line!("shard {shard}: final sync failed: {error}");
            // Not a clean stop (`node::CLEAN_STOP_FILE` is not written).
            w.poisoned = true;
            w.metrics.flush(true);
        }
    }
    drop(log);
    w.state
}

type SnapshotDone = Box<dyn FnOnce(Result<u64, String>) + Send>;
/// The writer thread: the write's result, and the sections' buffers for the next snapshot.
type SnapshotWriter = std::thread::JoinHandle<(Result<(), String>, Vec<(u32, Vec<u8>)>)>;

/// How many records of each of its pinned parts (accounts, idempotency records; three times as
/// many history entries) a snapshot encodes between two batches (`Encoding::step`): a few
/// milliseconds of the shard's time, and 64 steps for an idempotency ring of the default 2^20
/// (docs/benchmarks.md, session 12).
pub const SNAPSHOT_RECORDS_PER_STEP: usize = 16_384;

/// The most records the reads of one round visit between two batches (`Applier::answer_some`),
/// one read at least: a history read walks up to `HISTORY_DEPTH_MAX` entries, an audit every
/// account. A frame of history queries far down long histories would otherwise hold up the
/// shard's writes for as long as all of them take (seconds); now each round answers what fits,
/// and the rest wait for the rounds after the next batches.
pub const READ_VISITS_PER_ROUND: usize = 2 * crate::ledger::state_machine::HISTORY_DEPTH_MAX;

/// How long an idle worker waits for commands while a snapshot waits for its threads (the
/// payment methods', the top-ups' sort), before it looks again.
const SNAPSHOT_METHODS_POLL: Duration = Duration::from_millis(1);

/// A snapshot whose accounts and rings are being encoded between batches.
struct Encoding {
    lsn: u64,
    /// The state's last timestamp when it began.
    timestamp: u64,
    encoding: crate::snapshot::state::Encoding,
    /// What its last step left to do.
    progress: Progress,
    /// Sections encoded outside the state's codec (the feed's tail).
    extra: Vec<(u32, Vec<u8>)>,
    waiting: Vec<SnapshotDone>,
}

/// One shard's snapshot bookkeeping: at most one snapshot is being encoded or written at a
/// time. A snapshot is encoded on the shard's thread: the small sections at once when it
/// starts, then the accounts, the rings, the pending deadlines and the top-ups a step at a time
/// between batches (`step`), while the shard goes on (`ShardState::pin_accounts`, `pin_rings`,
/// `TopUps::pin`); then written by a thread of its own.
struct Snapshotter {
    policy: SnapshotPolicy,
    /// `Applier::logged_bytes` when the last snapshot started.
    logged_at_start: u64,
    encoding: Option<Encoding>,
    in_flight: Option<(u64, SnapshotWriter, Vec<SnapshotDone>)>,
    /// The last snapshot's section buffers, encoded into again by the next one.
    buffers: crate::snapshot::state::SectionBuffers,
    /// Counts the snapshots written (`stormledger_engine_snapshots_total`).
    stats: Arc<EngineStats>,
}

impl Snapshotter {
    fn new(policy: SnapshotPolicy, stats: Arc<EngineStats>) -> Snapshotter {
        Snapshotter { policy, logged_at_start: 0, encoding: None, in_flight: None, buffers: Default::default(), stats }
    }

    /// A snapshot is being encoded or written.
    fn writing(&self) -> bool {
        self.encoding.is_some() || self.in_flight.is_some()
    }

    /// A snapshot has records left to encode (the worker must not wait idle for commands).
    fn has_steps(&self) -> bool {
        self.encoding.as_ref().is_some_and(|e| e.progress == Progress::Steps)
    }

    /// A snapshot waits only for its threads (the payment methods', the top-ups' sort): the
    /// worker may wait for commands, but not for long.
    fn waiting(&self) -> bool {
        self.encoding.as_ref().is_some_and(|e| e.progress == Progress::Waiting)
    }

    fn start(
        &mut self,
        state: &mut ShardState,
        feed: Option<&crate::feed::ShardFeed>,
        lsn: u64,
        logged_bytes: u64,
        log: &mut LogStage,
        mut waiting: Vec<SnapshotDone>,
    ) {
        if let Some(requests) =
            self.encoding.as_mut().map(|e| &mut e.waiting).or(self.in_flight.as_mut().map(|(_, _, r)| r))
        {
            // One is being encoded or written; these requests are answered when it is durable.
            requests.append(&mut waiting);
            return;
        }
        if let Err(error) = log.sync_all() {
            for done in waiting {
                done(Err(format!("sync before snapshot failed: {error}")));
            }
            return;
        }
        self.logged_at_start = logged_bytes;
        let mut buffers = std::mem::take(&mut self.buffers);
        // The feed's newest events up to `lsn` (the batches before are applied and published).
        use crate::snapshot::state::SECTION_FEED_TAIL;
        let feed_tail =
            feed.map(|f| f.encode_tail(crate::feed::FEED_EVENTS_IN_SNAPSHOT, buffers.take_raw(SECTION_FEED_TAIL)));
        let encoding = crate::snapshot::state::begin_encoding(state, buffers);
        self.encoding = Some(Encoding {
            lsn,
            timestamp: state.last_timestamp(),
            encoding,
            progress: Progress::Steps,
            extra: feed_tail.map(|tail| (SECTION_FEED_TAIL, tail)).into_iter().collect(),
            waiting,
        });
    }

    /// Encodes the next records of the snapshot being encoded, if there is one; once it is
    /// done, hands the snapshot to a thread that writes it.
    fn step(&mut self, state: &mut ShardState) {
        let Some(e) = self.encoding.as_mut() else { return };
        e.progress = e.encoding.step(state, SNAPSHOT_RECORDS_PER_STEP);
        if e.progress != Progress::Done {
            return;
        }
        let Encoding { lsn, timestamp, encoding, extra, waiting, .. } = self.encoding.take().expect("encoding");
        let (mut sections, replaced_methods) = encoding.finish(state);
        sections.extend(extra);
        let meta = crate::snapshot::SnapshotMeta { lsns: vec![lsn], timestamp };
        let (dir, storage) = (self.policy.dir.clone(), self.policy.storage.0.clone());
        let handle = std::thread::Builder::new()
            .name(format!("snapshot-{}", state.shard()))
            .spawn(move || {
                let refs: Vec<(u32, &[u8])> = sections.iter().map(|(t, b)| (*t, b.as_slice())).collect();
                let written = crate::snapshot::write_snapshot_in(storage.as_ref(), &dir, &meta, &refs)
                    .map(|_| ())
                    .map_err(|e| e.to_string());
                // Freeing the payment methods the compaction replaced (hash maps and arrays of
                // up to hundreds of MiB) is work the shard need not wait for.
                drop(replaced_methods);
                (written, sections)
            })
            .expect("spawn snapshot writer");
        self.in_flight = Some((lsn, handle, waiting));
    }

    /// Completes a finished snapshot (non-blocking).
    fn poll(&mut self, log: &mut LogStage, shard: u16) {
        if self.in_flight.as_ref().is_some_and(|(_, h, _)| h.is_finished()) {
            self.finish(log, shard);
        }
    }

    /// Finishes encoding the snapshot being encoded, if there is one, then `finish`es it.
    fn complete(&mut self, state: &mut ShardState, log: &mut LogStage) {
        while self.encoding.is_some() {
            self.step(state);
            if self.waiting() {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        self.finish(log, state.shard());
    }

    /// Waits for the snapshot being written, then retires the log it covers.
    fn finish(&mut self, log: &mut LogStage, shard: u16) {
        let Some((lsn, handle, waiting)) = self.in_flight.take() else { return };
        let result = match handle.join() {
            Ok((result, sections)) => {
                self.buffers = crate::snapshot::state::SectionBuffers::new(sections);
                result
            }
            Err(_) => Err("snapshot writer panicked".into()),
        };
        match &result {
            Ok(()) => {
                self.stats.snapshot_written(shard);
                self.policy.kept.push(lsn);
                if self.policy.kept.len() > crate::snapshot::SNAPSHOTS_KEPT {
                    self.policy.kept.remove(0);
                }
                let oldest = self.policy.kept[0];
                if self.policy.retire_log && self.policy.kept.len() == crate::snapshot::SNAPSHOTS_KEPT && oldest > 0 {
                    if let Err(error) = log.retire_before(oldest + 1) {
                        crate::log_line!("shard {shard}: retiring log segments failed: {error}");
                    }
                }
            }
            Err(error) => crate::log_line!("shard {shard}: snapshot failed: {error}"),
        }
        for done in waiting {
            done(result.clone().map(|()| lsn));
        }
    }
}
