//! What the [`DbActor`](super::DbActor) is asked and what it answers: loads, the listener's
//! heartbeat and relayed changes, readiness; and why a load failed.

use std::time::{Duration, Instant};

use actix::prelude::*;

use super::failure::Evidence;
use super::reachability::Standing;
use crate::template::Template;

/// Why a load from PostgreSQL failed. Cloned to every waiter of the flight.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DbError {
    /// PostgreSQL is known to be down: failed at once, without waiting.
    #[error("{}", .0.describe())]
    Unavailable(Evidence),
    /// The flight's deadline passed while every connection was busy.
    #[error("no database connection became free within the {0:?} the load had left")]
    PoolTimeout(Duration),
    #[error("the query took longer than {0:?}")]
    QueryTimeout(Duration),
    #[error("the query failed: {0}")]
    Query(String),
    #[error("the database call panicked")]
    Panicked,
}

impl DbError {
    pub fn kind(&self) -> &'static str {
        match self {
            DbError::Unavailable(_) => "unavailable",
            DbError::PoolTimeout(_) => "pool_timeout",
            DbError::QueryTimeout(_) => "query_timeout",
            DbError::Query(_) => "query",
            DbError::Panicked => "panicked",
        }
    }

    /// Every kind, for metrics that should show zero before the first error.
    pub const KINDS: [&'static str; 5] = [
        "unavailable",
        "pool_timeout",
        "query_timeout",
        "query",
        "panicked",
    ];
}

/// Load one template by id: a [`Loaded`] with no row when no such row exists. Waiting for a
/// connection and the query end by `deadline` (the flight's).
#[derive(Debug, Message)]
#[rtype(result = "Result<Loaded, DbError>")]
pub struct FetchTemplate {
    pub id: i64,
    pub deadline: Instant,
    /// The load's span: its batch's `pool.checkout` and `db.query` spans go under it.
    pub span: tracing::Span,
}

/// What a load found: the row, or none for no such template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Loaded {
    pub row: Option<Template>,
    /// Read from a replica: the moment (unix ms) before which it holds everything the primary
    /// committed, and so how old the row may be (see [`super::replicas`]). `None` from the
    /// primary, whose row is current when its query runs.
    pub replica_as_of_ms: Option<u64>,
}

impl Loaded {
    /// The primary's answer.
    pub fn from_primary(row: Option<Template>) -> Loaded {
        Loaded {
            row,
            replica_as_of_ms: None,
        }
    }
}

/// Sends a notification on `channel` through the pool (`DATABASE_URL`), as a change would be
/// sent: the change listener's heartbeat. `Ok` once it is committed.
#[derive(Debug, Message)]
#[rtype(result = "Result<(), DbError>")]
pub struct Notify {
    pub channel: &'static str,
    pub payload: String,
}

/// The change listener relayed a change of template `id`: until a replica has replayed it, its
/// loads read the primary (see [`super::replicas`]). Sent before the key's owner is told, so
/// that every load the owner starts after it is routed by it.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct Changed(pub i64);

/// Anything may have changed (the listener reconnected, heard again after a deaf spell, or saw a
/// `TRUNCATE`): every key's loads read the primary until a replica has replayed past now.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct ChangedAll;

/// Readiness: where PostgreSQL stands, as the actor's evidence and probes decided (no query of
/// its own: readiness checks must not load the database).
#[derive(Debug, Message)]
#[rtype(result = "Standing")]
pub struct PingDb;
