//! `/metrics`: the seed's names, our own, and that scrapes do not count themselves.

use std::time::Duration;

use crate::faults::{postgres_proxy, via};
use crate::support::fault_proxy::Mode;
use crate::support::{spawn_app, spawn_app_with, sum_metric};

const SEED_METRICS: [&str; 7] = [
    "http_request_total",
    "http_request_duration_seconds",
    "http_in_flight_requests",
    "cache_hits_total",
    "cache_misses_total",
    "db_hits_total",
    "singleflight_shared_total",
];

#[actix_rt::test]
async fn metrics_show_the_seed_names_and_do_not_count_themselves() {
    let proxy = postgres_proxy();
    let app = spawn_app_with(|s| s.database_url = via(&proxy, &s.database_url)).await;
    // Traffic that moves every seed metric: a miss, a hit, a shared load. PostgreSQL 50 ms away
    // per hop: the burst's requests surely arrive while its one load is in the air, however
    // slowly a loaded machine sends them.
    app.warm_connections(20).await;
    proxy.set_mode(Mode::Latency(Duration::from_millis(50)));
    let _ = app.burst(10, 20).await;
    proxy.set_mode(Mode::Pass);
    let _ = app.template(10).await;

    let text = app.metrics_text().await;
    for name in SEED_METRICS {
        assert!(
            text.lines()
                .any(|l| l.starts_with(&format!("# TYPE {name} "))),
            "{name} missing from /metrics"
        );
        // A sample, not only a declaration: the histogram's is its `_count`.
        let sample = if name.ends_with("_seconds") {
            format!("{name}_count")
        } else {
            name.to_owned()
        };
        assert!(
            text.lines()
                .any(|l| l.starts_with(&format!("{sample} "))
                    || l.starts_with(&format!("{sample}{{"))),
            "{name} has no sample in /metrics"
        );
    }
    // The traffic above moved every counter of the seed's table.
    for name in [
        "http_request_total",
        "http_request_duration_seconds_count",
        "cache_hits_total",
        "cache_misses_total",
        "db_hits_total",
        "singleflight_shared_total",
    ] {
        assert!(
            sum_metric(&text, name) > 0.0,
            "{name} did not move:\n{text}"
        );
    }
    assert!(text.contains("# TYPE http_request_duration_seconds histogram"));
    assert!(
        text.contains(
            r#"http_request_total{endpoint="/template-details",method="GET",status="200"}"#
        ),
        "{text}"
    );
    assert!(
        !text.contains(r#"endpoint="/metrics""#),
        "scrapes are not counted"
    );
    assert_eq!(
        sum_metric(&text, "cache_hits_total") + sum_metric(&text, "cache_misses_total"),
        21.0
    );
    assert_eq!(
        sum_metric(&text, "http_in_flight_requests"),
        0.0,
        "the scrape is not in flight"
    );

    for _ in 0..5 {
        let _ = app.metrics_text().await;
    }
    let again = app.metrics_text().await;
    assert_eq!(
        sum_metric(&again, "http_request_total"),
        sum_metric(&text, "http_request_total")
    );
}

#[actix_rt::test]
async fn unmatched_paths_are_masked_in_labels() {
    let app = spawn_app().await;
    for i in 0..3 {
        assert_eq!(app.get(&format!("/random/path/{i}")).await.status(), 404);
    }
    let text = app.metrics_text().await;
    assert!(
        !text.contains("/random/path"),
        "arbitrary paths must not become label values"
    );
    assert!(text.contains(r#"endpoint="UNMATCHED""#));
}

/// The series of `name` whose labels include every one of `labels` (`key="value"` each), summed.
fn series(text: &str, name: &str, labels: &[&str]) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")))
        .filter(|l| labels.iter().all(|label| l.contains(label)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[actix_rt::test]
async fn every_route_is_counted_once_and_invented_methods_make_no_series() {
    let app = spawn_app().await;
    assert_eq!(app.template(1).await.status(), 200);
    // Routed to the hot route too, so counted with it.
    assert_eq!(app.get("/template%2Ddetails?id=1").await.status(), 200);
    let post = app
        .client
        .post(format!("{}/template-details?id=1", app.address));
    assert_eq!(post.send().await.expect("answered").status(), 405);
    assert_eq!(app.get("/healthz").await.status(), 200);
    assert_eq!(app.get("/healthz").await.status(), 200);
    assert_eq!(app.get("/readyz").await.status(), 200);
    for method in ["BREW", "PROPFIND"] {
        for path in ["/healthz", "/template-details?id=1", "/nowhere"] {
            let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
            let answer = app
                .client
                .request(method.clone(), format!("{}{path}", app.address))
                .send()
                .await
                .expect("answered");
            assert_eq!(answer.status(), 405, "{method} {path}");
            let body: serde_json::Value = answer.json().await.expect("a JSON error body");
            assert!(body["error"].is_string(), "{body}");
        }
    }
    let text = app.metrics_text().await;
    let total = |labels: &[&str]| series(&text, "http_request_total", labels);
    let count = |labels: &[&str]| series(&text, "http_request_duration_seconds_count", labels);
    // The hot route (counted by the workers) and the others (by the middleware), one family each.
    let hot = [
        r#"endpoint="/template-details""#,
        r#"method="GET""#,
        r#"status="200""#,
    ];
    let health = [
        r#"endpoint="/healthz""#,
        r#"method="GET""#,
        r#"status="200""#,
    ];
    let ready = [
        r#"endpoint="/readyz""#,
        r#"method="GET""#,
        r#"status="200""#,
    ];
    assert_eq!(total(&hot), 2.0, "{text}");
    assert_eq!(count(&hot), 2.0, "{text}");
    let post = [
        r#"endpoint="/template-details""#,
        r#"method="POST""#,
        r#"status="405""#,
    ];
    assert_eq!(total(&post), 1.0, "{text}");
    assert_eq!(total(&health), 2.0, "{text}");
    assert_eq!(count(&health), 2.0, "{text}");
    assert_eq!(total(&ready), 1.0, "{text}");
    assert_eq!(
        total(&[r#"method="OTHER""#, r#"status="405""#]),
        6.0,
        "every invented method is OTHER: {text}"
    );
    assert!(
        !text.contains("BREW") && !text.contains("PROPFIND"),
        "{text}"
    );
    assert_eq!(
        text.matches("# TYPE http_request_total counter").count(),
        1,
        "one family: {text}"
    );
    // No label set twice: the two counters' series never overlap.
    let mut lines: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("http_request_total{"))
        .map(|l| l.rsplit_once(' ').map_or(l, |(labels, _)| labels))
        .collect();
    let all = lines.len();
    lines.sort_unstable();
    lines.dedup();
    assert_eq!(lines.len(), all, "a label set appears twice: {text}");
}

#[actix_rt::test]
async fn admin_addr_serves_the_operational_routes_and_the_public_address_does_not() {
    let app = spawn_app_with(|s| s.admin_addr = Some("127.0.0.1:0".parse().unwrap())).await;
    let admin = app.admin_address.clone().expect("ADMIN_ADDR's server runs");
    assert_ne!(admin, app.address);
    assert_eq!(app.template(1).await.status(), 200);
    for path in ["/metrics", "/healthz", "/readyz"] {
        let public = app.get(path).await;
        assert_eq!(public.status(), 404, "{path} on the public address");
        let body: serde_json::Value = public.json().await.expect("a JSON error body");
        assert!(body["error"].is_string(), "{body}");
    }
    let get = |path: &'static str| {
        let (client, admin) = (app.client.clone(), admin.clone());
        async move {
            client
                .get(format!("{admin}{path}"))
                .send()
                .await
                .expect("the admin address answers")
        }
    };
    assert_eq!(get("/healthz").await.status(), 200);
    let ready = get("/readyz").await;
    assert_eq!(ready.status(), 200);
    let body: serde_json::Value = ready.json().await.expect("readyz JSON");
    assert_eq!(body["status"], "ready", "{body}");
    assert_eq!(get("/template-details?id=1").await.status(), 404);
    let scrape = get("/metrics").await;
    assert_eq!(scrape.status(), 200);
    let text = scrape.text().await.expect("metrics body");
    // The public traffic and the admin's own are both in the one registry.
    let hot = [r#"endpoint="/template-details""#, r#"status="200""#];
    assert_eq!(series(&text, "http_request_total", &hot), 1.0, "{text}");
    assert_eq!(
        series(&text, "http_request_total", &[r#"endpoint="/healthz""#]),
        1.0,
        "{text}"
    );
    assert!(sum_metric(&text, "cache_misses_total") >= 1.0, "{text}");
    assert!(!text.contains(r#"endpoint="/metrics""#), "{text}");
}
