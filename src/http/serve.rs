//! The HTTP servers: the public one (`HTTP_ADDR`) and, with `ADMIN_ADDR`, the operational one.
//!
//! The hot route, `/template-details`, is counted by each worker on its own (see
//! [`crate::metrics::PerWorker`]); actix-web-prom's middleware serves `/metrics` and counts every
//! other route. Both write the seed's `http_request_total` and `http_request_duration_seconds`,
//! which one scrape shows together.

use std::net::{SocketAddr, TcpListener};
use std::time::Instant;

use actix_web::dev::{Server, Service, ServiceRequest, ServiceResponse};
use actix_web::http::{ConnectionType, StatusCode};
use actix_web::{web, App, HttpMessage, HttpServer, ResponseError};
use actix_web_prom::{ActixMetricsConfiguration, PrometheusMetrics, PrometheusMetricsBuilder};
use futures_util::future::{ready, Either};
use tracing::Instrument;

use crate::actors::key_owner::Generations;
use crate::config::Settings;
use crate::http::error::ApiError;
use crate::http::request_id::{self, RequestId, X_REQUEST_ID};
use crate::http::worker_cache::WorkerCache;
use crate::http::{self as routes, AppState, WorkerState};
use crate::memory::{CacheKind, Meter};
use crate::metrics::{
    standard_method, Metrics, DURATION_BUCKETS, HTTP_REQUEST_DURATION, HTTP_REQUEST_TOTAL,
};
use crate::shutdown::{self, Draining};
use crate::telemetry;

/// Why a server could not be started.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot listen on {var} {addr}: {source}")]
    Bind {
        var: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("actix-web-prom: {0}")]
    Metrics(String),
}

/// actix-web-prom's middleware: it serves `/metrics` from the service's registry (every metric of
/// [`Metrics`]) and counts the seed's HTTP metrics, with the seed's names and buckets, for the
/// routes it wraps. A scrape is not counted; a path served by no route is `UNMATCHED`.
fn http_metrics(metrics: &Metrics) -> Result<PrometheusMetrics, ServeError> {
    PrometheusMetricsBuilder::new("")
        .registry(metrics.registry.clone())
        .endpoint(routes::ENDPOINTS[3])
        .exclude(routes::ENDPOINTS[3])
        .mask_unmatched_patterns(routes::UNMATCHED)
        .buckets(&DURATION_BUCKETS)
        .metrics_configuration(
            ActixMetricsConfiguration::default()
                .http_requests_total_name(HTTP_REQUEST_TOTAL.0)
                .http_requests_duration_seconds_name(HTTP_REQUEST_DURATION.0),
        )
        .build()
        .map_err(|e| ServeError::Metrics(e.to_string()))
}

/// The HTTP servers, not yet running: the public one (`HTTP_ADDR`) and, with `ADMIN_ADDR`, the
/// one the operational routes move to.
pub struct Servers {
    pub public: (Server, u16),
    pub admin: Option<(Server, u16)>,
}

/// Binds `HTTP_ADDR` (and `ADMIN_ADDR` when set) and returns the servers, not yet running, with
/// the ports they got.
pub fn serve(
    settings: &Settings,
    state: AppState,
    generations: &Generations,
    metrics: &Metrics,
    draining: &Draining,
) -> Result<Servers, ServeError> {
    let http_metrics = http_metrics(metrics)?;
    let state = web::Data::new(state);
    let admin = settings
        .admin_addr
        .map(|addr| serve_admin(settings, addr, state.clone(), http_metrics.clone()))
        .transpose()?;
    let public = serve_public(
        settings,
        state,
        generations,
        metrics,
        http_metrics,
        draining,
    )?;
    Ok(Servers { public, admin })
}

fn bind(addr: SocketAddr, var: &'static str) -> Result<(TcpListener, u16), ServeError> {
    let bind_err = |source| ServeError::Bind { var, addr, source };
    let listener = TcpListener::bind(addr).map_err(bind_err)?;
    let port = listener.local_addr().map_err(bind_err)?.port();
    Ok((listener, port))
}

fn serve_public(
    settings: &Settings,
    state: web::Data<AppState>,
    generations: &Generations,
    metrics: &Metrics,
    http_metrics: PrometheusMetrics,
    draining: &Draining,
) -> Result<(Server, u16), ServeError> {
    let draining = draining.clone();
    let per_worker = metrics.per_worker.clone();
    let generations = generations.clone();
    let operational = settings.admin_addr.is_none();
    // `COALESCE=off` measures the service without any sharing: no worker cache either.
    let worker_cache_capacity = if settings.coalesce {
        settings.worker_cache_capacity
    } else {
        0
    };
    let worker_cache_bytes = settings.cache_shares().worker;
    let worker_cache_meter = Meter::new(metrics, CacheKind::Worker);
    let (listener, port) = bind(settings.http_addr, "HTTP_ADDR")?;
    let server = HttpServer::new(move || {
        // Runs once on each worker's thread: what it makes here is that worker's alone.
        let worker = std::rc::Rc::new(WorkerState {
            cache: WorkerCache::with_budget(
                worker_cache_capacity,
                worker_cache_bytes,
                worker_cache_meter.clone(),
                generations.clone(),
            )
            .into(),
            counts: per_worker.worker(),
            renewals: Default::default(),
        });
        let counting = worker.clone();
        let draining = draining.clone();
        // The worker counts the requests the hot route serves, whatever their path's spelling
        // (`/template%2Ddetails` is routed there too); the middleware counts the other routes'.
        let hot_counting = worker.clone();
        let hot = routes::template_resource().wrap_fn(move |req, srv| {
            let (arrived, method) = (Instant::now(), req.method().clone());
            let response = srv.call(req);
            let worker = hot_counting.clone();
            async move {
                let response = response.await;
                let status = status_of(&response);
                let counts = &worker.counts;
                counts.request_served(routes::ENDPOINTS[0], &method, status, arrived.elapsed());
                response
            }
        });
        App::new()
            .wrap_fn(move |req, srv| {
                let endpoint = routes::endpoint(req.path());
                // A scrape is not traffic: counting it would show one request in flight on
                // every sample.
                let in_flight = (endpoint != routes::ENDPOINTS[3]).then(|| counting.counts.enter());
                // A method of no standard is answered here, and counted by the worker, before
                // the middleware would label a series with it.
                let standard = standard_method(req.method());
                let refused = (!standard).then(|| (Instant::now(), req.method().clone()));
                // Draining: this answer ends its keep-alive connection, so that the client's
                // next request opens one the load balancer sends elsewhere.
                let closing = draining.is_on();
                let (id, span) = identify(&req);
                let response = span.in_scope(|| {
                    if standard {
                        Either::Left(srv.call(req))
                    } else {
                        Either::Right(ready(Ok(refuse_method(req))))
                    }
                });
                let worker = counting.clone();
                async move {
                    let mut response = response.instrument(span.clone()).await;
                    answer_with_id(&mut response, id, &span);
                    if closing {
                        if let Ok(response) = &mut response {
                            let head = response.response_mut().head_mut();
                            head.set_connection_type(ConnectionType::Close);
                        }
                    }
                    if let Some((arrived, method)) = refused {
                        let status = status_of(&response);
                        let counts = &worker.counts;
                        counts.request_served(endpoint, &method, status, arrived.elapsed());
                    }
                    drop(in_flight);
                    response
                }
            })
            .app_data(state.clone())
            .app_data(worker)
            .configure(routes::public_routes(
                hot,
                http_metrics.clone(),
                operational,
            ))
    })
    .workers(settings.http_workers)
    // Signals are `main`'s to handle (actix's own would make SIGINT a forced stop); on a
    // graceful stop the server stops accepting and gives in-flight requests this long.
    .disable_signals()
    .shutdown_timeout(shutdown::finish_within(settings.request_timeout).as_secs())
    .listen(listener)
    .map_err(|source| ServeError::Bind {
        var: "HTTP_ADDR",
        addr: settings.http_addr,
        source,
    })?
    .run();
    Ok((server, port))
}

/// `ADMIN_ADDR`'s server: `/metrics`, `/healthz` and `/readyz`, on one worker of its own, so
/// that probes and scrapes are answered while every public worker is busy.
fn serve_admin(
    settings: &Settings,
    addr: SocketAddr,
    state: web::Data<AppState>,
    http_metrics: PrometheusMetrics,
) -> Result<(Server, u16), ServeError> {
    let (listener, port) = bind(addr, "ADMIN_ADDR")?;
    let server = HttpServer::new(move || {
        App::new()
            .wrap(http_metrics.clone())
            .wrap_fn(|req, srv| {
                let (id, span) = identify(&req);
                let response = span.in_scope(|| {
                    if standard_method(req.method()) {
                        let response = srv.call(req);
                        Either::Left(async move { Ok(response.await?.map_into_boxed_body()) })
                    } else {
                        Either::Right(ready(Ok(refuse_method(req))))
                    }
                });
                async move {
                    let mut response = response.instrument(span.clone()).await;
                    answer_with_id(&mut response, id, &span);
                    response
                }
            })
            .app_data(state.clone())
            .configure(routes::operational_routes)
            .default_service(web::to(routes::no_such_endpoint))
    })
    .workers(1)
    .disable_signals()
    .shutdown_timeout(shutdown::finish_within(settings.request_timeout).as_secs())
    .listen(listener)
    .map_err(|source| ServeError::Bind {
        var: "ADMIN_ADDR",
        addr,
        source,
    })?
    .run();
    Ok((server, port))
}

/// The request's id (kept or made; see [`RequestId`]), put where its handler finds it, and its
/// `request` span while spans are exported (otherwise none: see [`crate::telemetry`]).
fn identify(req: &ServiceRequest) -> (RequestId, tracing::Span) {
    let id = RequestId::of(req.headers());
    let span = if telemetry::exporting() {
        let span = request_id::request_span(req.method(), req.path(), &id);
        request_id::continue_trace(&span, req.headers());
        span
    } else {
        tracing::Span::none()
    };
    req.extensions_mut().insert(id.clone());
    (id, span)
}

/// Returns the request's id on its response, and records the status on its span. (An error
/// that no response stands for yet, which the routes here never give, gets its id nowhere.)
fn answer_with_id<B>(
    response: &mut Result<ServiceResponse<B>, actix_web::Error>,
    id: RequestId,
    span: &tracing::Span,
) {
    if !span.is_disabled() {
        request_id::record_status(span, status_of(response));
    }
    if let Ok(response) = response {
        response.headers_mut().insert(X_REQUEST_ID, id.0);
    }
}

/// The status of a response, or of the error that stands for one.
fn status_of<B>(response: &Result<ServiceResponse<B>, actix_web::Error>) -> StatusCode {
    match response {
        Ok(response) => response.status(),
        Err(e) => e.as_response_error().status_code(),
    }
}

/// `405` for a request whose method is not one of HTTP's standard ones: no route takes it.
fn refuse_method(req: ServiceRequest) -> ServiceResponse {
    let method = req.method().to_string();
    let refused = ApiError::MethodNotAllowed {
        method,
        allowed: "GET",
    };
    req.into_response(refused.error_response())
}
