//! The run second by second, for the live view and `--report`: every answer is counted in the
//! second (since the load started) in which it arrived, and the service's `db_hits_total` is
//! scraped once a second.
//!
//! A second's latency percentiles are computed when the first answer of a later second arrives
//! (or the run ends), so only the second in progress holds a histogram: a long run keeps a few
//! numbers per second, not a histogram per second.

use std::collections::BTreeMap;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;

use crate::tally::{Outcome, Sample, XCache, X_CACHE_VALUES};

/// One second of the run.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Second {
    /// Answers (complete responses) that arrived in this second.
    pub responses: u64,
    /// Requests that ended without a complete response in this second.
    pub failures: u64,
    /// Latency of this second's responses, in milliseconds (0 when there were none).
    pub p50_ms: f64,
    pub p99_ms: f64,
    /// This second's responses by `X-Cache` value (`other`, `none` as in the tally).
    pub x_cache: BTreeMap<&'static str, u64>,
}

/// Latencies from 1 µs to 10 minutes, to 3 significant digits, as in the tally.
fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 600_000_000, 3)
        .expect("1 µs ..= 10 min at 3 significant digits is a valid histogram range")
}

fn ms(h: &Histogram<u64>, q: f64) -> f64 {
    if h.is_empty() {
        0.0
    } else {
        h.value_at_quantile(q) as f64 / 1000.0
    }
}

/// Per-second counts, and the totals so far (for the live view).
#[derive(Debug)]
pub struct Timeline {
    seconds: Vec<Second>,
    /// Latencies of the second `seconds.len() - 1` (the one in progress).
    current: Histogram<u64>,
    /// Every latency so far: the live view's p99.
    overall: Histogram<u64>,
    pub responses: u64,
    pub failures: u64,
}

impl Default for Timeline {
    fn default() -> Self {
        Timeline {
            seconds: Vec::new(),
            current: histogram(),
            overall: histogram(),
            responses: 0,
            failures: 0,
        }
    }
}

impl Timeline {
    /// Counts `sample`, which ended `at` after the load started. Times only move forward (the
    /// caller reads the clock while holding the timeline); one from an earlier second than the
    /// one in progress is counted in the one in progress.
    pub fn record(&mut self, at: Duration, sample: &Sample) {
        let second = at.as_secs() as usize;
        if second >= self.seconds.len() {
            self.close_current();
            self.seconds.resize_with(second + 1, Second::default);
        }
        let Some(bucket) = self.seconds.last_mut() else {
            return;
        };
        match &sample.outcome {
            Outcome::Response { x_cache, .. } => {
                self.responses += 1;
                bucket.responses += 1;
                let micros = (sample.latency.as_micros() as u64).max(1);
                self.current.saturating_record(micros);
                self.overall.saturating_record(micros);
                let key = match x_cache {
                    XCache::Known(v) => v,
                    XCache::Other => "other",
                    XCache::Absent => "none",
                };
                *bucket.x_cache.entry(key).or_default() += 1;
            }
            Outcome::Failed(_) => {
                self.failures += 1;
                bucket.failures += 1;
            }
        }
    }

    /// Fixes the percentiles of the second in progress and empties its histogram.
    fn close_current(&mut self) {
        if let Some(bucket) = self.seconds.last_mut() {
            bucket.p50_ms = ms(&self.current, 0.50);
            bucket.p99_ms = ms(&self.current, 0.99);
            for known in X_CACHE_VALUES {
                bucket.x_cache.entry(known).or_default();
            }
        }
        self.current.reset();
    }

    /// The 99th percentile of every response so far, in milliseconds.
    pub fn p99_ms(&self) -> f64 {
        ms(&self.overall, 0.99)
    }

    /// Every second up to `until` (seconds without an answer included, as zeros).
    pub fn finish(mut self, until: Duration) -> Vec<Second> {
        self.close_current();
        let seconds = until.as_secs_f64().ceil() as usize;
        if self.seconds.len() < seconds {
            self.seconds.resize_with(seconds, || Second {
                x_cache: X_CACHE_VALUES.iter().map(|v| (*v, 0)).collect(),
                ..Second::default()
            });
        }
        self.seconds
    }
}

/// `db_hits_total` of every replica read, scraped about once a second during the run.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct DbScrapes {
    /// The replicas' base URLs, in the order of each scrape's values.
    pub replicas: Vec<String>,
    /// Seconds since the load started, and each replica's `db_hits_total` then.
    pub scrapes: Vec<(f64, Vec<f64>)>,
}

impl DbScrapes {
    /// Each replica's DB queries per second between consecutive scrapes, at the time of the
    /// later one. A counter that went down (a restart) gives no point for that interval.
    pub fn rates(&self) -> Vec<Vec<(f64, f64)>> {
        let mut rates = vec![Vec::new(); self.replicas.len()];
        for pair in self.scrapes.windows(2) {
            let ((t0, before), (t1, after)) = (&pair[0], &pair[1]);
            let span = t1 - t0;
            if span <= 0.0 {
                continue;
            }
            for (r, (a, b)) in before.iter().zip(after).enumerate() {
                if b >= a {
                    if let Some(series) = rates.get_mut(r) {
                        series.push((*t1, (b - a) / span));
                    }
                }
            }
        }
        rates
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tally::Failure;

    fn answer(ms: u64, x: &'static str) -> Sample {
        Sample {
            id: 1,
            latency: Duration::from_millis(ms),
            outcome: Outcome::Response {
                status: 200,
                x_cache: XCache::Known(x),
            },
        }
    }

    #[test]
    fn answers_are_counted_in_the_second_they_arrived() {
        let mut t = Timeline::default();
        for i in 0..100 {
            t.record(Duration::from_millis(10 * i), &answer(i + 1, "HIT"));
        }
        t.record(Duration::from_millis(1500), &answer(40, "MISS"));
        t.record(
            Duration::from_millis(3200),
            &Sample {
                id: 2,
                latency: Duration::from_secs(1),
                outcome: Outcome::Failed(Failure::Timeout),
            },
        );
        assert_eq!((t.responses, t.failures), (101, 1));
        let seconds = t.finish(Duration::from_millis(4100));
        assert_eq!(seconds.len(), 5, "seconds 0..=4, the empty ones too");
        assert_eq!(seconds[0].responses, 100);
        assert!((seconds[0].p50_ms - 50.0).abs() < 0.1, "{:?}", seconds[0]);
        assert!((seconds[0].p99_ms - 99.0).abs() < 0.1, "{:?}", seconds[0]);
        assert_eq!(seconds[0].x_cache["HIT"], 100);
        assert_eq!(seconds[0].x_cache["MISS"], 0);
        assert_eq!((seconds[1].responses, seconds[1].x_cache["MISS"]), (1, 1));
        assert!((seconds[1].p99_ms - 40.0).abs() < 0.1);
        assert_eq!(
            seconds[2],
            Second {
                x_cache: seconds[2].x_cache.clone(),
                ..Default::default()
            }
        );
        assert_eq!((seconds[3].responses, seconds[3].failures), (0, 1));
        assert_eq!(seconds[4].responses, 0);
    }

    #[test]
    fn db_rates_are_per_replica_and_skip_restarts() {
        let scrapes = DbScrapes {
            replicas: vec!["a".into(), "b".into()],
            scrapes: vec![
                (0.0, vec![10.0, 100.0]),
                (1.0, vec![15.0, 100.0]),
                (3.0, vec![25.0, 2.0]),
            ],
        };
        let rates = scrapes.rates();
        assert_eq!(rates[0], [(1.0, 5.0), (3.0, 5.0)]);
        assert_eq!(rates[1], [(1.0, 0.0)], "b restarted between 1 s and 3 s");
    }
}
