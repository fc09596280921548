//! The retrying client: a connection cut after a batch reached the server (its replies lost) is
//! re-established and the same commands are resubmitted; every tip is applied exactly once.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use stormledger::client::retry::RetryingClient;
use stormledger::client::{Client, ClientConfig};
use stormledger::engine::{Engine, EngineConfig};
use stormledger::layout::text_field;
use stormledger::ledger::command::flags;
use stormledger::ledger::{AccountKind, Channel, Command};
use stormledger::server::{Backend, ServerConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const TOKEN: &str = "retry-test-token";

/// A server over an in-memory engine of `config` on 127.0.0.1:0, on this runtime.
async fn serve(config: EngineConfig) -> (Arc<Engine>, std::net::SocketAddr) {
    let engine = Arc::new(Engine::in_memory(config).unwrap());
    let backend: Arc<dyn Backend> = engine.clone();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let server = listener.local_addr().unwrap();
    tokio::spawn(async move {
        stormledger::server::run(listener, backend, ServerConfig::new(TOKEN), std::future::pending::<()>()).await.ok();
    });
    (engine, server)
}

/// Forwards to `server`; the first connection is cut as soon as the client has sent more than
/// `cut_after` bytes (after forwarding them), so the server gets the batch but the client never
/// sees its replies. Later connections are forwarded untouched.
async fn proxy(server: std::net::SocketAddr, cut_after: usize, connections: Arc<AtomicUsize>) -> std::net::SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((client, _)) = listener.accept().await else { return };
            let first = connections.fetch_add(1, Ordering::SeqCst) == 0;
            tokio::spawn(async move {
                let upstream = TcpStream::connect(server).await.unwrap();
                let (mut cr, mut cw) = client.into_split();
                let (mut ur, mut uw) = upstream.into_split();
                let cutting = Arc::new(std::sync::atomic::AtomicBool::new(false));
                let cut = cutting.clone();
                let up = tokio::spawn(async move {
                    let mut sent = 0;
                    let mut buf = vec![0u8; 64 * 1024];
                    loop {
                        let n = match cr.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => n,
                        };
                        // Decide before forwarding, so no reply to this batch can slip through.
                        let cutting_now = first && sent + n > cut_after;
                        if cutting_now {
                            cut.store(true, Ordering::SeqCst);
                        }
                        if uw.write_all(&buf[..n]).await.is_err() {
                            return;
                        }
                        sent += n;
                        if cutting_now {
                            // Give the server time to read the batch, then cut both ways.
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            return;
                        }
                    }
                });
                let down = tokio::spawn(async move {
                    let mut buf = vec![0u8; 64 * 1024];
                    loop {
                        let n = match ur.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => n,
                        };
                        if cutting.load(Ordering::SeqCst) {
                            continue; // the replies to the batch are lost
                        }
                        if cw.write_all(&buf[..n]).await.is_err() {
                            return;
                        }
                    }
                });
                let _ = up.await;
                down.abort();
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_connection_is_retried_and_every_tip_is_applied_once() {
    let (engine, server) = serve(EngineConfig { shards: 2, ..EngineConfig::default() }).await;

    let direct = Client::connect(server, TOKEN).await.unwrap();
    let setup = [
        Command::CreateAccount { account: 1, kind: AccountKind::User, flags: flags::REAL_NAME, union: 0 },
        Command::CreateAccount { account: 100, kind: AccountKind::Streamer, flags: 0, union: 0 },
        Command::BindMethod { user: 1, method: 1, channel: Channel::Alipay },
        Command::TopUpBegin { id: 5, user: 1, method: 1, fen: 10_000 },
    ];
    for c in setup {
        assert_eq!(direct.submit(vec![c.to_record()]).await.unwrap()[0].status.get(), 0, "{c:?}");
    }
    let confirm = Command::TopUpConfirm { id: 5, fen: 10_000, channel_txn: text_field("T5").unwrap(), paid_by: 0 };
    assert_eq!(direct.submit(vec![confirm.to_record()]).await.unwrap()[0].status.get(), 0);

    let connections = Arc::new(AtomicUsize::new(0));
    // The hello frame is well under 400 bytes; 20 tips are 1 600 bytes more.
    let addr = proxy(server, 400, connections.clone()).await;
    let client = RetryingClient::new(addr.to_string(), ClientConfig::new(TOKEN), 5, Duration::from_millis(20));
    let tips: Vec<_> =
        (0..20u64).map(|i| Command::Tip { id: 1_000 + i, from: 1, to: 100, coins: 5 }.to_record()).collect();
    let replies = client.submit(tips).await.expect("answered after reconnecting");
    assert!(connections.load(Ordering::SeqCst) >= 2, "the first connection was cut and a new one made");
    assert!(replies.iter().all(|r| r.status.get() == 0), "every tip ok");
    assert_eq!(engine.balance(1), Some(1_000 - 100), "each tip applied exactly once");
    // The batch reached the server on the first connection, so the retry got original results.
    assert!(replies.iter().all(|r| r.flags & 1 == 1), "answered from the idempotency records");
}

/// A server that authenticates, then reads everything and never answers (a hung host, a
/// partition: no FIN, no RST). Counts its connections.
async fn black_hole(connections: Arc<AtomicUsize>) -> std::net::SocketAddr {
    use stormledger::protocol::{AuthOk, Frame, FrameReader, FrameWriter, Payload, Role};
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((socket, _)) = listener.accept().await else { return };
            connections.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let (r, w) = socket.into_split();
                let (mut r, mut w) = (FrameReader::new(r), FrameWriter::new(w));
                let Ok(Some(_hello)) = r.read_frame().await else { return };
                let auth = AuthOk {
                    role: Role::Client,
                    in_flight_max: 64,
                    body_bytes_max: 1 << 20,
                    commands_per_frame_max: 8192,
                    queries_per_frame_max: 4096,
                    connection_id: 1,
                };
                w.write_frame(&Frame::new(0, Payload::AuthOk(auth))).await.unwrap();
                while let Ok(Some(_)) = r.read_frame().await {}
            });
        }
    });
    addr
}

/// `ClientConfig::request_timeout` bounds a call against a server that stopped answering
/// without closing: the call fails with a retryable `TimedOut`, the connection is closed, and
/// the retrying client tries again on a new one, then reports the failure. Before, `submit`
/// waited forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_server_times_a_call_out_and_the_retrying_client_gives_up_in_bounded_time() {
    let connections = Arc::new(AtomicUsize::new(0));
    let addr = black_hole(connections.clone()).await;
    let config = ClientConfig { request_timeout: Duration::from_millis(300), ..ClientConfig::new(TOKEN) };

    let client = Client::connect_with(addr, config.clone()).await.unwrap();
    let tip = Command::Tip { id: 77, from: 1, to: 100, coins: 1 }.to_record();
    let error = client.submit(vec![tip]).await.unwrap_err();
    match &error {
        stormledger::client::ClientError::Io(e) => assert_eq!(e.kind(), std::io::ErrorKind::TimedOut, "{e}"),
        other => panic!("expected a timed-out I/O error, got {other}"),
    }
    assert!(stormledger::client::retry::is_retryable(&error));
    assert!(client.is_closed(), "a timed-out call closes its connection");
    assert!(client.balance(1).await.is_err(), "later calls on it fail at once");

    let retrying = RetryingClient::new(addr.to_string(), config, 2, Duration::from_millis(10));
    let result = tokio::time::timeout(Duration::from_secs(30), retrying.submit(vec![tip])).await;
    let error = result.expect("bounded in time").unwrap_err();
    assert!(matches!(error, stormledger::client::ClientError::Io(_)), "{error}");
    assert_eq!(
        connections.load(Ordering::SeqCst),
        1 + 3,
        "the first attempt and two retries, each on a new connection"
    );
}

/// The CLI's side of "Retrying safely": a tip that gets no answer exits 3 with
/// `unknown_outcome` and the time it was first sent; sent again with `--first-sent`, once the
/// server has forgotten its id, it is refused `id_expired` instead of being applied a second
/// time. (Sent again without it, it would be: a fresh first-send time passes the horizon.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_prints_the_first_send_time_of_a_write_in_doubt_and_a_retry_with_it_is_never_applied_twice() {
    let cli = |addr: String, args: Vec<String>| {
        tokio::task::spawn_blocking(move || {
            let out = std::process::Command::new(env!("CARGO_BIN_EXE_stormledger"))
                .args(["--connect", &addr, "--token", TOKEN, "--json", "--timeout", "1"])
                .args(&args)
                .env_remove("STORMLEDGER_DATA_DIR")
                .output()
                .unwrap();
            let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
            let json: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap_or_default())
                .unwrap_or_else(|e| panic!("{e}: {stdout:?} {}", String::from_utf8_lossy(&out.stderr)));
            (out.status.code(), json)
        })
    };
    let tip = |id: u64| -> Vec<String> {
        ["tip", "--id", &id.to_string(), "--from", "1", "--to", "100", "--coins", "5"].map(String::from).to_vec()
    };

    // No answer: the outcome is unknown, and the first-send time is printed for the retry.
    let hole = black_hole(Arc::new(AtomicUsize::new(0))).await;
    let (code, json) = cli(hole.to_string(), tip(9_001)).await.unwrap();
    assert_eq!(code, Some(3), "{json}");
    assert_eq!(json["status"], "unknown_outcome", "{json}");
    let first_sent = json["first_sent"].as_u64().unwrap_or_else(|| panic!("no first_sent: {json}"));
    assert!(json["error"].as_str().unwrap().contains(&format!("--first-sent {first_sent}")), "{json}");

    // A server that applied the tip (first sent then) and has since forgotten its id: a window
    // of 16 ids, then 20 more tips.
    let limits = stormledger::config::ShardLimits { ids_max: 16, ..Default::default() };
    let (engine, server) = serve(EngineConfig { shards: 1, limits, ..EngineConfig::default() }).await;
    let direct = Client::connect(server, TOKEN).await.unwrap();
    let confirm = Command::TopUpConfirm { id: 5, fen: 10_000, channel_txn: text_field("T5").unwrap(), paid_by: 0 };
    let mut setup = vec![
        Command::CreateAccount { account: 1, kind: AccountKind::User, flags: flags::REAL_NAME, union: 0 },
        Command::CreateAccount { account: 100, kind: AccountKind::Streamer, flags: 0, union: 0 },
        Command::BindMethod { user: 1, method: 1, channel: Channel::Alipay },
        Command::TopUpBegin { id: 5, user: 1, method: 1, fen: 10_000 },
        confirm,
    ];
    setup.push(Command::Tip { id: 9_001, from: 1, to: 100, coins: 5 });
    setup.extend((0..20).map(|i| Command::Tip { id: 10_000 + i, from: 1, to: 100, coins: 1 }));
    for c in setup {
        assert_eq!(direct.submit(vec![c.to_record()]).await.unwrap()[0].status.get(), 0, "{c:?}");
    }
    let balance = engine.balance(1);

    let mut retry = tip(9_001);
    retry.extend(["--first-sent".to_string(), first_sent.to_string()]);
    let (code, json) = cli(server.to_string(), retry).await.unwrap();
    assert_eq!((code, json["status"].as_str()), (Some(1), Some("id_expired")), "{json}");
    assert_eq!(engine.balance(1), balance, "not applied a second time");
}
