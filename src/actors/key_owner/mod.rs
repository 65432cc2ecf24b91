//! `KeyOwner`: the actor that owns a shard of the key space and deduplicates its loads.
//!
//! # Ownership
//! Every template id belongs to exactly one owner, chosen by [`shard_for`]. All requests for an id
//! reach that owner's mailbox, and an actor handles one message at a time, so the owner's plain
//! maps need no lock: mailbox serialization *is* the deduplication.
//!
//! # Flights
//! A request that finds no fresh value and no flight for its id starts one: a Redis read; on a
//! miss a PostgreSQL load; then a Redis write of what was loaded. Each stage runs as a future on
//! the owner's context (`ctx.spawn`), so the owner keeps handling messages — for other keys and
//! for this one — while it is in the air; keys never wait on each other. Requests for the id that
//! arrive meanwhile join the flight. A flight moves through phases:
//!
//! | phase | entered when | a request arriving now |
//! |---|---|---|
//! | loading | the flight starts | waits for the flight (`SHARED`, or `HIT` from Redis) |
//! | loading, awaiting a peer | another replica holds the key's fleet lease (see "Fleet") | waits for the flight (`SHARED` once the peer's fill is read) |
//! | refreshing | Redis had a soft-expired value: it was answered, PostgreSQL reloads the key | gets that value at once (`STALE`) |
//! | storing | PostgreSQL answered: the waiters were answered, the value is being written to Redis | gets the loaded value at once (`SHARED`) |
//!
//! The flight ends when its Redis write was attempted, so a request after it finds Redis filled.
//!
//! # Fleet
//! Each replica's owners coalesce its own requests; with the fleet lease on (`LEASE_TTL_MS`,
//! see [`crate::actors::cache::ClaimLoad`] for the Redis side) the replicas coalesce too. A
//! flight's first step is then one script in Redis that returns the value or, when there is none
//! (or it is soft-expired, or suspect), claims the key's lease:
//!
//! - **claimed**: this flight loads from PostgreSQL, renewing the lease every third of its
//!   period, and fills Redis only if it still holds the lease (the fill deletes the lease and
//!   publishes a notice). A failed load releases the lease at once.
//! - **held by another replica**: the flight waits (its waiters with it, new arrivals joining)
//!   for that replica's notice, relayed by the replica's one subscription
//!   ([`crate::actors::fills`]) as [`PeerFilled`]; it looks again by the time the lease would run
//!   out, and at least every quarter period in case a notice is lost. It then reads the value
//!   (`SHARED`) — or, if the lease ran out unfilled (the holder died), claims it: a take-over.
//! - **Redis failed** (timeout, breaker open): the flight loads on its own, as without the lease.
//!
//! A soft-expired value is answered at once as ever; only the lease holder refreshes it, so a
//! soft expiry costs one load for the fleet. A change supersedes a flight whatever its role: a
//! lease it holds is released, and a flight that was waiting on another replica loads for its
//! own (earlier) waiters, since that replica may fill what it loaded before the change. Every
//! replica that learns of a change bumps the key's generation in Redis with its delete, and a
//! fill claimed under an older generation writes nothing (decided in Redis, so no clock is
//! compared); for writes outside the lease, the cache actor also remembers when each key last
//! changed, and a value loaded before that is a miss here.
//!
//! A wait on another replica lasts at most `FLIGHT_TIMEOUT_MS`; then the flight loads on its
//! own. A fill that wrote nothing (a "not found" with `NEGATIVE_TTL_SECS=0`) wakes waiters to
//! load on their own at once rather than claim one after another.
//!
//! # Freshness
//! **Invariant: a request that arrives after the owner learned of a change ([`Invalidate`] for its
//! key, [`ForgetAll`] for every key) is never answered with data loaded before it, and no such
//! data is written to Redis.** The states a key can be in, and what moves it between them:
//!
//! | state | answered as | leaves it by |
//! |---|---|---|
//! | fresh in the near cache (the owner's LRU) | `HIT`, no I/O | its `fresh_until` passing: `NEAR_CACHE_TTL_MS` from the database read (`NEGATIVE_TTL_SECS` if shorter, for "not found"), never past the Redis entry's soft expiry; a change drops it |
//! | remembered, no longer fresh | only when a load fails: `STALE`, up to `MAX_STALE_SECS` after it was seen | a change drops it; LRU eviction |
//! | fresh in Redis | `HIT` | its soft expiry: `CACHE_TTL_SECS` (jittered) after the database read; a change deletes it |
//! | soft-expired in Redis | `STALE` at once, while one refresh reloads it | the refresh's write; `CACHE_GRACE_SECS` later Redis drops it |
//! | suspect in Redis (loaded before the last [`ForgetAll`] or a failed delete) | a miss: reloaded | the reload's write |
//! | in a flight | `MISS` / `SHARED` / `STALE`, by phase | the flight ending; a change *supersedes* it |
//! | in a superseded flight | only to the waiters that joined before the change; never remembered, never written to Redis (if its write was already in the air, the entry is deleted again) | the flight ending |
//!
//! A superseded flight is moved out of the way ([`KeyOwner::superseded`]): a request after the
//! change starts a new flight, whose load begins after the change. Ages are counted from the
//! database read's start, not from the Redis write, so an entry written late is never younger
//! than its data.
//!
//! # What every waiter is guaranteed
//! - exactly one answer: the flight's result; or, if the flight failed, timed out (each stage —
//!   cache read, load, write — within `FLIGHT_TIMEOUT_MS`) or panicked, the value remembered
//!   within the last `MAX_STALE_SECS` (`X-Cache: STALE`), else an error — never silence;
//! - a waiter that goes away (its HTTP request was cancelled or hit its deadline) just drops its
//!   receiver: the flight goes on and still fills the caches for everyone after it; a request
//!   whose client is already gone when the owner gets to it starts nothing;
//! - errors are never cached: a failed flight leaves no entry, and the next request starts anew;
//! - bounded memory: at most `MAX_PENDING_KEYS` flights (superseded ones included) and
//!   `MAX_WAITERS_PER_KEY` waiters each; a request beyond either bound is shed at once;
//! - if the owner itself panics, every waiter is answered with an error and the owner restarts
//!   with empty state (see [`crate::actors::contain`]).
//!
//! # HTTP workers' caches
//! Every near-cache `HIT` an owner answers carries a [`Fill`]: the entry's `fresh_until` and the
//! id's [`Generations`] counter as it was then. The HTTP worker that asked keeps the answer and
//! serves it again without a message while it is fresh and the counter unchanged; handling
//! [`Invalidate`] bumps the id's counter, [`ForgetAll`] and a restart bump every counter, so a
//! worker stops answering a value at the moment its owner learns it is old (see
//! [`generations`]). The `Fresh` answers of a current flight (from Redis, PostgreSQL or a peer's
//! fill) carry a fill too, when the owner remembered that value in its near cache: the fill is
//! then the one a near-cache `HIT` would carry at that moment. Never `STALE`, superseded
//! flights, errors, values not remembered or `COALESCE=off` answers — so a worker's entry is
//! always a copy of the owner's own fresh entry.
//!
//! A fill also says when the copy is due for renewal ([`Fill::renew_at`]: the last quarter of
//! the owner's entry's freshness). The first request a worker answers from a due copy puts the
//! id in a [`Renew`] that the worker sends in the background with the other ids due within a few
//! milliseconds. The owner answers each from its entry if another worker's renewal already
//! renewed it, joins the key's flight if it has one, and reads the rest again from Redis in one
//! round trip; a fresh value is remembered and answered with its fill. So a key in steady use is
//! read from Redis about once per `NEAR_CACHE_TTL_MS` as before, no request for it waits on the
//! owner's thread, and a thousand keys cost a few dozen round trips a second rather than a
//! thousand flights. A renewal is not a request: it counts in no request metric, starts no
//! flight (so never loads from PostgreSQL), and never gets `STALE` or an error. Its read is
//! voided by a change the owner learns of before the answer comes back (the id's generation
//! moved), like a superseded flight's.
//!
//! With `COALESCE=off` every request runs a flight of its own: nothing is shared, and the near
//! cache, refresh-ahead, shedding and superseding are all off. It is a measurement baseline that
//! shows what they save, not a mode to run in production.
//!
//! The owner talks to Redis and PostgreSQL only through [`Recipient`]s, so tests put fakes there.

use std::cell::Cell;
use std::collections::HashMap;
use std::hash::BuildHasher;
use std::num::NonZeroUsize;
use std::panic::AssertUnwindSafe;
use std::rc::Rc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use futures_util::FutureExt;
use lru::LruCache;
use tokio::sync::oneshot;

use crate::actors::cache::{
    CacheDel, CacheGet, CacheGetMany, CacheSet, Cached, Claim, ClaimLoad, LeaseFill, LeaseRelease,
    LeaseRenew, LeaseState, LeaseToken,
};
use crate::actors::contain;
use crate::actors::db::{DbError, FetchTemplate};
use crate::config::Settings;
use crate::metrics::Metrics;
use crate::template::{unix_ms_now, Lookup};

pub mod generations;
pub use generations::{Fill, Generations};

/// Picks the owner of `id` among `shards` owners. A multiplicative hash spreads consecutive ids
/// (the common case: BIGSERIAL keys) and strided ids alike.
pub fn shard_for(id: i64, shards: usize) -> usize {
    let mixed = (id as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    ((mixed >> 32) % shards.max(1) as u64) as usize
}

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
    /// remembered: how long the asking HTTP worker may keep the answer.
    pub fill: Option<Fill>,
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
    /// Workers' renewals, read in batches.
    pub cache_get_many: Recipient<CacheGetMany>,
    pub cache_set: Recipient<CacheSet>,
    pub cache_del: Recipient<CacheDel>,
    pub db: Recipient<FetchTemplate>,
    /// The fleet lease; `None` when it is off (`LEASE_TTL_MS=0`, `COALESCE=off`).
    pub lease: Option<LeaseDeps>,
    pub settings: OwnerSettings,
    pub metrics: Metrics,
    /// Bumped on every change the owner learns of; shared with the HTTP workers' caches.
    pub generations: Generations,
}

/// Where the owner claims, renews, fills and releases fleet leases (the cache actor).
#[derive(Clone)]
pub struct LeaseDeps {
    pub claim: Recipient<ClaimLoad>,
    pub renew: Recipient<LeaseRenew>,
    pub fill: Recipient<LeaseFill>,
    pub release: Recipient<LeaseRelease>,
    /// `LEASE_TTL_MS`: a holder renews every third of it; a waiter looks again at the latest
    /// every quarter of it.
    pub ttl: Duration,
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
/// entry, and the pending flight (superseded: requests from now on start a new one).
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct Invalidate(pub i64);

/// Notifications may have been missed (the listening connection was (re)established): forget
/// every remembered value, and supersede every pending flight.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct ForgetAll;

/// An HTTP worker, still answering its kept copies of these ids, asks for renewed ones (see
/// [`Fill::renew_at`]), in the background: no request waits on the answers. The worker sends the
/// ids that came due within a few milliseconds together. For each id the owner answers from its
/// near-cache entry if another worker's renewal already renewed it, joins a flight the key has
/// (its `Fresh` answer carries the new fill), waits on a Redis read of the id already in the
/// air (another worker's renewal), or else reads it again from Redis: the ids left are read in
/// one round trip ([`CacheGetMany`]), and a fresh value is remembered and answered with its
/// fill. A renewal is not a request: it counts in no request metric, starts no flight
/// and so never loads from PostgreSQL, and is never answered `STALE` or with an error — its
/// reply is dropped instead, and the worker's copy runs out as it would have.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct Renew {
    pub renewals: Vec<(i64, oneshot::Sender<Answer>)>,
}

/// Readiness: answered at once by a running owner.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct Alive;

/// One request waiting for a flight.
struct Waiter {
    reply: oneshot::Sender<Answer>,
    /// The request that started the flight (its answer is `MISS`, the others' `SHARED`).
    started_it: bool,
}

impl Waiter {
    fn request(reply: oneshot::Sender<Answer>, started_it: bool) -> Waiter {
        Waiter { reply, started_it }
    }
}

/// Where a flight is; see the module docs.
enum Phase {
    Loading,
    /// Serving this soft-expired value while PostgreSQL reloads the key.
    Refreshing(Lookup),
    /// Loaded (and answered); the Redis write is in the air.
    Storing(Lookup),
}

/// A flight's part in the fleet lease (see "Fleet" in the module docs).
enum Role {
    /// On its own: the lease is off, Redis failed, or the flight was superseded.
    Local,
    /// A [`ClaimLoad`] is in the air.
    Claiming,
    /// This flight holds the lease: it loads the key and fills it for the fleet.
    Holding(LeaseToken),
    /// Another replica holds the lease: waiting for its fill notice, or for its lease to run out.
    Awaiting,
}

/// A flight in progress for one key.
struct Flight {
    /// Distinguishes this flight from any later one for the same key.
    id: u64,
    waiters: Vec<Waiter>,
    phase: Phase,
    role: Role,
    /// Since when the flight has waited on another replica's lease, if it has.
    waited_since: Option<Instant>,
    /// The timer that looks at the lease again while [`Role::Awaiting`].
    wake: Option<SpawnHandle>,
    /// The current wait was ended by a notice (a fill or a release), not by the lease running
    /// out: a claim after it is not a take-over.
    noticed: bool,
    /// A notice arrived while a claim was in the air: the claim may have seen the lease just
    /// before the fill, so a wait it starts looks again at once.
    notice_missed: bool,
    /// While this flight loads under the lease: set to `false` to stop renewing it (the flight
    /// was superseded and gave the lease up).
    renewing: Option<Rc<Cell<bool>>>,
    /// Workers' renewals of the key that joined the flight: not requests (not in `waiters`,
    /// the waiters gauge or its bound). They get the flight's `Fresh` answer if it comes with
    /// a fill, nothing otherwise; a refresh's `STALE` answer does not end their wait.
    renewals: Vec<oneshot::Sender<Answer>>,
}

/// The latest answer the owner saw for a key.
struct Remembered {
    lookup: Lookup,
    /// Answered as `HIT` until then.
    fresh_until: Instant,
    /// The start of the last quarter of its freshness: workers' copies are renewed from then on.
    renew_at: Instant,
    /// When the value was read (from PostgreSQL: when the read began); `MAX_STALE_SECS` counts
    /// from here.
    seen_at: Instant,
}

pub struct KeyOwner {
    /// This owner's shard number, as the `shard` label of its metrics.
    shard: String,
    deps: KeyOwnerDeps,
    /// The flight that requests for a key join, by template id.
    pending_waiters: HashMap<i64, Flight>,
    /// Flights superseded by a change while in the air, by flight id: they answer the waiters
    /// that joined before the change, and nothing else (see the module docs).
    superseded: HashMap<u64, Flight>,
    /// Latest answers of recent keys, fresh until their `fresh_until`, usable when a load fails
    /// up to `max_stale`. `None` when neither use is enabled.
    near_cache: Option<LruCache<i64, Remembered>>,
    next_flight_id: u64,
    /// Workers' renewals waiting on a Redis read of their id (see [`Renew`]), by id: a renewal
    /// of an id already being read waits on that read.
    renewal_reads: HashMap<i64, Vec<oneshot::Sender<Answer>>>,
    /// Drawn at random when the owner starts: with the shard and the flight id, it makes lease
    /// tokens unique across the fleet.
    replica: u64,
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
            superseded: HashMap::new(),
            near_cache,
            next_flight_id: 0,
            renewal_reads: HashMap::new(),
            replica: std::collections::hash_map::RandomState::new().hash_one((
                std::process::id(),
                shard,
                unix_ms_now(),
            )),
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
        let entry = self.near_cache.as_mut()?.get(&id)?;
        (Instant::now() < entry.fresh_until).then(|| entry.lookup.clone())
    }

    /// What an HTTP worker may keep of the near-cache hit just answered for `id`.
    fn worker_fill(&mut self, id: i64) -> Option<Fill> {
        let entry = self.near_cache.as_mut()?.peek(&id)?;
        let fill = self.deps.generations.fill(id, entry.fresh_until);
        Some(fill.renew_from(entry.renew_at))
    }

    /// What an HTTP worker may keep of a flight's answer for `id`: a fill only if the flight is
    /// the current one (`current`: not superseded), its answer is `Fresh`, and the owner holds
    /// that very value in its near cache as fresh now, so that a worker's entry is still a copy
    /// of an entry the owner itself answers as a `HIT`. `STALE` answers, errors, superseded
    /// flights and values that were not remembered (near cache off or full, a "not found" with
    /// `NEGATIVE_TTL_SECS=0`) give none.
    fn flight_fill(&mut self, id: i64, current: bool, settled: &Settled) -> Option<Fill> {
        let Settled::Fresh(lookup, _) = settled else {
            return None;
        };
        if !current || !self.deps.settings.coalesce {
            return None;
        }
        let entry = self.near_cache.as_mut()?.peek(&id)?;
        let remembered = Instant::now() < entry.fresh_until && entry.lookup == *lookup;
        let fill = self.deps.generations.fill(id, entry.fresh_until);
        remembered.then(|| fill.renew_from(entry.renew_at))
    }

    /// A remembered answer for `id` young enough to stand in for a failed load.
    fn stale(&mut self, id: i64) -> Option<Lookup> {
        let max_stale = self.deps.settings.max_stale;
        let entry = self.near_cache.as_mut()?.peek(&id)?;
        (entry.seen_at.elapsed() < max_stale).then(|| entry.lookup.clone())
    }

    /// Remembers `lookup`, read at `seen_at`, fresh for the near-cache TTL but never longer than
    /// `fresh_for` (what is left of its soft TTL in Redis).
    fn remember(&mut self, id: i64, lookup: &Lookup, seen_at: Instant, fresh_for: Duration) {
        let s = &self.deps.settings;
        let ttl = match lookup {
            Lookup::Found(_) => s.near_cache_ttl,
            Lookup::NotFound => s.negative_ttl.min(s.near_cache_ttl),
        };
        let fresh_for = ttl.min(fresh_for);
        if let Some(cache) = self.near_cache.as_mut() {
            cache.put(
                id,
                Remembered {
                    lookup: lookup.clone(),
                    fresh_until: seen_at + fresh_for,
                    renew_at: seen_at + (fresh_for - fresh_for / 4),
                    seen_at,
                },
            );
        }
    }

    /// Flight `flight_id` for `id`, wherever it is, and whether it is still the current one.
    fn flight_mut(&mut self, id: i64, flight_id: u64) -> Option<(&mut Flight, bool)> {
        match self.pending_waiters.get_mut(&id) {
            Some(flight) if flight.id == flight_id => Some((flight, true)),
            _ => self.superseded.get_mut(&flight_id).map(|f| (f, false)),
        }
    }

    /// Removes flight `flight_id` for `id`; `true` with it if it was the current one.
    fn remove_flight(&mut self, id: i64, flight_id: u64) -> Option<(Flight, bool)> {
        if self
            .pending_waiters
            .get(&id)
            .is_some_and(|f| f.id == flight_id)
        {
            let flight = self.pending_waiters.remove(&id)?;
            return Some((flight, true));
        }
        self.superseded.remove(&flight_id).map(|f| (f, false))
    }

    /// Answers the renewals that joined a flight with what it settled: a `Fresh` answer with a
    /// fill renews them, anything else gives them nothing.
    fn answer_renewals(
        &self,
        renewals: Vec<oneshot::Sender<Answer>>,
        settled: &Settled,
        fill: Option<Fill>,
    ) {
        let renewed = match (settled, fill) {
            (Settled::Fresh(lookup, _), Some(fill)) => Some((lookup, fill)),
            _ => None,
        };
        for reply in renewals {
            self.renewed(
                reply,
                renewed.map(|(lookup, fill)| (lookup.clone(), fill)),
                "joined",
            );
        }
    }

    /// Ends one renewal: with a renewed copy (counted as `outcome`), or with none (`missed`).
    fn renewed(
        &self,
        reply: oneshot::Sender<Answer>,
        renewed: Option<(Lookup, Fill)>,
        outcome: &str,
    ) {
        let Some((lookup, fill)) = renewed else {
            return self.count_renewal("missed");
        };
        self.count_renewal(outcome);
        let _ = reply.send(Answer {
            result: Ok(lookup),
            x_cache: XCache::Hit,
            fill: Some(fill),
        });
    }

    /// Takes the waiters of flight `flight_id`, leaving it pending without them.
    fn take_waiters(&mut self, id: i64, flight_id: u64) -> Vec<Waiter> {
        let waiters = self
            .flight_mut(id, flight_id)
            .map(|(flight, _)| std::mem::take(&mut flight.waiters))
            .unwrap_or_default();
        self.waiters_gauge().sub(waiters.len() as i64);
        waiters
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
        // A panic inside the flight (a bug in a collaborator's client code) must not take the
        // owner down with every other key's waiters: it becomes an error like any other.
        let guarded = AssertUnwindSafe(stage).catch_unwind();
        let bounded = tokio::time::timeout(timeout, guarded).map(move |outcome| match outcome {
            Err(_elapsed) => Err(FlightError::Timeout(timeout)),
            Ok(Err(_panic)) => Err(FlightError::Panicked("the flight")),
            Ok(Ok(result)) => result,
        });
        ctx.spawn(bounded.into_actor(self).map(move |result, owner, ctx| {
            contain(owner, ctx, "a KeyOwner flight callback", |owner, ctx| {
                on_done(owner, result, ctx)
            });
        }));
    }

    /// Starts a coalesced flight for `id` with its first waiter.
    fn start_flight(&mut self, id: i64, first: Waiter, ctx: &mut Context<Self>) {
        self.next_flight_id += 1;
        let flight_id = self.next_flight_id;
        self.pending_waiters.insert(
            id,
            Flight {
                id: flight_id,
                waiters: vec![first],
                phase: Phase::Loading,
                role: Role::Local,
                waited_since: None,
                wake: None,
                noticed: false,
                notice_missed: false,
                renewing: None,
                renewals: Vec::new(),
            },
        );
        self.waiters_gauge().inc();
        self.inflight_keys().inc();
        if self.deps.lease.is_some() {
            return self.claim(id, flight_id, ctx);
        }
        let read = read_cache(id, self.deps.clone());
        self.spawn_stage(ctx, read, move |owner, result, ctx| {
            owner.on_cache_read(id, flight_id, result, ctx)
        });
    }

    /// The Redis read is over: a fresh value ends the flight; a soft-expired one is answered at
    /// once and reloaded in the background (refresh-ahead); a miss goes on to the database.
    fn on_cache_read(
        &mut self,
        id: i64,
        flight_id: u64,
        result: Result<Option<Cached>, FlightError>,
        ctx: &mut Context<Self>,
    ) {
        let Some((_, current)) = self.flight_mut(id, flight_id) else {
            return;
        };
        match result {
            Ok(Some(cached)) if !cached.is_soft_expired() => {
                if current {
                    self.remember(id, &cached.lookup, Instant::now(), cached.fresh_for);
                }
                self.finish(id, flight_id, Settled::Fresh(cached.lookup, Origin::Cache));
            }
            Ok(Some(cached)) => {
                // Nobody waits on PostgreSQL for a key that has a value: the waiters get it now,
                // arrivals get it while the refresh runs, and the refresh replaces it. Not put in
                // the near cache: a soft-expired value is `STALE`, never a near-cache `HIT`.
                let stale = Settled::Revalidating(cached.lookup.clone());
                for waiter in self.take_waiters(id, flight_id) {
                    answer(&self.deps.metrics, waiter, &stale, None);
                }
                if !current {
                    // Superseded: its waiters are answered, and a refresh would be old news.
                    return self.finish(id, flight_id, stale);
                }
                if let Some((flight, _)) = self.flight_mut(id, flight_id) {
                    flight.phase = Phase::Refreshing(cached.lookup);
                }
                self.load(id, flight_id, ctx);
            }
            Ok(None) | Err(_) => self.load(id, flight_id, ctx),
        }
    }

    /// Loads `id` from PostgreSQL, within the flight timeout; a lease holder renews its lease
    /// meanwhile.
    fn load(&mut self, id: i64, flight_id: u64, ctx: &mut Context<Self>) {
        let read_at = (Instant::now(), unix_ms_now());
        let deadline = read_at.0 + self.deps.settings.flight_timeout;
        let load = fetch(id, deadline, self.deps.clone());
        let (refreshing, holding) = match self.flight_mut(id, flight_id) {
            Some((flight, _)) => (
                matches!(flight.phase, Phase::Refreshing(_)),
                match &flight.role {
                    Role::Holding(token) => Some(token.clone()),
                    _ => None,
                },
            ),
            None => (false, None),
        };
        if refreshing {
            self.deps.metrics.refreshes_total.inc();
        }
        let load = match (holding, self.deps.lease.clone()) {
            (Some(token), Some(lease)) => {
                let keep = Rc::new(Cell::new(true));
                if let Some((flight, _)) = self.flight_mut(id, flight_id) {
                    flight.renewing = Some(keep.clone());
                }
                renewing(id, token, lease, keep, load).boxed_local()
            }
            _ => load.boxed_local(),
        };
        self.spawn_stage(ctx, load, move |owner, result, ctx| {
            owner.on_loaded(id, flight_id, result, read_at, ctx)
        });
    }

    /// PostgreSQL answered. A current flight answers its waiters at once, remembers the value
    /// and writes it to Redis; a superseded one only answers its waiters.
    fn on_loaded(
        &mut self,
        id: i64,
        flight_id: u64,
        result: Result<Lookup, FlightError>,
        (read_at, read_at_ms): (Instant, u64),
        ctx: &mut Context<Self>,
    ) {
        let Some((_, current)) = self.flight_mut(id, flight_id) else {
            return;
        };
        let holding = match self.flight_mut(id, flight_id) {
            Some((flight, _)) => match std::mem::replace(&mut flight.role, Role::Local) {
                Role::Holding(token) => Some(token),
                _ => None,
            },
            None => None,
        };
        let lookup = match result {
            Err(e) => {
                if let Some(token) = holding {
                    // Waiting replicas try for themselves at once rather than at expiry.
                    self.release(id, token);
                }
                let settled = match self.stale(id) {
                    Some(lookup) => Settled::Stale(lookup),
                    None => Settled::Failed(e),
                };
                return self.finish(id, flight_id, settled);
            }
            Ok(lookup) if !current => {
                return self.finish(id, flight_id, Settled::Fresh(lookup, Origin::Database));
            }
            Ok(lookup) => lookup,
        };
        self.remember(id, &lookup, read_at, Duration::MAX);
        let loaded = Settled::Fresh(lookup.clone(), Origin::Database);
        let fill = self.flight_fill(id, true, &loaded);
        for waiter in self.take_waiters(id, flight_id) {
            answer(&self.deps.metrics, waiter, &loaded, fill);
        }
        if let Some((flight, _)) = self.flight_mut(id, flight_id) {
            let renewals = std::mem::take(&mut flight.renewals);
            self.answer_renewals(renewals, &loaded, fill);
        }
        if let Some((flight, _)) = self.flight_mut(id, flight_id) {
            flight.phase = Phase::Storing(lookup.clone());
        }
        let write = match (holding, &self.deps.lease) {
            (Some(token), Some(lease)) => {
                let fill = lease.fill.send(LeaseFill {
                    id,
                    token,
                    lookup: lookup.clone(),
                    loaded_at_ms: read_at_ms,
                });
                async move { drop(fill.await) }.boxed_local()
            }
            _ => {
                let set = self.deps.cache_set.send(CacheSet {
                    id,
                    lookup: lookup.clone(),
                    loaded_at_ms: read_at_ms,
                });
                async move { drop(set.await) }.boxed_local()
            }
        };
        // A failed write is counted by the cache actor; the value is good either way.
        let write = async move {
            write.await;
            Ok(())
        };
        self.spawn_stage(ctx, write, move |owner, _: Result<(), _>, _| {
            owner.finish(id, flight_id, Settled::Fresh(lookup, Origin::Database))
        });
    }

    /// Ends a flight: answers the waiters it still has and forgets it. A flight superseded while
    /// its Redis write was in the air deletes what it wrote.
    fn finish(&mut self, id: i64, flight_id: u64, settled: Settled) {
        let waiters = self.take_waiters(id, flight_id);
        let Some((flight, current)) = self.remove_flight(id, flight_id) else {
            return;
        };
        if !current && matches!(flight.phase, Phase::Storing(_)) {
            self.deps.cache_del.do_send(CacheDel(id));
        }
        self.inflight_keys().dec();
        count_flight(&self.deps.metrics, &settled);
        let fill = self.flight_fill(id, current, &settled);
        for waiter in waiters {
            answer(&self.deps.metrics, waiter, &settled, fill);
        }
        self.answer_renewals(flight.renewals, &settled, fill);
    }

    /// The lease token of flight `flight_id`: unique across the fleet.
    fn token(&self, flight_id: u64) -> LeaseToken {
        LeaseToken(format!("{:016x}-{}-{flight_id}", self.replica, self.shard))
    }

    /// Asks Redis for `id`'s value or, when it needs loading, for its lease.
    fn claim(&mut self, id: i64, flight_id: u64, ctx: &mut Context<Self>) {
        let Some(lease) = &self.deps.lease else {
            return self.load(id, flight_id, ctx);
        };
        let token = self.token(flight_id);
        let ask = lease.claim.send(ClaimLoad {
            id,
            token: token.clone(),
        });
        let Some((flight, _)) = self.flight_mut(id, flight_id) else {
            return;
        };
        flight.role = Role::Claiming;
        if let Some(timer) = flight.wake.take() {
            ctx.cancel_future(timer);
        }
        // A failed call (Redis down, breaker open, the cache actor gone) is `None`.
        let ask = async move { Ok(ask.await.ok().and_then(Result::ok)) };
        self.spawn_stage(ctx, ask, move |owner, result, ctx| {
            owner.on_claim(id, flight_id, token, result.ok().flatten(), ctx)
        });
    }

    /// What Redis said about `id`: a fresh value ends the flight; otherwise this flight loads
    /// under the lease, waits for the replica that holds it, or — Redis failing — loads on its
    /// own. A soft-expired value is answered at once, as without the lease.
    fn on_claim(
        &mut self,
        id: i64,
        flight_id: u64,
        token: LeaseToken,
        claim: Option<Claim>,
        ctx: &mut Context<Self>,
    ) {
        let ours = matches!(
            &claim,
            Some(Claim {
                lease: Some(LeaseState::Ours),
                ..
            })
        );
        let still_claiming = self
            .flight_mut(id, flight_id)
            .is_some_and(|(flight, current)| current && matches!(flight.role, Role::Claiming));
        if !still_claiming {
            // Superseded (it loads on its own now) or ended: a lease it got goes back at once.
            if ours {
                self.release(id, token);
            }
            return;
        }
        let (waited_since, noticed) = match self.flight_mut(id, flight_id) {
            Some((flight, _)) => (flight.waited_since, flight.noticed),
            None => return,
        };
        match claim {
            Some(Claim {
                value: Some(cached),
                lease: None,
            }) => {
                self.end_wait(waited_since);
                self.remember(id, &cached.lookup, Instant::now(), cached.fresh_for);
                let origin = match waited_since {
                    Some(_) => Origin::Peer,
                    None => Origin::Cache,
                };
                self.finish(id, flight_id, Settled::Fresh(cached.lookup, origin));
            }
            Some(Claim {
                value,
                lease: Some(state),
            }) => {
                if let Some(cached) = value {
                    self.revalidate(id, flight_id, cached.lookup);
                }
                match state {
                    LeaseState::Ours => {
                        if waited_since.is_some() && !noticed {
                            self.deps.metrics.lease_takeovers_total.inc();
                        }
                        self.end_wait(waited_since);
                        self.deps.metrics.lease_claims_total.inc();
                        if let Some((flight, _)) = self.flight_mut(id, flight_id) {
                            flight.role = Role::Holding(token);
                        }
                        self.load(id, flight_id, ctx);
                    }
                    LeaseState::Theirs { expires_in } => {
                        self.await_peer(id, flight_id, expires_in, ctx)
                    }
                }
            }
            _ => {
                // Redis failed: coalesce locally, as without the lease.
                self.end_wait(waited_since);
                if let Some((flight, _)) = self.flight_mut(id, flight_id) {
                    flight.role = Role::Local;
                }
                self.load(id, flight_id, ctx);
            }
        }
    }

    /// A soft-expired value for `id`: its waiters get it now (`STALE`), and so do arrivals while
    /// it is reloaded; renewals wait for the reload. A flight already refreshing keeps the value
    /// it serves.
    fn revalidate(&mut self, id: i64, flight_id: u64, stale: Lookup) {
        let Some((flight, _)) = self.flight_mut(id, flight_id) else {
            return;
        };
        if matches!(flight.phase, Phase::Refreshing(_)) {
            return;
        }
        flight.phase = Phase::Refreshing(stale.clone());
        let settled = Settled::Revalidating(stale);
        for waiter in self.take_waiters(id, flight_id) {
            answer(&self.deps.metrics, waiter, &settled, None);
        }
    }

    /// Another replica holds `id`'s lease for `expires_in`: wait for its notice, and look again
    /// by the time the lease would run out (sooner, in case a notice is lost).
    fn await_peer(
        &mut self,
        id: i64,
        flight_id: u64,
        expires_in: Duration,
        ctx: &mut Context<Self>,
    ) {
        let Some(lease_ttl) = self.deps.lease.as_ref().map(|l| l.ttl) else {
            return;
        };
        let metrics = self.deps.metrics.clone();
        let Some((flight, _)) = self.flight_mut(id, flight_id) else {
            return;
        };
        let since = *flight.waited_since.get_or_insert_with(|| {
            metrics.lease_waits_total.inc();
            Instant::now()
        });
        flight.role = Role::Awaiting;
        if since.elapsed() >= self.deps.settings.flight_timeout {
            // The holder keeps renewing but never fills: as long as a flight may take, and no
            // longer, this flight's waiters depend on another replica.
            return self.load_alone(id, flight_id, ctx);
        }
        let Some((flight, _)) = self.flight_mut(id, flight_id) else {
            return;
        };
        if std::mem::take(&mut flight.notice_missed) {
            return self.wake(id, flight_id, true, ctx);
        }
        flight.noticed = false;
        let delay = (expires_in + Duration::from_millis(2)).min(lease_ttl / 4);
        let timer = ctx.run_later(delay, move |owner, ctx| {
            contain(owner, ctx, "a lease timer", |owner, ctx| {
                owner.wake(id, flight_id, false, ctx)
            });
        });
        flight.wake = Some(timer);
    }

    /// Looks at the lease again for a flight waiting on it: after a notice (`noticed`), or
    /// when its timer fires.
    fn wake(&mut self, id: i64, flight_id: u64, noticed: bool, ctx: &mut Context<Self>) {
        let Some((flight, true)) = self.flight_mut(id, flight_id) else {
            return;
        };
        if noticed && matches!(flight.role, Role::Claiming) {
            flight.notice_missed = true;
        }
        if !matches!(flight.role, Role::Awaiting) {
            return;
        }
        flight.noticed = noticed;
        self.claim(id, flight_id, ctx);
    }

    /// Stops waiting on another replica's lease for `id` and loads it here, as without the
    /// lease (a fill that wrote nothing, or a wait as long as a flight).
    fn load_alone(&mut self, id: i64, flight_id: u64, ctx: &mut Context<Self>) {
        let Some((flight, true)) = self.flight_mut(id, flight_id) else {
            return;
        };
        if !matches!(flight.role, Role::Awaiting) {
            return;
        }
        if let Some(timer) = flight.wake.take() {
            ctx.cancel_future(timer);
        }
        flight.role = Role::Local;
        let waited_since = flight.waited_since;
        self.end_wait(waited_since);
        self.load(id, flight_id, ctx);
    }

    fn end_wait(&self, waited_since: Option<Instant>) {
        if let Some(since) = waited_since {
            let waited = since.elapsed().as_secs_f64();
            self.deps.metrics.lease_wait_seconds.observe(waited);
        }
    }

    /// Gives `id`'s lease up: the waiting replicas look again at once.
    fn release(&self, id: i64, token: LeaseToken) {
        if let Some(lease) = &self.deps.lease {
            lease.release.do_send(LeaseRelease { id, token });
        }
    }

    /// A change overtook `flight` (see "Freshness"): it answers only its waiters, and takes no
    /// further part in the lease. A lease it holds is released; a flight that was waiting on
    /// another replica's lease loads for its waiters itself (that replica's fill may be old);
    /// a refresh that was waiting just ends.
    fn supersede(&mut self, id: i64, mut flight: Flight, ctx: &mut Context<Self>) {
        if let Some(timer) = flight.wake.take() {
            ctx.cancel_future(timer);
        }
        if let Some(keep) = flight.renewing.take() {
            keep.set(false);
        }
        let role = std::mem::replace(&mut flight.role, Role::Local);
        let flight_id = flight.id;
        let refreshed = match &flight.phase {
            Phase::Refreshing(stale) => Some(stale.clone()),
            _ => None,
        };
        self.superseded.insert(flight_id, flight);
        match (role, refreshed) {
            (Role::Holding(token), _) => self.release(id, token),
            (Role::Awaiting | Role::Claiming, Some(stale)) => {
                self.finish(id, flight_id, Settled::Revalidating(stale))
            }
            (Role::Awaiting | Role::Claiming, None) => self.load(id, flight_id, ctx),
            (Role::Local, _) => {}
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
            fill: None,
        });
    }

    /// `COALESCE=off`: this request's own cache read and, on a miss, its own load and write.
    fn run_alone(&mut self, id: i64, reply: oneshot::Sender<Answer>, ctx: &mut Context<Self>) {
        self.waiters_gauge().inc();
        self.inflight_keys().inc();
        let deps = self.deps.clone();
        let timeout = deps.settings.flight_timeout;
        let alone = async move {
            match read_cache(id, deps.clone()).await {
                // A soft-expired value is a miss here: this mode has no background refresh.
                Ok(Some(cached)) if !cached.is_soft_expired() => Ok((cached.lookup, Origin::Cache)),
                _ => {
                    let read_at_ms = unix_ms_now();
                    let lookup = fetch(id, Instant::now() + timeout, deps.clone()).await?;
                    let write = CacheSet {
                        id,
                        lookup: lookup.clone(),
                        loaded_at_ms: read_at_ms,
                    };
                    let _ = deps.cache_set.send(write).await;
                    Ok((lookup, Origin::Database))
                }
            }
        };
        self.spawn_stage(ctx, alone, move |owner, result, _| {
            owner.waiters_gauge().dec();
            owner.inflight_keys().dec();
            let settled = match result {
                Ok((lookup, origin)) => Settled::Fresh(lookup, origin),
                Err(e) => Settled::Failed(e),
            };
            count_flight(&owner.deps.metrics, &settled);
            answer(
                &owner.deps.metrics,
                Waiter::request(reply, true),
                &settled,
                None,
            );
        });
    }

    fn get_template(&mut self, id: i64, reply: oneshot::Sender<Answer>, ctx: &mut Context<Self>) {
        if reply.is_closed() {
            // The client left while the request sat in the mailbox: nobody would read the answer.
            self.deps.metrics.requests_abandoned_total.inc();
            return;
        }
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
                fill: self.worker_fill(id),
            });
            return;
        }
        let max_waiters = self.deps.settings.max_waiters_per_key;
        if let Some(flight) = self.pending_waiters.get_mut(&id) {
            let waiter = Waiter::request(reply, false);
            match &flight.phase {
                Phase::Refreshing(lookup) => {
                    let settled = Settled::Revalidating(lookup.clone());
                    return answer(&self.deps.metrics, waiter, &settled, None);
                }
                Phase::Storing(lookup) => {
                    let settled = Settled::Fresh(lookup.clone(), Origin::Database);
                    let fill = self.flight_fill(id, true, &settled);
                    return answer(&self.deps.metrics, waiter, &settled, fill);
                }
                Phase::Loading if flight.waiters.len() >= max_waiters => {
                    return self.shed(waiter.reply, ShedReason::Waiters);
                }
                Phase::Loading => {
                    flight.waiters.push(waiter);
                    self.waiters_gauge().inc();
                    return;
                }
            }
        }
        let flights = self.pending_waiters.len() + self.superseded.len();
        if flights >= self.deps.settings.max_pending_keys {
            return self.shed(reply, ShedReason::PendingKeys);
        }
        self.start_flight(id, Waiter::request(reply, true), ctx);
    }

    /// A worker's [`Renew`] (see its docs for what it is and is not).
    fn renew(&mut self, renewals: Vec<(i64, oneshot::Sender<Answer>)>, ctx: &mut Context<Self>) {
        let mut reads = Vec::new();
        for (id, reply) in renewals {
            let Some(reply) = self.renew_from_memory(id, reply) else {
                continue;
            };
            if let Some(waiting) = self.renewal_reads.get_mut(&id) {
                // Another worker's renewal of the id is being read: this one shares the read.
                waiting.push(reply);
                continue;
            }
            self.renewal_reads.insert(id, vec![reply]);
            // Read under the generation of now: a change learned before the read's answer comes
            // back voids it.
            reads.push((id, self.deps.generations.current(id)));
        }
        if reads.is_empty() {
            return;
        }
        let ids = reads.iter().map(|(id, _)| *id).collect();
        let read = self.deps.cache_get_many.send(CacheGetMany(ids));
        // A failed read (Redis down, breaker open, the cache actor gone) renews nothing.
        let read = async move { Ok(read.await.ok().and_then(Result::ok)) };
        self.spawn_stage(ctx, read, move |owner, values, _| {
            owner.on_renewal_read(reads, values.ok().flatten().unwrap_or_default())
        });
    }

    /// A renewal of `id` that needs no Redis read of its own: answered from an entry already
    /// renewed, joined to the key's flight, or skipped. Otherwise its reply comes back.
    fn renew_from_memory(
        &mut self,
        id: i64,
        reply: oneshot::Sender<Answer>,
    ) -> Option<oneshot::Sender<Answer>> {
        if reply.is_closed() || !self.deps.settings.coalesce {
            self.count_renewal("skipped");
            return None;
        }
        let now = Instant::now();
        let renewed = self
            .near_cache
            .as_mut()
            .and_then(|cache| cache.get(&id))
            .filter(|entry| now < entry.renew_at && now < entry.fresh_until)
            .map(|entry| entry.lookup.clone());
        if let Some(lookup) = renewed {
            // Another worker's renewal (or a request's flight) already renewed the entry.
            let fill = self.worker_fill(id);
            self.renewed(reply, fill.map(|fill| (lookup, fill)), "near_cache");
            return None;
        }
        let Some(flight) = self.pending_waiters.get_mut(&id) else {
            return Some(reply);
        };
        match &flight.phase {
            Phase::Storing(lookup) => {
                let settled = Settled::Fresh(lookup.clone(), Origin::Database);
                let fill = self.flight_fill(id, true, &settled);
                self.answer_renewals(vec![reply], &settled, fill);
            }
            Phase::Loading | Phase::Refreshing(_)
                if flight.renewals.len() < self.deps.settings.max_waiters_per_key =>
            {
                flight.renewals.push(reply);
            }
            _ => self.count_renewal("skipped"),
        }
        None
    }

    /// Redis answered a batch of renewals (`values` in the order of `reads`; empty if the read
    /// failed). A fresh value of an id whose generation has not moved since the read was sent is
    /// remembered, as a flight's Redis read would be, and renews every renewal that waited on
    /// the read; the others get nothing (a miss, a soft-expired or suspect value, a change in
    /// between).
    fn on_renewal_read(&mut self, reads: Vec<(i64, u64)>, values: Vec<Option<Cached>>) {
        let mut values = values.into_iter();
        for (id, generation) in reads {
            let value = values.next().flatten();
            // Gone only if the owner restarted meanwhile (and answered them then).
            let Some(replies) = self.renewal_reads.remove(&id) else {
                continue;
            };
            let unchanged = self.deps.generations.current(id) == generation;
            let renewed = match value {
                Some(cached) if unchanged && !cached.is_soft_expired() => {
                    self.remember(id, &cached.lookup, Instant::now(), cached.fresh_for);
                    self.worker_fill(id).map(|fill| (cached.lookup, fill))
                }
                _ => None,
            };
            for reply in replies {
                self.renewed(reply, renewed.clone(), "read");
            }
        }
    }

    /// Counts a renewal by its `outcome` (counted before any answer, so that a worker that has
    /// its answer finds it counted).
    fn count_renewal(&self, outcome: &str) {
        self.deps
            .metrics
            .worker_cache_renewals_total
            .with_label_values(&[outcome])
            .inc();
    }
}

impl Actor for KeyOwner {
    type Context = Context<Self>;
}

/// After a panic (see [`contain`]) the owner's state may be half-updated: every waiter is
/// answered with an error, and the owner starts again with nothing pending or remembered. Its
/// address, and so its mailbox, stay the same.
impl Supervised for KeyOwner {
    fn restarting(&mut self, _: &mut Self::Context) {
        // First: from now on no worker answers what this owner is about to forget.
        self.deps.generations.bump_all();
        self.deps
            .metrics
            .actor_restarts_total
            .with_label_values(&["key_owner"])
            .inc();
        let current = std::mem::take(&mut self.pending_waiters).into_values();
        let superseded = std::mem::take(&mut self.superseded).into_values();
        if let Some(cache) = self.near_cache.as_mut() {
            cache.clear();
        }
        self.inflight_keys().set(0);
        self.waiters_gauge().set(0);
        let failed = Settled::Failed(FlightError::Panicked("the key owner"));
        for flight in current.chain(superseded) {
            for waiter in flight.waiters {
                answer(&self.deps.metrics, waiter, &failed, None);
            }
            self.answer_renewals(flight.renewals, &failed, None);
        }
        for replies in std::mem::take(&mut self.renewal_reads).into_values() {
            self.answer_renewals(replies, &failed, None);
        }
    }
}

impl Handler<GetTemplate> for KeyOwner {
    type Result = ();

    fn handle(&mut self, GetTemplate { id, reply }: GetTemplate, ctx: &mut Self::Context) {
        contain(self, ctx, "a KeyOwner request", |owner, ctx| {
            owner.get_template(id, reply, ctx)
        });
    }
}

impl Handler<Renew> for KeyOwner {
    type Result = ();

    fn handle(&mut self, Renew { renewals }: Renew, ctx: &mut Self::Context) {
        contain(self, ctx, "workers' renewals", |owner, ctx| {
            owner.renew(renewals, ctx)
        });
    }
}

impl Handler<Invalidate> for KeyOwner {
    type Result = ();

    fn handle(&mut self, Invalidate(id): Invalidate, ctx: &mut Self::Context) {
        self.deps.generations.bump(id);
        self.deps.metrics.invalidations_total.inc();
        if let Some(cache) = self.near_cache.as_mut() {
            cache.pop(&id);
        }
        // Deleted first: a read this owner starts from now on is queued behind the delete.
        self.deps.cache_del.do_send(CacheDel(id));
        if let Some(flight) = self.pending_waiters.remove(&id) {
            contain(self, ctx, "superseding a flight", |owner, ctx| {
                owner.supersede(id, flight, ctx)
            });
        }
    }
}

impl Handler<ForgetAll> for KeyOwner {
    type Result = ();

    fn handle(&mut self, _: ForgetAll, ctx: &mut Self::Context) {
        self.deps.generations.bump_all();
        if let Some(cache) = self.near_cache.as_mut() {
            cache.clear();
        }
        let flights: Vec<_> = self.pending_waiters.drain().collect();
        contain(self, ctx, "superseding flights", |owner, ctx| {
            for (id, flight) in flights {
                owner.supersede(id, flight, ctx);
            }
        });
    }
}

impl Handler<PeerFilled> for KeyOwner {
    type Result = ();

    fn handle(&mut self, notice: PeerFilled, ctx: &mut Self::Context) {
        let id = notice.id;
        if let Some(flight_id) = self.pending_waiters.get(&id).map(|f| f.id) {
            contain(self, ctx, "a lease notice", |owner, ctx| {
                if notice.wrote_nothing {
                    owner.load_alone(id, flight_id, ctx)
                } else {
                    owner.wake(id, flight_id, true, ctx)
                }
            });
        }
    }
}

impl Handler<Alive> for KeyOwner {
    type Result = ();

    fn handle(&mut self, _: Alive, _: &mut Self::Context) {}
}

/// `load`, with the lease renewed every third of its TTL until the load ends or `keep` is
/// cleared.
async fn renewing(
    id: i64,
    token: LeaseToken,
    lease: LeaseDeps,
    keep: Rc<Cell<bool>>,
    load: impl std::future::Future<Output = Result<Lookup, FlightError>>,
) -> Result<Lookup, FlightError> {
    let every = lease.ttl / 3;
    let renew = async move {
        loop {
            tokio::time::sleep(every).await;
            if !keep.get() {
                return;
            }
            let renewal = LeaseRenew {
                id,
                token: token.clone(),
            };
            // A renewal that fails leaves the lease to run out: then another replica may take
            // over, and this holder's fill writes nothing.
            let _ = lease.renew.send(renewal).await;
        }
    };
    let (load, renew) = (std::pin::pin!(load), std::pin::pin!(renew));
    match futures_util::future::select(load, renew).await {
        futures_util::future::Either::Left((loaded, _)) => loaded,
        futures_util::future::Either::Right((_, load)) => load.await,
    }
}

/// The Redis read. A cache error is a miss.
async fn read_cache(id: i64, deps: KeyOwnerDeps) -> Result<Option<Cached>, FlightError> {
    Ok(deps
        .cache_get
        .send(CacheGet(id))
        .await
        .ok()
        .and_then(Result::ok)
        .flatten())
}

/// The database load, ending by `deadline`.
async fn fetch(id: i64, deadline: Instant, deps: KeyOwnerDeps) -> Result<Lookup, FlightError> {
    match deps.db.send(FetchTemplate { id, deadline }).await {
        Err(_mailbox) => Err(FlightError::DatabaseActorGone),
        Ok(Err(DbError::Panicked)) => Err(FlightError::Panicked("a database call")),
        Ok(Err(e)) => Err(FlightError::Database(e)),
        Ok(Ok(None)) => Ok(Lookup::NotFound),
        Ok(Ok(Some(template))) => Ok(Lookup::Found(template.to_body())),
    }
}

fn count_flight(metrics: &Metrics, settled: &Settled) {
    let label = match settled {
        Settled::Fresh(_, Origin::Cache) | Settled::Revalidating(_) => "cache",
        Settled::Fresh(_, Origin::Peer) => "peer",
        Settled::Fresh(Lookup::Found(_), Origin::Database) => "database",
        Settled::Fresh(Lookup::NotFound, Origin::Database) => "not_found",
        Settled::Stale(_) | Settled::Failed(_) => "error",
    };
    metrics.flights_total.with_label_values(&[label]).inc();
}

/// Sends one waiter its answer and counts it. A waiter that left is still counted: its request
/// was served as far as the owner is concerned, and the counts must add up to the flights' work.
fn answer(metrics: &Metrics, waiter: Waiter, settled: &Settled, fill: Option<Fill>) {
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
        Settled::Fresh(lookup, Origin::Peer) => {
            // A miss here, shared with the replica that loaded it.
            metrics.cache_misses_total.inc();
            metrics.singleflight_shared_total.inc();
            (Ok(lookup.clone()), XCache::Shared)
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
    let _ = waiter.reply.send(Answer {
        result,
        x_cache,
        fill,
    });
}

#[cfg(test)]
mod tests;
