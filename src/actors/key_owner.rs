//! `KeyOwner`: the actor that owns a shard of the key space and deduplicates its loads.
//!
//! # Ownership
//! Every template id belongs to exactly one owner, chosen by [`shard_for`]. All requests for an id
//! reach that owner's mailbox, and an actor handles one message at a time, so the owner's plain
//! maps need no lock: mailbox serialization *is* the deduplication.
//!
//! # Near cache
//! The owner remembers the latest answer for its recent keys (an LRU of `NEAR_CACHE_CAPACITY`
//! entries). For `NEAR_CACHE_TTL_MS` after a load an entry is *fresh* and answers at once, with no
//! Redis round trip: hot keys cost no I/O at all, and when Redis is gone the database sees at most
//! one load per key per TTL, however high the request rate. Older entries are kept (until evicted)
//! only as a fallback: see stale-if-error.
//!
//! # Flights
//! A request that finds no fresh entry and no pending flight for its id starts one: a cache read,
//! on a miss a database load, then a cache write of what was loaded. The flight runs as a future
//! spawned on the owner's context (`ctx.spawn`), so the owner keeps handling messages — for other
//! keys and for this one — while it is in the air; keys never wait on each other. Requests for the
//! id that arrive while the flight is pending join its waiter list instead of starting another.
//!
//! A flight ends only after its cache write was attempted, so a request that arrives after the
//! flight's entry is removed finds the value cached. Then, in one step of the actor: the entry
//! is removed, the near cache is updated, and every waiter is answered with the same result.
//!
//! # Refresh-ahead and invalidation
//! Redis entries carry a soft expiry (`CACHE_TTL_SECS`, jittered) and live `CACHE_GRACE_SECS`
//! longer. A read that finds a soft-expired value answers its waiters with it at once
//! (`X-Cache: STALE`), keeps it in the near cache, and the same flight goes on to reload the key
//! in the background: a key that has a value never makes a request wait on PostgreSQL.
//! When the row changes, [`Invalidate`] drops the key from the near cache and Redis, and marks a
//! pending flight *dirty*: what it brings back may predate the change, so it is answered but not
//! remembered, and its Redis write is removed again.
//!
//! # What every waiter is guaranteed
//! - exactly one answer: the flight's result; or, if the flight failed, timed out (each stage —
//!   cache read, load and write — within `FLIGHT_TIMEOUT_MS`) or panicked, the value remembered
//!   within the last `MAX_STALE_SECS` (`X-Cache: STALE`), else an error — never silence, so no
//!   waiter hangs;
//! - a waiter that goes away (its HTTP request was cancelled or hit its deadline) just drops its
//!   receiver: the flight goes on and still fills the caches for everyone after it;
//! - errors are never cached: a failed flight leaves no entry, and the next request starts anew;
//! - bounded memory: at most `MAX_PENDING_KEYS` flights and `MAX_WAITERS_PER_KEY` waiters each;
//!   a request beyond either bound is answered at once with an overload error (shed).
//!
//! With `COALESCE=off` every request runs a flight of its own: nothing is shared, and the near
//! cache, refresh-ahead, shedding and the dirty marking of in-flight loads are all off. It is a
//! measurement baseline that shows what they save, not a mode to run in production.
//!
//! The owner talks to Redis and PostgreSQL only through [`Recipient`]s, so tests put fakes there.

use std::collections::HashMap;
use std::num::NonZeroUsize;
use std::panic::AssertUnwindSafe;
use std::time::{Duration, Instant};

use actix::prelude::*;
use actix_web::web::Bytes;
use futures_util::FutureExt;
use lru::LruCache;
use tokio::sync::oneshot;

use crate::actors::cache::{CacheDel, CacheGet, CacheSet, Cached};
use crate::actors::db::{DbError, FetchTemplate};
use crate::config::Settings;
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

/// Why a request got no answer. Every waiter of a failed flight receives the same error.
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
}

impl ShedReason {
    fn label(self) -> &'static str {
        match self {
            ShedReason::PendingKeys => "pending_keys",
            ShedReason::Waiters => "waiters",
        }
    }
}

/// How the `X-Cache` header describes an answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum XCache {
    /// Served from a cache (Redis or the owner's near cache).
    Hit,
    /// This request's own flight loaded it from PostgreSQL.
    Miss,
    /// This request waited on another request's database load and shared its result.
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
}

/// Asks the owner for a template. The answer arrives on `reply`; the sender uses `do_send`, so
/// asking never waits on a full mailbox, and dropping the receiver is how a waiter leaves.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct GetTemplate {
    pub id: i64,
    pub reply: oneshot::Sender<Answer>,
}

/// The owner's behaviour and bounds; a subset of [`Settings`].
#[derive(Debug, Clone)]
pub struct OwnerSettings {
    pub flight_timeout: Duration,
    pub coalesce: bool,
    pub near_cache_ttl: Duration,
    pub near_cache_capacity: usize,
    pub negative_ttl: Duration,
    pub max_stale: Duration,
    pub max_pending_keys: usize,
    pub max_waiters_per_key: usize,
}

impl From<&Settings> for OwnerSettings {
    fn from(s: &Settings) -> Self {
        OwnerSettings {
            flight_timeout: s.flight_timeout,
            coalesce: s.coalesce,
            near_cache_ttl: s.near_cache_ttl,
            near_cache_capacity: s.near_cache_capacity,
            negative_ttl: s.negative_ttl,
            max_stale: s.max_stale,
            max_pending_keys: s.max_pending_keys,
            max_waiters_per_key: s.max_waiters_per_key,
        }
    }
}

impl Default for OwnerSettings {
    fn default() -> Self {
        OwnerSettings::from(&Settings::default())
    }
}

/// The owner's collaborators and settings.
#[derive(Clone)]
pub struct KeyOwnerDeps {
    pub cache_get: Recipient<CacheGet>,
    pub cache_set: Recipient<CacheSet>,
    pub cache_del: Recipient<CacheDel>,
    pub db: Recipient<FetchTemplate>,
    pub settings: OwnerSettings,
    pub metrics: Metrics,
}

/// Drop what this owner knows of `id` because the row changed: the near-cache entry, the Redis
/// entry, and whatever a pending flight is about to store.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct Invalidate(pub i64);

/// Notifications may have been missed (the listening connection dropped): forget every
/// remembered value, and do not trust what pending flights bring back.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct ForgetAll;

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
    /// The row changed while the flight was in the air: what it brings back may be older than
    /// the change, so it is answered to its waiters but neither remembered nor left in Redis.
    dirty: bool,
    /// Set when the flight found a soft-expired value, answered its waiters with it and is now
    /// reloading the key in the background: requests arriving meanwhile get this value at once
    /// (`STALE`) rather than wait on PostgreSQL. Cleared when the row changes.
    serving: Option<Lookup>,
}

/// The latest answer the owner saw for a key.
struct Remembered {
    lookup: Lookup,
    loaded_at: Instant,
}

pub struct KeyOwner {
    /// This owner's shard number, as the `shard` label of its metrics.
    shard: String,
    deps: KeyOwnerDeps,
    /// Pending flights by template id, each with its waiters. Only coalesced flights live here.
    pending_waiters: HashMap<i64, Flight>,
    /// Latest answers of recent keys, fresh for `near_cache_ttl`, usable when stale up to
    /// `max_stale`. `None` when neither use is enabled.
    near_cache: Option<LruCache<i64, Remembered>>,
    next_flight_id: u64,
}

impl KeyOwner {
    pub fn new(shard: usize, deps: KeyOwnerDeps) -> Self {
        let s = &deps.settings;
        let remember = !s.near_cache_ttl.is_zero() || !s.max_stale.is_zero();
        let near_cache = NonZeroUsize::new(s.near_cache_capacity)
            .filter(|_| remember)
            .map(LruCache::new);
        KeyOwner {
            shard: shard.to_string(),
            deps,
            pending_waiters: HashMap::new(),
            near_cache,
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

    /// A fresh remembered answer for `id`, if any.
    fn fresh(&mut self, id: i64) -> Option<Lookup> {
        let s = &self.deps.settings;
        let (ttl, negative_ttl) = (s.near_cache_ttl, s.negative_ttl.min(s.near_cache_ttl));
        let entry = self.near_cache.as_mut()?.get(&id)?;
        let fresh_for = match entry.lookup {
            Lookup::Found(_) => ttl,
            Lookup::NotFound => negative_ttl,
        };
        (entry.loaded_at.elapsed() < fresh_for).then(|| entry.lookup.clone())
    }

    /// A remembered answer for `id` young enough to stand in for a failed load.
    fn stale(&mut self, id: i64) -> Option<Lookup> {
        let max_stale = self.deps.settings.max_stale;
        let entry = self.near_cache.as_mut()?.peek(&id)?;
        (entry.loaded_at.elapsed() < max_stale).then(|| entry.lookup.clone())
    }

    fn remember(&mut self, id: i64, lookup: &Lookup) {
        if let Some(cache) = self.near_cache.as_mut() {
            cache.put(
                id,
                Remembered {
                    lookup: lookup.clone(),
                    loaded_at: Instant::now(),
                },
            );
        }
    }

    /// Runs one stage of a flight (`stage` is a future made from `deps`) as a future on the
    /// owner's context, bounded by the flight timeout, with a panic turned into an error, and
    /// hands its result to `on_done` inside the actor.
    fn spawn_stage<T, Fut, F>(&mut self, ctx: &mut Context<Self>, stage: Fut, on_done: F)
    where
        T: 'static,
        Fut: std::future::Future<Output = Result<T, FlightError>> + 'static,
        F: FnOnce(&mut Self, Result<T, FlightError>, &mut Context<Self>) + 'static,
    {
        let timeout = self.deps.settings.flight_timeout;
        // A panic inside the flight (a bug in a collaborator) must not take the owner down with
        // every other key's waiters: it becomes an error like any other.
        let guarded = AssertUnwindSafe(stage).catch_unwind();
        let bounded = tokio::time::timeout(timeout, guarded).map(move |outcome| match outcome {
            Err(_elapsed) => Err(FlightError::Timeout(timeout)),
            Ok(Err(_panic)) => Err(FlightError::Panicked),
            Ok(Ok(result)) => result,
        });
        ctx.spawn(
            bounded
                .into_actor(self)
                .map(move |result, owner, ctx| on_done(owner, result, ctx)),
        );
    }

    /// Starts a coalesced flight for `id` with its first waiter.
    fn start_flight(&mut self, id: i64, reply: oneshot::Sender<Answer>, ctx: &mut Context<Self>) {
        self.next_flight_id += 1;
        let flight_id = self.next_flight_id;
        let first = Waiter {
            reply,
            started_it: true,
        };
        self.pending_waiters.insert(
            id,
            Flight {
                id: flight_id,
                waiters: vec![first],
                dirty: false,
                serving: None,
            },
        );
        self.waiters_gauge().inc();
        self.inflight_keys().inc();
        let read = read_cache(id, self.deps.clone());
        self.spawn_stage(ctx, read, move |owner, result, ctx| {
            owner.on_cache_read(id, flight_id, result, ctx)
        });
    }

    /// Stage one is over: a fresh value ends the flight; a soft-expired one is answered at once
    /// and refreshed in the background (refresh-ahead); a miss goes on to the database.
    fn on_cache_read(
        &mut self,
        id: i64,
        flight_id: u64,
        result: Result<Option<Cached>, FlightError>,
        ctx: &mut Context<Self>,
    ) {
        match result {
            Ok(Some(Cached {
                lookup,
                stale: false,
            })) => self.finish_flight(id, flight_id, Ok((lookup, Origin::Cache))),
            Ok(Some(Cached {
                lookup,
                stale: true,
            })) => {
                // Nobody waits on PostgreSQL for a key that has a value: the waiters get it now,
                // the near cache serves it while the refresh runs, and the refresh replaces it.
                let waiters = self.take_waiters(id, flight_id);
                let dirty = match self.pending_waiters.get_mut(&id) {
                    Some(flight) if flight.id == flight_id => {
                        if !flight.dirty {
                            flight.serving = Some(lookup.clone());
                        }
                        flight.dirty
                    }
                    _ => true,
                };
                if !dirty {
                    self.remember(id, &lookup);
                }
                for waiter in waiters {
                    answer(
                        &self.deps.metrics,
                        waiter,
                        &Settled::Revalidating(lookup.clone()),
                    );
                }
                self.deps.metrics.refreshes_total.inc();
                self.load(id, flight_id, ctx);
            }
            Ok(None) | Err(_) => self.load(id, flight_id, ctx),
        }
    }

    /// Stage two: load from PostgreSQL and store in Redis, then finish the flight.
    fn load(&mut self, id: i64, flight_id: u64, ctx: &mut Context<Self>) {
        let load = load_and_store(id, self.deps.clone());
        self.spawn_stage(ctx, load, move |owner, result, _| {
            owner.finish_flight(
                id,
                flight_id,
                result.map(|lookup| (lookup, Origin::Database)),
            )
        });
    }

    /// Removes and returns the waiters of flight `flight_id` for `id`, leaving the (now
    /// waiter-less) flight pending.
    fn take_waiters(&mut self, id: i64, flight_id: u64) -> Vec<Waiter> {
        let waiters = match self.pending_waiters.get_mut(&id) {
            Some(flight) if flight.id == flight_id => std::mem::take(&mut flight.waiters),
            _ => Vec::new(),
        };
        self.waiters_gauge().sub(waiters.len() as i64);
        waiters
    }

    /// Answers every waiter of a flight and forgets the flight.
    fn finish_flight(&mut self, id: i64, flight_id: u64, result: FlightResult) {
        self.inflight_keys().dec();
        count_flight(&self.deps.metrics, &result);
        let waiters = self.take_waiters(id, flight_id);
        let dirty = match self.pending_waiters.get(&id) {
            Some(flight) if flight.id == flight_id => {
                self.pending_waiters.remove(&id).is_some_and(|f| f.dirty)
            }
            // Unreachable by construction (only this flight removes its entry), but a newer
            // flight's entry must never be removed by an older flight.
            _ => false,
        };
        if dirty {
            // It may have stored a value from before the change (even if it then failed or timed
            // out waiting for the write's reply): remove it again.
            self.deps.cache_del.do_send(CacheDel(id));
        }
        let settled = match result {
            Ok((lookup, origin)) => {
                if !dirty {
                    self.remember(id, &lookup);
                }
                Settled::Fresh(lookup, origin)
            }
            Err(e) => match self.stale(id) {
                Some(lookup) => Settled::Stale(lookup),
                None => Settled::Failed(e),
            },
        };
        for waiter in waiters {
            answer(&self.deps.metrics, waiter, &settled);
        }
    }

    fn shed(&self, reply: oneshot::Sender<Answer>, reason: ShedReason) {
        self.deps
            .metrics
            .shed_requests_total
            .with_label_values(&[reason.label()])
            .inc();
        let _ = reply.send(Answer {
            result: Err(FlightError::Shed(reason)),
            x_cache: XCache::Miss,
        });
    }

    /// `COALESCE=off`: this request's own cache read and, on a miss, its own load.
    fn run_alone(&mut self, id: i64, reply: oneshot::Sender<Answer>, ctx: &mut Context<Self>) {
        self.waiters_gauge().inc();
        self.inflight_keys().inc();
        let deps = self.deps.clone();
        let alone = async move {
            match read_cache(id, deps.clone()).await {
                // A soft-expired value is a miss here: this mode has no background refresh.
                Ok(Some(cached)) if !cached.stale => Ok((cached.lookup, Origin::Cache)),
                _ => load_and_store(id, deps)
                    .await
                    .map(|lookup| (lookup, Origin::Database)),
            }
        };
        self.spawn_stage(ctx, alone, move |owner, result, _| {
            owner.waiters_gauge().dec();
            owner.inflight_keys().dec();
            count_flight(&owner.deps.metrics, &result);
            let settled = match result {
                Ok((lookup, origin)) => Settled::Fresh(lookup, origin),
                Err(e) => Settled::Failed(e),
            };
            answer(
                &owner.deps.metrics,
                Waiter {
                    reply,
                    started_it: true,
                },
                &settled,
            );
        });
    }
}

/// What the waiters of a flight are told.
enum Settled {
    Fresh(Lookup, Origin),
    /// A soft-expired cached value, answered while a refresh runs.
    Revalidating(Lookup),
    /// A remembered value, answered because the load failed.
    Stale(Lookup),
    Failed(FlightError),
}

impl Actor for KeyOwner {
    type Context = Context<Self>;
}

impl Handler<GetTemplate> for KeyOwner {
    type Result = ();

    fn handle(&mut self, GetTemplate { id, reply }: GetTemplate, ctx: &mut Self::Context) {
        if !self.deps.settings.coalesce {
            return self.run_alone(id, reply, ctx);
        }
        if let Some(lookup) = self.fresh(id) {
            let metrics = &self.deps.metrics;
            metrics.cache_hits_total.inc();
            metrics.near_cache_hits_total.inc();
            let _ = reply.send(Answer {
                result: Ok(lookup),
                x_cache: XCache::Hit,
            });
            return;
        }
        let max_waiters = self.deps.settings.max_waiters_per_key;
        if let Some(flight) = self.pending_waiters.get_mut(&id) {
            if let Some(lookup) = flight.serving.clone() {
                let waiter = Waiter {
                    reply,
                    started_it: false,
                };
                return answer(&self.deps.metrics, waiter, &Settled::Revalidating(lookup));
            }
            if flight.waiters.len() >= max_waiters {
                return self.shed(reply, ShedReason::Waiters);
            }
            flight.waiters.push(Waiter {
                reply,
                started_it: false,
            });
            self.waiters_gauge().inc();
            return;
        }
        if self.pending_waiters.len() >= self.deps.settings.max_pending_keys {
            return self.shed(reply, ShedReason::PendingKeys);
        }
        self.start_flight(id, reply, ctx);
    }
}

impl Handler<Invalidate> for KeyOwner {
    type Result = ();

    fn handle(&mut self, Invalidate(id): Invalidate, _: &mut Self::Context) {
        self.deps.metrics.invalidations_total.inc();
        if let Some(cache) = self.near_cache.as_mut() {
            cache.pop(&id);
        }
        if let Some(flight) = self.pending_waiters.get_mut(&id) {
            flight.dirty = true;
            flight.serving = None;
        }
        self.deps.cache_del.do_send(CacheDel(id));
    }
}

impl Handler<ForgetAll> for KeyOwner {
    type Result = ();

    fn handle(&mut self, _: ForgetAll, _: &mut Self::Context) {
        if let Some(cache) = self.near_cache.as_mut() {
            cache.clear();
        }
        for flight in self.pending_waiters.values_mut() {
            flight.dirty = true;
            flight.serving = None;
        }
    }
}

/// Stage one of a flight: the cache read. A cache error is a miss.
async fn read_cache(id: i64, deps: KeyOwnerDeps) -> Result<Option<Cached>, FlightError> {
    Ok(deps
        .cache_get
        .send(CacheGet(id))
        .await
        .ok()
        .and_then(Result::ok)
        .flatten())
}

/// Stage two: the database load, then the cache write of what was loaded. A failed cache write
/// is counted (by the cache actor) and does not fail the flight, whose value is good.
async fn load_and_store(id: i64, deps: KeyOwnerDeps) -> Result<Lookup, FlightError> {
    let lookup = match deps.db.send(FetchTemplate(id)).await {
        Err(_mailbox) => return Err(FlightError::DatabaseActorGone),
        Ok(Err(e)) => return Err(FlightError::Database(e)),
        Ok(Ok(None)) => Lookup::NotFound,
        Ok(Ok(Some(template))) => Lookup::Found(template.to_body()),
    };
    let _ = deps
        .cache_set
        .send(CacheSet {
            id,
            lookup: lookup.clone(),
        })
        .await;
    Ok(lookup)
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
fn answer(metrics: &Metrics, waiter: Waiter, settled: &Settled) {
    let (result, x_cache) = match settled {
        Settled::Fresh(lookup, Origin::Cache) => {
            metrics.cache_hits_total.inc();
            if !waiter.started_it {
                metrics.cache_reads_coalesced_total.inc();
            }
            (Ok(lookup.clone()), XCache::Hit)
        }
        Settled::Fresh(lookup, Origin::Database) => {
            metrics.cache_misses_total.inc();
            if waiter.started_it {
                (Ok(lookup.clone()), XCache::Miss)
            } else {
                metrics.singleflight_shared_total.inc();
                (Ok(lookup.clone()), XCache::Shared)
            }
        }
        Settled::Revalidating(lookup) => {
            metrics.cache_hits_total.inc();
            metrics.stale_answers_total.inc();
            (Ok(lookup.clone()), XCache::Stale)
        }
        Settled::Stale(lookup) => {
            metrics.cache_misses_total.inc();
            metrics.stale_answers_total.inc();
            (Ok(lookup.clone()), XCache::Stale)
        }
        Settled::Failed(e) => {
            metrics.cache_misses_total.inc();
            let x_cache = if waiter.started_it {
                XCache::Miss
            } else {
                XCache::Shared
            };
            (Err(e.clone()), x_cache)
        }
    };
    let _ = waiter.reply.send(Answer { result, x_cache });
}

#[cfg(test)]
#[path = "owner_tests.rs"]
mod tests;
