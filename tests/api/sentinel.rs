//! Against a real Redis Sentinel set of the test's own (a master, its replica, three sentinels):
//! the service finds the master through the sentinels, and when the master is killed with
//! SIGKILL under load it answers every request, follows the failover to the promoted replica
//! without a restart, and trusts nothing the old master acknowledged.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use singleflight::actors::cache::Keys;
use testkit::redis_topologies::own_redis_sentinels;

use crate::support::{header, spawn_app_with};

#[actix_rt::test]
async fn the_master_killed_under_load_fails_no_request_and_writes_reach_the_promoted_replica() {
    let set = own_redis_sentinels();
    let app = spawn_app_with(|s| {
        s.redis_sentinels = set.sentinels().split(',').map(str::to_owned).collect();
        s.redis_sentinel_master = set.master_name.clone();
        // Only the database, user, password and scheme of REDIS_URL apply: no host of its own.
        s.redis_url = "redis://unused.invalid:1/0".to_owned();
        // Every request reads Redis, so the failover is met on the request path.
        s.near_cache_ttl = Duration::ZERO;
        s.worker_cache_capacity = 0;
    })
    .await;
    let keys = Keys::default();
    let old_master = set.master_port();

    // Through the sentinels to the master: a miss, then a hit from Redis; the replica has it.
    assert_eq!(header(&app.template(7).await, "x-cache"), "MISS");
    // (A request while the fill is still in the air joins the flight: `SHARED`.)
    let hit = testkit::poll::until(
        Duration::from_secs(5),
        Duration::from_millis(10),
        || async { header(&app.template(7).await, "x-cache") },
        |x_cache| x_cache == "HIT",
    )
    .await;
    assert!(hit.done, "template 7 never a hit: {}", hit.last);
    let replicated = testkit::poll::until(
        Duration::from_secs(10),
        Duration::from_millis(20),
        || async { set.command(set.replica_port(), &["EXISTS", &keys.value(7)]) },
        |exists| matches!(exists, Ok(n) if n == "1"),
    )
    .await;
    assert!(replicated.done, "the replica never had template 7");

    // Load throughout: warm and cold ids.
    let stop = Arc::new(AtomicBool::new(false));
    let mut load = Vec::new();
    for worker in 0..4i64 {
        let (client, address, stop) = (app.client.clone(), app.address.clone(), stop.clone());
        load.push(actix_rt::spawn(async move {
            let (mut answered, mut failed) = (0, Vec::new());
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                let id = if n % 2 == 0 {
                    7
                } else {
                    100 + worker * 200 + n % 200
                };
                let status = client
                    .get(format!("{address}/template-details?id={id}"))
                    .send()
                    .await
                    .map_or(0, |r| r.status().as_u16());
                if status != 200 {
                    failed.push((id, status));
                }
                answered += 1;
                n += 1;
            }
            (answered, failed)
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;

    let killed = Instant::now();
    assert_eq!(set.kill_master(), old_master);
    // The sentinels name another master, and it takes writes (polled: the load goes on).
    let promoted = testkit::poll::until(
        Duration::from_secs(40),
        Duration::from_millis(50),
        || async {
            let port = set.master_port();
            let role = set.command(port, &["ROLE"]).unwrap_or_default();
            (port != old_master && role.starts_with("master")).then_some(port)
        },
        Option::is_some,
    )
    .await;
    let new_master = promoted.last.expect("the sentinels promoted the replica");
    let promoted_after = killed.elapsed();

    // A template first asked for now is written to the promoted replica: the service moved.
    let mut id = 1_000;
    let moved = testkit::poll::until(
        Duration::from_secs(30),
        Duration::from_millis(50),
        || {
            id += 1;
            let (app, key) = (&app, keys.value(id));
            let set = &set;
            async move {
                assert_eq!(app.template(id).await.status(), 200);
                // The write lands after the answer.
                testkit::poll::until(
                    Duration::from_millis(500),
                    Duration::from_millis(20),
                    || async { set.command(new_master, &["EXISTS", &key]) },
                    |exists| matches!(exists, Ok(n) if n == "1"),
                )
                .await
                .done
            }
        },
        |written| *written,
    )
    .await;
    let writes_after = killed.elapsed();
    assert!(moved.done, "no write reached the promoted replica");
    stop.store(true, Ordering::Relaxed);
    let (mut answered, mut failed) = (0, Vec::new());
    for task in load {
        let (n, f) = task.await.expect("load task");
        answered += n;
        failed.extend(f);
    }
    assert_eq!(
        failed,
        Vec::new(),
        "requests that failed ({answered} answered)"
    );
    println!(
        "sentinel failover: promoted {:.1} s after SIGKILL, first write there {:.1} s after; \
         {answered} requests answered meanwhile, none failed",
        promoted_after.as_secs_f64(),
        writes_after.as_secs_f64()
    );

    // The promoted replica is another Redis (another run id): template 7, written before the
    // failover, is not trusted but reloaded, and then a hit again.
    assert!(app.metric("redis_epoch_changes_total").await >= 1.0);
    // The sentinels' own word of it was heard (`+switch-master`), not only the lost connection.
    assert!(app.metric("redis_master_switches_total").await >= 1.0);
    let reloaded = testkit::poll::until(
        Duration::from_secs(10),
        Duration::from_millis(50),
        || async { header(&app.template(7).await, "x-cache") },
        |x_cache| x_cache == "HIT",
    )
    .await;
    assert!(reloaded.done, "template 7 never a hit again");
    assert!(
        app.metric("cache_suspect_entries_total").await >= 1.0,
        "the entry from before the failover was used"
    );
}
