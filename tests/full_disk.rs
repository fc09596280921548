//! A real full disk under a running server. The data directory is a small tmpfs, mounted in a
//! private mount namespace (`unshare -Urm`: no root needed where user namespaces are enabled),
//! with room for the first log segment and its spare only. Tips are sent until the shard cannot
//! reserve its next segment: from then on writes are answered `unavailable` (the process does
//! not die of SIGBUS, nothing unacknowledged is half-applied) and reads keep working. Then the
//! operator makes room (the tmpfs is enlarged) and restarts: every acknowledged tip is there,
//! nothing refused is, the refused ids apply normally when retried, and writes work again.
//!
//! Where `unshare` cannot mount a tmpfs the test says so and passes without running; the
//! storage-level full-disk tests (`tests/wal.rs`) run everywhere.

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, ChildStdin, ChildStdout, Command as Process, Stdio};

use stormledger::client::Client;
use stormledger::layout::{text_field, CommandRecord};
use stormledger::ledger::command::flags;
use stormledger::ledger::{AccountKind, Channel, Command, Status};

const TOKEN: &str = "full-disk-test-token";
const USERS: u64 = 32;
const STREAMER: u64 = 1_000_001;
const UNION: u64 = 2_000_000;
const COINS_PER_TIP: u64 = 10;

/// Runs the server in a private mount namespace over a tmpfs of `$SMALL`; on a line from the
/// test, stops it (SIGTERM), enlarges the tmpfs to `$BIG` and starts it again.
const SCRIPT: &str = r#"
set -eu
mount -t tmpfs -o size="$SMALL" tmpfs "$DIR"
"$BIN" serve --data-dir "$DIR" --listen 127.0.0.1:0 --shards 1 --segment-mib 1 --token "$TOKEN" </dev/null &
pid=$!
read -r _
kill -TERM "$pid"
wait "$pid" || true
mount -o remount,size="$BIG" "$DIR"
exec "$BIN" serve --data-dir "$DIR" --listen 127.0.0.1:0 --shards 1 --segment-mib 1 --token "$TOKEN"
"#;

struct Namespace {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl Namespace {
    fn next_address(&mut self) -> String {
        let mut line = String::new();
        self.stdout.read_line(&mut line).unwrap();
        line.trim().strip_prefix("listening on ").unwrap_or_else(|| panic!("unexpected: {line:?}")).to_string()
    }
}

impl Drop for Namespace {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn can_mount_tmpfs(dir: &Path) -> bool {
    Process::new("unshare")
        .args(["-Urm", "sh", "-c", "mount -t tmpfs -o size=1m tmpfs \"$0\""])
        .arg(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

async fn submit(client: &Client, commands: &[Command]) -> Vec<Status> {
    let records: Vec<CommandRecord> = commands.iter().map(Command::to_record).collect();
    let replies = client.submit(records).await.expect("the server answers");
    replies.iter().map(|r| Status::from_code(r.status.get()).expect("a known status")).collect()
}

async fn balance(client: &Client, account: u64) -> i64 {
    let r = client.balance(account).await.unwrap();
    assert_eq!(r.status.get(), 0, "reads keep working");
    r.value.get()
}

fn tip(id: u64) -> Command {
    Command::Tip { id, from: 1 + id % USERS, to: STREAMER, coins: COINS_PER_TIP }
}

#[test]
fn a_full_disk_refuses_writes_keeps_reads_and_loses_nothing_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    if !can_mount_tmpfs(dir.path()) {
        eprintln!("skipped: `unshare -Urm` cannot mount a tmpfs here (no user namespaces?)");
        return;
    }
    // Room for the small files, the first segment and its spare: the first rollover, which
    // reserves the next spare, finds the disk full.
    let logs = tempfile::tempdir().unwrap();
    let stderr = std::fs::File::create(logs.path().join("stderr")).unwrap();
    let mut child = Process::new("unshare")
        .args(["-Urm", "sh", "-c", SCRIPT])
        .env("DIR", dir.path())
        .env("BIN", env!("CARGO_BIN_EXE_stormledger"))
        .env("TOKEN", TOKEN)
        .env("SMALL", "2112k")
        .env("BIG", "64m")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(stderr)
        .spawn()
        .expect("spawn unshare");
    let (stdin, stdout) = (child.stdin.take().unwrap(), BufReader::new(child.stdout.take().unwrap()));
    let mut namespace = Namespace { child, stdin, stdout };
    let addr = namespace.next_address();

    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let (acked, refused) = runtime.block_on(async {
        let client = Client::connect(addr.as_str(), TOKEN).await.unwrap();
        let mut setup = vec![Command::CreateAccount { account: UNION, kind: AccountKind::Union, flags: 0, union: 0 }];
        setup.push(Command::CreateAccount { account: STREAMER, kind: AccountKind::Streamer, flags: 0, union: UNION });
        for u in 1..=USERS {
            setup.push(Command::CreateAccount {
                account: u,
                kind: AccountKind::User,
                flags: flags::REAL_NAME,
                union: 0,
            });
            setup.push(Command::BindMethod { user: u, method: 1, channel: Channel::Alipay });
            setup.push(Command::TopUpBegin { id: 9_000_000 + u, user: u, method: 1, fen: 64_800 });
            let txn = text_field(&format!("T{u}")).unwrap();
            setup.push(Command::TopUpConfirm { id: 9_000_000 + u, fen: 64_800, channel_txn: txn, paid_by: 0 });
        }
        for c in setup {
            assert_eq!(submit(&client, &[c]).await, [Status::Ok], "{c:?}");
        }
        // Tips until the log cannot reserve its next segment (about 1 MiB of log).
        let (mut acked, mut refused) = (Vec::new(), Vec::new());
        let mut next = 1;
        while refused.is_empty() {
            assert!(next < 200_000, "the disk never filled");
            let batch: Vec<Command> = (next..next + 500).map(tip).collect();
            next += 500;
            for (c, status) in batch.iter().zip(submit(&client, &batch).await) {
                match status {
                    Status::Ok => acked.push(c.transfer_id().unwrap()),
                    Status::Unavailable => refused.push(c.transfer_id().unwrap()),
                    other => panic!("{c:?} answered {other:?}"),
                }
            }
        }
        assert!(acked.len() > 1_000, "the first segment filled before the refusal ({} tips)", acked.len());
        // From now on every write is refused, and reads see exactly the acknowledged tips.
        assert_eq!(submit(&client, &[tip(next)]).await, [Status::Unavailable]);
        refused.push(next);
        let spent = (acked.len() as u64 * COINS_PER_TIP) as i64;
        let mut funded = 0;
        for u in 1..=USERS {
            funded += balance(&client, u).await;
        }
        assert_eq!(funded, USERS as i64 * 6_480 - spent);
        assert_eq!(balance(&client, STREAMER).await, spent / 2);
        (acked, refused)
    });

    eprintln!("the disk filled after {} acknowledged tips; {} refused", acked.len(), refused.len());
    let log = std::fs::read_to_string(logs.path().join("stderr")).unwrap();
    assert!(log.contains("No space left on device"), "the server said why: {log}");
    log.lines().filter(|l| l.contains("No space")).for_each(|l| eprintln!("server: {l}"));
    // The operator makes room and restarts the server.
    writeln!(namespace.stdin, "restart").unwrap();
    let addr = namespace.next_address();
    runtime.block_on(async {
        let client = Client::connect(addr.as_str(), TOKEN).await.unwrap();
        let spent = (acked.len() as u64 * COINS_PER_TIP) as i64;
        assert_eq!(balance(&client, STREAMER).await, spent / 2, "every acknowledged tip, nothing refused");
        // An acknowledged tip sent again gets its original answer; a refused one applies now.
        let again = client.submit(vec![tip(acked[0]).to_record()]).await.unwrap();
        assert_eq!((again[0].status.get(), again[0].flags & 1), (0, 1), "a duplicate of the original ok");
        let retried: Vec<Command> = refused.iter().map(|&id| tip(id)).collect();
        assert!(submit(&client, &retried).await.iter().all(|s| *s == Status::Ok));
        let spent = spent + (refused.len() as u64 * COINS_PER_TIP) as i64;
        assert_eq!(balance(&client, STREAMER).await, spent / 2);
        let mut funded = 0;
        for u in 1..=USERS {
            funded += balance(&client, u).await;
        }
        assert_eq!(funded, USERS as i64 * 6_480 - spent);
    });
}
