//! A fleet: several real service processes on one PostgreSQL and one Redis. The fleet lease
//! makes a cold key cost one database query for all of them; a holder that dies costs the others
//! one lease period, never an error; a Redis that stops answering leaves each replica
//! coalescing its own requests.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::faults::{postgres_proxy, redis_proxy, via};
use crate::support::fault_proxy::Mode;
use crate::support::{empty_database_url, servers, sum_metric, wait_for_warm_pool};

/// One service process, killed when dropped (a failed assertion must not leave it running).
struct Replica {
    child: std::process::Child,
    url: String,
}

impl Drop for Replica {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.local_addr().expect("addr").port()
}

/// Starts `n` replicas on `database_url` and `redis_url` with `env` on top, and waits until
/// each is ready with its pool open.
async fn start_fleet(
    n: usize,
    database_url: &str,
    redis_url: &str,
    env: &[(&str, &str)],
) -> Vec<Replica> {
    let mut fleet = Vec::new();
    for _ in 0..n {
        let port = free_port();
        let mut command = Command::new(env!("CARGO_BIN_EXE_singleflight"));
        command
            .env("HTTP_ADDR", format!("127.0.0.1:{port}"))
            .env("HTTP_WORKERS", "2")
            .env("KEY_OWNER_SHARDS", "2")
            .env("DB_POOL_SIZE", "4")
            .env("DATABASE_URL", database_url)
            .env("REDIS_URL", redis_url)
            .env("REDIS_TIMEOUT_MS", "300")
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        for (var, value) in env {
            command.env(var, value);
        }
        fleet.push(Replica {
            child: command.spawn().expect("start the service binary"),
            url: format!("http://127.0.0.1:{port}"),
        });
    }
    let client = reqwest::Client::new();
    for replica in &fleet {
        let ready = testkit::poll::until(
            Duration::from_secs(30),
            Duration::from_millis(100),
            || async {
                client
                    .get(format!("{}/readyz", replica.url))
                    .send()
                    .await
                    .is_ok_and(|r| r.status() == 200)
            },
            |ready| *ready,
        )
        .await;
        assert!(ready.done, "replica {} never became ready", replica.url);
        wait_for_warm_pool(&client, &replica.url, 4.0).await;
    }
    fleet
}

/// The sum of `metric` over `replicas`.
async fn fleet_metric(client: &reqwest::Client, replicas: &[&Replica], metric: &str) -> f64 {
    let mut total = 0.0;
    for replica in replicas {
        let text = client
            .get(format!("{}/metrics", replica.url))
            .send()
            .await
            .expect("scrape")
            .text()
            .await
            .expect("metrics text");
        total += sum_metric(&text, metric);
    }
    total
}

/// `per_replica` concurrent requests for `id` to each of `replicas`; every status, body and
/// `X-Cache`, and when the last one was answered.
async fn stampede(
    client: &reqwest::Client,
    replicas: &[&Replica],
    id: i64,
    per_replica: usize,
) -> Vec<(u16, String, String)> {
    let requests: Vec<_> = (0..per_replica)
        .flat_map(|_| replicas.iter().map(|r| r.url.clone()))
        .map(|url| {
            let client = client.clone();
            actix_rt::spawn(async move {
                let response = client
                    .get(format!("{url}/template-details?id={id}"))
                    .send()
                    .await
                    .expect("an answer");
                let status = response.status().as_u16();
                let x_cache = response
                    .headers()
                    .get("x-cache")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default()
                    .to_owned();
                (status, response.text().await.unwrap_or_default(), x_cache)
            })
        })
        .collect();
    let mut answers = Vec::new();
    for request in requests {
        answers.push(request.await.expect("request task"));
    }
    answers
}

fn all_refs(fleet: &[Replica]) -> Vec<&Replica> {
    fleet.iter().collect()
}

#[actix_rt::test]
async fn a_cold_stampede_spread_over_three_replicas_costs_one_query_fleet_wide() {
    let servers = servers::servers();
    let database_url = empty_database_url().await;
    let redis_url = servers.redis_url(servers::next_redis_db());
    let fleet = start_fleet(3, &database_url, &redis_url, &[]).await;
    let replicas = all_refs(&fleet);
    let client = reqwest::Client::new();

    for (round, id) in (500..510).enumerate() {
        let queries_before = fleet_metric(&client, &replicas, "db_hits_total").await;
        let claims_before = fleet_metric(&client, &replicas, "lease_claims_total").await;
        // 67 per replica: 201 requests at once, spread evenly.
        let answers = stampede(&client, &replicas, id, 67).await;
        assert_eq!(answers.len(), 201);
        let body = &answers[0].1;
        for (status, text, x_cache) in &answers {
            assert_eq!(*status, 200, "round {round}: {text}");
            assert_eq!(
                text, body,
                "round {round}: every answer is the same template"
            );
            assert!(
                ["MISS", "SHARED", "HIT"].contains(&x_cache.as_str()),
                "round {round}: X-Cache {x_cache}"
            );
        }
        let queries = fleet_metric(&client, &replicas, "db_hits_total").await - queries_before;
        let claims = fleet_metric(&client, &replicas, "lease_claims_total").await - claims_before;
        assert_eq!(
            queries, 1.0,
            "round {round}: database queries for one cold id"
        );
        assert_eq!(claims, 1.0, "round {round}: leases claimed for one cold id");
    }
    // The other replicas got the value from the one that loaded it: SHARED, not their own MISS.
    let waits = fleet_metric(&client, &replicas, "lease_waits_total").await;
    let notices = fleet_metric(&client, &replicas, "lease_notices_total").await;
    assert!(waits >= 1.0, "no replica ever waited on another's lease");
    assert!(notices >= 1.0, "no fill notice was ever received");
}

#[actix_rt::test]
async fn when_the_lease_holder_is_killed_mid_load_the_others_take_over_and_answer_every_request() {
    let servers = servers::servers();
    let proxy = postgres_proxy();
    let database_url = via(&proxy, &empty_database_url().await);
    let redis_url = servers.redis_url(servers::next_redis_db());
    // The default lease period (1 s) and a request deadline that leaves room for it and a slow
    // load after it.
    let env = [("REQUEST_TIMEOUT_MS", "6000"), ("LEASE_TTL_MS", "1000")];
    let mut fleet = start_fleet(3, &database_url, &redis_url, &env).await;
    let client = reqwest::Client::new();
    // Every load now takes at least 0.8 s (0.4 s each way).
    proxy.set_mode(Mode::Latency(Duration::from_millis(400)));
    let id = 777;

    // The holder: the first replica asked claims the lease and starts its slow load.
    let holder_url = fleet[0].url.clone();
    let first = {
        let client = client.clone();
        actix_rt::spawn(async move {
            client
                .get(format!("{holder_url}/template-details?id={id}"))
                .send()
                .await
                .map(|r| r.status().as_u16())
        })
    };
    let redis = redis::Client::open(redis_url.as_str()).expect("redis url");
    let lease_key = format!("template:{id}:lease");
    let leased = testkit::poll::until(
        Duration::from_secs(10),
        Duration::from_millis(10),
        || {
            let (redis, key) = (redis.clone(), lease_key.clone());
            async move {
                let mut conn = redis.get_connection().expect("redis connection");
                redis::cmd("EXISTS")
                    .arg(&key)
                    .query::<i64>(&mut conn)
                    .unwrap_or(0)
            }
        },
        |exists| *exists == 1,
    )
    .await;
    assert!(leased.done, "the first replica never claimed the lease");

    // The others wait on it...
    let (holder, rest) = fleet.split_at_mut(1);
    let others = [&rest[0], &rest[1]];
    let started = Instant::now();
    let waiting = {
        let client = client.clone();
        let others: Vec<String> = others.iter().map(|r| r.url.clone()).collect();
        actix_rt::spawn(async move {
            let mut requests = Vec::new();
            for url in others.iter().cycle().take(40) {
                let (client, url) = (client.clone(), url.clone());
                requests.push(actix_rt::spawn(async move {
                    let response = client
                        .get(format!("{url}/template-details?id={id}"))
                        .send()
                        .await
                        .expect("an answer");
                    (response.status().as_u16(), Instant::now())
                }));
            }
            let mut answers = Vec::new();
            for request in requests {
                answers.push(request.await.expect("request task"));
            }
            answers
        })
    };
    let waited = testkit::poll::until(
        Duration::from_secs(10),
        Duration::from_millis(20),
        || fleet_metric(&client, &others, "lease_waits_total"),
        |waits| *waits >= 2.0,
    )
    .await;
    assert!(waited.done, "the other replicas never waited on the lease");

    // ...and the holder dies in the middle of its load.
    holder[0].child.kill().expect("SIGKILL the lease holder");
    let _ = holder[0].child.wait();
    let _ = first.await;

    let answers = waiting.await.expect("requests");
    for (status, answered_at) in &answers {
        assert_eq!(*status, 200, "a request failed because a peer died");
        assert!(
            answered_at.duration_since(started) < Duration::from_secs(6),
            "answered after the deadline"
        );
    }
    let queries = fleet_metric(&client, &others, "db_hits_total").await;
    let takeovers = fleet_metric(&client, &others, "lease_takeovers_total").await;
    assert_eq!(queries, 1.0, "the survivors load the key exactly once");
    assert_eq!(takeovers, 1.0, "one survivor took the lease over");
}

#[actix_rt::test]
async fn with_redis_black_holed_each_replica_coalesces_its_own_requests_and_nothing_fails() {
    let servers = servers::servers();
    let proxy = redis_proxy();
    let database_url = empty_database_url().await;
    let redis_url = via(&proxy, &servers.redis_url(servers::next_redis_db()));
    let env = [("REQUEST_TIMEOUT_MS", "5000")];
    let fleet = start_fleet(3, &database_url, &redis_url, &env).await;
    let replicas = all_refs(&fleet);
    let client = reqwest::Client::new();
    proxy.set_mode(Mode::Blackhole);

    let queries_before = fleet_metric(&client, &replicas, "db_hits_total").await;
    let answers = stampede(&client, &replicas, 321, 40).await;
    for (status, text, _) in &answers {
        assert_eq!(*status, 200, "{text}");
    }
    let queries = fleet_metric(&client, &replicas, "db_hits_total").await - queries_before;
    assert!(
        (1.0..=3.0).contains(&queries),
        "each replica loads the key at most once on its own: {queries} queries"
    );
    proxy.set_mode(Mode::Pass);
}
