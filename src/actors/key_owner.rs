//! `KeyOwner`: the actor that owns a shard of the key space and deduplicates its loads.
//!
//! # Ownership
//! Every template id belongs to exactly one owner, chosen by [`shard_for`]. All requests for an id
//! reach that owner's mailbox, and an actor handles one message at a time, so the owner's plain
//! `HashMap` of pending flights needs no lock: mailbox serialization *is* the deduplication.
//!
//! # Flights
//! The first [`GetTemplate`] for an id with no pending flight starts one: a cache read, on a miss
//! a database load, then a cache write of what was loaded. The flight runs as a future spawned on
//! the owner's context (`ctx.spawn`), so the owner keeps handling messages — for other keys and
//! for this one — while it is in the air; keys never wait on each other. Requests for the id that
//! arrive while the flight is pending join its waiter list instead of starting another.
//!
//! A flight ends only after its cache write was attempted, so a request that arrives after the
//! flight's entry is removed finds the value in Redis. Then, in one step of the actor:
//! the entry is removed and every waiter is answered with the same result.
//!
//! # What every waiter is guaranteed
//! - exactly one answer, the flight's result, or an error if the flight failed, timed out
//!   (`FLIGHT_TIMEOUT_MS`) or panicked — never silence, so no waiter hangs on the owner;
//! - a waiter that goes away (its HTTP request was cancelled or hit its deadline) just drops its
//!   receiver: the flight goes on and still fills the cache for everyone after it;
//! - errors are never cached: a failed flight leaves no entry, and the next request starts anew.
//!
//! With `COALESCE=off` every request runs a flight of its own and nothing is shared: the
//! baseline that shows what coalescing saves.
//!
//! The owner talks to Redis and PostgreSQL only through [`Recipient`]s, so tests put fakes there.

use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::time::Duration;

use actix::prelude::*;
use actix_web::web::Bytes;
use futures_util::FutureExt;
use tokio::sync::oneshot;

use crate::actors::cache::{CacheGet, CacheSet};
use crate::actors::db::{DbError, FetchTemplate};
use crate::metrics::Metrics;

/// Picks the owner of `id` among `shards` owners. A multiplicative hash spreads consecutive ids
/// (the common case: BIGSERIAL keys) and strided ids alike.
pub fn shard_for(id: i64, shards: usize) -> usize {
    let mixed = (id as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    ((mixed >> 32) % shards.max(1) as u64) as usize
}

/// What a flight produced for a key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lookup {
    /// The JSON body of the template.
    Found(Bytes),
    /// No template has this id.
    NotFound,
}

/// Where a successful flight got its answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    Cache,
    Database,
}

/// Why a flight produced no answer. Every waiter of the flight receives the same error.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FlightError {
    #[error("database unavailable: {0}")]
    Database(#[from] DbError),
    #[error("the database actor is not running")]
    DatabaseActorGone,
    #[error("loading took longer than {0:?}")]
    Timeout(Duration),
    #[error("loading failed unexpectedly")]
    Panicked,
}

/// How the `X-Cache` header describes an answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum XCache {
    /// Served from a cache.
    Hit,
    /// This request's own flight loaded it from PostgreSQL.
    Miss,
    /// This request waited on another request's database load and shared its result.
    Shared,
}

impl XCache {
    pub fn as_str(self) -> &'static str {
        match self {
            XCache::Hit => "HIT",
            XCache::Miss => "MISS",
            XCache::Shared => "SHARED",
        }
    }
}

/// The answer every waiter receives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub result: Result<Lookup, FlightError>,
    pub x_cache: XCache,
}

/// Asks the owner for a template. The answer arrives on `reply`; the sender uses `do_send`, so
/// asking never waits on a full mailbox, and dropping the receiver is how a waiter leaves.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct GetTemplate {
    pub id: i64,
    pub reply: oneshot::Sender<Answer>,
}

/// The owner's collaborators and limits.
#[derive(Clone)]
pub struct KeyOwnerDeps {
    pub cache_get: Recipient<CacheGet>,
    pub cache_set: Recipient<CacheSet>,
    pub db: Recipient<FetchTemplate>,
    pub flight_timeout: Duration,
    pub coalesce: bool,
    pub metrics: Metrics,
}

type FlightResult = Result<(Lookup, Origin), FlightError>;

/// One request waiting for a flight.
struct Waiter {
    reply: oneshot::Sender<Answer>,
    /// The request that started the flight (its answer is `MISS`, the others' `SHARED`).
    started_it: bool,
}

/// A flight in progress for one key.
struct Flight {
    /// Distinguishes this flight from any later one for the same key.
    id: u64,
    waiters: Vec<Waiter>,
}

pub struct KeyOwner {
    /// This owner's shard number, as the `shard` label of its metrics.
    shard: String,
    deps: KeyOwnerDeps,
    /// Pending flights by template id, each with its waiters. Only coalesced flights live here.
    pending_waiters: HashMap<i64, Flight>,
    next_flight_id: u64,
}

impl KeyOwner {
    pub fn new(shard: usize, deps: KeyOwnerDeps) -> Self {
        KeyOwner {
            shard: shard.to_string(),
            deps,
            pending_waiters: HashMap::new(),
            next_flight_id: 0,
        }
    }

    fn inflight_keys(&self) -> prometheus::IntGauge {
        self.deps
            .metrics
            .key_owner_inflight_keys
            .with_label_values(&[&self.shard])
    }

    fn waiters_gauge(&self) -> prometheus::IntGauge {
        self.deps
            .metrics
            .key_owner_waiters
            .with_label_values(&[&self.shard])
    }

    /// Starts a flight for `id` whose result is handed to `on_done` inside the actor.
    fn spawn_flight<F>(&mut self, id: i64, ctx: &mut Context<Self>, on_done: F)
    where
        F: FnOnce(&mut Self, FlightResult) + 'static,
    {
        let timeout = self.deps.flight_timeout;
        // A panic inside the flight (a bug in a collaborator) must not take the owner down with
        // every other key's waiters: it becomes an error like any other.
        let flight = AssertUnwindSafe(run_flight(id, self.deps.clone())).catch_unwind();
        let bounded = tokio::time::timeout(timeout, flight).map(move |outcome| match outcome {
            Err(_elapsed) => Err(FlightError::Timeout(timeout)),
            Ok(Err(_panic)) => Err(FlightError::Panicked),
            Ok(Ok(result)) => result,
        });
        self.inflight_keys().inc();
        ctx.spawn(bounded.into_actor(self).map(move |result, owner, _| {
            owner.inflight_keys().dec();
            count_flight(&owner.deps.metrics, &result);
            on_done(owner, result);
        }));
    }

    /// Answers every waiter of a coalesced flight and forgets the flight.
    fn finish_flight(&mut self, id: i64, flight_id: u64, result: FlightResult) {
        let waiters = match self.pending_waiters.get(&id) {
            Some(flight) if flight.id == flight_id => self
                .pending_waiters
                .remove(&id)
                .map(|f| f.waiters)
                .unwrap_or_default(),
            // Unreachable by construction (only this flight removes its entry), but a newer
            // flight's waiters must never be answered with an older flight's result.
            _ => Vec::new(),
        };
        self.waiters_gauge().sub(waiters.len() as i64);
        for waiter in waiters {
            answer(&self.deps.metrics, waiter, &result);
        }
    }
}

impl Actor for KeyOwner {
    type Context = Context<Self>;
}

impl Handler<GetTemplate> for KeyOwner {
    type Result = ();

    fn handle(&mut self, GetTemplate { id, reply }: GetTemplate, ctx: &mut Self::Context) {
        self.waiters_gauge().inc();
        if !self.deps.coalesce {
            let waiter = Waiter {
                reply,
                started_it: true,
            };
            self.spawn_flight(id, ctx, move |owner, result| {
                owner.waiters_gauge().dec();
                answer(&owner.deps.metrics, waiter, &result);
            });
            return;
        }
        if let Some(flight) = self.pending_waiters.get_mut(&id) {
            flight.waiters.push(Waiter {
                reply,
                started_it: false,
            });
            return;
        }
        self.next_flight_id += 1;
        let flight_id = self.next_flight_id;
        self.pending_waiters.insert(
            id,
            Flight {
                id: flight_id,
                waiters: vec![Waiter {
                    reply,
                    started_it: true,
                }],
            },
        );
        self.spawn_flight(id, ctx, move |owner, result| {
            owner.finish_flight(id, flight_id, result)
        });
    }
}

/// The flight itself: cache read, on a miss a database load, then a cache write of what was
/// loaded. A cache error is a miss; a failed cache write is logged (by the cache actor) and
/// does not fail the flight, whose value is good.
async fn run_flight(id: i64, deps: KeyOwnerDeps) -> FlightResult {
    if let Ok(Ok(Some(body))) = deps.cache_get.send(CacheGet(id)).await {
        return Ok((Lookup::Found(body), Origin::Cache));
    }
    match deps.db.send(FetchTemplate(id)).await {
        Err(_mailbox) => Err(FlightError::DatabaseActorGone),
        Ok(Err(e)) => Err(FlightError::Database(e)),
        Ok(Ok(None)) => Ok((Lookup::NotFound, Origin::Database)),
        Ok(Ok(Some(template))) => {
            let body = template.to_body();
            let _ = deps
                .cache_set
                .send(CacheSet {
                    id,
                    body: body.clone(),
                })
                .await;
            Ok((Lookup::Found(body), Origin::Database))
        }
    }
}

fn count_flight(metrics: &Metrics, result: &FlightResult) {
    let label = match result {
        Ok((_, Origin::Cache)) => "cache",
        Ok((Lookup::Found(_), Origin::Database)) => "database",
        Ok((Lookup::NotFound, Origin::Database)) => "not_found",
        Err(_) => "error",
    };
    metrics.flights_total.with_label_values(&[label]).inc();
}

/// Sends one waiter its answer and counts it. A waiter that left is still counted: its request
/// was served as far as the owner is concerned, and the counts must add up to the flights' work.
fn answer(metrics: &Metrics, waiter: Waiter, result: &FlightResult) {
    let x_cache = match (result, waiter.started_it) {
        (Ok((_, Origin::Cache)), started_it) => {
            metrics.cache_hits_total.inc();
            if !started_it {
                metrics.cache_reads_coalesced_total.inc();
            }
            XCache::Hit
        }
        (_, true) => {
            metrics.cache_misses_total.inc();
            XCache::Miss
        }
        (_, false) => {
            metrics.cache_misses_total.inc();
            if result.is_ok() {
                metrics.singleflight_shared_total.inc();
            }
            XCache::Shared
        }
    };
    let _ = waiter.reply.send(Answer {
        result: result.clone().map(|(lookup, _)| lookup),
        x_cache,
    });
}

#[cfg(test)]
#[path = "owner_tests.rs"]
mod tests;
