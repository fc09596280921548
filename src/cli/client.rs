//! The client commands: build the request from the arguments, connect, send, print, exit status.
//!
//! Exit statuses: 0 accepted or read ok (a retry that returns the original ok result is 0),
//! 1 business rejection (the status is printed), 2 usage error, 3 server unreachable,
//! authentication failed, or no definitive answer (the outcome of a write is then unknown:
//! retry it unchanged, with the same id).

use std::path::PathBuf;
use std::time::Duration;

use super::args::{AccountCmd, AdminCmd, Cli, Command as Cmd, Cursor, LimitCmd, MethodCmd, OnOff, TopupCmd};
use super::output::{self, emit, status_name, write_line, write_report, Obj};
use super::serve::DEFAULT_DATA_DIR;
use super::token;
use super::{EXIT_OK, EXIT_REJECTED, EXIT_UNREACHABLE, EXIT_USAGE};
use crate::client::{Client, ClientConfig, ClientError, TlsClientConfig};
use crate::layout::{text_field, CommandRecord, QueryRecord};
use crate::ledger::amount::format_yuan;
use crate::ledger::command::{flags, kind, Command};
use crate::ledger::state_machine::TopUpState;
use crate::ledger::status::Status;
use crate::protocol::{ErrorCode, Role, QUERY_KIND_HISTORY, QUERY_KIND_LOOKUP, QUERY_KIND_TOPUP_STATUS};

/// What the command line asks for.
#[derive(Debug)]
enum Request {
    /// A command for the ledger (or an operator action without a `Command`, then `cmd` is None).
    Write {
        record: CommandRecord,
        cmd: Option<Command>,
        extra: Obj,
        admin: bool,
    },
    Balance(u64),
    History {
        account: u64,
        limit: u32,
        before: Option<Cursor>,
    },
    Lookup(u64),
    TopUpStatus(u64),
}

/// Why a command ended without a result from the ledger.
#[derive(Debug)]
struct Failure {
    exit: i32,
    /// The JSON `status`: usage_error, unsupported, unreachable, auth_failed, unknown_outcome.
    status: &'static str,
    message: String,
    /// For `unknown_outcome`: the write's first-send time, for `--first-sent` on its retry.
    first_sent: Option<u64>,
}

impl Failure {
    fn usage(message: impl Into<String>) -> Failure {
        Failure { exit: EXIT_USAGE, status: "usage_error", message: message.into(), first_sent: None }
    }
    fn unreachable(message: impl Into<String>) -> Failure {
        Failure { exit: EXIT_UNREACHABLE, status: "unreachable", message: message.into(), first_sent: None }
    }
    fn auth(message: impl Into<String>) -> Failure {
        Failure { exit: EXIT_UNREACHABLE, status: "auth_failed", message: message.into(), first_sent: None }
    }
}

/// Entry point of every command but `serve`; returns the process exit status.
pub fn main(cli: &Cli) -> i32 {
    if let Cmd::Watch(args) = &cli.command {
        return watch_main(cli, args);
    }
    let result = build(&cli.command).and_then(|mut request| {
        // A write with an id, and a top-up's confirmation, says when it was first sent: now, or
        // the first attempt's time for a retry (docs/protocol.md, "Retrying safely"; a
        // confirmation first sent before its top-up's deadline is on time).
        if let Request::Write { record, cmd: Some(cmd), .. } = &mut request {
            if cmd.transfer_id().is_some() || matches!(cmd, Command::TopUpConfirm { .. }) {
                record.timestamp.set(cli.first_sent.unwrap_or_else(crate::client::retry::unix_nanos));
            }
        }
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| Failure::unreachable(format!("cannot start the async runtime: {e}")))?;
        runtime.block_on(execute(cli, request))
    });
    match result {
        Ok((obj, human)) => {
            let ok = obj.get("status").and_then(|s| s.as_str()) == Some("ok");
            emit(&if cli.json { obj.to_string() } else { human });
            if ok {
                EXIT_OK
            } else {
                EXIT_REJECTED
            }
        }
        Err(failure) => {
            eprintln!("stormledger: {}", failure.message);
            if cli.json {
                let mut obj = Obj::new();
                obj.set("status", failure.status).set("error", failure.message);
                if let Some(first_sent) = failure.first_sent {
                    obj.set("first_sent", first_sent);
                }
                emit(&obj.to_string());
            }
            failure.exit
        }
    }
}

fn ledger(cmd: Command, admin: bool) -> Request {
    Request::Write { record: cmd.to_record(), cmd: Some(cmd), extra: Obj::new(), admin }
}

fn build(command: &Cmd) -> Result<Request, Failure> {
    Ok(match command {
        Cmd::Serve(_) => return Err(Failure::usage("serve is not a client command")),
        Cmd::Account(AccountCmd::Create { id, kind, real_name, minor, union }) => {
            let mut f = 0;
            if *real_name {
                f |= flags::REAL_NAME;
            }
            if *minor {
                f |= flags::MINOR;
            }
            let cmd =
                Command::CreateAccount { account: *id, kind: (*kind).into(), flags: f, union: union.unwrap_or(0) };
            ledger(cmd, false)
        }
        Cmd::Method(MethodCmd::Bind { user, method, channel }) => {
            ledger(Command::BindMethod { user: *user, method: *method, channel: (*channel).into() }, false)
        }
        Cmd::Topup(TopupCmd::Begin { id, user, method, amount }) => {
            ledger(Command::TopUpBegin { id: *id, user: *user, method: *method, fen: *amount }, false)
        }
        Cmd::Topup(TopupCmd::Confirm { id, channel_txn, amount }) => {
            let text = text_field(channel_txn).filter(|_| !channel_txn.is_empty()).ok_or_else(|| {
                Failure::usage(format!(
                    "--channel-txn {channel_txn:?}: must be 1 to 24 printable ASCII characters without spaces"
                ))
            })?;
            ledger(Command::TopUpConfirm { id: *id, fen: *amount, channel_txn: text, paid_by: 0 }, false)
        }
        Cmd::Topup(TopupCmd::Fail { id, reason }) => {
            ledger(Command::TopUpFail { id: *id, reason: (*reason).into() }, false)
        }
        Cmd::Topup(TopupCmd::Status { id }) => Request::TopUpStatus(*id),
        Cmd::Tip(a) => ledger(Command::Tip { id: a.id, from: a.from, to: a.to, coins: a.coins }, false),
        Cmd::Gift(a) => ledger(Command::Gift { id: a.id, from: a.from, to: a.to, gift: a.gift, count: a.count }, false),
        Cmd::Pay(a) => {
            ledger(Command::PayEvent { id: a.id, from: a.from, to: a.to, event: a.event, coins: a.coins }, false)
        }
        Cmd::Settle(a) => ledger(Command::Settle { id: a.id, account: a.account }, false),
        Cmd::Limit(LimitCmd::Set { user, coins }) => ledger(Command::SetDailyCap { user: *user, coins: *coins }, false),
        Cmd::Balance(a) => Request::Balance(a.account),
        Cmd::History(a) => Request::History { account: a.account, limit: a.limit, before: a.before },
        Cmd::Lookup(a) => Request::Lookup(a.id),
        Cmd::Watch(_) => return Err(Failure::usage("watch is handled by watch_main")),
        Cmd::Admin(AdminCmd::Maintenance { mode }) => {
            let on = *mode == OnOff::On;
            let record = CommandRecord { kind: kind::MAINTENANCE, flags: on as u8, ..CommandRecord::default() };
            let mut extra = Obj::new();
            extra.set("mode", if on { "on" } else { "off" });
            Request::Write { record, cmd: None, extra, admin: true }
        }
        Cmd::Admin(AdminCmd::Snapshot) => {
            let record = CommandRecord { kind: kind::SNAPSHOT, ..CommandRecord::default() };
            Request::Write { record, cmd: None, extra: Obj::new(), admin: true }
        }
        Cmd::Admin(AdminCmd::Freeze { account }) => ledger(Command::Freeze { account: *account, frozen: true }, true),
        Cmd::Admin(AdminCmd::Unfreeze { account }) => {
            ledger(Command::Freeze { account: *account, frozen: false }, true)
        }
    })
}

/// The token to present, and a description of where it came from (for error messages).
/// `watch`: one line per event (JSON with `position` under `--json`). Exit 0 at `--limit`, 2 for
/// a bad position, 3 on a disconnect or a server error (the last position goes to stderr so a
/// script can resume with `--from`).
fn watch_main(cli: &Cli, args: &super::args::WatchArgs) -> i32 {
    use crate::client::watch::{WatchFrom, Watcher};
    let fail = |failure: Failure| {
        eprintln!("stormledger: {}", failure.message);
        if cli.json {
            let mut obj = Obj::new();
            obj.set("status", failure.status).set("error", failure.message);
            emit(&obj.to_string());
        }
        failure.exit
    };
    let from = match args.from.as_deref() {
        None | Some("now") => WatchFrom::Now,
        Some("earliest") => WatchFrom::Earliest,
        Some(text) => match text.parse() {
            Ok(cursor) => WatchFrom::After(cursor),
            Err(why) => return fail(Failure::usage(why)),
        },
    };
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => return fail(Failure::unreachable(format!("cannot start the async runtime: {e}"))),
    };
    runtime.block_on(async {
        let addr = cli.connect.as_str();
        if let Err(e) = super::args::parse_host_port(addr) {
            return fail(Failure::usage(format!("--connect {addr:?}: {e}")));
        }
        let token = match resolve_token(cli, false) {
            Ok((token, _)) => token,
            Err(why) => return fail(Failure::auth(why)),
        };
        let mut config = ClientConfig::new(token);
        config.allow_remote_plaintext = cli.allow_remote_plaintext;
        config.tls = match tls_config(cli) {
            Ok(tls) => tls,
            Err(failure) => return fail(failure),
        };
        let mut watcher = match Watcher::connect(addr, &config, from).await {
            Ok(watcher) => watcher,
            Err(ClientError::Server(body)) if body.code == ErrorCode::TLS_REQUIRED => {
                return fail(tls_required(addr, &body.message))
            }
            Err(e @ ClientError::PlaintextToRemote(_)) => return fail(plaintext_to_remote(&e)),
            Err(ClientError::Server(body)) => {
                let advice = if body.code == ErrorCode::POSITION_TOO_OLD || body.code == ErrorCode::INVALID_POSITION {
                    " (then watch --from now)"
                } else {
                    ""
                };
                return fail(Failure {
                    exit: EXIT_UNREACHABLE,
                    status: body.code.name(),
                    message: format!("watch refused: {}: {}{advice}", body.code.name(), body.message),
                    first_sent: None,
                });
            }
            Err(ClientError::Auth(body)) => {
                return fail(Failure::auth(format!("authentication failed: {}", body.message)))
            }
            Err(e) => return fail(Failure::unreachable(format!("cannot watch the server at {addr}: {e}"))),
        };
        let mut cursor = watcher.cursor().clone();
        let mut printed = 0u64;
        if args.limit == Some(0) {
            return EXIT_OK;
        }
        loop {
            let events = match watcher.next().await {
                Ok(events) => events,
                Err(error) => {
                    let (status, reason) = match &error {
                        ClientError::Server(body) => {
                            (body.code.name(), format!("{}: {}", body.code.name(), body.message))
                        }
                        other => ("unreachable", other.to_string()),
                    };
                    // Resuming works unless the server no longer has the events after the
                    // position (or never had them): then only a resync does.
                    let lost = matches!(
                        &error,
                        ClientError::Server(body) if body.code == ErrorCode::SUBSCRIBER_TOO_SLOW
                            || body.code == ErrorCode::POSITION_TOO_OLD
                            || body.code == ErrorCode::INVALID_POSITION
                    );
                    let message = if lost {
                        format!(
                            "the event stream ended ({reason}); the events after {cursor} are not all on the \
                             server any more: resynchronise from balance reads, then watch --from now"
                        )
                    } else {
                        format!("the event stream ended ({reason}); resume with --from {cursor}")
                    };
                    eprintln!("stormledger: {message}");
                    if cli.json {
                        // The last line is one JSON object, as for every other failure.
                        let mut obj = Obj::new();
                        obj.set("status", status).set("error", message).set("position", cursor.to_string());
                        emit(&obj.to_string());
                    }
                    return EXIT_UNREACHABLE;
                }
            };
            for event in &events {
                cursor.advance(event);
                emit(&event_line(event, &cursor, cli.json));
                printed += 1;
                if args.limit.is_some_and(|limit| printed >= limit) {
                    return EXIT_OK;
                }
            }
        }
    })
}

/// A payment channel's name from its code (`unknown` for a code this version does not know).
fn channel_name(code: u64) -> &'static str {
    u16::try_from(code).ok().and_then(crate::ledger::Channel::from_code).map_or("unknown", |c| c.name())
}

/// A top-up failure reason's name from its code (`unknown` likewise).
fn reason_name(code: u64) -> &'static str {
    u16::try_from(code).ok().and_then(crate::ledger::FailReason::from_code).map_or("unknown", |r| r.name())
}

/// One event as a line: JSON, or `position kind id account -> counterparty amount ...`.
fn event_line(e: &crate::layout::EventRecord, cursor: &crate::feed::Cursor, json: bool) -> String {
    use crate::feed::event_kind;
    let kind = event_kind::name(e.kind);
    let position = cursor.to_string();
    let spend = matches!(e.kind, event_kind::TIP | event_kind::GIFT | event_kind::EVENT_PAYMENT);
    if !json {
        // The same units as the JSON: money in yuan, coins as coins.
        let head = format!("{position} {kind} id={} account={}", e.id.get(), e.account.get());
        return match e.kind {
            event_kind::TOPUP_SUCCEEDED => format!(
                "{head} amount={} coins={} channel={}",
                format_yuan(e.amount.get() as i64),
                e.streamer_share.get(),
                channel_name(e.detail.get())
            ),
            event_kind::TOPUP_REFUNDED => {
                format!("{head} amount={} channel={}", format_yuan(e.amount.get() as i64), channel_name(e.detail.get()))
            }
            event_kind::TOPUP_FAILED => {
                format!("{head} amount={} reason={}", format_yuan(e.amount.get() as i64), reason_name(e.detail.get()))
            }
            _ if spend => {
                let mut line = format!(
                    "{head} coins={} to={} streamer_share={}",
                    e.amount.get(),
                    e.counterparty.get(),
                    e.streamer_share.get()
                );
                if e.union.get() != 0 {
                    line += &format!(" union={} union_share={}", e.union.get(), e.union_share.get());
                }
                line + &format!(" platform_share={}", e.platform_share.get())
            }
            _ => format!("{head} coins={}", e.amount.get()),
        };
    }
    let mut obj = Obj::new();
    obj.set("status", "ok")
        .set("position", position)
        .set("shard", e.shard.get())
        .set("event", format!("{}.{}", e.lsn.get(), e.index.get()))
        .set("kind", kind)
        .set("id", e.id.get())
        .set("timestamp", e.timestamp.get())
        .set("account", e.account.get());
    match e.kind {
        event_kind::TOPUP_SUCCEEDED => {
            obj.set("amount", format_yuan(e.amount.get() as i64)).set("coins", e.streamer_share.get());
            obj.set("channel", channel_name(e.detail.get())).set("detail", e.detail.get());
        }
        event_kind::TOPUP_REFUNDED => {
            obj.set("amount", format_yuan(e.amount.get() as i64)).set("channel", channel_name(e.detail.get()));
            obj.set("detail", e.detail.get());
        }
        event_kind::TOPUP_FAILED => {
            obj.set("amount", format_yuan(e.amount.get() as i64)).set("reason", reason_name(e.detail.get()));
            obj.set("detail", e.detail.get());
        }
        event_kind::SETTLE => {
            obj.set("coins", e.amount.get());
        }
        _ => {
            obj.set("to", e.counterparty.get())
                .set("coins", e.amount.get())
                .set("streamer_share", e.streamer_share.get())
                .set("union", e.union.get())
                .set("union_share", e.union_share.get())
                .set("platform_share", e.platform_share.get())
                .set("detail", e.detail.get());
        }
    }
    obj.to_string()
}

fn resolve_token(cli: &Cli, admin: bool) -> Result<(String, String), String> {
    let dir = cli.data_dir.clone().unwrap_or_else(|| PathBuf::from(DEFAULT_DATA_DIR));
    let check = |t: &str, from: &str| token::validate(t).map_err(|e| format!("{from}: {e}"));
    if admin {
        if let Some(t) = &cli.admin_token {
            check(t, "--admin-token")?;
            return Ok((t.clone(), "--admin-token / STORMLEDGER_ADMIN_TOKEN".into()));
        }
        let path = dir.join(token::ADMIN_TOKEN_FILE);
        if let Some(t) = token::read(&path)? {
            return Ok((t, path.display().to_string()));
        }
        // Last resort: the operator may have passed the admin token as --token.
        if let Some(t) = &cli.token {
            check(t, "--token")?;
            return Ok((t.clone(), "--token / STORMLEDGER_TOKEN".into()));
        }
        return Err(format!(
            "no admin token: admin commands need --admin-token TOKEN, STORMLEDGER_ADMIN_TOKEN, or --data-dir \
             pointing at the server's data directory ({} not found)",
            path.display()
        ));
    }
    if let Some(t) = &cli.token {
        check(t, "--token")?;
        return Ok((t.clone(), "--token / STORMLEDGER_TOKEN".into()));
    }
    let path = dir.join(token::CLIENT_TOKEN_FILE);
    match token::read(&path)? {
        Some(t) => Ok((t, path.display().to_string())),
        None => Err(format!(
            "no token: pass --token TOKEN, set STORMLEDGER_TOKEN, or point --data-dir at the server's data \
             directory ({} not found)",
            path.display()
        )),
    }
}

/// The TLS settings of `--tls-ca` / `--tls-server-name`; `None` (plaintext) without `--tls-ca`.
/// The server name defaults to the host part of `--connect` (a DNS name, or an IP address that
/// the certificate must list as such).
fn tls_config(cli: &Cli) -> Result<Option<TlsClientConfig>, Failure> {
    let Some(ca) = &cli.tls_ca else {
        if cli.tls_server_name.is_some() {
            return Err(Failure::usage("--tls-server-name needs --tls-ca (the CA certificate to trust)"));
        }
        return Ok(None);
    };
    let name = cli.tls_server_name.as_deref().unwrap_or_else(|| crate::tls::default_server_name(&cli.connect));
    TlsClientConfig::from_ca_file(ca, name).map(Some).map_err(|e| Failure::usage(format!("--tls-ca: {e}")))
}

fn plaintext_to_remote(error: &ClientError) -> Failure {
    Failure::usage(format!("{error}: pass --tls-ca FILE, or --allow-remote-plaintext on a trusted network"))
}

fn tls_required(addr: &str, message: &str) -> Failure {
    Failure::unreachable(format!(
        "the server at {addr} refused a plaintext connection (tls_required: {message}); if it serves TLS, connect \
         with --tls-ca FILE (the CA that signed its certificate)"
    ))
}

async fn connect(cli: &Cli, admin: bool, timeout: Duration) -> Result<Client, Failure> {
    let addr = cli.connect.as_str();
    super::args::parse_host_port(addr).map_err(|e| Failure::usage(format!("--connect {addr:?}: {e}")))?;
    let tls = tls_config(cli)?;
    let (token, source) = match resolve_token(cli, admin) {
        Ok(found) => found,
        Err(why) => {
            // Say first whether the server is there at all: an unreachable server is the more
            // fundamental problem, and both exit 3.
            return Err(match tokio::time::timeout(timeout, tokio::net::TcpStream::connect(addr)).await {
                Ok(Ok(_)) => Failure::auth(why),
                Ok(Err(e)) => Failure::unreachable(format!("cannot reach the stormledger server at {addr}: {e}")),
                Err(_) => Failure::unreachable(format!("cannot reach the stormledger server at {addr}: timed out")),
            });
        }
    };
    let mut config = ClientConfig::new(token);
    config.role = if admin { Role::Admin } else { Role::Client };
    config.connect_timeout = timeout.min(Duration::from_secs(10));
    let server_name = tls.as_ref().map(|tls| tls.server_name.to_str().into_owned());
    config.tls = tls;
    config.allow_remote_plaintext = cli.allow_remote_plaintext;
    Client::connect_with(addr, config).await.map_err(|e| match e {
        e @ ClientError::PlaintextToRemote(_) => plaintext_to_remote(&e),
        ClientError::Tls(e) => Failure::unreachable(format!(
            "TLS handshake with the server at {addr} (server name {}) failed: {e}{}",
            server_name.as_deref().unwrap_or("?"),
            crate::tls::handshake_hint(&e)
        )),
        ClientError::Server(body) if body.code == ErrorCode::TLS_REQUIRED => tls_required(addr, &body.message),
        ClientError::Io(e) => Failure::unreachable(format!("cannot reach the stormledger server at {addr}: {e}")),
        ClientError::Auth(body) => {
            let role = if admin { "the admin role (admin commands need the admin token)" } else { "the client role" };
            Failure::auth(format!(
                "authentication failed at {addr}: the server refused the token from {source} for {role} ({})",
                body.message
            ))
        }
        ClientError::InvalidRequest(why) => Failure::auth(format!("invalid token from {source}: {why}")),
        ClientError::Protocol(e) => {
            Failure::unreachable(format!("{addr} did not answer like a stormledger server (protocol error: {e})"))
        }
        ClientError::Server(body) => Failure::unreachable(format!(
            "the server at {addr} refused the connection: {:?} {}",
            body.code, body.message
        )),
        other => {
            Failure::unreachable(format!("the server at {addr} closed the connection during the handshake: {other}"))
        }
    })
}

/// What to do with a write that may be retried: the same command, with its first-send time.
fn retry_advice(first_sent: u64) -> String {
    match first_sent {
        0 => "retry it unchanged, with the same id".to_string(),
        _ => format!("retry it unchanged, with the same id and --first-sent {first_sent}"),
    }
}

fn in_doubt(cli: &Cli, first_sent: Option<u64>, error: impl core::fmt::Display) -> Failure {
    let addr = &cli.connect;
    if let Some(first_sent) = first_sent {
        let retry = retry_advice(first_sent);
        Failure {
            exit: EXIT_UNREACHABLE,
            status: "unknown_outcome",
            message: format!(
                "no definitive answer from {addr} ({error}): the command may or may not have been applied; {retry}"
            ),
            first_sent: (first_sent > 0).then_some(first_sent),
        }
    } else {
        Failure::unreachable(format!("the read failed at {addr}: {error}"))
    }
}

async fn execute(cli: &Cli, request: Request) -> Result<(Obj, String), Failure> {
    let timeout = Duration::from_secs(cli.timeout);
    let admin = matches!(request, Request::Write { admin: true, .. });
    // For a write: its first-send time (0 if it has none), which a retry must repeat.
    let first_sent = match &request {
        Request::Write { record, .. } => Some(record.timestamp.get()),
        _ => None,
    };
    let client = connect(cli, admin, timeout).await.map_err(|mut failure| {
        // Not sent, so not applied; its retry still repeats the first-send time (a payment
        // callback's says it was on time).
        if let (EXIT_UNREACHABLE, "unreachable", Some(first_sent @ 1..)) = (failure.exit, failure.status, first_sent) {
            failure.first_sent = Some(first_sent);
            failure.message.push_str(&format!(" (the command was not sent; {})", retry_advice(first_sent)));
        }
        failure
    })?;
    let work = run(&client, request);
    match tokio::time::timeout(timeout, work).await {
        Ok(Ok((mut obj, mut line))) => {
            // Refused before anything happened, to be retried: the retry repeats the first-send
            // time, as after an unknown outcome.
            let status = obj.get("status").and_then(|s| s.as_str());
            let retryable = Status::ALL.iter().any(|s| s.is_retryable() && Some(s.name()) == status);
            if let (true, Some(first_sent @ 1..)) = (retryable, first_sent) {
                obj.set("first_sent", first_sent);
                line.push_str(&format!(" ({})", retry_advice(first_sent)));
            }
            Ok((obj, line))
        }
        Ok(Err(e)) => Err(in_doubt(cli, first_sent, e)),
        Err(_) => Err(in_doubt(cli, first_sent, format!("no answer within {} s", cli.timeout))),
    }
}

async fn run(client: &Client, request: Request) -> Result<(Obj, String), ClientError> {
    match request {
        Request::Write { record, cmd, extra, .. } => {
            let reply = client.submit(vec![record]).await?.pop().ok_or(ClientError::Closed)?;
            let obj = write_report(record.kind, cmd.as_ref(), &extra, &reply);
            let line = write_line(&obj);
            Ok((obj, line))
        }
        Request::Balance(account) => {
            let reply = client.balance(account).await?;
            let code = reply.status.get();
            let mut obj = Obj::new();
            obj.set("status", status_name(code)).set("account", account);
            let line = if code == Status::Ok.code() {
                obj.set("balance", reply.value.get());
                // The fen accounts (system: channels, suspense, coin sales) say so, with yuan.
                // A clearing account is named by its channel too (`channel alipay`).
                let name = |kind: crate::ledger::AccountKind| {
                    let code = account.wrapping_sub(crate::ledger::command::SYSTEM_CHANNEL_BASE);
                    match u16::try_from(code).ok().and_then(crate::ledger::Channel::from_code) {
                        Some(channel) if kind == crate::ledger::AccountKind::Channel => {
                            format!("channel {}", channel.name())
                        }
                        _ => kind.name().to_string(),
                    }
                };
                let system = crate::ledger::command::SYSTEM_ACCOUNTS.iter().find(|(id, _)| *id == account);
                match system.map(|&(_, kind)| (name(kind), kind.unit())) {
                    Some((name, crate::ledger::command::Unit::Fen)) => format!(
                        "account {account} ({name}) balance {} fen ({} yuan)",
                        reply.value.get(),
                        format_yuan(reply.value.get())
                    ),
                    Some((name, _)) => format!("account {account} ({name}) balance {}", reply.value.get()),
                    None => format!("account {account} balance {}", reply.value.get()),
                }
            } else if code == Status::NotFound.code() {
                format!("not_found: account {account} does not exist")
            } else {
                format!("{}: balance of account {account} not available", status_name(code))
            };
            Ok((obj, line))
        }
        Request::TopUpStatus(id) => {
            let mut query = QueryRecord { kind: QUERY_KIND_TOPUP_STATUS, ..QueryRecord::default() };
            query.key.set(id);
            let reply = client.query(query).await?.reply;
            let code = reply.status.get();
            let mut obj = Obj::new();
            obj.set("status", status_name(code)).set("id", id);
            let line = if code == Status::Ok.code() {
                let state = TopUpState::from_code(reply.value.get())
                    .map(|s| s.name().to_string())
                    .unwrap_or_else(|| format!("unknown_state_{}", reply.value.get()));
                let amount = format_yuan(reply.value2.get());
                let line = format!("top-up {id}: {state}, amount {amount} yuan");
                obj.set("state", state).set("amount", amount);
                line
            } else if code == Status::NotFound.code() {
                format!("not_found: no top-up with id {id}")
            } else {
                format!("{}: status of top-up {id} not available", status_name(code))
            };
            Ok((obj, line))
        }
        Request::Lookup(id) => {
            let mut query = QueryRecord { kind: QUERY_KIND_LOOKUP, ..QueryRecord::default() };
            query.key.set(id);
            let answer = client.query(query).await?;
            let mut obj = Obj::new();
            // Found: the answer carries the logged command, and `reply` is the command's own
            // result (status, value, value2). Not found (or busy): no command, status in `reply`.
            let Some(record) = answer.command else {
                let code = answer.reply.status.get();
                let code = if code == Status::Ok.code() { Status::NotFound.code() } else { code };
                obj.set("status", status_name(code)).set("id", id);
                let line = if code == Status::NotFound.code() {
                    format!("not_found: no command with id {id} (ids are remembered for a bounded window)")
                } else {
                    format!("{}: command {id} cannot be looked up now", status_name(code))
                };
                return Ok((obj, line));
            };
            let cmd = Command::from_record(&record).ok();
            let result = answer.reply;
            let result_status = result.status.get();
            let ts = record.timestamp.get();
            obj.set("status", "ok").set("id", id).set("kind", kind::name(record.kind));
            obj.set("result", status_name(result_status));
            obj.set("time", output::format_time(ts)).set("timestamp", ts);
            if let Some(cmd) = &cmd {
                output::command_fields(cmd, &mut obj);
                obj.set("id", id);
                let status = Status::from_code(result_status);
                output::result_fields(cmd, status, result.value.get(), result.value2.get(), &mut obj);
            }
            let line = format!(
                "{} {id} applied at {}: result {}; {}",
                kind::name(record.kind),
                output::format_time(ts),
                status_name(result_status),
                obj.words(&["status", "id", "kind", "result", "time", "timestamp"])
            );
            Ok((obj, line))
        }
        Request::History { account, limit, before } => {
            let mut query = QueryRecord { kind: QUERY_KIND_HISTORY, ..QueryRecord::default() };
            query.key.set(account);
            // One more than shown (within the server's cap), to tell the last page from a full
            // one: `next` is then null on the last page, not a cursor to an empty one.
            let ask = if limit < crate::engine::HISTORY_LIMIT_MAX { limit + 1 } else { limit };
            query.limit.set(ask);
            if let Some(c) = before {
                query.before_ts.set(c.timestamp);
                query.before_shard.set(c.shard);
            }
            let answer = client.query(query).await?;
            let code = answer.reply.status.get();
            let mut obj = Obj::new();
            obj.set("status", status_name(code)).set("account", account);
            if code != Status::Ok.code() {
                let line = if code == Status::NotFound.code() {
                    format!("not_found: account {account} does not exist")
                } else {
                    format!("{}: history of account {account} not available", status_name(code))
                };
                return Ok((obj, line));
            }
            let mut answer = answer;
            let next = if ask > limit {
                let more = answer.history.len() > limit as usize;
                answer.history.truncate(limit as usize);
                let last = answer.history.last().filter(|_| more);
                last.map(|h| Cursor { timestamp: h.timestamp.get(), shard: u64::from(h.shard) })
            } else {
                (answer.next_before_ts != 0)
                    .then_some(Cursor { timestamp: answer.next_before_ts, shard: answer.next_before_shard })
            };
            let entries: Vec<Obj> = answer.history.iter().map(output::history_entry).collect();
            obj.set_list("records", entries);
            obj.set("next", next.map(|c| c.to_string()));
            let mut lines = Vec::new();
            if answer.history.is_empty() {
                lines.push(format!("account {account}: no records"));
            } else {
                // AMOUNT and BALANCE in the account's unit (coins); BALANCE of a streamer or
                // union is its stripe on SHARD, not the total. DETAIL names its unit.
                lines.push(format!(
                    "{:<30} {:>20} {:<14} {:<28} {:>14} {:>14} {:>5} {:>20} DETAIL",
                    "TIME (UTC)", "ID", "KIND", "STATUS", "AMOUNT", "BALANCE", "SHARD", "COUNTERPARTY"
                ));
                for h in &answer.history {
                    lines.push(format!(
                        "{:<30} {:>20} {:<14} {:<28} {:>14} {:>14} {:>5} {:>20} {}",
                        output::format_time(h.timestamp.get()),
                        h.id.get(),
                        kind::name(h.kind),
                        status_name(h.status.get()),
                        h.amount.get(),
                        h.balance_after.get(),
                        h.shard,
                        h.counterparty.get(),
                        output::history_detail(h)
                    ));
                }
            }
            if let Some(c) = next {
                lines.push(format!("more: stormledger history {account} --limit {limit} --before {c}"));
            }
            Ok((obj, lines.join("\n")))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn request(args: &[&str]) -> Result<Request, Failure> {
        build(&Cli::try_parse_from(args).unwrap().command)
    }

    #[test]
    fn builds_commands() {
        let r = request(&["stormledger", "account", "create", "--id", "7", "--kind", "user", "--real-name"]).unwrap();
        let Request::Write { cmd: Some(Command::CreateAccount { account: 7, flags: f, .. }), admin: false, .. } = r
        else {
            panic!("{r:?}")
        };
        assert_eq!(f, flags::REAL_NAME);
        let r = request(&["stormledger", "admin", "maintenance", "on"]).unwrap();
        let Request::Write { record, admin: true, .. } = r else { panic!("{r:?}") };
        assert_eq!((record.kind, record.flags), (kind::MAINTENANCE, 1));
        let r = request(&["stormledger", "topup", "confirm", "--id", "1", "--channel-txn", "a b", "--amount", "6"]);
        assert_eq!(r.unwrap_err().exit, EXIT_USAGE);
        let r = request(&["stormledger", "watch"]);
        assert_eq!(r.unwrap_err().exit, EXIT_USAGE);
    }

    #[test]
    fn bad_amounts_are_usage_errors() {
        let e = Cli::try_parse_from([
            "stormledger",
            "topup",
            "begin",
            "--id",
            "1",
            "--user",
            "2",
            "--method",
            "3",
            "--amount",
            "12.345",
        ])
        .unwrap_err();
        assert_eq!(e.exit_code(), 2);
        assert!(e.to_string().contains("decimal places"), "{e}");
    }
}
