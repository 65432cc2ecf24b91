//! The one way to start the service, used by `main` and by the tests.
//!
//! [`Application::build`] applies migrations, starts the actors, binds the listener and returns
//! the server ready to run, with the port it got (tests bind port 0).
//!
//! Threads: `KEY_OWNER_SHARDS` arbiters, each running one [`KeyOwner`] and the [`CacheActor`]
//! it talks to (no cross-thread hop between them); one arbiter for the [`DbActor`] and the
//! [`ChangeListener`]; and
//! `HTTP_WORKERS` actix-web workers.

use std::net::TcpListener;
use std::time::Duration;

use actix::prelude::*;
use actix_web::dev::{Server, ServerHandle, Service};
use actix_web::{web, App, HttpServer};
use actix_web_prom::{ActixMetricsConfiguration, PrometheusMetricsBuilder};

use crate::actors::cache::{CacheActor, CacheSettings};
use crate::actors::db::{DbActor, DbSettings};
use crate::actors::key_owner::{KeyOwner, KeyOwnerDeps, OwnerSettings};
use crate::actors::listener::ChangeListener;
use crate::config::Settings;
use crate::http::{self, AppState, InFlight};
use crate::metrics::Metrics;

/// How long start-up waits for the change listener's first `LISTEN`.
const LISTEN_PATIENCE: Duration = Duration::from_secs(5);

/// How long start-up waits for PostgreSQL to accept connections before giving up.
const MIGRATION_PATIENCE: Duration = Duration::from_secs(15);

/// Why the service could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    #[error("REDIS_URL is not usable: {0}")]
    RedisUrl(String),
    #[error("database migrations: {0}")]
    Migrations(String),
    #[error("cannot listen on HTTP_ADDR {addr}: {source}")]
    Bind {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("metrics: {0}")]
    Metrics(String),
}

pub struct Application {
    port: u16,
    server: Server,
    /// Held for its `Drop`, which stops the actor threads.
    _arbiters: Arbiters,
    metrics: Metrics,
}

/// The actor threads. Dropping them stops them — when the server has finished, and also when
/// an [`Application`] is dropped without running to the end (a test whose runtime ends first):
/// an arbiter left running would keep its pool's connections open for good.
struct Arbiters(Vec<Arbiter>);

impl Drop for Arbiters {
    fn drop(&mut self) {
        for arbiter in &self.0 {
            arbiter.stop();
        }
    }
}

impl Application {
    pub async fn build(settings: Settings) -> Result<Self, StartupError> {
        CacheActor::check_url(&settings.redis_url).map_err(StartupError::RedisUrl)?;
        let applied = crate::migrate::run_pending(&settings.database_url, MIGRATION_PATIENCE)
            .await
            .map_err(StartupError::Migrations)?;
        log::info!("database schema is current ({applied} migrations applied now)");

        let metrics = Metrics::new().map_err(|e| StartupError::Metrics(e.to_string()))?;
        let mut arbiters = Vec::new();

        let db_arbiter = Arbiter::new();
        let db_settings = DbSettings {
            database_url: settings.database_url.clone(),
            pool_size: settings.db_pool_size,
            min_idle: settings.db_pool_min_idle,
            connect_timeout: settings.db_connect_timeout,
            query_timeout: settings.db_query_timeout,
            // The baseline sends every load alone: batching would deduplicate at the database.
            batch_max: if settings.coalesce {
                settings.db_batch_max
            } else {
                1
            },
        };
        let db_metrics = metrics.clone();
        let db = Supervisor::start_in_arbiter(&db_arbiter.handle(), move |_| {
            DbActor::new(db_settings, db_metrics)
        });
        arbiters.push(db_arbiter);

        let cache_settings = CacheSettings {
            redis_url: settings.redis_url.clone(),
            timeout: settings.redis_timeout,
            ttl: settings.cache_ttl,
            grace: settings.cache_grace,
            jitter_pct: settings.ttl_jitter_pct,
            negative_ttl: settings.negative_ttl,
            breaker_failures: settings.breaker_failures,
            breaker_open: settings.breaker_open,
        };
        let mut owners = Vec::with_capacity(settings.key_owner_shards);
        let mut caches = Vec::with_capacity(settings.key_owner_shards);
        for shard in 0..settings.key_owner_shards {
            let arbiter = Arbiter::new();
            let (cs, cm) = (cache_settings.clone(), metrics.clone());
            let cache = Supervisor::start_in_arbiter(&arbiter.handle(), move |_| {
                CacheActor::new(shard, cs, cm)
            });
            let deps = KeyOwnerDeps {
                cache_get: cache.clone().recipient(),
                cache_set: cache.clone().recipient(),
                cache_del: cache.clone().recipient(),
                db: db.clone().recipient(),
                settings: OwnerSettings::from(&settings),
                metrics: metrics.clone(),
            };
            owners.push(Supervisor::start_in_arbiter(&arbiter.handle(), move |_| {
                KeyOwner::new(shard, deps)
            }));
            caches.push(cache);
            arbiters.push(arbiter);
        }

        // Change notifications, on the database arbiter. Nothing is served before the first
        // LISTEN is in place (bounded: with PostgreSQL slow to answer, start anyway and let the
        // listener keep trying; it marks everything suspect when it does connect).
        let (listening_tx, listening) = tokio::sync::oneshot::channel();
        let (url, lo, lc, lm) = (
            settings.database_url.clone(),
            owners.clone(),
            caches.clone(),
            metrics.clone(),
        );
        Supervisor::start_in_arbiter(&arbiters[0].handle(), move |_| {
            ChangeListener::new(url, lo, lc, lm, listening_tx)
        });
        if tokio::time::timeout(LISTEN_PATIENCE, listening)
            .await
            .is_err()
        {
            log::warn!("not yet listening for template changes; starting anyway");
        }

        let prometheus = PrometheusMetricsBuilder::new("")
            .registry(metrics.registry.clone())
            .endpoint("/metrics")
            .exclude("/metrics")
            .mask_unmatched_patterns("UNMATCHED")
            .metrics_configuration(
                ActixMetricsConfiguration::default()
                    .http_requests_total_name("http_request_total")
                    .http_requests_duration_seconds_name("http_request_duration_seconds"),
            )
            .build()
            .map_err(|e| StartupError::Metrics(e.to_string()))?;

        let state = web::Data::new(AppState {
            owners,
            db,
            cache_probe: caches[0].clone(),
            request_timeout: settings.request_timeout,
            metrics: metrics.clone(),
        });
        let in_flight = metrics.http_in_flight_requests.clone();
        let bind_err = |source| StartupError::Bind {
            addr: settings.http_addr,
            source,
        };
        let listener = TcpListener::bind(settings.http_addr).map_err(bind_err)?;
        let port = listener.local_addr().map_err(bind_err)?.port();
        let server = HttpServer::new(move || {
            let in_flight = in_flight.clone();
            App::new()
                .wrap(prometheus.clone())
                .wrap_fn(move |req, srv| {
                    // A scrape is not traffic: counting it would show one request in flight
                    // on every sample.
                    let guard = (req.path() != "/metrics").then(|| InFlight::enter(&in_flight));
                    let response = srv.call(req);
                    async move {
                        let response = response.await;
                        drop(guard);
                        response
                    }
                })
                .app_data(state.clone())
                .configure(http::routes)
        })
        .workers(settings.http_workers)
        // Signals are `main`'s to handle (actix's own would make SIGINT a forced stop); on a
        // graceful stop the server stops accepting and gives in-flight requests this long.
        .disable_signals()
        .shutdown_timeout(10)
        .listen(listener)
        .map_err(bind_err)?
        .run();
        log::info!(
            "listening on {} ({} key owner shards, coalescing {})",
            listener_addr(settings.http_addr, port),
            settings.key_owner_shards,
            if settings.coalesce { "on" } else { "off" }
        );
        Ok(Application {
            port,
            server,
            _arbiters: Arbiters(arbiters),
            metrics,
        })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Stops the server (gracefully) from elsewhere, e.g. a test.
    pub fn handle(&self) -> ServerHandle {
        self.server.handle()
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Serves until the server is stopped (SIGTERM/SIGINT or [`ServerHandle::stop`]), then
    /// stops the actor threads.
    pub async fn run_until_stopped(self) -> std::io::Result<()> {
        self.server.await
        // `self._arbiters` is dropped here, stopping the actor threads.
    }
}

fn listener_addr(addr: std::net::SocketAddr, port: u16) -> std::net::SocketAddr {
    std::net::SocketAddr::new(addr.ip(), port)
}
