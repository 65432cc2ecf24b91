//! Replicas started at once (compose, a Kubernetes Deployment) all apply the embedded
//! migrations at start, on one database. They must all succeed, and the schema must be applied
//! exactly once.

use std::time::Duration;

use diesel::migration::MigrationSource;
use diesel_async::RunQueryDsl;
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
    // The seed migration inserts 1,200 rows: run twice, there would be 2,400.
    let seeded = diesel::sql_query("SELECT count(*) AS n FROM templates")
        .get_result::<Count>(&mut conn)
        .await
        .expect("the templates table exists");
    assert_eq!(seeded.n, 1200, "the seed rows were inserted once");

    // And a replica started later finds nothing to do.
    assert_eq!(run_pending(&url, Duration::from_secs(10)).await, Ok(0));
}
