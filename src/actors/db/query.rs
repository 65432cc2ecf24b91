//! The query side of the [`DbActor`](super::DbActor): opening a connection, checking one out,
//! and the one query the service runs, each failure reported as evidence
//! ([`super::failure`]) to the database's [`Reachability`].
//!
//! Nothing here leaves state on a server session (a pooler may hand the next transaction to
//! another client): the query's time bound is enforced by the service, which on expiry asks the
//! server over a connection of its own to cancel the query ([`PgConnector::cancel`]), as
//! `statement_timeout` would, instead of a session-level `SET statement_timeout`.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use diesel::connection::CacheSize;
use diesel::prelude::*;
use diesel_async::pooled_connection::bb8::{Pool, PooledConnection};
use diesel_async::pooled_connection::PoolableConnection;
use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};
use futures_util::future::{BoxFuture, FutureExt};
use tracing::field::Empty;
use tracing::{info_span, Instrument, Span};

use super::failure::Evidence;
use super::reachability::Reachability;
use super::replicas::Lsn;
use super::{guard_panics, DbError, DbSettings, Loaded, Waiting};
use crate::metrics::Metrics;
use crate::schema::templates;
use crate::template::Template;

pub(super) type PgPool = Pool<AsyncPgConnection>;

/// How long a load waits for a connection of a read replica before the primary takes it.
const REPLICA_PATIENCE: Duration = Duration::from_millis(250);

/// How long a checkout pauses after a connection attempt failed before it asks the pool again
/// (the pool then tries again to connect).
const RETRY_PAUSE: Duration = Duration::from_millis(50);

/// Whether a transaction of `in_session!` may write.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Writes {
    No,
    Yes,
}

/// `in_session!(conn, in_transaction, writes, |c| work)`: the future `work` (which uses the
/// connection as `c`) awaited as on a direct connection; in transaction mode (see
/// [`super::sessions`]) inside a transaction of its own (read-only unless it `Writes`), with the
/// statement cache off, so that its statements are prepared, run and closed on the one server
/// connection the transaction holds. (A macro: diesel-async's transaction takes an async
/// closure whose bounds cannot be named outside it.)
macro_rules! in_session {
    ($conn:expr, $in_transaction:expr, $writes:expr, |$c:ident| $work:expr) => {{
        let conn: &mut AsyncPgConnection = $conn;
        if $in_transaction {
            // A connection opened before a switch may hold cached statements: they are dropped
            // (and closed; closing one the server does not have is no error).
            conn.set_prepared_statement_cache_size(CacheSize::Disabled);
            let mut transaction = conn.build_transaction();
            if $writes == Writes::No {
                transaction = transaction.read_only();
            }
            transaction.run(async |$c| $work.await).await
        } else {
            let $c = conn;
            $work.await
        }
    }};
}

/// What a connection is opened for.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Opening {
    /// The pool: ready for loads, the template query prepared ahead where that lasts (not in
    /// transaction mode).
    Pool,
    /// A probe: whether the server takes connections, nothing more (a lock on the table, or a
    /// slow query, must not look like a server that is down). Through a transaction-mode pooler,
    /// which takes connections whether or not its server is there, also whether a `SELECT 1`
    /// gets through.
    Probe,
}

/// Opens one connection: in transaction mode (see [`super::sessions`]) with diesel-async's
/// set-up inside one transaction and nothing prepared ahead; otherwise, for the pool, with the
/// template query prepared (diesel-async caches prepared statements per connection, so the first
/// load on it costs one round trip, not two). In `auto` mode a set-up that fails on its own and
/// then works in transaction mode switches to it. The whole set-up is bounded by
/// `DB_CONNECT_TIMEOUT_MS`: a server that accepts and then stops answering must not hold a pool
/// slot for good. A failure comes with what it says about the server.
pub(super) async fn open(
    settings: &DbSettings,
    opening: Opening,
) -> Result<AsyncPgConnection, (Evidence, String)> {
    let sessions = &settings.sessions;
    let in_transaction = sessions.in_transactions();
    match open_as(settings, in_transaction, opening).await {
        Err((Evidence::QueryFailed, detail)) if sessions.retry_in_transaction(in_transaction) => {
            // Once more as it was (a transient error passes), then in transaction mode.
            if let Ok(conn) = open_as(settings, false, opening).await {
                return Ok(conn);
            }
            let conn = open_as(settings, true, opening).await?;
            sessions.switch(&detail);
            Ok(conn)
        }
        opened => opened,
    }
}

async fn open_as(
    settings: &DbSettings,
    in_transaction: bool,
    opening: Opening,
) -> Result<AsyncPgConnection, (Evidence, String)> {
    let timeout = settings.connect_timeout;
    let probing_a_pooler = opening == Opening::Probe && in_transaction;
    let setup = async {
        let connected = match in_transaction {
            true => settings.postgres.connect_in_transaction().await,
            false => settings.postgres.connect().await,
        };
        let mut conn = connected.map_err(|e| (Evidence::of_connect(&e), e.to_string()))?;
        if in_transaction {
            conn.set_prepared_statement_cache_size(CacheSize::Disabled);
        } else if opening == Opening::Pool {
            load_templates(&mut conn, &[0])
                .await
                .map_err(|e| (Evidence::of_query(&e), e.to_string()))?;
        }
        Ok(conn)
    };
    let conn = match tokio::time::timeout(timeout, setup).await {
        // A pooler that accepts the connection but fails its set-up may be answering for a
        // server that is not there: for a probe through one, that is what it found.
        Ok(Err((Evidence::QueryFailed, detail))) if probing_a_pooler => {
            return Err((Evidence::Unreachable, detail))
        }
        Ok(result) => result?,
        Err(_) => {
            return Err((
                Evidence::Unreachable,
                format!("connecting took longer than {timeout:?}"),
            ))
        }
    };
    match probing_a_pooler {
        true => select_one(conn, timeout).await,
        false => Ok(conn),
    }
}

/// A probe through a transaction-mode pooler, which took the connection: a `SELECT 1` through
/// it. Failed, the server behind it is gone; unanswered within `timeout`, the pooler's server
/// connections may just be busy (a slow database is not a failed one): inconclusive.
async fn select_one(
    mut conn: AsyncPgConnection,
    timeout: Duration,
) -> Result<AsyncPgConnection, (Evidence, String)> {
    conn.set_prepared_statement_cache_size(CacheSize::Disabled);
    let select = async {
        in_session!(&mut conn, true, Writes::No, |c| diesel::sql_query(
            "SELECT 1"
        )
        .execute(c))
    };
    match tokio::time::timeout(timeout, select).await {
        Ok(Ok(_)) => Ok(conn),
        Ok(Err(e)) => Err((
            Evidence::Unreachable,
            format!("SELECT 1 through the pooler: {e}"),
        )),
        Err(_) => Err((
            Evidence::Busy,
            format!("SELECT 1 through the pooler got no answer within {timeout:?}"),
        )),
    }
}

/// [`open`] as the pool's connection set-up (bb8 runs it in background tasks), recording what
/// it found in `reach`.
pub(super) fn pooled_setup(
    settings: DbSettings,
    reach: Reachability,
) -> BoxFuture<'static, diesel::ConnectionResult<AsyncPgConnection>> {
    async move {
        match open(&settings, Opening::Pool).await {
            Ok(conn) => {
                reach.up();
                Ok(conn)
            }
            Err((evidence, detail)) => {
                if evidence == Evidence::Busy {
                    log::warn!("PostgreSQL turned a connection away because it is full: {detail}");
                }
                reach.saw(evidence, &detail);
                Err(diesel::ConnectionError::BadConnection(detail))
            }
        }
    }
    .boxed()
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

/// The template query on `conn`; in transaction mode (see [`super::sessions`]) inside a
/// read-only transaction of its own, with the statement cache off (the statement is prepared,
/// run and closed on the one server connection the transaction holds).
async fn load(
    conn: &mut AsyncPgConnection,
    ids: &[i64],
    in_transaction: bool,
) -> QueryResult<Vec<Template>> {
    in_session!(conn, in_transaction, Writes::No, |c| load_templates(c, ids))
}

/// A pooled connection that is open, waited for until `deadline` — or an error at once while the
/// database is known to be down, and the moment it goes down.
async fn checkout<'a>(
    pool: &'a PgPool,
    settings: &DbSettings,
    reach: &Reachability,
    deadline: Instant,
) -> Result<PooledConnection<'a, AsyncPgConnection>, DbError> {
    let asked = Instant::now();
    // A replica's loads do not wait long for a connection: a healthy replica has one free for
    // every batch it is given, so a wait means its connections are being replaced, and the
    // primary takes the loads.
    let deadline = match settings.replica {
        true => deadline.min(asked + REPLICA_PATIENCE),
        false => deadline,
    };
    loop {
        if let Some(why) = reach.down() {
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
            // A connection attempt failed (its evidence is recorded): a full server is waited
            // for like a busy pool; a down one releases this wait as soon as a probe confirms it.
            // A replica's loads do not wait for it: the primary takes them.
            Ok(Err(bb8::RunError::User(_))) if settings.replica => {
                return Err(DbError::Unavailable(Evidence::Unreachable));
            }
            Ok(Err(bb8::RunError::User(_))) => {
                let pause = tokio::time::sleep_until((Instant::now() + RETRY_PAUSE).into());
                tokio::select! {
                    why = reach.until_down() => return Err(DbError::Unavailable(why)),
                    () = pause => continue,
                }
            }
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
/// its own row (with `replica_as_of_ms`, a replica's rows' age) — or, if the query failed, with
/// its error, unless this is a replica's batch: then the loads still within their deadline come
/// back, to be sent to the primary.
pub(super) async fn run_batch(
    pool: &PgPool,
    settings: &DbSettings,
    metrics: &Metrics,
    reach: &Reachability,
    batch: Vec<Waiting>,
    replica_as_of_ms: Option<u64>,
) -> Option<Vec<Waiting>> {
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
    let deadline = live.iter().map(|w| w.deadline).max()?;
    let ids: Vec<i64> = live.iter().map(|w| w.id).collect();
    let loads: Vec<Span> = live.iter().map(|w| w.span.clone()).collect();
    // Its log lines name the first load's request.
    let in_first = <[Span]>::first(&loads).cloned().unwrap_or_else(Span::none);
    let query = fetch(pool, settings, metrics, reach, &ids, &loads, deadline);
    let result = guard_panics(query).instrument(in_first).await;
    match result {
        Ok(rows) => {
            for waiting in live {
                // Cloned, not taken: one id may be in a batch twice (a superseded flight and the
                // one that replaced it), and both get the row.
                let row = rows.get(&waiting.id).cloned();
                let loaded = Loaded {
                    row,
                    replica_as_of_ms,
                };
                let _ = waiting.reply.send(Ok(loaded));
            }
        }
        Err(e) if settings.replica => {
            log::warn!("a read replica failed a load ({e}); the primary takes it");
            let now = Instant::now();
            return Some(live.into_iter().filter(|w| w.deadline > now).collect());
        }
        Err(e) => {
            for waiting in live {
                let _ = waiting.reply.send(Err(e.clone()));
            }
        }
    }
    None
}

/// One query for `ids`: the rows found, by id. The query is bounded by `DB_QUERY_TIMEOUT_MS`
/// (or the deadline, if sooner); when that runs out the server is asked to cancel it, and a
/// probe settles whether the server is slow (it connects) or gone (it does not). Each load's
/// span (`loads`) gets a `pool.checkout` and a `db.query` span of the batch's.
async fn fetch(
    pool: &PgPool,
    settings: &DbSettings,
    metrics: &Metrics,
    reach: &Reachability,
    ids: &[i64],
    loads: &[Span],
    deadline: Instant,
) -> Result<HashMap<i64, Template>, DbError> {
    let checking_out: Vec<Span> = loads
        .iter()
        .map(|load| info_span!(parent: load, "pool.checkout", db.replica = settings.replica))
        .collect();
    let mut conn = checkout(pool, settings, reach, deadline).await?;
    drop(checking_out);
    let batch = ids.len();
    let querying: Vec<Span> = loads
        .iter()
        .map(|load| {
            info_span!(parent: load, "db.query", db.replica = settings.replica,
                       db.batch.size = batch, otel.status_code = Empty, error = Empty)
        })
        .collect();
    let failed = |why: &dyn std::fmt::Display| {
        for span in &querying {
            span.record("otel.status_code", "ERROR");
            span.record("error", tracing::field::display(why));
        }
    };
    metrics.db_hits_total.inc();
    metrics.db_keys_per_query.observe(ids.len() as f64);
    let left = deadline.saturating_duration_since(Instant::now());
    let bound = settings.query_timeout.min(left);
    let cancel = conn.cancel_token();
    let sessions = &settings.sessions;
    let in_transaction = sessions.in_transactions();
    let load = async {
        match load(&mut conn, ids, in_transaction).await {
            // A load that fails on its own on what may be a transaction-mode pooler: once more
            // as it was (a transient error passes), then in transaction mode, which stays if
            // that works.
            Err(e)
                if sessions.retry_in_transaction(in_transaction)
                    && Evidence::of_query(&e) == Evidence::QueryFailed =>
            {
                if let Ok(rows) = load(&mut conn, ids, false).await {
                    return Ok(rows);
                }
                let rows = load(&mut conn, ids, true).await?;
                sessions.switch(&e.to_string());
                Ok(rows)
            }
            loaded => loaded,
        }
    };
    match tokio::time::timeout(bound, load).await {
        Ok(Ok(rows)) => {
            reach.up();
            Ok(rows.into_iter().map(|t| (t.id, t)).collect())
        }
        Ok(Err(e)) => {
            let detail = e.to_string();
            failed(&detail);
            let evidence = match Evidence::of_query(&e) {
                // The server ended the session with its error (a shutdown, `57P01`): not the
                // query's own failure. Through a transaction-mode pooler, which keeps the
                // client's connection whatever happens to its server, any failure may be the
                // server gone; either way a probe settles it.
                Evidence::QueryFailed
                    if in_transaction || PoolableConnection::is_broken(&mut *conn) =>
                {
                    Evidence::Unreachable
                }
                evidence => evidence,
            };
            reach.saw(evidence, &detail);
            Err(DbError::Query(detail))
        }
        Err(_) => {
            failed(&format_args!("no answer within {bound:?}"));
            // A query unanswered for its whole bound is evidence to check (not a verdict): the
            // probe it starts connects at once to a server that is only slow, and finds out
            // within its connect timeout about one that is gone. (A load that ran out of its
            // flight's time first says nothing about the server.)
            if bound == settings.query_timeout {
                let detail = format!("a query got no answer within {bound:?}");
                reach.saw(Evidence::Unreachable, &detail);
            }
            // The server's work is cancelled in the background: the waiters are answered now.
            let (postgres, reach) = (settings.postgres.clone(), reach.clone());
            let patience = settings.connect_timeout;
            actix_rt::spawn(async move {
                match tokio::time::timeout(patience, postgres.cancel(&cancel)).await {
                    Ok(Ok(())) => {}
                    Ok(Err(detail)) => reach.saw(Evidence::Unreachable, &detail),
                    Err(_) => reach.saw(Evidence::Unreachable, "a cancel request went unanswered"),
                }
            });
            Err(DbError::QueryTimeout(bound))
        }
    }
}

/// `pg_notify(channel, payload)` on a pooled connection (in a transaction of its own in
/// transaction mode: a notification goes out at commit), within `DB_QUERY_TIMEOUT_MS`.
pub(super) async fn notify(
    pool: &PgPool,
    settings: &DbSettings,
    reach: &Reachability,
    channel: &str,
    payload: &str,
) -> Result<(), DbError> {
    let deadline = Instant::now() + settings.query_timeout;
    let mut conn = checkout(pool, settings, reach, deadline).await?;
    let (channel, payload) = (channel.to_owned(), payload.to_owned());
    let notify = move || {
        diesel::sql_query("SELECT pg_notify($1, $2)")
            .bind::<diesel::sql_types::Text, _>(channel)
            .bind::<diesel::sql_types::Text, _>(payload)
    };
    let in_transaction = settings.sessions.in_transactions();
    let sent = async {
        in_session!(&mut conn, in_transaction, Writes::Yes, |c| notify()
            .execute(c))
    };
    match tokio::time::timeout_at(deadline.into(), sent).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(DbError::Query(e.to_string())),
        Err(_) => Err(DbError::QueryTimeout(settings.query_timeout)),
    }
}

/// The primary's current WAL position: where it inserts (ahead of where it has written, which
/// with `synchronous_commit=off` may still be short of a commit whose notice has arrived).
pub(super) const CURRENT: &str =
    "SELECT (pg_current_wal_insert_lsn() - '0/0'::pg_lsn)::bigint AS lsn";

/// A replica's replayed WAL position; -1 from a server that is not in recovery (not a standby:
/// its positions are not the primary's).
pub(super) const REPLAYED: &str = "SELECT CASE WHEN pg_is_in_recovery() \
     THEN (COALESCE(pg_last_wal_replay_lsn(), '0/0') - '0/0'::pg_lsn)::bigint \
     ELSE -1 END AS lsn";

#[derive(diesel::QueryableByName)]
struct Position {
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    lsn: i64,
}

/// A WAL position, read with `sql` ([`CURRENT`] or [`REPLAYED`]) on a pooled connection within
/// `DB_QUERY_TIMEOUT_MS`; `None` for a read URL that is not a standby.
pub(super) async fn position(
    pool: &PgPool,
    settings: &DbSettings,
    reach: &Reachability,
    sql: &'static str,
) -> Result<Option<Lsn>, DbError> {
    let deadline = Instant::now() + settings.query_timeout;
    let mut conn = checkout(pool, settings, reach, deadline).await?;
    let in_transaction = settings.sessions.in_transactions();
    let read = async {
        in_session!(&mut conn, in_transaction, Writes::No, |c| {
            diesel::sql_query(sql).get_result::<Position>(c)
        })
    };
    match tokio::time::timeout_at(deadline.into(), read).await {
        Ok(Ok(at)) => Ok(Lsn::try_from(at.lsn).ok()),
        Ok(Err(e)) => Err(DbError::Query(e.to_string())),
        Err(_) => Err(DbError::QueryTimeout(settings.query_timeout)),
    }
}
