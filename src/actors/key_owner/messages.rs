//! What the owner is asked and what it answers: the messages HTTP workers, the change listener
//! and the lease-notice subscriber send it, and the [`Answer`] every request gets.

use std::time::Duration;

use actix::prelude::*;
use tokio::sync::oneshot;

use super::generations::CopyTerms;
use crate::actors::db::DbError;
use crate::template::Lookup;

/// Where a successful flight got its answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    Cache,
    Database,
    /// Another replica loaded it under the fleet lease, and this flight read what it wrote.
    Peer,
}

/// Why a request got no answer. Every waiter of a failed flight receives the same error.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FlightError {
    #[error("database unavailable: {0}")]
    Database(#[from] DbError),
    #[error("the database actor is not running")]
    DatabaseActorGone,
    #[error("loading took longer than {0:?}")]
    Timeout(Duration),
    /// A panic while loading: in a database call, or in the owner itself.
    #[error("loading failed unexpectedly: {0} panicked")]
    Panicked(&'static str),
    /// Shed before any work: the owner is at one of its bounds.
    #[error("the service is overloaded ({0}); retry shortly")]
    Shed(ShedReason),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ShedReason {
    #[error("too many keys loading at once")]
    PendingKeys,
    #[error("too many requests waiting for this key")]
    Waiters,
    /// The owner's flights hold its share of `INFLIGHT_MEMORY_MB` (see `in_air`).
    #[error("too many large templates loading at once")]
    Memory,
    /// The owner's mailbox is full: it is behind on the requests it was sent.
    #[error("a key owner's queue is full")]
    Mailbox,
}

impl ShedReason {
    /// The `reason` label of `shed_requests_total`.
    pub fn label(self) -> &'static str {
        match self {
            ShedReason::PendingKeys => "pending_keys",
            ShedReason::Waiters => "waiters",
            ShedReason::Memory => "memory",
            ShedReason::Mailbox => "mailbox",
        }
    }

    /// Every reason, for a metric that shows zero before the first shed request.
    pub const ALL: [ShedReason; 4] = [
        ShedReason::PendingKeys,
        ShedReason::Waiters,
        ShedReason::Memory,
        ShedReason::Mailbox,
    ];
}

/// How the `X-Cache` header describes an answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum XCache {
    /// Served from a cache (Redis or the owner's near cache).
    Hit,
    /// This request's own flight loaded it from PostgreSQL.
    Miss,
    /// This request waited on another request's database load and shared its result (a load
    /// by this replica, or by another one under the fleet lease).
    Shared,
    /// An expired value, served on purpose: while one refresh reloads it, or because loading a
    /// fresh one failed.
    Stale,
}

impl XCache {
    pub fn as_str(self) -> &'static str {
        match self {
            XCache::Hit => "HIT",
            XCache::Miss => "MISS",
            XCache::Shared => "SHARED",
            XCache::Stale => "STALE",
        }
    }
}

/// The answer every waiter receives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub result: Result<Lookup, FlightError>,
    pub x_cache: XCache,
    /// Set on a near-cache `HIT`, and on a current flight's `Fresh` answers that the owner
    /// remembered: how long the asking HTTP worker may keep a copy of the answer.
    pub terms: Option<CopyTerms>,
}

/// Asks the owner for a template. The answer arrives on `reply`; the sender uses `do_send`, so
/// asking never waits on a full mailbox, and dropping the receiver is how a waiter leaves.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct GetTemplate {
    pub id: i64,
    pub reply: oneshot::Sender<Answer>,
    /// The request's span: a flight it starts, and the flight's stages, have theirs under it
    /// (`Span::none()` for none).
    pub span: tracing::Span,
}

/// Another replica filled `id` or gave up its lease on it (a notice from Redis pub/sub): a flight
/// waiting on that lease looks again now.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct PeerFilled {
    pub id: i64,
    /// The fill wrote nothing (a "not found" that is not cached): there is nothing to read, so
    /// a waiting flight loads for itself at once.
    pub wrote_nothing: bool,
}

/// Drop what this owner knows of `id` because the row changed: the near-cache entry, the Redis
/// entry, and the current flight (superseded: requests from now on start a new one).
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct Invalidate(pub i64);

/// Notifications may have been missed (the listening connection was (re)established): forget
/// every remembered value, and supersede every current flight.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct ForgetAll;

/// The service is stopping, its requests all answered: give back every fleet lease a flight
/// still holds (a refresh, or a load whose requests timed out), so that the other replicas load
/// those keys at once instead of waiting for the lease to run out. Answers how many were given
/// back, once Redis has taken them (or failed to).
#[derive(Debug, Message)]
#[rtype(result = "usize")]
pub struct HandBack;

/// An HTTP worker, still answering its kept copies of these ids, asks for renewed ones (see
/// [`CopyTerms::renew_at`]), in the background: no request waits on the answers. The worker
/// sends the ids that came due within a few milliseconds together. For each id the owner answers
/// from its near-cache entry if another worker's renewal already renewed it, joins a flight the
/// key has (its `Fresh` answer carries new terms), waits on a Redis read of the id already in
/// the air (another worker's renewal), or else reads it again from Redis: the ids left are read
/// in one round trip ([`crate::actors::cache::CacheGetMany`]), and a fresh value is remembered
/// and answered with its terms. A renewal is not a request: it counts in no request metric,
/// starts no flight and so never loads from PostgreSQL, and is never answered `STALE` or with an
/// error — its reply is dropped instead, and the worker's copy runs out as it would have.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct Renew {
    pub renewals: Vec<(i64, oneshot::Sender<Answer>)>,
}
