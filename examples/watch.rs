//! Following the event feed: committed top-ups, tips, gifts and settlements, as they happen.
//!
//! A `Watcher` is a subscription on a connection of its own. It starts from now, from the
//! earliest event the server still keeps, or after a cursor (one position per shard, printed
//! `SHARD:LSN.INDEX,...`). The watcher keeps the cursor as events arrive; after a disconnect, a new
//! subscription after that cursor continues with no gap and no duplicate. Events of one shard
//! arrive in commit order; there is no order across shards.
//!
//! ```sh
//! cargo run --release --example watch                                  # from now, forever
//! cargo run --release --example watch -- --from earliest --limit 10
//! cargo run --release --example watch -- --from 0:12.3,1:7.0          # resume after a cursor
//! ```
//!
//! Each event is printed with the cursor after it. When the stream breaks (the server restarts,
//! the connection drops, the subscriber fell too far behind) the example reconnects from its
//! cursor. With `--limit N` it stops after N events and prints the cursor to resume from.

mod common;

use std::time::Duration;

use clap::Parser;
use common::{Connect, Error};
use stormledger::client::retry::is_retryable;
use stormledger::client::watch::{WatchFrom, Watcher};
use stormledger::client::ClientError;
use stormledger::feed::{event_kind, Cursor};
use stormledger::layout::EventRecord;
use stormledger::protocol::ErrorCode;

#[derive(Parser, Debug)]
#[command(about = "Follow the event feed, resuming from the cursor after a disconnect")]
struct Args {
    #[command(flatten)]
    connect: Connect,
    /// `now`, `earliest`, or a cursor `SHARD:LSN.INDEX[,...]` to continue after.
    #[arg(long, default_value = "now")]
    from: String,
    /// Stop after this many events.
    #[arg(long)]
    limit: Option<u64>,
    /// Give up after this many reconnects in a row without a subscription.
    #[arg(long, default_value_t = 10)]
    reconnects: u32,
}

/// One event on one line: `CURSOR KIND id=... account=... amount=...`. A top-up's amount is in
/// fen (and `coins` says what was credited); spending is in coins, with its split between the
/// streamer, the union (0 if none) and the platform.
fn line(cursor: &Cursor, event: &EventRecord) -> String {
    let mut text = format!(
        "{cursor} {} id={} account={} amount={}",
        event_kind::name(event.kind),
        event.id.get(),
        event.account.get(),
        event.amount.get()
    );
    if event.kind == event_kind::TOPUP_SUCCEEDED {
        text += &format!(" coins={}", event.streamer_share.get());
    }
    if matches!(event.kind, event_kind::TIP | event_kind::GIFT | event_kind::EVENT_PAYMENT) {
        text += &format!(
            " to={} streamer_share={} union={} union_share={} platform_share={}",
            event.counterparty.get(),
            event.streamer_share.get(),
            event.union.get(),
            event.union_share.get(),
            event.platform_share.get()
        );
    }
    text
}

/// Failures after which subscribing again from the cursor may work: the connection broke, the
/// server is restarting, or this subscriber fell behind the server's ring of recent events.
/// Not: a wrong token, a position the server no longer keeps, a server without a feed.
fn worth_resuming(error: &ClientError) -> bool {
    is_retryable(error) || matches!(error, ClientError::Server(body) if body.code == ErrorCode::SUBSCRIBER_TOO_SLOW)
}

async fn watch(args: Args) -> Result<(), Error> {
    let config = args.connect.config()?;
    let addr = args.connect.connect.as_str();
    let mut from = match args.from.as_str() {
        "now" => WatchFrom::Now,
        "earliest" => WatchFrom::Earliest,
        cursor => WatchFrom::After(cursor.parse::<Cursor>()?),
    };
    let mut seen = 0u64;
    let mut failures = 0;
    loop {
        let mut watcher = match Watcher::connect(addr, &config, from.clone()).await {
            Ok(watcher) => watcher,
            Err(error) if worth_resuming(&error) && failures < args.reconnects => {
                failures += 1;
                eprintln!("watch: cannot subscribe ({error}); retrying in 1 s");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
            Err(error) => return Err(format!("cannot subscribe at {addr}: {error}").into()),
        };
        failures = 0;
        // The server's answer: where the subscription starts on every shard.
        let mut cursor = watcher.cursor().clone();
        println!("watching from {cursor}");
        if args.limit == Some(0) {
            return Ok(());
        }
        loop {
            let events = match watcher.next().await {
                Ok(events) => events,
                Err(error) if worth_resuming(&error) => {
                    // `watcher.cursor()` is past every event returned so far, and so is `cursor`.
                    eprintln!("watch: the stream ended ({error}); resuming after {cursor}");
                    from = WatchFrom::After(cursor);
                    break;
                }
                Err(error) => return Err(format!("the stream ended: {error}; last position {cursor}").into()),
            };
            for event in &events {
                cursor.advance(event);
                println!("{}", line(&cursor, event));
                seen += 1;
                if args.limit == Some(seen) {
                    println!("resume with --from {cursor}");
                    return Ok(());
                }
            }
        }
    }
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    common::run("watch", watch(args))
}
