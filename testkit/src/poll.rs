//! Waiting for a condition with a bound, rather than sleeping "long enough".
//!
//! A test that sleeps a fixed time is slow when the machine is idle and flaky when it is loaded
//! (CI shares two cores between builds). [`until`] probes again and again until the condition
//! holds, and gives up at a limit generous enough for a loaded machine; it returns what it saw
//! last, so the caller's assertion can say what the state was when it gave up.

use std::future::Future;
use std::time::{Duration, Instant};

/// What [`until`] saw.
#[derive(Debug, Clone, PartialEq)]
pub struct Polled<T> {
    /// The last value probed: the first one that satisfied the condition, or the one at the limit.
    pub last: T,
    /// Whether `last` satisfied the condition (`false`: the limit passed first).
    pub done: bool,
    /// From the start to the last probe's answer.
    pub took: Duration,
}

/// Awaits `probe()` every `every` until `done` holds for its value or `limit` has passed since
/// the start. Probes at least once; never sleeps after the last probe.
pub async fn until<T, F, Fut>(
    limit: Duration,
    every: Duration,
    mut probe: F,
    done: impl Fn(&T) -> bool,
) -> Polled<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = T>,
{
    let started = Instant::now();
    loop {
        let last = probe().await;
        let took = started.elapsed();
        let done = done(&last);
        if done || took >= limit {
            return Polled { last, done, took };
        }
        tokio::time::sleep(every).await;
    }
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;

    use super::*;

    /// A probe that answers how many times it has been called.
    async fn count(probes: &Cell<u32>) -> u32 {
        probes.set(probes.get() + 1);
        probes.get()
    }

    #[tokio::test]
    async fn stops_at_the_first_value_that_satisfies_the_condition() {
        let probes = Cell::new(0);
        let polled = until(
            Duration::from_secs(10),
            Duration::from_millis(1),
            || count(&probes),
            |n| *n >= 3,
        )
        .await;
        assert_eq!(polled.last, 3);
        assert!(polled.done);
        assert_eq!(probes.get(), 3, "no probe after the condition held");
    }

    #[tokio::test]
    async fn gives_up_at_the_limit_with_the_last_value() {
        let probes = Cell::new(0);
        let polled = until(
            Duration::from_millis(50),
            Duration::from_millis(10),
            || count(&probes),
            |_| false,
        )
        .await;
        assert!(!polled.done);
        assert_eq!(polled.last, probes.get(), "the last probe's value");
        assert!(polled.took >= Duration::from_millis(50), "{polled:?}");
        assert!(polled.took < Duration::from_secs(5), "bounded: {polled:?}");
        assert!(probes.get() >= 2, "probed again before giving up");
    }
}
