//! `loadtest` (the binary behind `./loadtest.sh`) against a real test instance: its report must
//! say exactly what the service's `/metrics` counted and what the responses were, and bad input
//! must end in a clear message and a non-zero exit, never a panic.

use std::process::Output;
use std::time::Duration;

use actix_web::{web, App, HttpResponse, HttpServer};
use serde_json::Value;

use crate::support::{closed_port, spawn_app, spawn_app_with, sum_metric, TestApp};

mod gates;

const COUNTERS: [&str; 5] = [
    "http_request_total",
    "cache_hits_total",
    "cache_misses_total",
    "db_hits_total",
    "singleflight_shared_total",
];

/// Runs the load generator to completion (it bounds itself; this bounds the test too).
pub(crate) async fn loadtest(
    args: impl IntoIterator<Item = impl AsRef<std::ffi::OsStr>>,
) -> Output {
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

pub(crate) fn number(v: &Value, path: &[&str]) -> f64 {
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
    // Nothing listens there.
    let port = closed_port();
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
            vec!["--threshold", "p99<<5ms"],
            "threshold \"p99<<5ms\": unknown operator in \"<<5ms\"",
        ),
        (vec!["--threshold", "speed>3"], "unknown metric \"speed\""),
        (
            vec!["--rate", "100"],
            "--rate is not used by the seed scenario",
        ),
        (vec!["hot", "--rate", "0"], "--rate must be from 1"),
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

/// A second replica of `first`: the same PostgreSQL database and Redis keyspace, as a fleet's
/// replicas share them.
async fn replica_of(first: &TestApp) -> TestApp {
    let (database_url, redis_url) = (first.database_url.clone(), first.redis_url.clone());
    spawn_app_with(move |settings| {
        settings.database_url = database_url;
        settings.redis_url = redis_url;
    })
    .await
}

pub(crate) fn report_of(output: &Output) -> Value {
    assert!(
        output.status.success(),
        "loadtest failed: {}",
        stderr(output)
    );
    serde_json::from_slice(&output.stdout).unwrap_or_else(|e| {
        panic!(
            "--json prints one JSON object ({e}): {}",
            String::from_utf8_lossy(&output.stdout)
        )
    })
}

#[actix_rt::test]
async fn a_run_over_two_replicas_counts_both_and_spreads_the_load_evenly() {
    let first = spawn_app().await;
    let second = replica_of(&first).await;
    let replicas = [&first, &second];
    let mut before = Vec::new();
    for app in replicas {
        before.push(counters(app).await);
    }

    let output = loadtest(&[
        "seed",
        "--url",
        &first.address,
        "--url",
        &second.address,
        "--waves",
        "2",
        "--concurrency",
        "40",
        "--ids",
        "20",
        "--pause",
        "0s",
        "--json",
    ])
    .await;
    let report = report_of(&output);
    let mut after = Vec::new();
    for app in replicas {
        after.push(counters(app).await);
    }

    assert_eq!(
        report["metrics_from"],
        serde_json::json!([
            format!("{}/metrics", first.address),
            format!("{}/metrics", second.address)
        ]),
        "metrics are read from every --url"
    );
    for (i, name) in COUNTERS.iter().enumerate() {
        let first_delta = after[0][i] - before[0][i];
        let second_delta = after[1][i] - before[1][i];
        assert_eq!(
            number(&report, &["metrics", name]),
            first_delta + second_delta,
            "{name}: the table is the sum of both replicas' deltas"
        );
        assert_eq!(
            number(&report["replicas"][0], &["metrics", name]),
            first_delta,
            "{name} of the first replica"
        );
        assert_eq!(
            number(&report["replicas"][1], &["metrics", name]),
            second_delta,
            "{name} of the second replica"
        );
    }
    assert_eq!(report["replicas"][0]["url"], first.address.as_str());
    assert_eq!(report["replicas"][1]["url"], second.address.as_str());

    // 2 waves × (40 requests for one id + one request for each of 20 ids), round-robin: each
    // replica answered exactly half, and the fleet counted every request once.
    let sent = 2.0 * (40.0 + 20.0);
    assert_eq!(number(&report, &["status", "200"]), sent);
    assert_eq!(number(&report, &["metrics", "http_request_total"]), sent);
    for r in [0, 1] {
        assert_eq!(
            number(&report["replicas"][r], &["metrics", "http_request_total"]),
            sent / 2.0,
            "replica {r} served half the requests"
        );
    }
    let hits = number(&report, &["metrics", "cache_hits_total"]);
    let misses = number(&report, &["metrics", "cache_misses_total"]);
    assert_eq!(
        hits + misses,
        sent,
        "every answer is one lookup, fleet-wide"
    );
    assert_eq!(number(&report, &["x_cache", "HIT"]), hits);
}

#[actix_rt::test]
async fn a_stampede_over_two_replicas_splits_each_round_and_counts_its_queries_per_replica() {
    let first = spawn_app().await;
    let second = replica_of(&first).await;
    let args = [
        "stampede",
        "--url",
        &first.address,
        "--url",
        &second.address,
        "--rounds",
        "2",
        "--concurrency",
        "21",
        "--redis-url",
        &first.redis_url,
    ];
    let mut json_args = args.to_vec();
    json_args.push("--json");
    let report = report_of(&loadtest(&json_args).await);

    // 21 simultaneous requests per round: 11 to the first replica, 10 to the second.
    assert_eq!(
        number(&report["replicas"][0], &["metrics", "http_request_total"]),
        2.0 * 11.0
    );
    assert_eq!(
        number(&report["replicas"][1], &["metrics", "http_request_total"]),
        2.0 * 10.0
    );
    assert_eq!(number(&report, &["status", "200"]), 42.0);
    let rounds = report["rounds"].as_array().expect("a rounds array");
    assert_eq!(rounds.len(), 2);
    let mut queries = 0.0;
    for round in rounds {
        let by_replica: Vec<f64> = round["db_queries_by_replica"]
            .as_array()
            .expect("each replica's queries")
            .iter()
            .map(|q| q.as_f64().expect("a count"))
            .collect();
        assert_eq!(by_replica.len(), 2, "{round}");
        let round_queries = number(round, &["db_queries"]);
        assert_eq!(by_replica.iter().sum::<f64>(), round_queries, "{round}");
        // A cold key: at least one load, and at most one per replica.
        assert!((1.0..=2.0).contains(&round_queries), "{round}");
        queries += round_queries;
    }
    assert_eq!(number(&report, &["metrics", "db_hits_total"]), queries);

    // The text report says it is a fleet's sum and shows each replica.
    let text = loadtest(&args).await;
    assert!(text.status.success(), "{}", stderr(&text));
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(text.contains("summed over 2 replicas"), "{text}");
    assert!(text.contains("Per replica"), "{text}");
    for app in [&first, &second] {
        assert!(text.contains(&format!("{}/metrics", app.address)), "{text}");
    }
    assert!(!text.contains("one replica's counters"), "{text}");
}

/// A stand-in for a load balancer in front of replicas whose /metrics is not read: it answers
/// every request, but its own /metrics never counts them.
async fn uncounting_server() -> (String, actix_web::dev::ServerHandle) {
    const METRICS: &str =
        "http_request_total{endpoint=\"/template-details\",method=\"GET\",status=\"200\"} 5\n\
        cache_hits_total 1\ncache_misses_total 1\ndb_hits_total 1\nsingleflight_shared_total 0\n";
    let server = HttpServer::new(|| {
        App::new()
            .route(
                "/metrics",
                web::get().to(|| async { HttpResponse::Ok().body(METRICS) }),
            )
            .default_service(web::to(|| async {
                HttpResponse::Ok().json(serde_json::json!({"id": 1}))
            }))
    })
    .workers(1)
    .bind(("127.0.0.1", 0))
    .expect("bind a free port");
    let url = format!("http://{}", server.addrs()[0]);
    let server = server.run();
    let handle = server.handle();
    actix_rt::spawn(server);
    (url, handle)
}

#[actix_rt::test]
async fn answers_not_counted_by_any_metrics_read_are_refused_not_reported() {
    let (url, handle) = uncounting_server().await;
    let output = loadtest(&[
        "--url",
        &url,
        "--waves",
        "1",
        "--concurrency",
        "5",
        "--ids",
        "5",
    ])
    .await;
    handle.stop(false).await;

    assert_eq!(output.status.code(), Some(1), "{}", stderr(&output));
    let err = stderr(&output);
    assert!(
        err.contains("the client received 10 answers")
            && err.contains(&format!("({url}/metrics) counted only 0 requests")),
        "{err}"
    );
    assert!(err.contains("--metrics-url"), "the way out is named: {err}");
    assert!(output.stdout.is_empty(), "no report of part of a fleet");
}

#[actix_rt::test]
async fn every_unreachable_replica_is_named() {
    let (url, handle) = uncounting_server().await;
    let closed = format!("http://127.0.0.1:{}", closed_port());

    // A --url whose /metrics is read (the default), a --metrics-url, and a --url whose
    // /metrics is not read are each checked before any load, and named.
    let cases = [
        (vec!["--url", &url, "--url", &closed], "metrics"),
        (vec!["--url", &url, "--metrics-url", &closed], "metrics"),
        (vec!["--url", &closed, "--metrics-url", &url], "healthz"),
    ];
    for (mut args, path) in cases {
        args.extend(["--waves", "1"]);
        let output = loadtest(&args).await;
        assert_eq!(output.status.code(), Some(1), "{}", stderr(&output));
        let err = stderr(&output);
        assert!(
            err.contains(&format!("cannot reach the service at {closed}/{path}")),
            "{args:?}: {err}"
        );
        assert!(!err.contains("panicked"), "{err}");
    }
    handle.stop(false).await;
}
