//! What the examples share: finding the server and its token the way the `stormledger` CLI does,
//! ids that are new on every run, and reading a `ReplyRecord`.
//!
//! Not an example itself (cargo builds only `examples/*.rs`); each example has `mod common;`.

// Each example uses a different part of this module.
#![allow(dead_code)]

use std::path::PathBuf;

use stormledger::client::{ClientConfig, TlsClientConfig};
use stormledger::layout::ReplyRecord;
use stormledger::ledger::Status;

/// The error type of the examples: anything printable. `main` prints it and exits with status 1.
pub type Error = Box<dyn std::error::Error + Send + Sync>;

/// `ReplyRecord::flags` bit 0: this reply is the stored result of an earlier command with the
/// same id (docs/protocol.md, "ReplyRecord").
pub const DUPLICATE: u8 = 1;

/// Where the server is and how to authenticate: the same flags and environment variables as the
/// `stormledger` CLI, with the same defaults.
#[derive(clap::Args, Debug)]
pub struct Connect {
    /// Address of the server.
    #[arg(long, env = "STORMLEDGER_CONNECT", value_name = "ADDR", default_value = "127.0.0.1:7878")]
    pub connect: String,

    /// Client token. Default: the one the server wrote to DIR/auth.token.
    #[arg(long, env = "STORMLEDGER_TOKEN", value_name = "TOKEN", hide_env_values = true)]
    pub token: Option<String>,

    /// The server's data directory, where `auth.token` is read from when no token is given.
    #[arg(long, env = "STORMLEDGER_DATA_DIR", value_name = "DIR", default_value = "./data")]
    pub data_dir: PathBuf,

    /// Connect over TLS, trusting the CA certificate(s) in this PEM file.
    #[arg(long, env = "STORMLEDGER_TLS_CA", value_name = "PEM")]
    pub tls_ca: Option<PathBuf>,
}

impl Connect {
    /// The client settings: the token, and TLS if `--tls-ca` was given (the certificate must name
    /// the host part of `--connect`).
    pub fn config(&self) -> Result<ClientConfig, Error> {
        let token = match &self.token {
            Some(token) => token.clone(),
            None => {
                let path = self.data_dir.join("auth.token");
                let text = std::fs::read_to_string(&path).map_err(|e| {
                    format!("no token: pass --token, set STORMLEDGER_TOKEN or --data-dir ({}: {e})", path.display())
                })?;
                text.trim().to_string()
            }
        };
        let mut config = ClientConfig::new(token);
        if let Some(ca) = &self.tls_ca {
            let name = stormledger::tls::default_server_name(&self.connect);
            config.tls = Some(TlsClientConfig::from_ca_file(ca, name)?);
        }
        Ok(config)
    }
}

/// A base for this run's ids: nanoseconds since the Unix epoch (below the reserved range
/// `1 << 62` until the year 2116). A run that uses `n` ids takes far longer than `n` ns, so runs
/// one after the other never share an id, and the example can run again and again against the
/// same server.
pub fn fresh_ids() -> u64 {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock after 1970");
    now.as_nanos() as u64
}

/// The status of a reply (`Status::Ok`, `Status::InsufficientFunds`, ...). A newer server may
/// send a code this version does not know: that is an error of unknown cause.
pub fn status(reply: &ReplyRecord) -> Result<Status, Error> {
    let code = reply.status.get();
    Status::from_code(code).ok_or_else(|| format!("unknown status code {code} for id {}", reply.id.get()).into())
}

/// Whether the reply is the original result of an earlier command with the same id.
pub fn is_duplicate(reply: &ReplyRecord) -> bool {
    reply.flags & DUPLICATE != 0
}

/// Fails with `what` and the reply unless its status is `ok`.
pub fn expect_ok(what: &str, reply: &ReplyRecord) -> Result<(), Error> {
    match status(reply)? {
        Status::Ok => Ok(()),
        other => Err(format!("{what}: {other} (code {}, value {})", other.code(), reply.value.get()).into()),
    }
}

/// Fails with `message` unless `condition` holds.
pub fn check(condition: bool, message: impl Into<String>) -> Result<(), Error> {
    if condition {
        Ok(())
    } else {
        Err(message.into().into())
    }
}

/// Runs `main` on a multi-threaded runtime; prints the error and exits with status 1 if it fails.
pub fn run<F>(name: &str, main: F) -> std::process::ExitCode
where
    F: std::future::Future<Output = Result<(), Error>>,
{
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("{name}: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(main) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{name}: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
