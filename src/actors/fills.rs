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

use crate::actors::cache::{client, fills_channel, CacheSettings};
use crate::actors::key_owner::{shard_for, KeyOwner, PeerFilled};
use crate::metrics::Metrics;

/// How long the subscription may stay quiet before it is checked with a `PING`.
const QUIET_CHECK: Duration = Duration::from_secs(5);
/// Pause between attempts to subscribe.
const RETRY_DELAY: Duration = Duration::from_millis(500);

pub struct FillSubscriber {
    settings: CacheSettings,
    owners: Vec<Addr<KeyOwner>>,
    metrics: Metrics,
}

impl FillSubscriber {
    pub fn new(settings: CacheSettings, owners: Vec<Addr<KeyOwner>>, metrics: Metrics) -> Self {
        FillSubscriber {
            settings,
            owners,
            metrics,
        }
    }
}

/// Its loop never ends on its own; if the actor stops anyway, it subscribes afresh.
impl Supervised for FillSubscriber {}

impl Actor for FillSubscriber {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        let subscribing = subscribe_forever(
            self.settings.clone(),
            self.owners.clone(),
            self.metrics.clone(),
        );
        ctx.spawn(subscribing.into_actor(self));
    }
}

async fn subscribe_forever(settings: CacheSettings, owners: Vec<Addr<KeyOwner>>, metrics: Metrics) {
    loop {
        match relay(&settings, &owners, &metrics).await {
            Ok(why) | Err(why) => log::debug!("lease notices interrupted ({why}); resubscribing"),
        }
        tokio::time::sleep(RETRY_DELAY).await;
    }
}

/// Subscribes and relays notices until the subscription fails; returns why it stopped.
async fn relay(
    settings: &CacheSettings,
    owners: &[Addr<KeyOwner>],
    metrics: &Metrics,
) -> Result<String, String> {
    // Subscribing may take a little longer than a command, as connecting does.
    let patience = settings.timeout.max(Duration::from_millis(500));
    let client = client(settings).map_err(|e| e.to_string())?;
    let pubsub = tokio::time::timeout(patience, client.get_async_pubsub())
        .await
        .map_err(|_| "connecting timed out".to_owned())?
        .map_err(|e| e.to_string())?;
    let (mut sink, mut stream) = pubsub.split();
    tokio::time::timeout(patience, sink.subscribe(fills_channel(settings)))
        .await
        .map_err(|_| "SUBSCRIBE timed out".to_owned())?
        .map_err(|e| e.to_string())?;
    metrics.lease_subscriptions_total.inc();
    loop {
        match tokio::time::timeout(QUIET_CHECK, stream.next()).await {
            Ok(Some(message)) => match message.get_payload::<String>().ok().and_then(parse) {
                Some(notice) => {
                    metrics.lease_notices_total.inc();
                    owners[shard_for(notice.id, owners.len())].do_send(notice);
                }
                None => log::warn!("ignoring a lease notice that is not a template id"),
            },
            Ok(None) => return Ok("the connection closed".to_owned()),
            // A subscribed connection answers PING with an array (`pong`, ""), not a status:
            // any answer will do.
            Err(_quiet) => {
                match tokio::time::timeout(patience, sink.ping::<redis::Value>()).await {
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => return Err(e.to_string()),
                    Err(_) => return Err("the connection stopped answering".to_owned()),
                }
            }
        }
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
