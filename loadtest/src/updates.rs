//! `--updates N`: while the load runs, change N templates in PostgreSQL (evenly spaced over the
//! run) and measure how long each change takes to be served.
//!
//! Each change sets a template's `updated_at` to the database's clock (the row is otherwise left
//! as it was, so a run does not rewrite the data) and takes the new value from `RETURNING`. From
//! the moment the `UPDATE` has committed, the template is polled through the service every few
//! milliseconds until its body shows that `updated_at`: that wait is the change's visibility
//! latency. With several `--url`s (replicas) each one is polled in turn until it too shows the
//! change, so the latency is until the whole fleet serves it. A change not seen within
//! [`GIVE_UP`] is counted as such, never as a latency.

use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use diesel::sql_types::{BigInt, Timestamptz};
use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};
use rand::rngs::SmallRng;
use rand::{RngExt, SeedableRng};

use crate::client::template_url;
use crate::LoadtestError;

/// Longest a change is polled for.
pub const GIVE_UP: Duration = Duration::from_secs(10);
/// Pause between polls of one change.
const POLL_EVERY: Duration = Duration::from_millis(5);

/// What the updates showed.
#[derive(Debug, Default)]
pub struct Visibility {
    /// From commit to first answer showing the change, one per change seen.
    pub delays: Vec<Duration>,
    /// Changes not served within [`GIVE_UP`].
    pub not_seen: u32,
}

#[derive(diesel::QueryableByName)]
struct Stamp {
    #[diesel(sql_type = Timestamptz)]
    updated_at: DateTime<Utc>,
}

/// Makes `count` changes to ids drawn uniformly from `ids`, spaced evenly over `duration`.
pub async fn run(
    client: &reqwest::Client,
    targets: &[String],
    database_url: &str,
    ids: std::ops::RangeInclusive<i64>,
    count: u32,
    duration: Duration,
    rng_seed: u64,
) -> Result<Visibility, LoadtestError> {
    let db_error = |reason: String| LoadtestError::Database {
        url: database_url.to_owned(),
        reason,
    };
    let mut conn = tokio::time::timeout(
        Duration::from_secs(5),
        AsyncPgConnection::establish(database_url),
    )
    .await
    .map_err(|_| db_error("connecting took longer than 5 s".to_owned()))?
    .map_err(|e| db_error(e.to_string()))?;
    let mut rng = SmallRng::seed_from_u64(rng_seed ^ 0x5EED_u64);
    let started = Instant::now();
    let mut visibility = Visibility::default();
    for k in 0..count {
        let due = started + duration.mul_f64(k as f64 / count as f64);
        tokio::time::sleep_until(due.into()).await;
        let id = rng.random_range(ids.clone());
        let stamps: Vec<Stamp> = diesel::sql_query(
            "UPDATE templates SET updated_at = clock_timestamp() WHERE id = $1 RETURNING updated_at",
        )
        .bind::<BigInt, _>(id)
        .load(&mut conn)
        .await
        .map_err(|e| db_error(e.to_string()))?;
        let Some(stamp) = stamps.into_iter().next() else {
            return Err(db_error(format!(
                "template {id} does not exist; --updates changes ids the run requests, which must exist"
            )));
        };
        let committed = Instant::now();
        let deadline = Instant::now() + GIVE_UP;
        let mut seen_by_all = true;
        for base in targets {
            if seen_after(client, base, id, stamp.updated_at, deadline)
                .await
                .is_none()
            {
                seen_by_all = false;
                break;
            }
        }
        if seen_by_all {
            visibility.delays.push(committed.elapsed());
        } else {
            visibility.not_seen += 1;
        }
    }
    Ok(visibility)
}

/// Polls template `id` at `base` until its `updated_at` is at least `stamp`; `None` once
/// `deadline` has passed.
async fn seen_after(
    client: &reqwest::Client,
    base: &str,
    id: i64,
    stamp: DateTime<Utc>,
    deadline: Instant,
) -> Option<()> {
    let url = template_url(base, id);
    while Instant::now() < deadline {
        if let Ok(response) = client.get(&url).send().await {
            if let Ok(body) = response.bytes().await {
                let served = serde_json::from_slice::<serde_json::Value>(&body)
                    .ok()
                    .and_then(|v| v.get("updated_at")?.as_str().map(str::to_owned))
                    .and_then(|s| DateTime::parse_from_rfc3339(&s).ok());
                if served.is_some_and(|served| served >= stamp) {
                    return Some(());
                }
            }
        }
        tokio::time::sleep(POLL_EVERY).await;
    }
    None
}
