//! `--rate N`: a constant arrival rate, free of coordinated omission (as wrk2 measures).
//!
//! A closed loop of workers sends the next request only when the last one is answered, so
//! when the service stalls, the load stalls with it and the requests that would have waited
//! are never sent nor timed: the percentiles flatter the stall. Here every request has an
//! intended send time on a fixed schedule (request `k` at `k / N` seconds after the start),
//! whether or not earlier ones have been answered, and its latency is counted from that
//! intended time: a request sent late because the sender fell behind carries the delay.
//!
//! At most `--concurrency` requests are in the air. When that many are still unanswered at a
//! request's intended time, it is not sent but counted as `dropped`: the queue of the late is
//! bounded at zero rather than growing without end, and the report says how many.

use std::sync::Arc;
use std::time::Duration;

use rand::rngs::SmallRng;
use rand::SeedableRng;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::client::{self, template_url};
use crate::ids::IdPicker;
use crate::run::{Ctx, RunResult};
use crate::tally::Tally;
use crate::LoadtestError;

/// The fixed schedule of `per_second` requests a second. Times are whole nanoseconds computed
/// from `k` each time, never by adding a period up, so they do not drift over a long run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Schedule {
    per_second: u64,
}

const NANOS: u128 = 1_000_000_000;

impl Schedule {
    /// `per_second` is at least 1 (checked with the options).
    pub fn new(per_second: u64) -> Schedule {
        Schedule {
            per_second: per_second.max(1),
        }
    }

    /// When request `k` (from 0) is due, after the start: `floor(k / rate)` in nanoseconds.
    pub fn due(&self, k: u64) -> Duration {
        let nanos = u128::from(k) * NANOS / u128::from(self.per_second);
        Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX))
    }

    /// How many requests are due strictly before `within` after the start: the smallest `n`
    /// with `due(n) >= within`.
    pub fn count_within(&self, within: Duration) -> u64 {
        let n = (within.as_nanos() * u128::from(self.per_second)).div_ceil(NANOS);
        u64::try_from(n).unwrap_or(u64::MAX)
    }
}

/// What a constant-rate run did beside the usual report.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct RateOutcome {
    /// The requested rate, requests per second.
    pub target_rps: u64,
    /// Requests on the schedule within the duration.
    pub scheduled: u64,
    /// Requests sent (each at or after its intended time).
    pub sent: u64,
    /// Requests not sent: `--concurrency` requests were still in the air at their time.
    pub dropped: u64,
    /// The in-flight limit (`--concurrency`).
    pub max_in_flight: usize,
}

/// Sends requests on the schedule of `per_second` for `duration`, at most `max_in_flight` at
/// once; the `k`-th goes to target `k mod n` and asks for the id `picker` draws from a
/// generator seeded with `rng_seed` (drawn for dropped requests too, so a run's ids do not
/// depend on how many were dropped).
pub async fn at_rate(
    ctx: &Ctx,
    rng_seed: u64,
    per_second: u64,
    max_in_flight: usize,
    duration: Duration,
    picker: IdPicker,
) -> Result<(RunResult, RateOutcome), LoadtestError> {
    let before = ctx.scrape(true).await?;
    ctx.live.stage(format!("at {per_second}/s:"));
    let schedule = Schedule::new(per_second);
    let scheduled = schedule.count_within(duration);
    let slots = Arc::new(Semaphore::new(max_in_flight));
    let mut rng = SmallRng::seed_from_u64(rng_seed);
    let mut requests = JoinSet::new();
    let mut tally = Tally::new();
    let mut dropped = 0;
    let started = Instant::now();
    for k in 0..scheduled {
        let intended = started + schedule.due(k);
        // Returns at once for a time already past: a sender that fell behind catches up, and
        // the requests it sends late carry the delay in their latency.
        tokio::time::sleep_until(intended).await;
        let id = picker.pick(&mut rng);
        while let Some(done) = requests.try_join_next() {
            tally.record(&done.map_err(|e| LoadtestError::Task(e.to_string()))?);
        }
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            dropped += 1;
            continue;
        };
        let (client, url, live) = (
            ctx.client.clone(),
            template_url(ctx.target(k as usize), id),
            ctx.live.clone(),
        );
        requests.spawn(async move {
            let mut sample = client::get(&client, &url, id).await;
            drop(slot);
            sample.latency = intended.elapsed();
            live.count(&sample);
            sample
        });
    }
    while let Some(done) = requests.join_next().await {
        tally.record(&done.map_err(|e| LoadtestError::Task(e.to_string()))?);
    }
    let elapsed = started.elapsed();
    let deltas = ctx.deltas_since(&before, tally.responses).await?;
    let outcome = RateOutcome {
        target_rps: per_second,
        scheduled,
        sent: scheduled - dropped,
        dropped,
        max_in_flight,
    };
    Ok((RunResult::new(tally, deltas, elapsed, elapsed), outcome))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_k_is_due_at_k_over_the_rate() {
        let s = Schedule::new(1000);
        assert_eq!(s.due(0), Duration::ZERO);
        assert_eq!(s.due(1), Duration::from_millis(1));
        assert_eq!(s.due(1500), Duration::from_millis(1500));
    }

    #[test]
    fn a_period_that_is_not_whole_nanoseconds_does_not_drift() {
        // 3/s: a period of 333,333,333.3 ns. Adding it up would lose 1 ns a request;
        // computing from k lands on whole seconds exactly.
        let s = Schedule::new(3);
        assert_eq!(s.due(1), Duration::from_nanos(333_333_333));
        assert_eq!(s.due(3), Duration::from_secs(1));
        assert_eq!(s.due(3 * 3600), Duration::from_secs(3600));
        assert!(s.due(2) < s.due(3));
    }

    #[test]
    fn the_count_within_a_duration_is_every_request_due_before_it_ends() {
        let s = Schedule::new(1000);
        assert_eq!(s.count_within(Duration::from_secs(2)), 2000);
        assert_eq!(
            s.count_within(Duration::from_micros(2500)),
            3,
            "at 0, 1 and 2 ms"
        );
        assert_eq!(Schedule::new(3).count_within(Duration::from_secs(1)), 3);
        assert_eq!(
            Schedule::new(3).count_within(Duration::from_millis(1001)),
            4
        );
        assert_eq!(s.count_within(Duration::ZERO), 0);
        for (rate, within) in [(7, 1234), (1000, 999), (333, 10_000)] {
            let s = Schedule::new(rate);
            let n = s.count_within(Duration::from_millis(within));
            assert!(
                s.due(n - 1) < Duration::from_millis(within),
                "{rate}/s {within} ms"
            );
            assert!(
                s.due(n) >= Duration::from_millis(within),
                "{rate}/s {within} ms"
            );
        }
    }
}
