//! The idempotency table of one shard: transfer id -> sequence number of its record in the
//! shard's id ring. Writer-only.
//!
//! Open addressing with linear probing over a power-of-two table at most half full (the id
//! directory lets a re-claim, and its rebuild at recovery, fill a stripe to three quarters), and
//! backward-shift deletion (no tombstones, so probe runs never grow with churn). It exists, rather
//! than a `HashMap`, so the worker can prefetch the bucket of a command's id (and of the id it
//! will evict) a few commands ahead: with a million ids per shard every access is a cache miss,
//! and this table is half of what a tip costs. Never iterated into an output, so the layout
//! cannot leak into results.

/// The outcome of `IdTable::get_or_insert`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lookup {
    /// `id` was there, with this value.
    Present(u64),
    /// `id` was not there and now is.
    Inserted,
    /// `id` was not there and the table holds as many ids as it was sized for.
    Full,
}

/// See the module docs.
pub struct IdTable {
    /// `(id, seq + 1)`; `(_, 0)` is an empty bucket.
    entries: Buckets,
    mask: usize,
    len: usize,
    /// One bit per 4 KiB memory page of `entries`, set once an insert has written to the page
    /// (unset: every bucket of the page is still empty). See `find`.
    written: Vec<u64>,
    /// Pages of `entries` no insert has written to yet. Once 0 (soon, in a busy table: inserts
    /// land at random), `find` and the inserts skip the bitmap.
    unwritten: usize,
}

/// The memory page size `IdTable::written` counts in.
const PAGE: usize = 4096;

/// A table's bucket array: its own allocation, or its part of one mapping shared by many
/// tables (`IdTable::new_parts`).
enum Buckets {
    Owned(Vec<(u64, u64)>),
    /// `len` buckets at `ptr`, inside `region`, disjoint from every other table's part.
    Part {
        ptr: core::ptr::NonNull<(u64, u64)>,
        len: usize,
        _region: std::sync::Arc<memmap2::MmapMut>,
    },
}

// SAFETY: a `Part` is the only handle to its buckets (`new_parts` hands out disjoint ranges,
// each to one table, and never touches the region's bytes itself), so it is as sendable and
// shareable as the `Vec` of an owned table; the `Arc` keeps the mapping alive while it exists.
unsafe impl Send for Buckets {}
// SAFETY: as above; shared access only reads, through `&self`.
unsafe impl Sync for Buckets {}

impl core::ops::Deref for Buckets {
    type Target = [(u64, u64)];
    #[inline]
    fn deref(&self) -> &[(u64, u64)] {
        match self {
            Buckets::Owned(v) => v,
            // SAFETY: `ptr..ptr + len` lies in the live mapping, holds initialized `(u64, u64)`s
            // (zeroed pages or values written through this table) and is this table's alone.
            Buckets::Part { ptr, len, .. } => unsafe { core::slice::from_raw_parts(ptr.as_ptr(), *len) },
        }
    }
}

impl core::ops::DerefMut for Buckets {
    #[inline]
    fn deref_mut(&mut self) -> &mut [(u64, u64)] {
        match self {
            Buckets::Owned(v) => v,
            // SAFETY: as in `deref`; `&mut self` makes this the only access.
            Buckets::Part { ptr, len, .. } => unsafe { core::slice::from_raw_parts_mut(ptr.as_ptr(), *len) },
        }
    }
}

#[inline]
fn home(id: u64, mask: usize) -> usize {
    // Not the top bits: the id directory picks a stripe (a table of its own) by those.
    (crate::ledger::hash::hash(id) >> 17) as usize & mask
}

impl IdTable {
    /// A table for at most `capacity` ids.
    pub fn new(capacity: usize) -> IdTable {
        let table = IdTable::new_unadvised(capacity);
        crate::mem::advise_huge_slice(&table.entries);
        table
    }

    /// `new` without the huge-page hint: for a table sized for a bound it seldom reaches, whose
    /// untouched pages should stay out of memory (a huge page makes 2 MiB resident per touch).
    pub fn new_unadvised(capacity: usize) -> IdTable {
        let buckets = Self::buckets_for(capacity).expect("id table capacity within usize");
        IdTable::over(Buckets::Owned(vec![(0, 0); buckets]))
    }

    /// `tables` tables for at most `capacity` ids each, whose bucket arrays lie one after
    /// another in a single anonymous mapping advised for huge pages (the id directory's
    /// stripes). Each array on its own would be too small for a huge page, and allocated from
    /// the heap it gets none at all: this kernel backs no heap memory with transparent huge
    /// pages, advised or not (docs/benchmarks.md, session 10). Memory is resident as touched.
    pub fn new_parts(tables: usize, capacity: usize) -> std::io::Result<Vec<IdTable>> {
        // Checked: a wrapped product would map less than the parts below claim.
        let too_large = || std::io::Error::new(std::io::ErrorKind::InvalidInput, "id tables too large");
        let buckets = Self::buckets_for(capacity).ok_or_else(too_large)?;
        let bytes = tables
            .checked_mul(buckets)
            .and_then(|n| n.checked_mul(core::mem::size_of::<(u64, u64)>()))
            .filter(|&n| n <= isize::MAX as usize)
            .ok_or_else(too_large)?
            .max(1);
        let mut map = memmap2::MmapMut::map_anon(bytes)?;
        let base = map.as_mut_ptr() as *mut (u64, u64);
        crate::mem::advise_huge(base as *const u8, bytes);
        let region = std::sync::Arc::new(map);
        Ok((0..tables)
            .map(|t| {
                // SAFETY: part `t` is `buckets` buckets at offset `t * buckets`, within the
                // `tables * buckets` of the mapping; the parts are disjoint. An anonymous
                // mapping is page-aligned and reads as zeros: every bucket starts empty.
                let ptr = unsafe { core::ptr::NonNull::new_unchecked(base.add(t * buckets)) };
                IdTable::over(Buckets::Part { ptr, len: buckets, _region: region.clone() })
            })
            .collect())
    }

    /// Twice `capacity` (at least 16), rounded up to a power of two; `None` past `usize`.
    fn buckets_for(capacity: usize) -> Option<usize> {
        capacity.max(8).checked_mul(2)?.checked_next_power_of_two()
    }

    fn over(entries: Buckets) -> IdTable {
        let buckets = entries.len();
        let pages = (core::mem::size_of_val(&entries[..]) / PAGE + 2).div_ceil(64);
        let bytes = core::mem::size_of_val(&entries[..]);
        let unwritten = (entries.as_ptr() as usize % PAGE + bytes).div_ceil(PAGE);
        IdTable { entries, mask: buckets - 1, len: 0, written: vec![0; pages], unwritten }
    }

    /// The index of the memory page holding bucket `i`, counted from the page of bucket 0.
    #[inline]
    fn page_of(&self, i: usize) -> usize {
        (self.entries.as_ptr() as usize % PAGE + i * core::mem::size_of::<(u64, u64)>()) / PAGE
    }

    /// Whether an insert ever wrote to the memory page of bucket `i` (if not, the bucket is empty).
    #[inline]
    fn page_written(&self, i: usize) -> bool {
        let page = self.page_of(i);
        self.written[page / 64] & (1 << (page % 64)) != 0
    }

    /// Records that bucket `i` now holds an entry (keeps `written` true of its page).
    #[inline]
    fn mark_written(&mut self, i: usize) {
        if self.unwritten == 0 {
            return;
        }
        let page = self.page_of(i);
        let (word, bit) = (page / 64, 1 << (page % 64));
        if self.written[word] & bit == 0 {
            self.written[word] |= bit;
            self.unwritten -= 1;
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Holds as many ids as it was sized for (an insert of a new id would be refused).
    pub fn is_full(&self) -> bool {
        self.len >= self.entries.len() / 2
    }

    /// The address of `id`'s home bucket, for callers that prefetch without holding the table
    /// (the bucket array never moves: the table never grows).
    #[inline]
    pub fn bucket_address(&self, id: u64) -> *const u8 {
        self.entries.as_ptr().wrapping_add(home(id, self.mask)) as *const u8
    }

    /// The base address and mask, to compute `bucket_address` later without the table.
    pub fn layout(&self) -> (usize, usize) {
        (self.entries.as_ptr() as usize, self.mask)
    }

    /// `bucket_address` from a saved `layout`.
    #[inline]
    pub fn bucket_address_in(layout: (usize, usize), id: u64) -> *const u8 {
        (layout.0 as *const (u64, u64)).wrapping_add(home(id, layout.1)) as *const u8
    }

    /// The bucket holding `id`, or else the empty bucket where it would go.
    ///
    /// A home bucket on a memory page no insert has written to is empty, and is answered without
    /// reading it. The bucket array is untouched zeroed memory until used, and a page read before
    /// it is written costs a flush of every CPU's TLB when the write comes (`AccountIndex::load`
    /// tells why). Replaying a log into a fresh shard, which looks up and inserts top-ups in
    /// tables of 4 KiB pages, spent a quarter of its CPU time in those flushes (docs/benchmarks.md,
    /// session 9). Unread, such a page is first touched by the insert's write, and is simply
    /// allocated. This is lazy, page by page, where the index load makes the whole table
    /// writable at once, so that a table seldom filled (the top-ups') keeps its untouched pages
    /// out of memory.
    #[inline]
    fn find(&self, id: u64) -> Result<usize, usize> {
        let mut i = home(id, self.mask);
        if self.unwritten != 0 && !self.page_written(i) {
            return Err(i);
        }
        loop {
            let (key, value) = self.entries[i];
            if value == 0 {
                return Err(i);
            }
            if key == id {
                return Ok(i);
            }
            i = (i + 1) & self.mask;
        }
    }

    /// The sequence number recorded for `id`.
    #[inline]
    pub fn get(&self, id: u64) -> Option<u64> {
        self.find(id).ok().map(|i| self.entries[i].1 - 1)
    }

    /// Records `id` -> `seq`, replacing an earlier value. `seq` is below `u64::MAX` (a snapshot's
    /// are checked when it is loaded): stored as `seq + 1`, it would wrap to an empty bucket.
    pub fn insert(&mut self, id: u64, seq: u64) {
        let value = seq.checked_add(1).expect("an id table value below u64::MAX");
        match self.find(id) {
            Ok(i) => self.entries[i].1 = value,
            Err(i) => {
                assert!(self.len < self.entries.len() / 2, "id table over capacity");
                self.entries[i] = (id, value);
                self.mark_written(i);
                self.len += 1;
            }
        }
    }

    /// What `id` maps to, or else records `id -> value` (one probe, where a `get` and an
    /// `insert` take two).
    #[inline]
    pub fn get_or_insert(&mut self, id: u64, value: u64) -> Lookup {
        self.get_or_insert_below(id, value, self.entries.len() / 2)
    }

    /// `get_or_insert` that may fill the table past the half it was sized for, up to three
    /// quarters of its buckets (probe runs grow, lookups stay correct): for an insert that must
    /// not be refused (`IdDirectory::reclaim`). `Full` only beyond that.
    pub fn get_or_insert_over(&mut self, id: u64, value: u64) -> Lookup {
        self.get_or_insert_below(id, value, self.entries.len() / 4 * 3)
    }

    /// `get_or_insert`, refusing a new id once the table holds `max_len`.
    #[inline]
    fn get_or_insert_below(&mut self, id: u64, value: u64, max_len: usize) -> Lookup {
        match self.find(id) {
            Ok(i) => Lookup::Present(self.entries[i].1 - 1),
            Err(_) if self.len >= max_len => Lookup::Full,
            Err(i) => {
                self.entries[i] = (id, value + 1);
                self.mark_written(i);
                self.len += 1;
                Lookup::Inserted
            }
        }
    }

    /// Forgets `id`, shifting later entries of its probe run back into the hole.
    pub fn remove(&mut self, id: u64) {
        if let Ok(hole) = self.find(id) {
            self.remove_at(hole);
        }
    }

    /// Forgets `id` if it still maps to `seq` (one probe instead of a `get` and a `remove`).
    #[inline]
    pub fn remove_if(&mut self, id: u64, seq: u64) {
        if let Ok(hole) = self.find(id) {
            if self.entries[hole].1 == seq + 1 {
                self.remove_at(hole);
            }
        }
    }

    fn remove_at(&mut self, mut hole: usize) {
        let mut j = hole;
        loop {
            j = (j + 1) & self.mask;
            let (key, value) = self.entries[j];
            if value == 0 {
                break;
            }
            // The entry at j may fill the hole if its home is not in the cyclic range (hole, j].
            let from_home = j.wrapping_sub(home(key, self.mask)) & self.mask;
            let from_hole = j.wrapping_sub(hole) & self.mask;
            if from_home >= from_hole {
                self.entries[hole] = self.entries[j];
                hole = j;
            }
        }
        self.entries[hole] = (0, 0);
        self.len -= 1;
    }

    /// The `(id, value)` pairs held, in table order (which must not reach an output).
    pub fn entries(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.entries.iter().filter(|e| e.1 != 0).map(|e| (e.0, e.1 - 1))
    }

    /// Hints the CPU to load the bucket where `id` would be (no effect on results).
    #[inline]
    pub fn prefetch(&self, id: u64) {
        crate::ledger::index::prefetch(self.bucket_address(id));
    }

    /// Like `prefetch`, plus the next cache line: `remove` scans the probe run after the id's
    /// bucket for an entry to shift back, and at load 0.5 that run often crosses a line.
    #[inline]
    pub fn prefetch_run(&self, id: u64) {
        let bucket = self.bucket_address(id);
        crate::ledger::index::prefetch(bucket);
        crate::ledger::index::prefetch(bucket.wrapping_add(64));
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::collections::BTreeMap;

    #[test]
    fn tables_too_large_for_memory_are_an_error_not_a_wrapped_size() {
        for (tables, capacity) in [(1, usize::MAX / 2), (1, 1 << 60), (256, 1 << 56)] {
            let error = IdTable::new_parts(tables, capacity).err().expect("refused");
            assert_eq!(error.kind(), std::io::ErrorKind::InvalidInput, "{tables} x {capacity}");
        }
    }

    #[test]
    fn matches_a_map_under_churn() {
        churn(IdTable::new(64));
        // The table tracks which pages it wrote (`find`), which must not change the
        // results. 64 ids in 128 buckets are one page, so also a table over many pages.
        churn_wide(IdTable::new_unadvised(1 << 14));
    }

    #[test]
    fn parts_of_one_mapping_behave_as_tables_of_their_own() {
        // Small parts share memory pages (a part of 64 ids is 2 KiB), wide ones span many.
        let mut parts = IdTable::new_parts(3, 64).unwrap();
        churn(parts.pop().unwrap());
        let mut wide = IdTable::new_parts(2, 1 << 14).unwrap();
        churn_wide(wide.pop().unwrap());
        churn_wide(wide.pop().unwrap());
        // Neighbours stay apart: fill the two parts left, then find each id in its own part only.
        for (t, table) in parts.iter_mut().enumerate() {
            for id in 1..=64u64 {
                table.insert(id * 10 + t as u64, id);
            }
            assert!(table.is_full());
        }
        for (t, table) in parts.iter().enumerate() {
            assert_eq!(table.len(), 64);
            for id in 1..=64u64 {
                assert_eq!(table.get(id * 10 + t as u64), Some(id));
                assert_eq!(table.get(id * 10 + (1 - t as u64)), None, "part {t} holds only its own ids");
            }
        }
    }

    /// Ids a client could compute to share one home bucket under a fixed multiplicative hash
    /// (what these tables used before `ledger::hash`): `p * K^-1` for products `p` that agree
    /// in the bits the table and the id directory take. Keyed, they spread like any ids.
    pub(crate) fn colliding_under_a_fixed_hash(n: usize) -> Vec<u64> {
        const K: u64 = 0x9E37_79B9_7F4A_7C15;
        // K^-1 mod 2^64, by Newton's iteration (each step doubles the correct low bits).
        let mut inverse = K;
        for _ in 0..6 {
            inverse = inverse.wrapping_mul(2u64.wrapping_sub(K.wrapping_mul(inverse)));
        }
        assert_eq!(K.wrapping_mul(inverse), 1);
        // The top byte (the directory's stripe) and bits 17-33 (the bucket) fixed, the rest counting.
        (0..n as u64)
            .map(|i| ((0xAB << 56) | ((i >> 17) << 34) | (12_345 << 17) | (i & 0x1_FFFF)).wrapping_mul(inverse))
            .collect()
    }

    #[test]
    fn ids_chosen_to_collide_under_a_fixed_hash_do_not_collide() {
        let ids = colliding_under_a_fixed_hash(20_000);
        let mut table = IdTable::new_unadvised(ids.len());
        for (seq, &id) in ids.iter().enumerate() {
            assert_eq!(table.get_or_insert(id, seq as u64), Lookup::Inserted);
        }
        // The longest run of occupied buckets: under the fixed hash, one run of 20 000 (every
        // insert and lookup walking it); keyed, a run at load 0.3 is a few dozen at most.
        let (mut longest, mut run) = (0, 0);
        for &(_, value) in table.entries.iter().chain(table.entries.iter()) {
            run = if value == 0 { 0 } else { run + 1 };
            longest = longest.max(run);
        }
        assert!(longest < 200, "a probe run of {longest} buckets");
        for (seq, &id) in ids.iter().enumerate() {
            assert_eq!(table.get(id), Some(seq as u64));
        }
    }

    /// Inserts and removes ids spread over a table of many pages, against a map.
    fn churn_wide(mut table: IdTable) {
        let mut model = BTreeMap::new();
        let mut x = 11u64;
        for step in 0..100_000u64 {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            let id = 1 + (x >> 30);
            if model.contains_key(&id) {
                continue;
            }
            if model.len() >= 1 << 13 || (x >> 20).is_multiple_of(4) {
                if let Some((&old, _)) = model.iter().next() {
                    table.remove(old);
                    model.remove(&old);
                }
            } else {
                assert_eq!(table.get_or_insert(id, step), Lookup::Inserted);
                model.insert(id, step);
            }
            assert_eq!(table.len(), model.len());
        }
        for (id, seq) in &model {
            assert_eq!(table.get(*id), Some(*seq));
        }
        assert!(table.written.iter().any(|w| *w != 0), "the pages written were tracked");
        // Every page was written early on: the later steps ran without the bitmap.
        assert_eq!(table.unwritten, 0);
    }

    fn churn(mut table: IdTable) {
        let mut model = BTreeMap::new();
        let mut x = 7u64;
        for step in 0..200_000u64 {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            // A small key space makes collisions, long runs and wrap-around common.
            let id = 1 + (x >> 33) % 300;
            if (x >> 20).is_multiple_of(3) || model.len() >= 64 {
                table.remove(id);
                model.remove(&id);
            } else if (x >> 24).is_multiple_of(5) {
                // remove_if with the current or a stale sequence number.
                let seq = if (x >> 40) & 1 == 0 { model.get(&id).copied().unwrap_or(0) } else { step };
                table.remove_if(id, seq);
                if model.get(&id) == Some(&seq) {
                    model.remove(&id);
                }
            } else if (x >> 28).is_multiple_of(4) {
                // get_or_insert keeps a present value; the table never fills here (64 of 128).
                let expected = match model.get(&id) {
                    Some(&v) => Lookup::Present(v),
                    None => Lookup::Inserted,
                };
                assert_eq!(table.get_or_insert(id, step), expected);
                model.entry(id).or_insert(step);
            } else {
                table.insert(id, step);
                model.insert(id, step);
            }
            assert_eq!(table.len(), model.len());
            let probe = 1 + (x >> 13) % 300;
            assert_eq!(table.get(probe), model.get(&probe).copied(), "step {step}");
        }
        for (id, seq) in &model {
            assert_eq!(table.get(*id), Some(*seq));
        }
    }
}
