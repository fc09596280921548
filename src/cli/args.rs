//! The command line, as clap sees it. Only parsing and the shape of the arguments live here;
//! `serve` and `client` give them meaning.
//!
//! Options that the server and the client share (`--data-dir`, `--token`, `--admin-token`) and
//! the client's `--connect`, `--json` and `--timeout` are global: they may be written before or
//! after the subcommand. Server options have no clap defaults on purpose, so that a value missing
//! from the command line and the environment can still come from the config file
//! (flags > environment > file > built-in defaults; see `serve::ServeConfig::resolve`).

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::ledger::amount::parse_yuan;
use crate::ledger::command::{AccountKind, Channel, FailReason};
use crate::node::Durability;
use crate::wal::LogWrite;

#[derive(Parser, Debug)]
#[command(
    name = "stormledger",
    version,
    about = "stormledger: the ledger server (`serve`) and its operator/client command line",
    after_help = "Exit status: 0 accepted (or read ok), 1 business rejection (the status is printed), \
                  2 usage error, 3 server unreachable or authentication failed (outcome unknown for writes)."
)]
pub struct Cli {
    /// Address of the server to talk to (client commands).
    #[arg(long, global = true, env = "STORMLEDGER_CONNECT", value_name = "ADDR", default_value = "127.0.0.1:7878")]
    pub connect: String,

    /// Client token (server: the token clients must present). Default: DIR/auth.token.
    #[arg(long, global = true, env = "STORMLEDGER_TOKEN", value_name = "TOKEN", hide_env_values = true)]
    pub token: Option<String>,

    /// Admin token, for `admin ...` commands (server: the token operators must present).
    /// Default: DIR/admin.token.
    #[arg(long, global = true, env = "STORMLEDGER_ADMIN_TOKEN", value_name = "TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,

    /// Data directory: the server's state, and where `auth.token` / `admin.token` are read from
    /// when no token is given. Default: ./data.
    #[arg(long, global = true, env = "STORMLEDGER_DATA_DIR", value_name = "DIR")]
    pub data_dir: Option<PathBuf>,

    /// Print each result as one JSON object on one line.
    #[arg(long, global = true)]
    pub json: bool,

    /// Client commands: connect over TLS, trusting the CA certificate(s) in this PEM file (only
    /// those; not the system's roots).
    #[arg(long, global = true, env = "STORMLEDGER_TLS_CA", value_name = "PEM")]
    pub tls_ca: Option<PathBuf>,

    /// Client commands with --tls-ca: the name the server's certificate must carry (DNS name or
    /// IP address) [default: the host part of --connect].
    #[arg(long, global = true, env = "STORMLEDGER_TLS_SERVER_NAME", value_name = "NAME")]
    pub tls_server_name: Option<String>,

    /// Client commands without --tls-ca: send the token in clear text to a server that is not
    /// on a loopback address (refused by default, exit 2: the token would cross the network).
    #[arg(long, global = true, env = "STORMLEDGER_ALLOW_REMOTE_PLAINTEXT")]
    pub allow_remote_plaintext: bool,

    /// Client commands: give up after this many seconds without an answer (exit 3).
    #[arg(long, global = true, env = "STORMLEDGER_TIMEOUT", value_name = "SECONDS", default_value_t = 30,
          value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub timeout: u64,

    /// Writes with an id (topup begin, tip, gift, pay, settle) and topup confirm: when the
    /// command was first sent, in ns since the Unix epoch [default: now]. To retry a write
    /// whose outcome was unknown (exit 3) or that was refused busy or maintenance, pass the
    /// `first_sent` its first attempt printed: a server that has forgotten the id by then
    /// refuses it `id_expired` instead of applying it a second time, and a confirmation first
    /// sent before its top-up's deadline still credits it.
    #[arg(long, global = true, value_name = "NS", value_parser = clap::value_parser!(u64).range(1..))]
    pub first_sent: Option<u64>,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the ledger server in the foreground.
    Serve(ServeArgs),
    /// Accounts.
    #[command(subcommand)]
    Account(AccountCmd),
    /// Payment methods.
    #[command(subcommand)]
    Method(MethodCmd),
    /// Top-ups (buying coins with money).
    #[command(subcommand)]
    Topup(TopupCmd),
    /// Tip a streamer.
    Tip(TipArgs),
    /// Buy a virtual gift for a streamer.
    Gift(GiftArgs),
    /// Pay for a paid event (coins) to a streamer.
    Pay(PayArgs),
    /// Sweep an account's earnings to payout.
    Settle(SettleArgs),
    /// Spending limits.
    #[command(subcommand)]
    Limit(LimitCmd),
    /// Current balance of an account (coins for wallets and earnings).
    Balance(BalanceArgs),
    /// An account's records, newest first.
    History(HistoryArgs),
    /// One command's record and result, by its id.
    Lookup(LookupArgs),
    /// Follow the event feed: committed events in order, resumable with --from POSITION.
    Watch(WatchArgs),
    /// Operator actions (use the admin token).
    #[command(subcommand)]
    Admin(AdminCmd),
}

#[derive(Args, Debug, Clone, Default)]
pub struct ServeArgs {
    /// Address to listen on [default: 127.0.0.1:7878]. Port 0 picks a free port; the actual
    /// address is printed on the `listening on ADDR` line.
    #[arg(long, env = "STORMLEDGER_LISTEN", value_name = "ADDR")]
    pub listen: Option<String>,

    /// Number of shards (1..=64) [default: number of cores].
    #[arg(long, env = "STORMLEDGER_SHARDS", value_name = "N")]
    pub shards: Option<u16>,

    /// sync: acknowledge after the log is on disk; buffered: after it is in the page cache
    /// (survives a process crash, not a power loss); memory: keep nothing on disk [default: sync].
    #[arg(long, env = "STORMLEDGER_DURABILITY", value_name = "MODE", value_parser = parse_durability)]
    pub durability: Option<Durability>,

    /// Accounts one shard can hold (user wallets + a stripe of every striped account)
    /// [default: 4194304]. Memory: ~110 bytes per account (README "Limits").
    #[arg(long, env = "STORMLEDGER_ACCOUNTS_MAX", value_name = "N")]
    pub accounts_max: Option<u32>,

    /// History entries kept in memory per shard (64 bytes each) [default: 1048576].
    #[arg(long, env = "STORMLEDGER_HISTORY_MAX", value_name = "N")]
    pub history_max: Option<u32>,

    /// Idempotency records kept per shard (~152 bytes each): the idempotency window
    /// [default: 1048576].
    #[arg(long, env = "STORMLEDGER_IDS_MAX", value_name = "N")]
    pub ids_max: Option<u32>,

    /// Events of the `watch` feed kept per shard (96 bytes each) [default: 1048576].
    #[arg(long, env = "STORMLEDGER_FEED_EVENTS_MAX", value_name = "N")]
    pub feed_events_max: Option<usize>,

    /// A shard takes a snapshot after this many MiB of log (0 = only on `admin snapshot`)
    /// [default: 512].
    #[arg(long, env = "STORMLEDGER_SNAPSHOT_EVERY_MIB", value_name = "MIB")]
    pub snapshot_every_mib: Option<u64>,

    /// Size of each pre-allocated log segment in MiB [default: 64].
    #[arg(long, env = "STORMLEDGER_SEGMENT_MIB", value_name = "MIB")]
    pub segment_mib: Option<u64>,

    /// How the log writes a batch into its memory-mapped segment: mmap (a copy into the
    /// mapping) or pwrite (the write system call; same bytes and durability, a cheaper sync:
    /// see docs/operations.md) [default: pwrite].
    #[arg(long, env = "STORMLEDGER_LOG_WRITE", value_name = "METHOD", value_parser = parse_log_write)]
    pub log_write: Option<LogWrite>,

    /// With --durability sync, zero-fill each spare log segment on a helper thread before the
    /// log reaches it, so that syncs overwrite written blocks instead of reserved ones (shorter
    /// syncs; the disk writes each segment twice; see docs/operations.md) [default: on].
    #[arg(long, env = "STORMLEDGER_LOG_PREFILL", value_name = "on|off", hide_possible_values = true,
          value_parser = clap::builder::BoolishValueParser::new())]
    pub log_prefill: Option<bool>,

    /// With --durability sync, a batch of at least N commands with more queued behind it is
    /// written and synced on the shard's log thread while the shard applies the batch before;
    /// smaller ones inline. 0: every batch through the log thread; above 8192: never
    /// [default: 256].
    #[arg(long, env = "STORMLEDGER_PIPELINE_MIN_BATCH", value_name = "N")]
    pub pipeline_min_batch: Option<usize>,

    /// TOML config file (keys as the long flags, with `_` for `-`; see docs/operations.md).
    #[arg(long, env = "STORMLEDGER_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// Serve Prometheus metrics over plain HTTP on this address (GET /metrics).
    #[arg(long, env = "STORMLEDGER_METRICS", value_name = "ADDR")]
    pub metrics: Option<String>,

    /// Serve TLS with this certificate chain (PEM, leaf first); needs --tls-key. With TLS,
    /// a non-loopback --listen needs no --allow-remote.
    #[arg(long, env = "STORMLEDGER_TLS_CERT", value_name = "PEM")]
    pub tls_cert: Option<PathBuf>,

    /// The private key of --tls-cert (PEM: PKCS#8, PKCS#1 or SEC1).
    #[arg(long, env = "STORMLEDGER_TLS_KEY", value_name = "PEM")]
    pub tls_key: Option<PathBuf>,

    /// Without TLS: allow a non-loopback --listen and take plaintext connections from
    /// non-loopback peers (tokens cross the network in clear text: only on a trusted network or
    /// inside WireGuard). Also needed for a non-loopback --metrics.
    #[arg(long, env = "STORMLEDGER_ALLOW_REMOTE", action = clap::ArgAction::SetTrue,
          value_parser = clap::builder::BoolishValueParser::new())]
    pub allow_remote: bool,

    /// Start even if this machine's clock is more than 60 s behind the newest command in the
    /// log (refused otherwise: commands would be stamped after the log's time until the clock
    /// caught up). A one-off override after checking the clock, so not a config file key.
    #[arg(long, env = "STORMLEDGER_ALLOW_CLOCK_BEHIND", action = clap::ArgAction::SetTrue,
          value_parser = clap::builder::BoolishValueParser::new())]
    pub allow_clock_behind: bool,
}

pub fn parse_log_write(s: &str) -> Result<LogWrite, String> {
    s.parse()
}

pub fn parse_durability(s: &str) -> Result<Durability, String> {
    s.parse()
}

/// A server address to connect to: `HOST:PORT` (a name, an IPv4 address or a bracketed IPv6
/// address, and a port 1-65535). Only its form is checked here, so that a typo is a usage error
/// (exit 2); whether the host resolves and answers is the connection's business (exit 3).
pub fn parse_host_port(s: &str) -> Result<String, String> {
    let expected = "expected HOST:PORT, e.g. 127.0.0.1:7878";
    let (host, port) = s.rsplit_once(':').ok_or_else(|| format!("no port ({expected})"))?;
    match port.parse::<u16>() {
        Ok(p) if p > 0 => {}
        _ => return Err(format!("port {port:?} is not 1-65535 ({expected})")),
    }
    let bare = host.strip_prefix('[').and_then(|h| h.strip_suffix(']'));
    let well_formed = match bare {
        Some(v6) => v6.parse::<std::net::Ipv6Addr>().is_ok(),
        None => !host.is_empty() && host.chars().all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '-' || c == '_'),
    };
    if !well_formed {
        return Err(format!("host {host:?} is not a name or an IP address ({expected})"));
    }
    Ok(s.to_string())
}

/// A yuan amount: a decimal string with at most 2 decimal places, parsed to fen.
fn parse_amount(s: &str) -> Result<u64, String> {
    parse_yuan(s).map_err(|e| format!("{e} (amounts are yuan, e.g. 30.00)"))
}

#[derive(Subcommand, Debug)]
pub enum AccountCmd {
    /// Open an account (a user can spend only once real-name verified and not a minor).
    Create {
        #[arg(long)]
        id: u64,
        #[arg(long, value_enum)]
        kind: KindArg,
        /// The user completed real-name verification.
        #[arg(long)]
        real_name: bool,
        /// The user is a minor (may not top up or spend).
        #[arg(long)]
        minor: bool,
        /// The union (agency) a streamer belongs to.
        #[arg(long, value_name = "ID")]
        union: Option<u64>,
    },
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum KindArg {
    User,
    Streamer,
    Union,
    Platform,
    Channel,
}

impl From<KindArg> for AccountKind {
    fn from(k: KindArg) -> AccountKind {
        match k {
            KindArg::User => AccountKind::User,
            KindArg::Streamer => AccountKind::Streamer,
            KindArg::Union => AccountKind::Union,
            KindArg::Platform => AccountKind::Platform,
            KindArg::Channel => AccountKind::Channel,
        }
    }
}

#[derive(Subcommand, Debug)]
pub enum MethodCmd {
    /// Bind a payment method to a user.
    Bind {
        #[arg(long, value_name = "ID")]
        user: u64,
        #[arg(long, value_name = "ID")]
        method: u64,
        #[arg(long, value_enum)]
        channel: ChannelArg,
    },
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChannelArg {
    #[value(name = "alipay")]
    Alipay,
    #[value(name = "wechat")]
    Wechat,
    #[value(name = "bank_card")]
    BankCard,
    #[value(name = "apple_iap")]
    AppleIap,
}

impl From<ChannelArg> for Channel {
    fn from(c: ChannelArg) -> Channel {
        match c {
            ChannelArg::Alipay => Channel::Alipay,
            ChannelArg::Wechat => Channel::Wechat,
            ChannelArg::BankCard => Channel::BankCard,
            ChannelArg::AppleIap => Channel::AppleIap,
        }
    }
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReasonArg {
    #[value(name = "insufficient_funds")]
    InsufficientFunds,
    #[value(name = "network_error")]
    NetworkError,
    #[value(name = "declined")]
    Declined,
    #[value(name = "timeout")]
    Timeout,
}

impl From<ReasonArg> for FailReason {
    fn from(r: ReasonArg) -> FailReason {
        match r {
            ReasonArg::InsufficientFunds => FailReason::ChannelInsufficientFunds,
            ReasonArg::NetworkError => FailReason::NetworkError,
            ReasonArg::Declined => FailReason::Declined,
            ReasonArg::Timeout => FailReason::Timeout,
        }
    }
}

#[derive(Subcommand, Debug)]
pub enum TopupCmd {
    /// Start a top-up (pending until the channel confirms or fails it).
    Begin {
        #[arg(long)]
        id: u64,
        #[arg(long, value_name = "ID")]
        user: u64,
        #[arg(long, value_name = "ID")]
        method: u64,
        /// Amount in yuan, at most 2 decimals (e.g. 30.00).
        #[arg(long, value_name = "YUAN", value_parser = parse_amount)]
        amount: u64,
    },
    /// The payment channel says the top-up was paid.
    Confirm {
        #[arg(long)]
        id: u64,
        /// The channel's transaction id (printable ASCII, at most 24 characters).
        #[arg(long, value_name = "TXN")]
        channel_txn: String,
        /// Amount in yuan the channel says was paid.
        #[arg(long, value_name = "YUAN", value_parser = parse_amount)]
        amount: u64,
    },
    /// The payment channel says the top-up failed.
    Fail {
        #[arg(long)]
        id: u64,
        #[arg(long, value_enum)]
        reason: ReasonArg,
    },
    /// State of a top-up: pending, succeeded, failed, expired or refunded.
    Status {
        #[arg(long)]
        id: u64,
    },
}

#[derive(Args, Debug)]
pub struct TipArgs {
    #[arg(long)]
    pub id: u64,
    #[arg(long, value_name = "USER")]
    pub from: u64,
    #[arg(long, value_name = "STREAMER")]
    pub to: u64,
    #[arg(long, value_name = "N")]
    pub coins: u64,
}

#[derive(Args, Debug)]
pub struct GiftArgs {
    #[arg(long)]
    pub id: u64,
    #[arg(long, value_name = "USER")]
    pub from: u64,
    #[arg(long, value_name = "STREAMER")]
    pub to: u64,
    /// Gift id from the catalog.
    #[arg(long, value_name = "GIFT")]
    pub gift: u64,
    #[arg(long, value_name = "K", default_value_t = 1)]
    pub count: u64,
}

#[derive(Args, Debug)]
pub struct PayArgs {
    #[arg(long)]
    pub id: u64,
    #[arg(long, value_name = "USER")]
    pub from: u64,
    #[arg(long, value_name = "STREAMER")]
    pub to: u64,
    #[arg(long, value_name = "EVENT")]
    pub event: u64,
    #[arg(long, value_name = "N")]
    pub coins: u64,
}

#[derive(Args, Debug)]
pub struct SettleArgs {
    #[arg(long)]
    pub id: u64,
    /// The streamer or union whose earnings are swept.
    #[arg(long, value_name = "ACCOUNT")]
    pub account: u64,
}

#[derive(Subcommand, Debug)]
pub enum LimitCmd {
    /// Set a user's daily spending cap (coins; at most the platform's default cap).
    Set {
        #[arg(long, value_name = "ID")]
        user: u64,
        #[arg(long, value_name = "N")]
        coins: u64,
    },
}

#[derive(Args, Debug)]
pub struct BalanceArgs {
    pub account: u64,
}

#[derive(Args, Debug)]
pub struct HistoryArgs {
    pub account: u64,
    /// Most records to return (the server may return fewer; page on with --before).
    #[arg(long, value_name = "N", default_value_t = 20,
          value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub limit: u32,
    /// Return records older than this cursor (the `next` of the previous page).
    #[arg(long, value_name = "CURSOR", value_parser = parse_cursor)]
    pub before: Option<Cursor>,
}

/// A history paging cursor: `TIMESTAMP:SHARD`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cursor {
    pub timestamp: u64,
    pub shard: u64,
}

impl core::fmt::Display for Cursor {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "{}:{}", self.timestamp, self.shard)
    }
}

pub fn parse_cursor(s: &str) -> Result<Cursor, String> {
    let bad = || format!("{s:?} is not a history cursor (expected TIMESTAMP:SHARD, as printed by `history`)");
    let (ts, shard) = s.split_once(':').ok_or_else(bad)?;
    let timestamp: u64 = ts.parse().map_err(|_| bad())?;
    let shard: u64 = shard.parse().map_err(|_| bad())?;
    if timestamp == 0 {
        return Err(bad());
    }
    Ok(Cursor { timestamp, shard })
}

#[derive(Args, Debug)]
pub struct LookupArgs {
    #[arg(long)]
    pub id: u64,
}

#[derive(Args, Debug)]
pub struct WatchArgs {
    /// Resume strictly after this position (`SHARD:LSN.INDEX,...` as printed in `position`),
    /// or `earliest` (everything the server retains) or `now` (the default: new events only).
    #[arg(long, value_name = "POSITION")]
    pub from: Option<String>,
    /// Stop (exit 0) after this many events (at least 1).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub limit: Option<u64>,
}

#[derive(Subcommand, Debug)]
pub enum AdminCmd {
    /// Pause (on) or resume (off) writes; reads keep working.
    Maintenance {
        #[arg(value_enum)]
        mode: OnOff,
    },
    /// Take a snapshot now.
    Snapshot,
    /// Freeze an account (it can neither pay nor be paid).
    Freeze { account: u64 },
    /// Unfreeze an account.
    Unfreeze { account: u64 },
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnOff {
    On,
    Off,
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn amounts_enforce_two_decimals() {
        assert_eq!(parse_amount("30.00"), Ok(3000));
        assert!(parse_amount("12.345").unwrap_err().contains("2 decimal places"));
        assert!(parse_amount("-1").is_err());
    }

    #[test]
    fn cursors_round_trip() {
        let c = Cursor { timestamp: 1_700_000_000_000_000_000, shard: 3 };
        assert_eq!(parse_cursor(&c.to_string()), Ok(c));
        assert!(parse_cursor("12").is_err());
        assert!(parse_cursor("0:1").is_err());
        assert!(parse_cursor("a:b").is_err());
    }

    #[test]
    fn global_options_go_before_or_after_the_command() {
        let cli = Cli::try_parse_from(["stormledger", "balance", "7", "--json", "--token", "t"]).unwrap();
        assert!(cli.json);
        assert_eq!(cli.token.as_deref(), Some("t"));
        let cli = Cli::try_parse_from(["stormledger", "--json", "--connect", "h:1", "balance", "7"]).unwrap();
        assert!(cli.json);
        assert_eq!(cli.connect, "h:1");
    }

    #[test]
    fn connect_takes_host_colon_port_only() {
        for ok in ["127.0.0.1:7878", "ledger-1.internal:7878", "[::1]:7878", "localhost:1"] {
            assert_eq!(parse_host_port(ok).as_deref(), Ok(ok), "{ok}");
        }
        for bad in ["notanaddr", "127.0.0.1:99999", "127.0.0.1:0", ":7878", "a b:1", "[zz]:1", "::1:x", ""] {
            assert!(parse_host_port(bad).is_err(), "{bad}");
        }
    }
}
