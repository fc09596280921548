//! `stormledger serve`: resolve the configuration, lock the data directory, open the node, serve
//! until SIGTERM/SIGINT, drain, shut the node down.

use std::io::Write;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::signal::unix::{signal, SignalKind};

use super::args::{parse_durability, parse_log_write, Cli, ServeArgs};
use super::{metrics, token, EXIT_FAILURE, EXIT_OK, EXIT_USAGE};
use crate::config::{LedgerConfig, ShardLimits};
use crate::engine::{EngineConfig, SHARDS_MAX};
use crate::node::{Durability, Node, NodeConfig, NodeError};
use crate::server::{Backend, Server, ServerConfig};
use crate::wal::LogWrite;

pub const DEFAULT_DATA_DIR: &str = "./data";
pub const DEFAULT_LISTEN: &str = "127.0.0.1:7878";
/// Bounds of `--feed-events-max`, the events each shard keeps for watchers (96 B each): at least
/// as many as the other windows' least, at most 128 M (12 GiB a shard).
pub const FEED_EVENTS_MIN: usize = 16;
pub const FEED_EVENTS_MAX: usize = 1 << 27;
/// Largest `--snapshot-every-mib`: 1 TiB of log between snapshots (its bytes must fit a u64).
pub const SNAPSHOT_EVERY_MIB_MAX: u64 = 1 << 20;

/// The optional TOML config file. Keys are the long flags with `_` for `-`; `[ledger]` holds the
/// business rules (`config::LedgerConfig`; only honoured on the first start of a data directory
/// once the durable node stores them).
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub data_dir: Option<PathBuf>,
    pub listen: Option<String>,
    pub shards: Option<u16>,
    pub durability: Option<String>,
    pub token: Option<String>,
    pub admin_token: Option<String>,
    pub metrics: Option<String>,
    pub allow_remote: Option<bool>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub accounts_max: Option<u32>,
    pub history_max: Option<u32>,
    pub ids_max: Option<u32>,
    pub feed_events_max: Option<usize>,
    pub snapshot_every_mib: Option<u64>,
    pub segment_mib: Option<u64>,
    pub log_write: Option<String>,
    pub log_prefill: Option<bool>,
    pub pipeline_min_batch: Option<usize>,
    pub ledger: Option<LedgerConfig>,
}

impl FileConfig {
    pub fn load(path: &Path) -> Result<FileConfig, String> {
        let text =
            std::fs::read_to_string(path).map_err(|e| format!("cannot read config file {}: {e}", path.display()))?;
        toml::from_str(&text).map_err(|e| format!("config file {}: {e}", path.display()))
    }
}

/// How an error names a setting: its flag (given on the command line or by its environment
/// variable), or its key in the config file.
fn named(from_flag: bool, flag: &str, key: &str) -> String {
    if from_flag {
        flag.to_string()
    } else {
        format!("config file: {key}")
    }
}

/// Where a token comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenSource {
    /// Given (flag, environment or config file).
    Given(String),
    /// Read from, or created once in, this file.
    File(PathBuf),
}

/// TLS as configured: the PEM files and the configuration loaded from them.
#[derive(Clone)]
pub struct ServeTls {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub config: Arc<rustls::ServerConfig>,
}

impl core::fmt::Debug for ServeTls {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("ServeTls").field("cert", &self.cert).field("key", &self.key).finish_non_exhaustive()
    }
}

impl ServeTls {
    /// `--tls-cert` and `--tls-key` go together; both files are read and checked now, so a bad
    /// one is a configuration error (exit 2) naming the file.
    fn resolve(cert: Option<PathBuf>, key: Option<PathBuf>) -> Result<Option<ServeTls>, String> {
        match (cert, key) {
            (None, None) => Ok(None),
            (Some(_), None) => {
                Err("--tls-cert needs --tls-key (the certificate's private key); give both or neither".into())
            }
            (None, Some(_)) => Err("--tls-key needs --tls-cert (the certificate chain); give both or neither".into()),
            (Some(cert), Some(key)) => {
                let config = crate::tls::server_config(&cert, &key).map_err(|e| e.to_string())?;
                Ok(Some(ServeTls { cert, key, config }))
            }
        }
    }
}

/// The server's settings after merging flags > environment > file > defaults.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub data_dir: PathBuf,
    pub listen: SocketAddr,
    pub shards: u16,
    pub durability: Durability,
    pub token: TokenSource,
    pub admin_token: TokenSource,
    pub metrics: Option<SocketAddr>,
    pub allow_remote: bool,
    /// Serve TLS; then a non-loopback `listen` needs no `allow_remote`.
    pub tls: Option<ServeTls>,
    pub ledger: LedgerConfig,
    pub limits: ShardLimits,
    pub feed_events_max: usize,
    pub snapshot_every_bytes: u64,
    pub segment_size: u64,
    pub log_write: LogWrite,
    pub log_prefill: bool,
    /// Start with the clock behind the log's time (`NodeConfig::allow_clock_behind`).
    pub allow_clock_behind: bool,
    pub pipeline_min_batch: usize,
}

impl ServeConfig {
    /// Merges the command line (clap already folded the environment in) with the config file.
    pub fn resolve(cli: &Cli, args: &ServeArgs) -> Result<ServeConfig, String> {
        let file = match &args.config {
            Some(path) => FileConfig::load(path)?,
            None => FileConfig::default(),
        };
        let data_dir = cli.data_dir.clone().or(file.data_dir).unwrap_or_else(|| PathBuf::from(DEFAULT_DATA_DIR));
        let allow_remote = args.allow_remote || file.allow_remote.unwrap_or(false);
        let tls = ServeTls::resolve(args.tls_cert.clone().or(file.tls_cert), args.tls_key.clone().or(file.tls_key))?;
        let listen_text = args.listen.clone().or(file.listen).unwrap_or_else(|| DEFAULT_LISTEN.to_string());
        let listen = resolve_addr(Listener::Ledger { tls: tls.is_some() }, &listen_text, allow_remote)?;
        let metrics = match args.metrics.clone().or(file.metrics) {
            Some(text) => Some(resolve_addr(Listener::Metrics, &text, allow_remote)?),
            None => None,
        };
        let shards = match args.shards.or(file.shards) {
            Some(n) if (1..=SHARDS_MAX).contains(&n) => n,
            Some(n) => {
                let name = named(args.shards.is_some(), "--shards", "shards");
                return Err(format!("{name} must be in 1..={SHARDS_MAX}, got {n}"));
            }
            None => EngineConfig::default().shards,
        };
        let durability = match (args.durability, file.durability) {
            (Some(d), _) => d,
            (None, Some(text)) => parse_durability(&text).map_err(|e| format!("config file: durability: {e}"))?,
            (None, None) => Durability::Sync,
        };
        let token = match cli.token.clone().or(file.token) {
            Some(t) => {
                token::validate(&t).map_err(|e| format!("--token: {e}"))?;
                TokenSource::Given(t)
            }
            None => TokenSource::File(data_dir.join(token::CLIENT_TOKEN_FILE)),
        };
        let admin_token = match cli.admin_token.clone().or(file.admin_token) {
            Some(t) => {
                token::validate(&t).map_err(|e| format!("--admin-token: {e}"))?;
                TokenSource::Given(t)
            }
            None => TokenSource::File(data_dir.join(token::ADMIN_TOKEN_FILE)),
        };
        // Two given tokens are compared here, before anything is touched (exit 2); a token read
        // from its file is compared once it is read (`run`).
        if let (TokenSource::Given(client), TokenSource::Given(admin)) = (&token, &admin_token) {
            if client == admin {
                return Err(SAME_TOKENS.into());
            }
        }
        let ledger = file.ledger.unwrap_or_default();
        // A new directory takes these rules, so they must be usable; an existing one keeps its
        // own (`ledger.json`), and the file it was started with before must still start it.
        let new_dir = !data_dir.join("cluster.json").exists();
        let checked = if new_dir { ledger.validate_new() } else { ledger.validate() };
        checked.map_err(|e| format!("config file [ledger]: {e}"))?;
        let defaults = ShardLimits::default();
        let limits = ShardLimits {
            accounts_max: args.accounts_max.or(file.accounts_max).unwrap_or(defaults.accounts_max),
            history_max: args.history_max.or(file.history_max).unwrap_or(defaults.history_max),
            ids_max: args.ids_max.or(file.ids_max).unwrap_or(defaults.ids_max),
        };
        limits.validate().map_err(|e| format!("limits: {e}"))?;
        let node_defaults = NodeConfig::new(&data_dir);
        let feed_events_max =
            args.feed_events_max.or(file.feed_events_max).unwrap_or(EngineConfig::default().feed_events_max);
        if !(FEED_EVENTS_MIN..=FEED_EVENTS_MAX).contains(&feed_events_max) {
            let name = named(args.feed_events_max.is_some(), "--feed-events-max", "feed_events_max");
            return Err(format!(
                "{name} must be in {FEED_EVENTS_MIN}..={FEED_EVENTS_MAX} (96 bytes each, per shard), got \
                 {feed_events_max}"
            ));
        }
        let snapshot_every_bytes = match args.snapshot_every_mib.or(file.snapshot_every_mib) {
            None => node_defaults.snapshot_every_bytes,
            Some(mib) if mib <= SNAPSHOT_EVERY_MIB_MAX => mib << 20,
            Some(mib) => {
                let name = named(args.snapshot_every_mib.is_some(), "--snapshot-every-mib", "snapshot_every_mib");
                return Err(format!("{name} must be in 0..={SNAPSHOT_EVERY_MIB_MAX}, got {mib}"));
            }
        };
        let segment_mib = args.segment_mib.or(file.segment_mib).unwrap_or(node_defaults.segment_size >> 20);
        if !(1..=1024).contains(&segment_mib) {
            let name = named(args.segment_mib.is_some(), "--segment-mib", "segment_mib");
            return Err(format!("{name} must be in 1..=1024, got {segment_mib}"));
        }
        let log_write = match (args.log_write, file.log_write) {
            (Some(w), _) => w,
            (None, Some(text)) => parse_log_write(&text).map_err(|e| format!("config file: log_write: {e}"))?,
            (None, None) => node_defaults.log_write,
        };
        let log_prefill = args.log_prefill.or(file.log_prefill).unwrap_or(node_defaults.log_prefill);
        let pipeline_min_batch =
            args.pipeline_min_batch.or(file.pipeline_min_batch).unwrap_or(EngineConfig::default().pipeline_min_batch);
        if pipeline_min_batch > 65_536 {
            let name = named(args.pipeline_min_batch.is_some(), "--pipeline-min-batch", "pipeline_min_batch");
            return Err(format!("{name} must be in 0..=65536, got {pipeline_min_batch}"));
        }
        Ok(ServeConfig {
            data_dir,
            listen,
            shards,
            durability,
            token,
            admin_token,
            metrics,
            allow_remote,
            tls,
            ledger,
            limits,
            feed_events_max,
            snapshot_every_bytes,
            segment_size: segment_mib << 20,
            log_write,
            log_prefill,
            pipeline_min_batch,
            allow_clock_behind: args.allow_clock_behind,
        })
    }
}

/// Which listener an address is for.
#[derive(Clone, Copy)]
enum Listener {
    /// The ledger protocol, with or without TLS.
    Ledger { tls: bool },
    /// The metrics endpoint: plain HTTP, no authentication.
    Metrics,
}

/// Resolves `text` to one socket address, refusing non-loopback addresses unless TLS protects
/// the ledger protocol or the operator allowed it (`--allow-remote`).
fn resolve_addr(listener: Listener, text: &str, allow_remote: bool) -> Result<SocketAddr, String> {
    let flag = match listener {
        Listener::Ledger { .. } => "--listen",
        Listener::Metrics => "--metrics",
    };
    let addr = text
        .to_socket_addrs()
        .map_err(|e| {
            format!("{flag} {text:?} is not a usable address (expected HOST:PORT, e.g. {DEFAULT_LISTEN}): {e}")
        })?
        .next()
        .ok_or_else(|| format!("{flag} {text:?} resolves to no address"))?;
    if addr.ip().to_canonical().is_loopback() || allow_remote {
        return Ok(addr);
    }
    match listener {
        Listener::Ledger { tls: true } => Ok(addr),
        Listener::Ledger { tls: false } => Err(format!(
            "refusing to listen on non-loopback address {addr} ({flag} {text}) with no TLS: tokens and ledger \
             traffic would cross the network in clear text. Configure --tls-cert and --tls-key, or pass \
             --allow-remote to do it anyway (only on a trusted network, or inside WireGuard)"
        )),
        Listener::Metrics => Err(format!(
            "refusing to serve metrics on non-loopback address {addr} ({flag} {text}): the endpoint is plain \
             HTTP with no TLS and no authentication. Pass --allow-remote to do it anyway"
        )),
    }
}

/// Entry point of `stormledger serve`; returns the process exit status.
pub fn main(cli: &Cli, args: &ServeArgs) -> i32 {
    let config = match ServeConfig::resolve(cli, args) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("stormledger serve: {e}");
            return EXIT_USAGE;
        }
    };
    match run(config) {
        Ok(()) => EXIT_OK,
        Err(e) => {
            eprintln!("stormledger serve: {e}");
            EXIT_FAILURE
        }
    }
}

/// Why equal client and admin tokens are refused.
const SAME_TOKENS: &str = "the admin token must differ from the client token (otherwise every client is an operator)";

fn token_of(source: &TokenSource) -> Result<String, String> {
    match source {
        TokenSource::Given(t) => Ok(t.clone()),
        TokenSource::File(path) => token::load_or_create(path),
    }
}

/// The token `source` already has, creating nothing: the given one, or the content of its file
/// if the file exists.
fn existing_token(source: &TokenSource) -> Result<Option<String>, String> {
    match source {
        TokenSource::Given(t) => Ok(Some(t.clone())),
        TokenSource::File(path) => token::read(path),
    }
}

fn describe(source: &TokenSource) -> String {
    match source {
        TokenSource::Given(_) => "given".to_string(),
        TokenSource::File(path) => path.display().to_string(),
    }
}

/// Runs the server until a signal, then drains and shuts the node down.
///
/// A missing token file is created only once the node is open, which takes the data directory's
/// lock (`DIR/LOCK`): a second server refused by the lock leaves behind no token file that the
/// running server does not use. Existing token files are read (and checked) before the node
/// opens, so a bad one is reported before a long recovery, with nothing changed.
pub fn run(config: ServeConfig) -> Result<(), String> {
    let dir = &config.data_dir;
    std::fs::create_dir_all(dir).map_err(|e| format!("cannot create data directory {}: {e}", dir.display()))?;
    if let (Some(client), Some(admin)) = (existing_token(&config.token)?, existing_token(&config.admin_token)?) {
        if client == admin {
            return Err(SAME_TOKENS.into());
        }
    }
    if let Some(tls) = &config.tls {
        if let Ok(meta) = std::fs::metadata(&tls.key) {
            use std::os::unix::fs::MetadataExt;
            if meta.mode() & 0o077 != 0 {
                eprintln!(
                    "stormledger: warning: TLS key file {} is accessible by other users (mode {:o}); run chmod 600 on it",
                    tls.key.display(),
                    meta.mode() & 0o777
                );
            }
        }
    }

    let engine = EngineConfig {
        shards: config.shards,
        ledger: config.ledger.clone(),
        limits: config.limits.clone(),
        feed_events_max: config.feed_events_max,
        pipeline_min_batch: config.pipeline_min_batch,
        ..EngineConfig::default()
    };
    let node_config = NodeConfig {
        engine,
        durability: config.durability,
        segment_size: config.segment_size,
        log_write: config.log_write,
        log_prefill: config.log_prefill,
        snapshot_every_bytes: config.snapshot_every_bytes,
        allow_clock_behind: config.allow_clock_behind,
        ..NodeConfig::new(dir.clone())
    };
    let node = Node::open(node_config).map_err(|e| match e {
        NodeError::Locked { .. } => format!("{e}; stop that server or use another --data-dir"),
        e => format!("cannot open data directory {}: {e}", dir.display()),
    })?;
    let tokens = token_of(&config.token).and_then(|client| {
        let admin = token_of(&config.admin_token)?;
        if client == admin {
            return Err(SAME_TOKENS.to_string());
        }
        Ok((client, admin))
    });
    let (client_token, admin_token) = match tokens {
        Ok(tokens) => tokens,
        Err(e) => {
            node.shutdown();
            return Err(e);
        }
    };
    // What the node runs with: a data directory's recorded shard count and limits win.
    let limits = node.limits();
    eprintln!(
        "stormledger: data directory {}, {} shards (accounts_max {}, ids_max {} a shard), durability {}, log write {}, \
         log prefill {}, client token {}, admin token {}",
        dir.display(),
        node.engine().shards(),
        limits.accounts_max,
        limits.ids_max,
        config.durability.name(),
        config.log_write,
        if config.log_prefill { "on" } else { "off" },
        describe(&config.token),
        describe(&config.admin_token)
    );

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("stormledger-net")
        .build()
        .map_err(|e| format!("cannot start the async runtime: {e}"));
    let result = runtime.and_then(|runtime| {
        let engine = node.engine().clone();
        let result = runtime.block_on(serve(&config, engine, client_token, admin_token));
        // Connection tasks are finished (run drained them); drop stragglers such as metrics.
        runtime.shutdown_timeout(std::time::Duration::from_secs(5));
        result
    });
    eprintln!("stormledger: shutting down the node (draining queues, syncing logs)");
    node.shutdown();
    if result.is_ok() {
        eprintln!("stormledger: stopped");
    }
    result
}

async fn serve(
    config: &ServeConfig,
    engine: Arc<crate::engine::Engine>,
    client_token: String,
    admin_token: String,
) -> Result<(), String> {
    // Install the handlers before announcing readiness, so a signal sent right after the
    // `listening on` line is never lost (the default action would kill the process).
    let mut term = signal(SignalKind::terminate()).map_err(|e| format!("cannot install the SIGTERM handler: {e}"))?;
    let mut int = signal(SignalKind::interrupt()).map_err(|e| format!("cannot install the SIGINT handler: {e}"))?;

    let listener =
        TcpListener::bind(config.listen).await.map_err(|e| format!("cannot listen on {}: {e}", config.listen))?;
    let local = listener.local_addr().map_err(|e| format!("cannot read the listening address: {e}"))?;

    let mut server_config = ServerConfig::new(client_token);
    server_config.admin_token = Some(admin_token);
    server_config.tls = config.tls.as_ref().map(|tls| tls.config.clone());
    server_config.allow_remote_plaintext = config.allow_remote;
    let backend: Arc<dyn Backend> = engine.clone();
    let server = Server::new(backend, server_config).map_err(|e| e.to_string())?;

    let metrics_task = match config.metrics {
        Some(addr) => {
            let metrics_listener =
                TcpListener::bind(addr).await.map_err(|e| format!("cannot listen for metrics on {addr}: {e}"))?;
            let metrics_addr = metrics_listener.local_addr().map_err(|e| e.to_string())?;
            eprintln!("stormledger: metrics on http://{metrics_addr}/metrics");
            let source = Arc::new(metrics::Source::new(server.stats(), engine.clone()));
            Some(tokio::spawn(metrics::serve(metrics_listener, source)))
        }
        None => None,
    };

    match &config.tls {
        Some(tls) => eprintln!("stormledger: listening on {local} (TLS, certificate {})", tls.cert.display()),
        None => eprintln!("stormledger: listening on {local} (plaintext)"),
    }
    {
        let mut stdout = std::io::stdout().lock();
        writeln!(stdout, "listening on {local}").and_then(|()| stdout.flush()).map_err(|e| format!("stdout: {e}"))?;
    }

    let shutdown = async move {
        let which = tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        };
        eprintln!("stormledger: {which} received: no longer accepting connections, draining in-flight requests");
    };
    let result = server.run(listener, shutdown).await.map_err(|e| e.to_string());
    if let Some(task) = metrics_task {
        task.abort();
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn parse(args: &[&str]) -> (Cli, ServeArgs) {
        let cli = Cli::try_parse_from(args).unwrap();
        let super::super::args::Command::Serve(serve) = &cli.command else { panic!("not serve") };
        let serve = serve.clone();
        (cli, serve)
    }

    #[test]
    fn a_pack_no_one_can_buy_is_refused_for_a_new_directory_only() {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("stormledger.toml");
        std::fs::write(&config, "[ledger]\ntopup_presets_fen = [600, 99]\n").unwrap();
        let data = dir.path().join("data");
        let args = ["stormledger", "serve", "--config", config.to_str().unwrap(), "--data-dir", data.to_str().unwrap()];
        let (cli, serve) = parse(&args);
        let err = ServeConfig::resolve(&cli, &serve).unwrap_err();
        assert!(err.contains("0.99 yuan"), "{err}");
        // A directory that exists keeps the rules it stored (an earlier build accepted this
        // file): the same file still starts it.
        std::fs::create_dir_all(&data).unwrap();
        std::fs::write(data.join("cluster.json"), "{}").unwrap();
        assert!(ServeConfig::resolve(&cli, &serve).is_ok());
    }

    #[test]
    fn refuses_remote_without_allow_remote() {
        let (cli, args) = parse(&["stormledger", "serve", "--listen", "0.0.0.0:7878", "--data-dir", "/tmp/x"]);
        let err = ServeConfig::resolve(&cli, &args).unwrap_err();
        assert!(err.contains("no TLS") && err.contains("--allow-remote"), "{err}");
        let (cli, args) =
            parse(&["stormledger", "serve", "--listen", "0.0.0.0:7878", "--allow-remote", "--data-dir", "/tmp/x"]);
        assert!(ServeConfig::resolve(&cli, &args).is_ok());
    }

    #[test]
    fn tls_allows_a_remote_listen_but_not_remote_metrics() {
        let fixtures = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/tls");
        let (cert, key) = (format!("{fixtures}/server.pem"), format!("{fixtures}/server.key"));
        let tls = ["--tls-cert", cert.as_str(), "--tls-key", key.as_str()];
        let base = ["stormledger", "serve", "--listen", "0.0.0.0:7878", "--data-dir", "/tmp/x"];
        let (cli, args) = parse(&[&base[..], &tls[..]].concat());
        let config = ServeConfig::resolve(&cli, &args).unwrap();
        assert!(config.tls.is_some() && !config.allow_remote);
        // The metrics endpoint is plain HTTP whatever the ledger protocol does.
        let (cli, args) = parse(&[&base[..], &tls[..], &["--metrics", "0.0.0.0:9187"]].concat());
        let err = ServeConfig::resolve(&cli, &args).unwrap_err();
        assert!(err.contains("--metrics") && err.contains("--allow-remote"), "{err}");
        let (cli, args) = parse(&[&base[..], &tls[..], &["--metrics", "0.0.0.0:9187", "--allow-remote"]].concat());
        assert!(ServeConfig::resolve(&cli, &args).is_ok());
        // Half a TLS configuration is an error, whichever half.
        let (cli, args) = parse(&[&base[..], &tls[..2]].concat());
        assert!(ServeConfig::resolve(&cli, &args).unwrap_err().contains("--tls-key"));
        let (cli, args) = parse(&[&base[..], &tls[2..]].concat());
        assert!(ServeConfig::resolve(&cli, &args).unwrap_err().contains("--tls-cert"));
    }

    #[test]
    fn flags_override_file_which_overrides_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("s.toml");
        std::fs::write(
            &file,
            "data_dir = \"/srv/ledger\"\nlisten = \"127.0.0.1:9000\"\nshards = 3\ndurability = \"buffered\"\n\
             metrics = \"127.0.0.1:9100\"\nlog_write = \"mmap\"\nlog_prefill = false\npipeline_min_batch = 64\n\
             [ledger]\ncoins_per_yuan = 20\n",
        )
        .unwrap();
        let f = file.to_str().unwrap();
        let (cli, args) = parse(&["stormledger", "serve", "--config", f, "--shards", "2"]);
        let c = ServeConfig::resolve(&cli, &args).unwrap();
        assert_eq!(c.data_dir, PathBuf::from("/srv/ledger"));
        assert_eq!(c.listen, "127.0.0.1:9000".parse().unwrap());
        assert_eq!(c.shards, 2);
        assert_eq!(c.durability, Durability::Buffered);
        assert_eq!(c.log_write, LogWrite::Mmap);
        assert!(!c.log_prefill);
        assert_eq!(c.pipeline_min_batch, 64);
        assert_eq!(c.metrics, Some("127.0.0.1:9100".parse().unwrap()));
        assert_eq!(c.ledger.coins_per_yuan, 20);
        assert_eq!(c.token, TokenSource::File(PathBuf::from("/srv/ledger/auth.token")));
        assert_eq!(c.admin_token, TokenSource::File(PathBuf::from("/srv/ledger/admin.token")));

        let (cli, args) = parse(&["stormledger", "serve", "--config", f, "--log-write", "pwrite"]);
        assert_eq!(ServeConfig::resolve(&cli, &args).unwrap().log_write, LogWrite::Pwrite);
        let (cli, args) = parse(&["stormledger", "serve", "--config", f, "--log-prefill", "on"]);
        assert!(ServeConfig::resolve(&cli, &args).unwrap().log_prefill);
        let (cli, args) = parse(&["stormledger", "serve", "--config", f, "--pipeline-min-batch", "0"]);
        assert_eq!(ServeConfig::resolve(&cli, &args).unwrap().pipeline_min_batch, 0);
        let (cli, args) = parse(&["stormledger", "serve", "--config", f, "--pipeline-min-batch", "70000"]);
        assert!(ServeConfig::resolve(&cli, &args).unwrap_err().contains("--pipeline-min-batch"));
        std::fs::write(&file, "log_write = \"direct\"\n").unwrap();
        let (cli, args) = parse(&["stormledger", "serve", "--config", f]);
        let err = ServeConfig::resolve(&cli, &args).unwrap_err();
        assert!(err.contains("log_write") && err.contains("expected mmap or pwrite"), "{err}");

        std::fs::write(&file, "listen_addr = \"x\"\n").unwrap();
        let (cli, args) = parse(&["stormledger", "serve", "--config", f]);
        assert!(ServeConfig::resolve(&cli, &args).unwrap_err().contains("listen_addr"));
    }

    #[test]
    fn equal_given_tokens_are_a_configuration_error() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let d = data.to_str().unwrap();
        let (cli, args) = parse(&["stormledger", "--token", "same", "--admin-token", "same", "serve", "--data-dir", d]);
        assert_eq!(ServeConfig::resolve(&cli, &args).unwrap_err(), SAME_TOKENS);
        assert!(!data.exists(), "resolving touches nothing");
        if std::env::var_os("STORMLEDGER_TOKEN").is_some() || std::env::var_os("STORMLEDGER_ADMIN_TOKEN").is_some() {
            return; // the environment overrides the file's tokens; nothing more to check here
        }
        // From the config file too (a flag and the file, or both from the file).
        let file = dir.path().join("s.toml");
        std::fs::write(&file, "token = \"same\"\nadmin_token = \"same\"\n").unwrap();
        let f = file.to_str().unwrap();
        let (cli, args) = parse(&["stormledger", "serve", "--config", f, "--data-dir", d]);
        assert_eq!(ServeConfig::resolve(&cli, &args).unwrap_err(), SAME_TOKENS);
        let (cli, args) = parse(&["stormledger", "--token", "same", "serve", "--config", f, "--data-dir", d]);
        assert_eq!(ServeConfig::resolve(&cli, &args).unwrap_err(), SAME_TOKENS);
        let (cli, args) = parse(&["stormledger", "--admin-token", "other", "serve", "--config", f, "--data-dir", d]);
        let c = ServeConfig::resolve(&cli, &args).unwrap();
        assert_eq!((c.token, c.admin_token), (TokenSource::Given("same".into()), TokenSource::Given("other".into())));
        assert!(!data.exists(), "resolving touches nothing");
    }

    #[test]
    fn defaults() {
        let (cli, args) = parse(&["stormledger", "serve"]);
        if cli.data_dir.is_some() || cli.token.is_some() || args.listen.is_some() {
            return; // the environment sets STORMLEDGER_*; nothing to check here
        }
        let c = ServeConfig::resolve(&cli, &args).unwrap();
        assert_eq!(c.data_dir, PathBuf::from(DEFAULT_DATA_DIR));
        assert_eq!(c.listen, DEFAULT_LISTEN.parse().unwrap());
        assert_eq!(c.durability, Durability::Sync);
        assert_eq!(c.log_write, LogWrite::Pwrite);
        assert!(c.log_prefill);
        assert_eq!(c.pipeline_min_batch, 256);
        assert!(c.metrics.is_none());
    }
}
