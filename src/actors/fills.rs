//! `FillSubscriber`: the one Redis pub/sub subscription of a replica, on which lease holders
//! announce fills and releases (see [`crate::actors::cache::fills_channel`]). Each notice goes to
//! the key's owner as [`PeerFilled`], which wakes a flight waiting on that lease; owners with no
//! such flight ignore it.
//!
//! Notices are a fast path, never the only one: a flight waiting on a lease looks again by the
//! time the lease would run out. So a subscription that is down (Redis unreachable, or being
//! re-established) costs waiting flights at most a quarter of `LEASE_TTL_MS`, and nothing else.
//! A subscription that goes quiet is checked with a `PING` and replaced if it does not answer.

use std::time::Duration;

use actix::prelude::*;
use futures_util::StreamExt;
use redis::aio::{PubSubSink, PubSubStream};

use crate::actors::cache::{client, fills_channel, CacheSettings};
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

impl Subscription for Notices {
    type Connection = (PubSubSink, PubSubStream);
    type Message = redis::Msg;

    async fn connect(&mut self) -> Result<Self::Connection, String> {
        let patience = self.patience();
        let client = client(&self.settings).map_err(|e| e.to_string())?;
        let pubsub = tokio::time::timeout(patience, client.get_async_pubsub())
            .await
            .map_err(|_| "connecting timed out".to_owned())?
            .map_err(|e| e.to_string())?;
        let (mut sink, stream) = pubsub.split();
        tokio::time::timeout(patience, sink.subscribe(fills_channel(&self.settings)))
            .await
            .map_err(|_| "SUBSCRIBE timed out".to_owned())?
            .map_err(|e| e.to_string())?;
        Ok((sink, stream))
    }

    async fn connected(&mut self) {
        self.metrics.lease_subscriptions_total.inc();
    }

    async fn next(&self, (_, stream): &mut Self::Connection) -> Option<Result<redis::Msg, String>> {
        stream.next().await.map(Ok)
    }

    async fn check(&self, (sink, _): &mut Self::Connection) -> Result<(), String> {
        // A subscribed connection answers PING with an array (`pong`, ""), not a status: any
        // answer will do.
        match tokio::time::timeout(self.patience(), sink.ping::<redis::Value>()).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err("the connection stopped answering".to_owned()),
        }
    }

    fn relay(&mut self, message: redis::Msg) {
        match message.get_payload::<String>().ok().and_then(parse) {
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
