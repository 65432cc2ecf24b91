//! The circuit breaker's decisions, apart from the actor that acts on them.
//!
//! [`Breaker`] is plain state: it never reads a clock, touches Redis or reports a metric. The
//! [`CacheActor`](super::CacheActor) asks it whether a call may go to Redis, feeds it each call's
//! outcome, and does what its answers call for: on opening, it replaces the connection and
//! schedules the probe (`BREAKER_OPEN_MS` later, on the actor's own clock); on every change of
//! state, it logs and counts it.
//!
//! ```text
//!            BREAKER_FAILURES connectivity failures in a row
//!   Closed ──────────────────────────────────────────────────▶ Open
//!     ▲  ▲                                                     │  ▲
//!     │  └──── restart (epoch moves on) ─── any state          │  │ probe failed
//!     │                                                        ▼  │
//!     └────────────── probe succeeded ─────────────────────  HalfOpen
//!                                           (BREAKER_OPEN_MS after opening)
//! ```
//!
//! # Epochs
//! Every opening (and every restart of the actor) starts a new *epoch*. A call's outcome counts
//! only in the epoch it began in: a slow timeout from before a trip cannot re-open a breaker that
//! has since closed, and a probe scheduled by an earlier opening does nothing.

/// Where the breaker is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Calls go to Redis; consecutive connectivity failures are counted.
    Closed,
    /// Calls are skipped at no cost, until the probe.
    Open,
    /// One `PING` is in the air; calls are still skipped.
    HalfOpen,
}

impl State {
    /// The `redis_breaker_state` gauge's value.
    pub fn gauge_value(self) -> i64 {
        match self {
            State::Closed => 0,
            State::Open => 1,
            State::HalfOpen => 2,
        }
    }

    /// The `redis_breaker_transitions_total` label of the state entered.
    pub fn label(self) -> &'static str {
        match self {
            State::Closed => "closed",
            State::Open => "open",
            State::HalfOpen => "half_open",
        }
    }
}

#[derive(Debug, Clone)]
pub struct Breaker {
    /// Consecutive connectivity failures that open the breaker (`BREAKER_FAILURES`).
    threshold: u32,
    state: State,
    /// Consecutive connectivity failures seen while closed, in this epoch.
    failures: u32,
    epoch: u64,
}

impl Breaker {
    /// A closed breaker that opens after `threshold` consecutive connectivity failures.
    pub fn new(threshold: u32) -> Self {
        Breaker {
            threshold,
            state: State::Closed,
            failures: 0,
            epoch: 0,
        }
    }

    pub fn state(&self) -> State {
        self.state
    }

    /// Whether a call may go to Redis now: only while closed.
    pub fn admits(&self) -> bool {
        self.state == State::Closed
    }

    /// The epoch a call beginning now belongs to; hand it back to [`Breaker::record`].
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Feeds the outcome of a call that began in `epoch`: a connectivity failure (timeout,
    /// refusal, I/O error) counts towards opening; anything else — success, or a reachable Redis
    /// that rejected a command or held a bad value — resets the count. Outcomes from another
    /// epoch, or arriving while not closed, change nothing. Returns `true` when this outcome
    /// opened the breaker.
    pub fn record(&mut self, epoch: u64, connectivity_failure: bool) -> bool {
        if self.state != State::Closed || epoch != self.epoch {
            return false;
        }
        if !connectivity_failure {
            self.failures = 0;
            return false;
        }
        self.failures += 1;
        if self.failures >= self.threshold {
            self.open();
            return true;
        }
        false
    }

    /// Opens the breaker, in a new epoch (also how a failed probe re-opens it).
    pub fn open(&mut self) {
        self.epoch += 1;
        self.failures = 0;
        self.state = State::Open;
    }

    /// The open period scheduled in `epoch` is over: if the breaker is still open in that epoch,
    /// it goes half-open and `true` says to send the probe. A probe scheduled before a later
    /// opening or a restart does nothing.
    pub fn half_open(&mut self, epoch: u64) -> bool {
        if epoch != self.epoch || self.state != State::Open {
            return false;
        }
        self.state = State::HalfOpen;
        true
    }

    /// The probe succeeded: calls go to Redis again, with a clean count.
    pub fn close(&mut self) {
        self.failures = 0;
        self.state = State::Closed;
    }

    /// The actor restarted: closed, in a new epoch, so nothing from before counts.
    pub fn reset(&mut self) {
        self.epoch += 1;
        self.close();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FAIL: bool = true;
    const OK: bool = false;

    #[test]
    fn opens_after_the_threshold_of_connectivity_failures_in_a_row() {
        let mut b = Breaker::new(3);
        assert!(b.admits());
        assert!(!b.record(b.epoch(), FAIL));
        assert!(!b.record(b.epoch(), FAIL));
        assert_eq!(b.state(), State::Closed);
        assert!(b.record(b.epoch(), FAIL), "the third failure opens it");
        assert_eq!(b.state(), State::Open);
        assert!(!b.admits());
    }

    #[test]
    fn a_success_or_another_error_resets_the_count() {
        let mut b = Breaker::new(3);
        for _ in 0..10 {
            b.record(b.epoch(), FAIL);
            b.record(b.epoch(), FAIL);
            b.record(b.epoch(), OK);
        }
        assert_eq!(b.state(), State::Closed, "never three in a row");
        b.record(b.epoch(), FAIL);
        b.record(b.epoch(), FAIL);
        assert!(b.record(b.epoch(), FAIL));
    }

    #[test]
    fn a_threshold_of_one_opens_on_the_first_failure() {
        let mut b = Breaker::new(1);
        assert!(b.record(b.epoch(), FAIL));
        assert_eq!(b.state(), State::Open);
    }

    #[test]
    fn outcomes_of_an_older_epoch_change_nothing() {
        let mut b = Breaker::new(2);
        let before_trip = b.epoch();
        b.record(before_trip, FAIL);
        assert!(b.record(before_trip, FAIL));
        assert!(b.half_open(b.epoch()));
        b.close();
        // Slow failures of calls that began before the trip arrive now.
        for _ in 0..5 {
            assert!(!b.record(before_trip, FAIL));
        }
        assert_eq!(b.state(), State::Closed);
        // And they did not count towards the next opening either.
        assert!(!b.record(b.epoch(), FAIL));
        assert!(b.record(b.epoch(), FAIL));
    }

    #[test]
    fn outcomes_while_open_or_half_open_change_nothing() {
        let mut b = Breaker::new(1);
        b.record(b.epoch(), FAIL);
        assert!(!b.record(b.epoch(), OK));
        assert_eq!(b.state(), State::Open, "only the probe closes it");
        assert!(b.half_open(b.epoch()));
        assert!(!b.record(b.epoch(), OK));
        assert!(!b.record(b.epoch(), FAIL));
        assert_eq!(b.state(), State::HalfOpen);
    }

    #[test]
    fn a_successful_probe_closes_it_with_a_clean_count() {
        let mut b = Breaker::new(2);
        b.record(b.epoch(), FAIL);
        b.record(b.epoch(), FAIL);
        assert!(b.half_open(b.epoch()));
        assert!(!b.admits(), "calls wait for the probe");
        b.close();
        assert!(b.admits());
        assert!(!b.record(b.epoch(), FAIL), "one failure is not two");
    }

    #[test]
    fn a_failed_probe_opens_it_for_another_period() {
        let mut b = Breaker::new(1);
        b.record(b.epoch(), FAIL);
        let first = b.epoch();
        assert!(b.half_open(first));
        b.open();
        assert_eq!(b.state(), State::Open);
        assert!(!b.half_open(first), "the first period's probe is spent");
        assert!(
            b.half_open(b.epoch()),
            "the new period ends in a probe of its own"
        );
    }

    #[test]
    fn a_probe_from_before_a_restart_does_nothing() {
        let mut b = Breaker::new(1);
        b.record(b.epoch(), FAIL);
        let scheduled = b.epoch();
        b.reset();
        assert_eq!(b.state(), State::Closed);
        assert!(!b.half_open(scheduled));
        assert_eq!(b.state(), State::Closed);
        // A call from before the restart cannot open it either.
        assert!(!b.record(scheduled, FAIL));
    }
}
