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

use singleflight::actors::cache::Keys;
use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::rngs::SmallRng;
use rand::{RngExt, SeedableRng};
use reqwest::Client;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use crate::cli::{Kind, Plan};
use crate::client::{self, template_url};
use crate::ids::IdPicker;
use crate::live::{Goal, Live};
use crate::prom::{FleetDeltas, FleetSnapshot};
use crate::rate::RateOutcome;
use crate::tally::{Sample, Tally};
use crate::timeline::{DbScrapes, Second};
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
    /// `--rate`: the schedule and what was dropped from it.
    pub rate: Option<RateOutcome>,
    /// The run second by second (answers by the second they arrived in).
    pub timeline: Vec<Second>,
    /// `--report`: every replica's `db_hits_total`, scraped once a second.
    pub db: DbScrapes,
}

impl RunResult {
    pub fn new(tally: Tally, deltas: FleetDeltas, elapsed: Duration, active: Duration) -> Self {
        RunResult {
            tally,
            deltas,
            elapsed,
            active,
            rounds: Vec::new(),
            notes: Vec::new(),
            visibility: None,
            rate: None,
            timeline: Vec::new(),
            db: DbScrapes::default(),
        }
    }
}

/// One stampede round: the key, what the service counted, what the client saw.
pub struct Round {
    pub round: u32,
    pub id: i64,
    pub evicted: bool,
    pub deltas: FleetDeltas,
    pub tally: Tally,
}

/// What every scenario sends with.
pub struct Ctx {
    pub client: Client,
    /// Where requests go, round-robin (never empty).
    targets: Arc<[String]>,
    /// Whose `/metrics` is read (never empty).
    metrics: Vec<String>,
    /// Counts every finished request, for the live line and the timeline.
    pub live: Arc<Live>,
}

impl Ctx {
    /// The target of the `i`-th request of a burst (or of a worker's turn).
    pub fn target(&self, i: usize) -> &str {
        &self.targets[i % self.targets.len()]
    }

    pub async fn scrape(&self, before_run: bool) -> Result<FleetSnapshot, LoadtestError> {
        client::snapshot_fleet(&self.client, &self.metrics, before_run).await
    }

    /// The run's deltas from `before` to a scrape now, checked against the `answered` responses
    /// the client received. Every answer from a replica is counted by that replica's
    /// `http_request_total`, so fewer counted requests than answers means some came from
    /// replicas whose `/metrics` was not read (a load balancer named as the only `--url`): the
    /// figures would be those of part of the fleet, so that is an error, not a report.
    /// A replica counts a request when it has finished sending the answer, a moment after the
    /// client may have received it, so a short count is scraped again before it is believed.
    pub async fn deltas_since(
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
    let goal = match &plan.kind {
        Kind::Seed {
            waves,
            concurrency,
            ids,
            ..
        } => Goal::Requests(u64::from(*waves) * (*concurrency as u64 + ids)),
        Kind::Stampede {
            concurrency,
            rounds,
            ..
        } => Goal::Requests(u64::from(*rounds) * *concurrency as u64),
        Kind::Hot { duration, .. } | Kind::Spread { duration, .. } => Goal::Duration(*duration),
    };
    let live = Live::new(goal, &plan.metrics);
    let shown = tokio::spawn(live.clone().show());
    let db_scrapes = plan
        .report
        .is_some()
        .then(|| tokio::spawn(live.clone().scrape_db(client.clone(), plan.metrics.clone())));
    let ctx = Ctx {
        client,
        targets: plan.targets.clone().into(),
        metrics: plan.metrics.clone(),
        live: live.clone(),
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
            cache_key_prefix,
        } => {
            let evict = redis_url
                .as_deref()
                .map(|url| (url, cache_key_prefix.as_str()));
            stampede(&ctx, &mut rng, *concurrency, *rounds, *ids, evict).await
        }
        Kind::Hot {
            concurrency,
            duration,
            id,
        } => {
            let load =
                for_duration_or_rate(&ctx, plan, *concurrency, *duration, IdPicker::Fixed(*id));
            with_updates(&ctx, plan, *id..=*id, *duration, load).await
        }
        Kind::Spread {
            concurrency,
            duration,
            ids,
            dist,
        } => {
            let picker = IdPicker::new(*ids, *dist).map_err(LoadtestError::Plan)?;
            let load = for_duration_or_rate(&ctx, plan, *concurrency, *duration, picker);
            with_updates(&ctx, plan, 1..=*ids as i64, *duration, load).await
        }
    };
    shown.abort();
    if let Some(task) = db_scrapes {
        task.abort();
    }
    let (timeline, db) = live.finish();
    result.map(|result| RunResult {
        timeline,
        db,
        ..result
    })
}

/// hot and spread: `concurrency` workers for `duration`, or with `--rate` the constant-rate
/// schedule with `concurrency` requests in the air at most.
async fn for_duration_or_rate(
    ctx: &Ctx,
    plan: &Plan,
    concurrency: usize,
    duration: Duration,
    picker: IdPicker,
) -> Result<RunResult, LoadtestError> {
    match plan.rate {
        None => for_duration(ctx, plan.rng_seed, concurrency, duration, picker).await,
        Some(per_second) => {
            let (mut result, outcome) = crate::rate::at_rate(
                ctx,
                plan.rng_seed,
                per_second,
                concurrency,
                duration,
                picker,
            )
            .await?;
            result.rate = Some(outcome);
            Ok(result)
        }
    }
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
        ctx.live.stage(format!("wave {wave}/{waves}"));
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
    Ok(RunResult::new(tally, deltas, elapsed, active))
}

/// Sends one request per id, all at once (round-robin over the targets), and waits for every
/// answer.
async fn burst(ctx: &Ctx, ids: impl Iterator<Item = i64>) -> Result<Tally, LoadtestError> {
    let mut requests = JoinSet::new();
    for (i, id) in ids.enumerate() {
        let (client, url, live) = (
            ctx.client.clone(),
            template_url(ctx.target(i), id),
            ctx.live.clone(),
        );
        requests.spawn(async move {
            let sample = client::get(&client, &url, id).await;
            live.count(&sample);
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
    evict: Option<(&str, &str)>,
) -> Result<RunResult, LoadtestError> {
    ctx.live.stage("opening connections".to_owned());
    for (t, target) in ctx.targets.iter().enumerate() {
        // Requests t, t + n, t + 2n, … of each round go to target t.
        let share = concurrency.saturating_sub(t).div_ceil(ctx.targets.len());
        client::open_connections(&ctx.client, target, share).await?;
    }
    let mut evictor = match evict {
        Some((url, prefix)) => Some(Evictor::connect(url, prefix).await?),
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
        ctx.live.stage(format!("round {round}/{rounds}"));
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
            let (client, url, gate, live) = (
                ctx.client.clone(),
                template_url(ctx.target(i), id),
                gate.clone(),
                ctx.live.clone(),
            );
            requests.spawn(async move {
                let _released = gate.acquire().await;
                let sample = client::get(&client, &url, id).await;
                live.count(&sample);
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
        rounds: results,
        notes,
        ..RunResult::new(tally, deltas, elapsed, active)
    })
}

/// Deletes a template's key from Redis, so that the next request for it is a miss.
struct Evictor {
    url: String,
    conn: EvictorConn,
    /// The service's names in Redis (its `CACHE_KEY_PREFIX`).
    keys: Keys,
}

const REDIS_PATIENCE: Duration = Duration::from_secs(5);

impl Evictor {
    async fn connect(url: &str, prefix: &str) -> Result<Evictor, LoadtestError> {
        let failed = |reason: String| LoadtestError::Redis {
            url: url.to_owned(),
            reason,
        };
        let conn = tokio::time::timeout(REDIS_PATIENCE, EvictorConn::connect(url))
            .await
            .map_err(|_| failed(format!("no connection within {REDIS_PATIENCE:?}")))?
            .map_err(|e| failed(client::chain(&e)))?;
        Ok(Evictor {
            url: url.to_owned(),
            conn,
            keys: Keys::new(prefix),
        })
    }

    async fn evict(&mut self, id: i64) -> Result<(), LoadtestError> {
        let key = self.keys.value(id);
        let del = redis::cmd("DEL").arg(&key).clone();
        let deleted = tokio::time::timeout(REDIS_PATIENCE, async {
            match &mut self.conn {
                EvictorConn::Single(conn) => del.query_async::<i64>(conn).await,
                EvictorConn::Cluster(conn) => del.query_async::<i64>(conn).await,
            }
        })
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

/// The eviction's connection: to one Redis, or to a Redis Cluster (as the service, a URL of any
/// node, or several comma-separated), where the key's slot decides the node.
enum EvictorConn {
    Single(redis::aio::MultiplexedConnection),
    Cluster(redis::cluster_async::ClusterConnection),
}

impl EvictorConn {
    async fn connect(url: &str) -> redis::RedisResult<EvictorConn> {
        let urls: Vec<String> = url
            .split(',')
            .map(str::trim)
            .filter(|u| !u.is_empty())
            .map(str::to_owned)
            .collect();
        if urls.len() == 1 {
            let mut conn = redis::Client::open(url)?
                .get_multiplexed_async_connection()
                .await?;
            let info: String = redis::cmd("INFO")
                .arg("cluster")
                .query_async(&mut conn)
                .await?;
            if !info.lines().any(|l| l.trim_end() == "cluster_enabled:1") {
                return Ok(EvictorConn::Single(conn));
            }
        }
        let client = redis::cluster::ClusterClient::new(urls)?;
        client
            .get_async_connection()
            .await
            .map(EvictorConn::Cluster)
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
    ctx.live.stage(format!("of {} s", duration.as_secs_f64()));
    let picker = Arc::new(picker);
    let started = Instant::now();
    let deadline = started + duration;
    let mut workers = JoinSet::new();
    for worker in 0..concurrency {
        let (client, targets, live, picker) = (
            ctx.client.clone(),
            ctx.targets.clone(),
            ctx.live.clone(),
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
                live.count(&sample);
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
    Ok(RunResult::new(tally, deltas, elapsed, elapsed))
}
