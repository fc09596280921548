//! The payments flow of one viewer, step by step, with the client library.
//!
//! A real-name verified user binds a payment method, buys the 30-yuan coin pack in two phases
//! (`TopUpBegin` when the user pays, `TopUpConfirm` when the payment channel's callback arrives),
//! gets the callback a second time (channels do that) and is credited once, tips a streamer who
//! belongs to a union, and finally tries to tip more than the balance.
//!
//! ```sh
//! cargo run --release --bin stormledger -- serve           # in one terminal
//! cargo run --release --example wallet                     # in another (token from ./data)
//! cargo run --release --example wallet -- --connect 127.0.0.1:7878 --token TOKEN
//! ```
//!
//! Every id is derived from the clock, so the example can run any number of times against the
//! same server. It checks every answer and exits with status 1 if one is not what it expects.

mod common;

use clap::Parser;
use common::{check, expect_ok, fresh_ids, is_duplicate, status, Connect, Error};
use stormledger::client::Client;
use stormledger::layout::{text_field, ReplyRecord};
use stormledger::ledger::command::flags;
use stormledger::ledger::{AccountKind, Channel, Command, Status};

/// The 30-yuan pack, in fen (1 yuan = 100 fen). Presets: 6, 30, 98, 198, 328, 648 yuan.
const PACK_FEN: u64 = 30_00;

#[derive(Parser, Debug)]
#[command(about = "The payments flow: accounts, a two-phase top-up with a repeated callback, a tip")]
struct Args {
    #[command(flatten)]
    connect: Connect,
}

/// Sends one command and returns its reply.
///
/// `Client::submit` takes a batch of records and answers one reply per record, in order; a call
/// with a single record is still batched with whatever other tasks send at the same time.
async fn send(client: &Client, command: Command) -> Result<ReplyRecord, Error> {
    let mut replies = client.submit(vec![command.to_record()]).await?;
    Ok(replies.pop().ok_or("no reply")?)
}

/// The committed balance of `account` (coins for wallets and earnings).
async fn balance(client: &Client, account: u64) -> Result<i64, Error> {
    let reply = client.balance(account).await?;
    expect_ok(&format!("balance of {account}"), &reply)?;
    Ok(reply.value.get())
}

async fn wallet(args: Args) -> Result<(), Error> {
    let client = Client::connect_with(args.connect.connect.as_str(), args.connect.config()?).await?;
    println!("connected to {} (connection {})", args.connect.connect, client.session().connection_id);

    // Account ids and transfer ids (top-ups, tips) are chosen by the client. A transfer id is its
    // idempotency key: sending the same command again returns its original result.
    let base = fresh_ids();
    let (user, union, streamer) = (base, base + 1, base + 2);
    let (topup, tip, big_tip) = (base + 3, base + 4, base + 5);
    let method = 1; // payment method ids are per user

    // 1. Accounts. Only a real-name verified adult user may top up and spend. A union must exist
    //    before a streamer names it: each reply comes once the account exists on every shard.
    let accounts = [
        ("user", Command::CreateAccount { account: user, kind: AccountKind::User, flags: flags::REAL_NAME, union: 0 }),
        ("union", Command::CreateAccount { account: union, kind: AccountKind::Union, flags: 0, union: 0 }),
        ("streamer", Command::CreateAccount { account: streamer, kind: AccountKind::Streamer, flags: 0, union }),
    ];
    for (what, command) in accounts {
        expect_ok(&format!("create {what}"), &send(&client, command).await?)?;
    }
    println!("created user {user} (real-name verified), union {union}, streamer {streamer} (in union {union})");

    // 2. A payment method: a top-up must name one bound to the user.
    expect_ok("bind method", &send(&client, Command::BindMethod { user, method, channel: Channel::Wechat }).await?)?;
    println!("bound payment method {method} (wechat) to user {user}");

    // 3. Top-up, phase one: the user picks the pack and pays at the channel. The top-up is
    //    pending; the reply carries the coins it will credit (value) and the fen (value2).
    let begin = send(&client, Command::TopUpBegin { id: topup, user, method, fen: PACK_FEN }).await?;
    expect_ok("top-up begin", &begin)?;
    println!("top-up {topup} pending: {} coins for {} fen", begin.value.get(), begin.value2.get());

    // 4. Phase two: the channel's callback confirms the payment, naming its own transaction id
    //    (up to 24 printable ASCII characters) and the amount. The wallet is credited now; the
    //    reply carries the coins credited (value) and the balance after (value2).
    let channel_txn = text_field(&format!("WX{topup}")).ok_or("channel transaction id too long")?;
    let confirm = Command::TopUpConfirm { id: topup, fen: PACK_FEN, channel_txn, paid_by: 0 };
    let first = send(&client, confirm).await?;
    expect_ok("top-up confirm", &first)?;
    println!(
        "confirm callback: {} duplicate={} coins={} balance={}",
        status(&first)?,
        is_duplicate(&first),
        first.value.get(),
        first.value2.get()
    );

    // 5. The channel calls back again (a timeout on its side, a retry, a replayed queue...). The
    //    same confirmation returns the original result, flagged as a duplicate, and credits
    //    nothing. (A different transaction id or amount for the same top-up would be answered
    //    `exists_with_different_fields`.)
    let again = send(&client, confirm).await?;
    expect_ok("repeated top-up confirm", &again)?;
    println!(
        "confirm callback again: {} duplicate={} coins={} balance={}",
        status(&again)?,
        is_duplicate(&again),
        again.value.get(),
        again.value2.get()
    );
    check(is_duplicate(&again), "the repeated callback was not answered as a duplicate")?;
    check((again.value.get(), again.value2.get()) == (first.value.get(), first.value2.get()), "a different result")?;
    let credited = begin.value.get();
    let after_topup = balance(&client, user).await?;
    check(after_topup == credited, format!("balance {after_topup}, expected {credited}: not credited exactly once"))?;
    println!("user {user} balance: {after_topup} coins (credited once)");

    // 6. A tip. It is split between the streamer, the union and the platform (50 %, 10 % and the
    //    rest by default). The reply carries the payer's balance after (value) and the coins
    //    spent (value2).
    let coins = 100;
    let tipped = send(&client, Command::Tip { id: tip, from: user, to: streamer, coins }).await?;
    expect_ok("tip", &tipped)?;
    println!("tip {tip}: {coins} coins from {user} to {streamer}, user balance now {}", tipped.value.get());

    // 7. Balances. A wallet is read from its shard; a streamer's or union's earnings are summed
    //    over all shards. Reads are committed values: what was acknowledged is visible.
    let user_balance = balance(&client, user).await?;
    let streamer_balance = balance(&client, streamer).await?;
    let union_balance = balance(&client, union).await?;
    println!("balances: user {user_balance}, streamer {streamer_balance}, union {union_balance}");
    check(user_balance == credited - coins as i64, "the tip was not debited once")?;

    // 8. A tip larger than the balance is a business rejection, not an error: the reply's status
    //    is `insufficient_funds` and its value is the balance. Nothing moved.
    let too_much = user_balance as u64 + 1;
    let refused = send(&client, Command::Tip { id: big_tip, from: user, to: streamer, coins: too_much }).await?;
    println!(
        "tip {big_tip} of {too_much} coins: {} (balance in the reply: {})",
        status(&refused)?,
        refused.value.get()
    );
    check(status(&refused)? == Status::InsufficientFunds, "expected insufficient_funds")?;
    check(refused.value.get() == user_balance, "the reply does not carry the balance")?;
    check(balance(&client, user).await? == user_balance, "a refused tip changed the balance")?;
    println!("done");
    Ok(())
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    common::run("wallet", wallet(args))
}
