//! `--threshold EXPR`: a pass/fail condition on the run's figures, as k6's thresholds are.
//! `p99<20ms`, `failed==0`, `hit_rate>0.95`: a metric, an operator and a value. Every threshold
//! is reported as passed or failed, and the process exits with [`EXIT_FAILED`] when any failed,
//! so a CI job can gate on a load test.

use std::fmt;

use serde::Serialize;

/// The exit code of a run whose report was printed but a threshold failed.
pub const EXIT_FAILED: u8 = 3;

/// What a threshold can be about, and where each figure comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Metric {
    /// Latency percentiles and their mean, of complete responses (milliseconds).
    P50,
    P95,
    P99,
    Max,
    Mean,
    /// Responses per second of the time with requests in the air.
    Rps,
    /// Requests sent.
    Requests,
    /// Requests without a complete response, plus responses with a 5xx status.
    Failed,
    /// `--rate`: requests not sent because the in-flight limit was reached.
    Dropped,
    /// The service's cache hit rate over the run (0..=1).
    HitRate,
    /// The service's `db_hits_total` over the run.
    DbQueries,
    /// The service's `singleflight_shared_total` over the run.
    Shared,
}

const METRICS: [(&str, Metric); 12] = [
    ("p50", Metric::P50),
    ("p95", Metric::P95),
    ("p99", Metric::P99),
    ("max", Metric::Max),
    ("mean", Metric::Mean),
    ("rps", Metric::Rps),
    ("requests", Metric::Requests),
    ("failed", Metric::Failed),
    ("dropped", Metric::Dropped),
    ("hit_rate", Metric::HitRate),
    ("db_queries", Metric::DbQueries),
    ("shared", Metric::Shared),
];

impl Metric {
    fn is_latency(self) -> bool {
        matches!(
            self,
            Metric::P50 | Metric::P95 | Metric::P99 | Metric::Max | Metric::Mean
        )
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Lt,
    Le,
    Gt,
    Ge,
    Eq,
    Ne,
}

impl Op {
    /// Longest first, so that `<=` is not read as `<` followed by `=...`.
    const ALL: [(&'static str, Op); 6] = [
        ("<=", Op::Le),
        (">=", Op::Ge),
        ("==", Op::Eq),
        ("!=", Op::Ne),
        ("<", Op::Lt),
        (">", Op::Gt),
    ];

    fn holds(self, actual: f64, limit: f64) -> bool {
        match self {
            Op::Lt => actual < limit,
            Op::Le => actual <= limit,
            Op::Gt => actual > limit,
            Op::Ge => actual >= limit,
            Op::Eq => actual == limit,
            Op::Ne => actual != limit,
        }
    }
}

/// One parsed `--threshold`. Latency values are held in milliseconds.
#[derive(Debug, Clone, PartialEq)]
pub struct Threshold {
    /// As given, for the report.
    pub expr: String,
    pub metric: Metric,
    pub op: Op,
    pub value: f64,
}

/// What the help and every parse error say is accepted.
pub const ACCEPTED: &str = "expected METRIC OP VALUE, e.g. p99<20ms, p50<=5ms, failed==0, \
    hit_rate>0.95, db_queries<=100, rps>=1000; metrics: p50 p95 p99 max mean (a duration such as \
    20ms or 1s, or a number of milliseconds), rps, requests, failed, dropped, hit_rate (0..1 or \
    a percentage), db_queries, shared; operators: < <= > >= == !=";

impl Threshold {
    /// Parses `METRIC OP VALUE` (spaces allowed around each part).
    pub fn parse(raw: &str) -> Result<Threshold, String> {
        let bad = |why: String| format!("threshold {raw:?}: {why}; {ACCEPTED}");
        let at = raw
            .find(['<', '>', '=', '!'])
            .ok_or_else(|| bad("no operator".to_owned()))?;
        let (name, rest) = raw.split_at(at);
        let (symbol, op) = Op::ALL
            .iter()
            .find(|(symbol, _)| rest.starts_with(symbol))
            .copied()
            .ok_or_else(|| bad(format!("unknown operator in {rest:?}")))?;
        let name = name.trim();
        let metric = METRICS
            .iter()
            .find(|(known, _)| *known == name)
            .map(|(_, m)| *m)
            .ok_or_else(|| bad(format!("unknown metric {name:?}")))?;
        let text = rest[symbol.len()..].trim();
        if text.is_empty() {
            return Err(bad("no value".to_owned()));
        }
        if text.starts_with(['<', '>', '=', '!']) {
            return Err(bad(format!("unknown operator in {rest:?}")));
        }
        let value = if metric.is_latency() {
            match text.parse::<f64>() {
                Ok(ms) => ms,
                Err(_) => humantime::parse_duration(text)
                    .map(|d| d.as_secs_f64() * 1000.0)
                    .map_err(|e| bad(format!("{text:?} is not a duration ({e})")))?,
            }
        } else if let (Metric::HitRate, Some(percent)) = (metric, text.strip_suffix('%')) {
            percent
                .trim()
                .parse::<f64>()
                .map(|p| p / 100.0)
                .map_err(|_| bad(format!("{text:?} is not a percentage")))?
        } else {
            text.parse::<f64>()
                .map_err(|_| bad(format!("{text:?} is not a number")))?
        };
        if !value.is_finite() {
            return Err(bad(format!("{text:?} is not a finite number")));
        }
        Ok(Threshold {
            expr: raw.trim().to_owned(),
            metric,
            op,
            value,
        })
    }

    /// Checks the threshold against the run's `figures`. A figure the run does not have (no
    /// lookups, so no hit rate) fails the threshold: nothing was shown to hold.
    pub fn check(&self, figures: &Figures) -> Verdict {
        let actual = figures.get(self.metric);
        Verdict {
            threshold: self.expr.clone(),
            actual,
            passed: actual.is_some_and(|a| self.op.holds(a, self.value)),
        }
    }
}

impl fmt::Display for Threshold {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.expr)
    }
}

/// The figures a threshold can be about, taken from the report.
#[derive(Debug, Clone, Copy, Default)]
pub struct Figures {
    pub p50: f64,
    pub p95: f64,
    pub p99: f64,
    pub max: f64,
    pub mean: f64,
    pub rps: f64,
    pub requests: u64,
    pub failed: u64,
    pub dropped: u64,
    pub hit_rate: Option<f64>,
    pub db_queries: u64,
    pub shared: u64,
}

impl Figures {
    fn get(&self, metric: Metric) -> Option<f64> {
        Some(match metric {
            Metric::P50 => self.p50,
            Metric::P95 => self.p95,
            Metric::P99 => self.p99,
            Metric::Max => self.max,
            Metric::Mean => self.mean,
            Metric::Rps => self.rps,
            Metric::Requests => self.requests as f64,
            Metric::Failed => self.failed as f64,
            Metric::Dropped => self.dropped as f64,
            Metric::HitRate => return self.hit_rate,
            Metric::DbQueries => self.db_queries as f64,
            Metric::Shared => self.shared as f64,
        })
    }
}

/// A threshold's outcome, as the report shows it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Verdict {
    pub threshold: String,
    /// The run's figure (milliseconds for latencies); `null` when the run has none.
    pub actual: Option<f64>,
    pub passed: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parsed(raw: &str) -> (Metric, Op, f64) {
        let t = Threshold::parse(raw).unwrap_or_else(|e| panic!("{raw}: {e}"));
        (t.metric, t.op, t.value)
    }

    #[test]
    fn every_operator_and_unit_parses() {
        assert_eq!(parsed("p99<20ms"), (Metric::P99, Op::Lt, 20.0));
        assert_eq!(parsed("p50<=5ms"), (Metric::P50, Op::Le, 5.0));
        assert_eq!(parsed("max < 1s"), (Metric::Max, Op::Lt, 1000.0));
        assert_eq!(parsed("p95<=500us"), (Metric::P95, Op::Le, 0.5));
        assert_eq!(parsed("mean<2.5"), (Metric::Mean, Op::Lt, 2.5), "plain ms");
        assert_eq!(parsed("failed==0"), (Metric::Failed, Op::Eq, 0.0));
        assert_eq!(parsed("hit_rate>0.95"), (Metric::HitRate, Op::Gt, 0.95));
        assert_eq!(parsed("hit_rate>=95%"), (Metric::HitRate, Op::Ge, 0.95));
        assert_eq!(
            parsed("db_queries<=100"),
            (Metric::DbQueries, Op::Le, 100.0)
        );
        assert_eq!(parsed("rps>=1000"), (Metric::Rps, Op::Ge, 1000.0));
        assert_eq!(parsed("dropped!=3"), (Metric::Dropped, Op::Ne, 3.0));
    }

    #[test]
    fn bad_expressions_name_themselves_and_what_is_accepted() {
        for (raw, why) in [
            ("p99", "no operator"),
            ("p99=<5ms", "unknown operator"),
            ("p99<<5ms", "unknown operator in \"<<5ms\""),
            ("p42<5ms", "unknown metric \"p42\""),
            ("p99<", "no value"),
            ("p99<fast", "\"fast\" is not a duration"),
            ("failed==none", "\"none\" is not a number"),
            ("hit_rate>lots%", "is not a percentage"),
            ("rps>inf", "not a finite number"),
        ] {
            let e = Threshold::parse(raw).expect_err(raw);
            assert!(e.contains(&format!("threshold {raw:?}")), "{e}");
            assert!(e.contains(why), "{raw}: {e}");
            assert!(e.contains("operators: < <= > >= == !="), "{e}");
        }
    }

    #[test]
    fn checks_compare_the_figure_with_the_value() {
        let figures = Figures {
            p99: 12.0,
            failed: 0,
            hit_rate: Some(0.97),
            db_queries: 120,
            ..Figures::default()
        };
        let passes = |raw: &str| Threshold::parse(raw).expect("valid").check(&figures).passed;
        assert!(passes("p99<20ms"));
        assert!(!passes("p99<10ms"));
        assert!(passes("p99<=12"));
        assert!(passes("failed==0"));
        assert!(!passes("failed!=0"));
        assert!(passes("hit_rate>0.95"));
        assert!(!passes("db_queries<=100"));
        let v = Threshold::parse("db_queries<=100")
            .expect("valid")
            .check(&figures);
        assert_eq!(v.actual, Some(120.0));

        // No lookups, no hit rate: the threshold cannot be shown to hold.
        let none = Figures::default();
        let v = Threshold::parse("hit_rate>0.5")
            .expect("valid")
            .check(&none);
        assert_eq!((v.actual, v.passed), (None, false));
    }
}
