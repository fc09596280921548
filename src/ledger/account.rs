//! Account state as the shard's writer holds it, and the per-account history ring.

use crate::ledger::command::{flags, AccountKind};

/// One account (or one shard's stripe of a striped account). 56 bytes of fields, aligned to a
/// 64-byte cache line: a tip then loads one line of its payer's account, not two (at 56 bytes
/// three accounts in four straddled a line boundary). The 8 bytes of padding bought about 5 %
/// of a tip (docs/benchmarks.md, session 10). The published balance and the index entry add
/// 8 + ~24 bytes (see `index`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(align(64))]
pub struct Account {
    pub id: u64,
    /// Credits minus debits, in the account's unit. Never negative for users and earnings.
    pub balance: i64,
    /// Streamers: the union they belong to (0 = none).
    pub union: u64,
    /// Users: coins spent on `spent_day`.
    pub spent_today: u64,
    /// Users: their own daily cap in coins (0 = the platform default).
    pub daily_cap: u64,
    /// 1 + the history sequence number of this account's newest entry (0 = none).
    pub history_head: u64,
    /// Users: the business day `spent_today` belongs to.
    pub spent_day: u32,
    pub kind: AccountKind,
    pub flags: u8,
    /// Users: bound payment methods.
    pub methods: u8,
}

const _: () = assert!(core::mem::size_of::<Account>() == 64);
const _: () = assert!(core::mem::size_of::<HistoryEntry>() == 64);

impl Account {
    pub fn new(id: u64, kind: AccountKind, flags: u8, union: u64) -> Account {
        Account {
            id,
            balance: 0,
            union,
            spent_today: 0,
            daily_cap: 0,
            history_head: 0,
            spent_day: 0,
            kind,
            flags,
            methods: 0,
        }
    }

    pub const fn is_frozen(&self) -> bool {
        self.flags & flags::FROZEN != 0
    }
}

/// One entry of an account's history. Entries of one account are chained newest to oldest
/// through `prev`; the chain ends where the ring has overwritten older entries.
///
/// 64 bytes, aligned to a cache line: a push writes one line, not parts of two.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(align(64))]
pub struct HistoryEntry {
    /// 1 + sequence number of the previous entry of the same account (0 = none).
    pub prev: u64,
    pub timestamp: u64,
    pub id: u64,
    pub counterparty: u64,
    pub amount: i64,
    pub balance_after: i64,
    pub detail: u64,
    pub status: u16,
    pub kind: u8,
}

/// The records of a ring (`HistoryRing`, `ShardState::id_ring`) as they were when a snapshot
/// began, kept while the shard goes on: the ring's sequence numbers `next..end` are still to be
/// encoded, and those the ring evicted meanwhile wait in `saved` (oldest first, from `next`).
/// The snapshot's encoder takes them in order (`HistoryRing::next_pinned`,
/// `ShardState::next_pinned_id`), a budget at a time between batches.
#[derive(Debug)]
pub struct RingPin<T> {
    pub next: u64,
    pub end: u64,
    pub saved: std::collections::VecDeque<T>,
    /// Records changed in place before the encoder took them, as they were: (sequence number,
    /// record). Rare: only a settlement's record changes, once (`ShardState::apply`'s
    /// `SettleTotal`); the other rings' records never do.
    before: Vec<(u64, T)>,
}

impl<T: Copy> RingPin<T> {
    pub fn new(next: u64, end: u64) -> RingPin<T> {
        RingPin { next, end, saved: std::collections::VecDeque::new(), before: Vec::new() }
    }

    /// Keeps `record`, which the ring is about to evict, if the encoder has not taken it yet
    /// (as it was pinned, if it changed since). Out of line: only a pinned ring calls it, and
    /// the ring's push stays small.
    #[inline(never)]
    pub fn evicting(&mut self, seq: u64, record: &T) {
        if seq >= self.next && seq < self.end {
            debug_assert_eq!(seq, self.next + self.saved.len() as u64, "rings evict in order");
            let record = self.take_before(seq).unwrap_or(*record);
            self.saved.push_back(record);
        }
    }

    /// Keeps `record`, which is about to change in place, as it is now, if the encoder has not
    /// taken it yet (the first change only: that is the pinned one).
    #[inline(never)]
    pub fn changing(&mut self, seq: u64, record: &T) {
        if seq >= self.next && seq < self.end && !self.before.iter().any(|(s, _)| *s == seq) {
            self.before.push((seq, *record));
        }
    }

    /// Keeps every pinned record the encoder has yet to take (`at(sequence number)` reads it
    /// from the ring), before the ring is rearranged in a way `evicting` cannot follow
    /// (`ShardState::drop_ended_deadlines`). The encoder then reads none of them from the ring.
    #[inline(never)]
    pub fn keep_rest(&mut self, at: impl Fn(u64) -> T) {
        for seq in self.next + self.saved.len() as u64..self.end {
            self.evicting(seq, &at(seq));
        }
    }

    fn take_before(&mut self, seq: u64) -> Option<T> {
        let i = self.before.iter().position(|(s, _)| *s == seq)?;
        Some(self.before.swap_remove(i).1)
    }

    /// The next pinned record, oldest first: kept aside if evicted or changed, else
    /// `at(sequence number)` from the ring, where it still is. `None` when all were taken.
    #[inline]
    pub fn take(&mut self, at: impl FnOnce(u64) -> T) -> Option<T> {
        if self.next == self.end {
            return None;
        }
        let record = match self.saved.pop_front() {
            Some(record) => record,
            None if self.before.is_empty() => at(self.next),
            None => self.take_before(self.next).unwrap_or_else(|| at(self.next)),
        };
        self.next += 1;
        Some(record)
    }

    /// Checks that every pinned record was taken (the pin is then dropped).
    pub fn finish(&self, what: &str) {
        assert!(
            self.next == self.end && self.saved.is_empty() && self.before.is_empty(),
            "a pinned {what} was not taken"
        );
    }
}

/// The accounts as they were when a snapshot began (see `RingPin`): slots `next..end` are still
/// to be encoded, and an account changed meanwhile, before the encoder reached it, is kept as it
/// was (`keep`, before every change while pinned) until the encoder takes it (`take`).
#[derive(Debug)]
pub struct AccountsPin {
    pub next: u32,
    pub end: u32,
    /// One bit per pinned slot: kept in `saved`.
    kept: Vec<u64>,
    /// Looked up by slot, never iterated.
    saved: crate::ledger::state_machine::IdMap<u64, Account>,
}

impl AccountsPin {
    pub fn new(end: u32) -> AccountsPin {
        AccountsPin { next: 0, end, kept: vec![0; (end as usize).div_ceil(64)], saved: Default::default() }
    }

    /// Keeps `account` (at `slot`, about to change) if the encoder has yet to take it and it is
    /// not kept already.
    #[inline(never)]
    pub fn keep(&mut self, slot: u32, account: &Account) {
        if slot >= self.next && slot < self.end {
            let (word, bit) = ((slot / 64) as usize, 1u64 << (slot % 64));
            if self.kept[word] & bit == 0 {
                self.kept[word] |= bit;
                self.saved.insert(slot as u64, *account);
            }
        }
    }

    /// The account at `slot` (the encoder's next) as it was when pinned: kept, or `current`.
    pub fn take(&mut self, slot: u32, current: &Account) -> Account {
        let (word, bit) = ((slot / 64) as usize, 1u64 << (slot % 64));
        if self.kept[word] & bit != 0 {
            self.saved.remove(&(slot as u64)).expect("a kept account is saved")
        } else {
            *current
        }
    }

    /// Accounts kept and not taken yet.
    pub fn saved(&self) -> usize {
        self.saved.len()
    }
}

/// A fixed-capacity ring of history entries with per-account back links.
pub struct HistoryRing {
    /// Set while a snapshot encodes the ring (`pin`).
    pin: Option<Box<RingPin<HistoryEntry>>>,
    entries: Vec<HistoryEntry>,
    capacity: u64,
    /// Where the next entry goes: `next % capacity`, kept so that a push divides nothing.
    slot: usize,
    /// Sequence number of the next entry (entries ever appended).
    next: u64,
    /// Oldest sequence number held (after a restore into a ring of another size).
    oldest: u64,
}

impl HistoryRing {
    pub fn new(capacity: u32) -> HistoryRing {
        let entries = crate::mem::huge_vec(capacity as usize);
        HistoryRing { pin: None, entries, capacity: capacity as u64, slot: 0, next: 0, oldest: 0 }
    }

    /// Keeps the retained entries as they are now for a snapshot's encoder (`next_pinned`),
    /// whatever is pushed meanwhile.
    pub fn pin(&mut self) {
        self.pin = Some(Box::new(RingPin::new(self.first_retained(), self.next)));
    }

    /// The next entry of the pinned ones, oldest first (`None` when all were taken).
    pub fn next_pinned(&mut self) -> Option<HistoryEntry> {
        let (entries, capacity) = (&self.entries, self.capacity);
        self.pin.as_mut().expect("the history ring is pinned").take(|seq| entries[(seq % capacity) as usize])
    }

    /// Entries kept aside for the encoder (evicted before it took them).
    pub fn pinned_saved(&self) -> usize {
        self.pin.as_ref().map_or(0, |pin| pin.saved.len())
    }

    /// Ends `pin` (every pinned entry was taken).
    pub fn unpin(&mut self) {
        self.pin.take().expect("the history ring is pinned").finish("history entry");
    }

    /// The sequence number of the oldest retained entry.
    fn first_retained(&self) -> u64 {
        self.next.saturating_sub(self.capacity.min(self.entries.len() as u64)).max(self.oldest)
    }

    /// Appends `entry` for `account`, linking it to the account's previous entry.
    ///
    /// Inlined, so the entry's fields are stored straight into the ring: built in the caller's
    /// frame and copied, the copy's 16-byte loads wait for the 8-byte stores of the fields
    /// (a failed store-to-load forward), which was half of this function's time.
    #[inline(always)]
    pub fn push(&mut self, account: &mut Account, mut entry: HistoryEntry) {
        entry.prev = account.history_head;
        let seq = self.next;
        if self.slot < self.entries.len() {
            if let Some(pin) = &mut self.pin {
                // The entry overwritten here has sequence number `seq - capacity` (or is an empty
                // slot of a restored ring, older than anything pinned).
                pin.evicting(seq.wrapping_sub(self.capacity), &self.entries[self.slot]);
            }
            self.entries[self.slot] = entry;
        } else {
            self.entries.push(entry);
        }
        self.slot += 1;
        if self.slot as u64 == self.capacity {
            self.slot = 0;
        }
        self.next += 1;
        account.history_head = seq + 1;
    }

    /// The entry with sequence number `link - 1`, if still retained.
    pub fn get(&self, link: u64) -> Option<&HistoryEntry> {
        if link == 0 {
            return None;
        }
        let seq = link - 1;
        if seq >= self.next || seq < self.oldest || self.next - seq > self.capacity {
            return None;
        }
        self.entries.get((seq % self.capacity) as usize)
    }

    /// Entries ever appended.
    pub fn appended(&self) -> u64 {
        self.next
    }

    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// Retained entries in sequence order, oldest first (for snapshots).
    pub fn retained(&self) -> impl Iterator<Item = (u64, &HistoryEntry)> {
        (self.first_retained()..self.next).map(move |seq| (seq, &self.entries[(seq % self.capacity) as usize]))
    }

    /// Rebuilds a ring from retained entries (oldest first, the last one has sequence number
    /// `next - 1`) during snapshot load, possibly into a ring of another capacity.
    pub fn restore(capacity: u32, next: u64, mut retained: Vec<HistoryEntry>) -> HistoryRing {
        let capacity = capacity as u64;
        if retained.len() as u64 > capacity {
            retained.drain(..retained.len() - capacity as usize);
        }
        let start = next - retained.len() as u64;
        if start == 0 {
            let slot = (next % capacity) as usize;
            return HistoryRing { pin: None, entries: retained, capacity, slot, next, oldest: 0 };
        }
        let mut slots = vec![HistoryEntry::default(); capacity as usize];
        for (i, e) in retained.into_iter().enumerate() {
            slots[((start + i as u64) % capacity) as usize] = e;
        }
        HistoryRing { pin: None, entries: slots, capacity, slot: (next % capacity) as usize, next, oldest: start }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Pushes entries whose id is their sequence number.
    fn push_n(ring: &mut HistoryRing, account: &mut Account, n: u64) {
        for _ in 0..n {
            let id = ring.appended();
            ring.push(account, HistoryEntry { id, ..HistoryEntry::default() });
        }
    }

    /// Every entry the ring should still hold is there, under its sequence number, and
    /// nothing older is.
    fn check(ring: &HistoryRing, oldest: u64) {
        let next = ring.appended();
        let first = next.saturating_sub(ring.capacity()).max(oldest);
        for seq in 0..next {
            let got = ring.get(seq + 1).map(|e| e.id);
            assert_eq!(got, (seq >= first).then_some(seq), "seq {seq} of {next}, capacity {}", ring.capacity());
        }
        assert_eq!(
            ring.retained().map(|(seq, e)| (seq, e.id)).collect::<Vec<_>>(),
            (first..next).map(|s| (s, s)).collect::<Vec<_>>()
        );
    }

    #[test]
    fn the_ring_wraps_and_restores_into_any_capacity() {
        let mut account = Account::new(1, AccountKind::User, 0, 0);
        for pushed in [0, 3, 5, 6, 11, 17] {
            let mut ring = HistoryRing::new(5);
            push_n(&mut ring, &mut account, pushed);
            check(&ring, 0);
            for capacity in [3, 5, 8] {
                let retained: Vec<HistoryEntry> = ring.retained().map(|(_, e)| *e).collect();
                let mut restored = HistoryRing::restore(capacity, ring.appended(), retained);
                let oldest = ring.appended().saturating_sub(5.min(capacity as u64));
                check(&restored, oldest);
                push_n(&mut restored, &mut account, 9);
                check(&restored, oldest);
            }
        }
    }
}
