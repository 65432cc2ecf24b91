//! Embedded diesel migrations, applied at start-up so one command brings up a working service.
//!
//! diesel's migration harness is synchronous. diesel-async's `AsyncConnectionWrapper` bridges it
//! by blocking on a runtime of its own, which panics if called on actix's (single-threaded)
//! runtime thread — so migrations run on a plain thread of their own, and start-up awaits it.
//! The connection is opened like every other ([`PgConnector`], with `sslmode`'s TLS) on a small
//! runtime owned by that thread, which also drives the connection while the wrapper blocks on it.
//!
//! Replicas started together (compose, a Kubernetes Deployment) all migrate at start. diesel
//! takes no lock of its own: on an empty database two of them both see no migration applied,
//! both run the first one, and the loser fails (`relation already exists`, or a duplicate key in
//! `__diesel_schema_migrations`). So each run holds a PostgreSQL advisory lock
//! ([`MIGRATION_LOCK_KEY`]) on its migration connection: one replica migrates at a time, and the
//! ones that waited find nothing pending. The lock is per session, so a replica that dies while
//! holding it releases it with its connection.

use std::time::{Duration, Instant};

use diesel::sql_types::BigInt;
use diesel::RunQueryDsl;
use diesel_async::async_connection_wrapper::AsyncConnectionWrapper;
use diesel_async::AsyncPgConnection;
use diesel_migrations::{embed_migrations, EmbeddedMigrations, MigrationHarness};

use crate::actors::db::Evidence;
use crate::tls::PgConnector;

pub const MIGRATIONS: EmbeddedMigrations = embed_migrations!("migrations");

/// The advisory lock key that serializes migrations across replicas sharing a database
/// ("sfmigrat" in ASCII). Advisory keys are one namespace per database, shared with anything
/// else using advisory locks there; this one is used for nothing else.
pub const MIGRATION_LOCK_KEY: i64 = 0x7366_6d69_6772_6174;

/// Applies pending migrations, retrying while PostgreSQL is not yet reachable (it may still be
/// starting next to us) until `patience` has passed. Returns how many migrations ran.
pub async fn run_pending(postgres: &PgConnector, patience: Duration) -> Result<usize, String> {
    let postgres = postgres.clone();
    let (done, result) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("migrations".into())
        .spawn(move || {
            let _ = done.send(migrate_with_retries(&postgres, patience));
        })
        .map_err(|e| format!("cannot start the migration thread: {e}"))?;
    result
        .await
        .map_err(|_| "the migration thread died".to_owned())?
}

fn migrate_with_retries(postgres: &PgConnector, patience: Duration) -> Result<usize, String> {
    // Multi-threaded (one worker), not current-thread: the wrapper blocks on this runtime's
    // handle, and only a worker thread can drive the connection's task meanwhile.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the migration runtime: {e}"))?;
    // Entered, so that the wrapper made below takes this runtime's handle.
    let _entered = runtime.enter();
    let started = Instant::now();
    loop {
        match runtime.block_on(postgres.connect()) {
            Ok(conn) => {
                let mut conn = AsyncConnectionWrapper::<AsyncPgConnection>::from(conn);
                return migrate_holding_lock(&mut conn);
            }
            // Credentials, a database name or a certificate that were turned away will be turned
            // away again: say so now.
            Err(e)
                if Evidence::of_connect(&e) == Evidence::Rejected
                    || started.elapsed() >= patience =>
            {
                return Err(format!("cannot connect to PostgreSQL at DATABASE_URL: {e}"));
            }
            Err(e) => {
                log::info!("waiting for PostgreSQL ({e})");
                std::thread::sleep(Duration::from_millis(500));
            }
        }
    }
}

/// Runs the pending migrations while holding [`MIGRATION_LOCK_KEY`] on `conn`. Waiting for the
/// lock has no bound of its own: the holder is another replica migrating the same database, and
/// its lock ends with its migration or its connection.
fn migrate_holding_lock(
    conn: &mut AsyncConnectionWrapper<AsyncPgConnection>,
) -> Result<usize, String> {
    let lock = |function: &str, conn: &mut AsyncConnectionWrapper<AsyncPgConnection>| {
        diesel::sql_query(format!("SELECT {function}($1)"))
            .bind::<BigInt, _>(MIGRATION_LOCK_KEY)
            .execute(conn)
            .map_err(|e| format!("{function} for the migration lock failed: {e}"))
    };
    lock("pg_advisory_lock", conn)?;
    let applied = conn
        .run_pending_migrations(MIGRATIONS)
        .map(|applied| applied.len())
        .map_err(|e| format!("applying migrations failed: {e}"));
    // Released at once, not when the connection closes, so that a waiting replica does not also
    // wait for this connection's teardown. Were the unlock to fail, closing the connection (it
    // is dropped by the caller) releases the lock all the same, so the migration's own result
    // is what counts.
    if let Err(e) = lock("pg_advisory_unlock", conn) {
        log::warn!("{e}; the lock is released when the migration connection closes");
    }
    applied
}
