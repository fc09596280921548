//! Setup, storm, in-doubt resolution, verification and the report.

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde_json::{json, Value};
use stormledger::cli::serve::FileConfig;
use stormledger::client::retry::unix_nanos;
use stormledger::client::{ClientError, TlsClientConfig};
use stormledger::config::LedgerConfig;
use stormledger::engine::EngineConfig;
use stormledger::layout::{CommandRecord, ReplyRecord};
use stormledger::ledger::command::SYSTEM_PLATFORM;
use stormledger::ledger::{Command, Status};
use stormledger::node::{Durability, Node, NodeConfig};
use stormledger::workload::{SplitMix64, StormSpec, TipGen, STREAMER_BASE, TIP_BASE, UNION_ID};

use super::args::Args;
use super::link::{Link, Target};
use super::model::{Model, Tally};
use super::probe::ProbeReport;
use super::record::Recorder;
use super::spawn;

/// Commands per setup submission.
const SETUP_CHUNK: usize = 2048;
/// Keys per balance-read submission during baseline and verification.
const READ_CHUNK: usize = 4096;
/// Commands per in-doubt resolution submission.
const RESOLVE_CHUNK: usize = 512;
/// How long `submit_final` keeps retrying one submission (connection loss, busy).
const FINAL_RETRY_FOR: Duration = Duration::from_secs(60);
/// Open loop: most batches in flight at once (memory bound; latency still counts from the
/// intended send time when this limit delays a send).
const OPEN_LOOP_IN_FLIGHT_MAX: usize = 100_000;
/// `--count` alone: still never run longer than this.
const COUNT_ONLY_TIME_LIMIT: Duration = Duration::from_secs(3600);

/// A failure that ends the run: exit status and message.
struct Fatal(i32, String);

fn fatal_client(what: &str, e: ClientError) -> Fatal {
    match e {
        // A usage error, as the CLI reports it: the flags chose plaintext to another host.
        ClientError::PlaintextToRemote(_) => {
            Fatal(2, format!("{what}: {e}: pass --tls-ca FILE, or --allow-remote-plaintext on a trusted network"))
        }
        _ => Fatal(3, format!("{what}: {e}")),
    }
}

pub fn main(args: Args) -> i32 {
    if let Err(e) = args.validate() {
        eprintln!("stormledger-storm: {e}");
        if args.json {
            // As clap's usage errors (`stormledger::cli::report_usage_error`).
            println!("{}", json!({"status": "usage_error", "error": e.to_string()}));
        }
        return 2;
    }
    let json = args.json;
    match run(args) {
        Ok(code) => code,
        Err(Fatal(code, message)) => {
            eprintln!("stormledger-storm: {message}");
            if json {
                // The last line is still one JSON object: a run that ended early verified nothing.
                let status = if code == 2 { "usage_error" } else { "error" };
                println!("{}", json!({"status": status, "exit": code, "error": message, "verified": false}));
            }
            code
        }
    }
}

fn durability_name(d: Durability) -> &'static str {
    match d {
        Durability::Sync => "sync",
        Durability::Buffered => "buffered",
        Durability::InMemory => "memory",
    }
}

/// Everything the storm tasks share.
struct Shared {
    model: Model,
    counters: Counters,
    hists: Mutex<Hists>,
    recorder: Option<Recorder>,
    /// Writes still in doubt when the storm ends (their immediate retries ran out of time),
    /// with the time each was first sent.
    in_doubt: Mutex<Vec<(Command, u64)>>,
    last_error: Mutex<Option<String>>,
    gen: Mutex<TipGen>,
    read_percent: u32,
    batch: usize,
    count: Option<u64>,
    /// Set when the storm's time is up (or `--count` writes were generated).
    stop: AtomicBool,
    /// The storm's balance reads go over a connection of their own, as a live-stream backend
    /// would read (a read must not queue behind write frames waiting for their log sync).
    reader: Link,
}

#[derive(Default)]
struct Counters {
    tips_ok: AtomicU64,
    tips_rejected: AtomicU64,
    tips_insufficient: AtomicU64,
    gifts_ok: AtomicU64,
    gifts_rejected: AtomicU64,
    /// Writes answered with a retryable status (busy, maintenance, unavailable): counted as not
    /// applied, which holds for tips and gifts while the server runs (the storm never restarts it).
    refused: AtomicU64,
    reads_ok: AtomicU64,
    reads_failed: AtomicU64,
    in_doubt: AtomicU64,
    resolved: AtomicU64,
    unresolved: AtomicU64,
    /// Of `unresolved`: retries refused `id_expired` (the server had forgotten their ids).
    expired: AtomicU64,
    /// Replies flagged as duplicates to commands sent for the first time (id collision).
    unexpected_duplicates: AtomicU64,
    /// Ok replies whose value2 is not the coins the model expected.
    value_mismatches: AtomicU64,
    reconnects: Arc<AtomicU64>,
    by_status: Vec<AtomicU64>,
}

struct Hists {
    write: Histogram<u64>,
    read: Histogram<u64>,
}

impl Hists {
    fn new() -> Hists {
        let h = || Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("histogram bounds");
        Hists { write: h(), read: h() }
    }
}

/// `Counters` of one batch, before they are published.
#[derive(Default)]
struct LocalCounts {
    unexpected_duplicates: u64,
    value_mismatches: u64,
    tips_ok: u64,
    gifts_ok: u64,
    refused: u64,
    tips_rejected: u64,
    gifts_rejected: u64,
    tips_insufficient: u64,
}

struct Batch {
    writes: Vec<Command>,
    reads: Vec<u64>,
}

impl Shared {
    fn stopped(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }

    fn next_batch(&self) -> Option<Batch> {
        if self.stopped() {
            return None;
        }
        let mut gen = self.gen.lock().expect("gen lock");
        let mut batch = Batch { writes: Vec::with_capacity(self.batch), reads: Vec::new() };
        for _ in 0..self.batch {
            if self.read_percent > 0 && gen.below(100) < self.read_percent as u64 {
                batch.reads.push(gen.read_key());
                continue;
            }
            if self.count.is_some_and(|c| gen.generated() >= c) {
                self.stop.store(true, Ordering::Relaxed);
                break;
            }
            batch.writes.push(gen.next_write());
        }
        if batch.writes.is_empty() && batch.reads.is_empty() {
            return None;
        }
        Some(batch)
    }

    /// Applies replies to storm writes (`resolving`: replies to retries of in-doubt commands).
    fn apply(&self, writes: &[Command], replies: &[ReplyRecord], resolving: bool) {
        if let Some(r) = &self.recorder {
            r.acks(writes, replies);
        }
        // Counted locally and published once per batch: the counters are shared by every
        // connection's task, and one atomic add per reply would keep their cache lines moving
        // between the cores the server needs.
        let mut by_status = [0u64; 64];
        let mut n = LocalCounts::default();
        let mut tally = Tally::default();
        for (command, reply) in writes.iter().zip(replies) {
            let code = reply.status.get();
            let status = Status::from_code(code);
            by_status[(code as usize).min(63)] += 1;
            if reply.flags & 1 != 0 && !resolving {
                n.unexpected_duplicates += 1;
            }
            let is_tip = matches!(command, Command::Tip { .. });
            let Some(spend) = self.model.spend(command) else { continue };
            match status {
                Some(Status::Ok) => {
                    self.model.add(&mut tally, spend);
                    if reply.value2.get() != spend.coins as i64 {
                        n.value_mismatches += 1;
                    }
                    *if is_tip { &mut n.tips_ok } else { &mut n.gifts_ok } += 1;
                }
                // Not applied, and not for a business reason: the write waited longer than the
                // shard's idempotency window lasts (a window far smaller than the writes in
                // flight). Counted with the refusals, out of tips_per_sec.
                Some(s) if s.is_retryable() || s == Status::IdExpired => n.refused += 1,
                s => {
                    *if is_tip { &mut n.tips_rejected } else { &mut n.gifts_rejected } += 1;
                    if is_tip && s == Some(Status::InsufficientFunds) {
                        n.tips_insufficient += 1;
                    }
                }
            }
        }
        self.model.flush(tally);
        let c = &self.counters;
        for (code, &count) in by_status.iter().enumerate().filter(|(_, &count)| count > 0) {
            c.by_status[code].fetch_add(count, Ordering::Relaxed);
        }
        for (counter, value) in [
            (&c.unexpected_duplicates, n.unexpected_duplicates),
            (&c.value_mismatches, n.value_mismatches),
            (&c.tips_ok, n.tips_ok),
            (&c.gifts_ok, n.gifts_ok),
            (&c.refused, n.refused),
            (&c.tips_rejected, n.tips_rejected),
            (&c.gifts_rejected, n.gifts_rejected),
            (&c.tips_insufficient, n.tips_insufficient),
        ] {
            if value > 0 {
                counter.fetch_add(value, Ordering::Relaxed);
            }
        }
    }

    /// Sends writes in doubt again (same ids, same first-send times) until every one has a final
    /// answer or `deadline` passes, and accounts for the answers. A write refused `id_expired`
    /// stays unresolved: the server forgot its id, so whether it was applied is unknown. False
    /// if the answers did not all come before the deadline (the writes are then still in doubt).
    async fn resolve(&self, link: &Link, writes: &[Command], sent_at: &[u64], deadline: Instant) -> bool {
        if let Some(r) = &self.recorder {
            r.sent(writes, |g| self.model.gift_price(g));
        }
        match submit_final(link, writes, sent_at, deadline, |_, _| {}).await {
            Ok(replies) => {
                let expired = |r: &ReplyRecord| Status::from_code(r.status.get()) == Some(Status::IdExpired);
                type Answered = Vec<(Command, ReplyRecord)>;
                let (answered, replies): (Answered, Answered) =
                    writes.iter().copied().zip(replies).partition(|(_, r)| !expired(r));
                if let (Some(r), false) = (&self.recorder, replies.is_empty()) {
                    let (commands, expired): (Vec<Command>, Vec<ReplyRecord>) = replies.into_iter().unzip();
                    r.acks(&commands, &expired);
                }
                let (answered, replies): (Vec<Command>, Vec<ReplyRecord>) = answered.into_iter().unzip();
                self.apply(&answered, &replies, true);
                let c = &self.counters;
                c.resolved.fetch_add(answered.len() as u64, Ordering::Relaxed);
                c.unresolved.fetch_add((writes.len() - answered.len()) as u64, Ordering::Relaxed);
                c.expired.fetch_add((writes.len() - answered.len()) as u64, Ordering::Relaxed);
                true
            }
            Err(e) => {
                self.note_error(&e);
                false
            }
        }
    }

    fn note_error(&self, e: &ClientError) {
        let mut last = self.last_error.lock().expect("lock");
        if last.is_none() {
            *last = Some(e.to_string());
        }
    }

    /// Sends one batch and accounts for it; latency counts from `intended`.
    async fn run_batch(&self, link: &Link, batch: Batch, intended: Instant) {
        let Batch { writes, reads } = batch;
        // Every write says when it was first sent, and keeps saying it on every retry: a retry
        // the server no longer remembers is then refused `id_expired`, never applied twice
        // (docs/protocol.md, "Retrying safely").
        let sent_at = unix_nanos();
        let records: Vec<_> = writes.iter().map(|c| stamped(c, sent_at)).collect();
        if let Some(r) = &self.recorder {
            r.sent(&writes, |g| self.model.gift_price(g));
        }
        let w = async {
            if records.is_empty() {
                return None;
            }
            let result = link.submit(records).await;
            Some((result, Instant::now()))
        };
        let r = async {
            if reads.is_empty() {
                return None;
            }
            let result = self.reader.balances(&reads).await;
            Some((result, Instant::now()))
        };
        let (w, r) = tokio::join!(w, r);
        let micros = |t: Instant| t.saturating_duration_since(intended).as_micros() as u64;
        if let Some((result, at)) = w {
            match result {
                Ok(replies) if replies.len() == writes.len() => {
                    self.apply(&writes, &replies, false);
                    let mut h = self.hists.lock().expect("hists");
                    h.write.saturating_record_n(micros(at).max(1), writes.len() as u64);
                }
                other => {
                    if let Err(e) = &other {
                        self.note_error(e);
                    }
                    // The outcome is unknown: send the same writes again now, while the server
                    // still remembers their ids (a crashed server is back within seconds; its
                    // window may hold only seconds of a storm). Not timed: the latency would be
                    // the outage's.
                    self.counters.in_doubt.fetch_add(writes.len() as u64, Ordering::Relaxed);
                    let stamps = vec![sent_at; writes.len()];
                    if !self.resolve(link, &writes, &stamps, Instant::now() + FINAL_RETRY_FOR).await {
                        self.in_doubt.lock().expect("lock").extend(writes.into_iter().zip(stamps));
                    }
                }
            }
        }
        if let Some((result, at)) = r {
            match result {
                Ok(_) => {
                    self.counters.reads_ok.fetch_add(reads.len() as u64, Ordering::Relaxed);
                    let mut h = self.hists.lock().expect("hists");
                    h.read.saturating_record_n(micros(at).max(1), reads.len() as u64);
                }
                Err(e) => {
                    self.note_error(&e);
                    self.counters.reads_failed.fetch_add(reads.len() as u64, Ordering::Relaxed);
                }
            }
        }
    }
}

/// `command`'s record, saying it was first sent at `sent_at`.
fn stamped(command: &Command, sent_at: u64) -> CommandRecord {
    let mut record = command.to_record();
    record.timestamp.set(sent_at);
    record
}

/// Submits `commands` until every one has a final (non-retryable) reply, resubmitting the same
/// ids, each with its first-send time from `sent_at`, after connection loss or `busy`. Replies in
/// order.
///
/// `on_final` is called once per submission with the commands that got their final reply in it
/// and those replies, as they arrive: on `Err`, the replies it was given are the ones known.
async fn submit_final(
    link: &Link,
    commands: &[Command],
    sent_at: &[u64],
    deadline: Instant,
    mut on_final: impl FnMut(&[Command], &[ReplyRecord]),
) -> Result<Vec<ReplyRecord>, ClientError> {
    let mut replies: Vec<Option<ReplyRecord>> = vec![None; commands.len()];
    let mut backoff = Duration::from_millis(5);
    loop {
        let pending: Vec<usize> = (0..commands.len()).filter(|&i| replies[i].is_none()).collect();
        if pending.is_empty() {
            return Ok(replies.into_iter().map(|r| r.expect("filled")).collect());
        }
        let records = pending.iter().map(|&i| stamped(&commands[i], sent_at[i])).collect();
        match link.submit(records).await {
            Ok(got) if got.len() == pending.len() => {
                let (mut done, mut done_replies) = (Vec::new(), Vec::new());
                for (&i, reply) in pending.iter().zip(got) {
                    let retry = Status::from_code(reply.status.get()).is_some_and(Status::is_retryable);
                    if !retry {
                        replies[i] = Some(reply);
                        done.push(commands[i]);
                        done_replies.push(reply);
                    }
                }
                if !done.is_empty() {
                    on_final(&done, &done_replies);
                }
            }
            Ok(_) => {}
            Err(e @ ClientError::Auth(_)) => return Err(e),
            Err(e) if Instant::now() > deadline => return Err(e),
            Err(_) => {}
        }
        if replies.iter().any(Option::is_none) {
            if Instant::now() > deadline {
                return Err(ClientError::Closed);
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_millis(200));
        }
    }
}

/// Reads the balances of `keys` (None = not_found), spreading chunks over `links`.
async fn read_balances(links: &[Arc<Link>], keys: &[u64]) -> Result<Vec<Option<i64>>, ClientError> {
    let chunks: Vec<Vec<u64>> = keys.chunks(READ_CHUNK).map(<[u64]>::to_vec).collect();
    let queue = Arc::new(Mutex::new(chunks.into_iter().enumerate().collect::<Vec<_>>()));
    let mut tasks = tokio::task::JoinSet::new();
    for link in links {
        let (link, queue) = (link.clone(), queue.clone());
        tasks.spawn(async move {
            let mut out = Vec::new();
            loop {
                let Some((i, chunk)) = queue.lock().expect("lock").pop() else { return Ok(out) };
                let deadline = Instant::now() + FINAL_RETRY_FOR;
                let replies = loop {
                    match link.balances(&chunk).await {
                        Ok(r) if r.len() == chunk.len() => break r,
                        Err(e @ ClientError::Auth(_)) => return Err(e),
                        Err(e) if Instant::now() > deadline => return Err(e),
                        _ => tokio::time::sleep(Duration::from_millis(20)).await,
                    }
                };
                let values = replies
                    .iter()
                    .map(|r| (Status::from_code(r.status.get()) == Some(Status::Ok)).then(|| r.value.get()))
                    .collect::<Vec<_>>();
                out.push((i, values));
            }
        });
    }
    let mut parts = Vec::new();
    while let Some(joined) = tasks.join_next().await {
        parts.extend(joined.expect("read task")?);
    }
    parts.sort_by_key(|p| p.0);
    Ok(parts.into_iter().flat_map(|p| p.1).collect())
}

/// Runs the setup phases (each waited for) through the API. Returns whether every account was
/// created fresh by this run (no duplicate replies).
///
/// With `--record`, each task records a chunk's `sent` lines before submitting it and the `ack`
/// lines of its final replies as each submission's replies come back, as the storm does: a setup
/// cut short (a failed task, a killed server) leaves every acknowledged command in the record.
async fn setup(links: &[Arc<Link>], spec: &StormSpec, shared: &Arc<Shared>) -> Result<bool, Fatal> {
    let fresh = Arc::new(AtomicBool::new(true));
    let users = spec.users;
    for phase in spec.setup_phases() {
        let chunks: Vec<Vec<Command>> = phase.chunks(SETUP_CHUNK).map(<[Command]>::to_vec).collect();
        let queue = Arc::new(Mutex::new(chunks));
        let mut tasks = tokio::task::JoinSet::new();
        for link in links {
            let (link, queue, fresh, shared) = (link.clone(), queue.clone(), fresh.clone(), shared.clone());
            tasks.spawn(async move {
                loop {
                    let Some(chunk) = queue.lock().expect("lock").pop() else { return Ok(()) };
                    let recorder = shared.recorder.as_ref();
                    if let Some(r) = recorder {
                        r.sent(&chunk, |g| shared.model.gift_price(g));
                    }
                    let record_acks = |done: &[Command], replies: &[ReplyRecord]| {
                        if let Some(r) = recorder {
                            r.acks(done, replies);
                        }
                    };
                    let deadline = Instant::now() + FINAL_RETRY_FOR;
                    let sent_at = vec![unix_nanos(); chunk.len()];
                    let replies = submit_final(&link, &chunk, &sent_at, deadline, record_acks)
                        .await
                        .map_err(|e| fatal_client("setup", e))?;
                    for (command, reply) in chunk.iter().zip(&replies) {
                        let status = Status::from_code(reply.status.get());
                        if status != Some(Status::Ok) {
                            let name = status.map_or("unknown", Status::name);
                            let hint = match (command, status) {
                                (Command::CreateAccount { .. }, Some(Status::ExistsWithDifferentFields)) => format!(
                                    " (the storm's accounts are users 1..={users}, streamers {STREAMER_BASE}.. and union \
                                     {UNION_ID}; this server holds another account under one of those ids: run on a \
                                     fresh data directory, or use --spawn)"
                                ),
                                _ => String::new(),
                            };
                            return Err(Fatal(1, format!("setup: {command:?} answered {name}{hint}")));
                        }
                        if matches!(command, Command::CreateAccount { .. }) && reply.flags & 1 != 0 {
                            fresh.store(false, Ordering::Relaxed);
                        }
                    }
                }
            });
        }
        while let Some(joined) = tasks.join_next().await {
            joined.expect("setup task")?;
        }
    }
    Ok(fresh.load(Ordering::Relaxed))
}

/// Every account the storm can touch, in a fixed order: users, streamers, union, platform.
fn tracked_accounts(spec: &StormSpec) -> Vec<u64> {
    let mut keys: Vec<u64> = (1..=spec.users).collect();
    keys.extend((0..spec.streamers).map(|i| STREAMER_BASE + i));
    keys.push(UNION_ID);
    keys.push(SYSTEM_PLATFORM);
    keys
}

fn default_id_base() -> u64 {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
    let mut rng = SplitMix64(nanos ^ ((std::process::id() as u64) << 40));
    // 2^24 bases, 2^36 ids each: far below the reserved id range (2^62).
    TIP_BASE + (rng.below(1 << 24) << 36)
}

struct Outcome {
    storm_secs: f64,
    setup_secs: f64,
    verify_secs: f64,
    accounts_checked: u64,
    mismatches: u64,
    setup_mismatches: u64,
    platform_checked: bool,
    fresh: bool,
    failure: Option<String>,
    probe: Option<ProbeReport>,
}

/// The business rules the balances are checked against, and where they came from (see
/// `Args::config`). A usage error if a file named cannot be read or holds invalid rules.
fn ledger_rules(args: &Args) -> Result<(LedgerConfig, String), Fatal> {
    let from_file = match &args.config {
        Some(path) => {
            let file = FileConfig::load(path).map_err(|e| Fatal(2, format!("--config: {e}")))?;
            let ledger = file.ledger.unwrap_or_default();
            ledger.validate().map_err(|e| Fatal(2, format!("--config {} [ledger]: {e}", path.display())))?;
            Some((ledger, path.display().to_string()))
        }
        None => None,
    };
    if args.connect.is_some() {
        // The rules the server stored on its first start are the ones it runs with.
        let stored = stormledger::node::read_data_dir(&args.data_dir)
            .map_err(|e| Fatal(2, format!("--data-dir {}: {e}", args.data_dir.display())))?;
        if let Some((_, ledger)) = stored {
            let source = args.data_dir.join("ledger.json").display().to_string();
            if from_file.as_ref().is_some_and(|(l, _)| *l != ledger) {
                eprintln!(
                    "stormledger-storm: note: using the rules in {source}, which the server stored; --config's differ"
                );
            }
            return Ok((ledger, source));
        }
    }
    Ok(from_file.unwrap_or_else(|| (LedgerConfig::default(), "built-in".to_string())))
}

fn run(args: Args) -> Result<i32, Fatal> {
    let (ledger, rules) = ledger_rules(&args)?;
    let spec = StormSpec {
        users: args.users,
        streamers: args.streamers,
        hot_percent: args.hot_percent,
        topup_yuan: args.topup_yuan,
        tip_coins_max: args.tip_max,
        seed: args.seed,
        poor_percent: args.poor_percent,
        poor_topup_yuan: args.poor_yuan,
        gift_percent: args.gift_percent,
        id_base: args.id_base.unwrap_or_else(default_id_base),
    };
    let recorder = match &args.record {
        Some(path) => {
            Some(Recorder::create(path).map_err(|e| Fatal(2, format!("cannot create {}: {e}", path.display())))?)
        }
        None => None,
    };

    // The target.
    let mut node = None;
    let mut spawned = None;
    let mut engine_dir = None;
    let (mode, durability, target) = if args.engine {
        let durability = args.durability.unwrap_or_default();
        let dir = tempfile::Builder::new()
            .prefix("stormledger-storm-")
            .tempdir()
            .map_err(|e| Fatal(3, format!("cannot create a temporary data directory: {e}")))?;
        let mut engine = EngineConfig { ledger: ledger.clone(), ..EngineConfig::default() };
        if let Some(n) = args.shards {
            engine.shards = n;
        }
        let n = Node::open(NodeConfig { engine, durability, ..NodeConfig::new(dir.path().join("data")) })
            .map_err(|e| Fatal(3, format!("cannot open the engine: {e}")))?;
        let target = Target::Engine(n.engine().clone());
        node = Some(n);
        engine_dir = Some(dir);
        ("engine", durability_name(durability).to_string(), target)
    } else if args.spawn {
        let bin = spawn::server_binary(args.server_bin.clone()).map_err(|e| Fatal(3, e))?;
        let custom = (ledger != LedgerConfig::default()).then_some(&ledger);
        let s = spawn::spawn(bin, args.durability, args.shards, custom).map_err(|e| Fatal(3, e))?;
        let target =
            Target::Tcp { addr: s.addr.clone(), token: s.token.clone(), tls: None, allow_remote_plaintext: false };
        spawned = Some(s);
        let d = args.durability.map_or("server-default".to_string(), |d| durability_name(d).to_string());
        ("spawn", d, target)
    } else {
        let addr = args.connect.clone().expect("validated");
        let token = match args.token.clone() {
            Some(token) => token,
            None => {
                let file = args.data_dir.join(stormledger::cli::token::CLIENT_TOKEN_FILE);
                match stormledger::cli::token::read(&file) {
                    Ok(Some(token)) => token,
                    Ok(None) => {
                        return Err(Fatal(
                            2,
                            format!(
                                "--connect needs --token, STORMLEDGER_TOKEN, or the server's {} (--data-dir)",
                                file.display()
                            ),
                        ))
                    }
                    Err(e) => return Err(Fatal(2, e)),
                }
            }
        };
        let tls = match &args.tls_ca {
            Some(ca) => {
                let name =
                    args.tls_server_name.as_deref().unwrap_or_else(|| stormledger::tls::default_server_name(&addr));
                Some(TlsClientConfig::from_ca_file(ca, name).map_err(|e| Fatal(2, format!("--tls-ca: {e}")))?)
            }
            None => None,
        };
        let allow_remote_plaintext = args.allow_remote_plaintext;
        ("connect", "server".to_string(), Target::Tcp { addr, token, tls, allow_remote_plaintext })
    };

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("storm")
        .build()
        .map_err(|e| Fatal(3, format!("cannot start the async runtime: {e}")))?;
    let reconnects = Arc::new(AtomicU64::new(0));
    let links: Vec<Arc<Link>> =
        (0..args.connections).map(|_| Arc::new(Link::new(target.clone(), reconnects.clone()))).collect();
    let shared = Arc::new(Shared {
        model: Model::new(&ledger, spec.users, spec.streamers),
        counters: Counters {
            reconnects: reconnects.clone(),
            by_status: (0..64).map(|_| AtomicU64::new(0)).collect(),
            ..Counters::default()
        },
        hists: Mutex::new(Hists::new()),
        recorder,
        in_doubt: Mutex::new(Vec::new()),
        last_error: Mutex::new(None),
        gen: Mutex::new(spec.tips()),
        read_percent: args.read_percent,
        batch: args.batch,
        count: args.count,
        stop: AtomicBool::new(false),
        reader: Link::new(target.clone(), reconnects.clone()),
    });

    let result = runtime.block_on(drive(&args, &spec, &links, shared.clone()));
    drop(links);
    drop(target);
    runtime.shutdown_timeout(Duration::from_secs(5));

    // Stop the target.
    let mut stop_note = None;
    if let Some(s) = spawned {
        match s.stop() {
            Ok(status) if status.success() => {}
            Ok(status) => stop_note = Some(format!("server exited with {status} after SIGTERM")),
            Err(e) => stop_note = Some(e),
        }
    }
    if let Some(n) = node {
        n.shutdown();
    }
    drop(engine_dir);
    let shared = Arc::try_unwrap(shared).map_err(|_| Fatal(1, "storm tasks still running".into()))?;
    if let Some(r) = shared.recorder {
        r.finish().map_err(|e| Fatal(1, format!("writing the record: {e}")))?;
    }
    let mut outcome = result?;
    if let Some(note) = &stop_note {
        eprintln!("stormledger-storm: {note}");
    }
    let c = &shared.counters;
    let hists = shared.hists.into_inner().expect("hists");
    let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
    let unresolved = load(&c.unresolved);
    let mut failures = Vec::new();
    if let Some(f) = outcome.failure.take() {
        failures.push(f);
    }
    if outcome.mismatches > 0 {
        failures.push(format!("{} balances differ from the model", outcome.mismatches));
    }
    if outcome.setup_mismatches > 0 {
        failures.push(format!("{} balances after setup differ from the top-ups", outcome.setup_mismatches));
    }
    if unresolved > 0 {
        let expired = load(&c.expired);
        failures.push(format!(
            "{unresolved} in-doubt commands could not be resolved ({expired} of them refused id_expired: the \
             server had forgotten their ids, so whether they were applied is unknown)"
        ));
    }
    // `--spawn`: a server that does not drain and exit 0 on SIGTERM broke its contract.
    if let Some(note) = stop_note {
        failures.push(note);
    }
    if load(&c.unexpected_duplicates) > 0 {
        failures.push(format!(
            "{} replies were duplicates of earlier commands (id collision)",
            load(&c.unexpected_duplicates)
        ));
    }
    if load(&c.value_mismatches) > 0 {
        failures.push(format!("{} ok replies carried a different coin amount", load(&c.value_mismatches)));
    }
    let verified = failures.is_empty();
    let tips = load(&c.tips_ok) + load(&c.tips_rejected);
    let writes = tips + load(&c.gifts_ok) + load(&c.gifts_rejected);
    let secs = outcome.storm_secs.max(1e-9);
    let pct = |h: &Histogram<u64>, q: f64| if h.is_empty() { 0 } else { h.value_at_quantile(q) };
    let probe_us = |q: f64| {
        outcome.probe.as_ref().filter(|p| !p.latency_ns.is_empty()).map(|p| {
            let ns = if q >= 1.0 { p.latency_ns.max() } else { p.latency_ns.value_at_quantile(q) };
            (ns as f64 / 10.0).round() / 100.0
        })
    };
    let probe_error = outcome.probe.as_ref().and_then(|p| p.error.clone());
    if let Some(e) = &probe_error {
        eprintln!("stormledger-storm: {e}");
    }
    let rejections: BTreeMap<&str, u64> = c
        .by_status
        .iter()
        .enumerate()
        .filter(|(code, n)| *code != 0 && load(n) > 0)
        .map(|(code, n)| (Status::from_code(code as u16).map_or("unknown", Status::name), load(n)))
        .collect();
    let report = json!({
        "mode": mode,
        "tls": args.tls_ca.is_some(),
        "durability": durability,
        "ledger_rules": rules,
        "connections": args.connections,
        "batch": args.batch,
        "window": if args.rate.is_some() { Value::Null } else { json!(args.window) },
        "loop": if args.rate.is_some() { "open" } else { "closed" },
        "rate": args.rate,
        "users": spec.users,
        "streamers": spec.streamers,
        "hot_percent": spec.hot_percent,
        "read_percent": args.read_percent,
        "gift_percent": args.gift_percent,
        "poor_percent": args.poor_percent,
        "seed": spec.seed,
        "id_base": spec.id_base,
        "duration": (outcome.storm_secs * 1000.0).round() / 1000.0,
        "setup_secs": (outcome.setup_secs * 1000.0).round() / 1000.0,
        "verify_secs": (outcome.verify_secs * 1000.0).round() / 1000.0,
        "tips_acked": load(&c.tips_ok),
        "tips_rejected": load(&c.tips_rejected),
        "tips_insufficient_funds": load(&c.tips_insufficient),
        "gifts_acked": load(&c.gifts_ok),
        "gifts_rejected": load(&c.gifts_rejected),
        "writes_refused_retryable": load(&c.refused),
        "tips_per_sec": (tips as f64 / secs).round(),
        "writes_per_sec": (writes as f64 / secs).round(),
        "reads": load(&c.reads_ok),
        "reads_failed": load(&c.reads_failed),
        "reads_per_sec": (load(&c.reads_ok) as f64 / secs).round(),
        "write_p50_us": pct(&hists.write, 0.5),
        "write_p90_us": pct(&hists.write, 0.9),
        "write_p99_us": pct(&hists.write, 0.99),
        "write_p999_us": pct(&hists.write, 0.999),
        "write_max_us": hists.write.max(),
        "read_p50_us": pct(&hists.read, 0.5),
        "read_p99_us": pct(&hists.read, 0.99),
        "read_p999_us": pct(&hists.read, 0.999),
        "read_max_us": hists.read.max(),
        "probe_reads": outcome.probe.as_ref().map_or(0, |p| p.latency_ns.len()),
        "probe_reads_failed": outcome.probe.as_ref().map_or(0, |p| p.failed),
        "probe_read_p50_us": probe_us(0.5),
        "probe_read_p99_us": probe_us(0.99),
        "probe_read_p999_us": probe_us(0.999),
        "probe_read_max_us": probe_us(1.0),
        "probe_error": probe_error,
        "rejections": rejections,
        "in_doubt": load(&c.in_doubt),
        "in_doubt_resolved": load(&c.resolved),
        "in_doubt_unresolved": unresolved,
        "in_doubt_id_expired": load(&c.expired),
        "reconnects": load(&c.reconnects),
        "fresh_setup": outcome.fresh,
        "accounts_checked": outcome.accounts_checked,
        "balance_mismatches": outcome.mismatches,
        "platform_checked": outcome.platform_checked,
        "last_error": shared.last_error.into_inner().expect("lock"),
        "failures": failures,
        "verified": verified,
    });
    if args.json {
        println!("{report}");
    } else {
        print_table(&report);
    }
    Ok(if verified { 0 } else { 1 })
}

fn print_table(r: &Value) {
    let rows: &[(&str, &str)] = &[
        ("mode", "mode"),
        ("tls", "tls"),
        ("durability", "durability"),
        ("loop", "loop"),
        ("connections", "connections"),
        ("batch", "batch"),
        ("users", "users"),
        ("streamers", "streamers"),
        ("hot_percent", "hot %"),
        ("duration", "storm seconds"),
        ("tips_acked", "tips ok"),
        ("tips_rejected", "tips rejected"),
        ("tips_insufficient_funds", "  of which insufficient_funds"),
        ("gifts_acked", "gifts ok"),
        ("gifts_rejected", "gifts rejected"),
        ("writes_refused_retryable", "writes refused (busy, id_expired)"),
        ("tips_per_sec", "tips/s"),
        ("writes_per_sec", "writes/s"),
        ("write_p50_us", "write p50 us"),
        ("write_p99_us", "write p99 us"),
        ("write_p999_us", "write p99.9 us"),
        ("write_max_us", "write max us"),
        ("reads", "reads"),
        ("read_p50_us", "read p50 us"),
        ("read_p99_us", "read p99 us"),
        ("probe_reads", "probe reads (1 per round trip)"),
        ("probe_read_p50_us", "probe read p50 us"),
        ("probe_read_p99_us", "probe read p99 us"),
        ("probe_read_p999_us", "probe read p99.9 us"),
        ("in_doubt", "in doubt"),
        ("in_doubt_resolved", "in doubt resolved"),
        ("reconnects", "reconnects"),
        ("accounts_checked", "balances checked"),
        ("balance_mismatches", "balance mismatches"),
        ("rejections", "statuses"),
        ("verified", "verified"),
    ];
    for (key, label) in rows {
        println!("{label:<30} {}", r[*key]);
    }
    if let Some(f) = r["failures"].as_array().filter(|f| !f.is_empty()) {
        for failure in f {
            println!("FAILED: {}", failure.as_str().unwrap_or_default());
        }
    }
}

async fn drive(args: &Args, spec: &StormSpec, links: &[Arc<Link>], shared: Arc<Shared>) -> Result<Outcome, Fatal> {
    for link in links {
        link.warm_up().await.map_err(|e| fatal_client("cannot connect", e))?;
    }
    let t0 = Instant::now();
    let fresh = setup(links, spec, &shared).await?;
    let keys = tracked_accounts(spec);
    let baseline = read_balances(links, &keys).await.map_err(|e| fatal_client("reading balances", e))?;
    let setup_secs = t0.elapsed().as_secs_f64();
    let mut setup_mismatches = 0;
    let mut failure = None;
    // Every account must exist after setup (the platform account may not be readable remotely).
    let missing = baseline[..keys.len() - 1].iter().filter(|b| b.is_none()).count();
    if missing > 0 {
        failure = Some(format!("{missing} storm accounts not found after setup"));
    }
    if fresh {
        for (i, &key) in keys[..keys.len() - 2].iter().enumerate() {
            let expected =
                if key <= spec.users { (spec.topup_yuan_of(key) * shared.model.coins_per_yuan) as i64 } else { 0 };
            if baseline[i].is_some_and(|b| b != expected) {
                setup_mismatches += 1;
            }
        }
    }

    // The storm.
    let duration = match (args.duration, args.count) {
        (Some(d), _) => Duration::from_secs_f64(d),
        (None, Some(_)) => COUNT_ONLY_TIME_LIMIT,
        (None, None) => Duration::from_secs(10),
    };
    let start = Instant::now();
    let deadline = start + duration;
    let progress = progress_bar(args, duration);
    let ticker = {
        let (shared, progress) = (shared.clone(), progress.clone());
        tokio::spawn(async move {
            let mut last = (Instant::now(), 0u64);
            loop {
                tokio::time::sleep(Duration::from_millis(250)).await;
                let c = &shared.counters;
                let tips = c.tips_ok.load(Ordering::Relaxed) + c.tips_rejected.load(Ordering::Relaxed);
                let now = Instant::now();
                let rate = (tips - last.1) as f64 / now.duration_since(last.0).as_secs_f64();
                last = (now, tips);
                progress.set_position(start.elapsed().as_millis() as u64);
                progress.set_message(format!(
                    "{tips} tips, {rate:.0} tips/s, {} in doubt",
                    c.in_doubt.load(Ordering::Relaxed)
                ));
            }
        })
    };
    let probe = if args.probe_reads > 0.0 {
        let probe = super::probe::start(links[0].target().clone(), spec.users, args.probe_reads, spec.seed);
        Some(probe.map_err(|e| Fatal(3, format!("cannot start the read probe: {e}")))?)
    } else {
        None
    };
    let storm = run_storm(args, links, shared.clone(), deadline);
    storm.await;
    let storm_secs = start.elapsed().as_secs_f64();
    let probe = probe.map(super::probe::Probe::finish);
    ticker.abort();
    progress.finish_and_clear();

    // In-doubt commands: resubmit with the same ids; the reply is the original result.
    // One deadline for them all (per chunk, a server that died made this take hours), and once
    // a chunk could not be resolved, the rest are left unresolved too: the server is gone.
    let in_doubt = std::mem::take(&mut *shared.in_doubt.lock().expect("lock"));
    let t1 = Instant::now();
    let resolve_deadline = t1 + FINAL_RETRY_FOR;
    if !in_doubt.is_empty() {
        eprintln!(
            "stormledger-storm: resolving {} in-doubt commands (sent again with the same ids, for up to {} s)",
            in_doubt.len(),
            FINAL_RETRY_FOR.as_secs()
        );
    }
    let mut gave_up = false;
    for chunk in in_doubt.chunks(RESOLVE_CHUNK) {
        if gave_up {
            shared.counters.unresolved.fetch_add(chunk.len() as u64, Ordering::Relaxed);
            continue;
        }
        let (writes, sent_at): (Vec<Command>, Vec<u64>) = chunk.iter().copied().unzip();
        if !shared.resolve(&links[0], &writes, &sent_at, resolve_deadline).await {
            shared.counters.unresolved.fetch_add(chunk.len() as u64, Ordering::Relaxed);
            gave_up = true;
        }
    }
    if !in_doubt.is_empty() {
        let c = &shared.counters;
        eprintln!(
            "stormledger-storm: in doubt: {} resolved, {} unresolved",
            c.resolved.load(Ordering::Relaxed),
            c.unresolved.load(Ordering::Relaxed)
        );
    }

    // Verification.
    let after = read_balances(links, &keys).await.map_err(|e| fatal_client("reading balances", e))?;
    let model = &shared.model;
    let mut mismatches = 0u64;
    let mut shown = 0;
    let platform_checked = baseline[keys.len() - 1].is_some() && after[keys.len() - 1].is_some();
    for (i, &key) in keys.iter().enumerate() {
        let delta = if key <= spec.users {
            model.user_delta(key)
        } else if key == UNION_ID {
            model.union.load(Ordering::Relaxed)
        } else if key == SYSTEM_PLATFORM {
            if !platform_checked {
                continue;
            }
            model.platform.load(Ordering::Relaxed)
        } else {
            model.streamer_delta(key - STREAMER_BASE)
        };
        let expected = baseline[i].map(|b| b + delta);
        if after[i] != expected {
            mismatches += 1;
            if shown < 10 {
                shown += 1;
                eprintln!(
                    "stormledger-storm: account {key}: balance {:?}, expected {:?} (baseline {:?} + {delta})",
                    after[i], expected, baseline[i]
                );
            }
        }
    }
    Ok(Outcome {
        storm_secs,
        setup_secs,
        verify_secs: t1.elapsed().as_secs_f64(),
        accounts_checked: keys.len() as u64 - u64::from(!platform_checked),
        mismatches,
        setup_mismatches,
        platform_checked,
        fresh,
        failure,
        probe,
    })
}

fn progress_bar(args: &Args, duration: Duration) -> ProgressBar {
    if args.json || !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::with_draw_target(Some(duration.as_millis() as u64), ProgressDrawTarget::stderr());
    bar.set_style(
        ProgressStyle::with_template("{spinner} [{elapsed_precise}] {bar:30} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar
}

async fn run_storm(args: &Args, links: &[Arc<Link>], shared: Arc<Shared>, deadline: Instant) {
    let stopper = {
        let shared = shared.clone();
        tokio::spawn(async move {
            tokio::time::sleep_until(deadline.into()).await;
            shared.stop.store(true, Ordering::Relaxed);
        })
    };
    let mut tasks = tokio::task::JoinSet::new();
    match args.rate {
        None => {
            // Closed loop: `window` submitters per connection, each with one batch in flight.
            for link in links {
                for _ in 0..args.window {
                    let (link, shared) = (link.clone(), shared.clone());
                    tasks.spawn(async move {
                        while let Some(batch) = shared.next_batch() {
                            shared.run_batch(&link, batch, Instant::now()).await;
                        }
                    });
                }
            }
        }
        Some(rate) => {
            // Open loop: batch i is due at start + i * batch / rate, whatever is still in flight.
            let interval = Duration::from_secs_f64(args.batch as f64 / rate);
            let start = Instant::now();
            let limit = Arc::new(tokio::sync::Semaphore::new(OPEN_LOOP_IN_FLIGHT_MAX));
            let mut i: u64 = 0;
            loop {
                let intended = start + interval.mul_f64(i as f64);
                // Waits in steps, so that a low rate's long pause ends with the run (`--duration`).
                while !shared.stopped() && Instant::now() < intended {
                    let step = intended.min(Instant::now() + Duration::from_millis(50));
                    tokio::time::sleep_until(step.into()).await;
                }
                let Some(batch) = shared.next_batch() else { break };
                let Ok(permit) = limit.clone().acquire_owned().await else { break };
                let (link, shared) = (links[(i % links.len() as u64) as usize].clone(), shared.clone());
                tasks.spawn(async move {
                    shared.run_batch(&link, batch, intended).await;
                    drop(permit);
                });
                i += 1;
                while tasks.try_join_next().is_some() {}
            }
        }
    }
    while tasks.join_next().await.is_some() {}
    stopper.abort();
}
