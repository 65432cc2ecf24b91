//! The KeyOwner's guarantees, checked with fake cache and database actors behind its
//! `Recipient`s (no Redis, no PostgreSQL): [`crate::actors::fakes`], shared with the benchmark.
//! Tests wait for conditions with a bound ([`eventually`]), never for a guessed time; the only
//! sleeps let a clock (a TTL) run out.
//!
//! This file holds the harness ([`Setup`], [`Harness`]); the tests are split by the owner's
//! ideas, as its own files are: [`flights`], [`near_cache`], [`supersede`], [`worker_copies`],
//! [`fleet`] and [`renewal`].

use std::collections::HashMap;
use std::time::{Duration, Instant};

use actix::prelude::*;
use tokio::sync::oneshot;

use super::*;
use crate::actors::fakes::{
    owner_deps, Counter, DbMode, FakeCache, FakeDb, FillAsPeer, HoldAsPeer,
};
use crate::http::worker_cache::WorkerCache;
use crate::metrics::Metrics;
use crate::template::{Lookup, Template};

mod fleet;
mod flights;
mod near_cache;
mod renewal;
mod supersede;
mod worker_copies;

/// How long a test waits for a condition before failing.
const PATIENCE: Duration = Duration::from_secs(10);

/// Polls `done` until it holds; fails the test after [`PATIENCE`].
async fn eventually(what: &str, mut done: impl FnMut() -> bool) {
    let started = Instant::now();
    while !done() {
        assert!(started.elapsed() < PATIENCE, "never happened: {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Which fake load produced an answer (`"query N"`, or `"cached"` for a seeded Redis value).
fn loaded_by(answer: &Answer) -> Option<String> {
    match &answer.result {
        Ok(Lookup::Found(body)) => serde_json::from_slice::<Template>(body)
            .ok()
            .map(|t| t.content),
        _ => None,
    }
}

struct Harness {
    owner: Addr<KeyOwner>,
    cache: Addr<FakeCache>,
    lease_claims: Counter,
    lease_fills: Counter,
    lease_releases: Counter,
    lease_extend_calls: Counter,
    cache_gets: Counter,
    cache_get_manys: Counter,
    cache_sets: Counter,
    cache_dels: Counter,
    db_queries: Counter,
    metrics: Metrics,
    generations: Generations,
}

/// Defines [`Setup`] and a setter per field, so that a test names only what its setup changes:
/// `Setup::default().db_delay(Duration::ZERO).start()`.
macro_rules! setup {
    ($($(#[$doc:meta])* $field:ident: $type:ty,)*) => {
        struct Setup {
            $($(#[$doc])* $field: $type,)*
        }

        impl Setup {
            $(
                fn $field(mut self, $field: $type) -> Self {
                    self.$field = $field;
                    self
                }
            )*
        }
    };
}

setup! {
    mode: DbMode,
    db_delay: Duration,
    db_delays: HashMap<i64, Duration>,
    cache_delay: Duration,
    cache_set_delay: Duration,
    cached: Vec<i64>,
    /// Ids whose cached value is past its soft expiry.
    stale_cached: Vec<i64>,
    /// Ids whose cached value becomes soft-expired after the given time.
    expiring_cached: Vec<(i64, Duration)>,
    /// The fake cache forgets every write (a Redis that is always empty).
    forgetful_cache: bool,
    /// The fleet lease on, with leases lasting this long.
    lease_ttl: Option<Duration>,
    /// Every lease call fails (Redis unreachable).
    lease_failing: bool,
    owner: OwnerSettings,
}

impl Default for Setup {
    fn default() -> Self {
        Setup {
            mode: DbMode::Rows,
            db_delay: Duration::from_millis(100),
            db_delays: HashMap::new(),
            cache_delay: Duration::ZERO,
            cache_set_delay: Duration::ZERO,
            cached: Vec::new(),
            stale_cached: Vec::new(),
            expiring_cached: Vec::new(),
            forgetful_cache: false,
            lease_ttl: None,
            lease_failing: false,
            owner: OwnerSettings::default(),
        }
    }
}

impl Setup {
    /// Starts the owner (supervised, as in the service) on an arbiter of its own, and the fakes
    /// on another.
    fn start(self) -> Harness {
        let fakes = Arbiter::new();
        let fresh = self.cached.iter().map(|&id| (id, Duration::from_secs(30)));
        let stale = self.stale_cached.iter().map(|&id| (id, Duration::ZERO));
        let expiring = self.expiring_cached.iter().copied();
        let store = FakeCache::entries(fresh.chain(stale).chain(expiring), "cached");
        let mut cache = FakeCache::new(store);
        cache.get_delay = self.cache_delay;
        cache.set_delay = self.cache_set_delay;
        cache.forgetful = self.forgetful_cache;
        cache.leases.ttl = self.lease_ttl.unwrap_or(Duration::from_millis(300));
        cache.leases.failing = self.lease_failing;
        let (cache_gets, cache_sets, cache_dels) =
            (cache.gets.clone(), cache.sets.clone(), cache.dels.clone());
        let cache_get_manys = cache.get_manys.clone();
        let (lease_claims, lease_fills, lease_releases, lease_extend_calls) = (
            cache.leases.claims.clone(),
            cache.leases.fills.clone(),
            cache.leases.releases.clone(),
            cache.leases.extend_calls.clone(),
        );
        let cache = FakeCache::start_in_arbiter(&fakes.handle(), move |_| cache);
        let mut db = FakeDb::new(self.mode, self.db_delay);
        db.delays = self.db_delays;
        let db_queries = db.queries.clone();
        let db = FakeDb::start_in_arbiter(&fakes.handle(), move |_| db);
        let metrics = Metrics::new().expect("metrics");
        let generations = Generations::default();
        let deps = owner_deps(
            &cache,
            &db,
            self.lease_ttl,
            self.owner,
            metrics.clone(),
            generations.clone(),
        );
        let owner =
            Supervisor::start_in_arbiter(&Arbiter::new().handle(), move |_| KeyOwner::new(0, deps));
        Harness {
            owner,
            cache,
            lease_claims,
            lease_fills,
            lease_releases,
            lease_extend_calls,
            cache_gets,
            cache_get_manys,
            cache_sets,
            cache_dels,
            db_queries,
            metrics,
            generations,
        }
    }
}

impl Harness {
    /// An HTTP worker's cache of fresh answers, as the service gives each worker one.
    fn worker_cache(&self, capacity: usize) -> WorkerCache {
        WorkerCache::new(capacity, self.generations.clone())
    }

    fn ask(&self, id: i64) -> oneshot::Receiver<Answer> {
        let (reply, answer) = oneshot::channel();
        self.owner.do_send(GetTemplate {
            id,
            reply,
            span: tracing::Span::none(),
        });
        answer
    }

    /// Sends `n` requests for `id` at once and collects every answer (bounded wait).
    async fn burst(&self, id: i64, n: usize) -> Vec<Answer> {
        let receivers: Vec<_> = (0..n).map(|_| self.ask(id)).collect();
        let mut answers = Vec::with_capacity(n);
        for rx in receivers {
            answers.push(receive(rx).await);
        }
        answers
    }

    async fn one(&self, id: i64) -> Answer {
        self.burst(id, 1).await.remove(0)
    }

    fn pending_flights(&self) -> i64 {
        self.metrics
            .key_owner_inflight_keys
            .with_label_values(&["0"])
            .get()
    }

    fn waiting(&self) -> i64 {
        self.metrics
            .key_owner_waiters
            .with_label_values(&["0"])
            .get()
    }

    fn queries(&self) -> usize {
        self.db_queries.get()
    }

    fn sets(&self) -> usize {
        self.cache_sets.get()
    }

    fn dels(&self) -> usize {
        self.cache_dels.get()
    }

    fn gets(&self) -> usize {
        self.cache_gets.get()
    }

    /// Another replica claims `id`'s lease for `for_` (and never fills unless told to).
    async fn hold_as_peer(&self, id: i64, for_: Duration) {
        self.cache.send(HoldAsPeer { id, for_ }).await.unwrap();
    }

    /// Another replica fills `id` with `content`, and its notice reaches the owner.
    async fn fill_as_peer(&self, id: i64, content: &'static str) {
        self.cache.send(FillAsPeer { id, content }).await.unwrap();
        self.owner.do_send(PeerFilled {
            id,
            wrote_nothing: false,
        });
    }

    /// Requests shed at once for `reason`.
    fn shed(&self, reason: &str) -> u64 {
        self.metrics
            .shed_requests_total
            .with_label_values(&[reason])
            .get()
    }

    /// Waits until no flight is pending and nobody waits.
    async fn idle(&self) {
        eventually("every flight ended", || {
            (self.pending_flights(), self.waiting()) == (0, 0)
        })
        .await;
    }
}

/// One answer, within [`PATIENCE`].
async fn receive(rx: oneshot::Receiver<Answer>) -> Answer {
    tokio::time::timeout(PATIENCE, rx)
        .await
        .expect("no waiter may hang")
        .expect("the owner answers every waiter")
}

fn count(answers: &[Answer], x: XCache) -> usize {
    answers.iter().filter(|a| a.x_cache == x).count()
}

/// A bug in the owner itself, for the test below.
#[derive(Message)]
#[rtype(result = "()")]
struct Bug;

impl Handler<Bug> for KeyOwner {
    type Result = ();
    fn handle(&mut self, _: Bug, ctx: &mut Self::Context) {
        contain(self, ctx, "a test's bug", |_, _| {
            panic!("a bug in the owner")
        });
    }
}

/// An owner (with `owner`'s settings) whose first load succeeds and every later one fails,
/// over a Redis that is always empty: what it remembered is all it has.
fn failing_after_one_load(owner: OwnerSettings) -> Harness {
    Setup::default()
        .mode(DbMode::FailAfter(1))
        .forgetful_cache(true)
        .db_delay(Duration::ZERO)
        .owner(owner)
        .start()
}

fn near_cache_ttl(ms: u64) -> OwnerSettings {
    OwnerSettings {
        near_cache_ttl: Duration::from_millis(ms),
        ..Default::default()
    }
}

fn leased() -> Setup {
    Setup {
        lease_ttl: Some(Duration::from_millis(300)),
        ..Setup::default()
    }
}

/// A renewal that gets no answer: its reply was dropped.
async fn dropped(rx: oneshot::Receiver<Answer>) {
    let outcome = tokio::time::timeout(PATIENCE, rx)
        .await
        .expect("no renewal may hang");
    assert!(outcome.is_err(), "no answer, got {outcome:?}");
}
