//! The example programs (`examples/*.rs`) against a real `stormledger serve` child process: each
//! runs to completion with exit status 0 and prints what it promises. Every wait is bounded and
//! every child is killed on drop. Nothing here asserts a timing.
//!
//! The binaries are found next to this test's executable (`target/<profile>/examples/NAME`);
//! see `example` for how they are kept up to date.

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, OnceLock};
use std::time::{Duration, Instant};

const SERVER: &str = env!("CARGO_BIN_EXE_stormledger");
const WAIT: Duration = Duration::from_secs(60);

/// The path of the built example `name`.
///
/// `cargo test` builds the examples, but `cargo test --test examples` does not (and would run
/// stale binaries), so the first call runs `cargo build --examples` with this test's profile:
/// a no-op when they are up to date.
fn example(name: &str) -> PathBuf {
    static PROFILE_DIR: OnceLock<PathBuf> = OnceLock::new();
    let profile_dir = PROFILE_DIR.get_or_init(|| {
        let exe = std::env::current_exe().expect("current_exe");
        // target/<profile>/deps/examples-HASH -> target/<profile>
        let dir = exe.parent().and_then(Path::parent).expect("target/<profile>/deps").to_path_buf();
        let profile = match dir.file_name().and_then(|n| n.to_str()) {
            Some("debug") | None => "test".to_string(),
            Some(other) => other.to_string(),
        };
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml");
        let mut build = Command::new(cargo);
        // Without the variables cargo sets for this test: build scripts that watch them (ring's)
        // would otherwise run again, and the outer `cargo test` would then rebuild them too.
        for (key, _) in std::env::vars_os() {
            let key = key.to_string_lossy();
            let set_for_tests = ["CARGO_PKG_", "CARGO_MANIFEST_", "CARGO_BIN_", "CARGO_CRATE_"]
                .iter()
                .any(|prefix| key.starts_with(prefix))
                || ["CARGO_PRIMARY_PACKAGE", "CARGO_TARGET_TMPDIR", "CARGO_RUSTC_CURRENT_DIR", "OUT_DIR"]
                    .contains(&key.as_ref());
            if set_for_tests {
                build.env_remove(key.as_ref());
            }
        }
        let status = build
            .args(["build", "--quiet", "--examples", "--profile", &profile, "--manifest-path"])
            .arg(&manifest)
            .status()
            .expect("run cargo build --examples");
        assert!(status.success(), "cargo build --examples --profile {profile} failed");
        dir
    });
    let path = profile_dir.join("examples").join(name);
    assert!(path.exists(), "example {name} not found at {}", path.display());
    path
}

/// A command with no `STORMLEDGER_*` variables inherited from the environment.
fn clean(program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut cmd = Command::new(program);
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("STORMLEDGER_") {
            cmd.env_remove(key);
        }
    }
    cmd
}

/// Lines of a child's stdout as they come, read on a thread.
fn lines(stdout: impl Read + Send + 'static) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        // Keeps reading after the receiver is gone: a child must never fail writing its output.
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    rx
}

/// A child process, killed (and reaped) on drop, also when a test panics.
struct Process(Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Process {
    /// Waits for the exit, bounded; `(exit code, stdout lines, stderr)`.
    fn finish(mut self, stdout: mpsc::Receiver<String>) -> (i32, Vec<String>, String) {
        let deadline = Instant::now() + WAIT;
        let status = loop {
            if let Some(status) = self.0.try_wait().expect("try_wait") {
                break status;
            }
            assert!(Instant::now() < deadline, "the example did not finish in time");
            std::thread::sleep(Duration::from_millis(20));
        };
        let mut stderr = String::new();
        if let Some(mut pipe) = self.0.stderr.take() {
            let _ = pipe.read_to_string(&mut stderr);
        }
        (status.code().unwrap_or(-1), stdout.iter().collect(), stderr)
    }
}

/// A `stormledger serve` on a temporary data directory (in memory, 2 shards, any free port).
struct Server {
    _process: Process,
    addr: String,
    metrics: String,
    dir: tempfile::TempDir,
}

impl Server {
    fn start() -> Server {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut cmd = clean(SERVER);
        cmd.args(["serve", "--listen", "127.0.0.1:0", "--metrics", "127.0.0.1:0", "--durability", "memory"])
            .args(["--shards", "2", "--data-dir"])
            .arg(dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("spawn the server");
        let (stdout, stderr) = (child.stdout.take().unwrap(), child.stderr.take().unwrap());
        let process = Process(child);
        // stdout: `listening on ADDR`; stderr: `stormledger: metrics on http://ADDR/metrics`.
        let line = lines(stdout).recv_timeout(WAIT).expect("the server did not start");
        let addr = line.strip_prefix("listening on ").unwrap_or_else(|| panic!("unexpected line {line:?}")).to_string();
        let stderr = lines(stderr);
        let metrics = loop {
            let line = stderr.recv_timeout(WAIT).expect("no metrics address from the server");
            if let Some(rest) = line.strip_prefix("stormledger: metrics on http://") {
                break rest.trim_end_matches("/metrics").to_string();
            }
        };
        Server { _process: process, addr, metrics, dir }
    }

    /// Starts example `name` against this server (token from the data directory).
    fn spawn(&self, name: &str, args: &[&str]) -> (Process, mpsc::Receiver<String>) {
        let mut cmd = clean(example(name));
        cmd.args(["--connect", &self.addr, "--data-dir"])
            .arg(self.dir.path())
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().unwrap_or_else(|e| panic!("spawn example {name}: {e}"));
        let stdout = lines(child.stdout.take().unwrap());
        (Process(child), stdout)
    }

    /// Runs example `name` to completion and returns its stdout lines; it must exit with 0.
    fn run(&self, name: &str, args: &[&str]) -> Vec<String> {
        let (process, stdout) = self.spawn(name, args);
        let (code, lines, stderr) = process.finish(stdout);
        assert_eq!(code, 0, "{name} {args:?} failed:\n{}\n{stderr}", lines.join("\n"));
        lines
    }
}

/// The line starting with `prefix`.
fn line<'a>(lines: &'a [String], prefix: &str) -> &'a str {
    lines.iter().find(|l| l.starts_with(prefix)).unwrap_or_else(|| panic!("no line {prefix:?} in {lines:#?}"))
}

/// The `n`th word of the line starting with `prefix`.
fn word(lines: &[String], prefix: &str, n: usize) -> String {
    let line = line(lines, prefix);
    let word = line.split_whitespace().nth(n).unwrap_or_else(|| panic!("no word {n} in {line:?}"));
    word.trim_end_matches(':').to_string()
}

#[test]
fn wallet_credits_a_repeated_callback_once_and_watch_sees_its_events() {
    let server = Server::start();

    // A subscriber from now on, running while the wallet example runs.
    let (watcher, events) = server.spawn("watch", &["--limit", "2"]);
    let first = events.recv_timeout(WAIT).expect("watch did not subscribe");
    assert!(first.starts_with("watching from "), "{first}");

    let out = server.run("wallet", &[]);
    assert_eq!(line(&out, "confirm callback:"), "confirm callback: ok duplicate=false coins=300 balance=300");
    assert_eq!(
        line(&out, "confirm callback again:"),
        "confirm callback again: ok duplicate=true coins=300 balance=300"
    );
    assert!(line(&out, "user ").ends_with("balance: 300 coins (credited once)"), "{out:#?}");
    assert_eq!(line(&out, "balances:"), "balances: user 200, streamer 50, union 10");
    assert!(line(&out, "tip ").contains("100 coins"), "{out:#?}");
    let refused = out.iter().find(|l| l.contains("insufficient_funds")).expect("an insufficient_funds line");
    assert!(refused.ends_with("insufficient_funds (balance in the reply: 200)"), "{refused}");
    let topup = word(&out, "top-up ", 1);
    let tip = word(&out, "tip ", 1);

    // The committed events: the top-up credited once (the repeated callback and the refused tip
    // are not events), then the tip with its split.
    let (code, watched, stderr) = watcher.finish(events);
    assert_eq!(code, 0, "{watched:#?} {stderr}");
    assert_eq!(watched.len(), 3, "{watched:#?}");
    assert!(watched[0].contains(&format!(" topup_succeeded id={topup} ")), "{watched:#?}");
    assert!(watched[0].ends_with(" amount=3000 coins=300"), "{watched:#?}");
    assert!(watched[1].contains(&format!(" tip id={tip} ")), "{watched:#?}");
    assert!(watched[1].contains(" amount=100 ") && watched[1].contains(" streamer_share=50 "), "{watched:#?}");
    assert!(watched[2].starts_with("resume with --from "), "{watched:#?}");

    // Resuming after the first event's cursor gives the second, and nothing before it.
    let after_topup = watched[0].split_whitespace().next().unwrap();
    let resumed = server.run("watch", &["--from", after_topup, "--limit", "1"]);
    assert_eq!(resumed.len(), 3, "{resumed:#?}");
    assert_eq!(resumed[1], watched[1]);

    // Ids are new on every run: the example runs again against the same server.
    let again = server.run("wallet", &[]);
    assert_eq!(line(&again, "balances:"), "balances: user 200, streamer 50, union 10");
    let earliest = server.run("watch", &["--from", "earliest", "--limit", "4"]);
    assert_eq!(earliest.iter().filter(|l| l.contains(" topup_succeeded ")).count(), 2, "{earliest:#?}");
}

#[test]
fn gift_storm_applies_every_tip_once_and_retry_gets_the_original_results() {
    let server = Server::start();

    let args = ["--tips", "20000", "--users", "200", "--tasks", "64", "--metrics", &server.metrics];
    let out = server.run("gift_storm", &args);
    assert!(out.iter().any(|l| l == "  ok: 20000"), "{out:#?}");
    assert_eq!(out.iter().filter(|l| l.starts_with("  ")).count(), 1, "only ok: {out:#?}");
    assert!(line(&out, "the server received ").contains(" frames: "), "{out:#?}");
    assert_eq!(out.last().map(String::as_str), Some("every tip applied exactly once"));

    let out = server.run("retry", &["--tips", "10"]);
    assert_eq!(line(&out, "answered after "), "answered after 2 connections");
    assert_eq!(
        line(&out, "10 tips ok"),
        "10 tips ok, 10 of them answered as duplicates (applied on the lost connection)"
    );
    assert!(out.iter().any(|l| l.starts_with("user ") && l.ends_with("coins (10 spent)")), "{out:#?}");
    assert_eq!(out.last().map(String::as_str), Some("every tip applied exactly once"));
}
