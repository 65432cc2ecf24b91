//! What the DbActor needs of [`Settings`] for one server: the primary (`DATABASE_URL`) or a
//! read replica (`DATABASE_READ_URL`).

use std::time::Duration;

use super::Sessions;
use crate::config::Settings;
use crate::metrics::Metrics;
use crate::tls::PgConnector;

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
    /// A read replica's: a load that finds no connection, or whose query fails, goes to the
    /// primary at once instead of waiting or failing (see [`super::replicas`]).
    pub replica: bool,
}

impl DbSettings {
    /// The primary's (`DATABASE_URL`).
    pub fn new(s: &Settings, postgres: PgConnector, metrics: &Metrics) -> Self {
        Self::of(s, postgres, metrics, "primary")
    }

    /// Read replica `index`'s (`DATABASE_READ_URL`, from 0).
    pub fn replica(s: &Settings, postgres: PgConnector, metrics: &Metrics, index: usize) -> Self {
        DbSettings {
            replica: true,
            ..Self::of(s, postgres, metrics, &replica_name(index))
        }
    }

    fn of(s: &Settings, postgres: PgConnector, metrics: &Metrics, server: &str) -> Self {
        DbSettings {
            sessions: Sessions::new(s.database_pooler, metrics, server),
            replica: false,
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

/// Read replica `index`'s name (from 0): `replica-1` first, as the metrics' `server` label.
pub(super) fn replica_name(index: usize) -> String {
    format!("replica-{}", index + 1)
}
