//! `CacheActor`: owns a Redis connection (a `ConnectionManager`, which reconnects by itself) and
//! the circuit breaker in front of it.
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
//! opens it for another period. Opening also replaces the connection, so a connection stalled
//! behind a partition is never reused: the probe dials afresh. The decisions are
//! [`breaker::Breaker`]'s (with unit tests of its states); this actor schedules the probe and
//! reports each change of state.
//!
//! One CacheActor runs on each KeyOwner's arbiter (thread), so the owner reaches it without a
//! cross-thread wake-up, and each shard has a connection and a breaker of its own.
//!
//! # What is where
//! This file holds the actor, its reads, writes and deletes; [`breaker`] the breaker's states;
//! [`lease`] the fleet lease's scripts; [`suspect`] which entries are read as misses because
//! they may predate a change.

mod breaker;
mod keys;
mod lease;
mod messages;
mod suspect;

pub use keys::Keys;
pub use lease::{
    fills_channel, notice, Claim, ClaimLoad, LeaseExtend, LeaseFill, LeaseRelease, LeaseState,
    LeaseToken,
};
pub use messages::{
    CacheDel, CacheError, CacheGet, CacheGetMany, CacheSet, Cached, MarkSuspect, PingCache,
};

use std::time::Duration;

use actix::prelude::*;
use bytes::Bytes;
use futures_util::FutureExt;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::AsyncCommands;

use crate::actors::Deafness;
use crate::config::Settings;
use crate::metrics::Metrics;
use crate::template::{jittered, unix_ms_now, Entry, Lookup};
use breaker::{Breaker, State};
use suspect::Suspects;

/// Settings a CacheActor needs; a subset of [`Settings`].
#[derive(Debug, Clone)]
pub struct CacheSettings {
    pub redis_url: String,
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
            redis_url: s.redis_url.clone(),
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

pub struct CacheActor {
    /// `None` only when the URL itself is unusable, which start-up already rejects; kept as an
    /// `Option` so that even then every call is a counted miss rather than a panic.
    conn: Option<ConnectionManager>,
    settings: CacheSettings,
    metrics: Metrics,
    shard: String,
    /// Decides whether calls go to Redis; the actor acts on its decisions (see [`breaker`]).
    breaker: Breaker,
    /// The breaker state last logged and shown in `redis_breaker_state`.
    published: State,
    /// Which entries are misses because they may predate a change (see [`suspect`]).
    suspects: Suspects,
    /// Where lease fills and releases are announced (see [`lease`]).
    fills_channel: String,
    /// Feeds the TTL jitter; different on every write.
    writes: u64,
}

impl CacheActor {
    /// Creates the connection manager lazily: no connection is made until the first call, so the
    /// service starts while Redis is down. Must run on the actor's own arbiter, where the
    /// manager's background tasks will live.
    pub fn new(shard: usize, settings: CacheSettings, metrics: Metrics) -> Self {
        let conn = connect_lazily(&settings);
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
        CacheActor {
            conn,
            settings,
            metrics,
            shard,
            breaker: Breaker::new(breaker_failures),
            published: State::Closed,
            suspects: Suspects::new(entry_lifetime),
            fills_channel: channel,
            writes: 0,
        }
    }

    /// Validates the URL and its TLS settings the way [`CacheActor::new`] will use them.
    pub fn check_url(settings: &Settings) -> Result<(), String> {
        let settings = CacheSettings::from(settings);
        if settings.redis_tls.is_some() && !settings.redis_url.starts_with("rediss://") {
            return Err(
                "REDIS_CA_FILE or REDIS_CLIENT_CERT_FILE is set, but the URL is not \
                        rediss:// (TLS)"
                    .to_owned(),
            );
        }
        client(&settings).map(|_| ()).map_err(|e| e.to_string())
    }

    fn connection(&self) -> Result<ConnectionManager, CacheError> {
        self.conn
            .clone()
            .ok_or_else(|| CacheError::Io("no usable REDIS_URL".into()))
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

    /// The breaker has just opened: drop the connection (it may be stalled behind a partition)
    /// and schedule the probe: recovery is found on the actor's own clock, whether or not
    /// requests keep coming.
    fn opened(&mut self, ctx: &mut Context<Self>) {
        self.publish_breaker();
        self.conn = connect_lazily(&self.settings);
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

    /// Feeds the outcome of a call that began in breaker epoch `epoch` to the breaker.
    fn record<T>(&mut self, epoch: u64, result: &Result<T, CacheError>, ctx: &mut Context<Self>) {
        let connectivity_failure = matches!(result, Err(e) if e.is_connectivity());
        if self.breaker.record(epoch, connectivity_failure) {
            self.opened(ctx);
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
                let mut conn = conn?;
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
    /// began at `loaded_at_ms`; `None` when nothing is to be written (a "not found" with
    /// `NEGATIVE_TTL_SECS=0`).
    fn entry_to_write(
        &mut self,
        id: i64,
        lookup: Lookup,
        loaded_at_ms: u64,
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
            lookup,
        };
        let expires_ms = loaded_at_ms + hard.as_millis() as u64;
        let hard_ms = expires_ms.saturating_sub(unix_ms_now()).max(1);
        Some((entry.encode(id), hard_ms))
    }
}

/// How long a key's generation outlives its last change: far longer than any flight, so a lease
/// claimed under an older generation cannot see it expire and start again from zero.
const GENERATION_TTL_MS: i64 = 3_600_000;

/// What a raw Redis value for `id` is worth: a usable entry, a miss (`None`: loaded before
/// `suspect_before_ms`), or a decode error.
fn usable(
    raw: Bytes,
    id: i64,
    suspect_before_ms: u64,
    metrics: &Metrics,
) -> Result<Option<Cached>, CacheError> {
    let entry = Entry::decode(raw, id).ok_or(CacheError::Decode(id))?;
    if entry.loaded_at_ms < suspect_before_ms {
        metrics.cache_suspect_entries_total.inc();
        return Ok(None);
    }
    let fresh_ms = entry.soft_expiry_ms.saturating_sub(unix_ms_now());
    Ok(Some(Cached {
        lookup: entry.lookup,
        fresh_for: Duration::from_millis(fresh_ms),
    }))
}

/// The client for `REDIS_URL`, with the CA and client certificate when they are set.
pub(crate) fn client(settings: &CacheSettings) -> redis::RedisResult<redis::Client> {
    match &settings.redis_tls {
        Some(tls) => redis::Client::build_with_tls(settings.redis_url.as_str(), tls.clone()),
        None => redis::Client::open(settings.redis_url.as_str()),
    }
}

fn connect_lazily(settings: &CacheSettings) -> Option<ConnectionManager> {
    client(settings)
        .and_then(|client| {
            let config = ConnectionManagerConfig::new()
                .set_response_timeout(Some(settings.timeout))
                // Connecting may take a little longer than a command, but a black-holed Redis
                // must not hold a reconnect for seconds.
                .set_connection_timeout(Some(settings.timeout.max(Duration::from_millis(100))))
                .set_number_of_retries(1)
                .set_min_delay(Duration::from_millis(10))
                .set_max_delay(Duration::from_millis(500));
            ConnectionManager::new_lazy_with_config(client, config)
        })
        .map_err(|e| log::error!("redis is unusable ({e}); serving from PostgreSQL only"))
        .ok()
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
        self.conn = connect_lazily(&self.settings);
        self.breaker.reset();
        self.publish_breaker();
    }
}

impl Handler<CacheGet> for CacheActor {
    type Result = ResponseActFuture<Self, Result<Option<Cached>, CacheError>>;

    fn handle(&mut self, CacheGet(id): CacheGet, _: &mut Self::Context) -> Self::Result {
        let conn = self.connection();
        let keys = self.settings.keys.clone();
        let timeout = self.settings.timeout;
        let suspect_before_ms = self.suspects.before(id);
        let metrics = self.metrics.clone();
        self.call(async move {
            let mut conn = conn?;
            let value: Option<Vec<u8>> = conn
                .get(keys.value(id))
                .await
                .map_err(|e| CacheError::from_redis(e, timeout))?;
            match value {
                None => Ok(None),
                Some(raw) => usable(Bytes::from(raw), id, suspect_before_ms, &metrics),
            }
        })
    }
}

impl Handler<CacheGetMany> for CacheActor {
    type Result = ResponseActFuture<Self, Result<Vec<Option<Cached>>, CacheError>>;

    fn handle(&mut self, CacheGetMany(ids): CacheGetMany, _: &mut Self::Context) -> Self::Result {
        if ids.is_empty() {
            return Box::pin(fut::ready(Ok(Vec::new())));
        }
        let names = self.settings.keys.clone();
        let conn = self.connection();
        let timeout = self.settings.timeout;
        let suspect_before: Vec<u64> = ids.iter().map(|&id| self.suspects.before(id)).collect();
        let metrics = self.metrics.clone();
        self.call(async move {
            let mut conn = conn?;
            let keys: Vec<String> = ids.iter().map(|&id| names.value(id)).collect();
            let values: Vec<Option<Vec<u8>>> = redis::cmd("MGET")
                .arg(&keys)
                .query_async(&mut conn)
                .await
                .map_err(|e| CacheError::from_redis(e, timeout))?;
            let read = ids.iter().zip(suspect_before).zip(values);
            Ok(read
                .map(|((&id, before), raw)| {
                    usable(Bytes::from(raw?), id, before, &metrics).unwrap_or_else(|e| {
                        metrics
                            .redis_errors_total
                            .with_label_values(&[e.kind()])
                            .inc();
                        None
                    })
                })
                .collect())
        })
    }
}

impl Handler<CacheSet> for CacheActor {
    type Result = ResponseActFuture<Self, Result<(), CacheError>>;

    fn handle(
        &mut self,
        CacheSet {
            id,
            lookup,
            loaded_at_ms,
        }: CacheSet,
        _: &mut Self::Context,
    ) -> Self::Result {
        let Some((value, hard_ms)) = self.entry_to_write(id, lookup, loaded_at_ms) else {
            return Box::pin(fut::ready(Ok(())));
        };
        let conn = self.connection();
        let keys = self.settings.keys.clone();
        let timeout = self.settings.timeout;
        self.call(async move {
            let mut conn = conn?;
            redis::cmd("SET")
                .arg(keys.value(id))
                .arg(value)
                .arg("PX")
                .arg(hard_ms)
                .query_async::<()>(&mut conn)
                .await
                .map_err(|e| CacheError::from_redis(e, timeout))
        })
    }
}

impl Handler<CacheDel> for CacheActor {
    type Result = ();

    fn handle(&mut self, CacheDel(id): CacheDel, ctx: &mut Self::Context) {
        self.suspects.changed(id);
        let conn = self.connection();
        let keys = self.settings.keys.clone();
        let timeout = self.settings.timeout;
        let del = self.call(async move {
            let mut conn = conn?;
            // The generation tells lease holders that loaded before this moment not to fill.
            let generation = keys.generation(id);
            redis::pipe()
                .atomic()
                .del(keys.value(id))
                .ignore()
                .incr(&generation, 1)
                .ignore()
                .pexpire(&generation, GENERATION_TTL_MS)
                .ignore()
                .query_async::<()>(&mut conn)
                .await
                .map_err(|e| CacheError::from_redis(e, timeout))
        });
        // A delete that fails or is skipped (Redis unreachable, breaker open) would leave the
        // old value to be served for a whole TTL once Redis answers again: instead, every entry
        // written before now becomes suspect (served, but refreshed on first read).
        ctx.spawn(del.map(|result, actor, _| {
            if result.is_err() {
                actor.suspects.all_before(unix_ms_now());
            }
        }));
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
