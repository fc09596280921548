//! The payment methods users have bound: (user, method) -> channel. Bindings are only ever
//! added (there is no unbind), and this module owns how they are held in memory. It never
//! decides whether a binding is allowed (the state machine does), and its iteration order is
//! always the sorted one, so no hash order can leak out of it.
//!
//! Two parts, disjoint:
//! - `keys`/`channels`: the bindings a snapshot load brought, in two arrays sorted by
//!   (user, method), filled in one sequential pass by `MethodsLoader` (the snapshot's methods
//!   section is already in that order). Found through a directory of where each range of user ids
//!   starts (`Directory`, built in one more sequential pass), then a binary search in the range.
//! - `added`: the bindings made since, in 256 hash maps (`Added`: one map's growth would stall
//!   the shard); a shard started from genesis holds all its bindings here until its first
//!   snapshot compacts them or it restarts.
//! - While a snapshot encodes them, a third part, `frozen`: the bindings `added` held when the
//!   snapshot began (`freeze`), shared with the thread that sorts, encodes and maybe compacts
//!   them (`FrozenMethods`), while the shard binds new ones into a fresh `added`; `thaw` ends it.
//!
//! Why this and not the alternatives measured or considered for the 10 M-account snapshot
//! (numbers from the development VM, 10 M bindings):
//! - A hash map for everything (before): 10 M inserts are a cache and TLB miss each; even grouped
//!   by table region they took 0.9-1 s of CPU, a third of the whole load. The sorted arrays load
//!   like the account vector, at memory speed (0.20-0.23 s of CPU to decode the section into
//!   them, their pages included), and hold 17.3 resident bytes a binding (16 of key, 1 of
//!   channel, the directory) against the map's 41.9 (24-byte entries and control bytes, at most
//!   7/8 full, rounded to a power of two).
//! - A first binding per user in a side vector parallel to the accounts (by slot): lookups would
//!   be one access, but the section is ordered by user id, not by slot, so loading it needs the
//!   account index (being filled on another thread at the same time) and 10 M random lookups in
//!   it; and it costs its bytes for every account of capacity, bound or not.
//!
//! What it costs: a lookup in `keys` is the directory entry plus a binary search among the few
//! keys of its range, a few cache misses instead of the map's one or two: 0.3-0.46 us for a
//! random user against the map's 0.06-0.08 us (a plain binary search over all the keys, each
//! step on another page, took ~2 us). The worker's prefetch stages load the directory entry and
//! the keys ahead (`prefetch_directory`, `prefetch_keys`), which a hash map does not allow: with
//! them, an already-made binding applied again took 0.35-0.42 us, against 0.61-0.69 us with
//! the bindings in the map. Only binding a method and beginning a top-up look a binding up; tips
//! never do.

use std::sync::Arc;

use crate::ledger::command::Channel;
use crate::ledger::state_machine::IdMap;

/// A binding's key: (user, method).
pub type MethodKey = (u64, u64);

/// See the module docs.
#[derive(Clone, Default)]
pub struct Methods {
    /// The sorted arrays (shared with a snapshot's thread while it encodes them).
    loaded: Arc<Loaded>,
    /// While a snapshot encodes the bindings: those made before it began and after the load.
    frozen: Option<Arc<Added>>,
    /// Bindings made after the load (and after `freeze`); none of them is in `loaded` or `frozen`.
    added: Added,
}

/// Bindings in sorted arrays, found through `directory`.
#[derive(Default)]
struct Loaded {
    /// Sorted ascending, no duplicates; `channels[i]` is the channel of `keys[i]`.
    keys: Vec<MethodKey>,
    channels: Vec<Channel>,
    directory: Directory,
}

impl Loaded {
    /// Where `key` is in `keys`.
    #[inline]
    fn position(&self, key: MethodKey) -> Option<usize> {
        let range = self.directory.range(key.0)?;
        let keys = self.keys.get(range.clone())?;
        keys.binary_search(&key).ok().map(|i| range.start + i)
    }

    /// These bindings merged with `added` (sorted here: a radix sort, as a shard started from
    /// genesis may have millions), in ascending order.
    fn merged(
        &self,
        added: impl Iterator<Item = (MethodKey, Channel)>,
    ) -> impl Iterator<Item = (MethodKey, Channel)> + '_ {
        let mut added: Vec<(MethodKey, Channel)> = added.collect();
        radix_sort(&mut added, |&((user, method), _)| u128::from(user) << 64 | u128::from(method));
        let mut loaded = self.keys.iter().copied().zip(self.channels.iter().copied()).peekable();
        let mut added = added.into_iter().peekable();
        std::iter::from_fn(move || match (loaded.peek(), added.peek()) {
            (Some(l), Some(a)) if a.0 < l.0 => added.next(),
            (Some(_), _) => loaded.next(),
            (None, _) => added.next(),
        })
    }
}

/// The bindings as they were when a snapshot began (`Methods::freeze`), for the thread that
/// encodes them: the sorted arrays and the bindings made since, both shared read-only.
pub struct FrozenMethods {
    loaded: Arc<Loaded>,
    added: Arc<Added>,
}

impl FrozenMethods {
    pub fn len(&self) -> usize {
        self.loaded.keys.len() + self.added.len
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// See `Methods::worth_compacting`.
    pub fn worth_compacting(&self) -> bool {
        worth_compacting(self.added.len, self.loaded.keys.len())
    }

    /// Every binding, ascending.
    pub fn sorted(&self) -> impl Iterator<Item = (MethodKey, Channel)> + '_ {
        self.loaded.merged(self.added.iter().map(|(&k, &c)| (k, c)))
    }

    /// See `Methods::compacted`.
    pub fn compacted(&self) -> Methods {
        compact(self.len(), self.sorted())
    }
}

/// What `Methods::thaw` replaced, to be dropped off the shard's thread (freeing hundreds of
/// MiB is not free).
pub struct Replaced {
    _loaded: Arc<Loaded>,
    _frozen: Arc<Added>,
}

fn worth_compacting(added: usize, loaded: usize) -> bool {
    added != 0 && added * 4 >= loaded
}

fn compact(len: usize, sorted: impl Iterator<Item = (MethodKey, Channel)>) -> Methods {
    let mut loader = MethodsLoader::with_capacity(len);
    for ((user, method), channel) in sorted {
        loader.push(user, method, channel).expect("sorted yields ascending, distinct bindings");
    }
    loader.finish()
}

/// How many hash maps `Added` spreads its bindings over (a power of two).
const ADDED_PARTS: usize = 256;
const _: () = assert!(ADDED_PARTS.is_power_of_two());

/// The bindings made since the load, spread by a hash of the key over `ADDED_PARTS` hash maps
/// that each grow on their own. A hash map grows by copying every entry into a table twice
/// the size, on the shard's thread, between two commands: one map of 3.67 M bindings stalled
/// its shard 183-194 ms when it grew (`cargo bench --bench state_machine -- bind`; a shard
/// started from genesis holds every binding here until its first snapshot). A part holds 1/256
/// of them, so its copy is that much shorter.
#[derive(Clone)]
pub(crate) struct Added {
    parts: Box<[IdMap<MethodKey, Channel>]>,
    len: usize,
}

impl Default for Added {
    fn default() -> Added {
        Added { parts: (0..ADDED_PARTS).map(|_| IdMap::default()).collect(), len: 0 }
    }
}

impl Added {
    #[inline]
    fn part(&self, key: &MethodKey) -> &IdMap<MethodKey, Channel> {
        &self.parts[part_of(key)]
    }

    #[inline]
    fn get(&self, key: &MethodKey) -> Option<Channel> {
        if self.len == 0 {
            return None;
        }
        self.part(key).get(key).copied()
    }

    fn insert(&mut self, key: MethodKey, channel: Channel) -> Option<Channel> {
        let previous = self.parts[part_of(&key)].insert(key, channel);
        if previous.is_none() {
            self.len += 1;
        }
        previous
    }

    fn iter(&self) -> impl Iterator<Item = (&MethodKey, &Channel)> + '_ {
        self.parts.iter().flat_map(|part| part.iter())
    }
}

/// The part of `key`: the top bits of a hash of the maps' own (keyed) hash of it, so that the
/// keys of one part still differ in the bits a map places entries and tags by.
#[inline]
fn part_of(key: &MethodKey) -> usize {
    use crate::ledger::hash::{hash, hash_of};
    (hash(hash_of(key)) >> (64 - ADDED_PARTS.trailing_zeros())) as usize
}

impl Methods {
    /// The channel `user` bound `method` to, if bound.
    #[inline]
    pub fn get(&self, user: u64, method: u64) -> Option<Channel> {
        let key = (user, method);
        if let Some(channel) = self.added.get(&key) {
            return Some(channel);
        }
        if let Some(channel) = self.frozen.as_ref().and_then(|frozen| frozen.get(&key)) {
            return Some(channel);
        }
        self.loaded.position(key).and_then(|i| self.loaded.channels.get(i).copied())
    }

    /// Shares the bindings as they are now with a snapshot's thread (`FrozenMethods`); the
    /// shard goes on binding (into a fresh `added`) and finding every binding. Until `thaw`.
    pub fn freeze(&mut self) -> FrozenMethods {
        assert!(self.frozen.is_none(), "the methods are frozen already");
        let frozen = Arc::new(std::mem::take(&mut self.added));
        self.frozen = Some(frozen.clone());
        FrozenMethods { loaded: self.loaded.clone(), added: frozen }
    }

    /// Ends `freeze`, once its `FrozenMethods` is dropped. With `compacted` (the frozen
    /// bindings compacted into sorted arrays by the snapshot's thread: `FrozenMethods::compacted`)
    /// those arrays replace the old ones and the frozen maps, which are returned for the caller
    /// to drop; without, the frozen maps become `added` again, with the bindings made since.
    pub fn thaw(&mut self, compacted: Option<Methods>) -> Option<Replaced> {
        let frozen = self.frozen.take().expect("the methods are frozen");
        match compacted {
            Some(compacted) => {
                assert!(compacted.frozen.is_none() && compacted.added.len == 0, "compacted into the arrays");
                let loaded = std::mem::replace(&mut self.loaded, compacted.loaded);
                Some(Replaced { _loaded: loaded, _frozen: frozen })
            }
            None => {
                // The snapshot's thread is done with them, so this is the only reference (but
                // for a clone of these `Methods` made meanwhile: then the maps are copied).
                let frozen = Arc::try_unwrap(frozen).unwrap_or_else(|shared| (*shared).clone());
                let since = std::mem::replace(&mut self.added, frozen);
                for (&key, &channel) in since.iter() {
                    assert!(self.added.insert(key, channel).is_none(), "binding {key:?} added twice");
                }
                None
            }
        }
    }

    /// Stage one of prefetching a lookup of `user`'s bindings: its directory entry. Hints only,
    /// like `ShardState::prefetch_index`, which calls it a few commands ahead.
    #[inline]
    pub fn prefetch_directory(&self, user: u64) {
        let directory = &self.loaded.directory;
        if let Some(range) = directory.range_number(user) {
            crate::ledger::index::prefetch(directory.starts.as_ptr().wrapping_add(range) as *const u8);
        }
    }

    /// Stage two: the keys the binary search reads first, and the channels near them (the
    /// directory entry is cached by now).
    #[inline]
    pub fn prefetch_keys(&self, user: u64) {
        let loaded = &*self.loaded;
        if let Some(range) = loaded.directory.range(user) {
            // The search reads the middle key, then halves the range: load the (at most 8) cache
            // lines of keys around the middle, 4 keys a line.
            let middle = range.start + range.len() / 2;
            for i in (middle.saturating_sub(16).max(range.start)..(middle + 16).min(range.end)).step_by(4) {
                crate::ledger::index::prefetch(loaded.keys.as_ptr().wrapping_add(i) as *const u8);
            }
            crate::ledger::index::prefetch(loaded.channels.as_ptr().wrapping_add(middle) as *const u8);
        }
    }

    /// Binds `method` of `user` to `channel`. The binding must be new (the caller looked it up).
    pub fn insert(&mut self, user: u64, method: u64, channel: Channel) {
        let key = (user, method);
        debug_assert!(self.loaded.position(key).is_none(), "binding {key:?} is loaded already");
        debug_assert!(self.frozen.as_ref().is_none_or(|f| f.get(&key).is_none()), "binding {key:?} is frozen");
        let previous = self.added.insert(key, channel);
        assert!(previous.is_none(), "binding {key:?} added twice");
    }

    /// Whether `compacted` is worth its copy: the bindings made since the load (or the last
    /// compaction) are at least a quarter of those in the arrays.
    pub fn worth_compacting(&self) -> bool {
        worth_compacting(self.frozen_len() + self.added.len, self.loaded.keys.len())
    }

    fn frozen_len(&self) -> usize {
        self.frozen.as_ref().map_or(0, |f| f.len)
    }

    /// The same bindings, all in the sorted arrays, as a snapshot load would leave them: one
    /// merge of `sorted`. Lookups then prefetch well, the next `sorted` has only the bindings
    /// made after to sort, and the arrays take 17 bytes a binding where the map takes 42.
    pub fn compacted(&self) -> Methods {
        compact(self.len(), self.sorted())
    }

    /// Bindings held.
    pub fn len(&self) -> usize {
        self.loaded.keys.len() + self.frozen_len() + self.added.len
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Every binding in ascending (user, method) order: the loaded ones merged with the added
    /// ones (sorted here: a radix sort, as a shard started from genesis may have millions).
    pub fn sorted(&self) -> impl Iterator<Item = (MethodKey, Channel)> + '_ {
        let frozen = self.frozen.iter().flat_map(|f| f.iter());
        self.loaded.merged(self.added.iter().chain(frozen).map(|(&k, &c)| (k, c)))
    }
}

/// Equal when they hold the same bindings, however they were made (loaded or added).
impl PartialEq for Methods {
    fn eq(&self, other: &Methods) -> bool {
        self.len() == other.len() && self.sorted().eq(other.sorted())
    }
}

impl Eq for Methods {}

impl std::fmt::Debug for Methods {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_map().entries(self.sorted()).finish()
    }
}

/// Builds a `Methods` from bindings given in strictly ascending (user, method) order, as a
/// snapshot holds them: two sequential writes per binding, no hashing.
pub struct MethodsLoader {
    keys: Vec<MethodKey>,
    channels: Vec<Channel>,
}

/// Bindings whose memory `MethodsLoader` populates at a time (1 MiB of keys): the arrays are
/// fresh memory, and one call per block makes their pages instead of a page fault each. A
/// block at a time, not all up front, so that a damaged count cannot make memory resident.
const POPULATE_AHEAD: usize = 1 << 16;

/// `MethodsLoader::push` was given a binding not after the previous one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NotAscending;

impl MethodsLoader {
    /// A loader with room for `count` bindings (reserved, not yet resident).
    pub fn with_capacity(count: usize) -> MethodsLoader {
        MethodsLoader { keys: Vec::with_capacity(count), channels: Vec::with_capacity(count) }
    }

    /// Appends a binding; it must come after the previous one.
    #[inline]
    pub fn push(&mut self, user: u64, method: u64, channel: Channel) -> Result<(), NotAscending> {
        let key = (user, method);
        if self.keys.last().is_some_and(|&last| last >= key) {
            return Err(NotAscending);
        }
        if self.keys.len().is_multiple_of(POPULATE_AHEAD) {
            let (keys, channels) = (self.keys.spare_capacity_mut(), self.channels.spare_capacity_mut());
            crate::ledger::index::populate_writable(keys.get(..POPULATE_AHEAD).unwrap_or(keys));
            crate::ledger::index::populate_writable(channels.get(..POPULATE_AHEAD).unwrap_or(channels));
        }
        self.keys.push(key);
        self.channels.push(channel);
        Ok(())
    }

    pub fn finish(self) -> Methods {
        let directory = Directory::new(&self.keys);
        let loaded = Arc::new(Loaded { keys: self.keys, channels: self.channels, directory });
        Methods { loaded, frozen: None, added: Added::default() }
    }
}

/// Where each range of user ids starts in sorted `keys`: the users `min..=max` are cut into
/// ranges of `1 << shift` ids, about one range per `KEYS_PER_RANGE` keys, and `starts[r]` is the
/// position of the first key whose user is in range `r` or after it. For ids spread evenly (or
/// handed out in sequence, the usual case) a range holds a few keys: a lookup is the directory
/// entry and a search among them. Ids bunched at a few places only make the ranges uneven; the
/// answer is the same, it takes a longer search.
#[derive(Clone, Default)]
struct Directory {
    min: u64,
    max: u64,
    shift: u32,
    /// Ranges + 1 entries, ascending, the last `keys.len()`; empty when there are no keys.
    starts: Vec<usize>,
}

/// Keys per directory range, on average for evenly spread user ids (8 bytes of directory for
/// 16 keys of 16 bytes: half a byte a binding).
const KEYS_PER_RANGE: usize = 16;

impl Directory {
    /// One sequential pass over `keys` (sorted).
    fn new(keys: &[MethodKey]) -> Directory {
        let (Some(first), Some(last)) = (keys.first(), keys.last()) else { return Directory::default() };
        let (min, max) = (first.0, last.0);
        let ranges_log2 = (keys.len() / KEYS_PER_RANGE).max(1).ilog2();
        let span_bits = u64::BITS - (max - min).leading_zeros();
        // At most 63: a shift by 64 would overflow (the span then needs two ranges).
        let shift = span_bits.saturating_sub(ranges_log2).min(u64::BITS - 1);
        let ranges = ((max - min) >> shift) as usize + 1;
        let mut starts = Vec::with_capacity(ranges + 1);
        for (i, &(user, _)) in keys.iter().enumerate() {
            let range = ((user - min) >> shift) as usize;
            while starts.len() <= range {
                starts.push(i);
            }
        }
        starts.push(keys.len());
        debug_assert_eq!(starts.len(), ranges + 1);
        Directory { min, max, shift, starts }
    }

    /// The range `user` falls in, if any.
    #[inline]
    fn range_number(&self, user: u64) -> Option<usize> {
        if user < self.min || user > self.max || self.starts.is_empty() {
            return None;
        }
        Some(((user - self.min) >> self.shift) as usize)
    }

    /// The positions in `keys` where the bindings of `user` can be.
    #[inline]
    fn range(&self, user: u64) -> Option<std::ops::Range<usize>> {
        let range = self.range_number(user)?;
        Some(*self.starts.get(range)?..*self.starts.get(range + 1)?)
    }
}

/// Sorts `items` by `key`: least significant byte first, one stable counting sort per byte in
/// which the keys differ.
fn radix_sort<T: Copy>(items: &mut Vec<T>, key: impl Fn(&T) -> u128) {
    let (mut any, mut all) = (0u128, !0u128);
    for item in items.iter() {
        let k = key(item);
        (any, all) = (any | k, all & k);
    }
    let mut scratch = Vec::new();
    for byte in 0..16 {
        if (any ^ all) >> (8 * byte) & 0xff != 0 {
            counting_sort(items, &mut scratch, |item| (key(item) >> (8 * byte)) as usize & 0xff);
            std::mem::swap(items, &mut scratch);
        }
    }
}

/// Places `items` into `out` ordered by `digit(item)` (below 256), keeping the order of equal
/// digits: one pass to count, one to place.
fn counting_sort<T: Copy>(items: &[T], out: &mut Vec<T>, digit: impl Fn(&T) -> usize) {
    let mut next = [0usize; 256];
    for item in items {
        if let Some(n) = next.get_mut(digit(item)) {
            *n += 1;
        }
    }
    let mut start = 0;
    for n in next.iter_mut() {
        (*n, start) = (start, start + *n);
    }
    if out.len() != items.len() {
        out.clear();
        out.extend_from_slice(items);
    }
    for item in items {
        if let Some(n) = next.get_mut(digit(item)) {
            if let Some(slot) = out.get_mut(*n) {
                *slot = *item;
            }
            *n += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::workload::SplitMix64;

    /// `n` distinct random bindings, some users with several methods, extreme values included.
    fn bindings(n: usize, seed: u64) -> Vec<(MethodKey, Channel)> {
        let mut rng = SplitMix64(seed);
        let mut out = std::collections::BTreeMap::new();
        while out.len() < n {
            let user = match rng.below(4) {
                0 => rng.below(50),
                1 => rng.next_u64(),
                2 => [0, u64::MAX, 1 << 63][rng.below(3) as usize],
                _ => 1_000 + rng.below(n as u64),
            };
            for _ in 0..1 + rng.below(3) {
                let method = [rng.below(4), rng.next_u64(), u64::MAX][rng.below(3) as usize];
                out.entry((user, method)).or_insert(Channel::ALL[rng.below(4) as usize]);
            }
        }
        out.into_iter().collect()
    }

    fn loaded(sorted: &[(MethodKey, Channel)]) -> Methods {
        let mut loader = MethodsLoader::with_capacity(sorted.len());
        for &((user, method), channel) in sorted {
            loader.push(user, method, channel).unwrap();
        }
        loader.finish()
    }

    #[test]
    fn bulk_load_equals_incremental_inserts() {
        for (n, seed) in [(0, 1), (1, 2), (7, 3), (1_000, 4), (200_000, 5)] {
            let sorted = bindings(n, seed);
            let bulk = loaded(&sorted);
            let mut incremental = Methods::default();
            // Inserted in another order than sorted.
            let mut shuffled = sorted.clone();
            let mut rng = SplitMix64(seed);
            for i in (1..shuffled.len()).rev() {
                shuffled.swap(i, rng.below(i as u64 + 1) as usize);
            }
            for &((user, method), channel) in &shuffled {
                assert_eq!(incremental.get(user, method), None);
                incremental.insert(user, method, channel);
            }
            assert_eq!(bulk.len(), sorted.len());
            assert_eq!(incremental.len(), sorted.len());
            assert_eq!(bulk.sorted().collect::<Vec<_>>(), sorted, "seed {seed}");
            assert_eq!(incremental.sorted().collect::<Vec<_>>(), sorted, "seed {seed}");
            assert_eq!(bulk, incremental);
            for &((user, method), channel) in &sorted {
                assert_eq!(bulk.get(user, method), Some(channel));
                assert_eq!(incremental.get(user, method), Some(channel));
                for other in [(user, method.wrapping_add(1)), (user.wrapping_add(1), method)] {
                    if sorted.binary_search_by_key(&other, |b| b.0).is_err() {
                        assert_eq!(bulk.get(other.0, other.1), None);
                        assert_eq!(incremental.get(other.0, other.1), None);
                    }
                }
            }
        }
    }

    #[test]
    fn added_bindings_spread_over_the_parts_and_are_all_found() {
        let mut methods = Methods::default();
        // Sequential users with one method each (a mass import), and random ones.
        let mut all: Vec<(MethodKey, Channel)> = (1..=20_000u64).map(|user| ((user, 1), Channel::Wechat)).collect();
        all.extend(bindings(20_000, 5).into_iter().filter(|((user, _), _)| *user > 20_000));
        for &((user, method), channel) in &all {
            assert_eq!(methods.get(user, method), None);
            methods.insert(user, method, channel);
        }
        assert_eq!(methods.len(), all.len());
        for &((user, method), channel) in &all {
            assert_eq!(methods.get(user, method), Some(channel));
        }
        // No part holds much more than its share: a part's growth is the longest stall.
        let share = all.len() / ADDED_PARTS;
        let largest = methods.added.parts.iter().map(|p| p.len()).max().unwrap();
        assert!(largest < 2 * share, "largest part {largest}, share {share}");
        all.sort();
        assert!(methods.sorted().eq(all.iter().copied()));
    }

    #[test]
    fn bindings_added_after_a_load_merge_in_order() {
        let all = bindings(50_000, 6);
        // Every third binding is loaded, the others added later: they fall before, between and
        // after the loaded ones, and for the same users.
        let (first, later): (Vec<_>, Vec<_>) = all.iter().enumerate().partition(|(i, _)| i % 3 == 0);
        let mut methods = loaded(&first.iter().map(|(_, b)| **b).collect::<Vec<_>>());
        for (_, &((user, method), channel)) in &later {
            assert_eq!(methods.get(user, method), None);
            methods.insert(user, method, channel);
        }
        assert_eq!(methods.len(), all.len());
        assert_eq!(methods.sorted().collect::<Vec<_>>(), all);
        assert_eq!(methods, loaded(&all));
        for &((user, method), channel) in &all {
            assert_eq!(methods.get(user, method), Some(channel));
        }
        assert_ne!(methods, loaded(&all[1..]));
        let mut other_channel = all.clone();
        other_channel[7].1 = if all[7].1 == Channel::Alipay { Channel::Wechat } else { Channel::Alipay };
        assert_ne!(methods, loaded(&other_channel));
    }

    #[test]
    fn compacting_keeps_every_binding_and_lookups_see_the_same() {
        let all = bindings(50_000, 7);
        let (first, later): (Vec<_>, Vec<_>) = all.iter().enumerate().partition(|(i, _)| i % 5 == 0);
        let mut methods = loaded(&first.iter().map(|(_, b)| **b).collect::<Vec<_>>());
        assert!(!methods.worth_compacting(), "nothing added yet");
        for (i, &(_, &((user, method), channel))) in later.iter().enumerate() {
            methods.insert(user, method, channel);
            if i + 2 == first.len() / 4 {
                assert!(!methods.worth_compacting(), "fewer added than a quarter of those loaded");
            }
        }
        assert!(methods.worth_compacting());
        let mut compacted = methods.compacted();
        assert!(!compacted.worth_compacting());
        assert_eq!(compacted, methods);
        assert_eq!(compacted.sorted().collect::<Vec<_>>(), all);
        for &((user, method), channel) in &all {
            assert_eq!(compacted.get(user, method), Some(channel));
            let next = (user, method.wrapping_add(1));
            if all.binary_search_by_key(&next, |b| b.0).is_err() {
                assert_eq!(compacted.get(next.0, next.1), None);
            }
        }
        // Bindings made after a compaction are added, and merge in as after a load.
        compacted.insert(all[0].0 .0, 1 << 40, Channel::BankCard);
        assert_eq!(compacted.get(all[0].0 .0, 1 << 40), Some(Channel::BankCard));
        assert_eq!(compacted.len(), all.len() + 1);
    }

    /// A snapshot freezes the bindings, the shard goes on binding, and the snapshot's thread
    /// reads the frozen ones; after `thaw`, with or without a compaction, every binding is
    /// found and held once.
    #[test]
    fn frozen_bindings_stay_found_and_thaw_with_or_without_a_compaction() {
        let all = bindings(3_000, 5);
        let (before, during) = all.split_at(2_000);
        let (loaded_part, added_part) = before.split_at(1_200);
        for compact in [false, true] {
            let mut methods = loaded(loaded_part);
            for &((user, method), channel) in added_part {
                methods.insert(user, method, channel);
            }
            let frozen = methods.freeze();
            assert_eq!(frozen.len(), before.len());
            assert_eq!(frozen.worth_compacting(), methods.worth_compacting());
            let mut expected = before.to_vec();
            expected.sort_unstable_by_key(|b| b.0);
            assert_eq!(frozen.sorted().collect::<Vec<_>>(), expected);
            // The shard binds more meanwhile, and finds old and new.
            for &((user, method), channel) in during {
                assert_eq!(methods.get(user, method), None);
                methods.insert(user, method, channel);
            }
            for &((user, method), channel) in &all {
                assert_eq!(methods.get(user, method), Some(channel), "compact {compact}");
            }
            assert_eq!(methods.len(), all.len());
            let compacted = compact.then(|| frozen.compacted());
            drop(frozen);
            let replaced = methods.thaw(compacted);
            assert_eq!(replaced.is_some(), compact);
            assert_eq!(methods.len(), all.len());
            let mut sorted = all.clone();
            sorted.sort_unstable_by_key(|b| b.0);
            assert_eq!(methods.sorted().collect::<Vec<_>>(), sorted, "compact {compact}");
            for &((user, method), channel) in &all {
                assert_eq!(methods.get(user, method), Some(channel), "compact {compact}");
            }
            // Compacted: the frozen bindings are in the arrays, the later ones still added.
            let in_arrays = if compact { before.len() } else { loaded_part.len() };
            assert_eq!(methods.loaded.keys.len(), in_arrays);
            assert_eq!(methods.added.len, all.len() - in_arrays);
            methods.freeze();
        }
    }

    #[test]
    fn lookups_find_exactly_the_loaded_bindings_however_the_users_spread() {
        type Spread = (&'static str, fn(u64) -> u64);
        let spreads: [Spread; 5] = [
            ("sequential", |i| 1 + i),
            ("offset and gapped", |i| 1_000_000_000_000 + 7 * i),
            ("spread over all ids", |i| i.wrapping_mul(0x9E37_79B9_7F4A_7C15)),
            ("bunched at both ends", |i| if i % 2 == 0 { i } else { u64::MAX - i }),
            ("one user", |_| 42),
        ];
        for (name, user_of) in spreads {
            for n in [1u64, 2, 15, 16, 17, 1_000, 100_000] {
                let mut sorted: Vec<(MethodKey, Channel)> = (0..n)
                    .map(|i| ((user_of(i), if name == "one user" { i } else { i % 3 }), Channel::ALL[i as usize % 4]))
                    .collect();
                sorted.sort_unstable_by_key(|b| b.0);
                sorted.dedup_by_key(|b| b.0);
                let methods = loaded(&sorted);
                if !name.starts_with("bunched") && name != "one user" {
                    // Evenly spread ids: every range holds a few keys (at most 4x the average
                    // aimed at, as the ranges are a power of two of ids).
                    let longest = methods.loaded.directory.starts.windows(2).map(|w| w[1] - w[0]).max();
                    assert!(longest <= Some(4 * KEYS_PER_RANGE), "{name}, {n}: {longest:?}");
                }
                for (i, &((user, method), channel)) in sorted.iter().enumerate() {
                    assert_eq!(methods.get(user, method), Some(channel), "{name}, {n}: {user} {method}");
                    // Just before and after, in key order, and other users.
                    for other in [
                        (user, method.wrapping_sub(1)),
                        (user, method.wrapping_add(1)),
                        (user.wrapping_sub(1), method),
                        (user.wrapping_add(1), 0),
                    ] {
                        let expected = sorted.binary_search_by_key(&other, |b| b.0).ok().map(|j| sorted[j].1);
                        assert_eq!(methods.get(other.0, other.1), expected, "{name}, {n}: {other:?} near {i}");
                    }
                }
                for user in
                    [0, 1, u64::MAX, sorted[0].0 .0.wrapping_sub(1), sorted[sorted.len() - 1].0 .0.wrapping_add(1)]
                {
                    let expected = sorted.binary_search_by_key(&(user, 0), |b| b.0).ok().map(|j| sorted[j].1);
                    assert_eq!(methods.get(user, 0), expected, "{name}, {n}: user {user}");
                }
            }
        }
    }

    #[test]
    fn the_loader_takes_only_ascending_bindings() {
        let mut loader = MethodsLoader::with_capacity(2);
        assert_eq!(loader.push(5, 2, Channel::Alipay), Ok(()));
        assert_eq!(loader.push(5, 2, Channel::Alipay), Err(NotAscending), "a duplicate");
        assert_eq!(loader.push(5, 1, Channel::Alipay), Err(NotAscending));
        assert_eq!(loader.push(4, 9, Channel::Alipay), Err(NotAscending));
        assert_eq!(loader.push(5, 3, Channel::Wechat), Ok(()));
        assert_eq!(loader.push(6, 0, Channel::BankCard), Ok(()), "more than the capacity given");
        let methods = loader.finish();
        assert_eq!(
            methods.sorted().collect::<Vec<_>>(),
            [((5, 2), Channel::Alipay), ((5, 3), Channel::Wechat), ((6, 0), Channel::BankCard)]
        );
    }

    #[test]
    fn radix_sort_orders_like_a_comparison_sort() {
        for (n, seed) in [(0, 1), (1, 2), (1_000, 3), (100_000, 4)] {
            let mut rng = SplitMix64(seed);
            let mut items: Vec<(u64, u64)> = (0..n)
                .map(|_| {
                    let (high, shift) = (rng.next_u64(), rng.below(64));
                    (high >> shift, rng.next_u64() & 0xff_ffff)
                })
                .collect();
            let mut expected = items.clone();
            expected.sort();
            radix_sort(&mut items, |&(a, b)| u128::from(a) << 64 | u128::from(b));
            assert_eq!(items, expected);
        }
    }
}
