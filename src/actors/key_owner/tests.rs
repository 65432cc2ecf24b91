//! The KeyOwner's guarantees, checked with fake cache and database actors behind its
//! `Recipient`s (no Redis, no PostgreSQL): [`crate::actors::fakes`], shared with the benchmark.
//! Tests wait for conditions with a bound ([`eventually`]), never for a guessed time; the only
//! sleeps let a clock (a TTL) run out.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use actix::prelude::*;
use tokio::sync::oneshot;

use super::*;
use crate::actors::fakes::{Counter, DbMode, FakeCache, FakeDb, FillAsPeer, HoldAsPeer};
use crate::http::worker_cache::WorkerCache;
use crate::template::{Lookup, Template};

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
    lease_renew_calls: Counter,
    cache_gets: Counter,
    cache_get_manys: Counter,
    cache_sets: Counter,
    cache_dels: Counter,
    db_queries: Counter,
    metrics: Metrics,
    generations: Generations,
}

struct Setup {
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
        let (lease_claims, lease_fills, lease_releases, lease_renew_calls) = (
            cache.leases.claims.clone(),
            cache.leases.fills.clone(),
            cache.leases.releases.clone(),
            cache.leases.renew_calls.clone(),
        );
        let cache = FakeCache::start_in_arbiter(&fakes.handle(), move |_| cache);
        let mut db = FakeDb::new(self.mode, self.db_delay);
        db.delays = self.db_delays;
        let db_queries = db.queries.clone();
        let db = FakeDb::start_in_arbiter(&fakes.handle(), move |_| db);
        let metrics = Metrics::new().expect("metrics");
        let generations = Generations::default();
        let deps = KeyOwnerDeps {
            cache_get: cache.clone().recipient(),
            cache_get_many: cache.clone().recipient(),
            cache_set: cache.clone().recipient(),
            cache_del: cache.clone().recipient(),
            db: db.recipient(),
            lease: self.lease_ttl.map(|ttl| LeaseDeps {
                claim: cache.clone().recipient(),
                renew: cache.clone().recipient(),
                fill: cache.clone().recipient(),
                release: cache.clone().recipient(),
                ttl,
            }),
            settings: self.owner,
            metrics: metrics.clone(),
            generations: generations.clone(),
        };
        let owner =
            Supervisor::start_in_arbiter(&Arbiter::new().handle(), move |_| KeyOwner::new(0, deps));
        Harness {
            owner,
            cache,
            lease_claims,
            lease_fills,
            lease_releases,
            lease_renew_calls,
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
        self.owner.do_send(GetTemplate { id, reply });
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

#[actix_rt::test]
async fn a_cold_stampede_costs_one_cache_read_and_one_query() {
    let h = Setup::default().start();
    let answers = h.burst(7, 200).await;

    assert_eq!(h.gets(), 1, "one Redis read");
    assert_eq!(h.queries(), 1, "one database query");
    let first = &answers[0].result;
    assert!(matches!(first, Ok(Lookup::Found(_))));
    assert!(
        answers.iter().all(|a| &a.result == first),
        "identical answers"
    );
    assert_eq!(count(&answers, XCache::Miss), 1);
    assert_eq!(count(&answers, XCache::Shared), 199);
    assert_eq!(h.metrics.singleflight_shared_total.get(), 199);
    assert_eq!(h.metrics.cache_misses_total.get(), 200);
    h.idle().await;
    assert_eq!(h.sets(), 1, "one cache fill");
}

#[actix_rt::test]
async fn a_hot_key_is_read_from_the_cache_once_per_flight() {
    let h = Setup {
        cached: vec![3],
        cache_delay: Duration::from_millis(50),
        ..Default::default()
    }
    .start();
    let answers = h.burst(3, 200).await;
    assert_eq!(h.gets(), 1);
    assert_eq!(h.queries(), 0);
    assert_eq!(count(&answers, XCache::Hit), 200);
    assert_eq!(h.metrics.cache_hits_total.get(), 200);
    assert_eq!(h.metrics.cache_reads_coalesced_total.get(), 199);
}

#[actix_rt::test]
async fn a_request_after_the_flight_finds_the_cache_filled() {
    // No near cache: the second answer can only come from what the flight wrote.
    let h = Setup {
        owner: near_cache_ttl(0),
        ..Default::default()
    }
    .start();
    let first = h.one(9).await;
    assert_eq!(first.x_cache, XCache::Miss);
    h.idle().await;
    assert_eq!(h.sets(), 1, "the flight wrote what it loaded");
    let again = h.one(9).await;
    assert_eq!(again.x_cache, XCache::Hit);
    assert_eq!(again.result, first.result, "the value the flight wrote");
    assert_eq!(h.gets(), 2, "read from the cache, not from memory");
    assert_eq!(h.queries(), 1);
}

#[actix_rt::test]
async fn a_request_during_the_cache_write_gets_the_loaded_value_at_once() {
    let h = Setup {
        cache_set_delay: Duration::from_millis(300),
        owner: near_cache_ttl(0),
        ..Default::default()
    }
    .start();
    let first = h.one(9).await;
    assert_eq!(
        first.x_cache,
        XCache::Miss,
        "answered before the write lands"
    );
    assert_eq!(h.pending_flights(), 1, "the write is still in the air");
    let during = h.one(9).await;
    assert_eq!(during.x_cache, XCache::Shared);
    assert_eq!(during.result, first.result);
    assert_eq!((h.queries(), h.gets()), (1, 1), "no second read or load");
    h.idle().await;
    assert_eq!(h.sets(), 1);
}

#[actix_rt::test]
async fn a_slow_key_does_not_delay_other_keys_on_the_same_owner() {
    let h = Setup {
        db_delays: HashMap::from([(1, Duration::from_secs(3))]),
        db_delay: Duration::from_millis(10),
        ..Default::default()
    }
    .start();
    let slow = h.ask(1);
    eventually("key 1's flight is loading", || h.queries() == 1).await;

    let started = Instant::now();
    let fast = h.one(2).await;
    assert!(matches!(fast.result, Ok(Lookup::Found(_))));
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "key 2 waited {:?} behind key 1's 3 s load",
        started.elapsed()
    );
    assert!(
        h.metrics
            .flights_total
            .with_label_values(&["database"])
            .get()
            <= 1,
        "key 1 is still loading"
    );
    drop(slow);
}

#[actix_rt::test]
async fn a_waiter_that_leaves_does_not_cancel_the_flight() {
    let h = Setup::default().start();
    // Every waiter but the last goes away before the load finishes, the first one included.
    let gone: Vec<_> = (0..10).map(|_| h.ask(11)).collect();
    let stays = h.ask(11);
    eventually("the waiters joined", || h.waiting() == 11).await;
    drop(gone);
    let answer = receive(stays).await;
    assert!(matches!(answer.result, Ok(Lookup::Found(_))));
    h.idle().await;
    assert_eq!(h.sets(), 1, "the flight filled the cache");

    // Even when every waiter leaves, the flight completes and fills the cache.
    let leaves = h.ask(12);
    eventually("the flight started", || h.queries() == 2).await;
    drop(leaves);
    eventually("the abandoned flight filled the cache", || h.sets() == 2).await;
    assert_eq!(h.one(12).await.x_cache, XCache::Hit);
    assert_eq!(h.queries(), 2);
}

#[actix_rt::test]
async fn a_request_whose_client_is_gone_starts_no_work() {
    let h = Setup::default().start();
    let (reply, answer) = oneshot::channel();
    drop(answer);
    h.owner.do_send(GetTemplate { id: 13, reply });
    eventually("the owner saw it", || {
        h.metrics.requests_abandoned_total.get() == 1
    })
    .await;
    assert_eq!((h.gets(), h.queries()), (0, 0), "no read, no load");
    assert_eq!(h.pending_flights(), 0);
    assert_eq!(
        h.metrics.cache_hits_total.get() + h.metrics.cache_misses_total.get(),
        0
    );
}

#[actix_rt::test]
async fn a_failed_flight_answers_every_waiter_and_is_not_cached() {
    let h = Setup {
        mode: DbMode::FailFirst(1),
        ..Default::default()
    }
    .start();
    let answers = h.burst(5, 50).await;
    assert!(answers
        .iter()
        .all(|a| matches!(a.result, Err(FlightError::Database(_)))));
    assert_eq!(h.queries(), 1);
    h.idle().await;
    assert_eq!(h.sets(), 0, "errors are not cached");

    let retry = h.one(5).await;
    assert!(
        matches!(retry.result, Ok(Lookup::Found(_))),
        "the next request tries again"
    );
    assert_eq!(h.queries(), 2);
}

#[actix_rt::test]
async fn a_flight_that_times_out_answers_every_waiter_and_leaves_no_entry() {
    let h = Setup {
        mode: DbMode::Hang,
        owner: OwnerSettings {
            flight_timeout: Duration::from_millis(200),
            ..Default::default()
        },
        ..Default::default()
    }
    .start();
    let answers = h.burst(5, 20).await;
    assert!(answers
        .iter()
        .all(|a| a.result == Err(FlightError::Timeout(Duration::from_millis(200)))));
    h.idle().await;
    let _ = h.one(5).await;
    assert_eq!(h.queries(), 2, "a new flight after the failed one");
}

#[actix_rt::test]
async fn a_panic_in_a_database_call_is_reported_as_a_panic_to_every_waiter() {
    let h = Setup {
        mode: DbMode::Panic,
        ..Default::default()
    }
    .start();
    let answers = h.burst(5, 20).await;
    let panicked = Err(FlightError::Panicked("a database call"));
    assert!(
        answers.iter().all(|a| a.result == panicked),
        "{:?}",
        answers[0]
    );
    h.idle().await;
    assert_eq!(h.sets(), 0, "nothing cached");
    // The owner and the (fake) database actor both survived: the next request loads again.
    assert_eq!(h.one(5).await.result, panicked);
    assert_eq!(h.queries(), 2);
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

#[actix_rt::test]
async fn an_owner_that_panics_answers_its_waiters_and_is_restarted() {
    let h = Setup {
        db_delay: Duration::from_millis(300),
        ..Default::default()
    }
    .start();
    let _ = h.one(3).await;
    let waiters: Vec<_> = (0..5).map(|_| h.ask(4)).collect();
    eventually("the waiters joined", || h.waiting() == 5).await;

    h.owner.do_send(Bug);
    for rx in waiters {
        let answer = receive(rx).await;
        assert_eq!(answer.result, Err(FlightError::Panicked("the key owner")));
    }
    assert_eq!(
        h.metrics
            .actor_restarts_total
            .with_label_values(&["key_owner"])
            .get(),
        1
    );
    assert_eq!((h.pending_flights(), h.waiting()), (0, 0));
    // Same address, fresh state: key 3 is no longer remembered, and is served from the cache.
    let after = h.one(3).await;
    assert_eq!(after.x_cache, XCache::Hit);
    assert_eq!(
        h.gets(),
        3,
        "read from the cache again, not from the lost near cache"
    );
    assert!(h.one(4).await.result.is_ok());
}

#[actix_rt::test]
async fn not_found_is_shared_like_any_answer() {
    let h = Setup::default().start();
    let answers = h.burst(5000, 30).await;
    assert!(answers.iter().all(|a| a.result == Ok(Lookup::NotFound)));
    assert_eq!(h.queries(), 1);
}

#[actix_rt::test]
async fn coalesce_off_makes_every_request_load_on_its_own() {
    let h = Setup {
        owner: OwnerSettings {
            coalesce: false,
            ..Default::default()
        },
        ..Default::default()
    }
    .start();
    let answers = h.burst(8, 50).await;
    assert_eq!(h.gets(), 50);
    assert_eq!(h.queries(), 50);
    assert_eq!(count(&answers, XCache::Miss), 50);
    assert_eq!(h.metrics.singleflight_shared_total.get(), 0);
    assert_eq!((h.pending_flights(), h.waiting()), (0, 0));
}

fn near_cache_ttl(ms: u64) -> OwnerSettings {
    OwnerSettings {
        near_cache_ttl: Duration::from_millis(ms),
        ..Default::default()
    }
}

#[actix_rt::test]
async fn the_near_cache_answers_fresh_keys_without_a_cache_read() {
    let h = Setup {
        owner: near_cache_ttl(1000),
        db_delay: Duration::ZERO,
        ..Default::default()
    }
    .start();
    assert_eq!(h.one(4).await.x_cache, XCache::Miss);
    for _ in 0..50 {
        assert_eq!(h.one(4).await.x_cache, XCache::Hit);
    }
    assert_eq!(h.gets(), 1, "no Redis read while fresh");
    assert_eq!(h.metrics.near_cache_hits_total.get(), 50);

    // Let the near-cache TTL run out.
    tokio::time::sleep(Duration::from_millis(1050)).await;
    assert_eq!(
        h.one(4).await.x_cache,
        XCache::Hit,
        "from Redis after the near TTL"
    );
    assert_eq!(h.gets(), 2);
    assert_eq!(h.queries(), 1);
}

#[actix_rt::test]
async fn the_near_cache_never_answers_hit_past_the_soft_expiry() {
    // Near cache 5 s, but the Redis entry is fresh for only 1 s more.
    let h = Setup {
        expiring_cached: vec![(6, Duration::from_secs(1))],
        db_delay: Duration::from_millis(300),
        owner: near_cache_ttl(5000),
        ..Default::default()
    }
    .start();
    assert_eq!(h.one(6).await.x_cache, XCache::Hit);
    assert_eq!(h.one(6).await.x_cache, XCache::Hit, "near cache");
    assert_eq!(h.gets(), 1);
    // Let the soft expiry pass.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let answers = h.burst(6, 10).await;
    assert!(
        answers.iter().all(|a| a.x_cache == XCache::Stale),
        "{:?}",
        answers[0]
    );
    assert_eq!(h.gets(), 2, "back to Redis, which says soft-expired");
    // The owner counts the refresh just after answering the waiters, on its own thread.
    h.idle().await;
    assert_eq!(h.metrics.refreshes_total.get(), 1);
}

#[actix_rt::test]
async fn not_found_is_remembered_too() {
    let h = Setup {
        forgetful_cache: true,
        db_delay: Duration::ZERO,
        ..Default::default()
    }
    .start();
    for _ in 0..20 {
        assert_eq!(h.one(5555).await.result, Ok(Lookup::NotFound));
    }
    assert_eq!(h.queries(), 1, "one query per unknown id per window");
}

#[actix_rt::test]
async fn a_failed_load_answers_a_remembered_value_as_stale() {
    let h = Setup {
        mode: DbMode::FailAfter(1),
        forgetful_cache: true,
        db_delay: Duration::ZERO,
        owner: near_cache_ttl(50),
        ..Default::default()
    }
    .start();
    let fresh = h.one(6).await;
    assert_eq!(fresh.x_cache, XCache::Miss);
    // Let the near-cache TTL run out.
    tokio::time::sleep(Duration::from_millis(80)).await;

    let answers = h.burst(6, 10).await;
    assert!(answers
        .iter()
        .all(|a| a.x_cache == XCache::Stale && a.result == fresh.result));
    assert_eq!(h.metrics.stale_answers_total.get(), 10);
    assert_eq!(h.queries(), 2, "the failed reload was one query");
}

#[actix_rt::test]
async fn without_max_stale_a_failed_load_is_an_error() {
    let h = Setup {
        mode: DbMode::FailAfter(1),
        forgetful_cache: true,
        db_delay: Duration::ZERO,
        owner: OwnerSettings {
            near_cache_ttl: Duration::from_millis(50),
            max_stale: Duration::ZERO,
            ..Default::default()
        },
        ..Default::default()
    }
    .start();
    assert!(h.one(6).await.result.is_ok());
    // Let the near-cache TTL run out.
    tokio::time::sleep(Duration::from_millis(80)).await;
    assert!(matches!(
        h.one(6).await.result,
        Err(FlightError::Database(_))
    ));
}

#[actix_rt::test]
async fn requests_beyond_the_owner_bounds_are_shed_at_once() {
    let h = Setup {
        db_delay: Duration::from_millis(1000),
        owner: OwnerSettings {
            max_pending_keys: 2,
            max_waiters_per_key: 3,
            ..Default::default()
        },
        ..Default::default()
    }
    .start();
    let first = h.ask(1);
    let second = h.ask(2);
    let started = Instant::now();
    let third = h.one(3).await;
    assert_eq!(
        third.result,
        Err(FlightError::Shed(ShedReason::PendingKeys))
    );
    assert!(
        started.elapsed() < Duration::from_millis(250),
        "shed without waiting"
    );

    let joined: Vec<_> = (0..4).map(|_| h.ask(1)).collect();
    let mut shed = 0;
    for rx in joined {
        if receive(rx).await.result == Err(FlightError::Shed(ShedReason::Waiters)) {
            shed += 1;
        }
    }
    assert_eq!(shed, 2, "key 1 takes its starter and 2 more waiters");
    assert!(receive(first).await.result.is_ok());
    assert!(receive(second).await.result.is_ok());
    assert_eq!(
        h.metrics
            .shed_requests_total
            .with_label_values(&["pending_keys"])
            .get(),
        1
    );
    assert_eq!(
        h.metrics
            .shed_requests_total
            .with_label_values(&["waiters"])
            .get(),
        2
    );
    h.idle().await;
    assert!(
        h.one(3).await.result.is_ok(),
        "served once the load is gone"
    );
}

#[actix_rt::test]
async fn the_near_cache_is_bounded() {
    let h = Setup {
        forgetful_cache: true,
        db_delay: Duration::ZERO,
        owner: OwnerSettings {
            near_cache_capacity: 10,
            ..Default::default()
        },
        ..Default::default()
    }
    .start();
    for id in 1..=30 {
        let _ = h.one(id).await;
    }
    // Ids 21..=30 are remembered; 1 was evicted and must be loaded again.
    let _ = h.one(30).await;
    assert_eq!(h.queries(), 30);
    let _ = h.one(1).await;
    assert_eq!(h.queries(), 31);
}

#[actix_rt::test]
async fn a_soft_expired_value_is_answered_at_once_as_stale_and_refreshed_once() {
    let h = Setup {
        stale_cached: vec![8],
        db_delay: Duration::from_millis(300),
        ..Default::default()
    }
    .start();
    let answers = h.burst(8, 50).await;
    // The near cache included: nobody gets a soft-expired value as a HIT.
    assert_eq!(count(&answers, XCache::Stale), 50, "{:?}", answers[0]);
    assert!(answers
        .iter()
        .all(|a| loaded_by(a).as_deref() == Some("cached")));
    // Every answer arrived while the refresh was still loading: nobody waited on the database.
    eventually("the refresh was sent", || h.queries() == 1).await;
    assert_eq!(h.sets(), 0, "the refresh has not written yet");
    assert_eq!(h.metrics.refreshes_total.get(), 1);

    h.idle().await;
    assert_eq!(h.queries(), 1, "exactly one refresh");
    assert_eq!(h.sets(), 1, "the refresh rewrote the entry");
    let after = h.one(8).await;
    assert_eq!(after.x_cache, XCache::Hit);
    assert_eq!(loaded_by(&after).as_deref(), Some("query 0"));
    assert_eq!(h.metrics.cache_misses_total.get(), 0, "no request missed");
}

#[actix_rt::test]
async fn requests_during_a_refresh_get_the_soft_expired_value_at_once() {
    // No near cache: only the refreshing flight itself can spare them the wait.
    let h = Setup {
        stale_cached: vec![8],
        db_delay: Duration::from_millis(300),
        owner: near_cache_ttl(0),
        ..Default::default()
    }
    .start();
    assert_eq!(h.one(8).await.x_cache, XCache::Stale);
    let during = h.burst(8, 20).await;
    assert!(
        during.iter().all(|a| a.x_cache == XCache::Stale),
        "{:?}",
        during[0]
    );
    assert_eq!(h.sets(), 0, "answered while the refresh is still loading");
    assert_eq!(h.metrics.refreshes_total.get(), 1);

    h.idle().await;
    assert_eq!(
        h.one(8).await.x_cache,
        XCache::Hit,
        "the refreshed value, from the cache"
    );
    assert_eq!(h.queries(), 1);
}

#[actix_rt::test]
async fn invalidate_drops_the_key_everywhere() {
    let h = Setup {
        db_delay: Duration::ZERO,
        ..Default::default()
    }
    .start();
    assert_eq!(h.one(9).await.x_cache, XCache::Miss);
    assert_eq!(h.one(9).await.x_cache, XCache::Hit);
    assert_eq!(h.gets(), 1, "near cache");
    h.idle().await;

    h.owner.do_send(Invalidate(9));
    assert_eq!(
        h.one(9).await.x_cache,
        XCache::Miss,
        "reloaded, not served from memory or the cache"
    );
    assert_eq!(h.dels(), 1);
    assert_eq!(h.queries(), 2);
    assert_eq!(h.metrics.invalidations_total.get(), 1);
}

#[actix_rt::test]
async fn after_an_invalidation_new_requests_never_join_the_old_flight() {
    let h = Setup {
        db_delay: Duration::from_millis(200),
        ..Default::default()
    }
    .start();
    let before = h.ask(10);
    eventually("the first load is in the air", || h.queries() == 1).await;
    h.owner.do_send(Invalidate(10));
    let after = h.burst(10, 5).await;

    let before = receive(before).await;
    assert_eq!(before.x_cache, XCache::Miss);
    assert_eq!(
        loaded_by(&before).as_deref(),
        Some("query 0"),
        "joined before"
    );
    for answer in &after {
        assert_eq!(
            loaded_by(answer).as_deref(),
            Some("query 1"),
            "a load that began after the change"
        );
    }
    assert_eq!(count(&after, XCache::Miss), 1, "a new flight of their own");
    assert_eq!(count(&after, XCache::Shared), 4);
    h.idle().await;
    assert_eq!(h.sets(), 1, "only the new flight wrote to the cache");
    assert_eq!(h.dels(), 1, "only the invalidation's own delete");
    let next = h.one(10).await;
    assert_eq!(loaded_by(&next).as_deref(), Some("query 1"));
}

#[actix_rt::test]
async fn a_flight_superseded_during_its_cache_write_deletes_what_it_wrote() {
    let h = Setup {
        cache_set_delay: Duration::from_millis(200),
        owner: near_cache_ttl(0),
        ..Default::default()
    }
    .start();
    let answer = h.one(10).await;
    assert_eq!(answer.x_cache, XCache::Miss);
    assert_eq!(h.sets(), 0, "the write is still in the air");
    h.owner.do_send(Invalidate(10));
    eventually("the late write was deleted", || {
        h.sets() == 1 && h.dels() == 2
    })
    .await;
    h.idle().await;
    let next = h.one(10).await;
    assert_eq!(next.x_cache, XCache::Miss, "not found in the cache");
    assert_eq!(loaded_by(&next).as_deref(), Some("query 1"));
}

#[actix_rt::test]
async fn an_invalidated_refresh_stops_serving_its_old_value() {
    let h = Setup {
        stale_cached: vec![8],
        db_delays: HashMap::from([(8, Duration::from_millis(300))]),
        owner: near_cache_ttl(0),
        ..Default::default()
    }
    .start();
    let first = h.one(8).await;
    assert_eq!(first.x_cache, XCache::Stale);
    assert_eq!(loaded_by(&first).as_deref(), Some("cached"));
    h.owner.do_send(Invalidate(8));
    let after = h.one(8).await;
    assert_ne!(after.x_cache, XCache::Stale, "{after:?}");
    assert_eq!(loaded_by(&after).as_deref(), Some("query 1"));
    h.idle().await;
    assert_eq!(h.sets(), 1, "the superseded refresh wrote nothing");
}

#[actix_rt::test]
async fn forget_all_empties_the_near_cache_and_supersedes_every_flight() {
    let h = Setup {
        db_delay: Duration::ZERO,
        db_delays: HashMap::from([(20, Duration::from_millis(200))]),
        ..Default::default()
    }
    .start();
    for id in 1..=5 {
        let _ = h.one(id).await;
    }
    h.idle().await;
    let in_the_air = h.ask(20);
    eventually("key 20 is loading", || h.queries() == 6).await;
    h.owner.do_send(ForgetAll);
    for id in 1..=5 {
        assert_eq!(
            h.one(id).await.x_cache,
            XCache::Hit,
            "from the (fake) Redis, not memory"
        );
    }
    assert_eq!(h.gets(), 11);
    let after = h.one(20).await;
    assert_eq!(loaded_by(&after).as_deref(), Some("query 6"));
    assert_eq!(
        loaded_by(&receive(in_the_air).await).as_deref(),
        Some("query 5")
    );
}

// HTTP workers' caches: filled by near-cache hits and by current flights' remembered fresh
// answers, and emptied the moment the owner learns of a change (see `generations`).

/// Asks the owner for `id` as an HTTP worker does after missing its own cache: the worker keeps
/// what the owner allows it to.
async fn through_worker(h: &Harness, worker: &mut WorkerCache, id: i64) -> Answer {
    let answer = h.one(id).await;
    worker.keep(id, &answer);
    answer
}

#[actix_rt::test]
async fn a_worker_keeps_a_near_cache_hit_until_the_owner_would_stop_answering_it() {
    let h = Setup {
        owner: near_cache_ttl(1000),
        db_delay: Duration::ZERO,
        ..Default::default()
    }
    .start();
    let mut worker = h.worker_cache(10);
    let first = through_worker(&h, &mut worker, 4).await;
    assert_eq!(first.x_cache, XCache::Miss);
    assert!(first.fill.is_some(), "a remembered load fills too");
    // Taken out again, to see a near-cache hit fill it.
    let mut worker = h.worker_cache(10);

    let asked = Instant::now();
    let hit = through_worker(&h, &mut worker, 4).await;
    assert_eq!(hit.x_cache, XCache::Hit);
    let fill = hit.fill.expect("a near-cache hit comes with a fill");
    assert!(fill.fresh_until > asked);
    assert!(
        fill.fresh_until <= Instant::now() + Duration::from_millis(1000),
        "never past the near cache's own freshness"
    );
    for _ in 0..50 {
        assert_eq!(worker.get(4).map(|h| h.lookup), hit.result.clone().ok());
    }
    assert_eq!(
        h.metrics.near_cache_hits_total.get(),
        1,
        "one message, not 51"
    );

    // Let the fill's time run out.
    tokio::time::sleep_until((fill.fresh_until + Duration::from_millis(5)).into()).await;
    assert_eq!(worker.get(4), None);
    assert!(worker.is_empty(), "an expired entry is dropped");
}

#[actix_rt::test]
async fn a_worker_never_keeps_a_fill_past_the_soft_expiry() {
    // Near cache 5 s, but the Redis entry is fresh for only 1 s more.
    let h = Setup {
        expiring_cached: vec![(6, Duration::from_secs(1))],
        owner: near_cache_ttl(5000),
        ..Default::default()
    }
    .start();
    let asked = Instant::now();
    let _ = h.one(6).await;
    let fill = h.one(6).await.fill.expect("a near-cache hit");
    assert!(fill.fresh_until <= Instant::now() + Duration::from_secs(1));
    assert!(fill.fresh_until > asked);
}

#[actix_rt::test]
async fn an_invalidation_after_a_fill_makes_the_worker_miss_at_once() {
    let h = Setup {
        db_delay: Duration::ZERO,
        ..Default::default()
    }
    .start();
    let mut worker = h.worker_cache(10);
    for id in [9, 10] {
        let _ = through_worker(&h, &mut worker, id).await;
        let _ = through_worker(&h, &mut worker, id).await;
    }
    assert!(worker.get(9).is_some() && worker.get(10).is_some());

    // `send` returns once the owner has handled the change.
    h.owner.send(Invalidate(9)).await.expect("owner running");
    assert_eq!(
        worker.get(9),
        None,
        "the owner knows: the worker must not answer"
    );
    assert!(worker.get(10).is_some(), "another key keeps its entry");

    let reloaded = through_worker(&h, &mut worker, 9).await;
    assert_eq!(reloaded.x_cache, XCache::Miss);
    let hit = through_worker(&h, &mut worker, 9).await;
    assert_eq!(loaded_by(&hit).as_deref(), Some("query 2"));
    assert_eq!(
        worker.get(9).map(|h| h.lookup),
        hit.result.ok(),
        "kept again: the new value"
    );
}

#[actix_rt::test]
async fn forget_all_after_a_fill_makes_the_worker_miss_at_once() {
    let h = Setup {
        db_delay: Duration::ZERO,
        ..Default::default()
    }
    .start();
    let mut worker = h.worker_cache(100);
    for id in 1..=20 {
        let _ = through_worker(&h, &mut worker, id).await;
        let _ = through_worker(&h, &mut worker, id).await;
    }
    assert!((1..=20).all(|id| worker.get(id).is_some()));
    h.owner.send(ForgetAll).await.expect("owner running");
    assert!((1..=20).all(|id| worker.get(id).is_none()));
}

#[actix_rt::test]
async fn an_owner_restart_empties_the_workers_too() {
    let h = Setup {
        db_delay: Duration::ZERO,
        ..Default::default()
    }
    .start();
    let mut worker = h.worker_cache(10);
    let _ = through_worker(&h, &mut worker, 3).await;
    let _ = through_worker(&h, &mut worker, 3).await;
    assert!(worker.get(3).is_some());
    h.owner.do_send(Bug);
    eventually("the owner restarted", || {
        h.metrics
            .actor_restarts_total
            .with_label_values(&["key_owner"])
            .get()
            == 1
    })
    .await;
    assert_eq!(
        worker.get(3),
        None,
        "the owner forgot it, so must the worker"
    );
}

#[actix_rt::test]
async fn stale_shared_and_superseded_answers_are_never_kept() {
    // A remembered value answered because its reload failed.
    let h = Setup {
        mode: DbMode::FailAfter(1),
        forgetful_cache: true,
        db_delay: Duration::ZERO,
        owner: near_cache_ttl(50),
        ..Default::default()
    }
    .start();
    let mut worker = h.worker_cache(10);
    let _ = h.one(6).await;
    // Let the near-cache TTL run out.
    tokio::time::sleep(Duration::from_millis(80)).await;
    let stale = through_worker(&h, &mut worker, 6).await;
    assert_eq!((stale.x_cache, stale.fill), (XCache::Stale, None));
    assert!(worker.is_empty());

    // A soft-expired value from Redis, answered while it is refreshed.
    let h = Setup {
        stale_cached: vec![8],
        db_delays: HashMap::from([(8, Duration::from_millis(200))]),
        ..Default::default()
    }
    .start();
    let mut worker = h.worker_cache(10);
    for _ in 0..3 {
        let answer = through_worker(&h, &mut worker, 8).await;
        assert_eq!((answer.x_cache, answer.fill), (XCache::Stale, None));
    }
    assert!(worker.is_empty());

    // A flight superseded by a change, and the requests that shared a flight.
    let h = Setup {
        db_delay: Duration::from_millis(200),
        ..Default::default()
    }
    .start();
    let mut worker = h.worker_cache(10);
    let before = h.ask(10);
    eventually("the first load is in the air", || h.queries() == 1).await;
    h.owner.send(Invalidate(10)).await.expect("owner running");
    let after = h.burst(10, 5).await;
    let before = receive(before).await;
    assert_eq!(loaded_by(&before).as_deref(), Some("query 0"));
    assert_eq!(before.fill, None, "superseded: never kept");
    worker.keep(10, &before);
    assert!(worker.is_empty());
    // The flight after the change is the current one: its answers fill, with its own value.
    for answer in &after {
        assert_eq!(loaded_by(answer).as_deref(), Some("query 1"));
        assert!(answer.fill.is_some(), "{:?}", answer.x_cache);
        worker.keep(10, answer);
    }
    let kept = worker.get(10).map(|h| h.lookup);
    assert_eq!(kept, after[0].result.clone().ok(), "only the new value");
}

#[actix_rt::test]
async fn coalesce_off_answers_are_never_kept() {
    let h = Setup {
        owner: OwnerSettings {
            coalesce: false,
            ..Default::default()
        },
        db_delay: Duration::ZERO,
        ..Default::default()
    }
    .start();
    for _ in 0..5 {
        assert_eq!(h.one(2).await.fill, None);
    }
}

#[actix_rt::test]
async fn a_current_flights_fresh_answers_fill_workers_as_a_near_cache_hit_would() {
    // From PostgreSQL: the request that started the flight and those that shared it.
    let h = Setup {
        db_delay: Duration::from_millis(100),
        owner: near_cache_ttl(60_000),
        ..Default::default()
    }
    .start();
    let loaded = h.burst(3, 5).await;
    assert_eq!((count(&loaded, XCache::Miss), h.queries()), (1, 1));
    let hit = h.one(3).await;
    assert_eq!(hit.x_cache, XCache::Hit);
    let hit_fill = hit.fill.expect("a near-cache hit");
    for answer in &loaded {
        assert_eq!(answer.fill, Some(hit_fill), "{:?}", answer.x_cache);
    }
    let mut worker = h.worker_cache(10);
    worker.keep(3, &loaded[1]);
    assert_eq!(worker.get(3).map(|h| h.lookup), hit.result.clone().ok());

    // From Redis, answered to every request that joined the read.
    let h = Setup {
        cached: vec![7],
        cache_delay: Duration::from_millis(100),
        owner: near_cache_ttl(60_000),
        ..Default::default()
    }
    .start();
    let read = h.burst(7, 4).await;
    assert_eq!((count(&read, XCache::Hit), h.gets()), (4, 1));
    let hit_fill = h.one(7).await.fill.expect("a near-cache hit");
    assert!(read.iter().all(|a| a.fill == Some(hit_fill)));

    // The change that supersedes the flight comes after the fill: the worker misses at once.
    h.owner.send(Invalidate(7)).await.expect("owner running");
    let mut worker = h.worker_cache(10);
    worker.keep(7, &read[0]);
    assert_eq!(worker.get(7), None);
}

#[actix_rt::test]
async fn a_flight_answer_the_owner_did_not_remember_is_never_kept() {
    // Near cache off for fresh answers: nothing is remembered as fresh.
    let h = Setup {
        cached: vec![2],
        owner: near_cache_ttl(0),
        db_delay: Duration::ZERO,
        ..Default::default()
    }
    .start();
    for id in [1, 2] {
        for answer in h.burst(id, 3).await {
            assert!(answer.result.is_ok());
            assert_eq!(answer.fill, None, "{id}: {:?}", answer.x_cache);
        }
    }
    // A failed load, with nothing remembered: an error, never kept.
    let h = Setup {
        mode: DbMode::FailAfter(0),
        db_delay: Duration::ZERO,
        ..Default::default()
    }
    .start();
    let failed = h.one(5).await;
    assert!(failed.result.is_err());
    assert_eq!(failed.fill, None);
}

#[actix_rt::test]
async fn a_peers_fill_read_by_a_waiting_flight_fills_workers_once_remembered() {
    let h = Setup {
        owner: near_cache_ttl(60_000),
        ..leased()
    }
    .start();
    h.hold_as_peer(11, Duration::from_secs(60)).await;
    let waiting = h.ask(11);
    eventually("the flight waits on the peer", || {
        h.metrics.lease_waits_total.get() == 1
    })
    .await;
    h.fill_as_peer(11, "peer").await;
    let shared = receive(waiting).await;
    assert_eq!(shared.x_cache, XCache::Shared);
    let hit = h.one(11).await;
    assert_eq!(hit.x_cache, XCache::Hit);
    assert_eq!(shared.fill, hit.fill);
    assert!(shared.fill.is_some());
}

#[test]
fn shard_for_spreads_keys_and_stays_in_range() {
    for shards in 1..=8 {
        let mut seen = vec![0usize; shards];
        for id in 1..=8000 {
            let s = shard_for(id, shards);
            assert!(s < shards);
            seen[s] += 1;
        }
        let expected = 8000 / shards;
        assert!(
            seen.iter().all(|&n| n > expected * 3 / 4),
            "{shards} shards: {seen:?}"
        );
    }
    assert!(shard_for(i64::MAX, 3) < 3 && shard_for(-1, 3) < 3);
}

// ---------------------------------------------------------------------------------------------
// The fleet lease (the Redis side is faked: `FakeCache` keeps leases as Redis would)
// ---------------------------------------------------------------------------------------------

fn leased() -> Setup {
    Setup {
        lease_ttl: Some(Duration::from_millis(300)),
        ..Setup::default()
    }
}

#[actix_rt::test]
async fn the_lease_holder_loads_once_and_fills_under_its_token() {
    let h = leased().start();
    let answers = h.burst(7, 50).await;
    assert_eq!(h.queries(), 1);
    assert_eq!(count(&answers, XCache::Miss), 1);
    assert_eq!(count(&answers, XCache::Shared), 49);
    h.idle().await;
    assert_eq!(h.lease_claims.get(), 1, "one lease claimed");
    assert_eq!(
        h.lease_fills.get(),
        1,
        "the value written by the lease's fill"
    );
    assert_eq!(h.sets(), 0, "not by a plain write");
    assert_eq!(h.metrics.lease_claims_total.get(), 1);
    // Filled: the next flight (after the near cache) finds it without a lease.
    assert_eq!(loaded_by(&h.one(7).await).as_deref(), Some("query 0"));
}

#[actix_rt::test]
async fn a_flight_waits_on_another_replicas_lease_and_shares_its_fill() {
    let h = leased().start();
    h.hold_as_peer(8, Duration::from_secs(60)).await;
    let waiting: Vec<_> = (0..20).map(|_| h.ask(8)).collect();
    eventually("the flight waits on the peer", || {
        h.metrics.lease_waits_total.get() == 1 && h.waiting() == 20
    })
    .await;
    h.fill_as_peer(8, "peer").await;
    for rx in waiting {
        let answer = receive(rx).await;
        assert_eq!(answer.x_cache, XCache::Shared);
        assert_eq!(loaded_by(&answer).as_deref(), Some("peer"));
    }
    assert_eq!(h.queries(), 0, "the peer loaded it, not us");
    assert_eq!(h.metrics.lease_wait_seconds.get_sample_count(), 1);
    assert_eq!(h.metrics.lease_takeovers_total.get(), 0);
    h.idle().await;
}

#[actix_rt::test]
async fn a_lease_that_runs_out_unfilled_is_taken_over_without_a_notice() {
    let h = leased().start();
    h.hold_as_peer(9, Duration::from_millis(150)).await;
    // No fill, no notice: the peer died. The owner looks again when the lease runs out.
    let answers = h.burst(9, 10).await;
    assert!(answers.iter().all(|a| a.result.is_ok()), "{answers:?}");
    assert_eq!(h.queries(), 1, "one take-over load");
    assert_eq!(h.metrics.lease_takeovers_total.get(), 1);
    assert_eq!(count(&answers, XCache::Miss), 1);
    h.idle().await;
}

#[actix_rt::test]
async fn with_lease_calls_failing_the_owner_coalesces_on_its_own() {
    let h = Setup {
        lease_failing: true,
        ..leased()
    }
    .start();
    let answers = h.burst(10, 30).await;
    assert!(answers.iter().all(|a| a.result.is_ok()), "{answers:?}");
    assert_eq!(h.queries(), 1);
    h.idle().await;
    assert_eq!(h.sets(), 1, "written with a plain write");
}

#[actix_rt::test]
async fn a_change_makes_the_holder_release_its_lease_and_write_nothing() {
    let h = Setup {
        db_delay: Duration::from_millis(300),
        ..leased()
    }
    .start();
    let before = h.ask(11);
    eventually("the lease is claimed", || h.lease_claims.get() == 1).await;
    h.owner.send(Invalidate(11)).await.unwrap();
    eventually("the lease is released", || h.lease_releases.get() == 1).await;
    // The request from before the change is answered by the old load; one after it starts anew.
    let after = h.one(11).await;
    assert_eq!(loaded_by(&after).as_deref(), Some("query 1"));
    assert!(receive(before).await.result.is_ok());
    h.idle().await;
    assert_eq!(h.lease_fills.get(), 1, "only the new flight fills");
    assert_eq!(h.lease_claims.get(), 2);
}

#[actix_rt::test]
async fn a_change_while_waiting_on_a_peer_loads_for_the_earlier_waiters_at_once() {
    let h = Setup {
        db_delay: Duration::from_millis(10),
        ..leased()
    }
    .start();
    h.hold_as_peer(12, Duration::from_secs(60)).await;
    let before = h.ask(12);
    eventually("the flight waits on the peer", || {
        h.metrics.lease_waits_total.get() == 1
    })
    .await;
    h.owner.send(Invalidate(12)).await.unwrap();
    // Answered by its own load, not after the peer's 60 s lease.
    let answer = receive(before).await;
    assert_eq!(loaded_by(&answer).as_deref(), Some("query 0"));
    h.idle().await;
    assert_eq!(h.lease_fills.get(), 0, "a superseded flight fills nothing");
}

#[actix_rt::test]
async fn a_soft_expired_value_is_served_while_a_peer_refreshes_it() {
    let h = Setup {
        stale_cached: vec![13],
        ..leased()
    }
    .start();
    h.hold_as_peer(13, Duration::from_secs(60)).await;
    let answers = h.burst(13, 5).await;
    assert!(
        answers.iter().all(|a| a.x_cache == XCache::Stale),
        "{answers:?}"
    );
    assert_eq!(h.queries(), 0, "the peer refreshes, not us");
    h.fill_as_peer(13, "refreshed").await;
    h.idle().await;
    let answer = h.one(13).await;
    assert_eq!(answer.x_cache, XCache::Hit);
    assert_eq!(loaded_by(&answer).as_deref(), Some("refreshed"));
    assert_eq!(h.queries(), 0);
    assert_eq!(h.metrics.refreshes_total.get(), 0, "no refresh of our own");
}

#[actix_rt::test]
async fn a_superseded_holder_stops_renewing_the_lease_it_gave_up() {
    let h = Setup {
        // Renewed every 50 ms while a 600 ms load runs.
        lease_ttl: Some(Duration::from_millis(150)),
        db_delay: Duration::from_millis(600),
        ..leased()
    }
    .start();
    let before = h.ask(16);
    eventually("the lease is claimed", || h.lease_claims.get() == 1).await;
    h.owner.send(Invalidate(16)).await.unwrap();
    let renewals_at_change = h.lease_renew_calls.get();
    assert!(receive(before).await.result.is_ok());
    h.idle().await;
    assert!(
        h.lease_renew_calls.get() <= renewals_at_change + 1,
        "renewed after giving the lease up: {} then {}",
        renewals_at_change,
        h.lease_renew_calls.get()
    );
}

#[actix_rt::test]
async fn a_fill_that_wrote_nothing_makes_waiters_load_at_once() {
    let h = leased().start();
    h.hold_as_peer(17, Duration::from_secs(60)).await;
    let waiting = h.ask(17);
    eventually("the flight waits on the peer", || {
        h.metrics.lease_waits_total.get() == 1
    })
    .await;
    h.owner.do_send(PeerFilled {
        id: 17,
        wrote_nothing: true,
    });
    let answer = receive(waiting).await;
    assert_eq!(loaded_by(&answer).as_deref(), Some("query 0"));
}

#[actix_rt::test]
async fn a_wait_on_another_replica_lasts_no_longer_than_a_flight() {
    let h = Setup {
        owner: OwnerSettings {
            flight_timeout: Duration::from_millis(300),
            ..OwnerSettings::default()
        },
        db_delay: Duration::from_millis(10),
        ..leased()
    }
    .start();
    // A peer that holds the lease for a minute and never fills.
    h.hold_as_peer(18, Duration::from_secs(60)).await;
    let answer = h.one(18).await;
    assert_eq!(loaded_by(&answer).as_deref(), Some("query 0"));
    h.idle().await;
}

// Workers' renewals (`Renew`): a copy in steady use is renewed in the background.

impl Harness {
    /// Sends one worker's renewal of `ids`; each receiver gets an answer only if it has a fill.
    fn renew(&self, ids: &[i64]) -> Vec<oneshot::Receiver<Answer>> {
        let (renewals, answers) = ids
            .iter()
            .map(|&id| {
                let (reply, answer) = oneshot::channel();
                ((id, reply), answer)
            })
            .unzip();
        self.owner.do_send(Renew { renewals });
        answers
    }

    fn renew_one(&self, id: i64) -> oneshot::Receiver<Answer> {
        self.renew(&[id]).remove(0)
    }

    fn renewals(&self, outcome: &str) -> u64 {
        self.metrics
            .worker_cache_renewals_total
            .with_label_values(&[outcome])
            .get()
    }

    /// Every request metric an answer moves, summed: a renewal must move none.
    fn request_counts(&self) -> u64 {
        let m = &self.metrics;
        m.cache_hits_total.get()
            + m.cache_misses_total.get()
            + m.near_cache_hits_total.get()
            + m.singleflight_shared_total.get()
            + m.stale_answers_total.get()
            + m.cache_reads_coalesced_total.get()
    }
}

/// An owner whose Redis holds `cached` and takes 100 ms to answer a read: long enough to act
/// while a renewal's read is in the air.
fn reading_slowly(cached: Vec<i64>) -> Harness {
    Setup {
        cached,
        cache_delay: Duration::from_millis(100),
        owner: near_cache_ttl(60_000),
        ..Default::default()
    }
    .start()
}

/// Waits (a clock running out) until `fill` is due for renewal.
async fn until_due(fill: Fill) {
    tokio::time::sleep(fill.renew_at.saturating_duration_since(Instant::now())).await;
}

/// A renewal that gets no answer: its reply was dropped.
async fn dropped(rx: oneshot::Receiver<Answer>) {
    let outcome = tokio::time::timeout(PATIENCE, rx)
        .await
        .expect("no renewal may hang");
    assert!(outcome.is_err(), "no answer, got {outcome:?}");
}

#[actix_rt::test]
async fn a_due_renewal_reads_redis_again_and_gives_a_later_fill() {
    let h = Setup {
        cached: vec![5],
        owner: near_cache_ttl(1000),
        ..Default::default()
    }
    .start();
    let first = h.one(5).await;
    let fill = first.fill.expect("a fresh flight answer fills");
    let ttl = Duration::from_millis(1000);
    assert!(fill.renew_at < fill.fresh_until, "due in its last quarter");
    assert!(fill.fresh_until - fill.renew_at <= ttl / 4 + Duration::from_millis(1));
    let mut worker = h.worker_cache(10);
    worker.keep(5, &first);
    assert!(!worker.get(5).expect("kept").renew, "not due yet");

    until_due(fill).await;
    let due = worker.get(5).expect("still fresh");
    assert!(due.renew, "the first hit once due asks for a renewal");
    assert!(!worker.get(5).expect("kept").renew, "once per copy");
    let (counts, gets) = (h.request_counts(), h.gets());
    let renewed = receive(h.renew_one(5)).await;
    assert_eq!(h.cache_get_manys.get(), 1, "read from Redis again");
    assert_eq!(
        (h.gets(), h.renewals("read")),
        (gets, 1),
        "and by no flight"
    );
    let renewed_fill = renewed.fill.expect("a renewal is answered with a fill");
    assert!(renewed_fill.fresh_until > fill.fresh_until);
    assert!(renewed_fill.renew_at > fill.fresh_until - ttl / 4);
    worker.keep(5, &renewed);
    assert!(!worker.get(5).expect("renewed").renew, "not due again yet");

    // Another worker's renewal of the same copy: the owner's entry is already renewed.
    let again = receive(h.renew_one(5)).await;
    assert_eq!(again.fill, Some(renewed_fill));
    assert_eq!((h.cache_get_manys.get(), h.renewals("near_cache")), (1, 1));
    assert_eq!(h.request_counts(), counts, "renewals are not requests");
    assert_eq!(h.queries(), 0);
    assert_eq!(
        h.metrics.flights_total.with_label_values(&["cache"]).get(),
        1
    );
    // The owner answers the renewed entry as a near-cache hit, with the same fill.
    assert_eq!(h.one(5).await.fill, Some(renewed_fill));
}

#[actix_rt::test]
async fn renewals_of_many_keys_are_one_redis_read() {
    let h = Setup {
        cached: (1..=50).collect(),
        owner: near_cache_ttl(60_000),
        ..Default::default()
    }
    .start();
    let ids: Vec<i64> = (1..=60).collect();
    let answers = h.renew(&ids);
    for (id, rx) in ids.iter().zip(answers) {
        if *id <= 50 {
            let renewed = receive(rx).await;
            assert_eq!(loaded_by(&renewed).as_deref(), Some("cached"), "{id}");
            assert!(renewed.fill.is_some(), "{id}");
        } else {
            dropped(rx).await;
        }
    }
    assert_eq!(h.cache_get_manys.get(), 1, "one round trip for all 60");
    assert_eq!((h.renewals("read"), h.renewals("missed")), (50, 10));
    assert_eq!((h.gets(), h.queries()), (0, 0), "no flight, no load");
    // What was read is remembered: the owner answers it from memory now.
    assert_eq!(h.one(7).await.x_cache, XCache::Hit);
    assert_eq!(h.gets(), 0);
}

#[actix_rt::test]
async fn a_renewal_never_loads_from_the_database() {
    for setup in [
        // Redis always empty: the value came from PostgreSQL.
        Setup {
            forgetful_cache: true,
            db_delay: Duration::ZERO,
            owner: near_cache_ttl(200),
            ..Default::default()
        },
        // The same under the fleet lease: a renewal claims nothing.
        Setup {
            forgetful_cache: true,
            db_delay: Duration::ZERO,
            owner: near_cache_ttl(200),
            ..leased()
        },
    ] {
        let leased = setup.lease_ttl.is_some();
        let h = setup.start();
        let first = h.one(6).await;
        assert_eq!((first.x_cache, h.queries()), (XCache::Miss, 1));
        let claims = h.lease_claims.get();
        until_due(first.fill.expect("remembered")).await;
        dropped(h.renew_one(6)).await;
        assert_eq!(h.renewals("missed"), 1, "lease {leased}");
        assert_eq!(h.pending_flights(), 0, "lease {leased}: no flight");
        assert_eq!(
            h.queries(),
            1,
            "lease {leased}: the database is asked by requests only"
        );
        assert_eq!(h.lease_claims.get(), claims, "lease {leased}");
    }
}

#[actix_rt::test]
async fn a_renewal_joins_the_keys_flight_and_shares_its_fill() {
    let h = Setup {
        db_delay: Duration::from_millis(150),
        owner: near_cache_ttl(60_000),
        ..Default::default()
    }
    .start();
    let request = h.ask(8);
    eventually("the request's load is in the air", || h.queries() == 1).await;
    let renewal = h.renew_one(8);
    let request = receive(request).await;
    assert_eq!(request.x_cache, XCache::Miss);
    let renewed = receive(renewal).await;
    assert!(renewed.fill.is_some());
    assert_eq!(renewed.fill, request.fill);
    assert_eq!(h.renewals("joined"), 1);
    assert_eq!((h.queries(), h.cache_get_manys.get()), (1, 0));
    assert_eq!(
        h.metrics.cache_misses_total.get(),
        1,
        "one request, one miss"
    );
    h.idle().await;
}

#[actix_rt::test]
async fn a_change_during_a_renewals_read_gives_it_nothing_to_keep() {
    let h = reading_slowly(vec![9, 10]);
    let mut answers = h.renew(&[9, 10]);
    eventually("the read is in the air", || h.cache_get_manys.get() == 1).await;
    h.owner.send(Invalidate(9)).await.expect("owner running");
    let other = receive(answers.remove(1)).await;
    assert!(other.fill.is_some(), "the unchanged key is renewed");
    dropped(answers.remove(0)).await;
    assert_eq!((h.renewals("read"), h.renewals("missed")), (1, 1));
    // Nothing of the read before the change was remembered: a request reads again.
    h.one(9).await;
    assert_eq!(h.gets(), 1);
}

#[actix_rt::test]
async fn a_renewal_waits_through_a_refresh_but_never_starts_one() {
    let h = Setup {
        stale_cached: vec![11, 12],
        db_delay: Duration::from_millis(150),
        owner: near_cache_ttl(60_000),
        ..Default::default()
    }
    .start();
    // Alone, a renewal of a soft-expired value gets nothing and refreshes nothing.
    dropped(h.renew_one(12)).await;
    assert_eq!((h.renewals("missed"), h.queries()), (1, 0));
    assert_eq!(h.metrics.refreshes_total.get(), 0);

    // Joined to a request's refresh, it waits for the refreshed value.
    let request = receive(h.ask(11)).await;
    assert_eq!(
        request.x_cache,
        XCache::Stale,
        "the request gets the old value at once"
    );
    let renewal = h.renew_one(11);
    let renewed = receive(renewal).await;
    assert_eq!(loaded_by(&renewed).as_deref(), Some("query 0"));
    assert!(renewed.fill.is_some(), "the refreshed value, to keep");
    assert_eq!(h.metrics.refreshes_total.get(), 1);
    assert_eq!(h.renewals("joined"), 1);
    h.idle().await;
}

#[actix_rt::test]
async fn renewals_of_one_key_from_two_workers_share_one_read() {
    let h = reading_slowly(vec![13]);
    let first = h.renew_one(13);
    eventually("the first worker's read is in the air", || {
        h.cache_get_manys.get() == 1
    })
    .await;
    let second = h.renew_one(13);
    let (first, second) = (receive(first).await, receive(second).await);
    assert!(first.fill.is_some() && first.fill == second.fill);
    assert_eq!(h.cache_get_manys.get(), 1, "one read for both workers");
    assert_eq!(h.renewals("read"), 2);
    // A third, once the entry is renewed, is answered from it.
    assert_eq!(receive(h.renew_one(13)).await.fill, first.fill);
    assert_eq!((h.cache_get_manys.get(), h.renewals("near_cache")), (1, 1));
}

#[actix_rt::test]
async fn forget_all_during_a_renewals_read_gives_it_nothing_to_keep() {
    let h = reading_slowly(vec![14]);
    let renewal = h.renew_one(14);
    eventually("the read is in the air", || h.cache_get_manys.get() == 1).await;
    h.owner.send(ForgetAll).await.expect("owner running");
    dropped(renewal).await;
    assert_eq!(h.renewals("missed"), 1);
    h.one(14).await;
    assert_eq!(h.gets(), 1, "nothing of the read was remembered");
}

#[actix_rt::test]
async fn renewals_joined_to_a_flight_are_not_requests_and_a_change_leaves_them_nothing() {
    let h = Setup {
        db_delay: Duration::from_millis(200),
        owner: OwnerSettings {
            max_waiters_per_key: 2,
            ..near_cache_ttl(60_000)
        },
        ..Default::default()
    }
    .start();
    let request = h.ask(15);
    eventually("the load is in the air", || h.queries() == 1).await;
    let renewals = h.renew(&[15, 15, 15]);
    // Renewals take none of the flight's request slots (their own are as many), and are not
    // counted as waiting.
    let second = h.ask(15);
    eventually("the second request joined", || h.waiting() == 2).await;
    h.owner.send(Invalidate(15)).await.expect("owner running");
    for renewal in renewals {
        dropped(renewal).await;
    }
    // Bounded on their own: two joined, the third was skipped.
    assert_eq!(h.renewals("skipped"), 1);
    assert_eq!(h.renewals("missed"), 2, "superseded: nothing to keep");
    assert_eq!(receive(request).await.x_cache, XCache::Miss);
    assert_eq!(receive(second).await.x_cache, XCache::Shared);
    assert_eq!(
        h.metrics
            .shed_requests_total
            .with_label_values(&["waiters"])
            .get(),
        0
    );
    h.idle().await;
}
