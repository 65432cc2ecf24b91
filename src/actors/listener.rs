//! `ChangeListener`: turns PostgreSQL's change notifications into cache invalidations.
//!
//! A migration installs a trigger that `NOTIFY`s channel `template_changes` with the id of every
//! template inserted, updated or deleted. The listener holds one dedicated connection (not from
//! the pool: a pooled connection would be handed to queries) that `LISTEN`s on it, and sends
//! [`Invalidate`] to the key's owner for each notification — every replica of the service has a
//! listener of its own, so each drops the key from its own near cache (and from Redis).
//!
//! Notifications sent while the connection is down are lost. So whenever the listener
//! (re)connects it tells every owner to forget what it remembers and every cache actor that
//! entries loaded before now are suspect: they are still served, but refreshed on first read.
//! A connection that goes silent without closing (a partition) is found by a `SELECT 1` after
//! a few quiet seconds, and replaced.

use std::time::Duration;

use actix::prelude::*;
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use futures_util::future::join_all;
use futures_util::StreamExt;

use crate::actors::cache::{CacheActor, MarkSuspect};
use crate::actors::key_owner::{shard_for, ForgetAll, Invalidate, KeyOwner};
use crate::metrics::Metrics;
use crate::template::unix_ms_now;
use crate::tls::PgConnector;

/// The channel the trigger notifies.
pub const CHANNEL: &str = "template_changes";

/// How long the connection may stay quiet before it is checked with a query.
const QUIET_CHECK: Duration = Duration::from_secs(5);
/// Bound on connecting, `LISTEN` and the liveness query.
const STEP_TIMEOUT: Duration = Duration::from_secs(2);
/// Pause between reconnection attempts.
const RETRY_DELAY: Duration = Duration::from_millis(500);

pub struct ChangeListener {
    postgres: PgConnector,
    owners: Vec<Addr<KeyOwner>>,
    caches: Vec<Addr<CacheActor>>,
    metrics: Metrics,
    /// Told once, when the first `LISTEN` is in place (start-up waits for it, so that nothing is
    /// cached before invalidations can arrive).
    listening: Option<tokio::sync::oneshot::Sender<()>>,
}

impl ChangeListener {
    pub fn new(
        postgres: PgConnector,
        owners: Vec<Addr<KeyOwner>>,
        caches: Vec<Addr<CacheActor>>,
        metrics: Metrics,
        listening: tokio::sync::oneshot::Sender<()>,
    ) -> Self {
        ChangeListener {
            postgres,
            owners,
            caches,
            metrics,
            listening: Some(listening),
        }
    }
}

/// The listener's loop never ends on its own; if the actor stops anyway, it starts listening
/// afresh (and, on connecting, tells every owner to forget what it remembers).
impl Supervised for ChangeListener {}

impl Actor for ChangeListener {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        let links = Links {
            owners: self.owners.clone(),
            caches: self.caches.clone(),
            metrics: self.metrics.clone(),
        };
        let listening = self.listening.take();
        ctx.spawn(listen_forever(self.postgres.clone(), links, listening).into_actor(self));
    }
}

/// Where notifications go.
struct Links {
    owners: Vec<Addr<KeyOwner>>,
    caches: Vec<Addr<CacheActor>>,
    metrics: Metrics,
}

async fn listen_forever(
    postgres: PgConnector,
    links: Links,
    mut listening: Option<tokio::sync::oneshot::Sender<()>>,
) {
    loop {
        match connect_and_listen(&postgres).await {
            Ok(mut conn) => {
                // Anything remembered may predate a change we were not told about. The caches
                // are told first: an owner reads Redis only through its cache actor, so a read it
                // starts after `ForgetAll` is queued behind `MarkSuspect` and cannot be answered
                // with an entry from before. The connect is counted once every owner has
                // forgotten, so whoever sees the count sees nothing from before answered.
                let before_unix_ms = unix_ms_now();
                join_all(
                    links
                        .caches
                        .iter()
                        .map(|cache| cache.send(MarkSuspect { before_unix_ms })),
                )
                .await;
                join_all(links.owners.iter().map(|owner| owner.send(ForgetAll))).await;
                links.metrics.listener_connects_total.inc();
                links.metrics.listener_connected.set(1);
                if let Some(tx) = listening.take() {
                    let _ = tx.send(());
                }
                let why = relay(&mut conn, &links).await;
                links.metrics.listener_connected.set(0);
                log::warn!("change notifications interrupted ({why}); reconnecting");
            }
            Err(e) => log::warn!("cannot listen for template changes ({e}); retrying"),
        }
        tokio::time::sleep(RETRY_DELAY).await;
    }
}

async fn connect_and_listen(postgres: &PgConnector) -> Result<AsyncPgConnection, String> {
    let mut conn = tokio::time::timeout(STEP_TIMEOUT, postgres.connect())
        .await
        .map_err(|_| "connecting timed out".to_owned())?
        .map_err(|e| e.to_string())?;
    tokio::time::timeout(
        STEP_TIMEOUT,
        diesel::sql_query(format!("LISTEN {CHANNEL}")).execute(&mut conn),
    )
    .await
    .map_err(|_| "LISTEN timed out".to_owned())?
    .map_err(|e| e.to_string())?;
    Ok(conn)
}

/// Relays notifications until the connection fails; returns why it stopped.
async fn relay(conn: &mut AsyncPgConnection, links: &Links) -> String {
    loop {
        let next = {
            let mut stream = std::pin::pin!(conn.notifications_stream());
            tokio::time::timeout(QUIET_CHECK, stream.next()).await
        };
        match next {
            Ok(Some(Ok(notification))) => match notification.payload.trim().parse::<i64>() {
                Ok(id) => {
                    let owner = &links.owners[shard_for(id, links.owners.len())];
                    owner.do_send(Invalidate(id));
                }
                Err(_) => log::warn!("ignoring notification {:?}", notification.payload),
            },
            Ok(Some(Err(e))) => return e.to_string(),
            Ok(None) => return "the connection closed".to_owned(),
            Err(_quiet) => {
                let check = diesel::sql_query("SELECT 1").execute(conn);
                match tokio::time::timeout(STEP_TIMEOUT, check).await {
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => return e.to_string(),
                    Err(_) => return "the connection stopped answering".to_owned(),
                }
            }
        }
    }
}
