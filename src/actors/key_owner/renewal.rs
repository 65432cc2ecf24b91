//! Workers' renewals ([`Renew`]): an HTTP worker still answering its copy of a key asks, in the
//! background, for a renewed one before the copy runs out (see "HTTP workers' caches" in the
//! module docs of [`super`]).
//!
//! Each renewal is answered from the cheapest place that can: the near-cache entry if another
//! worker's renewal already renewed it, the key's flight if it has one, a Redis read of the id
//! already in the air, or else one Redis read for every id left in the batch. A renewal never
//! starts a flight, never loads from PostgreSQL, and gets either a fresh copy with its terms or
//! nothing (its reply dropped).

use std::time::Instant;

use actix::prelude::*;
use tokio::sync::oneshot;

use super::answers::Settled;
use super::flight::{Phase, StageSpans};
use super::generations::CopyTerms;
use super::messages::{Answer, Origin, XCache};
use super::KeyOwner;
#[cfg(doc)]
use super::Renew;
use crate::actors::cache::{CacheGetMany, Cached};
use crate::template::Lookup;

impl KeyOwner {
    /// A worker's [`Renew`] (see its docs for what it is and is not).
    pub(super) fn renew(
        &mut self,
        renewals: Vec<(i64, oneshot::Sender<Answer>)>,
        ctx: &mut Context<Self>,
    ) {
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
        // Not a request: no span.
        self.spawn_stage(ctx, StageSpans::none(), read, move |owner, values, _| {
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
        if let Some(lookup) = self.near_cache.renewed(id) {
            // Another worker's renewal (or a request's flight) already renewed the entry.
            let terms = self.near_cache.terms(id, &self.deps.generations);
            self.renewed(reply, terms.map(|terms| (lookup, terms)), "near_cache");
            return None;
        }
        let Some(flight) = self.flights.get_mut(&id) else {
            return Some(reply);
        };
        match &flight.phase {
            Phase::Filling(lookup) => {
                let settled = Settled::Fresh(lookup.clone(), Origin::Database);
                let terms = self.flight_terms(id, true, &settled);
                self.answer_renewals(vec![reply], &settled, terms);
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
                    self.near_cache
                        .remember(id, &cached.lookup, Instant::now(), cached.fresh_for);
                    let terms = self.near_cache.terms(id, &self.deps.generations);
                    terms.map(|terms| (cached.lookup, terms))
                }
                _ => None,
            };
            for reply in replies {
                self.renewed(reply, renewed.clone(), "read");
            }
        }
    }

    /// Answers the renewals that joined a flight with what it settled: a `Fresh` answer with
    /// copy terms renews them, anything else gives them nothing.
    pub(super) fn answer_renewals(
        &self,
        renewals: Vec<oneshot::Sender<Answer>>,
        settled: &Settled,
        terms: Option<CopyTerms>,
    ) {
        let renewed = match (settled, terms) {
            (Settled::Fresh(lookup, _), Some(terms)) => Some((lookup, terms)),
            _ => None,
        };
        for reply in renewals {
            self.renewed(
                reply,
                renewed.map(|(lookup, terms)| (lookup.clone(), terms)),
                "joined",
            );
        }
    }

    /// Ends one renewal: with a renewed copy (counted as `outcome`), or with none (`missed`).
    fn renewed(
        &self,
        reply: oneshot::Sender<Answer>,
        renewed: Option<(Lookup, CopyTerms)>,
        outcome: &str,
    ) {
        let Some((lookup, terms)) = renewed else {
            return self.count_renewal("missed");
        };
        self.count_renewal(outcome);
        let _ = reply.send(Answer {
            result: Ok(lookup),
            x_cache: XCache::Hit,
            terms: Some(terms),
        });
    }

    /// Counts a renewal by its `outcome` (counted before any answer, so that a worker that has
    /// its answer finds it counted).
    pub(super) fn count_renewal(&self, outcome: &str) {
        self.deps
            .metrics
            .worker_cache_renewals_total
            .with_label_values(&[outcome])
            .inc();
    }
}
