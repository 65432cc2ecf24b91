//! Reading the service's counters from `/metrics` (Prometheus text format).
//!
//! The report's service figures are differences between two [`Snapshot`]s, so they are exactly
//! what the service counted, including any traffic that was not ours. A fleet is read as one
//! [`FleetSnapshot`] (one scrape per replica); its [`FleetDeltas`] are each replica's change and
//! their sum, which is what the seed's table shows.

use promtext::sum;
use serde::Serialize;

use crate::LoadtestError;

/// The counters the report needs, each summed over all its label sets.
pub const COUNTERS: [&str; 5] = [
    "http_request_total",
    "cache_hits_total",
    "cache_misses_total",
    "db_hits_total",
    "singleflight_shared_total",
];

/// `http_request_total` has labels (endpoint, method, status) and no series at all until the
/// service has answered its first request, so a fresh service may lack it before the run.
const APPEARS_WITH_FIRST_REQUEST: &str = "http_request_total";

/// The five counters at one moment.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Snapshot([f64; 5]);

/// The change of the five counters over a run: what the service itself counted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Deltas {
    pub http_request_total: u64,
    pub cache_hits_total: u64,
    pub cache_misses_total: u64,
    pub db_hits_total: u64,
    pub singleflight_shared_total: u64,
}

impl Deltas {
    /// `hits / (hits + misses)`, or `None` when no request reached a key owner.
    pub fn cache_hit_rate(&self) -> Option<f64> {
        let lookups = self.cache_hits_total + self.cache_misses_total;
        (lookups > 0).then(|| self.cache_hits_total as f64 / lookups as f64)
    }

    /// PostgreSQL queries per HTTP request served, or `None` when none was served.
    pub fn db_queries_per_request(&self) -> Option<f64> {
        (self.http_request_total > 0)
            .then(|| self.db_hits_total as f64 / self.http_request_total as f64)
    }
}

impl std::ops::AddAssign for Deltas {
    fn add_assign(&mut self, o: Deltas) {
        self.http_request_total += o.http_request_total;
        self.cache_hits_total += o.cache_hits_total;
        self.cache_misses_total += o.cache_misses_total;
        self.db_hits_total += o.db_hits_total;
        self.singleflight_shared_total += o.singleflight_shared_total;
    }
}

impl Snapshot {
    /// Reads the counters from a scrape. `before_run` tolerates a missing `http_request_total`
    /// (a service that has not served a request yet has no series for it); any other missing
    /// counter is an error naming it.
    pub fn parse(text: &str, base: &str, before_run: bool) -> Result<Snapshot, LoadtestError> {
        let mut values = [0.0; 5];
        let mut missing = Vec::new();
        for (slot, name) in values.iter_mut().zip(COUNTERS) {
            match sum(text, name) {
                Some(v) => *slot = v,
                None if before_run && name == APPEARS_WITH_FIRST_REQUEST => *slot = 0.0,
                None => missing.push(name),
            }
        }
        if !missing.is_empty() {
            return Err(LoadtestError::MissingMetrics {
                url: format!("{base}/metrics"),
                names: missing.join(", "),
            });
        }
        Ok(Snapshot(values))
    }

    /// `db_hits_total` at this moment: the queries the replica has made since it started.
    pub fn db_hits(&self) -> f64 {
        self.0[3]
    }

    /// `later - self`, counter by counter, for the replica at `base`. A counter that went down
    /// means the replica restarted between the scrapes (or `base` is a load balancer that sent
    /// them to different replicas), and the difference would be meaningless.
    pub fn until(&self, later: &Snapshot, base: &str) -> Result<Deltas, LoadtestError> {
        let mut d = [0u64; 5];
        for (i, name) in COUNTERS.iter().enumerate() {
            let (a, b) = (self.0[i], later.0[i]);
            if b < a {
                return Err(LoadtestError::CounterWentDown {
                    url: format!("{base}/metrics"),
                    name,
                    before: a,
                    after: b,
                });
            }
            d[i] = (b - a).round() as u64;
        }
        Ok(Deltas {
            http_request_total: d[0],
            cache_hits_total: d[1],
            cache_misses_total: d[2],
            db_hits_total: d[3],
            singleflight_shared_total: d[4],
        })
    }
}

/// One scrape of every replica whose `/metrics` the report counts, in the order given.
#[derive(Debug, Clone, PartialEq)]
pub struct FleetSnapshot(pub Vec<(String, Snapshot)>);

/// A replica's own change over the run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ReplicaDeltas {
    /// The replica's base URL (its counters are at `{url}/metrics`).
    pub url: String,
    pub metrics: Deltas,
}

/// The change over the run of every replica, and their sum.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FleetDeltas {
    /// The sum over `replicas`: what the whole fleet counted.
    pub total: Deltas,
    pub replicas: Vec<ReplicaDeltas>,
}

impl FleetSnapshot {
    /// `later - self`, replica by replica, and the sum. Both must be scrapes of the same replicas.
    pub fn until(&self, later: &FleetSnapshot) -> Result<FleetDeltas, LoadtestError> {
        let mut fleet = FleetDeltas::default();
        for ((url, before), (later_url, after)) in self.0.iter().zip(&later.0) {
            debug_assert_eq!(url, later_url, "scrapes of the same replicas, in one order");
            let metrics = before.until(after, url)?;
            fleet.total += metrics;
            fleet.replicas.push(ReplicaDeltas {
                url: url.clone(),
                metrics,
            });
        }
        Ok(fleet)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // How label sets, timestamps and look-alike names are read is promtext's to test; here, only
    // what the report makes of the counters.
    const SCRAPE: &str = r#"# TYPE http_request_total counter
http_request_total{endpoint="/template-details",method="GET",status="200"} 7300
http_request_total{endpoint="/template-details",method="GET",status="503"} 2
cache_hits_total 7000
cache_misses_total 302
db_hits_total 220
singleflight_shared_total 18
"#;

    #[test]
    fn a_missing_counter_is_named() {
        let text = SCRAPE.replace("db_hits_total 220\n", "");
        match Snapshot::parse(&text, "http://x", false) {
            Err(LoadtestError::MissingMetrics { names, .. }) => assert_eq!(names, "db_hits_total"),
            other => panic!("expected a missing-metric error, got {other:?}"),
        }
    }

    #[test]
    fn http_request_total_may_be_absent_only_before_the_run() {
        let fresh: String = SCRAPE
            .lines()
            .filter(|l| !l.contains("http_request_total{"))
            .map(|l| format!("{l}\n"))
            .collect();
        let before = Snapshot::parse(&fresh, "http://x", true).expect("tolerated before");
        assert!(Snapshot::parse(&fresh, "http://x", false).is_err());
        let after = Snapshot::parse(SCRAPE, "http://x", false).expect("complete");
        let d = before
            .until(&after, "http://x")
            .expect("counters only grow");
        assert_eq!(d.http_request_total, 7302);
        assert_eq!(d.db_hits_total, 0);
        match after.until(&before, "http://x") {
            Err(e @ LoadtestError::CounterWentDown { .. }) => {
                let e = e.to_string();
                assert!(e.contains("http://x/metrics"), "the replica is named: {e}");
            }
            other => panic!("a counter going down is an error, got {other:?}"),
        }
    }

    #[test]
    fn rates_are_undefined_without_traffic() {
        let d = Deltas::default();
        assert_eq!(d.cache_hit_rate(), None);
        assert_eq!(d.db_queries_per_request(), None);
        let d = Deltas {
            http_request_total: 100,
            cache_hits_total: 97,
            cache_misses_total: 3,
            db_hits_total: 3,
            singleflight_shared_total: 0,
        };
        assert_eq!(d.cache_hit_rate(), Some(0.97));
        assert_eq!(d.db_queries_per_request(), Some(0.03));
    }

    #[test]
    fn a_fleet_counts_the_sum_of_its_replicas() {
        let scrape = |hits: u32, db: u32| {
            SCRAPE
                .replace("cache_hits_total 7000", &format!("cache_hits_total {hits}"))
                .replace("db_hits_total 220", &format!("db_hits_total {db}"))
        };
        let snap = |hits, db| Snapshot::parse(&scrape(hits, db), "-", false).expect("complete");
        let before = FleetSnapshot(vec![("A".into(), snap(10, 1)), ("B".into(), snap(500, 7))]);
        let after = FleetSnapshot(vec![("A".into(), snap(25, 2)), ("B".into(), snap(600, 7))]);
        let d = before.until(&after).expect("counters only grow");
        assert_eq!(d.total.cache_hits_total, 15 + 100);
        assert_eq!(d.total.db_hits_total, 1);
        let per: Vec<(&str, u64)> = d
            .replicas
            .iter()
            .map(|r| (r.url.as_str(), r.metrics.cache_hits_total))
            .collect();
        assert_eq!(per, [("A", 15), ("B", 100)]);

        // One replica that restarted spoils the run, and is named.
        let restarted = FleetSnapshot(vec![("A".into(), snap(25, 2)), ("B".into(), snap(5, 0))]);
        match before.until(&restarted) {
            Err(LoadtestError::CounterWentDown { url, .. }) => assert_eq!(url, "B/metrics"),
            other => panic!("expected B's counter going down, got {other:?}"),
        }
    }
}
