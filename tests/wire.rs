//! The server over real sockets on 127.0.0.1:0, driven with raw frame bytes, against an in-memory
//! mock backend; then the client against the same server.
//!
//! No test asserts a wall-clock duration: timeouts are configured short and tests only check
//! what happens once they fire. Every read is bounded by `DEADLINE` so a bug fails, not hangs.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use stormledger::client::{Client, ClientConfig, ClientError};
use stormledger::layout::{CommandRecord, HistoryRecord, QueryRecord, ReplyRecord};
use stormledger::protocol::{
    ErrorCode, Frame, FrameHeader, FrameKind, FrameReader, Hello, Payload, QueryAnswer, Role, BODY_BYTES_MAX,
    HEADER_SIZE, QUERY_KIND_BALANCE, QUERY_KIND_HISTORY, QUERY_KIND_LOOKUP,
};
use stormledger::server::{self, AnswerCallback, Backend, ReplyCallback, Server, ServerConfig};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, IntoBytes};

const TOKEN: &str = "client-secret";
const ADMIN_TOKEN: &str = "admin-secret";
const DEADLINE: Duration = Duration::from_secs(20);
/// Command flag understood by the mock: hold the batch until `release` is called.
const HOLD: u8 = 0x80;
/// Command flag understood by the mock: drop the callback without answering (a backend bug).
const DROP: u8 = 0x40;

// ---------------------------------------------------------------------------------------------
// Mock backend

type Held = (Vec<CommandRecord>, ReplyCallback);

#[derive(Default)]
struct Mock {
    balances: Mutex<HashMap<u64, i64>>,
    /// Size of every batch `submit` received, in order.
    submits: Mutex<Vec<usize>>,
    held: Mutex<Vec<Held>>,
    hold_all: AtomicBool,
}

impl Mock {
    fn answer(commands: &[CommandRecord]) -> Vec<ReplyRecord> {
        commands
            .iter()
            .map(|command| ReplyRecord {
                status: U16::new(0),
                kind: command.kind,
                id: command.id,
                value: (command.id.get() as i64 * 2).into(),
                ..ReplyRecord::default()
            })
            .collect()
    }

    fn release(&self) {
        self.hold_all.store(false, Ordering::SeqCst);
        let held: Vec<Held> = self.held.lock().drain(..).collect();
        for (commands, done) in held {
            done(Mock::answer(&commands));
        }
    }

    fn held_count(&self) -> usize {
        self.held.lock().len()
    }

    fn submitted(&self) -> usize {
        self.submits.lock().iter().sum()
    }
}

impl Backend for Mock {
    fn submit(&self, commands: Vec<CommandRecord>, done: ReplyCallback) {
        self.submits.lock().push(commands.len());
        if commands.iter().any(|command| command.flags & DROP != 0) {
            return;
        }
        if self.hold_all.load(Ordering::SeqCst) || commands.iter().any(|command| command.flags & HOLD != 0) {
            self.held.lock().push((commands, done));
            return;
        }
        // Answer from another thread, as the engine would.
        std::thread::spawn(move || done(Mock::answer(&commands)));
    }

    fn balance(&self, account: u64) -> ReplyRecord {
        let mut reply = ReplyRecord { id: U64::new(account), ..ReplyRecord::default() };
        match self.balances.lock().get(&account) {
            Some(balance) => reply.value = (*balance).into(),
            None => reply.status = U16::new(1),
        }
        reply
    }

    fn query(&self, query: QueryRecord, done: AnswerCallback) {
        let mut answer = QueryAnswer::reply(ReplyRecord { id: query.key, ..ReplyRecord::default() });
        match query.kind {
            QUERY_KIND_HISTORY => {
                let count = query.limit.get().min(3) as u64;
                answer.history = (0..count)
                    .map(|i| HistoryRecord { id: U64::new(query.key.get() * 10 + i), ..HistoryRecord::default() })
                    .collect();
                answer.next_before_ts = 99;
            }
            QUERY_KIND_LOOKUP => {
                answer.command = Some(CommandRecord { id: query.key, kind: 7, ..CommandRecord::default() });
            }
            _ => answer.reply.status = U16::new(1),
        }
        std::thread::spawn(move || done(answer));
    }
}

// ---------------------------------------------------------------------------------------------
// Harness

struct TestServer {
    addr: std::net::SocketAddr,
    mock: Arc<Mock>,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
    stats: Arc<server::ServerStats>,
}

impl TestServer {
    async fn start(configure: impl FnOnce(&mut ServerConfig)) -> TestServer {
        let mut config = ServerConfig::new(TOKEN);
        config.admin_token = Some(ADMIN_TOKEN.to_string());
        configure(&mut config);
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let mock = Arc::new(Mock::default());
        mock.balances.lock().insert(1, 500);
        let server = Server::new(mock.clone(), config).expect("valid config");
        let stats = server.stats();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            server.run(listener, async move { drop(stopped.await) }).await.expect("server runs");
        });
        TestServer { addr, mock, stop: Some(stop), task, stats }
    }

    async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        tokio::time::timeout(DEADLINE, self.task).await.expect("server drains").expect("no panic");
    }
}

/// A raw connection: bytes out, frames in.
struct RawConn {
    write: tokio::net::tcp::OwnedWriteHalf,
    read: FrameReader<tokio::net::tcp::OwnedReadHalf>,
}

impl RawConn {
    async fn open(addr: std::net::SocketAddr) -> RawConn {
        let stream = TcpStream::connect(addr).await.expect("connect");
        let (read, write) = stream.into_split();
        RawConn { write, read: FrameReader::new(read) }
    }

    async fn authed(addr: std::net::SocketAddr) -> RawConn {
        let mut conn = RawConn::open(addr).await;
        conn.send(&hello(Role::Client, TOKEN)).await;
        let frame = conn.next().await.expect("auth answer");
        assert!(matches!(frame.payload, Payload::AuthOk(_)), "{frame:?}");
        conn
    }

    async fn send(&mut self, bytes: &[u8]) {
        self.write.write_all(bytes).await.expect("write");
    }

    /// The next frame, or None at end of stream (or reset).
    async fn next(&mut self) -> Option<Frame> {
        // A reset after an error frame counts as the end of the stream.
        tokio::time::timeout(DEADLINE, self.read.read_frame()).await.expect("frame within deadline").unwrap_or_default()
    }

    /// Asserts the next frame is an Error with `code`, and that the server then closes.
    async fn expect_error_then_close(&mut self, code: ErrorCode) -> Frame {
        let frame = self.next().await.expect("an error frame before the close");
        match &frame.payload {
            Payload::Error(error) => assert_eq!(error.code, code, "{error:?}"),
            other => panic!("expected error {code}, got {other:?}"),
        }
        assert_eq!(self.next().await, None, "the server closes after the error");
        frame
    }
}

fn encode(frame: Frame) -> Vec<u8> {
    let mut bytes = Vec::new();
    frame.encode(&mut bytes).expect("encodable");
    bytes
}

fn hello(role: Role, token: &str) -> Vec<u8> {
    encode(Frame::new(0, Payload::Hello(Hello { role, token: token.as_bytes().to_vec() })))
}

fn command(id: u64, kind: u8, flags: u8) -> CommandRecord {
    CommandRecord { kind, flags, id: U64::new(id), c: U64::new(100), ..CommandRecord::default() }
}

fn commands_frame(request_id: u64, commands: Vec<CommandRecord>) -> Vec<u8> {
    encode(Frame::new(request_id, Payload::Commands(commands)))
}

/// A valid commands frame with its header changed by `mutate` and re-sealed (header crc valid).
fn resealed(mutate: impl FnOnce(&mut FrameHeader)) -> Vec<u8> {
    let mut bytes = commands_frame(9, vec![command(1, 1, 0)]);
    let (mut header, _) = FrameHeader::read_from_prefix(&bytes).expect("header");
    mutate(&mut header);
    header.seal();
    bytes[..HEADER_SIZE].copy_from_slice(header.as_bytes());
    bytes
}

fn replies_of(frame: &Frame) -> &[ReplyRecord] {
    match &frame.payload {
        Payload::Replies(replies) => replies,
        other => panic!("expected replies, got {other:?}"),
    }
}

async fn eventually(mut condition: impl FnMut() -> bool) {
    tokio::time::timeout(DEADLINE, async {
        while !condition() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("condition within deadline");
}

// ---------------------------------------------------------------------------------------------
// Raw wire tests

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn valid_batch_is_answered_in_order_with_the_request_id() {
    let server = TestServer::start(|_| {}).await;
    let mut conn = RawConn::authed(server.addr).await;
    conn.send(&commands_frame(77, (1..=5).map(|id| command(id, 1, 0)).collect())).await;
    let frame = conn.next().await.expect("replies");
    assert_eq!(frame.request_id, 77);
    let ids: Vec<u64> = replies_of(&frame).iter().map(|reply| reply.id.get()).collect();
    assert_eq!(ids, vec![1, 2, 3, 4, 5]);
    assert_eq!(replies_of(&frame)[2].value.get(), 6);
    assert_eq!(server.mock.submits.lock().clone(), vec![5]);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_frames_are_answered_out_of_order() {
    let server = TestServer::start(|_| {}).await;
    let mut conn = RawConn::authed(server.addr).await;
    let mut bytes = commands_frame(1, vec![command(10, 1, HOLD)]);
    bytes.extend(commands_frame(2, vec![command(20, 1, 0), command(21, 1, 0)]));
    bytes.extend(encode(Frame::new(3, Payload::Ping)));
    conn.send(&bytes).await; // all three frames in one write
    let mut first_two = [conn.next().await.expect("frame"), conn.next().await.expect("frame")];
    first_two.sort_by_key(|frame| frame.request_id);
    assert_eq!(first_two[0].request_id, 2);
    assert_eq!(replies_of(&first_two[0]).iter().map(|r| r.id.get()).collect::<Vec<_>>(), vec![20, 21]);
    assert_eq!(first_two[1], Frame::new(3, Payload::Pong));
    server.mock.release();
    let held = conn.next().await.expect("held frame answered after release");
    assert_eq!(held.request_id, 1);
    assert_eq!(replies_of(&held)[0].id.get(), 10);
    server.shutdown().await;
}

async fn assert_malformed_closes(bytes: Vec<u8>, code: ErrorCode) {
    let server = TestServer::start(|_| {}).await;
    let mut conn = RawConn::authed(server.addr).await;
    conn.send(&bytes).await;
    let frame = conn.expect_error_then_close(code).await;
    // A framing error is connection-level: it answers none of the client's requests.
    assert_eq!(frame.request_id, 0, "a framing error carries request id 0");
    assert_eq!(server.mock.submitted(), 0, "nothing of a bad frame is submitted");
    assert_eq!(server.stats.snapshot().protocol_errors, 1);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_magic_is_an_error_then_close() {
    let mut bytes = commands_frame(1, vec![command(1, 1, 0)]);
    bytes[0] = b'X';
    assert_malformed_closes(bytes, ErrorCode::BAD_MAGIC).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_version_is_an_error_then_close() {
    assert_malformed_closes(resealed(|header| header.version = U16::new(2)), ErrorCode::UNSUPPORTED_VERSION).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_header_crc_is_an_error_then_close() {
    let mut bytes = commands_frame(1, vec![command(1, 1, 0)]);
    bytes[16] ^= 1; // request id, covered by the header checksum
    assert_malformed_closes(bytes, ErrorCode::HEADER_CHECKSUM).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_body_crc_is_an_error_then_close() {
    let mut bytes = commands_frame(1, vec![command(1, 1, 0)]);
    bytes[HEADER_SIZE + 20] ^= 0xff; // an amount byte
    assert_malformed_closes(bytes, ErrorCode::BODY_CHECKSUM).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_length_is_refused_from_the_header_alone() {
    let bytes = resealed(|header| header.body_len = U32::new(BODY_BYTES_MAX as u32 + 80));
    // Only the header is sent: the server must not wait for a body it would refuse anyway.
    assert_malformed_closes(bytes[..HEADER_SIZE].to_vec(), ErrorCode::FRAME_TOO_LARGE).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn count_length_mismatch_is_an_error_then_close() {
    assert_malformed_closes(resealed(|header| header.count = U32::new(2)), ErrorCode::LENGTH_MISMATCH).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_kind_is_an_error_then_close() {
    assert_malformed_closes(resealed(|header| header.kind = U16::new(999)), ErrorCode::UNKNOWN_KIND).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_frame_of_the_wrong_length_is_an_error_then_close() {
    let kind = FrameKind::Watch as u16;
    assert_malformed_closes(resealed(|header| header.kind = U16::new(kind)), ErrorCode::LENGTH_MISMATCH).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_to_client_kind_from_a_client_is_an_error_then_close() {
    let bytes = encode(Frame::new(5, Payload::Replies(vec![ReplyRecord::default()])));
    assert_malformed_closes(bytes, ErrorCode::UNEXPECTED_FRAME).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn valid_frames_before_a_bad_one_are_answered_first() {
    let server = TestServer::start(|_| {}).await;
    let mut conn = RawConn::authed(server.addr).await;
    let mut bytes = commands_frame(1, vec![command(1, 1, 0)]);
    let mut bad = commands_frame(2, vec![command(2, 1, 0)]);
    bad[HEADER_SIZE] ^= 1;
    bytes.extend(bad);
    conn.send(&bytes).await;
    let first = conn.next().await.expect("the valid frame's replies");
    assert_eq!(first.request_id, 1);
    conn.expect_error_then_close(ErrorCode::BODY_CHECKSUM).await;
    assert_eq!(server.mock.submits.lock().clone(), vec![1], "only the valid frame was submitted");
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frame_before_auth_is_refused_and_not_submitted() {
    let server = TestServer::start(|_| {}).await;
    let mut conn = RawConn::open(server.addr).await;
    conn.send(&commands_frame(4, vec![command(1, 1, 0)])).await;
    let frame = conn.expect_error_then_close(ErrorCode::NOT_AUTHENTICATED).await;
    assert_eq!(frame.request_id, 4);
    // A large frame is refused from its header: the server does not wait for (and buffer) a
    // body from a peer that has not authenticated.
    let large = commands_frame(5, (0..8192).map(|i| command(i + 1, 1, 0)).collect());
    let mut conn = RawConn::open(server.addr).await;
    conn.send(&large[..HEADER_SIZE]).await;
    let frame = conn.expect_error_then_close(ErrorCode::NOT_AUTHENTICATED).await;
    assert_eq!(frame.request_id, 5);
    assert_eq!(server.mock.submitted(), 0);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_ok_echoes_the_hellos_request_id() {
    let server = TestServer::start(|_| {}).await;
    let mut conn = RawConn::open(server.addr).await;
    let hello = Hello { role: Role::Client, token: TOKEN.as_bytes().to_vec() };
    conn.send(&encode(Frame::new(77, Payload::Hello(hello)))).await;
    let frame = conn.next().await.expect("auth answer");
    assert!(matches!(frame.payload, Payload::AuthOk(_)), "{frame:?}");
    assert_eq!(frame.request_id, 77);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_token_gets_auth_failed_then_close() {
    let server = TestServer::start(|_| {}).await;
    for (role, token) in [(Role::Client, "wrong"), (Role::Client, ""), (Role::Admin, TOKEN)] {
        let mut conn = RawConn::open(server.addr).await;
        conn.send(&hello(role, token)).await;
        let frame = conn.next().await.expect("auth answer");
        match frame.payload {
            Payload::AuthFailed(error) => assert_eq!(error.code, ErrorCode::AUTH_FAILED),
            other => panic!("expected AuthFailed, got {other:?}"),
        }
        assert_eq!(conn.next().await, None);
    }
    assert_eq!(server.stats.snapshot().auth_failures, 3);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_kinds_need_an_admin_connection() {
    let server = TestServer::start(|_| {}).await;
    let mut conn = RawConn::authed(server.addr).await;
    conn.send(&commands_frame(5, vec![command(1, 1, 0), command(2, 200, 0)])).await;
    let frame = conn.next().await.expect("forbidden");
    assert_eq!(frame.request_id, 5);
    assert!(matches!(&frame.payload, Payload::Error(e) if e.code == ErrorCode::FORBIDDEN), "{frame:?}");
    assert_eq!(server.mock.submitted(), 0, "the whole frame is refused");
    // The connection stays usable.
    conn.send(&commands_frame(6, vec![command(3, 1, 0)])).await;
    assert_eq!(conn.next().await.expect("replies").request_id, 6);

    let mut admin = RawConn::open(server.addr).await;
    admin.send(&hello(Role::Admin, ADMIN_TOKEN)).await;
    assert!(matches!(admin.next().await.expect("auth").payload, Payload::AuthOk(ok) if ok.role == Role::Admin));
    admin.send(&commands_frame(7, vec![command(4, 200, 0)])).await;
    assert_eq!(replies_of(&admin.next().await.expect("replies"))[0].id.get(), 4);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_connection_does_not_affect_another() {
    let server = TestServer::start(|_| {}).await;
    let mut good = RawConn::authed(server.addr).await;
    let mut bad = RawConn::authed(server.addr).await;
    bad.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n\0\0\0\0\0\0\0\0\0\0\0\0\0\0").await;
    bad.expect_error_then_close(ErrorCode::BAD_MAGIC).await;
    good.send(&commands_frame(1, vec![command(1, 1, 0)])).await;
    assert_eq!(good.next().await.expect("replies").request_id, 1);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_over_the_limit_are_refused() {
    let server = TestServer::start(|config| config.connections_max = 1).await;
    let first = RawConn::authed(server.addr).await;
    let mut second = RawConn::open(server.addr).await;
    second.expect_error_then_close(ErrorCode::TOO_MANY_CONNECTIONS).await;
    assert_eq!(server.stats.snapshot().connections_refused, 1);
    drop(first);
    // The slot frees once the server notices the close; retry until then.
    let mut attempts = 0;
    loop {
        let mut conn = RawConn::open(server.addr).await;
        conn.send(&hello(Role::Client, TOKEN)).await;
        match conn.next().await.map(|frame| frame.payload) {
            Some(Payload::AuthOk(_)) => break,
            Some(Payload::Error(error)) if error.code == ErrorCode::TOO_MANY_CONNECTIONS => {}
            other => panic!("unexpected {other:?}"),
        }
        attempts += 1;
        assert!(attempts < 1000, "the freed slot was never reused");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_are_closed() {
    let server = TestServer::start(|config| config.idle_timeout = Duration::from_millis(100)).await;
    let mut conn = RawConn::authed(server.addr).await;
    conn.expect_error_then_close(ErrorCode::IDLE_TIMEOUT).await;
    assert_eq!(server.stats.snapshot().idle_timeouts, 1);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiting_for_the_engine_is_not_idleness() {
    let server = TestServer::start(|config| config.idle_timeout = Duration::from_millis(50)).await;
    let mut conn = RawConn::authed(server.addr).await;
    conn.send(&commands_frame(1, vec![command(1, 1, HOLD)])).await;
    eventually(|| server.mock.held_count() == 1).await;
    // Several idle periods pass while the frame is in flight.
    tokio::time::sleep(Duration::from_millis(300)).await;
    server.mock.release();
    assert_eq!(conn.next().await.expect("replies").request_id, 1);
    conn.expect_error_then_close(ErrorCode::IDLE_TIMEOUT).await;
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_out_of_answer_bytes_waits_while_others_are_served() {
    // A budget of one byte: every frame takes all of it, so one unanswered frame holds it.
    let server = TestServer::start(|config| config.answer_bytes_per_connection_max = 1).await;
    let mut slow = RawConn::authed(server.addr).await;
    let mut bytes = commands_frame(1, vec![command(10, 1, HOLD)]);
    bytes.extend(commands_frame(2, vec![command(20, 1, 0)]));
    slow.send(&bytes).await;
    eventually(|| server.mock.held_count() == 1).await;
    eventually(|| server.stats.snapshot().frames_received == 3).await; // Hello and both frames
                                                                       // Another connection has a budget of its own.
    let mut other = RawConn::authed(server.addr).await;
    other.send(&commands_frame(3, vec![command(30, 1, 0)])).await;
    assert_eq!(replies_of(&other.next().await.expect("replies"))[0].id.get(), 30);
    assert_eq!(server.mock.submitted(), 2, "frame 2 waits, read but not submitted, while frame 1 is unanswered");
    // Frame 1's answer written gives the budget back to frame 2.
    server.mock.release();
    let mut answered = [slow.next().await.expect("frame"), slow.next().await.expect("frame")].map(|f| f.request_id);
    answered.sort();
    assert_eq!(answered, [1, 2]);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_servers_answer_bytes_taken_every_connection_waits_then_is_served() {
    // A server-wide budget of one byte: one unanswered frame anywhere holds all of it.
    let server = TestServer::start(|config| config.answer_bytes_max = 1).await;
    let mut holder = RawConn::authed(server.addr).await;
    holder.send(&commands_frame(1, vec![command(10, 1, HOLD)])).await;
    eventually(|| server.mock.held_count() == 1).await;
    let mut waiting = RawConn::authed(server.addr).await;
    waiting.send(&commands_frame(2, vec![command(20, 1, 0)])).await;
    let client = Client::connect(server.addr, TOKEN).await.expect("connecting needs no answer bytes");
    let balance = tokio::spawn(async move { client.balance(1).await });
    // Three Hellos and three frames read; only the first frame submitted.
    eventually(|| server.stats.snapshot().frames_received == 6).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(server.mock.submitted(), 1, "the other connections' frames wait, read but not submitted");
    assert!(!balance.is_finished(), "a balance read waits too: back-pressure, not an error");
    server.mock.release();
    assert_eq!(holder.next().await.expect("replies").request_id, 1);
    assert_eq!(replies_of(&waiting.next().await.expect("replies"))[0].id.get(), 20);
    assert_eq!(balance.await.expect("task").expect("balance").value.get(), 500);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_callback_answers_internal() {
    let server = TestServer::start(|_| {}).await;
    let mut conn = RawConn::authed(server.addr).await;
    conn.send(&commands_frame(3, vec![command(1, 1, DROP)])).await;
    let frame = conn.next().await.expect("internal error");
    assert_eq!(frame.request_id, 3);
    assert!(matches!(&frame.payload, Payload::Error(e) if e.code == ErrorCode::INTERNAL), "{frame:?}");
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_drains_in_flight_frames_then_closes() {
    let server = TestServer::start(|_| {}).await;
    let mut conn = RawConn::authed(server.addr).await;
    conn.send(&commands_frame(1, vec![command(1, 1, HOLD)])).await;
    eventually(|| server.mock.held_count() == 1).await;
    let mock = server.mock.clone();
    let stop = tokio::spawn(server.shutdown());
    tokio::time::sleep(Duration::from_millis(50)).await;
    mock.release();
    assert_eq!(conn.next().await.expect("in-flight reply").request_id, 1);
    conn.expect_error_then_close(ErrorCode::SHUTTING_DOWN).await;
    stop.await.expect("run returned");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queries_are_answered_with_balance_history_and_lookup() {
    let server = TestServer::start(|_| {}).await;
    let mut conn = RawConn::authed(server.addr).await;
    let query = |kind: u8, key: u64, limit: u32| QueryRecord {
        kind,
        key: U64::new(key),
        limit: U32::new(limit),
        ..QueryRecord::default()
    };
    let queries =
        vec![query(QUERY_KIND_BALANCE, 1, 0), query(QUERY_KIND_HISTORY, 5, 2), query(QUERY_KIND_LOOKUP, 8, 0)];
    conn.send(&encode(Frame::new(11, Payload::Query(queries)))).await;
    let frame = conn.next().await.expect("answers");
    assert_eq!(frame.request_id, 11);
    let Payload::QueryAnswer(answers) = frame.payload else { panic!("expected answers") };
    assert_eq!(answers[0].reply.value.get(), 500);
    assert_eq!(answers[1].history.iter().map(|h| h.id.get()).collect::<Vec<_>>(), vec![50, 51]);
    assert_eq!(answers[1].next_before_ts, 99);
    assert_eq!(answers[2].command.map(|c| c.id.get()), Some(8));
    server.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// Client tests

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_submits_and_reads() {
    let server = TestServer::start(|_| {}).await;
    let client = Client::connect(server.addr, TOKEN).await.expect("connect");
    let replies = client.submit(vec![command(3, 1, 0), command(4, 1, 0)]).await.expect("submit");
    assert_eq!(replies.iter().map(|r| (r.id.get(), r.value.get())).collect::<Vec<_>>(), vec![(3, 6), (4, 8)]);
    let balance = client.balance(1).await.expect("balance");
    assert_eq!((balance.status.get(), balance.value.get()), (0, 500));
    assert_eq!(client.balance(2).await.expect("balance").status.get(), 1);
    let answer = client
        .query(QueryRecord { kind: QUERY_KIND_LOOKUP, key: U64::new(12), ..QueryRecord::default() })
        .await
        .expect("lookup");
    assert_eq!(answer.command.map(|c| c.id.get()), Some(12));
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_batches_concurrent_calls_and_matches_replies() {
    let server = TestServer::start(|config| config.in_flight_per_connection_max = 1).await;
    let client = Client::connect(server.addr, TOKEN).await.expect("connect");
    assert_eq!(client.session().in_flight_max, 1);
    server.mock.hold_all.store(true, Ordering::SeqCst);
    // The first call takes the only in-flight slot and is held by the engine...
    let first = {
        let client = client.clone();
        tokio::spawn(async move { client.submit(vec![command(1_000, 1, 0)]).await })
    };
    eventually(|| server.mock.held_count() == 1).await;
    // ...so these queue up in the client meanwhile.
    let tasks: Vec<_> = (1..=200u64)
        .map(|id| {
            let client = client.clone();
            tokio::spawn(async move { (id, client.submit(vec![command(id, 1, 0)]).await) })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(200)).await;
    server.mock.release();
    assert_eq!(first.await.expect("task").expect("reply")[0].id.get(), 1_000);
    for task in tasks {
        let (id, replies) = task.await.expect("task");
        let replies = replies.expect("reply");
        assert_eq!(replies.len(), 1);
        assert_eq!((replies[0].id.get(), replies[0].value.get()), (id, id as i64 * 2));
    }
    let submits = server.mock.submits.lock().clone();
    assert_eq!(submits.iter().sum::<usize>(), 201);
    assert!(submits.len() <= 5, "201 concurrent calls should share a few frames, got {submits:?}");
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_matches_out_of_order_replies() {
    let server = TestServer::start(|_| {}).await;
    let client = Client::connect(server.addr, TOKEN).await.expect("connect");
    let held = {
        let client = client.clone();
        tokio::spawn(async move { client.submit(vec![command(1, 1, HOLD)]).await })
    };
    eventually(|| server.mock.held_count() == 1).await;
    let quick = client.submit(vec![command(2, 1, 0)]).await.expect("quick reply");
    assert_eq!(quick[0].id.get(), 2);
    server.mock.release();
    assert_eq!(held.await.expect("task").expect("held reply")[0].id.get(), 1);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_reports_auth_and_server_errors() {
    let server = TestServer::start(|_| {}).await;
    let error = Client::connect(server.addr, "nope").await.expect_err("wrong token");
    assert!(matches!(error, ClientError::Auth(ref e) if e.code == ErrorCode::AUTH_FAILED), "{error:?}");

    let client = Client::connect(server.addr, TOKEN).await.expect("connect");
    // Refused by the client itself (the server would answer `forbidden`: see the raw test).
    let error = client.submit(vec![command(1, 250, 0)]).await.expect_err("admin kind");
    assert!(matches!(error, ClientError::InvalidRequest(_)), "{error:?}");

    let mut config = ClientConfig::new(ADMIN_TOKEN);
    config.role = Role::Admin;
    let admin = Client::connect_with(server.addr, config).await.expect("admin connect");
    assert_eq!(admin.submit(vec![command(1, 250, 0)]).await.expect("admin may")[0].id.get(), 1);
    server.shutdown().await;
}

/// On a client-role connection an admin kind is refused before it enters the queue: coalesced
/// into one frame with other callers' commands, it made the server refuse them all `forbidden`.
/// The current-thread runtime makes both calls queue before the batcher runs, so they would share
/// a frame.
#[tokio::test]
async fn client_refuses_admin_kinds_itself_so_other_calls_do_not_fail_with_them() {
    let server = TestServer::start(|_| {}).await;
    let client = Client::connect(server.addr, TOKEN).await.expect("connect");
    let (innocent, admin) =
        tokio::join!(client.submit(vec![command(1, 1, 0)]), client.submit(vec![command(2, 200, 0), command(3, 1, 0)]));
    let innocent = innocent.expect("a call without admin kinds is answered");
    assert_eq!(innocent[0].id.get(), 1);
    assert!(matches!(admin, Err(ClientError::InvalidRequest(_))), "{admin:?}");
    assert_eq!(server.mock.submitted(), 1, "nothing of the refused call left the client");
    assert_eq!(server.stats.snapshot().forbidden_frames, 0);

    // An admin connection still sends admin kinds, coalesced with other calls as before.
    let mut config = ClientConfig::new(ADMIN_TOKEN);
    config.role = Role::Admin;
    let admin = Client::connect_with(server.addr, config).await.expect("admin connect");
    let (ordinary, operator) =
        tokio::join!(admin.submit(vec![command(4, 1, 0)]), admin.submit(vec![command(5, 200, 0)]));
    assert_eq!(ordinary.expect("ordinary command")[0].id.get(), 4);
    assert_eq!(operator.expect("admin command")[0].id.get(), 5);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_calls_fail_when_the_connection_closes() {
    let server = TestServer::start(|config| config.drain_timeout = Duration::from_millis(100)).await;
    let client = Client::connect(server.addr, TOKEN).await.expect("connect");
    let held = {
        let client = client.clone();
        tokio::spawn(async move { client.submit(vec![command(1, 1, HOLD)]).await })
    };
    eventually(|| server.mock.held_count() == 1).await;
    // Shutdown with a frame the engine never answers: the drain times out and the socket closes.
    server.shutdown().await;
    let error = held.await.expect("task").expect_err("in doubt");
    assert!(matches!(error, ClientError::Closed | ClientError::Io(_) | ClientError::Server(_)), "{error:?}");
    assert!(client.submit(vec![command(2, 1, 0)]).await.is_err());
    assert!(client.is_closed());
}
