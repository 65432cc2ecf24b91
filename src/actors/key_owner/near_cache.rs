//! The owner's near cache: the latest answer it saw for each recent key, in an LRU bounded by
//! the owner's share of `CACHE_MEMORY_MB` in bytes and by `NEAR_CACHE_CAPACITY` entries (see
//! [`crate::memory`]); a body larger than the share is answered but not remembered.
//!
//! One entry serves two ends (see "Freshness" in the module docs of [`super`]):
//! - while *fresh* (`NEAR_CACHE_TTL_MS` from the database read, `NEGATIVE_TTL_SECS` if shorter
//!   for "not found", never past the Redis entry's soft expiry) it is answered as a `HIT` with no
//!   I/O, and HTTP workers may keep a copy of it on the [`CopyTerms`] it gives;
//! - up to `MAX_STALE_SECS` after it was seen it stands in for a load that failed (`STALE`).
//!
//! A change drops the entry ([`NearCache::forget`], [`NearCache::clear`]). When neither use is
//! enabled (or the capacity is 0) the cache holds nothing and every lookup misses.

use std::time::{Duration, Instant};

use super::deps::OwnerSettings;
use super::generations::{CopyTerms, Generations};
use crate::memory::{Meter, Weigh, WeighedLru};
use crate::template::Lookup;

/// The latest answer the owner saw for a key.
struct Remembered {
    lookup: Lookup,
    /// Answered as `HIT` until then.
    fresh_until: Instant,
    /// The start of the last quarter of its freshness: workers' copies are renewed from then on.
    renew_at: Instant,
    /// When the value was read (from PostgreSQL: when the read began); `MAX_STALE_SECS` counts
    /// from here.
    seen_at: Instant,
}

impl Weigh for Remembered {
    fn weight(&self) -> usize {
        self.lookup.weight()
    }
}

pub(super) struct NearCache {
    /// `None` when neither freshness nor stale answers are enabled.
    entries: Option<WeighedLru<Remembered>>,
    ttl: Duration,
    negative_ttl: Duration,
    max_stale: Duration,
    /// While the change listener is deaf: how long an entry may be fresh at the most.
    deaf_cap: Option<Duration>,
}

impl NearCache {
    pub(super) fn new(s: &OwnerSettings, meter: Meter) -> Self {
        let remember = !s.near_cache_ttl.is_zero() || !s.max_stale.is_zero();
        let entries =
            WeighedLru::new(s.near_cache_capacity, s.near_cache_bytes, meter).filter(|_| remember);
        NearCache {
            entries,
            ttl: s.near_cache_ttl,
            negative_ttl: s.negative_ttl,
            max_stale: s.max_stale,
            deaf_cap: None,
        }
    }

    /// A fresh answer for `id`, if one is remembered (and marks it recently used).
    pub(super) fn fresh(&mut self, id: i64) -> Option<Lookup> {
        let entry = self.entries.as_mut()?.get(id)?;
        (Instant::now() < entry.fresh_until).then(|| entry.lookup.clone())
    }

    /// A fresh answer for `id` that is not yet due for renewal: another worker's renewal (or a
    /// request's flight) already renewed it. Marks it recently used.
    pub(super) fn renewed(&mut self, id: i64) -> Option<Lookup> {
        let now = Instant::now();
        self.entries
            .as_mut()
            .and_then(|entries| entries.get(id))
            .filter(|entry| now < entry.renew_at && now < entry.fresh_until)
            .map(|entry| entry.lookup.clone())
    }

    /// A remembered answer for `id` young enough to stand in for a failed load.
    pub(super) fn stale(&mut self, id: i64) -> Option<Lookup> {
        let entry = self.entries.as_mut()?.peek(id)?;
        (entry.seen_at.elapsed() < self.max_stale).then(|| entry.lookup.clone())
    }

    /// Remembers `lookup`, read at `seen_at`, fresh for the near-cache TTL but never longer than
    /// `fresh_for` (what is left of its soft TTL in Redis).
    pub(super) fn remember(
        &mut self,
        id: i64,
        lookup: &Lookup,
        seen_at: Instant,
        fresh_for: Duration,
    ) {
        let ttl = match lookup {
            Lookup::Found(_) => self.ttl,
            Lookup::NotFound => self.negative_ttl.min(self.ttl),
        };
        let fresh_for = ttl
            .min(fresh_for)
            .min(self.deaf_cap.unwrap_or(Duration::MAX));
        if let Some(entries) = self.entries.as_mut() {
            entries.put(
                id,
                Remembered {
                    lookup: lookup.clone(),
                    fresh_until: seen_at + fresh_for,
                    renew_at: seen_at + (fresh_for - fresh_for / 4),
                    seen_at,
                },
            );
        }
    }

    /// The terms on which an HTTP worker may keep a copy of `id`'s entry, as just answered.
    pub(super) fn terms(&mut self, id: i64, generations: &Generations) -> Option<CopyTerms> {
        let entry = self.entries.as_mut()?.peek(id)?;
        let terms = generations.terms(id, entry.fresh_until);
        Some(terms.renew_from(entry.renew_at))
    }

    /// [`NearCache::terms`], only if the entry holds `lookup` and is fresh now: a worker's copy
    /// of a flight's answer must be a copy of an entry the owner itself answers as a `HIT`.
    pub(super) fn terms_if_holds(
        &mut self,
        id: i64,
        lookup: &Lookup,
        generations: &Generations,
    ) -> Option<CopyTerms> {
        let entry = self.entries.as_mut()?.peek(id)?;
        let holds = Instant::now() < entry.fresh_until && entry.lookup == *lookup;
        let terms = generations.terms(id, entry.fresh_until);
        holds.then(|| terms.renew_from(entry.renew_at))
    }

    /// `id` changed: its entry goes.
    pub(super) fn forget(&mut self, id: i64) {
        if let Some(entries) = self.entries.as_mut() {
            entries.pop(id);
        }
    }

    /// The change listener went deaf (`Some(cap)`: every entry goes, and none is fresh longer
    /// than `cap` from now on) or hears again (`None`).
    pub(super) fn deafness(&mut self, cap: Option<Duration>) {
        self.deaf_cap = cap;
        if cap.is_some() {
            self.clear();
        }
    }

    /// Anything may have changed: every entry goes.
    pub(super) fn clear(&mut self) {
        if let Some(entries) = self.entries.as_mut() {
            entries.clear();
        }
    }
}
