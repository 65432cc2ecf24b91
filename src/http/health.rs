//! `/healthz` (liveness) and `/readyz` (readiness).
//!
//! Readiness says whether *this replica* can answer, not whether PostgreSQL or Redis are up.
//! `/readyz` answers `503` while one of the replica's own parts is gone: a key owner that does
//! not answer (each runs under a supervisor, so one that stopped is restarted; one that cannot
//! be would fail its keys' share of requests in silence), the change listener, or the database
//! actor. Before start-up is done (the first connection, migrations, every owner running) the
//! port is not bound yet, so a probe finds nothing there.
//!
//! A backend that every replica shares being down — PostgreSQL, Redis, or the listener's
//! connection — is *degraded*: named in the body (`degraded`, and a line in `checks`), shown in
//! its gauge (`db_available`, `redis_available`, `listener_connected`), and still `200`. The
//! replica keeps answering from what it has (Redis, its near cache, `STALE` values), and taking
//! every replica out of its load balancer at once would turn a database blip into a full outage.
//! The body names what failed in words of its own, never a driver's error text.
//!
//! Once a stop has begun (SIGTERM, see [`crate::shutdown`]) `/readyz` answers `503` with
//! `"status": "draining"` while the replica still serves, so that its load balancer moves the
//! traffic before it stops accepting.

use std::time::Duration;

use actix_web::{web, HttpResponse};
use serde_json::json;

use crate::actors::cache::PingCache;
use crate::actors::db::{PingDb, Standing};
use crate::actors::Alive;
use crate::http::AppState;

const PROBE_TIMEOUT: Duration = Duration::from_millis(1000);

pub async fn healthz() -> HttpResponse {
    HttpResponse::Ok().json(json!({"status": "ok", "checked": "the process is serving HTTP"}))
}

/// One check's verdict: fine, degraded (a shared backend is down: still ready), or failed (a
/// part of this replica is gone: not ready).
enum Verdict {
    Ok(String),
    Degraded(String),
    Failed(String),
}

impl Verdict {
    fn text(&self) -> String {
        match self {
            Verdict::Ok(what) => what.clone(),
            Verdict::Degraded(what) => format!("degraded: {what}"),
            Verdict::Failed(what) => format!("error: {what}"),
        }
    }
}

/// `ask`, given [`PROBE_TIMEOUT`] to answer: a stuck actor is as good as a stopped one.
fn bounded<F: std::future::Future>(ask: F) -> tokio::time::Timeout<F> {
    tokio::time::timeout(PROBE_TIMEOUT, ask)
}

pub async fn readyz(state: web::Data<AppState>) -> HttpResponse {
    if state.draining.is_on() {
        // Stopping (see `crate::shutdown`): out of the load balancer first, whatever else holds.
        return HttpResponse::ServiceUnavailable().json(json!({
            "status": "draining",
            "degraded": [],
            "checks": {"shutdown": "draining: this replica is stopping; it answers what it is \
                        sent until its load balancer stops sending"},
        }));
    }
    let db = bounded(state.db_probe.send(PingDb));
    let redis = bounded(state.cache_probe.send(PingCache));
    let listener = bounded(state.listener_probe.send(Alive));
    let owners =
        futures_util::future::join_all(state.owners.iter().map(|owner| bounded(owner.send(Alive))));
    let (db, redis, listener, owners) =
        futures_util::future::join4(db, redis, listener, owners).await;

    let database = match db {
        Ok(Ok(Standing::Up)) => Verdict::Ok("ok".to_owned()),
        Ok(Ok(Standing::Suspect(evidence))) => Verdict::Ok(format!(
            "ok (confirming with a probe: {})",
            evidence.describe()
        )),
        Ok(Ok(Standing::Down(evidence))) => {
            Verdict::Degraded(format!("{}; serving what is cached", evidence.describe()))
        }
        _ => Verdict::Failed("the database actor is not running".to_owned()),
    };
    let redis = match redis {
        Ok(Ok(Ok(()))) => Verdict::Ok("ok".to_owned()),
        Ok(Ok(Err(e))) => Verdict::Degraded(format!("{}; serving from PostgreSQL", e.describe())),
        _ => Verdict::Degraded("the cache actor is not answering".to_owned()),
    };
    let listener = match listener {
        Ok(Ok(()))
            if state.metrics.listener_connected.get() == 1
                && state.metrics.listener_hearing.get() == 0 =>
        {
            Verdict::Degraded(format!(
                "deaf: its own heartbeat NOTIFY, sent through DATABASE_URL, does not come back; \
                 DATABASE_LISTEN_URL must be a direct connection to the primary. Meanwhile \
                 cached values older than {} s are reloaded",
                crate::actors::listener::DEAF_MAX_AGE.as_secs()
            ))
        }
        Ok(Ok(())) if state.metrics.listener_connected.get() == 1 => {
            Verdict::Ok("ok: listening for changes".to_owned())
        }
        Ok(Ok(())) => Verdict::Degraded(
            "not listening for changes (reconnecting); everything cached before it listens \
             again is reloaded on first use"
                .to_owned(),
        ),
        _ => Verdict::Failed("the change listener is not running".to_owned()),
    };
    let stopped: Vec<usize> = owners
        .iter()
        .enumerate()
        .filter(|(_, answer)| !matches!(answer, Ok(Ok(()))))
        .map(|(shard, _)| shard)
        .collect();
    let key_owners = if stopped.is_empty() {
        Verdict::Ok(format!("ok: {} running", owners.len()))
    } else {
        Verdict::Failed(format!(
            "shards {stopped:?} of {} not answering",
            owners.len()
        ))
    };

    let checks = [
        ("key_owners", &key_owners),
        ("listener", &listener),
        ("database", &database),
        ("redis", &redis),
    ];
    let ready = !checks.iter().any(|(_, v)| matches!(v, Verdict::Failed(_)));
    let degraded: Vec<&str> = [
        ("postgres", &database),
        ("redis", &redis),
        ("listener", &listener),
    ]
    .iter()
    .filter(|(_, v)| matches!(v, Verdict::Degraded(_)))
    .map(|(name, _)| *name)
    .collect();
    let body = json!({
        "status": if ready { "ready" } else { "unready" },
        "degraded": degraded,
        "checks": checks
            .iter()
            .map(|(name, verdict)| (name.to_string(), verdict.text().into()))
            .collect::<serde_json::Map<String, serde_json::Value>>(),
    });
    if ready {
        HttpResponse::Ok().json(body)
    } else {
        HttpResponse::ServiceUnavailable()
            .insert_header(("Retry-After", "1"))
            .json(body)
    }
}
