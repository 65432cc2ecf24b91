//! `/healthz` and `/readyz`.

use std::time::Duration;

use testkit::poll;

use crate::support::spawn_app;

#[actix_rt::test]
async fn healthz_and_readyz_are_ok_when_everything_is_up() {
    let app = spawn_app().await;
    let health = app.get("/healthz").await;
    assert_eq!(health.status(), 200);
    let body: serde_json::Value = health.json().await.unwrap();
    assert_eq!(body["status"], "ok");

    let ready = app.get("/readyz").await;
    assert_eq!(ready.status(), 200);
    let body: serde_json::Value = ready.json().await.unwrap();
    assert_eq!(body["status"], "ready");
    assert_eq!(body["checks"]["database"], "ok");
    assert_eq!(body["checks"]["redis"], "ok");
    // Every owner was asked, not one (the test app runs two).
    assert_eq!(body["checks"]["key_owners"], "ok: 2 running");
}

/// The backends a `/readyz` body says are degraded.
fn degraded(body: &serde_json::Value) -> Vec<&str> {
    let names = body["degraded"].as_array().into_iter().flatten();
    names.filter_map(|name| name.as_str()).collect()
}

#[actix_rt::test]
async fn readyz_stays_200_and_says_degraded_while_postgresql_is_gone() {
    let app = spawn_app().await;
    assert_eq!(app.get("/readyz").await.status(), 200);

    // Take this test's database away under the running service (its pooled connections are
    // terminated, new ones are turned away: the database no longer exists).
    app.drop_database().await;

    // The service finds out (a lost connection, then a probe) and says so, still ready: every
    // replica would see the same, and taking them all out of the load balancer would make the
    // cached data unreachable too.
    let ask = || app.readiness();
    let polled = poll::until(
        Duration::from_secs(15),
        Duration::from_millis(100),
        ask,
        |(_, body)| degraded(body).contains(&"postgres"),
    )
    .await;
    let (status, body) = polled.last;
    assert!(polled.done, "never said degraded: {body}");
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["status"], "ready");
    let database = body["checks"]["database"]
        .as_str()
        .expect("a database check");
    assert_eq!(
        database,
        "degraded: PostgreSQL rejected the service's credentials, database name or TLS settings; \
         serving what is cached"
    );
    assert_eq!(app.metric("db_available").await, 0.0);

    // A template that is not cached is now a 503 with Retry-After, never a hang or a 500, and
    // its body names no driver error either.
    let response = app.template(5).await;
    assert_eq!(response.status(), 503);
    assert!(!crate::support::header(&response, "retry-after").is_empty());
    let body: serde_json::Value = response.json().await.unwrap();
    let error = body["error"].as_str().unwrap();
    assert!(error.contains("template 5"), "{error}");
    assert!(!error.contains("does not exist"), "driver text: {error}");
}
