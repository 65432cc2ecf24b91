//! PostgreSQL behind a transaction-mode pooler: Debian's PgBouncer 1.18 in transaction mode,
//! started by the test kit in front of the shared test PostgreSQL (`servers::pgbouncer`). Without
//! transaction mode, a cold burst through it failed most of its requests (prepared statements
//! that do not exist on the server a load lands on) and a stampede cost many queries.

use std::time::Duration;

use futures_util::future::join_all;
use singleflight::config::{Pooler, Settings};
use testkit::poll;

use crate::support::fault_proxy::Mode;
use crate::support::{servers, spawn_app_with, TestApp};

/// The service's `DATABASE_URL` through PgBouncer (the same database), with `LISTEN` and the
/// migration lock on a direct connection (`DATABASE_LISTEN_URL`) when `direct_listen`.
fn through_pgbouncer(s: &mut Settings, pooler: Pooler, direct_listen: bool) {
    let database = s.database_url.rsplit('/').next().expect("a database name");
    let pooled = servers::pgbouncer().url(database);
    if direct_listen {
        s.database_listen_url = Some(s.database_url.clone());
    }
    s.database_url = pooled;
    s.database_pooler = pooler;
}

/// `n` distinct cold ids at once: their statuses.
async fn cold_burst(app: &TestApp, ids: std::ops::RangeInclusive<i64>) -> Vec<u16> {
    let requests = ids.map(|id| async move { app.template(id).await.status().as_u16() });
    join_all(requests).await
}

#[actix_rt::test]
async fn in_transaction_mode_a_cold_burst_a_stampede_and_changes_all_work_through_pgbouncer() {
    let app = spawn_app_with(|s| {
        through_pgbouncer(s, Pooler::Transaction, true);
        s.request_timeout = Duration::from_secs(10);
    })
    .await;
    assert_eq!(app.metric("db_transaction_mode").await, 1.0);

    let statuses = cold_burst(&app, 1..=300).await;
    let served = statuses.iter().filter(|s| **s == 200).count();
    assert_eq!(served, 300, "every cold id served: {statuses:?}");

    let queries = app.metric("db_hits_total").await;
    let stampede = app.burst(900, 200).await;
    assert!(stampede.iter().all(|(status, _, _)| *status == 200));
    let cost = app.metric("db_hits_total").await - queries;
    assert_eq!(cost, 1.0, "a cold stampede of 200 costs one query");

    for n in 0..5 {
        let name = format!("Changed through the pooler {n}");
        app.execute_sql(&format!(
            "UPDATE templates SET name = '{name}' WHERE id = 901"
        ))
        .await;
        let answer = || async { app.template(901).await.text().await.unwrap_or_default() };
        let polled = poll::until(
            Duration::from_secs(1),
            Duration::from_millis(20),
            answer,
            |body| body.contains(&name),
        )
        .await;
        assert!(
            polled.done,
            "update {n} not served within 1 s: {}",
            polled.last
        );
    }
    assert_eq!(
        app.metric("listener_hearing").await,
        1.0,
        "the listener hears"
    );
}

/// `DATABASE_POOLER=auto` (the default) finds the pooler by itself, from a load that fails as
/// a direct connection's would not and then works in a transaction, and no request fails for it.
#[actix_rt::test]
async fn auto_finds_a_transaction_mode_pooler_and_no_request_fails_for_it() {
    let app = spawn_app_with(|s| {
        through_pgbouncer(s, Pooler::Auto, true);
        s.request_timeout = Duration::from_secs(10);
    })
    .await;
    let mut round = 0;
    while app.metric("db_transaction_mode").await == 0.0 {
        assert!(round < 5, "never found the pooler");
        let first = 1 + round * 200;
        let statuses = cold_burst(&app, first..=first + 199).await;
        assert!(
            statuses.iter().all(|s| *s == 200),
            "round {round}: {statuses:?}"
        );
        round += 1;
    }
    let statuses = cold_burst(&app, 1001..=1200).await;
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
}

/// Pointed at the pooler with no listen URL, the listener hears nothing (`LISTEN` runs on
/// whichever server connection the pooler hands out): its heartbeat finds out, `/readyz` names
/// `DATABASE_LISTEN_URL`, and changes are still served within a few seconds.
#[actix_rt::test]
async fn through_a_pooler_without_a_listen_url_the_listener_is_deaf_and_says_what_to_fix() {
    let app = spawn_app_with(|s| {
        through_pgbouncer(s, Pooler::Transaction, false);
        s.cache_ttl = Duration::from_secs(300);
    })
    .await;
    let listener = || async {
        let body: serde_json::Value = app.get("/readyz").await.json().await.expect("JSON");
        body["checks"]["listener"]
            .as_str()
            .unwrap_or_default()
            .to_owned()
    };
    let polled = poll::until(
        Duration::from_secs(15),
        Duration::from_millis(100),
        listener,
        |check| check.starts_with("degraded: deaf"),
    )
    .await;
    assert!(polled.done, "never found deaf: {}", polled.last);
    assert!(
        polled.last.contains("DATABASE_LISTEN_URL"),
        "{}",
        polled.last
    );

    assert_eq!(app.template(902).await.status(), 200);
    app.execute_sql("UPDATE templates SET name = 'Seen though deaf' WHERE id = 902")
        .await;
    let answer = || async { app.template(902).await.text().await.unwrap_or_default() };
    let polled = poll::until(
        Duration::from_secs(5),
        Duration::from_millis(50),
        answer,
        |body| body.contains("Seen though deaf"),
    )
    .await;
    assert!(polled.done, "not served within 5 s: {}", polled.last);
}

/// What a cold burst and a stampede cost through PgBouncer (transaction mode; and with the
/// service told `DATABASE_POOLER=none`, as before this mode existed) next to a direct
/// connection. `cargo test --release --test api -- --ignored --nocapture pooler_figures`.
#[actix_rt::test]
#[ignore = "a benchmark: prints figures for BENCHMARKS.md"]
async fn pooler_figures() {
    println!("| run | path | cold burst: answered 200 | burst took | stampede of 200: queries | p99 of the stampede |");
    println!("|---|---|---|---|---|---|");
    for run in 1..=3 {
        for (path, pooler) in [
            ("direct", None),
            ("PgBouncer, transaction mode", Some(Pooler::Transaction)),
            ("PgBouncer, auto", Some(Pooler::Auto)),
            ("PgBouncer, told none", Some(Pooler::None)),
        ] {
            let app = spawn_app_with(|s| {
                if let Some(pooler) = pooler {
                    through_pgbouncer(s, pooler, true);
                }
                s.request_timeout = Duration::from_secs(10);
            })
            .await;
            // Told `none`, set-ups may keep failing on statements other clients left on the
            // pooler's servers: its pool is measured as it comes.
            if pooler != Some(Pooler::None) {
                crate::support::wait_for_warm_pool(&app.client, &app.address, 10.0).await;
            }
            app.warm_connections(300).await;
            let started = std::time::Instant::now();
            let statuses = cold_burst(&app, 1..=300).await;
            let took = started.elapsed();
            let served = statuses.iter().filter(|s| **s == 200).count();
            let queries = app.metric("db_hits_total").await;
            let stampede = join_all((0..200).map(|_| async {
                let asked = std::time::Instant::now();
                let status = app.template(1100).await.status().as_u16();
                (status, asked.elapsed())
            }))
            .await;
            let mut latencies: Vec<Duration> = stampede.iter().map(|(_, l)| *l).collect();
            latencies.sort();
            let p99 = latencies[latencies.len() * 99 / 100 - 1];
            let cost = app.metric("db_hits_total").await - queries;
            println!(
                "| {run} | {path} | {served}/300 | {:.3} s | {cost} | {:.1} ms |",
                took.as_secs_f64(),
                p99.as_secs_f64() * 1000.0
            );
        }
    }
}

/// PostgreSQL gone behind a PgBouncer that stays: PgBouncer still takes connections, and its
/// errors come back as a query's (diesel-async keeps no SQLSTATE for those). The failed loads
/// raise the doubt, a probe through PgBouncer (`SELECT 1`) finds the server gone, and one that
/// gets through again finds it back.
#[actix_rt::test]
async fn postgresql_gone_behind_a_pooler_that_stays_is_found_down_and_then_up_again() {
    let proxy = crate::faults::postgres_proxy();
    let bouncer = servers::pgbouncer_in_front_of(proxy.port());
    let app = spawn_app_with(|s| {
        let database = s.database_url.rsplit('/').next().expect("a database name");
        s.database_listen_url = Some(s.database_url.clone());
        s.database_url = bouncer.url(database);
        s.database_pooler = Pooler::Transaction;
        s.db_query_timeout = Duration::from_millis(1000);
    })
    .await;
    assert_eq!(app.template(1).await.status(), 200);
    assert_eq!(app.metric("db_available").await, 1.0);

    proxy.set_mode(Mode::Refuse);
    let (status, _) = app.readiness().await;
    assert_eq!(status, 200);
    // Cold ids fail while the service finds out; once it knows, they fail at once.
    let found_out = poll::until(
        Duration::from_secs(15),
        Duration::from_millis(50),
        || async {
            let cold = app.template(2).await.status().as_u16();
            (cold, app.metric("db_available").await)
        },
        |(_, available)| *available == 0.0,
    )
    .await;
    assert!(
        found_out.done,
        "never found PostgreSQL down: {:?}",
        found_out.last
    );
    assert_eq!(found_out.last.0, 503, "a cold id while it is gone");
    let (status, body) = app.readiness().await;
    assert_eq!(status, 200, "degraded, still ready: {body}");
    assert!(
        body["degraded"]
            .as_array()
            .is_some_and(|d| d.contains(&"postgres".into())),
        "{body}"
    );
    assert_eq!(
        app.template(1).await.status(),
        200,
        "what is cached is served"
    );

    proxy.set_mode(Mode::Pass);
    let back = poll::until(
        Duration::from_secs(15),
        Duration::from_millis(50),
        || app.metric("db_available"),
        |available| *available == 1.0,
    )
    .await;
    assert!(back.done, "never found PostgreSQL back");
    let cold = poll::until(
        Duration::from_secs(10),
        Duration::from_millis(50),
        || async { app.template(3).await.status().as_u16() },
        |status| *status == 200,
    )
    .await;
    assert!(cold.done, "a cold id loads again: {}", cold.last);
}
