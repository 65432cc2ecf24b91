//! Hearing of a failover from the sentinels themselves. When the sentinels have promoted a
//! replica, each publishes `+switch-master <name> <old-ip> <old-port> <new-ip> <new-port>` on
//! its own pub/sub. A cache actor given sentinels subscribes to that channel on every sentinel
//! and connects to the new master as soon as one of them says so: without it, the actor would
//! find out only when its calls to the dead master had opened the breaker and a reconnect
//! happened to ask the sentinels after the promotion.
//!
//! A watch is a fast path, never the only one (a lost connection, a `READONLY` reply and the
//! epoch check still lead to the master): a sentinel that cannot be reached is tried again every
//! [`RETRY`], and a subscription that stays quiet is checked with a `PING` every [`QUIET_CHECK`].

use std::time::Duration;

use actix::prelude::*;
use actix::WeakRecipient;
use futures_util::StreamExt;
use redis::{ConnectionAddr, IntoConnectionInfo, RedisConnectionInfo};

use super::link::sentinel_addr;
use super::{CacheActor, CacheError, CacheSettings, Topology};

/// The sentinels' channel for a completed failover.
const CHANNEL: &str = "+switch-master";
/// Pause before subscribing again to a sentinel that could not be reached or hung up.
const RETRY: Duration = Duration::from_secs(1);
/// How long a subscription may stay quiet before it is checked.
const QUIET_CHECK: Duration = Duration::from_secs(5);

/// The sentinels moved the master to `addr` (`ip:port`).
#[derive(Message, Debug, Clone, PartialEq, Eq)]
#[rtype(result = "()")]
pub struct MasterSwitched(pub String);

impl CacheActor {
    /// Given sentinels, listens to each of them for `+switch-master` (see the module docs).
    pub(super) fn watch_sentinels(&self, ctx: &mut Context<Self>) {
        let Topology::Sentinel {
            sentinels, master, ..
        } = &self.settings.topology
        else {
            return;
        };
        match sentinel_clients(&self.settings, sentinels) {
            Ok(clients) => {
                for client in clients {
                    let tell = ctx.address().downgrade().recipient();
                    ctx.spawn(fut::wrap_future(watch(client, master.clone(), tell)));
                }
            }
            Err(e) => log::warn!("redis sentinels: cannot watch for failovers: {e}"),
        }
    }
}

impl Handler<MasterSwitched> for CacheActor {
    type Result = ();

    /// Every sentinel announces the switch: the first word of it reconnects, the others find
    /// it done.
    fn handle(&mut self, MasterSwitched(to): MasterSwitched, ctx: &mut Self::Context) {
        if self.switched_to.as_ref() == Some(&to) {
            return;
        }
        log::warn!(
            "redis (shard {}): the sentinels switched the master to {to}; connecting to it",
            self.shard
        );
        self.metrics.redis_master_switches_total.inc();
        self.switched_to = Some(to);
        self.probe_when_linked = true;
        self.reconnect(ctx);
    }
}

/// Clients for the sentinels themselves (their URLs' credentials and TLS, if they are URLs).
pub fn sentinel_clients(
    settings: &CacheSettings,
    sentinels: &[String],
) -> Result<Vec<redis::Client>, CacheError> {
    let redis = |e: redis::RedisError| CacheError::from_redis(e, settings.timeout);
    sentinels
        .iter()
        .map(|text| {
            let (addr, auth) = sentinel_addr(text).map_err(CacheError::Protocol)?;
            let tls = matches!(addr, ConnectionAddr::TcpTls { .. });
            let mut redis_settings = RedisConnectionInfo::default();
            if let Some((user, password, _)) = auth {
                if let Some(user) = user {
                    redis_settings = redis_settings.set_username(user);
                }
                if let Some(password) = password {
                    redis_settings = redis_settings.set_password(password);
                }
            }
            let info = addr
                .into_connection_info()
                .map_err(redis)?
                .set_redis_settings(redis_settings);
            match (&settings.redis_tls, tls) {
                (Some(certs), true) => redis::Client::build_with_tls(info, certs.clone()),
                _ => redis::Client::open(info),
            }
            .map_err(redis)
        })
        .collect()
}

/// Listens to one sentinel for as long as the actor `tell` reaches runs, subscribing again
/// after every failure. (Weak: the watch does not keep the actor alive.)
pub async fn watch(client: redis::Client, master: String, tell: WeakRecipient<MasterSwitched>) {
    while tell.upgrade().is_some() {
        if let Err(why) = listen(&client, &master, &tell).await {
            log::debug!("sentinel watch ({master}): {why}; subscribing again");
        }
        tokio::time::sleep(RETRY).await;
    }
}

async fn listen(
    client: &redis::Client,
    master: &str,
    tell: &WeakRecipient<MasterSwitched>,
) -> Result<(), String> {
    let pubsub = tokio::time::timeout(QUIET_CHECK, client.get_async_pubsub())
        .await
        .map_err(|_| "connecting timed out".to_owned())?
        .map_err(|e| e.to_string())?;
    let (mut sink, mut messages) = pubsub.split();
    tokio::time::timeout(QUIET_CHECK, sink.subscribe(CHANNEL))
        .await
        .map_err(|_| "SUBSCRIBE timed out".to_owned())?
        .map_err(|e| e.to_string())?;
    while tell.upgrade().is_some() {
        match tokio::time::timeout(QUIET_CHECK, messages.next()).await {
            Ok(Some(message)) => {
                let payload: String = message.get_payload().unwrap_or_default();
                if let (Some(to), Some(actor)) = (switched_to(&payload, master), tell.upgrade()) {
                    actor.do_send(MasterSwitched(to));
                }
            }
            Ok(None) => return Err("the sentinel hung up".to_owned()),
            // Quiet: is the sentinel still there? (Subscribed, it answers PING with an array.)
            Err(_) => match tokio::time::timeout(QUIET_CHECK, sink.ping::<redis::Value>()).await {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => return Err(e.to_string()),
                Err(_) => return Err("the sentinel stopped answering".to_owned()),
            },
        }
    }
    Ok(())
}

/// The new master's `ip:port` if the message is about `master`.
fn switched_to(payload: &str, master: &str) -> Option<String> {
    let words: Vec<&str> = payload.split_whitespace().collect();
    match words.as_slice() {
        [name, _old_ip, _old_port, ip, port] if *name == master => Some(format!("{ip}:{port}")),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_switch_of_our_master_names_the_new_one() {
        assert_eq!(
            switched_to("singleflight 127.0.0.1 6379 127.0.0.1 6380", "singleflight"),
            Some("127.0.0.1:6380".into())
        );
        assert_eq!(
            switched_to("other 10.0.0.1 1 10.0.0.2 2", "singleflight"),
            None
        );
        assert_eq!(switched_to("singleflight 127.0.0.1", "singleflight"), None);
    }
}
