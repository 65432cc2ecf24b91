//! `DbActor`: owns the bb8 pool of diesel-async PostgreSQL connections.
//!
//! # A slow database is not a failed one
//! Connections are opened *off* the request path: the pool keeps `DB_POOL_MIN_IDLE` of them open
//! (bb8 `min_idle`), opens them when the actor starts, and replaces broken or expired ones in the
//! background (its reaper runs every second). Opening one — connect, authenticate, set
//! `statement_timeout`, prepare the template query — has a bound of its own
//! (`DB_CONNECT_TIMEOUT_MS`), long enough for a server far away. So a burst after an idle period
//! finds the connections ready, and pays one round trip per query.
//!
//! A load waits for a free connection for as long as its flight has left ([`FetchTemplate`]
//! carries the deadline), not for a fixed time: a busy pool on a slow network is waited for; only
//! the flight's own deadline (and each request's, in the handler) bounds it. A checked-out
//! connection that closed meanwhile (a server restart) is dropped without a round trip and
//! another one taken. Each query is bounded twice: by the server's `statement_timeout`
//! (`DB_QUERY_TIMEOUT_MS`), which cancels the work and leaves the connection usable, and by a
//! client-side timeout a little longer, which frees the caller even if the server never answers.
//!
//! # Failing fast where the database is known to be down
//! [`reachability`] records what the last attempts said: a connection attempt that fails (refused,
//! reset, or no answer within the connect timeout), or a query the server never answered, marks
//! PostgreSQL *down*; the next connection opened or query answered marks it up again. While it is
//! down, loads fail at once ([`DbError::Unavailable`]) — the owners then answer with a value they
//! remember (`STALE`) or `503` — and a load already waiting for a connection is released the moment
//! it goes down. Every half second the actor tries a fresh connection (and bb8 its
//! replenishment), so recovery is noticed without any request paying for the probe. A server
//! that is merely full ("too many clients") is not down: it is waited for like a busy pool.
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

use std::collections::{HashMap, VecDeque};
use std::panic::AssertUnwindSafe;
use std::time::{Duration, Instant};

use actix::prelude::*;
use diesel::prelude::*;
use diesel_async::pooled_connection::bb8::{Pool, PooledConnection};
use diesel_async::pooled_connection::{
    AsyncDieselConnectionManager, ManagerConfig, PoolableConnection,
};
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use futures_util::future::{BoxFuture, FutureExt};
use tokio::sync::oneshot;

use crate::config::Settings;
use crate::metrics::Metrics;
use crate::schema::templates;
use crate::template::Template;
use crate::tls::PgConnector;
use reachability::Reachability;

mod reachability;

/// Slack over `statement_timeout` for the client-side bound, so that the server's own
/// cancellation (which leaves the connection usable) normally wins.
const CLIENT_SLACK: Duration = Duration::from_millis(100);

/// How often the actor looks at the pool: gauges, and a connection attempt while down.
const TICK: Duration = Duration::from_millis(500);

/// How often bb8 reaps expired connections and tops the pool up to `min_idle`.
const REAPER_RATE: Duration = Duration::from_secs(1);

/// Why a load from PostgreSQL failed. Cloned to every waiter of the flight.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DbError {
    /// PostgreSQL is known to be unreachable: failed at once, without waiting.
    #[error("the database is unreachable ({0})")]
    Unavailable(String),
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

/// Readiness probe: one `SELECT 1` through the pool, bounded by the given timeout; fails at once
/// while the database is known to be down.
#[derive(Debug, Message)]
#[rtype(result = "Result<(), DbError>")]
pub struct PingDb(pub Duration);

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
}

impl DbSettings {
    pub fn new(s: &Settings, postgres: PgConnector) -> Self {
        DbSettings {
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

type PgPool = Pool<AsyncPgConnection>;

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
    /// A connection attempt made by [`DbActor::tick`] while down is still in the air.
    probing: bool,
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
        let (connect_timeout, statement_timeout_ms) =
            (settings.connect_timeout, settings.query_timeout.as_millis());
        let reach = reachability.clone();
        let postgres = settings.postgres.clone();
        // bb8's URL is unused: every connection is opened by `postgres`, with its TLS set-up.
        config.custom_setup = Box::new(move |_url| {
            connect(
                postgres.clone(),
                connect_timeout,
                statement_timeout_ms,
                reach.clone(),
            )
            .boxed()
        });
        let manager =
            AsyncDieselConnectionManager::<AsyncPgConnection>::new_with_config("", config);
        let pool = Pool::builder()
            .max_size(settings.pool_size)
            .min_idle(Some(settings.min_idle.min(settings.pool_size)))
            // bb8's bound on one `get` and on retrying a failed connect. Loads bound their own
            // wait by their deadline (and ask again if this fires first); this only has to be
            // long enough for a slow server to be connected to.
            .connection_timeout(connect_timeout)
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
            probing: false,
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
            let query = async move { run_batch(&pool, &settings, &metrics, &reach, batch).await };
            ctx.spawn(query.into_actor(self).map(|(), actor, ctx| {
                actor.queries_in_flight -= 1;
                actor.dispatch(ctx);
            }));
        }
    }

    /// Every [`TICK`]: pool gauges; while down, one connection attempt in the background (its
    /// outcome is recorded by the connection set-up).
    fn tick(&mut self, ctx: &mut Context<Self>) {
        let state = self.pool.state();
        let idle = i64::from(state.idle_connections);
        let open = i64::from(state.connections);
        let gauge = &self.metrics.db_pool_connections;
        gauge.with_label_values(&["idle"]).set(idle);
        gauge.with_label_values(&["in_use"]).set(open - idle);
        if self.probing || self.reachability.why_down().is_none() {
            return;
        }
        self.probing = true;
        let pool = self.pool.clone();
        ctx.spawn(
            async move {
                // A dedicated connection: a pooled one may be stuck behind a partition that a
                // fresh connection would find healed (or still there).
                drop(pool.dedicated_connection().await);
            }
            .into_actor(self)
            .map(|(), actor, _| actor.probing = false),
        );
    }
}

/// Opens one connection: connect, set its server-side `statement_timeout`, and prepare the
/// template query (diesel-async caches prepared statements per connection, so the first load on
/// it costs one round trip, not two). Records the outcome in `reach`.
fn connect(
    postgres: PgConnector,
    timeout: Duration,
    statement_timeout_ms: u128,
    reach: Reachability,
) -> BoxFuture<'static, diesel::ConnectionResult<AsyncPgConnection>> {
    // The whole set-up is bounded, not only the connect: a server that accepts and then stops
    // answering must not hold a pool slot for good.
    let setup = async move {
        let mut conn = postgres.connect().await?;
        diesel::sql_query(format!("SET statement_timeout = {statement_timeout_ms}"))
            .execute(&mut conn)
            .await
            .map_err(diesel::ConnectionError::CouldntSetupConfiguration)?;
        load_templates(&mut conn, &[0])
            .await
            .map_err(diesel::ConnectionError::CouldntSetupConfiguration)?;
        Ok(conn)
    };
    async move {
        let result = match tokio::time::timeout(timeout, setup).await {
            Ok(result) => result,
            Err(_) => Err(diesel::ConnectionError::BadConnection(format!(
                "connecting took longer than {timeout:?}"
            ))),
        };
        match &result {
            Ok(_) => reach.up(),
            Err(e) if is_server_full(&e.to_string()) => {
                log::warn!("PostgreSQL refused a connection because it is full: {e}")
            }
            Err(e) => reach.down(e.to_string()),
        }
        result
    }
    .boxed()
}

/// "Too many clients" is a busy server, not an unreachable one.
fn is_server_full(message: &str) -> bool {
    message.contains("too many") || message.contains("connection slots")
}

/// The one query this service runs (`WHERE id = ANY($1)`: one statement for any number of ids),
/// used by loads and by the connection set-up alike, so that the set-up prepares exactly the
/// statement loads will use.
async fn load_templates(conn: &mut AsyncPgConnection, ids: &[i64]) -> QueryResult<Vec<Template>> {
    templates::table
        .filter(templates::id.eq_any(ids))
        .select(Template::as_select())
        .load(conn)
        .await
}

impl Actor for DbActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        // Loads arrive from every owner at once; the default capacity (16) would make senders
        // wait on the mailbox rather than on the pool, whose own bound is the one that matters.
        ctx.set_mailbox_capacity(4096);
        ctx.run_interval(TICK, Self::tick);
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
        self.probing = false;
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
        let known_down = self.reachability.why_down();
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

/// A pooled connection that is open, waited for until `deadline` — or an error at once while the
/// database is known to be down.
async fn checkout<'a>(
    pool: &'a PgPool,
    reach: &Reachability,
    deadline: Instant,
) -> Result<PooledConnection<'a, AsyncPgConnection>, DbError> {
    let asked = Instant::now();
    loop {
        if let Some(why) = reach.why_down() {
            return Err(DbError::Unavailable(why));
        }
        let wait = tokio::time::timeout_at(deadline.into(), pool.get());
        let got = tokio::select! {
            why = reach.until_down() => return Err(DbError::Unavailable(why)),
            got = wait => got,
        };
        match got {
            Err(_deadline) => return Err(DbError::PoolTimeout(asked.elapsed())),
            // bb8's own bound fired first: ask again while the deadline allows.
            Ok(Err(bb8::RunError::TimedOut)) => continue,
            Ok(Err(bb8::RunError::User(e))) => return Err(DbError::Unavailable(e.to_string())),
            Ok(Ok(mut conn)) => {
                if PoolableConnection::is_broken(&mut *conn) {
                    // Closed under us (a server restart): dropping it makes bb8 discard and
                    // replace it; take another.
                    continue;
                }
                return Ok(conn);
            }
        }
    }
}

/// Sends one query for every load of `batch` still within its deadline, and answers each with
/// its own row (or the query's error).
async fn run_batch(
    pool: &PgPool,
    settings: &DbSettings,
    metrics: &Metrics,
    reach: &Reachability,
    batch: Vec<Waiting>,
) {
    let now = Instant::now();
    let (live, late): (Vec<Waiting>, Vec<Waiting>) =
        batch.into_iter().partition(|w| w.deadline > now);
    for waiting in late {
        let _ = waiting
            .reply
            .send(Err(DbError::PoolTimeout(Duration::ZERO)));
    }
    // Waited for as long as the most patient load allows; the others leave at their own
    // deadline on the owner's side, and a row that arrives for them still fills the cache.
    let Some(deadline) = live.iter().map(|w| w.deadline).max() else {
        return;
    };
    let ids: Vec<i64> = live.iter().map(|w| w.id).collect();
    let result = guard_panics(fetch(pool, settings, metrics, reach, &ids, deadline)).await;
    match result {
        Ok(rows) => {
            for waiting in live {
                // Cloned, not taken: one id may be in a batch twice (a superseded flight and the
                // one that replaced it), and both get the row.
                let row = rows.get(&waiting.id).cloned();
                let _ = waiting.reply.send(Ok(row));
            }
        }
        Err(e) => {
            for waiting in live {
                let _ = waiting.reply.send(Err(e.clone()));
            }
        }
    }
}

/// One query for `ids`: the rows found, by id.
async fn fetch(
    pool: &PgPool,
    settings: &DbSettings,
    metrics: &Metrics,
    reach: &Reachability,
    ids: &[i64],
    deadline: Instant,
) -> Result<HashMap<i64, Template>, DbError> {
    let mut conn = checkout(pool, reach, deadline).await?;
    metrics.db_hits_total.inc();
    metrics.db_keys_per_query.observe(ids.len() as f64);
    let left = deadline.saturating_duration_since(Instant::now());
    let silent_server = settings.query_timeout + CLIENT_SLACK;
    match tokio::time::timeout(silent_server.min(left), load_templates(&mut conn, ids)).await {
        Err(_) if left < silent_server => Err(DbError::QueryTimeout(left)),
        Err(_) => {
            // Not even statement_timeout answered: the server is not reachable.
            reach.down(format!("no answer to a query within {silent_server:?}"));
            Err(DbError::QueryTimeout(settings.query_timeout))
        }
        Ok(Ok(rows)) => {
            reach.up();
            Ok(rows.into_iter().map(|t| (t.id, t)).collect())
        }
        Ok(Err(e)) if is_statement_timeout(&e) => {
            Err(DbError::QueryTimeout(settings.query_timeout))
        }
        Ok(Err(e)) => Err(DbError::Query(e.to_string())),
    }
}

fn is_statement_timeout(e: &diesel::result::Error) -> bool {
    e.to_string().contains("statement timeout")
}

impl Handler<PingDb> for DbActor {
    type Result = ResponseFuture<Result<(), DbError>>;

    fn handle(&mut self, PingDb(timeout): PingDb, _: &mut Self::Context) -> Self::Result {
        let (pool, reach) = (self.pool.clone(), self.reachability.clone());
        Box::pin(guard_panics(async move {
            let deadline = Instant::now() + timeout;
            let mut conn = checkout(&pool, &reach, deadline).await?;
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, diesel::sql_query("SELECT 1").execute(&mut conn)).await
            {
                Err(_) => Err(DbError::QueryTimeout(timeout)),
                Ok(Err(e)) => Err(DbError::Query(e.to_string())),
                Ok(Ok(_)) => Ok(()),
            }
        }))
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

    #[test]
    fn a_full_server_is_not_a_down_one() {
        assert!(is_server_full("FATAL: sorry, too many clients already"));
        assert!(is_server_full(
            "FATAL: remaining connection slots are reserved for roles with the SUPERUSER attribute"
        ));
        assert!(!is_server_full(
            "error connecting to server: Connection refused (os error 111)"
        ));
    }
}
