//! The real binary stops gracefully on SIGTERM and SIGINT: it stops accepting, finishes what is
//! in flight — here, loads from a PostgreSQL 500 ms away — and exits 0.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::faults::{postgres_proxy, via};
use crate::support::fault_proxy::Mode;
use crate::support::{ports, servers, sum_metric, wait_for_warm_pool, KillOnDrop};

/// Requests in flight when the signal arrives.
const IN_FLIGHT: usize = 50;

fn free_port() -> u16 {
    ports::free_port().expect("a free port")
}

#[actix_rt::test]
async fn the_binary_finishes_requests_in_flight_and_exits_cleanly_on_sigterm_and_sigint() {
    let servers = servers::servers();
    for (round, signal) in ["TERM", "INT"].into_iter().enumerate() {
        let port = free_port();
        let proxy = postgres_proxy();
        // Loads take 1 s (two 0.5 s hops), long enough for all the requests to arrive while the
        // first is still loading, on a loaded machine too.
        let (mut child, client, url) = start_ready(
            port,
            &via(&proxy, &servers.pg_url("postgres")),
            &[
                ("DB_QUERY_TIMEOUT_MS", "5000"),
                ("FLIGHT_TIMEOUT_MS", "8000"),
                ("REQUEST_TIMEOUT_MS", "8000"),
            ],
        )
        .await;
        // Every pooled connection open before the network turns slow, as after any idle period.
        wait_for_warm_pool(&client, &url, 10.0).await;
        proxy.set_mode(Mode::Latency(Duration::from_millis(500)));

        let first_id = 100 + (round * IN_FLIGHT) as i64;
        let requests: Vec<_> = (first_id..first_id + IN_FLIGHT as i64)
            .map(|id| {
                let (client, url) = (client.clone(), url.clone());
                actix_rt::spawn(async move {
                    let response = client
                        .get(format!("{url}/template-details?id={id}"))
                        .send()
                        .await?;
                    Ok::<_, reqwest::Error>(response.status().as_u16())
                })
            })
            .collect();
        let started = Instant::now();
        loop {
            let text = client
                .get(format!("{url}/metrics"))
                .send()
                .await
                .expect("scrape")
                .text()
                .await
                .expect("metrics text");
            if sum_metric(&text, "http_in_flight_requests") >= IN_FLIGHT as f64 {
                break;
            }
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "the requests never were in flight together"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }

        let status = Command::new("kill")
            .args([&format!("-{signal}"), &child.0.id().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success());
        let mut statuses = Vec::new();
        for request in requests {
            statuses.push(request.await.expect("joined").map_err(|e| e.to_string()));
        }
        let ok = statuses.iter().filter(|s| **s == Ok(200)).count();
        assert_eq!(
            ok, IN_FLIGHT,
            "SIG{signal}: requests in flight were not all finished: {statuses:?}"
        );

        let deadline = Instant::now() + Duration::from_secs(15);
        let exit = loop {
            if let Some(exit) = child.0.try_wait().expect("wait for the service") {
                break exit;
            }
            if Instant::now() > deadline {
                let _ = child.0.kill();
                panic!("SIG{signal}: the service did not stop within 15 s");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        assert!(exit.success(), "SIG{signal}: exit status {exit}");
        assert!(
            client.get(format!("{url}/healthz")).send().await.is_err(),
            "no longer listening"
        );
    }
}

/// The service started as a process on `port` over `database_url` (its schema and demo
/// templates loaded), on a Redis keyspace of its own (every id cold), ready, with `extra`
/// settings.
async fn start_ready(
    port: u16,
    database_url: &str,
    extra: &[(&str, &str)],
) -> (KillOnDrop, reqwest::Client, String) {
    let servers = servers::servers();
    crate::support::seed_demo(&servers.pg_url("postgres")).await;
    let child = KillOnDrop(
        Command::new(env!("CARGO_BIN_EXE_singleflight"))
            .env("HTTP_ADDR", format!("127.0.0.1:{port}"))
            .env("DATABASE_URL", database_url)
            .env("REDIS_URL", servers.redis_url(servers::next_redis_db()))
            .env("RUST_LOG", "warn")
            .envs(extra.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start the service binary"),
    );
    let client = reqwest::Client::new();
    let url = format!("http://127.0.0.1:{port}");
    let started = Instant::now();
    while !matches!(client.get(format!("{url}/readyz")).send().await, Ok(r) if r.status() == 200) {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the service did not become ready"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    (child, client, url)
}

/// Template 3: the status and the `Connection` header of its answer.
async fn template_3(client: &reqwest::Client, url: &str) -> (u16, Option<String>) {
    let answer = client
        .get(format!("{url}/template-details?id=3"))
        .send()
        .await
        .expect("answered");
    let connection = answer.headers().get("connection");
    let connection = connection.and_then(|v| v.to_str().ok()).map(str::to_owned);
    (answer.status().as_u16(), connection)
}

/// Polls `/readyz` (up to 10 s) until it answers 503 `draining`: the signal was taken.
async fn until_draining(client: &reqwest::Client, url: &str) {
    let started = Instant::now();
    loop {
        if let Ok(r) = client.get(format!("{url}/readyz")).send().await {
            if r.status() == 503 {
                return;
            }
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "/readyz never answered 503 after SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn signal(child: &KillOnDrop, signal: &str) {
    let status = Command::new("kill")
        .args([&format!("-{signal}"), &child.0.id().to_string()])
        .status()
        .expect("run kill");
    assert!(status.success());
}

/// Waits up to `within` for the process to exit: its status, and how long it took.
async fn exit_within(
    child: &mut KillOnDrop,
    within: Duration,
) -> (std::process::ExitStatus, Duration) {
    let started = Instant::now();
    loop {
        if let Some(exit) = child.0.try_wait().expect("wait for the service") {
            return (exit, started.elapsed());
        }
        assert!(
            started.elapsed() < within,
            "the service did not stop within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// SIGTERM first drains: `/readyz` answers 503 `draining` while requests are still answered,
/// each with `Connection: close`, for `SHUTDOWN_DRAIN_MS`; then the service stops and exits 0.
#[actix_rt::test]
async fn sigterm_drains_readiness_first_and_closes_keep_alive_connections_then_exits_cleanly() {
    let port = free_port();
    let (mut child, client, url) = start_ready(
        port,
        &servers::servers().pg_url("postgres"),
        &[("SHUTDOWN_DRAIN_MS", "2000")],
    )
    .await;
    let (status, connection) = template_3(&client, &url).await;
    assert_eq!(status, 200);
    assert_ne!(
        connection.as_deref(),
        Some("close"),
        "not draining yet: the connection is kept"
    );

    signal(&child, "TERM");
    until_draining(&client, &url).await;
    let ready = client
        .get(format!("{url}/readyz"))
        .send()
        .await
        .expect("still serving");
    assert_eq!(ready.status(), 503);
    let body: serde_json::Value = ready.json().await.expect("JSON");
    assert_eq!(body["status"], "draining", "{body}");
    let (status, connection) = template_3(&client, &url).await;
    assert_eq!(status, 200, "still served while draining");
    assert_eq!(
        connection.as_deref(),
        Some("close"),
        "a draining answer ends its keep-alive connection"
    );
    assert!(
        child.0.try_wait().expect("wait").is_none(),
        "still running while draining"
    );

    let (exit, took) = exit_within(&mut child, Duration::from_secs(15)).await;
    assert!(exit.success(), "exit status {exit}");
    assert!(
        took >= Duration::from_millis(1500),
        "drained first: stopped after {took:?}"
    );
    assert!(
        client.get(format!("{url}/healthz")).send().await.is_err(),
        "no longer listening"
    );
}

/// A second signal during the drain stops the service at once.
#[actix_rt::test]
async fn a_second_signal_stops_at_once() {
    let port = free_port();
    let (mut child, client, url) = start_ready(
        port,
        &servers::servers().pg_url("postgres"),
        &[("SHUTDOWN_DRAIN_MS", "30000")],
    )
    .await;
    signal(&child, "TERM");
    until_draining(&client, &url).await;
    signal(&child, "INT");
    let (_, took) = exit_within(&mut child, Duration::from_secs(10)).await;
    assert!(took < Duration::from_secs(10), "stopped after {took:?}");
}
