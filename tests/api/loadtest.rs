//! `loadtest` (the binary behind `./loadtest.sh`) against a real test instance: its report must
//! say exactly what the service's `/metrics` counted and what the responses were, and bad input
//! must end in a clear message and a non-zero exit, never a panic.

use std::process::Output;
use std::time::Duration;

use actix_web::{web, App, HttpResponse, HttpServer};
use serde_json::Value;

use crate::support::{spawn_app, sum_metric, TestApp};

const COUNTERS: [&str; 5] = [
    "http_request_total",
    "cache_hits_total",
    "cache_misses_total",
    "db_hits_total",
    "singleflight_shared_total",
];

/// Runs the load generator to completion (it bounds itself; this bounds the test too).
async fn loadtest(args: &[&str]) -> Output {
    // Another package's binary: cargo builds it (or finds it up to date) and says where it is.
    let run = tokio::process::Command::new(testkit::workspace::binary("loadtest"))
        .args(args)
        .kill_on_drop(true)
        .output();
    tokio::time::timeout(Duration::from_secs(120), run)
        .await
        .expect("loadtest finishes within 2 minutes")
        .expect("loadtest starts")
}

async fn counters(app: &TestApp) -> Vec<f64> {
    let mut values = Vec::new();
    for name in COUNTERS {
        values.push(app.metric(name).await);
    }
    values
}

fn number(v: &Value, path: &[&str]) -> f64 {
    let mut at = v;
    for key in path {
        at = &at[*key];
    }
    at.as_f64()
        .unwrap_or_else(|| panic!("report field {} is not a number: {at}", path.join(".")))
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[actix_rt::test]
async fn a_small_seed_run_reports_what_the_service_counted_and_the_responses_showed() {
    let app = spawn_app().await;
    let before = counters(&app).await;

    let output = loadtest(&[
        "seed",
        "--url",
        &app.address,
        "--waves",
        "3",
        "--concurrency",
        "50",
        "--ids",
        "20",
        "--pause",
        "0s",
        "--json",
    ])
    .await;
    assert!(
        output.status.success(),
        "loadtest failed: {}",
        stderr(&output)
    );
    let after = counters(&app).await;
    let report: Value = serde_json::from_slice(&output.stdout).unwrap_or_else(|e| {
        panic!(
            "--json prints one JSON object ({e}): {}",
            String::from_utf8_lossy(&output.stdout)
        )
    });

    // The service figures are the deltas this test measured itself, not numbers of its own.
    for (i, name) in COUNTERS.iter().enumerate() {
        assert_eq!(
            number(&report, &["metrics", name]),
            after[i] - before[i],
            "{name} in the report vs /metrics"
        );
    }

    // 3 waves × (50 requests for one id + one request for each of 20 ids).
    let sent = 3.0 * (50.0 + 20.0);
    assert_eq!(number(&report, &["requests"]), sent);
    assert_eq!(number(&report, &["responses"]), sent);
    assert_eq!(number(&report, &["failures"]), 0.0);
    assert_eq!(number(&report, &["status", "200"]), sent);
    assert_eq!(
        number(&report, &["metrics", "http_request_total"]),
        sent,
        "the service counted every request the client sent, and no other"
    );
    assert_eq!(number(&report, &["distinct_ids"]), 20.0);

    // The X-Cache headers the client counted agree with the service's counters.
    let hits = number(&report, &["metrics", "cache_hits_total"]);
    let misses = number(&report, &["metrics", "cache_misses_total"]);
    let x = |v: &str| number(&report, &["x_cache", v]);
    assert_eq!(x("HIT"), hits, "X-Cache: HIT answers = cache_hits_total");
    assert_eq!(
        x("SHARED"),
        number(&report, &["metrics", "singleflight_shared_total"]),
        "X-Cache: SHARED answers = singleflight_shared_total"
    );
    assert_eq!(
        x("HIT") + x("MISS") + x("SHARED") + x("STALE"),
        hits + misses,
        "every answer is one cache lookup"
    );
    assert_eq!(hits + misses, sent);

    // A fresh keyspace, a 30 s TTL and coalescing: each id loaded once, however many asked —
    // at most one query per id (ids that queued for a connection were loaded together), and the
    // service's own count of ids loaded says exactly 20.
    let queries = number(&report, &["metrics", "db_hits_total"]);
    assert!((1.0..=20.0).contains(&queries), "{queries} queries");
    let metrics = app.metrics_text().await;
    assert_eq!(sum_metric(&metrics, "db_keys_per_query_sum"), 20.0);
    let close = |a: f64, b: f64| (a - b).abs() < 1e-9;
    assert!(close(
        number(&report, &["cache_hit_rate"]),
        hits / (hits + misses)
    ));
    assert!(close(
        number(&report, &["db_queries_per_request"]),
        queries / sent
    ));

    let latency = |p: &str| number(&report, &["latency_ms", p]);
    assert!(latency("p50") > 0.0, "{}", report["latency_ms"]);
    assert!(latency("p50") <= latency("p95"));
    assert!(latency("p95") <= latency("p99"));
    assert!(latency("p99") <= latency("max"));
    assert!(number(&report, &["throughput_rps"]) > 0.0);
}

#[actix_rt::test]
async fn an_unreachable_service_is_a_clear_error_not_a_panic() {
    // A port that was free a moment ago: nothing listens there.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let url = format!("http://127.0.0.1:{port}");

    let output = loadtest(&["stampede", "--url", &url, "--rounds", "1"]).await;

    assert!(!output.status.success());
    let err = stderr(&output);
    assert!(
        err.contains(&format!("cannot reach the service at {url}/metrics")),
        "{err}"
    );
    assert!(err.contains("refused"), "the cause is given: {err}");
    assert!(!err.contains("panicked"), "{err}");
    assert!(output.stdout.is_empty(), "no report without a service");
}

#[actix_rt::test]
async fn metrics_without_the_needed_counters_are_named_in_the_error() {
    // Something answers on the port, but it is not the singleflight service.
    let server = HttpServer::new(|| {
        App::new().route(
            "/metrics",
            web::get().to(|| async {
                HttpResponse::Ok()
                    .body("# TYPE other_total counter\nother_total 3\ncache_hits_total 1\n")
            }),
        )
    })
    .workers(1)
    .bind(("127.0.0.1", 0))
    .expect("bind a free port");
    let url = format!("http://{}", server.addrs()[0]);
    let server = server.run();
    let handle = server.handle();
    actix_rt::spawn(server);

    let output = loadtest(&["--url", &url, "--waves", "1"]).await;
    handle.stop(false).await;

    assert!(!output.status.success());
    let err = stderr(&output);
    assert!(err.contains(&format!("{url}/metrics has no")), "{err}");
    for missing in [
        "cache_misses_total",
        "db_hits_total",
        "singleflight_shared_total",
    ] {
        assert!(err.contains(missing), "{missing} is named: {err}");
    }
    assert!(!err.contains("panicked"), "{err}");
}

#[actix_rt::test]
async fn bad_options_are_rejected_with_the_reason() {
    for (args, expected) in [
        (vec!["--waves", "0"], "--waves must be from 1"),
        (
            vec!["hot", "--waves", "3"],
            "--waves is not used by the hot scenario",
        ),
        (vec!["--url", "https://127.0.0.1:1"], "only http://"),
        (vec!["spread", "--duration", "forever"], "not a duration"),
        (vec!["sideways"], "invalid value 'sideways'"),
        (
            vec!["--updates", "3"],
            "--updates is not used by the seed scenario",
        ),
        (vec!["hot", "--updates", "0"], "--updates must be from 1"),
        (
            vec!["hot", "--updates", "2", "--database-url", "mysql://x/y"],
            "--database-url must be a URL like postgres://",
        ),
    ] {
        let output = loadtest(&args).await;
        assert_eq!(
            output.status.code(),
            Some(2),
            "{args:?}: {}",
            stderr(&output)
        );
        let err = stderr(&output);
        assert!(err.contains(expected), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{err}");
    }
}

#[actix_rt::test]
async fn updates_during_a_run_are_reported_as_seen_by_the_service() {
    let app = spawn_app().await;
    let output = loadtest(&[
        "spread",
        "--url",
        &app.address,
        "--ids",
        "50",
        "--concurrency",
        "20",
        "--duration",
        "2s",
        "--updates",
        "6",
        "--database-url",
        &app.database_url,
        "--json",
    ])
    .await;
    assert!(output.status.success(), "{}", stderr(&output));
    let report: Value = serde_json::from_slice(&output.stdout).expect("a JSON report");
    let v = &report["update_visibility"];
    assert_eq!(number(v, &["updates"]), 6.0, "{v}");
    assert_eq!(number(v, &["seen"]), 6.0, "every change was served: {v}");
    assert_eq!(number(v, &["not_seen"]), 0.0);
    assert!(number(v, &["p50_ms"]) <= number(v, &["max_ms"]));
    assert!(
        app.metric("invalidations_total").await >= 6.0,
        "the changes went through NOTIFY"
    );

    // A --updates run against a database without the row is an error that says so.
    let missing = loadtest(&[
        "hot",
        "--url",
        &app.address,
        "--id",
        "999999",
        "--duration",
        "1s",
        "--updates",
        "1",
        "--database-url",
        &app.database_url,
    ])
    .await;
    assert_eq!(missing.status.code(), Some(1), "{}", stderr(&missing));
    assert!(
        stderr(&missing).contains("template 999999 does not exist"),
        "{}",
        stderr(&missing)
    );
}
