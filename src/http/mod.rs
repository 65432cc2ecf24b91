//! HTTP: routes, shared state, and the in-flight gauge middleware.

pub mod error;
pub mod health;
pub mod template_details;
pub mod worker_cache;

use std::cell::RefCell;
use std::time::Duration;

use actix::Addr;
use actix_web::{web, HttpRequest};

use crate::actors::cache::CacheActor;
use crate::actors::db::DbActor;
use crate::actors::key_owner::KeyOwner;
use crate::http::error::ApiError;
use crate::http::worker_cache::WorkerCache;
use crate::metrics::{Metrics, WorkerCounts};

/// What every handler can reach. Cloned into each HTTP worker (all fields are handles).
pub struct AppState {
    /// The key owners; `shard_for(id, owners.len())` picks one.
    pub owners: Vec<Addr<KeyOwner>>,
    pub db: Addr<DbActor>,
    /// One cache actor, asked by `/readyz` whether Redis answers.
    pub cache_probe: Addr<CacheActor>,
    pub request_timeout: Duration,
    pub metrics: Metrics,
}

/// What each HTTP worker keeps of its own (made on the worker's thread, never shared): its cache
/// of fresh answers and its counts. Handlers reach it as `req.app_data::<Rc<WorkerState>>()`.
pub struct WorkerState {
    pub cache: RefCell<WorkerCache>,
    pub counts: WorkerCounts,
}

/// Registers every route. `/metrics` is served by the actix-web-prom middleware.
pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.service(
        web::resource("/template-details")
            .route(web::get().to(template_details::template_details))
            .default_service(web::to(|req: HttpRequest| async move {
                Err::<String, _>(ApiError::MethodNotAllowed {
                    method: req.method().to_string(),
                    allowed: "GET",
                })
            })),
    )
    .route("/healthz", web::get().to(health::healthz))
    .route("/readyz", web::get().to(health::readyz))
    .default_service(web::to(|req: HttpRequest| async move {
        Err::<String, _>(ApiError::NoSuchEndpoint(
            req.path().chars().take(100).collect(),
        ))
    }));
}
