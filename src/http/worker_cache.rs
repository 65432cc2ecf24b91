//! Each HTTP worker's own cache of fresh answers: a hot key is answered in the handler, with no
//! message to its owner's thread and no reply back (the two cross-thread wake-ups that cost a
//! near-cache hit half of the bare handler's throughput).
//!
//! Only the worker's own thread touches its cache (no lock, no shared map). It is filled by the
//! owners' answers themselves: a near-cache `HIT`, or a current flight's fresh answer that the
//! owner remembered in its near cache, comes with [`CopyTerms`] (see
//! [`crate::actors::key_owner::generations`]), and the worker keeps that answer until the
//! owner's near-cache entry would stop being fresh, or until the owner learns of a change to the
//! key (its generation moves) — whichever comes first.
//!
//! A key in use does not run out: from the terms' `renew_at` (the last quarter of the copy's
//! freshness) the handler asks the owner in the background for a renewed copy
//! ([`crate::actors::key_owner::Renew`]), and the copy is answered meanwhile. It asks for every
//! copy that was answered at least once since it was kept, as soon as the worker handles any
//! request after the copy came due ([`WorkerCache::due_renewals`], from a schedule of the
//! copies' `renew_at`), and for a copy that was not, at its first hit before it runs out. So a
//! key asked a few times a second, whose copy may get no request in its last quarter, is renewed
//! all the same, while a key asked once is left to run out. The owner's entry is read again
//! from Redis, and its answer refills this cache. So no request for a key in steady use waits on
//! the owner's thread. Everything else — a miss, a stale value, a flight to join, shedding —
//! goes to the owner as before, so loads are still deduplicated by the owners' mailboxes.
//!
//! Bounded by its share of `CACHE_MEMORY_MB` in bytes and by `WORKER_CACHE_CAPACITY` entries
//! (least recently used go first; see [`crate::memory`]); a body larger than the share is served
//! but not kept. `WORKER_CACHE_CAPACITY=0`, or `COALESCE=off`, turns it off.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::time::Instant;

use crate::actors::key_owner::{Answer, CopyTerms, Generations};
use crate::memory::{Meter, Weigh, WeighedLru};
use crate::template::Lookup;
use bytes::Bytes;

/// Times the schedule may hold beyond two per copy kept before it is trimmed.
const SCHEDULE_SLACK: usize = 1024;

pub struct WorkerCache {
    /// `None` when the cache is off.
    entries: Option<WeighedLru<Kept>>,
    generations: Generations,
    /// When each copy kept comes due for renewal, soonest first. A copy kept again leaves its
    /// older time here, skipped when it comes up (it no longer matches the copy's terms).
    schedule: BinaryHeap<Reverse<(Instant, i64)>>,
}

/// An owner's answer, kept with what says how long it may be served.
struct Kept {
    lookup: Lookup,
    terms: CopyTerms,
    /// A renewal was asked for this copy: it is served until `fresh_until` without asking again.
    asked: bool,
    /// Answered at least once since it was kept: a copy in use, renewed once due.
    used: bool,
}

impl Weigh for Kept {
    fn weight(&self) -> usize {
        self.lookup.weight()
    }
}

/// A copy this worker may answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hit {
    pub lookup: Lookup,
    /// The copy is in the last quarter of its freshness and no renewal was asked for it yet:
    /// the caller asks the owner for one (once per copy).
    pub renew: bool,
}

impl WorkerCache {
    /// Bounded in entries only (tests of what is kept when).
    pub fn new(capacity: usize, generations: Generations) -> Self {
        Self::with_budget(capacity, usize::MAX, Meter::unregistered(), generations)
    }

    /// Bounded by `capacity` entries and `bytes`, counted on `meter`.
    pub fn with_budget(
        capacity: usize,
        bytes: usize,
        meter: Meter,
        generations: Generations,
    ) -> Self {
        WorkerCache {
            entries: WeighedLru::new(capacity, bytes, meter),
            generations,
            schedule: BinaryHeap::new(),
        }
    }

    /// The answer for `id` if this worker holds one that its owner would still answer as a fresh
    /// `HIT`; an entry that is not is dropped.
    pub fn get(&mut self, id: i64) -> Option<Hit> {
        let entries = self.entries.as_mut()?;
        let kept = entries.get_mut(id)?;
        let now = Instant::now();
        if now < kept.terms.fresh_until && self.generations.current(id) == kept.terms.generation {
            let renew = now >= kept.terms.renew_at && !kept.asked;
            kept.asked |= renew;
            kept.used = true;
            return Some(Hit {
                lookup: kept.lookup.clone(),
                renew,
            });
        }
        entries.pop(id);
        None
    }

    /// Keeps the owner's answer for `id` if it came with [`CopyTerms`]: the answer to a request.
    /// Not asked for a renewal yet, even if already due: the next hit asks, so the copy is
    /// renewed before it runs out.
    pub fn keep(&mut self, id: i64, answer: &Answer) {
        self.put(id, answer, false);
    }

    /// Keeps the answer to a renewal, like [`WorkerCache::keep`]; but one already due (the
    /// owner's entry came from a load slower than three quarters of its freshness, say) is not
    /// asked for again: asking would get the same entry back. It runs out instead.
    pub fn keep_renewal(&mut self, id: i64, answer: &Answer) {
        let due = answer
            .terms
            .is_some_and(|terms| Instant::now() >= terms.renew_at);
        self.put(id, answer, due);
    }

    /// The ids of the copies that came due for renewal, were answered since they were kept and
    /// were not asked for yet (each is marked asked): the caller asks their owners. Copies not
    /// answered since they were kept are left to run out (a hit before then still asks).
    /// Cheap when nothing is due: one look at the schedule's soonest time.
    pub fn due_renewals(&mut self) -> Vec<i64> {
        let mut due = Vec::new();
        let (Some(entries), Some(&Reverse((soonest, _)))) =
            (self.entries.as_mut(), self.schedule.peek())
        else {
            return due;
        };
        let now = Instant::now();
        if soonest > now {
            return due;
        }
        while let Some(&Reverse((renew_at, id))) = self.schedule.peek() {
            if renew_at > now {
                break;
            }
            self.schedule.pop();
            let Some(kept) = entries.peek_mut(id) else {
                continue;
            };
            let current = kept.terms.renew_at == renew_at
                && now < kept.terms.fresh_until
                && self.generations.current(id) == kept.terms.generation;
            if current && kept.used && !kept.asked {
                kept.asked = true;
                due.push(id);
            }
        }
        due
    }

    fn put(&mut self, id: i64, answer: &Answer, asked: bool) {
        let (Some(entries), Some(terms), Ok(lookup)) =
            (self.entries.as_mut(), answer.terms, &answer.result)
        else {
            return;
        };
        // A copy of the body of its own: serving it then touches only this thread's reference
        // count, never a count that other workers' threads write too.
        let lookup = match lookup {
            Lookup::Found(body) => Lookup::Found(Bytes::copy_from_slice(body)),
            Lookup::NotFound => Lookup::NotFound,
        };
        let kept = entries.put(
            id,
            Kept {
                lookup,
                terms,
                asked,
                used: false,
            },
        );
        if kept && !asked {
            self.schedule.push(Reverse((terms.renew_at, id)));
            if self.schedule.len() > 2 * entries.len() + SCHEDULE_SLACK {
                self.trim_schedule();
            }
        }
    }

    /// Drops from the schedule the times of copies gone, kept again or already asked for:
    /// it then holds at most one time per copy kept.
    fn trim_schedule(&mut self) {
        let Some(entries) = self.entries.as_ref() else {
            return;
        };
        let mut times = std::mem::take(&mut self.schedule).into_vec();
        times.retain(|Reverse((renew_at, id))| {
            entries
                .peek(*id)
                .is_some_and(|kept| kept.terms.renew_at == *renew_at && !kept.asked)
        });
        times.sort_unstable();
        times.dedup();
        self.schedule = times.into();
    }

    /// Times in the schedule, live or not (tests of its bound).
    #[cfg(test)]
    fn scheduled(&self) -> usize {
        self.schedule.len()
    }

    /// Entries held (fresh or not yet found out to be stale).
    pub fn len(&self) -> usize {
        self.entries.as_ref().map_or(0, WeighedLru::len)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::actors::key_owner::XCache;

    fn hit(generations: &Generations, id: i64, fresh_for: Duration) -> Answer {
        Answer {
            result: Ok(Lookup::Found(Bytes::from(format!("{{\"id\":{id}}}")))),
            x_cache: XCache::Hit,
            terms: Some(generations.terms(id, Instant::now() + fresh_for)),
        }
    }

    const LONG: Duration = Duration::from_secs(3600);

    #[test]
    fn bounded_by_its_capacity_least_recently_used_first() {
        let generations = Generations::default();
        let mut cache = WorkerCache::new(2, generations.clone());
        cache.keep(1, &hit(&generations, 1, LONG));
        cache.keep(2, &hit(&generations, 2, LONG));
        assert!(cache.get(1).is_some(), "1 is now the most recently used");
        cache.keep(3, &hit(&generations, 3, LONG));
        assert_eq!(cache.len(), 2);
        assert!(cache.get(2).is_none(), "the least recently used went");
        assert!(cache.get(1).is_some() && cache.get(3).is_some());
    }

    #[test]
    fn an_answer_past_its_terms_is_never_served() {
        let generations = Generations::default();
        let mut cache = WorkerCache::new(10, generations.clone());
        cache.keep(1, &hit(&generations, 1, Duration::ZERO));
        assert_eq!(cache.get(1), None);
        assert!(cache.is_empty());
    }

    #[test]
    fn an_answer_whose_generation_moved_is_never_served() {
        let generations = Generations::default();
        let mut cache = WorkerCache::new(10, generations.clone());
        let answer = hit(&generations, 1, LONG);
        generations.bump(1);
        // Kept after the change, from an answer given before it.
        cache.keep(1, &answer);
        assert_eq!(cache.get(1), None);
    }

    #[test]
    fn the_body_is_a_copy_of_its_own_and_capacity_zero_keeps_nothing() {
        let generations = Generations::default();
        let answer = hit(&generations, 1, LONG);
        let mut cache = WorkerCache::new(1, generations.clone());
        cache.keep(1, &answer);
        let (Some(Lookup::Found(kept)), Ok(Lookup::Found(given))) =
            (cache.get(1).map(|h| h.lookup), &answer.result)
        else {
            panic!("kept a body")
        };
        assert_eq!(kept, given);
        assert_ne!(kept.as_ptr(), given.as_ptr(), "not the owner's buffer");

        let mut off = WorkerCache::new(0, generations.clone());
        off.keep(1, &answer);
        assert_eq!((off.get(1), off.len()), (None, 0));
    }

    #[test]
    fn a_copy_due_for_renewal_is_still_answered_and_asks_once() {
        let generations = Generations::default();
        let mut cache = WorkerCache::new(10, generations.clone());
        let mut answer = hit(&generations, 1, LONG);
        // Far enough ahead that a stalled test thread still looks before it is due.
        let renew_at = Instant::now() + Duration::from_millis(500);
        answer.terms = answer.terms.map(|terms| terms.renew_from(renew_at));
        cache.keep(1, &answer);
        assert!(!cache.get(1).expect("kept").renew, "not due yet");
        // Let the copy come due.
        std::thread::sleep(renew_at.saturating_duration_since(Instant::now()));
        let due = cache.get(1).expect("due, still fresh: answered");
        assert!(due.renew, "the first hit once due asks for a renewal");
        assert!(!cache.get(1).expect("kept").renew, "and only the first");

        // An answer to a request that is due already (the owner's entry near its end) asks
        // again; an answer to a renewal does not: asking would get the same entry back.
        cache.keep(1, &answer);
        assert!(cache.get(1).expect("kept").renew);
        cache.keep_renewal(1, &answer);
        assert!(!cache.get(1).expect("kept").renew);

        // Terms are never due after they run out.
        let terms = generations.terms(2, Instant::now());
        assert_eq!(
            terms.renew_from(Instant::now() + LONG).renew_at,
            terms.fresh_until
        );
    }

    #[test]
    fn copies_answered_since_kept_are_due_for_renewal_without_a_hit_in_their_last_quarter() {
        let generations = Generations::default();
        let mut cache = WorkerCache::new(10, generations.clone());
        // Far enough ahead that a stalled test thread still looks before they are due.
        let renew_at = Instant::now() + Duration::from_millis(500);
        for id in 1..=3 {
            let mut answer = hit(&generations, id, LONG);
            answer.terms = answer.terms.map(|terms| terms.renew_from(renew_at));
            cache.keep(id, &answer);
        }
        // 1 and 3 are answered before they are due; 2 is not answered at all.
        assert!(!cache.get(1).expect("kept").renew);
        assert!(!cache.get(3).expect("kept").renew);
        assert_eq!(cache.due_renewals(), Vec::<i64>::new(), "none due yet");
        generations.bump(3);
        std::thread::sleep(renew_at.saturating_duration_since(Instant::now()));

        assert_eq!(
            cache.due_renewals(),
            vec![1],
            "1 was answered; 2 was not; 3 changed since"
        );
        assert_eq!(cache.due_renewals(), Vec::<i64>::new(), "asked once");
        assert!(!cache.get(1).expect("still fresh").renew, "asked already");
        // 2, never answered since it was kept, is still asked for at its first hit.
        assert!(cache.get(2).expect("still fresh").renew);
        assert_eq!(cache.get(3), None);

        // A renewal's answer starts a new round: renewed once due if answered since.
        let mut renewed = hit(&generations, 1, LONG);
        let renew_at = Instant::now() + Duration::from_millis(50);
        renewed.terms = renewed.terms.map(|terms| terms.renew_from(renew_at));
        cache.keep_renewal(1, &renewed);
        std::thread::sleep(renew_at.saturating_duration_since(Instant::now()));
        assert_eq!(
            cache.due_renewals(),
            Vec::<i64>::new(),
            "not answered since"
        );
    }

    #[test]
    fn the_schedule_holds_about_one_time_per_copy_however_often_copies_are_kept() {
        let generations = Generations::default();
        let mut cache = WorkerCache::new(4, generations.clone());
        for round in 0..5_000 {
            let id = round % 8;
            let mut answer = hit(&generations, id, LONG);
            let renew_at = Instant::now() + Duration::from_secs(60);
            answer.terms = answer.terms.map(|terms| terms.renew_from(renew_at));
            cache.keep(id, &answer);
            assert!(cache.scheduled() <= 2 * cache.len() + SCHEDULE_SLACK);
        }
        assert_eq!(cache.len(), 4);
        cache.trim_schedule();
        assert_eq!(cache.scheduled(), 4, "one time for each copy kept");
    }

    #[test]
    fn answers_without_terms_or_with_an_error_are_not_kept() {
        let generations = Generations::default();
        let mut cache = WorkerCache::new(10, generations.clone());
        let mut miss = hit(&generations, 1, LONG);
        miss.terms = None;
        miss.x_cache = XCache::Miss;
        cache.keep(1, &miss);
        let mut failed = hit(&generations, 2, LONG);
        failed.result = Err(crate::actors::key_owner::FlightError::Timeout(LONG));
        cache.keep(2, &failed);
        assert!(cache.is_empty());
    }
}
