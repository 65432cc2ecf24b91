//! What counting a request costs when every HTTP worker counts it at once: the seed's
//! `http_request_total` and `http_request_duration_seconds` and a cache-hit counter, updated
//! per request by 1 or 2 threads (standing in for HTTP workers on their own cores), two ways:
//!
//! - `shared`: what actix-web-prom's middleware does per request (the service lets it count
//!   every route but the hot one), on metrics every worker
//!   shares — `IntCounterVec::with_label_values(..).inc()`, `HistogramVec::with_label_values(..)
//!   .observe(..)` (a read lock and a reference count each, then the atomics) — plus a shared
//!   `IntCounter` for the hit;
//! - `per_worker`: the service's [`PerWorker`] counts, one slot per thread, summed at scrape.
//!
//! Throughput is in requests counted per second, all threads together: with shared counters a
//! second core adds contention (the cache lines move between the cores on every update), with
//! per-worker ones it adds throughput. Run it on a machine with two idle cores:
//!
//! `cargo bench --bench request_metrics`

use std::time::{Duration, Instant};

use actix_web::http::{Method, StatusCode};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use prometheus::{HistogramOpts, HistogramVec, IntCounter, IntCounterVec, Opts};

use singleflight::metrics::PerWorker;

const LABELS: [&str; 3] = ["/template-details", "GET", "200"];
const TOOK: Duration = Duration::from_micros(120);

/// Runs `count` `iters` times on each of `threads` threads at once; the time until all are done.
fn on_threads<F>(threads: usize, iters: u64, count: F) -> Duration
where
    F: Fn(u64) + Send + Sync + Copy,
{
    let started = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(move || count(iters));
        }
    });
    started.elapsed()
}

fn request_metrics(c: &mut Criterion) {
    let labels = ["endpoint", "method", "status"];
    let requests = IntCounterVec::new(Opts::new("http_request_total", "h"), &labels).unwrap();
    let durations = HistogramVec::new(
        HistogramOpts::new("http_request_duration_seconds", "h"),
        &labels,
    )
    .unwrap();
    let hits = IntCounter::new("worker_cache_hits_total", "h").unwrap();
    let per_worker = PerWorker::new(IntCounter::new("cache_hits_total", "h").unwrap()).unwrap();

    let mut group = c.benchmark_group("request_metrics");
    for threads in [1, 2] {
        group.throughput(Throughput::Elements(threads as u64));
        group.bench_with_input(BenchmarkId::new("shared", threads), &threads, |b, &n| {
            b.iter_custom(|iters| {
                let (requests, durations, hits) = (&requests, &durations, &hits);
                on_threads(n, iters, move |iters| {
                    for _ in 0..iters {
                        hits.inc();
                        requests.with_label_values(&LABELS).inc();
                        durations
                            .with_label_values(&LABELS)
                            .observe(TOOK.as_secs_f64());
                    }
                })
            })
        });
        group.bench_with_input(
            BenchmarkId::new("per_worker", threads),
            &threads,
            |b, &n| {
                b.iter_custom(|iters| {
                    let per_worker = &per_worker;
                    on_threads(n, iters, move |iters| {
                        // Made on the thread that counts, as each HTTP worker makes its own.
                        let counts = per_worker.worker();
                        for _ in 0..iters {
                            counts.worker_cache_hit();
                            counts.request_served(LABELS[0], &Method::GET, StatusCode::OK, TOOK);
                        }
                    })
                })
            },
        );
    }
    group.finish();
}

criterion_group!(benches, request_metrics);
criterion_main!(benches);
