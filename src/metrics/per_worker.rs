//! What every request moves, kept per HTTP worker and summed when `/metrics` is scraped:
//! `http_in_flight_requests`, the workers' cache hits (`worker_cache_hits_total`, and their part
//! of `cache_hits_total`), and the hot route's part of the seed's `http_request_total` and
//! `http_request_duration_seconds`.
//!
//! A counter shared by every worker is one atomic word that every core writes: on many cores its
//! cache line moves from core to core on every request, and the count becomes the hot path's
//! bottleneck. Here each worker writes its own [`Slot`], alone on its cache line, and the
//! [`PerWorker`] collector adds the slots up at scrape time, so `/metrics` stays exact.
//!
//! actix-web-prom's middleware serves `/metrics` and counts every other route in the same two
//! HTTP metrics (see `startup`). Per request it builds the route's label from fresh strings and
//! updates two label-keyed vectors every worker shares (a read lock and a reference count written
//! by every core, then the histogram's atomics): what `benches/request_metrics` measures. The
//! hot route, `/template-details`, and requests with a method outside the standard set (which
//! would give its vectors a series per invented method) are counted here instead: a worker finds
//! the series of its request in a short list of its own, behind a lock no other thread takes but
//! a scrape. This collector does not describe the two HTTP metrics, which the middleware has
//! registered under their names: the registry then merges the series collected here into the
//! middleware's families. Names, labels (`endpoint`, `method`, `status`), help texts and buckets
//! are the ones the middleware uses; the duration ends when the response is ready to be written.

use std::collections::BTreeMap;
use std::marker::PhantomData;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use actix_web::http::{Method, StatusCode};
use prometheus::core::{Collector, Desc};
use prometheus::proto::{self, MetricFamily, MetricType};
use prometheus::{IntCounter, IntGauge};

/// The seed's HTTP metrics, by name and help text, as the middleware registers them too.
pub const HTTP_REQUEST_TOTAL: (&str, &str) =
    ("http_request_total", "Total number of HTTP requests");
pub const HTTP_REQUEST_DURATION: (&str, &str) = (
    "http_request_duration_seconds",
    "HTTP request duration in seconds for all requests",
);
const HTTP_LABELS: [&str; 3] = ["endpoint", "method", "status"];
/// Upper bounds of the duration histogram's buckets, in seconds (Prometheus's defaults).
pub const DURATION_BUCKETS: [f64; 11] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// One worker's counts, alone on its cache line (128 bytes: two lines on x86, whose adjacent-line
/// prefetcher pairs them). Written by its worker's thread only, read by scrapes.
#[repr(align(128))]
#[derive(Default)]
struct Slot {
    /// Answers served from the worker's own cache of fresh answers.
    worker_cache_hits: AtomicU64,
    /// Requests in progress on this worker.
    in_flight: AtomicI64,
    /// Requests served, one entry per endpoint, method and status seen.
    requests: Mutex<Vec<Served>>,
}

/// Requests of one endpoint, method and status served by one worker.
struct Served {
    endpoint: &'static str,
    method: &'static str,
    status: StatusCode,
    count: u64,
    seconds: f64,
    /// Requests per bucket of [`DURATION_BUCKETS`] (not cumulative); slower ones only in `count`.
    buckets: [u64; DURATION_BUCKETS.len()],
}

/// Whether `method` is one of HTTP's standard methods (any other is labelled `OTHER`).
pub fn standard_method(method: &Method) -> bool {
    method_label(method) != "OTHER"
}

/// The `method` label: the method's name for the standard ones; any other is `OTHER`, so a
/// client inventing methods cannot create series without bound.
fn method_label(method: &Method) -> &'static str {
    const STANDARD: [(Method, &str); 9] = [
        (Method::GET, "GET"),
        (Method::HEAD, "HEAD"),
        (Method::POST, "POST"),
        (Method::PUT, "PUT"),
        (Method::DELETE, "DELETE"),
        (Method::PATCH, "PATCH"),
        (Method::OPTIONS, "OPTIONS"),
        (Method::CONNECT, "CONNECT"),
        (Method::TRACE, "TRACE"),
    ];
    STANDARD
        .iter()
        .find(|(m, _)| m == method)
        .map_or("OTHER", |(_, label)| label)
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

    /// Counts a request served: `endpoint` is its route (or `UNMATCHED`), `took` from its arrival
    /// to its response.
    pub fn request_served(
        &self,
        endpoint: &'static str,
        method: &Method,
        status: StatusCode,
        took: Duration,
    ) {
        let method = method_label(method);
        let mut served = lock(&self.slot.requests);
        let at = match served
            .iter()
            .position(|s| s.status == status && s.method == method && s.endpoint == endpoint)
        {
            Some(at) => at,
            None => {
                served.push(Served {
                    endpoint,
                    method,
                    status,
                    count: 0,
                    seconds: 0.0,
                    buckets: [0; DURATION_BUCKETS.len()],
                });
                served.len() - 1
            }
        };
        let series = &mut served[at];
        let seconds = took.as_secs_f64();
        series.count += 1;
        series.seconds += seconds;
        if let Some(bucket) = DURATION_BUCKETS.iter().position(|&le| seconds <= le) {
            series.buckets[bucket] += 1;
        }
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

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The collector: every worker's slot, and the series it reports — `cache_hits_total` (the
/// owners' hits, which they count in the `IntCounter` given to [`PerWorker::new`], plus the
/// workers'), `worker_cache_hits_total`, `http_in_flight_requests`, `http_request_total` and
/// `http_request_duration_seconds`.
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

    fn lock(&self) -> MutexGuard<'_, Vec<Arc<Slot>>> {
        lock(&self.slots)
    }

    /// Hits answered by HTTP workers' caches so far, all workers together.
    pub fn worker_cache_hits(&self) -> u64 {
        self.lock()
            .iter()
            .map(|s| s.worker_cache_hits.load(Ordering::Relaxed))
            .sum()
    }
}

/// Every worker's requests of one endpoint, method and status, added up.
#[derive(Default)]
struct Total {
    count: u64,
    seconds: f64,
    buckets: [u64; DURATION_BUCKETS.len()],
}

fn family(
    (name, help): (&str, &str),
    kind: MetricType,
    metrics: Vec<proto::Metric>,
) -> MetricFamily {
    let mut family = MetricFamily::default();
    family.set_name(name.to_owned());
    family.set_help(help.to_owned());
    family.set_field_type(kind);
    family.set_metric(metrics);
    family
}

/// `http_request_total` and `http_request_duration_seconds` from every worker's requests.
fn http_families(slots: &[Arc<Slot>]) -> [MetricFamily; 2] {
    let mut totals: BTreeMap<(&str, &str, StatusCode), Total> = BTreeMap::new();
    for slot in slots {
        for s in lock(&slot.requests).iter() {
            let total = totals.entry((s.endpoint, s.method, s.status)).or_default();
            total.count += s.count;
            total.seconds += s.seconds;
            for (sum, n) in total.buckets.iter_mut().zip(s.buckets) {
                *sum += n;
            }
        }
    }
    let (mut counts, mut durations) = (Vec::new(), Vec::new());
    for ((endpoint, method, status), total) in totals {
        let labels = || {
            HTTP_LABELS
                .iter()
                .zip([endpoint, method, status.as_str()])
                .map(|(name, value)| {
                    let mut pair = proto::LabelPair::default();
                    pair.set_name((*name).to_owned());
                    pair.set_value(value.to_owned());
                    pair
                })
                .collect()
        };
        let mut count = proto::Counter::default();
        count.set_value(total.count as f64);
        let mut metric = proto::Metric::from_label(labels());
        metric.set_counter(count);
        counts.push(metric);

        let mut cumulative = 0;
        let buckets = DURATION_BUCKETS
            .iter()
            .zip(total.buckets)
            .map(|(&le, n)| {
                cumulative += n;
                let mut bucket = proto::Bucket::default();
                bucket.set_upper_bound(le);
                bucket.set_cumulative_count(cumulative);
                bucket
            })
            .collect();
        let mut histogram = proto::Histogram::default();
        histogram.set_sample_count(total.count);
        histogram.set_sample_sum(total.seconds);
        histogram.set_bucket(buckets);
        let mut metric = proto::Metric::from_label(labels());
        metric.set_histogram(histogram);
        durations.push(metric);
    }
    [
        family(HTTP_REQUEST_TOTAL, MetricType::COUNTER, counts),
        family(HTTP_REQUEST_DURATION, MetricType::HISTOGRAM, durations),
    ]
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
        let http = http_families(&slots);
        families.into_iter().flatten().chain(http).collect()
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

    #[test]
    fn http_requests_are_summed_per_endpoint_method_and_status_with_cumulative_buckets() {
        let per_worker = PerWorker::new(IntCounter::new("cache_hits_total", "h").unwrap()).unwrap();
        let registry = prometheus::Registry::new();
        registry.register(Box::new(per_worker.clone())).unwrap();
        let served = |took_ms: &'static [u64], method: Method, status: StatusCode| {
            let p = per_worker.clone();
            std::thread::spawn(move || {
                let counts = p.worker();
                for &ms in took_ms {
                    let took = Duration::from_millis(ms);
                    counts.request_served("/template-details", &method, status, took);
                }
            })
            .join()
            .unwrap()
        };
        served(&[1, 2, 20], Method::GET, StatusCode::OK);
        served(&[7, 20_000], Method::GET, StatusCode::OK);
        served(
            &[1],
            Method::from_bytes(b"BREW").unwrap(),
            StatusCode::METHOD_NOT_ALLOWED,
        );

        let text = prometheus::TextEncoder::new()
            .encode_to_string(&registry.gather())
            .unwrap();
        let ok = r#"endpoint="/template-details",method="GET",status="200""#;
        for line in [
            format!("http_request_total{{{ok}}} 5"),
            format!("http_request_duration_seconds_bucket{{{ok},le=\"0.005\"}} 2"),
            format!("http_request_duration_seconds_bucket{{{ok},le=\"0.01\"}} 3"),
            format!("http_request_duration_seconds_bucket{{{ok},le=\"0.025\"}} 4"),
            format!("http_request_duration_seconds_bucket{{{ok},le=\"10\"}} 4"),
            format!("http_request_duration_seconds_bucket{{{ok},le=\"+Inf\"}} 5"),
            format!("http_request_duration_seconds_count{{{ok}}} 5"),
            r#"http_request_total{endpoint="/template-details",method="OTHER",status="405"} 1"#
                .to_owned(),
            "# TYPE http_request_duration_seconds histogram".to_owned(),
            "# TYPE http_request_total counter".to_owned(),
        ] {
            assert!(text.lines().any(|l| l == line), "no {line:?} in\n{text}");
        }
    }
}
