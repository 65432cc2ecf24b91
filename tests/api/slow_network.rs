//! A database and a cache far away: latency is waited for, not mistaken for failure.
//!
//! PostgreSQL (or Redis) sits behind a [`FaultProxy`] in [`Mode::Latency`], which delays every
//! chunk each way: a round trip costs twice the delay, as on a link that far away. The pool's
//! connections are opened before the delay starts, as a service that has been running finds
//! them; every test checks that the delay really applied (the burst could not have been served
//! in less than one round trip).

use std::time::{Duration, Instant};

use futures_util::future::join_all;
use testkit::poll;

use crate::faults::{postgres_proxy, redis_proxy, via, wait_for_metric};
use crate::support::fault_proxy::{FaultProxy, Mode};
use crate::support::{header, spawn_app_with, wait_for_warm_pool, TestApp};

/// The service's default `REQUEST_TIMEOUT_MS`, spelled out because assertions derive from it.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);

/// How much later than the deadline an answer may arrive on a loaded 2-core CI machine.
const DEADLINE_MARGIN: Duration = Duration::from_secs(1);

/// Starts the service with PostgreSQL behind `proxy` (still passing traffic through), and waits
/// until its pool has every connection open.
async fn app_behind(proxy: &FaultProxy, coalesce: bool) -> TestApp {
    let app = spawn_app_with(|s| {
        s.database_url = via(proxy, &s.database_url);
        s.request_timeout = REQUEST_TIMEOUT;
        s.coalesce = coalesce;
    })
    .await;
    let pool_size = singleflight::config::Settings::default().db_pool_size as f64;
    wait_for_warm_pool(&app.client, &app.address, pool_size).await;
    app
}

/// What a burst of distinct cold ids got.
struct Burst {
    statuses: Vec<u16>,
    slowest: Duration,
    took: Duration,
}

/// Sends one request for each of `ids` at once, over connections opened beforehand.
async fn cold_burst(app: &TestApp, ids: std::ops::RangeInclusive<i64>) -> Burst {
    app.warm_connections(ids.clone().count()).await;
    let started = Instant::now();
    let requests = ids.map(|id| async move {
        let sent = Instant::now();
        let response = app.template(id).await;
        let status = response.status().as_u16();
        let body = response.text().await.unwrap_or_default();
        assert!(
            status != 200 || body.contains(&format!("\"id\":{id},")),
            "{id}: {body}"
        );
        (status, sent.elapsed())
    });
    let answers = join_all(requests).await;
    Burst {
        statuses: answers.iter().map(|(status, _)| *status).collect(),
        slowest: answers
            .iter()
            .map(|(_, took)| *took)
            .max()
            .unwrap_or_default(),
        took: started.elapsed(),
    }
}

async fn every_cold_id_is_served(delay: Duration, ids: std::ops::RangeInclusive<i64>) {
    let proxy = postgres_proxy();
    let app = app_behind(&proxy, true).await;
    proxy.set_mode(Mode::Latency(delay));
    let n = ids.clone().count();
    let burst = cold_burst(&app, ids).await;

    let ok = burst.statuses.iter().filter(|s| **s == 200).count();
    let errors = app.metric("db_errors_total").await;
    assert_eq!(
        ok, n,
        "{ok}/{n} answered 200 with PostgreSQL {delay:?} per hop (took {:?}, db errors {errors})",
        burst.took
    );
    assert_eq!(errors, 0.0);
    // Every id loaded exactly once, in at most one query per id (loads that queued while every
    // connection was busy went together).
    assert_eq!(app.metric("db_keys_per_query_sum").await, n as f64);
    assert!(app.metric("db_hits_total").await <= n as f64);
    assert!(
        burst.slowest <= REQUEST_TIMEOUT + DEADLINE_MARGIN,
        "slowest answer {:?}",
        burst.slowest
    );
    assert!(
        burst.took >= delay * 2,
        "faster than one round trip ({:?}): the delay did not apply",
        burst.took
    );
}

#[actix_rt::test]
async fn three_hundred_cold_ids_against_a_database_20ms_away_are_all_served() {
    every_cold_id_is_served(Duration::from_millis(20), 1..=300).await;
}

#[actix_rt::test]
async fn fifty_cold_ids_against_a_database_150ms_away_are_all_served() {
    every_cold_id_is_served(Duration::from_millis(150), 1..=50).await;
}

/// PostgreSQL goes down in the way `fault` plays it: the service notices (from a refused
/// connection, or from a query the server never answered and a cancel request that cannot
/// reach it, confirmed by a probe), then fails uncached loads at once, says so in `/readyz`
/// (degraded, still ready: the replica serves what it has), and serves again once PostgreSQL
/// is back.
async fn a_database_that_goes_down_is_failed_fast_and_found_again(fault: Mode) {
    let proxy = postgres_proxy();
    let app = app_behind(&proxy, true).await;
    proxy.set_mode(fault);
    if fault == Mode::Refuse {
        proxy.cut();
    }
    let started = Instant::now();
    let mut id = 900;
    while app.metric("db_available").await != 0.0 {
        assert!(started.elapsed() < Duration::from_secs(15), "never noticed");
        // Until it is known, a load waits (within its deadline) and is answered 503.
        let response = app.template(id).await;
        assert_eq!(response.status(), 503, "{fault:?}");
        id += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Known down: an uncached id is refused at once, not after the flight's deadline.
    let asked = Instant::now();
    let response = app.template(id).await;
    assert_eq!(response.status(), 503);
    assert!(!header(&response, "retry-after").is_empty());
    assert!(
        asked.elapsed() < Duration::from_millis(500),
        "failed fast, took {:?}",
        asked.elapsed()
    );
    let ready = app.get("/readyz").await;
    assert_eq!(
        ready.status(),
        200,
        "a shared backend down is degraded, not unready"
    );
    let body: serde_json::Value = ready.json().await.expect("readyz JSON");
    let degraded = body["degraded"].as_array().expect("a list of backends");
    assert!(degraded.contains(&"postgres".into()), "{body}");
    assert_eq!(
        body["checks"]["database"],
        "degraded: PostgreSQL refused or did not answer connections; serving what is cached"
    );

    proxy.set_mode(Mode::Pass);
    let started = Instant::now();
    loop {
        let response = app.template(id + 1).await;
        if response.status() == 200 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "not served again within 10 s of PostgreSQL coming back"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(app.metric("db_available").await, 1.0);
}

#[actix_rt::test]
async fn a_database_refusing_connections_is_failed_fast_and_found_again() {
    a_database_that_goes_down_is_failed_fast_and_found_again(Mode::Refuse).await;
}

#[actix_rt::test]
async fn a_black_holed_database_is_failed_fast_and_found_again() {
    a_database_that_goes_down_is_failed_fast_and_found_again(Mode::Blackhole).await;
}

#[actix_rt::test]
async fn a_change_during_a_slow_cache_write_is_never_answered_with_the_old_row() {
    // Redis 300 ms away per hop: a flight's write is in the air for 600 ms after its load.
    let proxy = redis_proxy();
    let app = spawn_app_with(|s| {
        s.redis_url = via(&proxy, &s.redis_url);
        s.redis_timeout = Duration::from_secs(3);
        s.request_timeout = Duration::from_secs(10);
        s.near_cache_ttl = Duration::ZERO;
    })
    .await;
    proxy.set_mode(Mode::Latency(Duration::from_millis(300)));
    // Connected to Redis (through the delay) before the rounds begin.
    assert_eq!(app.template(1).await.status(), 200);
    let direct_url = app
        .redis_url
        .replace(&proxy.addr().to_string(), &proxy.upstream().to_string());
    let direct = redis::Client::open(direct_url.as_str()).expect("redis url");
    let mut redis = direct
        .get_multiplexed_async_connection()
        .await
        .expect("connect to Redis directly");

    for round in 0..5 {
        let id = 60 + round;
        let first = app.template(id).await;
        assert_eq!(header(&first, "x-cache"), "MISS");
        let invalidations = app.metric("invalidations_total").await;
        let name = format!("Renamed in round {round}");
        app.execute_sql(&format!(
            "UPDATE templates SET name = '{name}' WHERE id = {id}"
        ))
        .await;
        wait_for_metric(&app, "invalidations_total", |n| n > invalidations).await;
        // The service now knows of the change; the first flight's write may still be in the air.
        let after = app.template(id).await;
        let x_cache = header(&after, "x-cache");
        let body = after.text().await.expect("body");
        assert!(
            body.contains(&name),
            "round {round}: answered {x_cache} with the row from before the change: {body}"
        );
        // And what is left in Redis once every flight has ended is the new row (or nothing).
        wait_for_metric(&app, "key_owner_inflight_keys", |n| n == 0.0).await;
        let cached: Option<String> = redis::cmd("GET")
            .arg(format!("template:{{{id}}}"))
            .query_async(&mut redis)
            .await
            .expect("GET");
        if let Some(entry) = cached {
            assert!(entry.contains(&name), "round {round}: Redis holds {entry}");
        }
    }
}

/// The figures behind BENCHMARKS.md's "cold bursts against a distant database": 300 distinct
/// cold ids at once against PostgreSQL 20 ms away per hop, and 50 against one 150 ms away, for
/// each pool size, with batching
/// on (the default, `DB_BATCH_MAX=100`) and off (`DB_BATCH_MAX=1`), and with coalescing off
/// (which sends every load alone), alternated, three runs each. A measurement, not a test: run it with
/// `cargo test --release --test api -- --ignored --nocapture cold_burst_figures`.
#[actix_rt::test]
#[ignore = "a benchmark: prints figures for BENCHMARKS.md"]
async fn cold_burst_figures() {
    println!("| run | PostgreSQL per hop | DB_POOL_SIZE | DB_BATCH_MAX | COALESCE | answered 200 | queries | burst took | ids served per second | slowest answer |");
    println!("|---|---|---|---|---|---|---|---|---|---|");
    let scenarios = [
        (Duration::from_millis(20), 1..=300),
        (Duration::from_millis(150), 1..=50),
    ];
    for run in 1..=3 {
        for (pool_size, (delay, ids)) in [10, 20]
            .into_iter()
            .flat_map(|p| scenarios.clone().map(|sc| (p, sc)))
        {
            for (batch_max, coalesce) in [(100, true), (1, true), (100, false)] {
                let proxy = postgres_proxy();
                let app = spawn_app_with(|s| {
                    s.database_url = via(&proxy, &s.database_url);
                    s.request_timeout = REQUEST_TIMEOUT;
                    s.coalesce = coalesce;
                    s.db_pool_size = pool_size;
                    s.db_pool_min_idle = pool_size;
                    s.db_batch_max = batch_max;
                })
                .await;
                wait_for_warm_pool(&app.client, &app.address, f64::from(pool_size)).await;
                proxy.set_mode(Mode::Latency(delay));
                let burst = cold_burst(&app, ids.clone()).await;
                let ok = burst.statuses.iter().filter(|s| **s == 200).count();
                let queries = app.metric("db_hits_total").await;
                println!(
                    "| {run} | {} ms | {pool_size} | {} | {} | {ok}/{} | {queries} | {:.2} s | {:.0} | {:.2} s |",
                    delay.as_millis(),
                    if coalesce { batch_max } else { 1 },
                    if coalesce { "on" } else { "off" },
                    burst.statuses.len(),
                    burst.took.as_secs_f64(),
                    ok as f64 / burst.took.as_secs_f64(),
                    burst.slowest.as_secs_f64(),
                );
            }
        }
    }
}

/// A query that runs too long is a slow query, not an outage: its waiters get a 503 when the
/// query timeout runs out, the server is asked to cancel it (and does: nothing of the service's
/// is left waiting on the server), and PostgreSQL stays "up" in `/readyz` and `db_available`.
#[actix_rt::test]
async fn a_query_cancelled_for_running_too_long_is_a_slow_query_not_an_outage() {
    use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};

    let app = spawn_app_with(|s| {
        s.db_query_timeout = Duration::from_millis(300);
        s.request_timeout = Duration::from_secs(5);
    })
    .await;
    // Another client holds a lock that every read of the table waits behind.
    let mut holder = AsyncPgConnection::establish(&app.database_url)
        .await
        .expect("connect to the test database");
    diesel::sql_query("BEGIN")
        .execute(&mut holder)
        .await
        .unwrap();
    diesel::sql_query("LOCK TABLE templates IN ACCESS EXCLUSIVE MODE")
        .execute(&mut holder)
        .await
        .unwrap();

    let response = app.template(7).await;
    assert_eq!(response.status(), 503, "the query ran out of time");
    let timeouts = r#"db_errors_total{kind="query_timeout"}"#;
    assert!(app.metrics_text().await.contains(&format!("{timeouts} 1")));
    // The server cancelled the query: no backend of the service still waits on the lock.
    let waiting = || async {
        app.execute_sql(
            "SELECT 1 FROM pg_stat_activity WHERE datname = current_database() \
             AND wait_event_type = 'Lock' AND query LIKE '%templates%'",
        )
        .await
    };
    let polled = poll::until(
        Duration::from_secs(5),
        Duration::from_millis(50),
        waiting,
        |n| *n == 0,
    )
    .await;
    assert!(
        polled.done,
        "{} queries still wait on the lock",
        polled.last
    );
    // The probe that the unanswered query started connects at once: PostgreSQL is up.
    let database = || async {
        let ready: serde_json::Value = app.get("/readyz").await.json().await.unwrap();
        ready["checks"]["database"]
            .as_str()
            .unwrap_or_default()
            .to_owned()
    };
    let polled = poll::until(
        Duration::from_secs(5),
        Duration::from_millis(50),
        database,
        |d| d == "ok",
    )
    .await;
    assert!(polled.done, "{}", polled.last);
    assert_eq!(app.metric("db_available").await, 1.0);

    diesel::sql_query("COMMIT")
        .execute(&mut holder)
        .await
        .unwrap();
    assert_eq!(app.template(7).await.status(), 200);
}

/// Readiness through an outage, the issue's scenario: PostgreSQL black-holed for 15 s under a
/// service with 30 ids cached. Every second, `/readyz` and the 30 cached ids are asked.
/// `cargo test --release --test api -- --ignored --nocapture outage_figures`.
#[actix_rt::test]
#[ignore = "a benchmark: prints figures for BENCHMARKS.md"]
async fn outage_figures() {
    let proxy = postgres_proxy();
    let app = spawn_app_with(|s| {
        s.database_url = via(&proxy, &s.database_url);
        s.cache_ttl = Duration::from_secs(300);
    })
    .await;
    for id in 1..=30 {
        assert_eq!(app.template(id).await.status(), 200);
    }
    proxy.set_mode(Mode::Blackhole);
    println!("| second | /readyz | degraded | cached ids served | an uncached id |");
    println!("|---|---|---|---|---|");
    let (mut ready, mut served_all) = (0, 0);
    for second in 1..=15 {
        let started = Instant::now();
        let response = app.get("/readyz").await;
        let status = response.status().as_u16();
        let body: serde_json::Value = response.json().await.expect("readyz JSON");
        let app = &app;
        let cached = join_all((1..=30).map(|id| async move { app.template(id).await.status() }));
        let served = cached.await.iter().filter(|s| **s == 200).count();
        let uncached = app.template(1000 + second).await.status().as_u16();
        println!(
            "| {second} | {status} | {} | {served}/30 | {uncached} |",
            body["degraded"]
        );
        ready += usize::from(status == 200);
        served_all += usize::from(served == 30);
        tokio::time::sleep(Duration::from_secs(1).saturating_sub(started.elapsed())).await;
    }
    let text = app.metrics_text().await;
    let db = |l: &&str| l.starts_with("db_errors_total") || l.starts_with("db_available");
    for line in text.lines().filter(db) {
        println!("{line}");
    }
    proxy.set_mode(Mode::Pass);
    println!(
        "\n/readyz 200 in {ready} of 15 checks; all 30 cached ids served in {served_all} of 15"
    );
}
