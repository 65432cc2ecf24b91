//! `FillSubscriber`: the one Redis pub/sub subscription of a replica, on which lease holders
//! announce fills and releases (see [`crate::actors::cache::fills_channel`]). Each notice goes to
//! the key's owner as [`PeerFilled`], which wakes a flight waiting on that lease; owners with no
//! such flight ignore it.
//!
//! Notices are a fast path, never the only one: a flight waiting on a lease looks again by the
//! time the lease would run out. So a subscription that is down (Redis unreachable, or being
//! re-established) costs waiting flights at most a quarter of `LEASE_TTL_MS`, and nothing else.
//! A subscription that goes quiet is checked with a `PING` and replaced if it does not answer.
//!
//! # In a cluster
//! Fills are announced with `SPUBLISH` on the shard channel of the key's slot (see
//! [`crate::actors::cache::Keys::slot_channel`]), so the subscription is to all 16,384 of them,
//! through redis-rs's cluster client (RESP3, its pushes on a channel), which subscribes each on
//! the node that serves its slot and subscribes again when a node is lost or the slots move. A
//! node delivers only its own slots' notices: nothing crosses the cluster bus, as classic
//! `PUBLISH` would make every notice do. With Sentinel, the subscription is to the master the
//! sentinels name, asked again on every reconnection.

use std::time::Duration;

use actix::prelude::*;
use futures_util::stream::{self, StreamExt, TryStreamExt};
use redis::aio::{PubSubSink, PubSubStream};
use redis::cluster_async::ClusterConnection;
use redis::{PushInfo, PushKind, Value};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};

use crate::actors::cache::link::{self, NoticeTarget};
use crate::actors::cache::{fills_channel, CacheSettings, SLOTS};
use crate::actors::key_owner::{shard_for, KeyOwner, PeerFilled};
use crate::actors::relay::{Relay, Subscription};
use crate::metrics::Metrics;

/// How long the subscription may stay quiet before it is checked with a `PING`.
const QUIET_CHECK: Duration = Duration::from_secs(5);
/// Pause between attempts to subscribe.
const RETRY_DELAY: Duration = Duration::from_millis(500);

/// The actor that keeps the subscription up.
pub type FillSubscriber = Relay<Notices>;

impl FillSubscriber {
    pub fn new(settings: CacheSettings, owners: Vec<Addr<KeyOwner>>, metrics: Metrics) -> Self {
        let notices = Notices {
            settings,
            owners,
            metrics,
        };
        Relay::keeping(notices, QUIET_CHECK, RETRY_DELAY)
    }
}

/// The subscription to lease notices, and where they go.
#[derive(Clone)]
pub struct Notices {
    settings: CacheSettings,
    owners: Vec<Addr<KeyOwner>>,
    metrics: Metrics,
}

impl Notices {
    /// Subscribing and checking may take a little longer than a command, as connecting does.
    fn patience(&self) -> Duration {
        self.settings.timeout.max(Duration::from_millis(500))
    }
}

/// A subscribed connection: to one Redis, or to every slot's channel of a cluster.
pub enum Subscribed {
    Single(PubSubSink, PubSubStream),
    Cluster(ClusterConnection, UnboundedReceiver<PushInfo>),
}

/// Shard channels subscribed to at once while subscribing to all of them.
const SUBSCRIBING_AT_ONCE: usize = 256;

impl Notices {
    async fn subscribe_single(&self, client: redis::Client) -> Result<Subscribed, String> {
        let patience = self.patience();
        let pubsub = tokio::time::timeout(patience, client.get_async_pubsub())
            .await
            .map_err(|_| "connecting timed out".to_owned())?
            .map_err(|e| e.to_string())?;
        let (mut sink, stream) = pubsub.split();
        tokio::time::timeout(patience, sink.subscribe(fills_channel(&self.settings)))
            .await
            .map_err(|_| "SUBSCRIBE timed out".to_owned())?
            .map_err(|e| e.to_string())?;
        Ok(Subscribed::Single(sink, stream))
    }

    async fn subscribe_cluster(&self, seeds: Vec<String>) -> Result<Subscribed, String> {
        let (tx, rx) = unbounded_channel();
        let mut conn = link::notice_cluster(&self.settings, seeds, tx)
            .await
            .map_err(|e| e.to_string())?;
        let keys = self.settings.keys.clone();
        // Every slot's channel; bounded by a few seconds however many round trips it takes.
        let subscribe_all = stream::iter(0..SLOTS)
            .map(|slot| {
                let mut conn = conn.clone();
                let channel = keys.slot_channel(slot);
                async move { conn.ssubscribe(channel).await }
            })
            .buffer_unordered(SUBSCRIBING_AT_ONCE)
            .try_collect::<Vec<()>>();
        tokio::time::timeout(self.patience() * 10, subscribe_all)
            .await
            .map_err(|_| "SSUBSCRIBE timed out".to_owned())?
            .map_err(|e| e.to_string())?;
        redis::cmd("PING")
            .query_async::<Value>(&mut conn)
            .await
            .map_err(|e| e.to_string())?;
        Ok(Subscribed::Cluster(conn, rx))
    }
}

impl Subscription for Notices {
    type Connection = Subscribed;
    type Message = String;

    async fn connect(&mut self) -> Result<Self::Connection, String> {
        let target = tokio::time::timeout(self.patience() * 2, link::notice_target(&self.settings))
            .await
            .map_err(|_| "finding Redis timed out".to_owned())?
            .map_err(|e| e.to_string())?;
        match target {
            NoticeTarget::Single(client) => self.subscribe_single(*client).await,
            NoticeTarget::Cluster(seeds) => self.subscribe_cluster(seeds).await,
        }
    }

    async fn connected(&mut self) {
        self.metrics.lease_subscriptions_total.inc();
    }

    async fn next(&self, conn: &mut Self::Connection) -> Option<Result<String, String>> {
        match conn {
            Subscribed::Single(_, stream) => stream
                .next()
                .await
                .map(|msg| Ok(msg.get_payload::<String>().unwrap_or_default())),
            Subscribed::Cluster(_, pushes) => loop {
                let push = pushes.recv().await?;
                match (push.kind, push.data.as_slice()) {
                    (PushKind::SMessage, [_channel, Value::BulkString(payload)]) => {
                        return Some(Ok(String::from_utf8_lossy(payload).into_owned()))
                    }
                    (PushKind::Disconnection, _) => {
                        // The client subscribes again by itself once it has reconnected.
                        log::debug!("a cluster node of the lease notices disconnected");
                    }
                    // Confirmations of (re)subscriptions, and anything else pushed.
                    _ => {}
                }
            },
        }
    }

    async fn check(&self, conn: &mut Self::Connection) -> Result<(), String> {
        // A subscribed connection answers PING with an array (`pong`, ""), not a status: any
        // answer will do.
        let ping = async {
            match conn {
                Subscribed::Single(sink, _) => sink.ping::<Value>().await.map(drop),
                Subscribed::Cluster(cluster, _) => redis::cmd("PING")
                    .query_async::<Value>(cluster)
                    .await
                    .map(drop),
            }
        };
        match tokio::time::timeout(self.patience(), ping).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err("the connection stopped answering".to_owned()),
        }
    }

    fn relay(&mut self, payload: String) {
        match parse(payload) {
            Some(notice) => {
                self.metrics.lease_notices_total.inc();
                self.owners[shard_for(notice.id, self.owners.len())].do_send(notice);
            }
            None => log::warn!("ignoring a lease notice that is not a template id"),
        }
    }

    fn interrupted(&mut self, why: &str, _connected: bool) {
        log::debug!("lease notices interrupted ({why}); resubscribing");
    }
}

/// A notice's payload: `N`, or `N empty` when the fill wrote nothing
/// ([`crate::actors::cache::notice`]).
fn parse(payload: String) -> Option<PeerFilled> {
    let (id, empty) = match payload.split_once(' ') {
        None => (payload.as_str(), false),
        Some((id, "empty")) => (id, true),
        Some(_) => return None,
    };
    Some(PeerFilled {
        id: id.parse().ok()?,
        wrote_nothing: empty,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::actors::cache::notice;

    #[test]
    fn notices_read_back_as_they_are_written() {
        for (id, wrote) in [(1, true), (9_223_372_036_854_775_807, false)] {
            let read = parse(notice(id, wrote)).expect("a notice");
            assert_eq!((read.id, read.wrote_nothing), (id, !wrote));
        }
        assert!(parse("x".into()).is_none());
        assert!(parse("5 full".into()).is_none());
    }
}
