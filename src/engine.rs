//! The engine facade: starts one worker per shard and routes commands and reads to them.
//!
//! Ingest (any thread): decode and shape-check each record, refuse what cannot run (maintenance,
//! full queue, no replication permit free, a shard whose log failed) with a status, claim
//! transfer ids in the directory, and push each shard's commands, in parts of at most
//! `batch_commands_max`, onto that shard's bounded queue. Nothing here blocks: a full queue
//! answers `busy`.
//! Balance reads are answered on the calling thread from the shards' published balances.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::{bounded, unbounded, Sender, TrySendError};
use parking_lot::Mutex;

use crate::config::{ConfigError, LedgerConfig, ShardLimits};
use crate::layout::{CommandRecord, HistoryRecord, QueryRecord, ReplyRecord};
use crate::ledger::account::HistoryEntry;
use crate::ledger::command::kind;
use crate::ledger::index::AccountIndex;
use crate::ledger::state_machine::REPLICATION_IN_FLIGHT_MAX;
use crate::ledger::{Command, Reply, ShardState, Status};
use crate::server::backend::{AnswerCallback, Backend, ReplyCallback};
use crate::shard::directory::{Claim, IdDirectory};
use crate::shard::router::home_shard;
use crate::shard::stats::EngineStats;
use crate::shard::worker::{
    self, reply_record, AuditSummary, Clock, Collector, Internal, Journal, NullJournal, Part, Peers, QueryMsg,
    ShardAnswer, ShardQuery, SnapshotPolicy, SystemClock, WorkerConfig, WriteItem,
};

/// Query kinds (`QueryRecord::kind`).
pub mod query_kind {
    pub const BALANCE: u8 = 1;
    pub const HISTORY: u8 = 2;
    pub const LOOKUP: u8 = 3;
    pub const TOPUP_STATUS: u8 = 4;
}

/// Largest page of history one query returns.
pub const HISTORY_LIMIT_MAX: u32 = 1000;
/// The most shards an engine runs.
pub const SHARDS_MAX: u16 = 64;

/// Engine tunables. Defaults are documented in README "Limits".
#[derive(Clone, Debug)]
pub struct EngineConfig {
    pub shards: u16,
    pub ledger: LedgerConfig,
    pub limits: ShardLimits,
    /// Parts (per-shard slices of a submitted batch) one shard's write queue holds.
    pub queue_depth_max: usize,
    /// Reads one shard's query queue holds.
    pub query_depth_max: usize,
    /// Commands one shard applies per journal append; also the largest part.
    pub batch_commands_max: usize,
    /// How often an idle shard checks for expired top-ups.
    pub tick_interval: Duration,
    /// Events each shard's feed ring keeps (`crate::feed`).
    pub feed_events_max: usize,
    /// With a journal that waits for the disk, batches of at least this many commands with work
    /// queued behind them are appended on the shard's log thread while the shard applies the
    /// batch before (`shard::log_stage`); smaller ones inline. 0: every batch goes through the
    /// log thread, queued work or not (tests use it to run that path on every batch).
    pub pipeline_min_batch: usize,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            shards: std::thread::available_parallelism().map(|n| n.get() as u16).unwrap_or(1).clamp(1, 64),
            ledger: LedgerConfig::default(),
            limits: ShardLimits::default(),
            queue_depth_max: 1024,
            query_depth_max: 4096,
            batch_commands_max: 8192,
            tick_interval: Duration::from_millis(100),
            feed_events_max: crate::feed::FEED_EVENTS_MAX_DEFAULT,
            pipeline_min_batch: worker::PIPELINE_MIN_BATCH,
        }
    }
}

impl EngineConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.ledger.validate()?;
        self.limits.validate()?;
        if !(1..=SHARDS_MAX).contains(&self.shards) {
            return Err(ConfigError(format!("shards must be in 1..={SHARDS_MAX}")));
        }
        if self.queue_depth_max == 0 || self.query_depth_max == 0 {
            return Err(ConfigError("queue depths must be at least 1".into()));
        }
        if self.batch_commands_max == 0 || self.batch_commands_max > 65_536 {
            return Err(ConfigError("batch_commands_max must be in 1..=65536".into()));
        }
        Ok(())
    }
}

pub use crate::protocol::QueryAnswer;

/// See the module docs.
pub struct Engine {
    shards: u16,
    writes: Vec<Sender<Part>>,
    internal: Vec<Sender<Internal>>,
    queries: Vec<Sender<QueryMsg>>,
    indexes: Vec<Arc<AccountIndex>>,
    directory: Arc<IdDirectory>,
    permits: Arc<AtomicUsize>,
    stats: Arc<EngineStats>,
    maintenance: AtomicBool,
    /// The marker file that keeps `admin maintenance on` across restarts (`Node` sets it on a
    /// durable data directory); the lock orders concurrent operator actions.
    maintenance_file: Mutex<Option<std::path::PathBuf>>,
    batch_commands_max: usize,
    threads: Mutex<Vec<JoinHandle<ShardState>>>,
    feed: Arc<crate::feed::Feed>,
}

impl Engine {
    /// An engine that keeps nothing on disk (tests, benchmarks of the engine alone).
    pub fn in_memory(config: EngineConfig) -> Result<Engine, ConfigError> {
        config.validate()?;
        let states = (0..config.shards)
            .map(|s| ShardState::new(s, config.shards, config.ledger.clone(), config.limits.clone()))
            .collect();
        let journals = (0..config.shards).map(|_| Box::new(NullJournal) as Box<dyn Journal>).collect();
        Ok(Engine::start(&config, states, journals, Arc::new(SystemClock)))
    }

    /// Starts the workers over recovered (or fresh) shard states. Replica messages that a crash
    /// cut off are queued first, so every shard completes the cross-shard work before anything new.
    pub fn start(
        config: &EngineConfig,
        states: Vec<ShardState>,
        journals: Vec<Box<dyn Journal>>,
        clock: Arc<dyn Clock>,
    ) -> Engine {
        let policies = states.iter().map(|_| None).collect();
        Engine::start_with_snapshots(config, states, journals, policies, clock)
    }

    /// `start`, with a snapshot policy per shard.
    pub fn start_with_snapshots(
        config: &EngineConfig,
        states: Vec<ShardState>,
        journals: Vec<Box<dyn Journal>>,
        snapshots: Vec<Option<SnapshotPolicy>>,
        clock: Arc<dyn Clock>,
    ) -> Engine {
        let feed = Arc::new(crate::feed::Feed::new(config.shards, config.feed_events_max));
        Engine::start_with_feed(config, states, journals, snapshots, clock, feed)
    }

    /// `start_with_snapshots`, publishing events into `feed` (refilled by recovery).
    pub fn start_with_feed(
        config: &EngineConfig,
        states: Vec<ShardState>,
        journals: Vec<Box<dyn Journal>>,
        snapshots: Vec<Option<SnapshotPolicy>>,
        clock: Arc<dyn Clock>,
        feed: Arc<crate::feed::Feed>,
    ) -> Engine {
        let n = config.shards as usize;
        assert_eq!(snapshots.len(), n);
        assert_eq!(states.len(), n);
        assert_eq!(journals.len(), n);
        // Every id in a shard's idempotency window, plus the top-ups kept after their id left it
        // (in flight, or ended and kept for late callbacks).
        let ids: usize = states.iter().map(|s| s.limits().ids_max as usize).sum();
        let topups: usize = states.iter().map(|s| 2 * s.topups_max()).sum();
        let directory = Arc::new(IdDirectory::with_capacity(ids + ids / 4 + topups));
        for state in &states {
            for (id, record) in state.id_records() {
                if !matches!(record.command, Command::ReplicaSettle { .. }) {
                    assert!(directory.insert(id, state.shard()), "the directory is sized for every retained id");
                }
            }
            for id in state.topup_ids_outside_window() {
                assert!(directory.insert(id, state.shard()), "the directory is sized for every kept top-up");
            }
        }
        let mut write_tx = Vec::new();
        let mut write_rx = Vec::new();
        let mut internal_tx = Vec::new();
        let mut internal_rx = Vec::new();
        let mut query_tx = Vec::new();
        let mut query_rx = Vec::new();
        for _ in 0..n {
            let (tx, rx) = bounded(config.queue_depth_max);
            write_tx.push(tx);
            write_rx.push(rx);
            let (tx, rx) = unbounded();
            internal_tx.push(tx);
            internal_rx.push(rx);
            let (tx, rx) = bounded(config.query_depth_max);
            query_tx.push(tx);
            query_rx.push(rx);
        }
        // Complete replication cut off by a crash, in per-source order. (`Node::open` refused
        // shards that do not fit together before anything started: `check_replicas`.)
        if let Err(e) = check_replicas(&states.iter().collect::<Vec<_>>()) {
            panic!("{e}");
        }
        for source in &states {
            for target in &states {
                if source.shard() == target.shard() {
                    continue;
                }
                for (_, command) in source.outbox_after(target.replica_in(source.shard())) {
                    let msg = Internal::Replica { command, join: None };
                    internal_tx[target.shard() as usize].send(msg).expect("receiver alive");
                }
            }
        }
        let permits = Arc::new(AtomicUsize::new(REPLICATION_IN_FLIGHT_MAX));
        let stats = Arc::new(EngineStats::new(n));
        let indexes = states.iter().map(|s| s.index().clone()).collect();
        let worker_config = WorkerConfig {
            batch_commands_max: config.batch_commands_max,
            tick_interval: config.tick_interval,
            pipeline_min_batch: config.pipeline_min_batch,
            snapshot: None,
            feed: None,
        };
        let mut threads = Vec::new();
        let rx = write_rx.into_iter().zip(internal_rx).zip(query_rx);
        let shards = states.into_iter().zip(journals).zip(snapshots);
        for (((state, journal), snapshot), ((writes, internal), queries)) in shards.zip(rx) {
            let peers = Peers {
                internal: internal_tx.clone(),
                queries: query_tx.clone(),
                directory: directory.clone(),
                permits: permits.clone(),
                stats: stats.clone(),
            };
            let clock = clock.clone();
            let feed_of_shard = Some(feed.shard(state.shard()).clone());
            let worker_config = WorkerConfig { snapshot, feed: feed_of_shard, ..worker_config.clone() };
            let name = format!("shard-{}", state.shard());
            let handle = std::thread::Builder::new()
                .name(name)
                .spawn(move || worker::run(state, journal, clock, writes, internal, queries, peers, worker_config))
                .expect("spawn shard worker");
            threads.push(handle);
        }
        Engine {
            shards: config.shards,
            writes: write_tx,
            internal: internal_tx,
            queries: query_tx,
            indexes,
            directory,
            permits,
            stats,
            maintenance: AtomicBool::new(false),
            maintenance_file: Mutex::new(None),
            batch_commands_max: config.batch_commands_max,
            threads: Mutex::new(threads),
            feed,
        }
    }

    /// The event feed.
    pub fn feed(&self) -> &Arc<crate::feed::Feed> {
        &self.feed
    }

    pub fn shards(&self) -> u16 {
        self.shards
    }

    /// Pauses (or resumes) writes: while on, every write is answered `maintenance`.
    pub fn set_maintenance(&self, on: bool) {
        self.maintenance.store(on, Ordering::Release);
    }

    pub fn maintenance(&self) -> bool {
        self.maintenance.load(Ordering::Acquire)
    }

    /// Keeps the maintenance switch in the marker file `path` from now on, and starts paused if
    /// the file exists (it was on when the server stopped). Returns whether it does.
    pub fn keep_maintenance_in(&self, path: std::path::PathBuf) -> bool {
        let mut file = self.maintenance_file.lock();
        let on = path.exists();
        self.set_maintenance(on);
        *file = Some(path);
        on
    }

    /// `admin maintenance`: the marker file is written (or removed) durably before the switch
    /// changes, so an acknowledged switch survives a crash; if that fails nothing changes.
    fn switch_maintenance(&self, on: bool) -> Status {
        let file = self.maintenance_file.lock();
        if let Some(path) = file.as_ref() {
            if let Err(error) = write_marker(path, on) {
                crate::log_line!("admin maintenance: cannot record the switch in {}: {error}", path.display());
                return Status::Unavailable;
            }
        }
        self.set_maintenance(on);
        Status::Ok
    }

    /// Submits write commands. `done` is called exactly once, from an engine thread or this
    /// one, with one reply per record in order, after every accepted command is durable.
    pub fn submit(&self, records: Vec<CommandRecord>, done: Box<dyn FnOnce(Vec<ReplyRecord>) + Send>) {
        let n = records.len();
        if n == 0 {
            done(Vec::new());
            return;
        }
        let collector = Collector::new(n, done);
        let mut immediate: Vec<(u32, ReplyRecord)> = Vec::new();
        let maintenance = self.maintenance();
        // Pass 1: decode and find each command's route; transfer ids are claimed afterwards in
        // one pass over the directory (one lock per stripe, not one per command).
        let mut routed: Vec<(u32, Command, Route, u64)> = Vec::with_capacity(n);
        let mut claim_requests: Vec<(u64, u16)> = Vec::with_capacity(n);
        let mut owners = false;
        for (tag, record) in records.iter().enumerate() {
            let tag = tag as u32;
            let refuse = |status: Status| {
                let mut r = ReplyRecord { kind: record.kind, ..ReplyRecord::default() };
                r.status.set(status.code());
                r.id.set(record.id.get());
                (tag, r)
            };
            if !kind::is_client_kind(record.kind) {
                immediate.push(refuse(Status::InvalidKind));
                continue;
            }
            if record.kind == kind::SNAPSHOT {
                self.snapshot_all(tag, collector.clone());
                continue;
            }
            if let Some(status) = self.operator_action(record) {
                immediate.push(refuse(status));
                continue;
            }
            let mut command = match Command::from_record(record) {
                Ok(c) => c,
                Err(status) => {
                    immediate.push(refuse(status));
                    continue;
                }
            };
            // A confirmation that does not say when the channel was paid was paid by its first
            // send at the latest (logged with the command: replay decides as the run did).
            if let Command::TopUpConfirm { paid_by: paid_by @ 0, .. } = &mut command {
                *paid_by = record.timestamp.get();
            }
            if maintenance {
                immediate.push((tag, reply_record(&command, Reply::status(Status::Maintenance))));
                continue;
            }
            match self.route(&command) {
                Ok(Route::Claim(id, home)) => {
                    claim_requests.push((id, home));
                    routed.push((tag, command, Route::Claim(id, home), record.timestamp.get()));
                }
                Ok(route) => {
                    owners |= matches!(route, Route::Owner(_));
                    routed.push((tag, command, route, record.timestamp.get()));
                }
                Err(status) => immediate.push((tag, reply_record(&command, Reply::status(status)))),
            }
        }
        let mut claims = Vec::new();
        self.directory.claim_many(&claim_requests, &mut claims);
        // Top-up callbacks go where their top-up's begin went: looked up after the claims, so
        // that a callback finds a begin earlier in the same frame (else `not_found`).
        if owners {
            routed.retain_mut(|(tag, command, route, _)| {
                let Route::Owner(id) = *route else { return true };
                match self.directory.owner(id) {
                    Some(shard) => {
                        *route = Route::Shard(shard);
                        true
                    }
                    None => {
                        immediate.push((*tag, reply_record(command, Reply::status(Status::NotFound))));
                        false
                    }
                }
            });
        }
        // Each command's shard and whether it claimed its id (`None`: the directory is full).
        let resolve = |route: &Route, claims: &mut std::slice::Iter<Claim>| match *route {
            Route::Shard(shard) => Some((shard, false)),
            Route::Claim(_, home) => match *claims.next().expect("one claim per request") {
                Claim::New => Some((home, true)),
                Claim::Existing(owner) => Some((owner, false)),
                Claim::Full => None,
            },
            Route::Owner(_) => unreachable!("looked up after the claims"),
        };
        // Every part sized exactly (a batch is thousands of commands: growing the parts by
        // doubling took 4.5 % of the engine's instructions, session 7).
        let mut per_shard_len = vec![0usize; self.shards as usize];
        let mut counting = claims.iter();
        for (_, _, route, _) in &routed {
            if let Some((shard, _)) = resolve(route, &mut counting) {
                per_shard_len[shard as usize] += 1;
            }
        }
        let mut per_shard: Vec<Vec<WriteItem>> = per_shard_len.iter().map(|&len| Vec::with_capacity(len)).collect();
        let mut claims = claims.iter();
        // Pass 2: permits for cross-shard commands, then one part per shard.
        for (tag, command, route, sent_at) in routed {
            let Some((shard, claimed)) = resolve(&route, &mut claims) else {
                immediate.push((tag, reply_record(&command, Reply::status(Status::Busy))));
                continue;
            };
            let permit = needs_permit(&command);
            // Work for every shard while one refuses writes (its log failed) would be applied
            // on the others only: its home shard keeps the replica messages for the failed
            // shard's restart, but a bounded number (`OUTBOX_MAX`), so refuse it until then.
            if permit && self.stats.poisoned_shards() > 0 {
                if claimed {
                    self.directory.release(command.transfer_id().expect("claimed"), shard);
                }
                immediate.push((tag, reply_record(&command, Reply::status(Status::Unavailable))));
                continue;
            }
            if permit && !self.take_permit() {
                if claimed {
                    self.directory.release(command.transfer_id().expect("claimed"), shard);
                }
                self.stats.busy(shard as usize, 1);
                immediate.push((tag, reply_record(&command, Reply::status(Status::Busy))));
                continue;
            }
            per_shard[shard as usize].push(WriteItem { tag, command, permit, claimed, sent_at });
        }
        for (shard, items) in per_shard.into_iter().enumerate() {
            let mut items = items;
            while !items.is_empty() {
                let rest = if items.len() > self.batch_commands_max {
                    items.split_off(self.batch_commands_max)
                } else {
                    Vec::new()
                };
                let part = Part { items, collector: collector.clone() };
                match self.writes[shard].try_send(part) {
                    Ok(()) => {}
                    Err(TrySendError::Full(part) | TrySendError::Disconnected(part)) => {
                        self.stats.busy(shard, part.items.len());
                        for item in part.items {
                            immediate.push((item.tag, reply_record(&item.command, Reply::status(Status::Busy))));
                            if item.permit {
                                self.permits.fetch_add(1, Ordering::AcqRel);
                            }
                            if item.claimed {
                                let id = item.command.transfer_id().expect("claimed");
                                self.directory.release(id, shard as u16);
                            }
                        }
                    }
                }
                items = rest;
            }
        }
        self.stats.count_immediate(&immediate);
        collector.fill(&immediate);
    }

    /// Submits and waits (tests, tools).
    pub fn execute(&self, commands: &[Command]) -> Vec<ReplyRecord> {
        let (tx, rx) = bounded(1);
        let records = commands.iter().map(|c| c.to_record()).collect();
        self.submit(
            records,
            Box::new(move |replies| {
                let _ = tx.send(replies);
            }),
        );
        rx.recv().expect("engine replies")
    }

    /// Operator actions that are not ledger commands (never logged): maintenance on/off and
    /// snapshot requests. `None` for ledger commands.
    fn operator_action(&self, record: &CommandRecord) -> Option<Status> {
        match record.kind {
            kind::MAINTENANCE => Some(self.switch_maintenance(record.flags != 0)),
            kind::SNAPSHOT => None,
            _ => None,
        }
    }

    /// Asks every shard for a snapshot; fills the reply slot `tag` when all are durable
    /// (value = the number of shards snapshotted) or with `unavailable` if any failed.
    fn snapshot_all(&self, tag: u32, collector: Arc<Collector>) {
        let gather = Arc::new(Gather::new(self.shards as usize, move |parts: Vec<(u16, Result<u64, String>)>| {
            let mut reply = ReplyRecord { kind: kind::SNAPSHOT, ..ReplyRecord::default() };
            let failed: Vec<String> =
                parts.iter().filter_map(|(s, r)| r.as_ref().err().map(|e| format!("shard {s}: {e}"))).collect();
            if failed.is_empty() {
                reply.value.set(parts.len() as i64);
            } else {
                crate::log_line!("admin snapshot failed: {}", failed.join("; "));
                reply.status.set(Status::Unavailable.code());
            }
            collector.fill(&[(tag, reply)]);
        }));
        for (shard, tx) in self.internal.iter().enumerate() {
            let g = gather.clone();
            let done = Box::new(move |r: Result<u64, String>| g.add(shard as u16, r));
            if tx.send(Internal::Snapshot { done }).is_err() {
                gather.add(shard as u16, Err("shard stopped".into()));
            }
        }
    }

    fn take_permit(&self) -> bool {
        self.permits.fetch_update(Ordering::AcqRel, Ordering::Acquire, |p| p.checked_sub(1)).is_ok()
    }

    /// Where a command goes: a fixed shard, or its payer's home shard unless the id is taken.
    fn route(&self, command: &Command) -> Result<Route, Status> {
        let home = |account: u64| home_shard(account, self.shards);
        Ok(match *command {
            Command::CreateAccount { account, .. } => Route::Shard(home(account)),
            Command::BindMethod { user, .. } | Command::SetDailyCap { user, .. } => Route::Shard(home(user)),
            Command::Freeze { account, .. } => Route::Shard(home(account)),
            Command::TopUpBegin { id, user, .. } => Route::Claim(id, home(user)),
            Command::Tip { id, from, .. } | Command::Gift { id, from, .. } | Command::PayEvent { id, from, .. } => {
                Route::Claim(id, home(from))
            }
            Command::Settle { id, account } => Route::Claim(id, home(account)),
            Command::TopUpConfirm { id, .. } | Command::TopUpFail { id, .. } => Route::Owner(id),
            Command::Tick
            | Command::ReplicaCreate { .. }
            | Command::ReplicaFreeze { .. }
            | Command::ReplicaSettle { .. }
            | Command::SettleTotal { .. } => return Err(Status::InvalidKind),
        })
    }

    /// The committed balance of `account`: lock-free, on the calling thread. For a striped
    /// account it is the sum of its stripes, each committed (not one atomic cut across shards).
    pub fn balance(&self, account: u64) -> Option<i64> {
        let _timer = self.stats.time_balance_read();
        let home = home_shard(account, self.shards) as usize;
        let balance = self.indexes[home].balance(account)?;
        if self.shards == 1 {
            return Some(balance);
        }
        let other = (home + 1) % self.shards as usize;
        if self.indexes[other].lookup(account).is_none() {
            return Some(balance);
        }
        Some(self.indexes.iter().map(|index| index.balance(account).unwrap_or(0)).sum())
    }

    /// Is `account` striped (present on more than its home shard)?
    fn is_striped(&self, account: u64) -> bool {
        self.shards > 1 && {
            let home = home_shard(account, self.shards) as usize;
            self.indexes[(home + 1) % self.shards as usize].lookup(account).is_some()
        }
    }

    fn ask(&self, shard: usize, query: ShardQuery, done: Box<dyn FnOnce(ShardAnswer) + Send>) -> Result<(), Status> {
        match self.queries[shard].try_send(QueryMsg { query, done }) {
            Ok(()) => Ok(()),
            Err(TrySendError::Full(_)) => Err(Status::Busy),
            Err(TrySendError::Disconnected(_)) => Err(Status::Unavailable),
        }
    }

    /// Answers a read. `done` is called exactly once.
    pub fn query(&self, query: QueryRecord, done: Box<dyn FnOnce(QueryAnswer) + Send>) {
        let key = query.key.get();
        let query_kind = query.kind;
        let status_answer = move |status: Status| {
            let mut reply = ReplyRecord { kind: query_kind, ..ReplyRecord::default() };
            reply.status.set(status.code());
            reply.id.set(key);
            QueryAnswer { reply, ..QueryAnswer::default() }
        };
        match query.kind {
            query_kind::BALANCE => {
                let answer = match self.balance(key) {
                    Some(balance) => {
                        let mut a = status_answer(Status::Ok);
                        a.reply.value.set(balance);
                        a
                    }
                    None => status_answer(Status::NotFound),
                };
                done(answer);
            }
            query_kind::HISTORY => {
                let limit = match query.limit.get() {
                    0 => HISTORY_LIMIT_MAX,
                    l => l.min(HISTORY_LIMIT_MAX),
                } as usize;
                let before = match query.before_ts.get() {
                    0 => None,
                    // Entries before (ts, shard): a shard past u16 is past every shard, as u16::MAX
                    // is (a cast would wrap it to an earlier one and skip entries).
                    ts => Some((ts, u16::try_from(query.before_shard.get()).unwrap_or(u16::MAX))),
                };
                let home = home_shard(key, self.shards) as usize;
                if self.indexes[home].lookup(key).is_none() {
                    return done(status_answer(Status::NotFound));
                }
                let shards: Vec<usize> =
                    if self.is_striped(key) { (0..self.shards as usize).collect() } else { vec![home] };
                // Every shard asked must answer: a page with a shard missing would look complete and
                // a cursor taken from it would skip that shard's entries, so it is `busy` (queue
                // full) or `unavailable` (shard stopped) instead.
                type Part = Result<Vec<HistoryEntry>, Status>;
                let gather = Arc::new(Gather::new(shards.len(), move |parts: Vec<(u16, Part)>| {
                    if let Some((_, Err(status))) = parts.iter().find(|(_, entries)| entries.is_err()) {
                        return done(status_answer(*status));
                    }
                    let mut all: Vec<(u16, HistoryEntry)> = parts
                        .into_iter()
                        .flat_map(|(s, entries)| entries.unwrap_or_default().into_iter().map(move |e| (s, e)))
                        .collect();
                    all.sort_by_key(|(s, e)| std::cmp::Reverse((e.timestamp, *s)));
                    all.truncate(limit);
                    let mut answer = status_answer(Status::Ok);
                    if all.len() == limit {
                        if let Some((s, e)) = all.last() {
                            answer.next_before_ts = e.timestamp;
                            answer.next_before_shard = *s as u64;
                        }
                    }
                    answer.history = all.iter().map(|(s, e)| history_record(*s, e)).collect();
                    done(answer);
                }));
                for shard in shards {
                    let g = gather.clone();
                    let q = ShardQuery::History { account: key, limit, before };
                    let result = self.ask(
                        shard,
                        q,
                        Box::new(move |a| match a {
                            ShardAnswer::History(h) => g.add(shard as u16, Ok(h)),
                            _ => g.add(shard as u16, Err(Status::Unavailable)),
                        }),
                    );
                    if let Err(status) = result {
                        gather.add(shard as u16, Err(status));
                    }
                }
            }
            query_kind::LOOKUP | query_kind::TOPUP_STATUS => {
                let Some(owner) = self.directory.owner(key) else { return done(status_answer(Status::NotFound)) };
                let is_lookup = query.kind == query_kind::LOOKUP;
                let q = if is_lookup { ShardQuery::Lookup { id: key } } else { ShardQuery::TopUp { id: key } };
                let shards = self.shards;
                let queries = self.queries.clone();
                let done = Arc::new(Mutex::new(Some(done)));
                let finish = {
                    let done = done.clone();
                    move |answer: QueryAnswer| {
                        if let Some(d) = done.lock().take() {
                            d(answer)
                        }
                    }
                };
                let finish2 = finish.clone();
                let result = self.ask(
                    owner as usize,
                    q,
                    Box::new(move |a| match a {
                        ShardAnswer::Lookup(Some(record)) => {
                            let mut command = record.command.to_record();
                            command.timestamp.set(record.timestamp);
                            let reply = reply_record(&record.command, record.reply);
                            let base = QueryAnswer { reply, command: Some(command), ..QueryAnswer::default() };
                            // A settlement's record holds its total once its home shard logged it
                            // (`value2` = the shards it counts).
                            if !matches!(record.command, Command::Settle { .. })
                                || record.reply.status != Status::Ok
                                || shards == 1
                                || record.reply.value2 >= shards as i64
                            {
                                return finish(base);
                            }
                            // Else its total is the sum of its parts on every shard that still
                            // remembers one (`value2` counts them); if a shard cannot answer now,
                            // say busy rather than print a wrong total.
                            let gather = Arc::new(Gather::new(
                                shards as usize - 1,
                                move |parts: Vec<(u16, Option<Option<i64>>)>| {
                                    let mut base = base;
                                    match parts.iter().map(|p| p.1).collect::<Option<Vec<Option<i64>>>>() {
                                        Some(found) => {
                                            let found: Vec<i64> = found.into_iter().flatten().collect();
                                            let reply = &mut base.reply;
                                            reply.value.set(reply.value.get() + found.iter().sum::<i64>());
                                            reply.value2.set(reply.value2.get().max(1) + found.len() as i64);
                                        }
                                        None => base = status_answer(Status::Busy),
                                    }
                                    finish(base);
                                },
                            ));
                            for (s, tx) in queries.iter().enumerate() {
                                if s == owner as usize {
                                    continue;
                                }
                                let g = gather.clone();
                                let msg = QueryMsg {
                                    query: ShardQuery::Lookup { id: key },
                                    done: Box::new(move |a| {
                                        let v = match a {
                                            ShardAnswer::Lookup(Some(r)) => Some(r.reply.value),
                                            _ => None,
                                        };
                                        g.add(s as u16, Some(v));
                                    }),
                                };
                                // Never block a shard thread on another shard's queue.
                                if tx.try_send(msg).is_err() {
                                    gather.add(s as u16, None);
                                }
                            }
                        }
                        ShardAnswer::TopUp(Some(topup)) => {
                            let mut answer = status_answer(Status::Ok);
                            answer.reply.kind = kind::TOPUP_BEGIN;
                            answer.reply.value.set(topup.state as i64);
                            answer.reply.value2.set(topup.fen as i64);
                            finish(answer);
                        }
                        _ => finish(status_answer(Status::NotFound)),
                    }),
                );
                if let Err(status) = result {
                    finish2(status_answer(status));
                }
            }
            _ => done(status_answer(Status::InvalidKind)),
        }
    }

    /// Reads and waits (tests, tools).
    pub fn query_blocking(&self, query: QueryRecord) -> QueryAnswer {
        let (tx, rx) = bounded(1);
        self.query(
            query,
            Box::new(move |a| {
                let _ = tx.send(a);
            }),
        );
        rx.recv().expect("engine answers")
    }

    /// Every shard's summary (after all work queued before this call).
    pub fn audit(&self) -> Vec<AuditSummary> {
        let (tx, rx) = unbounded();
        for shard in 0..self.shards as usize {
            let tx = tx.clone();
            let q = QueryMsg {
                query: ShardQuery::Audit,
                done: Box::new(move |a| {
                    if let ShardAnswer::Audit(s) = a {
                        let _ = tx.send(s);
                    }
                }),
            };
            self.queries[shard].send(q).expect("shard alive");
        }
        drop(tx);
        let mut all: Vec<AuditSummary> = rx.iter().collect();
        all.sort_by_key(|s| s.shard);
        all
    }

    /// Stops the workers after they finish what is queued, and returns the shard states.
    ///
    /// Cross-shard work in flight (a settlement, a striped account's creation or freeze) is
    /// finished first, for at most `SHUTDOWN_CROSS_SHARD_WAIT`: its parts travel between
    /// shards, and a shard that stopped before its part arrived would leave the command
    /// unanswered (it is completed at the next start, from its home shard's log). Callers stop
    /// submitting first (the server stops reading and waits for its replies).
    pub fn shutdown(&self) -> Vec<ShardState> {
        let give_up = std::time::Instant::now() + SHUTDOWN_CROSS_SHARD_WAIT;
        while self.permits.load(Ordering::Acquire) < REPLICATION_IN_FLIGHT_MAX
            && std::time::Instant::now() < give_up
            && self.threads.lock().iter().all(|t| !t.is_finished())
        {
            std::thread::sleep(Duration::from_millis(1));
        }
        for tx in &self.internal {
            let _ = tx.send(Internal::Shutdown);
        }
        let threads = std::mem::take(&mut *self.threads.lock());
        threads.into_iter().map(|t| t.join().expect("shard worker panicked")).collect()
    }

    /// Transfer ids the directory knows (for tests and metrics).
    pub fn directory_len(&self) -> usize {
        self.directory.len()
    }

    /// The engine's metrics (see `shard::stats`).
    pub fn stats(&self) -> &EngineStats {
        &self.stats
    }

    /// Parts waiting in each shard's write queue, now (for metrics).
    pub fn queue_depths(&self) -> Vec<usize> {
        self.writes.iter().map(|tx| tx.len()).collect()
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        if !self.threads.lock().is_empty() {
            self.shutdown();
        }
    }
}

/// How long `Engine::shutdown` waits for cross-shard work in flight.
pub const SHUTDOWN_CROSS_SHARD_WAIT: Duration = Duration::from_secs(5);

/// Where `Engine::route` sends a command.
enum Route {
    Shard(u16),
    /// Claim the id for this (home) shard; if another shard owns it, go there instead.
    Claim(u64, u16),
    /// The shard that owns the id (a top-up's callback), looked up after the frame's claims.
    Owner(u64),
}

fn needs_permit(command: &Command) -> bool {
    match command {
        Command::CreateAccount { kind, .. } => kind.is_striped(),
        Command::Freeze { .. } | Command::Settle { .. } => true,
        _ => false,
    }
}

fn history_record(shard: u16, e: &HistoryEntry) -> HistoryRecord {
    let mut r = HistoryRecord { kind: e.kind, shard: shard as u8, ..HistoryRecord::default() };
    r.timestamp.set(e.timestamp);
    r.id.set(e.id);
    r.counterparty.set(e.counterparty);
    r.amount.set(e.amount);
    r.balance_after.set(e.balance_after);
    r.status.set(e.status);
    r.detail.set(e.detail);
    r
}

type GatherParts<T, F> = (Vec<(u16, T)>, Option<F>);

/// Gathers one answer from each of `n` shards, then calls `f` once.
struct Gather<T, F: FnOnce(Vec<(u16, T)>)> {
    parts: Mutex<GatherParts<T, F>>,
    n: usize,
}

impl<T, F: FnOnce(Vec<(u16, T)>)> Gather<T, F> {
    fn new(n: usize, f: F) -> Self {
        Gather { parts: Mutex::new((Vec::with_capacity(n), Some(f))), n }
    }
    fn add(&self, shard: u16, value: T) {
        let mut guard = self.parts.lock();
        guard.0.push((shard, value));
        if guard.0.len() == self.n {
            let parts = std::mem::take(&mut guard.0);
            let f = guard.1.take();
            drop(guard);
            if let Some(f) = f {
                f(parts);
            }
        }
    }
}

impl Backend for Engine {
    fn submit(&self, commands: Vec<CommandRecord>, done: ReplyCallback) {
        Engine::submit(self, commands, done)
    }

    fn balance(&self, account: u64) -> ReplyRecord {
        let mut reply = ReplyRecord::default();
        reply.id.set(account);
        match Engine::balance(self, account) {
            Some(balance) => reply.value.set(balance),
            None => reply.status.set(Status::NotFound.code()),
        }
        reply
    }

    fn query(&self, query: QueryRecord, done: AnswerCallback) {
        Engine::query(self, query, done)
    }

    fn is_admin_kind(&self, kind: u8) -> bool {
        kind::is_admin_kind(kind)
    }

    fn feed(&self) -> Option<Arc<crate::feed::Feed>> {
        Some(self.feed.clone())
    }
}

/// Creates (`on`) or removes the maintenance marker file, then syncs it and its directory.
fn write_marker(path: &std::path::Path, on: bool) -> Result<(), crate::error::StorageError> {
    use std::io::Write;
    let io = |what: &'static str| move |e| crate::storage::io_err(what, path, e);
    if on {
        let mut f = std::fs::File::create(path).map_err(io("create"))?;
        f.write_all(b"writes are paused (admin maintenance on); `admin maintenance off` resumes them\n")
            .map_err(io("write"))?;
        f.sync_all().map_err(io("fsync"))?;
    } else {
        match std::fs::remove_file(path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(crate::storage::io_err("remove", path, e)),
        }
    }
    crate::storage::sync_dir_path(path.parent().unwrap_or(std::path::Path::new(".")))
}

/// Whether the shards' replica streams fit together, so that a start can complete the messages
/// a crash cut off: no shard has applied more messages from a source than the source sent (the
/// source lost part of its log: a shard directory deleted or restored from an older copy), and
/// every message a shard has yet to apply is still in its source's outbox. `Err` names the pair.
pub fn check_replicas(states: &[&ShardState]) -> Result<(), String> {
    for source in states {
        for target in states {
            if source.shard() == target.shard() {
                continue;
            }
            let (sent, applied) = (source.replica_out(), target.replica_in(source.shard()));
            if applied > sent {
                return Err(format!(
                    "shard {} has applied {applied} replica messages from shard {}, which sent only {sent}: shard {} \
                     lost part of its state (a log or snapshot missing, or restored from an older copy)",
                    target.shard(),
                    source.shard(),
                    source.shard()
                ));
            }
            let kept = source.outbox_after(applied).len() as u64;
            if kept != sent - applied {
                return Err(format!(
                    "shard {} has yet to apply {} replica messages from shard {}, whose outbox keeps {kept} of them",
                    target.shard(),
                    sent - applied,
                    source.shard()
                ));
            }
        }
    }
    Ok(())
}
