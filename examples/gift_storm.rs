//! A gift storm: many tasks share one `Client` and each sends its tips one call at a time; the
//! client batches them into frames on its own.
//!
//! `Client` is one connection, cheap to clone. Every call goes into one queue; while the
//! connection's window of unanswered frames (announced by the server) is full, calls pile up, and
//! the next frame carries all of them. So thousands of single-tip calls in flight travel in a
//! handful of frames, and the server logs and syncs each frame's tips as one batch.
//!
//! ```sh
//! cargo run --release --bin stormledger -- serve --metrics 127.0.0.1:9878   # one terminal
//! cargo run --release --example gift_storm                                  # another
//! cargo run --release --example gift_storm -- --tips 1000000 --users 10000 --tasks 1024 \
//!     --metrics 127.0.0.1:9878
//! ```
//!
//! With `--metrics` (the server's `serve --metrics` address) the example reads the server's frame
//! and command counters before and after the storm and prints how many tips each frame carried.
//! It checks that every tip was applied exactly once (the users' balances fell by exactly the
//! coins tipped) and exits with status 1 otherwise.

mod common;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use common::{check, expect_ok, fresh_ids, status, Connect, Error};
use stormledger::client::Client;
use stormledger::layout::{text_field, CommandRecord, QueryRecord, ReplyRecord};
use stormledger::ledger::command::flags;
use stormledger::ledger::{AccountKind, Channel, Command, Status};
use stormledger::protocol::QUERY_KIND_BALANCE;

#[derive(Parser, Debug)]
#[command(about = "Many concurrent tasks tipping one streamer through one shared, batching client")]
struct Args {
    #[command(flatten)]
    connect: Connect,
    /// Tips to send in total.
    #[arg(long, default_value_t = 100_000)]
    tips: u64,
    /// Users who tip (each is funded for its share of the tips).
    #[arg(long, default_value_t = 1_000)]
    users: u64,
    /// Concurrent tasks, each sending one tip per call.
    #[arg(long, default_value_t = 512)]
    tasks: u64,
    /// Coins per tip.
    #[arg(long, default_value_t = 10)]
    coins: u64,
    /// The server's metrics address (`serve --metrics ADDR`), to count the frames.
    #[arg(long, value_name = "ADDR")]
    metrics: Option<String>,
}

/// Submits `records`, resubmitting those answered `busy` (a shard's queue was full: nothing was
/// recorded under the id, so the same record may be sent again) until they get a result.
async fn submit(client: &Client, records: Vec<CommandRecord>) -> Result<Vec<ReplyRecord>, Error> {
    let mut replies = client.submit(records.clone()).await?;
    let mut wait = Duration::from_millis(1);
    loop {
        let retry: Vec<usize> =
            (0..replies.len()).filter(|&i| status(&replies[i]).is_ok_and(|s| s.is_retryable())).collect();
        if retry.is_empty() {
            return Ok(replies);
        }
        if wait > Duration::from_secs(5) {
            return Err(format!("{} commands still {} after retries", retry.len(), status(&replies[retry[0]])?).into());
        }
        tokio::time::sleep(wait).await;
        wait *= 2;
        let again = client.submit(retry.iter().map(|&i| records[i]).collect()).await?;
        for (i, reply) in retry.into_iter().zip(again) {
            replies[i] = reply;
        }
    }
}

/// Submits `commands` in as few frames as fit and fails unless every one is accepted.
async fn all_ok(client: &Client, what: &str, commands: impl Iterator<Item = Command>) -> Result<(), Error> {
    for reply in submit(client, commands.map(|c| c.to_record()).collect()).await? {
        expect_ok(&format!("{what} {}", reply.id.get()), &reply)?;
    }
    Ok(())
}

/// The sum of the balances of `accounts`, read in one batch of queries.
async fn total_balance(client: &Client, accounts: &[u64]) -> Result<i64, Error> {
    let queries = accounts.iter().map(|&account| {
        let mut query = QueryRecord { kind: QUERY_KIND_BALANCE, ..QueryRecord::default() };
        query.key.set(account);
        query
    });
    let mut total = 0;
    for answer in client.queries(queries.collect()).await? {
        expect_ok(&format!("balance of {}", answer.reply.id.get()), &answer.reply)?;
        total += answer.reply.value.get();
    }
    Ok(total)
}

/// `(frames received, commands received)` from the server's Prometheus endpoint.
fn server_counters(metrics: &str) -> Result<(u64, u64), Error> {
    use std::io::{Read, Write};
    let mut socket = std::net::TcpStream::connect(metrics)?;
    socket.write_all(format!("GET /metrics HTTP/1.0\r\nHost: {metrics}\r\n\r\n").as_bytes())?;
    let mut text = String::new();
    socket.read_to_string(&mut text)?;
    let counter = |name: &str| {
        text.lines()
            .find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
            .ok_or_else(|| format!("no {name} at http://{metrics}/metrics"))
    };
    Ok((counter("stormledger_frames_received_total")?, counter("stormledger_commands_received_total")?))
}

async fn gift_storm(args: Args) -> Result<(), Error> {
    check(args.users > 0 && args.tasks > 0 && args.coins > 0, "--users, --tasks and --coins must be positive")?;
    let client = Client::connect_with(args.connect.connect.as_str(), args.connect.config()?).await?;
    let session = client.session();
    println!(
        "connected to {}: up to {} frames in flight, {} commands per frame",
        args.connect.connect, session.in_flight_max, session.commands_per_frame_max
    );

    // Ids: the streamer, the users, their top-ups, then the tips; all new on every run.
    let base = fresh_ids();
    let streamer = base;
    let users: Vec<u64> = (1..=args.users).map(|i| base + i).collect();
    let topup_base = base + args.users + 1;
    let tip_base = topup_base + args.users;

    // Setup, in batches: one `submit` call per step, whatever the number of users (the client
    // splits a call into frames of at most 8 192 commands).
    let tips_per_user = args.tips.div_ceil(args.users);
    let coins_per_user = tips_per_user * args.coins;
    // 10 coins per yuan by default, so a coin is 10 fen; custom amounts start at 1 yuan.
    let fen = (coins_per_user * 10).max(100);
    check(fen <= 5_000_000, "each user would need more than 50 000 yuan (the largest top-up): raise --users")?;
    let create = |account, kind, flags| Command::CreateAccount { account, kind, flags, union: 0 };
    all_ok(&client, "create streamer", [create(streamer, AccountKind::Streamer, 0)].into_iter()).await?;
    all_ok(&client, "create user", users.iter().map(|&u| create(u, AccountKind::User, flags::REAL_NAME))).await?;
    let bind = |&user| Command::BindMethod { user, method: 1, channel: Channel::Alipay };
    all_ok(&client, "bind method", users.iter().map(bind)).await?;
    let begin = |(i, &user)| Command::TopUpBegin { id: topup_base + i as u64, user, method: 1, fen };
    all_ok(&client, "top-up begin", users.iter().enumerate().map(begin)).await?;
    let confirm = |i: usize| {
        let id = topup_base + i as u64;
        let channel_txn = text_field(&format!("A{id}")).expect("short enough");
        Command::TopUpConfirm { id, fen, channel_txn, paid_by: 0 }
    };
    all_ok(&client, "top-up confirm", (0..users.len()).map(confirm)).await?;
    let funded = total_balance(&client, &users).await?;
    check(funded >= (coins_per_user * args.users) as i64, format!("users funded with {funded} coins only"))?;
    println!("streamer {streamer}; {} users funded with {} coins each", args.users, funded / args.users as i64);

    // The storm: `tasks` tasks share the client (a clone is the same connection) and take the next
    // tip number from a shared counter until all are sent. Each call carries one tip.
    let before = args.metrics.as_deref().map(server_counters).transpose()?;
    let next = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..args.tasks {
        let (client, next, users) = (client.clone(), next.clone(), users.clone());
        let (tips, coins) = (args.tips, args.coins);
        tasks.push(tokio::spawn(async move {
            let mut outcomes: BTreeMap<Status, u64> = BTreeMap::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= tips {
                    return Ok::<_, Error>(outcomes);
                }
                let from = users[(i % users.len() as u64) as usize];
                let tip = Command::Tip { id: tip_base + i, from, to: streamer, coins };
                let reply = submit(&client, vec![tip.to_record()]).await?;
                *outcomes.entry(status(&reply[0])?).or_default() += 1;
            }
        }));
    }
    let mut outcomes: BTreeMap<Status, u64> = BTreeMap::new();
    for task in tasks {
        for (status, count) in task.await?? {
            *outcomes.entry(status).or_default() += count;
        }
    }
    let elapsed = started.elapsed();
    let after = args.metrics.as_deref().map(server_counters).transpose()?;

    let accepted = outcomes.get(&Status::Ok).copied().unwrap_or(0);
    println!(
        "{} tips from {} tasks in {:.3} s: {:.0} tips/s",
        args.tips,
        args.tasks,
        elapsed.as_secs_f64(),
        args.tips as f64 / elapsed.as_secs_f64()
    );
    for (status, count) in &outcomes {
        println!("  {status}: {count}");
    }
    if let (Some((frames0, commands0)), Some((frames1, commands1))) = (before, after) {
        // Server-wide counters: other clients' traffic during the storm is counted too.
        let (frames, commands) = (frames1 - frames0, commands1 - commands0);
        println!(
            "the server received {commands} commands in {frames} frames: {:.1} tips per frame for {} calls",
            commands as f64 / frames.max(1) as f64,
            args.tips
        );
    }

    // Every accepted tip was applied once: the users' balances fell by exactly the coins tipped.
    let left = total_balance(&client, &users).await?;
    let spent = funded - left;
    println!("users spent {spent} coins; streamer {streamer} earned {}", client.balance(streamer).await?.value.get());
    check(spent == (accepted * args.coins) as i64, format!("spent {spent}, expected {}", accepted * args.coins))?;
    check(accepted == args.tips, "some tips were not accepted")?;
    println!("every tip applied exactly once");
    Ok(())
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    common::run("gift_storm", gift_storm(args))
}
