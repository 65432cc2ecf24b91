//! What the actor layer costs per request: the KeyOwner round trip (ask → owner → answer, and
//! through the cache actor when the owner's near cache cannot answer) with fake cache and
//! database actors, so that neither Redis nor PostgreSQL is in the figure. Throughput is in
//! requests (elements) per second.
//!
//! - `sequential/near_cache` and `sequential/cache_actor`, one owner: one request at a time,
//!   answered from the owner's near cache, or (near cache off) by a flight through the cache
//!   actor: the latency of the round trip, two thread hops (bench thread → owner thread →
//!   bench thread) plus the owner's own work.
//! - `hot_key/{1,2,4}_shards`: 256 requests in flight, all for one key, service defaults.
//! - `spread/{1,2,4}_shards`: 256 requests in flight over 1,000 keys spread across the owners by
//!   `shard_for`, as the HTTP workers do, service defaults (near cache on).
//! - `spread_cache_actor/{1,2,4}_shards`: the same with the near cache off, so every request
//!   is a flight through the owner's cache actor (as a service with `NEAR_CACHE_TTL_MS=0`).
//!
//! As in the service, each owner runs on an arbiter (thread) of its own with its cache actor
//! beside it; the fake database gets a thread of its own. The requests come from the bench
//! thread, which stands in for the HTTP workers: on a 2-core machine it competes with the
//! owners for the cores, just as the workers do.
//!
//! `cargo bench --bench key_owner`

use std::time::{Duration, Instant};

use actix::prelude::*;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use futures_util::stream::{FuturesUnordered, StreamExt};
use tokio::sync::oneshot;

use singleflight::actors::fakes::{self, DbMode, FakeCache, FakeDb};
use singleflight::actors::key_owner::{
    shard_for, Answer, Generations, GetTemplate, KeyOwner, OwnerSettings,
};
use singleflight::metrics::Metrics;

/// Templates the fakes know: ids `1..=KEYS`, every one of them in the cache.
const KEYS: i64 = fakes::ROWS;
/// What the cached templates say (about the size of a real one).
const CONTENT: &str = "Hello {{customer.first_name}}, your order {{order.id}} has shipped.";
/// Longer than the whole run: every cached template stays fresh.
const FRESH_FOR: Duration = Duration::from_secs(24 * 3600);
/// Requests kept in flight by the concurrent benchmarks (about the `wrk -c200` of the hot-path
/// figures in BENCHMARKS.md).
const IN_FLIGHT: usize = 256;

/// `shards` owners as the service starts them, on arbiters that live as long as this value.
struct Owners {
    owners: Vec<Addr<KeyOwner>>,
    _arbiters: Vec<Arbiter>,
}

impl Owners {
    fn start(shards: usize, settings: &OwnerSettings) -> Owners {
        let mut arbiters = Vec::new();
        let db_arbiter = Arbiter::new();
        // Asked only for a key the cache lacks, which no benchmark asks for; no delay.
        let db = FakeDb::start_in_arbiter(&db_arbiter.handle(), |_| {
            FakeDb::new(DbMode::Rows, Duration::ZERO)
        });
        arbiters.push(db_arbiter);
        let metrics = Metrics::new().expect("a fresh metrics registry");
        let generations = Generations::default();
        let mut owners = Vec::new();
        for shard in 0..shards {
            let arbiter = Arbiter::new();
            // No delays: the cache answers within its handler.
            let store = FakeCache::entries((1..=KEYS).map(|id| (id, FRESH_FOR)), CONTENT);
            let cache = FakeCache::start_in_arbiter(&arbiter.handle(), |_| FakeCache::new(store));
            let (settings, metrics) = (settings.clone(), metrics.clone());
            let deps = fakes::owner_deps(&cache, &db, None, settings, metrics, generations.clone());
            owners.push(KeyOwner::start_in_arbiter(&arbiter.handle(), move |_| {
                KeyOwner::new(shard, deps)
            }));
            arbiters.push(arbiter);
        }
        Owners {
            owners,
            _arbiters: arbiters,
        }
    }

    fn ask(&self, id: i64) -> oneshot::Receiver<Answer> {
        let (reply, answer) = oneshot::channel();
        self.owners[shard_for(id, self.owners.len())].do_send(GetTemplate {
            id,
            reply,
            span: tracing::Span::none(),
        });
        answer
    }

    /// Sends `n` requests for the ids `next_id` yields, at most `window` in flight, and returns
    /// how long it took until the last answer arrived.
    async fn drive(&self, n: u64, window: usize, mut next_id: impl FnMut() -> i64) -> Duration {
        let started = Instant::now();
        let mut in_flight = FuturesUnordered::new();
        let mut sent = 0u64;
        while sent < n && in_flight.len() < window {
            in_flight.push(self.ask(next_id()));
            sent += 1;
        }
        while let Some(answer) = in_flight.next().await {
            let answer = answer.expect("the owner answers every request");
            assert!(answer.result.is_ok(), "{answer:?}");
            if sent < n {
                in_flight.push(self.ask(next_id()));
                sent += 1;
            }
        }
        started.elapsed()
    }
}

/// A cheap deterministic id sequence over `1..=KEYS` (a multiplicative step that visits
/// every key), so that the spread benchmark costs no random-number generation.
fn spread_ids() -> impl FnMut() -> i64 {
    let mut i: i64 = 0;
    move || {
        i = (i + 617) % KEYS;
        i + 1
    }
}

fn key_owner(c: &mut Criterion) {
    let system = System::new();
    let defaults = OwnerSettings::default();
    let no_near_cache = OwnerSettings {
        near_cache_ttl: Duration::ZERO,
        ..OwnerSettings::default()
    };
    let mut group = c.benchmark_group("key_owner");
    group
        .throughput(Throughput::Elements(1))
        .sample_size(20)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(4));

    for (label, settings) in [("near_cache", &defaults), ("cache_actor", &no_near_cache)] {
        let one = system.block_on(async { Owners::start(1, settings) });
        group.bench_function(BenchmarkId::new("sequential", label), |b| {
            b.iter_custom(|iters| system.block_on(one.drive(iters, 1, || 1)))
        });
    }

    for shards in [1, 2, 4] {
        let label = format!("{shards}_shards");
        let owners = system.block_on(async { Owners::start(shards, &defaults) });
        group.bench_function(BenchmarkId::new("hot_key", &label), |b| {
            b.iter_custom(|iters| system.block_on(owners.drive(iters, IN_FLIGHT, || 1)))
        });
        group.bench_function(BenchmarkId::new("spread", &label), |b| {
            b.iter_custom(|iters| system.block_on(owners.drive(iters, IN_FLIGHT, spread_ids())))
        });
        let owners = system.block_on(async { Owners::start(shards, &no_near_cache) });
        group.bench_function(BenchmarkId::new("spread_cache_actor", &label), |b| {
            b.iter_custom(|iters| system.block_on(owners.drive(iters, IN_FLIGHT, spread_ids())))
        });
    }
    group.finish();
}

criterion_group!(benches, key_owner);
criterion_main!(benches);
