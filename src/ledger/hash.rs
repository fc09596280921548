//! The hash of every table keyed by ids a client chooses: the idempotency tables, the top-up
//! index, the id directory's stripes, the account index and the state machine's hash maps.
//!
//! It is foldhash's (hashbrown's default hasher), keyed once per process from the operating
//! system's random source (through `std::hash::RandomState`), so no client can compute ids
//! that collide. A fixed hash can be inverted: with the multiplicative hash these tables used
//! before, 100 000 tips whose ids shared one probe run took a shard 12.9 s instead of 0.46 s,
//! and the restart that replayed them 37 s instead of 0.85 s; 66 000 ids filling a few of the
//! directory's stripes made every other id homed there answer `busy` (session 20,
//! docs/benchmarks.md).
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

/// The keyed hash of one id.
#[inline]
pub fn hash(id: u64) -> u64 {
    KEYED.hash_one(id)
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
}
