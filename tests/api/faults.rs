//! Fault injection: the seed's incident (Redis partitioned away under load) and its cousins —
//! Redis refusing or slow, PostgreSQL down, overload, clients giving up, a flood of unknown ids.
//!
//! The real Redis and PostgreSQL run; a [`FaultProxy`] sits between them and the service and
//! plays the fault. The shared servers themselves are never stopped or slowed: every other test
//! in the process uses them. Each test asserts figures read from `/metrics` and from the
//! responses, and checks that the fault really happened (errors counted, a breaker opened), so
//! that a proxy that did nothing cannot make a test pass.
//!
//! Timing: the only assertions on time are the service's own correctness bound — no request
//! answered later than `REQUEST_TIMEOUT_MS` plus [`DEADLINE_MARGIN`] for a loaded 2-core CI
//! machine. Every loop is bounded in count and time.

use std::cell::Cell;
use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::ops::RangeInclusive;
use std::time::{Duration, Instant};

use futures_util::future::join_all;
use singleflight::config::Settings;
use testkit::poll;
use testkit::prom::series;

use crate::support::fault_proxy::{FaultProxy, Mode};
use crate::support::{header, servers, spawn_app_with, sum_metric, TestApp};

/// `REQUEST_TIMEOUT_MS` in every test here (the service's default), set explicitly because the
/// deadline assertions are derived from it.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);

/// How much later than [`REQUEST_TIMEOUT`] an answer may arrive on a loaded 2-core machine
/// before it counts as a broken deadline.
const DEADLINE_MARGIN: Duration = Duration::from_secs(1);

/// `REDIS_TIMEOUT_MS` in the Redis fault tests: tight, as in production (tens of milliseconds),
/// with room for a healthy Redis call on a loaded CI machine, so that only the injected fault
/// makes calls fail.
const REDIS_TIMEOUT: Duration = Duration::from_millis(100);

/// `NEAR_CACHE_TTL_MS` in the tests whose bounds depend on it (the default, spelled out).
const NEAR_CACHE_TTL: Duration = Duration::from_secs(1);

/// Patience for something that should happen within a breaker period or two (recovery,
/// gauges settling). Polled, so a healthy service costs far less.
const SETTLE: Duration = Duration::from_secs(5);

fn latest_answer_limit() -> Duration {
    REQUEST_TIMEOUT + DEADLINE_MARGIN
}

// ---------------------------------------------------------------------------------------------
// Putting a proxy in front of a server
// ---------------------------------------------------------------------------------------------

pub(crate) fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from((Ipv4Addr::LOCALHOST, port))
}

pub(crate) fn redis_proxy() -> FaultProxy {
    FaultProxy::start(loopback(servers::servers().redis_port))
}

pub(crate) fn postgres_proxy() -> FaultProxy {
    FaultProxy::start(loopback(servers::servers().pg_port))
}

/// `url` (as `spawn_app` chose it) pointed at the proxy instead of the server: the same Redis
/// database index or PostgreSQL database name, only the port differs.
pub(crate) fn via(proxy: &FaultProxy, url: &str) -> String {
    let direct = format!("127.0.0.1:{}", proxy.upstream().port());
    assert!(
        url.contains(&direct),
        "{url} does not point at the proxied server {direct}"
    );
    url.replacen(&direct, &format!("127.0.0.1:{}", proxy.port()), 1)
}

// ---------------------------------------------------------------------------------------------
// Reading /metrics
// ---------------------------------------------------------------------------------------------

/// The figures the tests assert on, from one scrape (so they are consistent with each other).
#[derive(Debug, Clone)]
struct Figures {
    db_hits: f64,
    cache_hits: f64,
    near_cache_hits: f64,
    stale_answers: f64,
    shed: f64,
    redis_errors: f64,
    breaker_opened: f64,
    /// Sum over shards: 0 only when every shard's breaker is closed.
    breaker_state: f64,
    inflight_keys: Vec<(String, f64)>,
    waiters: Vec<(String, f64)>,
}

impl Figures {
    /// Answers served from Redis itself: cache hits that the near cache did not serve.
    fn redis_hits(&self) -> f64 {
        self.cache_hits - self.near_cache_hits
    }

    fn inflight_total(&self) -> f64 {
        self.inflight_keys.iter().map(|(_, v)| v).sum()
    }

    fn waiters_total(&self) -> f64 {
        self.waiters.iter().map(|(_, v)| v).sum()
    }

    fn idle(&self) -> bool {
        self.inflight_total() == 0.0 && self.waiters_total() == 0.0
    }
}

async fn figures(app: &TestApp) -> Figures {
    let text = app.metrics_text().await;
    Figures {
        db_hits: sum_metric(&text, "db_hits_total"),
        cache_hits: sum_metric(&text, "cache_hits_total"),
        near_cache_hits: sum_metric(&text, "near_cache_hits_total"),
        stale_answers: sum_metric(&text, "stale_answers_total"),
        shed: sum_metric(&text, "shed_requests_total"),
        redis_errors: sum_metric(&text, "redis_errors_total"),
        breaker_opened: series(&text, "redis_breaker_transitions_total")
            .iter()
            .filter(|(labels, _)| labels.contains(r#"to="open""#))
            .map(|(_, v)| v)
            .sum(),
        breaker_state: sum_metric(&text, "redis_breaker_state"),
        inflight_keys: series(&text, "key_owner_inflight_keys"),
        waiters: series(&text, "key_owner_waiters"),
    }
}

/// Scrapes until `done` holds or `limit` passes (every 100 ms); returns the last figures, for
/// the caller to assert on with a message that shows them.
async fn settle(app: &TestApp, limit: Duration, done: impl Fn(&Figures) -> bool) -> Figures {
    let every = Duration::from_millis(100);
    poll::until(limit, every, || figures(app), done).await.last
}

// ---------------------------------------------------------------------------------------------
// Load
// ---------------------------------------------------------------------------------------------

/// What a set of requests got back.
#[derive(Debug, Default)]
struct Tally {
    requests: usize,
    /// By HTTP status; 0 counts requests that got no HTTP answer at all (connection error or
    /// client timeout).
    statuses: BTreeMap<u16, usize>,
    x_cache: BTreeMap<String, usize>,
    slowest: Duration,
    /// A few transport errors, verbatim, for the failure message.
    errors: Vec<String>,
}

impl Tally {
    fn record(&mut self, answer: Answer) {
        self.requests += 1;
        *self.statuses.entry(answer.status).or_default() += 1;
        *self.x_cache.entry(answer.x_cache).or_default() += 1;
        self.slowest = self.slowest.max(answer.took);
        if let Some(e) = answer.error {
            if self.errors.len() < 5 {
                self.errors.push(e);
            }
        }
    }

    fn merge(mut self, other: Tally) -> Tally {
        self.requests += other.requests;
        for (status, n) in other.statuses {
            *self.statuses.entry(status).or_default() += n;
        }
        for (x, n) in other.x_cache {
            *self.x_cache.entry(x).or_default() += n;
        }
        self.slowest = self.slowest.max(other.slowest);
        self.errors.extend(other.errors);
        self.errors.truncate(5);
        self
    }

    fn count(&self, status: u16) -> usize {
        self.statuses.get(&status).copied().unwrap_or(0)
    }
}

/// One request's outcome.
#[derive(Debug, Clone)]
struct Answer {
    status: u16,
    x_cache: String,
    retry_after: String,
    body: String,
    took: Duration,
    error: Option<String>,
}

/// A client whose own timeout is well past the deadline under test: a late answer is measured,
/// not cut short, and a hung one still ends (so every load loop ends).
fn load_client(connections: usize) -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(latest_answer_limit() + Duration::from_secs(5))
        .pool_max_idle_per_host(connections)
        .build()
        .expect("http client")
}

async fn fetch(client: &reqwest::Client, app: &TestApp, id: i64) -> Answer {
    let started = Instant::now();
    let url = format!("{}/template-details?id={id}", app.address);
    match client.get(url).send().await {
        Ok(response) => {
            let status = response.status().as_u16();
            let x_cache = header(&response, "x-cache");
            let retry_after = header(&response, "retry-after");
            let body = response.text().await.unwrap_or_default();
            Answer {
                status,
                x_cache,
                retry_after,
                body,
                took: started.elapsed(),
                error: None,
            }
        }
        Err(e) => Answer {
            status: 0,
            x_cache: String::new(),
            retry_after: String::new(),
            body: String::new(),
            took: started.elapsed(),
            error: Some(e.to_string()),
        },
    }
}

/// A tiny deterministic generator (xorshift), so that clients spread over the ids differently
/// without a `rand` dependency, and a failing run can be replayed.
struct Ids {
    state: u64,
    range: RangeInclusive<i64>,
}

impl Ids {
    fn new(seed: u64, range: RangeInclusive<i64>) -> Self {
        Ids {
            state: seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1,
            range,
        }
    }

    fn next(&mut self) -> i64 {
        self.state ^= self.state << 13;
        self.state ^= self.state >> 7;
        self.state ^= self.state << 17;
        let span = (self.range.end() - self.range.start() + 1) as u64;
        self.range.start() + (self.state % span) as i64
    }
}

/// `clients` closed-loop clients, each requesting random ids of `ids` one after another for
/// `duration` (and at most `MAX_PER_CLIENT` requests each).
async fn load(
    app: &TestApp,
    clients: usize,
    ids: RangeInclusive<i64>,
    duration: Duration,
) -> Tally {
    const MAX_PER_CLIENT: usize = 100_000;
    let client = load_client(clients);
    let started = Instant::now();
    let runs = (0..clients).map(|c| {
        let (client, ids) = (&client, ids.clone());
        async move {
            let mut ids = Ids::new(c as u64 + 1, ids);
            let mut tally = Tally::default();
            for _ in 0..MAX_PER_CLIENT {
                if started.elapsed() >= duration {
                    break;
                }
                tally.record(fetch(client, app, ids.next()).await);
            }
            tally
        }
    });
    join_all(runs)
        .await
        .into_iter()
        .fold(Tally::default(), Tally::merge)
}

/// Each id of `ids` requested once, at most `concurrency` at a time.
async fn each_once(
    app: &TestApp,
    ids: RangeInclusive<i64>,
    concurrency: usize,
) -> (Tally, Vec<(i64, Answer)>) {
    let client = load_client(concurrency);
    let next = Cell::new(*ids.start());
    let workers = (0..concurrency).map(|_| {
        let (client, next, last) = (&client, &next, *ids.end());
        async move {
            let mut answers = Vec::new();
            loop {
                let id = next.get();
                if id > last {
                    return answers;
                }
                next.set(id + 1);
                answers.push((id, fetch(client, app, id).await));
            }
        }
    });
    let mut answers: Vec<(i64, Answer)> = join_all(workers).await.into_iter().flatten().collect();
    answers.sort_by_key(|(id, _)| *id);
    let mut tally = Tally::default();
    for (_, answer) in &answers {
        tally.record(answer.clone());
    }
    (tally, answers)
}

/// The template id in a 200 body.
fn body_id(body: &str) -> Option<i64> {
    serde_json::from_str::<serde_json::Value>(body)
        .ok()?
        .get("id")?
        .as_i64()
}

// ---------------------------------------------------------------------------------------------
// Redis: black-holed, refused, slow — under load
// ---------------------------------------------------------------------------------------------

/// Clients and ids of the seed's incident.
const CLIENTS: usize = 200;
const HOT_IDS: RangeInclusive<i64> = 1..=100;

/// Writes every hot id to Redis again before a recovery window. Keys loaded while a breaker was
/// open, or whose write failed, are not in Redis: once their near-cache entries have expired, a
/// round with every breaker closed reloads and writes them. A round in which a Redis call failed
/// anyway (a machine busy with other tests) is run again, up to three times. Says whether a
/// round was clean, for the report.
async fn refill(app: &TestApp, client: &reqwest::Client) -> bool {
    for _ in 0..3 {
        let _ = settle(app, SETTLE, |f| f.breaker_state == 0.0).await;
        tokio::time::sleep(NEAR_CACHE_TTL + Duration::from_millis(200)).await;
        let before = figures(app).await;
        join_all(HOT_IDS.map(|id| fetch(client, app, id))).await;
        let after = settle(app, SETTLE, |f| {
            f.inflight_keys.iter().all(|(_, n)| *n == 0.0)
        })
        .await;
        let clean = before.breaker_state == 0.0
            && after.breaker_state == 0.0
            && after.redis_errors == before.redis_errors;
        if clean {
            return true;
        }
    }
    false
}

/// The incident, shortened: `fault` between Redis and the service from 2 s to 4 s of a 6 s load
/// of 200 clients over ids 1..=100, then a look at whether answers come from Redis again.
async fn redis_fault_under_load(fault: Mode) {
    let proxy = redis_proxy();
    let app = spawn_app_with(|s: &mut Settings| {
        s.redis_url = via(&proxy, &s.redis_url);
        s.redis_timeout = REDIS_TIMEOUT;
        s.near_cache_ttl = NEAR_CACHE_TTL;
        s.request_timeout = REQUEST_TIMEOUT;
        // Nothing loaded at the start may come due for a refresh before the recovery window
        // ends, however long a slow machine takes to get there.
        s.cache_ttl = Duration::from_secs(300);
    })
    .await;

    let before = figures(&app).await;
    let started = Instant::now();
    let schedule = async {
        tokio::time::sleep(Duration::from_secs(2)).await;
        proxy.set_mode(fault);
        let at_fault = figures(&app).await;
        tokio::time::sleep(Duration::from_secs(2)).await;
        let at_restore = figures(&app).await;
        proxy.set_mode(Mode::Pass);
        (at_fault, at_restore)
    };
    let (tally, (at_fault, at_restore)) = tokio::join!(
        load(&app, CLIENTS, HOT_IDS, Duration::from_secs(6)),
        schedule
    );
    let seconds = started.elapsed().as_secs_f64();
    let after = figures(&app).await;
    let report = format!(
        "{fault:?}: {tally:?}\nbefore {before:?}\nat fault {at_fault:?}\nat restore {at_restore:?}\nafter {after:?}"
    );

    // Every request was answered, in time, from one cache or another or from PostgreSQL.
    assert!(
        tally.requests > 0 && tally.count(200) == tally.requests,
        "every request is 200 (ids 1..=100 all exist; no 5xx): {report}"
    );
    assert!(
        tally.slowest <= latest_answer_limit(),
        "no request slower than the deadline + margin ({:?}): {report}",
        latest_answer_limit()
    );
    // The fault was real, and the breaker saw it.
    assert!(
        at_restore.redis_errors > at_fault.redis_errors,
        "Redis calls failed during the fault: {report}"
    );
    assert!(after.breaker_opened >= 1.0, "the breaker opened: {report}");
    // The database was protected: loads per key per near-cache TTL, not per request.
    let db_queries = after.db_hits - before.db_hits;
    let bound =
        HOT_IDS.count() as f64 * (seconds / NEAR_CACHE_TTL.as_secs_f64()) + HOT_IDS.count() as f64;
    assert!(
        db_queries <= bound,
        "{db_queries} DB queries in {seconds:.1} s exceed {bound:.0}: {report}"
    );
    assert!(
        after.near_cache_hits > before.near_cache_hits,
        "the near cache served: {report}"
    );

    // Redis is back: the breakers close and answers come from Redis again, not PostgreSQL.
    let closed = settle(&app, SETTLE, |f| f.breaker_state == 0.0).await;
    assert_eq!(
        closed.breaker_state, 0.0,
        "every breaker closed within {SETTLE:?} of Redis coming back: {closed:?}\n{report}"
    );
    let client = load_client(HOT_IDS.count());
    // A window in which a Redis call failed anyway (a 100 ms timeout on a machine busy with other
    // tests) says nothing about recovery: it is run again, up to three times. Redis that has not
    // recovered fails all three.
    let (mut window, mut window_start, mut window_end, mut refilled);
    let mut attempt = 0;
    loop {
        attempt += 1;
        refilled = refill(&app, &client).await;
        window_start = figures(&app).await;
        // Rounds over every id for longer than the near-cache TTL, so that entries expire and
        // are read from Redis again.
        window = Tally::default();
        for _round in 0..7 {
            for answer in join_all(HOT_IDS.map(|id| fetch(&client, &app, id))).await {
                window.record(answer);
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        window_end = figures(&app).await;
        if window_end.redis_errors == window_start.redis_errors || attempt == 3 {
            break;
        }
    }
    let report = format!(
        "window {attempt} (after a clean refill: {refilled}): {window:?}\nstart {window_start:?}\nend {window_end:?}\n{report}"
    );
    assert_eq!(
        window.count(200),
        window.requests,
        "all 200 after recovery: {report}"
    );
    assert_eq!(
        window_end.redis_errors, window_start.redis_errors,
        "Redis calls succeed again: {report}"
    );
    assert_eq!(
        window_end.db_hits, window_start.db_hits,
        "no DB queries once Redis is back: {report}"
    );
    assert!(
        window_end.redis_hits() > window_start.redis_hits(),
        "answers come from Redis again: {report}"
    );
    assert_eq!(window_end.breaker_state, 0.0, "{report}");
    // Shown with --nocapture: the figures an operator would look at.
    eprintln!(
        "{fault:?}: {} requests, slowest {:?}, DB queries {} (before the fault {}, during {}, \
         after {}; bound {bound:.0}), Redis errors {}, breaker opened {} times",
        tally.requests,
        tally.slowest,
        db_queries,
        at_fault.db_hits - before.db_hits,
        at_restore.db_hits - at_fault.db_hits,
        after.db_hits - at_restore.db_hits,
        after.redis_errors,
        after.breaker_opened,
    );
}

#[actix_rt::test]
async fn redis_black_holed_mid_load_costs_no_errors_and_bounded_db_load_then_recovers() {
    redis_fault_under_load(Mode::Blackhole).await;
}

#[actix_rt::test]
async fn redis_refusing_mid_load_costs_no_errors_and_bounded_db_load_then_recovers() {
    redis_fault_under_load(Mode::Refuse).await;
}

#[actix_rt::test]
async fn redis_slower_than_its_timeout_mid_load_costs_no_errors_and_bounded_db_load_then_recovers()
{
    // Each way, so a round trip costs 6× REDIS_TIMEOUT.
    redis_fault_under_load(Mode::Latency(3 * REDIS_TIMEOUT)).await;
}

// ---------------------------------------------------------------------------------------------
// PostgreSQL down
// ---------------------------------------------------------------------------------------------

#[actix_rt::test]
async fn postgresql_down_serves_what_is_cached_answers_503_for_the_rest_and_recovers() {
    let proxy = postgres_proxy();
    let app = spawn_app_with(|s: &mut Settings| {
        s.database_url = via(&proxy, &s.database_url);
        s.near_cache_ttl = NEAR_CACHE_TTL;
        s.request_timeout = REQUEST_TIMEOUT;
    })
    .await;
    let in_redis: RangeInclusive<i64> = 1..=10;
    let only_remembered: RangeInclusive<i64> = 11..=20;
    let uncached: RangeInclusive<i64> = 501..=510;

    let (loaded, _) = each_once(&app, 1..=20, 20).await;
    assert_eq!(
        loaded.count(200),
        20,
        "loaded while PostgreSQL is up: {loaded:?}"
    );
    // Keys 11..=20 leave Redis (as expiry or eviction would take them): only their owner's
    // remembered copy is left.
    let redis = redis::Client::open(app.redis_url.as_str()).expect("redis url");
    let mut conn = redis
        .get_multiplexed_async_connection()
        .await
        .expect("connect to Redis directly");
    let keys: Vec<String> = only_remembered
        .clone()
        .map(|id| format!("template:{{{id}}}"))
        .collect();
    let deleted: usize = redis::cmd("DEL")
        .arg(&keys)
        .query_async(&mut conn)
        .await
        .expect("DEL");
    assert_eq!(deleted, 10, "keys 11..=20 were in Redis");

    // PostgreSQL "stops": new connections are refused, open ones are cut.
    proxy.set_mode(Mode::Refuse);
    proxy.cut();
    // Past the near-cache TTL, every remembered copy is expired.
    tokio::time::sleep(NEAR_CACHE_TTL + Duration::from_millis(200)).await;
    let before = figures(&app).await;

    let (cached, cached_answers) = each_once(&app, in_redis.clone(), 10).await;
    let (remembered, remembered_answers) = each_once(&app, only_remembered.clone(), 10).await;
    let (missing, missing_answers) = each_once(&app, uncached.clone(), 10).await;
    let during = figures(&app).await;
    let report = format!(
        "in Redis {cached:?}\nonly remembered {remembered:?}\nuncached {missing:?}\nbefore {before:?}\nduring {during:?}"
    );

    for (id, answer) in &cached_answers {
        assert_eq!(
            answer.status, 200,
            "key {id} is in Redis: {answer:?}\n{report}"
        );
        assert!(
            ["HIT", "STALE"].contains(&answer.x_cache.as_str()),
            "key {id}: {answer:?}\n{report}"
        );
        assert_eq!(body_id(&answer.body), Some(*id), "{answer:?}");
    }
    for (id, answer) in &remembered_answers {
        assert_eq!(
            (answer.status, answer.x_cache.as_str()),
            (200, "STALE"),
            "key {id} is only remembered by its owner, expired: {answer:?}\n{report}"
        );
        assert_eq!(body_id(&answer.body), Some(*id), "{answer:?}");
    }
    for (id, answer) in &missing_answers {
        assert_eq!(
            answer.status, 503,
            "key {id} is cached nowhere: {answer:?}\n{report}"
        );
        assert!(
            !answer.retry_after.is_empty(),
            "503 says when to retry: {answer:?}"
        );
        let body: serde_json::Value = serde_json::from_str(&answer.body).expect("503 body is JSON");
        assert!(body["error"].is_string(), "{body}");
    }
    let slowest = cached.slowest.max(remembered.slowest).max(missing.slowest);
    assert!(
        slowest <= latest_answer_limit(),
        "every answer within the deadline + margin, got {slowest:?}: {report}"
    );
    assert!(
        during.stale_answers - before.stale_answers >= only_remembered.clone().count() as f64,
        "stale answers are counted: {report}"
    );

    // PostgreSQL is back: fresh answers, no restart. The pool finds out its connections were
    // cut as it uses them, so allow a few attempts per key.
    proxy.set_mode(Mode::Pass);
    let client = load_client(1);
    for id in uncached.clone().chain(only_remembered.clone()) {
        let started = Instant::now();
        let answer = loop {
            let answer = fetch(&client, &app, id).await;
            let fresh = answer.status == 200 && answer.x_cache != "STALE";
            if fresh || started.elapsed() >= SETTLE {
                break answer;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        assert_eq!(
            answer.status, 200,
            "key {id} is answered within {SETTLE:?} of PostgreSQL coming back: {answer:?}"
        );
        assert_ne!(
            answer.x_cache, "STALE",
            "key {id} is fresh again: {answer:?}"
        );
        assert_eq!(body_id(&answer.body), Some(id), "{answer:?}");
    }
    let after = figures(&app).await;
    assert!(
        after.db_hits > during.db_hits,
        "the fresh answers came from PostgreSQL: {after:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// Overload
// ---------------------------------------------------------------------------------------------

#[actix_rt::test]
async fn more_pending_keys_than_the_limit_are_shed_and_the_service_recovers() {
    const LIMIT: usize = 8;
    const SHARDS: usize = 2;
    let proxy = postgres_proxy();
    let app = spawn_app_with(|s: &mut Settings| {
        s.database_url = via(&proxy, &s.database_url);
        s.max_pending_keys = LIMIT;
        s.key_owner_shards = SHARDS;
        s.request_timeout = REQUEST_TIMEOUT;
    })
    .await;
    // Open pooled connections while PostgreSQL is fast (through a slow link, opening one takes
    // several round trips). LIMIT keys at once stay within the limit whatever their shards.
    let (warm, _) = each_once(&app, 1..=LIMIT as i64, LIMIT).await;
    assert_eq!(warm.count(200), LIMIT, "{warm:?}");

    // PostgreSQL slows down: each load now pends for at least a round trip of 600 ms.
    proxy.set_mode(Mode::Latency(Duration::from_millis(300)));
    let cold: RangeInclusive<i64> = 101..=164;
    let client = load_client(cold.clone().count());
    // Open the connections first, so the burst arrives at once rather than paced by handshakes.
    for response in join_all(
        cold.clone()
            .map(|_| client.get(format!("{}/healthz", app.address)).send()),
    )
    .await
    {
        assert_eq!(response.expect("healthz").status(), 200);
    }
    let before = figures(&app).await;
    let burst = join_all(cold.clone().map(|id| fetch(&client, &app, id)));
    // While the admitted loads pend, the owners hold no more than their limit.
    let peek = async {
        tokio::time::sleep(Duration::from_millis(150)).await;
        figures(&app).await
    };
    let (answers, during) = tokio::join!(burst, peek);
    let after = figures(&app).await;
    let mut tally = Tally::default();
    let mut missing_retry_after = 0;
    for answer in answers {
        if answer.status == 503 && answer.retry_after.is_empty() {
            missing_retry_after += 1;
        }
        tally.record(answer);
    }
    let report = format!("{tally:?}\nbefore {before:?}\nduring {during:?}\nafter {after:?}");

    let shed = after.shed - before.shed;
    assert!(shed > 0.0, "requests beyond the limit are shed: {report}");
    assert!(
        tally.count(503) as f64 >= shed,
        "every shed request is a 503: {report}"
    );
    assert_eq!(
        tally.count(200) + tally.count(503),
        tally.requests,
        "only 200 or 503: {report}"
    );
    assert_eq!(
        missing_retry_after, 0,
        "every 503 has Retry-After: {report}"
    );
    assert!(
        tally.slowest <= latest_answer_limit(),
        "no answer later than the deadline + margin: {report}"
    );
    assert!(
        during.inflight_total() > 0.0,
        "the look was taken while loads pended: {report}"
    );
    assert!(
        during.inflight_keys.iter().all(|(_, v)| *v <= LIMIT as f64),
        "no owner holds more than {LIMIT} pending keys: {report}"
    );

    // PostgreSQL is fast again: the owners drain and answer normally.
    proxy.set_mode(Mode::Pass);
    let drained = settle(&app, SETTLE, Figures::idle).await;
    assert!(
        drained.idle(),
        "no pending keys or waiters left: {drained:?}\n{report}"
    );
    // LIMIT at a time, so that a healthy service is within its bound whatever the shards.
    let (again, _) = each_once(&app, cold.clone(), LIMIT).await;
    let settled = settle(&app, SETTLE, Figures::idle).await;
    assert_eq!(
        again.count(200),
        again.requests,
        "the service answers normally after the overload: {again:?}\n{settled:?}"
    );
    assert!(settled.idle(), "{settled:?}");
}

// ---------------------------------------------------------------------------------------------
// Clients giving up
// ---------------------------------------------------------------------------------------------

#[actix_rt::test]
async fn clients_abandoning_a_load_mid_flight_do_not_cancel_it() {
    const KEY: i64 = 777;
    const REQUESTS: usize = 100;
    let proxy = postgres_proxy();
    let app = spawn_app_with(|s: &mut Settings| {
        s.database_url = via(&proxy, &s.database_url);
        s.request_timeout = REQUEST_TIMEOUT;
    })
    .await;
    // One pooled connection, opened (and its statement prepared) while PostgreSQL is fast.
    assert_eq!(app.template(1).await.status(), 200);
    app.warm_connections(REQUESTS).await;
    // The load of KEY now takes at least one 600 ms round trip.
    proxy.set_mode(Mode::Latency(Duration::from_millis(300)));
    let before = figures(&app).await;

    // Every other request gives up after 10..=90 ms (spread deterministically): its future is
    // dropped, which closes its connection mid-request.
    let requests = (0..REQUESTS).map(|i| {
        let app = &app;
        async move {
            if i % 2 == 1 {
                let patience = Duration::from_millis(10 + (i as u64 * 37) % 81);
                match tokio::time::timeout(patience, app.template(KEY)).await {
                    Err(_gave_up) => None,
                    Ok(response) => Some((response.status().as_u16(), "answered early".into())),
                }
            } else {
                let response = app.template(KEY).await;
                let status = response.status().as_u16();
                let x_cache = header(&response, "x-cache");
                let body = response.text().await.unwrap_or_default();
                assert_eq!(body_id(&body), (status == 200).then_some(KEY), "{body}");
                Some((status, x_cache))
            }
        }
    });
    let outcomes = join_all(requests).await;
    let abandoned = outcomes.iter().filter(|o| o.is_none()).count();
    let kept: Vec<_> = outcomes.into_iter().flatten().collect();
    assert_eq!(
        abandoned,
        REQUESTS / 2,
        "half the clients left before the load could land: {kept:?}"
    );
    assert!(
        kept.iter()
            .all(|(status, x)| *status == 200 && ["MISS", "SHARED"].contains(&x.as_str())),
        "everyone who stayed got the shared load: {kept:?}"
    );
    let after = figures(&app).await;
    assert_eq!(
        after.db_hits - before.db_hits,
        1.0,
        "one query for {REQUESTS} requests, however many left: {after:?}"
    );

    // The load filled Redis ...
    proxy.set_mode(Mode::Pass);
    let redis = redis::Client::open(app.redis_url.as_str()).expect("redis url");
    let mut conn = redis
        .get_multiplexed_async_connection()
        .await
        .expect("connect to Redis directly");
    let started = Instant::now();
    let stored = loop {
        let stored: Option<String> = redis::cmd("GET")
            .arg(format!("template:{{{KEY}}}"))
            .query_async(&mut conn)
            .await
            .expect("GET");
        if stored.is_some() || started.elapsed() >= SETTLE {
            break stored;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let stored = stored.expect("the abandoned load was written to Redis");
    // An entry may carry a header line (loaded-at, soft expiry) before the JSON body.
    let stored_body = match stored.split_once('\n') {
        Some((_header, body)) if !stored.starts_with('{') => body,
        _ => stored.as_str(),
    };
    assert_eq!(body_id(stored_body), Some(KEY), "{stored}");
    // ... the next request is a hit, and no waiter is left behind.
    let next = app.template(KEY).await;
    assert_eq!(
        (next.status().as_u16(), header(&next, "x-cache").as_str()),
        (200, "HIT")
    );
    let settled = settle(&app, SETTLE, Figures::idle).await;
    assert!(
        settled.idle(),
        "no pending keys or waiters left: {settled:?}"
    );
    assert_eq!(settled.db_hits - before.db_hits, 1.0, "{settled:?}");
}

// ---------------------------------------------------------------------------------------------
// A flood of unknown ids
// ---------------------------------------------------------------------------------------------

#[actix_rt::test]
async fn ten_thousand_unknown_ids_twice_cost_at_most_one_query_each() {
    const UNKNOWN: RangeInclusive<i64> = 2_000_000..=2_009_999;
    const CONCURRENCY: usize = 100;
    /// Each pass must end by then, or the test fails rather than runs on.
    const PASS_LIMIT: Duration = Duration::from_secs(60);
    let app = spawn_app_with(|s: &mut Settings| {
        // Longer than both passes take, so that the second pass is inside the window.
        s.negative_ttl = Duration::from_secs(300);
    })
    .await;
    let ids = UNKNOWN.count();

    let mut passes = Vec::new();
    for pass in 1..=2 {
        let (tally, answers) =
            tokio::time::timeout(PASS_LIMIT, each_once(&app, UNKNOWN, CONCURRENCY))
                .await
                .unwrap_or_else(|_| panic!("pass {pass} took longer than {PASS_LIMIT:?}"));
        let after = figures(&app).await;
        assert_eq!(tally.count(404), ids, "pass {pass}: all 404: {tally:?}");
        let (id, sample) = &answers[0];
        assert_eq!(
            serde_json::from_str::<serde_json::Value>(&sample.body).ok(),
            Some(serde_json::json!({ "error": format!("template {id} not found") })),
            "{sample:?}"
        );
        passes.push((tally, after));
    }
    let (second, after) = &passes[1];
    assert!(
        after.db_hits <= ids as f64,
        "{} DB queries for {ids} unknown ids asked twice (first pass: {}): {passes:?}",
        after.db_hits,
        passes[0].1.db_hits
    );
    assert_eq!(
        second.x_cache.get("HIT").copied().unwrap_or(0),
        ids,
        "the second pass is answered from the negative cache: {second:?}"
    );
    let settled = settle(&app, SETTLE, Figures::idle).await;
    assert!(settled.idle(), "nothing left pending: {settled:?}");
}

// ---------------------------------------------------------------------------------------------
// PostgreSQL restarted: change notifications resume
// ---------------------------------------------------------------------------------------------

/// Waits (bounded) until `metric` satisfies `done`.
pub(crate) async fn wait_for_metric(app: &TestApp, metric: &str, done: impl Fn(f64) -> bool) {
    let (limit, every) = (Duration::from_secs(20), Duration::from_millis(50));
    let polled = poll::until(limit, every, || app.metric(metric), |v| done(*v)).await;
    assert!(polled.done, "{metric} never got there: {}", polled.last);
}

#[actix_rt::test]
async fn after_a_postgresql_restart_the_listener_reconnects_and_changes_are_seen_again() {
    let proxy = postgres_proxy();
    let app = spawn_app_with(|s: &mut Settings| {
        s.database_url = via(&proxy, &s.database_url);
        // Only an invalidation can make a change visible within a second.
        s.cache_ttl = Duration::from_secs(300);
    })
    .await;
    assert_eq!(app.metric("listener_connects_total").await, 1.0);
    assert_eq!(app.template(60).await.status(), 200);

    // As in a restart: every connection is dropped, and new ones fail for a while.
    proxy.set_mode(Mode::Refuse);
    proxy.cut();
    wait_for_metric(&app, "listener_connected", |v| v == 0.0).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    proxy.set_mode(Mode::Pass);
    wait_for_metric(&app, "listener_connects_total", |v| v >= 2.0).await;
    // Having reconnected, the service distrusts what it cached (notifications may have been
    // missed): a read finds the key suspect and reloads it (a first attempt may fail while the
    // pool replaces the connections the outage broke; the next read retries). Once a reload has
    // stored the row, the key is a plain hit — so from there only a notification can make the
    // next change visible before the 300 s TTL.
    let loaded = |text: &str| -> f64 {
        series(text, "singleflight_flights_total")
            .iter()
            .filter(|(labels, _)| labels == r#"{result="database"}"#)
            .map(|(_, v)| v)
            .sum()
    };
    let loads_before = loaded(&app.metrics_text().await);
    let started = Instant::now();
    while loaded(&app.metrics_text().await) <= loads_before {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the key was never reloaded"
        );
        assert_eq!(app.template(60).await.status(), 200);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        app.metric("cache_suspect_entries_total").await >= 1.0,
        "the suspect entry was not used"
    );
    assert_eq!(header(&app.template(60).await, "x-cache"), "HIT");

    app.execute_sql("UPDATE templates SET name = 'After the restart' WHERE id = 60")
        .await;
    let started = Instant::now();
    loop {
        let body = app.template(60).await.text().await.expect("body");
        if body.contains("After the restart") {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "the change was not served within 1 s of the commit: {body}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
