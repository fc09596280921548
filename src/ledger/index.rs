//! A fixed-capacity, single-writer / many-reader hash index from account id to slot, plus the
//! published (committed) balance of every slot.
//!
//! This is what lets a reader on any thread get a committed balance without going through the
//! shard's queue: probing is a handful of atomic loads, no lock, no allocation. Only the shard's
//! writer thread inserts or stores balances (`&mut self` on the owning `ShardState` guarantees it;
//! readers hold an `Arc<AccountIndex>` and only call `lookup`/`balance`). Accounts are never
//! removed, so a reader can never observe a slot being reused.
//!
//! Capacity is fixed at startup: the table has twice `accounts_max` entries, so the load factor
//! stays at or below 0.5 and probes stay short; an entry is 16 bytes (id, slot). The arrays are zero-initialised with
//! `Box::new_zeroed_slice`, so untouched pages cost no resident memory.

use std::sync::atomic::{AtomicI64, AtomicU32, AtomicU64, Ordering};

/// See the module docs.
pub struct AccountIndex {
    /// `[2i]` = account id (0 = empty), `[2i + 1]` = its slot: one cache line per probe.
    entries: Box<[AtomicU64]>,
    balances: Box<[AtomicI64]>,
    /// Entries in the table: exactly twice the capacity (load factor <= 0.5).
    table: usize,
    len: AtomicU32,
    capacity: u32,
}

fn zeroed<T>(n: usize) -> Box<[T]> {
    // SAFETY: only instantiated with AtomicU64/AtomicU32/AtomicI64, for which all-zero bytes
    // are a valid value (zero).
    let slice = unsafe { Box::<[T]>::new_zeroed_slice(n).assume_init() };
    crate::mem::advise_huge_slice(&slice);
    slice
}

/// The first table position of `id`: a multiplicative hash (ids are often sequential; the
/// multiply spreads them) mapped onto `0..table` by a multiply-shift, so the table needs no
/// power-of-two size and costs exactly 32 bytes per account of capacity.
#[inline]
fn home(id: u64, table: usize) -> usize {
    let h = id.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    ((h as u128 * table as u128) >> 64) as usize
}

impl AccountIndex {
    /// An empty index for at most `capacity` accounts.
    pub fn new(capacity: u32) -> AccountIndex {
        let table = capacity as usize * 2;
        AccountIndex {
            entries: zeroed(table * 2),
            balances: zeroed(capacity as usize),
            table,
            len: AtomicU32::new(0),
            capacity,
        }
    }

    /// Accounts inserted so far.
    pub fn len(&self) -> u32 {
        self.len.load(Ordering::Acquire)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn capacity(&self) -> u32 {
        self.capacity
    }

    /// The slot of `id`, if present. Safe from any thread.
    #[inline]
    pub fn lookup(&self, id: u64) -> Option<u32> {
        let mut i = home(id, self.table);
        loop {
            let key = self.entries[2 * i].load(Ordering::Acquire);
            if key == id {
                return Some(self.entries[2 * i + 1].load(Ordering::Relaxed) as u32);
            }
            if key == 0 {
                return None;
            }
            i = if i + 1 == self.table { 0 } else { i + 1 };
        }
    }

    /// Hints the CPU to load the index entry of `id` (no effect on results).
    #[inline]
    pub fn prefetch_entry(&self, id: u64) {
        let i = home(id, self.table);
        prefetch(self.entries.as_ptr().wrapping_add(2 * i) as *const u8);
    }

    /// Hints the CPU to load the published balance of `slot` (no effect on results).
    #[inline]
    pub fn prefetch_balance(&self, slot: u32) {
        prefetch(self.balances.as_ptr().wrapping_add(slot as usize) as *const u8);
    }

    /// The published balance of `id`, if present. Safe from any thread.
    #[inline]
    pub fn balance(&self, id: u64) -> Option<i64> {
        self.lookup(id).map(|slot| self.balances[slot as usize].load(Ordering::Acquire))
    }

    /// Inserts `id` with the next free slot and returns it. Writer only; `id` must be absent
    /// and non-zero. `None` when the index is full.
    pub(crate) fn insert(&self, id: u64) -> Option<u32> {
        assert!(id != 0);
        let slot = self.len.load(Ordering::Relaxed);
        if slot >= self.capacity {
            return None;
        }
        let mut i = home(id, self.table);
        loop {
            let key = self.entries[2 * i].load(Ordering::Relaxed);
            assert!(key != id, "account {id} inserted twice");
            if key == 0 {
                self.balances[slot as usize].store(0, Ordering::Relaxed);
                self.entries[2 * i + 1].store(slot as u64, Ordering::Relaxed);
                // Release: a reader that sees the key also sees the slot and its balance.
                self.entries[2 * i].store(id, Ordering::Release);
                self.len.store(slot + 1, Ordering::Release);
                return Some(slot);
            }
            i = if i + 1 == self.table { 0 } else { i + 1 };
        }
    }

    /// Publishes a committed balance. Writer only.
    #[inline]
    pub(crate) fn publish(&self, slot: u32, balance: i64) {
        self.balances[slot as usize].store(balance, Ordering::Release);
    }
}

/// A cache prefetch hint. Only a hint: it never faults and never changes a result, which is why
/// it may live in the deterministic core.
#[inline(always)]
pub fn prefetch(address: *const u8) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: `_mm_prefetch` is a hint; it does not dereference in the language's sense and
    // never faults, whatever the address.
    unsafe {
        core::arch::x86_64::_mm_prefetch(address as *const i8, core::arch::x86_64::_MM_HINT_T0)
    };
    #[cfg(not(target_arch = "x86_64"))]
    let _ = address;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn insert_lookup_publish() {
        let index = AccountIndex::new(100);
        assert_eq!(index.lookup(7), None);
        for id in 1..=100u64 {
            let slot = index.insert(id * 1_000_003).unwrap();
            index.publish(slot, id as i64);
        }
        assert_eq!(index.insert(5), None, "full");
        for id in 1..=100u64 {
            assert_eq!(index.balance(id * 1_000_003), Some(id as i64));
        }
        assert_eq!(index.balance(42), None);
    }
}
