//! HTTP: routes, shared state, and what each worker keeps of its own.

pub mod error;
pub mod health;
pub mod request_id;
pub mod serve;
pub mod template_details;
pub mod worker_cache;

use std::cell::RefCell;
use std::time::Duration;

use actix::{Addr, Recipient};
use actix_web::dev::HttpServiceFactory;
use actix_web::{web, HttpRequest, HttpResponse};
use actix_web_prom::PrometheusMetrics;

use crate::actors::cache::PingCache;
use crate::actors::db::PingDb;
use crate::actors::key_owner::KeyOwner;
use crate::actors::Alive;
use crate::http::error::ApiError;
use crate::http::worker_cache::WorkerCache;
use crate::metrics::{Metrics, WorkerCounts};
use crate::shutdown::Draining;

/// What every handler can reach. Cloned into each HTTP worker (all fields are handles).
pub struct AppState {
    /// The key owners; `shard_for(id, owners.len())` picks one.
    pub owners: Vec<Addr<KeyOwner>>,
    /// The database actor, asked by `/readyz` whether PostgreSQL answers.
    pub db_probe: Recipient<PingDb>,
    /// One cache actor, asked by `/readyz` whether Redis answers.
    pub cache_probe: Recipient<PingCache>,
    /// The change listener, asked by `/readyz` whether it runs.
    pub listener_probe: Recipient<Alive>,
    /// On once a stop has begun: `/readyz` answers 503 (see [`crate::shutdown`]).
    pub draining: Draining,
    pub request_timeout: Duration,
    /// How long a worker gathers due renewals before it sends them ([`renewal_batch`]).
    pub renewal_batch: Duration,
    pub metrics: Metrics,
}

/// How long a worker gathers the ids that come due for renewal before it sends them to their
/// owner in one message (and the owner reads them from Redis in one round trip). Over many keys
/// this turns a message, a Redis round trip and their wake-ups per key into one per batch: on a
/// shared core each wake-up of the owner's thread preempts the worker, and over 1,000 ids a
/// 20 ms batch answered more requests with a lower p99 than a 5 ms one (BENCHMARKS.md §10). A
/// copy comes due with a quarter of its freshness left (250 ms with the default 1 s near cache);
/// the batch takes at most a sixteenth of the near-cache TTL, so a short one still leaves
/// three quarters of that window for the owner's answer.
pub fn renewal_batch(near_cache_ttl: Duration) -> Duration {
    const LONGEST: Duration = Duration::from_millis(20);
    (near_cache_ttl / 16).min(LONGEST)
}

/// What each HTTP worker keeps of its own (made on the worker's thread, never shared): its cache
/// of fresh answers and its counts. Handlers reach it as `req.app_data::<Rc<WorkerState>>()`.
pub struct WorkerState {
    pub cache: RefCell<WorkerCache>,
    pub counts: WorkerCounts,
    /// Ids due for renewal not yet sent to their owner, by owner shard (see
    /// [`template_details`]'s `renew`).
    pub renewals: RefCell<Vec<Vec<i64>>>,
}

/// The paths served, as the `endpoint` label of the HTTP metrics names them; any other path is
/// [`UNMATCHED`].
pub const ENDPOINTS: [&str; 4] = ["/template-details", "/healthz", "/readyz", "/metrics"];
pub const UNMATCHED: &str = "UNMATCHED";

/// The `endpoint` label of a request for `path`.
pub fn endpoint(path: &str) -> &'static str {
    ENDPOINTS
        .into_iter()
        .find(|e| *e == path)
        .unwrap_or(UNMATCHED)
}

/// The hot route, `/template-details` (GET; any other method is answered `405`).
pub fn template_resource() -> actix_web::Resource {
    web::resource(ENDPOINTS[0])
        .route(web::get().to(template_details::template_details))
        .default_service(web::to(|req: HttpRequest| async move {
            Err::<String, _>(ApiError::MethodNotAllowed {
                method: req.method().to_string(),
                allowed: "GET",
            })
        }))
}

/// [`template_resource`] alone, as a configuration.
pub fn template_route(cfg: &mut web::ServiceConfig) {
    cfg.service(template_resource());
}

/// The operational routes: `/healthz`, `/readyz`, and `/metrics`, whose body actix-web-prom's
/// middleware writes (it answers a `GET` of its endpoint itself, whatever the route returned):
/// the middleware must wrap them.
pub fn operational_routes(cfg: &mut web::ServiceConfig) {
    cfg.route(ENDPOINTS[1], web::get().to(health::healthz))
        .route(ENDPOINTS[2], web::get().to(health::readyz))
        .route(ENDPOINTS[3], web::get().to(HttpResponse::Ok));
}

/// The public address's routes: `hot`, the hot route as [`template_resource`] made it (with the
/// workers' own counting, see [`crate::metrics::PerWorker`]), then every other route, wrapped in
/// `http_metrics` (actix-web-prom's middleware). `operational`: the operational routes are
/// served here too (`ADMIN_ADDR` unset).
pub fn public_routes(
    hot: impl HttpServiceFactory + 'static,
    http_metrics: PrometheusMetrics,
    operational: bool,
) -> impl FnOnce(&mut web::ServiceConfig) {
    move |cfg| {
        cfg.service(hot);
        if !operational {
            // Kept out of the middleware's reach: it would answer a scrape on any address.
            cfg.route(ENDPOINTS[3], web::to(no_such_endpoint));
        }
        cfg.service(
            web::scope("")
                .wrap(http_metrics)
                .configure(|cfg| {
                    if operational {
                        operational_routes(cfg);
                    }
                })
                .default_service(web::to(no_such_endpoint)),
        );
    }
}

/// Any path not served: `404` with the path (its first 100 characters) in the body.
pub async fn no_such_endpoint(req: HttpRequest) -> Result<HttpResponse, ApiError> {
    Err(ApiError::NoSuchEndpoint(
        req.path().chars().take(100).collect(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_renewal_batch_is_20_ms_at_most_and_a_sixteenth_of_a_short_near_cache() {
        let ms = Duration::from_millis;
        assert_eq!(renewal_batch(ms(1000)), ms(20), "the default near cache");
        assert_eq!(renewal_batch(Duration::from_secs(30)), ms(20));
        assert_eq!(renewal_batch(ms(160)), ms(10));
        assert_eq!(
            renewal_batch(Duration::ZERO),
            Duration::ZERO,
            "near cache off"
        );
    }
}
