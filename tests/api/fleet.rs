//! A fleet: several real service processes on one PostgreSQL and one Redis. The fleet lease
//! makes a cold key cost one database query for all of them; a holder that dies costs the others
//! one lease period, never an error; a Redis that stops answering leaves each replica
//! coalescing its own requests.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::faults::{postgres_proxy, redis_proxy, via};
use crate::support::fault_proxy::Mode;
use crate::support::{demo_database_url, ports, servers, sum_metric, wait_for_warm_pool};

/// One service process, killed when dropped (a failed assertion must not leave it running).
pub(crate) struct Replica {
    child: std::process::Child,
    pub(crate) url: String,
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
    ports::free_port().expect("a free port")
}

/// Starts `n` replicas on `database_url` and `redis_url` with `env` on top, and waits until
/// each is ready with its pool open.
pub(crate) async fn start_fleet(
    n: usize,
    database_url: &str,
    redis_url: &str,
    env: &[(&str, &str)],
) -> Vec<Replica> {
    let urls = vec![database_url.to_owned(); n];
    start_fleet_on(&urls, redis_url, env).await
}

/// Starts one replica per database URL (each its own way to the same database, e.g. through a
/// proxy of its own), as [`start_fleet`] does.
async fn start_fleet_on(
    database_urls: &[String],
    redis_url: &str,
    env: &[(&str, &str)],
) -> Vec<Replica> {
    let each: Vec<(String, Vec<(String, String)>)> = database_urls
        .iter()
        .map(|url| (url.clone(), Vec::new()))
        .collect();
    start_each(&each, redis_url, env).await
}

/// Starts one replica per `(database URL, environment of its own)`, all with `env` too, as
/// [`start_fleet`] does.
pub(crate) async fn start_each(
    replicas: &[(String, Vec<(String, String)>)],
    redis_url: &str,
    env: &[(&str, &str)],
) -> Vec<Replica> {
    let mut fleet = Vec::new();
    for (database_url, own_env) in replicas {
        let port = free_port();
        let mut command = Command::new(env!("CARGO_BIN_EXE_singleflight"));
        command
            .env("HTTP_ADDR", format!("127.0.0.1:{port}"))
            .env("HTTP_WORKERS", "2")
            .env("KEY_OWNER_SHARDS", "2")
            .env("DB_POOL_SIZE", "4")
            .env("DATABASE_URL", database_url)
            .env("REDIS_URL", redis_url)
            // Generous: a Redis call that times out on a busy machine falls back to a local load.
            .env("REDIS_TIMEOUT_MS", "1000")
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        for (var, value) in env {
            command.env(var, value);
        }
        for (var, value) in own_env {
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

/// One replica's `/metrics` text.
async fn scrape(client: &reqwest::Client, replica: &Replica) -> String {
    client
        .get(format!("{}/metrics", replica.url))
        .send()
        .await
        .expect("scrape")
        .text()
        .await
        .expect("metrics text")
}

/// The sum of `metric` over `replicas`.
pub(crate) async fn fleet_metric(
    client: &reqwest::Client,
    replicas: &[&Replica],
    metric: &str,
) -> f64 {
    let mut total = 0.0;
    for replica in replicas {
        total += sum_metric(&scrape(client, replica).await, metric);
    }
    total
}

/// Polls until the sum of `metric` over `replicas` reaches `at_least`; fails saying `what`.
pub(crate) async fn wait_for_fleet_metric(
    client: &reqwest::Client,
    replicas: &[&Replica],
    metric: &str,
    at_least: f64,
    what: &str,
) {
    let polled = testkit::poll::until(
        Duration::from_secs(10),
        Duration::from_millis(5),
        || fleet_metric(client, replicas, metric),
        |n| *n >= at_least,
    )
    .await;
    assert!(polled.done, "{what}: {metric} stayed at {}", polled.last);
}

/// The sum over `replicas` of the samples of `metric` whose labels are exactly `labels`.
pub(crate) async fn fleet_sample(
    client: &reqwest::Client,
    replicas: &[&Replica],
    metric: &str,
    labels: &str,
) -> f64 {
    let mut total = 0.0;
    for replica in replicas {
        total += testkit::prom::series(&scrape(client, replica).await, metric)
            .into_iter()
            .filter(|(l, _)| l == labels)
            .map(|(_, v)| v)
            .sum::<f64>();
    }
    total
}

/// `total` concurrent requests for `id`, spread evenly over `replicas`; every status, body and
/// `X-Cache`.
pub(crate) async fn stampede(
    client: &reqwest::Client,
    replicas: &[&Replica],
    id: i64,
    total: usize,
) -> Vec<(u16, String, String)> {
    let requests: Vec<_> = replicas
        .iter()
        .map(|r| r.url.clone())
        .cycle()
        .take(total)
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

pub(crate) fn all_refs(fleet: &[Replica]) -> Vec<&Replica> {
    fleet.iter().collect()
}

#[actix_rt::test]
async fn a_cold_stampede_spread_over_three_replicas_costs_one_query_fleet_wide() {
    let servers = servers::servers();
    let database_url = demo_database_url().await;
    let redis_url = servers.redis_url(servers::next_redis_db());
    // A waiter that is not told looks again after a quarter of the lease period: 1 s here, so
    // a wait the fill notice ended is told apart from one that ran its course, on a machine
    // slow enough to stretch a notice to a few hundred milliseconds.
    let fleet = start_fleet(3, &database_url, &redis_url, &[("LEASE_TTL_MS", "4000")]).await;
    let replicas = all_refs(&fleet);
    let client = reqwest::Client::new();

    for (round, id) in (500..510).enumerate() {
        let queries_before = fleet_metric(&client, &replicas, "db_hits_total").await;
        let claims_before = fleet_metric(&client, &replicas, "lease_claims_total").await;
        // 201 requests at once, 67 per replica.
        let answers = stampede(&client, &replicas, id, 201).await;
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
    // The other replicas waited for the one that loaded, and were told when it filled: most
    // waits end within 0.5 s. Without the notices every wait would last until the waiter looks
    // again on its own, a quarter of the lease period (1 s), unless the load was over first.
    let waits = fleet_metric(&client, &replicas, "lease_wait_seconds_count").await;
    let quick = fleet_sample(
        &client,
        &replicas,
        "lease_wait_seconds_bucket",
        r#"{le="0.5"}"#,
    )
    .await;
    assert!(
        waits >= 10.0,
        "replicas waited on another's lease {waits} times"
    );
    assert!(
        quick >= waits / 2.0,
        "only {quick} of {waits} waits ended within 0.5 s: fill notices are not waking waiters"
    );
}

#[actix_rt::test]
async fn the_lease_notice_subscription_survives_a_quiet_period() {
    let servers = servers::servers();
    let database_url = demo_database_url().await;
    let redis_url = servers.redis_url(servers::next_redis_db());
    let fleet = start_fleet(1, &database_url, &redis_url, &[]).await;
    let client = reqwest::Client::new();
    // Longer than the subscriber's quiet check (5 s), with nothing published: the check must
    // find the subscription alive rather than replace it.
    tokio::time::sleep(Duration::from_secs(7)).await;
    let subscriptions = fleet_metric(&client, &[&fleet[0]], "lease_subscriptions_total").await;
    assert_eq!(
        subscriptions, 1.0,
        "the subscription was replaced while quiet"
    );
}

#[actix_rt::test]
async fn when_the_lease_holder_is_killed_mid_load_the_others_take_over_and_answer_every_request() {
    let servers = servers::servers();
    let direct_url = demo_database_url().await;
    // The holder reaches PostgreSQL through a proxy of its own, which swallows its load; the
    // others through one that makes every load take 0.4 s.
    let (holder_proxy, others_proxy) = (postgres_proxy(), postgres_proxy());
    let urls = [
        via(&holder_proxy, &direct_url),
        via(&others_proxy, &direct_url),
        via(&others_proxy, &direct_url),
    ];
    let redis_url = servers.redis_url(servers::next_redis_db());
    // The default lease period (1 s), a request deadline that leaves room for it and a slow
    // load after it, and a holder whose load never gives up on its own before the kill.
    let env = [
        ("REQUEST_TIMEOUT_MS", "6000"),
        ("LEASE_TTL_MS", "1000"),
        ("DB_QUERY_TIMEOUT_MS", "30000"),
        ("FLIGHT_TIMEOUT_MS", "30000"),
    ];
    let mut fleet = start_fleet_on(&urls, &redis_url, &env).await;
    let client = reqwest::Client::new();
    holder_proxy.set_mode(Mode::Blackhole);
    others_proxy.set_mode(Mode::Latency(Duration::from_millis(200)));
    let id = 777;

    // The holder: the first replica asked claims the lease and starts a load that hangs.
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
    wait_for_redis_key(&redis_url, &format!("template:{{{id}}}:lease")).await;

    // The others wait on it...
    let (holder, rest) = fleet.split_at_mut(1);
    let others = [&rest[0], &rest[1]];
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
    let what = "the other replicas never waited on the lease";
    wait_for_fleet_metric(&client, &others, "lease_waits_total", 2.0, what).await;

    // ...and the holder dies in the middle of its load, before filling anything.
    let mut redis = redis::Client::open(redis_url.as_str())
        .and_then(|c| c.get_connection())
        .expect("redis connection");
    let filled: i64 = redis::cmd("EXISTS")
        .arg(format!("template:{{{id}}}"))
        .query(&mut redis)
        .expect("EXISTS");
    assert_eq!(filled, 0, "the holder's load cannot have finished");
    holder[0].child.kill().expect("SIGKILL the lease holder");
    let killed = Instant::now();
    let _ = holder[0].child.wait();
    let _ = first.await;

    let answers = waiting.await.expect("requests");
    for (status, answered_at) in &answers {
        assert_eq!(*status, 200, "a request failed because a peer died");
        // The lease runs out within 1 s of the kill, and a survivor's load takes 0.4 s: every
        // waiter is answered well inside the 6 s request deadline counted from there.
        assert!(
            answered_at.saturating_duration_since(killed) < Duration::from_secs(6),
            "answered after the deadline"
        );
    }
    let queries = fleet_metric(&client, &others, "db_hits_total").await;
    let takeovers = fleet_metric(&client, &others, "lease_takeovers_total").await;
    assert_eq!(queries, 1.0, "the survivors load the key exactly once");
    assert_eq!(takeovers, 1.0, "one survivor took the lease over");
    holder_proxy.set_mode(Mode::Pass);
}

/// Polls until `key` exists in Redis (a lease was claimed).
async fn wait_for_redis_key(redis_url: &str, key: &str) {
    let redis = redis::Client::open(redis_url).expect("redis url");
    let exists = testkit::poll::until(
        Duration::from_secs(10),
        Duration::from_millis(10),
        || {
            let redis = redis.clone();
            async move {
                let mut conn = redis.get_connection().expect("redis connection");
                redis::cmd("EXISTS")
                    .arg(key)
                    .query::<i64>(&mut conn)
                    .unwrap_or(0)
            }
        },
        |exists| *exists == 1,
    )
    .await;
    assert!(exists.done, "{key} never appeared in Redis");
}

/// GET `/template-details?id=` on `url`: the status and the body's `name`.
pub(crate) async fn name_of(client: &reqwest::Client, url: &str, id: i64) -> (u16, String) {
    let response = client
        .get(format!("{url}/template-details?id={id}"))
        .send()
        .await
        .expect("an answer");
    let status = response.status().as_u16();
    let body: serde_json::Value = response.json().await.unwrap_or_default();
    (status, body["name"].as_str().unwrap_or_default().to_owned())
}

#[actix_rt::test]
async fn a_change_while_another_replica_holds_the_lease_is_never_answered_old_after_it_is_known() {
    use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};

    let servers = servers::servers();
    let direct_url = demo_database_url().await;
    // Replica a is 1 s from PostgreSQL each way: its load's answer, and the change
    // notification, reach it late. Replica b is next to it and learns of the change at once.
    // The return hop is the time this test has to see a's query run, change the row and have b
    // learn of it, so it is long enough for a loaded machine; the timeouts and the lease are
    // long enough for a's load to finish across it.
    let proxy = postgres_proxy();
    let urls = [via(&proxy, &direct_url), direct_url.clone()];
    let redis_url = servers.redis_url(servers::next_redis_db());
    let env = [
        ("DB_QUERY_TIMEOUT_MS", "5000"),
        ("FLIGHT_TIMEOUT_MS", "10000"),
        ("REQUEST_TIMEOUT_MS", "12000"),
        ("LEASE_TTL_MS", "10000"),
    ];
    let fleet = start_fleet_on(&urls, &redis_url, &env).await;
    let client = reqwest::Client::new();
    let (a, b) = (fleet[0].url.clone(), fleet[1].url.clone());
    let (replica_a, replica_b) = ([&fleet[0]], [&fleet[1]]);
    let id = 888;
    let mut conn = AsyncPgConnection::establish(&direct_url)
        .await
        .expect("connect to the test database");
    let marker = database_now(&mut conn).await;
    proxy.set_mode(Mode::Latency(Duration::from_millis(1000)));

    // a claims the lease and sends its query; b waits on a's lease.
    let first = actix_rt::spawn({
        let (client, a) = (client.clone(), a.clone());
        async move { name_of(&client, &a, id).await }
    });
    wait_for_redis_key(&redis_url, &format!("template:{{{id}}}:lease")).await;
    let second = actix_rt::spawn({
        let (client, b) = (client.clone(), b.clone());
        async move { name_of(&client, &b, id).await }
    });
    let what = "replica b never waited on a's lease";
    wait_for_fleet_metric(&client, &replica_b, "lease_waits_total", 1.0, what).await;
    // a's query has run in PostgreSQL (it read the row as it was); its answer is on the way.
    template_query_ran_after(&direct_url, &marker).await;

    // The change: b learns of it at once, a only after its old row has come back.
    diesel::sql_query(format!(
        "UPDATE templates SET name = 'Changed while leased' WHERE id = {id}"
    ))
    .execute(&mut conn)
    .await
    .expect("update the row");
    // From the moment each replica knows, every answer it gives is the new row, however a's
    // fill lands: b first, a once its notification has come through the slow link.
    for (replica, url) in [(&replica_b, &b), (&replica_a, &a)] {
        let what = format!("{url} never learned of the change");
        wait_for_fleet_metric(&client, replica, "invalidations_total", 1.0, &what).await;
        for round in 0..3 {
            let (status, name) = name_of(&client, url, id).await;
            assert_eq!(status, 200, "round {round} on {url}");
            assert_eq!(name, "Changed while leased", "round {round} on {url}");
        }
    }
    // The requests from before the change: a's read the old row; b's joined before b knew.
    let (status, name) = first.await.expect("task");
    assert_eq!(status, 200);
    assert_ne!(
        name, "Changed while leased",
        "a's first load read the row before the change"
    );
    assert_eq!(second.await.expect("task").0, 200);
    // a's fill of the old row was refused in Redis: the key had changed since the claim.
    let refused = fleet_sample(
        &client,
        &replica_a,
        "lease_fills_total",
        r#"{outcome="changed"}"#,
    )
    .await;
    assert_eq!(refused, 1.0, "a's old fill was refused");
    let mut redis = redis::Client::open(redis_url.as_str())
        .and_then(|c| c.get_connection())
        .expect("redis connection");
    let cached: Option<String> = redis::cmd("GET")
        .arg(format!("template:{{{id}}}"))
        .query(&mut redis)
        .expect("GET");
    if let Some(cached) = cached {
        assert!(
            cached.contains("Changed while leased"),
            "Redis holds {cached}"
        );
    }
}

#[derive(diesel::QueryableByName)]
struct Stamp {
    #[diesel(sql_type = diesel::sql_types::Text)]
    t: String,
}

/// PostgreSQL's clock now, as text: a marker for [`template_query_ran_after`].
pub(crate) async fn database_now(conn: &mut diesel_async::AsyncPgConnection) -> String {
    use diesel_async::RunQueryDsl;
    diesel::sql_query("SELECT now()::text AS t")
        .load::<Stamp>(conn)
        .await
        .expect("now()")
        .remove(0)
        .t
}

/// Waits until a backend of the database at `url` has started a template query after
/// `marker` ([`database_now`]): a replica behind a slow link read the row as it was then, and
/// its answer is still on the way.
pub(crate) async fn template_query_ran_after(url: &str, marker: &str) {
    use diesel::sql_types::{BigInt, Text};
    use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};

    #[derive(diesel::QueryableByName)]
    struct Count {
        #[diesel(sql_type = BigInt)]
        n: i64,
    }

    let ran = testkit::poll::until(
        Duration::from_secs(10),
        Duration::from_millis(5),
        || async move {
            let Ok(mut conn) = AsyncPgConnection::establish(url).await else {
                return 0;
            };
            diesel::sql_query(
                "SELECT count(*) AS n FROM pg_stat_activity \
                 WHERE datname = current_database() AND query ILIKE '%FROM \"templates\"%' \
                 AND query NOT ILIKE '%pg_stat_activity%' AND query_start > $1::timestamptz",
            )
            .bind::<Text, _>(marker)
            .load::<Count>(&mut conn)
            .await
            .map_or(0, |rows| rows[0].n)
        },
        |n| *n >= 1,
    )
    .await;
    assert!(
        ran.done,
        "the slow replica's query never reached PostgreSQL"
    );
}

#[actix_rt::test]
async fn with_redis_black_holed_each_replica_coalesces_its_own_requests_and_nothing_fails() {
    let servers = servers::servers();
    let proxy = redis_proxy();
    let database_url = demo_database_url().await;
    let redis_url = via(&proxy, &servers.redis_url(servers::next_redis_db()));
    let env = [("REQUEST_TIMEOUT_MS", "5000")];
    let fleet = start_fleet(3, &database_url, &redis_url, &env).await;
    let replicas = all_refs(&fleet);
    let client = reqwest::Client::new();
    proxy.set_mode(Mode::Blackhole);

    let queries_before = fleet_metric(&client, &replicas, "db_hits_total").await;
    let answers = stampede(&client, &replicas, 321, 120).await;
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

/// The figures in BENCHMARKS.md §9: queries per cold burst for 1, 3 and 5 replicas with the lease
/// on and off; what the lease adds to a miss; refreshes per soft expiry across three replicas.
/// A measurement, not a test: run it with
/// `cargo test --release --test api -- --ignored --nocapture fleet_figures`.
#[actix_rt::test]
#[ignore = "a benchmark: prints figures for BENCHMARKS.md"]
async fn fleet_figures() {
    let servers = servers::servers();
    let client = reqwest::Client::new();
    let mut next_id = 100;

    println!("Cold bursts: 10 rounds of 201 simultaneous requests for one cold id, spread evenly.");
    println!("| replicas | lease | queries per round | rounds costing 1 query | answered 200 |");
    println!("|---|---|---|---|---|");
    for n in [1, 3, 5] {
        for lease in ["1000", "0"] {
            let database_url = demo_database_url().await;
            let redis_url = servers.redis_url(servers::next_redis_db());
            let env = [("LEASE_TTL_MS", lease)];
            let fleet = start_fleet(n, &database_url, &redis_url, &env).await;
            let replicas = all_refs(&fleet);
            let (mut per_round, mut ok) = (Vec::new(), 0);
            for _ in 0..10 {
                next_id += 1;
                let before = fleet_metric(&client, &replicas, "db_hits_total").await;
                let answers = stampede(&client, &replicas, next_id, 201).await;
                ok += answers
                    .iter()
                    .filter(|(status, _, _)| *status == 200)
                    .count();
                let after = fleet_metric(&client, &replicas, "db_hits_total").await;
                per_round.push(after - before);
            }
            let ones = per_round.iter().filter(|q| **q == 1.0).count();
            let shown: Vec<String> = per_round.iter().map(|q| q.to_string()).collect();
            let state = if lease == "0" { "off" } else { "on" };
            println!(
                "| {n} | {state} | {} | {ones}/10 | {ok}/2010 |",
                shown.join(" ")
            );
        }
    }

    println!();
    println!("A miss's latency: one replica, 300 cold ids asked one at a time, alternated 3 runs.");
    println!("| run | lease | median | p90 | p99 |");
    println!("|---|---|---|---|---|");
    for run in 1..=3 {
        for lease in ["1000", "0"] {
            let database_url = demo_database_url().await;
            let redis_url = servers.redis_url(servers::next_redis_db());
            let fleet = start_fleet(1, &database_url, &redis_url, &[("LEASE_TTL_MS", lease)]).await;
            let mut took = Vec::new();
            for id in 1..=300 {
                let started = Instant::now();
                let response = client
                    .get(format!("{}/template-details?id={id}", fleet[0].url))
                    .send()
                    .await
                    .expect("an answer");
                assert_eq!(response.status(), 200);
                took.push(started.elapsed());
            }
            took.sort();
            let at = |q: f64| took[((took.len() as f64 * q) as usize).min(took.len() - 1)];
            let state = if lease == "0" { "off" } else { "on" };
            println!(
                "| {run} | {state} | {:.2} ms | {:.2} ms | {:.2} ms |",
                at(0.5).as_secs_f64() * 1e3,
                at(0.9).as_secs_f64() * 1e3,
                at(0.99).as_secs_f64() * 1e3
            );
        }
    }

    println!();
    println!(
        "Refresh-ahead across 3 replicas: 10 hot ids, CACHE_TTL_SECS=1, no jitter, 16 clients \
         for 10 s."
    );
    println!(
        "| lease | requests | refreshes | refreshes per id per second | DB queries | not 200 |"
    );
    println!("|---|---|---|---|---|---|");
    for lease in ["1000", "0"] {
        let database_url = demo_database_url().await;
        let redis_url = servers.redis_url(servers::next_redis_db());
        let env = [
            ("LEASE_TTL_MS", lease),
            ("CACHE_TTL_SECS", "1"),
            ("TTL_JITTER_PCT", "0"),
        ];
        let fleet = start_fleet(3, &database_url, &redis_url, &env).await;
        let replicas = all_refs(&fleet);
        // Every id cached once before the clock starts.
        for id in 1..=10 {
            let url = &replicas[0].url;
            let _ = client
                .get(format!("{url}/template-details?id={id}"))
                .send()
                .await;
        }
        let refreshes_before = fleet_metric(&client, &replicas, "refreshes_total").await;
        let queries_before = fleet_metric(&client, &replicas, "db_hits_total").await;
        let until = Instant::now() + Duration::from_secs(10);
        let clients: Vec<_> = (0..16)
            .map(|c| {
                let urls: Vec<String> = replicas.iter().map(|r| r.url.clone()).collect();
                let client = client.clone();
                actix_rt::spawn(async move {
                    let (mut requests, mut failed) = (0, 0);
                    let mut i = c;
                    while Instant::now() < until {
                        let url = &urls[i % urls.len()];
                        let id = 1 + (i % 10) as i64;
                        let ok = client
                            .get(format!("{url}/template-details?id={id}"))
                            .send()
                            .await
                            .is_ok_and(|r| r.status() == 200);
                        requests += 1;
                        failed += usize::from(!ok);
                        i += 1;
                    }
                    (requests, failed)
                })
            })
            .collect();
        let (mut requests, mut failed) = (0, 0);
        for c in clients {
            let (r, f) = c.await.expect("client task");
            requests += r;
            failed += f;
        }
        let refreshes =
            fleet_metric(&client, &replicas, "refreshes_total").await - refreshes_before;
        let queries = fleet_metric(&client, &replicas, "db_hits_total").await - queries_before;
        let state = if lease == "0" { "off" } else { "on" };
        println!(
            "| {state} | {requests} | {refreshes} | {:.2} | {queries} | {failed} |",
            refreshes / 10.0 / 10.0
        );
    }
}
