//! `DbActor`: owns the bb8 pool of diesel-async PostgreSQL connections.
//!
//! # A slow database is not a failed one
//! Connections are opened *off* the request path: the pool keeps `DB_POOL_MIN_IDLE` of them open
//! (bb8 `min_idle`), opens them when the actor starts, and replaces broken or expired ones in the
//! background (its reaper runs every second). Opening one — connect, authenticate, prepare the
//! template query — has a bound of its own
//! (`DB_CONNECT_TIMEOUT_MS`), long enough for a server far away. So a burst after an idle period
//! finds the connections ready, and pays one round trip per query.
//!
//! A load waits for a free connection for as long as its flight has left ([`FetchTemplate`]
//! carries the deadline), not for a fixed time: a busy pool on a slow network is waited for; only
//! the flight's own deadline (and each request's, in the handler) bounds it. A checked-out
//! connection that closed meanwhile (a server restart) is dropped without a round trip and
//! another one taken. Each query is bounded by `DB_QUERY_TIMEOUT_MS`: when it runs out the
//! caller is answered, and the server is asked to cancel the query, which leaves the connection
//! usable (what a session's `statement_timeout` would do, without session state: see [`query`]).
//!
//! # Failing fast where the database is known to be down
//! "Down" is decided on evidence ([`failure`], by SQLSTATE and error kind) and confirmed by a
//! probe ([`reachability`]): a connection attempt refused or unanswered, a connection lost under
//! a query, or a cancel request that cannot reach the server make PostgreSQL *suspect*, and the
//! actor at once opens a connection of its own; if that fails too, PostgreSQL is *down*. A slow
//! query, a failed one, or a full server ("too many clients", waited for like a busy pool) are
//! never evidence. While it is down, loads fail at once ([`DbError::Unavailable`]) — the owners
//! then answer with a value they remember (`STALE`) or `503` — and a load already waiting for a
//! connection is released the moment it goes down. Every half second the actor probes again, so
//! recovery is noticed as soon as a probe connects, without any request paying for it.
//!
//! # Batching
//! Loads do not queue on the pool one by one. The actor keeps at most `DB_POOL_SIZE` queries in
//! the air; a load that finds one free is sent at once, alone — no window, no added latency —
//! and loads that arrive while every connection is busy wait in the actor's queue, to be sent
//! together as one query (`WHERE id = ANY($1)`, up to `DB_BATCH_MAX` ids) on the next connection
//! that frees up. So a cold burst of distinct ids against a distant server costs a few round
//! trips, not one per id per connection; each load still gets its own row, and its own error.
//! (`COALESCE=off` sends every load alone, as the measurement baseline.)
//!
//! # Panics
//! A panic inside a database call (a bug in a driver) is caught and reported as
//! [`DbError::Panicked`] to that load's flight; the actor and its pool live on.
//!
//! # Read replicas
//! With `DATABASE_READ_URL`, each replica has a pool of its own, and a load goes to a replica
//! unless one may not have replayed a change the service knows of for its key ([`replicas`]);
//! a batch that fails on a replica is sent to the primary. Probes, readiness and
//! `db_available` are about the primary: a replica that fails only sends its loads elsewhere.
//!
//! # What is where
//! This file holds the actor and the dispatch of batches; [`messages`] what it is asked and what
//! it answers; [`backend`] one server's pool and queue; [`query`] opening connections, the
//! checkout and the queries; [`failure`] what an error says about the server; [`reachability`]
//! whether it is down; [`sessions`] what a transaction-mode pooler changes; [`replicas`] where a
//! load may go, and how old a replica's rows are; [`settings`] what one server's pool is opened
//! with.

use std::panic::AssertUnwindSafe;
use std::time::{Duration, Instant};

use actix::prelude::*;
use futures_util::future::FutureExt;
use tokio::sync::oneshot;
use tracing::Instrument;

use crate::metrics::Metrics;
use crate::template::unix_ms_now;
use backend::Backend;
pub use failure::Evidence;
pub use messages::{Changed, ChangedAll, DbError, FetchTemplate, Loaded, Notify, PingDb};
use reachability::Reachability;
pub use reachability::Standing;
use replicas::{Lsn, Routing, Target, Timeline};
pub use sessions::Sessions;
use settings::replica_name;
pub use settings::DbSettings;

mod backend;
pub mod failure;
mod messages;
mod query;
mod reachability;
mod replicas;
mod sessions;
mod settings;

/// How often the actor updates the pool's gauges, and probes PostgreSQL while it is down.
const TICK: Duration = Duration::from_millis(500);

/// A service that asked nothing of PostgreSQL (or got no answer) for this long probes it, so
/// that what it says of it (`/readyz`, `db_available`) holds when nothing is being loaded too.
const QUIET_CHECK: Duration = Duration::from_secs(5);

/// How often bb8 reaps expired connections and tops the pool up to `min_idle`.
const REAPER_RATE: Duration = Duration::from_secs(1);

/// A load waiting to be sent, and where its row goes.
struct Waiting {
    id: i64,
    deadline: Instant,
    reply: oneshot::Sender<Result<Loaded, DbError>>,
    span: tracing::Span,
}

pub struct DbActor {
    primary: Backend,
    /// `DATABASE_READ_URL`'s replicas, in order (`replica-1` first).
    replicas: Vec<Backend>,
    /// Which of them a load may read (see [`replicas`]).
    routing: Routing,
    metrics: Metrics,
    /// The primary is being asked for its WAL position (for pins; see [`replicas`]).
    asking_position: bool,
    /// Pins were made while it was being asked: ask again when it answers.
    ask_again: bool,
    /// The primary's WAL position when last read (for the replicas' lag).
    primary_position: Option<Lsn>,
    /// The primary's positions as read, with when: how old a replica's rows are.
    timeline: Timeline,
    /// Each replica's last known as-of moment (see [`Loaded::replica_as_of_ms`]).
    replica_as_of: Vec<Option<u64>>,
    /// Replicas whose replayed position is being read, by index.
    polling: Vec<bool>,
    /// Replicas found not to be standbys, and said so once.
    not_standby_told: Vec<bool>,
}

impl DbActor {
    /// Builds the primary's pool and each replica's (`replicas`: their settings, in order), and
    /// starts opening their `min_idle` connections in the background (start-up does not wait for
    /// them, so the service starts while PostgreSQL is still down). Must run on the thread
    /// (arbiter) the actor will live on, so that connections and their tasks live there too.
    pub fn new(settings: DbSettings, replicas: Vec<DbSettings>, metrics: Metrics) -> Self {
        // Every kind shows from the first scrape: dashboards and rate() see 0, not "no data".
        for kind in DbError::KINDS {
            metrics.db_errors_total.with_label_values(&[kind]);
        }
        for target in ["primary", "replica"] {
            metrics.db_loads_total.with_label_values(&[target]);
        }
        let reach = Reachability::new(Some(metrics.db_available.clone()));
        let primary = Backend::new("primary".to_owned(), settings, reach);
        let replicas: Vec<Backend> = replicas
            .into_iter()
            .enumerate()
            .map(|(i, settings)| Backend::new(replica_name(i), settings, Reachability::new(None)))
            .collect();
        DbActor {
            routing: Routing::new(replicas.len()),
            polling: vec![false; replicas.len()],
            replica_as_of: vec![None; replicas.len()],
            not_standby_told: vec![false; replicas.len()],
            timeline: Timeline::default(),
            primary,
            replicas,
            metrics,
            asking_position: false,
            ask_again: false,
            primary_position: None,
        }
    }

    fn backend(&mut self, target: Target) -> &mut Backend {
        match target {
            Target::Primary => &mut self.primary,
            Target::Replica(i) => &mut self.replicas[i],
        }
    }

    /// Sends what is queued for `target` while fewer than its `pool_size` queries are in the air.
    /// A batch that fails on a replica is given back and sent to the primary (and the replica
    /// is taken as unhealthy until its next poll answers).
    fn dispatch(&mut self, target: Target, ctx: &mut Context<Self>) {
        let label = match target {
            Target::Primary => "primary",
            Target::Replica(_) => "replica",
        };
        while let Some(batch) = self.backend(target).next_batch() {
            self.metrics
                .db_loads_total
                .with_label_values(&[label])
                .inc_by(batch.len() as u64);
            let metrics = self.metrics.clone();
            let backend = self.backend(target);
            let (pool, settings) = (backend.pool.clone(), backend.settings.clone());
            let reach = backend.reach.clone();
            // A replica's rows are as old as what it has replayed (0, "expired", if that was
            // never known: a batch queued for it only then is not kept in Redis for long).
            let as_of = match target {
                Target::Primary => None,
                Target::Replica(i) => Some(self.replica_as_of[i].unwrap_or(0)),
            };
            let query = async move {
                query::run_batch(&pool, &settings, &metrics, &reach, batch, as_of).await
            };
            ctx.spawn(query.into_actor(self).map(move |given_back, actor, ctx| {
                actor.backend(target).in_flight -= 1;
                if let (Some(batch), Target::Replica(i)) = (given_back, target) {
                    actor.routing.replica_at(i, None);
                    actor.primary.queue.extend(batch);
                    actor.dispatch(Target::Primary, ctx);
                }
                actor.dispatch(target, ctx);
            }));
        }
    }

    /// Every [`TICK`]: the pools' gauges; each replica's replayed position (its health check),
    /// and with replicas, the primary's position (their lag) and any position pins still wait
    /// for.
    fn tick(&mut self, ctx: &mut Context<Self>) {
        self.primary.publish(&self.metrics);
        for replica in &self.replicas {
            replica.publish(&self.metrics);
        }
        if self.replicas.is_empty() {
            return;
        }
        self.metrics
            .db_pinned_keys
            .set(self.routing.pinned() as i64);
        // Every tick, not only when pins wait for it: the replicas' lag stays current.
        if !self.asking_position {
            self.ask_position(ctx);
        }
        for i in 0..self.replicas.len() {
            if std::mem::replace(&mut self.polling[i], true) {
                continue;
            }
            let replica = &self.replicas[i];
            let (pool, settings, reach) = (
                replica.pool.clone(),
                replica.settings.clone(),
                replica.reach.clone(),
            );
            let poll =
                async move { query::position(&pool, &settings, &reach, query::REPLAYED).await };
            ctx.spawn(poll.into_actor(self).map(move |replayed, actor, _| {
                actor.polling[i] = false;
                if let (Ok(None), false) = (&replayed, actor.not_standby_told[i]) {
                    actor.not_standby_told[i] = true;
                    log::warn!(
                        "DATABASE_READ_URL's {} is not a standby (pg_is_in_recovery() is false): \
                         its WAL positions say nothing of the primary's, so no load goes to it \
                         until the service restarts",
                        actor.replicas[i].name
                    );
                    actor.routing.exclude(i);
                }
                let replayed = match actor.not_standby_told[i] {
                    true => None,
                    false => replayed.ok().flatten(),
                };
                actor.replica_at(i, replayed);
            }));
        }
    }

    /// Replica `i` has replayed up to `replayed` (`None`: its poll failed). It takes loads once
    /// its rows' age is known too ([`Timeline::as_of`]).
    fn replica_at(&mut self, i: usize, replayed: Option<Lsn>) {
        let as_of = replayed.and_then(|lsn| self.timeline.as_of(lsn));
        if as_of.is_some() {
            self.replica_as_of[i] = as_of;
        }
        let replayed = replayed.filter(|_| as_of.is_some());
        let name = &self.replicas[i].name;
        self.metrics
            .db_replica_healthy
            .with_label_values(&[name])
            .set(i64::from(replayed.is_some()));
        if let (Some(replayed), Some(primary)) = (replayed, self.primary_position) {
            let lag = primary.saturating_sub(replayed) as i64;
            self.metrics
                .db_replica_lag_bytes
                .with_label_values(&[name])
                .set(lag);
        }
        self.routing.replica_at(i, replayed);
    }

    /// Asks the primary for its WAL position: the pins made so far get it (see [`replicas`]).
    /// It is the replicas' lag reference too.
    fn ask_position(&mut self, ctx: &mut Context<Self>) {
        if self.asking_position {
            self.ask_again = true;
            return;
        }
        self.asking_position = true;
        self.ask_again = false;
        let asked = self.routing.asking();
        let asked_at_ms = unix_ms_now();
        let primary = &self.primary;
        let (pool, settings, reach) = (
            primary.pool.clone(),
            primary.settings.clone(),
            primary.reach.clone(),
        );
        let ask = async move { query::position(&pool, &settings, &reach, query::CURRENT).await };
        ctx.spawn(ask.into_actor(self).map(move |position, actor, ctx| {
            actor.asking_position = false;
            match position {
                Ok(Some(lsn)) => {
                    actor.primary_position = Some(lsn);
                    actor.timeline.primary_at(asked_at_ms, lsn);
                    actor.routing.primary_at(asked, lsn);
                    // Changes learned of while this was asked need a position of their own.
                    if actor.ask_again && actor.routing.replicas() > 0 {
                        actor.ask_position(ctx);
                    }
                }
                // The pins stay with the primary; asked again at the next tick, not now: with
                // the primary down a failure comes at once, and asking again from here would
                // spin this thread.
                Ok(None) | Err(_) => actor.ask_again = true,
            }
        }));
    }

    /// Settles every doubt about PostgreSQL with a probe: a connection of its own, opened as the
    /// pool opens one (a pooled one may be stuck behind a partition that a fresh connection
    /// would find healed, or still there). Suspect: one probe at once decides down or up. Down:
    /// a probe every [`TICK`] until one connects. Up but quiet for [`QUIET_CHECK`]: a probe
    /// whose failure is evidence, which the next probe confirms or not.
    fn probe_when_in_doubt(&self, ctx: &mut Context<Self>) {
        let reach = self.primary.reach.clone();
        let settings = self.primary.settings.clone();
        let probing = async move {
            loop {
                let quiet = tokio::time::sleep(QUIET_CHECK.saturating_sub(reach.quiet_for()));
                let in_doubt = tokio::select! {
                    () = reach.until_in_doubt() => true,
                    () = quiet => false,
                };
                if !in_doubt && reach.quiet_for() < QUIET_CHECK {
                    continue;
                }
                match query::open(&settings, query::Opening::Probe).await {
                    // A quiet service's check: evidence, which the next probe settles.
                    Err((evidence, detail)) if !in_doubt => reach.saw(evidence, &detail),
                    Err((evidence, detail)) if evidence.against_the_server() => {
                        reach.confirm_down(evidence, &detail)
                    }
                    // Connected, or answered (a full server is there).
                    _ => reach.up(),
                }
                if reach.down().is_some() {
                    tokio::time::sleep(TICK).await;
                }
            }
        };
        ctx.spawn(probing.into_actor(self));
    }
}

impl Actor for DbActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        // Loads arrive from every owner at once; the default capacity (16) would make senders
        // wait on the mailbox rather than on the pool, whose own bound is the one that matters.
        ctx.set_mailbox_capacity(4096);
        ctx.run_interval(TICK, Self::tick);
        self.probe_when_in_doubt(ctx);
        // After a restart: what was queued before it is sent now.
        self.dispatch(Target::Primary, ctx);
        for i in 0..self.replicas.len() {
            self.dispatch(Target::Replica(i), ctx);
        }
    }
}

/// The DbActor holds nothing a restart must rebuild (the pools are shared with their futures),
/// so a stop — which only a bug can cause, panics being caught — just starts it again.
impl Supervised for DbActor {
    fn restarting(&mut self, _: &mut Self::Context) {
        log::error!("the database actor stopped unexpectedly; restarting it");
        self.metrics
            .actor_restarts_total
            .with_label_values(&["db"])
            .inc();
        // Their futures were dropped with the old context: whatever they had taken is answered
        // by the closed channels; what is still queued is sent afresh.
        self.primary.in_flight = 0;
        for replica in &mut self.replicas {
            replica.in_flight = 0;
        }
        self.polling.iter_mut().for_each(|polling| *polling = false);
        self.asking_position = false;
        // Pins whose position was being asked wait for the next question.
        self.ask_again = true;
    }
}

impl Handler<FetchTemplate> for DbActor {
    type Result = ResponseFuture<Result<Loaded, DbError>>;

    fn handle(&mut self, msg: FetchTemplate, ctx: &mut Self::Context) -> Self::Result {
        let started = Instant::now();
        let (reply, row) = oneshot::channel();
        let target = self.routing.route(msg.id);
        match (target, self.primary.reach.down()) {
            // The primary known down: failed at once, without queueing.
            (Target::Primary, Some(why)) => drop(reply.send(Err(DbError::Unavailable(why)))),
            _ => {
                self.backend(target).queue.push_back(Waiting {
                    id: msg.id,
                    deadline: msg.deadline,
                    reply,
                    span: msg.span.clone(),
                });
                self.dispatch(target, ctx);
            }
        }
        let metrics = self.metrics.clone();
        let span = msg.span.clone();
        let answer = async move {
            // A closed channel: the query's future was dropped mid-way, which only a panic (or
            // the actor's restart after one) does.
            let result = row.await.unwrap_or(Err(DbError::Panicked));
            metrics
                .db_query_duration_seconds
                .observe(started.elapsed().as_secs_f64());
            if let Err(e) = &result {
                metrics.db_errors_total.with_label_values(&[e.kind()]).inc();
                log::warn!("loading template {} failed: {e}", msg.id);
            }
            result
        };
        Box::pin(answer.instrument(span))
    }
}

/// Turns a panic inside a database call into [`DbError::Panicked`] for its caller, instead of
/// taking the actor (and every other load in it) down.
pub async fn guard_panics<T>(
    call: impl std::future::Future<Output = Result<T, DbError>>,
) -> Result<T, DbError> {
    match AssertUnwindSafe(call).catch_unwind().await {
        Ok(result) => result,
        Err(_panic) => {
            log::error!("a database call panicked");
            Err(DbError::Panicked)
        }
    }
}

impl Handler<Notify> for DbActor {
    type Result = ResponseFuture<Result<(), DbError>>;

    fn handle(&mut self, msg: Notify, _: &mut Self::Context) -> Self::Result {
        let primary = &self.primary;
        let (pool, settings) = (primary.pool.clone(), primary.settings.clone());
        let reach = primary.reach.clone();
        Box::pin(guard_panics(async move {
            query::notify(&pool, &settings, &reach, msg.channel, &msg.payload).await
        }))
    }
}

impl Handler<Changed> for DbActor {
    type Result = ();

    fn handle(&mut self, Changed(id): Changed, ctx: &mut Self::Context) {
        if self.routing.changed(id) {
            self.ask_position(ctx);
        }
    }
}

impl Handler<ChangedAll> for DbActor {
    type Result = ();

    fn handle(&mut self, _: ChangedAll, ctx: &mut Self::Context) {
        if self.routing.changed_all() {
            self.ask_position(ctx);
        }
    }
}

/// The listener went deaf (`Some`) or hears again (`None`): see [`Routing::set_deaf`].
impl Handler<crate::actors::Deafness> for DbActor {
    type Result = ();

    fn handle(&mut self, deafness: crate::actors::Deafness, _: &mut Self::Context) {
        self.routing.set_deaf(deafness.0.is_some());
    }
}

impl Handler<PingDb> for DbActor {
    type Result = MessageResult<PingDb>;

    fn handle(&mut self, _: PingDb, _: &mut Self::Context) -> Self::Result {
        MessageResult(self.primary.reach.standing())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[actix_rt::test]
    async fn a_panicking_call_is_reported_as_a_panic() {
        let result: Result<(), DbError> = guard_panics(async {
            if std::hint::black_box(true) {
                panic!("a driver bug");
            }
            Ok(())
        })
        .await;
        assert_eq!(result, Err(DbError::Panicked));
        assert_eq!(guard_panics(async { Ok(7) }).await, Ok(7));
    }
}
