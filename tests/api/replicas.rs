//! Read replicas (`DATABASE_READ_URL`), against a real streaming replica that applies the
//! primary's WAL seconds late (`recovery_min_apply_delay`), started by the test kit
//! (`servers::replicated`): loads go to the replica, except for a key whose change the service
//! knows of and the replica has not replayed yet.

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use diesel_async::RunQueryDsl;
use futures_util::future::join_all;
use singleflight::template::{unix_ms_now, Entry};
use singleflight::tls::PgConnector;
use testkit::poll;
use testkit::prom::series;

use crate::faults::loopback;
use crate::support::fault_proxy::{FaultProxy, Mode};
use crate::support::{seed_demo, servers, spawn_app_with, TestApp};

/// A database of its own on the replicated pair, with the schema and the demo templates, once
/// the replica has replayed them.
async fn replicated_database() -> (String, String) {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let pair = servers::replicated();
    let name = format!(
        "replicated_{}_{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::SeqCst)
    );
    let admin = PgConnector::new(&pair.primary_url("postgres"), None).expect("URL");
    let mut conn = admin.connect().await.expect("connect to the primary");
    diesel::sql_query(format!("CREATE DATABASE {name}"))
        .execute(&mut conn)
        .await
        .expect("create the database");
    let primary = pair.primary_url(&name);
    seed_demo(&primary).await;
    pair.wait_replayed(Duration::from_secs(30))
        .expect("the replica replays");
    (primary, pair.replica_url(&name))
}

/// The service loading from `primary` and the replica at `replica`.
async fn app_with_replica(primary: String, replica: String) -> TestApp {
    spawn_app_with(|s| {
        s.database_url = primary;
        s.database_read_urls = vec![replica];
        s.cache_ttl = Duration::from_secs(300);
    })
    .await
}

/// Loads sent to `target` (`primary` or `replica`), from `/metrics`.
async fn loads(app: &TestApp, target: &str) -> f64 {
    let text = app.metrics_text().await;
    let label = format!(r#"{{target="{target}"}}"#);
    series(&text, "db_loads_total")
        .into_iter()
        .find(|(labels, _)| *labels == label)
        .map_or(0.0, |(_, n)| n)
}

/// Waits until the service has read the replica's replayed position once (it is healthy).
async fn replica_healthy(app: &TestApp) {
    let healthy = || async { app.metric("db_replica_healthy").await };
    let polled = poll::until(
        Duration::from_secs(10),
        Duration::from_millis(50),
        healthy,
        |h| *h == 1.0,
    )
    .await;
    assert!(polled.done, "the replica never answered its health check");
}

#[actix_rt::test]
async fn loads_go_to_the_replica_and_a_change_is_read_from_the_primary_until_replayed() {
    let (primary, replica) = replicated_database().await;
    let app = app_with_replica(primary, replica.clone()).await;
    replica_healthy(&app).await;

    let app = &app;
    let statuses =
        join_all((1..=50).map(|id| async move { app.template(id).await.status() })).await;
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    assert_eq!(
        loads(app, "replica").await,
        50.0,
        "every cold load read the replica"
    );

    // A change: the replica applies it 2 s late, yet it is served within a second, read from
    // the primary, while the replica itself still has the old row.
    let changed = Instant::now();
    app.execute_sql("UPDATE templates SET name = 'Changed on the primary' WHERE id = 7")
        .await;
    let answer = || async { app.template(7).await.text().await.unwrap_or_default() };
    let polled = poll::until(
        Duration::from_secs(1),
        Duration::from_millis(20),
        answer,
        |body| body.contains("Changed on the primary"),
    )
    .await;
    assert!(polled.done, "not served within 1 s: {}", polled.last);
    let on_replica = replica_name(&replica, 7).await;
    if changed.elapsed() < servers::replicated().apply_delay {
        assert_ne!(
            on_replica, "Changed on the primary",
            "the replica is behind"
        );
    }
    assert!(
        loads(app, "primary").await >= 1.0,
        "the changed key read the primary"
    );

    // Once the replica has replayed the change, its key goes back to the replica.
    servers::replicated()
        .wait_replayed(Duration::from_secs(30))
        .expect("the replica replays");
    let unpinned = || async { app.metric("db_pinned_keys").await };
    let polled = poll::until(
        Duration::from_secs(5),
        Duration::from_millis(50),
        unpinned,
        |n| *n == 0.0,
    )
    .await;
    assert!(polled.done, "{} keys still pinned", polled.last);
}

/// The name of template `id` as the replica at `url` has it now.
async fn replica_name(url: &str, id: i64) -> String {
    #[derive(diesel::QueryableByName)]
    struct Name {
        #[diesel(sql_type = diesel::sql_types::Text)]
        name: String,
    }
    let mut conn = PgConnector::new(url, None)
        .expect("URL")
        .connect()
        .await
        .expect("connect to the replica");
    diesel::sql_query(format!("SELECT name FROM templates WHERE id = {id}"))
        .get_result::<Name>(&mut conn)
        .await
        .expect("the row")
        .name
}

/// A replica that refuses connections costs nothing but its share of loads: they go to the
/// primary, and every request is served.
#[actix_rt::test]
async fn a_replica_that_goes_away_sends_its_loads_to_the_primary_and_nothing_fails() {
    let (primary, replica) = replicated_database().await;
    let proxy = FaultProxy::start(loopback(servers::replicated().replica_port));
    let via_proxy = replica.replacen(
        &format!(":{}/", servers::replicated().replica_port),
        &format!(":{}/", proxy.port()),
        1,
    );
    let app = app_with_replica(primary, via_proxy).await;
    replica_healthy(&app).await;
    proxy.set_mode(Mode::Refuse);
    proxy.cut();
    let app = &app;
    let statuses =
        join_all((100..=199).map(|id| async move { app.template(id).await.status() })).await;
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    assert!(loads(app, "primary").await > 0.0);
    let unhealthy = || async { app.metric("db_replica_healthy").await };
    let polled = poll::until(
        Duration::from_secs(5),
        Duration::from_millis(50),
        unhealthy,
        |h| *h == 0.0,
    )
    .await;
    assert!(polled.done, "the replica is still taken as healthy");
}

/// The share of loads a replica serves under a spread load with changes, and how soon each
/// change is served while the replica applies WAL 2 s late.
/// `cargo test --release --test api -- --ignored --nocapture replica_figures`.
#[actix_rt::test]
#[ignore = "a benchmark: prints figures for BENCHMARKS.md"]
async fn replica_figures() {
    let (primary, replica) = replicated_database().await;
    let app = spawn_app_with(|s| {
        s.database_url = primary;
        s.database_read_urls = vec![replica];
        // Short: the spread load below keeps loading, so loads keep being routed.
        s.cache_ttl = Duration::from_secs(1);
        s.cache_grace = Duration::ZERO;
        s.near_cache_ttl = Duration::from_millis(200);
    })
    .await;
    replica_healthy(&app).await;
    let app = &app;
    let stop = std::sync::atomic::AtomicBool::new(false);
    let load = async {
        let mut n = 0u64;
        while !std::sync::atomic::AtomicBool::load(&stop, Ordering::Relaxed) {
            let ids = (0..20).map(|k| 1 + ((n * 20 + k) * 7919) % 1000);
            join_all(ids.map(|id| async move { app.template(id as i64).await.status() })).await;
            n += 1;
        }
        n
    };
    let changes = async {
        let mut visible = Vec::new();
        for k in 0..20 {
            let name = format!("Change {k}");
            let target = 1 + (k * 37) % 1000;
            app.execute_sql(&format!(
                "UPDATE templates SET name = '{name}' WHERE id = {target}"
            ))
            .await;
            let changed = Instant::now();
            let answer = || async {
                app.template(target as i64)
                    .await
                    .text()
                    .await
                    .unwrap_or_default()
            };
            let polled = poll::until(
                Duration::from_secs(10),
                Duration::from_millis(5),
                answer,
                |body| body.contains(&name),
            )
            .await;
            assert!(polled.done, "change {k} never served");
            visible.push(changed.elapsed());
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        stop.store(true, Ordering::Relaxed);
        visible
    };
    let (_, mut visible) = futures_util::future::join(load, changes).await;
    visible.sort();
    let (replica_loads, primary_loads) = (loads(app, "replica").await, loads(app, "primary").await);
    println!(
        "loads: {replica_loads} by the replica, {primary_loads} by the primary ({:.1} % by the replica)",
        100.0 * replica_loads / (replica_loads + primary_loads)
    );
    println!(
        "changes served: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms (replica apply delay {:?})",
        visible[visible.len() / 2].as_secs_f64() * 1000.0,
        visible[visible.len() * 99 / 100].as_secs_f64() * 1000.0,
        visible[visible.len() - 1].as_secs_f64() * 1000.0,
        servers::replicated().apply_delay
    );
}

/// A row read from the replica goes to Redis no younger than what the replica had replayed, so
/// that a replica of the service that knows of a later change does not take it for new: after a
/// commit that the replica holds back for 2 s, a key loaded from it is stamped before the commit.
#[actix_rt::test]
async fn a_row_read_from_a_replica_is_stamped_as_old_as_what_the_replica_had_replayed() {
    let (primary, replica) = replicated_database().await;
    let app = app_with_replica(primary, replica).await;
    replica_healthy(&app).await;

    let committed_ms = unix_ms_now();
    app.execute_sql("UPDATE templates SET name = name || '.' WHERE id = 1")
        .await;
    // The service has read the primary past that commit, and the replica short of it.
    let behind = poll::until(
        Duration::from_secs(10),
        Duration::from_millis(20),
        || app.metric("db_replica_lag_bytes"),
        |lag| *lag > 0.0,
    )
    .await;
    assert!(behind.done, "the replica never looked behind");
    let from_replica = loads(&app, "replica").await;
    let read_ms = unix_ms_now();
    assert_eq!(app.template(40).await.status(), 200);
    assert_eq!(
        loads(&app, "replica").await,
        from_replica + 1.0,
        "template 40 was read from the replica"
    );

    let client = redis::Client::open(app.redis_url.as_str()).expect("redis URL");
    let conn = client
        .get_multiplexed_async_connection()
        .await
        .expect("connect to redis");
    // The fill lands after the answer.
    let written = poll::until(
        Duration::from_secs(5),
        Duration::from_millis(10),
        || {
            let mut conn = conn.clone();
            async move {
                let raw: Option<Vec<u8>> = redis::cmd("GET")
                    .arg("template:{40}")
                    .query_async(&mut conn)
                    .await
                    .expect("GET");
                raw.and_then(|raw| Entry::decode(raw.into(), 40))
            }
        },
        Option::is_some,
    )
    .await;
    let entry = written.last.expect("template 40 in Redis");
    let apply_delay = servers::replicated().apply_delay.as_millis() as u64;
    if read_ms < committed_ms + apply_delay {
        assert!(
            entry.loaded_at_ms <= committed_ms,
            "stamped {} ms, after the commit the replica had not replayed ({committed_ms} ms; \
             read at {read_ms} ms)",
            entry.loaded_at_ms
        );
    }
    assert!(
        entry.loaded_at_ms + 60_000 > read_ms,
        "stamped with what the replica had replayed, not long before: {} ms",
        entry.loaded_at_ms
    );
}

/// A read URL that is not a standby (here the primary itself): its WAL positions are not the
/// primary's replay of them, so it takes no load, however long the service runs.
#[actix_rt::test]
async fn a_read_url_that_is_not_a_standby_takes_no_load() {
    let app = spawn_app_with(|s| s.database_read_urls = vec![s.database_url.clone()]).await;
    // Three ticks of the health checks, with cold loads all along (a cold load takes a few
    // milliseconds: a few hundred ids of the 1,200).
    let ran = Instant::now();
    for id in 1..=1_200 {
        if ran.elapsed() > Duration::from_millis(1_500) {
            break;
        }
        assert_eq!(app.template(id).await.status(), 200);
    }
    assert_eq!(loads(&app, "replica").await, 0.0, "no load read it");
    assert!(loads(&app, "primary").await >= 10.0);
    assert_eq!(app.metric("db_replica_healthy").await, 0.0);
}
