//! `--spawn`: runs `stormledger serve --listen 127.0.0.1:0 --data-dir <tempdir> --token <random>`,
//! waits for its `listening on ADDR` line, and stops it with SIGTERM at the end.

use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use stormledger::config::LedgerConfig;
use stormledger::node::Durability;

/// How long the server may take to print `listening on`.
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// How long it may take to exit after SIGTERM before it is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(60);

pub struct Spawned {
    child: Child,
    pub addr: String,
    pub token: String,
    /// Removed when the run ends (after the server has stopped).
    _data_dir: tempfile::TempDir,
    /// The config file holding the `[ledger]` rules the server was started with, if not the
    /// built-in ones.
    _config: Option<tempfile::NamedTempFile>,
}

/// The `stormledger` binary: `explicit`, or next to the current executable (or its parent, for
/// test binaries that live in `deps/`).
pub fn server_binary(explicit: Option<PathBuf>) -> Result<PathBuf, String> {
    if let Some(path) = explicit {
        return if path.is_file() { Ok(path) } else { Err(format!("{}: no such file", path.display())) };
    }
    let exe = std::env::current_exe().map_err(|e| format!("cannot find the current executable: {e}"))?;
    let name = format!("stormledger{}", std::env::consts::EXE_SUFFIX);
    let mut dir = exe.parent();
    while let Some(d) = dir {
        let candidate = d.join(&name);
        if candidate.is_file() {
            return Ok(candidate);
        }
        if d.file_name().is_some_and(|n| n != "deps") {
            break;
        }
        dir = d.parent();
    }
    Err(format!("no {name} next to {}; build it (cargo build) or pass --server-bin", exe.display()))
}

fn durability_name(d: Durability) -> &'static str {
    match d {
        Durability::Sync => "sync",
        Durability::Buffered => "buffered",
        Durability::InMemory => "memory",
    }
}

/// A random hex token (not cryptographic; the server only listens on loopback for this run).
pub fn random_token() -> String {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
    let mut rng = stormledger::workload::SplitMix64(nanos ^ ((std::process::id() as u64) << 32));
    format!("storm-{:016x}{:016x}", rng.next_u64(), rng.next_u64())
}

/// The config file of a server run with `ledger` as its rules, and nothing else.
fn ledger_config_file(ledger: &LedgerConfig) -> Result<tempfile::NamedTempFile, String> {
    #[derive(serde::Serialize)]
    struct OnlyLedger<'a> {
        ledger: &'a LedgerConfig,
    }
    let text = toml::to_string(&OnlyLedger { ledger }).map_err(|e| format!("cannot encode the [ledger] rules: {e}"))?;
    let mut file = tempfile::Builder::new()
        .prefix("stormledger-storm-")
        .suffix(".toml")
        .tempfile()
        .map_err(|e| format!("cannot create a temporary config file: {e}"))?;
    file.write_all(text.as_bytes()).map_err(|e| format!("cannot write a temporary config file: {e}"))?;
    Ok(file)
}

pub fn spawn(
    bin: PathBuf,
    durability: Option<Durability>,
    shards: Option<u16>,
    ledger: Option<&LedgerConfig>,
) -> Result<Spawned, String> {
    let config = ledger.map(ledger_config_file).transpose()?;
    let data_dir = tempfile::Builder::new()
        .prefix("stormledger-storm-")
        .tempdir()
        .map_err(|e| format!("cannot create a temporary data directory: {e}"))?;
    let token = random_token();
    let mut command = Command::new(&bin);
    command
        .arg("serve")
        .arg("--listen")
        .arg("127.0.0.1:0")
        .arg("--data-dir")
        .arg(data_dir.path())
        .arg("--token")
        .arg(&token)
        .env_remove("STORMLEDGER_TOKEN")
        // Not the caller's config file: its listen address, tokens or TLS files are not this run's.
        .env_remove("STORMLEDGER_CONFIG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(d) = durability {
        command.arg("--durability").arg(durability_name(d));
    }
    if let Some(n) = shards {
        command.arg("--shards").arg(n.to_string());
    }
    if let Some(file) = &config {
        command.arg("--config").arg(file.path());
    }
    let mut child = command.spawn().map_err(|e| format!("cannot start {}: {e}", bin.display()))?;
    let (tx, rx) = mpsc::channel::<String>();
    // Both streams are read to the end (forwarded to our stderr) so the server never blocks on
    // a full pipe; the first `listening on ADDR` line, on either stream, gives the address.
    let stdout = child.stdout.take().expect("piped");
    let stderr = child.stderr.take().expect("piped");
    for (stream, tx) in [(Box::new(stdout) as Box<dyn std::io::Read + Send>, tx.clone()), (Box::new(stderr), tx)] {
        std::thread::spawn(move || {
            for line in BufReader::new(stream).lines() {
                let Ok(line) = line else { break };
                if let Some(rest) = line.split("listening on ").nth(1) {
                    let addr = rest.split_whitespace().next().unwrap_or("").to_string();
                    let _ = tx.send(addr);
                }
                eprintln!("server: {line}");
            }
        });
    }
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        match rx.recv_timeout(Duration::from_millis(100)) {
            Ok(addr) if !addr.is_empty() => {
                return Ok(Spawned { child, addr, token, _data_dir: data_dir, _config: config })
            }
            Ok(_) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) | Err(mpsc::RecvTimeoutError::Timeout) => {
                if let Ok(Some(status)) = child.try_wait() {
                    return Err(format!("{} serve exited before listening: {status}", bin.display()));
                }
                if Instant::now() > deadline {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(format!("{} serve printed no `listening on` line in {START_TIMEOUT:?}", bin.display()));
                }
            }
        }
    }
}

impl Spawned {
    /// SIGTERM, then waits (killing it after `STOP_TIMEOUT`).
    pub fn stop(mut self) -> Result<ExitStatus, String> {
        // SAFETY: kill(2) on the pid of a child we started and have not reaped yet.
        unsafe {
            libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM);
        }
        let deadline = Instant::now() + STOP_TIMEOUT;
        loop {
            match self.child.try_wait() {
                Ok(Some(status)) => return Ok(status),
                Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
                Ok(None) => {
                    let _ = self.child.kill();
                    let _ = self.child.wait();
                    return Err(format!("server did not exit within {STOP_TIMEOUT:?} of SIGTERM; killed"));
                }
                Err(e) => return Err(format!("waiting for the server: {e}")),
            }
        }
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
