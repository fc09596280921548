//! The top-ups one shard holds (`ShardState::topups`): id -> `TopUp`, stored so that it never
//! regrows on the shard thread.
//!
//! A `std` hash map rehashes everything when it doubles: at 918 K entries of a top-up's size that
//! stalled the owning thread for 0.2-0.26 s (docs/benchmarks.md, session 7), and every command of
//! the shard waited. Here a top-up lives in a slot of a vector reserved at the shard's bound
//! (`ShardState::topups_bound`: every top-up's begin is in the idempotency window, or it is one of
//! the pending or kept ones outside it), so the vector never moves and its pages become resident
//! as it fills, like the rings. Freed slots are reused. An `IdTable` sized for the same bound maps
//! ids to slots; it is not advised for huge pages, so a shard with few top-ups keeps few of its
//! pages resident.
//!
//! Must never: let the slot order reach an output. Iteration is in slot order, which depends on
//! history; the snapshot sorts by id.
//!
//! A snapshot pins the store (`pin`) and encodes it a step at a time while the shard goes on:
//! before a pinned top-up first changes (`get_mut`, `insert` over it, `remove`), a copy of it
//! as it was is kept aside for the encoder (`pinned`).

use crate::ledger::id_table::{IdTable, Lookup};
use crate::ledger::state_machine::{IdMap, TopUp};

/// See the module docs.
pub struct TopUps {
    /// The id held in each slot; 0 marks a free slot (ids are never 0). Apart from the top-ups,
    /// so that a snapshot's `pin` reads 8 bytes a slot, not a line.
    ids: Vec<u64>,
    /// The top-up of each slot (as it was last held, in a free slot).
    slots: Vec<TopUp>,
    free: Vec<u32>,
    index: IdTable,
    /// Set while a snapshot encodes the top-ups (`pin`).
    pin: Option<Box<TopUpsPin>>,
}

/// The top-ups as they were when a snapshot began: a bit per slot still holding its top-up of
/// then, unchanged, and a copy of each other one, taken before its slot first changed.
struct TopUpsPin {
    unchanged: Vec<u64>,
    saved: IdMap<u64, TopUp>,
}

impl TopUps {
    /// An empty store reserved for `bound` top-ups. More still fit (the vector and the index then
    /// grow once), but the shard's own bounds keep it from happening.
    pub fn with_bound(bound: usize) -> TopUps {
        TopUps {
            ids: crate::mem::huge_vec(bound.max(1)),
            slots: crate::mem::huge_vec(bound.max(1)),
            free: Vec::new(),
            index: IdTable::new_unadvised(bound.max(1)),
            pin: None,
        }
    }

    /// Pins the store for a snapshot's encoder: returns `(id, slot)` of every top-up held now,
    /// in slot order, and from now on keeps each of them as it is for `pinned`, whatever
    /// changes, until `unpin`.
    pub fn pin(&mut self) -> Vec<(u64, u32)> {
        let mut unchanged = vec![0u64; self.ids.len().div_ceil(64)];
        let mut order = Vec::with_capacity(self.len());
        for (slot, &id) in self.ids.iter().enumerate() {
            if id != 0 {
                unchanged[slot / 64] |= 1 << (slot % 64);
                order.push((id, slot as u32));
            }
        }
        self.pin = Some(Box::new(TopUpsPin { unchanged, saved: IdMap::default() }));
        order
    }

    /// Top-up `id` as it was at `pin`, from the `slot` that `pin` gave for it.
    #[inline]
    pub fn pinned(&self, id: u64, slot: u32) -> &TopUp {
        let pin = self.pin.as_ref().expect("the top-ups are pinned");
        let slot = slot as usize;
        if pin.unchanged.get(slot / 64).is_some_and(|w| w & (1 << (slot % 64)) != 0) {
            debug_assert_eq!(self.ids[slot], id);
            &self.slots[slot]
        } else {
            pin.saved.get(&id).expect("a pinned top-up is kept before it changes")
        }
    }

    /// Ends `pin`.
    pub fn unpin(&mut self) {
        self.pin = None;
    }

    /// Top-ups kept aside for the pin so far.
    pub fn pinned_saved(&self) -> usize {
        self.pin.as_ref().map_or(0, |pin| pin.saved.len())
    }

    /// Before slot `slot` changes: keeps its pinned top-up aside, the first time.
    #[inline]
    fn keep(&mut self, slot: usize) {
        if let Some(pin) = &mut self.pin {
            keep_slot(pin, &self.ids, &self.slots, slot);
        }
    }

    pub fn len(&self) -> usize {
        self.index.len()
    }

    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    pub fn get(&self, id: &u64) -> Option<&TopUp> {
        self.index.get(*id).map(|slot| &self.slots[slot as usize])
    }

    pub fn get_mut(&mut self, id: &u64) -> Option<&mut TopUp> {
        let slot = self.index.get(*id)? as usize;
        self.keep(slot);
        Some(&mut self.slots[slot])
    }

    /// Holds `topup` under `id`, replacing the one held under it, if any.
    pub fn insert(&mut self, id: u64, topup: TopUp) {
        assert!(id != 0, "top-up ids are never 0");
        if self.index.is_full() && self.index.get(id).is_none() {
            // Beyond the bound (never with the shard's own bounds): one rebuild, twice as large.
            let mut bigger = IdTable::new_unadvised(self.index.len() * 2);
            for (slot, &held) in self.ids.iter().enumerate() {
                if held != 0 {
                    bigger.insert(held, slot as u64);
                }
            }
            self.index = bigger;
        }
        let slot = match self.free.last() {
            Some(&free) => free as u64,
            None => self.ids.len() as u64,
        };
        match self.index.get_or_insert(id, slot) {
            Lookup::Present(held) => {
                self.keep(held as usize);
                self.slots[held as usize] = topup;
            }
            Lookup::Inserted if slot as usize == self.ids.len() => {
                self.ids.push(id);
                self.slots.push(topup);
            }
            Lookup::Inserted => {
                self.free.pop();
                self.ids[slot as usize] = id;
                self.slots[slot as usize] = topup;
            }
            Lookup::Full => unreachable!("the index was made larger above"),
        }
    }

    /// Forgets `id`'s top-up and returns it.
    pub fn remove(&mut self, id: &u64) -> Option<TopUp> {
        let slot = self.index.get(*id)? as usize;
        self.keep(slot);
        self.index.remove(*id);
        self.ids[slot] = 0;
        self.free.push(slot as u32);
        Some(self.slots[slot])
    }

    /// Every held top-up, in slot order (not an output order: see the module docs).
    pub fn iter(&self) -> impl Iterator<Item = (&u64, &TopUp)> + Clone + '_ {
        self.ids.iter().zip(&self.slots).filter(|(id, _)| **id != 0)
    }

    pub fn values(&self) -> impl Iterator<Item = &TopUp> + Clone + '_ {
        self.iter().map(|(_, topup)| topup)
    }
}

/// `TopUps::keep` (a function of the fields, so that the pin and the slots borrow apart).
#[cold]
fn keep_slot(pin: &mut TopUpsPin, ids: &[u64], slots: &[TopUp], slot: usize) {
    let Some(word) = pin.unchanged.get_mut(slot / 64) else { return };
    let bit = 1 << (slot % 64);
    if *word & bit != 0 {
        *word &= !bit;
        pin.saved.insert(ids[slot], slots[slot]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ledger::state_machine::TopUpState;
    use crate::ledger::Channel;
    use std::collections::BTreeMap;

    fn topup(n: u64) -> TopUp {
        TopUp {
            user: n,
            method: Some(n),
            channel: Channel::Alipay,
            fen: n,
            coins: n,
            deadline: n,
            state: TopUpState::Pending,
            fail_reason: None,
            channel_txn: [0; crate::layout::TEXT_LEN],
            confirmed_fen: 0,
            confirm_reply: None,
            id_evicted: false,
        }
    }

    #[test]
    fn a_pin_keeps_every_top_up_as_it_was_whatever_changes() {
        let mut store = TopUps::with_bound(64);
        for id in 1..=10 {
            store.insert(id, topup(id));
        }
        // A slot already free at the pin.
        store.remove(&10);
        let order = store.pin();
        assert_eq!(order.iter().map(|e| e.0).collect::<Vec<_>>(), (1..=9).collect::<Vec<_>>());
        // Changed in place, replaced, removed, removed with the slot taken again; new ones.
        store.get_mut(&1).unwrap().fen = 1_000;
        store.insert(2, topup(2_000));
        store.remove(&3);
        store.remove(&4);
        for id in 11..=13 {
            store.insert(id, topup(id));
        }
        store.get_mut(&1).unwrap().fen = 1_001;
        let _ = store.get_mut(&5);
        for &(id, slot) in &order {
            assert_eq!(store.pinned(id, slot), &topup(id), "top-up {id}");
        }
        assert_eq!(store.pinned_saved(), 5, "each changed one kept once (a get_mut may change it)");
        store.unpin();
        assert_eq!(store.pinned_saved(), 0);
        assert_eq!((store.get(&1).unwrap().fen, store.get(&2).unwrap().fen, store.len()), (1_001, 2_000, 10));
        assert!(store.get(&3).is_none() && store.get(&4).is_none() && store.get(&13).is_some());
    }

    #[test]
    fn answers_as_a_map_and_never_moves_within_its_bound() {
        let bound = 500;
        let mut store = TopUps::with_bound(bound);
        let base = (store.ids.as_ptr(), store.slots.as_ptr());
        let mut model = BTreeMap::new();
        let mut x = 3u64;
        for step in 0..100_000u64 {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            let id = 1 + (x >> 33) % 2_000;
            if (x >> 20).is_multiple_of(3) || model.len() >= bound {
                assert_eq!(store.remove(&id).map(|t| t.user), model.remove(&id).map(|t: TopUp| t.user));
            } else {
                store.insert(id, topup(step));
                model.insert(id, topup(step));
            }
            if let Some(t) = store.get_mut(&id) {
                t.coins += 1;
                model.get_mut(&id).expect("held in both").coins += 1;
            }
            assert_eq!(store.len(), model.len());
            let probe = 1 + (x >> 13) % 2_000;
            assert_eq!(store.get(&probe).map(|t| (t.user, t.coins)), model.get(&probe).map(|t| (t.user, t.coins)));
        }
        assert_eq!((store.ids.as_ptr(), store.slots.as_ptr()), base, "reserved at the bound: the slots never moved");
        assert!(store.slots.len() <= bound && store.ids.len() == store.slots.len());
        let mut held: Vec<(u64, u64)> = store.iter().map(|(&id, t)| (id, t.coins)).collect();
        held.sort_unstable();
        assert_eq!(held, model.iter().map(|(&id, t)| (id, t.coins)).collect::<Vec<_>>());
        assert_eq!(store.values().count(), model.len());
        // Beyond the bound it still works (one rebuild), it just moves.
        for id in 10_000..10_000 + 2 * bound as u64 {
            store.insert(id, topup(id));
        }
        assert_eq!(store.len(), model.len() + 2 * bound);
        assert!((10_000..10_000 + 2 * bound as u64).all(|id| store.get(&id).map(|t| t.user) == Some(id)));
    }
}
