//! The id directory: which shard owns each transfer id (tips, gifts, top-ups, settlements).
//!
//! A command runs on its payer's shard, but its id must be unique across all shards, and a
//! top-up callback names only the top-up id. The directory is claimed at ingest, before a
//! command is queued: a new id is claimed for the payer's shard; a retried id is routed to the
//! shard that owns it, whose idempotency table then answers with the original result or
//! `exists_with_different_fields`. A copy routed so that finds its shard not knowing the id
//! runs only after the copy holding the claim, which passes to it (`worker::take_claim`); with
//! no holder ahead of it (refused meanwhile, or the id forgotten) it is answered `busy`, and
//! its retry claims the id anew. So no id is applied on two shards (but for a settlement's
//! parts, which share its id by design). The directory is derived state: rebuilt from the
//! shards' idempotency tables at recovery, and ids leave it when they leave their shard's
//! idempotency window, or when their command was refused with a retryable status and so never
//! remembered (`worker::keep_directory_true`).

use parking_lot::Mutex;

use crate::ledger::id_table::{IdTable, Lookup};
use crate::ledger::index::prefetch;

const STRIPES: usize = 256;
/// How many claims ahead `claim_many` prefetches buckets.
const PREFETCH_AHEAD: usize = 8;

/// See the module docs.
pub struct IdDirectory {
    stripes: Box<[Mutex<IdTable>]>,
    /// Each stripe's bucket array (base, mask), fixed for the directory's life: prefetching
    /// needs no lock.
    layouts: Box<[(usize, usize)]>,
}

/// The outcome of a claim.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Claim {
    /// The id was free and now belongs to the requested shard.
    New,
    /// The id already belongs to this shard.
    Existing(u16),
    /// The directory holds as many ids as it was sized for: answer `busy`.
    Full,
}

impl Default for IdDirectory {
    fn default() -> Self {
        IdDirectory::with_capacity(0)
    }
}

#[inline]
fn stripe_of(id: u64) -> usize {
    // The top bits of the keyed hash (a stripe's table places ids by lower ones): a client
    // cannot choose ids that all land in one stripe and fill it.
    (crate::ledger::hash::hash(id) >> 56) as usize
}

impl IdDirectory {
    /// A directory sized for `ids` live ids (every stripe gets its share plus a margin for
    /// the hash spread; a stripe that fills up answers `Full`).
    pub fn with_capacity(ids: usize) -> IdDirectory {
        let per_stripe = ids.div_ceil(STRIPES) * 5 / 4 + 64;
        // No stripe is large enough for a huge page of its own, but together they are: one
        // mapping for all (256 MiB at the default limits of two shards, touched at random by
        // every command).
        let tables = IdTable::new_parts(STRIPES, per_stripe).unwrap_or_else(|error| {
            crate::log_line!(
                "id directory: no mapping for its {STRIPES} stripes ({error}); allocating them one by one"
            );
            (0..STRIPES).map(|_| IdTable::new(per_stripe)).collect()
        });
        let stripes: Box<[Mutex<IdTable>]> = tables.into_iter().map(Mutex::new).collect();
        let layouts = stripes.iter().map(|s| s.lock().layout()).collect();
        IdDirectory { stripes, layouts }
    }

    #[inline]
    fn stripe(&self, id: u64) -> &Mutex<IdTable> {
        &self.stripes[stripe_of(id)]
    }

    #[inline]
    fn prefetch(&self, id: u64) {
        prefetch(IdTable::bucket_address_in(self.layouts[stripe_of(id)], id));
    }

    /// `prefetch` plus the next cache line: a release shifts the rest of the id's probe run
    /// back, and at load 0.5 that run often crosses a line (as `IdTable::prefetch_run`).
    #[inline]
    fn prefetch_run(&self, id: u64) {
        let bucket = IdTable::bucket_address_in(self.layouts[stripe_of(id)], id);
        prefetch(bucket);
        prefetch(bucket.wrapping_add(64));
    }

    /// Claims many ids at once, locking each stripe once: `requests[i] = (id, shard)`, and
    /// `out[i]` receives its claim. Equivalent to calling `claim` for each in order.
    pub fn claim_many(&self, requests: &[(u64, u16)], out: &mut Vec<Claim>) {
        out.clear();
        out.resize(requests.len(), Claim::New);
        // Stable: two requests for one id keep their order, so the first one claims it.
        let (order, bounds) = by_stripe(requests.len(), |i| requests[i].0);
        for &i in order.iter().take(PREFETCH_AHEAD) {
            self.prefetch(requests[i as usize].0);
        }
        for (stripe, range) in stripe_ranges(&bounds) {
            let mut table = self.stripes[stripe].lock();
            for k in range {
                if let Some(&ahead) = order.get(k + PREFETCH_AHEAD) {
                    self.prefetch(requests[ahead as usize].0);
                }
                let i = order[k] as usize;
                let (id, shard) = requests[i];
                out[i] = claim_in(&mut table, id, shard);
            }
        }
    }

    /// Forgets many ids owned by `shard` (evicted from its idempotency window).
    pub fn release_many(&self, ids: &[u64], shard: u16) {
        let (order, bounds) = by_stripe(ids.len(), |i| ids[i]);
        for &i in order.iter().take(PREFETCH_AHEAD) {
            self.prefetch_run(ids[i as usize]);
        }
        for (stripe, range) in stripe_ranges(&bounds) {
            let mut table = self.stripes[stripe].lock();
            for k in range {
                if let Some(&ahead) = order.get(k + PREFETCH_AHEAD) {
                    self.prefetch_run(ids[ahead as usize]);
                }
                table.remove_if(ids[order[k] as usize], shard as u64);
            }
        }
    }

    /// Claims `id` for `shard` unless some shard owns it already.
    pub fn claim(&self, id: u64, shard: u16) -> Claim {
        claim_in(&mut self.stripe(id).lock(), id, shard)
    }

    /// Claims `id` for `shard` after its command was applied and remembered without holding
    /// the claim (it passed it to a later copy: `worker::keep_directory_true`; the claim is
    /// normally still the shard's and this finds it). Unlike `claim`, it may fill a stripe
    /// past the bound where new claims stop (to three quarters of its buckets instead of half):
    /// the id is taken already, in the shard's window, and left unowned its top-up callbacks
    /// would answer `not_found` and another shard could accept it again. `Full` only past that,
    /// which takes a stripe's whole margin of re-claims at once.
    pub fn reclaim(&self, id: u64, shard: u16) -> Claim {
        claim_of(self.stripe(id).lock().get_or_insert_over(id, shard as u64))
    }

    /// The shard owning `id`.
    pub fn owner(&self, id: u64) -> Option<u16> {
        self.stripe(id).lock().get(id).map(|s| s as u16)
    }

    /// Forgets `id` (a claim refused before it was queued, or an id evicted by its shard).
    pub fn release(&self, id: u64, shard: u16) {
        self.stripe(id).lock().remove_if(id, shard as u64);
    }

    /// Records that `shard` owns `id` (recovery). Like `reclaim`, it may fill a stripe past the
    /// bound of new claims: the shards may have held that many ids through re-claims. False if
    /// the stripe is full even past that.
    pub fn insert(&self, id: u64, shard: u16) -> bool {
        let mut table = self.stripe(id).lock();
        match table.get_or_insert_over(id, shard as u64) {
            Lookup::Full => false,
            Lookup::Inserted => true,
            Lookup::Present(_) => {
                table.insert(id, shard as u64);
                true
            }
        }
    }

    /// Ids currently known.
    pub fn len(&self) -> usize {
        self.stripes.iter().map(|s| s.lock().len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The positions `0..n` ordered by the stripe of `id_at(position)`, stably (a counting sort:
/// two passes, where a comparison sort of a batch cost more than the claims' own bookkeeping),
/// and where each stripe's run starts: stripe `s` holds `order[bounds[s]..bounds[s + 1]]`.
fn by_stripe(n: usize, id_at: impl Fn(usize) -> u64) -> (Vec<u32>, Box<[u32; STRIPES + 1]>) {
    let stripes: Vec<u8> = (0..n).map(|i| stripe_of(id_at(i)) as u8).collect();
    let mut bounds = Box::new([0u32; STRIPES + 1]);
    for &s in &stripes {
        bounds[s as usize + 1] += 1;
    }
    for s in 0..STRIPES {
        bounds[s + 1] += bounds[s];
    }
    let mut next = bounds.clone();
    let mut order = vec![0u32; n];
    for (i, &s) in stripes.iter().enumerate() {
        order[next[s as usize] as usize] = i as u32;
        next[s as usize] += 1;
    }
    (order, bounds)
}

/// The stripes that have positions in `bounds` (from `by_stripe`), with their ranges of `order`.
fn stripe_ranges(bounds: &[u32; STRIPES + 1]) -> impl Iterator<Item = (usize, std::ops::Range<usize>)> + '_ {
    (0..STRIPES).map(|s| (s, bounds[s] as usize..bounds[s + 1] as usize)).filter(|(_, r)| !r.is_empty())
}

fn claim_in(table: &mut IdTable, id: u64, shard: u16) -> Claim {
    claim_of(table.get_or_insert(id, shard as u64))
}

/// A table lookup-or-insert of an id with its shard, as a claim.
fn claim_of(lookup: Lookup) -> Claim {
    match lookup {
        Lookup::Present(owner) => Claim::Existing(owner as u16),
        Lookup::Inserted => Claim::New,
        Lookup::Full => Claim::Full,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_chosen_to_share_a_stripe_under_a_fixed_hash_spread_over_all() {
        // 66 000 such ids filled four stripes before the hash was keyed, and every other id
        // homed there answered `busy`.
        let ids = crate::ledger::id_table::tests::colliding_under_a_fixed_hash(66_000);
        let directory = IdDirectory::with_capacity(1 << 20);
        let mut out = Vec::new();
        let requests: Vec<(u64, u16)> = ids.iter().map(|&id| (id, 0)).collect();
        directory.claim_many(&requests, &mut out);
        assert!(out.iter().all(|c| *c == Claim::New), "no stripe filled up");
        let mut per_stripe = [0u32; STRIPES];
        for &id in &ids {
            per_stripe[stripe_of(id)] += 1;
        }
        let fair = (ids.len() / STRIPES) as u32;
        assert!(per_stripe.iter().all(|&n| n < 2 * fair), "{per_stripe:?}");
    }

    #[test]
    fn claims_route_retries_and_refuse_when_full() {
        let directory = IdDirectory::with_capacity(0);
        let mut out = Vec::new();
        directory.claim_many(&[(7, 1), (8, 0), (7, 0)], &mut out);
        assert_eq!(out, vec![Claim::New, Claim::New, Claim::Existing(1)], "the first claim of an id wins");
        assert_eq!(directory.owner(7), Some(1));
        directory.release_many(&[7, 8], 0);
        assert_eq!(directory.owner(7), Some(1), "only the owner releases");
        assert_eq!(directory.owner(8), None);
        // Fill one stripe: it answers Full rather than grow without bound.
        let same_stripe: Vec<u64> = (1..).filter(|&id| stripe_of(id) == stripe_of(7)).take(1000).collect();
        let claims: Vec<Claim> = same_stripe.iter().map(|&id| directory.claim(id, 0)).collect();
        assert!(claims.contains(&Claim::Full));
        assert!(claims.iter().take_while(|c| **c != Claim::Full).all(|c| matches!(c, Claim::New | Claim::Existing(_))));
        // A re-claim (an id applied and remembered after its claim was released) still gets
        // the id, past the bound where new claims stop; and it never takes another's id.
        let refused = same_stripe[claims.iter().position(|c| *c == Claim::Full).unwrap()];
        assert_eq!(directory.claim(refused, 1), Claim::Full);
        assert_eq!(directory.reclaim(refused, 1), Claim::New);
        assert_eq!(directory.owner(refused), Some(1));
        // As may recovery's rebuild, which must hold whatever the shards held.
        let rebuilt = *same_stripe.last().unwrap();
        assert!(directory.insert(rebuilt, 0));
        assert_eq!(directory.owner(rebuilt), Some(0));
        let taken = same_stripe[claims.iter().position(|c| *c == Claim::New).unwrap()];
        assert_eq!(directory.reclaim(taken, 1), Claim::Existing(0));
        assert_eq!(directory.owner(taken), Some(0));
        // Its margin is bounded too: a quarter more of the stripe's buckets, then Full.
        let extra: Vec<Claim> = same_stripe.iter().map(|&id| directory.reclaim(id, 1)).collect();
        let held = directory.len();
        assert!(extra.contains(&Claim::Full), "{held}");
        directory.release_many(&same_stripe, 1);
        directory.release_many(&same_stripe, 0);
        assert_eq!(directory.len(), 0);
    }

    #[test]
    fn batches_are_ordered_by_stripe_stably() {
        // Repeated ids and more ids than stripes, so runs are long and ties many.
        let ids: Vec<u64> = (0..5_000u64).map(|i| 1 + (i * 7919) % 1_500).collect();
        let (order, bounds) = by_stripe(ids.len(), |i| ids[i]);
        let mut expected: Vec<u32> = (0..ids.len() as u32).collect();
        expected.sort_by_key(|&i| stripe_of(ids[i as usize]));
        assert_eq!(order, expected);
        for (stripe, range) in stripe_ranges(&bounds) {
            assert!(order[range].iter().all(|&i| stripe_of(ids[i as usize]) == stripe));
        }
        assert_eq!(stripe_ranges(&bounds).map(|(_, r)| r.len()).sum::<usize>(), ids.len());
        assert_eq!(by_stripe(0, |_| 0).0, Vec::<u32>::new());
    }
}
