//! The command line (the "Gift-storm tool" section of docs/INTERFACE: flags and JSON fields).

use std::path::PathBuf;

use clap::{ArgGroup, Parser};
use stormledger::node::Durability;

/// The gift-storm load generator and end-to-end checker.
///
/// Creates and funds the accounts it needs through the real API (accounts, bound methods,
/// two-phase top-ups), runs a storm of tips, gift purchases and balance reads, then reads back
/// every balance it touched and compares it with its own record of acknowledged commands.
/// Exit status: 0 verified, 1 not verified, 2 usage error, 3 server unreachable / spawn failed.
#[derive(Parser, Debug, Clone)]
#[command(name = "stormledger-storm", version)]
#[command(group(ArgGroup::new("target").required(true).args(["connect", "spawn", "engine"])))]
pub struct Args {
    /// Drive a running server over TCP at ADDR (only this address is ever contacted).
    #[arg(long, value_name = "ADDR", value_parser = stormledger::cli::args::parse_host_port)]
    pub connect: Option<String>,
    /// Client token for --connect (or STORMLEDGER_TOKEN) [default: the one in DIR/auth.token,
    /// see --data-dir].
    #[arg(long, env = "STORMLEDGER_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// For --connect without a token: the server's data directory, whose `auth.token` holds
    /// the client token (as the `stormledger` CLI reads it).
    #[arg(long, env = "STORMLEDGER_DATA_DIR", value_name = "DIR", default_value = "data")]
    pub data_dir: PathBuf,
    /// --connect over TLS, trusting the CA certificate(s) in this PEM file.
    #[arg(long, env = "STORMLEDGER_TLS_CA", value_name = "PEM")]
    pub tls_ca: Option<PathBuf>,
    /// --connect without --tls-ca to a server that is not on a loopback address: send the token
    /// in clear text anyway (refused by default).
    #[arg(long, env = "STORMLEDGER_ALLOW_REMOTE_PLAINTEXT")]
    pub allow_remote_plaintext: bool,
    /// With --tls-ca: the name the server's certificate must carry [default: the host of
    /// --connect].
    #[arg(long, env = "STORMLEDGER_TLS_SERVER_NAME", value_name = "NAME")]
    pub tls_server_name: Option<String>,
    /// Start `stormledger serve` on 127.0.0.1:0 with a temporary data directory, drive it over
    /// TCP, and stop it (SIGTERM) at the end.
    #[arg(long)]
    pub spawn: bool,
    /// Drive the engine in-process (no TCP), through the durable node facade.
    #[arg(long)]
    pub engine: bool,
    /// A server config file whose `[ledger]` table holds the business rules to check balances
    /// against (coins per yuan, shares, gift prices); the server of --spawn and the engine of
    /// --engine run with them. [default: for --connect, DIR/ledger.json (see --data-dir) if
    /// present, the rules the server stored; otherwise the built-in rules]
    #[arg(long, env = "STORMLEDGER_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// The `stormledger` binary for --spawn (default: next to this executable).
    #[arg(long, value_name = "PATH")]
    pub server_bin: Option<PathBuf>,
    /// Durability mode for --engine / --spawn: sync, buffered or memory
    /// (default: sync for --engine, the server's default for --spawn).
    #[arg(long, value_name = "MODE")]
    pub durability: Option<Durability>,
    /// Shards for --engine / --spawn (default: number of cores).
    #[arg(long)]
    pub shards: Option<u16>,
    /// User wallets (ids 1..=N).
    #[arg(long, default_value_t = 100_000)]
    pub users: u64,
    /// Streamers (streamer 0 is the hot one).
    #[arg(long, default_value_t = 1_000)]
    pub streamers: u64,
    /// Percent of tips that go to streamer 0.
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u32).range(0..=100))]
    pub hot_percent: u32,
    /// Storm length in seconds (default 10 unless --count is given; with both, whichever first).
    #[arg(long, value_name = "SECONDS")]
    pub duration: Option<f64>,
    /// Stop after this many write commands (tips and gifts).
    #[arg(long, value_name = "N")]
    pub count: Option<u64>,
    /// Open loop: this many operations (writes + reads) per second on a fixed schedule; latency
    /// is measured from each batch's intended send time. Without it: closed loop.
    #[arg(long, value_name = "PER_SEC")]
    pub rate: Option<f64>,
    /// Concurrent connections (for --engine: concurrent submitters).
    #[arg(long, default_value_t = 4)]
    pub connections: usize,
    /// Operations per batch (one frame of commands and one of reads).
    #[arg(long, default_value_t = 64)]
    pub batch: usize,
    /// Closed loop: batches each connection keeps in flight.
    #[arg(long, default_value_t = 8)]
    pub window: usize,
    /// Percent of operations that are balance reads.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(0..=100))]
    pub read_percent: u32,
    /// Read probe: this many single balance reads per second during the storm, each one round
    /// trip on a thread and connection of its own, timed from send to answer (`probe_read_*` in
    /// the report). 0: no probe; otherwise 1 to 100000.
    #[arg(long, value_name = "PER_SEC", default_value_t = 1000.0)]
    pub probe_reads: f64,
    /// Percent of writes that are gift purchases (the rest are tips).
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(0..=100))]
    pub gift_percent: u32,
    /// Percent of users funded with only --poor-yuan (they run out: insufficient_funds).
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(0..=100))]
    pub poor_percent: u32,
    /// Top-up of a poor user, in yuan.
    #[arg(long, default_value_t = 1)]
    pub poor_yuan: u64,
    /// Top-up of every other user, in yuan (10 coins per yuan by default, see --config).
    #[arg(long, default_value_t = 648)]
    pub topup_yuan: u64,
    /// Largest tip, in coins (tips are 1..=N).
    #[arg(long, default_value_t = 20)]
    pub tip_max: u64,
    /// Workload seed (accounts chosen, amounts, mix).
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// First write id (default: random per run, so runs against one server never collide).
    #[arg(long)]
    pub id_base: Option<u64>,
    /// Write `sent ID KIND FROM TO AMOUNT` / `ack ID STATUS` lines to FILE, flushed every 50 ms.
    #[arg(long, value_name = "FILE")]
    pub record: Option<PathBuf>,
    /// Print one JSON object as the last stdout line (no progress bar).
    #[arg(long)]
    pub json: bool,
}

impl Args {
    /// Checks relations clap cannot express; `Err` is a usage error.
    pub fn validate(&self) -> Result<(), String> {
        if self.users == 0 || self.users >= stormledger::workload::STREAMER_BASE {
            return Err("--users must be in 1..1000000000".into());
        }
        if self.streamers == 0 || self.streamers >= 1_000_000_000 {
            return Err("--streamers must be in 1..1000000000".into());
        }
        if self.shards.is_some_and(|n| !(1..=stormledger::engine::SHARDS_MAX).contains(&n)) {
            return Err(format!("--shards must be in 1..={}", stormledger::engine::SHARDS_MAX));
        }
        if self.connections == 0 || self.batch == 0 || self.window == 0 {
            return Err("--connections, --batch and --window must be at least 1".into());
        }
        if self.batch > stormledger::protocol::COMMANDS_PER_FRAME_MAX {
            return Err(format!("--batch must be at most {}", stormledger::protocol::COMMANDS_PER_FRAME_MAX));
        }
        if let Some(d) = self.duration {
            if !(d > 0.0 && d <= 86_400.0) {
                return Err("--duration must be in (0, 86400] seconds".into());
            }
        }
        // Below one per second a pause between probes would outlast a short storm (and a tiny
        // rate makes no representable pause at all).
        let probe = self.probe_reads;
        if !(probe == 0.0 || (super::probe::PER_SEC_MIN..=super::probe::PER_SEC_MAX).contains(&probe)) {
            return Err(format!(
                "--probe-reads must be 0 (no probe) or from {} to {} per second, not {probe}",
                super::probe::PER_SEC_MIN,
                super::probe::PER_SEC_MAX
            ));
        }
        if let Some(r) = self.rate {
            if !(1.0..=1e9).contains(&r) {
                return Err(format!("--rate must be from 1 to 1000000000 operations per second, not {r}"));
            }
        }
        if self.count == Some(0) {
            return Err("--count must be at least 1".into());
        }
        if self.count.is_some() && self.read_percent >= 100 {
            return Err("--count counts writes, and --read-percent 100 sends none: lower it, or use --duration".into());
        }
        const AMOUNT_MAX: u64 = 1_000_000_000_000;
        let amounts = [self.tip_max, self.topup_yuan, self.poor_yuan];
        if amounts.iter().any(|a| !(1..=AMOUNT_MAX).contains(a)) {
            return Err(format!("--tip-max, --topup-yuan and --poor-yuan must be in 1..={AMOUNT_MAX}"));
        }
        // Ids run from the base up, one a write: room for any run below 2^62.
        let ids = stormledger::workload::TIP_BASE..=1u64 << 62;
        if self.id_base.is_some_and(|base| !ids.contains(&base)) {
            return Err(format!("--id-base must be in {}..={}", ids.start(), ids.end()));
        }
        if self.connect.is_some() && (self.durability.is_some() || self.shards.is_some()) {
            return Err("--durability and --shards apply to --engine and --spawn only".into());
        }
        if self.connect.is_none() && self.tls_ca.is_some() {
            return Err("--tls-ca applies to --connect only".into());
        }
        if self.tls_ca.is_none() && self.tls_server_name.is_some() {
            return Err("--tls-server-name needs --tls-ca".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(extra: &[&str]) -> Args {
        let mut argv = vec!["stormledger-storm", "--engine"];
        argv.extend_from_slice(extra);
        Args::try_parse_from(argv).expect("parses")
    }

    #[test]
    fn probe_reads_is_off_or_at_least_one_per_second() {
        for ok in ["0", "1", "1.5", "1000", "100000"] {
            assert_eq!(parse(&[&format!("--probe-reads={ok}")]).validate(), Ok(()), "--probe-reads {ok}");
        }
        for bad in ["0.001", "1e-300", "0.999", "-1", "100001", "NaN", "inf"] {
            let e = parse(&[&format!("--probe-reads={bad}")]).validate().expect_err(bad);
            assert!(e.contains("--probe-reads"), "{bad}: {e}");
        }
        assert_eq!(parse(&[]).validate(), Ok(()), "the default");
    }

    #[test]
    fn a_rate_is_one_or_more_a_second_and_a_count_needs_writes() {
        for ok in ["1", "250000", "1e9"] {
            assert_eq!(parse(&[&format!("--rate={ok}")]).validate(), Ok(()), "--rate {ok}");
        }
        for bad in ["1e-300", "0.5", "0", "-1", "NaN", "inf", "1e10"] {
            let e = parse(&[&format!("--rate={bad}")]).validate().expect_err(bad);
            assert!(e.contains("--rate"), "{bad}: {e}");
        }
        for bad in ["--id-base=1", "--id-base=18446744073709551615", "--topup-yuan=18446744073709551615", "--tip-max=0"]
        {
            assert!(parse(&[bad]).validate().is_err(), "{bad}");
        }
        let e = parse(&["--count=10", "--read-percent=100"]).validate().expect_err("no writes to count");
        assert!(e.contains("--count"), "{e}");
        assert_eq!(parse(&["--count=10", "--read-percent=99"]).validate(), Ok(()));
    }
}
