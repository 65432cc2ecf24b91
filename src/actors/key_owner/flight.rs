//! Flights: one load of a key that its requests share, from the Redis read to the Redis fill,
//! through the phases of the table in the module docs of [`super`] (loading, refreshing,
//! filling). Each stage runs as a future on the owner's context ([`KeyOwner::spawn_stage`]),
//! bounded by `FLIGHT_TIMEOUT_MS`, with a panic turned into an error, and hands its result back
//! inside the actor. With the fleet lease on, the first stage is a claim instead of a read (see
//! [`super::fleet`]).

use std::panic::AssertUnwindSafe;
use std::time::{Duration, Instant};

use actix::prelude::*;
use futures_util::FutureExt;
use tokio::sync::oneshot;
use tracing::{info_span, Instrument, Span};

use super::answers::{answer, count_flight, Settled};
use super::deps::KeyOwnerDeps;
use super::fleet::{extending, Role};
use super::generations::CopyTerms;
use super::in_air::Air;
use super::messages::{Answer, FlightError, Origin};
use super::{KeyOwner, Unpark};
use crate::actors::cache::{CacheDel, CacheGet, CacheSet, Fence, LeaseFill, Read};
use crate::actors::contain;
use crate::actors::db::{DbError, FetchTemplate};
use crate::template::{unix_ms_now, Lookup};

/// A flight in progress for one key.
pub(super) struct Flight {
    /// Distinguishes this flight from any later one for the same key.
    pub(super) id: u64,
    pub(super) waiters: Vec<Waiter>,
    /// Workers' renewals of the key that joined the flight: not requests (not in `waiters`,
    /// the waiters gauge or its bound). They get the flight's `Fresh` answer if it comes with
    /// copy terms, nothing otherwise; a refresh's `STALE` answer does not end their wait.
    pub(super) renewals: Vec<oneshot::Sender<Answer>>,
    pub(super) phase: Phase,
    /// Its part in the fleet lease.
    pub(super) role: Role,
    /// Its `flight` span, under the request that started it; each stage has a span under it.
    pub(super) span: Span,
    /// While it waits on another replica's lease (one or more waits between claims): the
    /// `lease.wait` span; `Span::none()` otherwise.
    pub(super) lease_wait: Span,
    /// What its write must find unchanged in Redis (the generation and epoch its last read or
    /// claim saw, before the load); `None` until one answered, and then nothing is written.
    pub(super) fence: Option<Fence>,
    /// Where it stands in the owner's bytes in the air (see [`super::in_air`]).
    pub(super) air: Air,
}

/// Where a flight is; see the module docs of [`super`].
pub(super) enum Phase {
    Loading,
    /// Serving this soft-expired value while PostgreSQL reloads the key.
    Refreshing(Lookup),
    /// Loaded (and answered); the Redis fill is in the air.
    Filling(Lookup),
}

/// The spans of a flight's stage (see [`KeyOwner::spawn_stage`]).
pub(super) struct StageSpans {
    /// The stage's own, under the flight's: its future runs in it.
    pub(super) stage: Span,
    /// The flight's: what the owner does with the stage's result runs in it.
    pub(super) within: Span,
}

impl StageSpans {
    /// For work that is no request's (workers' renewals).
    pub(super) fn none() -> StageSpans {
        StageSpans {
            stage: Span::none(),
            within: Span::none(),
        }
    }
}

/// One request waiting for a flight.
pub(super) struct Waiter {
    pub(super) reply: oneshot::Sender<Answer>,
    /// The request that started the flight (its answer is `MISS`, the others' `SHARED`).
    pub(super) started_it: bool,
}

impl Waiter {
    pub(super) fn request(reply: oneshot::Sender<Answer>, started_it: bool) -> Waiter {
        Waiter { reply, started_it }
    }
}

impl KeyOwner {
    /// Flight `flight_id` for `id`, wherever it is, and whether it is still the current one.
    pub(super) fn flight_mut(&mut self, id: i64, flight_id: u64) -> Option<(&mut Flight, bool)> {
        match self.flights.get_mut(&id) {
            Some(flight) if flight.id == flight_id => Some((flight, true)),
            _ => self.superseded.get_mut(&flight_id).map(|f| (f, false)),
        }
    }

    /// Removes flight `flight_id` for `id`; `true` with it if it was the current one.
    fn remove_flight(&mut self, id: i64, flight_id: u64) -> Option<(Flight, bool)> {
        if self.flights.get(&id).is_some_and(|f| f.id == flight_id) {
            let flight = self.flights.remove(&id)?;
            self.in_air.end(flight.air);
            self.room_made();
            return Some((flight, true));
        }
        let flight = self.superseded.remove(&flight_id)?;
        self.in_air.end(flight.air);
        self.room_made();
        Some((flight, false))
    }

    /// Flight `flight_id` for `id` holds `lookup` now: it counts as its bytes in the air.
    pub(super) fn holds(&mut self, id: i64, flight_id: u64, lookup: &Lookup) {
        if let Some(flight) = match self.flights.get_mut(&id) {
            Some(flight) if flight.id == flight_id => Some(flight),
            _ => self.superseded.get_mut(&flight_id),
        } {
            self.in_air.holds(&mut flight.air, lookup);
        }
        self.room_made();
    }

    /// Takes the waiters of flight `flight_id`, leaving it pending without them.
    pub(super) fn take_waiters(&mut self, id: i64, flight_id: u64) -> Vec<Waiter> {
        let waiters = self
            .flight_mut(id, flight_id)
            .map(|(flight, _)| std::mem::take(&mut flight.waiters))
            .unwrap_or_default();
        self.waiters_gauge().sub(waiters.len() as i64);
        waiters
    }

    /// The copy terms of a flight's answer for `id`: only if the flight is the current one
    /// (`current`: not superseded), its answer is `Fresh`, and the owner holds that very value
    /// in its near cache as fresh now, so that a worker's copy is still a copy of an entry the
    /// owner itself answers as a `HIT`. `STALE` answers, errors, superseded flights and values
    /// that were not remembered (near cache off or full, a "not found" with
    /// `NEGATIVE_TTL_SECS=0`) give none.
    pub(super) fn flight_terms(
        &mut self,
        id: i64,
        current: bool,
        settled: &Settled,
    ) -> Option<CopyTerms> {
        let Settled::Fresh(lookup, _) = settled else {
            return None;
        };
        if !current || !self.deps.settings.coalesce {
            return None;
        }
        self.near_cache
            .terms_if_holds(id, lookup, &self.deps.generations)
    }

    /// The `flight` span of flight `flight_id` for `id` (none if it has ended): the parent of
    /// its stages' spans.
    pub(super) fn flight_span(&mut self, id: i64, flight_id: u64) -> Span {
        self.flight_mut(id, flight_id)
            .map_or_else(Span::none, |(flight, _)| flight.span.clone())
    }

    /// The spans of a stage of flight `flight_id` for `id`: the stage's, made by `stage` under
    /// the flight's, and the flight's.
    pub(super) fn stage_spans(
        &mut self,
        id: i64,
        flight_id: u64,
        stage: impl FnOnce(&Span) -> Span,
    ) -> StageSpans {
        let flight = self.flight_span(id, flight_id);
        StageSpans {
            stage: stage(&flight),
            within: flight,
        }
    }

    /// Runs one stage of a flight (`stage` is a future made from `deps`) as a future on the
    /// owner's context, bounded by the flight timeout, with a panic turned into an error, and
    /// hands its result to `on_done` inside the actor. The future runs in `spans.stage`, which
    /// ends with it; `on_done` in `spans.within` (log lines it writes name the flight's request).
    pub(super) fn spawn_stage<T, Fut, F>(
        &mut self,
        ctx: &mut Context<Self>,
        spans: StageSpans,
        stage: Fut,
        on_done: F,
    ) where
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
        let StageSpans { stage, within } = spans;
        let bounded = bounded.instrument(stage);
        ctx.spawn(bounded.into_actor(self).map(move |result, owner, ctx| {
            let _in_flight = within.enter();
            contain(owner, ctx, "a KeyOwner flight callback", |owner, ctx| {
                on_done(owner, result, ctx)
            });
        }));
    }

    /// Starts a coalesced flight for `id` with its first waiter, whose request's span is
    /// `request`: at once, or parked until its owner has room for its body (`air`, from
    /// [`super::in_air::InAir::admit`]).
    pub(super) fn start_flight(
        &mut self,
        id: i64,
        first: Waiter,
        air: Air,
        request: &Span,
        ctx: &mut Context<Self>,
    ) {
        self.next_flight_id += 1;
        let flight_id = self.next_flight_id;
        let span = info_span!(parent: request, "flight", template.id = id, flight.id = flight_id);
        self.flights.insert(
            id,
            Flight {
                id: flight_id,
                waiters: vec![first],
                renewals: Vec::new(),
                phase: Phase::Loading,
                role: Role::Local,
                span,
                lease_wait: Span::none(),
                fence: None,
                air,
            },
        );
        self.waiters_gauge().inc();
        self.inflight_keys().inc();
        if air == Air::Parked {
            return self.in_air.park(id, flight_id);
        }
        self.first_stage(id, flight_id, ctx);
    }

    /// A flight's first stage: the fleet lease's claim, or the Redis read.
    fn first_stage(&mut self, id: i64, flight_id: u64, ctx: &mut Context<Self>) {
        if self.deps.lease.is_some() {
            return self.claim(id, flight_id, None, ctx);
        }
        let read = read_cache(id, self.deps.clone());
        let spans = self.stage_spans(id, flight_id, |f| info_span!(parent: f, "redis.read"));
        self.spawn_stage(ctx, spans, read, move |owner, result, ctx| {
            owner.on_cache_read(id, flight_id, result, ctx)
        });
    }

    /// Starts the parked flights there is room for now, in the order they came. One that a
    /// change superseded while parked loads at once for its waiters (as a superseded flight
    /// that was waiting on another replica does).
    pub(super) fn unpark(&mut self, ctx: &mut Context<Self>) {
        self.unpark_asked = false;
        while let Some((id, flight_id)) = self.in_air.next_parked() {
            let current = match self.flight_mut(id, flight_id) {
                Some((flight, current)) if flight.air == Air::Parked => current,
                _ => continue,
            };
            let air = self.in_air.start();
            if let Some((flight, _)) = self.flight_mut(id, flight_id) {
                flight.air = air;
            }
            if current {
                self.first_stage(id, flight_id, ctx);
            } else {
                self.load(id, flight_id, ctx);
            }
        }
    }

    /// Room may have been made for parked flights: the owner looks once it is done with the
    /// message at hand.
    fn room_made(&mut self) {
        if self.in_air.has_parked() && !self.unpark_asked {
            if let Some(myself) = &self.myself {
                self.unpark_asked = true;
                myself.do_send(Unpark);
            }
        }
    }

    /// The Redis read is over: a fresh value ends the flight; a soft-expired one is answered at
    /// once and reloaded in the background (refresh-ahead); a miss goes on to the database.
    fn on_cache_read(
        &mut self,
        id: i64,
        flight_id: u64,
        result: Result<Option<Read>, FlightError>,
        ctx: &mut Context<Self>,
    ) {
        let Some((flight, current)) = self.flight_mut(id, flight_id) else {
            return;
        };
        let value = result.ok().flatten().and_then(|read| {
            flight.fence = Some(read.fence);
            read.value
        });
        if let Some(cached) = &value {
            self.holds(id, flight_id, &cached.lookup);
        }
        match value {
            Some(cached) if !cached.is_soft_expired() => {
                if current {
                    self.near_cache
                        .remember(id, &cached.lookup, Instant::now(), cached.fresh_for);
                }
                self.finish(id, flight_id, Settled::Fresh(cached.lookup, Origin::Cache));
            }
            Some(cached) => {
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
            None => self.load(id, flight_id, ctx),
        }
    }

    /// Loads `id` from PostgreSQL, within the flight timeout; a lease holder extends its lease
    /// meanwhile.
    pub(super) fn load(&mut self, id: i64, flight_id: u64, ctx: &mut Context<Self>) {
        let read_at = (Instant::now(), unix_ms_now());
        let deadline = read_at.0 + self.deps.settings.flight_timeout;
        let load = fetch(id, deadline, self.deps.clone());
        let (refreshing, holding) = match self.flight_mut(id, flight_id) {
            Some((flight, _)) => (
                matches!(flight.phase, Phase::Refreshing(_)),
                match &flight.role {
                    Role::Holding { token, extending } => Some((token.clone(), extending.clone())),
                    _ => None,
                },
            ),
            None => (false, None),
        };
        if refreshing {
            self.deps.metrics.refreshes_total.inc();
        }
        let load = match (holding, self.deps.lease.clone()) {
            (Some((token, keep)), Some(lease)) => {
                extending(id, token, lease, keep, load).boxed_local()
            }
            _ => load.boxed_local(),
        };
        let spans = self.stage_spans(id, flight_id, |f| info_span!(parent: f, "db.load"));
        self.spawn_stage(ctx, spans, load, move |owner, result, ctx| {
            owner.on_loaded(id, flight_id, result, read_at, ctx)
        });
    }

    /// PostgreSQL answered. A current flight answers its waiters at once, remembers the value
    /// and fills Redis with it; a superseded one only answers its waiters.
    fn on_loaded(
        &mut self,
        id: i64,
        flight_id: u64,
        result: Result<Fetched, FlightError>,
        read_at: (Instant, u64),
        ctx: &mut Context<Self>,
    ) {
        let Some((flight, current)) = self.flight_mut(id, flight_id) else {
            return;
        };
        let holding = match std::mem::replace(&mut flight.role, Role::Local) {
            Role::Holding { token, .. } => Some(token),
            _ => None,
        };
        let fence = flight.fence;
        let lookup = match result {
            Err(e) => {
                if let Some(token) = holding {
                    // Waiting replicas try for themselves at once rather than at expiry.
                    self.release(id, token);
                }
                let settled = match self.near_cache.stale(id) {
                    Some(lookup) => Settled::Stale(lookup),
                    None => Settled::Failed(e),
                };
                return self.finish(id, flight_id, settled);
            }
            Ok((lookup, _)) if !current => {
                return self.finish(id, flight_id, Settled::Fresh(lookup, Origin::Database));
            }
            Ok(fetched) => fetched,
        };
        let (lookup, as_of_ms) = lookup;
        self.holds(id, flight_id, &lookup);
        // The near cache counts from the read: the pins keep every change this service knows
        // of off a replica that has not replayed it. Redis, which other replicas read, gets the
        // age of what the replica had replayed.
        self.near_cache
            .remember(id, &lookup, read_at.0, Duration::MAX);
        let read_at_ms = data_from(read_at.1, as_of_ms);
        let from_replica = as_of_ms.is_some();
        let loaded = Settled::Fresh(lookup.clone(), Origin::Database);
        let terms = self.flight_terms(id, true, &loaded);
        for waiter in self.take_waiters(id, flight_id) {
            answer(&self.deps.metrics, waiter, &loaded, terms);
        }
        if let Some((flight, _)) = self.flight_mut(id, flight_id) {
            let renewals = std::mem::take(&mut flight.renewals);
            self.answer_renewals(renewals, &loaded, terms);
        }
        if let Some((flight, _)) = self.flight_mut(id, flight_id) {
            flight.phase = Phase::Filling(lookup.clone());
        }
        let fill = match (holding, &self.deps.lease, fence) {
            (Some(token), Some(lease), Some(fence)) => {
                let fill = lease.fill.send(LeaseFill {
                    id,
                    token,
                    lookup: lookup.clone(),
                    loaded_at_ms: read_at_ms,
                    from_replica,
                    epoch: fence.epoch,
                });
                async move { drop(fill.await) }.boxed_local()
            }
            _ => {
                let set = self.deps.cache_set.send(CacheSet {
                    id,
                    lookup: lookup.clone(),
                    loaded_at_ms: read_at_ms,
                    from_replica,
                    fence,
                });
                async move { drop(set.await) }.boxed_local()
            }
        };
        // A failed fill is counted by the cache actor; the value is good either way.
        let fill = async move {
            fill.await;
            Ok(())
        };
        let spans = self.stage_spans(id, flight_id, |f| info_span!(parent: f, "redis.write"));
        self.spawn_stage(ctx, spans, fill, move |owner, _: Result<(), _>, _| {
            owner.finish(id, flight_id, Settled::Fresh(lookup, Origin::Database))
        });
    }

    /// Ends a flight: answers the waiters it still has and forgets it. A flight superseded while
    /// its Redis fill was in the air deletes what it wrote.
    pub(super) fn finish(&mut self, id: i64, flight_id: u64, settled: Settled) {
        let waiters = self.take_waiters(id, flight_id);
        let Some((flight, current)) = self.remove_flight(id, flight_id) else {
            return;
        };
        if !current && matches!(flight.phase, Phase::Filling(_)) {
            self.deps.cache_del.do_send(CacheDel(id));
        }
        self.inflight_keys().dec();
        count_flight(&self.deps.metrics, &settled);
        let terms = self.flight_terms(id, current, &settled);
        for waiter in waiters {
            answer(&self.deps.metrics, waiter, &settled, terms);
        }
        self.answer_renewals(flight.renewals, &settled, terms);
    }

    /// `COALESCE=off`: this request's own cache read and, on a miss, its own load and write.
    pub(super) fn run_alone(
        &mut self,
        id: i64,
        reply: oneshot::Sender<Answer>,
        request: &Span,
        ctx: &mut Context<Self>,
    ) {
        self.waiters_gauge().inc();
        self.inflight_keys().inc();
        let deps = self.deps.clone();
        let timeout = deps.settings.flight_timeout;
        let span = info_span!(parent: request, "flight", template.id = id, coalesce = false);
        let alone = async move {
            let read = read_cache(id, deps.clone()).instrument(info_span!("redis.read"));
            let read = read.await.ok().flatten();
            let fence = read.as_ref().map(|read| read.fence);
            match read.and_then(|read| read.value) {
                // A soft-expired value is a miss here: this mode has no background refresh.
                Some(cached) if !cached.is_soft_expired() => Ok((cached.lookup, Origin::Cache)),
                _ => {
                    let read_at = (Instant::now(), unix_ms_now());
                    let load = fetch(id, read_at.0 + timeout, deps.clone());
                    let (lookup, as_of_ms) = load.instrument(info_span!("db.load")).await?;
                    let write = CacheSet {
                        id,
                        lookup: lookup.clone(),
                        loaded_at_ms: data_from(read_at.1, as_of_ms),
                        from_replica: as_of_ms.is_some(),
                        fence,
                    };
                    let fill = deps.cache_set.send(write);
                    let _ = fill.instrument(info_span!("redis.write")).await;
                    Ok((lookup, Origin::Database))
                }
            }
        };
        let spans = StageSpans {
            stage: span,
            within: request.clone(),
        };
        self.spawn_stage(ctx, spans, alone, move |owner, result, _| {
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
}

/// The Redis read: the value and the fence of a write after a load. A cache error is a miss
/// without a fence (`None`).
async fn read_cache(id: i64, deps: KeyOwnerDeps) -> Result<Option<Read>, FlightError> {
    Ok(deps
        .cache_get
        .send(CacheGet(id))
        .await
        .ok()
        .and_then(Result::ok))
}

/// What a load found, and, when a read replica answered, the moment (unix ms) before which that
/// replica held everything the primary had committed (see [`crate::actors::db::Loaded`]).
type Fetched = (Lookup, Option<u64>);

/// When a load's data is from (unix ms), as its Redis entry records it: when its read began
/// (`read_at_ms`), or, for a replica's row, as of `as_of_ms` if that is earlier.
fn data_from(read_at_ms: u64, as_of_ms: Option<u64>) -> u64 {
    as_of_ms.map_or(read_at_ms, |as_of_ms| as_of_ms.min(read_at_ms))
}

/// The database load, ending by `deadline`.
async fn fetch(id: i64, deadline: Instant, deps: KeyOwnerDeps) -> Result<Fetched, FlightError> {
    // The database actor's batch spans go under this load's (`db.load`).
    let span = Span::current();
    match deps.db.send(FetchTemplate { id, deadline, span }).await {
        Err(_mailbox) => Err(FlightError::DatabaseActorGone),
        Ok(Err(DbError::Panicked)) => Err(FlightError::Panicked("a database call")),
        Ok(Err(e)) => Err(FlightError::Database(e)),
        Ok(Ok(loaded)) => {
            let lookup = match loaded.row {
                None => Lookup::NotFound,
                Some(template) => Lookup::Found(template.to_body()),
            };
            Ok((lookup, loaded.replica_as_of_ms))
        }
    }
}
