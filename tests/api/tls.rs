//! TLS to PostgreSQL and Redis, against the TLS variant of the test servers
//! (`servers::tls_servers`: PostgreSQL with `ssl=on` taking only TLS clients with a password,
//! Redis on a `--tls-port`, both with a certificate from a CA generated for this process).

use std::path::Path;
use std::time::Duration;

use diesel_async::RunQueryDsl;
use singleflight::config::Settings;
use singleflight::startup::Application;
use singleflight::tls::{PemFile, PemKind, PgConnector};

use crate::support::servers::{self, TlsServers};
use crate::support::{header, spawn_app_with, wait_for_warm_pool};
use testkit::poll;

fn pem(path: &Path) -> PemFile {
    PemFile::read(path, PemKind::Certificates).expect("the test CA file is readable")
}

/// Runs statements as the superuser on the TLS PostgreSQL (only TLS clients are let in).
async fn admin(tls: &TlsServers, statements: &[String]) {
    let connector = PgConnector::new(&tls.pg_url("postgres", "require"), None).expect("URL");
    let mut conn = connector
        .connect()
        .await
        .expect("connect to the TLS PostgreSQL");
    for sql in statements {
        diesel::sql_query(sql)
            .execute(&mut conn)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
    }
}

/// A database of its own on the TLS PostgreSQL, with the demo templates loaded unless it has
/// another `owner` (who loads them).
async fn tls_database(tls: &TlsServers, suffix: &str, owner: Option<&str>) -> String {
    let name = format!("tls_{}_{suffix}", std::process::id());
    let owner = owner.map(|o| format!(" OWNER {o}")).unwrap_or_default();
    admin(tls, &[format!("CREATE DATABASE {name}{owner}")]).await;
    if owner.is_empty() {
        crate::support::seed_demo(&tls.pg_url(&name, "require")).await;
    }
    name
}

/// The service with `configure` applied, once its pool has a TLS connection open. Opening one
/// (a handshake, then SCRAM) costs far more CPU than a plain one in a debug build: on a loaded
/// machine ten of them at once, each bounded by the 5 s connect timeout, can all run out and
/// start again. These tests are about TLS, not about a starved pool, so the pool opens two,
/// each with time to finish, and the test waits for one before its first request.
async fn spawn_tls_app(configure: impl FnOnce(&mut Settings)) -> crate::support::TestApp {
    let app = spawn_app_with(|s| {
        s.db_pool_size = 2;
        s.db_pool_min_idle = 2;
        s.db_connect_timeout = Duration::from_secs(30);
        s.request_timeout = Duration::from_secs(10);
        s.db_query_timeout = Duration::from_secs(5);
        configure(s);
    })
    .await;
    wait_for_warm_pool(&app.client, &app.address, 1.0).await;
    app
}

/// A template served MISS, then HIT once its flight has written it, proves Redis (over TLS)
/// holds it: the near cache is off. (A request that joins the first flight before its cache
/// write ends is answered SHARED.)
async fn miss_then_hit(app: &crate::support::TestApp) {
    let first = app.template(1).await;
    assert_eq!(first.status(), 200);
    assert_eq!(header(&first, "x-cache"), "MISS");
    let answer = || async {
        let response = app.template(1).await;
        (response.status().as_u16(), header(&response, "x-cache"))
    };
    let polled = poll::until(
        Duration::from_secs(10),
        Duration::from_millis(50),
        answer,
        |(status, x_cache)| *status == 200 && x_cache == "HIT",
    )
    .await;
    assert!(polled.done, "never served from Redis: {:?}", polled.last);
}

/// `/readyz` (always 200 here), asked again for up to 10 s until `settled` holds for it: on a
/// loaded machine one check's PING over TLS can miss its 500 ms bound and read "degraded".
async fn readiness(
    app: &crate::support::TestApp,
    settled: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let ask = || async {
        let response = app.get("/readyz").await;
        let status = response.status();
        let body: serde_json::Value = response.json().await.expect("readyz JSON");
        assert_eq!(status, 200, "{body}");
        body
    };
    poll::until(
        Duration::from_secs(10),
        Duration::from_millis(100),
        ask,
        settled,
    )
    .await
    .last
}

/// Every named check of a `/readyz` body reads "ok".
fn all_ok<'a>(checks: &'a [&'a str]) -> impl Fn(&serde_json::Value) -> bool + 'a {
    move |body| checks.iter().all(|check| body["checks"][*check] == "ok")
}

#[actix_rt::test]
async fn verify_full_postgres_and_rediss_with_a_ca_file_serve_through_the_cache() {
    let tls = servers::tls_servers();
    let database = tls_database(tls, "verify_full", None).await;
    let app = spawn_tls_app(|s| {
        s.database_url = tls.pg_url(&database, "verify-full");
        s.database_ca = Some(pem(&tls.ca_file));
        s.redis_url = tls.rediss_url(servers::next_redis_db());
        s.redis_ca = Some(pem(&tls.ca_file));
        s.near_cache_ttl = Duration::ZERO;
    })
    .await;

    miss_then_hit(&app).await;
    let body = readiness(&app, all_ok(&["database", "redis"])).await;
    assert_eq!(body["checks"]["database"], "ok", "{body}");
    assert_eq!(body["checks"]["redis"], "ok", "{body}");
    // The change listener connected through the same TLS set-up.
    assert_eq!(app.metric("listener_connected").await, 1.0);
}

#[actix_rt::test]
async fn sslmode_require_needs_no_ca_and_a_password_role_and_a_client_certificate_work() {
    let tls = servers::tls_servers();
    // A role of our own, with a password that must be percent-encoded in the URL.
    admin(
        tls,
        &["CREATE ROLE tls_app LOGIN PASSWORD 'p@ss/w:rd'".to_owned()],
    )
    .await;
    let database = tls_database(tls, "require", Some("tls_app")).await;
    let url = format!(
        "postgres://tls_app:p%40ss%2Fw%3Ard@127.0.0.1:{}/{database}?sslmode=require",
        tls.plain.pg_port
    );
    // The owner loads the schema and the demo templates.
    crate::support::seed_demo(&url).await;
    let (cert, key) = (
        PemFile::read(&tls.client_cert_file, PemKind::Certificates).expect("client cert"),
        PemFile::read(&tls.client_key_file, PemKind::PrivateKey).expect("client key"),
    );
    let app = spawn_tls_app(|s| {
        s.database_url = url;
        s.redis_url = tls.rediss_url(servers::next_redis_db());
        s.redis_ca = Some(pem(&tls.ca_file));
        s.redis_client_cert = Some((cert, key));
        s.near_cache_ttl = Duration::ZERO;
    })
    .await;

    miss_then_hit(&app).await;
    let body = readiness(&app, all_ok(&["redis"])).await;
    assert_eq!(body["checks"]["redis"], "ok", "{body}");
}

#[actix_rt::test]
async fn verify_full_with_a_ca_that_did_not_sign_the_server_does_not_start() {
    let tls = servers::tls_servers();
    let database = tls_database(tls, "wrong_ca", None).await;
    let settings = Settings {
        http_addr: "127.0.0.1:0".parse().expect("loopback address"),
        database_url: tls.pg_url(&database, "verify-full"),
        database_ca: Some(pem(&tls.unrelated_ca_file)),
        redis_url: tls.rediss_url(servers::next_redis_db()),
        redis_ca: Some(pem(&tls.ca_file)),
        ..Settings::default()
    };
    let started = std::time::Instant::now();
    let err = match Application::build(settings).await {
        Ok(_) => panic!("the service started trusting a CA that signed nothing it talks to"),
        Err(e) => e.to_string(),
    };
    assert!(
        err.contains("TLS certificate was rejected") && err.contains("UnknownIssuer"),
        "the error names the TLS failure: {err}"
    );
    // Not retried for the 15 s start-up gives a server that is not up yet: it cannot heal.
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "gave up after {:?}",
        started.elapsed()
    );
}

#[actix_rt::test]
async fn rediss_with_a_wrong_ca_leaves_the_service_serving_from_postgresql() {
    let tls = servers::tls_servers();
    let database = tls_database(tls, "redis_wrong_ca", None).await;
    let app = spawn_tls_app(|s| {
        s.database_url = tls.pg_url(&database, "verify-full");
        s.database_ca = Some(pem(&tls.ca_file));
        s.redis_url = tls.rediss_url(servers::next_redis_db());
        s.redis_ca = Some(pem(&tls.unrelated_ca_file));
    })
    .await;
    let response = app.template(1).await;
    assert_eq!(response.status(), 200);
    // Degraded at once: a wrong CA is not a slow answer.
    let body = readiness(&app, |_| true).await;
    let redis = body["checks"]["redis"].as_str().unwrap_or_default();
    assert!(redis.starts_with("degraded"), "{body}");
}
