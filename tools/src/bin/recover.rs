//! `stormledger-recover`: the offline log and snapshot tool.
//!
//! verify | inspect | replay | recover [--dry-run], over the server's own recovery code
//! (`node::load_shard`, `wal::recover`; `verify` and `replay` load the shards in parallel, as
//! the server does). Only `recover` without `--dry-run` writes, and it
//! takes the data directory's lock first, so it never runs beside a live server.

use std::collections::HashMap;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use clap::{Parser, Subcommand};
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use serde_json::json;
use zerocopy::FromBytes;

use stormledger::config::{LedgerConfig, ShardLimits};
use stormledger::error::StorageError;
use stormledger::layout::CommandRecord;
use stormledger::ledger::command::kind;
use stormledger::ledger::AccountKind;
use stormledger::node::{
    check_snapshot_against_log, load_shard, read_data_dir, ClusterFile, NodeError, SnapshotCheck, RECORD_KIND_COMMANDS,
};
use stormledger::snapshot::state as snapshot_state;
use stormledger::storage::{DirLock, MmapStorage};
use stormledger::wal::{self, RecoveryOutcome, RecoveryPolicy, WalReader};

#[derive(Parser)]
#[command(
    name = "stormledger-recover",
    version,
    about = "Inspect, verify, replay and repair a stormledger data directory"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Check every checksum, replay every shard and check the money invariants (exit 0 only if all hold).
    Verify {
        dir: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Print log records as JSON lines.
    Inspect {
        dir: PathBuf,
        /// Only commands that name this account.
        #[arg(long)]
        account: Option<u64>,
        /// Where to start: a log position (lsn) on every shard, or a position of the event feed
        /// (`SHARD:LSN.INDEX[,...]`, as `stormledger watch` prints it): the commands after it on
        /// each shard it names, every command on the others.
        #[arg(long, default_value = "1", value_parser = parse_from)]
        from: Start,
        /// At most this many commands.
        #[arg(long, default_value_t = 1000)]
        limit: u64,
        /// Only this shard.
        #[arg(long)]
        shard: Option<u16>,
        /// The records are JSON lines anyway; with --json, shards whose log cannot be read
        /// (exit 1) are also reported in one last object (`status` `failed`).
        #[arg(long)]
        json: bool,
    },
    /// Rebuild the state from snapshot + log and report it.
    Replay {
        dir: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Make a damaged directory startable: truncate a torn last record (only that).
    Recover {
        dir: PathBuf,
        /// Report what would be done; write nothing.
        #[arg(long)]
        dry_run: bool,
        #[arg(long)]
        json: bool,
    },
}

/// The limits to replay with. A directory records the ones that decide results
/// (`ClusterFile::limits`) and the log replays to its acknowledged answers only under those; a
/// directory from before they were recorded gets limits large enough for any shard (the
/// replay's answers can then differ from the server's where an id was reused after it left the
/// server's window, or a create was refused for capacity). `history_max` is not recorded (it
/// decides no answer): a snapshot retaining more history than this ring loads with its oldest
/// entries dropped, as at a server's start with a smaller `--history-max`.
fn replay_limits(cluster: &ClusterFile) -> ShardLimits {
    cluster.limits(&ShardLimits { accounts_max: 1 << 26, history_max: 1 << 20, ids_max: 1 << 22 })
}

fn open_dir(dir: &Path) -> Result<(ClusterFile, stormledger::config::LedgerConfig), String> {
    match read_data_dir(dir) {
        Ok(Some((cluster, ledger))) => Ok((cluster, ledger)),
        Ok(None) => Err(format!("{} is not a stormledger data directory (no cluster.json)", dir.display())),
        Err(e) => Err(e.to_string()),
    }
}

fn progress(shard: u16) -> ProgressBar {
    let bar = ProgressBar::new_spinner();
    bar.set_style(
        ProgressStyle::with_template("{spinner} shard {prefix}: {pos} batches replayed ({per_sec}) {elapsed}")
            .expect("template"),
    );
    bar.set_prefix(shard.to_string());
    bar
}

/// A step with no count to show: a spinner with `message` on a terminal, otherwise the message
/// as one plain line.
fn stage(message: String) -> ProgressBar {
    if !std::io::stderr().is_terminal() {
        eprintln!("stormledger-recover: {message}");
        return ProgressBar::hidden();
    }
    let spinner = ProgressBar::new_spinner().with_message(message);
    spinner.enable_steady_tick(std::time::Duration::from_millis(100));
    spinner
}

struct ShardReport {
    shard: u16,
    loaded: Result<stormledger::node::LoadedShard, NodeError>,
}

/// How often a replay reports progress in plain lines, when stderr is not a terminal (the
/// progress bars show only on one): as the server does while it recovers.
const PLAIN_PROGRESS_EVERY: std::time::Duration = std::time::Duration::from_secs(2);

/// Loads every shard at once, a thread each (as the server recovers), a progress line each: a
/// bar on a terminal, otherwise a plain line every `PLAIN_PROGRESS_EVERY` and one at the end.
fn load_all(
    dir: &Path,
    shards: u16,
    ledger: &stormledger::config::LedgerConfig,
    limits: &ShardLimits,
) -> Vec<ShardReport> {
    let bars = MultiProgress::new();
    let plain = !std::io::stderr().is_terminal();
    std::thread::scope(|scope| {
        let threads: Vec<_> = (0..shards)
            .map(|shard| {
                let bar = bars.add(progress(shard));
                scope.spawn(move || {
                    let started = Instant::now();
                    let mut last = started;
                    let mut report = |n: u64| {
                        bar.set_position(n);
                        if plain && last.elapsed() >= PLAIN_PROGRESS_EVERY {
                            last = Instant::now();
                            eprintln!(
                                "stormledger-recover: shard {shard}: {n} log batches replayed in {:.0} s",
                                started.elapsed().as_secs_f64()
                            );
                        }
                    };
                    let loaded = load_shard(dir, shard, shards, ledger, limits, &mut report);
                    bar.finish_and_clear();
                    if plain {
                        match &loaded {
                            Ok(l) => eprintln!(
                                "stormledger-recover: shard {shard}: loaded: {} + {} commands in {} log batches, {:.1} s",
                                l.snapshot_path.as_ref().map_or("genesis".into(), |p| p.display().to_string()),
                                l.commands_replayed,
                                l.batches_replayed,
                                started.elapsed().as_secs_f64()
                            ),
                            Err(e) => eprintln!("stormledger-recover: shard {shard}: not loaded: {e}"),
                        }
                    }
                    ShardReport { shard, loaded }
                })
            })
            .collect();
        threads.into_iter().map(|t| t.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic))).collect()
    })
}

fn outcome_json(outcome: &RecoveryOutcome) -> serde_json::Value {
    match outcome {
        RecoveryOutcome::Empty => json!({"log": "empty"}),
        RecoveryOutcome::Clean => json!({"log": "clean"}),
        RecoveryOutcome::TruncatedTail { path, offset, bytes, .. } => {
            json!({"log": "truncated_tail", "file": path.display().to_string(), "offset": offset, "bytes": bytes})
        }
        RecoveryOutcome::WouldTruncateTail { path, offset, bytes, .. } => {
            json!({"log": "torn_tail", "file": path.display().to_string(), "offset": offset, "bytes": bytes})
        }
    }
}

fn verify(dir: &Path, json_out: bool, replay_only: bool) -> Result<bool, String> {
    let (cluster, ledger) = open_dir(dir)?;
    let mut ok = true;
    let mut out = Vec::new();
    let mut totals = [0i128; 2];
    let mut by_kind = [0i128; KINDS.len()];
    let limits = replay_limits(&cluster);
    let recorded = cluster.records_limits();
    let reports = load_all(dir, cluster.shards, &ledger, &limits);
    let states: Vec<_> = reports.iter().filter_map(|r| r.loaded.as_ref().ok()).collect();
    for r in &reports {
        let shard = r.shard;
        match &r.loaded {
            Err(e) => {
                ok = false;
                out.push(json!({"shard": shard, "ok": false, "error": e.to_string()}));
            }
            Ok(l) => {
                let mut problems = l.state.invariant_violations();
                let mut snapshot_check = json!(null);
                if !replay_only {
                    let spinner = stage(format!(
                        "shard {shard}: checking every snapshot, and the newest against the log it covers"
                    ));
                    // Every snapshot kept, not only the one loaded: the older one is what a
                    // restart falls back on if the newest is damaged.
                    let snapdir = wal::shard_dir(dir, shard as u32).join("snapshots");
                    match stormledger::snapshot::list_snapshots(&snapdir) {
                        Ok(snapshots) => {
                            for (_, path) in snapshots {
                                if let Err(e) = stormledger::snapshot::load_snapshot(&path) {
                                    problems.push(format!("snapshot: {e}"));
                                }
                            }
                        }
                        Err(e) => problems.push(format!("snapshots: {e}")),
                    }
                    // The snapshot against the log it covers, where the log reaches back before it.
                    snapshot_check = match check_snapshot_against_log(dir, shard, cluster.shards, &ledger, &limits) {
                        Ok(SnapshotCheck::NoSnapshot) => json!("no snapshot"),
                        Ok(SnapshotCheck::NoEarlierStart { log_from, to_lsn }) => json!(format!(
                            "not checked: nothing to replay it from (the log starts at lsn {log_from}, not 1, and no \
                             older snapshot before lsn {to_lsn} that the log continues is kept)"
                        )),
                        Ok(SnapshotCheck::Matches { from_lsn, to_lsn, commands }) => {
                            json!({"matches_log_from_lsn": from_lsn, "to_lsn": to_lsn, "commands": commands})
                        }
                        Err(e) => {
                            problems.push(e.to_string());
                            json!("differs")
                        }
                    };
                    spinner.finish_and_clear();
                    let clean_stop = stormledger::node::CleanStop::read(&MmapStorage, dir);
                    if let Some(damage) = clean_stop.and_then(|c| c.damage(shard, &l.recovery)) {
                        problems.push(damage);
                    } else if let RecoveryOutcome::WouldTruncateTail { path, offset, bytes, .. } = &l.recovery.outcome {
                        problems.push(format!(
                            "torn last record in {} at offset {offset} ({bytes} bytes): run `stormledger-recover recover`",
                            path.display()
                        ));
                    }
                }
                // Replica messages a crash cut off: completed at the next start, from the source's outbox.
                let mut pending = 0u64;
                for other in &states {
                    if other.state.shard() != shard {
                        pending += other.state.replica_out().saturating_sub(l.state.replica_in(other.state.shard()));
                    }
                }
                let sums = l.state.unit_sums();
                totals[0] += sums[0];
                totals[1] += sums[1];
                let balances = kind_totals(l.state.accounts());
                for (all, shard_sum) in by_kind.iter_mut().zip(&balances) {
                    *all += shard_sum;
                }
                ok &= problems.is_empty();
                out.push(json!({
                    "shard": shard,
                    "ok": problems.is_empty(),
                    "problems": problems,
                    "snapshot": l.snapshot_path.as_ref().map(|p| p.display().to_string()),
                    "snapshot_lsn": l.snapshot_lsn,
                    "skipped_snapshots": l.skipped_snapshots,
                    "batches_replayed": l.batches_replayed,
                    "commands_replayed": l.commands_replayed,
                    "log_first_lsn": l.recovery.first_lsn,
                    "log_next_lsn": l.recovery.next_lsn,
                    "log_segments": l.recovery.segments.len(),
                    "recovery": outcome_json(&l.recovery.outcome),
                    "accounts": l.state.accounts().len(),
                    "last_timestamp": l.state.last_timestamp(),
                    "replica_messages_to_complete": pending,
                    "balances": kind_totals_json(&balances),
                    "snapshot_check": snapshot_check,
                }));
            }
        }
    }
    // Across shards: what one shard received from another, the other must have sent.
    let mut problems = Vec::new();
    if let Err(e) = stormledger::engine::check_replicas(&states.iter().map(|l| &l.state).collect::<Vec<_>>()) {
        ok = false;
        problems.push(e);
    }
    if json_out {
        let limits = json!({"accounts_max": limits.accounts_max, "ids_max": limits.ids_max, "recorded": recorded});
        let summary = json!({
            "status": if ok { "ok" } else { "failed" },
            "ok": ok,
            "shards": out,
            "problems": problems,
            "fen_sum": totals[0].to_string(),
            "coin_sum": totals[1].to_string(),
            "balances": kind_totals_json(&by_kind),
            "limits": limits,
        });
        println!("{summary}");
    } else {
        for s in &out {
            let shard = &s["shard"];
            if s["ok"].as_bool() == Some(true) {
                println!(
                    "shard {shard}: ok: {} accounts, snapshot lsn {} + {} commands replayed, log {}",
                    s["accounts"], s["snapshot_lsn"], s["commands_replayed"], s["recovery"]["log"]
                );
            } else {
                println!("shard {shard}: FAILED: {}", s.get("error").unwrap_or(&s["problems"]));
            }
        }
        for problem in &problems {
            println!("cluster: FAILED: {problem}");
        }
        if !states.is_empty() {
            let balances = kind_totals_json(&by_kind);
            let line: Vec<String> =
                balances.as_object().into_iter().flatten().map(|(k, v)| format!("{k} {v}")).collect();
            println!("balances by kind, every shard: {}", line.join(", "));
        }
        if !recorded {
            println!(
                "note: the directory does not record its limits (made before they were); replayed with accounts_max {} and ids_max {}",
                limits.accounts_max, limits.ids_max
            );
        }
        println!("{}", if ok { "all checks passed" } else { "verification FAILED" });
    }
    Ok(ok)
}

/// The account kinds `kind_totals` sums, in order, with the unit of their balances.
const KINDS: [(AccountKind, &str); 9] = [
    (AccountKind::User, "coins"),
    (AccountKind::Streamer, "coins"),
    (AccountKind::Union, "coins"),
    (AccountKind::Platform, "coins"),
    (AccountKind::Payout, "coins"),
    (AccountKind::Issuance, "coins"),
    (AccountKind::CoinSales, "fen"),
    (AccountKind::Channel, "fen"),
    (AccountKind::Suspense, "fen"),
];

/// The sum of the balances of each kind in `KINDS` (wallets, earnings, each system account:
/// what a reconciliation compares with its own tally).
fn kind_totals(accounts: &[stormledger::ledger::account::Account]) -> [i128; KINDS.len()] {
    let mut sums = [0i128; KINDS.len()];
    for a in accounts {
        if let Some(i) = KINDS.iter().position(|(kind, _)| *kind == a.kind) {
            sums[i] += i128::from(a.balance);
        }
    }
    sums
}

/// `{"user_coins": "N", ..., "channel_fen": "N"}`: strings, as `fen_sum` (sums may pass 2^53).
fn kind_totals_json(sums: &[i128; KINDS.len()]) -> serde_json::Value {
    let map: serde_json::Map<String, serde_json::Value> = KINDS
        .iter()
        .zip(sums)
        .map(|((kind, unit), sum)| (format!("{}_{unit}", kind.name()), json!(sum.to_string())))
        .collect();
    serde_json::Value::Object(map)
}

/// Where `inspect` starts (`--from`).
#[derive(Clone, Debug)]
enum Start {
    Lsn(u64),
    After(stormledger::feed::Cursor),
}

fn parse_from(s: &str) -> Result<Start, String> {
    if s.contains(':') {
        return s.parse().map(Start::After);
    }
    s.parse().map(Start::Lsn).map_err(|_| format!("{s:?} is neither a log position (an lsn) nor SHARD:LSN.INDEX[,...]"))
}

/// The users of a shard's top-ups, for `inspect --account`: a callback (`topup_confirm`,
/// `topup_fail`) names only its top-up, and its begin names the user. From the begins in the
/// retained log, and for a callback whose begin is older, from the newest snapshot's top-ups
/// (decoded once, when first needed).
struct TopUpUsers {
    from_log: HashMap<u64, u64>,
    snapshot: Option<Option<stormledger::ledger::ShardState>>,
}

impl TopUpUsers {
    fn scan(reader: &WalReader) -> Result<TopUpUsers, String> {
        let mut from_log = HashMap::new();
        if reader.first_lsn() < reader.next_lsn() {
            for record in reader.iter_from(reader.first_lsn()).map_err(|e| e.to_string())? {
                let record = record.map_err(|e| e.to_string())?;
                if record.kind != RECORD_KIND_COMMANDS {
                    continue;
                }
                let cmds = <[CommandRecord]>::ref_from_bytes(record.payload)
                    .map_err(|_| format!("lsn {}: bad batch", record.lsn))?;
                for c in cmds.iter().filter(|c| c.kind == kind::TOPUP_BEGIN) {
                    from_log.insert(c.id.get(), c.a.get());
                }
            }
        }
        Ok(TopUpUsers { from_log, snapshot: None })
    }

    fn user(
        &mut self,
        id: u64,
        sdir: &Path,
        cluster: &ClusterFile,
        ledger: &LedgerConfig,
    ) -> Result<Option<u64>, String> {
        if let Some(&user) = self.from_log.get(&id) {
            return Ok(Some(user));
        }
        if self.snapshot.is_none() {
            let state = match stormledger::snapshot::load_latest(&sdir.join("snapshots")).map_err(|e| e.to_string())? {
                Some(snap) => {
                    let decoded = snapshot_state::decode(|t| snap.section(t), ledger.clone(), replay_limits(cluster));
                    Some(decoded.map_err(|e| format!("{}: {e}", snap.path.display()))?)
                }
                None => None,
            };
            self.snapshot = Some(state);
        }
        Ok(self.snapshot.as_ref().and_then(Option::as_ref).and_then(|s| s.topup(id)).map(|t| t.user))
    }
}

fn inspect(
    dir: &Path,
    account: Option<u64>,
    from: Start,
    limit: u64,
    only: Option<u16>,
    json_out: bool,
) -> Result<bool, String> {
    let (cluster, ledger) = open_dir(dir)?;
    let shards = cluster.shards;
    if let Some(shard) = only.filter(|&s| s >= shards) {
        return Err(format!("--shard {shard}: the directory has shards 0..={}", shards - 1));
    }
    let mut printed = 0u64;
    // A shard whose log cannot be read is reported and the others are still shown: exit 1.
    let mut damaged = Vec::new();
    for shard in 0..shards {
        if only.is_some_and(|s| s != shard) {
            continue;
        }
        let mut bad_tail = None;
        let shown = inspect_shard(dir, shard, &cluster, &ledger, account, &from, limit, &mut printed, &mut bad_tail);
        if let Some(e) = bad_tail {
            // Shown up to it; the record is not: damage or a torn write, exit 1 as `verify`.
            eprintln!("stormledger-recover: shard {shard}: {e}");
            damaged.push(json!({"shard": shard, "error": e}));
        }
        match shown {
            Ok(true) => {}
            Ok(false) => break, // --limit reached
            Err(e) => {
                eprintln!("stormledger-recover: shard {shard}: {e}");
                damaged.push(json!({"shard": shard, "error": e}));
            }
        }
    }
    if damaged.is_empty() {
        return Ok(true);
    }
    if json_out {
        // Last, after the records: what could not be shown.
        println!("{}", json!({"status": "failed", "ok": false, "shards": damaged}));
    }
    Ok(false)
}

/// Prints one shard's records from `from`, counting them in `printed`; `Ok(false)` once
/// `limit` is reached. `Err`: its log cannot be read (damage: `verify` says more).
#[allow(clippy::too_many_arguments)]
fn inspect_shard(
    dir: &Path,
    shard: u16,
    cluster: &ClusterFile,
    ledger: &LedgerConfig,
    account: Option<u64>,
    from: &Start,
    limit: u64,
    printed: &mut u64,
    bad_tail: &mut Option<String>,
) -> Result<bool, String> {
    let sdir = wal::shard_dir(dir, shard as u32);
    let (reader, report) = WalReader::open(&sdir, shard as u32, &MmapStorage).map_err(|e| e.to_string())?;
    if let RecoveryOutcome::WouldTruncateTail { path, offset, bytes, .. } = &report.outcome {
        *bad_tail = Some(format!(
            "not shown: a bad last record in {} at offset {offset} ({bytes} bytes), torn or damaged: see \
             `stormledger-recover verify`",
            path.display()
        ));
    }
    let mut topup_users = match account {
        Some(_) => Some(TopUpUsers::scan(&reader)?),
        None => None,
    };
    // The first command shown: (lsn, index in its batch).
    let (from_lsn, from_index) = match from {
        Start::Lsn(lsn) => (*lsn, 0),
        Start::After(cursor) => cursor.get(shard).map_or((1, 0), |p| (p.lsn, p.index as u64 + 1)),
    };
    let start = from_lsn.max(reader.first_lsn());
    if start >= reader.next_lsn() {
        return Ok(true);
    }
    for record in reader.iter_from(start).map_err(|e| e.to_string())? {
        let record = record.map_err(|e| e.to_string())?;
        if record.kind != RECORD_KIND_COMMANDS {
            continue;
        }
        let cmds =
            <[CommandRecord]>::ref_from_bytes(record.payload).map_err(|_| format!("lsn {}: bad batch", record.lsn))?;
        for (i, c) in cmds.iter().enumerate() {
            if record.lsn == from_lsn && (i as u64) < from_index {
                continue;
            }
            let (id, a, b) = (c.id.get(), c.a.get(), c.b.get());
            if let (Some(acc), Some(users)) = (account, topup_users.as_mut()) {
                let callback = matches!(c.kind, kind::TOPUP_CONFIRM | kind::TOPUP_FAIL);
                let named = accounts_named(c).contains(&Some(acc))
                    || (callback && users.user(id, &sdir, cluster, ledger)? == Some(acc));
                if !named {
                    continue;
                }
            }
            if *printed >= limit {
                return Ok(false);
            }
            let line = json!({
                "shard": shard, "lsn": record.lsn, "index": i, "timestamp": c.timestamp.get(),
                "kind": kind::name(c.kind), "id": id, "a": a, "b": b, "c": c.c.get(), "d": c.d.get(),
                "code": c.code.get(), "flags": c.flags, "text": c.text_str(),
            });
            println!("{line}");
            *printed += 1;
        }
    }
    Ok(true)
}

/// The accounts a logged command names as parties, by kind: the other fields are ids of other
/// namespaces (a command's own id, a payment method, a gift, an event) or amounts. A top-up's
/// callbacks name only the top-up (its begin names the user: `TopUpUsers`).
fn accounts_named(c: &CommandRecord) -> [Option<u64>; 2] {
    let (id, a, b) = (c.id.get(), c.a.get(), c.b.get());
    let union = (b != 0).then_some(b);
    match c.kind {
        kind::CREATE_ACCOUNT | kind::REPLICA_CREATE => [Some(id), union],
        kind::TIP | kind::GIFT | kind::PAY_EVENT => [Some(a), Some(b)],
        kind::BIND_METHOD
        | kind::TOPUP_BEGIN
        | kind::SETTLE
        | kind::SET_DAILY_CAP
        | kind::FREEZE
        | kind::UNFREEZE
        | kind::REPLICA_FREEZE
        | kind::REPLICA_SETTLE => [Some(a), None],
        // TOPUP_CONFIRM, TOPUP_FAIL, TICK, SETTLE_TOTAL (a total and a shard count).
        _ => [None, None],
    }
}

fn recover(dir: &Path, dry_run: bool, json_out: bool) -> Result<bool, String> {
    let (cluster, ledger) = open_dir(dir)?;
    let shards = cluster.shards;
    let _lock = if dry_run {
        None
    } else {
        Some(DirLock::acquire(dir).map_err(|e| match e {
            StorageError::AlreadyLocked { .. } => format!("{e} (stop the server before running recover)"),
            // A read-only directory, a permission: `recover` writes, the others only read.
            _ => format!("{e} (recover needs to write to the directory; verify and inspect only read)"),
        })?)
    };
    // First every shard is loaded as the server loads it, writing nothing: the replay passes
    // over a torn last record, so this is the directory as it will be once repaired. Anything
    // else (a bad record with valid ones after it or one a snapshot covers, a lost segment, a
    // log that no longer reaches its snapshot, no valid snapshot where one is needed) is not a
    // torn tail, and then nothing at all is written: never bytes destroyed and still no start.
    let advice = "not a torn tail: restore this shard from a replica or backup";
    let mut ok = true;
    let mut out = Vec::new();
    let mut covered = Vec::new();
    let mut states = Vec::new();
    // After a clean stop a bad last record is damage, not a torn write: refused like the rest,
    // unless the operator removes the mark to accept the loss (the message says so).
    let clean_stop = stormledger::node::CleanStop::read(&MmapStorage, dir);
    for r in load_all(dir, shards, &ledger, &replay_limits(&cluster)) {
        let damage = r.loaded.as_ref().ok().and_then(|l| clean_stop.as_ref()?.damage(r.shard, &l.recovery));
        match r.loaded {
            Ok(_) if damage.is_some() => {
                ok = false;
                covered.push(0);
                let mark = clean_stop.as_ref().expect("marked").path.display();
                out.push(json!({"shard": r.shard, "ok": false, "error": damage,
                    "advice": format!("restore this shard from a replica or backup; to accept the loss instead, \
                        delete {mark} and run recover again")}));
            }
            Ok(l) => {
                covered.push(l.snapshot_lsn);
                out.push(json!({"shard": r.shard, "ok": true, "recovery": outcome_json(&l.recovery.outcome),
                    "stale_spares": l.recovery.stale_spares.len(), "next_lsn": l.recovery.next_lsn}));
                states.push(l.state);
            }
            Err(e) => {
                ok = false;
                covered.push(0);
                out.push(json!({"shard": r.shard, "ok": false, "error": e.to_string(), "advice": advice}));
            }
        }
    }
    // Shards that load one by one but do not fit together (one lost what the others received
    // from it) cannot start either, and no repair of a torn tail changes that.
    let mut problems = Vec::new();
    if ok {
        if let Err(e) = stormledger::engine::check_replicas(&states.iter().collect::<Vec<_>>()) {
            ok = false;
            problems.push(format!("{e}: {advice}"));
        }
    }
    let startable = ok;
    // Then, only if every shard can start, the repair: the same recovery, now allowed to zero a
    // torn tail (never one the shard's snapshot covers).
    if ok && !dry_run {
        for (shard, &covered_lsn) in covered.iter().enumerate() {
            let sdir = wal::shard_dir(dir, shard as u32);
            match wal::recover_covered(&sdir, shard as u32, &MmapStorage, RecoveryPolicy::TruncateTornTail, covered_lsn)
            {
                Ok(report) => {
                    out[shard] = json!({"shard": shard, "ok": true, "recovery": outcome_json(&report.outcome),
                        "stale_spares": report.stale_spares.len(), "next_lsn": report.next_lsn});
                }
                Err(e) => {
                    ok = false;
                    out[shard] = json!({"shard": shard, "ok": false, "error": e.to_string(), "advice": advice});
                }
            }
        }
    }
    let startable = Some(startable && ok);
    if json_out {
        let status = if ok { "ok" } else { "failed" };
        println!(
            "{}",
            json!({"status": status, "ok": ok, "dry_run": dry_run, "startable": startable, "shards": out,
                "problems": problems})
        );
    } else {
        for problem in &problems {
            println!("cannot repair: {problem}");
        }
        for s in &out {
            match s.get("error") {
                Some(e) => {
                    let e = e.as_str().map_or_else(|| e.to_string(), str::to_string);
                    println!("shard {}: cannot repair: {e}", s["shard"]);
                    if let Some(advice) = s.get("advice").and_then(|a| a.as_str()) {
                        println!("shard {}: {advice}", s["shard"]);
                    }
                }
                None => println!(
                    "shard {}: {}{}",
                    s["shard"],
                    s["recovery"],
                    if dry_run { " (dry run: nothing written)" } else { "" }
                ),
            }
        }
    }
    Ok(ok)
}

fn main() -> ExitCode {
    stormledger::tune_allocator();
    let argv: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let cli = match Cli::try_parse_from(&argv) {
        Ok(cli) => cli,
        Err(e) => {
            return ExitCode::from(stormledger::cli::report_usage_error(&e, stormledger::cli::wants_json(&argv)) as u8)
        }
    };
    // The read-only subcommands hold the directory's lock shared: no server runs on it while
    // they read (its log would change under them), and they write nothing.
    let read_only_dir = match &cli.command {
        Cmd::Verify { dir, .. } | Cmd::Replay { dir, .. } | Cmd::Inspect { dir, .. } => Some(dir),
        Cmd::Recover { dir, dry_run: true, .. } => Some(dir),
        Cmd::Recover { .. } => None,
    };
    let json_out = match &cli.command {
        Cmd::Verify { json, .. } | Cmd::Replay { json, .. } | Cmd::Inspect { json, .. } | Cmd::Recover { json, .. } => {
            *json
        }
    };
    // Exit 2 without a report (not a data directory, a server running on it): with `--json`
    // the reason is one object too.
    let refuse = |message: String| {
        eprintln!("stormledger-recover: {message}");
        if json_out {
            println!("{}", json!({"status": "error", "error": message}));
        }
        ExitCode::from(2)
    };
    let _shared = match read_only_dir.map(|dir| DirLock::shared(dir)).transpose() {
        Ok(lock) => lock,
        Err(e) => return refuse(format!("{e} (a server is running on it: stop it, or check a copy)")),
    };
    let result = match cli.command {
        Cmd::Verify { dir, json } => verify(&dir, json, false),
        Cmd::Replay { dir, json } => verify(&dir, json, true),
        Cmd::Inspect { dir, account, from, limit, shard, json } => inspect(&dir, account, from, limit, shard, json),
        Cmd::Recover { dir, dry_run, json } => recover(&dir, dry_run, json),
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => refuse(e),
    }
}
