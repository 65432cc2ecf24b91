//! Where a load goes: a read replica (`DATABASE_READ_URL`) when one has replayed every change
//! the service knows of for that key, the primary otherwise.
//!
//! # The freshness invariant, with replicas
//! A replica applies the primary's WAL some time after the primary wrote it. Once the service
//! has learned of a change to a key, a load of that key must not read a replica that has not yet
//! replayed it. Positions in the WAL (LSNs) decide:
//!
//! - When the change listener relays a change of key `id` ([`super::Changed`]), the key is
//!   *pinned* to the primary, with no position yet, and the actor asks the primary for its
//!   current WAL position. The change committed before its notification was sent, so that
//!   position is at or past the change's commit: every pin made before the question went out
//!   gets it.
//! - After a reconnect of the listener, a deaf spell or a `TRUNCATE` ([`super::ChangedAll`]),
//!   every key is pinned the same way.
//! - Every replica's replayed position (`pg_last_wal_replay_lsn()`) is read every
//!   [`super::TICK`]: that poll is its health check too. A load of `id` may go to a healthy replica
//!   whose replayed position is at or past `id`'s pin (and the all-keys pin); among those, round
//!   robin. None: the primary. A pin that every replica has passed is dropped.
//!
//! No clock is compared: positions come from the servers, and a pin only ever sends a load to
//! the primary, never to an older copy.
//!
//! # How old a replica's row is
//! A row read from a replica is as old as what the replica has replayed, not as the moment of
//! the read, and it is written to Redis with that age: so a service replica that knows of a
//! change made after it, and compares the entry's time with the change's, takes it for the old
//! copy it is (this matters when the service that loaded it had not heard of the change yet).
//! The primary's position is read every tick, with the moment each question was sent
//! ([`Timeline`]): everything committed before that moment is at or before that position, so a
//! replica that has replayed it holds all of it. A replica's row is stamped with the newest such
//! moment; a replica behind every position kept takes no loads until it catches up.

use std::collections::{HashMap, VecDeque};

/// A position in the primary's WAL, in bytes from its start.
pub type Lsn = u64;

/// Where the loads of a key may read from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pin {
    /// A change is known, its position not yet: the primary only. Made while the service's
    /// pin count was `seq`.
    Pending(u64),
    /// A replica that has replayed this position may serve the key.
    At(Lsn),
}

/// Where one load goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    Primary,
    Replica(usize),
}

/// Pins kept per key at the most; beyond, every key is pinned at once instead (a load may go to
/// the primary more often, never to an older copy).
const MAX_PINS: usize = 100_000;

/// The routing state of one DbActor: its replicas' replayed positions and the pins.
pub struct Routing {
    /// Each replica's last replayed position; `None` while it is unhealthy (its last poll or
    /// load failed).
    replayed: Vec<Option<Lsn>>,
    /// Every key's loads need at least this (a reconnect, a deaf spell, a `TRUNCATE`); `None`:
    /// no such pin.
    all: Option<Pin>,
    pins: HashMap<i64, Pin>,
    /// Counts pins made, so that a position answers only the pins made before it was asked.
    seq: u64,
    /// Where round robin goes next.
    next: usize,
    /// The listener is deaf: a change may be unknown, so no replica can be shown to hold it.
    deaf: bool,
    /// Replicas that take no load for good (not standbys): pins do not wait for them.
    excluded: Vec<bool>,
}

impl Routing {
    pub fn new(replicas: usize) -> Self {
        Routing {
            replayed: vec![None; replicas],
            all: None,
            pins: HashMap::new(),
            seq: 0,
            next: 0,
            deaf: false,
            excluded: vec![false; replicas],
        }
    }

    /// While the listener is deaf every load reads the primary (changes go unheard, so no pin
    /// can say which replica holds them); when it hears again, [`Self::changed_all`] pins every
    /// key until a replica has replayed past that moment.
    pub fn set_deaf(&mut self, deaf: bool) {
        self.deaf = deaf;
    }

    pub fn replicas(&self) -> usize {
        self.replayed.len()
    }

    /// `id` changed: its loads go to the primary until a replica has replayed past the primary's
    /// position of now. Returns whether a position is worth asking for (there are replicas).
    pub fn changed(&mut self, id: i64) -> bool {
        if self.replayed.is_empty() {
            return false;
        }
        self.seq += 1;
        if self.pins.len() >= MAX_PINS {
            self.pins.clear();
            self.all = Some(Pin::Pending(self.seq));
        } else {
            self.pins.insert(id, Pin::Pending(self.seq));
        }
        true
    }

    /// Anything may have changed: every key's loads go to the primary until a replica has
    /// replayed past the primary's position of now.
    pub fn changed_all(&mut self) -> bool {
        if self.replayed.is_empty() {
            return false;
        }
        self.seq += 1;
        self.pins.clear();
        self.all = Some(Pin::Pending(self.seq));
        true
    }

    /// The primary is being asked for its position: the pins made so far get its answer.
    pub fn asking(&self) -> u64 {
        self.seq
    }

    /// The primary answered `lsn` to the question [`Routing::asking`] numbered `asked`.
    pub fn primary_at(&mut self, asked: u64, lsn: Lsn) {
        let settle = |pin: &mut Pin| {
            if let Pin::Pending(made) = *pin {
                if made <= asked {
                    *pin = Pin::At(lsn);
                }
            }
        };
        self.pins.values_mut().for_each(settle);
        if let Some(all) = self.all.as_mut() {
            settle(all);
        }
        self.drop_passed();
    }

    /// Replica `i` has replayed up to `lsn` (`None`: it is unhealthy).
    pub fn replica_at(&mut self, i: usize, lsn: Option<Lsn>) {
        if let Some(replayed) = self.replayed.get_mut(i) {
            *replayed = lsn;
        }
        self.drop_passed();
    }

    /// Where a load of `id` goes now.
    pub fn route(&mut self, id: i64) -> Target {
        if self.deaf {
            return Target::Primary;
        }
        let needed = [self.all, self.pins.get(&id).copied()];
        let mut needs = 0;
        for pin in needed.into_iter().flatten() {
            match pin {
                Pin::Pending(_) => return Target::Primary,
                Pin::At(lsn) => needs = needs.max(lsn),
            }
        }
        let n = self.replayed.len();
        for step in 0..n {
            let i = (self.next + step) % n;
            if !self.excluded[i] && self.replayed[i].is_some_and(|at| at >= needs) {
                self.next = (i + 1) % n;
                return Target::Replica(i);
            }
        }
        Target::Primary
    }

    /// Replica `i` takes no load from now on (it is not a standby): nothing waits for it.
    pub fn exclude(&mut self, i: usize) {
        if let Some(excluded) = self.excluded.get_mut(i) {
            *excluded = true;
        }
        self.replica_at(i, None);
    }

    /// Pins every replica has passed can go: any replica may serve those keys again. (An
    /// unhealthy replica has passed nothing: it is re-checked when it is healthy again. An
    /// excluded one never serves again, so nothing waits for it.)
    fn drop_passed(&mut self) {
        let counted = self.replayed.iter().zip(&self.excluded);
        let positions = counted
            .filter(|(_, excluded)| !**excluded)
            .map(|(at, _)| *at);
        let Some(slowest) = positions.collect::<Option<Vec<_>>>() else {
            return;
        };
        let Some(slowest) = slowest.into_iter().min() else {
            return;
        };
        let passed = |pin: &Pin| matches!(pin, Pin::At(lsn) if *lsn <= slowest);
        self.pins.retain(|_, pin| !passed(pin));
        if self.all.as_ref().is_some_and(passed) {
            self.all = None;
        }
    }

    /// Keys pinned now (for tests and the gauge).
    pub fn pinned(&self) -> usize {
        self.pins.len() + usize::from(self.all.is_some())
    }
}

/// The primary's WAL positions as last read, each with the moment (unix ms) its question was
/// sent (see "How old a replica's row is" above).
#[derive(Debug, Default)]
pub struct Timeline {
    /// Oldest first.
    positions: VecDeque<(u64, Lsn)>,
}

impl Timeline {
    /// How long positions are kept: a replica further behind takes no loads.
    const KEPT_MS: u64 = 5 * 60 * 1000;
    /// Positions asked for closer together than this (changes ask for one each) share a place:
    /// the newer replaces the newer of the two, so the five minutes stay five minutes.
    const GAP_MS: u64 = 100;

    /// The primary was at `lsn` or past it when asked at `asked_at_ms`.
    pub fn primary_at(&mut self, asked_at_ms: u64, lsn: Lsn) {
        let newest_two = self.positions.len() >= 2;
        let crowded = self
            .positions
            .iter()
            .rev()
            .nth(1)
            .is_some_and(|(at, _)| asked_at_ms.saturating_sub(*at) < Self::GAP_MS);
        if newest_two && crowded {
            self.positions.pop_back();
        }
        self.positions.push_back((asked_at_ms, lsn));
        while self
            .positions
            .front()
            .is_some_and(|(at, _)| at + Self::KEPT_MS < asked_at_ms)
        {
            self.positions.pop_front();
        }
    }

    /// The newest moment before which a replica that has replayed `replayed` holds everything
    /// the primary committed; `None` if it is behind every position kept.
    pub fn as_of(&self, replayed: Lsn) -> Option<u64> {
        self.positions
            .iter()
            .rev()
            .find(|(_, lsn)| *lsn <= replayed)
            .map(|(asked_at_ms, _)| *asked_at_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_replicas_everything_goes_to_the_primary_and_nothing_is_pinned() {
        let mut routing = Routing::new(0);
        assert!(!routing.changed(1));
        assert!(!routing.changed_all());
        assert_eq!(routing.route(1), Target::Primary);
        assert_eq!(routing.pinned(), 0);
    }

    #[test]
    fn loads_go_round_robin_to_healthy_replicas() {
        let mut routing = Routing::new(3);
        routing.replica_at(0, Some(10));
        routing.replica_at(2, Some(10));
        let targets: Vec<_> = (0..4).map(|id| routing.route(id)).collect();
        assert_eq!(
            targets,
            [
                Target::Replica(0),
                Target::Replica(2),
                Target::Replica(0),
                Target::Replica(2)
            ]
        );
        routing.replica_at(0, None);
        routing.replica_at(2, None);
        assert_eq!(routing.route(1), Target::Primary, "none healthy");
    }

    #[test]
    fn a_changed_key_reads_the_primary_until_a_replica_has_replayed_the_change() {
        let mut routing = Routing::new(2);
        routing.replica_at(0, Some(100));
        routing.replica_at(1, Some(100));
        assert!(routing.changed(7));
        assert_eq!(routing.route(7), Target::Primary, "position not known yet");
        assert!(matches!(routing.route(8), Target::Replica(_)), "other keys");
        let asked = routing.asking();
        routing.primary_at(asked, 150);
        assert_eq!(routing.route(7), Target::Primary, "no replica is at 150");
        routing.replica_at(1, Some(150));
        assert_eq!(routing.route(7), Target::Replica(1));
        assert_eq!(routing.route(7), Target::Replica(1), "replica 0 is behind");
        routing.replica_at(0, Some(160));
        assert_eq!(routing.pinned(), 0, "every replica passed it");
    }

    #[test]
    fn a_position_asked_before_a_change_does_not_settle_it() {
        let mut routing = Routing::new(1);
        routing.replica_at(0, Some(100));
        routing.changed(1);
        let asked = routing.asking();
        routing.changed(2);
        routing.primary_at(asked, 120);
        routing.replica_at(0, Some(130));
        assert_eq!(routing.route(1), Target::Replica(0));
        assert_eq!(
            routing.route(2),
            Target::Primary,
            "pinned after the question"
        );
    }

    #[test]
    fn a_reconnect_pins_every_key_and_an_unhealthy_replica_passes_nothing() {
        let mut routing = Routing::new(2);
        routing.replica_at(0, Some(100));
        routing.replica_at(1, None);
        routing.changed_all();
        assert_eq!(routing.route(42), Target::Primary);
        let asked = routing.asking();
        routing.primary_at(asked, 200);
        assert_eq!(routing.route(42), Target::Primary);
        routing.replica_at(0, Some(200));
        assert_eq!(routing.route(42), Target::Replica(0));
        assert_eq!(routing.pinned(), 1, "kept while replica 1 may be behind");
        routing.replica_at(1, Some(250));
        assert_eq!(routing.pinned(), 0);
    }

    #[test]
    fn while_deaf_every_load_reads_the_primary() {
        let mut routing = Routing::new(1);
        routing.replica_at(0, Some(100));
        assert_eq!(routing.route(1), Target::Replica(0));
        routing.set_deaf(true);
        assert_eq!(routing.route(1), Target::Primary);
        routing.set_deaf(false);
        assert_eq!(routing.route(1), Target::Replica(0));
    }

    #[test]
    fn an_excluded_replica_takes_no_load_and_no_pin_waits_for_it() {
        let mut routing = Routing::new(2);
        routing.replica_at(0, Some(100));
        routing.exclude(1);
        assert!(routing.changed(7));
        let asked = routing.asking();
        routing.primary_at(asked, 150);
        assert_eq!(routing.route(7), Target::Primary, "not replayed yet");
        routing.replica_at(0, Some(150));
        assert_eq!(
            routing.pinned(),
            0,
            "the standby passed it: nothing waits for the other"
        );
        assert!((0..4).all(|id| routing.route(id) == Target::Replica(0)));
        routing.replica_at(1, Some(1_000));
        assert!(
            (0..4).all(|id| routing.route(id) == Target::Replica(0)),
            "excluded for good"
        );
    }

    #[test]
    fn a_replica_holds_what_the_primary_had_when_asked_for_the_newest_position_it_replayed() {
        let mut timeline = Timeline::default();
        assert_eq!(timeline.as_of(100), None, "nothing known yet");
        timeline.primary_at(1_000, 100);
        timeline.primary_at(1_500, 100);
        timeline.primary_at(2_000, 180);
        timeline.primary_at(2_500, 250);
        assert_eq!(
            timeline.as_of(100),
            Some(1_500),
            "idle primary: its newest sample"
        );
        assert_eq!(timeline.as_of(200), Some(2_000), "between two positions");
        assert_eq!(timeline.as_of(250), Some(2_500), "caught up");
        assert_eq!(timeline.as_of(99), None, "behind all of it");
    }

    #[test]
    fn the_timeline_keeps_five_minutes_however_often_it_is_asked() {
        let mut timeline = Timeline::default();
        // A tick every 500 ms for six minutes, and a change's question every millisecond of
        // each tick's first 50.
        for tick in 0..720u64 {
            let at = tick * 500;
            timeline.primary_at(at, at);
            for ms in 1..50 {
                timeline.primary_at(at + ms, at + ms);
            }
        }
        let newest = 719 * 500 + 49;
        assert!(
            timeline.positions.len() < 2 * 720,
            "{}",
            timeline.positions.len()
        );
        assert_eq!(timeline.as_of(newest), Some(newest));
        let five_minutes_ago = newest - Timeline::KEPT_MS;
        let kept = timeline
            .as_of(five_minutes_ago + 500)
            .expect("five minutes kept");
        assert!(
            kept >= five_minutes_ago && kept <= five_minutes_ago + 500,
            "{kept}"
        );
        assert_eq!(
            timeline.as_of(five_minutes_ago - 1_000),
            None,
            "older is forgotten"
        );
    }
}
