//! The memory the server holds for answers its clients do not read is bounded: per connection and
//! across connections, however many frames the clients send.
//!
//! A counting global allocator measures the heap bytes live in this process (server, engine and
//! the test's clients), so these tests have a test binary of their own and run one at a time.
//! Each measures after the server has stopped making progress (no frame read or written for a
//! while); no test asserts a duration.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use stormledger::client::Client;
use stormledger::engine::{Engine, EngineConfig};
use stormledger::layout::QueryRecord;
use stormledger::ledger::command::flags;
use stormledger::ledger::{AccountKind, Command, Status};
use stormledger::protocol::{Frame, FrameReader, FrameWriter, Hello, Payload, Role, QUERY_KIND_HISTORY};
use stormledger::server::{Backend, Server, ServerConfig, ServerStats};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;

struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE.fetch_add(new_size as isize - layout.size() as isize, Ordering::Relaxed);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

const TOKEN: &str = "tok";
const MIB: isize = 1 << 20;
/// The account whose history every stuck connection asks for: 2 000 entries, so each query of a
/// frame of 16 is answered with the most one frame can carry (about 1 MiB per frame).
const ACCOUNT: u64 = 7;

/// Held by each test for its whole run: the count is process-wide.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn live() -> isize {
    LIVE.load(Ordering::Relaxed)
}

/// An in-memory engine with `ACCOUNT`'s history filled, served with `configure`d settings.
async fn serve(configure: impl FnOnce(&mut ServerConfig)) -> (std::net::SocketAddr, Arc<ServerStats>) {
    let engine = Arc::new(Engine::in_memory(EngineConfig { shards: 1, ..EngineConfig::default() }).unwrap());
    engine.execute(&[
        Command::CreateAccount { account: ACCOUNT, kind: AccountKind::User, flags: flags::REAL_NAME, union: 0 },
        Command::CreateAccount { account: 1_000_000, kind: AccountKind::Streamer, flags: 0, union: 0 },
    ]);
    let tips: Vec<Command> = (1..=2000).map(|id| Command::Tip { id, from: ACCOUNT, to: 1_000_000, coins: 1 }).collect();
    assert!(engine.execute(&tips).iter().all(|r| r.status.get() == Status::InsufficientFunds.code()));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let backend: Arc<dyn Backend> = engine;
    let mut config = ServerConfig::new(TOKEN);
    // Longer than any test: a connection that does not read is never dropped while measured.
    config.write_timeout = Duration::from_secs(600);
    configure(&mut config);
    let server = Server::new(backend, config).unwrap();
    let stats = server.stats();
    tokio::spawn(server.run(listener, std::future::pending::<()>()));
    (addr, stats)
}

/// A raw connection that authenticates, then only writes.
struct Stuck {
    reader: FrameReader<OwnedReadHalf>,
    writer: FrameWriter<OwnedWriteHalf>,
}

impl Stuck {
    async fn open(addr: std::net::SocketAddr) -> Stuck {
        let (read, write) = TcpStream::connect(addr).await.unwrap().into_split();
        let mut stuck = Stuck { reader: FrameReader::new(read), writer: FrameWriter::new(write) };
        let hello = Hello { role: Role::Client, token: TOKEN.as_bytes().to_vec() };
        stuck.writer.write_frame(&Frame::new(0, Payload::Hello(hello))).await.unwrap();
        assert!(matches!(stuck.reader.read_frame().await.unwrap().unwrap().payload, Payload::AuthOk(_)));
        // A Ping answered means the connection's reader and writer tasks are running.
        stuck.writer.write_frame(&Frame::new(1, Payload::Ping)).await.unwrap();
        assert!(matches!(stuck.reader.read_frame().await.unwrap().unwrap().payload, Payload::Pong));
        stuck
    }

    /// Sends up to `frames` frames of 16 history queries, never reading; stops early once the
    /// server no longer takes them (the socket buffers are full). Returns the bytes sent.
    async fn flood(&mut self, frames: u64) -> usize {
        let mut query = QueryRecord { kind: QUERY_KIND_HISTORY, ..QueryRecord::default() };
        query.key.set(ACCOUNT);
        let mut sent = 0;
        for request_id in 2..2 + frames {
            let frame = Frame::new(request_id, Payload::Query(vec![query; 16]));
            match tokio::time::timeout(Duration::from_millis(500), self.writer.write_frame(&frame)).await {
                Ok(Ok(())) => sent += 40 + 16 * 32,
                _ => break,
            }
        }
        sent
    }
}

/// Waits until the server has neither read nor written a frame for a while (every connection
/// that does not read is stuck), then returns the live heap bytes above `before`.
async fn held_once_quiet(stats: &ServerStats, before: isize) -> isize {
    let mut last = None;
    let mut quiet = 0;
    let mut polls = 0;
    while quiet < 40 && polls < 2_000 {
        tokio::time::sleep(Duration::from_millis(25)).await;
        polls += 1;
        let snapshot = stats.snapshot();
        let now = Some((snapshot.frames_received, snapshot.frames_sent));
        if now == last {
            quiet += 1;
        } else {
            quiet = 0;
            last = now;
        }
    }
    live() - before
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_that_never_reads_holds_a_bounded_amount_of_answers() {
    let _alone = ONE_AT_A_TIME.lock().await;
    let (addr, stats) = serve(|_| {}).await;
    let mut stuck = Stuck::open(addr).await;
    let before = live();
    let sent = stuck.flood(200).await;
    let held = held_once_quiet(&stats, before).await;
    eprintln!("the client wrote {sent} bytes; the server now holds {} KiB more", held >> 10);
    // The default budget is 4 MiB per connection; the rest is the connection's buffers.
    assert!(held < 8 * MIB, "one connection that never reads pins {} MiB", held >> 20);

    // Meanwhile another connection is served: the stuck one holds only its own budget.
    let client = Client::connect(addr, TOKEN).await.unwrap();
    let mut query = QueryRecord { kind: QUERY_KIND_HISTORY, ..QueryRecord::default() };
    query.key.set(ACCOUNT);
    let answers = client.queries(vec![query; 16]).await.expect("answered while the other connection is stuck");
    assert!(answers.iter().all(|answer| answer.history.len() == 1000), "full pages");
    drop(stuck);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_that_never_read_hold_at_most_the_server_wide_budget() {
    const CONNECTIONS: usize = 6;
    const SERVER_BUDGET: usize = 6 << 20;
    let _alone = ONE_AT_A_TIME.lock().await;
    let (addr, stats) = serve(|config| config.answer_bytes_max = SERVER_BUDGET).await;
    let mut stuck = Vec::new();
    for _ in 0..CONNECTIONS {
        stuck.push(Stuck::open(addr).await);
    }
    let before = live();
    let mut sent = 0;
    for connection in &mut stuck {
        sent += connection.flood(100).await;
    }
    let held = held_once_quiet(&stats, before).await;
    eprintln!("{CONNECTIONS} clients wrote {sent} bytes; the server now holds {} KiB more", held >> 10);
    // Per connection alone, 6 x 4 MiB; the server-wide budget keeps it to 6 MiB plus buffers.
    assert!(
        held < SERVER_BUDGET as isize + 4 * MIB,
        "{CONNECTIONS} connections that never read pin {} MiB",
        held >> 20
    );

    // Once they are gone the budget is back: a new client is served.
    drop(stuck);
    let client = Client::connect(addr, TOKEN).await.unwrap();
    let mut query = QueryRecord { kind: QUERY_KIND_HISTORY, ..QueryRecord::default() };
    query.key.set(ACCOUNT);
    let answers = client.queries(vec![query; 16]).await.expect("answered once the stuck connections closed");
    assert!(answers.iter().all(|answer| answer.history.len() == 1000), "full pages");
}
