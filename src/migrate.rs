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
//! `__diesel_schema_migrations`). So each run is one transaction that holds a PostgreSQL advisory
//! lock ([`MIGRATION_LOCK_KEY`]): one replica migrates at a time, and the ones that waited find
//! nothing pending. The lock is the transaction's, not the session's: it ends with the
//! transaction (a replica that dies while holding it releases it with its connection), and it
//! holds through a transaction-mode pooler too.

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

/// Runs the pending migrations in one transaction that holds [`MIGRATION_LOCK_KEY`] as a
/// transaction-level advisory lock: released at its commit (or rollback, or the connection's
/// end), never left on a server session, so it holds even through a transaction-mode pooler.
/// Each migration runs inside it (diesel nests them as savepoints): a failed one rolls back
/// everything this run applied. Waiting for the lock has no bound of its own: the holder is
/// another replica migrating the same database, and its lock ends with its transaction.
fn migrate_holding_lock(
    conn: &mut AsyncConnectionWrapper<AsyncPgConnection>,
) -> Result<usize, String> {
    use diesel::Connection;
    conn.transaction(|conn| {
        diesel::sql_query("SELECT pg_advisory_xact_lock($1)")
            .bind::<BigInt, _>(MIGRATION_LOCK_KEY)
            .execute(conn)
            .map_err(|e| Failed::Lock(e.to_string()))?;
        conn.run_pending_migrations(MIGRATIONS)
            .map(|applied| applied.len())
            .map_err(|e| Failed::Migration(e.to_string()))
    })
    .map_err(|e: Failed| e.to_string())
}

/// Why the migration transaction ended without applying what was pending.
#[derive(Debug, thiserror::Error)]
enum Failed {
    #[error("taking the migration lock failed: {0}")]
    Lock(String),
    #[error("applying migrations failed: {0}")]
    Migration(String),
    #[error("the migration transaction failed: {0}")]
    Transaction(#[from] diesel::result::Error),
}

/// What `MIGRATE=off` requires of a database the service does not own, each with the migration
/// that provides it (applied in order by whoever owns the database).
const REQUIREMENTS: [(&str, &str, &str); 4] = [
    (
        "has_table",
        "the table templates(id bigint, name text, content text, updated_at timestamptz)",
        "2026-11-26-000001_create_templates",
    ),
    (
        "can_read",
        "the right to SELECT from templates for this role",
        "GRANT SELECT ON templates TO <the service's role>",
    ),
    (
        "has_change_trigger",
        "the trigger templates_notify_change (change notifications)",
        "2026-11-26-000002_notify_template_changes",
    ),
    (
        "has_truncate_trigger",
        "the trigger templates_notify_truncate (TRUNCATE and id changes notified)",
        "2026-12-05-000001_notify_id_changes_and_truncate",
    ),
];

/// The migrations' SQL, as a database owner applies them, in order.
const MIGRATION_SQL: [(&str, &str); 4] = [
    (
        "00000000000000_diesel_initial_setup",
        include_str!("../migrations/00000000000000_diesel_initial_setup/up.sql"),
    ),
    (
        "2026-11-26-000001_create_templates",
        include_str!("../migrations/2026-11-26-000001_create_templates/up.sql"),
    ),
    (
        "2026-11-26-000002_notify_template_changes",
        include_str!("../migrations/2026-11-26-000002_notify_template_changes/up.sql"),
    ),
    (
        "2026-12-05-000001_notify_id_changes_and_truncate",
        include_str!("../migrations/2026-12-05-000001_notify_id_changes_and_truncate/up.sql"),
    ),
];

#[derive(diesel::QueryableByName)]
struct Found {
    #[diesel(sql_type = diesel::sql_types::Bool)]
    has_table: bool,
    #[diesel(sql_type = diesel::sql_types::Bool)]
    can_read: bool,
    #[diesel(sql_type = diesel::sql_types::Bool)]
    has_change_trigger: bool,
    #[diesel(sql_type = diesel::sql_types::Bool)]
    has_truncate_trigger: bool,
}

/// `MIGRATE=off`: checks that the schema and triggers the service needs are there, waiting for
/// PostgreSQL as [`run_pending`] does. What is missing is named, with the SQL that provides it.
pub async fn check_schema(postgres: &PgConnector, patience: Duration) -> Result<(), String> {
    let started = Instant::now();
    let mut conn = loop {
        match postgres.connect().await {
            Ok(conn) => break conn,
            Err(e)
                if Evidence::of_connect(&e) == Evidence::Rejected
                    || started.elapsed() >= patience =>
            {
                return Err(format!("cannot connect to PostgreSQL: {e}"));
            }
            Err(e) => {
                log::info!("waiting for PostgreSQL ({e})");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    };
    let found: Found = diesel_async::RunQueryDsl::get_result(
        diesel::sql_query(
            "SELECT
               (SELECT count(*) FROM information_schema.columns
                 WHERE table_schema = current_schema() AND table_name = 'templates'
                   AND (column_name, data_type) IN (('id', 'bigint'), ('name', 'text'),
                        ('content', 'text'), ('updated_at', 'timestamp with time zone'))) = 4
                 AS has_table,
               to_regclass('templates') IS NOT NULL
                 AND has_table_privilege(to_regclass('templates'), 'SELECT') AS can_read,
               EXISTS (SELECT 1 FROM pg_trigger
                 WHERE tgrelid = to_regclass('templates') AND tgname = 'templates_notify_change')
                 AS has_change_trigger,
               EXISTS (SELECT 1 FROM pg_trigger
                 WHERE tgrelid = to_regclass('templates') AND tgname = 'templates_notify_truncate')
                 AS has_truncate_trigger",
        ),
        &mut conn,
    )
    .await
    .map_err(|e| format!("checking the schema failed: {e}"))?;
    let present = [
        found.has_table,
        found.can_read,
        found.has_change_trigger,
        found.has_truncate_trigger,
    ];
    let missing: Vec<_> = REQUIREMENTS
        .iter()
        .zip(present)
        .filter(|(_, present)| !present)
        .map(|(requirement, _)| requirement)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    Err(missing_schema_message(
        &missing
            .iter()
            .map(|(_, what, fix)| (*what, *fix))
            .collect::<Vec<_>>(),
    ))
}

/// The message for a database that lacks `missing` (what, and the migration or statement that
/// provides it): each thing named, then the SQL to apply, from the first migration needed on.
fn missing_schema_message(missing: &[(&str, &str)]) -> String {
    let mut message =
        String::from("MIGRATE=off, and the database lacks what the service needs. Missing:\n");
    for (what, fix) in missing {
        message.push_str(&format!("  - {what} ({fix})\n"));
    }
    let first = MIGRATION_SQL
        .iter()
        .position(|(name, _)| missing.iter().any(|(_, fix)| fix == name));
    match first {
        Some(first) => {
            message.push_str(
                "Apply these migrations as the database's owner (or start once with MIGRATE=on \
                 as a role with the rights to create them):\n",
            );
            // The initial set-up's helpers are needed by the table's migration only.
            let first = if first == 1 { 0 } else { first };
            for (name, sql) in &MIGRATION_SQL[first..] {
                message.push_str(&format!("-- migrations/{name}/up.sql\n{sql}\n"));
            }
        }
        None => message.push_str("Grant what is missing, then start again.\n"),
    }
    message
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_trigger_names_it_and_gives_its_migration_only() {
        let message = missing_schema_message(&[(REQUIREMENTS[3].1, REQUIREMENTS[3].2)]);
        assert!(message.contains("templates_notify_truncate"), "{message}");
        assert!(message.contains("CREATE TRIGGER templates_notify_truncate"));
        assert!(!message.contains("CREATE TABLE templates"), "{message}");
    }

    #[test]
    fn a_missing_table_gives_every_migration_from_the_helpers_on() {
        let message = missing_schema_message(&[(REQUIREMENTS[0].1, REQUIREMENTS[0].2)]);
        assert!(message.contains("diesel_manage_updated_at"), "{message}");
        assert!(message.contains("CREATE TABLE templates"));
        assert!(message.contains("templates_notify_truncate"));
    }

    #[test]
    fn every_migration_is_in_the_sql_given_to_database_owners() {
        use diesel::migration::MigrationSource;
        let embedded = MigrationSource::<diesel::pg::Pg>::migrations(&MIGRATIONS)
            .expect("the embedded migrations are readable");
        let names: Vec<String> = embedded.iter().map(|m| m.name().to_string()).collect();
        let given: Vec<&str> = MIGRATION_SQL.iter().map(|(name, _)| *name).collect();
        assert_eq!(names, given);
    }
}
