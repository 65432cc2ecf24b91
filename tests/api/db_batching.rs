//! The DbActor on its own, against the real PostgreSQL: loads that queue while every connection
//! is busy go together as one query, and each gets its own row — duplicates and unknown ids
//! included.

use std::time::{Duration, Instant};

use actix::Actor;
use futures_util::future::join_all;
use singleflight::actors::db::{DbActor, DbSettings, FetchTemplate, Sessions};
use singleflight::config::Pooler;
use singleflight::metrics::Metrics;
use singleflight::tls::PgConnector;

use crate::faults::{postgres_proxy, via};
use crate::support::fault_proxy::Mode;
use crate::support::spawn_app_with;

#[actix_rt::test]
async fn loads_queued_for_a_connection_go_together_and_each_gets_its_own_row() {
    let proxy = postgres_proxy();
    // The service creates and migrates this test's database; the DbActor below is our own.
    let app = spawn_app_with(|s| s.database_url = via(&proxy, &s.database_url)).await;
    let metrics = Metrics::new().expect("metrics");
    let db = DbActor::new(
        DbSettings {
            postgres: PgConnector::new(&app.database_url, None).expect("a usable URL"),
            pool_size: 1,
            min_idle: 1,
            connect_timeout: Duration::from_secs(5),
            query_timeout: Duration::from_secs(1),
            batch_max: 100,
            sessions: Sessions::new(Pooler::None, &metrics, "primary"),
            replica: false,
        },
        Vec::new(),
        metrics.clone(),
    )
    .start();
    let started = Instant::now();
    let idle = || {
        metrics
            .db_pool_connections
            .with_label_values(&["primary", "idle"])
            .get()
    };
    while idle() < 1 {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "never connected"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Slow enough that every load below is queued while the first one is in the air.
    proxy.set_mode(Mode::Latency(Duration::from_millis(50)));

    let deadline = Instant::now() + Duration::from_secs(5);
    let ids = [1_i64, 2, 3, 2, 5000, 4, 1];
    let loads = ids.map(|id| {
        db.send(FetchTemplate {
            id,
            deadline,
            span: tracing::Span::none(),
        })
    });
    let rows = join_all(loads).await;
    for (id, row) in ids.iter().zip(rows) {
        let loaded = row.expect("the actor answers").expect("the load succeeds");
        assert_eq!(
            loaded.replica_as_of_ms, None,
            "the primary's rows are current"
        );
        let row = loaded.row;
        match id {
            5000 => assert_eq!(row, None, "no template 5000"),
            _ => assert_eq!(row.map(|t| t.id), Some(*id)),
        }
    }
    assert_eq!(
        metrics.db_hits_total.get(),
        2,
        "the first load alone, then every queued one together"
    );
    assert_eq!(metrics.db_keys_per_query.get_sample_sum(), ids.len() as f64);
}
