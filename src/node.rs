//! A durable node: the engine over its data directory (lock, logs, snapshots, recovery).
//!
//! `Node::open` is what `stormledger serve` and the in-process tools call. It takes the data
//! directory's lock, loads every shard read-only (`load_shard_with_feed`: newest valid
//! snapshot, then the log after it), then opens each log's writer (`Wal::open_covered`, which
//! zeroes a torn tail) and starts the engine with one write-ahead log per shard as its journal
//! (`WalJournal`). `load_shard` (the same load without the feed) is what
//! `stormledger-recover` runs: the server and the tool share one recovery path.
//!
//! Data directory layout:
//! ```text
//! DIR/LOCK               flock'ed by the running node
//! DIR/cluster.json       shard count and format version (fixed at creation)
//! DIR/ledger.json        the business rules the log was written under (replay needs them)
//! DIR/maintenance        present while writes are paused (`admin maintenance on`)
//! DIR/clean-stop         present while the node is stopped after a clean shutdown: each log's end
//! DIR/shard-NN/*.wal     the shard's log segments (docs/wal-format.md)
//! DIR/shard-NN/snapshots/snapshot-*.snap   the shard's newest two snapshots
//! ```

use std::path::{Path, PathBuf};
use std::sync::Arc;

use zerocopy::{FromBytes, IntoBytes};

use crate::config::{LedgerConfig, ShardLimits};
use crate::engine::{Engine, EngineConfig};
use crate::error::{SnapshotError, StorageError, WalCorruption, WalError};
use crate::layout::CommandRecord;
use crate::ledger::{Command, ShardState};
use crate::shard::worker::{Journal, JournalError, SnapshotPolicy, SystemClock, PREFETCH_FAR, PREFETCH_NEAR};
use crate::storage::{DirLock, MmapStorage, SharedStorage, Storage};
use crate::wal::{self, LogWrite, PersistMode, RecoveryOutcome, Wal, WalConfig, WalReader};

/// The record kind of a batch of commands in the log.
pub const RECORD_KIND_COMMANDS: u16 = 1;
/// Version of the data directory (cluster.json), raised when records an older build would read
/// differently may be written: a build refuses a directory of a format it does not know, so a
/// rollback is refused instead of replaying the log to other answers (docs/wal-format.md,
/// "Version history"). 2: a `topup_confirm`'s `d` (paid by) decides its answer, and the
/// `clean-stop` mark. A start upgrades a directory of an older format it reads (`FORMATS_READ`)
/// before it writes anything else.
pub const DATA_FORMAT_VERSION: u32 = 2;
/// The formats this build reads: its own, and those it upgrades.
pub const FORMATS_READ: [u32; 2] = [1, 2];

/// How a batch is made durable before it is acknowledged.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Durability {
    /// Acknowledge only after the batch is synced to the disk (msync of the written range).
    #[default]
    Sync,
    /// Acknowledge once the batch is in the page cache: survives a crash of the process
    /// (`kill -9`), not a power loss or kernel crash.
    Buffered,
    /// Keep nothing on disk at all (benchmarks of the engine alone, tests).
    InMemory,
}

impl Durability {
    pub const fn name(self) -> &'static str {
        match self {
            Durability::Sync => "sync",
            Durability::Buffered => "buffered",
            Durability::InMemory => "memory",
        }
    }
}

impl std::str::FromStr for Durability {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "sync" => Ok(Durability::Sync),
            "buffered" => Ok(Durability::Buffered),
            "memory" => Ok(Durability::InMemory),
            other => Err(format!("unknown durability mode {other:?} (expected sync, buffered or memory)")),
        }
    }
}

/// Everything `Node::open` needs.
#[derive(Clone, Debug)]
pub struct NodeConfig {
    pub data_dir: PathBuf,
    pub engine: EngineConfig,
    pub durability: Durability,
    /// Size of each pre-allocated log segment.
    pub segment_size: u64,
    /// How batches reach the log's pages: `pwrite` (default) or a copy into the mapping
    /// (`wal::LogWrite`; the same bytes and durability, the sync costs differ).
    pub log_write: LogWrite,
    /// With `Durability::Sync`, zero-fill each spare log segment on a helper thread before
    /// the log reaches it (`WalConfig::prefill`): cheaper syncs, twice the bytes written.
    pub log_prefill: bool,
    /// A shard snapshots after this many bytes of log (0 = only on `admin snapshot`).
    pub snapshot_every_bytes: u64,
    /// Delete log segments covered by the older of the two kept snapshots.
    pub retire_log: bool,
    /// Start even if the wall clock is more than `CLOCK_BEHIND_MAX_NS` behind the newest
    /// logged timestamp (`serve --allow-clock-behind`; see `NodeError::ClockBehind`).
    pub allow_clock_behind: bool,
    /// The wall clock that stamps commands at ingest (a test's own, or the system's).
    pub clock: NodeClock,
    /// Where the logs and snapshots live: real files, or for simulation tests an in-memory
    /// crash image (`storage::MemStorage`; the directory's small files, its lock and the
    /// maintenance marker stay real files).
    pub storage: SharedStorage,
}

impl NodeConfig {
    pub fn new(data_dir: impl Into<PathBuf>) -> NodeConfig {
        NodeConfig {
            data_dir: data_dir.into(),
            engine: EngineConfig::default(),
            durability: Durability::Sync,
            segment_size: 64 << 20,
            log_write: LogWrite::default(),
            log_prefill: true,
            snapshot_every_bytes: 512 << 20,
            retire_log: true,
            allow_clock_behind: false,
            clock: NodeClock::default(),
            storage: SharedStorage::default(),
        }
    }
}

/// `NodeConfig::clock`: the system's wall clock unless a test gives its own.
#[derive(Clone)]
pub struct NodeClock(pub Arc<dyn crate::shard::worker::Clock>);

impl Default for NodeClock {
    fn default() -> Self {
        NodeClock(Arc::new(SystemClock))
    }
}

impl std::fmt::Debug for NodeClock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("NodeClock")
    }
}

/// How far the wall clock may be behind the newest logged timestamp at a start (60 s). Further
/// behind, the start is refused (`NodeError::ClockBehind`) unless `allow_clock_behind`.
pub use crate::shard::worker::CLOCK_BEHIND_MAX_NS;

/// A start whose clock is this far after the log's newest command (7 days) prints a note.
pub const CLOCK_AHEAD_NOTE_NS: u64 = 7 * 86_400_000_000_000;

/// Why a node could not start (or a shard could not be loaded).
#[derive(Debug)]
#[non_exhaustive]
pub enum NodeError {
    Config(crate::config::ConfigError),
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
    /// Another process holds the data directory.
    Locked {
        path: PathBuf,
    },
    /// Recovery found damage it must not repair by itself.
    Corrupt(String),
    /// The wall clock is more than `CLOCK_BEHIND_MAX_NS` behind the newest logged timestamp
    /// (`logged`, `now`: ns since the Unix epoch).
    ClockBehind {
        logged: u64,
        now: u64,
    },
}

impl core::fmt::Display for NodeError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            NodeError::Config(e) => write!(f, "{e}"),
            NodeError::Io { path, error } => write!(f, "{}: {error}", path.display()),
            NodeError::Locked { path } => {
                write!(f, "data directory {} is in use by another stormledger process", path.display())
            }
            NodeError::Corrupt(what) => write!(f, "refusing to start: {what}"),
            NodeError::ClockBehind { logged, now } => write!(
                f,
                "refusing to start: this machine's clock ({}) is {} s behind the newest command in the log ({}). \
                 Either this clock is wrong (fix it: NTP) or an earlier run's was ahead. Started now, commands \
                 would be stamped after the log's time until the clock caught up: top-ups would not expire, \
                 the business day would not turn, and clients with correct clocks would be refused \
                 (id_expired, invalid_paid_by). To start anyway: --allow-clock-behind",
                crate::cli::output::format_time(*now),
                logged.saturating_sub(*now) / 1_000_000_000,
                crate::cli::output::format_time(*logged)
            ),
        }
    }
}

impl std::error::Error for NodeError {}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> NodeError + '_ {
    move |error| NodeError::Io { path: path.to_path_buf(), error }
}

/// The shape fixed when a data directory is created.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ClusterFile {
    pub format: u32,
    pub shards: u16,
    /// The per-shard limits that decide results (`ShardLimits::accounts_max` decides when a
    /// create answers `capacity_exhausted`, `ids_max` which ids are still remembered and which
    /// ended top-ups are kept). The log replays to the answers it acknowledged only under the
    /// limits it was written with, so they are fixed with the directory. Absent in a directory
    /// created before they were recorded: the first start records the limits it runs with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accounts_max: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ids_max: Option<u32>,
}

impl ClusterFile {
    /// `limits` with the recorded result-deciding limits in place of its own (`history_max`,
    /// which only bounds what reads can still see, is not fixed).
    pub fn limits(&self, limits: &ShardLimits) -> ShardLimits {
        ShardLimits {
            accounts_max: self.accounts_max.unwrap_or(limits.accounts_max),
            ids_max: self.ids_max.unwrap_or(limits.ids_max),
            ..limits.clone()
        }
    }

    /// Whether it records the limits (a directory made by an earlier build does not).
    pub fn records_limits(&self) -> bool {
        self.accounts_max.is_some() && self.ids_max.is_some()
    }
}

/// Reads `DIR/cluster.json` and `DIR/ledger.json`, if the directory was initialised.
pub fn read_data_dir(dir: &Path) -> Result<Option<(ClusterFile, LedgerConfig)>, NodeError> {
    let cluster_path = dir.join("cluster.json");
    if !cluster_path.exists() {
        // A first start writes `cluster.json` before any log file or snapshot: a directory that
        // has one but not `cluster.json` lost it, and a start would replay its log under
        // guessed settings (another shard count, other rules) and change acknowledged answers.
        if let Some(found) = ledger_files_in(dir) {
            return Err(NodeError::Corrupt(format!(
                "{} is missing, but the directory holds a ledger ({}): restore cluster.json and ledger.json from a \
                 backup of this directory (they record the shard count, the limits and the business rules its log \
                 was written under); nothing was changed",
                cluster_path.display(),
                found.display()
            )));
        }
        return Ok(None);
    }
    let parse = |path: &Path| -> Result<String, NodeError> { std::fs::read_to_string(path).map_err(io(path)) };
    let cluster: ClusterFile = serde_json::from_str(&parse(&cluster_path)?)
        .map_err(|e| NodeError::Corrupt(format!("{}: {e}", cluster_path.display())))?;
    if !FORMATS_READ.contains(&cluster.format) {
        return Err(NodeError::Corrupt(format!(
            "{}: data format {}, newer than this build's ({DATA_FORMAT_VERSION}): a newer build has run on this \
             directory, and this one could replay its log to other answers; start it with that build (or newer)",
            cluster_path.display(),
            cluster.format
        )));
    }
    // Used as it is (a start takes the recorded count over its own): a count no start could
    // have recorded is damage, not an empty ledger of no shards.
    if !(1..=crate::engine::SHARDS_MAX).contains(&cluster.shards) {
        return Err(NodeError::Corrupt(format!(
            "{}: {} shards (a ledger has 1..={})",
            cluster_path.display(),
            cluster.shards,
            crate::engine::SHARDS_MAX
        )));
    }
    // The recorded limits are used as they are: refuse values no start could have recorded.
    let recorded = cluster.limits(&ShardLimits { history_max: 16, ..ShardLimits::default() });
    if let Err(e) = recorded.validate() {
        return Err(NodeError::Corrupt(format!("{}: {e}", cluster_path.display())));
    }
    let ledger_path = dir.join("ledger.json");
    let ledger: LedgerConfig = serde_json::from_str(&parse(&ledger_path)?)
        .map_err(|e| NodeError::Corrupt(format!("{}: {e}", ledger_path.display())))?;
    Ok(Some((cluster, ledger)))
}

/// The mark of a clean stop (`CLEAN_STOP_FILE`): every shard's log end when it stopped.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CleanStop {
    /// Per shard, the lsn its log's next append would have got.
    pub next_lsn: Vec<u64>,
    #[serde(skip)]
    pub path: PathBuf,
}

impl CleanStop {
    /// The mark in `dir`, if there is one. A mark that cannot be read still says the stop was
    /// clean (it is written only then), without the log ends. Through `storage`, as the logs
    /// (a simulated crash loses or keeps it with them).
    pub fn read(storage: &dyn Storage, dir: &Path) -> Option<CleanStop> {
        if !storage.list(dir).ok()?.iter().any(|name| name == CLEAN_STOP_FILE) {
            return None;
        }
        let path = dir.join(CLEAN_STOP_FILE);
        let next_lsn = storage
            .open(&path, crate::storage::OpenMode::ReadOnly)
            .ok()
            .and_then(|file| serde_json::from_slice::<CleanStop>(file.bytes()).ok())
            .map(|c| c.next_lsn)
            .unwrap_or_default();
        Some(CleanStop { next_lsn, path })
    }

    /// Writes the mark durably (a temporary file, renamed, the directory synced).
    fn write(&self, storage: &dyn Storage, dir: &Path) -> Result<(), StorageError> {
        let tmp = dir.join(format!("{CLEAN_STOP_FILE}.tmp"));
        let _ = storage.remove(&tmp);
        storage.write_file(&tmp, &[&serde_json::to_vec(self).expect("serializable")])?;
        storage.rename(&tmp, &self.path)?;
        storage.sync_dir(dir)
    }

    /// Removes the mark durably: before the first write of a start.
    fn remove(&self, storage: &dyn Storage, dir: &Path) -> Result<(), StorageError> {
        storage.remove(&self.path)?;
        storage.sync_dir(dir)
    }

    /// What is wrong with `shard`'s log as recovery found it (`report`, read-only), given that
    /// the node had stopped cleanly: no write was cut short, so a bad last record is damage to
    /// an acknowledged one, and a log that ends before where it stopped lost acknowledged
    /// records (its newest segment, or records zeroed).
    pub fn damage(&self, shard: u16, report: &wal::RecoveryReport) -> Option<String> {
        let mark = self.path.display();
        let advice = "Restore the directory from a backup or replica";
        if let RecoveryOutcome::WouldTruncateTail { path, offset, bytes, .. } = &report.outcome {
            return Some(format!(
                "shard {shard}: the last record of {} ({bytes} bytes at offset {offset}) is damaged, but the server had \
                 stopped cleanly ({mark} is there): no write was cut short, so this record was acknowledged and has \
                 been damaged since. {advice}; to accept the loss of the commands it holds instead, delete {mark} \
                 and run `stormledger-recover recover`, which then truncates it",
                path.display()
            ));
        }
        match self.next_lsn.get(shard as usize) {
            Some(&stopped) if stopped != report.next_lsn => Some(format!(
                "shard {shard}: the log ends before lsn {}, but the server had stopped cleanly before lsn {stopped} \
                 ({mark}): {}. {advice}; to accept the loss instead, delete {mark}",
                report.next_lsn,
                if report.next_lsn < stopped {
                    "acknowledged records are missing (the newest segment lost, or records zeroed)"
                } else {
                    "records were added after the stop by something else"
                }
            )),
            _ => None,
        }
    }
}

/// A log segment or snapshot in one of `dir`'s shard directories, if there is any.
fn ledger_files_in(dir: &Path) -> Option<PathBuf> {
    let entries = |d: &Path| std::fs::read_dir(d).into_iter().flatten().flatten().map(|e| e.path());
    for shard_dir in entries(dir) {
        let is_shard = shard_dir.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("shard-"));
        if !is_shard || !shard_dir.is_dir() {
            continue;
        }
        let named = |p: &Path, test: &dyn Fn(&str) -> bool| p.file_name().and_then(|n| n.to_str()).is_some_and(test);
        if let Some(segment) = entries(&shard_dir).find(|p| named(p, &|n| wal::parse_segment_file_name(n).is_some())) {
            return Some(segment);
        }
        if let Some(snapshot) = entries(&shard_dir.join("snapshots")).find(|p| named(p, &|n| n.ends_with(".snap"))) {
            return Some(snapshot);
        }
    }
    None
}

/// Writes a small file atomically: tmp, fsync, rename, fsync the directory.
fn write_atomic(dir: &Path, name: &str, bytes: &[u8]) -> Result<(), NodeError> {
    use std::io::Write;
    let tmp = dir.join(format!("{name}.tmp"));
    let path = dir.join(name);
    let mut f = std::fs::File::create(&tmp).map_err(io(&tmp))?;
    f.write_all(bytes).map_err(io(&tmp))?;
    f.sync_all().map_err(io(&tmp))?;
    std::fs::rename(&tmp, &path).map_err(io(&path))?;
    std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(io(dir))
}

/// Every shard's directory exists from the node's first start on (made before `cluster.json`):
/// a missing one is a lost shard, not an empty one.
fn shard_dir_present(storage: &dyn Storage, dir: &Path, shard: u16) -> Result<(), NodeError> {
    storage
        .list(dir)
        .map(drop)
        .map_err(|e| NodeError::Corrupt(format!("shard {shard}: no directory of its own in the data directory ({e})")))
}

/// The file of a snapshot passed over as damaged.
fn damaged_file(error: &SnapshotError) -> Option<PathBuf> {
    match error {
        SnapshotError::Truncated { path, .. } | SnapshotError::Corrupt { path, .. } => Some(path.clone()),
        _ => None,
    }
}

/// What loading one shard found.
pub struct LoadedShard {
    pub state: ShardState,
    /// The log position the snapshot covered (0 = started from genesis).
    pub snapshot_lsn: u64,
    pub snapshot_path: Option<PathBuf>,
    /// Newer snapshots that failed verification and were passed over, and their files.
    pub skipped_snapshots: Vec<String>,
    pub damaged_snapshots: Vec<PathBuf>,
    /// Log records (batches) and commands replayed after the snapshot.
    pub batches_replayed: u64,
    pub commands_replayed: u64,
    /// Bytes of log those records take (frames included): toward the next snapshot.
    pub bytes_replayed: u64,
    pub recovery: wal::RecoveryReport,
}

/// Loads shard `shard` from `data_dir`: newest valid snapshot, then replay of the log after it.
/// Read-only: it never writes (a torn tail is reported, not repaired; `Wal::open` repairs).
/// `progress` is called with the number of batches replayed so far.
pub fn load_shard(
    data_dir: &Path,
    shard: u16,
    shards: u16,
    ledger: &LedgerConfig,
    limits: &ShardLimits,
    progress: &mut dyn FnMut(u64),
) -> Result<LoadedShard, NodeError> {
    load_shard_with_feed(data_dir, &MmapStorage, shard, shards, ledger, limits, progress, None)
}

/// `load_shard`, refilling the shard's event feed with the events of the replayed batches (the
/// events after the snapshot keep their positions across the restart).
#[allow(clippy::too_many_arguments)]
pub fn load_shard_with_feed(
    data_dir: &Path,
    storage: &dyn Storage,
    shard: u16,
    shards: u16,
    ledger: &LedgerConfig,
    limits: &ShardLimits,
    progress: &mut dyn FnMut(u64),
    feed: Option<&crate::feed::ShardFeed>,
) -> Result<LoadedShard, NodeError> {
    let dir = wal::shard_dir(data_dir, shard as u32);
    let snapshot_dir = dir.join("snapshots");
    let loaded =
        crate::snapshot::load_latest_in(storage, &snapshot_dir).map_err(|e| NodeError::Corrupt(e.to_string()))?;
    let (mut state, snapshot_lsn, snapshot_path, skipped) = match loaded {
        Some(snap) => {
            let lsn = *snap.meta.lsns.first().ok_or_else(|| NodeError::Corrupt("snapshot without lsn".into()))?;
            if lsn > wal::LSN_MAX {
                return Err(NodeError::Corrupt(format!("{}: lsn {lsn} is above 2^62", snap.path.display())));
            }
            let state = crate::snapshot::state::decode(|t| snap.section(t), ledger.clone(), limits.clone())
                .map_err(|e| NodeError::Corrupt(format!("{}: {e}", snap.path.display())))?;
            if state.shard() != shard || state.shards() != shards {
                return Err(NodeError::Corrupt(format!("{} belongs to another shard", snap.path.display())));
            }
            // The feed's events before the snapshot that it kept; a snapshot without them (or a
            // shard that never had a feed) retains only the events replayed after it.
            if let Some(feed) = feed {
                match snap.section(crate::snapshot::state::SECTION_FEED_TAIL) {
                    Some(tail) => feed
                        .restore(lsn, tail)
                        .map_err(|e| NodeError::Corrupt(format!("{}: {e}", snap.path.display())))?,
                    None => feed.start_after(lsn),
                }
            }
            (state, lsn, Some(snap.path.clone()), snap.skipped)
        }
        None => {
            if let Some(feed) = feed {
                feed.start_after(0);
            }
            (ShardState::new(shard, shards, ledger.clone(), limits.clone()), 0, None, Vec::new())
        }
    };
    // Nothing is created here (`stormledger-recover verify` and `replay` only read).
    shard_dir_present(storage, &dir, shard)?;
    // The snapshot proves the log was synced up to its lsn: a bad last record it covers is
    // damage, refused here, never reported as a torn tail for `Wal::open` to zero.
    let (reader, report) =
        WalReader::open_covered(&dir, shard as u32, storage, snapshot_lsn).map_err(|e| match &e {
            WalError::Corrupt { reason: WalCorruption::BadRecordCoveredBySnapshot { .. }, .. } => {
                let snapshot = snapshot_path.as_ref().map_or(String::new(), |p| format!(" ({})", p.display()));
                NodeError::Corrupt(format!("shard {shard}: {e}{snapshot}"))
            }
            _ => NodeError::Corrupt(e.to_string()),
        })?;
    // The log never loses its newest records to retention (the active segment is kept, and a
    // new one continues the lsns), so it always reaches at least the snapshot: a log that ends
    // before it (its newest segments lost, or all of them and a new one started at lsn 1) has
    // lost acknowledged records, and a server continuing it would reuse their lsns.
    if report.next_lsn <= snapshot_lsn {
        return Err(NodeError::Corrupt(format!(
            "shard {shard}: the log ends at lsn {} but the snapshot covers up to {snapshot_lsn}: acknowledged records are missing",
            report.next_lsn - 1
        )));
    }
    if report.first_lsn > snapshot_lsn + 1 {
        return Err(NodeError::Corrupt(format!(
            "shard {shard}: the log starts at lsn {} but the snapshot covers only up to {snapshot_lsn}",
            report.first_lsn
        )));
    }
    let (mut batches, mut commands, mut bytes) = (0u64, 0u64, 0u64);
    let mut decoded: Vec<Command> = Vec::new();
    let mut events = crate::feed::BatchEvents::new(0);
    // No reader sees this state yet: balances are published once, after the replay.
    state.defer_publishing();
    if report.next_lsn > snapshot_lsn + 1 {
        let records = reader.iter_from(snapshot_lsn + 1).map_err(|e| NodeError::Corrupt(e.to_string()))?;
        for record in records {
            let record = record.map_err(|e| NodeError::Corrupt(e.to_string()))?;
            if record.kind != RECORD_KIND_COMMANDS {
                return Err(NodeError::Corrupt(format!(
                    "shard {shard}: unknown record kind {} at lsn {}",
                    record.kind, record.lsn
                )));
            }
            let cmds = <[CommandRecord]>::ref_from_bytes(record.payload).map_err(|_| {
                NodeError::Corrupt(format!(
                    "shard {shard}: batch at lsn {} is not a whole number of commands",
                    record.lsn
                ))
            })?;
            events.restart(record.lsn);
            decoded.clear();
            for r in cmds {
                decoded.push(Command::from_record(r).map_err(|status| {
                    NodeError::Corrupt(format!("shard {shard}: undecodable command at lsn {} ({status})", record.lsn))
                })?);
            }
            // The worker's prefetch, two stages ahead (hints only; replay results are the same).
            for c in decoded.iter().take(PREFETCH_FAR) {
                state.prefetch_index(c);
            }
            for (i, (r, command)) in cmds.iter().zip(&decoded).enumerate() {
                if let Some(c) = decoded.get(i + PREFETCH_FAR) {
                    state.prefetch_index(c);
                }
                if let Some(c) = decoded.get(i + PREFETCH_NEAR) {
                    state.prefetch_account(c);
                }
                match feed {
                    Some(_) => events.apply(&mut state, i, r.timestamp.get(), command),
                    None => state.apply(r.timestamp.get(), command),
                };
                commands += 1;
            }
            if let Some(feed) = feed {
                feed.publish(&mut events);
            }
            state.clear_evicted();
            batches += 1;
            bytes += wal::record::record_size(record.payload.len() as u64);
            if batches % 64 == 0 {
                progress(batches);
            }
        }
    }
    progress(batches);
    state.publish_all();
    Ok(LoadedShard {
        state,
        snapshot_lsn,
        snapshot_path,
        skipped_snapshots: skipped.iter().map(|e| e.to_string()).collect(),
        damaged_snapshots: skipped.iter().filter_map(damaged_file).collect(),
        batches_replayed: batches,
        commands_replayed: commands,
        bytes_replayed: bytes,
        recovery: report,
    })
}

/// What `check_snapshot_against_log` found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SnapshotCheck {
    /// The shard has no snapshot: its state is the log's replay, nothing to compare.
    NoSnapshot,
    /// Nothing before the newest snapshot (at `to_lsn`) to replay from: the log starts at
    /// `log_from`, not lsn 1, and no older snapshot it continues is kept (none, one the log
    /// starts after, or one of the same lsn: taken with nothing logged in between).
    NoEarlierStart { log_from: u64, to_lsn: u64 },
    /// The replay of the log from `from_lsn` (0: genesis, else the older snapshot's lsn) up to
    /// the newest snapshot's lsn gave the snapshot's state.
    Matches { from_lsn: u64, to_lsn: u64, commands: u64 },
}

/// Checks the newest valid snapshot of `shard` against the log it covers: replays the log from
/// an earlier start (the newest older snapshot the log reaches back to, or genesis when the log
/// starts at lsn 1) up to the snapshot's lsn, and compares the result with the snapshot's state
/// (`ShardState::first_difference`). A difference is `NodeError::Corrupt`: a restart would serve
/// balances that no logged command produced. Read-only, like `load_shard`.
pub fn check_snapshot_against_log(
    data_dir: &Path,
    shard: u16,
    shards: u16,
    ledger: &LedgerConfig,
    limits: &ShardLimits,
) -> Result<SnapshotCheck, NodeError> {
    let corrupt = |what: String| NodeError::Corrupt(format!("shard {shard}: {what}"));
    let dir = wal::shard_dir(data_dir, shard as u32);
    let snapshot_dir = dir.join("snapshots");
    let Some(newest) =
        crate::snapshot::load_latest_in(&MmapStorage, &snapshot_dir).map_err(|e| corrupt(e.to_string()))?
    else {
        return Ok(SnapshotCheck::NoSnapshot);
    };
    let to_lsn = *newest.meta.lsns.first().ok_or_else(|| corrupt("snapshot without lsn".into()))?;
    let decode = |snap: &crate::snapshot::LoadedSnapshot| {
        crate::snapshot::state::decode(|t| snap.section(t), ledger.clone(), limits.clone())
            .map_err(|e| corrupt(format!("{}: {e}", snap.path.display())))
    };
    let (reader, report) =
        WalReader::open_covered(&dir, shard as u32, &MmapStorage, to_lsn).map_err(|e| corrupt(e.to_string()))?;
    // The newest older snapshot that is valid and that the log continues (a damaged one is
    // `verify`'s finding of its own, not this check's).
    let older = crate::snapshot::list_snapshots(&snapshot_dir)
        .map_err(|e| corrupt(e.to_string()))?
        .into_iter()
        .rev()
        .filter(|(_, path)| *path != newest.path)
        .filter_map(|(_, path)| crate::snapshot::load_snapshot(&path).ok())
        .find_map(|snap| {
            let lsn = *snap.meta.lsns.first()?;
            (lsn < to_lsn && lsn + 1 >= report.first_lsn).then_some((lsn, snap))
        });
    let (mut state, from_lsn) = match older {
        Some((lsn, snap)) => (decode(&snap)?, lsn),
        None if report.first_lsn <= 1 => (ShardState::new(shard, shards, ledger.clone(), limits.clone()), 0),
        None => return Ok(SnapshotCheck::NoEarlierStart { log_from: report.first_lsn, to_lsn }),
    };
    state.defer_publishing();
    let mut commands = 0u64;
    let mut decoded = Vec::new();
    for record in reader.iter_from(from_lsn + 1).map_err(|e| corrupt(e.to_string()))? {
        let record = record.map_err(|e| corrupt(e.to_string()))?;
        if record.lsn > to_lsn {
            break;
        }
        if record.kind != RECORD_KIND_COMMANDS {
            return Err(corrupt(format!("unknown record kind {} at lsn {}", record.kind, record.lsn)));
        }
        let cmds = <[CommandRecord]>::ref_from_bytes(record.payload)
            .map_err(|_| corrupt(format!("batch at lsn {} is not a whole number of commands", record.lsn)))?;
        decoded.clear();
        for r in cmds {
            let command = Command::from_record(r)
                .map_err(|status| corrupt(format!("undecodable command at lsn {} ({status})", record.lsn)))?;
            decoded.push((r.timestamp.get(), command));
        }
        for (timestamp, command) in &decoded {
            state.apply(*timestamp, command);
            commands += 1;
        }
        state.clear_evicted();
    }
    if let Some(difference) = decode(&newest)?.first_difference(&state) {
        return Err(corrupt(format!(
            "the snapshot {} disagrees with the log it covers (replayed from {} up to lsn {to_lsn}): {difference}",
            newest.path.display(),
            if from_lsn == 0 { "genesis".to_string() } else { format!("the snapshot at lsn {from_lsn}") }
        )));
    }
    Ok(SnapshotCheck::Matches { from_lsn, to_lsn, commands })
}

/// Runs `f` for every shard at once, a thread each (shards are independent: a directory and a
/// feed shard each). Results, and the first error, are taken in shard order; a panic is
/// re-raised.
fn per_shard<T: Send>(
    shards: u16,
    name: &str,
    f: impl Fn(u16) -> Result<T, NodeError> + Sync,
) -> Result<Vec<T>, NodeError> {
    let results: Vec<Result<T, NodeError>> = std::thread::scope(|scope| {
        let f = &f;
        let threads: Vec<_> = (0..shards)
            .map(|shard| {
                std::thread::Builder::new()
                    .name(format!("{name}-{shard}"))
                    .spawn_scoped(scope, move || f(shard))
                    .map_err(|e| NodeError::Corrupt(format!("cannot start a recovery thread: {e}")))
            })
            .collect();
        threads.into_iter().map(|t| t?.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic))).collect()
    });
    results.into_iter().collect()
}

/// The write-ahead log as the engine's journal: one append and one sync per batch.
struct WalJournal {
    wal: Wal,
    /// Set by a failed append. The writer refuses an oversized batch without poisoning itself,
    /// but the shard stops at any failure, and a batch behind the failed one (handed to the log
    /// thread already) must not reach the log after it.
    failed: bool,
    /// The last lsn the shard's state holds after recovery (see `Journal::recovered_lsn`).
    recovered_lsn: u64,
}

impl Journal for WalJournal {
    fn append_batch(&mut self, timestamp: u64, records: &[CommandRecord]) -> Result<u64, JournalError> {
        if self.failed {
            return Err("an earlier append to this log failed".into());
        }
        let appended = self.wal.append(RECORD_KIND_COMMANDS, timestamp, records.as_bytes()).and_then(|lsn| {
            self.wal.sync()?;
            Ok(lsn)
        });
        self.failed = appended.is_err();
        Ok(appended?)
    }

    fn sync_all(&mut self) -> Result<(), JournalError> {
        Ok(self.wal.sync_durable()?)
    }

    fn retire_before(&mut self, lsn: u64) -> Result<(), JournalError> {
        self.wal.retire_segments_before(lsn)?;
        Ok(())
    }

    /// In `sync` mode an append waits for the disk: overlap it with applying the batch before.
    fn pipelined(&self) -> bool {
        self.wal.config().persist_mode == PersistMode::Sync
    }

    fn recovered_lsn(&self) -> u64 {
        self.recovered_lsn
    }
}

/// The marker file of `admin maintenance on` in the data directory.
pub const MAINTENANCE_FILE: &str = "maintenance";

/// Written once a shutdown has synced every shard's log, removed by the next start before its
/// first write: a start that finds it knows no write was cut short, so a damaged last record
/// is damage (bit rot after the stop), not a torn write, and is refused instead of truncated.
pub const CLEAN_STOP_FILE: &str = "clean-stop";

/// A running node.
pub struct Node {
    engine: Arc<Engine>,
    /// The limits the shards run with (a data directory's recorded ones win over the config's).
    limits: ShardLimits,
    /// The data directory and its storage (`None` in memory): a clean shutdown marks it
    /// (`CLEAN_STOP_FILE`).
    dir: Option<(PathBuf, SharedStorage)>,
    _lock: Option<DirLock>,
}

impl Node {
    /// Opens (creating if needed) the data directory, recovers every shard and starts the engine.
    pub fn open(mut config: NodeConfig) -> Result<Node, NodeError> {
        config.engine.validate().map_err(NodeError::Config)?;
        let dir = config.data_dir.clone();
        crate::storage::create_dir_durably(&dir).map_err(|e| match e {
            StorageError::Io { path, source, .. } => NodeError::Io { path, error: source },
            other => NodeError::Corrupt(other.to_string()),
        })?;
        let lock = match DirLock::acquire(&dir) {
            Ok(lock) => lock,
            Err(StorageError::AlreadyLocked { .. }) => return Err(NodeError::Locked { path: dir }),
            Err(e) => return Err(NodeError::Corrupt(e.to_string())),
        };
        if config.durability == Durability::InMemory {
            // Nothing of the directory is read or written: say so where a ledger is stored, so
            // that a stray `STORMLEDGER_DURABILITY=memory` is not taken for a wiped ledger.
            if dir.join("cluster.json").exists() {
                eprintln!(
                    "note: --durability memory: the ledger stored in {} is neither loaded nor changed; this server \
                     starts empty and keeps nothing",
                    dir.display()
                );
            }
            let limits = config.engine.limits.clone();
            let engine = Engine::in_memory(config.engine).map_err(NodeError::Config)?;
            // No log to number the feed's batches: they are counted from the wall clock's
            // nanoseconds at start, so positions still grow across restarts and a cursor of an
            // earlier run is older than anything retained (`position_too_old`), never taken for
            // a position of this run (docs/protocol.md, "Positions").
            let start = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |since| u64::try_from(since.as_nanos()).unwrap_or(u64::MAX / 2));
            for shard_feed in engine.feed().shards() {
                shard_feed.start_after(start);
            }
            return Ok(Node { engine: Arc::new(engine), limits, dir: None, _lock: Some(lock) });
        }
        // A directory's first start: what it records once its shards are allocated.
        let mut new_dir = None;
        // A directory of an older format: its `cluster.json` of this build's format.
        let mut upgrade = None;
        match read_data_dir(&dir)? {
            Some((mut cluster, ledger)) => {
                if cluster.shards != config.engine.shards {
                    eprintln!(
                        "note: {} was created with {} shards; using {} (the shard count is fixed per data directory)",
                        dir.display(),
                        cluster.shards,
                        cluster.shards
                    );
                    config.engine.shards = cluster.shards;
                }
                if ledger != config.engine.ledger {
                    eprintln!("note: using the business rules stored in {}/ledger.json", dir.display());
                    config.engine.ledger = ledger;
                }
                let limits = cluster.limits(&config.engine.limits);
                if limits != config.engine.limits {
                    eprintln!(
                        "note: {} was created with accounts_max {} and ids_max {} per shard; using them (they decide \
                         results, so they are fixed per data directory)",
                        dir.display(),
                        limits.accounts_max,
                        limits.ids_max
                    );
                    config.engine.limits = limits;
                }
                if !cluster.records_limits() {
                    // A directory from before the limits were recorded: from now on they are.
                    cluster.accounts_max = Some(config.engine.limits.accounts_max);
                    cluster.ids_max = Some(config.engine.limits.ids_max);
                    write_atomic(&dir, "cluster.json", &serde_json::to_vec_pretty(&cluster).expect("serializable"))?;
                }
                if cluster.format != DATA_FORMAT_VERSION {
                    // Upgraded once every shard has loaded, before the first write (below).
                    upgrade = Some(ClusterFile { format: DATA_FORMAT_VERSION, ..cluster });
                }
            }
            None => {
                let cluster = ClusterFile {
                    format: DATA_FORMAT_VERSION,
                    shards: config.engine.shards,
                    accounts_max: Some(config.engine.limits.accounts_max),
                    ids_max: Some(config.engine.limits.ids_max),
                };
                // Every shard's directory first: a directory with `cluster.json` has them all, so
                // a missing one is a lost shard (see `recover` below), never one not made yet.
                for shard in 0..config.engine.shards {
                    let shard_dir = wal::shard_dir(&dir, shard as u32);
                    config.storage.0.create_dir_all(&shard_dir).map_err(|e| NodeError::Corrupt(e.to_string()))?;
                }
                // Recorded once every shard's state is allocated (below), before any log file is
                // made: a first start that cannot allocate what its limits ask for (a typo in
                // `--ids-max`) stops without recording them, and the next start is a first one.
                new_dir = Some(cluster);
            }
        }
        let shards = config.engine.shards;
        let persist_mode =
            if config.durability == Durability::Sync { PersistMode::Sync } else { PersistMode::Buffered };
        let storage: Arc<dyn Storage> = config.storage.0.clone();
        let (mut states, mut journals, mut policies) = (Vec::new(), Vec::new(), Vec::new());
        let feed = Arc::new(crate::feed::Feed::new(shards, config.engine.feed_events_max));
        // Shards are independent: each step runs on a thread a shard (`per_shard`).
        // First every shard is loaded, writing nothing: the replay reads the log's valid records
        // and passes over a torn last record; whatever keeps a shard from starting (a log that
        // ends before its snapshot, a bad record the snapshot covers, ...) is refused here,
        // before anything on disk changes, on any shard.
        let load = |shard: u16| -> Result<LoadedShard, NodeError> {
            let shard_dir = wal::shard_dir(&dir, shard as u32);
            // A missing directory is a lost shard (opening its log would make it anew and start
            // the shard empty).
            shard_dir_present(storage.as_ref(), &shard_dir, shard)?;
            let (ledger, limits) = (&config.engine.ledger, &config.engine.limits);
            let shard_feed = Some(feed.shard(shard).as_ref());
            // A long replay reports progress on stderr every two seconds.
            let started = std::time::Instant::now();
            let mut last_report = started;
            let mut progress = |batches: u64| {
                if last_report.elapsed() >= std::time::Duration::from_secs(2) {
                    last_report = std::time::Instant::now();
                    eprintln!(
                        "shard {shard}: recovering: {batches} log batches replayed in {:.0} s",
                        started.elapsed().as_secs_f64()
                    );
                }
            };
            load_shard_with_feed(&dir, storage.as_ref(), shard, shards, ledger, limits, &mut progress, shard_feed)
        };
        let loaded = per_shard(shards, "recover", load)?;
        crate::engine::check_replicas(&loaded.iter().map(|l| &l.state).collect::<Vec<_>>())
            .map_err(|e| NodeError::Corrupt(format!("{}: {e}", dir.display())))?;
        // After a clean stop no write was cut short: a bad last record is damage, and it was
        // acknowledged; a log shorter than it was lost records. The mark is removed once the
        // logs are open, before their first append (a crash from then on leaves none behind;
        // a start that fails before keeps it).
        let clean_stop = CleanStop::read(storage.as_ref(), &dir);
        if let Some(clean_stop) = &clean_stop {
            for (shard, l) in (0u16..).zip(&loaded) {
                if let Some(damage) = clean_stop.damage(shard, &l.recovery) {
                    return Err(NodeError::Corrupt(damage));
                }
            }
        }
        // The wall clock against the log's time, before anything is written.
        let logged = loaded.iter().map(|l| l.state.last_timestamp()).max().unwrap_or(0);
        let now = config.clock.0.now_ns();
        if logged > now.saturating_add(CLOCK_BEHIND_MAX_NS) {
            if !config.allow_clock_behind {
                return Err(NodeError::ClockBehind { logged, now });
            }
            eprintln!(
                "warning: {}: starting with the clock {} s behind the log's newest command (--allow-clock-behind): \
                 commands are stamped after it until the clock catches up",
                dir.display(),
                (logged - now) / 1_000_000_000
            );
        }
        if logged != 0 && now > logged.saturating_add(CLOCK_AHEAD_NOTE_NS) {
            // Maybe just a long stop; but a clock far ahead (a bad clock at boot) would stamp its
            // time on every command from now on, for good: say it while it can still be undone.
            eprintln!(
                "note: {}: the clock ({}) is {} days after the log's newest command ({}); if the ledger was not \
                 stopped that long, stop it now and fix the clock: every command is stamped with it, and later \
                 timestamps never go back",
                dir.display(),
                crate::cli::output::format_time(now),
                (now - logged) / 86_400_000_000_000,
                crate::cli::output::format_time(logged)
            );
        }
        if let Some(cluster) = new_dir {
            let ledger = serde_json::to_vec_pretty(&config.engine.ledger).expect("serializable");
            write_atomic(&dir, "ledger.json", &ledger)?;
            write_atomic(&dir, "cluster.json", &serde_json::to_vec_pretty(&cluster).expect("serializable"))?;
        }
        if let Some(cluster) = upgrade {
            // Before anything an older build would misread can be written (a refused start above
            // leaves the directory to the build that wrote it).
            write_atomic(&dir, "cluster.json", &serde_json::to_vec_pretty(&cluster).expect("serializable"))?;
            eprintln!(
                "note: {}: data format upgraded to {DATA_FORMAT_VERSION}; builds that do not read it refuse the \
                 directory from now on (docs/operations.md, \"Upgrades and rollbacks\")",
                dir.display()
            );
        }
        // Then, every shard loaded, the writes: each log's writer, which zeroes a torn tail after
        // the snapshot (never one it covers) and continues after exactly the records replayed,
        // and the damaged snapshots set aside.
        type Found<'a> = (u64, u64, &'a [String], &'a [PathBuf]);
        let found: Vec<Found> = loaded
            .iter()
            .map(|l| {
                (l.snapshot_lsn, l.recovery.next_lsn, l.skipped_snapshots.as_slice(), l.damaged_snapshots.as_slice())
            })
            .collect();
        let open_log = |shard: u16| -> Result<Wal, NodeError> {
            let shard_dir = wal::shard_dir(&dir, shard as u32);
            let (snapshot_lsn, next_lsn, skipped_snapshots, damaged_snapshots) = found[shard as usize];
            let wal_config = WalConfig {
                segment_size: config.segment_size,
                persist_mode,
                write: config.log_write,
                prefill: config.log_prefill,
            };
            let (wal, report) = Wal::open_covered(&shard_dir, shard as u32, wal_config, storage.clone(), snapshot_lsn)
                .map_err(|e| NodeError::Corrupt(e.to_string()))?;
            if let RecoveryOutcome::TruncatedTail { path, offset, bytes, .. } = &report.outcome {
                eprintln!(
                    "shard {shard}: truncated a torn last record ({bytes} bytes at offset {offset} of {}): it was never acknowledged",
                    path.display()
                );
            }
            if wal.next_lsn() != next_lsn {
                return Err(NodeError::Corrupt(format!(
                    "shard {shard}: the log changed while it was recovered (replayed up to lsn {}, the writer continues \
                     after lsn {})",
                    next_lsn - 1,
                    wal.next_lsn() - 1
                )));
            }
            for skipped in skipped_snapshots {
                eprintln!("shard {shard}: passed over a damaged snapshot: {skipped}");
            }
            // Out of the way of retention, which keeps the newest snapshots by name: counted, a
            // damaged one would take the place of the valid one just loaded, the one to fall
            // back on. Renamed, not removed: the evidence stays.
            for damaged in damaged_snapshots {
                let aside = crate::snapshot::set_aside_in(storage.as_ref(), damaged).map_err(|e| {
                    NodeError::Corrupt(format!("shard {shard}: cannot set the damaged snapshot aside: {e}"))
                })?;
                eprintln!("shard {shard}: renamed it to {}", aside.display());
            }
            Ok(wal)
        };
        let wals = per_shard(shards, "open-log", open_log)?;
        if let Some(clean_stop) = clean_stop {
            clean_stop.remove(storage.as_ref(), &dir).map_err(|e| NodeError::Corrupt(e.to_string()))?;
        }
        for ((shard, loaded), wal) in (0u16..).zip(loaded).zip(wals) {
            let shard_dir = wal::shard_dir(&dir, shard as u32);
            if loaded.commands_replayed > 0 || loaded.snapshot_path.is_some() {
                eprintln!(
                    "shard {shard}: recovered from {} + {} commands in {} log batches",
                    loaded.snapshot_path.as_ref().map_or("genesis".into(), |p| p.display().to_string()),
                    loaded.commands_replayed,
                    loaded.batches_replayed
                );
            }
            // The snapshot just loaded is the newest valid one: the next snapshot written keeps it
            // as the older of the two (file retention drops anything older), so it is the only
            // position the retirement rule needs. No second read of the snapshot files.
            let kept_lsns = if loaded.snapshot_path.is_some() { vec![loaded.snapshot_lsn] } else { Vec::new() };
            policies.push(Some(SnapshotPolicy {
                dir: shard_dir.join("snapshots"),
                storage: config.storage.clone(),
                every_bytes: config.snapshot_every_bytes,
                logged_since: loaded.bytes_replayed,
                retire_log: config.retire_log,
                kept: kept_lsns,
            }));
            journals.push(
                Box::new(WalJournal { recovered_lsn: wal.next_lsn() - 1, wal, failed: false }) as Box<dyn Journal>
            );
            states.push(loaded.state);
        }
        let engine = Engine::start_with_feed(&config.engine, states, journals, policies, config.clock.0.clone(), feed);
        if engine.keep_maintenance_in(dir.join(MAINTENANCE_FILE)) {
            eprintln!(
                "note: writes are paused: `admin maintenance on` was in effect when the server stopped \
                 ({}); `admin maintenance off` resumes them",
                dir.join(MAINTENANCE_FILE).display()
            );
        }
        let dir = Some((dir, config.storage.clone()));
        Ok(Node { engine: Arc::new(engine), limits: config.engine.limits, dir, _lock: Some(lock) })
    }

    /// The engine (also the server's `Backend`).
    pub fn engine(&self) -> &Arc<Engine> {
        &self.engine
    }

    /// The per-shard limits it runs with.
    pub fn limits(&self) -> &ShardLimits {
        &self.limits
    }

    /// Drains the queues, syncs the logs and stops the workers; then releases the lock.
    /// Stops the engine (every shard drains and syncs its log) and, if every log is healthy,
    /// marks the directory cleanly stopped (`CLEAN_STOP_FILE`).
    pub fn shutdown(self) {
        self.engine.shutdown();
        let Some((dir, storage)) = &self.dir else { return };
        let stats = self.engine.stats();
        if stats.poisoned_shards() > 0 {
            return;
        }
        let mark = CleanStop { next_lsn: stats.log_next_lsns(), path: dir.join(CLEAN_STOP_FILE) };
        if let Err(e) = mark.write(storage.0.as_ref(), dir) {
            eprintln!("note: could not mark the clean stop: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn after_a_failed_append_the_journal_appends_nothing_more() {
        // An oversized batch is refused by the writer without poisoning it; the batch behind
        // it, already on the log thread, must still not reach the log after it.
        let storage: Arc<dyn Storage> = Arc::new(crate::storage::MemStorage::new());
        let config = WalConfig { segment_size: 64 << 10, persist_mode: PersistMode::Sync, ..WalConfig::default() };
        let (wal, _) = Wal::open(Path::new("/mem/shard-00"), 0, config, storage.clone()).unwrap();
        let mut journal = WalJournal { recovered_lsn: 0, wal, failed: false };
        let record = CommandRecord::default();
        assert_eq!(journal.append_batch(1, &[record]).unwrap(), 1);
        let oversized = vec![record; (64 << 10) / std::mem::size_of::<CommandRecord>() + 1];
        assert!(journal.append_batch(2, &oversized).is_err());
        assert!(journal.append_batch(3, &[record]).is_err());
        assert_eq!(journal.wal.next_lsn(), 2, "nothing appended after the failure");
    }
}
