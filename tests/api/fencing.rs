//! Every write fenced in Redis, with no clock compared between replicas: a replica whose clock
//! runs 30 s ahead (libfaketime) and whose PostgreSQL answers slowly cannot put an old row back
//! after another replica learned of the change, with the fleet lease off (every write is a
//! plain write, fenced on the key's generation as the lease's fill is).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};
use singleflight::template::{unix_ms_now, Entry};

use crate::faults::{postgres_proxy, via};
use crate::fleet::{
    database_now, fleet_sample, name_of, start_each, template_query_ran_after,
    wait_for_fleet_metric,
};
use crate::support::fault_proxy::Mode;
use crate::support::{demo_database_url, servers};

/// Debian's libfaketime (package `libfaketime`), which `.ci/run` installs.
fn libfaketime() -> PathBuf {
    let found = std::fs::read_dir("/usr/lib")
        .into_iter()
        .flatten()
        .flatten()
        .map(|dir| dir.path().join("faketime/libfaketime.so.1"))
        .find(|lib| lib.exists());
    found.expect("libfaketime.so.1 under /usr/lib/*/faketime: apt-get install libfaketime")
}

/// Template `id`'s entry in the Redis at `redis_url`, if there is one.
fn entry(redis_url: &str, id: i64) -> Option<Entry> {
    let mut redis = redis::Client::open(redis_url)
        .and_then(|c| c.get_connection())
        .expect("redis connection");
    let raw: Option<Vec<u8>> = redis::cmd("GET")
        .arg(format!("template:{{{id}}}"))
        .query(&mut redis)
        .expect("GET");
    raw.and_then(|raw| Entry::decode(raw.into(), id))
}

#[actix_rt::test]
async fn a_replica_whose_clock_runs_30_s_ahead_cannot_put_an_old_row_back() {
    let servers = servers::servers();
    let direct_url = demo_database_url().await;
    let redis_url = servers.redis_url(servers::next_redis_db());
    // Replica a: its clock 30 s ahead, and 1 s from PostgreSQL each way once the test slows the
    // link (its loads' answers and its change notifications reach it late). Replica b: on time,
    // next to PostgreSQL.
    let proxy = postgres_proxy();
    let ahead = vec![
        ("LD_PRELOAD".to_owned(), libfaketime().display().to_string()),
        ("FAKETIME".to_owned(), "+30s".to_owned()),
        ("FAKETIME_DONT_FAKE_MONOTONIC".to_owned(), "1".to_owned()),
    ];
    let replicas = [
        (via(&proxy, &direct_url), ahead),
        (direct_url.clone(), Vec::new()),
    ];
    let env = [
        ("LEASE_TTL_MS", "0"),
        ("DB_QUERY_TIMEOUT_MS", "5000"),
        ("FLIGHT_TIMEOUT_MS", "10000"),
        ("REQUEST_TIMEOUT_MS", "12000"),
    ];
    let fleet = start_each(&replicas, &redis_url, &env).await;
    let client = reqwest::Client::new();
    let (a, b) = (fleet[0].url.clone(), fleet[1].url.clone());
    let (replica_a, replica_b) = ([&fleet[0]], [&fleet[1]]);

    // The skew is real: what a writes says it was loaded about 30 s from now.
    assert_eq!(name_of(&client, &a, 5).await.0, 200);
    // (The write lands after the answer.)
    let cached = testkit::poll::until(
        Duration::from_secs(5),
        Duration::from_millis(20),
        || async { entry(&redis_url, 5) },
        Option::is_some,
    )
    .await;
    let written = cached.last.expect("a cached template 5");
    assert!(
        written.loaded_at_ms > unix_ms_now() + 20_000,
        "a's clock is not ahead: loaded at {} ms, now {} ms",
        written.loaded_at_ms,
        unix_ms_now()
    );

    let id = 777;
    let new_name = "Changed under a skewed clock";
    let mut conn = AsyncPgConnection::establish(&direct_url)
        .await
        .expect("connect to the test database");
    let marker = database_now(&mut conn).await;
    proxy.set_mode(Mode::Latency(Duration::from_millis(1000)));
    // a misses, reads the key's generation, and sends its query over the slow link.
    let first = actix_rt::spawn({
        let (client, a) = (client.clone(), a.clone());
        async move { name_of(&client, &a, id).await }
    });
    template_query_ran_after(&direct_url, &marker).await;
    diesel::sql_query(format!(
        "UPDATE templates SET name = '{new_name}' WHERE id = {id}"
    ))
    .execute(&mut conn)
    .await
    .expect("update the row");
    let what = "b never learned of the change";
    wait_for_fleet_metric(&client, &replica_b, "invalidations_total", 1.0, what).await;

    // a's old row arrives after b's delete; a answers it (its request came before the change)
    // and writes it, stamped 30 s in b's future: Redis refuses it, the generation having moved.
    let (status, name) = first.await.expect("task");
    assert_eq!(status, 200);
    assert_ne!(name, new_name, "a's load read the row before the change");
    let refused = testkit::poll::until(
        Duration::from_secs(10),
        Duration::from_millis(10),
        || {
            fleet_sample(
                &client,
                &replica_a,
                "cache_writes_total",
                r#"{outcome="changed"}"#,
            )
        },
        |n| *n >= 1.0,
    )
    .await;
    assert!(refused.done, "a's write of the old row was not refused");
    assert_eq!(
        fleet_sample(
            &client,
            &replica_a,
            "cache_writes_total",
            r#"{outcome="written"}"#
        )
        .await,
        1.0,
        "only template 5 was written by a"
    );

    // For a second after, b answers only the new row (before fencing: the old one, from a's
    // write, until its TTL).
    let since = Instant::now();
    let mut answers = 0;
    while since.elapsed() < Duration::from_secs(1) {
        let (status, name) = name_of(&client, &b, id).await;
        assert_eq!((status, name.as_str()), (200, new_name), "answer {answers}");
        answers += 1;
    }
    assert!(answers > 10, "only {answers} answers in a second");
    if let Some(cached) = entry(&redis_url, id) {
        let body = match cached.lookup {
            singleflight::template::Lookup::Found(body) => body,
            other => panic!("Redis holds {other:?}"),
        };
        assert!(
            String::from_utf8_lossy(&body).contains(new_name),
            "Redis holds the old row"
        );
    }
}
