//! Surviving a lost answer: `RetryingClient` reconnects and resubmits the same commands, and the
//! server answers the ones it had already applied with their original result.
//!
//! When a connection breaks with commands in flight, their outcome is unknown: the server may
//! have applied them and the replies were lost, or it never got them. Sending them again with the
//! same ids is always safe: an applied command is answered from its idempotency record (reply
//! flag bit 0, "duplicate") and applied no second time; a command that never arrived is applied
//! now. `RetryingClient` does this (bounded attempts, doubling backoff); it also stamps each
//! command with the time it was first sent, so that a retry arriving after the server forgot
//! the id is refused (`id_expired`) instead of applied twice.
//!
//! To show it without pulling a cable, the example puts a small TCP relay in front of the server
//! that breaks the first connection exactly when the server starts answering the tips: the server
//! has applied them (it answers only once they are durable) but the client never sees the replies.
//!
//! ```sh
//! cargo run --release --bin stormledger -- serve           # in one terminal
//! cargo run --release --example retry                      # in another
//! ```

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use common::{check, expect_ok, fresh_ids, is_duplicate, Connect, Error};
use stormledger::client::retry::RetryingClient;
use stormledger::client::Client;
use stormledger::layout::text_field;
use stormledger::ledger::command::flags;
use stormledger::ledger::{AccountKind, Channel, Command};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

#[derive(Parser, Debug)]
#[command(about = "RetryingClient resubmits the same ids after a connection lost the replies")]
struct Args {
    #[command(flatten)]
    connect: Connect,
    /// Tips (of 1 coin) to send in the batch whose replies are lost.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=980))]
    tips: u64,
}

/// The server's first frame on a connection: `AuthOk`, a 40-byte frame header and a 32-byte body
/// (docs/protocol.md). Everything after it answers the client's requests.
const AUTH_OK_BYTES: usize = 40 + 32;

/// A relay on a local port to `server`. On the first connection it passes the handshake through,
/// then closes both sides as soon as the server sends anything more (the replies to the first
/// request). Later connections are relayed untouched. Counts the connections.
async fn lossy_relay(server: String, connections: Arc<AtomicUsize>) -> Result<String, Error> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?.to_string();
    tokio::spawn(async move {
        while let Ok((mut client, _)) = listener.accept().await {
            let first = connections.fetch_add(1, Ordering::SeqCst) == 0;
            let Ok(mut upstream) = TcpStream::connect(&server).await else { continue };
            tokio::spawn(async move {
                if !first {
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
                    return;
                }
                let (mut client_read, mut client_write) = client.split();
                let (mut server_read, mut server_write) = upstream.split();
                let to_server = tokio::io::copy(&mut client_read, &mut server_write);
                let to_client = async {
                    let mut passed = 0;
                    let mut buf = [0u8; 4096];
                    while passed < AUTH_OK_BYTES {
                        let n = server_read.read(&mut buf[..AUTH_OK_BYTES - passed]).await?;
                        if n == 0 {
                            break;
                        }
                        client_write.write_all(&buf[..n]).await?;
                        passed += n;
                    }
                    // Wait for the first byte of the answer, then drop it and everything after.
                    let _ = server_read.read(&mut buf).await?;
                    Ok::<_, std::io::Error>(())
                };
                // Whichever side finishes first ends the connection: both sockets are closed.
                tokio::select! {
                    _ = to_server => {}
                    _ = to_client => {}
                }
            });
        }
    });
    Ok(addr)
}

async fn retry(args: Args) -> Result<(), Error> {
    let server = args.connect.connect.clone();
    let config = args.connect.config()?;

    // A funded user and a streamer, set up directly.
    let direct = Client::connect_with(server.as_str(), config.clone()).await?;
    let base = fresh_ids();
    let (user, streamer, topup, tips) = (base, base + 1, base + 2, base + 3);
    let setup = [
        Command::CreateAccount { account: user, kind: AccountKind::User, flags: flags::REAL_NAME, union: 0 },
        Command::CreateAccount { account: streamer, kind: AccountKind::Streamer, flags: 0, union: 0 },
        Command::BindMethod { user, method: 1, channel: Channel::Alipay },
        Command::TopUpBegin { id: topup, user, method: 1, fen: 98_00 },
        Command::TopUpConfirm {
            id: topup,
            fen: 98_00,
            channel_txn: text_field("retry-example").expect("short"),
            paid_by: 0,
        },
    ];
    for command in setup {
        expect_ok(&format!("{command:?}"), &direct.submit(vec![command.to_record()]).await?[0])?;
    }
    let funded = direct.balance(user).await?.value.get();
    println!("user {user} has {funded} coins; streamer {streamer}");

    // The tips go through the relay, which loses the replies of the first attempt.
    let connections = Arc::new(AtomicUsize::new(0));
    let relay = lossy_relay(server, connections.clone()).await?;
    let client = RetryingClient::new(relay.as_str(), config, 5, Duration::from_millis(50));
    let batch: Vec<_> =
        (0..args.tips).map(|i| Command::Tip { id: tips + i, from: user, to: streamer, coins: 1 }.to_record()).collect();
    println!(
        "sending {} tips of 1 coin (ids {tips}..{}) through a relay that loses the replies",
        args.tips,
        tips + args.tips
    );
    let replies = client.submit(batch).await?;
    let made = connections.load(Ordering::SeqCst);
    println!("answered after {made} connections");
    for reply in &replies {
        expect_ok(&format!("tip {}", reply.id.get()), reply)?;
    }
    let duplicates = replies.iter().filter(|r| is_duplicate(r)).count();
    println!("{} tips ok, {duplicates} of them answered as duplicates (applied on the lost connection)", replies.len());

    let left = direct.balance(user).await?.value.get();
    println!("user {user} balance: {left} coins ({} spent)", funded - left);
    check(made >= 2, "the first connection was not cut")?;
    check(duplicates == replies.len(), "the retry should have found every tip applied")?;
    check(funded - left == args.tips as i64, "each tip must be applied exactly once")?;
    println!("every tip applied exactly once");
    Ok(())
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    common::run("retry", retry(args))
}
