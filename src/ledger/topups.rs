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

use crate::ledger::id_table::{IdTable, Lookup};
use crate::ledger::state_machine::TopUp;

/// See the module docs.
pub struct TopUps {
    /// `(id, top-up)`; id 0 marks a free slot (ids are never 0).
    slots: Vec<(u64, TopUp)>,
    free: Vec<u32>,
    index: IdTable,
}

impl TopUps {
    /// An empty store reserved for `bound` top-ups. More still fit (the vector and the index then
    /// grow once), but the shard's own bounds keep it from happening.
    pub fn with_bound(bound: usize) -> TopUps {
        TopUps {
            slots: crate::mem::huge_vec(bound.max(1)),
            free: Vec::new(),
            index: IdTable::new_unadvised(bound.max(1)),
        }
    }

    pub fn len(&self) -> usize {
        self.index.len()
    }

    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    pub fn get(&self, id: &u64) -> Option<&TopUp> {
        self.index.get(*id).map(|slot| &self.slots[slot as usize].1)
    }

    pub fn get_mut(&mut self, id: &u64) -> Option<&mut TopUp> {
        self.index.get(*id).map(|slot| &mut self.slots[slot as usize].1)
    }

    /// Holds `topup` under `id`, replacing the one held under it, if any.
    pub fn insert(&mut self, id: u64, topup: TopUp) {
        assert!(id != 0, "top-up ids are never 0");
        if self.index.is_full() && self.index.get(id).is_none() {
            // Beyond the bound (never with the shard's own bounds): one rebuild, twice as large.
            let mut bigger = IdTable::new_unadvised(self.index.len() * 2);
            for (slot, &(held, _)) in self.slots.iter().enumerate() {
                if held != 0 {
                    bigger.insert(held, slot as u64);
                }
            }
            self.index = bigger;
        }
        let slot = match self.free.last() {
            Some(&free) => free as u64,
            None => self.slots.len() as u64,
        };
        match self.index.get_or_insert(id, slot) {
            Lookup::Present(held) => self.slots[held as usize].1 = topup,
            Lookup::Inserted if slot as usize == self.slots.len() => self.slots.push((id, topup)),
            Lookup::Inserted => {
                self.free.pop();
                self.slots[slot as usize] = (id, topup);
            }
            Lookup::Full => unreachable!("the index was made larger above"),
        }
    }

    /// Forgets `id`'s top-up and returns it.
    pub fn remove(&mut self, id: &u64) -> Option<TopUp> {
        let slot = self.index.get(*id)? as usize;
        self.index.remove(*id);
        self.slots[slot].0 = 0;
        self.free.push(slot as u32);
        Some(self.slots[slot].1)
    }

    /// Every held top-up, in slot order (not an output order: see the module docs).
    pub fn iter(&self) -> impl Iterator<Item = (&u64, &TopUp)> + Clone + '_ {
        self.slots.iter().filter(|(id, _)| *id != 0).map(|(id, topup)| (id, topup))
    }

    pub fn values(&self) -> impl Iterator<Item = &TopUp> + Clone + '_ {
        self.iter().map(|(_, topup)| topup)
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
    fn answers_as_a_map_and_never_moves_within_its_bound() {
        let bound = 500;
        let mut store = TopUps::with_bound(bound);
        let base = store.slots.as_ptr();
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
        assert_eq!(store.slots.as_ptr(), base, "reserved at the bound: the slots never moved");
        assert!(store.slots.len() <= bound);
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
