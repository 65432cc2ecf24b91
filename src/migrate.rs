//! Embedded diesel migrations, applied at start-up so one command brings up a working service.
//!
//! diesel's migration harness is synchronous. diesel-async's `AsyncConnectionWrapper` bridges it
//! by blocking on a runtime of its own, which panics if called on actix's (single-threaded)
//! runtime thread — so migrations run on a plain thread of their own, and start-up awaits it.

use std::time::{Duration, Instant};

use diesel::Connection;
use diesel_async::async_connection_wrapper::AsyncConnectionWrapper;
use diesel_async::AsyncPgConnection;
use diesel_migrations::{embed_migrations, EmbeddedMigrations, MigrationHarness};

pub const MIGRATIONS: EmbeddedMigrations = embed_migrations!("migrations");

/// Applies pending migrations, retrying while PostgreSQL is not yet reachable (it may still be
/// starting next to us) until `patience` has passed. Returns how many migrations ran.
pub async fn run_pending(database_url: &str, patience: Duration) -> Result<usize, String> {
    let url = database_url.to_owned();
    let (done, result) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("migrations".into())
        .spawn(move || {
            let _ = done.send(migrate_with_retries(&url, patience));
        })
        .map_err(|e| format!("cannot start the migration thread: {e}"))?;
    result
        .await
        .map_err(|_| "the migration thread died".to_owned())?
}

fn migrate_with_retries(url: &str, patience: Duration) -> Result<usize, String> {
    let started = Instant::now();
    loop {
        match AsyncConnectionWrapper::<AsyncPgConnection>::establish(url) {
            Ok(mut conn) => {
                return conn
                    .run_pending_migrations(MIGRATIONS)
                    .map(|applied| applied.len())
                    .map_err(|e| format!("applying migrations failed: {e}"));
            }
            Err(e) if started.elapsed() >= patience => {
                return Err(format!("cannot connect to PostgreSQL at DATABASE_URL: {e}"));
            }
            Err(e) => {
                log::info!("waiting for PostgreSQL ({e})");
                std::thread::sleep(Duration::from_millis(500));
            }
        }
    }
}
