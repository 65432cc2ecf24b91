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
//! | filling | PostgreSQL answered: the waiters were answered, the value is being written to Redis | gets the loaded value at once (`SHARED`) |
//!
//! The flight ends when its Redis fill was attempted, so a request after it finds Redis filled.
//! A *fill* is always that: the Redis write of what a flight loaded (under the lease, a
//! [`LeaseFill`](crate::actors::cache::LeaseFill), which other replicas hear of as [`PeerFilled`]).
//!
//! # Fleet
//! Each replica's owners coalesce its own requests; with the fleet lease on (`LEASE_TTL_MS`,
//! see [`crate::actors::cache::ClaimLoad`] for the Redis side) the replicas coalesce too. A
//! flight's first step is then one script in Redis that returns the value or, when there is none
//! (or it is soft-expired, or suspect), claims the key's lease:
//!
//! - **claimed**: this flight loads from PostgreSQL, extending the lease every third of its
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
//!   `MAX_WAITERS_PER_KEY` waiters each, and flights start only while their bodies fit the
//!   owner's share of `INFLIGHT_MEMORY_MB`, waiting parked until then (see [`in_air`]); a
//!   request beyond a bound is shed at once;
//! - if the owner itself panics, every waiter is answered with an error and the owner restarts
//!   with empty state (see [`crate::actors::contain`]).
//!
//! # HTTP workers' caches
//! Every near-cache `HIT` an owner answers carries [`CopyTerms`]: the entry's `fresh_until` and the
//! id's [`Generations`] counter as it was then. The HTTP worker that asked keeps the answer and
//! serves it again without a message while it is fresh and the counter unchanged; handling
//! [`Invalidate`] bumps the id's counter, [`ForgetAll`] and a restart bump every counter, so a
//! worker stops answering a value at the moment its owner learns it is old (see
//! [`generations`]). The `Fresh` answers of a current flight (from Redis, PostgreSQL or a peer's
//! fill) carry terms too, when the owner remembered that value in its near cache: they are then
//! the terms a near-cache `HIT` would carry at that moment. Never `STALE`, superseded
//! flights, errors, values not remembered or `COALESCE=off` answers — so a worker's entry is
//! always a copy of the owner's own fresh entry.
//!
//! The terms also say when the copy is due for renewal ([`CopyTerms::renew_at`]: the last quarter of
//! the owner's entry's freshness). Once a copy is due, its worker puts the id in a [`Renew`]: at
//! the first request the worker handles from then on if it answered the copy since keeping it,
//! else at the copy's next hit. It sends the renewal in the background with the other ids due
//! within a few milliseconds. The owner answers each from its entry if another worker's renewal
//! already renewed it, joins the key's flight if it has one, and reads the rest again from Redis in one
//! round trip; a fresh value is remembered and answered with its terms. So a key in steady use is
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
//!
//! # What is where
//! This file holds the actor: its state, the request's path ([`GetTemplate`]: near cache, join a
//! flight, or start one) and the handlers, which hand each message to the file of its idea:
//!
//! | file | holds |
//! |---|---|
//! | [`messages`] | what the owner is asked and what it answers ([`Answer`], [`XCache`], [`FlightError`]) |
//! | [`deps`] | its collaborators (the cache and database actors' [`Recipient`]s) and settings |
//! | [`flight`] | a flight's stages and phases: Redis read, load, fill, and `COALESCE=off`'s flights |
//! | [`in_air`] | the bytes the flights hold: when a flight starts, waits parked, or is shed |
//! | [`answers`] | what a flight's waiters are told, and how each answer is counted |
//! | [`near_cache`] | the owner's LRU of recent answers: fresh `HIT`s, stale stand-ins, copy terms |
//! | [`generations`] | the counters through which HTTP workers' copies learn of a change |
//! | [`fleet`] | the fleet lease: claiming, loading under it, waiting on another replica |
//! | [`renewal`] | workers' background renewals of the copies they keep |
//! | [`supersede`] | what a change does to the key's flight and entries |

use std::collections::HashMap;

use actix::prelude::*;
use tokio::sync::oneshot;
use tracing::field::Empty;
use tracing::{info_span, Span};

use crate::actors::{contain, Alive, Deafness};

mod answers;
mod deps;
mod fleet;
mod flight;
pub mod generations;
mod in_air;
mod messages;
mod near_cache;
mod renewal;
mod supersede;
#[cfg(test)]
mod tests;

pub use deps::{KeyOwnerDeps, LeaseDeps, OwnerSettings};
pub use generations::{CopyTerms, Generations};
pub use messages::{
    Answer, FlightError, ForgetAll, GetTemplate, HandBack, Invalidate, Origin, PeerFilled, Renew,
    ShedReason, XCache,
};

use answers::{answer, Settled};
use fleet::Wake;
use flight::{Flight, Phase, Waiter};
use in_air::InAir;
use near_cache::NearCache;

/// Picks the owner of `id` among `shards` owners. A multiplicative hash spreads consecutive ids
/// (the common case: BIGSERIAL keys) and strided ids alike.
pub fn shard_for(id: i64, shards: usize) -> usize {
    let mixed = (id as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    ((mixed >> 32) % shards.max(1) as u64) as usize
}

pub struct KeyOwner {
    /// This owner's shard number, as the `shard` label of its metrics.
    shard: String,
    deps: KeyOwnerDeps,
    /// The current flight of each key that has one, by template id: the one its requests join.
    flights: HashMap<i64, Flight>,
    /// Flights superseded by a change while in the air, by flight id: they answer the waiters
    /// that joined before the change, and nothing else (see the module docs).
    superseded: HashMap<u64, Flight>,
    /// Latest answers of recent keys (see [`near_cache`]).
    near_cache: NearCache,
    /// What the flights hold, in bytes, and the flights parked until there is room (see
    /// [`in_air`]).
    in_air: InAir,
    /// Whether an [`Unpark`] is in its own mailbox already.
    unpark_asked: bool,
    /// Its own address, to send itself [`Unpark`]; set when it starts.
    myself: Option<Addr<KeyOwner>>,
    next_flight_id: u64,
    /// Workers' renewals waiting on a Redis read of their id (see [`Renew`]), by id: a renewal
    /// of an id already being read waits on that read.
    renewal_reads: HashMap<i64, Vec<oneshot::Sender<Answer>>>,
    /// Drawn at random when the owner starts: with the shard and the flight id, it makes lease
    /// tokens unique across the fleet.
    replica: u64,
}

impl KeyOwner {
    pub fn new(shard: usize, deps: KeyOwnerDeps) -> Self {
        // Every reason shows from the first scrape: dashboards and rate() see 0, not "no data".
        for reason in ShedReason::ALL {
            let shed = &deps.metrics.shed_requests_total;
            shed.with_label_values(&[reason.label()]);
        }
        KeyOwner {
            shard: shard.to_string(),
            near_cache: NearCache::new(
                &deps.settings,
                crate::memory::Meter::new(&deps.metrics, crate::memory::CacheKind::Near),
            ),
            in_air: InAir::new(
                deps.settings.in_air_bytes,
                deps.metrics.inflight_memory_bytes.clone(),
            ),
            unpark_asked: false,
            myself: None,
            deps,
            flights: HashMap::new(),
            superseded: HashMap::new(),
            next_flight_id: 0,
            renewal_reads: HashMap::new(),
            replica: fleet::replica_token_seed(shard),
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

    /// A request (its span: `request`): answered from the near cache, joined to the key's
    /// flight, or the start of a new flight — or shed at a bound.
    fn get_template(
        &mut self,
        id: i64,
        reply: oneshot::Sender<Answer>,
        request: &Span,
        ctx: &mut Context<Self>,
    ) {
        if reply.is_closed() {
            // The client left while the request sat in the mailbox: nobody would read the answer.
            self.deps.metrics.requests_abandoned_total.inc();
            return;
        }
        if !self.deps.settings.coalesce {
            return self.run_alone(id, reply, request, ctx);
        }
        let fresh = {
            let stage = info_span!(parent: request, "near_cache", hit = Empty).entered();
            let fresh = self.near_cache.fresh(id);
            stage.record("hit", fresh.is_some());
            fresh
        };
        if let Some(lookup) = fresh {
            let metrics = &self.deps.metrics;
            metrics.cache_hits_total.inc();
            metrics.near_cache_hits_total.inc();
            let _ = reply.send(Answer {
                result: Ok(lookup),
                x_cache: XCache::Hit,
                terms: self.near_cache.terms(id, &self.deps.generations),
            });
            return;
        }
        let max_waiters = self.deps.settings.max_waiters_per_key;
        if let Some(flight) = self.flights.get_mut(&id) {
            // The request's trace links to the flight that answers it (in another's trace).
            request.follows_from(&flight.span);
            let waiter = Waiter::request(reply, false);
            match &flight.phase {
                Phase::Refreshing(lookup) => {
                    let settled = Settled::Revalidating(lookup.clone());
                    return answer(&self.deps.metrics, waiter, &settled, None);
                }
                Phase::Filling(lookup) => {
                    let settled = Settled::Fresh(lookup.clone(), Origin::Database);
                    let terms = self.flight_terms(id, true, &settled);
                    return answer(&self.deps.metrics, waiter, &settled, terms);
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
        let flights = self.flights.len() + self.superseded.len();
        if flights >= self.deps.settings.max_pending_keys {
            return self.shed(reply, ShedReason::PendingKeys);
        }
        let Some(air) = self.in_air.admit() else {
            return self.shed(reply, ShedReason::Memory);
        };
        self.start_flight(id, Waiter::request(reply, true), air, request, ctx);
    }
}

/// Requests an owner holds in its mailbox at the most: beyond it, HTTP workers shed requests
/// for its keys at once (`try_send`) rather than queue them without bound. A few milliseconds
/// of its work: an owner handles a request in microseconds.
const MAILBOX_CAPACITY: usize = 4096;

impl Actor for KeyOwner {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.set_mailbox_capacity(MAILBOX_CAPACITY);
        self.myself = Some(ctx.address());
    }
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
        let current = std::mem::take(&mut self.flights).into_values();
        let superseded = std::mem::take(&mut self.superseded).into_values();
        self.near_cache.clear();
        self.in_air.clear();
        self.unpark_asked = false;
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

    fn handle(&mut self, msg: GetTemplate, ctx: &mut Self::Context) {
        let GetTemplate { id, reply, span } = msg;
        let _in_request = span.enter();
        contain(self, ctx, "a KeyOwner request", |owner, ctx| {
            owner.get_template(id, reply, &span, ctx)
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
        self.invalidate(id, ctx);
    }
}

impl Handler<ForgetAll> for KeyOwner {
    type Result = ();

    fn handle(&mut self, _: ForgetAll, ctx: &mut Self::Context) {
        self.forget_all(ctx);
    }
}

impl Handler<HandBack> for KeyOwner {
    type Result = ResponseFuture<usize>;

    fn handle(&mut self, _: HandBack, _: &mut Self::Context) -> Self::Result {
        Box::pin(self.hand_back())
    }
}

impl Handler<PeerFilled> for KeyOwner {
    type Result = ();

    fn handle(&mut self, notice: PeerFilled, ctx: &mut Self::Context) {
        let id = notice.id;
        if let Some(flight_id) = self.flights.get(&id).map(|f| f.id) {
            contain(self, ctx, "a lease notice", |owner, ctx| {
                if notice.wrote_nothing {
                    owner.load_alone(id, flight_id, ctx)
                } else {
                    owner.wake(id, flight_id, Wake::Notice, ctx)
                }
            });
        }
    }
}

/// While the listener is deaf nothing stays fresh longer than it allows: what the near cache
/// and the workers' copies hold goes now (the generations move), and new entries are capped.
impl Handler<Deafness> for KeyOwner {
    type Result = ();

    fn handle(&mut self, Deafness(max_age): Deafness, _: &mut Self::Context) {
        self.near_cache.deafness(max_age);
        if max_age.is_some() {
            self.deps.generations.bump_all();
        }
    }
}

/// Room was made in the owner's bytes in the air: its parked flights start (see [`in_air`]).
#[derive(Message)]
#[rtype(result = "()")]
struct Unpark;

impl Handler<Unpark> for KeyOwner {
    type Result = ();

    fn handle(&mut self, _: Unpark, ctx: &mut Self::Context) {
        contain(self, ctx, "starting parked flights", |owner, ctx| {
            owner.unpark(ctx)
        });
    }
}

impl Handler<Alive> for KeyOwner {
    type Result = ();

    fn handle(&mut self, _: Alive, _: &mut Self::Context) {}
}
