//! What the client saw: one [`Sample`] per request, folded into a [`Tally`] (latency histogram,
//! status codes, `X-Cache` values, distinct ids).

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;

/// Latencies are recorded in microseconds, from 1 µs to 10 minutes, to 3 significant digits.
const HIGHEST_MICROS: u64 = 600_000_000;

/// The `X-Cache` values of the API, counted in this order; anything else is counted as `other`.
pub const X_CACHE_VALUES: [&str; 4] = ["HIT", "MISS", "SHARED", "STALE"];

/// How one request ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// A complete response (status line, headers and body were received).
    Response { status: u16, x_cache: XCache },
    /// No complete response: the connection failed or the timeout passed.
    Failed(Failure),
}

/// The `X-Cache` header of a response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum XCache {
    Known(&'static str),
    Other,
    Absent,
}

impl XCache {
    pub fn from_header(value: Option<&[u8]>) -> XCache {
        match value {
            None => XCache::Absent,
            Some(v) => X_CACHE_VALUES
                .iter()
                .find(|known| known.as_bytes() == v)
                .map_or(XCache::Other, |known| XCache::Known(known)),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    Timeout,
    Connect,
    Other,
}

impl Failure {
    fn label(self) -> &'static str {
        match self {
            Failure::Timeout => "timeout",
            Failure::Connect => "connect error",
            Failure::Other => "transport error",
        }
    }
}

#[derive(Debug, Clone)]
pub struct Sample {
    pub id: i64,
    pub latency: Duration,
    pub outcome: Outcome,
}

/// Counts of everything the client saw.
#[derive(Debug, Clone)]
pub struct Tally {
    /// Latency of complete responses, in microseconds.
    latency: Histogram<u64>,
    pub responses: u64,
    pub failures: u64,
    /// By status code ("200"), and by failure ("timeout", "connect error", ...).
    pub status: BTreeMap<String, u64>,
    /// By `X-Cache` value, every known value present (0 if unseen), plus `other` and `none`
    /// (no header: errors carry none) when seen.
    pub x_cache: BTreeMap<&'static str, u64>,
    pub ids: HashSet<i64>,
}

/// Latency percentiles of complete responses, in milliseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Latency {
    pub p50: f64,
    pub p95: f64,
    pub p99: f64,
    pub max: f64,
    pub mean: f64,
}

impl Default for Tally {
    fn default() -> Self {
        Tally::new()
    }
}

impl Tally {
    pub fn new() -> Tally {
        Tally {
            latency: Histogram::new_with_bounds(1, HIGHEST_MICROS, 3)
                .expect("1 µs ..= 10 min at 3 significant digits is a valid histogram range"),
            responses: 0,
            failures: 0,
            status: BTreeMap::new(),
            x_cache: X_CACHE_VALUES.iter().map(|v| (*v, 0)).collect(),
            ids: HashSet::new(),
        }
    }

    pub fn record(&mut self, sample: &Sample) {
        self.ids.insert(sample.id);
        match &sample.outcome {
            Outcome::Response { status, x_cache } => {
                self.responses += 1;
                self.latency
                    .saturating_record((sample.latency.as_micros() as u64).max(1));
                *self.status.entry(status.to_string()).or_default() += 1;
                let key = match x_cache {
                    XCache::Known(v) => v,
                    XCache::Other => "other",
                    XCache::Absent => "none",
                };
                *self.x_cache.entry(key).or_default() += 1;
            }
            Outcome::Failed(failure) => {
                self.failures += 1;
                *self.status.entry(failure.label().to_owned()).or_default() += 1;
            }
        }
    }

    pub fn merge(&mut self, other: &Tally) {
        // Both histograms have the same bounds, so adding cannot fail.
        let _ = self.latency.add(&other.latency);
        self.responses += other.responses;
        self.failures += other.failures;
        for (k, v) in &other.status {
            *self.status.entry(k.clone()).or_default() += v;
        }
        for (k, v) in &other.x_cache {
            *self.x_cache.entry(k).or_default() += v;
        }
        self.ids.extend(&other.ids);
    }

    pub fn requests(&self) -> u64 {
        self.responses + self.failures
    }

    pub fn x_cache(&self, value: &str) -> u64 {
        self.x_cache.get(value).copied().unwrap_or(0)
    }

    pub fn latency(&self) -> Latency {
        if self.latency.is_empty() {
            return Latency::default();
        }
        let ms = |micros: u64| micros as f64 / 1000.0;
        Latency {
            p50: ms(self.latency.value_at_quantile(0.50)),
            p95: ms(self.latency.value_at_quantile(0.95)),
            p99: ms(self.latency.value_at_quantile(0.99)),
            max: ms(self.latency.max()),
            mean: self.latency.mean() / 1000.0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn response(id: i64, ms: u64, status: u16, x: Option<&[u8]>) -> Sample {
        Sample {
            id,
            latency: Duration::from_millis(ms),
            outcome: Outcome::Response {
                status,
                x_cache: XCache::from_header(x),
            },
        }
    }

    #[test]
    fn counts_statuses_headers_ids_and_failures() {
        let mut t = Tally::new();
        for ms in 1..=100 {
            t.record(&response(ms as i64 % 10, ms, 200, Some(b"HIT")));
        }
        t.record(&response(1, 5, 200, Some(b"SHARED")));
        t.record(&response(1, 5, 503, None));
        t.record(&response(1, 5, 200, Some(b"weird")));
        t.record(&Sample {
            id: 2,
            latency: Duration::from_secs(10),
            outcome: Outcome::Failed(Failure::Timeout),
        });
        assert_eq!((t.responses, t.failures, t.requests()), (103, 1, 104));
        assert_eq!(t.status["200"], 102);
        assert_eq!(t.status["503"], 1);
        assert_eq!(t.status["timeout"], 1);
        assert_eq!((t.x_cache("HIT"), t.x_cache("SHARED")), (100, 1));
        assert_eq!((t.x_cache("MISS"), t.x_cache("STALE")), (0, 0));
        assert_eq!((t.x_cache("none"), t.x_cache("other")), (1, 1));
        assert_eq!(t.ids.len(), 10);
        let l = t.latency();
        assert!(l.p50 >= 40.0 && l.p50 <= 60.0, "{l:?}");
        assert!(l.p99 >= 95.0 && l.max >= 99.9 && l.max <= 100.1, "{l:?}");
    }

    #[test]
    fn merging_adds_up() {
        let mut a = Tally::new();
        a.record(&response(1, 1, 200, Some(b"MISS")));
        let mut b = Tally::new();
        b.record(&response(2, 3, 200, Some(b"HIT")));
        a.merge(&b);
        assert_eq!(a.responses, 2);
        assert_eq!((a.x_cache("MISS"), a.x_cache("HIT")), (1, 1));
        assert_eq!(a.ids.len(), 2);
        assert!((a.latency().max - 3.0).abs() < 0.01);
    }
}
