//! The tool's own record of what the ledger acknowledged: expected balance changes per account.
//!
//! Only commands answered `ok` move money. A tip or gift of `coins` takes `coins` from the payer
//! and splits them as the state machine does (`spend_checked`): the streamer gets
//! floor(coins * streamer_share_bp / 10000), the union floor(coins * union_share_bp / 10000)
//! (every storm streamer belongs to the storm union), the platform the remainder. The shares, the
//! gift prices and the coins a yuan buys come from the server's `LedgerConfig` (`--config`, or
//! the data directory's `ledger.json`; the built-in rules otherwise).

use std::sync::atomic::{AtomicI64, Ordering};

use stormledger::config::LedgerConfig;
use stormledger::ledger::Command;
use stormledger::workload::STREAMER_BASE;

pub struct Model {
    /// Coins a top-up of one yuan credits.
    pub coins_per_yuan: u64,
    streamer_bp: u64,
    union_bp: u64,
    gifts: Vec<(u64, u64)>,
    /// Index `user - 1`.
    users: Vec<AtomicI64>,
    /// Index `streamer - STREAMER_BASE`.
    streamers: Vec<AtomicI64>,
    pub union: AtomicI64,
    pub platform: AtomicI64,
}

/// Shared-counter updates of a batch, not yet published (`Model::add`, `Model::flush`).
#[derive(Default)]
pub struct Tally {
    hot_streamer: i64,
    union: i64,
    platform: i64,
}

/// One spend: who pays whom how many coins.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Spend {
    pub from: u64,
    pub to: u64,
    pub coins: u64,
}

impl Model {
    pub fn new(config: &LedgerConfig, users: u64, streamers: u64) -> Model {
        Model {
            coins_per_yuan: config.coins_per_yuan,
            streamer_bp: config.streamer_share_bp,
            union_bp: config.union_share_bp,
            gifts: config.gifts.clone(),
            users: (0..users).map(|_| AtomicI64::new(0)).collect(),
            streamers: (0..streamers).map(|_| AtomicI64::new(0)).collect(),
            union: AtomicI64::new(0),
            platform: AtomicI64::new(0),
        }
    }

    /// A gift's price in coins (0 if not in the catalog).
    pub fn gift_price(&self, gift: u64) -> u64 {
        self.gifts.iter().find(|g| g.0 == gift).map_or(0, |g| g.1)
    }

    /// The spend a tip or gift asks for; `None` for other commands.
    pub fn spend(&self, command: &Command) -> Option<Spend> {
        match *command {
            Command::Tip { from, to, coins, .. } => Some(Spend { from, to, coins }),
            Command::Gift { from, to, gift, count, .. } => {
                Some(Spend { from, to, coins: self.gift_price(gift) * count })
            }
            _ => None,
        }
    }

    /// (streamer, union, platform) shares of `coins`.
    pub fn split(&self, coins: u64) -> (u64, u64, u64) {
        let streamer = (coins as u128 * self.streamer_bp as u128 / 10_000) as u64;
        let union = (coins as u128 * self.union_bp as u128 / 10_000) as u64;
        (streamer, union, coins - streamer - union)
    }

    /// Applies a spend, keeping the shared hot counters (union, platform, streamer 0) in
    /// `tally` until `flush`: those atomics are touched by every tip, and updating them once
    /// per batch instead of once per tip keeps the load generator off their cache line.
    pub fn add(&self, tally: &mut Tally, spend: Spend) {
        let (s, u, p) = self.split(spend.coins);
        self.users[(spend.from - 1) as usize].fetch_sub(spend.coins as i64, Ordering::Relaxed);
        match spend.to - STREAMER_BASE {
            0 => tally.hot_streamer += s as i64,
            i => {
                self.streamers[i as usize].fetch_add(s as i64, Ordering::Relaxed);
            }
        }
        tally.union += u as i64;
        tally.platform += p as i64;
    }

    /// Publishes what `add` kept in `tally`.
    pub fn flush(&self, tally: Tally) {
        if tally.hot_streamer != 0 {
            self.streamers[0].fetch_add(tally.hot_streamer, Ordering::Relaxed);
        }
        self.union.fetch_add(tally.union, Ordering::Relaxed);
        self.platform.fetch_add(tally.platform, Ordering::Relaxed);
    }

    /// Expected change of user `u`'s balance.
    pub fn user_delta(&self, user: u64) -> i64 {
        self.users[(user - 1) as usize].load(Ordering::Relaxed)
    }

    /// Expected change of streamer `i`'s (0-based) earnings.
    pub fn streamer_delta(&self, i: u64) -> i64 {
        self.streamers[i as usize].load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_rounds_down_and_platform_takes_the_rest() {
        let m = Model::new(&LedgerConfig::default(), 2, 2);
        assert_eq!(m.split(1), (0, 0, 1));
        assert_eq!(m.split(19), (9, 1, 9));
        assert_eq!(m.split(99), (49, 9, 41));
        let mut tally = Tally::default();
        m.add(&mut tally, Spend { from: 2, to: STREAMER_BASE + 1, coins: 19 });
        m.add(&mut tally, Spend { from: 1, to: STREAMER_BASE, coins: 99 });
        assert_eq!(m.streamer_delta(0), 0, "the hot streamer waits for the flush");
        m.flush(tally);
        assert_eq!(m.user_delta(2), -19);
        assert_eq!(m.user_delta(1), -99);
        assert_eq!(m.streamer_delta(1), 9);
        assert_eq!(m.streamer_delta(0), 49);
        assert_eq!(m.union.load(Ordering::Relaxed), 1 + 9);
        assert_eq!(m.platform.load(Ordering::Relaxed), 9 + 41);
        assert_eq!(m.gift_price(3), 99);
    }
}
