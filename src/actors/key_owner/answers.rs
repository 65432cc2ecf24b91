//! What the waiters of a flight are told ([`Settled`]), how each answer is counted in the seed's
//! metrics, and the answer of a request shed at a bound.

use tokio::sync::oneshot;

use super::flight::Waiter;
use super::generations::CopyTerms;
use super::messages::{Answer, FlightError, Origin, ShedReason, XCache};
use super::KeyOwner;
use crate::metrics::Metrics;
use crate::template::Lookup;

/// What the waiters of a flight are told.
pub(super) enum Settled {
    Fresh(Lookup, Origin),
    /// A soft-expired cached value, answered while a refresh runs.
    Revalidating(Lookup),
    /// A remembered value, answered because the load failed.
    Stale(Lookup),
    Failed(FlightError),
}

/// Counts a flight by how it ended (`singleflight_flights_total`).
pub(super) fn count_flight(metrics: &Metrics, settled: &Settled) {
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
pub(super) fn answer(
    metrics: &Metrics,
    waiter: Waiter,
    settled: &Settled,
    terms: Option<CopyTerms>,
) {
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
        terms,
    });
}

impl KeyOwner {
    /// Answers a request at once with `503`: the owner is at one of its bounds.
    pub(super) fn shed(&self, reply: oneshot::Sender<Answer>, reason: ShedReason) {
        self.deps
            .metrics
            .shed_requests_total
            .with_label_values(&[reason.label()])
            .inc();
        let _ = reply.send(Answer {
            result: Err(FlightError::Shed(reason)),
            x_cache: XCache::Miss,
            terms: None,
        });
    }
}
