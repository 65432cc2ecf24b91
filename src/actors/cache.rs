//! `CacheActor`: owns a Redis connection (a `ConnectionManager`, which reconnects by itself).
//!
//! Redis is an optimisation, never a dependency: every call is bounded by `REDIS_TIMEOUT_MS`, and
//! every failure — timeout, refused connection, protocol error, a value that is not a template —
//! is reported to the caller as an error that it treats as a miss, and counted here by kind.
//!
//! One CacheActor runs on each KeyOwner's arbiter (thread), so the owner reaches it without a
//! cross-thread wake-up, and each shard has a connection of its own.

use std::time::Duration;

use actix::prelude::*;
use actix_web::web::Bytes;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::AsyncCommands;

use crate::metrics::Metrics;
use crate::template::{cache_key, Template};

/// Why a Redis call gave no usable answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CacheError {
    #[error("redis did not answer within {0:?}")]
    Timeout(Duration),
    #[error("redis connection failed: {0}")]
    Io(String),
    #[error("redis error: {0}")]
    Protocol(String),
    #[error("the cached value for template {0} is not a valid template")]
    Decode(i64),
}

impl CacheError {
    fn kind(&self) -> &'static str {
        match self {
            CacheError::Timeout(_) => "timeout",
            CacheError::Io(_) => "io",
            CacheError::Protocol(_) => "protocol",
            CacheError::Decode(_) => "decode",
        }
    }

    fn from_redis(e: redis::RedisError, timeout: Duration) -> Self {
        if e.is_timeout() {
            CacheError::Timeout(timeout)
        } else if e.is_io_error() || e.is_connection_dropped() || e.is_connection_refusal() {
            CacheError::Io(e.to_string())
        } else {
            CacheError::Protocol(e.to_string())
        }
    }
}

/// Read a template body: `Ok(None)` on a miss. A value that is not a valid body for this id is
/// an `Err(Decode)`, so the caller reloads it and the write overwrites the bad value.
#[derive(Debug, Message)]
#[rtype(result = "Result<Option<Bytes>, CacheError>")]
pub struct CacheGet(pub i64);

/// Store a template body with the configured TTL.
#[derive(Debug, Message)]
#[rtype(result = "Result<(), CacheError>")]
pub struct CacheSet {
    pub id: i64,
    pub body: Bytes,
}

/// Readiness probe: `PING`.
#[derive(Debug, Message)]
#[rtype(result = "Result<(), CacheError>")]
pub struct PingCache;

#[derive(Debug, Clone)]
pub struct CacheSettings {
    pub redis_url: String,
    pub timeout: Duration,
    pub ttl: Duration,
}

pub struct CacheActor {
    /// `None` only when the URL itself is unusable, which start-up already rejects; kept as an
    /// `Option` so that even then every call is a counted miss rather than a panic.
    conn: Option<ConnectionManager>,
    settings: CacheSettings,
    metrics: Metrics,
}

impl CacheActor {
    /// Creates the connection manager lazily: no connection is made until the first call, so the
    /// service starts while Redis is down. Must run on the actor's own arbiter, where the
    /// manager's background tasks will live.
    pub fn new(settings: CacheSettings, metrics: Metrics) -> Self {
        let conn = redis::Client::open(settings.redis_url.as_str())
            .and_then(|client| {
                let config = ConnectionManagerConfig::new()
                    .set_response_timeout(Some(settings.timeout))
                    // Connecting may take a little longer than a command, but a black-holed
                    // Redis must not hold a reconnect for seconds.
                    .set_connection_timeout(Some(settings.timeout.max(Duration::from_millis(100))))
                    .set_number_of_retries(1)
                    .set_min_delay(Duration::from_millis(10))
                    .set_max_delay(Duration::from_millis(500));
                ConnectionManager::new_lazy_with_config(client, config)
            })
            .map_err(|e| log::error!("redis is unusable ({e}); serving from PostgreSQL only"))
            .ok();
        CacheActor {
            conn,
            settings,
            metrics,
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

    /// Runs one Redis call under the configured timeout and counts its failure.
    fn call<T, F>(&self, op: F) -> ResponseFuture<Result<T, CacheError>>
    where
        T: 'static,
        F: std::future::Future<Output = Result<T, CacheError>> + 'static,
    {
        let timeout = self.settings.timeout;
        let metrics = self.metrics.clone();
        Box::pin(async move {
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
        })
    }
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
    type Result = ResponseFuture<Result<Option<Bytes>, CacheError>>;

    fn handle(&mut self, CacheGet(id): CacheGet, _: &mut Self::Context) -> Self::Result {
        let conn = self.connection();
        let timeout = self.settings.timeout;
        self.call(async move {
            let mut conn = conn?;
            let value: Option<Vec<u8>> = conn
                .get(cache_key(id))
                .await
                .map_err(|e| CacheError::from_redis(e, timeout))?;
            match value {
                None => Ok(None),
                Some(body) if Template::body_is_valid_for(&body, id) => Ok(Some(Bytes::from(body))),
                Some(_) => Err(CacheError::Decode(id)),
            }
        })
    }
}

impl Handler<CacheSet> for CacheActor {
    type Result = ResponseFuture<Result<(), CacheError>>;

    fn handle(&mut self, msg: CacheSet, _: &mut Self::Context) -> Self::Result {
        let conn = self.connection();
        let timeout = self.settings.timeout;
        let ttl = self.settings.ttl.as_secs().max(1);
        self.call(async move {
            let mut conn = conn?;
            conn.set_ex::<_, _, ()>(cache_key(msg.id), msg.body.as_ref(), ttl)
                .await
                .map_err(|e| CacheError::from_redis(e, timeout))
        })
    }
}

impl Handler<PingCache> for CacheActor {
    type Result = ResponseFuture<Result<(), CacheError>>;

    fn handle(&mut self, _: PingCache, _: &mut Self::Context) -> Self::Result {
        let conn = self.connection();
        let timeout = self.settings.timeout;
        self.call(async move {
            let mut conn = conn?;
            redis::cmd("PING")
                .query_async::<String>(&mut conn)
                .await
                .map(|_| ())
                .map_err(|e| CacheError::from_redis(e, timeout))
        })
    }
}
