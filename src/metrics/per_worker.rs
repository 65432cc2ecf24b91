//! Counts that every `/template-details` request moves, kept per HTTP worker and summed when
//! `/metrics` is scraped.
//!
//! A counter shared by every worker is one atomic word that every core writes: on many cores its
//! cache line moves from core to core on every request, and the count becomes the hot path's
//! bottleneck. Here each worker writes its own [`Slot`], alone on its cache line, and the
//! [`PerWorker`] collector adds the slots up at scrape time, so `/metrics` stays exact.

use std::marker::PhantomData;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use prometheus::{IntCounter, IntGauge};

/// One worker's counts, alone on its cache line (128 bytes: two lines on x86, whose adjacent-line
/// prefetcher pairs them). Written by its worker's thread only, read by scrapes.
#[repr(align(128))]
#[derive(Default)]
struct Slot {
    /// Answers served from the worker's own cache of fresh answers.
    worker_cache_hits: AtomicU64,
    /// Requests in progress on this worker.
    in_flight: AtomicI64,
}

/// A worker's handle on its slot. Not `Send`: it is made on the worker's thread and stays there,
/// so each slot has one writer and a count is a plain load and store, no locked instruction.
pub struct WorkerCounts {
    slot: Arc<Slot>,
    _one_thread: PhantomData<*const ()>,
}

impl WorkerCounts {
    /// One more answer from the worker's cache (also one more `cache_hits_total`).
    pub fn worker_cache_hit(&self) {
        let hits = &self.slot.worker_cache_hits;
        hits.store(hits.load(Ordering::Relaxed) + 1, Ordering::Relaxed);
    }

    /// Counts a request in `http_in_flight_requests` until the guard is dropped.
    pub fn enter(&self) -> InFlight {
        add(&self.slot.in_flight, 1);
        InFlight(self.slot.clone(), PhantomData)
    }
}

fn add(gauge: &AtomicI64, n: i64) {
    gauge.store(gauge.load(Ordering::Relaxed) + n, Ordering::Relaxed);
}

/// A request counted in `http_in_flight_requests`; dropping it (the response was sent, or the
/// client went away and the request's future was dropped, on the same worker) uncounts it.
pub struct InFlight(Arc<Slot>, PhantomData<*const ()>);

impl Drop for InFlight {
    fn drop(&mut self) {
        add(&self.0.in_flight, -1);
    }
}

/// The collector: every worker's slot, and the series it reports — `cache_hits_total` (the
/// owners' hits, counted in [`PerWorker::owner_hits`], plus the workers'),
/// `worker_cache_hits_total` and `http_in_flight_requests`.
#[derive(Clone)]
pub struct PerWorker {
    slots: Arc<Mutex<Vec<Arc<Slot>>>>,
    owner_hits: IntCounter,
    cache_hits_total: IntCounter,
    worker_cache_hits_total: IntCounter,
    http_in_flight_requests: IntGauge,
}

impl PerWorker {
    /// `owner_hits` is what the owners count in `cache_hits_total`; it is reported summed with
    /// the workers' hits, under that name.
    pub fn new(owner_hits: IntCounter) -> Result<Self, prometheus::Error> {
        let reported = &owner_hits.desc()[0];
        Ok(PerWorker {
            slots: Arc::default(),
            cache_hits_total: IntCounter::new(&reported.fq_name, &reported.help)?,
            owner_hits,
            worker_cache_hits_total: IntCounter::new(
                "worker_cache_hits_total",
                "Answers served from an HTTP worker's own cache of fresh answers, without a \
                 message to the key's owner (also in cache_hits_total)",
            )?,
            http_in_flight_requests: IntGauge::new(
                "http_in_flight_requests",
                "HTTP requests being processed now",
            )?,
        })
    }

    /// A new worker's counts; call on the worker's own thread.
    pub fn worker(&self) -> WorkerCounts {
        let slot = Arc::new(Slot::default());
        self.lock().push(slot.clone());
        WorkerCounts {
            slot,
            _one_thread: PhantomData,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Arc<Slot>>> {
        self.slots
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Hits answered by HTTP workers' caches so far, all workers together.
    pub fn worker_cache_hits(&self) -> u64 {
        self.lock()
            .iter()
            .map(|s| s.worker_cache_hits.load(Ordering::Relaxed))
            .sum()
    }
}

/// Moves `counter` up to `total` (a sum of counts that only grow, read under the slots' lock, so
/// totals only grow too).
fn advance(counter: &IntCounter, total: u64) {
    let now = counter.get();
    if total > now {
        counter.inc_by(total - now);
    }
}

impl Collector for PerWorker {
    fn desc(&self) -> Vec<&Desc> {
        [
            &self.cache_hits_total as &dyn Collector,
            &self.worker_cache_hits_total,
            &self.http_in_flight_requests,
        ]
        .into_iter()
        .flat_map(|c| c.desc())
        .collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let slots = self.lock();
        let hits: u64 = slots
            .iter()
            .map(|s| s.worker_cache_hits.load(Ordering::Relaxed))
            .sum();
        let in_flight: i64 = slots
            .iter()
            .map(|s| s.in_flight.load(Ordering::Relaxed))
            .sum();
        advance(&self.worker_cache_hits_total, hits);
        advance(&self.cache_hits_total, hits + self.owner_hits.get());
        self.http_in_flight_requests.set(in_flight);
        let families = [
            self.cache_hits_total.collect(),
            self.worker_cache_hits_total.collect(),
            self.http_in_flight_requests.collect(),
        ];
        families.into_iter().flatten().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn value(families: &[MetricFamily], name: &str) -> f64 {
        let family = families.iter().find(|f| f.name() == name).expect(name);
        let metric = &family.get_metric()[0];
        if name == "http_in_flight_requests" {
            metric.get_gauge().get_value()
        } else {
            metric.get_counter().get_value()
        }
    }

    #[test]
    fn a_scrape_sums_every_worker_and_the_owners() {
        let owners = IntCounter::new("cache_hits_total", "Answers served from a cache").unwrap();
        let per_worker = PerWorker::new(owners.clone()).unwrap();
        let registry = prometheus::Registry::new();
        registry.register(Box::new(per_worker.clone())).unwrap();
        let handles: Vec<_> = (0..3)
            .map(|n| {
                let p = per_worker.clone();
                std::thread::spawn(move || {
                    let counts = p.worker();
                    for _ in 0..(n + 1) * 1000 {
                        counts.worker_cache_hit();
                    }
                    // Left in flight: a request this worker is still serving.
                    std::mem::forget(counts.enter());
                    let _done = counts.enter();
                })
            })
            .collect();
        for handle in handles {
            handle.join().unwrap();
        }
        owners.inc_by(5);
        let families = registry.gather();
        assert_eq!(value(&families, "worker_cache_hits_total"), 6000.0);
        assert_eq!(value(&families, "cache_hits_total"), 6005.0);
        assert_eq!(value(&families, "http_in_flight_requests"), 3.0);
        assert_eq!(per_worker.worker_cache_hits(), 6000);
        owners.inc();
        let families = registry.gather();
        assert_eq!(
            value(&families, "cache_hits_total"),
            6006.0,
            "scrapes add up"
        );
    }
}
