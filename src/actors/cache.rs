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
//! breaker *opens*: calls are skipped at no cost and answered as misses. After `BREAKER_OPEN_MS`
//! the next call finds it due for a probe: the breaker goes *half-open* and the actor itself sends
//! one `PING` in the background (no request waits on it). Success closes the breaker; failure
//! opens it for another period. Opening also replaces the connection, so a connection stalled
//! behind a partition is never reused: the probe dials afresh.
//!
//! One CacheActor runs on each KeyOwner's arbiter (thread), so the owner reaches it without a
//! cross-thread wake-up, and each shard has a connection and a breaker of its own.

use std::time::{Duration, Instant};

use actix::prelude::*;
use actix_web::web::Bytes;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::AsyncCommands;

use crate::actors::key_owner::Lookup;
use crate::metrics::Metrics;
use crate::template::{cache_key, Template};

/// Why a Redis call gave no usable answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CacheError {
    #[error("redis did not answer within {0:?}")]
    Timeout(Duration),
    #[error("redis refused the connection: {0}")]
    Refused(String),
    #[error("redis connection failed: {0}")]
    Io(String),
    #[error("redis error: {0}")]
    Protocol(String),
    #[error("the cached value for template {0} is not a valid template")]
    Decode(i64),
    #[error("redis skipped: circuit breaker open after repeated failures")]
    BreakerOpen,
}

impl CacheError {
    fn kind(&self) -> &'static str {
        match self {
            CacheError::Timeout(_) => "timeout",
            CacheError::Refused(_) => "refused",
            CacheError::Io(_) => "io",
            CacheError::Protocol(_) => "protocol",
            CacheError::Decode(_) => "decode",
            CacheError::BreakerOpen => "skipped",
        }
    }

    /// Failures that say Redis is unreachable (and so count towards opening the breaker), as
    /// opposed to a reachable Redis holding a bad value or rejecting a command.
    fn is_connectivity(&self) -> bool {
        matches!(
            self,
            CacheError::Timeout(_) | CacheError::Refused(_) | CacheError::Io(_)
        )
    }

    fn from_redis(e: redis::RedisError, timeout: Duration) -> Self {
        if e.is_timeout() {
            CacheError::Timeout(timeout)
        } else if e.is_connection_refusal() {
            CacheError::Refused(e.to_string())
        } else if e.is_io_error() || e.is_connection_dropped() {
            CacheError::Io(e.to_string())
        } else {
            CacheError::Protocol(e.to_string())
        }
    }
}

/// Read a template: `Ok(None)` on a miss, `Ok(Some(NotFound))` for a cached "no such template".
/// A value that is not a valid body for this id is an `Err(Decode)`, so the caller reloads it and
/// the write overwrites the bad value.
#[derive(Debug, Message)]
#[rtype(result = "Result<Option<Lookup>, CacheError>")]
pub struct CacheGet(pub i64);

/// Store what a load found: a body for `CACHE_TTL_SECS`, a "not found" for `NEGATIVE_TTL_SECS`.
#[derive(Debug, Message)]
#[rtype(result = "Result<(), CacheError>")]
pub struct CacheSet {
    pub id: i64,
    pub lookup: Lookup,
}

/// Readiness probe: `PING` (reported as degraded while the breaker is open).
#[derive(Debug, Message)]
#[rtype(result = "Result<(), CacheError>")]
pub struct PingCache;

#[derive(Debug, Clone)]
pub struct CacheSettings {
    pub redis_url: String,
    pub timeout: Duration,
    pub ttl: Duration,
    pub negative_ttl: Duration,
    pub breaker_failures: u32,
    pub breaker_open: Duration,
}

/// The value stored in Redis for "no template has this id". It cannot be mistaken for a body:
/// a body is a JSON object with a `name`.
fn not_found_marker(id: i64) -> String {
    format!("{{\"not_found\":{id}}}")
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Breaker {
    Closed { failures: u32 },
    Open { since: Instant },
    HalfOpen,
}

impl Breaker {
    fn gauge_value(self) -> i64 {
        match self {
            Breaker::Closed { .. } => 0,
            Breaker::Open { .. } => 1,
            Breaker::HalfOpen => 2,
        }
    }

    fn label(self) -> &'static str {
        match self {
            Breaker::Closed { .. } => "closed",
            Breaker::Open { .. } => "open",
            Breaker::HalfOpen => "half_open",
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
    breaker: Breaker,
}

impl CacheActor {
    /// Creates the connection manager lazily: no connection is made until the first call, so the
    /// service starts while Redis is down. Must run on the actor's own arbiter, where the
    /// manager's background tasks will live.
    pub fn new(shard: usize, settings: CacheSettings, metrics: Metrics) -> Self {
        let conn = connect_lazily(&settings);
        let shard = shard.to_string();
        metrics
            .redis_breaker_state
            .with_label_values(&[&shard])
            .set(0);
        CacheActor {
            conn,
            settings,
            metrics,
            shard,
            breaker: Breaker::Closed { failures: 0 },
        }
    }

    /// Validates the URL the way [`CacheActor::new`] will use it.
    pub fn check_url(url: &str) -> Result<(), String> {
        redis::Client::open(url)
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    fn connection(&self) -> Result<ConnectionManager, CacheError> {
        self.conn
            .clone()
            .ok_or_else(|| CacheError::Io("no usable REDIS_URL".into()))
    }

    fn set_breaker(&mut self, next: Breaker) {
        if self.breaker.label() != next.label() {
            log::warn!(
                "redis circuit breaker (shard {}): {}",
                self.shard,
                next.label()
            );
            self.metrics
                .redis_breaker_transitions_total
                .with_label_values(&[next.label()])
                .inc();
        }
        self.metrics
            .redis_breaker_state
            .with_label_values(&[&self.shard])
            .set(next.gauge_value());
        self.breaker = next;
    }

    /// Opens the breaker and drops the connection, which may be stalled behind a partition.
    fn trip(&mut self) {
        self.set_breaker(Breaker::Open {
            since: Instant::now(),
        });
        self.conn = connect_lazily(&self.settings);
    }

    /// Whether a call may go to Redis now; starts the background probe when one is due.
    fn admit(&mut self, ctx: &mut Context<Self>) -> bool {
        match self.breaker {
            Breaker::Closed { .. } => true,
            Breaker::HalfOpen => false,
            Breaker::Open { since } => {
                if since.elapsed() >= self.settings.breaker_open {
                    self.probe(ctx);
                }
                false
            }
        }
    }

    fn probe(&mut self, ctx: &mut Context<Self>) {
        self.set_breaker(Breaker::HalfOpen);
        let ping = self.ping();
        ctx.spawn(ping.into_actor(self).map(|result, actor, _| match result {
            Ok(()) => actor.set_breaker(Breaker::Closed { failures: 0 }),
            Err(_) => actor.trip(),
        }));
    }

    /// Feeds a call's outcome to the breaker. Outcomes of calls that began before the breaker
    /// opened change nothing.
    fn record<T>(&mut self, result: &Result<T, CacheError>) {
        let Breaker::Closed { failures } = self.breaker else {
            return;
        };
        match result {
            Err(e) if e.is_connectivity() => {
                if failures + 1 >= self.settings.breaker_failures {
                    self.trip();
                } else {
                    self.breaker = Breaker::Closed {
                        failures: failures + 1,
                    };
                }
            }
            _ => self.breaker = Breaker::Closed { failures: 0 },
        }
    }

    /// Runs one Redis call under the configured timeout, counts its failure, and feeds the
    /// breaker — or skips it at once while the breaker is open.
    fn call<T, F>(
        &mut self,
        ctx: &mut Context<Self>,
        op: F,
    ) -> ResponseActFuture<Self, Result<T, CacheError>>
    where
        T: 'static,
        F: std::future::Future<Output = Result<T, CacheError>> + 'static,
    {
        if !self.admit(ctx) {
            self.metrics.redis_calls_skipped_total.inc();
            return Box::pin(fut::ready(Err(CacheError::BreakerOpen)));
        }
        let bounded = bounded(op, self.settings.timeout, self.metrics.clone());
        Box::pin(bounded.into_actor(self).map(|result, actor, _| {
            actor.record(&result);
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
}

fn connect_lazily(settings: &CacheSettings) -> Option<ConnectionManager> {
    redis::Client::open(settings.redis_url.as_str())
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
    let result = match tokio::time::timeout(timeout, op).await {
        Ok(r) => r,
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

impl Handler<CacheGet> for CacheActor {
    type Result = ResponseActFuture<Self, Result<Option<Lookup>, CacheError>>;

    fn handle(&mut self, CacheGet(id): CacheGet, ctx: &mut Self::Context) -> Self::Result {
        let conn = self.connection();
        let timeout = self.settings.timeout;
        self.call(ctx, async move {
            let mut conn = conn?;
            let value: Option<Vec<u8>> = conn
                .get(cache_key(id))
                .await
                .map_err(|e| CacheError::from_redis(e, timeout))?;
            match value {
                None => Ok(None),
                Some(body) if Template::body_is_valid_for(&body, id) => {
                    Ok(Some(Lookup::Found(Bytes::from(body))))
                }
                Some(body) if body == not_found_marker(id).as_bytes() => Ok(Some(Lookup::NotFound)),
                Some(_) => Err(CacheError::Decode(id)),
            }
        })
    }
}

impl Handler<CacheSet> for CacheActor {
    type Result = ResponseActFuture<Self, Result<(), CacheError>>;

    fn handle(
        &mut self,
        CacheSet { id, lookup }: CacheSet,
        ctx: &mut Self::Context,
    ) -> Self::Result {
        let (value, ttl) = match lookup {
            Lookup::Found(body) => (body, self.settings.ttl),
            Lookup::NotFound if self.settings.negative_ttl.is_zero() => {
                return Box::pin(fut::ready(Ok(())));
            }
            Lookup::NotFound => (
                Bytes::from(not_found_marker(id)),
                self.settings.negative_ttl,
            ),
        };
        let conn = self.connection();
        let timeout = self.settings.timeout;
        let ttl_secs = ttl.as_secs().max(1);
        self.call(ctx, async move {
            let mut conn = conn?;
            conn.set_ex::<_, _, ()>(cache_key(id), value.as_ref(), ttl_secs)
                .await
                .map_err(|e| CacheError::from_redis(e, timeout))
        })
    }
}

impl Handler<PingCache> for CacheActor {
    type Result = ResponseActFuture<Self, Result<(), CacheError>>;

    fn handle(&mut self, _: PingCache, _: &mut Self::Context) -> Self::Result {
        if !matches!(self.breaker, Breaker::Closed { .. }) {
            return Box::pin(fut::ready(Err(CacheError::BreakerOpen)));
        }
        Box::pin(self.ping().into_actor(self).map(|result, actor, _| {
            actor.record(&result);
            result
        }))
    }
}
