//! Command-line options, and the [`Plan`] they turn into once checked.
//!
//! Every option is optional on the command line and gets its default from the scenario, so that
//! `loadtest stampede` and `loadtest spread` each start from sensible values. An option that the
//! chosen scenario does not use is an error rather than silently ignored, and every count and
//! duration has an upper bound: no run can go on without end.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, ValueEnum};

use crate::threshold::Threshold;

/// Sends load to a running singleflight service and reports what its `/metrics` counted.
#[derive(Debug, Parser)]
#[command(
    name = "loadtest",
    version,
    about = "Load test for the singleflight service: the seed's waves, a cold-key stampede, a hot key, or spread ids.",
    after_help = "Scenarios and their defaults:\n  \
        seed      25 waves: 200 concurrent requests for one random id of 1..=100, then one request for\n            \
                  each id 1..=100 at once, then a 1 s pause (the seed's loadtest.sh)\n  \
        stampede  10 rounds of 200 simultaneous requests for one cold id from 1..=1200 (an id not\n            \
                  requested earlier in the run; --redis-url evicts it first)\n  \
        hot       200 connections asking for id 1 for 10 s\n  \
        spread    200 connections asking for uniform (or --dist zipf) ids from 1..=1000 for 10 s\n\n\
        The report's service figures (total requests, hit rate, DB queries, shared) are the change in\n\
        the service's own /metrics counters between a scrape before and one after the run.\n\n\
        A fleet: give every replica with --url (requests go round-robin over them, and each one's\n\
        /metrics is read), or the load balancer's --url and every replica with --metrics-url. The\n\
        figures are then the sum over the replicas; --json also shows each replica's."
)]
pub struct Args {
    /// Which load to send.
    #[arg(value_enum, default_value_t = Scenario::Seed)]
    pub scenario: Scenario,

    /// Base URL of the service (http only). Repeat it for several replicas: requests are spread
    /// round-robin over them, and a stampede round's requests evenly.
    #[arg(
        long = "url",
        value_name = "URL",
        default_value = "http://localhost:8080"
    )]
    pub urls: Vec<String>,

    /// Base URL of a replica whose /metrics the report counts; repeat it for every replica. The
    /// figures are the sum over them. [default: each --url]
    #[arg(long = "metrics-url", value_name = "URL")]
    pub metrics_urls: Vec<String>,

    /// seed: requests per wave; stampede: simultaneous requests per round; hot, spread:
    /// connections kept busy [default: 200]
    #[arg(long)]
    pub concurrency: Option<usize>,

    /// seed: number of waves [default: 25]
    #[arg(long)]
    pub waves: Option<u32>,

    /// hot, spread: how long to send, e.g. 10s, 500ms, 1m [default: 10s]
    #[arg(long, value_parser = parse_duration)]
    pub duration: Option<Duration>,

    /// seed: ids 1..=N requested after each wave [default: 100]; spread: ids drawn from 1..=N
    /// [default: 1000]; stampede: cold ids chosen from 1..=N [default: 1200]
    #[arg(long)]
    pub ids: Option<u64>,

    /// stampede: number of rounds [default: 10]
    #[arg(long)]
    pub rounds: Option<u32>,

    /// hot: the id asked for [default: 1]
    #[arg(long)]
    pub id: Option<i64>,

    /// spread: how ids are drawn [default: uniform]
    #[arg(long, value_enum)]
    pub dist: Option<Dist>,

    /// spread with --dist zipf: the exponent s (id k is drawn with weight 1/k^s) [default: 1.0]
    #[arg(long)]
    pub zipf_exponent: Option<f64>,

    /// seed: pause between waves [default: 1s, as in the seed]
    #[arg(long, value_parser = parse_duration)]
    pub pause: Option<Duration>,

    /// stampede: evict each round's key from this Redis (DEL template:{N}) before the round, so
    /// the key is cold even if an earlier run cached it; a node of a Redis Cluster (or several,
    /// comma-separated, as the service's REDIS_URL) evicts on the node that holds the key
    #[arg(long)]
    pub redis_url: Option<String>,

    /// stampede with --redis-url: the service's CACHE_KEY_PREFIX, put before the keys evicted
    #[arg(long, env = "CACHE_KEY_PREFIX", default_value = "")]
    pub cache_key_prefix: String,

    /// hot, spread: during the run, update this many random templates (evenly spaced) in
    /// PostgreSQL and report how long each took to be served by the service (by polling)
    #[arg(long)]
    pub updates: Option<u32>,

    /// with --updates: the PostgreSQL the service reads
    #[arg(
        long,
        default_value = "postgres://postgres@127.0.0.1:5432/singleflight"
    )]
    pub database_url: String,

    /// Longest wait for one response.
    #[arg(long, value_parser = parse_duration, default_value = "10s")]
    pub timeout: Duration,

    /// Seed of the random choices (wave ids, cold ids, spread ids), to repeat a run exactly.
    #[arg(long)]
    pub seed: Option<u64>,

    /// Print the report as one JSON object on stdout instead of tables.
    #[arg(long)]
    pub json: bool,

    /// hot, spread: send N requests a second on a fixed schedule instead of keeping
    /// --concurrency connections busy; latency counts from each request's intended send time,
    /// and --concurrency bounds the requests in the air (one due when that many are unanswered
    /// is counted as dropped, not sent)
    #[arg(long, value_name = "N")]
    pub rate: Option<u64>,

    /// Also write the run as one self-contained HTML page (charts over time of requests per
    /// second, p50/p99 latency, the X-Cache mix and each replica's DB queries per second, and
    /// the seed's table); it opens offline
    #[arg(long, value_name = "FILE.html")]
    pub report: Option<PathBuf>,

    /// A condition the run must meet, e.g. p99<20ms, failed==0, hit_rate>0.95; repeatable.
    /// Each is reported as passed or failed, and the exit code is 3 when any failed.
    /// Metrics: p50 p95 p99 max mean, rps, requests, failed, dropped, hit_rate, db_queries,
    /// shared; operators: < <= > >= == !=
    #[arg(long = "threshold", value_name = "EXPR", value_parser = Threshold::parse)]
    pub thresholds: Vec<Threshold>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Scenario {
    Seed,
    Stampede,
    Hot,
    Spread,
}

impl Scenario {
    pub fn name(self) -> &'static str {
        match self {
            Scenario::Seed => "seed",
            Scenario::Stampede => "stampede",
            Scenario::Hot => "hot",
            Scenario::Spread => "spread",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Dist {
    Uniform,
    Zipf,
}

/// How ids are drawn in the spread scenario.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum IdDist {
    Uniform,
    Zipf { exponent: f64 },
}

/// A checked run: what to send, where, and how long to wait for each answer.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Where requests go, round-robin: `http://host:port` each, without a trailing slash.
    pub targets: Vec<String>,
    /// Whose `/metrics` the report counts (summed): the `--metrics-url`s, or else the targets.
    pub metrics: Vec<String>,
    /// True when `metrics` are the targets because no `--metrics-url` was given. A single such
    /// target may be a load balancer, whose `/metrics` is whichever replica answers the scrape.
    pub metrics_from_targets: bool,
    pub timeout: Duration,
    pub json: bool,
    pub rng_seed: u64,
    pub kind: Kind,
    /// Updates to make during the run, to measure how soon they are served.
    pub updates: Option<Updates>,
    /// `--rate`: requests a second on a fixed schedule (hot, spread).
    pub rate: Option<u64>,
    /// `--report`: where the HTML page goes.
    pub report: Option<PathBuf>,
    pub thresholds: Vec<Threshold>,
}

/// `--updates`: how many, and where.
#[derive(Debug, Clone)]
pub struct Updates {
    pub count: u32,
    pub database_url: String,
}

pub const MAX_UPDATES: u32 = 10_000;

#[derive(Debug, Clone)]
pub enum Kind {
    Seed {
        waves: u32,
        concurrency: usize,
        ids: u64,
        pause: Duration,
    },
    Stampede {
        concurrency: usize,
        rounds: u32,
        ids: u64,
        redis_url: Option<String>,
        cache_key_prefix: String,
    },
    Hot {
        concurrency: usize,
        duration: Duration,
        id: i64,
    },
    Spread {
        concurrency: usize,
        duration: Duration,
        ids: u64,
        dist: IdDist,
    },
}

impl Kind {
    pub fn scenario(&self) -> Scenario {
        match self {
            Kind::Seed { .. } => Scenario::Seed,
            Kind::Stampede { .. } => Scenario::Stampede,
            Kind::Hot { .. } => Scenario::Hot,
            Kind::Spread { .. } => Scenario::Spread,
        }
    }
}

pub const MAX_CONCURRENCY: usize = 10_000;
pub const MAX_WAVES: u32 = 1_000;
pub const MAX_ROUNDS: u32 = 1_000;
pub const MAX_IDS: u64 = 1_000_000;
pub const MAX_DURATION: Duration = Duration::from_secs(3600);
pub const MAX_PAUSE: Duration = Duration::from_secs(60);
pub const MAX_TIMEOUT: Duration = Duration::from_secs(60);
/// Most `--url`s, and most `--metrics-url`s.
pub const MAX_REPLICAS: usize = 64;
pub const MAX_RATE: u64 = 1_000_000;

impl Args {
    /// Checks the options against the scenario and fills in its defaults.
    pub fn plan(&self) -> Result<Plan, String> {
        let targets = base_urls("--url", &self.urls)?;
        let metrics_from_targets = self.metrics_urls.is_empty();
        let metrics = if metrics_from_targets {
            targets.clone()
        } else {
            base_urls("--metrics-url", &self.metrics_urls)?
        };
        if self.timeout < Duration::from_millis(1) || self.timeout > MAX_TIMEOUT {
            return Err(format!(
                "--timeout must be from 1ms to {}s",
                MAX_TIMEOUT.as_secs()
            ));
        }
        self.reject_unused()?;
        let concurrency = check_range(
            "--concurrency",
            self.concurrency.unwrap_or(200),
            1,
            MAX_CONCURRENCY,
        )?;
        let kind = match self.scenario {
            Scenario::Seed => Kind::Seed {
                waves: check_range("--waves", self.waves.unwrap_or(25), 1, MAX_WAVES)?,
                concurrency,
                // Each wave requests all of them at once, so they count as concurrency.
                ids: check_range("--ids", self.ids.unwrap_or(100), 1, MAX_CONCURRENCY as u64)?,
                pause: match self.pause.unwrap_or(Duration::from_secs(1)) {
                    p if p > MAX_PAUSE => {
                        return Err(format!("--pause must be at most {}s", MAX_PAUSE.as_secs()))
                    }
                    p => p,
                },
            },
            Scenario::Stampede => {
                let rounds = check_range("--rounds", self.rounds.unwrap_or(10), 1, MAX_ROUNDS)?;
                let ids = check_range("--ids", self.ids.unwrap_or(1200), 1, MAX_IDS)?;
                if u64::from(rounds) > ids {
                    return Err(format!(
                        "--rounds {rounds} needs as many distinct cold ids, but --ids {ids} offers only {ids}"
                    ));
                }
                Kind::Stampede {
                    concurrency,
                    rounds,
                    ids,
                    redis_url: self.redis_url.clone(),
                    cache_key_prefix: self.cache_key_prefix.clone(),
                }
            }
            Scenario::Hot => Kind::Hot {
                concurrency,
                duration: self.checked_duration()?,
                id: match self.id.unwrap_or(1) {
                    id if id >= 1 => id,
                    id => return Err(format!("--id must be a positive template id, not {id}")),
                },
            },
            Scenario::Spread => Kind::Spread {
                concurrency,
                duration: self.checked_duration()?,
                ids: check_range("--ids", self.ids.unwrap_or(1000), 1, MAX_IDS)?,
                dist: match self.dist.unwrap_or(Dist::Uniform) {
                    Dist::Uniform => IdDist::Uniform,
                    Dist::Zipf => {
                        let exponent = self.zipf_exponent.unwrap_or(1.0);
                        if !(exponent.is_finite() && exponent > 0.0 && exponent <= 10.0) {
                            return Err(format!(
                                "--zipf-exponent must be a number above 0 and at most 10, not {exponent}"
                            ));
                        }
                        IdDist::Zipf { exponent }
                    }
                },
            },
        };
        let rate = match self.rate {
            None => None,
            Some(n) => Some(check_range("--rate", n, 1, MAX_RATE)?),
        };
        Ok(Plan {
            rate,
            report: match &self.report {
                None => None,
                Some(path) => Some(report_path(path)?),
            },
            thresholds: self.thresholds.clone(),
            targets,
            metrics,
            metrics_from_targets,
            timeout: self.timeout,
            json: self.json,
            rng_seed: self.seed.unwrap_or_else(rand::random),
            kind,
            updates: match self.updates {
                None => None,
                Some(count) => Some(Updates {
                    count: check_range("--updates", count, 1, MAX_UPDATES)?,
                    database_url: match self.database_url.split_once("://") {
                        Some(("postgres" | "postgresql", rest)) if !rest.is_empty() => {
                            self.database_url.clone()
                        }
                        _ => {
                            return Err(format!(
                                "--database-url must be a URL like postgres://user@host:5432/dbname, not {:?}",
                                self.database_url
                            ))
                        }
                    },
                }),
            },
        })
    }

    fn checked_duration(&self) -> Result<Duration, String> {
        let d = self.duration.unwrap_or(Duration::from_secs(10));
        if d < Duration::from_millis(100) || d > MAX_DURATION {
            return Err(format!(
                "--duration must be from 100ms to {}s",
                MAX_DURATION.as_secs()
            ));
        }
        Ok(d)
    }

    /// Names every given option that the scenario would not use.
    fn reject_unused(&self) -> Result<(), String> {
        use Scenario::*;
        let s = self.scenario;
        let given: [(&str, bool, &[Scenario]); 11] = [
            ("--rate", self.rate.is_some(), &[Hot, Spread]),
            ("--updates", self.updates.is_some(), &[Hot, Spread]),
            ("--waves", self.waves.is_some(), &[Seed]),
            ("--pause", self.pause.is_some(), &[Seed]),
            ("--rounds", self.rounds.is_some(), &[Stampede]),
            ("--redis-url", self.redis_url.is_some(), &[Stampede]),
            ("--duration", self.duration.is_some(), &[Hot, Spread]),
            ("--id", self.id.is_some(), &[Hot]),
            ("--ids", self.ids.is_some(), &[Seed, Stampede, Spread]),
            ("--dist", self.dist.is_some(), &[Spread]),
            ("--zipf-exponent", self.zipf_exponent.is_some(), &[Spread]),
        ];
        let unused: Vec<&str> = given
            .iter()
            .filter(|(_, set, applies)| *set && !applies.contains(&s))
            .map(|(name, _, _)| *name)
            .collect();
        if !unused.is_empty() {
            return Err(format!(
                "{} not used by the {} scenario (see --help)",
                plural(&unused),
                s.name()
            ));
        }
        if self.zipf_exponent.is_some() && self.dist != Some(Dist::Zipf) {
            return Err("--zipf-exponent needs --dist zipf".to_owned());
        }
        Ok(())
    }
}

fn plural(names: &[&str]) -> String {
    match names {
        [one] => format!("{one} is"),
        many => format!("{} are", many.join(", ")),
    }
}

fn check_range<T: PartialOrd + std::fmt::Display>(
    name: &str,
    value: T,
    min: T,
    max: T,
) -> Result<T, String> {
    if value < min || value > max {
        return Err(format!("{name} must be from {min} to {max}, not {value}"));
    }
    Ok(value)
}

/// `--report`'s file: one that can be written, checked before the run rather than after it.
fn report_path(path: &std::path::Path) -> Result<PathBuf, String> {
    if path.is_dir() {
        return Err(format!(
            "--report {}: is a directory; give a file such as report.html",
            path.display()
        ));
    }
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => std::path::Path::new("."),
    };
    if !parent.is_dir() {
        return Err(format!(
            "--report {}: the directory {} does not exist",
            path.display(),
            parent.display()
        ));
    }
    Ok(path.to_path_buf())
}

/// Reduces every URL of option `option` to `http://host[:port]`. One given twice is an error:
/// its requests would not be spread evenly, and its counters would be counted twice.
fn base_urls(option: &str, raw: &[String]) -> Result<Vec<String>, String> {
    if raw.len() > MAX_REPLICAS {
        return Err(format!(
            "{option} is given {} times; at most {MAX_REPLICAS} replicas",
            raw.len()
        ));
    }
    let mut bases: Vec<String> = Vec::with_capacity(raw.len());
    for url in raw {
        let base = base_url(option, url)?;
        if bases.contains(&base) {
            return Err(format!(
                "{option} {base} is given twice; name each replica once"
            ));
        }
        bases.push(base);
    }
    Ok(bases)
}

/// Reduces a URL to `http://host[:port]`. Only plain HTTP: the client has no TLS, since the
/// load is meant for a service on this machine.
fn base_url(option: &str, raw: &str) -> Result<String, String> {
    let url = reqwest::Url::parse(raw).map_err(|e| {
        format!("{option} {raw:?} is not a URL ({e}); expected e.g. http://127.0.0.1:8080")
    })?;
    if url.scheme() != "http" {
        return Err(format!(
            "{option} {raw:?}: only http:// is supported, not {}://",
            url.scheme()
        ));
    }
    let Some(host) = url.host_str() else {
        return Err(format!("{option} {raw:?} has no host"));
    };
    if !(url.path() == "/" || url.path().is_empty()) || url.query().is_some() {
        return Err(format!(
            "{option} {raw:?}: give the service's base URL (e.g. http://127.0.0.1:8080), without a path"
        ));
    }
    Ok(match url.port() {
        Some(port) => format!("http://{host}:{port}"),
        None => format!("http://{host}"),
    })
}

/// Parses a duration the way `--duration`, `--pause` and `--timeout` take it: `10s`, `500ms`,
/// `2m`, `1h 30m` (humantime's syntax), or a plain number of seconds (`1.5`).
pub fn parse_duration(raw: &str) -> Result<Duration, String> {
    let raw = raw.trim();
    if let Ok(seconds) = raw.parse::<f64>() {
        return Duration::try_from_secs_f64(seconds)
            .map_err(|_| format!("{raw:?} is not a duration: out of range"));
    }
    humantime::parse_duration(raw)
        .map_err(|e| format!("{raw:?} is not a duration ({e}); expected e.g. 10s, 500ms, 2m, 1.5"))
}

#[cfg(test)]
mod tests;
