//! Replicas started at once (compose, a Kubernetes Deployment) all apply the embedded
//! migrations at start, on one database. They must all succeed, and the schema must be applied
//! exactly once.

use std::time::Duration;

use diesel::migration::MigrationSource;
use diesel_async::RunQueryDsl;
use singleflight::config::Settings;
use singleflight::demo::seed;
use singleflight::migrate::{run_pending, MIGRATIONS};
use singleflight::tls::PgConnector;

use crate::support::empty_database_url;

/// How many replicas migrate at once.
const REPLICAS: usize = 6;

#[derive(diesel::QueryableByName)]
struct Count {
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    n: i64,
}

#[actix_rt::test]
async fn replicas_migrating_an_empty_database_at_once_all_succeed() {
    let url = PgConnector::new(&empty_database_url().await, None).expect("a usable URL");
    let migrations = MigrationSource::<diesel::pg::Pg>::migrations(&MIGRATIONS)
        .expect("the embedded migrations are readable")
        .len();

    // Each call runs on a thread of its own, so the migrations really do run side by side.
    let runs = (0..REPLICAS).map(|_| run_pending(&url, Duration::from_secs(10)));
    let results = futures_util::future::join_all(runs).await;

    let mut applied = Vec::new();
    for (replica, result) in results.into_iter().enumerate() {
        match result {
            Ok(n) => applied.push(n),
            Err(e) => panic!("replica {replica} failed to migrate: {e}"),
        }
    }
    // One replica applied everything; the others waited for it and found nothing pending.
    applied.sort_unstable();
    let mut expected = vec![0; REPLICAS - 1];
    expected.push(migrations);
    assert_eq!(applied, expected, "migrations applied per replica");

    let mut conn = url
        .connect()
        .await
        .expect("connect to the migrated database");
    let recorded = diesel::sql_query("SELECT count(*) AS n FROM __diesel_schema_migrations")
        .get_result::<Count>(&mut conn)
        .await
        .expect("diesel's migration table exists");
    assert_eq!(
        recorded.n, migrations as i64,
        "each migration recorded once"
    );
    // The schema carries no data: the demo templates are a step of their own.
    assert_eq!(templates(&mut conn).await, 0, "no migration inserts rows");

    // And a replica started later finds nothing to do.
    assert_eq!(run_pending(&url, Duration::from_secs(10)).await, Ok(0));
}

async fn templates(conn: &mut diesel_async::AsyncPgConnection) -> i64 {
    diesel::sql_query("SELECT count(*) AS n FROM templates")
        .get_result::<Count>(conn)
        .await
        .expect("the templates table exists")
        .n
}

/// Settings for the service against `database_url` (nothing else of them is used here).
fn settings(database_url: String, migrate: bool) -> Settings {
    Settings {
        database_url,
        migrate,
        ..Settings::default()
    }
}

#[actix_rt::test]
async fn the_demo_templates_load_into_an_empty_table_once() {
    let url = empty_database_url().await;
    let settings = settings(url.clone(), true);
    seed(&settings).await.expect("seed-demo");
    seed(&settings).await.expect("seed-demo again");
    let mut conn = PgConnector::new(&url, None)
        .unwrap()
        .connect()
        .await
        .unwrap();
    assert_eq!(templates(&mut conn).await, 1200, "loaded once, not twice");
}

#[actix_rt::test]
async fn migrate_off_names_what_is_missing_with_the_sql_to_apply() {
    let url = empty_database_url().await;
    let message = match seed(&settings(url.clone(), false)).await {
        Err(e) => e.to_string(),
        Ok(()) => panic!("an empty database cannot be used with MIGRATE=off"),
    };
    assert!(message.contains("MIGRATE=off"), "{message}");
    assert!(message.contains("the table templates"), "{message}");
    assert!(
        message.contains("CREATE TABLE templates"),
        "the SQL to apply: {message}"
    );

    // Migrated, but without the newest trigger: only that one is named, with its migration.
    run_pending(
        &PgConnector::new(&url, None).unwrap(),
        Duration::from_secs(10),
    )
    .await
    .expect("migrate");
    let mut conn = PgConnector::new(&url, None)
        .unwrap()
        .connect()
        .await
        .unwrap();
    diesel::sql_query("DROP TRIGGER templates_notify_truncate ON templates")
        .execute(&mut conn)
        .await
        .unwrap();
    let message = match seed(&settings(url, false)).await {
        Err(e) => e.to_string(),
        Ok(()) => panic!("a missing trigger must stop start-up"),
    };
    assert!(message.contains("templates_notify_truncate"), "{message}");
    assert!(!message.contains("the table templates"), "{message}");
    assert!(!message.contains("CREATE TABLE"), "{message}");
}

/// A database the service does not own: a role that may connect and read `templates`, and
/// nothing else (no DDL, no trigger rights). With `MIGRATE=off` the service starts and serves.
#[actix_rt::test]
async fn migrate_off_serves_from_a_database_it_may_only_read() {
    let owner_url = empty_database_url().await;
    seed(&settings(owner_url.clone(), true))
        .await
        .expect("the owner prepares the database");
    let role = format!("reader_{}", std::process::id());
    let mut conn = PgConnector::new(&owner_url, None)
        .unwrap()
        .connect()
        .await
        .unwrap();
    let database = owner_url.rsplit('/').next().unwrap().to_owned();
    for statement in [
        format!("CREATE ROLE {role} LOGIN"),
        "REVOKE CREATE ON SCHEMA public FROM PUBLIC".to_owned(),
        format!("GRANT CONNECT ON DATABASE {database} TO {role}"),
        format!("GRANT SELECT ON templates TO {role}"),
    ] {
        diesel::sql_query(statement)
            .execute(&mut conn)
            .await
            .unwrap();
    }
    let reader_url = owner_url.replacen("postgres://postgres@", &format!("postgres://{role}@"), 1);
    let app = crate::support::spawn_app_with(|s| {
        s.database_url = reader_url;
        s.migrate = false;
    })
    .await;
    let response = app.template(7).await;
    assert_eq!(response.status(), 200);
    // Changes still reach it: LISTEN needs no right of its own.
    diesel::sql_query("UPDATE templates SET name = 'Changed by the owner' WHERE id = 7")
        .execute(&mut conn)
        .await
        .unwrap();
    let changed = || async { app.template(7).await.text().await.unwrap() };
    let polled = testkit::poll::until(
        Duration::from_secs(5),
        Duration::from_millis(50),
        changed,
        |body| body.contains("Changed by the owner"),
    )
    .await;
    assert!(polled.done, "{}", polled.last);
}
