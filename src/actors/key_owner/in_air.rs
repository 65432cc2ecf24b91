//! Bodies in the air: what an owner's flights hold, bounded in bytes (`INFLIGHT_MEMORY_MB`,
//! each owner an equal part).
//!
//! The caches are bounded by `CACHE_MEMORY_MB`, but a flight holds its body outside them: from
//! its Redis read or database load until its Redis fill is written, while the fills of other
//! keys queue before it. Many cold large templates at once (hundreds of KB each, thousands of
//! keys) would hold far more than any cache, so a new flight is admitted only while the
//! owner's flights hold less than its share:
//!
//! - a flight is counted from its start; until its body is known it counts as the owner's
//!   *estimate*: the largest body seen lately (it rises at once to a larger body and falls by a
//!   sixteenth of the gap with each smaller one), [`FIRST_ESTIMATE`] before any;
//! - once its body is known it counts as twice the body (as held, and as encoded for its Redis
//!   write) plus [`ENTRY_OVERHEAD`], until the flight ends;
//! - a request that would start a flight past the share is shed at once (`503`,
//!   `shed_requests_total{reason="memory"}`); one joining a flight in the air costs nothing and
//!   is never shed for it;
//! - an owner with no flight in the air always admits one, so that a body larger than the whole
//!   share is still served, one at a time.
//!
//! What the bound leaves out, and the RSS figures of BENCHMARKS §17 include: copies inside the
//! Redis and PostgreSQL clients' buffers while a reply is read, and answers being written to
//! slow clients after their flight ended.

use prometheus::IntGauge;

use crate::memory::ENTRY_OVERHEAD;
use crate::template::Lookup;

/// What a flight counts as before any body was seen: a typical template is a few KB.
pub const FIRST_ESTIMATE: usize = 16 * 1024;

/// One owner's flights' bytes against its share.
pub(super) struct InAir {
    share: usize,
    /// What the owner's flights count as now, summed.
    held: usize,
    /// What a flight whose body is not known yet counts as.
    estimate: usize,
    /// `inflight_memory_bytes`, shared by the owners: each adds what it changes.
    gauge: IntGauge,
}

impl InAir {
    pub(super) fn new(share: usize, gauge: IntGauge) -> InAir {
        InAir {
            share,
            held: 0,
            estimate: FIRST_ESTIMATE,
            gauge,
        }
    }

    /// Whether one more flight fits, with `flights` in the air now.
    pub(super) fn admits(&self, flights: usize) -> bool {
        flights == 0 || self.held + self.estimate <= self.share
    }

    /// A flight starts: what it counts as until its body is known.
    pub(super) fn start(&mut self) -> usize {
        let weight = self.estimate;
        self.change(0, weight);
        weight
    }

    /// A flight that counted as `weight` now holds `lookup`: it counts as that from now on,
    /// and the estimate learns from it.
    pub(super) fn holds(&mut self, weight: &mut usize, lookup: &Lookup) {
        let body = match lookup {
            Lookup::Found(body) => body.len(),
            Lookup::NotFound => 0,
        };
        let known = 2 * body + ENTRY_OVERHEAD;
        self.estimate = if known >= self.estimate {
            known
        } else {
            self.estimate - (self.estimate - known) / 16
        };
        self.change(*weight, known);
        *weight = known;
    }

    /// A flight that counted as `weight` ended.
    pub(super) fn end(&mut self, weight: usize) {
        self.change(weight, 0);
    }

    /// Every flight is gone at once (the owner restarts); the estimate stays.
    pub(super) fn clear(&mut self) {
        self.change(self.held, 0);
    }

    fn change(&mut self, from: usize, to: usize) {
        let from = from.min(self.held);
        self.held = self.held - from + to;
        self.gauge.add(to as i64 - from as i64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn found(len: usize) -> Lookup {
        Lookup::Found(vec![b'x'; len].into())
    }

    fn in_air(share: usize) -> InAir {
        InAir::new(share, IntGauge::new("in_air", "in_air").unwrap())
    }

    #[test]
    fn flights_count_as_the_estimate_until_their_body_is_known() {
        let mut air = in_air(1_000_000);
        let mut weight = air.start();
        assert_eq!(weight, FIRST_ESTIMATE);
        assert_eq!(air.gauge.get(), FIRST_ESTIMATE as i64);
        air.holds(&mut weight, &found(100_000));
        assert_eq!(weight, 200_000 + ENTRY_OVERHEAD);
        assert_eq!(air.held, weight);
        // The next flight is expected to be as large.
        assert_eq!(air.start(), weight);
        air.end(weight);
        air.end(weight);
        assert_eq!((air.held, air.gauge.get()), (0, 0));
    }

    #[test]
    fn a_full_share_admits_no_new_flight_but_an_empty_owner_always_admits_one() {
        let mut air = in_air(500_000);
        let mut first = air.start();
        air.holds(&mut first, &found(200_000));
        assert!(
            !air.admits(1),
            "400 KB held, 400 KB more expected, 500 KB share"
        );
        assert!(
            air.admits(0),
            "an owner with nothing in the air serves even a huge body"
        );
        air.end(first);
        assert!(air.admits(0));
    }

    #[test]
    fn the_estimate_falls_slowly_after_a_large_body() {
        let mut air = in_air(usize::MAX);
        let mut weight = air.start();
        air.holds(&mut weight, &found(160_000));
        let large = air.estimate;
        air.holds(&mut weight, &found(0));
        assert!(air.estimate < large && air.estimate > large * 9 / 10);
        for _ in 0..200 {
            air.holds(&mut weight, &found(0));
        }
        assert!(air.estimate < 2 * ENTRY_OVERHEAD);
        air.clear();
        assert_eq!(air.gauge.get(), 0);
    }
}
