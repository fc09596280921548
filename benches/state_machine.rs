//! The ceiling: one shard's state machine applying tips, no queues, no log, no threads.
//!
//! `cargo bench --bench state_machine` (`BENCH_USERS=N` for another number of users than 100 000;
//! `BENCH_IDS_MAX`, `BENCH_HISTORY_MAX` for other limits than 2^20 each).
//! Besides criterion's estimate it prints the deciles of the time a tip took in each batch.
//!
//! Then `bind_stall`: how long one command can stall a shard while its bindings grow. A fresh
//! shard binds a method for each of BENCH_BIND_USERS [4000000] users, and the slowest single
//! bind and the mean are printed. It runs unless a filter is given that does not match "bind".

use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use stormledger::config::{LedgerConfig, ShardLimits};
use stormledger::ledger::state_machine::accounts_max_for;
use stormledger::ledger::{Command, ShardState};
use stormledger::workload::StormSpec;

mod common;

fn funded_shard(spec: &StormSpec) -> (ShardState, u64) {
    let config =
        LedgerConfig { topup_custom_max_fen: 10_000_000, daily_cap_coins: 1_000_000_000, ..LedgerConfig::default() };
    let env = |name: &str, default: u32| std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default);
    let limits = ShardLimits {
        accounts_max: accounts_max_for(spec.users, spec.streamers + 64, 1) as u32,
        history_max: env("BENCH_HISTORY_MAX", 1 << 20),
        ids_max: env("BENCH_IDS_MAX", 1 << 20),
    };
    let mut state = ShardState::new(0, 1, config, limits);
    let mut ts = 1_795_752_000_000_000_000u64;
    for phase in spec.setup_phases() {
        for cmd in phase {
            ts += 1;
            let (reply, _) = state.apply(ts, &cmd);
            assert_eq!(reply.status, stormledger::ledger::Status::Ok, "{cmd:?}");
        }
    }
    (state, ts)
}

fn apply_tips(c: &mut Criterion) {
    let mut group = c.benchmark_group("state_machine");
    group.measurement_time(Duration::from_secs(5)).sample_size(20);
    for (name, hot) in [("storm_50pct_hot", 50), ("uniform", 0)] {
        let spec = StormSpec {
            users: std::env::var("BENCH_USERS").ok().and_then(|v| v.parse().ok()).unwrap_or(100_000),
            streamers: 1_000,
            hot_percent: hot,
            topup_yuan: 100_000,
            ..StormSpec::default()
        };
        let (mut state, mut ts) = funded_shard(&spec);
        let mut tips = spec.tips();
        const BATCH: usize = 8192;
        group.throughput(Throughput::Elements(BATCH as u64));
        // Nanoseconds a tip of every batch timed: criterion's mean moves by a third from one
        // process to the next on a shared VM, the fastest batches and the deciles much less.
        let mut per_batch: Vec<f64> = Vec::new();
        group.bench_function(format!("apply_tip/{name}"), |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                let mut batch: Vec<Command> = Vec::with_capacity(BATCH);
                for _ in 0..iters {
                    batch.clear();
                    batch.extend((0..BATCH).map(|_| tips.next_tip()));
                    let start = Instant::now();
                    // The worker's loop: prefetch two stages ahead, then apply.
                    for (i, cmd) in batch.iter().enumerate() {
                        if let Some(c) = batch.get(i + 12) {
                            state.prefetch_index(c);
                        }
                        if let Some(c) = batch.get(i + 6) {
                            state.prefetch_account(c);
                        }
                        ts += 1;
                        let (reply, _) = state.apply(ts, cmd);
                        std::hint::black_box(reply);
                    }
                    let took = start.elapsed();
                    per_batch.push(took.as_nanos() as f64 / BATCH as f64);
                    total += took;
                    // The worker hands the ids that left the window to the directory each batch.
                    drop(state.drain_evicted());
                }
                total
            })
        });
        // The first quarter is mostly warm-up (and the rings' first pages being faulted in).
        let warm_up = per_batch.len() / 4;
        let steady = &mut per_batch[warm_up..];
        steady.sort_by(f64::total_cmp);
        if let Some(&fastest) = steady.first() {
            let at = |q: f64| steady[((steady.len() - 1) as f64 * q) as usize];
            println!(
                "apply_tip/{name}: ns a tip per batch of {BATCH}, {} batches: fastest {fastest:.1}, p10 {:.1}, p50 {:.1}, p90 {:.1}",
                steady.len(),
                at(0.1),
                at(0.5),
                at(0.9)
            );
        }
    }
    group.finish();
}

/// See the module docs. Timed with `Instant` around each bind, not by criterion: the point is
/// the worst single command, which a mean hides.
fn bind_stall(_: &mut Criterion) {
    let filters: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with('-')).collect();
    if !filters.is_empty() && !filters.iter().any(|f| "bind_stall".contains(f.as_str())) {
        return;
    }
    let users = common::size("BENCH_BIND_USERS", 4_000_000, 20_000);
    let limits =
        ShardLimits { accounts_max: accounts_max_for(users, 0, 1) as u32, history_max: 1 << 16, ids_max: 1 << 16 };
    let mut state = ShardState::new(0, 1, LedgerConfig::default(), limits);
    let mut ts = 1_795_752_000_000_000_000u64;
    for user in 1..=users {
        ts += 1;
        let account = Command::CreateAccount {
            account: user,
            kind: stormledger::ledger::AccountKind::User,
            flags: stormledger::ledger::command::flags::REAL_NAME,
            union: 0,
        };
        state.apply(ts, &account);
    }
    let (mut slowest, mut at, mut total) = (Duration::ZERO, 0, Duration::ZERO);
    for user in 1..=users {
        ts += 1;
        let bind = Command::BindMethod { user, method: 1, channel: stormledger::ledger::Channel::Alipay };
        let start = Instant::now();
        let (reply, _) = state.apply(ts, &bind);
        let took = start.elapsed();
        assert_eq!(reply.status, stormledger::ledger::Status::Ok);
        total += took;
        if took > slowest {
            (slowest, at) = (took, user);
        }
    }
    println!(
        "bind_stall: {users} users each binding a method on a fresh shard: slowest bind {:.2} ms (binding {at}), mean {:.0} ns",
        slowest.as_secs_f64() * 1e3,
        total.as_nanos() as f64 / users as f64,
    );
}

criterion_group!(benches, apply_tips, bind_stall);
criterion_main!(benches);
