//! `CACHE_MEMORY_MB`: the in-memory caches together hold no more bytes than the budget, however
//! large the templates, and a body larger than its cache's share is served but not kept.

use crate::support::{header, spawn_app_with, TestApp};

/// The sum of `name`'s series whose labels include `label`.
fn labelled(metrics: &str, name: &str, label: &str) -> f64 {
    metrics
        .lines()
        .filter(|line| line.starts_with(&format!("{name}{{")) && line.contains(label))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Templates `ids` of `len` bytes of content each.
async fn large_templates(app: &TestApp, ids: std::ops::RangeInclusive<i64>, len: usize) {
    app.execute_sql(&format!(
        "INSERT INTO templates (id, name, content) SELECT g, 'large ' || g, repeat('x', {len}) \
         FROM generate_series({}, {}) AS g",
        ids.start(),
        ids.end()
    ))
    .await;
}

/// 2 MB for 2 HTTP workers and 2 owners: 500 KB for each worker's cache and each near cache.
const BUDGET: usize = 2_000_000;

#[actix_rt::test]
async fn many_large_templates_are_all_served_within_the_budget() {
    let app = spawn_app_with(|s| s.cache_memory_bytes = BUDGET).await;
    // 60 templates of 100 KB: 6 MB of bodies, three times the budget.
    large_templates(&app, 5_001..=5_060, 100_000).await;
    for pass in 1..=2 {
        for id in 5_001..=5_060 {
            let response = app.template(id).await;
            assert_eq!(response.status(), 200, "pass {pass}, id {id}");
            let body = response.text().await.expect("a body");
            assert!(
                body.len() > 100_000,
                "pass {pass}, id {id}: {} bytes",
                body.len()
            );
        }
        let metrics = app.metrics_text().await;
        let held = testkit::prom::sum_metric(&metrics, "cache_memory_bytes");
        assert!(
            held > 0.0 && held <= BUDGET as f64,
            "pass {pass}: the caches hold {held} bytes, the budget is {BUDGET}"
        );
        assert!(
            labelled(&metrics, "cache_evictions_total", "reason=\"bytes\"") > 0.0,
            "pass {pass}: nothing was evicted to stay within the budget"
        );
    }
}

#[actix_rt::test]
async fn a_body_larger_than_its_share_is_served_and_not_kept() {
    let app = spawn_app_with(|s| s.cache_memory_bytes = BUDGET).await;
    // 600 KB: more than any one cache's 500 KB.
    large_templates(&app, 6_001..=6_001, 600_000).await;
    for _ in 0..3 {
        let response = app.template(6_001).await;
        assert_eq!(response.status(), 200);
        assert_ne!(header(&response, "x-cache"), "");
        let body = response.text().await.expect("a body");
        assert!(body.len() > 600_000, "{} bytes", body.len());
    }
    let metrics = app.metrics_text().await;
    assert!(labelled(&metrics, "cache_evictions_total", "reason=\"too_large\"") >= 1.0);
    assert_eq!(
        testkit::prom::sum_metric(&metrics, "cache_memory_bytes"),
        0.0
    );
}
