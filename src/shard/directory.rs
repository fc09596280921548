//! The id directory: which shard owns each transfer id (tips, gifts, top-ups, settlements).
//!
//! A command runs on its payer's shard, but its id must be unique across all shards, and a
//! top-up callback names only the top-up id. The directory is claimed at ingest, before a
//! command is queued: a new id is claimed for the payer's shard; a retried id is routed to the
//! shard that owns it, whose idempotency table then answers with the original result or
//! `exists_with_different_fields`. It is derived state: rebuilt from the shards' idempotency
//! tables at recovery, and ids leave it when they leave their shard's idempotency window.

use parking_lot::Mutex;

use crate::ledger::state_machine::IdMap;

const STRIPES: usize = 256;

/// See the module docs.
pub struct IdDirectory {
    stripes: Box<[Mutex<IdMap<u64, u16>>]>,
}

/// The outcome of a claim.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Claim {
    /// The id was free and now belongs to the requested shard.
    New,
    /// The id already belongs to this shard.
    Existing(u16),
}

impl Default for IdDirectory {
    fn default() -> Self {
        IdDirectory::with_capacity(0)
    }
}

#[inline]
fn stripe_of(id: u64) -> usize {
    (id.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 56) as usize
}

impl IdDirectory {
    /// A directory sized for `ids` live ids (it never needs to grow while they fit).
    pub fn with_capacity(ids: usize) -> IdDirectory {
        let per_stripe = ids.div_ceil(STRIPES);
        let stripes =
            (0..STRIPES).map(|_| Mutex::new(IdMap::with_capacity_and_hasher(per_stripe, Default::default()))).collect();
        IdDirectory { stripes }
    }

    #[inline]
    fn stripe(&self, id: u64) -> &Mutex<IdMap<u64, u16>> {
        &self.stripes[stripe_of(id)]
    }

    /// Claims many ids at once, locking each stripe once: `requests[i] = (id, shard)`, and
    /// `out[i]` receives its claim. Equivalent to calling `claim` for each in order.
    pub fn claim_many(&self, requests: &[(u64, u16)], out: &mut Vec<Claim>) {
        out.clear();
        out.resize(requests.len(), Claim::New);
        let mut order: Vec<u32> = (0..requests.len() as u32).collect();
        // Stable: two requests for one id keep their order, so the first one claims it.
        order.sort_by_key(|&i| stripe_of(requests[i as usize].0));
        let mut i = 0;
        while i < order.len() {
            let stripe = stripe_of(requests[order[i] as usize].0);
            let mut map = self.stripes[stripe].lock();
            while i < order.len() && stripe_of(requests[order[i] as usize].0) == stripe {
                let (id, shard) = requests[order[i] as usize];
                // One probe: find the id's bucket once, insert there if it is free.
                out[order[i] as usize] = match map.entry(id) {
                    std::collections::hash_map::Entry::Occupied(owner) => Claim::Existing(*owner.get()),
                    std::collections::hash_map::Entry::Vacant(slot) => {
                        slot.insert(shard);
                        Claim::New
                    }
                };
                i += 1;
            }
        }
    }

    /// Forgets many ids owned by `shard` (evicted from its idempotency window).
    pub fn release_many(&self, ids: &mut [u64], shard: u16) {
        ids.sort_unstable_by_key(|&id| stripe_of(id));
        for chunk in ids.chunk_by(|a, b| stripe_of(*a) == stripe_of(*b)) {
            let mut map = self.stripes[stripe_of(chunk[0])].lock();
            for id in chunk {
                if let std::collections::hash_map::Entry::Occupied(owner) = map.entry(*id) {
                    if *owner.get() == shard {
                        owner.remove();
                    }
                }
            }
        }
    }

    /// Claims `id` for `shard` unless some shard owns it already.
    pub fn claim(&self, id: u64, shard: u16) -> Claim {
        let mut map = self.stripe(id).lock();
        match map.get(&id) {
            Some(&owner) => Claim::Existing(owner),
            None => {
                map.insert(id, shard);
                Claim::New
            }
        }
    }

    /// The shard owning `id`.
    pub fn owner(&self, id: u64) -> Option<u16> {
        self.stripe(id).lock().get(&id).copied()
    }

    /// Forgets `id` (a claim refused before it was queued, or an id evicted by its shard).
    pub fn release(&self, id: u64, shard: u16) {
        let mut map = self.stripe(id).lock();
        if map.get(&id) == Some(&shard) {
            map.remove(&id);
        }
    }

    /// Records that `shard` owns `id` (recovery).
    pub fn insert(&self, id: u64, shard: u16) {
        self.stripe(id).lock().insert(id, shard);
    }

    /// Ids currently known.
    pub fn len(&self) -> usize {
        self.stripes.iter().map(|s| s.lock().len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
