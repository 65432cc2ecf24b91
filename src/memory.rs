//! One memory budget for the service's caches, in bytes (`CACHE_MEMORY_MB`).
//!
//! Templates run from a few hundred bytes to hundreds of KB, so a bound in entries bounds
//! nothing: 10,000 entries of 256 KB are 2.5 GB. Every cache of bodies is therefore a
//! [`WeighedLru`]: least recently used first out, bounded by its share of the budget in bytes
//! (and still by its entry count). The budget is split in two halves:
//! - the HTTP workers' caches share one half, each worker an equal part (each keeps copies of
//!   its own, so that a hit touches only its own thread's memory);
//! - the owners' near caches (which are also what is remembered for `STALE`) share the other,
//!   each owner an equal part.
//!
//! A body larger than the share it would go into is served but not kept in memory (Redis still
//! holds it), and counted. What each cache holds is shown in `cache_memory_bytes{cache}`, what
//! leaves it in `cache_evictions_total{cache, reason}`.

use std::num::NonZeroUsize;

use lru::LruCache;
use prometheus::{IntCounter, IntGauge};

use crate::metrics::Metrics;
use crate::template::Lookup;

/// What an entry costs beyond its body: the key, the entry's times and terms, the LRU's links
/// and the allocations' headers (an estimate, on the high side).
pub const ENTRY_OVERHEAD: usize = 128;

/// Bodies of this size or more get memory of their own from the system, given back when freed.
pub const OWN_MAPPING_FROM: usize = 128 * 1024;

/// Makes glibc's malloc give every body of [`OWN_MAPPING_FROM`] or more a mapping of its own,
/// returned to the system when the body is freed. glibc does so from 128 KB by default, but
/// raises that threshold each time such a mapping is freed (up to 32 MB), so after a few large
/// bodies it serves them from its heaps, where freed memory mostly stays in the process: with
/// 512 clients asking cold 256 KB templates, the peak RSS was 198–214 MB with the moving
/// threshold and 139–143 MB with this one (BENCHMARKS §17). `MALLOC_MMAP_THRESHOLD_`, when set,
/// is left to decide. Called once, first thing in `main`.
pub fn large_bodies_to_own_mappings() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if std::env::var_os("MALLOC_MMAP_THRESHOLD_").is_none() {
        // SAFETY: mallopt only sets a parameter of malloc, under malloc's own lock.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, OWN_MAPPING_FROM as libc::c_int);
        }
    }
}

/// Which kind of cache: the label of its metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheKind {
    /// An HTTP worker's cache.
    Worker,
    /// A KeyOwner's near cache (and what it remembers for `STALE`).
    Near,
}

impl CacheKind {
    pub const ALL: [CacheKind; 2] = [CacheKind::Worker, CacheKind::Near];

    pub fn label(self) -> &'static str {
        match self {
            CacheKind::Worker => "worker",
            CacheKind::Near => "near",
        }
    }
}

/// Why an entry left a cache (or never entered it), as `cache_evictions_total` counts it.
pub const EVICTION_REASONS: [&str; 3] = ["bytes", "entries", "too_large"];

/// How the budget is split: the bytes of one worker's cache and of one owner's near cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shares {
    pub worker: usize,
    pub near: usize,
}

impl Shares {
    /// `budget` bytes for `workers` HTTP workers' caches (0 when they are off: the owners get
    /// it all) and `owners` near caches.
    pub fn split(budget: usize, workers: usize, owners: usize) -> Shares {
        let for_workers = if workers == 0 { 0 } else { budget / 2 };
        Shares {
            worker: for_workers / workers.max(1),
            near: (budget - for_workers) / owners.max(1),
        }
    }
}

/// The counters of one kind of cache, resolved once (no label lookup per update).
#[derive(Clone)]
pub struct Meter {
    held: IntGauge,
    by_bytes: IntCounter,
    by_entries: IntCounter,
    too_large: IntCounter,
}

impl Meter {
    pub fn new(metrics: &Metrics, kind: CacheKind) -> Meter {
        let evicted = |reason: &str| {
            metrics
                .cache_evictions_total
                .with_label_values(&[kind.label(), reason])
        };
        Meter {
            held: metrics
                .cache_memory_bytes
                .with_label_values(&[kind.label()]),
            by_bytes: evicted("bytes"),
            by_entries: evicted("entries"),
            too_large: evicted("too_large"),
        }
    }

    /// Counters of their own, registered nowhere (tests, and caches built before metrics).
    pub fn unregistered() -> Meter {
        let gauge = || IntGauge::new("held", "held").expect("a gauge");
        let counter = || IntCounter::new("evicted", "evicted").expect("a counter");
        Meter {
            held: gauge(),
            by_bytes: counter(),
            by_entries: counter(),
            too_large: counter(),
        }
    }
}

/// What a cached value weighs.
pub trait Weigh {
    /// The bytes it holds, with [`ENTRY_OVERHEAD`].
    fn weight(&self) -> usize;
}

impl Weigh for Lookup {
    fn weight(&self) -> usize {
        ENTRY_OVERHEAD
            + match self {
                Lookup::Found(body) => body.len(),
                Lookup::NotFound => 0,
            }
    }
}

/// An LRU of template entries bounded in bytes and in entries.
pub struct WeighedLru<V: Weigh> {
    entries: LruCache<i64, V>,
    max_entries: usize,
    max_bytes: usize,
    bytes: usize,
    meter: Meter,
}

impl<V: Weigh> WeighedLru<V> {
    /// `None` when either bound leaves no room for anything.
    pub fn new(max_entries: usize, max_bytes: usize, meter: Meter) -> Option<Self> {
        NonZeroUsize::new(max_entries)?;
        (max_bytes > ENTRY_OVERHEAD).then(|| WeighedLru {
            entries: LruCache::unbounded(),
            max_entries,
            max_bytes,
            bytes: 0,
            meter,
        })
    }

    /// The entry for `id`, marked recently used.
    pub fn get(&mut self, id: i64) -> Option<&V> {
        self.entries.get(&id)
    }

    /// The entry for `id`, marked recently used.
    pub fn get_mut(&mut self, id: i64) -> Option<&mut V> {
        self.entries.get_mut(&id)
    }

    /// The entry for `id`, not marked.
    pub fn peek(&self, id: i64) -> Option<&V> {
        self.entries.peek(&id)
    }

    /// The entry for `id`, not marked, to change what does not weigh (its weight is counted
    /// when it is put).
    pub fn peek_mut(&mut self, id: i64) -> Option<&mut V> {
        self.entries.peek_mut(&id)
    }

    /// Keeps `value` for `id` (replacing what was there), making room by dropping the least
    /// recently used. A value larger than the whole cache is not kept (and what `id` held goes:
    /// it is older than the value just seen); `false` says so.
    pub fn put(&mut self, id: i64, value: V) -> bool {
        let weight = value.weight();
        self.pop(id);
        if weight > self.max_bytes {
            self.meter.too_large.inc();
            return false;
        }
        while self.bytes + weight > self.max_bytes || self.entries.len() >= self.max_entries {
            let by_bytes = self.bytes + weight > self.max_bytes;
            let Some((_, old)) = self.entries.pop_lru() else {
                break;
            };
            self.release(old.weight());
            if by_bytes {
                self.meter.by_bytes.inc();
            } else {
                self.meter.by_entries.inc();
            }
        }
        self.entries.put(id, value);
        self.bytes += weight;
        self.meter.held.add(weight as i64);
        true
    }

    /// Drops `id`'s entry, if any.
    pub fn pop(&mut self, id: i64) -> Option<V> {
        let old = self.entries.pop(&id)?;
        self.release(old.weight());
        Some(old)
    }

    /// Drops every entry.
    pub fn clear(&mut self) {
        self.entries.clear();
        self.meter.held.sub(self.bytes as i64);
        self.bytes = 0;
    }

    fn release(&mut self, weight: usize) {
        self.bytes -= weight;
        self.meter.held.sub(weight as i64);
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The bytes held, by [`Weigh::weight`].
    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

impl<V: Weigh> Drop for WeighedLru<V> {
    fn drop(&mut self) {
        self.meter.held.sub(self.bytes as i64);
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;

    fn body(len: usize) -> Lookup {
        Lookup::Found(Bytes::from(vec![b'x'; len]))
    }

    #[test]
    fn bounded_in_bytes_least_recently_used_first() {
        let meter = Meter::unregistered();
        let mut lru = WeighedLru::new(100, 3 * (1000 + ENTRY_OVERHEAD), meter.clone()).unwrap();
        for id in 1..=3 {
            assert!(lru.put(id, body(1000)));
        }
        assert!(lru.get_mut(1).is_some()); // 2 is now the least recently used
        assert!(lru.put(4, body(1000)));
        assert!(lru.peek(2).is_none());
        assert_eq!(lru.len(), 3);
        assert_eq!(lru.bytes(), 3 * (1000 + ENTRY_OVERHEAD));
        assert_eq!(meter.held.get(), lru.bytes() as i64);
        assert_eq!(meter.by_bytes.get(), 1);
        // A large one makes room for itself, however many it takes.
        assert!(lru.put(5, body(2500)));
        assert_eq!(lru.len(), 1);
        assert_eq!(meter.by_bytes.get(), 4);
    }

    #[test]
    fn a_body_larger_than_the_cache_is_not_kept_and_is_counted() {
        let meter = Meter::unregistered();
        let mut lru = WeighedLru::new(100, 4096, meter.clone()).unwrap();
        assert!(lru.put(1, body(100)));
        assert!(!lru.put(1, body(5000)));
        assert!(
            lru.peek(1).is_none(),
            "the older value of 1 is not kept either"
        );
        assert_eq!(meter.too_large.get(), 1);
        assert_eq!((lru.bytes(), meter.held.get()), (0, 0));
    }

    #[test]
    fn still_bounded_in_entries_and_the_gauge_follows_every_change() {
        let meter = Meter::unregistered();
        let mut lru = WeighedLru::new(2, 1 << 20, meter.clone()).unwrap();
        for id in 1..=3 {
            lru.put(id, Lookup::NotFound);
        }
        assert_eq!(lru.len(), 2);
        assert_eq!(meter.by_entries.get(), 1);
        lru.pop(3);
        assert_eq!(meter.held.get(), ENTRY_OVERHEAD as i64);
        lru.clear();
        assert_eq!(meter.held.get(), 0);
        lru.put(7, body(10));
        drop(lru);
        assert_eq!(meter.held.get(), 0, "a dropped cache holds nothing");
    }

    #[test]
    fn the_budget_is_split_between_workers_and_owners() {
        assert_eq!(
            Shares::split(64 << 20, 2, 1),
            Shares {
                worker: 16 << 20,
                near: 32 << 20
            }
        );
        // Worker caches off: the owners have it all.
        assert_eq!(Shares::split(1000, 0, 4).near, 250);
        assert!(WeighedLru::<Lookup>::new(0, 1000, Meter::unregistered()).is_none());
        assert!(WeighedLru::<Lookup>::new(10, 0, Meter::unregistered()).is_none());
    }
}
