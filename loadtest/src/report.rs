//! The report: the seed's table (from the service's counters, summed over every replica read),
//! then what the client measured, as text or as one JSON object.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::Serialize;
use serde_json::json;

use crate::cli::{IdDist, Kind, Plan};
use crate::prom::{Deltas, ReplicaDeltas};
use crate::rate::RateOutcome;
use crate::run::RunResult;
use crate::tally::Latency;
use crate::threshold::{Figures, Verdict};
use crate::timeline::{DbScrapes, Second};

#[derive(Debug, Serialize)]
pub struct Report {
    pub scenario: &'static str,
    /// Where the requests went (round-robin when several).
    pub urls: Vec<String>,
    /// The `/metrics` whose counters `metrics` sums.
    pub metrics_from: Vec<String>,
    pub settings: serde_json::Value,
    /// The seed of the random choices; `--seed` with it repeats the run's ids.
    pub rng_seed: u64,
    /// What the service's counters moved by between the scrapes before and after the run,
    /// summed over every replica in `metrics_from`.
    pub metrics: Deltas,
    /// Each replica's own share of `metrics`, in the order of `metrics_from`.
    pub replicas: Vec<ReplicaDeltas>,
    /// `cache_hits_total / (cache_hits_total + cache_misses_total)`, from `metrics`.
    pub cache_hit_rate: Option<f64>,
    /// `db_hits_total / http_request_total`, from `metrics`.
    pub db_queries_per_request: Option<f64>,
    /// Requests the client sent (responses + failures).
    pub requests: u64,
    pub responses: u64,
    /// Requests that got no complete response (timeout, connection error).
    pub failures: u64,
    /// Wall clock from the first request to the last answer, pauses included.
    pub elapsed_seconds: f64,
    /// Time with requests in the air (seed: pauses excluded; stampede: between rounds excluded).
    pub active_seconds: f64,
    /// Responses per second of `active_seconds`.
    pub throughput_rps: f64,
    pub latency_ms: Latency,
    pub status: BTreeMap<String, u64>,
    pub x_cache: BTreeMap<&'static str, u64>,
    pub distinct_ids: u64,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub rounds: Vec<RoundReport>,
    /// `--updates`: how soon changes made in PostgreSQL during the run were served.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub update_visibility: Option<VisibilityReport>,
    pub notes: Vec<String>,
    /// `--rate`: the schedule, and the requests dropped from it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rate: Option<RateOutcome>,
    /// Every `--threshold`, passed or failed.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub thresholds: Vec<Verdict>,
    /// The run second by second, for `--report`.
    #[serde(skip)]
    pub timeline: Vec<Second>,
    /// Each replica's `db_hits_total` during the run, for `--report`.
    #[serde(skip)]
    pub db: DbScrapes,
    /// Set when the only `/metrics` read is the only `--url`'s, which may be a load balancer's.
    #[serde(skip)]
    metrics_maybe_one_of_many: bool,
}

#[derive(Debug, Serialize)]
pub struct VisibilityReport {
    pub updates: u32,
    pub seen: u32,
    /// Changes not served within the poll limit; not part of the percentiles.
    pub not_seen: u32,
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    pub max_ms: Option<f64>,
}

impl VisibilityReport {
    fn new(v: &crate::updates::Visibility) -> VisibilityReport {
        let mut ms: Vec<f64> = v.delays.iter().map(|d| d.as_secs_f64() * 1000.0).collect();
        ms.sort_by(f64::total_cmp);
        // Nearest-rank percentile over the changes seen.
        let rank = |q: f64| -> Option<f64> {
            let n = ms.len();
            (n > 0).then(|| ms[((q * n as f64).ceil() as usize).clamp(1, n) - 1])
        };
        VisibilityReport {
            updates: ms.len() as u32 + v.not_seen,
            seen: ms.len() as u32,
            not_seen: v.not_seen,
            p50_ms: rank(0.50),
            p99_ms: rank(0.99),
            max_ms: ms.last().copied(),
        }
    }
}

#[derive(Debug, Serialize)]
pub struct RoundReport {
    pub round: u32,
    pub id: i64,
    pub evicted: bool,
    /// Summed over every replica read.
    pub db_queries: u64,
    /// Each replica's DB queries this round, in the order of `metrics_from`.
    pub db_queries_by_replica: Vec<u64>,
    pub singleflight_shared: u64,
    pub responses: u64,
    pub failures: u64,
    pub x_cache: BTreeMap<&'static str, u64>,
    pub latency_ms: Latency,
}

impl Report {
    pub fn new(plan: &Plan, run: RunResult) -> Report {
        let active = run.active.as_secs_f64();
        let rounds = run
            .rounds
            .iter()
            .map(|r| RoundReport {
                round: r.round,
                id: r.id,
                evicted: r.evicted,
                db_queries: r.deltas.total.db_hits_total,
                db_queries_by_replica: r
                    .deltas
                    .replicas
                    .iter()
                    .map(|replica| replica.metrics.db_hits_total)
                    .collect(),
                singleflight_shared: r.deltas.total.singleflight_shared_total,
                responses: r.tally.responses,
                failures: r.tally.failures,
                x_cache: r.tally.x_cache.clone(),
                latency_ms: r.tally.latency(),
            })
            .collect();
        let mut report = Report {
            scenario: plan.kind.scenario().name(),
            urls: plan.targets.clone(),
            metrics_from: plan
                .metrics
                .iter()
                .map(|base| format!("{base}/metrics"))
                .collect(),
            settings: {
                let mut s = settings(&plan.kind);
                if let Some(rate) = plan.rate {
                    s["rate_rps"] = json!(rate);
                }
                s
            },
            rng_seed: plan.rng_seed,
            metrics: run.deltas.total,
            replicas: run.deltas.replicas,
            cache_hit_rate: run.deltas.total.cache_hit_rate(),
            db_queries_per_request: run.deltas.total.db_queries_per_request(),
            requests: run.tally.requests(),
            responses: run.tally.responses,
            failures: run.tally.failures,
            elapsed_seconds: run.elapsed.as_secs_f64(),
            active_seconds: active,
            throughput_rps: if active > 0.0 {
                run.tally.responses as f64 / active
            } else {
                0.0
            },
            latency_ms: run.tally.latency(),
            status: run.tally.status.clone(),
            x_cache: run.tally.x_cache.clone(),
            distinct_ids: run.tally.ids.len() as u64,
            rounds,
            update_visibility: run.visibility.as_ref().map(VisibilityReport::new),
            notes: run.notes,
            metrics_maybe_one_of_many: plan.metrics_from_targets && plan.targets.len() == 1,
            rate: run.rate,
            thresholds: Vec::new(),
            timeline: run.timeline,
            db: run.db,
        };
        let figures = report.figures();
        report.thresholds = plan.thresholds.iter().map(|t| t.check(&figures)).collect();
        report
    }

    /// The figures `--threshold` can be about.
    pub fn figures(&self) -> Figures {
        let l = &self.latency_ms;
        let server_errors: u64 = self
            .status
            .iter()
            .filter(|(code, _)| code.parse::<u16>().is_ok_and(|c| c >= 500))
            .map(|(_, n)| n)
            .sum();
        Figures {
            p50: l.p50,
            p95: l.p95,
            p99: l.p99,
            max: l.max,
            mean: l.mean,
            rps: self.throughput_rps,
            requests: self.requests,
            failed: self.failures + server_errors,
            dropped: self.rate.map_or(0, |r| r.dropped),
            hit_rate: self.cache_hit_rate,
            db_queries: self.metrics.db_hits_total,
            shared: self.metrics.singleflight_shared_total,
        }
    }

    /// Whether every `--threshold` passed (true without any).
    pub fn thresholds_passed(&self) -> bool {
        self.thresholds.iter().all(|v| v.passed)
    }

    pub fn to_json(&self) -> String {
        // A struct of numbers, strings and maps with string keys always serializes.
        serde_json::to_string_pretty(self).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
    }

    pub fn to_text(&self) -> String {
        let mut out = String::new();
        let m = &self.metrics;
        let _ = writeln!(
            out,
            "loadtest {} against {}: {}",
            self.scenario,
            self.urls.join(", "),
            describe(&self.settings, self.scenario)
        );
        let _ = writeln!(
            out,
            "  service figures from {}",
            self.metrics_from.join(", ")
        );
        if self.metrics_maybe_one_of_many {
            let _ = writeln!(
                out,
                "  (one replica's counters: if --url is a load balancer, each scrape reached whichever \
                 replica it chose; name every replica with --metrics-url to count the whole fleet)"
            );
        }
        let _ = writeln!(out);
        let _ = writeln!(
            out,
            "  The seed's table (change in the service's /metrics over the run{})",
            if self.replicas.len() > 1 {
                format!(", summed over {} replicas", self.replicas.len())
            } else {
                String::new()
            }
        );
        let _ = writeln!(out, "  | Metric               | Value");
        let _ = writeln!(out, "  |----------------------|---------");
        let _ = writeln!(
            out,
            "  | Total requests       | {}",
            thousands(m.http_request_total)
        );
        let _ = writeln!(
            out,
            "  | Cache hit rate       | {}",
            percent(self.cache_hit_rate)
        );
        let _ = writeln!(
            out,
            "  | DB queries           | {}",
            thousands(m.db_hits_total)
        );
        let _ = writeln!(
            out,
            "  | Singleflight shared  | {}",
            thousands(m.singleflight_shared_total)
        );
        let _ = writeln!(out);
        let _ = writeln!(out, "  Measured by the client");
        let _ = writeln!(
            out,
            "  requests             {} sent, {} answered, {} failed, {} distinct ids",
            thousands(self.requests),
            thousands(self.responses),
            thousands(self.failures),
            thousands(self.distinct_ids)
        );
        let _ = writeln!(
            out,
            "  time                 {:.2} s with requests in the air, {:.2} s in all",
            self.active_seconds, self.elapsed_seconds
        );
        let _ = writeln!(
            out,
            "  throughput           {} req/s",
            thousands(self.throughput_rps.round() as u64)
        );
        let l = &self.latency_ms;
        let _ = writeln!(
            out,
            "  latency              p50 {}  p95 {}  p99 {}  max {}",
            ms(l.p50),
            ms(l.p95),
            ms(l.p99),
            ms(l.max)
        );
        let _ = writeln!(
            out,
            "  status               {}",
            counts(self.status.iter().map(|(k, v)| (k.as_str(), *v)))
        );
        let _ = writeln!(
            out,
            "  X-Cache              {}",
            counts(self.x_cache.iter().map(|(k, v)| (*k, *v)))
        );
        let _ = writeln!(
            out,
            "  DB queries/request   {}",
            self.db_queries_per_request
                .map_or("n/a".to_owned(), |r| format!("{r:.4}"))
        );
        let _ = writeln!(
            out,
            "  cache lookups        {} hits + {} misses (service counters)",
            thousands(m.cache_hits_total),
            thousands(m.cache_misses_total)
        );
        if self.replicas.len() > 1 {
            let _ = writeln!(out);
            let _ = writeln!(out, "  Per replica (change in each one's /metrics)");
            let _ = writeln!(
                out,
                "  {:<30} {:>10} {:>10} {:>10} {:>10} {:>10}",
                "replica", "requests", "hits", "misses", "DB queries", "shared"
            );
            for r in &self.replicas {
                let d = &r.metrics;
                let _ = writeln!(
                    out,
                    "  {:<30} {:>10} {:>10} {:>10} {:>10} {:>10}",
                    r.url,
                    thousands(d.http_request_total),
                    thousands(d.cache_hits_total),
                    thousands(d.cache_misses_total),
                    thousands(d.db_hits_total),
                    thousands(d.singleflight_shared_total)
                );
            }
        }
        if !self.rounds.is_empty() {
            let _ = writeln!(out);
            let _ = writeln!(
                out,
                "  Rounds (DB queries and shared: change in /metrics over the round)"
            );
            let _ = writeln!(out, "  round       id  DB queries  shared    MISS  SHARED     HIT  failed   p99 ms   max ms");
            for r in &self.rounds {
                let x = |k: &str| r.x_cache.get(k).copied().unwrap_or(0);
                let _ = writeln!(
                    out,
                    "  {:>5} {:>8}  {:>10}  {:>6}  {:>6}  {:>6}  {:>6}  {:>6}  {:>7.2}  {:>7.2}",
                    r.round,
                    r.id,
                    r.db_queries,
                    r.singleflight_shared,
                    x("MISS"),
                    x("SHARED"),
                    x("HIT"),
                    r.failures,
                    r.latency_ms.p99,
                    r.latency_ms.max
                );
            }
            let per_round: Vec<String> = self
                .rounds
                .iter()
                .map(|r| r.db_queries.to_string())
                .collect();
            let _ = writeln!(out, "  DB queries per round: {}", per_round.join(" "));
            if self.replicas.len() > 1 {
                let by_replica: Vec<String> = self
                    .rounds
                    .iter()
                    .map(|r| {
                        let each: Vec<String> =
                            r.db_queries_by_replica.iter().map(u64::to_string).collect();
                        each.join("+")
                    })
                    .collect();
                let _ = writeln!(
                    out,
                    "  by replica ({}): {}",
                    self.replicas
                        .iter()
                        .map(|r| r.url.as_str())
                        .collect::<Vec<_>>()
                        .join(" + "),
                    by_replica.join(" ")
                );
            }
        }
        if let Some(v) = &self.update_visibility {
            let shown = |x: Option<f64>| x.map_or("n/a".to_owned(), ms);
            let _ = writeln!(out);
            let _ = writeln!(
                out,
                "  updates visible      {} of {} changes served within {} s: p50 {}  p99 {}  max {}",
                v.seen,
                v.updates,
                crate::updates::GIVE_UP.as_secs(),
                shown(v.p50_ms),
                shown(v.p99_ms),
                shown(v.max_ms)
            );
        }
        if let Some(r) = &self.rate {
            let _ = writeln!(out);
            let _ = writeln!(
                out,
                "  constant rate        {} req/s scheduled: {} requests, {} sent, {} dropped (at most {} in the air; latency from each intended send time)",
                thousands(r.target_rps),
                thousands(r.scheduled),
                thousands(r.sent),
                thousands(r.dropped),
                thousands(r.max_in_flight as u64)
            );
        }
        if !self.thresholds.is_empty() {
            let _ = writeln!(out);
            let _ = writeln!(out, "  Thresholds");
            for v in &self.thresholds {
                let _ = writeln!(
                    out,
                    "  {:<6} {:<24} actual {}",
                    if v.passed { "passed" } else { "FAILED" },
                    v.threshold,
                    v.actual.map_or("n/a".to_owned(), figure)
                );
            }
        }
        for note in &self.notes {
            let _ = writeln!(out);
            let _ = writeln!(out, "  note: {note}");
        }
        out
    }
}

fn settings(kind: &Kind) -> serde_json::Value {
    match kind {
        Kind::Seed {
            waves,
            concurrency,
            ids,
            pause,
        } => json!({
            "waves": waves, "concurrency": concurrency, "ids": ids,
            "pause_seconds": pause.as_secs_f64(),
        }),
        Kind::Stampede {
            concurrency,
            rounds,
            ids,
            redis_url,
            cache_key_prefix,
        } => json!({
            "concurrency": concurrency, "rounds": rounds, "ids": ids,
            "evict_via_redis": redis_url, "cache_key_prefix": cache_key_prefix,
        }),
        Kind::Hot {
            concurrency,
            duration,
            id,
        } => json!({
            "concurrency": concurrency, "duration_seconds": duration.as_secs_f64(), "id": id,
        }),
        Kind::Spread {
            concurrency,
            duration,
            ids,
            dist,
        } => json!({
            "concurrency": concurrency, "duration_seconds": duration.as_secs_f64(), "ids": ids,
            "dist": match dist { IdDist::Uniform => "uniform", IdDist::Zipf { .. } => "zipf" },
            "zipf_exponent": match dist { IdDist::Zipf { exponent } => Some(*exponent), IdDist::Uniform => None },
        }),
    }
}

pub fn describe(s: &serde_json::Value, scenario: &str) -> String {
    let n = |k: &str| s[k].to_string();
    match scenario {
        "seed" => format!(
            "{} waves of {} concurrent requests for one id, each followed by one request for each of ids 1..={}, {} s apart",
            n("waves"), n("concurrency"), n("ids"), n("pause_seconds")
        ),
        "stampede" => format!(
            "{} rounds of {} simultaneous requests for one cold id from 1..={}{}",
            n("rounds"),
            n("concurrency"),
            n("ids"),
            if s["evict_via_redis"].is_null() { "" } else { " (evicted from Redis first)" }
        ),
        "hot" | "spread" if !s["rate_rps"].is_null() => format!(
            "{} requests a second (at most {} in the air) asking for {} for {} s",
            n("rate_rps"),
            n("concurrency"),
            if scenario == "hot" { format!("id {}", n("id")) } else { format!("{} ids from 1..={}", s["dist"].as_str().unwrap_or("?"), n("ids")) },
            n("duration_seconds")
        ),
        "hot" => format!("{} connections asking for id {} for {} s", n("concurrency"), n("id"), n("duration_seconds")),
        _ => format!(
            "{} connections asking for {} ids from 1..={} for {} s",
            n("concurrency"),
            s["dist"].as_str().unwrap_or("?"),
            n("ids"),
            n("duration_seconds")
        ),
    }
}

pub fn percent(rate: Option<f64>) -> String {
    rate.map_or("n/a (no lookups)".to_owned(), |r| {
        format!("{:.1} %", r * 100.0)
    })
}

/// A threshold's actual figure: whole numbers as such, others to at most 4 decimals.
pub fn figure(v: f64) -> String {
    if v == v.trunc() && v.abs() < 1e15 {
        format!("{v:.0}")
    } else {
        let text = format!("{v:.4}");
        text.trim_end_matches('0').trim_end_matches('.').to_owned()
    }
}

pub fn ms(v: f64) -> String {
    if v < 10.0 {
        format!("{v:.2} ms")
    } else {
        format!("{v:.1} ms")
    }
}

fn counts<'a>(items: impl Iterator<Item = (&'a str, u64)>) -> String {
    let parts: Vec<String> = items
        .map(|(k, v)| format!("{k} {}", thousands(v)))
        .collect();
    if parts.is_empty() {
        "none".to_owned()
    } else {
        parts.join("  ")
    }
}

/// `12345` → `12,345`.
pub fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thousands_are_grouped() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(7500), "7,500");
        assert_eq!(thousands(1_234_567), "1,234,567");
    }

    #[test]
    fn figures_drop_needless_decimals() {
        assert_eq!(figure(0.0), "0");
        assert_eq!(figure(1197.0), "1197");
        assert_eq!(figure(0.97), "0.97");
        assert_eq!(figure(10.75123), "10.7512");
    }
}
