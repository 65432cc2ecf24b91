//! Generations: how an HTTP worker's cache of fresh answers learns, with no message and no lock,
//! that the owner of a key has learned of a change to it.
//!
//! One shared array of counters, a few thousand buckets, each id in one of them (a hash of the
//! id). An owner bumps the bucket of an id *while it handles* [`super::Invalidate`] for it, and
//! every bucket while it handles [`super::ForgetAll`] or restarts. Every answer an owner gives
//! from its near cache carries [`CopyTerms`]: the generation of the id's bucket read at that
//! moment and the near-cache entry's `fresh_until`. A worker keeps a copy of the answer with its
//! terms and serves it again only while `now < fresh_until` and the bucket still holds that
//! generation.
//!
//! Why that keeps the freshness invariant: the counters only grow, and an owner bumps before its
//! handler returns. So once an owner has learned of a change to an id, every worker that looks
//! at the id's bucket afterwards sees a generation newer than any terms given before the change,
//! and misses; terms given after it were read after the bump and come only with data the owner
//! itself answers after the change. A worker's entry is never fresher than the owner's own
//! near-cache entry it came from, and a change empties both at the same instant, where a message
//! to each worker would leave a window in which a worker answers the old value after the owner
//! knows better. Ids that share a bucket cost each other a miss on a change, nothing more.
//!
//! Writes are rare (a change, a reconnection), so the array's cache lines stay shared in every
//! core's cache and a read costs what a load from L1 or L2 costs.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

/// Buckets in the array: enough that a change costs other keys almost nothing, few enough (32
/// KiB) to stay in cache.
const BUCKETS: usize = 4096;

/// The generation counters, shared by every owner (which bump them) and every HTTP worker (which
/// read them). Cloning shares the same array.
#[derive(Clone)]
pub struct Generations(Arc<[AtomicU64]>);

/// The terms on which an HTTP worker may keep a copy of an answer: the generation of the id's
/// bucket when the owner answered, and how long the owner itself would answer it as a fresh
/// `HIT`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CopyTerms {
    pub generation: u64,
    pub fresh_until: Instant,
    /// From then on (the last quarter of the owner's entry's freshness) the worker, still
    /// answering the kept copy, asks the owner once in the background for a renewed one
    /// ([`super::Renew`]), so a key it keeps answering never expires under its requests. Never
    /// later than `fresh_until`.
    pub renew_at: Instant,
}

impl CopyTerms {
    /// These terms, due for renewal from `renew_at` (bounded by `fresh_until`).
    pub fn renew_from(self, renew_at: Instant) -> CopyTerms {
        CopyTerms {
            renew_at: renew_at.min(self.fresh_until),
            ..self
        }
    }
}

impl Default for Generations {
    fn default() -> Self {
        Generations((0..BUCKETS).map(|_| AtomicU64::new(0)).collect())
    }
}

impl Generations {
    fn bucket(&self, id: i64) -> &AtomicU64 {
        // Another multiplicative hash than `shard_for`'s, and its top bits: consecutive ids land
        // in different buckets.
        let mixed = (id as u64).wrapping_mul(0xD6E8_FEB8_6659_FD93);
        &self.0[(mixed >> 52) as usize % self.0.len()]
    }

    /// The generation of `id`'s bucket now.
    pub fn current(&self, id: i64) -> u64 {
        self.bucket(id).load(Ordering::SeqCst)
    }

    /// `id` changed: every copy kept of it so far is void.
    pub fn bump(&self, id: i64) {
        self.bucket(id).fetch_add(1, Ordering::SeqCst);
    }

    /// Anything may have changed: every copy kept so far is void.
    pub fn bump_all(&self) {
        for generation in self.0.iter() {
            generation.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// The terms for an answer about `id` that the owner holds fresh until `fresh_until`, due
    /// for renewal only then (see [`CopyTerms::renew_from`]).
    pub fn terms(&self, id: i64, fresh_until: Instant) -> CopyTerms {
        CopyTerms {
            generation: self.current(id),
            fresh_until,
            renew_at: fresh_until,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bump_changes_the_generation_of_its_id_and_bump_all_of_every_id() {
        let g = Generations::default();
        let before: Vec<u64> = (1..=100).map(|id| g.current(id)).collect();
        g.bump(7);
        assert_ne!(g.current(7), before[6]);
        let unchanged = (1..=100).filter(|&id| g.current(id) == before[id as usize - 1]);
        assert!(unchanged.count() >= 98, "a bump reaches few other ids");
        let before: Vec<u64> = (1..=100).map(|id| g.current(id)).collect();
        g.bump_all();
        assert!((1..=100).all(|id| g.current(id) != before[id as usize - 1]));
    }

    #[test]
    fn consecutive_ids_spread_over_the_buckets() {
        let g = Generations::default();
        let buckets: std::collections::HashSet<*const AtomicU64> =
            (1..=1000).map(|id| g.bucket(id) as *const _).collect();
        assert!(
            buckets.len() > 850,
            "{} buckets for 1000 ids",
            buckets.len()
        );
    }
}
