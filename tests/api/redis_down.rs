//! Redis is an optimisation: with no Redis at all the service starts and answers from
//! PostgreSQL, and says it is degraded.

use std::time::Duration;

use crate::support::{closed_port, header, spawn_app_with};

#[actix_rt::test]
async fn the_service_starts_and_answers_from_postgresql_with_redis_down() {
    let closed_port = closed_port();
    let app = spawn_app_with(|s| {
        s.redis_url = format!("redis://127.0.0.1:{closed_port}/");
        // Without the owners' near cache nothing can be cached at all: every request loads.
        s.near_cache_ttl = Duration::ZERO;
    })
    .await;

    for _ in 0..3 {
        // Once the previous flight has ended (its Redis write failed), nothing is left to share.
        let started = std::time::Instant::now();
        while app.metric("key_owner_inflight_keys").await > 0.0 {
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "a flight never ended"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let response = app.template(12).await;
        assert_eq!(response.status(), 200);
        assert_eq!(
            header(&response, "x-cache"),
            "MISS",
            "nothing can be cached"
        );
        let body: serde_json::Value = response.json().await.unwrap();
        assert_eq!(body["id"], 12);
    }
    assert_eq!(app.metric("db_hits_total").await, 3.0);
    assert!(
        app.metric("redis_errors_total").await >= 3.0,
        "each failed Redis call is counted"
    );

    let ready = app.get("/readyz").await;
    assert_eq!(ready.status(), 200, "Redis down is degraded, not unready");
    let body: serde_json::Value = ready.json().await.unwrap();
    assert!(
        body["checks"]["redis"]
            .as_str()
            .unwrap()
            .starts_with("degraded"),
        "{body}"
    );
}

#[actix_rt::test]
async fn a_bad_value_in_redis_is_a_miss_that_gets_overwritten() {
    let app = spawn_app_with(|_| {}).await;
    let client = redis::Client::open(app.redis_url.as_str()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    redis::cmd("SET")
        .arg("template:{77}")
        .arg("not a template")
        .query_async::<()>(&mut conn)
        .await
        .unwrap();

    let response = app.template(77).await;
    assert_eq!(response.status(), 200);
    assert_eq!(header(&response, "x-cache"), "MISS");
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["id"], 77);
    let decode_errors = app.metrics_text().await;
    assert!(decode_errors.contains(r#"redis_errors_total{kind="decode"} 1"#));

    // The answer does not wait for the write to Redis: look until the entry has changed.
    let stored = testkit::poll::until(
        Duration::from_secs(10),
        Duration::from_millis(10),
        || {
            let mut conn = conn.clone();
            async move {
                redis::cmd("GET")
                    .arg("template:{77}")
                    .query_async::<Option<String>>(&mut conn)
                    .await
            }
        },
        |stored| matches!(stored, Ok(Some(s)) if s != "not a template"),
    )
    .await;
    assert!(
        stored.done,
        "the bad value was never overwritten: {:?}",
        stored.last
    );
    let stored = stored.last.expect("GET").expect("an entry");
    let (header_line, body) = stored
        .split_once('\n')
        .expect("an entry: header line, then body");
    assert!(
        header_line.starts_with("sf2 "),
        "the bad value was overwritten: {stored}"
    );
    assert!(
        body.starts_with("{\"id\":77"),
        "the bad value was overwritten: {stored}"
    );
    assert_eq!(header(&app.template(77).await, "x-cache"), "HIT");
}

#[actix_rt::test]
async fn with_redis_down_the_near_cache_bounds_database_load_per_key() {
    let closed_port = closed_port();
    let app = spawn_app_with(|s| {
        s.redis_url = format!("redis://127.0.0.1:{closed_port}/");
        // Longer than the 600 requests take on any machine: each key is loaded once.
        s.near_cache_ttl = Duration::from_secs(30);
    })
    .await;
    app.warm_connections(50).await;
    for _ in 0..4 {
        for id in [21, 22, 23] {
            let answers = app.burst(id, 50).await;
            assert!(answers.iter().all(|(status, ..)| *status == 200));
        }
    }
    assert_eq!(
        app.metric("db_hits_total").await,
        3.0,
        "one load per key per near-cache TTL"
    );
    // With Redis down each of the 600 answers was the one load per key, shared with it, or
    // served from memory: by the owner's near cache, or by an HTTP worker's copy of one of its
    // near-cache hits; rounds 2..4 entirely from memory.
    let near = app.metric("near_cache_hits_total").await;
    let worker = app.metric("worker_cache_hits_total").await;
    let shared = app.metric("singleflight_shared_total").await;
    assert_eq!(
        near + worker + shared + 3.0,
        600.0,
        "near {near}, worker {worker}, shared {shared}"
    );
    assert!(near + worker >= 450.0, "near {near}, worker {worker}");
}
