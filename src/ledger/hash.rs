//! The hash of every table keyed by ids a client chooses: the idempotency tables, the top-up
//! index, the id directory's stripes, the account index and the state machine's hash maps.
//!
//! An id's hash is foldhash's quality hash of one `u64` (hashbrown's default hasher: the
//! 128-bit product of the id xor one key with another key, its two halves xored, then folded
//! again with a constant), with keys drawn once per process from the operating system's random
//! source (through `std::hash::RandomState`), so no client can compute ids that collide. A
//! fixed hash can be inverted: with the multiplicative hash these tables used before, 100 000
//! tips whose ids shared one probe run took a shard 12.5 s instead of 0.34 s, and the restart
//! that replayed them 13.6 s; ids aimed at 4 of the directory's 256 stripes made 5 042 of 5 048
//! other ids homed there answer `busy` (docs/benchmarks.md, "Session 20"). Ids that differ only
//! in their high bits collided under it even with no one trying (the bucket came from the
//! product's middle bits, which high input bits do not reach); the folds mix every input bit
//! into the middle ones, under any key (`keyed`). The cost on the state machine bench, whose
//! sequential ids a fixed multiplicative hash spread perfectly, is in the same section. The
//! hash maps (`Keyed`) use foldhash's own hasher, which also takes pairs.
//!
//! The key is the one random thing in `ledger`, and it reaches no result: it decides where an
//! entry sits in memory, and no table is iterated into an output (a snapshot encodes accounts by
//! slot, bindings sorted, ids by their ring; replies do not depend on probe lengths). Two
//! processes given the same commands still give the same replies, balances and snapshot bytes,
//! as `std::collections::HashMap`'s own random key would allow. What must not change between
//! processes (the shard an account lives on: `shard::router::home_shard`) does not use it.

use std::hash::{BuildHasher, Hash};
use std::sync::LazyLock;

use foldhash::quality::SeedableRandomState;
use foldhash::SharedSeed;

/// The process's key: foldhash's two seeds, from the system's random source.
static KEYED: LazyLock<SeedableRandomState> = LazyLock::new(|| {
    // `RandomState::new` draws its SipHash keys from the system's random source (once per
    // thread, then incremented): two of its hashes are two unpredictable words.
    let random = std::hash::RandomState::new();
    let shared: &'static SharedSeed = Box::leak(Box::new(SharedSeed::from_u64(random.hash_one(1u64))));
    SeedableRandomState::with_seed(random.hash_one(2u64), shared)
});

/// The keys of `hash` (the second odd, so that the product keeps every bit of the first).
static KEYS: LazyLock<(u64, u64)> = LazyLock::new(|| {
    let random = std::hash::RandomState::new();
    (random.hash_one(3u64), random.hash_one(4u64) | 1)
});

/// The keyed hash of one id: foldhash's (see the module docs), inlined with the keys read from
/// one static.
#[inline]
pub fn hash(id: u64) -> u64 {
    let (k0, k1) = *KEYS;
    keyed(id, k0, k1)
}

/// `hash` under the keys `k0`, `k1`: a folded multiply of the id with the keys, then another of
/// that with a constant, as foldhash's quality hasher finishes. One alone leaves the middle bits
/// (the bucket) of ids that differ only in their high bits to a few of the second key's bits:
/// under some keys 65 536 such ids took a ninth of the buckets random ids take.
#[inline]
fn keyed(id: u64, k0: u64, k1: u64) -> u64 {
    fold(fold(id ^ k0, k1), 0x243F_6A88_85A3_08D3)
}

/// The 128-bit product's halves, xored.
#[inline]
fn fold(a: u64, b: u64) -> u64 {
    let product = u128::from(a) * u128::from(b);
    (product as u64) ^ ((product >> 64) as u64)
}

/// The hash builder of `state_machine::IdMap`: the process's key.
#[derive(Clone, Debug)]
pub struct Keyed(SeedableRandomState);

impl Default for Keyed {
    #[inline]
    fn default() -> Keyed {
        Keyed(KEYED.clone())
    }
}

impl BuildHasher for Keyed {
    type Hasher = <SeedableRandomState as BuildHasher>::Hasher;

    #[inline]
    fn build_hasher(&self) -> Self::Hasher {
        self.0.build_hasher()
    }
}

/// The keyed hash of any value (what an `IdMap` computes for it).
#[inline]
pub fn hash_of<T: Hash>(value: T) -> u64 {
    KEYED.hash_one(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hash_is_stable_within_a_process_and_spreads_sequential_ids() {
        assert_eq!(hash(42), hash(42));
        assert_eq!(hash_of((1u64, 2u64)), Keyed::default().hash_one((1u64, 2u64)));
        // The top byte (the directory's stripe) of 65 536 sequential ids: every value is used,
        // none by more than twice its share.
        let mut stripes = [0u32; 256];
        for id in 1..=65_536u64 {
            stripes[(hash(id) >> 56) as usize] += 1;
        }
        assert!(stripes.iter().all(|&n| (1..=512).contains(&n)), "{stripes:?}");
    }

    #[test]
    fn structured_ids_spread_under_any_key() {
        // Under many keys (the process's is one of them), ids that differ only in their high
        // bits (`(i << 40) | 7`: a fixed multiplicative hash gave all 65 536 the same bucket
        // bits, 17-32 of the product, which input bits from 40 up do not reach) and
        // sequential ids fill buckets as random ids do (about 63 % of 65 536 distinct). One
        // fold alone fell to 7 494 under one process's key.
        let mut keys: Vec<(u64, u64)> = vec![*KEYS];
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        for _ in 0..64 {
            x = x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
            let k0 = x;
            x = x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
            keys.push((k0, x | 1));
        }
        for (k0, k1) in keys {
            for (name, id) in [("high bits", (|i| (i << 40) | 7) as fn(u64) -> u64), ("sequential", |i| i + 1)] {
                let buckets: std::collections::BTreeSet<u64> =
                    (0..65_536u64).map(|i| (keyed(id(i), k0, k1) >> 17) & 0xFFFF).collect();
                assert!(buckets.len() > 38_000, "{name}, keys {k0:#x} {k1:#x}: {} buckets", buckets.len());
            }
        }
    }
}
