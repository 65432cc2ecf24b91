//! The KeyOwner's guarantees, checked with fake cache and database actors behind its
//! `Recipient`s (no Redis, no PostgreSQL). The fakes are actors too: their state is their own.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use chrono::Utc;
use tokio::sync::oneshot;

use super::*;
use crate::actors::cache::{CacheDel, CacheError, CacheGet, CacheSet, Cached};
use crate::actors::db::{DbError, FetchTemplate};
use crate::template::Template;

/// A cache that keeps bodies in its own map and counts calls. `get_delay` holds every read in
/// the air for a while, to make concurrent requests meet.
struct FakeCache {
    /// Each value, and whether it is past its soft expiry.
    store: HashMap<i64, (Lookup, bool)>,
    get_delay: Duration,
    forgetful: bool,
    gets: Arc<AtomicUsize>,
    sets: Arc<AtomicUsize>,
    dels: Arc<AtomicUsize>,
}

impl Actor for FakeCache {
    type Context = Context<Self>;
}

impl Handler<CacheGet> for FakeCache {
    type Result = ResponseFuture<Result<Option<Cached>, CacheError>>;
    fn handle(&mut self, CacheGet(id): CacheGet, _: &mut Self::Context) -> Self::Result {
        self.gets.fetch_add(1, Ordering::SeqCst);
        let value = self.store.get(&id).map(|(lookup, stale)| Cached {
            lookup: lookup.clone(),
            stale: *stale,
        });
        let delay = self.get_delay;
        Box::pin(async move {
            tokio::time::sleep(delay).await;
            Ok(value)
        })
    }
}

impl Handler<CacheDel> for FakeCache {
    type Result = ();
    fn handle(&mut self, CacheDel(id): CacheDel, _: &mut Self::Context) {
        self.dels.fetch_add(1, Ordering::SeqCst);
        self.store.remove(&id);
    }
}

impl Handler<CacheSet> for FakeCache {
    type Result = Result<(), CacheError>;
    fn handle(&mut self, msg: CacheSet, _: &mut Self::Context) -> Self::Result {
        self.sets.fetch_add(1, Ordering::SeqCst);
        if !self.forgetful {
            self.store.insert(msg.id, (msg.lookup, false));
        }
        Ok(())
    }
}

#[derive(Clone, Copy)]
enum DbMode {
    /// Ids 1..=1000 exist.
    Rows,
    /// The first `n` queries fail, later ones succeed.
    FailFirst(usize),
    /// The first `n` queries succeed, later ones fail.
    FailAfter(usize),
    /// Every query panics inside the database actor.
    Panic,
    /// No query ever answers.
    Hang,
}

struct FakeDb {
    mode: DbMode,
    /// Per-id load time; others answer after `default_delay`.
    delays: HashMap<i64, Duration>,
    default_delay: Duration,
    queries: Arc<AtomicUsize>,
}

impl Actor for FakeDb {
    type Context = Context<Self>;
}

impl Handler<FetchTemplate> for FakeDb {
    type Result = ResponseFuture<Result<Option<Template>, DbError>>;
    fn handle(&mut self, FetchTemplate(id): FetchTemplate, _: &mut Self::Context) -> Self::Result {
        let n = self.queries.fetch_add(1, Ordering::SeqCst);
        let delay = self.delays.get(&id).copied().unwrap_or(self.default_delay);
        let mode = self.mode;
        Box::pin(async move {
            tokio::time::sleep(delay).await;
            match mode {
                DbMode::Panic => panic!("fake database panics while loading {id}"),
                DbMode::Hang => std::future::pending().await,
                DbMode::FailFirst(k) if n < k => Err(DbError::Query("fake failure".into())),
                DbMode::FailAfter(k) if n >= k => Err(DbError::Query("fake failure".into())),
                _ if !(1..=1000).contains(&id) => Ok(None),
                _ => Ok(Some(template(id))),
            }
        })
    }
}

fn template(id: i64) -> Template {
    Template {
        id,
        name: format!("template {id}"),
        content: "body".into(),
        updated_at: Utc::now(),
    }
}

struct Harness {
    owner: Addr<KeyOwner>,
    cache_gets: Arc<AtomicUsize>,
    cache_sets: Arc<AtomicUsize>,
    cache_dels: Arc<AtomicUsize>,
    db_queries: Arc<AtomicUsize>,
    metrics: Metrics,
}

struct Setup {
    mode: DbMode,
    db_delay: Duration,
    db_delays: HashMap<i64, Duration>,
    cache_delay: Duration,
    cached: Vec<i64>,
    /// Ids whose cached value is past its soft expiry.
    stale_cached: Vec<i64>,
    /// The fake cache forgets every write (a Redis that is always empty).
    forgetful_cache: bool,
    owner: OwnerSettings,
}

impl Default for Setup {
    fn default() -> Self {
        Setup {
            mode: DbMode::Rows,
            db_delay: Duration::from_millis(100),
            db_delays: HashMap::new(),
            cache_delay: Duration::ZERO,
            cached: Vec::new(),
            stale_cached: Vec::new(),
            forgetful_cache: false,
            owner: OwnerSettings::default(),
        }
    }
}

impl Setup {
    /// Starts the owner on an arbiter of its own, as in the service, and the fakes on another,
    /// so that a panicking fake takes down only its own thread.
    fn start(self) -> Harness {
        let counter = || Arc::new(AtomicUsize::new(0));
        let (cache_gets, cache_sets, cache_dels, db_queries) =
            (counter(), counter(), counter(), counter());
        let fakes = Arbiter::new();
        let fresh = self.cached.iter().map(|&id| (id, false));
        let stale = self.stale_cached.iter().map(|&id| (id, true));
        let store = fresh
            .chain(stale)
            .map(|(id, stale)| (id, (Lookup::Found(template(id).to_body()), stale)))
            .collect();
        let (g, s, d) = (cache_gets.clone(), cache_sets.clone(), cache_dels.clone());
        let (cache_delay, forgetful) = (self.cache_delay, self.forgetful_cache);
        let cache = FakeCache::start_in_arbiter(&fakes.handle(), move |_| FakeCache {
            store,
            get_delay: cache_delay,
            forgetful,
            gets: g,
            sets: s,
            dels: d,
        });
        let q = db_queries.clone();
        let (mode, delays, default_delay) = (self.mode, self.db_delays, self.db_delay);
        let db = FakeDb::start_in_arbiter(&fakes.handle(), move |_| FakeDb {
            mode,
            delays,
            default_delay,
            queries: q,
        });
        let metrics = Metrics::new().expect("metrics");
        let deps = KeyOwnerDeps {
            cache_get: cache.clone().recipient(),
            cache_set: cache.clone().recipient(),
            cache_del: cache.recipient(),
            db: db.recipient(),
            settings: self.owner,
            metrics: metrics.clone(),
        };
        let owner =
            KeyOwner::start_in_arbiter(&Arbiter::new().handle(), move |_| KeyOwner::new(0, deps));
        Harness {
            owner,
            cache_gets,
            cache_sets,
            cache_dels,
            db_queries,
            metrics,
        }
    }
}

impl Harness {
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
            let answer = tokio::time::timeout(Duration::from_secs(10), rx)
                .await
                .expect("no waiter may hang")
                .expect("the owner answers every waiter");
            answers.push(answer);
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
}

fn count(answers: &[Answer], x: XCache) -> usize {
    answers.iter().filter(|a| a.x_cache == x).count()
}

#[actix_rt::test]
async fn a_cold_stampede_costs_one_cache_read_and_one_query() {
    let h = Setup::default().start();
    let answers = h.burst(7, 200).await;

    assert_eq!(h.cache_gets.load(Ordering::SeqCst), 1, "one Redis read");
    assert_eq!(h.db_queries.load(Ordering::SeqCst), 1, "one database query");
    assert_eq!(h.cache_sets.load(Ordering::SeqCst), 1, "one cache fill");
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
    assert_eq!(
        (h.pending_flights(), h.waiting()),
        (0, 0),
        "nothing left behind"
    );
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
    assert_eq!(h.cache_gets.load(Ordering::SeqCst), 1);
    assert_eq!(h.db_queries.load(Ordering::SeqCst), 0);
    assert_eq!(count(&answers, XCache::Hit), 200);
    assert_eq!(h.metrics.cache_hits_total.get(), 200);
    assert_eq!(h.metrics.cache_reads_coalesced_total.get(), 199);
}

#[actix_rt::test]
async fn a_request_after_the_flight_finds_the_cache_filled() {
    let h = Setup::default().start();
    assert_eq!(h.one(9).await.x_cache, XCache::Miss);
    let again = h.one(9).await;
    assert_eq!(again.x_cache, XCache::Hit);
    assert_eq!(h.db_queries.load(Ordering::SeqCst), 1);
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
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(h.pending_flights(), 1, "the slow flight is in the air");

    let started = Instant::now();
    let fast = h.one(2).await;
    assert!(matches!(fast.result, Ok(Lookup::Found(_))));
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "key 2 waited {:?} behind key 1's 3 s load",
        started.elapsed()
    );
    assert_eq!(h.pending_flights(), 1, "key 1 is still loading");
    drop(slow);
}

#[actix_rt::test]
async fn a_waiter_that_leaves_does_not_cancel_the_flight() {
    let h = Setup::default().start();
    // Every waiter but the last goes away before the load finishes, the first one included.
    let gone: Vec<_> = (0..10).map(|_| h.ask(11)).collect();
    let stays = h.ask(11);
    drop(gone);
    let answer = tokio::time::timeout(Duration::from_secs(5), stays)
        .await
        .expect("answered")
        .expect("not dropped");
    assert!(matches!(answer.result, Ok(Lookup::Found(_))));
    assert_eq!(
        h.cache_sets.load(Ordering::SeqCst),
        1,
        "the flight filled the cache"
    );

    // Even when every waiter leaves, the flight completes and fills the cache.
    drop(h.ask(12));
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(h.cache_sets.load(Ordering::SeqCst), 2);
    assert_eq!(h.one(12).await.x_cache, XCache::Hit);
    assert_eq!(h.db_queries.load(Ordering::SeqCst), 2);
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
    assert_eq!(h.db_queries.load(Ordering::SeqCst), 1);
    assert_eq!((h.pending_flights(), h.waiting()), (0, 0));
    assert_eq!(
        h.cache_sets.load(Ordering::SeqCst),
        0,
        "errors are not cached"
    );

    let retry = h.one(5).await;
    assert!(
        matches!(retry.result, Ok(Lookup::Found(_))),
        "the next request tries again"
    );
    assert_eq!(h.db_queries.load(Ordering::SeqCst), 2);
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
    assert_eq!((h.pending_flights(), h.waiting()), (0, 0));
    let _ = h.one(5).await;
    assert_eq!(
        h.db_queries.load(Ordering::SeqCst),
        2,
        "a new flight after the failed one"
    );
}

#[actix_rt::test]
async fn a_flight_whose_collaborator_panics_answers_every_waiter() {
    let h = Setup {
        mode: DbMode::Panic,
        ..Default::default()
    }
    .start();
    let answers = h.burst(5, 20).await;
    assert!(
        answers.iter().all(|a| a.result.is_err()),
        "{:?}",
        answers[0]
    );
    assert_eq!((h.pending_flights(), h.waiting()), (0, 0));
    // The owner itself survived and still serves.
    let again = h.one(5).await;
    assert!(
        again.result.is_err(),
        "the database is gone, so this is an error, not a hang"
    );
}

#[actix_rt::test]
async fn not_found_is_shared_like_any_answer() {
    let h = Setup::default().start();
    let answers = h.burst(5000, 30).await;
    assert!(answers.iter().all(|a| a.result == Ok(Lookup::NotFound)));
    assert_eq!(h.db_queries.load(Ordering::SeqCst), 1);
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
    assert_eq!(h.cache_gets.load(Ordering::SeqCst), 50);
    assert_eq!(h.db_queries.load(Ordering::SeqCst), 50);
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
        owner: near_cache_ttl(300),
        db_delay: Duration::ZERO,
        ..Default::default()
    }
    .start();
    assert_eq!(h.one(4).await.x_cache, XCache::Miss);
    for _ in 0..50 {
        assert_eq!(h.one(4).await.x_cache, XCache::Hit);
    }
    assert_eq!(
        h.cache_gets.load(Ordering::SeqCst),
        1,
        "no Redis read while fresh"
    );
    assert_eq!(h.metrics.near_cache_hits_total.get(), 50);

    tokio::time::sleep(Duration::from_millis(350)).await;
    assert_eq!(
        h.one(4).await.x_cache,
        XCache::Hit,
        "from Redis after the near TTL"
    );
    assert_eq!(h.cache_gets.load(Ordering::SeqCst), 2);
    assert_eq!(h.db_queries.load(Ordering::SeqCst), 1);
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
    assert_eq!(
        h.db_queries.load(Ordering::SeqCst),
        1,
        "one query per unknown id per window"
    );
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
    tokio::time::sleep(Duration::from_millis(80)).await;

    let answers = h.burst(6, 10).await;
    assert!(answers
        .iter()
        .all(|a| a.x_cache == XCache::Stale && a.result == fresh.result));
    assert_eq!(h.metrics.stale_answers_total.get(), 10);
    assert_eq!(
        h.db_queries.load(Ordering::SeqCst),
        2,
        "the failed reload was one query"
    );
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
    tokio::time::sleep(Duration::from_millis(80)).await;
    assert!(matches!(
        h.one(6).await.result,
        Err(FlightError::Database(_))
    ));
}

#[actix_rt::test]
async fn requests_beyond_the_owner_bounds_are_shed_at_once() {
    let h = Setup {
        db_delay: Duration::from_millis(300),
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
        if rx.await.expect("answered").result == Err(FlightError::Shed(ShedReason::Waiters)) {
            shed += 1;
        }
    }
    assert_eq!(shed, 2, "key 1 takes its starter and 2 more waiters");
    assert!(first.await.expect("answered").result.is_ok());
    assert!(second.await.expect("answered").result.is_ok());
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
    assert_eq!((h.pending_flights(), h.waiting()), (0, 0));
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
    assert_eq!(h.db_queries.load(Ordering::SeqCst), 30);
    let _ = h.one(1).await;
    assert_eq!(h.db_queries.load(Ordering::SeqCst), 31);
}

#[actix_rt::test]
async fn a_soft_expired_value_is_answered_at_once_and_refreshed_once() {
    let h = Setup {
        stale_cached: vec![8],
        db_delay: Duration::from_millis(300),
        ..Default::default()
    }
    .start();
    let answers = h.burst(8, 50).await;
    assert!(answers
        .iter()
        .all(|a| a.x_cache == XCache::Stale || a.x_cache == XCache::Hit));
    assert!(answers
        .iter()
        .all(|a| matches!(a.result, Ok(Lookup::Found(_)))));
    // Every answer arrived while the refresh was still loading: nobody waited on the database.
    assert_eq!(h.pending_flights(), 1, "the refresh is still in the air");
    assert_eq!(h.metrics.refreshes_total.get(), 1);

    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(h.pending_flights(), 0);
    assert_eq!(
        h.db_queries.load(Ordering::SeqCst),
        1,
        "exactly one refresh"
    );
    assert_eq!(
        h.cache_sets.load(Ordering::SeqCst),
        1,
        "the refresh rewrote the entry"
    );
    assert_eq!(h.one(8).await.x_cache, XCache::Hit);
    assert_eq!(h.metrics.cache_misses_total.get(), 0, "no request missed");
}

#[actix_rt::test]
async fn requests_during_a_refresh_get_the_soft_expired_value_at_once() {
    // No near cache: only the refreshing flight itself can spare them the wait.
    let h = Setup {
        stale_cached: vec![8],
        db_delay: Duration::from_millis(300),
        owner: OwnerSettings {
            near_cache_ttl: Duration::ZERO,
            ..Default::default()
        },
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
    assert_eq!(
        h.pending_flights(),
        1,
        "answered while the refresh is still loading"
    );
    assert_eq!(h.metrics.refreshes_total.get(), 1);

    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(
        h.one(8).await.x_cache,
        XCache::Hit,
        "the refreshed value, from the cache"
    );
    assert_eq!(h.db_queries.load(Ordering::SeqCst), 1);
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
    assert_eq!(h.cache_gets.load(Ordering::SeqCst), 1, "near cache");

    h.owner.do_send(Invalidate(9));
    assert_eq!(
        h.one(9).await.x_cache,
        XCache::Miss,
        "reloaded, not served from memory"
    );
    assert_eq!(h.cache_dels.load(Ordering::SeqCst), 1);
    assert_eq!(h.db_queries.load(Ordering::SeqCst), 2);
    assert_eq!(h.metrics.invalidations_total.get(), 1);
}

#[actix_rt::test]
async fn a_flight_invalidated_in_the_air_is_answered_but_not_kept() {
    let h = Setup {
        db_delay: Duration::from_millis(200),
        ..Default::default()
    }
    .start();
    let waiter = h.ask(10);
    tokio::time::sleep(Duration::from_millis(50)).await;
    h.owner.do_send(Invalidate(10));
    let answer = waiter.await.expect("answered");
    assert_eq!(answer.x_cache, XCache::Miss);
    // The flight wrote what it loaded before the change; that write is deleted again.
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(h.cache_dels.load(Ordering::SeqCst), 2);
    assert_eq!(h.one(10).await.x_cache, XCache::Miss, "not remembered");
    assert_eq!(h.db_queries.load(Ordering::SeqCst), 2);
}

#[actix_rt::test]
async fn forget_all_empties_the_near_cache() {
    let h = Setup {
        db_delay: Duration::ZERO,
        ..Default::default()
    }
    .start();
    for id in 1..=5 {
        let _ = h.one(id).await;
    }
    h.owner.do_send(ForgetAll);
    for id in 1..=5 {
        assert_eq!(
            h.one(id).await.x_cache,
            XCache::Hit,
            "from the (fake) Redis, not memory"
        );
    }
    assert_eq!(h.cache_gets.load(Ordering::SeqCst), 10);
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
    assert_eq!(shard_for(42, 4), shard_for(42, 4), "stable");
    assert!(shard_for(i64::MAX, 3) < 3 && shard_for(-1, 3) < 3);
}
