//! `/template-details` end to end: coalescing, caching, expiry, not found, validation.

use std::collections::HashSet;
use std::time::Duration;

use crate::faults::{postgres_proxy, via};
use crate::support::fault_proxy::Mode;
use crate::support::{header, spawn_app, spawn_app_with, sum_metric, wait_for_warm_pool};

#[actix_rt::test]
async fn a_cold_stampede_costs_exactly_one_query_and_everyone_gets_the_same_body() {
    let app = spawn_app().await;
    app.warm_connections(200).await;
    let db_before = app.metric("db_hits_total").await;

    let answers = app.burst(42, 200).await;

    assert_eq!(
        app.metric("db_hits_total").await - db_before,
        1.0,
        "one query for 200 requests"
    );
    assert!(
        answers.iter().all(|(status, ..)| *status == 200),
        "all 200 OK"
    );
    let bodies: HashSet<_> = answers.iter().map(|(_, _, body)| body.as_str()).collect();
    assert_eq!(bodies.len(), 1, "identical bodies");
    let misses = answers.iter().filter(|(_, x, _)| x == "MISS").count();
    assert_eq!(
        misses, 1,
        "exactly one request loaded it; the rest shared it or hit the cache"
    );
    assert!(answers
        .iter()
        .all(|(_, x, _)| ["MISS", "SHARED", "HIT"].contains(&x.as_str())));

    let body: serde_json::Value = serde_json::from_str(bodies.iter().next().unwrap()).unwrap();
    assert_eq!(body["id"], 42);
    assert!(body["name"].as_str().is_some_and(|n| !n.is_empty()));
    assert!(body["content"].as_str().is_some_and(|c| c.len() > 100));
    let updated = body["updated_at"].as_str().expect("updated_at");
    assert!(
        chrono::DateTime::parse_from_rfc3339(updated).is_ok(),
        "RFC 3339: {updated}"
    );

    let next = app.template(42).await;
    assert_eq!(header(&next, "x-cache"), "HIT");
    assert_eq!(app.metric("db_hits_total").await - db_before, 1.0);
}

#[actix_rt::test]
async fn responses_are_json_with_the_cache_header() {
    let app = spawn_app().await;
    let first = app.template(1).await;
    assert_eq!(first.status(), 200);
    assert_eq!(header(&first, "content-type"), "application/json");
    assert_eq!(header(&first, "x-cache"), "MISS");
    let second = app.template(1).await;
    assert_eq!(header(&second, "x-cache"), "HIT");
    assert_eq!(first.text().await.unwrap(), second.text().await.unwrap());
}

#[actix_rt::test]
async fn ttl_expiry_causes_exactly_one_reload() {
    let app = spawn_app_with(|s| s.cache_ttl = Duration::from_secs(1)).await;
    app.warm_connections(100).await;
    assert_eq!(app.template(7).await.status(), 200);
    assert_eq!(app.metric("db_hits_total").await, 1.0);
    assert_eq!(header(&app.template(7).await, "x-cache"), "HIT");

    tokio::time::sleep(Duration::from_millis(2100)).await;
    let answers = app.burst(7, 100).await;
    assert!(answers.iter().all(|(status, ..)| *status == 200));
    // The burst may have been answered while the reload ran in the background: count the
    // queries once no flight is in the air.
    assert_eq!(
        sum_metric(&app.metrics_when_idle().await, "db_hits_total"),
        2.0,
        "one reload after expiry, not 100"
    );
}

#[actix_rt::test]
async fn an_unknown_id_is_404_with_a_json_error() {
    let app = spawn_app().await;
    let response = app.template(987_654_321).await;
    assert_eq!(response.status(), 404);
    assert_eq!(header(&response, "content-type"), "application/json");
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["error"], "template 987654321 not found");
}

#[actix_rt::test]
async fn every_malformed_id_is_400_with_a_json_error() {
    let app = spawn_app().await;
    let big = "9".repeat(5000);
    let cases = [
        "/template-details",
        "/template-details?",
        "/template-details?id=",
        "/template-details?id",
        "/template-details?id=0",
        "/template-details?id=-1",
        "/template-details?id=abc",
        "/template-details?id=1.5",
        "/template-details?id=1e3",
        "/template-details?id=%20",
        "/template-details?id=9223372036854775808",
        "/template-details?id=1&id=2",
        "/template-details?ID=1",
        &format!("/template-details?id={big}"),
    ];
    for path in cases {
        let response = app.get(path).await;
        assert_eq!(response.status(), 400, "{path}");
        assert_eq!(
            header(&response, "content-type"),
            "application/json",
            "{path}"
        );
        let body: serde_json::Value = response.json().await.expect("JSON body");
        let message = body["error"].as_str().expect("an error message");
        assert!(message.contains("id"), "{path}: {message}");
    }
    // The largest valid id is accepted (and simply not found).
    assert_eq!(
        app.get("/template-details?id=9223372036854775807")
            .await
            .status(),
        404
    );
    assert_eq!(
        app.metric("db_hits_total").await,
        1.0,
        "bad requests never reach the database"
    );
}

#[actix_rt::test]
async fn a_body_on_get_is_400_and_other_methods_are_405() {
    let app = spawn_app().await;
    let with_body = app
        .client
        .get(format!("{}/template-details?id=1", app.address))
        .body("{\"id\": 1}")
        .send()
        .await
        .unwrap();
    assert_eq!(with_body.status(), 400);
    let body: serde_json::Value = with_body.json().await.unwrap();
    assert!(body["error"].as_str().unwrap().contains("no request body"));

    let post = app
        .client
        .post(format!("{}/template-details?id=1", app.address))
        .send()
        .await
        .unwrap();
    assert_eq!(post.status(), 405);
    assert_eq!(header(&post, "allow"), "GET");
    let body: serde_json::Value = post.json().await.unwrap();
    assert!(body["error"].as_str().is_some());

    let unknown = app.get("/no/such/path").await;
    assert_eq!(unknown.status(), 404);
    let body: serde_json::Value = unknown.json().await.unwrap();
    assert!(body["error"].as_str().unwrap().contains("no such endpoint"));
}

#[actix_rt::test]
async fn coalesce_off_sends_every_concurrent_miss_to_the_database() {
    // Each load takes 0.2 s (PostgreSQL 0.1 s away), so the burst's requests overlap the first
    // load even on a machine slow to send them, rather than find its write in Redis. The 50
    // loads share the pool's 10 connections, so requests get more time than the default.
    let proxy = postgres_proxy();
    let app = spawn_app_with(|s| {
        s.coalesce = false;
        s.database_url = via(&proxy, &s.database_url);
        s.request_timeout = Duration::from_secs(10);
        s.flight_timeout = Duration::from_secs(10);
    })
    .await;
    wait_for_warm_pool(&app.client, &app.address, 10.0).await;
    proxy.set_mode(Mode::Latency(Duration::from_millis(100)));
    app.warm_connections(50).await;
    let answers = app.burst(3, 50).await;
    assert!(
        answers.iter().all(|(status, ..)| *status == 200),
        "{answers:?}"
    );
    let queries = app.metric("db_hits_total").await;
    let misses = answers.iter().filter(|(_, x, _)| x == "MISS").count() as f64;
    assert_eq!(queries, misses, "each MISS was its own query");
    assert!(
        queries > 1.0,
        "without coalescing, concurrent misses each load ({queries})"
    );
    assert_eq!(app.metric("singleflight_shared_total").await, 0.0);
}
