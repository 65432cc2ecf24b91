//! `ChangeListener`: turns PostgreSQL's change notifications into cache invalidations.
//!
//! A migration installs a trigger that `NOTIFY`s channel `template_changes` with the id of every
//! template inserted, updated or deleted (both ids when an update changes one), and `*` when the
//! table is truncated. The listener holds one dedicated connection (not from the pool: a pooled
//! connection would be handed to queries) that `LISTEN`s on it, and sends [`Invalidate`] to the
//! key's owner for each notification — every replica of the service has a listener of its own,
//! so each drops the key from its own near cache (and from Redis). `*` is treated as a reconnect
//! is (below): every owner forgets everything.
//!
//! Notifications sent while the connection is down are lost. So whenever the listener
//! (re)connects it tells every owner to forget what it remembers and every cache actor that
//! entries loaded before now are suspect: they are still served, but refreshed on first read.
//! A connection that goes silent without closing (a partition) is found by a `SELECT 1` after
//! a few quiet seconds, and replaced.

use std::cell::Cell;
use std::rc::Rc;
use std::time::Duration;

use actix::prelude::*;
use diesel_async::{AsyncPgConnection, SimpleAsyncConnection};
use futures_util::future::join_all;
use futures_util::StreamExt;
use tokio::sync::oneshot;

use crate::actors::cache::{CacheActor, MarkSuspect};
use crate::actors::key_owner::{shard_for, ForgetAll, Invalidate, KeyOwner};
use crate::actors::relay::{Relay, Subscription};
use crate::metrics::Metrics;
use crate::template::unix_ms_now;
use crate::tls::PgConnector;

/// The channel the trigger notifies.
pub const CHANNEL: &str = "template_changes";

/// The payload that says every row may have changed (the trigger sends it on `TRUNCATE`).
const EVERYTHING: &str = "*";

/// How long the connection may stay quiet before it is checked with a query.
const QUIET_CHECK: Duration = Duration::from_secs(5);
/// Bound on connecting, `LISTEN` and the liveness query.
const STEP_TIMEOUT: Duration = Duration::from_secs(2);
/// Pause between reconnection attempts.
const RETRY_DELAY: Duration = Duration::from_millis(500);

/// The actor that keeps the `LISTEN` connection up.
pub type ChangeListener = Relay<Changes>;

impl ChangeListener {
    /// `listening` is told once, when the first `LISTEN` is in place (start-up waits for it, so
    /// that nothing is cached before invalidations can arrive).
    pub fn new(
        postgres: PgConnector,
        owners: Vec<Addr<KeyOwner>>,
        caches: Vec<Addr<CacheActor>>,
        metrics: Metrics,
        listening: oneshot::Sender<()>,
    ) -> Self {
        let changes = Changes {
            postgres,
            owners,
            caches,
            metrics,
            listening: Rc::new(Cell::new(Some(listening))),
        };
        Relay::keeping(changes, QUIET_CHECK, RETRY_DELAY)
    }
}

/// The subscription to change notifications, and where they go. A restarted listener starts
/// from a copy: it listens afresh and, on connecting, tells every owner to forget what it
/// remembers.
#[derive(Clone)]
pub struct Changes {
    postgres: PgConnector,
    owners: Vec<Addr<KeyOwner>>,
    caches: Vec<Addr<CacheActor>>,
    metrics: Metrics,
    /// Told once, when the first `LISTEN` is in place; shared by the copies.
    listening: Rc<Cell<Option<oneshot::Sender<()>>>>,
}

impl Subscription for Changes {
    type Connection = AsyncPgConnection;
    type Message = diesel::pg::PgNotification;

    async fn connect(&mut self) -> Result<AsyncPgConnection, String> {
        let mut conn = tokio::time::timeout(STEP_TIMEOUT, self.postgres.connect())
            .await
            .map_err(|_| "connecting timed out".to_owned())?
            .map_err(|e| e.to_string())?;
        tokio::time::timeout(
            STEP_TIMEOUT,
            conn.batch_execute(&format!("LISTEN {CHANNEL}")),
        )
        .await
        .map_err(|_| "LISTEN timed out".to_owned())?
        .map_err(|e| e.to_string())?;
        Ok(conn)
    }

    async fn connected(&mut self) {
        // Anything remembered may predate a change we were not told about. The caches are told
        // first: an owner reads Redis only through its cache actor, so a read it starts after
        // `ForgetAll` is queued behind `MarkSuspect` and cannot be answered with an entry from
        // before. The connect is counted once every owner has forgotten, so whoever sees the
        // count sees nothing from before answered.
        let before_unix_ms = unix_ms_now();
        join_all(
            self.caches
                .iter()
                .map(|cache| cache.send(MarkSuspect { before_unix_ms })),
        )
        .await;
        join_all(self.owners.iter().map(|owner| owner.send(ForgetAll))).await;
        self.metrics.listener_connects_total.inc();
        self.metrics.listener_connected.set(1);
        if let Some(tx) = self.listening.take() {
            let _ = tx.send(());
        }
    }

    async fn next(&self, conn: &mut AsyncPgConnection) -> Option<Result<Self::Message, String>> {
        let mut stream = std::pin::pin!(conn.notifications_stream());
        let next = stream.next().await?;
        Some(next.map_err(|e| e.to_string()))
    }

    async fn check(&self, conn: &mut AsyncPgConnection) -> Result<(), String> {
        // A simple query: no statement is prepared on a connection that may (misconfigured)
        // go through a transaction-mode pooler.
        let check = conn.batch_execute("SELECT 1");
        match tokio::time::timeout(STEP_TIMEOUT, check).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err("the connection stopped answering".to_owned()),
        }
    }

    fn relay(&mut self, notification: Self::Message) {
        let payload = notification.payload.trim();
        if payload == EVERYTHING {
            // As after a reconnect, and in the same order: a read an owner starts after
            // `ForgetAll` is queued behind `MarkSuspect` in its cache actor's mailbox.
            let before_unix_ms = unix_ms_now();
            for cache in &self.caches {
                cache.do_send(MarkSuspect { before_unix_ms });
            }
            for owner in &self.owners {
                owner.do_send(ForgetAll);
            }
            return;
        }
        match payload.parse::<i64>() {
            Ok(id) => {
                let owner = &self.owners[shard_for(id, self.owners.len())];
                owner.do_send(Invalidate(id));
            }
            Err(_) => log::warn!("ignoring notification {payload:?}"),
        }
    }

    fn interrupted(&mut self, why: &str, connected: bool) {
        if connected {
            self.metrics.listener_connected.set(0);
            log::warn!("change notifications interrupted ({why}); reconnecting");
        } else {
            log::warn!("cannot listen for template changes ({why}); retrying");
        }
    }
}
