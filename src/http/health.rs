//! `/healthz` (liveness) and `/readyz` (readiness).
//!
//! Ready means PostgreSQL answers and every actor a request may need is running — each KeyOwner
//! and the DbActor (each runs under a supervisor, so one that stopped is restarted; one that
//! cannot be makes the service unready rather than failing its keys' share of requests in
//! silence). Redis being down only makes the service slower, so it is reported as `degraded`,
//! not unready.

use std::time::Duration;

use actix_web::{web, HttpResponse};
use serde_json::json;

use crate::actors::cache::PingCache;
use crate::actors::db::PingDb;
use crate::actors::key_owner::Alive;
use crate::http::AppState;

const PROBE_TIMEOUT: Duration = Duration::from_millis(1000);

pub async fn healthz() -> HttpResponse {
    HttpResponse::Ok().json(json!({"status": "ok", "checked": "the process is serving HTTP"}))
}

pub async fn readyz(state: web::Data<AppState>) -> HttpResponse {
    let db = state.db_probe.send(PingDb(PROBE_TIMEOUT));
    let redis = state.cache_probe.send(PingCache);
    let owners = futures_util::future::join_all(
        state
            .owners
            .iter()
            .map(|owner| tokio::time::timeout(PROBE_TIMEOUT, owner.send(Alive))),
    );
    let (db, redis, owners) = futures_util::future::join3(db, redis, owners).await;
    let database = match db {
        Ok(Ok(())) => "ok".to_owned(),
        Ok(Err(e)) => format!("error: {e}"),
        Err(_) => "error: the database actor is not running".to_owned(),
    };
    let stopped: Vec<usize> = owners
        .iter()
        .enumerate()
        .filter(|(_, answer)| !matches!(answer, Ok(Ok(()))))
        .map(|(shard, _)| shard)
        .collect();
    let key_owners = if stopped.is_empty() {
        format!("ok: {} running", owners.len())
    } else {
        format!(
            "error: shards {stopped:?} of {} not answering",
            owners.len()
        )
    };
    let redis = match redis {
        Ok(Ok(())) => "ok".to_owned(),
        Ok(Err(e)) => format!("degraded: {e}; serving from PostgreSQL"),
        Err(_) => "degraded: the cache actor is not running".to_owned(),
    };
    let ready = database == "ok" && stopped.is_empty();
    let body = json!({
        "status": if ready { "ready" } else { "unready" },
        "checks": {"database": database, "redis": redis, "key_owners": key_owners},
    });
    if ready {
        HttpResponse::Ok().json(body)
    } else {
        HttpResponse::ServiceUnavailable()
            .insert_header(("Retry-After", "1"))
            .json(body)
    }
}
