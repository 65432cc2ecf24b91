//! `/healthz` and `/readyz`.

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

#[actix_rt::test]
async fn readyz_is_503_when_postgresql_stops_answering() {
    let app = spawn_app().await;
    assert_eq!(app.get("/readyz").await.status(), 200);

    // Take this test's database away under the running service (its pooled connections are
    // terminated, new ones are refused).
    app.drop_database().await;

    let ready = app.get("/readyz").await;
    assert_eq!(ready.status(), 503);
    assert!(!crate::support::header(&ready, "retry-after").is_empty());
    let body: serde_json::Value = ready.json().await.unwrap();
    assert_eq!(body["status"], "unready");
    assert!(body["checks"]["database"]
        .as_str()
        .unwrap()
        .starts_with("error"));

    // A template that is not cached is now a 503 with Retry-After, never a hang or a 500.
    let response = app.template(5).await;
    assert_eq!(response.status(), 503);
    assert!(!crate::support::header(&response, "retry-after").is_empty());
    let body: serde_json::Value = response.json().await.unwrap();
    assert!(body["error"].as_str().unwrap().contains("template 5"));
}
