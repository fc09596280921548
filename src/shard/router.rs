//! Which shard owns an account: a pure function of the id and the shard count.
//!
//! User wallets live on exactly one shard (their home). Striped accounts (streamers, unions,
//! system accounts) have a stripe on every shard; their home shard is where commands about the
//! account itself (create, freeze, settle) are validated first and replicated from.

/// The home shard of `account` among `shards`.
#[inline]
pub fn home_shard(account: u64, shards: u16) -> u16 {
    // A different multiplier from the index hash, so the accounts of one shard still spread
    // over its index table.
    let h = account.wrapping_mul(0xD6E8_FEB8_6659_FD93);
    ((h >> 32) % shards as u64) as u16
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spreads_sequential_ids() {
        let mut counts = [0u32; 4];
        for id in 1..=40_000u64 {
            counts[home_shard(id, 4) as usize] += 1;
        }
        for c in counts {
            assert!((9_000..11_000).contains(&c), "{counts:?}");
        }
        assert!((1..100).all(|id| home_shard(id, 1) == 0));
    }
}
