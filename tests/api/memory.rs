//! `CACHE_MEMORY_MB`: the in-memory caches together hold no more bytes than the budget, however
//! large the templates, and a body larger than its cache's share is served but not kept.
//! `INFLIGHT_MEMORY_MB`: many large cold templates at once are shed before memory runs out, and
//! the service's process stays within both budgets plus a stated overhead.

use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};

use crate::support::{demo_database_url, header, ports, servers, spawn_app_with, KillOnDrop};

/// The sum of `name`'s series whose labels include `label`.
fn labelled(metrics: &str, name: &str, label: &str) -> f64 {
    metrics
        .lines()
        .filter(|line| line.starts_with(&format!("{name}{{")) && line.contains(label))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Templates `ids` of `len` bytes of content each, in the database at `database_url`.
async fn large_templates(database_url: &str, ids: std::ops::RangeInclusive<i64>, len: usize) {
    let mut conn = AsyncPgConnection::establish(database_url)
        .await
        .expect("connect to the test database");
    diesel::sql_query(format!(
        "INSERT INTO templates (id, name, content) SELECT g, 'large ' || g, repeat('x', {len}) \
         FROM generate_series({}, {}) AS g",
        ids.start(),
        ids.end()
    ))
    .execute(&mut conn)
    .await
    .expect("insert the large templates");
}

/// 2 MB for 2 HTTP workers and 2 owners: 500 KB for each worker's cache and each near cache.
const BUDGET: usize = 2_000_000;

#[actix_rt::test]
async fn many_large_templates_are_all_served_within_the_budget() {
    let app = spawn_app_with(|s| s.cache_memory_bytes = BUDGET).await;
    // 60 templates of 100 KB: 6 MB of bodies, three times the budget.
    large_templates(&app.database_url, 5_001..=5_060, 100_000).await;
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
    large_templates(&app.database_url, 6_001..=6_001, 600_000).await;
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

/// What the service's process may hold beyond `CACHE_MEMORY_MB` and `INFLIGHT_MEMORY_MB`, over
/// its RSS when it became ready: the Redis and PostgreSQL clients' buffers while a reply is
/// read, answers being written, the allocator's free lists. The README states it.
const OVERHEAD_MB: u64 = 64;

/// The service's figure `field` (`VmRSS`, `VmHWM`: the peak) in MB, from `/proc`.
fn rss_mb(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("its status");
    let kb = status
        .lines()
        .find_map(|line| line.strip_prefix(&format!("{field}:")))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .expect("a figure in kB");
    kb / 1000
}

#[actix_rt::test]
async fn thousands_of_large_templates_keep_the_process_within_its_budgets() {
    // 2,000 templates of 100 KB (200 MB of bodies) asked by 48 clients at once: every id is
    // cold on the first pass, so up to 48 loads of large bodies are in the air together.
    const FIRST: i64 = 100_001;
    const COUNT: i64 = 2_000;
    const LEN: usize = 100_000;
    const CLIENTS: usize = 48;
    const CACHE_MB: u64 = 16;
    const INFLIGHT_MB: u64 = 4;
    let database_url = demo_database_url().await;
    large_templates(&database_url, FIRST..=FIRST + COUNT - 1, LEN).await;
    let servers = servers::servers();
    let port = ports::free_port().expect("a free port");
    let child = KillOnDrop(
        Command::new(env!("CARGO_BIN_EXE_singleflight"))
            .env("HTTP_ADDR", format!("127.0.0.1:{port}"))
            .env("DATABASE_URL", &database_url)
            .env("REDIS_URL", servers.redis_url(servers::next_redis_db()))
            .env("REDIS_TIMEOUT_MS", "500")
            .env("HTTP_WORKERS", "2")
            .env("KEY_OWNER_SHARDS", "2")
            .env("CACHE_MEMORY_MB", CACHE_MB.to_string())
            .env("INFLIGHT_MEMORY_MB", INFLIGHT_MB.to_string())
            .env("RUST_LOG", "error")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start the service binary"),
    );
    let pid = child.0.id();
    let url = format!("http://127.0.0.1:{port}");
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .expect("an HTTP client");
    let started = Instant::now();
    while !matches!(client.get(format!("{url}/readyz")).send().await, Ok(r) if r.status() == 200) {
        assert!(started.elapsed() < Duration::from_secs(30), "never ready");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let at_start = rss_mb(pid, "VmRSS");
    let shed = Arc::new(AtomicU64::new(0));
    for pass in 1..=2 {
        let next = Arc::new(AtomicI64::new(FIRST));
        let clients: Vec<_> = (0..CLIENTS)
            .map(|_| {
                let (client, url, next, shed) =
                    (client.clone(), url.clone(), next.clone(), shed.clone());
                actix_rt::spawn(async move {
                    loop {
                        let id = next.fetch_add(1, Ordering::Relaxed);
                        if id >= FIRST + COUNT {
                            return;
                        }
                        // A shed request is answered at once (503, a JSON error): asked again.
                        loop {
                            let response = client
                                .get(format!("{url}/template-details?id={id}"))
                                .send()
                                .await
                                .unwrap_or_else(|e| panic!("pass {pass}, id {id}: {e}"));
                            let status = response.status().as_u16();
                            let body = response.bytes().await.expect("a body");
                            if status == 200 {
                                assert!(body.len() > LEN, "pass {pass}, id {id}: short body");
                                break;
                            }
                            assert_eq!(status, 503, "pass {pass}, id {id}");
                            let error: serde_json::Value =
                                serde_json::from_slice(&body).expect("a JSON error");
                            assert!(error["error"].is_string(), "{error}");
                            shed.fetch_add(1, Ordering::Relaxed);
                            tokio::time::sleep(Duration::from_millis(5)).await;
                        }
                    }
                })
            })
            .collect();
        for c in clients {
            c.await.expect("a client ran to its end");
        }
        let peak = rss_mb(pid, "VmHWM");
        eprintln!(
            "pass {pass}: RSS {} MB (at start {at_start} MB, peak {peak} MB), {} requests shed \
             and asked again",
            rss_mb(pid, "VmRSS"),
            AtomicU64::load(&shed, Ordering::Relaxed)
        );
        let bound = at_start + CACHE_MB + INFLIGHT_MB + OVERHEAD_MB;
        assert!(
            peak <= bound,
            "pass {pass}: peak RSS {peak} MB, more than {bound} MB (at start {at_start} MB + \
             caches {CACHE_MB} + in the air {INFLIGHT_MB} + overhead {OVERHEAD_MB})"
        );
    }
    let metrics = client
        .get(format!("{url}/metrics"))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("metrics text");
    let by_memory = labelled(&metrics, "shed_requests_total", "reason=\"memory\"");
    assert_eq!(
        by_memory as u64,
        AtomicU64::load(&shed, Ordering::Relaxed),
        "every 503 was shed for memory, and counted"
    );
    assert_eq!(
        testkit::prom::sum_metric(&metrics, "inflight_memory_bytes"),
        0.0
    );
}
