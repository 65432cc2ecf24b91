//! Each HTTP worker's cache of fresh answers, through HTTP: a hot key is answered by the worker
//! itself (`X-Cache: HIT`, counted), a change is still served within a second and the old value
//! never again, a key in steady use is renewed in the background rather than sent to its owner
//! when its copy runs out, and the setting and `COALESCE=off` turn it off.

use std::time::{Duration, Instant};

use testkit::poll;

use crate::support::{header, spawn_app_with};

/// Requests for one key in a row (one worker, so every answer after the first near-cache hit
/// can come from that worker's cache).
const REPEATS: usize = 50;

#[actix_rt::test]
async fn a_hot_key_is_answered_by_the_worker_and_a_change_ends_it_at_once() {
    let app = spawn_app_with(|s| {
        s.http_workers = 1;
        s.cache_ttl = Duration::from_secs(300);
        s.near_cache_ttl = Duration::from_secs(60);
    })
    .await;
    let first = app.template(40).await;
    assert_eq!(first.status(), 200);
    let old = first.text().await.expect("body");
    for _ in 0..REPEATS {
        let response = app.template(40).await;
        assert_eq!(header(&response, "x-cache"), "HIT");
        assert_eq!(response.text().await.expect("body"), old);
    }
    let worker_hits = app.metric("worker_cache_hits_total").await;
    assert!(
        worker_hits >= (REPEATS - 1) as f64,
        "{worker_hits} of {REPEATS} hits answered by the worker"
    );
    assert!(
        app.metric("cache_hits_total").await
            >= worker_hits + app.metric("near_cache_hits_total").await,
        "the workers' hits are in cache_hits_total too"
    );

    app.execute_sql("UPDATE templates SET name = 'Renamed by a test' WHERE id = 40")
        .await;
    let renamed = poll::until(
        Duration::from_secs(10),
        Duration::from_millis(20),
        || async { app.template(40).await.text().await.expect("body") },
        |body| body.contains("Renamed by a test"),
    )
    .await;
    assert!(renamed.done, "never served the change: {}", renamed.last);
    assert!(
        renamed.took < Duration::from_secs(1),
        "change visible after {:?}",
        renamed.took
    );
    // Once the change is served, the old value never is again, from any cache.
    for _ in 0..REPEATS {
        let body = app.template(40).await.text().await.expect("body");
        assert!(
            body.contains("Renamed by a test"),
            "old value served: {body}"
        );
    }
}

#[actix_rt::test]
async fn capacity_zero_and_coalesce_off_turn_the_worker_cache_off() {
    for (what, capacity, coalesce) in [("capacity 0", 0, true), ("COALESCE=off", 10, false)] {
        let app = spawn_app_with(|s| {
            s.http_workers = 1;
            s.worker_cache_capacity = capacity;
            s.coalesce = coalesce;
        })
        .await;
        for _ in 0..REPEATS {
            assert_eq!(app.template(41).await.status(), 200);
        }
        assert_eq!(
            app.metric("worker_cache_hits_total").await,
            0.0,
            "{what}: no worker cache"
        );
        assert!(app.metric("cache_hits_total").await > 0.0, "{what}");
    }
}

#[actix_rt::test]
async fn a_key_in_steady_use_is_renewed_in_the_background_and_never_waits_on_its_owner() {
    const NEAR_TTL: Duration = Duration::from_millis(1000);
    let app = one_worker_with_near_cache(NEAR_TTL).await;
    let first = app.template(42).await;
    assert_eq!(first.status(), 200);
    let body = first.text().await.expect("body");
    // Five times the near cache's freshness: without renewals the worker's copy would run out
    // five times, and the request after each would go to the owner.
    let started = Instant::now();
    let mut requests = 1;
    while started.elapsed() < 5 * NEAR_TTL {
        let response = app.template(42).await;
        assert_eq!(header(&response, "x-cache"), "HIT");
        assert_eq!(response.text().await.expect("body"), body);
        requests += 1;
    }
    let to_owner = f64::from(requests) - app.metric("worker_cache_hits_total").await;
    let text = app.metrics_text().await;
    let renewals = testkit::prom::series(&text, "worker_cache_renewals_total")
        .into_iter()
        .filter(|(labels, _)| labels.contains("\"read\"") || labels.contains("\"near_cache\""))
        .map(|(_, n)| n)
        .sum::<f64>();
    // One renewal per three quarters of the freshness, read from Redis: about six. A request
    // goes to the owner only if none came in a copy's last quarter (250 ms), which takes a
    // stalled machine.
    assert!(renewals >= 4.0, "{renewals} renewals");
    assert!(
        to_owner <= 3.0,
        "{to_owner} of {requests} requests went to the owner ({renewals} renewals)"
    );
    assert_eq!(
        app.metric("db_hits_total").await,
        1.0,
        "renewals read Redis only"
    );
}

#[actix_rt::test]
async fn a_renewal_reads_redis_as_a_request_would_and_renews_only_good_values() {
    // A copy is due for its last quarter: 250 ms, long enough for a loaded machine's stalls.
    const NEAR_TTL: Duration = Duration::from_millis(1000);
    let app = one_worker_with_near_cache(NEAR_TTL).await;
    let ids = [50, 51, 52];
    let mut bodies = Vec::new();
    for id in ids {
        let response = app.template(id).await;
        assert_eq!(response.status(), 200);
        bodies.push(response.text().await.expect("body"));
    }
    // In Redis: 50 stays good, 51 becomes garbage, 52 goes (as eviction would take it).
    let redis = redis::Client::open(app.redis_url.as_str()).expect("redis url");
    let mut conn = redis
        .get_multiplexed_async_connection()
        .await
        .expect("connect to Redis directly");
    redis::pipe()
        .cmd("SET")
        .arg("template:{51}")
        .arg("not a template")
        .ignore()
        .cmd("DEL")
        .arg("template:{52}")
        .ignore()
        .query_async::<()>(&mut conn)
        .await
        .expect("Redis answers");

    // Three near-cache periods of steady requests: each copy comes due and is renewed (50), or
    // is not and runs out (51, 52), then the next request reloads it and rewrites Redis.
    let started = Instant::now();
    while started.elapsed() < 3 * NEAR_TTL {
        for (id, body) in ids.iter().zip(&bodies) {
            let response = app.template(*id).await;
            assert_eq!(response.status(), 200, "{id}");
            assert_eq!(&response.text().await.expect("body"), body, "{id}");
        }
    }
    let text = app.metrics_text().await;
    let outcome = |name: &str| {
        testkit::prom::series(&text, "worker_cache_renewals_total")
            .into_iter()
            .find(|(labels, _)| labels.contains(&format!("\"{name}\"")))
            .map_or(0.0, |(_, n)| n)
    };
    assert!(outcome("read") >= 2.0, "50 renewed each period: {text}");
    assert!(outcome("missed") >= 2.0, "51 and 52 not renewed: {text}");
    assert!(
        sum_kind(&text, "decode") >= 2.0,
        "the garbage counted as a decode error, by the renewal and by the reload: {text}"
    );
    assert_eq!(
        app.metric("db_hits_total").await,
        5.0,
        "three first loads, then one reload each of 51 and 52 (by a request)"
    );
    for id in [51, 52] {
        let stored: String = redis::cmd("GET")
            .arg(format!("template:{{{id}}}"))
            .query_async(&mut conn)
            .await
            .expect("a rewritten entry");
        assert!(stored.starts_with("sf2 "), "{id}: {stored}");
    }
}

#[actix_rt::test]
async fn a_copy_in_use_is_renewed_even_if_no_request_for_it_comes_in_its_last_quarter() {
    const NEAR_TTL: Duration = Duration::from_millis(1000);
    let app = one_worker_with_near_cache(NEAR_TTL).await;
    let started = Instant::now();
    assert_eq!(app.template(43).await.status(), 200, "kept by the worker");
    assert_eq!(header(&app.template(43).await, "x-cache"), "HIT", "in use");
    // Only another key is asked for from here on, past the copy's last quarter (750 ms to
    // 1 s after it was kept) and on to 1.3 s: the worker's requests for it are what find the
    // copy of 43 due.
    while started.elapsed() < NEAR_TTL * 13 / 10 {
        assert_eq!(app.template(44).await.status(), 200);
    }
    let before = app.metric("worker_cache_hits_total").await;
    let response = app.template(43).await;
    assert_eq!(header(&response, "x-cache"), "HIT");
    assert_eq!(
        app.metric("worker_cache_hits_total").await - before,
        1.0,
        "43 was renewed while unasked, and answered by the worker 1.3 s after it was kept"
    );
    assert_eq!(app.metric("db_hits_total").await, 2.0, "one load per key");
}

/// The service with one HTTP worker (so that every copy is that worker's), a long Redis TTL
/// and a near cache fresh for `near_ttl`.
async fn one_worker_with_near_cache(near_ttl: Duration) -> crate::support::TestApp {
    spawn_app_with(|s| {
        s.http_workers = 1;
        s.cache_ttl = Duration::from_secs(300);
        s.near_cache_ttl = near_ttl;
    })
    .await
}

/// `redis_errors_total` of one kind.
fn sum_kind(text: &str, kind: &str) -> f64 {
    testkit::prom::series(text, "redis_errors_total")
        .into_iter()
        .filter(|(labels, _)| labels.contains(&format!("\"{kind}\"")))
        .map(|(_, n)| n)
        .sum()
}
