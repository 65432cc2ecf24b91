//! Expiry without a stampede or a wait (refresh-ahead, jitter), and changes visible within a
//! second (invalidation through LISTEN/NOTIFY).

use std::time::{Duration, Instant};

use testkit::poll;

use crate::support::{header, spawn_app, spawn_app_with, sum_metric, TestApp};

/// Polls template `id` until `done(status, body)` holds; returns how long that took.
async fn time_until(app: &TestApp, id: i64, done: impl Fn(u16, &str) -> bool) -> Duration {
    let answer = || async {
        let response = app.template(id).await;
        let status = response.status().as_u16();
        (status, response.text().await.expect("body"))
    };
    let (limit, every) = (Duration::from_secs(10), Duration::from_millis(20));
    let polled = poll::until(limit, every, answer, |(status, body)| done(*status, body)).await;
    let (status, body) = &polled.last;
    assert!(polled.done, "never became visible: {status} {body}");
    polled.took
}

#[actix_rt::test]
async fn an_update_is_served_within_a_second_and_a_delete_is_404_within_a_second() {
    // A long TTL and near cache: only an invalidation can make the change visible in time.
    let app = spawn_app_with(|s| s.cache_ttl = Duration::from_secs(300)).await;
    assert_eq!(app.template(30).await.status(), 200);
    assert_eq!(header(&app.template(30).await, "x-cache"), "HIT");

    app.execute_sql("UPDATE templates SET name = 'Renamed template' WHERE id = 30")
        .await;
    let took = time_until(&app, 30, |status, body| {
        status == 200 && body.contains("Renamed template")
    })
    .await;
    assert!(
        took < Duration::from_secs(1),
        "update visible after {took:?}"
    );

    app.execute_sql("DELETE FROM templates WHERE id = 30").await;
    let took = time_until(&app, 30, |status, _| status == 404).await;
    assert!(
        took < Duration::from_secs(1),
        "delete visible after {took:?}"
    );
    assert!(app.metric("invalidations_total").await >= 2.0);
}

#[actix_rt::test]
async fn a_new_row_replaces_a_cached_not_found() {
    let app = spawn_app_with(|s| s.negative_ttl = Duration::from_secs(300)).await;
    assert_eq!(app.template(5000).await.status(), 404);
    assert_eq!(
        header(&app.template(5000).await, "x-cache"),
        "HIT",
        "not found is cached"
    );
    app.execute_sql("INSERT INTO templates (id, name, content) VALUES (5000, 'New', 'Hello')")
        .await;
    let took = time_until(&app, 5000, |status, _| status == 200).await;
    assert!(
        took < Duration::from_secs(1),
        "insert visible after {took:?}"
    );
}

#[actix_rt::test]
async fn the_listener_reconnects_when_its_connection_is_killed() {
    let app = spawn_app_with(|s| s.cache_ttl = Duration::from_secs(300)).await;
    assert_eq!(app.metric("listener_connects_total").await, 1.0);
    assert_eq!(app.template(31).await.status(), 200);

    let killed = app
        .execute_sql(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE datname = current_database() AND query ILIKE 'LISTEN%'",
        )
        .await;
    assert_eq!(
        killed, 1,
        "the listener's connection was found and terminated"
    );
    let started = Instant::now();
    while app.metric("listener_connects_total").await < 2.0 {
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "the listener did not reconnect"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(app.metric("listener_connected").await, 1.0);
    // Having reconnected, the service does not trust what it cached before (notifications may
    // have been missed): the first read reloads; after that only a notification can show the
    // next change in time.
    assert_eq!(header(&app.template(31).await, "x-cache"), "MISS");
    assert_eq!(header(&app.template(31).await, "x-cache"), "HIT");
    assert!(app.metric("cache_suspect_entries_total").await >= 1.0);

    app.execute_sql("UPDATE templates SET name = 'After reconnect' WHERE id = 31")
        .await;
    let took = time_until(&app, 31, |_, body| body.contains("After reconnect")).await;
    assert!(
        took < Duration::from_secs(1),
        "update visible after {took:?}"
    );
}

#[actix_rt::test]
async fn hot_keys_never_miss_or_wait_across_a_soft_expiry() {
    let app = spawn_app_with(|s| {
        s.cache_ttl = Duration::from_secs(1);
        s.ttl_jitter_pct = 0;
        s.near_cache_ttl = Duration::from_millis(200);
    })
    .await;
    app.warm_connections(20).await;
    let ids = [41, 42, 43];
    for id in ids {
        assert_eq!(header(&app.template(id).await, "x-cache"), "MISS");
    }
    let db_after_load = app.metric("db_hits_total").await;

    // 3.5 s of steady load: each key crosses its soft expiry three times.
    let started = Instant::now();
    let mut seen = std::collections::HashMap::<String, usize>::new();
    while started.elapsed() < Duration::from_millis(3500) {
        for id in ids {
            for (status, x_cache, _) in app.burst(id, 10).await {
                assert_eq!(status, 200);
                *seen.entry(x_cache).or_default() += 1;
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(seen.get("MISS"), None, "{seen:?}");
    assert_eq!(
        seen.get("SHARED"),
        None,
        "nobody waited on the database: {seen:?}"
    );
    assert!(
        seen.get("STALE").is_some_and(|n| *n >= 3),
        "served while refreshing: {seen:?}"
    );

    // Both counts from one scrape once no refresh is in the air.
    let settled = app.metrics_when_idle().await;
    let refreshes = sum_metric(&settled, "refreshes_total");
    let queries = sum_metric(&settled, "db_hits_total") - db_after_load;
    assert_eq!(queries, refreshes, "every query was a background refresh");
    // At most one refresh per key per soft expiry (3.5 s / 1 s, plus the one in the air).
    assert!((3.0..=15.0).contains(&refreshes), "{refreshes} refreshes");
}

#[actix_rt::test]
async fn keys_filled_together_expire_spread_over_the_jitter_window() {
    let app = spawn_app_with(|s| {
        s.cache_ttl = Duration::from_secs(100);
        s.cache_grace = Duration::ZERO;
        s.ttl_jitter_pct = 10;
    })
    .await;
    let ids: Vec<i64> = (100..160).collect();
    let requests = ids.iter().map(|&id| app.template(id));
    for response in futures_util::future::join_all(requests).await {
        assert_eq!(response.status(), 200);
    }
    let client = redis::Client::open(app.redis_url.as_str()).unwrap();
    let conn = client.get_multiplexed_async_connection().await.unwrap();
    // The waiters are answered before the fill lands: wait for the last of the fills.
    let polled = testkit::poll::until(
        Duration::from_secs(10),
        Duration::from_millis(10),
        || {
            let mut conn = conn.clone();
            let ids = ids.clone();
            async move {
                let mut ttls = Vec::new();
                for id in ids {
                    let ms: i64 = redis::cmd("PTTL")
                        .arg(format!("template:{{{id}}}"))
                        .query_async(&mut conn)
                        .await
                        .unwrap();
                    ttls.push(ms);
                }
                ttls
            }
        },
        |ttls| ttls.iter().all(|ms| *ms >= 0),
    )
    .await;
    let ttls = polled.last;
    let (min, max) = (*ttls.iter().min().unwrap(), *ttls.iter().max().unwrap());
    assert!(
        min >= 89_000 && max <= 110_000,
        "within ±10 % of 100 s: {min}..{max}"
    );
    assert!(
        max - min >= 10_000,
        "spread over the window, not together: {min}..{max}"
    );
}

#[actix_rt::test]
async fn a_restart_reloads_what_it_finds_cached_instead_of_trusting_it() {
    // Two service instances over one database and one Redis keyspace, one after the other: the
    // second may have missed notifications, so what it finds in Redis is not served but reloaded.
    let first = spawn_app().await;
    assert_eq!(first.template(50).await.status(), 200);
    let (database_url, redis_url) = (first.database_url.clone(), first.redis_url.clone());
    drop(first);
    let second = spawn_app_with(|s| {
        s.database_url = database_url;
        s.redis_url = redis_url;
    })
    .await;
    assert_eq!(header(&second.template(50).await, "x-cache"), "MISS");
    assert_eq!(second.metric("cache_suspect_entries_total").await, 1.0);
    assert_eq!(second.metric("db_hits_total").await, 1.0);
    assert_eq!(header(&second.template(50).await, "x-cache"), "HIT");
}

#[actix_rt::test]
async fn an_update_that_changes_an_id_invalidates_the_old_and_the_new_id() {
    let app = spawn_app_with(|s| {
        s.cache_ttl = Duration::from_secs(300);
        s.negative_ttl = Duration::from_secs(300);
    })
    .await;
    assert_eq!(app.template(40).await.status(), 200);
    assert_eq!(app.template(6000).await.status(), 404);
    assert_eq!(header(&app.template(6000).await, "x-cache"), "HIT");

    app.execute_sql("UPDATE templates SET id = 6000 WHERE id = 40")
        .await;
    time_until(&app, 40, |status, _| status == 404).await;
    time_until(&app, 6000, |status, _| status == 200).await;
}

#[actix_rt::test]
async fn a_truncate_invalidates_every_id() {
    let app = spawn_app_with(|s| s.cache_ttl = Duration::from_secs(300)).await;
    for id in [41, 42, 43] {
        assert_eq!(app.template(id).await.status(), 200);
        assert_eq!(header(&app.template(id).await, "x-cache"), "HIT");
    }
    app.execute_sql("TRUNCATE templates").await;
    for id in [41, 42, 43] {
        time_until(&app, id, |status, _| status == 404).await;
    }
}

/// A listener that hears nothing — here it listens on another database than the one changes and
/// its heartbeats are sent to, as it would through a transaction-mode pooler — is found out by
/// its heartbeat: `/readyz` says deaf (still ready), `listener_hearing` is 0, and while it is
/// deaf a change is still served within a few seconds: nothing cached is older than 2 s.
#[actix_rt::test]
async fn a_deaf_listener_is_found_out_and_changes_are_still_served_within_seconds() {
    let elsewhere = crate::support::empty_database_url().await;
    let app = spawn_app_with(|s| {
        s.cache_ttl = Duration::from_secs(300);
        s.database_listen_url = Some(elsewhere);
    })
    .await;
    let readiness = || app.readiness();
    let polled = poll::until(
        Duration::from_secs(15),
        Duration::from_millis(100),
        readiness,
        |(_, body)| {
            body["checks"]["listener"]
                .as_str()
                .is_some_and(|check| check.starts_with("degraded: deaf"))
        },
    )
    .await;
    let (status, body) = polled.last;
    assert!(polled.done, "never found deaf: {body}");
    assert_eq!(
        status, 200,
        "a deaf listener is degraded, not unready: {body}"
    );
    assert_eq!(app.metric("listener_hearing").await, 0.0);

    assert_eq!(app.template(50).await.status(), 200);
    app.execute_sql("UPDATE templates SET name = 'Renamed while deaf' WHERE id = 50")
        .await;
    let took = time_until(&app, 50, |status, body| {
        status == 200 && body.contains("Renamed while deaf")
    })
    .await;
    assert!(took < Duration::from_secs(5), "visible after {took:?}");
}

/// A change's delete runs before the reads the owner starts after it, even when Redis does not
/// know the script that deletes (it restarted, failed over, or flushed its scripts): the reads
/// are queued behind the delete on the cache actor's connection, and one that overtook it would
/// find the old value and answer it as fresh after the change.
#[actix_rt::test]
async fn reads_after_a_change_miss_even_when_redis_forgot_its_scripts() {
    use actix::Actor;
    use singleflight::actors::cache::{CacheActor, CacheDel, CacheGet, CacheSet, CacheSettings};
    use singleflight::config::Settings;
    use singleflight::metrics::Metrics;
    use singleflight::template::{unix_ms_now, Lookup};

    let redis_url = testkit::servers::servers().redis_url(testkit::servers::next_redis_db());
    let settings = Settings {
        redis_url: redis_url.clone(),
        redis_timeout: Duration::from_millis(500),
        ..Settings::default()
    };
    let metrics = Metrics::new().expect("metrics");
    let cache = CacheActor::new(0, CacheSettings::from(&settings), metrics).start();
    let mut direct = redis::Client::open(redis_url)
        .expect("redis url")
        .get_multiplexed_async_connection()
        .await
        .expect("a connection of the test's own");
    for round in 0..5 {
        let id = 900 + round;
        let body = format!(
            "{{\"id\":{id},\"name\":\"old\",\"content\":\"\",\"updated_at\":\"2026-01-01T00:00:00Z\"}}"
        );
        // Until the actor has read its Redis's epoch, which fences its writes.
        let cached = poll::until(
            Duration::from_secs(5),
            Duration::from_millis(20),
            || async {
                let read = cache
                    .send(CacheGet(id))
                    .await
                    .expect("actor")
                    .expect("read");
                let write = CacheSet {
                    id,
                    lookup: Lookup::Found(body.clone().into()),
                    loaded_at_ms: unix_ms_now(),
                    from_replica: false,
                    fence: Some(read.fence),
                };
                cache.send(write).await.expect("actor").expect("write")
            },
            |written| *written,
        )
        .await;
        let written = cached.done;
        assert!(written, "round {round}: the old value is cached");
        let _: () = redis::cmd("SCRIPT")
            .arg("FLUSH")
            .query_async(&mut direct)
            .await
            .expect("SCRIPT FLUSH");
        // The change, then a read at once: both in the actor's mailbox before either is sent.
        cache.do_send(CacheDel(id));
        let after = cache
            .send(CacheGet(id))
            .await
            .expect("actor")
            .expect("read");
        assert_eq!(
            after.value, None,
            "round {round}: a read after the change found the old value"
        );
    }
}
