//! Superseding: what the owner does when it learns of a change ([`Invalidate`] for one key,
//! [`ForgetAll`] for every key), so that no request after it is answered with data loaded
//! before it (the freshness invariant in the module docs of [`super`]).
//!
//! The key's generation is bumped first (HTTP workers stop answering their copies at that
//! instant), the near-cache entry goes, the Redis entry is deleted, and the key's current flight
//! is moved out of the way into [`KeyOwner::superseded`](super::KeyOwner): it answers only the
//! waiters that joined before the change, is never remembered nor written to Redis, and takes
//! no further part in the fleet lease. A request after the change starts a new flight, whose
//! load begins after the change.

use actix::prelude::*;

use super::answers::Settled;
use super::fleet::Role;
use super::flight::{Flight, Phase};
#[cfg(doc)]
use super::messages::{ForgetAll, Invalidate};
use super::KeyOwner;
use crate::actors::cache::CacheDel;
use crate::actors::contain;

impl KeyOwner {
    /// [`Invalidate`]: `id` changed.
    pub(super) fn invalidate(&mut self, id: i64, ctx: &mut Context<Self>) {
        self.deps.generations.bump(id);
        self.deps.metrics.invalidations_total.inc();
        self.near_cache.forget(id);
        // Deleted first: a read this owner starts from now on is queued behind the delete.
        self.deps.cache_del.do_send(CacheDel(id));
        if let Some(flight) = self.flights.remove(&id) {
            contain(self, ctx, "superseding a flight", |owner, ctx| {
                owner.supersede(id, flight, ctx)
            });
        }
    }

    /// [`ForgetAll`]: anything may have changed.
    pub(super) fn forget_all(&mut self, ctx: &mut Context<Self>) {
        self.deps.generations.bump_all();
        self.near_cache.clear();
        let flights: Vec<_> = self.flights.drain().collect();
        contain(self, ctx, "superseding flights", |owner, ctx| {
            for (id, flight) in flights {
                owner.supersede(id, flight, ctx);
            }
        });
    }

    /// A change overtook `flight`: it answers only its waiters, and takes no further part in
    /// the lease. A lease it holds is released; a flight that was waiting on another replica's
    /// lease loads for its waiters itself (that replica's fill may be old); a refresh that was
    /// waiting just ends.
    fn supersede(&mut self, id: i64, mut flight: Flight, ctx: &mut Context<Self>) {
        let role = std::mem::replace(&mut flight.role, Role::Local);
        match &role {
            Role::Awaiting { timer, .. } => {
                ctx.cancel_future(*timer);
            }
            Role::Holding { extending, .. } => extending.set(false),
            Role::Local | Role::Claiming { .. } => {}
        }
        let flight_id = flight.id;
        let refreshed = match &flight.phase {
            Phase::Refreshing(stale) => Some(stale.clone()),
            _ => None,
        };
        self.superseded.insert(flight_id, flight);
        match (role, refreshed) {
            (Role::Holding { token, .. }, _) => self.release(id, token),
            (Role::Awaiting { .. } | Role::Claiming { .. }, Some(stale)) => {
                self.finish(id, flight_id, Settled::Revalidating(stale))
            }
            (Role::Awaiting { .. } | Role::Claiming { .. }, None) => self.load(id, flight_id, ctx),
            (Role::Local, _) => {}
        }
    }
}
