//! Bodies in the air: what an owner's flights hold, bounded in bytes (`INFLIGHT_MEMORY_MB`,
//! each owner an equal part).
//!
//! The caches are bounded by `CACHE_MEMORY_MB`, but a flight holds its body outside them: from
//! its Redis read or database load until its Redis fill is written, while the fills of other
//! keys queue before it. Many cold large templates at once (hundreds of KB each, thousands of
//! keys) would hold far more than any cache. So a flight starts its first stage only when the
//! owner has room for it, and waits *parked* until then:
//!
//! - a started flight counts, until its body is known, as the owner's *estimate*: the largest
//!   body seen lately (it rises at once to a larger body and falls by a sixteenth of the gap
//!   with each smaller one; [`FIRST_ESTIMATE`] before any); once its body is known, as twice the
//!   body (as held, and as encoded for its Redis write) plus [`ENTRY_OVERHEAD`];
//! - a flight starts if what the started ones count as plus the estimate fits the share, and
//!   fewer than [`MAX_UNKNOWN`] started ones are still of unknown size (so a wrong estimate,
//!   at a cold start or when templates suddenly grow, costs at most that many bodies); an owner
//!   with nothing in the air always starts one, so a body larger than the whole share is still
//!   served, one at a time;
//! - otherwise it is parked, in the order it came, and started as soon as there is room: its
//!   requests wait a little longer, and requests for its key join it as they would a started
//!   one. At most a share's worth of expected bodies is parked: beyond it a request that would
//!   start one more flight is shed at once (`503`, `shed_requests_total{reason="memory"}`).
//!   Joining a flight holds no more bytes: never shed for them.
//!
//! What the bound leaves out, and the RSS figures of BENCHMARKS §17 include: copies inside the
//! Redis and PostgreSQL clients' buffers while a reply is read, and answers being written to
//! slow clients after their flight ended.

use std::collections::VecDeque;

use prometheus::IntGauge;

use crate::memory::ENTRY_OVERHEAD;
use crate::template::Lookup;

/// What a flight counts as before any body was seen: a typical template is a few KB.
pub const FIRST_ESTIMATE: usize = 16 * 1024;

/// Started flights whose body is not known yet, at most, per owner.
pub const MAX_UNKNOWN: usize = 64;

/// Where a flight stands in its owner's bytes in the air.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Air {
    /// Waiting for room: no stage started, nothing held.
    Parked,
    /// Started; its body is not known yet: counted as the estimate it started with.
    Expected(usize),
    /// Holds a body: counted as this.
    Holding(usize),
}

/// One owner's flights' bytes against its share.
pub(super) struct InAir {
    share: usize,
    /// What the started flights count as, summed.
    held: usize,
    /// Started flights whose body is not known yet.
    unknown: usize,
    /// What a flight whose body is not known yet counts as.
    estimate: usize,
    /// Parked flights (template id, flight id) in the order they came. One that ended while
    /// parked is skipped when its turn comes.
    parked: VecDeque<(i64, u64)>,
    /// `inflight_memory_bytes`, shared by the owners: each adds what it changes.
    gauge: IntGauge,
}

impl InAir {
    pub(super) fn new(share: usize, gauge: IntGauge) -> InAir {
        InAir {
            share,
            held: 0,
            unknown: 0,
            estimate: FIRST_ESTIMATE,
            parked: VecDeque::new(),
            gauge,
        }
    }

    /// Whether a flight may start now, ahead of none.
    fn room(&self) -> bool {
        self.held == 0 || (self.unknown < MAX_UNKNOWN && self.held + self.estimate <= self.share)
    }

    /// Where a new flight goes: started at once (`Some(Air::Expected)`), parked (`Some(Parked)`,
    /// and the caller parks it with [`InAir::park`]), or nowhere (`None`): shed.
    pub(super) fn admit(&mut self) -> Option<Air> {
        if self.parked.is_empty() && self.room() {
            return Some(self.start());
        }
        let parked = (self.parked.len() + 1).saturating_mul(self.estimate);
        (parked <= self.share).then_some(Air::Parked)
    }

    /// Flight `flight_id` of `id` waits for room.
    pub(super) fn park(&mut self, id: i64, flight_id: u64) {
        self.parked.push_back((id, flight_id));
    }

    /// The next parked flight, if there is room for it now; the caller starts it (with
    /// [`InAir::start`]) if it is still parked.
    pub(super) fn next_parked(&mut self) -> Option<(i64, u64)> {
        if self.room() {
            self.parked.pop_front()
        } else {
            None
        }
    }

    pub(super) fn has_parked(&self) -> bool {
        !self.parked.is_empty()
    }

    /// A flight starts: what it counts as until its body is known.
    pub(super) fn start(&mut self) -> Air {
        self.unknown += 1;
        self.change(0, self.estimate);
        Air::Expected(self.estimate)
    }

    /// A started flight now holds `lookup`: it counts as that from now on, and the estimate
    /// learns from it.
    pub(super) fn holds(&mut self, air: &mut Air, lookup: &Lookup) {
        let was = match *air {
            Air::Parked => return,
            Air::Expected(weight) => {
                self.unknown -= 1;
                weight
            }
            Air::Holding(weight) => weight,
        };
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
        self.change(was, known);
        *air = Air::Holding(known);
    }

    /// A flight ended.
    pub(super) fn end(&mut self, air: Air) {
        match air {
            Air::Parked => {}
            Air::Expected(weight) => {
                self.unknown -= 1;
                self.change(weight, 0);
            }
            Air::Holding(weight) => self.change(weight, 0),
        }
    }

    /// Every flight is gone at once (the owner restarts); the estimate stays.
    pub(super) fn clear(&mut self) {
        self.change(self.held, 0);
        self.unknown = 0;
        self.parked.clear();
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
        let mut first = air.admit().unwrap();
        assert_eq!(first, Air::Expected(FIRST_ESTIMATE));
        assert_eq!(air.gauge.get(), FIRST_ESTIMATE as i64);
        air.holds(&mut first, &found(100_000));
        assert_eq!(first, Air::Holding(200_000 + ENTRY_OVERHEAD));
        // The next flight is expected to be as large.
        let second = air.admit().unwrap();
        assert_eq!(second, Air::Expected(200_000 + ENTRY_OVERHEAD));
        air.end(first);
        air.end(second);
        assert_eq!((air.held, air.unknown, air.gauge.get()), (0, 0, 0));
    }

    #[test]
    fn flights_beyond_the_share_wait_parked_then_are_shed() {
        let mut air = in_air(1_000_000);
        let mut first = air.admit().unwrap();
        air.holds(&mut first, &found(200_000));
        let second = air.admit().unwrap();
        assert!(matches!(second, Air::Expected(_)), "800 KB of 1 MB");
        // 800 KB held and 400 KB expected: no room, but room to wait.
        assert_eq!(air.admit(), Some(Air::Parked));
        air.park(3, 3);
        assert_eq!(air.admit(), Some(Air::Parked));
        air.park(4, 4);
        assert_eq!(air.admit(), None, "two parked: a share's worth expected");
        assert_eq!(air.next_parked(), None, "no room yet");
        air.end(first);
        assert_eq!(air.next_parked(), Some((3, 3)));
        air.start();
        assert_eq!(air.next_parked(), None);
        assert!(air.has_parked());
    }

    #[test]
    fn an_owner_with_nothing_in_the_air_starts_even_a_huge_body() {
        let mut air = in_air(100_000);
        let mut first = air.admit().unwrap();
        air.holds(&mut first, &found(1_000_000));
        assert_eq!(
            air.admit(),
            None,
            "a 2 MB estimate does not fit a 100 KB share"
        );
        air.end(first);
        assert!(matches!(air.admit(), Some(Air::Expected(_))));
    }

    #[test]
    fn at_most_so_many_flights_of_unknown_size_start_at_once() {
        let mut air = in_air(usize::MAX / 4);
        let started: Vec<_> = (0..MAX_UNKNOWN).map(|_| air.admit().unwrap()).collect();
        assert!(started.iter().all(|a| matches!(a, Air::Expected(_))));
        assert_eq!(air.admit(), Some(Air::Parked));
        air.park(1, 1);
        let mut one = started[0];
        air.holds(&mut one, &found(10));
        assert_eq!(air.next_parked(), Some((1, 1)));
    }

    #[test]
    fn the_estimate_falls_slowly_after_a_large_body() {
        let mut air = in_air(usize::MAX / 4);
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
