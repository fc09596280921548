//! TLS through a real server over 127.0.0.1, with the committed test certificates
//! (`tests/fixtures/tls/`, made by `regen.sh`): a TLS client authenticates, writes and reads; a
//! plaintext client is told `tls_required` and the server carries on; a client that trusts
//! another CA, or expects another name, fails with a TLS error; a TLS client at a plaintext
//! server fails clearly; the event feed and the retrying client work over TLS; a handshake holds
//! a connection slot and is bounded by the handshake timeout. Every wait is bounded.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use stormledger::client::retry::RetryingClient;
use stormledger::client::watch::{WatchFrom, Watcher};
use stormledger::client::{Client, ClientConfig, ClientError, TlsClientConfig};
use stormledger::engine::{Engine, EngineConfig};
use stormledger::feed::event_kind;
use stormledger::layout::text_field;
use stormledger::ledger::command::{flags, AccountKind, Channel};
use stormledger::ledger::Command;
use stormledger::protocol::ErrorCode;
use stormledger::server::{Backend, Server, ServerConfig, ServerStats};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;

const TOKEN: &str = "tls-test-token";
const DEADLINE: Duration = Duration::from_secs(30);
const USER: u64 = 1;
const STREAMER: u64 = 1_000_000;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tls").join(name)
}

fn server_tls() -> Arc<stormledger::tls::rustls::ServerConfig> {
    stormledger::tls::server_config(&fixture("server.pem"), &fixture("server.key")).expect("test certificate")
}

fn tls_client(ca: &str, server_name: &str) -> ClientConfig {
    let mut config = ClientConfig::new(TOKEN);
    config.tls = Some(TlsClientConfig::from_ca_file(&fixture(ca), server_name).expect("test CA"));
    config
}

struct Running {
    addr: std::net::SocketAddr,
    stats: Arc<ServerStats>,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl Running {
    async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        tokio::time::timeout(DEADLINE, self.task).await.expect("server stops").unwrap();
    }
}

async fn serve(backend: Arc<dyn Backend>, configure: impl FnOnce(&mut ServerConfig)) -> Running {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let mut config = ServerConfig::new(TOKEN);
    configure(&mut config);
    let server = Server::new(backend, config).unwrap();
    let stats = server.stats();
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        server
            .run(listener, async {
                let _ = stopped.await;
            })
            .await
            .unwrap();
    });
    Running { addr, stats, stop: Some(stop), task }
}

fn engine() -> Arc<Engine> {
    Arc::new(Engine::in_memory(EngineConfig { shards: 2, ..EngineConfig::default() }).unwrap())
}

async fn tls_server() -> (Arc<Engine>, Running) {
    let engine = engine();
    let running = serve(engine.clone(), |config| config.tls = Some(server_tls())).await;
    (engine, running)
}

async fn connect(addr: std::net::SocketAddr, config: ClientConfig) -> Result<Client, ClientError> {
    tokio::time::timeout(DEADLINE, Client::connect_with(addr, config)).await.expect("connect in time")
}

/// Waits (bounded) until `condition` holds.
async fn eventually(condition: impl Fn() -> bool) {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while !condition() {
        assert!(tokio::time::Instant::now() < deadline, "condition not reached in time");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Submits commands through `client`; every reply must be ok.
async fn ok(client: &Client, commands: &[Command]) {
    let records = commands.iter().map(Command::to_record).collect();
    let replies = client.submit(records).await.expect("replies");
    for (reply, command) in replies.iter().zip(commands) {
        assert_eq!(reply.status.get(), 0, "{command:?}");
    }
}

/// A real-name user with 300 coins (a 30.00 yuan top-up) and a streamer.
fn funding() -> Vec<Vec<Command>> {
    vec![
        vec![
            Command::CreateAccount { account: USER, kind: AccountKind::User, flags: flags::REAL_NAME, union: 0 },
            Command::CreateAccount { account: STREAMER, kind: AccountKind::Streamer, flags: 0, union: 0 },
            Command::BindMethod { user: USER, method: 5, channel: Channel::Alipay },
        ],
        vec![Command::TopUpBegin { id: 100, user: USER, method: 5, fen: 3_000 }],
        vec![Command::TopUpConfirm { id: 100, fen: 3_000, channel_txn: text_field("TXN-1").unwrap(), paid_by: 0 }],
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_client_authenticates_tops_up_tips_and_reads() {
    let (_engine, server) = tls_server().await;
    // By name and by IP address: the test certificate carries both.
    for name in ["localhost", "127.0.0.1"] {
        let client = connect(server.addr, tls_client("ca.pem", name)).await.expect("TLS connect");
        assert!(client.balance(USER).await.is_ok());
    }
    let client = connect(server.addr, tls_client("ca.pem", "localhost")).await.unwrap();
    for step in funding() {
        ok(&client, &step).await;
    }
    assert_eq!(client.balance(USER).await.unwrap().value.get(), 300);
    ok(&client, &[Command::Tip { id: 200, from: USER, to: STREAMER, coins: 100 }]).await;
    assert_eq!(client.balance(USER).await.unwrap().value.get(), 200);
    assert_eq!(client.balance(STREAMER).await.unwrap().value.get(), 50);
    let stats = server.stats.snapshot();
    assert_eq!((stats.tls_handshake_failures, stats.plaintext_refused), (0, 0));
    drop(client);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plaintext_client_is_told_tls_required_and_the_server_carries_on() {
    let (_engine, server) = tls_server().await;
    let before = connect(server.addr, tls_client("ca.pem", "localhost")).await.unwrap();

    match connect(server.addr, ClientConfig::new(TOKEN)).await {
        Err(ClientError::Server(body)) => {
            assert_eq!(body.code, ErrorCode::TLS_REQUIRED);
            assert!(body.message.contains("TLS"), "{}", body.message);
        }
        other => panic!("a plaintext client must be refused with tls_required, got {other:?}"),
    }
    // A peer that starts a TLS record and then sends garbage fails the handshake.
    let mut raw = TcpStream::connect(server.addr).await.unwrap();
    raw.write_all(&[0x16, 0x03, 0x01, 0x00, 0x05, 1, 2, 3, 4, 5]).await.unwrap();
    let mut sink = Vec::new();
    let _ = tokio::time::timeout(DEADLINE, raw.read_to_end(&mut sink)).await.expect("the server closes");

    // Connections open before and after are unaffected.
    assert!(before.balance(USER).await.is_ok());
    let after = connect(server.addr, tls_client("ca.pem", "localhost")).await.unwrap();
    assert!(after.balance(USER).await.is_ok());
    // The server counts a failed handshake after it has dropped the socket: wait for it.
    eventually(|| server.stats.snapshot().tls_handshake_failures == 1).await;
    assert_eq!(server.stats.snapshot().plaintext_refused, 1);
    drop((before, after));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_trusts_another_ca_or_expects_another_name_fails_with_a_tls_error() {
    let (_engine, server) = tls_server().await;
    let error = connect(server.addr, tls_client("other-ca.pem", "localhost")).await.unwrap_err();
    let ClientError::Tls(_) = &error else { panic!("expected a TLS error, got {error:?}") };
    let message = error.to_string();
    assert!(message.contains("UnknownIssuer") && message.contains("not signed by a trusted CA"), "{message}");

    let error = connect(server.addr, tls_client("ca.pem", "ledger.example")).await.unwrap_err();
    assert!(matches!(error, ClientError::Tls(_)), "{error:?}");
    assert!(error.to_string().contains("not for this server name"), "{error}");
    // Neither is worth retrying: the certificate will not change.
    assert!(!stormledger::client::retry::is_retryable(&error));

    // The server is fine.
    let client = connect(server.addr, tls_client("ca.pem", "localhost")).await.unwrap();
    assert!(client.balance(USER).await.is_ok());
    drop(client);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_client_at_a_plaintext_server_fails_clearly() {
    let server = serve(engine(), |_| {}).await;
    let error = connect(server.addr, tls_client("ca.pem", "localhost")).await.unwrap_err();
    assert!(matches!(error, ClientError::Tls(_)), "{error:?}");
    assert!(error.to_string().contains("does not seem to speak TLS"), "{error}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_event_feed_and_the_retrying_client_work_over_tls() {
    let (_engine, server) = tls_server().await;
    let config = tls_client("ca.pem", "localhost");
    let mut watcher = tokio::time::timeout(DEADLINE, Watcher::connect(server.addr, &config, WatchFrom::Now))
        .await
        .expect("watch in time")
        .expect("watch over TLS");

    let retrying = RetryingClient::new(server.addr.to_string(), config.clone(), 3, Duration::from_millis(10));
    for step in funding() {
        let replies = retrying.submit(step.iter().map(Command::to_record).collect()).await.expect("replies");
        assert!(replies.iter().all(|reply| reply.status.get() == 0), "{replies:?}");
    }
    let tip = Command::Tip { id: 200, from: USER, to: STREAMER, coins: 100 };
    assert_eq!(retrying.submit(vec![tip.to_record()]).await.unwrap()[0].status.get(), 0);

    let mut kinds = Vec::new();
    while kinds.len() < 2 {
        let events = tokio::time::timeout(DEADLINE, watcher.next()).await.expect("events in time").expect("stream");
        kinds.extend(events.iter().map(|event| event.kind));
    }
    assert_eq!(kinds, [event_kind::TOPUP_SUCCEEDED, event_kind::TIP]);
    drop(watcher);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handshake_holds_a_connection_slot_and_is_bounded_by_the_handshake_timeout() {
    let engine = engine();
    let server = serve(engine, |config| {
        config.tls = Some(server_tls());
        config.connections_max = 1;
        config.handshake_timeout = Duration::from_millis(500);
    })
    .await;
    // A peer that starts a handshake and stalls holds the only slot...
    let mut stalled = TcpStream::connect(server.addr).await.unwrap();
    stalled.write_all(&[0x16]).await.unwrap();
    // ...so a client meanwhile is refused (inside TLS, so it can read why) or, if the stalled
    // peer was already dropped, served; either way it never hangs. (On a machine so loaded that
    // the refusal's own handshake misses the timeout, the client sees the connection close.)
    match connect(server.addr, tls_client("ca.pem", "localhost")).await {
        Err(ClientError::Server(body)) => assert_eq!(body.code, ErrorCode::TOO_MANY_CONNECTIONS),
        Ok(_) | Err(ClientError::Io(_)) | Err(ClientError::Closed) => {}
        Err(other) => panic!("unexpected {other:?}"),
    }
    // The stalled handshake is cut at the handshake timeout: the server closes the socket.
    let mut sink = Vec::new();
    let closed = tokio::time::timeout(DEADLINE, stalled.read_to_end(&mut sink)).await;
    assert!(closed.is_ok(), "the server must close a stalled handshake");
    // The slot is free again.
    let deadline = tokio::time::Instant::now() + DEADLINE;
    let client = loop {
        assert!(tokio::time::Instant::now() < deadline, "the connection slot was never freed");
        match connect(server.addr, tls_client("ca.pem", "localhost")).await {
            Ok(client) => break client,
            Err(ClientError::Server(body)) if body.code == ErrorCode::TOO_MANY_CONNECTIONS => {
                tokio::time::sleep(Duration::from_millis(20)).await
            }
            Err(ClientError::Io(_) | ClientError::Closed) => tokio::time::sleep(Duration::from_millis(20)).await,
            Err(other) => panic!("unexpected {other:?}"),
        }
    };
    assert!(client.balance(USER).await.is_ok());
    eventually(|| server.stats.snapshot().tls_handshake_failures >= 1).await;
    drop(client);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_over_the_connection_limit_are_bounded_and_the_rest_are_closed_at_once() {
    let engine = engine();
    let server = serve(engine, |config| {
        config.tls = Some(server_tls());
        config.connections_max = 1;
        config.handshake_timeout = Duration::from_secs(60);
    })
    .await;
    // One stalled handshake holds the only slot; the next REFUSALS_IN_FLIGHT_MAX peers each get
    // a refusal that waits (up to the handshake timeout) for their TLS hello, which never comes.
    let slot = TcpStream::connect(server.addr).await.unwrap();
    eventually(|| server.stats.snapshot().connections_accepted >= 1).await;
    let mut waiting = Vec::new();
    for _ in 0..stormledger::server::REFUSALS_IN_FLIGHT_MAX {
        waiting.push(TcpStream::connect(server.addr).await.unwrap());
    }
    let refused = 1 + stormledger::server::REFUSALS_IN_FLIGHT_MAX as u64;
    eventually(|| server.stats.snapshot().connections_accepted >= refused).await;
    // One more: no handshake is started for it, the server closes it without a byte.
    let mut extra = TcpStream::connect(server.addr).await.unwrap();
    let mut sink = Vec::new();
    let closed = tokio::time::timeout(DEADLINE, extra.read_to_end(&mut sink)).await;
    assert!(matches!(closed, Ok(Ok(0)) | Ok(Err(_))), "closed at once without an answer: {closed:?}");
    // The refusals in progress are still waiting for their hello (the handshake timeout is far).
    let mut byte = [0u8; 1];
    let still_open = tokio::time::timeout(Duration::from_millis(50), waiting[0].read(&mut byte)).await;
    assert!(still_open.is_err(), "a refusal in progress is still open: {still_open:?}");
    assert!(server.stats.snapshot().connections_refused >= refused);
    drop((slot, waiting));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alpn_is_optional_for_the_client_but_must_match_when_offered() {
    use stormledger::tls::rustls;
    let (_engine, server) = tls_server().await;
    let with_alpn = |alpn: Vec<Vec<u8>>| {
        let mut roots = rustls::RootCertStore::empty();
        let ca = std::fs::read(fixture("ca.pem")).unwrap();
        use rustls::pki_types::pem::PemObject;
        roots.add(rustls::pki_types::CertificateDer::from_pem_slice(&ca).unwrap()).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = alpn;
        let mut client = ClientConfig::new(TOKEN);
        client.tls = Some(TlsClientConfig::new(Arc::new(config), "localhost").unwrap());
        client
    };
    let client = connect(server.addr, with_alpn(Vec::new())).await.expect("no ALPN offered: accepted");
    assert!(client.balance(USER).await.is_ok());
    let error = connect(server.addr, with_alpn(vec![b"h2".to_vec()])).await.unwrap_err();
    assert!(matches!(error, ClientError::Tls(_)), "{error:?}");
    let both = vec![b"h2".to_vec(), stormledger::tls::ALPN_PROTOCOL.to_vec()];
    assert!(connect(server.addr, with_alpn(both)).await.is_ok());
    drop(client);
    server.stop().await;
}

#[test]
fn unusable_pem_files_are_errors_that_name_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let garbage = dir.path().join("garbage.pem");
    std::fs::write(&garbage, "this is not PEM\n").unwrap();
    let bad_base64 = dir.path().join("bad.pem");
    std::fs::write(&bad_base64, "-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n").unwrap();
    let missing = dir.path().join("missing.pem");
    let cert = fixture("server.pem");
    let key = fixture("server.key");
    for (cert, key, named) in [
        (&missing, &key, &missing),
        (&garbage, &key, &garbage),
        (&bad_base64, &key, &bad_base64),
        (&cert, &garbage, &garbage),
        (&cert, &missing, &missing),
        // A CA certificate with the server's key: the key does not match.
        (&fixture("ca.pem"), &key, &fixture("ca.pem")),
    ] {
        let error = stormledger::tls::server_config(cert, key).expect_err("must fail").to_string();
        assert!(error.contains(&named.display().to_string()), "{error}");
    }
    for ca in [&missing, &garbage, &bad_base64] {
        let error = TlsClientConfig::from_ca_file(ca, "localhost").expect_err("must fail").to_string();
        assert!(error.contains(&ca.display().to_string()), "{error}");
    }
}

/// This host's address on its default route, if it has one that is not loopback (found by
/// "connecting" a UDP socket, which sends nothing).
fn non_loopback_ip() -> Option<std::net::IpAddr> {
    let socket = std::net::UdpSocket::bind("0.0.0.0:0").ok()?;
    socket.connect("10.255.255.255:9").ok()?;
    let ip = socket.local_addr().ok()?.ip();
    (!ip.is_loopback() && !ip.is_unspecified()).then_some(ip)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plaintext_client_sends_no_token_to_a_non_loopback_address_unless_allowed() {
    assert!(stormledger::client::plaintext_allowed("127.0.0.1".parse().unwrap(), false));
    assert!(stormledger::client::plaintext_allowed("::ffff:127.0.0.1".parse().unwrap(), false));
    assert!(!stormledger::client::plaintext_allowed("10.1.2.3".parse().unwrap(), false));
    assert!(stormledger::client::plaintext_allowed("10.1.2.3".parse().unwrap(), true));
    let Some(ip) = non_loopback_ip() else {
        eprintln!("no non-loopback address on this host: only the decision was tested");
        return;
    };
    // A bare listener on that address records whatever bytes arrive.
    let listener = TcpListener::bind((ip, 0)).await.expect("bind a non-loopback address");
    let addr = listener.local_addr().unwrap();
    let received = tokio::spawn(async move {
        let (mut socket, _) = listener.accept().await.expect("accept");
        let mut bytes = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), socket.read_to_end(&mut bytes)).await;
        bytes
    });
    let result = tokio::time::timeout(DEADLINE, Client::connect(addr, TOKEN)).await.expect("bounded");
    match result {
        Err(ClientError::PlaintextToRemote(peer)) => assert_eq!(peer, addr),
        other => panic!("expected PlaintextToRemote, got {other:?}"),
    }
    let bytes = tokio::time::timeout(DEADLINE, received).await.expect("bounded").expect("listener task");
    assert!(bytes.is_empty(), "the client sent {} bytes (the token must not cross the network)", bytes.len());
}
