//! `DbActor`: owns the bb8 pool of diesel-async PostgreSQL connections.
//!
//! # A slow database is not a failed one
//! Connections are opened *off* the request path: the pool keeps `DB_POOL_MIN_IDLE` of them open
//! (bb8 `min_idle`), opens them when the actor starts, and replaces broken or expired ones in the
//! background (its reaper runs every second). Opening one — connect, authenticate, prepare the
//! template query — has a bound of its own
//! (`DB_CONNECT_TIMEOUT_MS`), long enough for a server far away. So a burst after an idle period
//! finds the connections ready, and pays one round trip per query.
//!
//! A load waits for a free connection for as long as its flight has left ([`FetchTemplate`]
//! carries the deadline), not for a fixed time: a busy pool on a slow network is waited for; only
//! the flight's own deadline (and each request's, in the handler) bounds it. A checked-out
//! connection that closed meanwhile (a server restart) is dropped without a round trip and
//! another one taken. Each query is bounded by `DB_QUERY_TIMEOUT_MS`: when it runs out the
//! caller is answered, and the server is asked to cancel the query, which leaves the connection
//! usable (what a session's `statement_timeout` would do, without session state: see [`query`]).
//!
//! # Failing fast where the database is known to be down
//! "Down" is decided on evidence ([`failure`], by SQLSTATE and error kind) and confirmed by a
//! probe ([`reachability`]): a connection attempt refused or unanswered, a connection lost under
//! a query, or a cancel request that cannot reach the server make PostgreSQL *suspect*, and the
//! actor at once opens a connection of its own; if that fails too, PostgreSQL is *down*. A slow
//! query, a failed one, or a full server ("too many clients", waited for like a busy pool) are
//! never evidence. While it is down, loads fail at once ([`DbError::Unavailable`]) — the owners
//! then answer with a value they remember (`STALE`) or `503` — and a load already waiting for a
//! connection is released the moment it goes down. Every half second the actor probes again, so
//! recovery is noticed as soon as a probe connects, without any request paying for it.
//!
//! # Batching
//! Loads do not queue on the pool one by one. The actor keeps at most `DB_POOL_SIZE` queries in
//! the air; a load that finds one free is sent at once, alone — no window, no added latency —
//! and loads that arrive while every connection is busy wait in the actor's queue, to be sent
//! together as one query (`WHERE id = ANY($1)`, up to `DB_BATCH_MAX` ids) on the next connection
//! that frees up. So a cold burst of distinct ids against a distant server costs a few round
//! trips, not one per id per connection; each load still gets its own row, and its own error.
//! (`COALESCE=off` sends every load alone, as the measurement baseline.)
//!
//! # Panics
//! A panic inside a database call (a bug in a driver) is caught and reported as
//! [`DbError::Panicked`] to that load's flight; the actor and its pool live on.
//!
//! # What is where
//! This file holds the actor, its messages and the batching; [`query`] opening connections, the
//! checkout and the query; [`failure`] what an error says about the server; [`reachability`]
//! whether it is down.

use std::collections::VecDeque;
use std::panic::AssertUnwindSafe;
use std::time::{Duration, Instant};

use actix::prelude::*;
use diesel_async::pooled_connection::bb8::Pool;
use diesel_async::pooled_connection::{AsyncDieselConnectionManager, ManagerConfig};
use diesel_async::AsyncPgConnection;
use futures_util::future::FutureExt;
use tokio::sync::oneshot;

use crate::config::Settings;
use crate::metrics::Metrics;
use crate::template::Template;
use crate::tls::PgConnector;
pub use failure::Evidence;
use query::PgPool;
use reachability::Reachability;
pub use reachability::Standing;
pub use sessions::Sessions;

pub mod failure;
mod query;
mod reachability;
mod sessions;

/// How often the actor updates the pool's gauges, and probes PostgreSQL while it is down.
const TICK: Duration = Duration::from_millis(500);

/// A service that asked nothing of PostgreSQL (or got no answer) for this long probes it, so
/// that what it says of it (`/readyz`, `db_available`) holds when nothing is being loaded too.
const QUIET_CHECK: Duration = Duration::from_secs(5);

/// How often bb8 reaps expired connections and tops the pool up to `min_idle`.
const REAPER_RATE: Duration = Duration::from_secs(1);

/// Why a load from PostgreSQL failed. Cloned to every waiter of the flight.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DbError {
    /// PostgreSQL is known to be down: failed at once, without waiting.
    #[error("{}", .0.describe())]
    Unavailable(Evidence),
    /// The flight's deadline passed while every connection was busy.
    #[error("no database connection became free within the {0:?} the load had left")]
    PoolTimeout(Duration),
    #[error("the query took longer than {0:?}")]
    QueryTimeout(Duration),
    #[error("the query failed: {0}")]
    Query(String),
    #[error("the database call panicked")]
    Panicked,
}

impl DbError {
    pub fn kind(&self) -> &'static str {
        match self {
            DbError::Unavailable(_) => "unavailable",
            DbError::PoolTimeout(_) => "pool_timeout",
            DbError::QueryTimeout(_) => "query_timeout",
            DbError::Query(_) => "query",
            DbError::Panicked => "panicked",
        }
    }

    /// Every kind, for metrics that should show zero before the first error.
    pub const KINDS: [&'static str; 5] = [
        "unavailable",
        "pool_timeout",
        "query_timeout",
        "query",
        "panicked",
    ];
}

/// Load one template by id: `Ok(None)` when no such row exists. Waiting for a connection and the
/// query end by `deadline` (the flight's).
#[derive(Debug, Message)]
#[rtype(result = "Result<Option<Template>, DbError>")]
pub struct FetchTemplate {
    pub id: i64,
    pub deadline: Instant,
}

/// Readiness: where PostgreSQL stands, as the actor's evidence and probes decided (no query of
/// its own: readiness checks must not load the database).
#[derive(Debug, Message)]
#[rtype(result = "Standing")]
pub struct PingDb;

/// Settings the DbActor needs; a subset of [`Settings`].
#[derive(Debug, Clone)]
pub struct DbSettings {
    /// How to open a connection: `DATABASE_URL` with its TLS set-up.
    pub postgres: PgConnector,
    pub pool_size: u32,
    /// Connections kept open when idle (at most `pool_size`).
    pub min_idle: u32,
    /// Longest time to open one connection (connect, authenticate, set up).
    pub connect_timeout: Duration,
    pub query_timeout: Duration,
    /// Most ids sent in one query; 1 sends every load alone.
    pub batch_max: usize,
    /// Whether loads run in transactions of their own (a transaction-mode pooler).
    pub sessions: Sessions,
}

impl DbSettings {
    pub fn new(s: &Settings, postgres: PgConnector, metrics: &Metrics) -> Self {
        DbSettings {
            sessions: Sessions::new(s.database_pooler, metrics),
            postgres,
            pool_size: s.db_pool_size,
            min_idle: s.db_pool_min_idle,
            connect_timeout: s.db_connect_timeout,
            query_timeout: s.db_query_timeout,
            // The baseline sends every load alone: batching would deduplicate at the database.
            batch_max: if s.coalesce { s.db_batch_max } else { 1 },
        }
    }
}

/// A load waiting to be sent, and where its row goes.
struct Waiting {
    id: i64,
    deadline: Instant,
    reply: oneshot::Sender<Result<Option<Template>, DbError>>,
}

pub struct DbActor {
    pool: PgPool,
    settings: DbSettings,
    metrics: Metrics,
    reachability: Reachability,
    /// Loads that arrived while `DB_POOL_SIZE` queries were in the air, oldest first.
    queue: VecDeque<Waiting>,
    /// Queries in the air (each on a connection of its own), at most `pool_size`.
    queries_in_flight: u32,
}

impl DbActor {
    /// Builds the pool and starts opening its `min_idle` connections in the background (start-up
    /// does not wait for them, so the service starts while PostgreSQL is still down). Must run on
    /// the thread (arbiter) the actor will live on, so that connections and their background
    /// tasks live there too.
    pub fn new(settings: DbSettings, metrics: Metrics) -> Self {
        // Every kind shows from the first scrape: dashboards and rate() see 0, not "no data".
        for kind in DbError::KINDS {
            metrics.db_errors_total.with_label_values(&[kind]);
        }
        let reachability = Reachability::new(metrics.clone());
        let mut config = ManagerConfig::<AsyncPgConnection>::default();
        let reach = reachability.clone();
        let for_pool = settings.clone();
        // bb8's URL is unused: every connection is opened by `postgres`, with its TLS set-up.
        config.custom_setup =
            Box::new(move |_url| query::pooled_setup(for_pool.clone(), reach.clone()));
        let manager =
            AsyncDieselConnectionManager::<AsyncPgConnection>::new_with_config("", config);
        let pool = Pool::builder()
            .max_size(settings.pool_size)
            .min_idle(Some(settings.min_idle.min(settings.pool_size)))
            // bb8's bound on one `get` and on retrying a failed connect. Loads bound their own
            // wait by their deadline (and ask again if this fires first); this only has to be
            // long enough for a slow server to be connected to.
            .connection_timeout(settings.connect_timeout)
            .reaper_rate(REAPER_RATE)
            // Broken connections are found without a round trip (see `checkout`); a test query
            // per checkout would double the round trips of every load.
            .test_on_check_out(false)
            .build_unchecked(manager);
        DbActor {
            pool,
            settings,
            metrics,
            reachability,
            queue: VecDeque::new(),
            queries_in_flight: 0,
        }
    }

    /// Sends what is queued while fewer than `pool_size` queries are in the air: each query
    /// takes the oldest loads, up to `batch_max` of them.
    fn dispatch(&mut self, ctx: &mut Context<Self>) {
        while self.queries_in_flight < self.settings.pool_size && !self.queue.is_empty() {
            let take = self.queue.len().min(self.settings.batch_max.max(1));
            let batch: Vec<Waiting> = self.queue.drain(..take).collect();
            self.queries_in_flight += 1;
            let (pool, settings) = (self.pool.clone(), self.settings.clone());
            let (metrics, reach) = (self.metrics.clone(), self.reachability.clone());
            let query =
                async move { query::run_batch(&pool, &settings, &metrics, &reach, batch).await };
            ctx.spawn(query.into_actor(self).map(|(), actor, ctx| {
                actor.queries_in_flight -= 1;
                actor.dispatch(ctx);
            }));
        }
    }

    /// Every [`TICK`]: the pool's gauges.
    fn tick(&mut self, _: &mut Context<Self>) {
        let state = self.pool.state();
        let idle = i64::from(state.idle_connections);
        let open = i64::from(state.connections);
        let gauge = &self.metrics.db_pool_connections;
        gauge.with_label_values(&["idle"]).set(idle);
        gauge.with_label_values(&["in_use"]).set(open - idle);
    }

    /// Settles every doubt about PostgreSQL with a probe: a connection of its own, opened as the
    /// pool opens one (a pooled one may be stuck behind a partition that a fresh connection
    /// would find healed, or still there). Suspect: one probe at once decides down or up. Down:
    /// a probe every [`TICK`] until one connects. Up but quiet for [`QUIET_CHECK`]: a probe
    /// whose failure is evidence, which the next probe confirms or not.
    fn probe_when_in_doubt(&self, ctx: &mut Context<Self>) {
        let reach = self.reachability.clone();
        let settings = self.settings.clone();
        let probing = async move {
            loop {
                let quiet = tokio::time::sleep(QUIET_CHECK.saturating_sub(reach.quiet_for()));
                let in_doubt = tokio::select! {
                    () = reach.until_in_doubt() => true,
                    () = quiet => false,
                };
                if !in_doubt && reach.quiet_for() < QUIET_CHECK {
                    continue;
                }
                match query::open(&settings).await {
                    // A quiet service's check: evidence, which the next probe settles.
                    Err((evidence, detail)) if !in_doubt => reach.saw(evidence, &detail),
                    Err((evidence, detail)) if evidence.against_the_server() => {
                        reach.confirm_down(evidence, &detail)
                    }
                    // Connected, or answered (a full server is there).
                    _ => reach.up(),
                }
                if reach.down().is_some() {
                    tokio::time::sleep(TICK).await;
                }
            }
        };
        ctx.spawn(probing.into_actor(self));
    }
}

impl Actor for DbActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        // Loads arrive from every owner at once; the default capacity (16) would make senders
        // wait on the mailbox rather than on the pool, whose own bound is the one that matters.
        ctx.set_mailbox_capacity(4096);
        ctx.run_interval(TICK, Self::tick);
        self.probe_when_in_doubt(ctx);
        // After a restart: what was queued before it is sent now.
        self.dispatch(ctx);
    }
}

/// The DbActor holds nothing a restart must rebuild (the pool is shared with its futures), so a
/// stop — which only a bug can cause, panics being caught — just starts it again.
impl Supervised for DbActor {
    fn restarting(&mut self, _: &mut Self::Context) {
        log::error!("the database actor stopped unexpectedly; restarting it");
        self.metrics
            .actor_restarts_total
            .with_label_values(&["db"])
            .inc();
        // Their futures were dropped with the old context: whatever they had taken is answered
        // by the closed channels; what is still queued is sent afresh.
        self.queries_in_flight = 0;
    }
}

impl Handler<FetchTemplate> for DbActor {
    type Result = ResponseFuture<Result<Option<Template>, DbError>>;

    fn handle(&mut self, msg: FetchTemplate, ctx: &mut Self::Context) -> Self::Result {
        let started = Instant::now();
        let (reply, row) = oneshot::channel();
        let known_down = self.reachability.down();
        match known_down {
            // Known down: failed at once, without queueing.
            Some(why) => drop(reply.send(Err(DbError::Unavailable(why)))),
            None => {
                self.queue.push_back(Waiting {
                    id: msg.id,
                    deadline: msg.deadline,
                    reply,
                });
                self.dispatch(ctx);
            }
        }
        let metrics = self.metrics.clone();
        Box::pin(async move {
            // A closed channel: the query's future was dropped mid-way, which only a panic (or
            // the actor's restart after one) does.
            let result = row.await.unwrap_or(Err(DbError::Panicked));
            metrics
                .db_query_duration_seconds
                .observe(started.elapsed().as_secs_f64());
            if let Err(e) = &result {
                metrics.db_errors_total.with_label_values(&[e.kind()]).inc();
                log::warn!("loading template {} failed: {e}", msg.id);
            }
            result
        })
    }
}

/// Turns a panic inside a database call into [`DbError::Panicked`] for its caller, instead of
/// taking the actor (and every other load in it) down.
pub async fn guard_panics<T>(
    call: impl std::future::Future<Output = Result<T, DbError>>,
) -> Result<T, DbError> {
    match AssertUnwindSafe(call).catch_unwind().await {
        Ok(result) => result,
        Err(_panic) => {
            log::error!("a database call panicked");
            Err(DbError::Panicked)
        }
    }
}

impl Handler<PingDb> for DbActor {
    type Result = MessageResult<PingDb>;

    fn handle(&mut self, _: PingDb, _: &mut Self::Context) -> Self::Result {
        MessageResult(self.reachability.standing())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[actix_rt::test]
    async fn a_panicking_call_is_reported_as_a_panic() {
        let result: Result<(), DbError> = guard_panics(async {
            if std::hint::black_box(true) {
                panic!("a driver bug");
            }
            Ok(())
        })
        .await;
        assert_eq!(result, Err(DbError::Panicked));
        assert_eq!(guard_panics(async { Ok(7) }).await, Ok(7));
    }
}
