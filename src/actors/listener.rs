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
//!
//! # Proving that it hears
//! A connection can be up and hear nothing: `LISTEN` through a transaction-mode pooler runs on
//! whichever server connection the pooler hands out, and the notifications go to that session,
//! not to the listener. So every [`HEARTBEAT_EVERY`] the listener sends a `NOTIFY` of its own,
//! with a fresh token, through the pool (`DATABASE_URL`, by the [`DbActor`]), and expects it
//! back on its connection before the next one. One that is sent and not heard makes it *deaf*:
//! `/readyz` says so (degraded), `listener_hearing` is 0, one warning names
//! `DATABASE_LISTEN_URL`, and until it hears again no cached value older than [`DEAF_MAX_AGE`]
//! is served without being reloaded (coalesced as ever: the cache actors take older entries as
//! misses, the owners keep nothing fresh longer than that), so a change is still served within
//! a few seconds. When it hears again, whatever was loaded while it was deaf is suspect once, as
//! after a reconnect. A heartbeat that could not be sent (PostgreSQL down) proves nothing either
//! way.

use std::cell::Cell;
use std::rc::Rc;
use std::time::Duration;

use actix::prelude::*;
use diesel_async::{AsyncPgConnection, SimpleAsyncConnection};
use futures_util::future::join_all;
use futures_util::StreamExt;
use tokio::sync::oneshot;

use crate::actors::cache::{CacheActor, MarkSuspect};
use crate::actors::db::{Changed, ChangedAll, DbActor, Notify};
use crate::actors::heartbeat::{self, Heartbeat, Verdict};
use crate::actors::key_owner::{shard_for, ForgetAll, Invalidate, KeyOwner};
use crate::actors::relay::{Relay, Subscription};
use crate::actors::Deafness;
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

/// How often the listener sends a heartbeat `NOTIFY`, and how long it has to come back.
pub const HEARTBEAT_EVERY: Duration = Duration::from_secs(2);

/// While the listener is deaf, no cached value older than this is served without a reload.
pub const DEAF_MAX_AGE: Duration = Duration::from_secs(2);

/// The actor that keeps the `LISTEN` connection up.
pub type ChangeListener = Relay<Changes>;

impl ChangeListener {
    /// `listening` is told once, when the first `LISTEN` is in place (start-up waits for it, so
    /// that nothing is cached before invalidations can arrive).
    pub fn new(
        postgres: PgConnector,
        owners: Vec<Addr<KeyOwner>>,
        caches: Vec<Addr<CacheActor>>,
        db: Addr<DbActor>,
        metrics: Metrics,
        listening: oneshot::Sender<()>,
    ) -> Self {
        let changes = Changes {
            postgres,
            owners,
            caches,
            db,
            metrics,
            listening: Rc::new(Cell::new(Some(listening))),
            heartbeat: Heartbeat::new(),
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
    /// Sends the heartbeats through the pool, and routes loads away from read replicas that
    /// may not have replayed a change ([`Changed`]).
    db: Addr<DbActor>,
    metrics: Metrics,
    /// Told once, when the first `LISTEN` is in place; shared by the copies.
    listening: Rc<Cell<Option<oneshot::Sender<()>>>>,
    heartbeat: Heartbeat,
}

impl Changes {
    /// Anything remembered may predate a change the listener was not told about: every cache
    /// actor takes entries loaded before now as misses, and every owner forgets. The caches are
    /// told first: an owner reads Redis only through its cache actor, so a read it starts after
    /// `ForgetAll` is queued behind `MarkSuspect` and cannot be answered with an entry from
    /// before. Returns once every one of them has done so.
    async fn forget_everything(&self) {
        // Loads read the primary until a replica has replayed past now: queued ahead of any
        // load an owner starts once it has forgotten.
        self.db.do_send(ChangedAll);
        let before_unix_ms = unix_ms_now();
        join_all(
            self.caches
                .iter()
                .map(|cache| cache.send(MarkSuspect { before_unix_ms })),
        )
        .await;
        join_all(self.owners.iter().map(|owner| owner.send(ForgetAll))).await;
    }

    /// Tells every cache actor and owner how old a cached value may be while the listener is
    /// deaf (`None`: as old as its TTL allows).
    async fn deafness(&self, max_age: Option<Duration>) {
        // Deaf, loads read the primary: a replica may lack a change nobody heard of.
        self.db.do_send(Deafness(max_age));
        join_all(
            self.caches
                .iter()
                .map(|cache| cache.send(Deafness(max_age))),
        )
        .await;
        join_all(
            self.owners
                .iter()
                .map(|owner| owner.send(Deafness(max_age))),
        )
        .await;
    }

    /// A heartbeat went out and did not come back: deaf.
    async fn went_deaf(&mut self) {
        self.metrics.listener_hearing.set(0);
        log::warn!(
            "change notifications are not arriving: this replica's heartbeat NOTIFY, sent \
             through DATABASE_URL, was not heard on its LISTEN connection within {:?}. \
             DATABASE_LISTEN_URL must be a direct connection to the primary (a transaction-mode \
             pooler passes no notifications on). Until it hears again, cached values older than \
             {:?} are reloaded",
            HEARTBEAT_EVERY,
            DEAF_MAX_AGE
        );
        self.deafness(Some(DEAF_MAX_AGE)).await;
    }

    /// A heartbeat came back after a deaf spell: what was loaded meanwhile is suspect once.
    async fn hears_again(&mut self) {
        // Suspect first, then lift the cap: in between, an entry from before a change that was
        // never heard must not count as fresh.
        self.forget_everything().await;
        self.deafness(None).await;
        self.metrics.listener_hearing.set(1);
        log::info!("change notifications arrive again (the listener hears its heartbeat)");
    }
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
        // The connect is counted once every owner has forgotten, so whoever sees the count sees
        // nothing from before answered.
        self.forget_everything().await;
        self.heartbeat.reconnected();
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
        if payload.starts_with(heartbeat::PREFIX) {
            self.heartbeat.heard(payload);
            return;
        }
        if payload == EVERYTHING {
            // As after a reconnect, and in the same order: a read an owner starts after
            // `ForgetAll` is queued behind `MarkSuspect` in its cache actor's mailbox, and a
            // load behind `ChangedAll` in the database actor's.
            self.db.do_send(ChangedAll);
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
                // The database actor first: a load the owner starts after the change is queued
                // behind it, and so routed by it.
                self.db.do_send(Changed(id));
                let owner = &self.owners[shard_for(id, self.owners.len())];
                owner.do_send(Invalidate(id));
            }
            Err(_) => log::warn!("ignoring notification {payload:?}"),
        }
    }

    fn tick_every(&self) -> Option<Duration> {
        Some(HEARTBEAT_EVERY)
    }

    /// The verdict on the last heartbeat, then the next one.
    async fn tick(&mut self) {
        match self.heartbeat.verdict() {
            Verdict::WentDeaf => self.went_deaf().await,
            Verdict::HearsAgain => self.hears_again().await,
            Verdict::Same => {}
        }
        let payload = self.heartbeat.next();
        let sent = self.db.send(Notify {
            channel: CHANNEL,
            payload: payload.clone(),
        });
        // Not sent (PostgreSQL down, the pool busy): no verdict on this one.
        if let Ok(Ok(Ok(()))) = tokio::time::timeout(HEARTBEAT_EVERY / 2, sent).await {
            self.heartbeat.sent(payload);
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
