//! `CacheActor`: owns the link to Redis (one server, a cluster, or the master Sentinel names:
//! see [`link`]) and the circuit breaker in front of it.
//!
//! Redis is an optimisation, never a dependency: every call is bounded by `REDIS_TIMEOUT_MS`, and
//! every failure — timeout, refused connection, protocol error, a value that is not a template —
//! is reported to the caller as an error that it treats as a miss, and counted here by kind.
//!
//! # Circuit breaker
//! A black-holed Redis (packets dropped, nothing refused) would cost every call the full timeout.
//! After `BREAKER_FAILURES` consecutive connectivity failures (timeouts, refusals, I/O errors) the
//! breaker *opens*: calls are skipped at no cost and answered as misses. `BREAKER_OPEN_MS` later
//! the breaker goes *half-open* and the actor itself sends one `PING` (no request waits on it, and
//! none is needed to trigger it). Success closes the breaker; failure
//! opens it for another period. Opening also connects afresh (asking the sentinels again, or
//! the cluster for its slots), so a connection stalled behind a partition is never reused and a
//! failover is followed. The decisions are [`breaker::Breaker`]'s (with unit tests of its
//! states); this actor schedules the probe and reports each change of state.
//!
//! One CacheActor runs on each KeyOwner's arbiter (thread), so the owner reaches it without a
//! cross-thread wake-up, and each shard has a connection and a breaker of its own.
//!
//! # What is where
//! This file holds the actor, its link and breaker; [`reads`] and [`writes`] its reads, writes
//! and deletes; [`breaker`] the breaker's states; [`lease`] the fleet lease's scripts; [`link`]
//! the topologies and epochs; [`switches`] the sentinels' word of a failover; [`suspect`] which entries are read as misses because they may
//! predate a change; [`keys`] the names.

mod breaker;
mod keys;
mod lease;
pub mod link;
mod messages;
mod reads;
mod suspect;
mod switches;
mod writes;

pub use keys::{slot_of, Keys, SLOTS};
pub use lease::{
    fills_channel, notice, Claim, ClaimLoad, LeaseExtend, LeaseFill, LeaseRelease, LeaseState,
    LeaseToken,
};
pub use link::Topology;
pub use messages::{
    CacheDel, CacheError, CacheGet, CacheGetMany, CacheSet, Cached, Fence, MarkSuspect, PingCache,
    Read,
};

use std::time::Duration;

use actix::prelude::*;
use futures_util::future::{LocalBoxFuture, Shared};
use futures_util::FutureExt;

use crate::actors::Deafness;
use crate::config::Settings;
use crate::metrics::Metrics;
use crate::template::{jittered, unix_ms_now, Entry, Lookup};
use breaker::{Breaker, State};
use link::{Conn, Linked};
use suspect::Suspects;

/// How often a cache actor reads the epoch (its Redis's run ids) to notice a restart or a
/// failover that the connection itself hid (a `ConnectionManager` reconnects silently).
const EPOCH_CHECK: Duration = Duration::from_secs(1);

/// Settings a CacheActor needs; a subset of [`Settings`].
#[derive(Debug, Clone)]
pub struct CacheSettings {
    /// Where Redis is: `REDIS_URL` (one server, any node of a cluster, or a list of seed nodes),
    /// or `REDIS_SENTINELS` and `REDIS_SENTINEL_MASTER`.
    pub topology: Topology,
    /// The CA and client certificate for a `rediss://` URL, when set (otherwise redis-rs uses
    /// the system's trust store).
    pub redis_tls: Option<redis::TlsCertificates>,
    pub timeout: Duration,
    /// Soft TTL: how long an entry is fresh.
    pub ttl: Duration,
    /// How much longer than its soft TTL Redis keeps an entry, to serve while refreshing.
    pub grace: Duration,
    /// The soft TTL of each write is spread by up to this many percent either way.
    pub jitter_pct: u32,
    pub negative_ttl: Duration,
    pub breaker_failures: u32,
    pub breaker_open: Duration,
    /// How long a fleet lease lasts unless extended (see [`lease`]).
    pub lease_ttl: Duration,
    /// What things are called in Redis (`CACHE_KEY_PREFIX`).
    pub keys: Keys,
}

impl From<&Settings> for CacheSettings {
    fn from(s: &Settings) -> Self {
        CacheSettings {
            topology: Topology::from_settings(
                &s.redis_url,
                &s.redis_sentinels,
                &s.redis_sentinel_master,
            ),
            redis_tls: crate::tls::redis_tls_certificates(
                s.redis_ca.as_ref(),
                s.redis_client_cert.as_ref(),
            ),
            timeout: s.redis_timeout,
            ttl: s.cache_ttl,
            grace: s.cache_grace,
            jitter_pct: s.ttl_jitter_pct,
            negative_ttl: s.negative_ttl,
            breaker_failures: s.breaker_failures,
            breaker_open: s.breaker_open,
            lease_ttl: s.lease_ttl,
            keys: Keys::new(&s.cache_key_prefix),
        }
    }
}

/// A connection attempt that calls wait on (each clone of it resolves alike).
type Connecting = Shared<LocalBoxFuture<'static, Result<Linked, CacheError>>>;

/// The actor's way to Redis.
enum Link {
    /// Connecting (at start, or again after the breaker opened or a write met a replica):
    /// calls wait for it, within their timeout.
    Connecting(Connecting),
    Ready(Conn),
}

pub struct CacheActor {
    link: Link,
    /// Tells the latest connection attempt from earlier ones.
    attempt: u64,
    /// The epoch of the Redis reached (see [`link`]); 0 until known.
    epoch: u64,
    settings: CacheSettings,
    metrics: Metrics,
    shard: String,
    /// Decides whether calls go to Redis; the actor acts on its decisions (see [`breaker`]).
    breaker: Breaker,
    /// The breaker state last logged and shown in `redis_breaker_state`.
    published: State,
    /// Which entries are misses because they may predate a change (see [`suspect`]).
    suspects: Suspects,
    /// Where lease fills and releases are announced on a single Redis (see [`lease`]); a
    /// cluster has a channel per slot ([`Keys::fills_channel_of`]).
    fills_channel: String,
    /// Feeds the TTL jitter; different on every write.
    writes: u64,
    /// The master the sentinels last said they switched to (see [`switches`]).
    switched_to: Option<String>,
    /// A switch was heard: once the new master is reached, probe at once rather than wait out
    /// an open breaker.
    probe_when_linked: bool,
}

impl CacheActor {
    /// Connects when the actor starts, on its own arbiter (where the connection's background
    /// tasks will live); the service starts while Redis is down.
    pub fn new(shard: usize, settings: CacheSettings, metrics: Metrics) -> Self {
        let channel = fills_channel(&settings);
        let breaker_failures = settings.breaker_failures;
        // An entry's whole life: its soft TTL with the largest jitter, and the grace after it.
        let entry_lifetime = settings.ttl + settings.grace + settings.ttl / 2;
        let shard = shard.to_string();
        metrics
            .redis_breaker_state
            .with_label_values(&[&shard])
            .set(0);
        // Every kind shows from the first scrape: dashboards and rate() see 0, not "no data".
        for kind in CacheError::COUNTED_KINDS {
            metrics.redis_errors_total.with_label_values(&[kind]);
        }
        let never = FutureExt::boxed_local(futures_util::future::pending()).shared();
        CacheActor {
            link: Link::Connecting(never),
            attempt: 0,
            epoch: 0,
            settings,
            metrics,
            shard,
            breaker: Breaker::new(breaker_failures),
            published: State::Closed,
            suspects: Suspects::new(entry_lifetime),
            fills_channel: channel,
            writes: 0,
            switched_to: None,
            probe_when_linked: false,
        }
    }

    /// Validates the URLs and TLS settings the way [`CacheActor::new`] will use them.
    pub fn check_url(settings: &Settings) -> Result<(), String> {
        let settings = CacheSettings::from(settings);
        let urls: Vec<&str> = match &settings.topology {
            Topology::Url(url) => vec![url],
            Topology::Cluster(urls) => urls.iter().map(String::as_str).collect(),
            Topology::Sentinel {
                sentinels,
                template,
                ..
            } => {
                for sentinel in sentinels {
                    link::sentinel_addr(sentinel)?;
                }
                vec![template]
            }
        };
        for url in urls {
            if settings.redis_tls.is_some() && !url.starts_with("rediss://") {
                return Err(format!(
                    "REDIS_CA_FILE or REDIS_CLIENT_CERT_FILE is set, but {url} is not rediss:// \
                     (TLS)"
                ));
            }
            client_for(&settings, url).map_err(|e| format!("{url}: {e}"))?;
        }
        Ok(())
    }

    /// The connection, once connected: a call waits for a connection attempt under way.
    fn connection(&self) -> LocalBoxFuture<'static, Result<Conn, CacheError>> {
        match &self.link {
            Link::Ready(conn) => {
                FutureExt::boxed_local(futures_util::future::ready(Ok(conn.clone())))
            }
            Link::Connecting(pending) => {
                FutureExt::boxed_local(pending.clone().map(|linked| linked.map(|l| l.conn)))
            }
        }
    }

    /// Starts a connection attempt (asking the sentinels or the cluster afresh); calls wait for
    /// it. An attempt that fails is tried again a breaker period later, unless a newer one began.
    fn reconnect(&mut self, ctx: &mut Context<Self>) {
        self.attempt += 1;
        let attempt = self.attempt;
        let settings = self.settings.clone();
        let patience = link_patience(&settings);
        let pending: Connecting = FutureExt::boxed_local(async move {
            match tokio::time::timeout(patience, link::connect(&settings)).await {
                Ok(linked) => linked,
                Err(_) => Err(CacheError::Timeout(patience)),
            }
        })
        .shared();
        self.link = Link::Connecting(pending.clone());
        ctx.spawn(pending.into_actor(self).map(move |linked, actor, ctx| {
            if actor.attempt != attempt {
                return;
            }
            match linked {
                Ok(linked) => {
                    actor.learned_epoch(linked.epoch);
                    actor.link = Link::Ready(linked.conn);
                    if std::mem::take(&mut actor.probe_when_linked)
                        && actor.breaker.half_open(actor.breaker.epoch())
                    {
                        actor.probe(ctx);
                    }
                }
                Err(e) => {
                    log::warn!("redis (shard {}): could not connect: {e}", actor.shard);
                    ctx.run_later(actor.settings.breaker_open, move |actor, ctx| {
                        if actor.attempt == attempt {
                            actor.reconnect(ctx);
                        }
                    });
                }
            }
        }));
    }

    /// The epoch of the Redis reached is `epoch`: a change means Redis restarted or failed
    /// over, and what it held before is reloaded on first read.
    fn learned_epoch(&mut self, epoch: u64) {
        if self.epoch != 0 && epoch != self.epoch {
            log::warn!(
                "redis (shard {}) restarted or failed over (its run id changed): entries \
                 written before are reloaded on first read",
                self.shard
            );
            self.metrics.redis_epoch_changes_total.inc();
        }
        self.epoch = epoch;
    }

    /// Reads the epoch, to notice a restart or failover behind a connection that reconnected
    /// by itself. Not a call: it neither waits for a connection nor feeds the breaker.
    fn check_epoch(&mut self, ctx: &mut Context<Self>) {
        let Link::Ready(conn) = &self.link else {
            return;
        };
        if !self.breaker.admits() {
            return;
        }
        let mut conn = conn.clone();
        let timeout = self.settings.timeout;
        let attempt = self.attempt;
        let read = async move {
            tokio::time::timeout(timeout, link::epoch(&mut conn, timeout))
                .await
                .ok()
                .and_then(Result::ok)
        };
        ctx.spawn(read.into_actor(self).map(move |epoch, actor, _| {
            if let (Some(epoch), true) = (epoch, actor.attempt == attempt) {
                actor.learned_epoch(epoch);
            }
        }));
    }

    /// Logs and counts the breaker's change of state, if it changed, and shows the state in
    /// `redis_breaker_state`. Called after every decision that can change it.
    fn publish_breaker(&mut self) {
        let state = self.breaker.state();
        if state != self.published {
            log::warn!(
                "redis circuit breaker (shard {}): {}",
                self.shard,
                state.label()
            );
            self.metrics
                .redis_breaker_transitions_total
                .with_label_values(&[state.label()])
                .inc();
        }
        self.metrics
            .redis_breaker_state
            .with_label_values(&[&self.shard])
            .set(state.gauge_value());
        self.published = state;
        // Redis is available while no shard's breaker is open or probing: read from every
        // shard's gauge (a change of state is rare, so reading them all costs nothing).
        let gauges = prometheus::core::Collector::collect(&self.metrics.redis_breaker_state);
        let all_closed = gauges.iter().all(|family| {
            family
                .get_metric()
                .iter()
                .all(|gauge| gauge.get_gauge().get_value() == 0.0)
        });
        self.metrics.redis_available.set(i64::from(all_closed));
    }

    /// The breaker has just opened: connect afresh (the connection may be stalled behind a
    /// partition, or reach a master that is gone) and schedule the probe: recovery is found on
    /// the actor's own clock, whether or not requests keep coming.
    fn opened(&mut self, ctx: &mut Context<Self>) {
        self.publish_breaker();
        self.reconnect(ctx);
        let epoch = self.breaker.epoch();
        ctx.run_later(self.settings.breaker_open, move |actor, ctx| {
            if actor.breaker.half_open(epoch) {
                actor.probe(ctx);
            }
        });
    }

    /// Half-open: one `PING` decides whether the breaker closes or opens for another period.
    fn probe(&mut self, ctx: &mut Context<Self>) {
        self.publish_breaker();
        let ping = self.ping();
        ctx.spawn(
            ping.into_actor(self)
                .map(|result, actor, ctx| match result {
                    Ok(()) => {
                        actor.breaker.close();
                        actor.publish_breaker();
                    }
                    Err(_) => {
                        actor.breaker.open();
                        actor.opened(ctx);
                    }
                }),
        );
    }

    /// Feeds the outcome of a call that began in breaker epoch `epoch` to the breaker. A write
    /// that met a replica connects afresh at once: a failover moved the master.
    fn record<T>(&mut self, epoch: u64, result: &Result<T, CacheError>, ctx: &mut Context<Self>) {
        let connectivity_failure = matches!(result, Err(e) if e.is_connectivity());
        if self.breaker.record(epoch, connectivity_failure) {
            self.opened(ctx);
        } else if matches!(result, Err(CacheError::ReadOnly(_)))
            && matches!(self.link, Link::Ready(_))
        {
            log::warn!(
                "redis (shard {}) answered READONLY: asking where the master is",
                self.shard
            );
            self.reconnect(ctx);
        }
    }

    /// Runs one Redis call under the configured timeout, counts its failure, and feeds the
    /// breaker — or skips it at once while the breaker is open.
    fn call<T, F>(&mut self, op: F) -> ResponseActFuture<Self, Result<T, CacheError>>
    where
        T: 'static,
        F: std::future::Future<Output = Result<T, CacheError>> + 'static,
    {
        if !self.breaker.admits() {
            self.metrics.redis_calls_skipped_total.inc();
            return Box::pin(fut::ready(Err(CacheError::BreakerOpen)));
        }
        let bounded = bounded(op, self.settings.timeout, self.metrics.clone());
        let epoch = self.breaker.epoch();
        Box::pin(bounded.into_actor(self).map(move |result, actor, ctx| {
            actor.record(epoch, &result, ctx);
            result
        }))
    }

    fn ping(&self) -> impl std::future::Future<Output = Result<(), CacheError>> + 'static {
        let conn = self.connection();
        let timeout = self.settings.timeout;
        bounded(
            async move {
                let mut conn = conn.await?;
                redis::cmd("PING")
                    .query_async::<String>(&mut conn)
                    .await
                    .map(|_| ())
                    .map_err(|e| CacheError::from_redis(e, timeout))
            },
            timeout,
            self.metrics.clone(),
        )
    }

    /// The bytes and the expiry (ms from now) of the entry to write for a load of `lookup` that
    /// began at `loaded_at_ms` in Redis epoch `epoch`; `None` when nothing is to be written (a
    /// "not found" with `NEGATIVE_TTL_SECS=0`).
    fn entry_to_write(
        &mut self,
        id: i64,
        lookup: Lookup,
        loaded_at_ms: u64,
        epoch: u64,
        from_replica: bool,
    ) -> Option<(Vec<u8>, u64)> {
        let s = &self.settings;
        let (soft, hard) = match lookup {
            Lookup::Found(_) => {
                self.writes = self.writes.wrapping_add(1);
                let seed = (id as u64).rotate_left(32) ^ self.writes ^ unix_ms_now();
                let soft = jittered(s.ttl, s.jitter_pct, seed);
                (soft, soft + s.grace)
            }
            Lookup::NotFound if s.negative_ttl.is_zero() => return None,
            Lookup::NotFound => (s.negative_ttl, s.negative_ttl),
        };
        // Ages count from the database read, not from this write.
        let entry = Entry {
            loaded_at_ms,
            soft_expiry_ms: loaded_at_ms + soft.as_millis() as u64,
            epoch,
            from_replica,
            lookup,
        };
        let expires_ms = loaded_at_ms + hard.as_millis() as u64;
        let hard_ms = expires_ms.saturating_sub(unix_ms_now()).max(1);
        Some((entry.encode(id), hard_ms))
    }
}

/// How long one connection attempt may take: connecting, `INFO`, and the cluster's slots or
/// the sentinels' answer, a few round trips each.
fn link_patience(settings: &CacheSettings) -> Duration {
    (settings.timeout * 4).max(Duration::from_secs(1))
}

/// The client for one URL of the settings, with the CA and client certificate when they are set.
fn client_for(settings: &CacheSettings, url: &str) -> redis::RedisResult<redis::Client> {
    match &settings.redis_tls {
        Some(tls) => redis::Client::build_with_tls(url, tls.clone()),
        None => redis::Client::open(url),
    }
}

/// The client for the first URL of the settings (a single server's, or a cluster's first seed).
pub(crate) fn client(settings: &CacheSettings) -> redis::RedisResult<redis::Client> {
    client_for(settings, settings.topology.first_url())
}

/// Bounds a Redis operation by `timeout` and counts its failure by kind.
async fn bounded<T>(
    op: impl std::future::Future<Output = Result<T, CacheError>>,
    timeout: Duration,
    metrics: Metrics,
) -> Result<T, CacheError> {
    // A panic inside the client (a bug) is a failed call like any other, not a dead actor.
    let guarded = std::panic::AssertUnwindSafe(op).catch_unwind();
    let result = match tokio::time::timeout(timeout, guarded).await {
        Ok(Ok(r)) => r,
        Ok(Err(_panic)) => Err(CacheError::Protocol("the redis client panicked".into())),
        Err(_) => Err(CacheError::Timeout(timeout)),
    };
    if let Err(e) = &result {
        metrics
            .redis_errors_total
            .with_label_values(&[e.kind()])
            .inc();
        log::debug!("redis call failed: {e}");
    }
    result
}

impl Actor for CacheActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        // One read per flight arrives from the owner; do not make the owner's flights queue on
        // the mailbox under many distinct keys.
        ctx.set_mailbox_capacity(4096);
        self.reconnect(ctx);
        ctx.run_interval(EPOCH_CHECK, |actor, ctx| actor.check_epoch(ctx));
        self.watch_sentinels(ctx);
    }
}

/// A cache actor that stopped (only a bug can stop it: failed calls are results, and panics
/// inside the client are caught) starts again with a fresh connection and a closed breaker. What
/// it knows of suspect entries is kept: forgetting it would serve them.
impl Supervised for CacheActor {
    fn restarting(&mut self, _: &mut Self::Context) {
        log::error!(
            "the cache actor (shard {}) stopped unexpectedly; restarting it",
            self.shard
        );
        self.metrics
            .actor_restarts_total
            .with_label_values(&["cache"])
            .inc();
        self.breaker.reset();
        self.publish_breaker();
    }
}

impl Handler<Deafness> for CacheActor {
    type Result = ();

    fn handle(&mut self, Deafness(max_age): Deafness, _: &mut Self::Context) {
        self.suspects.deafness(max_age);
    }
}

impl Handler<MarkSuspect> for CacheActor {
    type Result = ();

    fn handle(&mut self, msg: MarkSuspect, _: &mut Self::Context) {
        self.suspects.all_before(msg.before_unix_ms);
    }
}

impl Handler<PingCache> for CacheActor {
    type Result = ResponseActFuture<Self, Result<(), CacheError>>;

    fn handle(&mut self, _: PingCache, _: &mut Self::Context) -> Self::Result {
        if !self.breaker.admits() {
            return Box::pin(fut::ready(Err(CacheError::BreakerOpen)));
        }
        let epoch = self.breaker.epoch();
        Box::pin(self.ping().into_actor(self).map(move |result, actor, ctx| {
            actor.record(epoch, &result, ctx);
            result
        }))
    }
}
