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
