//! One server the [`DbActor`](super::DbActor) loads from — the primary, or a read replica — with
//! its own bounded pool, its queue of loads waiting for a connection, and what is known of its
//! reachability.

use std::collections::VecDeque;

use diesel_async::pooled_connection::bb8::Pool;
use diesel_async::pooled_connection::{AsyncDieselConnectionManager, ManagerConfig};
use diesel_async::AsyncPgConnection;

use super::query::{self, PgPool};
use super::reachability::Reachability;
use super::{DbSettings, Waiting, REAPER_RATE};
use crate::metrics::Metrics;

pub(super) struct Backend {
    /// `primary`, or `replica-<i>` (counted from 1): its `server` label in metrics.
    pub(super) name: String,
    pub(super) pool: PgPool,
    pub(super) settings: DbSettings,
    pub(super) reach: Reachability,
    /// Loads that arrived while `DB_POOL_SIZE` queries were in the air here, oldest first.
    pub(super) queue: VecDeque<Waiting>,
    /// Queries in the air here (each on a connection of its own), at most `pool_size`.
    pub(super) in_flight: u32,
}

impl Backend {
    /// Builds the pool and starts opening its `min_idle` connections in the background (nothing
    /// waits for them, so the service starts while the server is still down). Must run on the
    /// thread (arbiter) the actor lives on, so that connections and their tasks live there too.
    pub(super) fn new(name: String, settings: DbSettings, reach: Reachability) -> Self {
        let mut config = ManagerConfig::<AsyncPgConnection>::default();
        let (for_pool, reach_for_pool) = (settings.clone(), reach.clone());
        // bb8's URL is unused: every connection is opened by `postgres`, with its TLS set-up.
        config.custom_setup =
            Box::new(move |_url| query::pooled_setup(for_pool.clone(), reach_for_pool.clone()));
        let manager =
            AsyncDieselConnectionManager::<AsyncPgConnection>::new_with_config("", config);
        let pool = Pool::builder()
            .max_size(settings.pool_size)
            .min_idle(Some(settings.min_idle.min(settings.pool_size)))
            // bb8's bound on one `get` and on retrying a failed connect. Loads bound their own
            // wait by their deadline (and ask again if this fires first); this only has to be
            // long enough for a slow server to be connected to.
            .connection_timeout(settings.connect_timeout)
            .reaper_rate(REAPER_RATE)
            // Broken connections are found without a round trip (see `query::checkout`); a test
            // query per checkout would double the round trips of every load.
            .test_on_check_out(false)
            // A replica whose connections fail is skipped at once (its loads go to the
            // primary); bb8 would retry the connect until its timeout.
            .retry_connection(!settings.replica)
            .build_unchecked(manager);
        Backend {
            name,
            pool,
            settings,
            reach,
            queue: VecDeque::new(),
            in_flight: 0,
        }
    }

    /// The next batch to send, if a connection is free for it and loads are waiting: the oldest
    /// loads, up to `batch_max` of them (counted in the air from now).
    pub(super) fn next_batch(&mut self) -> Option<Vec<Waiting>> {
        if self.in_flight >= self.settings.pool_size || self.queue.is_empty() {
            return None;
        }
        let take = self.queue.len().min(self.settings.batch_max.max(1));
        self.in_flight += 1;
        Some(self.queue.drain(..take).collect())
    }

    /// Its pool's gauges (`db_pool_connections`, by `server` and `state`).
    pub(super) fn publish(&self, metrics: &Metrics) {
        let state = self.pool.state();
        let idle = i64::from(state.idle_connections);
        let open = i64::from(state.connections);
        let gauge = &metrics.db_pool_connections;
        gauge.with_label_values(&[&self.name, "idle"]).set(idle);
        gauge
            .with_label_values(&[&self.name, "in_use"])
            .set(open - idle);
    }
}
