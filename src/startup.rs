//! The one way to start the service, used by `main` and by the tests.
//!
//! [`Application::build`] applies migrations ([`migrate`]), starts the actors ([`start_db`],
//! [`start_shards`], [`start_listener`], [`start_fill_subscriber`]), binds the listener
//! ([`serve`]: `HTTP_ADDR`, and `ADMIN_ADDR` when set) and returns the server ready to run, with the
//! port it got (tests bind port 0).
//!
//! Threads: `KEY_OWNER_SHARDS` arbiters, each running one [`KeyOwner`] and the [`CacheActor`]
//! it talks to (no cross-thread hop between them); one arbiter for the [`DbActor`] and the
//! [`ChangeListener`]; and
//! `HTTP_WORKERS` actix-web workers.

use std::time::Duration;

use actix::prelude::*;
use actix_web::dev::{Server, ServerHandle};

use crate::actors::cache::{CacheActor, CacheSettings};
use crate::actors::db::{DbActor, DbSettings};
use crate::actors::fills::FillSubscriber;
use crate::actors::key_owner::{
    Generations, HandBack, KeyOwner, KeyOwnerDeps, LeaseDeps, OwnerSettings,
};
use crate::actors::listener::ChangeListener;
use crate::config::Settings;
use crate::http::serve::{serve, ServeError};
use crate::http::{renewal_batch, AppState};
use crate::metrics::Metrics;
use crate::shutdown::{Draining, Shutdown};
use crate::tls::PgConnector;

/// How long start-up waits for the change listener's first `LISTEN`.
const LISTEN_PATIENCE: Duration = Duration::from_secs(5);

/// How long start-up waits for PostgreSQL to accept connections before giving up.
const MIGRATION_PATIENCE: Duration = Duration::from_secs(15);

/// Why the service could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    #[error("REDIS_URL is not usable: {0}")]
    RedisUrl(String),
    #[error("{0}")]
    DatabaseUrl(String),
    #[error("database migrations: {0}")]
    Migrations(String),
    #[error("{0}")]
    Schema(String),
    #[error(transparent)]
    Serve(#[from] ServeError),
    #[error("metrics: {0}")]
    Metrics(String),
}

pub struct Application {
    port: u16,
    server: Server,
    /// `ADMIN_ADDR`'s server and port, when set; it stops when the public server has.
    admin: Option<(Server, u16)>,
    /// Held for its `Drop`, which stops the actor threads.
    _arbiters: Arbiters,
    metrics: Metrics,
    /// Asked to hand their leases back once the server has stopped.
    owners: Vec<Addr<KeyOwner>>,
    draining: Draining,
    /// `SHUTDOWN_DRAIN_MS`.
    drain: Duration,
    /// `REDIS_TIMEOUT_MS`: how long a Redis call still in the air may take to end.
    redis_timeout: Duration,
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
    /// Starts the service, step by step: nothing is served before the schema is current and the
    /// change listener is listening (or has had its chance), and the port is bound last.
    pub async fn build(settings: Settings) -> Result<Self, StartupError> {
        CacheActor::check_url(&settings).map_err(StartupError::RedisUrl)?;
        let (postgres, session) = connectors(&settings)?;
        prepare_schema(&settings, &session).await?;
        let metrics = Metrics::new().map_err(|e| StartupError::Metrics(e.to_string()))?;
        let replicas = replica_settings(&settings, &metrics)?;
        let (db_arbiter, db) = start_db(&settings, &postgres, &replicas, &metrics);
        let shards = start_shards(&settings, &db, &metrics);
        let listener = start_listener(&session, &db_arbiter, &shards, &db, &metrics).await;
        start_fill_subscriber(&settings, &db_arbiter, &shards, &metrics);
        // Owned from here, so that a failure to bind stops the actor threads too.
        let arbiters = Arbiters(std::iter::once(db_arbiter).chain(shards.arbiters).collect());
        let generations = shards.generations;
        let owners = shards.owners;
        let draining = Draining::default();
        let state = AppState {
            owners: owners.clone(),
            draining: draining.clone(),
            db_probe: db.clone().recipient(),
            cache_probe: shards.caches[0].clone().recipient(),
            listener_probe: listener.recipient(),
            request_timeout: settings.request_timeout,
            renewal_batch: renewal_batch(settings.near_cache_ttl),
            metrics: metrics.clone(),
        };
        let servers = serve(&settings, state, &generations, &metrics, &draining)?;
        let (server, port) = servers.public;
        log::info!(
            "listening on {} ({} key owner shards, coalescing {})",
            listener_addr(settings.http_addr, port),
            settings.key_owner_shards,
            if settings.coalesce { "on" } else { "off" }
        );
        if let (Some(addr), Some((_, admin_port))) = (settings.admin_addr, &servers.admin) {
            log::info!(
                "serving /metrics, /healthz and /readyz on {} only",
                listener_addr(addr, *admin_port)
            );
        }
        Ok(Application {
            port,
            server,
            admin: servers.admin,
            _arbiters: arbiters,
            metrics,
            owners,
            draining,
            drain: settings.shutdown_drain,
            redis_timeout: settings.redis_timeout,
        })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The port `ADMIN_ADDR`'s server got, when it is set.
    pub fn admin_port(&self) -> Option<u16> {
        self.admin.as_ref().map(|(_, port)| *port)
    }

    /// Stops the server (gracefully, without draining) from elsewhere, e.g. a test.
    pub fn handle(&self) -> ServerHandle {
        self.server.handle()
    }

    /// Stops the service as SIGTERM does: drain, then stop (see [`crate::shutdown`]).
    pub fn shutdown(&self) -> Shutdown {
        Shutdown {
            server: self.server.handle(),
            admin: self.admin.as_ref().map(|(admin, _)| admin.handle()),
            draining: self.draining.clone(),
            drain: self.drain,
        }
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Serves until the server is stopped (SIGTERM/SIGINT or [`ServerHandle::stop`]), then
    /// stops the actor threads.
    pub async fn run_until_stopped(self) -> std::io::Result<()> {
        let served = match self.admin {
            None => self.server.await,
            Some((admin, _)) => {
                let admin_handle = admin.handle();
                // Said when it happens: the public server goes on serving without it.
                let admin = actix_rt::spawn(async move {
                    if let Err(e) = admin.await {
                        log::error!("the ADMIN_ADDR server failed: {e}");
                    }
                });
                let served = self.server.await;
                // Probes and scrapes were answered until the public server had stopped; what
                // is left there is a scraper's idle connection, not worth waiting for.
                admin_handle.stop(false).await;
                if let Err(e) = admin.await {
                    log::error!("the ADMIN_ADDR server panicked: {e}");
                }
                served
            }
        };
        hand_back(&self.owners, self.redis_timeout).await;
        served
        // `self._arbiters` is dropped here, stopping the actor threads.
    }
}

/// Asks every owner to give back the leases its flights hold (see [`HandBack`]), and waits for
/// the releases, and for fills already in the air, for at most about a Redis call's timeout.
async fn hand_back(owners: &[Addr<KeyOwner>], redis_timeout: Duration) {
    let patience = redis_timeout + Duration::from_millis(100);
    let asked = owners.iter().map(|owner| owner.send(HandBack));
    let handed = tokio::time::timeout(patience, futures_util::future::join_all(asked)).await;
    let released: usize = handed.iter().flatten().flatten().sum();
    if released > 0 {
        log::info!("handed {released} fleet leases back for other replicas to load");
    }
    // A fill sent before the stop ends within its own Redis timeout.
    tokio::time::sleep(redis_timeout).await;
}

fn listener_addr(addr: std::net::SocketAddr, port: u16) -> std::net::SocketAddr {
    std::net::SocketAddr::new(addr.ip(), port)
}

/// How to connect for loads (`DATABASE_URL`) and for session work (`DATABASE_LISTEN_URL`: LISTEN
/// and the migration lock, on a connection of its own, which may be a direct one where
/// `DATABASE_URL` goes through a transaction-mode pooler).
pub fn connectors(settings: &Settings) -> Result<(PgConnector, PgConnector), StartupError> {
    let ca = settings.database_ca.as_ref();
    let postgres =
        PgConnector::new(&settings.database_url, ca).map_err(StartupError::DatabaseUrl)?;
    let session = PgConnector::new(settings.listen_url(), ca)
        .map_err(|e| StartupError::DatabaseUrl(e.replace("DATABASE_URL", "DATABASE_LISTEN_URL")))?;
    Ok((postgres, session))
}

/// Each read replica's settings (`DATABASE_READ_URL`): the primary's, with the replica's URL.
fn replica_settings(
    settings: &Settings,
    metrics: &Metrics,
) -> Result<Vec<DbSettings>, StartupError> {
    let ca = settings.database_ca.as_ref();
    settings
        .database_read_urls
        .iter()
        .enumerate()
        .map(|(index, url)| {
            let postgres = PgConnector::new(url, ca).map_err(|e| {
                StartupError::DatabaseUrl(e.replace("DATABASE_URL", "DATABASE_READ_URL"))
            })?;
            Ok(DbSettings::replica(settings, postgres, metrics, index))
        })
        .collect()
}

/// `MIGRATE=on`: applies pending migrations; `off`: checks that what the service needs is there.
/// Either way waits a while for PostgreSQL to accept connections.
pub async fn prepare_schema(
    settings: &Settings,
    session: &PgConnector,
) -> Result<(), StartupError> {
    if settings.migrate {
        let applied = crate::migrate::run_pending(session, MIGRATION_PATIENCE)
            .await
            .map_err(StartupError::Migrations)?;
        log::info!("database schema is current ({applied} migrations applied now)");
    } else {
        crate::migrate::check_schema(session, MIGRATION_PATIENCE)
            .await
            .map_err(StartupError::Schema)?;
        log::info!("database schema has what the service needs (MIGRATE=off: nothing applied)");
    }
    Ok(())
}

/// The DbActor, on an arbiter of its own (which the change listener shares).
fn start_db(
    settings: &Settings,
    postgres: &PgConnector,
    replicas: &[DbSettings],
    metrics: &Metrics,
) -> (Arbiter, Addr<DbActor>) {
    let arbiter = Arbiter::new();
    let db_settings = DbSettings::new(settings, postgres.clone(), metrics);
    let replicas = replicas.to_vec();
    let db_metrics = metrics.clone();
    let db = Supervisor::start_in_arbiter(&arbiter.handle(), move |_| {
        DbActor::new(db_settings, replicas, db_metrics)
    });
    (arbiter, db)
}

/// The key owner shards: one arbiter each, running the shard's [`KeyOwner`] and the
/// [`CacheActor`] it talks to.
struct Shards {
    owners: Vec<Addr<KeyOwner>>,
    caches: Vec<Addr<CacheActor>>,
    arbiters: Vec<Arbiter>,
    /// Bumped by the owners on changes, read by the HTTP workers' caches.
    generations: Generations,
}

fn start_shards(settings: &Settings, db: &Addr<DbActor>, metrics: &Metrics) -> Shards {
    let cache_settings = CacheSettings::from(settings);
    let shards = settings.key_owner_shards;
    let mut started = Shards {
        owners: Vec::with_capacity(shards),
        caches: Vec::with_capacity(shards),
        arbiters: Vec::with_capacity(shards),
        generations: Generations::default(),
    };
    for shard in 0..shards {
        let arbiter = Arbiter::new();
        let (cs, cm) = (cache_settings.clone(), metrics.clone());
        let cache = Supervisor::start_in_arbiter(&arbiter.handle(), move |_| {
            CacheActor::new(shard, cs, cm)
        });
        let deps = KeyOwnerDeps {
            cache_get: cache.clone().recipient(),
            cache_get_many: cache.clone().recipient(),
            cache_set: cache.clone().recipient(),
            cache_del: cache.clone().recipient(),
            db: db.clone().recipient(),
            lease: (settings.coalesce && !settings.lease_ttl.is_zero()).then(|| LeaseDeps {
                claim: cache.clone().recipient(),
                extend: cache.clone().recipient(),
                fill: cache.clone().recipient(),
                release: cache.clone().recipient(),
                ttl: settings.lease_ttl,
            }),
            settings: OwnerSettings::from(settings),
            metrics: metrics.clone(),
            generations: started.generations.clone(),
        };
        started
            .owners
            .push(Supervisor::start_in_arbiter(&arbiter.handle(), move |_| {
                KeyOwner::new(shard, deps)
            }));
        started.caches.push(cache);
        started.arbiters.push(arbiter);
    }
    started
}

/// Change notifications, on the database arbiter. Nothing is served before the first LISTEN is
/// in place (bounded: with PostgreSQL slow to answer, start anyway and let the listener keep
/// trying; it marks everything suspect when it does connect).
async fn start_listener(
    postgres: &PgConnector,
    db_arbiter: &Arbiter,
    shards: &Shards,
    db: &Addr<DbActor>,
    metrics: &Metrics,
) -> Addr<ChangeListener> {
    let db = db.clone();
    let (listening_tx, listening) = tokio::sync::oneshot::channel();
    let (url, lo, lc, lm) = (
        postgres.clone(),
        shards.owners.clone(),
        shards.caches.clone(),
        metrics.clone(),
    );
    let listener = Supervisor::start_in_arbiter(&db_arbiter.handle(), move |_| {
        ChangeListener::new(url, lo, lc, db, lm, listening_tx)
    });
    if tokio::time::timeout(LISTEN_PATIENCE, listening)
        .await
        .is_err()
    {
        log::warn!("not yet listening for template changes; starting anyway");
    }
    listener
}

/// The replica's subscription to lease notices, on the database arbiter; only with the lease on.
fn start_fill_subscriber(
    settings: &Settings,
    db_arbiter: &Arbiter,
    shards: &Shards,
    metrics: &Metrics,
) {
    if !settings.coalesce || settings.lease_ttl.is_zero() {
        return;
    }
    let (cs, owners, m) = (
        CacheSettings::from(settings),
        shards.owners.clone(),
        metrics.clone(),
    );
    Supervisor::start_in_arbiter(&db_arbiter.handle(), move |_| {
        FillSubscriber::new(cs, owners, m)
    });
}
