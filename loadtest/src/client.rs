//! The HTTP side: one pooled keep-alive client, one timed request, and `/metrics` scrapes.

use std::time::{Duration, Instant};

use reqwest::Client;

use crate::prom::{FleetSnapshot, Snapshot};
use crate::tally::{Failure, Outcome, Sample, XCache};
use crate::LoadtestError;

/// Longest wait for a `/metrics` scrape (it is small and served without touching a backend).
const SCRAPE_TIMEOUT: Duration = Duration::from_secs(5);

/// A client that keeps every connection it opened (the scenarios need up to `--concurrency` at
/// once), never goes through a proxy (the service is local), and gives up on a response after
/// `timeout`.
pub fn build(timeout: Duration) -> Result<Client, LoadtestError> {
    Client::builder()
        .no_proxy()
        .http1_only()
        .tcp_nodelay(true)
        .pool_max_idle_per_host(usize::MAX)
        .connect_timeout(timeout.min(Duration::from_secs(5)))
        .timeout(timeout)
        .build()
        .map_err(|e| LoadtestError::Client(chain(&e)))
}

pub fn template_url(base: &str, id: i64) -> String {
    format!("{base}/template-details?id={id}")
}

/// One `GET`, timed from sending to the last byte of the body.
pub async fn get(client: &Client, url: &str, id: i64) -> Sample {
    let started = Instant::now();
    let outcome = match client.get(url).send().await {
        Ok(response) => {
            let status = response.status().as_u16();
            let x_cache =
                XCache::from_header(response.headers().get("x-cache").map(|v| v.as_bytes()));
            match response.bytes().await {
                Ok(_) => Outcome::Response { status, x_cache },
                Err(e) => Outcome::Failed(failure(&e)),
            }
        }
        Err(e) => Outcome::Failed(failure(&e)),
    };
    Sample {
        id,
        latency: started.elapsed(),
        outcome,
    }
}

fn failure(e: &reqwest::Error) -> Failure {
    if e.is_timeout() {
        Failure::Timeout
    } else if e.is_connect() {
        Failure::Connect
    } else {
        Failure::Other
    }
}

/// Scrapes `/metrics` and reads the report's counters from it.
pub async fn snapshot(
    client: &Client,
    base: &str,
    before_run: bool,
) -> Result<Snapshot, LoadtestError> {
    let url = format!("{base}/metrics");
    let response = client
        .get(&url)
        .timeout(SCRAPE_TIMEOUT)
        .send()
        .await
        .map_err(|e| LoadtestError::Unreachable {
            url: url.clone(),
            reason: chain(&e),
        })?;
    let status = response.status();
    if !status.is_success() {
        return Err(LoadtestError::MetricsStatus {
            url,
            status: status.as_u16(),
        });
    }
    let text = response
        .text()
        .await
        .map_err(|e| LoadtestError::Unreachable {
            url: url.clone(),
            reason: chain(&e),
        })?;
    Snapshot::parse(&text, base, before_run)
}

/// Scrapes every replica in `bases` at once, so that the snapshot is of one moment as nearly as
/// can be. The first replica that fails is the error.
pub async fn snapshot_fleet(
    client: &Client,
    bases: &[String],
    before_run: bool,
) -> Result<FleetSnapshot, LoadtestError> {
    let scrapes: Vec<_> = bases
        .iter()
        .map(|base| {
            let (client, base) = (client.clone(), base.clone());
            tokio::spawn(async move { snapshot(&client, &base, before_run).await })
        })
        .collect();
    let mut fleet = Vec::with_capacity(bases.len());
    for (base, scrape) in bases.iter().zip(scrapes) {
        let snapshot = scrape
            .await
            .map_err(|e| LoadtestError::Task(e.to_string()))??;
        fleet.push((base.clone(), snapshot));
    }
    Ok(FleetSnapshot(fleet))
}

/// Opens `n` keep-alive connections (with `GET /healthz`), so that a following burst of `n`
/// requests goes out at once instead of waiting on `n` TCP handshakes.
pub async fn open_connections(client: &Client, base: &str, n: usize) -> Result<(), LoadtestError> {
    let url = format!("{base}/healthz");
    let mut requests = tokio::task::JoinSet::new();
    for _ in 0..n {
        let (client, url) = (client.clone(), url.clone());
        requests.spawn(async move { client.get(&url).send().await?.bytes().await });
    }
    while let Some(done) = requests.join_next().await {
        match done {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                return Err(LoadtestError::Unreachable {
                    url,
                    reason: chain(&e),
                })
            }
            Err(e) => return Err(LoadtestError::Task(e.to_string())),
        }
    }
    Ok(())
}

/// An error with its causes, e.g. "error sending request for url (...): client error (Connect):
/// tcp connect error: Connection refused (os error 111)".
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let s = cause.to_string();
        if !text.contains(&s) {
            text.push_str(": ");
            text.push_str(&s);
        }
        source = cause.source();
    }
    text
}
