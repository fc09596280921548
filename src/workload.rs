//! The gift-storm workload: deterministic account setup and tip generation from a seed.
//!
//! Shared by the benchmarks, the `stormledger-storm` tool and the tests, so that every number in
//! docs/benchmarks.md comes from the same workload. It only builds commands; it never runs them.

use crate::layout::text_field;
use crate::ledger::command::flags;
use crate::ledger::state_machine::TOPUPS_MIN;
use crate::ledger::{AccountKind, Channel, Command};

/// The first streamer's id; streamer `i` is `STREAMER_BASE + i` (streamer 0 is the hot one).
pub const STREAMER_BASE: u64 = 1_000_000_000;
/// The union every streamer belongs to.
pub const UNION_ID: u64 = 2_000_000_000;
/// Top-up ids: `TOPUP_BASE + user`.
pub const TOPUP_BASE: u64 = 3_000_000_000;
/// Tip ids start here (above every setup id).
pub const TIP_BASE: u64 = 10_000_000_000;

/// A storm's shape.
#[derive(Clone, Debug)]
pub struct StormSpec {
    pub users: u64,
    pub streamers: u64,
    /// Percent of tips that go to streamer 0.
    pub hot_percent: u32,
    /// Each user is topped up with this many yuan (a custom amount; 10 coins per yuan).
    pub topup_yuan: u64,
    /// Tips are 1..=tip_coins_max coins.
    pub tip_coins_max: u64,
    pub seed: u64,
    /// Percent of users (those with `user % 100 < poor_percent`) topped up with only
    /// `poor_topup_yuan`, so that they run out of coins and `insufficient_funds` happens.
    pub poor_percent: u32,
    /// Top-up of a poor user, in yuan (at least the custom minimum, 1 yuan).
    pub poor_topup_yuan: u64,
    /// Percent of writes that are gift purchases instead of tips (`TipGen::next_write`).
    pub gift_percent: u32,
    /// Id of write `n` is `id_base + n`; at least `TIP_BASE` (distinct bases keep runs against
    /// the same server from colliding with each other's idempotency keys).
    pub id_base: u64,
}

impl Default for StormSpec {
    fn default() -> Self {
        StormSpec {
            users: 100_000,
            streamers: 1_000,
            hot_percent: 50,
            topup_yuan: 648,
            tip_coins_max: 20,
            seed: 42,
            poor_percent: 0,
            poor_topup_yuan: 1,
            gift_percent: 0,
            id_base: TIP_BASE,
        }
    }
}

/// SplitMix64: a tiny, seedable generator (reproducible runs need no dependency).
#[derive(Clone, Debug)]
pub struct SplitMix64(pub u64);

impl SplitMix64 {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        ((self.next_u64() as u128 * n as u128) >> 64) as u64
    }
}

impl StormSpec {
    /// Setup phases, each a list of commands that may run as one batch; run them in order,
    /// waiting for each phase (later phases depend on earlier ones).
    pub fn setup_phases(&self) -> Vec<Vec<Command>> {
        let union = vec![Command::CreateAccount { account: UNION_ID, kind: AccountKind::Union, flags: 0, union: 0 }];
        let streamers = (0..self.streamers)
            .map(|i| Command::CreateAccount {
                account: STREAMER_BASE + i,
                kind: AccountKind::Streamer,
                flags: 0,
                union: UNION_ID,
            })
            .collect();
        let users = (1..=self.users)
            .map(|u| Command::CreateAccount { account: u, kind: AccountKind::User, flags: flags::REAL_NAME, union: 0 })
            .collect();
        let methods =
            (1..=self.users).map(|u| Command::BindMethod { user: u, method: 1, channel: channel_of(u) }).collect();
        let mut phases = vec![union, streamers, users, methods];
        // A shard holds a bounded number of pending top-ups (at least `TOPUPS_MIN`; a begin
        // beyond it is answered `busy`): begin and confirm them a bounded number at a time.
        for first in (1..=self.users).step_by(TOPUPS_MIN) {
            let chunk = first..=(first + TOPUPS_MIN as u64 - 1).min(self.users);
            let begins = chunk
                .clone()
                .map(|u| Command::TopUpBegin {
                    id: TOPUP_BASE + u,
                    user: u,
                    method: 1,
                    fen: self.topup_yuan_of(u) * 100,
                })
                .collect();
            let confirms = chunk
                .map(|u| Command::TopUpConfirm {
                    id: TOPUP_BASE + u,
                    fen: self.topup_yuan_of(u) * 100,
                    channel_txn: text_field(&format!("S{u}")).expect("short ascii"),
                    paid_by: 0,
                })
                .collect();
            phases.push(begins);
            phases.push(confirms);
        }
        phases
    }

    /// Coins each (not poor) user holds after setup.
    pub fn coins_per_user(&self) -> u64 {
        self.topup_yuan * 10
    }

    /// Whether `user` is one of the poorly funded users.
    pub fn is_poor(&self, user: u64) -> bool {
        user % 100 < self.poor_percent as u64
    }

    /// The yuan `user` is topped up with during setup.
    pub fn topup_yuan_of(&self, user: u64) -> u64 {
        if self.is_poor(user) {
            self.poor_topup_yuan
        } else {
            self.topup_yuan
        }
    }

    /// A generator of tips; tip `n` has id `id_base + n`.
    pub fn tips(&self) -> TipGen {
        TipGen { rng: SplitMix64(self.seed), spec: self.clone(), next: 0 }
    }
}

fn channel_of(user: u64) -> Channel {
    Channel::ALL[(user % 4) as usize]
}

/// See `StormSpec::tips`.
pub struct TipGen {
    rng: SplitMix64,
    spec: StormSpec,
    next: u64,
}

impl TipGen {
    /// The receiving streamer for the next tip.
    pub fn streamer(&mut self) -> u64 {
        if self.rng.below(100) < self.spec.hot_percent as u64 || self.spec.streamers == 1 {
            STREAMER_BASE
        } else {
            STREAMER_BASE + 1 + self.rng.below(self.spec.streamers - 1)
        }
    }

    pub fn user(&mut self) -> u64 {
        1 + self.rng.below(self.spec.users)
    }

    /// The next tip.
    pub fn next_tip(&mut self) -> Command {
        self.next += 1;
        let from = self.user();
        let to = self.streamer();
        let coins = 1 + self.rng.below(self.spec.tip_coins_max);
        Command::Tip { id: self.spec.id_base + self.next, from, to, coins }
    }

    /// The next write: a tip, or (`gift_percent` of the time) a purchase of 1..=3 of the cheap
    /// gifts 1..=3 of the default catalog (1, 10 and 99 coins).
    pub fn next_write(&mut self) -> Command {
        if self.spec.gift_percent == 0 || self.rng.below(100) >= self.spec.gift_percent as u64 {
            return self.next_tip();
        }
        self.next += 1;
        let from = self.user();
        let to = self.streamer();
        let gift = 1 + self.rng.below(3);
        let count = 1 + self.rng.below(3);
        Command::Gift { id: self.spec.id_base + self.next, from, to, gift, count }
    }

    /// An account for a balance read: a random user, or the hot streamer one time in ten.
    pub fn read_key(&mut self) -> u64 {
        if self.rng.below(10) == 0 {
            STREAMER_BASE
        } else {
            self.user()
        }
    }

    /// A number in `0..n` from the same stream (mixing decisions).
    pub fn below(&mut self, n: u64) -> u64 {
        self.rng.below(n)
    }

    /// Writes generated so far.
    pub fn generated(&self) -> u64 {
        self.next
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hot_share_and_reproducible() {
        let spec = StormSpec { users: 1000, streamers: 10, ..StormSpec::default() };
        let mut a = spec.tips();
        let mut b = spec.tips();
        let mut hot = 0;
        for _ in 0..10_000 {
            let (x, y) = (a.next_tip(), b.next_tip());
            assert_eq!(x, y);
            if let Command::Tip { to, .. } = x {
                hot += (to == STREAMER_BASE) as u32;
            }
        }
        assert!((4_500..5_700).contains(&hot), "{hot}");
    }

    #[test]
    fn setup_stays_within_a_shards_pending_top_ups() {
        use crate::config::{LedgerConfig, ShardLimits};
        use crate::ledger::{ShardState, Status};
        // More users than one shard may have top-ups pending (`TOPUPS_MIN` with a small window).
        let spec = StormSpec { users: 3 * TOPUPS_MIN as u64 + 5, streamers: 3, ..StormSpec::default() };
        let limits = ShardLimits { accounts_max: 20_000, history_max: 1024, ids_max: 1024 };
        let mut state = ShardState::new(0, 1, LedgerConfig::default(), limits);
        assert_eq!(state.topups_max(), TOPUPS_MIN);
        let mut ts = 1;
        for phase in spec.setup_phases() {
            for command in phase {
                ts += 1;
                assert_eq!(state.apply(ts, &command).0.status, Status::Ok, "{command:?}");
            }
        }
    }

    #[test]
    fn poor_users_gifts_and_id_base() {
        let spec =
            StormSpec { users: 200, poor_percent: 10, gift_percent: 30, id_base: TIP_BASE + 7, ..StormSpec::default() };
        assert_eq!(spec.topup_yuan_of(5), spec.poor_topup_yuan);
        assert_eq!(spec.topup_yuan_of(50), spec.topup_yuan);
        let phases = spec.setup_phases();
        let poor = phases[4].iter().filter(|c| matches!(c, Command::TopUpBegin { fen: 100, .. })).count();
        assert_eq!(poor, 20);
        let mut g = spec.tips();
        let mut gifts = 0;
        for n in 1..=1000u64 {
            match g.next_write() {
                Command::Tip { id, .. } => assert_eq!(id, TIP_BASE + 7 + n),
                Command::Gift { id, gift, count, .. } => {
                    assert_eq!(id, TIP_BASE + 7 + n);
                    assert!((1..=3).contains(&gift) && (1..=3).contains(&count));
                    gifts += 1;
                }
                other => panic!("{other:?}"),
            }
        }
        assert!((200..400).contains(&gifts), "{gifts}");
        assert_eq!(g.generated(), 1000);
    }
}
