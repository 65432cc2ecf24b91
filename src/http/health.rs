//! `/healthz` (liveness) and `/readyz` (readiness).
//!
//! Ready means PostgreSQL answers: without it, uncached templates cannot be served. Redis being
//! down only makes the service slower, so it is reported as `degraded`, not unready.

use std::time::Duration;

use actix_web::{web, HttpResponse};
use serde_json::json;

use crate::actors::cache::PingCache;
use crate::actors::db::PingDb;
use crate::http::AppState;

const PROBE_TIMEOUT: Duration = Duration::from_millis(1000);

pub async fn healthz() -> HttpResponse {
    HttpResponse::Ok().json(json!({"status": "ok", "checked": "the process is serving HTTP"}))
}

pub async fn readyz(state: web::Data<AppState>) -> HttpResponse {
    let db = state.db.send(PingDb(PROBE_TIMEOUT));
    let redis = state.cache_probe.send(PingCache);
    let (db, redis) = futures_util::future::join(db, redis).await;
    let database = match db {
        Ok(Ok(())) => "ok".to_owned(),
        Ok(Err(e)) => format!("error: {e}"),
        Err(_) => "error: the database actor is not running".to_owned(),
    };
    let redis = match redis {
        Ok(Ok(())) => "ok".to_owned(),
        Ok(Err(e)) => format!("degraded: {e}; serving from PostgreSQL"),
        Err(_) => "degraded: the cache actor is not running".to_owned(),
    };
    let ready = database == "ok";
    let body = json!({
        "status": if ready { "ready" } else { "unready" },
        "checks": {"database": database, "redis": redis},
    });
    if ready {
        HttpResponse::Ok().json(body)
    } else {
        HttpResponse::ServiceUnavailable()
            .insert_header(("Retry-After", "1"))
            .json(body)
    }
}
