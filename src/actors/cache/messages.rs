//! What a cache actor is asked and what it answers: the messages of reads, writes and deletes
//! (the fleet lease's are in [`super::lease`]), the usable value a read finds, and why a call
//! gave none.

use std::time::Duration;

use actix::prelude::*;

use crate::template::Lookup;

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
    /// A write met a replica: a failover made the server the service writes to a replica.
    #[error("redis is a replica now: {0}")]
    ReadOnly(String),
}

impl CacheError {
    /// What failed, in words for `/readyz`: never the client's own text, which may name hosts
    /// and server internals.
    pub fn describe(&self) -> &'static str {
        match self {
            CacheError::Timeout(_) => "Redis did not answer in time",
            CacheError::Refused(_) => "Redis refused the connection",
            CacheError::Io(_) => "the connection to Redis failed",
            CacheError::Protocol(_) => "Redis answered with an error",
            CacheError::Decode(_) => "a cached value is not a template",
            CacheError::BreakerOpen => {
                "Redis calls are skipped after repeated failures (circuit breaker open)"
            }
            CacheError::ReadOnly(_) => "Redis is a replica now (a failover moved the master)",
        }
    }

    /// The `kind` label of `redis_errors_total`.
    pub(super) fn kind(&self) -> &'static str {
        match self {
            CacheError::Timeout(_) => "timeout",
            CacheError::Refused(_) => "refused",
            CacheError::Io(_) | CacheError::ReadOnly(_) => "io",
            CacheError::Protocol(_) => "protocol",
            CacheError::Decode(_) => "decode",
            CacheError::BreakerOpen => "skipped",
        }
    }

    /// Every kind a failed call is counted as (a skipped call is counted elsewhere), for a
    /// metric that shows zero before the first error.
    pub(super) const COUNTED_KINDS: [&'static str; 5] =
        ["timeout", "refused", "io", "protocol", "decode"];

    /// Failures that say Redis is unreachable (and so count towards opening the breaker), as
    /// opposed to a reachable Redis holding a bad value or rejecting a command.
    pub(super) fn is_connectivity(&self) -> bool {
        matches!(
            self,
            CacheError::Timeout(_)
                | CacheError::Refused(_)
                | CacheError::Io(_)
                | CacheError::ReadOnly(_)
        )
    }

    pub(super) fn from_redis(e: redis::RedisError, timeout: Duration) -> Self {
        if e.code() == Some("READONLY") {
            CacheError::ReadOnly(e.to_string())
        } else if e.is_timeout() {
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

/// A usable value found in Redis.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cached {
    pub lookup: Lookup,
    /// How much longer the entry is fresh. Zero once past its soft expiry: then it is servable
    /// only as `STALE`, while one refresh reloads it.
    pub fresh_for: Duration,
}

impl Cached {
    pub fn is_soft_expired(&self) -> bool {
        self.fresh_for.is_zero()
    }
}

/// What a write must find unchanged in Redis to land: the key's generation when the load began
/// (read with the value, or by the lease claim) and the epoch of the Redis it was read from
/// (see [`super::link`]). Every change bumps the generation and a failover or restart changes
/// the epoch, so a load that began before either writes nothing — decided in Redis, whatever
/// the replicas' clocks say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fence {
    pub generation: i64,
    pub epoch: u64,
}

/// What [`CacheGet`] found: the value, if usable, and the fence a load of the key writes under.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Read {
    pub value: Option<Cached>,
    pub fence: Fence,
}

/// Read a template and its generation. `value: None` on a miss, `Some(NotFound)` for a cached
/// "no such template". A value that is not a valid entry for this id is a miss too (counted as a
/// `decode` error), so the caller reloads it and its write overwrites the bad value. An
/// entry from another Redis epoch, or loaded before the service last learned that it may have
/// missed a change ([`MarkSuspect`]), is a miss too: it may be older than that change.
#[derive(Debug, Message)]
#[rtype(result = "Result<Read, CacheError>")]
pub struct CacheGet(pub i64);

/// Read several templates in one round trip (`MGET`): for each id, in order, what [`CacheGet`]
/// would answer, except that a value that is not a valid entry is a miss (`None`, counted as a
/// decode error) rather than an error for all of them. What HTTP workers' renewals read (see
/// [`crate::actors::key_owner::Renew`]).
#[derive(Debug, Message)]
#[rtype(result = "Result<Vec<Option<Cached>>, CacheError>")]
pub struct CacheGetMany(pub Vec<i64>);

/// Remove a template's entry and bump its generation (its row changed): a lease holder that
/// claimed before this fills nothing (see [`lease`]).
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct CacheDel(pub i64);

/// Entries loaded before this moment may predate changes whose notifications were missed: treat
/// them as misses (they are reloaded, and overwritten by the reload).
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct MarkSuspect {
    pub before_unix_ms: u64,
}

/// Store what a load found: a body fresh for `CACHE_TTL_SECS`, a "not found" for
/// `NEGATIVE_TTL_SECS`, both counted from `loaded_at_ms`, when the database read began — if the
/// key's generation and the Redis epoch are still `fence`'s (one script: see [`super::writes`]).
/// Without a fence (the read before the load failed) nothing is written. `Ok(false)`: nothing
/// was written.
#[derive(Debug, Message)]
#[rtype(result = "Result<bool, CacheError>")]
pub struct CacheSet {
    pub id: i64,
    pub lookup: Lookup,
    /// Wall-clock time (unix ms) at which the load's database read began: the entry's age, and
    /// what [`MarkSuspect`] compares with.
    pub loaded_at_ms: u64,
    /// The row was read from a read replica (and `loaded_at_ms` is as of its replay).
    pub from_replica: bool,
    pub fence: Option<Fence>,
}

/// Readiness probe: `PING` (reported as degraded while the breaker is open).
#[derive(Debug, Message)]
#[rtype(result = "Result<(), CacheError>")]
pub struct PingCache;
