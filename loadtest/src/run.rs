//! The four scenarios. Each one scrapes `/metrics` before and after, sends its requests, and
//! returns what the client saw ([`Tally`]) with what the service counted ([`FleetDeltas`]).
//!
//! With several `--url`s the requests go round-robin over them: a burst's `i`-th request to
//! target `i mod n` (so a stampede round is spread evenly), a duration worker's `k`-th request
//! to target `(worker + k) mod n`. Every scrape reads every `--metrics-url` (by default, every
//! `--url`) and the figures are their sum.
//!
//! Every scenario is bounded: `seed` and `stampede` send a fixed number of requests, `hot` and
//! `spread` stop starting requests at their deadline, and every request gives up after
//! `--timeout`.

use std::collections::HashSet;
use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::rngs::SmallRng;
use rand::{RngExt, SeedableRng};
use reqwest::Client;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use crate::cli::{IdDist, Kind, Plan};
use crate::client::{self, template_url};
use crate::prom::{FleetDeltas, FleetSnapshot};
use crate::tally::{Sample, Tally};
use crate::LoadtestError;

/// What a scenario produced.
pub struct RunResult {
    pub tally: Tally,
    /// What the service counted between the scrape before and the scrape after, per replica
    /// and summed.
    pub deltas: FleetDeltas,
    /// Wall-clock time from the first request to the last answer, pauses included.
    pub elapsed: Duration,
    /// Time spent with requests in the air (pauses between waves and rounds excluded).
    pub active: Duration,
    pub rounds: Vec<Round>,
    pub notes: Vec<String>,
    /// `--updates`: how soon changes made during the run were served.
    pub visibility: Option<crate::updates::Visibility>,
}

/// One stampede round: the key, what the service counted, what the client saw.
pub struct Round {
    pub round: u32,
    pub id: i64,
    pub evicted: bool,
    pub deltas: FleetDeltas,
    pub tally: Tally,
}

struct Ctx {
    client: Client,
    /// Where requests go, round-robin (never empty).
    targets: Arc<[String]>,
    /// Whose `/metrics` is read (never empty).
    metrics: Vec<String>,
    progress: Arc<Progress>,
}

impl Ctx {
    /// The target of the `i`-th request of a burst (or of a worker's turn).
    fn target(&self, i: usize) -> &str {
        &self.targets[i % self.targets.len()]
    }

    async fn scrape(&self, before_run: bool) -> Result<FleetSnapshot, LoadtestError> {
        client::snapshot_fleet(&self.client, &self.metrics, before_run).await
    }

    /// The run's deltas from `before` to a scrape now, checked against the `answered` responses
    /// the client received. Every answer from a replica is counted by that replica's
    /// `http_request_total`, so fewer counted requests than answers means some came from
    /// replicas whose `/metrics` was not read (a load balancer named as the only `--url`): the
    /// figures would be those of part of the fleet, so that is an error, not a report.
    /// A replica counts a request when it has finished sending the answer, a moment after the
    /// client may have received it, so a short count is scraped again before it is believed.
    async fn deltas_since(
        &self,
        before: &FleetSnapshot,
        answered: u64,
    ) -> Result<FleetDeltas, LoadtestError> {
        let mut deltas = before.until(&self.scrape(false).await?)?;
        for _ in 0..RESCRAPES {
            if deltas.total.http_request_total >= answered {
                return Ok(deltas);
            }
            tokio::time::sleep(RESCRAPE_AFTER).await;
            deltas = before.until(&self.scrape(false).await?)?;
        }
        if deltas.total.http_request_total >= answered {
            return Ok(deltas);
        }
        Err(LoadtestError::UncountedAnswers {
            answered,
            counted: deltas.total.http_request_total,
            metrics: self
                .metrics
                .iter()
                .map(|base| format!("{base}/metrics"))
                .collect::<Vec<_>>()
                .join(", "),
        })
    }
}

/// How often, and how long apart, a count short of the answers received is scraped again.
const RESCRAPES: u32 = 3;
const RESCRAPE_AFTER: Duration = Duration::from_millis(200);

pub async fn run(plan: &Plan) -> Result<RunResult, LoadtestError> {
    let client = client::build(plan.timeout)?;
    // Before any load: is every replica there, and does each expose every counter the report
    // needs? And does every target whose /metrics is not read answer at all?
    client::snapshot_fleet(&client, &plan.metrics, true).await?;
    for target in plan.targets.iter().filter(|t| !plan.metrics.contains(t)) {
        client::open_connections(&client, target, 1).await?;
    }
    let progress = Progress::new();
    let printer = tokio::spawn(progress.clone().print_every_second());
    let ctx = Ctx {
        client,
        targets: plan.targets.clone().into(),
        metrics: plan.metrics.clone(),
        progress: progress.clone(),
    };
    let mut rng = SmallRng::seed_from_u64(plan.rng_seed);
    let result = match &plan.kind {
        Kind::Seed {
            waves,
            concurrency,
            ids,
            pause,
        } => seed(&ctx, &mut rng, *waves, *concurrency, *ids, *pause).await,
        Kind::Stampede {
            concurrency,
            rounds,
            ids,
            redis_url,
        } => {
            stampede(
                &ctx,
                &mut rng,
                *concurrency,
                *rounds,
                *ids,
                redis_url.as_deref(),
            )
            .await
        }
        Kind::Hot {
            concurrency,
            duration,
            id,
        } => {
            let load = for_duration(
                &ctx,
                plan.rng_seed,
                *concurrency,
                *duration,
                IdPicker::Fixed(*id),
            );
            with_updates(&ctx, plan, *id..=*id, *duration, load).await
        }
        Kind::Spread {
            concurrency,
            duration,
            ids,
            dist,
        } => {
            let picker = IdPicker::new(*ids, *dist);
            let load = for_duration(&ctx, plan.rng_seed, *concurrency, *duration, picker);
            with_updates(&ctx, plan, 1..=*ids as i64, *duration, load).await
        }
    };
    printer.abort();
    progress.finish();
    result
}

/// Runs `load`, and with `--updates` the updates beside it.
async fn with_updates(
    ctx: &Ctx,
    plan: &Plan,
    ids: std::ops::RangeInclusive<i64>,
    duration: Duration,
    load: impl std::future::Future<Output = Result<RunResult, LoadtestError>>,
) -> Result<RunResult, LoadtestError> {
    let Some(updates) = &plan.updates else {
        return load.await;
    };
    let changes = crate::updates::run(
        &ctx.client,
        &ctx.targets,
        &updates.database_url,
        ids,
        updates.count,
        duration,
        plan.rng_seed,
    );
    let (result, visibility) = tokio::join!(load, changes);
    let mut result = result?;
    result.visibility = Some(visibility?);
    Ok(result)
}

/// The seed's load test: per wave, `concurrency` simultaneous requests for one random id of
/// `1..=ids`, then one request for every id `1..=ids` at once, then a pause.
async fn seed(
    ctx: &Ctx,
    rng: &mut SmallRng,
    waves: u32,
    concurrency: usize,
    ids: u64,
    pause: Duration,
) -> Result<RunResult, LoadtestError> {
    let before = ctx.scrape(true).await?;
    let started = Instant::now();
    let mut active = Duration::ZERO;
    let mut tally = Tally::new();
    for wave in 1..=waves {
        ctx.progress.stage(format!("wave {wave}/{waves}"));
        let id = rng.random_range(1..=ids) as i64;
        let sending = Instant::now();
        tally.merge(&burst(ctx, std::iter::repeat_n(id, concurrency)).await?);
        tally.merge(&burst(ctx, (1..=ids).map(|id| id as i64)).await?);
        active += sending.elapsed();
        if wave < waves {
            tokio::time::sleep(pause).await;
        }
    }
    let elapsed = started.elapsed();
    let deltas = ctx.deltas_since(&before, tally.responses).await?;
    Ok(RunResult {
        tally,
        deltas,
        elapsed,
        active,
        rounds: Vec::new(),
        notes: Vec::new(),
        visibility: None,
    })
}

/// Sends one request per id, all at once (round-robin over the targets), and waits for every
/// answer.
async fn burst(ctx: &Ctx, ids: impl Iterator<Item = i64>) -> Result<Tally, LoadtestError> {
    let mut requests = JoinSet::new();
    for (i, id) in ids.enumerate() {
        let (client, url, progress) = (
            ctx.client.clone(),
            template_url(ctx.target(i), id),
            ctx.progress.clone(),
        );
        requests.spawn(async move {
            let sample = client::get(&client, &url, id).await;
            progress.count(&sample);
            sample
        });
    }
    collect(requests).await
}

async fn collect(mut requests: JoinSet<Sample>) -> Result<Tally, LoadtestError> {
    let mut tally = Tally::new();
    while let Some(done) = requests.join_next().await {
        let sample = done.map_err(|e| LoadtestError::Task(e.to_string()))?;
        tally.record(&sample);
    }
    Ok(tally)
}

/// `rounds` times: pick an id of `1..=ids` not requested earlier in this run (and evict it
/// from Redis first when `redis_url` is given), release `concurrency` requests for it at the
/// same moment (spread evenly over the targets: 201 over 3 replicas is 67 each), and count what
/// the service (every replica read) did for that round alone.
async fn stampede(
    ctx: &Ctx,
    rng: &mut SmallRng,
    concurrency: usize,
    rounds: u32,
    ids: u64,
    redis_url: Option<&str>,
) -> Result<RunResult, LoadtestError> {
    ctx.progress.stage("opening connections".to_owned());
    for (t, target) in ctx.targets.iter().enumerate() {
        // Requests t, t + n, t + 2n, … of each round go to target t.
        let share = concurrency.saturating_sub(t).div_ceil(ctx.targets.len());
        client::open_connections(&ctx.client, target, share).await?;
    }
    let mut evictor = match redis_url {
        Some(url) => Some(Evictor::connect(url).await?),
        None => None,
    };
    let before = ctx.scrape(true).await?;
    let started = Instant::now();
    let mut active = Duration::ZERO;
    let mut tally = Tally::new();
    let mut used = HashSet::new();
    let mut results = Vec::new();
    let mut warm = Vec::new();
    for round in 1..=rounds {
        ctx.progress.stage(format!("round {round}/{rounds}"));
        // `rounds <= ids` (checked with the options), so an unused id always exists.
        let id = loop {
            let candidate = rng.random_range(1..=ids) as i64;
            if used.insert(candidate) {
                break candidate;
            }
        };
        if let Some(evictor) = evictor.as_mut() {
            evictor.evict(id).await?;
        }
        let round_before = ctx.scrape(true).await?;

        // Every request waits at the gate until all are spawned, then they go out together.
        let gate = Arc::new(Semaphore::new(0));
        let mut requests = JoinSet::new();
        for i in 0..concurrency {
            let (client, url, gate, progress) = (
                ctx.client.clone(),
                template_url(ctx.target(i), id),
                gate.clone(),
                ctx.progress.clone(),
            );
            requests.spawn(async move {
                let _released = gate.acquire().await;
                let sample = client::get(&client, &url, id).await;
                progress.count(&sample);
                sample
            });
        }
        let sending = Instant::now();
        gate.add_permits(concurrency);
        let round_tally = collect(requests).await?;
        active += sending.elapsed();

        let deltas = ctx
            .deltas_since(&round_before, round_tally.responses)
            .await?;
        if deltas.total.db_hits_total == 0 && round_tally.x_cache("MISS") == 0 {
            warm.push(id.to_string());
        }
        tally.merge(&round_tally);
        results.push(Round {
            round,
            id,
            evicted: evictor.is_some(),
            deltas,
            tally: round_tally,
        });
    }
    let elapsed = started.elapsed();
    let deltas = ctx.deltas_since(&before, tally.responses).await?;
    let mut notes = Vec::new();
    if !warm.is_empty() {
        notes.push(format!(
            "id {} was already cached when its round began (an earlier run filled it): that round \
             made no database query; pass --redis-url to evict each key before its round",
            warm.join(", ")
        ));
    }
    Ok(RunResult {
        tally,
        deltas,
        elapsed,
        active,
        rounds: results,
        notes,
        visibility: None,
    })
}

/// Deletes a template's key from Redis, so that the next request for it is a miss.
struct Evictor {
    url: String,
    conn: redis::aio::MultiplexedConnection,
}

const REDIS_PATIENCE: Duration = Duration::from_secs(5);

impl Evictor {
    async fn connect(url: &str) -> Result<Evictor, LoadtestError> {
        let failed = |reason: String| LoadtestError::Redis {
            url: url.to_owned(),
            reason,
        };
        let client = redis::Client::open(url).map_err(|e| failed(client::chain(&e)))?;
        let conn = tokio::time::timeout(REDIS_PATIENCE, client.get_multiplexed_async_connection())
            .await
            .map_err(|_| failed(format!("no connection within {REDIS_PATIENCE:?}")))?
            .map_err(|e| failed(client::chain(&e)))?;
        Ok(Evictor {
            url: url.to_owned(),
            conn,
        })
    }

    async fn evict(&mut self, id: i64) -> Result<(), LoadtestError> {
        let key = singleflight::template::cache_key(id);
        let deleted = tokio::time::timeout(
            REDIS_PATIENCE,
            redis::cmd("DEL")
                .arg(&key)
                .query_async::<i64>(&mut self.conn),
        )
        .await;
        match deleted {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(LoadtestError::Redis {
                url: self.url.clone(),
                reason: format!("DEL {key}: {}", client::chain(&e)),
            }),
            Err(_) => Err(LoadtestError::Redis {
                url: self.url.clone(),
                reason: format!("DEL {key}: no answer within {REDIS_PATIENCE:?}"),
            }),
        }
    }
}

/// `concurrency` workers, each sending one request after another until `duration` has passed;
/// worker `w`'s `k`-th request goes to target `(w + k) mod n`.
async fn for_duration(
    ctx: &Ctx,
    rng_seed: u64,
    concurrency: usize,
    duration: Duration,
    picker: IdPicker,
) -> Result<RunResult, LoadtestError> {
    let before = ctx.scrape(true).await?;
    ctx.progress
        .stage(format!("of {} s", duration.as_secs_f64()));
    let picker = Arc::new(picker);
    let started = Instant::now();
    let deadline = started + duration;
    let mut workers = JoinSet::new();
    for worker in 0..concurrency {
        let (client, targets, progress, picker) = (
            ctx.client.clone(),
            ctx.targets.clone(),
            ctx.progress.clone(),
            picker.clone(),
        );
        let mut rng = SmallRng::seed_from_u64(rng_seed.wrapping_add(worker as u64));
        workers.spawn(async move {
            let mut tally = Tally::new();
            let mut turn = worker;
            while Instant::now() < deadline {
                let id = picker.pick(&mut rng);
                let base = &targets[turn % targets.len()];
                turn = turn.wrapping_add(1);
                let sample = client::get(&client, &template_url(base, id), id).await;
                progress.count(&sample);
                tally.record(&sample);
            }
            tally
        });
    }
    let mut tally = Tally::new();
    while let Some(done) = workers.join_next().await {
        tally.merge(&done.map_err(|e| LoadtestError::Task(e.to_string()))?);
    }
    let elapsed = started.elapsed();
    let deltas = ctx.deltas_since(&before, tally.responses).await?;
    Ok(RunResult {
        tally,
        deltas,
        elapsed,
        active: elapsed,
        rounds: Vec::new(),
        notes: Vec::new(),
        visibility: None,
    })
}

/// How a worker picks the next id.
enum IdPicker {
    Fixed(i64),
    Uniform(u64),
    /// Cumulative weights of ids `1..=n` (weight of id k is 1/k^s), normalized to end at 1.
    Zipf(Vec<f64>),
}

impl IdPicker {
    fn new(ids: u64, dist: IdDist) -> IdPicker {
        match dist {
            IdDist::Uniform => IdPicker::Uniform(ids),
            IdDist::Zipf { exponent } => {
                let mut cdf = Vec::with_capacity(ids as usize);
                let mut total = 0.0;
                for k in 1..=ids {
                    total += 1.0 / (k as f64).powf(exponent);
                    cdf.push(total);
                }
                for c in &mut cdf {
                    *c /= total;
                }
                IdPicker::Zipf(cdf)
            }
        }
    }

    fn pick(&self, rng: &mut SmallRng) -> i64 {
        match self {
            IdPicker::Fixed(id) => *id,
            IdPicker::Uniform(n) => rng.random_range(1..=*n) as i64,
            IdPicker::Zipf(cdf) => {
                let u: f64 = rng.random();
                let index = cdf.partition_point(|&c| c < u).min(cdf.len() - 1);
                index as i64 + 1
            }
        }
    }
}

/// Requests done so far, for the progress line on stderr.
struct Progress {
    started: Instant,
    done: AtomicU64,
    failed: AtomicU64,
    stage: Mutex<String>,
    printed: AtomicBool,
}

/// Runs shorter than this print no progress line.
const QUIET_FOR: Duration = Duration::from_secs(3);

impl Progress {
    fn new() -> Arc<Progress> {
        Arc::new(Progress {
            started: Instant::now(),
            done: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            stage: Mutex::new(String::new()),
            printed: AtomicBool::new(false),
        })
    }

    fn count(&self, sample: &Sample) {
        self.done.fetch_add(1, Ordering::Relaxed);
        if matches!(sample.outcome, crate::tally::Outcome::Failed(_)) {
            self.failed.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn stage(&self, text: String) {
        if let Ok(mut stage) = self.stage.lock() {
            *stage = text;
        }
    }

    /// On a terminal the line is redrawn every second; elsewhere (a log file, CI) a line is
    /// printed every 5 s.
    async fn print_every_second(self: Arc<Progress>) {
        let tty = std::io::stderr().is_terminal();
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        let mut last_done = 0;
        let mut seconds = 0u64;
        loop {
            tick.tick().await;
            let done = self.done.load(Ordering::Relaxed);
            let rate = done - last_done;
            last_done = done;
            seconds += 1;
            if self.started.elapsed() < QUIET_FOR || !(tty || seconds.is_multiple_of(5)) {
                continue;
            }
            let stage = self.stage.lock().map(|s| s.clone()).unwrap_or_default();
            let line = format!(
                "loadtest: {:>4.0}s  {stage:<14} {} requests ({}/s)  {} failed",
                self.started.elapsed().as_secs_f64(),
                thousands(done),
                thousands(rate),
                thousands(self.failed.load(Ordering::Relaxed)),
            );
            let mut err = std::io::stderr().lock();
            let _ = if tty {
                write!(err, "\r\x1b[K{line}")
            } else {
                writeln!(err, "{line}")
            };
            let _ = err.flush();
            self.printed.store(true, Ordering::Relaxed);
        }
    }

    /// Ends a redrawn progress line so that the report starts on a line of its own.
    fn finish(&self) {
        if self.printed.load(Ordering::Relaxed) && std::io::stderr().is_terminal() {
            eprintln!();
        }
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
    fn zipf_favours_low_ids_and_stays_in_range() {
        let picker = IdPicker::new(1000, IdDist::Zipf { exponent: 1.0 });
        let mut rng = SmallRng::seed_from_u64(7);
        let mut counts = vec![0u32; 1001];
        for _ in 0..100_000 {
            let id = picker.pick(&mut rng);
            assert!((1..=1000).contains(&id));
            counts[id as usize] += 1;
        }
        // With s = 1 over 1000 ids, id 1 has weight 1/H(1000) ≈ 13 %, id 2 half of that.
        assert!(counts[1] > 11_000 && counts[1] < 15_500, "{}", counts[1]);
        assert!(counts[1] > counts[2] && counts[2] > counts[10] && counts[10] > counts[900]);
    }

    #[test]
    fn uniform_covers_the_range() {
        let picker = IdPicker::new(50, IdDist::Uniform);
        let mut rng = SmallRng::seed_from_u64(1);
        let seen: HashSet<i64> = (0..5000).map(|_| picker.pick(&mut rng)).collect();
        assert_eq!(seen.len(), 50);
        assert!(seen.iter().all(|id| (1..=50).contains(id)));
    }
}
