//! Crash test: a real `stormledger serve` process is killed with SIGKILL at seeded random
//! moments while several clients drive tips, top-ups and settlements; after each restart every
//! acknowledged command must be there with its result, every in-doubt command must resolve to
//! one consistent answer when retried with its id, balances must equal the model built from the
//! answers, and `stormledger-recover verify` must pass at the end. The server runs with 1 MiB
//! segments, and every other cycle asks for a snapshot mid-storm, so kills also land in
//! snapshot writes and restarts load snapshots and replay the log after them. The restarts
//! take turns at the log write method and at how eagerly batches go through the log thread.
//!
//! Cycles: 20 by default; STORMLEDGER_CRASH_CYCLES=N for more, STORMLEDGER_CRASH_SEED=S to
//! reproduce a run (the seed is printed).

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command as Process, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use stormledger::client::Client;
use stormledger::layout::{text_field, QueryRecord, ReplyRecord};
use stormledger::ledger::command::{flags, kind};
use stormledger::ledger::{AccountKind, Channel, Command, Status};
use stormledger::workload::SplitMix64;

mod common;

const TOKEN: &str = "crash-test-client-token";
const ADMIN: &str = "crash-test-admin-token";
const USERS: u64 = 40;
const STREAMERS: [u64; 2] = [1_000_001, 1_000_002];
const UNION: u64 = 2_000_000;

struct Server {
    child: Child,
    addr: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `log_write`: how the log writes its segments, and `pipeline`: from how many commands a batch
/// is written on the shard's log thread while the batch before is applied (0: every batch).
/// The crash test alternates both between restarts on the same data directory: the files are
/// the same either way.
fn start(dir: &Path, (log_write, pipeline): (&str, &str)) -> Server {
    let mut child = Process::new(env!("CARGO_BIN_EXE_stormledger"))
        .args(["serve", "--listen", "127.0.0.1:0", "--shards", "2", "--durability", "sync"])
        .args(["--log-write", log_write, "--pipeline-min-batch", pipeline])
        // Small segments and frequent snapshots: kills also land in snapshot writes, log
        // rollovers and retirement, and restarts load snapshots.
        .args(["--segment-mib", "1", "--snapshot-every-mib", "1"])
        .args(["--token", TOKEN, "--admin-token", ADMIN, "--data-dir"])
        .arg(dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn stormledger serve");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let addr = line.trim().strip_prefix("listening on ").unwrap_or_else(|| panic!("unexpected: {line:?}")).to_string();
    Server { child, addr }
}

fn kill9(server: &mut Server) {
    // SAFETY: sending a signal to our own child process.
    unsafe { libc::kill(server.child.id() as i32, libc::SIGKILL) };
    let _ = server.child.wait();
}

async fn admin_snapshot(addr: String) {
    let mut config = stormledger::client::ClientConfig::new(ADMIN);
    config.role = stormledger::protocol::Role::Admin;
    if let Ok(admin) = Client::connect_with(addr.as_str(), config).await {
        let record = stormledger::layout::CommandRecord { kind: kind::SNAPSHOT, ..Default::default() };
        // Its answer does not matter (the kill may cut it off); the restarts check the result.
        let _ = admin.submit(vec![record]).await;
    }
}

/// What the test knows about one id: the command and, once answered, its reply.
#[derive(Default)]
struct Book {
    commands: BTreeMap<u64, (Command, Option<ReplyRecord>)>,
}

impl Book {
    fn sent(&mut self, c: Command) {
        self.commands.insert(c.transfer_id().unwrap(), (c, None));
    }
    fn answered(&mut self, id: u64, r: ReplyRecord) {
        let entry = self.commands.get_mut(&id).unwrap();
        if let Some(previous) = entry.1 {
            // A retry must give the same answer as the original acknowledgement.
            assert_eq!((previous.status.get(), previous.value.get()), (r.status.get(), r.value.get()), "id {id}");
        }
        entry.1 = Some(r);
    }
}

fn status(r: &ReplyRecord) -> Status {
    Status::from_code(r.status.get()).unwrap()
}

async fn submit(client: &Client, book: &Mutex<Book>, commands: Vec<Command>) -> bool {
    for c in &commands {
        book.lock().unwrap().sent(*c);
    }
    match client.submit(commands.iter().map(|c| c.to_record()).collect()).await {
        Ok(replies) => {
            let mut book = book.lock().unwrap();
            for (c, r) in commands.iter().zip(replies) {
                if !status(&r).is_retryable() {
                    book.answered(c.transfer_id().unwrap(), r);
                }
            }
            true
        }
        Err(_) => false,
    }
}

async fn setup(addr: &str) {
    let client = Client::connect(addr, TOKEN).await.unwrap();
    let mut cmds = vec![Command::CreateAccount { account: UNION, kind: AccountKind::Union, flags: 0, union: 0 }];
    for s in STREAMERS {
        cmds.push(Command::CreateAccount { account: s, kind: AccountKind::Streamer, flags: 0, union: UNION });
    }
    for u in 1..=USERS {
        cmds.push(Command::CreateAccount { account: u, kind: AccountKind::User, flags: flags::REAL_NAME, union: 0 });
        cmds.push(Command::BindMethod { user: u, method: 1, channel: Channel::Alipay });
    }
    for c in cmds {
        let r = client.submit(vec![c.to_record()]).await.unwrap();
        assert_eq!(status(&r[0]), Status::Ok, "{c:?}");
    }
}

/// Drives the workload until the connection dies; ids come from `next_id`.
async fn drive(addr: String, book: Arc<Mutex<Book>>, seed: u64, next_id: Arc<std::sync::atomic::AtomicU64>) {
    let Ok(client) = Client::connect(addr.as_str(), TOKEN).await else { return };
    let client = Arc::new(client);
    let id = move || next_id.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let mut tasks = Vec::new();
    for t in 0..3u64 {
        let (client, book, id) = (client.clone(), book.clone(), id.clone());
        tasks.push(tokio::spawn(async move {
            let mut rng = SplitMix64(seed ^ (t + 1));
            loop {
                let batch: Vec<Command> = (0..10)
                    .map(|_| Command::Tip {
                        id: id(),
                        from: 1 + rng.below(USERS),
                        to: STREAMERS[rng.below(2) as usize],
                        coins: 1 + rng.below(30),
                    })
                    .collect();
                if !submit(&client, &book, batch).await {
                    return;
                }
            }
        }));
    }
    {
        let (client, book, id) = (client.clone(), book.clone(), id.clone());
        tasks.push(tokio::spawn(async move {
            let mut rng = SplitMix64(seed ^ 99);
            loop {
                let topup = id();
                let user = 1 + rng.below(USERS);
                let begin = Command::TopUpBegin { id: topup, user, method: 1, fen: 600 };
                if !submit(&client, &book, vec![begin]).await {
                    return;
                }
                let confirm = Command::TopUpConfirm {
                    id: topup,
                    fen: 600,
                    channel_txn: text_field(&format!("T{topup}")).unwrap(),
                    paid_by: 0,
                };
                if client.submit(vec![confirm.to_record()]).await.is_err() {
                    return;
                }
            }
        }));
    }
    {
        let (client, book, id) = (client.clone(), book.clone(), id.clone());
        tasks.push(tokio::spawn(async move {
            let mut n = 0u64;
            loop {
                tokio::time::sleep(Duration::from_millis(15)).await;
                n += 1;
                let settle = Command::Settle { id: id(), account: STREAMERS[(n % 2) as usize] };
                if !submit(&client, &book, vec![settle]).await {
                    return;
                }
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
}

/// Retries every in-doubt command with its id, and confirms every begun top-up (a retried
/// confirm is harmless: the top-up's state answers it).
async fn resolve(addr: &str, book: &Mutex<Book>) {
    let client = Client::connect(addr, TOKEN).await.unwrap();
    let pending: Vec<Command> =
        book.lock().unwrap().commands.values().filter(|(_, r)| r.is_none()).map(|(c, _)| *c).collect();
    for chunk in pending.chunks(100) {
        let replies = client.submit(chunk.iter().map(|c| c.to_record()).collect()).await.unwrap();
        let mut book = book.lock().unwrap();
        for (c, r) in chunk.iter().zip(replies) {
            assert!(!status(&r).is_retryable(), "{c:?} -> {:?}", status(&r));
            book.answered(c.transfer_id().unwrap(), r);
        }
    }
    // Every acknowledged command is present with its result.
    let acked: Vec<(u64, ReplyRecord)> =
        book.lock().unwrap().commands.iter().filter_map(|(id, (_, r))| r.map(|r| (*id, r))).collect();
    for chunk in acked.chunks(200) {
        let queries = chunk
            .iter()
            .map(|(id, _)| {
                let mut q = QueryRecord { kind: 3, ..QueryRecord::default() };
                q.key.set(*id);
                q
            })
            .collect();
        let answers = client.queries(queries).await.unwrap();
        for ((id, acked), answer) in chunk.iter().zip(answers) {
            assert_eq!(answer.reply.status.get(), acked.status.get(), "lookup of acknowledged id {id}");
        }
    }
}

async fn confirm_all(addr: &str, book: &Mutex<Book>) -> BTreeMap<u64, i64> {
    let client = Client::connect(addr, TOKEN).await.unwrap();
    let topups: Vec<u64> = book
        .lock()
        .unwrap()
        .commands
        .iter()
        .filter(|(_, (c, r))| matches!(c, Command::TopUpBegin { .. }) && r.is_some_and(|r| r.status.get() == 0))
        .map(|(id, _)| *id)
        .collect();
    let mut credited = BTreeMap::new();
    for id in topups {
        let confirm =
            Command::TopUpConfirm { id, fen: 600, channel_txn: text_field(&format!("T{id}")).unwrap(), paid_by: 0 };
        let r = client.submit(vec![confirm.to_record()]).await.unwrap();
        assert_eq!(status(&r[0]), Status::Ok, "confirm of top-up {id} (a duplicate gets its original result)");
        let Command::TopUpBegin { user, .. } = book.lock().unwrap().commands[&id].0 else { unreachable!() };
        *credited.entry(user).or_insert(0) += r[0].value.get();
    }
    credited
}

fn expected(book: &Book, credited: &BTreeMap<u64, i64>) -> BTreeMap<u64, i64> {
    let mut balances: BTreeMap<u64, i64> = BTreeMap::new();
    for (user, coins) in credited {
        *balances.entry(*user).or_default() += coins;
    }
    for (c, r) in book.commands.values() {
        common::apply_to_model(&mut balances, c, &r.expect("every command resolved"), UNION);
    }
    balances
}

#[test]
fn kill_dash_nine_mid_storm_loses_nothing_acknowledged() {
    let cycles: u64 = std::env::var("STORMLEDGER_CRASH_CYCLES").ok().and_then(|v| v.parse().ok()).unwrap_or(20);
    let seed: u64 = std::env::var("STORMLEDGER_CRASH_SEED").ok().and_then(|v| v.parse().ok()).unwrap_or(0x5eed);
    eprintln!("crash test: {cycles} cycles, seed {seed} (STORMLEDGER_CRASH_SEED to reproduce)");
    let dir = tempfile::tempdir().unwrap();
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let book = Arc::new(Mutex::new(Book::default()));
    let next_id = Arc::new(std::sync::atomic::AtomicU64::new(1));
    let mut rng = SplitMix64(seed);

    // The storm of cycle c runs on a server writing its log with this method: two cycles each
    // way, so the kills of both land with and without a snapshot being written; and every
    // batch through the log thread in cycles 0-3, 8-11, ..., the default's in the others.
    let server_flags = |cycle: u64| {
        let method = if (cycle / 2).is_multiple_of(2) { "mmap" } else { "pwrite" };
        (method, if (cycle / 4).is_multiple_of(2) { "0" } else { "256" })
    };
    let mut server = start(dir.path(), server_flags(0));
    runtime.block_on(setup(&server.addr));
    for cycle in 0..cycles {
        let drive = runtime.spawn(drive(server.addr.clone(), book.clone(), seed.wrapping_add(cycle), next_id.clone()));
        let (before, after) = (30 + rng.below(100), rng.below(100));
        std::thread::sleep(Duration::from_millis(before));
        // Every other cycle asks for a snapshot mid-storm: the kill may land in its write, and
        // later restarts load snapshots and retire the log behind them.
        if cycle % 2 == 1 {
            runtime.spawn(admin_snapshot(server.addr.clone()));
        }
        std::thread::sleep(Duration::from_millis(after));
        kill9(&mut server);
        runtime
            .block_on(async { tokio::time::timeout(Duration::from_secs(30), drive).await })
            .expect("clients stop")
            .ok();
        server = start(dir.path(), server_flags(cycle + 1));
        runtime.block_on(resolve(&server.addr, &book));
    }
    let credited = runtime.block_on(confirm_all(&server.addr, &book));
    let expected = expected(&book.lock().unwrap(), &credited);
    let acked = book.lock().unwrap().commands.len();
    assert!(acked > 100, "the storm ran ({acked} commands)");
    runtime.block_on(async {
        let client = Client::connect(server.addr.as_str(), TOKEN).await.unwrap();
        for (account, coins) in &expected {
            let r = client.balance(*account).await.unwrap();
            assert_eq!(r.value.get(), *coins, "balance of {account}");
        }
    });
    // A clean stop, then the recovery path the offline tool uses checks every checksum and
    // the money invariants of every shard.
    // SAFETY: a signal to our own child.
    unsafe { libc::kill(server.child.id() as i32, libc::SIGTERM) };
    assert!(server.child.wait().unwrap().success(), "SIGTERM exits 0");
    let (cluster, ledger) = stormledger::node::read_data_dir(dir.path()).unwrap().unwrap();
    let limits = stormledger::config::ShardLimits::default();
    for shard in 0..cluster.shards {
        let loaded = stormledger::node::load_shard(dir.path(), shard, cluster.shards, &ledger, &limits, &mut |_| {})
            .unwrap_or_else(|e| panic!("shard {shard}: {e}"));
        assert_eq!(loaded.state.invariant_violations(), Vec::<String>::new());
        eprintln!(
            "shard {shard}: loads from {} + {} commands",
            loaded.snapshot_path.map_or("genesis".into(), |p| p.display().to_string()),
            loaded.commands_replayed
        );
    }
}
