//! `DbActor`: owns the bb8 pool of diesel-async PostgreSQL connections.
//!
//! Every wait on the database is bounded: acquiring a pooled connection
//! (`DB_ACQUIRE_TIMEOUT_MS`; bb8's own default of 30 s is far too long for a request path) and
//! running a query (`DB_QUERY_TIMEOUT_MS`, enforced on both sides: the server's
//! `statement_timeout` cancels the work, the client-side timeout frees the caller even if the
//! server never answers). Building the pool opens no connection, so the service starts while
//! PostgreSQL is still down and connects when it comes up.

use std::time::{Duration, Instant};

use actix::prelude::*;
use diesel::prelude::*;
use diesel_async::pooled_connection::bb8::Pool;
use diesel_async::pooled_connection::{AsyncDieselConnectionManager, ManagerConfig};
use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};
use futures_util::future::{BoxFuture, FutureExt};

use crate::metrics::Metrics;
use crate::schema::templates;
use crate::template::Template;

/// Why a load from PostgreSQL failed. Cloned to every waiter of the flight.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DbError {
    #[error("no database connection became free within {0:?}")]
    PoolTimeout(Duration),
    #[error("cannot connect to the database: {0}")]
    Connect(String),
    #[error("the query took longer than {0:?}")]
    QueryTimeout(Duration),
    #[error("the query failed: {0}")]
    Query(String),
}

impl DbError {
    fn kind(&self) -> &'static str {
        match self {
            DbError::PoolTimeout(_) => "pool_timeout",
            DbError::Connect(_) => "connect",
            DbError::QueryTimeout(_) => "query_timeout",
            DbError::Query(_) => "query",
        }
    }
}

/// Load one template by id: `Ok(None)` when no such row exists.
#[derive(Debug, Message)]
#[rtype(result = "Result<Option<Template>, DbError>")]
pub struct FetchTemplate(pub i64);

/// Readiness probe: one `SELECT 1` through the pool, bounded by the given timeout.
#[derive(Debug, Message)]
#[rtype(result = "Result<(), DbError>")]
pub struct PingDb(pub Duration);

/// Settings the DbActor needs; a subset of [`crate::config::Settings`].
#[derive(Debug, Clone)]
pub struct DbSettings {
    pub database_url: String,
    pub pool_size: u32,
    pub acquire_timeout: Duration,
    pub query_timeout: Duration,
}

type PgPool = Pool<AsyncPgConnection>;

pub struct DbActor {
    pool: PgPool,
    settings: DbSettings,
    metrics: Metrics,
}

impl DbActor {
    /// Builds the pool without connecting. Must run on the thread (arbiter) the actor will live
    /// on, so that connections and their background tasks live there too.
    pub fn new(settings: DbSettings, metrics: Metrics) -> Self {
        let statement_timeout_ms = settings.query_timeout.as_millis();
        let connect_timeout = settings.acquire_timeout;
        let mut config = ManagerConfig::<AsyncPgConnection>::default();
        config.custom_setup = Box::new(move |url| {
            connect(url.to_owned(), connect_timeout, statement_timeout_ms).boxed()
        });
        let manager = AsyncDieselConnectionManager::<AsyncPgConnection>::new_with_config(
            &settings.database_url,
            config,
        );
        let pool = Pool::builder()
            .max_size(settings.pool_size)
            .connection_timeout(settings.acquire_timeout)
            // Broken connections are found when used; a test query per checkout would double the
            // round trips of every load.
            .test_on_check_out(false)
            .build_unchecked(manager);
        DbActor {
            pool,
            settings,
            metrics,
        }
    }
}

/// Opens one connection and sets its server-side `statement_timeout`.
fn connect(
    url: String,
    timeout: Duration,
    statement_timeout_ms: u128,
) -> BoxFuture<'static, diesel::ConnectionResult<AsyncPgConnection>> {
    // The whole setup is bounded, not only the connect: bb8 puts no limit on a connection being
    // made, and a server that accepts and then stops answering would hold a pool slot for good.
    let setup = async move {
        let mut conn = AsyncPgConnection::establish(&url).await?;
        diesel::sql_query(format!("SET statement_timeout = {statement_timeout_ms}"))
            .execute(&mut conn)
            .await
            .map_err(diesel::ConnectionError::CouldntSetupConfiguration)?;
        Ok(conn)
    };
    async move {
        tokio::time::timeout(timeout, setup).await.map_err(|_| {
            diesel::ConnectionError::BadConnection(format!(
                "connecting took longer than {timeout:?}"
            ))
        })?
    }
    .boxed()
}

impl Actor for DbActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        // Loads arrive from every owner at once; the default capacity (16) would make senders
        // wait on the mailbox rather than on the pool, whose own bound is the one that matters.
        ctx.set_mailbox_capacity(4096);
    }
}

impl Handler<FetchTemplate> for DbActor {
    type Result = ResponseFuture<Result<Option<Template>, DbError>>;

    fn handle(&mut self, FetchTemplate(id): FetchTemplate, _: &mut Self::Context) -> Self::Result {
        let pool = self.pool.clone();
        let metrics = self.metrics.clone();
        let settings = self.settings.clone();
        Box::pin(async move {
            let started = Instant::now();
            let result = fetch(&pool, &settings, &metrics, id).await;
            metrics
                .db_query_duration_seconds
                .observe(started.elapsed().as_secs_f64());
            if let Err(e) = &result {
                metrics.db_errors_total.with_label_values(&[e.kind()]).inc();
                log::warn!("loading template {id} failed: {e}");
            }
            result
        })
    }
}

async fn fetch(
    pool: &PgPool,
    settings: &DbSettings,
    metrics: &Metrics,
    id: i64,
) -> Result<Option<Template>, DbError> {
    let mut conn = pool
        .get()
        .await
        .map_err(|e| pool_error(e, settings.acquire_timeout))?;
    metrics.db_hits_total.inc();
    let query = templates::table
        .find(id)
        .select(Template::as_select())
        .first(&mut conn);
    // A little slack over statement_timeout so that the server's own cancellation, which leaves
    // the connection usable, normally wins.
    let client_timeout = settings.query_timeout + Duration::from_millis(100);
    match tokio::time::timeout(client_timeout, query).await {
        Err(_) => Err(DbError::QueryTimeout(settings.query_timeout)),
        Ok(Ok(t)) => Ok(Some(t)),
        Ok(Err(diesel::result::Error::NotFound)) => Ok(None),
        Ok(Err(e)) if is_statement_timeout(&e) => {
            Err(DbError::QueryTimeout(settings.query_timeout))
        }
        Ok(Err(e)) => Err(DbError::Query(e.to_string())),
    }
}

fn is_statement_timeout(e: &diesel::result::Error) -> bool {
    e.to_string().contains("statement timeout")
}

fn pool_error(
    e: bb8::RunError<diesel_async::pooled_connection::PoolError>,
    acquire_timeout: Duration,
) -> DbError {
    match e {
        bb8::RunError::TimedOut => DbError::PoolTimeout(acquire_timeout),
        bb8::RunError::User(e) => DbError::Connect(e.to_string()),
    }
}

impl Handler<PingDb> for DbActor {
    type Result = ResponseFuture<Result<(), DbError>>;

    fn handle(&mut self, PingDb(timeout): PingDb, _: &mut Self::Context) -> Self::Result {
        let pool = self.pool.clone();
        Box::pin(async move {
            let ping = async {
                let mut conn = pool.get().await.map_err(|e| pool_error(e, timeout))?;
                diesel::sql_query("SELECT 1")
                    .execute(&mut conn)
                    .await
                    .map_err(|e| DbError::Query(e.to_string()))
            };
            match tokio::time::timeout(timeout, ping).await {
                Err(_) => Err(DbError::QueryTimeout(timeout)),
                Ok(r) => r.map(|_| ()),
            }
        })
    }
}
