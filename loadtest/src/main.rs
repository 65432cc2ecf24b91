//! `loadtest`: sends load to a running singleflight service and prints the seed's results table.
//!
//! The seed's README ended with a table (total requests, cache hit rate, DB queries,
//! singleflight shared) that a person assembled by hand from Grafana. This program prints it,
//! and every figure in it is the change in one of the service's own `/metrics` counters
//! between a scrape before the run and one after: nothing is computed from what we sent.
//! What only the client can know (latency percentiles, status codes, `X-Cache` values,
//! throughput) is counted from the responses and printed beside it, so the two can be checked
//! against each other.
//!
//! Scenarios (`loadtest --help` for every option):
//! - `seed` (default): the seed's `loadtest.sh` — per wave, 200 simultaneous requests for one
//!   random id of 1..=100, then one request for each id 1..=100 at once, then a 1 s pause;
//!   25 waves, 7,500 requests;
//! - `stampede`: rounds of 200 simultaneous requests for one cold key, with the DB queries each
//!   round cost;
//! - `hot`: one key, for a duration; `spread`: uniform or Zipf ids, for a duration.
//!
//! A fleet is several `--url`s (requests go round-robin over them) or a load balancer's `--url`
//! with every replica as `--metrics-url`: the figures are then the sum of every replica's
//! counters, and the JSON report shows each replica's too.
//!
//! The load shares the machine's cores with the service when both run on one host; see
//! BENCHMARKS.md for what that means for the figures.

mod cli;
mod client;
mod html;
mod ids;
mod live;
mod prom;
mod rate;
mod report;
mod run;
mod tally;
mod threshold;
mod timeline;
mod updates;

use std::process::ExitCode;

use clap::Parser;

/// Why a run produced no report. Each message says what was wrong and what to check.
#[derive(Debug, thiserror::Error)]
pub enum LoadtestError {
    #[error("cannot reach the service at {url}: {reason}\n(is it running? `scripts/stack.sh up` starts it on :8080; --url names another address)")]
    Unreachable { url: String, reason: String },
    #[error("{url} answered HTTP {status}; expected the service's Prometheus metrics (is --url the singleflight service?)")]
    MetricsStatus { url: String, status: u16 },
    #[error("{url} has no {names}: the report needs it (is --url the singleflight service?)")]
    MissingMetrics { url: String, names: String },
    #[error("the counter {name} at {url} went down from {before} to {after} during the run: that replica restarted, or it is a load balancer that sent the scrapes to different replicas (then name every replica with --metrics-url); the run cannot be reported")]
    CounterWentDown {
        url: String,
        name: &'static str,
        before: f64,
        after: f64,
    },
    #[error("the client received {answered} answers, but the /metrics read ({metrics}) counted only {counted} requests: the rest were answered by replicas whose /metrics was not read (is --url a load balancer? name every replica behind it with --metrics-url); the service figures would be wrong, so the run is not reported")]
    UncountedAnswers {
        answered: u64,
        counted: u64,
        metrics: String,
    },
    #[error("Redis at {url} (--redis-url): {reason}")]
    Redis { url: String, reason: String },
    #[error("PostgreSQL at {url} (--database-url, for --updates): {reason}")]
    Database { url: String, reason: String },
    #[error("cannot build the HTTP client: {0}")]
    Client(String),
    #[error("{0}")]
    Plan(String),
    #[error("a request task failed: {0}")]
    Task(String),
}

fn main() -> ExitCode {
    let args = cli::Args::parse();
    let plan = match args.plan() {
        Ok(plan) => plan,
        Err(e) => {
            eprintln!("loadtest: {e}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("loadtest: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run::run(&plan)) {
        Ok(result) => {
            let report = report::Report::new(&plan, result);
            if plan.json {
                println!("{}", report.to_json());
            } else {
                print!("{}", report.to_text());
            }
            if let Some(path) = &plan.report {
                if let Err(e) = std::fs::write(path, html::render(&report)) {
                    eprintln!("loadtest: cannot write --report {}: {e}", path.display());
                    return ExitCode::FAILURE;
                }
                eprintln!("loadtest: report written to {}", path.display());
            }
            if report.thresholds_passed() {
                ExitCode::SUCCESS
            } else {
                for v in report.thresholds.iter().filter(|v| !v.passed) {
                    eprintln!(
                        "loadtest: threshold {} failed (actual {})",
                        v.threshold,
                        v.actual.map_or("n/a".to_owned(), |a| a.to_string())
                    );
                }
                ExitCode::from(threshold::EXIT_FAILED)
            }
        }
        Err(e) => {
            eprintln!("loadtest: {e}");
            ExitCode::FAILURE
        }
    }
}
