//! The single-writer loop of one shard: drain a batch -> assign timestamps -> one journal
//! append (durable per the configured mode) -> apply -> reply.
//!
//! A shard's `ShardState` is owned by exactly one thread, this one; other threads reach it only
//! through its queues (writes: bounded; replica messages: admitted by the engine's replication
//! permits; queries: bounded) and read published balances through the lock-free index.

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Select, Sender};
use parking_lot::Mutex;

use crate::layout::{CommandRecord, ReplyRecord};
use crate::ledger::account::HistoryEntry;
use crate::ledger::state_machine::{Fanout, IdRecord, Reply, ShardState, TopUp};
use crate::ledger::{Command, Status};
use crate::shard::directory::IdDirectory;
use crate::shard::stats::{EngineStats, ShardMetrics};

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
    failed: AtomicBool,
    reply: Reply,
    command: Command,
    tag: u32,
    collector: Arc<Collector>,
    permits: Arc<AtomicUsize>,
}

impl Join {
    /// Waits for the other shards' parts of `item` (its home part answered `reply`).
    fn new(item: &WriteItem, reply: Reply, collector: &Arc<Collector>, peers: &Peers) -> Arc<Join> {
        Arc::new(Join {
            remaining: AtomicUsize::new(peers.internal.len() - 1),
            total: AtomicI64::new(reply.value),
            failed: AtomicBool::new(false),
            reply,
            command: item.command,
            tag: item.tag,
            collector: collector.clone(),
            permits: peers.permits.clone(),
        })
    }

    fn part_done(&self, value: i64, ok: bool) {
        self.total.fetch_add(value, Ordering::AcqRel);
        if !ok {
            self.failed.store(true, Ordering::Release);
        }
        if self.remaining.fetch_sub(1, Ordering::AcqRel) == 1 {
            let mut reply = self.reply;
            if matches!(self.command, Command::Settle { .. }) {
                reply.value = self.total.load(Ordering::Acquire);
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
    pub snapshot: Option<SnapshotPolicy>,
    /// Where committed events are published (`crate::feed`).
    pub feed: Option<Arc<crate::feed::ShardFeed>>,
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

enum Entry {
    Replica(Command, Option<Arc<Join>>),
    Write(usize, usize),
    Tick,
}

/// The worker loop. Returns the state when shut down (tests inspect it).
#[allow(clippy::too_many_arguments)]
pub fn run(
    mut state: ShardState,
    mut journal: Box<dyn Journal>,
    clock: Arc<dyn Clock>,
    writes: Receiver<Part>,
    internal: Receiver<Internal>,
    queries: Receiver<QueryMsg>,
    peers: Peers,
    config: WorkerConfig,
) -> ShardState {
    let shard = state.shard();
    let mut poisoned = false;
    let mut parts: Vec<Part> = Vec::new();
    let mut carry: Option<Part> = None;
    let mut entries: Vec<Entry> = Vec::new();
    let mut records: Vec<CommandRecord> = Vec::new();
    let mut shutting_down = false;
    let mut snapshot_requests: Vec<SnapshotDone> = Vec::new();
    let mut snapshots = config.snapshot.clone().map(Snapshotter::new);
    let mut last_lsn = 0u64;
    let mut metrics = ShardMetrics::new(peers.stats.clone(), shard);
    let mut events = crate::feed::BatchEvents::new(0);

    loop {
        // Wait for work (or for the next top-up deadline).
        let mut replicas: Vec<(Command, Option<Arc<Join>>)> = Vec::new();
        let mut pending_queries: Vec<QueryMsg> = Vec::new();
        if carry.is_none() {
            let mut select = Select::new();
            let i_internal = select.recv(&internal);
            let i_writes = select.recv(&writes);
            let i_queries = select.recv(&queries);
            let ready =
                if shutting_down { select.try_ready().ok() } else { select.ready_timeout(config.tick_interval).ok() };
            match ready {
                None if shutting_down => break,
                None => {}
                Some(i) if i == i_internal => match internal.try_recv() {
                    Ok(Internal::Replica { command, join }) => replicas.push((command, join)),
                    Ok(Internal::Snapshot { done }) => snapshot_requests.push(done),
                    Ok(Internal::Shutdown) => shutting_down = true,
                    Err(_) => {}
                },
                Some(i) if i == i_writes => {
                    if let Ok(part) = writes.try_recv() {
                        carry = Some(part);
                    }
                }
                Some(i) if i == i_queries => {
                    if let Ok(q) = queries.try_recv() {
                        pending_queries.push(q);
                    }
                }
                Some(_) => {}
            }
        }
        // Drain more without blocking, up to the batch limit.
        while let Ok(msg) = internal.try_recv() {
            match msg {
                Internal::Replica { command, join } => replicas.push((command, join)),
                Internal::Snapshot { done } => snapshot_requests.push(done),
                Internal::Shutdown => shutting_down = true,
            }
        }
        let mut count = replicas.len();
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
            parts.push(part);
        }

        // Assign timestamps: strictly increasing per shard, close to the wall clock.
        entries.clear();
        records.clear();
        for (command, join) in replicas {
            entries.push(Entry::Replica(command, join));
        }
        // A command first sent before the idempotency horizon whose id is not remembered may
        // retry a forgotten one: refuse it (not logged, nothing changes) instead of risking a
        // second application.
        let horizon = state.id_horizon();
        let mut expired: Vec<(usize, u32, ReplyRecord)> = Vec::new();
        for (p, part) in parts.iter().enumerate() {
            for (i, item) in part.items.iter().enumerate() {
                let forgotten = |id: u64| !state.knows_id(id);
                if item.sent_at != 0 && item.sent_at < horizon && item.command.transfer_id().is_some_and(forgotten) {
                    expired.push((p, item.tag, reply_record(&item.command, Reply::status(Status::IdExpired))));
                    if item.claimed {
                        peers.directory.release(item.command.transfer_id().expect("has an id"), shard);
                    }
                    if item.permit {
                        peers.permits.fetch_add(1, Ordering::AcqRel);
                    }
                    continue;
                }
                entries.push(Entry::Write(p, i));
            }
        }
        let now = clock.now_ns();
        if entries.is_empty() && state.next_deadline().is_some_and(|d| d <= now) && !poisoned {
            entries.push(Entry::Tick);
        }

        if !entries.is_empty() {
            let base = now.max(state.last_timestamp() + 1);
            for (i, entry) in entries.iter().enumerate() {
                let command = match entry {
                    Entry::Replica(c, _) => *c,
                    Entry::Write(p, j) => parts[*p].items[*j].command,
                    Entry::Tick => Command::Tick,
                };
                let mut record = command.to_record();
                record.timestamp.set(base + i as u64);
                records.push(record);
            }
            if !poisoned {
                let started = Instant::now();
                match journal.append_batch(base, &records) {
                    Ok(lsn) => {
                        last_lsn = lsn;
                        if let Some(s) = snapshots.as_mut() {
                            s.bytes_since += (records.len() * std::mem::size_of::<CommandRecord>()) as u64;
                        }
                    }
                    Err(error) => {
                        eprintln!("shard {shard}: journal failed, refusing all further writes: {error}");
                        poisoned = true;
                    }
                }
                metrics.batch(records.len(), started.elapsed());
            }

            events.restart(last_lsn);
            let mut replies: Vec<Vec<(u32, ReplyRecord)>> =
                parts.iter().map(|p| Vec::with_capacity(p.items.len())).collect();
            for (p, tag, reply) in expired.drain(..) {
                replies[p].push((tag, reply));
            }
            // Prefetch in two stages, a few commands ahead, so the cache misses of the next
            // payers overlap with applying this one (hints only: results do not change).
            let command_at = |entries: &[Entry], k: usize| match entries.get(k) {
                Some(Entry::Write(p, j)) => Some(&parts[*p].items[*j].command),
                _ => None,
            };
            for k in 0..PREFETCH_FAR.min(entries.len()) {
                if let Some(c) = command_at(&entries, k) {
                    state.prefetch_index(c);
                }
            }
            for i in 0..entries.len() {
                if let Some(c) = command_at(&entries, i + PREFETCH_FAR) {
                    state.prefetch_index(c);
                }
                if let Some(c) = command_at(&entries, i + PREFETCH_NEAR) {
                    state.prefetch_account(c);
                }
                let entry = std::mem::replace(&mut entries[i], Entry::Tick);
                let ts = base + i as u64;
                match entry {
                    Entry::Tick => {
                        state.apply(ts, &Command::Tick);
                    }
                    Entry::Replica(command, join) => {
                        if poisoned {
                            if let Some(join) = join {
                                join.part_done(0, false);
                            }
                            continue;
                        }
                        let (reply, _) = events.apply(&mut state, i, ts, &command);
                        if let Some(join) = join {
                            join.part_done(reply.value, true);
                        }
                    }
                    Entry::Write(p, j) => {
                        let item = &parts[p].items[j];
                        if poisoned {
                            metrics.command(item.command.kind(), Status::Unavailable);
                            replies[p]
                                .push((item.tag, reply_record(&item.command, Reply::status(Status::Unavailable))));
                            if item.permit {
                                peers.permits.fetch_add(1, Ordering::AcqRel);
                            }
                            if item.claimed {
                                peers.directory.release(item.command.transfer_id().expect("claimed"), shard);
                            }
                            continue;
                        }
                        let (reply, fanout) = events.apply(&mut state, i, ts, &item.command);
                        metrics.command(item.command.kind(), reply.status);
                        match fanout {
                            Fanout::None => {
                                replies[p].push((item.tag, reply_record(&item.command, reply)));
                                if item.permit {
                                    peers.permits.fetch_add(1, Ordering::AcqRel);
                                }
                            }
                            Fanout::Replicate(replica) => {
                                assert!(item.permit, "replicated commands hold a permit");
                                let join = Join::new(item, reply, &parts[p].collector, &peers);
                                for (s, tx) in peers.internal.iter().enumerate() {
                                    if s != shard as usize {
                                        let msg = Internal::Replica { command: replica, join: Some(join.clone()) };
                                        if tx.send(msg).is_err() {
                                            join.part_done(0, false);
                                        }
                                    }
                                }
                            }
                            Fanout::GatherSettlement { id } => {
                                assert!(item.permit, "settlements hold a permit");
                                let join = Join::new(item, reply, &parts[p].collector, &peers);
                                for (s, tx) in peers.queries.iter().enumerate() {
                                    if s != shard as usize {
                                        let part_join = join.clone();
                                        let done = Box::new(move |answer: ShardAnswer| {
                                            let value = match answer {
                                                ShardAnswer::Lookup(Some(r)) => r.reply.value,
                                                _ => 0,
                                            };
                                            part_join.part_done(value, true);
                                        });
                                        if tx.try_send(QueryMsg { query: ShardQuery::Lookup { id }, done }).is_err() {
                                            join.part_done(0, false);
                                        }
                                    }
                                }
                            }
                        }
                    }
                }
            }
            entries.clear();
            if let (Some(feed), false) = (&config.feed, poisoned) {
                feed.publish(&mut events);
            }
            // Before the replies: a client that reuses an id this batch evicted, once it has
            // its answer, must find the id free in the directory.
            if !state.evicted().is_empty() {
                peers.directory.release_many(state.evicted(), shard);
                state.clear_evicted();
            }
            metrics.flush(poisoned);
            for (part, replies) in parts.drain(..).zip(replies) {
                part.collector.fill(&replies);
            }
        } else if !parts.is_empty() {
            // Every command of these parts was refused before the journal (`id_expired`).
            let mut replies: Vec<Vec<(u32, ReplyRecord)>> = parts.iter().map(|_| Vec::new()).collect();
            for (p, tag, reply) in expired.drain(..) {
                replies[p].push((tag, reply));
            }
            for (part, replies) in parts.drain(..).zip(replies) {
                part.collector.fill(&replies);
            }
        }

        // Snapshots: on request or by log volume, encoded here (the state is ours), written by a
        // helper thread; covered log segments are retired once the file is durable.
        if let Some(s) = snapshots.as_mut() {
            s.poll(journal.as_mut(), shard);
            let due = s.policy.every_bytes > 0 && s.bytes_since >= s.policy.every_bytes;
            if (due || !snapshot_requests.is_empty()) && !poisoned {
                s.start(&state, last_lsn, journal.as_mut(), std::mem::take(&mut snapshot_requests));
            }
        }
        for done in snapshot_requests.drain(..) {
            // Without a log (in-memory mode) there is nothing to snapshot: say so with lsn 0.
            done(if poisoned { Err("the shard's log failed".into()) } else { Ok(0) });
        }

        // Reads after the batch: a client sees its own acknowledged writes.
        while let Ok(q) = queries.try_recv() {
            pending_queries.push(q);
        }
        for QueryMsg { query, done } in pending_queries {
            let answer = match query {
                ShardQuery::History { account, limit, before } => {
                    ShardAnswer::History(state.history(account, limit, before))
                }
                ShardQuery::Lookup { id } => ShardAnswer::Lookup(state.lookup(id)),
                ShardQuery::TopUp { id } => ShardAnswer::TopUp(state.topup(id).copied()),
                ShardQuery::Audit => ShardAnswer::Audit(AuditSummary {
                    shard,
                    accounts: state.accounts().len(),
                    unit_sums: state.unit_sums(),
                    last_timestamp: state.last_timestamp(),
                    poisoned,
                }),
            };
            done(answer);
        }
    }
    if let Some(mut s) = snapshots {
        s.finish(journal.as_mut(), shard);
    }
    if !poisoned {
        if let Err(error) = journal.sync_all() {
            eprintln!("shard {shard}: final sync failed: {error}");
        }
    }
    state
}

type SnapshotDone = Box<dyn FnOnce(Result<u64, String>) + Send>;
type SnapshotWriter = std::thread::JoinHandle<Result<(), String>>;

/// One shard's snapshot bookkeeping: at most one snapshot is being written at a time.
struct Snapshotter {
    policy: SnapshotPolicy,
    bytes_since: u64,
    in_flight: Option<(u64, SnapshotWriter, Vec<SnapshotDone>)>,
}

impl Snapshotter {
    fn new(policy: SnapshotPolicy) -> Snapshotter {
        Snapshotter { policy, bytes_since: 0, in_flight: None }
    }

    fn start(&mut self, state: &ShardState, lsn: u64, journal: &mut dyn Journal, mut waiting: Vec<SnapshotDone>) {
        if let Some((_, _, requests)) = self.in_flight.as_mut() {
            // One is being written; these requests are answered when the next one is durable.
            requests.append(&mut waiting);
            return;
        }
        if let Err(error) = journal.sync_all() {
            for done in waiting {
                done(Err(format!("sync before snapshot failed: {error}")));
            }
            return;
        }
        self.bytes_since = 0;
        let sections = crate::snapshot::state::encode(state);
        let meta = crate::snapshot::SnapshotMeta { lsns: vec![lsn], timestamp: state.last_timestamp() };
        let (dir, storage) = (self.policy.dir.clone(), self.policy.storage.0.clone());
        let handle = std::thread::Builder::new()
            .name(format!("snapshot-{}", state.shard()))
            .spawn(move || {
                let refs: Vec<(u32, &[u8])> = sections.iter().map(|(t, b)| (*t, b.as_slice())).collect();
                crate::snapshot::write_snapshot_in(storage.as_ref(), &dir, &meta, &refs)
                    .map(|_| ())
                    .map_err(|e| e.to_string())
            })
            .expect("spawn snapshot writer");
        self.in_flight = Some((lsn, handle, waiting));
    }

    /// Completes a finished snapshot (non-blocking).
    fn poll(&mut self, journal: &mut dyn Journal, shard: u16) {
        if self.in_flight.as_ref().is_some_and(|(_, h, _)| h.is_finished()) {
            self.finish(journal, shard);
        }
    }

    /// Waits for the snapshot being written, then retires the log it covers.
    fn finish(&mut self, journal: &mut dyn Journal, shard: u16) {
        let Some((lsn, handle, waiting)) = self.in_flight.take() else { return };
        let result = handle.join().unwrap_or_else(|_| Err("snapshot writer panicked".into()));
        match &result {
            Ok(()) => {
                self.policy.kept.push(lsn);
                if self.policy.kept.len() > crate::snapshot::SNAPSHOTS_KEPT {
                    self.policy.kept.remove(0);
                }
                let oldest = self.policy.kept[0];
                if self.policy.retire_log && self.policy.kept.len() == crate::snapshot::SNAPSHOTS_KEPT && oldest > 0 {
                    if let Err(error) = journal.retire_before(oldest + 1) {
                        eprintln!("shard {shard}: retiring log segments failed: {error}");
                    }
                }
            }
            Err(error) => eprintln!("shard {shard}: snapshot failed: {error}"),
        }
        for done in waiting {
            done(result.clone().map(|()| lsn));
        }
    }
}
