//! Against a real 3-master Redis Cluster (the test kit's, shared by the process; each test keeps
//! to its own `CACHE_KEY_PREFIX`): replicas each given one node find the cluster, a cold
//! stampede over them costs one query, and a slot migrated under load fails no request.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use singleflight::actors::cache::Keys;
use testkit::redis_topologies::redis_cluster;

use crate::fleet::{
    all_refs, fleet_metric, fleet_sample, name_of, stampede, start_each, wait_for_fleet_metric,
};
use crate::loadtest::{loadtest, number, report_of};
use crate::support::{demo_database_url, header};

/// Per-replica environment: replica i is given node i of the cluster only.
fn one_node_each(prefix: &str) -> Vec<(String, Vec<(String, String)>)> {
    redis_cluster()
        .ports
        .iter()
        .map(|port| {
            let env = vec![
                ("REDIS_URL".to_owned(), format!("redis://127.0.0.1:{port}")),
                ("CACHE_KEY_PREFIX".to_owned(), prefix.to_owned()),
            ];
            (String::new(), env)
        })
        .collect()
}

#[actix_rt::test]
async fn a_cold_stampede_over_three_replicas_each_given_one_node_costs_one_query() {
    let cluster = redis_cluster();
    let database_url = demo_database_url().await;
    let prefix = "cold-stampede:";
    let mut each = one_node_each(prefix);
    for (url, _) in &mut each {
        url.clone_from(&database_url);
    }
    // As in the single-Redis stampede test: a waiter not told looks again after 1 s.
    let fleet = start_each(&each, &cluster.seed_url(), &[("LEASE_TTL_MS", "4000")]).await;
    let replicas = all_refs(&fleet);
    let client = reqwest::Client::new();
    // Each replica has subscribed to every slot's channel (16,384 of them) before the first
    // round: a notice published before then would reach no one.
    for replica in &replicas {
        let one = [*replica];
        let what = "a replica subscribed to the lease notices";
        wait_for_fleet_metric(&client, &one, "lease_subscriptions_total", 1.0, what).await;
    }

    for (round, id) in (500..510).enumerate() {
        let queries_before = fleet_metric(&client, &replicas, "db_hits_total").await;
        let claims_before = fleet_metric(&client, &replicas, "lease_claims_total").await;
        let answers = stampede(&client, &replicas, id, 120).await;
        let body = &answers[0].1;
        for (status, text, _) in &answers {
            assert_eq!(*status, 200, "round {round}: {text}");
            assert_eq!(text, body, "round {round}: one template");
        }
        let queries = fleet_metric(&client, &replicas, "db_hits_total").await - queries_before;
        let claims = fleet_metric(&client, &replicas, "lease_claims_total").await - claims_before;
        assert_eq!(queries, 1.0, "round {round}: queries for one cold id");
        assert_eq!(claims, 1.0, "round {round}: leases claimed for one cold id");
    }
    // Fill notices reach the waiters through the slots' shard channels: most waits end well
    // before the waiter would look again on its own (1 s).
    let waits = fleet_metric(&client, &replicas, "lease_wait_seconds_count").await;
    let quick = fleet_sample(
        &client,
        &replicas,
        "lease_wait_seconds_bucket",
        r#"{le="0.5"}"#,
    )
    .await;
    assert!(waits >= 10.0, "replicas waited {waits} times");
    assert!(
        quick >= waits / 2.0,
        "only {quick} of {waits} waits ended within 0.5 s: notices are not arriving"
    );
    assert_eq!(
        fleet_metric(&client, &replicas, "redis_errors_total").await,
        0.0,
        "no Redis call failed (no MOVED reached the service)"
    );

    // Every key lives where the cluster puts it, whichever node a replica was given: a second
    // request is a hit on every replica, and the keys of 30 ids are spread over the masters.
    for replica in &replicas {
        let response = client
            .get(format!("{}/template-details?id=500", replica.url))
            .send()
            .await
            .expect("an answer");
        assert_eq!(response.status(), 200);
        assert_eq!(header(&response, "x-cache"), "HIT", "{}", replica.url);
    }
    for id in 600..630 {
        let (status, _) = name_of(&client, &replicas[id as usize % 3].url, id).await;
        assert_eq!(status, 200);
    }
    let keys = Keys::new(prefix);
    let mut per_node = vec![0; cluster.ports.len()];
    for id in 600..630 {
        let key = keys.value(id);
        let owner = cluster.slot_owner(cluster.keyslot(&key));
        let exists = cluster
            .command_for_key(&key, &["EXISTS", &key])
            .expect("EXISTS");
        assert_eq!(exists, "1", "{key} is on its slot's node ({owner})");
        for lease_or_gen in [keys.lease(id), keys.generation(id)] {
            assert_eq!(
                cluster.keyslot(&lease_or_gen),
                cluster.keyslot(&key),
                "one hash tag"
            );
        }
        per_node[cluster.ports.iter().position(|p| *p == owner).unwrap()] += 1;
    }
    assert!(
        per_node.iter().all(|n| *n > 0),
        "30 ids on every master: {per_node:?}"
    );
}

#[actix_rt::test]
async fn a_slot_migrated_under_load_fails_no_request() {
    let cluster = redis_cluster();
    let database_url = demo_database_url().await;
    let prefix = "migrating:";
    // Two replicas, on two different nodes; every request reads Redis (no near or worker cache).
    let mut each = one_node_each(prefix);
    each.truncate(2);
    for (url, _) in &mut each {
        url.clone_from(&database_url);
    }
    let env = [("NEAR_CACHE_TTL_MS", "0"), ("WORKER_CACHE_CAPACITY", "0")];
    let fleet = start_each(&each, &cluster.seed_url(), &env).await;
    let client = reqwest::Client::new();
    let urls: Vec<String> = fleet.iter().map(|r| r.url.clone()).collect();

    let id = 321;
    let key = Keys::new(prefix).value(id);
    assert_eq!(name_of(&client, &urls[0], id).await.0, 200);
    let slot = cluster.keyslot(&key);
    let from = cluster.slot_owner(slot);
    let to = *cluster.ports.iter().find(|p| **p != from).unwrap();

    // Load on the migrating key and on cold ids elsewhere, from both replicas, throughout.
    let stop = Arc::new(AtomicBool::new(false));
    let answered = Arc::new(AtomicUsize::new(0));
    let mut load = Vec::new();
    for worker in 0..8usize {
        let (client, urls) = (client.clone(), urls.clone());
        let (stop, answered) = (stop.clone(), answered.clone());
        load.push(actix_rt::spawn(async move {
            let mut failures = Vec::new();
            let mut n = 0i64;
            while !stop.load(Ordering::Relaxed) {
                let target = if n % 2 == 0 {
                    id
                } else {
                    700 + worker as i64 * 50 + n % 50
                };
                let (status, _) = name_of(&client, &urls[worker % 2], target).await;
                if status != 200 {
                    failures.push((target, status));
                }
                answered.fetch_add(1, Ordering::Relaxed);
                n += 1;
            }
            failures
        }));
    }
    let before = Instant::now();
    while answered.load(Ordering::Relaxed) < 200 {
        assert!(before.elapsed() < Duration::from_secs(10), "no load");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let migrated = tokio::task::spawn_blocking(move || redis_cluster().migrate_slot(slot, to))
        .await
        .expect("migration task");
    migrated.expect("the slot migrated");
    let after_migration = answered.load(Ordering::Relaxed);
    while answered.load(Ordering::Relaxed) < after_migration + 200 {
        assert!(before.elapsed() < Duration::from_secs(20), "load stopped");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    stop.store(true, Ordering::Relaxed);
    let mut failures = Vec::new();
    for task in load {
        failures.extend(task.await.expect("load task"));
    }
    assert_eq!(failures, Vec::new(), "requests that failed");
    assert_eq!(cluster.slot_owner(slot), to, "the slot moved");

    // The key is served from its new node: a hit, where the cluster now keeps it.
    for url in &urls {
        let response = client
            .get(format!("{url}/template-details?id={id}"))
            .send()
            .await
            .expect("an answer");
        assert_eq!(response.status(), 200);
        assert_eq!(header(&response, "x-cache"), "HIT", "{url}");
    }
    assert_eq!(
        cluster
            .command_for_key(&key, &["EXISTS", &key])
            .expect("EXISTS"),
        "1"
    );
}

/// Figures for BENCHMARKS.md §16: cold bursts over three replicas and a miss's latency, on one
/// Redis and on the cluster, alternated in one run.
#[actix_rt::test]
#[ignore = "a benchmark: prints figures for BENCHMARKS.md"]
async fn cluster_figures() {
    use crate::support::servers;
    let client = reqwest::Client::new();
    let mut next_id = 100;
    let redis_of = |topology: &str, prefix: &str| -> Vec<(String, Vec<(String, String)>)> {
        match topology {
            "cluster" => one_node_each(prefix),
            _ => {
                let url = servers::servers().redis_url(servers::next_redis_db());
                (0..3)
                    .map(|_| (String::new(), vec![("REDIS_URL".to_owned(), url.clone())]))
                    .collect()
            }
        }
    };

    println!("Cold bursts: 3 replicas, 10 rounds of 201 simultaneous requests for one cold id.");
    println!(
        "| run | Redis | queries per round | burst time, median | burst time, max | answered 200 |"
    );
    println!("|---|---|---|---|---|---|");
    for run in 1..=3 {
        for topology in ["single", "cluster"] {
            let database_url = demo_database_url().await;
            let mut each = redis_of(topology, &format!("burst-{run}:"));
            for (url, _) in &mut each {
                url.clone_from(&database_url);
            }
            let fleet = start_each(&each, "redis://unused:1", &[]).await;
            let replicas = all_refs(&fleet);
            let (mut queries, mut took, mut ok) = (Vec::new(), Vec::new(), 0);
            for _ in 0..10 {
                next_id += 1;
                let before = fleet_metric(&client, &replicas, "db_hits_total").await;
                let started = Instant::now();
                let answers = stampede(&client, &replicas, next_id, 201).await;
                took.push(started.elapsed());
                ok += answers.iter().filter(|(s, _, _)| *s == 200).count();
                queries.push(fleet_metric(&client, &replicas, "db_hits_total").await - before);
            }
            took.sort();
            let shown: Vec<String> = queries.iter().map(|q| q.to_string()).collect();
            println!(
                "| {run} | {topology} | {} | {:.1} ms | {:.1} ms | {ok}/2010 |",
                shown.join(" "),
                took[5].as_secs_f64() * 1e3,
                took[9].as_secs_f64() * 1e3
            );
        }
    }

    println!();
    println!("A miss's latency: one replica, 300 cold ids asked one at a time, then the same 300 as hits from Redis (near cache off).");
    println!("| run | Redis | miss median | miss p99 | Redis hit median | Redis hit p99 |");
    println!("|---|---|---|---|---|---|");
    for run in 1..=3 {
        for topology in ["single", "cluster"] {
            let database_url = demo_database_url().await;
            let mut each = redis_of(topology, &format!("miss-{run}:"));
            each.truncate(1);
            each[0].0.clone_from(&database_url);
            let env = [("NEAR_CACHE_TTL_MS", "0"), ("WORKER_CACHE_CAPACITY", "0")];
            let fleet = start_each(&each, "redis://unused:1", &env).await;
            let mut timings = [Vec::new(), Vec::new()];
            for pass in &mut timings {
                for id in 1..=300 {
                    let started = Instant::now();
                    let (status, _) = name_of(&client, &fleet[0].url, id).await;
                    assert_eq!(status, 200);
                    pass.push(started.elapsed());
                }
                pass.sort();
            }
            let at =
                |t: &Vec<Duration>, q: f64| t[((t.len() as f64 * q) as usize).min(t.len() - 1)];
            println!(
                "| {run} | {topology} | {:.2} ms | {:.2} ms | {:.2} ms | {:.2} ms |",
                at(&timings[0], 0.5).as_secs_f64() * 1e3,
                at(&timings[0], 0.99).as_secs_f64() * 1e3,
                at(&timings[1], 0.5).as_secs_f64() * 1e3,
                at(&timings[1], 0.99).as_secs_f64() * 1e3
            );
        }
    }
}

#[actix_rt::test]
async fn the_load_generator_evicts_each_rounds_key_on_the_node_that_holds_it() {
    let cluster = redis_cluster();
    let prefix = "loadtest-evict:";
    let app = crate::support::spawn_app_with(|s| {
        s.redis_url = format!("redis://127.0.0.1:{}", cluster.ports[0]);
        s.cache_key_prefix = prefix.to_owned();
        // Redis is the only cache: what the eviction removes is gone.
        s.near_cache_ttl = Duration::ZERO;
        s.worker_cache_capacity = 0;
    })
    .await;
    // Twice the same rounds (same seed, so the same ids): the second run finds every key cached
    // unless its eviction reached the node of the key's slot, whichever node it was given.
    let node = format!("redis://127.0.0.1:{}", cluster.ports[1]);
    let args = [
        "stampede",
        "--url",
        &app.address,
        "--rounds",
        "6",
        "--concurrency",
        "10",
        "--seed",
        "7",
        "--redis-url",
        &node,
        "--cache-key-prefix",
        prefix,
        "--json",
    ];
    let keys = Keys::new(prefix);
    let mut nodes = std::collections::HashSet::new();
    for run in 1..=2 {
        let report = report_of(&loadtest(&args).await);
        let rounds = report["rounds"].as_array().expect("a rounds array");
        assert_eq!(rounds.len(), 6, "run {run}");
        for round in rounds {
            assert_eq!(round["evicted"], true, "run {run}: {round}");
            assert_eq!(number(round, &["db_queries"]), 1.0, "run {run}: {round}");
            let id = round["id"].as_i64().expect("a round's id");
            nodes.insert(cluster.slot_owner(cluster.keyslot(&keys.value(id))));
        }
        assert_eq!(report["notes"], serde_json::json!([]), "run {run}");
    }
    assert!(
        nodes.len() > 1,
        "the rounds' keys live on more than one node"
    );
}
