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

/// Types whose all-zero bytes are a valid value (zero): what `zeroed` may make.
trait ZeroIsValid {}
impl ZeroIsValid for AtomicU64 {}
impl ZeroIsValid for AtomicI64 {}

fn zeroed<T: ZeroIsValid>(n: usize) -> Box<[T]> {
    // SAFETY: `T: ZeroIsValid`, implemented only for atomics whose all-zero bytes are zero.
    unsafe { Box::<[T]>::new_zeroed_slice(n).assume_init() }
}

/// The first table position of `id`: its keyed hash (`ledger::hash`: account ids are chosen by
/// clients too) mapped onto `0..table` by a multiply-shift, so the table needs no power-of-two
/// size and costs exactly 32 bytes per account of capacity.
#[inline]
fn home(id: u64, table: usize) -> usize {
    reduce(crate::ledger::hash::hash(id), table)
}

/// `hash` mapped onto `0..n`, monotonic in `hash`.
#[inline]
fn reduce(hash: u64, n: usize) -> usize {
    ((hash as u128 * n as u128) >> 64) as usize
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

    /// Asks for transparent huge pages behind both arrays (`mem::advise_huge`): an index probe
    /// and a balance store per account touched, at random, are TLB misses with 4 KiB pages. A
    /// new shard calls it at once; a snapshot load after filling the arrays (see `mem`).
    pub fn advise_huge(&self) {
        crate::mem::advise_huge_slice(&self.entries);
        crate::mem::advise_huge_slice(&self.balances);
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

    /// The slot of `id`, if present. Safe from any thread. Never for id 0, which marks an
    /// empty entry (and no account has).
    #[inline]
    pub fn lookup(&self, id: u64) -> Option<u32> {
        if id == 0 {
            return None;
        }
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

    /// Fills an empty index from a snapshot: the i-th id gets slot i, as `insert` called once per
    /// id would, with the same checks (`LoadError`). The table may end up in another layout than
    /// one-by-one inserts give (entries of a probe run in another order); lookups see no
    /// difference. Balances stay zero: publish them with `publish` (another thread may do that
    /// at the same time; it touches only the balances). Writer only, before the index is shared
    /// with readers. After an error the index is partly filled and must be dropped.
    ///
    /// Why not `insert` in a loop: for millions of ids every insert is a cache miss and a TLB
    /// miss, and under a hypervisor a TLB miss is a two-level page walk. Even with the entries
    /// prefetched 16 ids ahead, 10 M ids took 1.3-1.9 s of CPU on the development VM; grouped
    /// as here, 0.5-0.7 s (both counting the table's page population; `benches/recovery.rs`).
    /// The ids are first grouped, in two sequential passes over `ids` (hence `Clone`), by the
    /// region of the table their home lies in (`LOAD_REGION` entries); then each region is
    /// filled in turn, its probes staying within a megabyte of table. Returns the number of ids.
    pub(crate) fn load(&self, ids: impl Iterator<Item = u64> + Clone) -> Result<u32, LoadError> {
        assert!(self.is_empty(), "load fills an empty index");
        let regions = self.table.div_ceil(LOAD_REGION).min(LOAD_REGIONS_MAX);
        // Monotonic in the home position (both are the top bits of the same hash).
        let region = |id: u64| reduce(crate::ledger::hash::hash(id), regions);
        let mut starts = vec![0usize; regions + 1];
        let mut n = 0usize;
        for id in ids.clone() {
            starts[region(id) + 1] += 1;
            n += 1;
        }
        if n > self.capacity as usize {
            return Err(LoadError::Full { capacity: self.capacity });
        }
        for r in 0..regions {
            starts[r + 1] += starts[r];
        }
        let mut grouped = vec![(0u64, 0u32); n];
        populate_writable(&grouped);
        let mut next = starts.clone();
        for (slot, id) in ids.take(n).enumerate() {
            let r = region(id);
            grouped[next[r]] = (id, slot as u32);
            next[r] += 1;
        }
        // Each insert reads its entry before writing it. On a page never touched, the read maps
        // the shared zero page and the write then replaces it, flushing the TLB of every CPU the
        // process runs on (an inter-processor interrupt while the decoding threads run: ~6x the
        // cost of a plain write fault on the development VM). When the ids will touch most
        // pages anyway (at least one id per page of table), make the table writable up front.
        if n >= self.table * 16 / 4096 {
            populate_writable(&self.entries);
        }
        for &(id, slot) in &grouped {
            if id == 0 {
                return Err(LoadError::Zero { slot });
            }
            let mut i = home(id, self.table);
            loop {
                let key = self.entries[2 * i].load(Ordering::Relaxed);
                if key == id {
                    // Report the later of the two positions, as one-by-one inserts would.
                    let first = self.entries[2 * i + 1].load(Ordering::Relaxed) as u32;
                    return Err(LoadError::Duplicate { slot: slot.max(first), id });
                }
                if key == 0 {
                    self.entries[2 * i + 1].store(slot as u64, Ordering::Relaxed);
                    self.entries[2 * i].store(id, Ordering::Relaxed);
                    break;
                }
                i = if i + 1 == self.table { 0 } else { i + 1 };
            }
        }
        // Release: whoever sees the length sees the entries (the index is shared only later,
        // through an `Arc` handed to another thread, which orders everything anyway).
        self.len.store(n as u32, Ordering::Release);
        Ok(n as u32)
    }

    /// Publishes a committed balance. Writer only.
    #[inline]
    pub(crate) fn publish(&self, slot: u32, balance: i64) {
        self.balances[slot as usize].store(balance, Ordering::Release);
    }
}

/// Asks the kernel to back `memory` with writable pages now (`MADV_POPULATE_WRITE`, Linux 5.14+),
/// in one call instead of one page fault per page. Only a hint, like `prefetch`: contents are
/// unchanged (fresh pages are zero, populated ones are left alone), and on an older kernel, or
/// another system, it does nothing and the pages are faulted in one by one as before.
pub(crate) fn populate_writable<T>(memory: &[T]) {
    #[cfg(target_os = "linux")]
    {
        const PAGE: usize = 4096;
        let start = memory.as_ptr() as usize;
        let (from, to) = (start.next_multiple_of(PAGE), (start + std::mem::size_of_val(memory)) / PAGE * PAGE);
        if to > from {
            // SAFETY: the whole pages in the range lie inside `memory`, which the caller owns;
            // populating changes no byte of them. The result is ignored: the advice is optional.
            unsafe { libc::madvise(from as *mut libc::c_void, to - from, libc::MADV_POPULATE_WRITE) };
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = memory;
}

/// Table entries per region in `AccountIndex::load` (1 MiB of table: 256 pages, within the
/// second-level TLB), and at most this many regions. Smaller regions keep the fills in the L2
/// cache but make the grouping pass write to too many places at once: with 16 Ki entries it
/// took ~5x longer on the development VM, more than the fills gained.
const LOAD_REGION: usize = 65_536;
const LOAD_REGIONS_MAX: usize = 4_096;

/// Why `AccountIndex::load` refused its ids.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LoadError {
    /// More ids than the index's capacity.
    Full { capacity: u32 },
    /// Id 0 (the empty-entry marker) at `slot`.
    Zero { slot: u32 },
    /// `id` at `slot` was already given an earlier slot.
    Duplicate { slot: u32, id: u64 },
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
        // Id 0 is what an empty entry holds, not an account: it found the first empty entry's
        // slot 0 (the platform's) and answered its balance.
        assert_eq!(index.lookup(0), None);
        assert_eq!(index.balance(0), None);
    }

    #[test]
    fn load_gives_the_slots_insert_gives() {
        // Empty, tiny and many-region tables; ids that collide in a small table and ids that
        // wrap around the end of it.
        for (capacity, n) in [(8u32, 0u64), (8, 1), (8, 8), (100, 100), (1000, 999), (1_000_000, 700_000)] {
            let ids: Vec<u64> = (1..=n).map(|i| i.wrapping_mul(0x2545_F491_4F6C_DD1D) | 1).collect();
            let (loaded, inserted) = (AccountIndex::new(capacity), AccountIndex::new(capacity));
            assert_eq!(loaded.load(ids.iter().copied()), Ok(n as u32));
            for &id in &ids {
                inserted.insert(id).unwrap();
            }
            assert_eq!(loaded.len(), n as u32);
            for (slot, &id) in ids.iter().enumerate() {
                assert_eq!(loaded.lookup(id), Some(slot as u32));
            }
            let mut keys: Vec<u64> = loaded.entries.iter().step_by(2).map(|k| k.load(Ordering::Relaxed)).collect();
            let mut expected: Vec<u64> =
                inserted.entries.iter().step_by(2).map(|k| k.load(Ordering::Relaxed)).collect();
            keys.sort_unstable();
            expected.sort_unstable();
            assert_eq!(keys, expected, "the same entries, possibly in another order within probe runs");
            assert_eq!(loaded.lookup(2), None);
            // The index keeps working as usual after a load.
            if n < capacity as u64 {
                let slot = loaded.insert(u64::MAX).unwrap();
                assert_eq!((slot, loaded.lookup(u64::MAX)), (n as u32, Some(n as u32)));
            }
        }
    }

    #[test]
    fn load_refuses_zero_duplicates_and_overflow() {
        let load = |capacity: u32, ids: &[u64]| AccountIndex::new(capacity).load(ids.iter().copied());
        assert_eq!(load(8, &[5, 0, 6]), Err(LoadError::Zero { slot: 1 }));
        assert_eq!(load(8, &[5, 6, 7, 6]), Err(LoadError::Duplicate { slot: 3, id: 6 }));
        assert_eq!(load(8, &[6, 5, 6, 7]), Err(LoadError::Duplicate { slot: 2, id: 6 }));
        assert_eq!(load(2, &[5, 6, 7]), Err(LoadError::Full { capacity: 2 }));
        assert_eq!(load(3, &[5, 6, 7]), Ok(3));
    }
}
