//! The service's Prometheus metrics, all in one registry, so one `/metrics` scrape shows all.
//!
//! The five seed names (`http_in_flight_requests`, `cache_hits_total`, `cache_misses_total`,
//! `db_hits_total`, `singleflight_shared_total`) are kept exactly so the seed's dashboard and
//! queries work unchanged. Per `/template-details` request answered from an HTTP worker's cache or
//! that reached an owner, exactly one of `cache_hits_total` / `cache_misses_total` moves, so
//! `hits / (hits + misses)` is the hit rate. What every request moves is counted per worker
//! ([`PerWorker`]) and summed at scrape.

use prometheus::{
    Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
};

mod per_worker;
pub use per_worker::{
    standard_method, InFlight, PerWorker, WorkerCounts, DURATION_BUCKETS, HTTP_REQUEST_DURATION,
    HTTP_REQUEST_TOTAL,
};

/// Handles to every metric. Cloning is cheap (each handle is an `Arc`), so each actor and HTTP
/// worker keeps its own copy.
#[derive(Clone)]
pub struct Metrics {
    pub registry: Registry,
    /// What the HTTP workers count per request, each on its own (`http_in_flight_requests`,
    /// `worker_cache_hits_total`, their part of `cache_hits_total`), summed at scrape.
    pub per_worker: PerWorker,
    /// Answers produced from a cache (Redis or an owner's near cache), as the owners count them;
    /// `/metrics` reports it with the workers' cache hits added ([`PerWorker`]).
    pub cache_hits_total: IntCounter,
    /// Answers for which no usable cached value existed.
    pub cache_misses_total: IntCounter,
    /// Queries actually sent to PostgreSQL.
    pub db_hits_total: IntCounter,
    /// Callers that received another caller's in-flight database load (`X-Cache: SHARED`).
    pub singleflight_shared_total: IntCounter,
    /// Callers that joined another caller's in-flight Redis read instead of reading Redis themselves.
    pub cache_reads_coalesced_total: IntCounter,
    /// Flights by how they ended: `cache`, `database`, `not_found`, `peer` (another replica
    /// loaded it), `error`.
    pub flights_total: IntCounterVec,
    /// Answers served by an owner's near cache without a Redis round trip (also in
    /// `cache_hits_total`).
    pub near_cache_hits_total: IntCounter,
    /// Expired values served on purpose (`X-Cache: STALE`): while a refresh runs, or because
    /// a fresh load failed.
    pub stale_answers_total: IntCounter,
    /// Background refreshes of soft-expired keys (refresh-ahead).
    pub refreshes_total: IntCounter,
    /// HTTP workers' background renewals of the copies they keep answering, each counted once
    /// by how it ended (`outcome`): renewed from an entry another worker's renewal already
    /// renewed (`near_cache`), by the key's flight (`joined`), or by a Redis read, in a batch or
    /// shared with another worker's (`read`); not renewed (`missed`: Redis had no fresh value or
    /// failed, a change came first, or the flight gave nothing to keep), or not tried
    /// (`skipped`: at a bound, or the worker gone).
    pub worker_cache_renewals_total: IntCounterVec,
    /// Change notifications received from PostgreSQL (per replica, one per changed row).
    pub invalidations_total: IntCounter,
    /// Times the LISTEN connection was (re)established.
    pub listener_connects_total: IntCounter,
    /// 1 while the LISTEN connection is up.
    pub listener_connected: IntGauge,
    /// 0 while the listener is deaf: its own heartbeat NOTIFY did not come back (see
    /// `actors::listener`); 1 otherwise.
    pub listener_hearing: IntGauge,
    /// Requests answered 503 at once because an owner was at a bound, by `reason`:
    /// `pending_keys`, `waiters`, `memory` (its flights' bodies at `INFLIGHT_MEMORY_MB`), or
    /// `mailbox` (its mailbox was full).
    pub shed_requests_total: IntCounterVec,
    /// Redis circuit breaker per shard: 0 closed, 1 open, 2 half-open (probing).
    pub redis_breaker_state: IntGaugeVec,
    /// Breaker transitions by the state entered (`open`, `half_open`, `closed`).
    pub redis_breaker_transitions_total: IntCounterVec,
    /// Redis calls not made because the breaker was open (each one a cache miss at no cost).
    pub redis_calls_skipped_total: IntCounter,
    /// Waiters that gave up at their deadline (answered 503 while the flight went on).
    pub waiter_timeouts_total: IntCounter,
    /// Redis calls that failed, by kind: `timeout`, `refused`, `io`, `protocol`, `decode`.
    pub redis_errors_total: IntCounterVec,
    /// Failed database loads, by kind: `unavailable`, `pool_timeout`, `query_timeout`, `query`,
    /// `panicked`.
    pub db_errors_total: IntCounterVec,
    /// 1 while PostgreSQL is reachable, 0 while it is known to be down (loads fail fast).
    pub db_available: IntGauge,
    /// 1 while every shard's Redis circuit breaker is closed, 0 while one is open or probing
    /// (requests of that shard are served from PostgreSQL).
    pub redis_available: IntGauge,
    /// 1 while loads run in transactions of their own because `DATABASE_URL` goes through a
    /// transaction-mode pooler (`DATABASE_POOLER`).
    pub db_transaction_mode: IntGaugeVec,
    /// Pooled PostgreSQL connections by `server` (`primary`, `replica-<i>`) and `state`
    /// (`idle`, `in_use`).
    pub db_pool_connections: IntGaugeVec,
    /// Template loads sent to PostgreSQL by `target`: `primary` or `replica` (a read replica,
    /// `DATABASE_READ_URL`).
    pub db_loads_total: IntCounterVec,
    /// How far each read replica's replayed WAL is behind the primary's, in bytes, by `server`.
    pub db_replica_lag_bytes: IntGaugeVec,
    /// 1 while a read replica answers its health check (its replayed position), by `server`.
    pub db_replica_healthy: IntGaugeVec,
    /// Keys whose loads read the primary until a replica has replayed their last change (1 for
    /// "every key", after a reconnect).
    pub db_pinned_keys: IntGauge,
    /// Actors restarted after stopping unexpectedly, by `actor` (`key_owner`, `cache`, `db`).
    pub actor_restarts_total: IntCounterVec,
    /// Requests whose client had gone before their owner got to them: no work was started.
    pub requests_abandoned_total: IntCounter,
    /// Redis entries read but not used because they were loaded before the service last learned
    /// it may have missed a change (each one a cache miss).
    pub cache_suspect_entries_total: IntCounter,
    /// Time from asking the pool for a connection to having the row.
    pub db_query_duration_seconds: Histogram,
    /// Ids loaded per query sent to PostgreSQL (loads queued while every connection was busy
    /// are sent together).
    pub db_keys_per_query: Histogram,
    /// Fleet leases claimed: this replica loaded a key for the whole fleet (take-overs included).
    pub lease_claims_total: IntCounter,
    /// Flights that found another replica holding a key's lease and waited for its load.
    pub lease_waits_total: IntCounter,
    /// Leases claimed after waiting on another replica's lease that ran out without a fill (the
    /// holder died or stalled).
    pub lease_takeovers_total: IntCounter,
    /// Fills (or releases) of other replicas' leases announced through Redis pub/sub.
    pub lease_notices_total: IntCounter,
    /// Lease holders' fills by `outcome`: `filled`; `lost` (the lease had run out and been taken
    /// over: nothing written); `changed` (the key changed since the claim: nothing written).
    pub lease_fills_total: IntCounterVec,
    /// Times the replica's subscription to lease notices was established.
    pub lease_subscriptions_total: IntCounter,
    /// Writes outside the lease (`CacheSet`) by `outcome`: `written`; `changed` (the key's
    /// generation or the Redis epoch moved since the load began: nothing written); `unfenced`
    /// (the load began without a generation read from Redis: nothing written).
    pub cache_writes_total: IntCounterVec,
    /// Times a cache actor found that Redis restarted or failed over (the epoch changed): what
    /// the Redis held before is reloaded on first read.
    pub redis_epoch_changes_total: IntCounter,
    /// Bytes held by each kind of in-memory cache (`worker`, `near`), by [`crate::memory`]'s
    /// weights.
    pub cache_memory_bytes: IntGaugeVec,
    /// Entries that left an in-memory cache, or never entered it, by cache and reason.
    pub cache_evictions_total: IntCounterVec,
    /// Failovers the sentinels announced (`+switch-master`) and a cache actor followed.
    pub redis_master_switches_total: IntCounter,
    /// Time a flight waited on another replica's lease, until it had the value or the lease.
    pub lease_wait_seconds: Histogram,
    /// Keys with a flight in progress, per owner shard.
    pub key_owner_inflight_keys: IntGaugeVec,
    /// Requests waiting for a flight, per owner shard.
    pub key_owner_waiters: IntGaugeVec,
    /// Bytes the owners' flights hold or are expected to hold (`INFLIGHT_MEMORY_MB`; see
    /// `actors::key_owner::in_air`), summed over the owners.
    pub inflight_memory_bytes: IntGauge,
}

impl Metrics {
    /// Creates every metric and registers it in a fresh registry.
    pub fn new() -> Result<Self, prometheus::Error> {
        let registry = Registry::new();
        let counter = |name: &str, help: &str| -> Result<IntCounter, prometheus::Error> {
            let c = IntCounter::new(name, help)?;
            registry.register(Box::new(c.clone()))?;
            Ok(c)
        };
        let counter_vec =
            |name: &str, help: &str, label: &str| -> Result<IntCounterVec, prometheus::Error> {
                let c = IntCounterVec::new(Opts::new(name, help), &[label])?;
                registry.register(Box::new(c.clone()))?;
                Ok(c)
            };
        let gauge_vec = |name: &str, help: &str| -> Result<IntGaugeVec, prometheus::Error> {
            let g = IntGaugeVec::new(Opts::new(name, help), &["shard"])?;
            registry.register(Box::new(g.clone()))?;
            Ok(g)
        };

        // Registered through `per_worker`, which adds the HTTP workers' own hits to it.
        let cache_hits_total = IntCounter::new("cache_hits_total", "Answers served from a cache")?;
        let per_worker = PerWorker::new(cache_hits_total.clone())?;
        registry.register(Box::new(per_worker.clone()))?;
        let listener_connected = IntGauge::new(
            "listener_connected",
            "1 while the LISTEN connection for change notifications is up",
        )?;
        registry.register(Box::new(listener_connected.clone()))?;
        let listener_hearing = IntGauge::new(
            "listener_hearing",
            "0 while the listener does not hear its own heartbeat NOTIFY, 1 otherwise",
        )?;
        listener_hearing.set(1);
        registry.register(Box::new(listener_hearing.clone()))?;
        let redis_available = IntGauge::new(
            "redis_available",
            "1 while every shard's Redis circuit breaker is closed, 0 while one is not",
        )?;
        redis_available.set(1);
        registry.register(Box::new(redis_available.clone()))?;
        let db_transaction_mode = IntGaugeVec::new(
            Opts::new(
                "db_transaction_mode",
                "1 while loads run in transactions of their own (a transaction-mode pooler), by \
                 server (primary, replica-<i>)",
            ),
            &["server"],
        )?;
        registry.register(Box::new(db_transaction_mode.clone()))?;
        let db_available = IntGauge::new(
            "db_available",
            "1 while PostgreSQL is reachable, 0 while it is known to be down",
        )?;
        registry.register(Box::new(db_available.clone()))?;
        let db_pool_connections = IntGaugeVec::new(
            Opts::new(
                "db_pool_connections",
                "Pooled PostgreSQL connections by server (primary, replica-<i>) and state",
            ),
            &["server", "state"],
        )?;
        registry.register(Box::new(db_pool_connections.clone()))?;
        let server_gauge = |name: &str, help: &str| -> Result<IntGaugeVec, prometheus::Error> {
            let g = IntGaugeVec::new(Opts::new(name, help), &["server"])?;
            registry.register(Box::new(g.clone()))?;
            Ok(g)
        };
        let db_replica_lag_bytes = server_gauge(
            "db_replica_lag_bytes",
            "How far a read replica's replayed WAL is behind the primary's, in bytes",
        )?;
        let db_replica_healthy = server_gauge(
            "db_replica_healthy",
            "1 while a read replica answers its health check",
        )?;
        let inflight_memory_bytes = IntGauge::new(
            "inflight_memory_bytes",
            "Bytes the flights in the air hold or are expected to hold, within INFLIGHT_MEMORY_MB",
        )?;
        registry.register(Box::new(inflight_memory_bytes.clone()))?;
        let db_pinned_keys = IntGauge::new(
            "db_pinned_keys",
            "Keys whose loads read the primary until a replica has replayed their last change",
        )?;
        registry.register(Box::new(db_pinned_keys.clone()))?;
        let db_query_duration_seconds = Histogram::with_opts(
            HistogramOpts::new(
                "db_query_duration_seconds",
                "Time to load one template from PostgreSQL, pool wait included",
            )
            .buckets(vec![
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
            ]),
        )?;
        registry.register(Box::new(db_query_duration_seconds.clone()))?;
        let db_keys_per_query = Histogram::with_opts(
            HistogramOpts::new(
                "db_keys_per_query",
                "Template ids loaded per query sent to PostgreSQL",
            )
            .buckets(vec![1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0]),
        )?;
        registry.register(Box::new(db_keys_per_query.clone()))?;
        let lease_wait_seconds = Histogram::with_opts(
            HistogramOpts::new(
                "lease_wait_seconds",
                "Time a flight waited on another replica's lease for a key",
            )
            .buckets(vec![
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
            ]),
        )?;
        registry.register(Box::new(lease_wait_seconds.clone()))?;

        let metrics = Metrics {
            per_worker,
            cache_hits_total,
            cache_misses_total: counter(
                "cache_misses_total",
                "Answers for which no usable cached value existed",
            )?,
            db_hits_total: counter("db_hits_total", "Queries sent to PostgreSQL")?,
            singleflight_shared_total: counter(
                "singleflight_shared_total",
                "Callers that received another caller's in-flight database load",
            )?,
            cache_reads_coalesced_total: counter(
                "cache_reads_coalesced_total",
                "Callers that joined another caller's in-flight Redis read",
            )?,
            flights_total: counter_vec(
                "singleflight_flights_total",
                "Flights (one cache read and at most one database load) by how they ended",
                "result",
            )?,
            near_cache_hits_total: counter(
                "near_cache_hits_total",
                "Answers served from a KeyOwner's near cache without a Redis round trip",
            )?,
            stale_answers_total: counter(
                "stale_answers_total",
                "Expired values served on purpose, while refreshing or because a load failed",
            )?,
            refreshes_total: counter(
                "refreshes_total",
                "Background refreshes of soft-expired keys",
            )?,
            worker_cache_renewals_total: counter_vec(
                "worker_cache_renewals_total",
                "HTTP workers' background renewals of the answers they keep, by outcome",
                "outcome",
            )?,
            invalidations_total: counter(
                "invalidations_total",
                "Template change notifications received from PostgreSQL",
            )?,
            listener_connects_total: counter(
                "listener_connects_total",
                "Times the LISTEN connection for change notifications was established",
            )?,
            listener_connected,
            listener_hearing,
            shed_requests_total: counter_vec(
                "shed_requests_total",
                "Requests answered 503 at once because a KeyOwner was at a bound",
                "reason",
            )?,
            redis_breaker_state: gauge_vec(
                "redis_breaker_state",
                "Redis circuit breaker per shard: 0 closed, 1 open, 2 half-open",
            )?,
            redis_breaker_transitions_total: counter_vec(
                "redis_breaker_transitions_total",
                "Redis circuit breaker transitions by the state entered",
                "to",
            )?,
            redis_calls_skipped_total: counter(
                "redis_calls_skipped_total",
                "Redis calls not made because the circuit breaker was open",
            )?,
            waiter_timeouts_total: counter(
                "singleflight_waiter_timeouts_total",
                "Requests answered 503 at their deadline while the flight went on",
            )?,
            redis_errors_total: counter_vec(
                "redis_errors_total",
                "Failed Redis calls by kind (each one treated as a cache miss)",
                "kind",
            )?,
            db_errors_total: counter_vec(
                "db_errors_total",
                "Failed database loads by kind",
                "kind",
            )?,
            db_available,
            redis_available,
            db_transaction_mode,
            db_pool_connections,
            db_loads_total: counter_vec(
                "db_loads_total",
                "Template loads sent to PostgreSQL by target (primary, replica)",
                "target",
            )?,
            db_replica_lag_bytes,
            db_replica_healthy,
            db_pinned_keys,
            inflight_memory_bytes,
            actor_restarts_total: counter_vec(
                "actor_restarts_total",
                "Actors restarted after stopping unexpectedly",
                "actor",
            )?,
            requests_abandoned_total: counter(
                "requests_abandoned_total",
                "Requests whose client had gone before their KeyOwner got to them",
            )?,
            cache_suspect_entries_total: counter(
                "cache_suspect_entries_total",
                "Redis entries not used because they predate a possibly missed change",
            )?,
            db_query_duration_seconds,
            db_keys_per_query,
            lease_claims_total: counter(
                "lease_claims_total",
                "Fleet leases claimed: keys this replica loaded for every replica",
            )?,
            lease_waits_total: counter(
                "lease_waits_total",
                "Flights that waited on another replica's load of the key",
            )?,
            lease_takeovers_total: counter(
                "lease_takeovers_total",
                "Leases claimed after another replica's lease ran out without a fill",
            )?,
            lease_notices_total: counter(
                "lease_notices_total",
                "Lease fill or release notices received through Redis pub/sub",
            )?,
            lease_fills_total: counter_vec(
                "lease_fills_total",
                "Lease holders' fills by outcome (filled, lost, changed)",
                "outcome",
            )?,
            lease_subscriptions_total: counter(
                "lease_subscriptions_total",
                "Times the subscription to lease notices was established",
            )?,
            cache_writes_total: counter_vec(
                "cache_writes_total",
                "Redis writes outside the lease by outcome (written, changed, unfenced)",
                "outcome",
            )?,
            redis_epoch_changes_total: counter(
                "redis_epoch_changes_total",
                "Times Redis was found restarted or failed over (its run ids changed)",
            )?,
            cache_memory_bytes: {
                let gauge = IntGaugeVec::new(
                    Opts::new(
                        "cache_memory_bytes",
                        "Bytes held by the in-memory caches (worker, near), bodies and entries",
                    ),
                    &["cache"],
                )?;
                registry.register(Box::new(gauge.clone()))?;
                gauge
            },
            cache_evictions_total: {
                let counter = IntCounterVec::new(
                    Opts::new(
                        "cache_evictions_total",
                        "Entries dropped from an in-memory cache (bytes, entries) or not kept \
                         (too_large: larger than the cache's share of CACHE_MEMORY_MB)",
                    ),
                    &["cache", "reason"],
                )?;
                registry.register(Box::new(counter.clone()))?;
                counter
            },
            redis_master_switches_total: counter(
                "redis_master_switches_total",
                "Failovers announced by the sentinels (+switch-master) that a cache actor followed",
            )?,
            lease_wait_seconds,
            key_owner_inflight_keys: gauge_vec(
                "key_owner_inflight_keys",
                "Keys with a flight in progress, per KeyOwner shard",
            )?,
            key_owner_waiters: gauge_vec(
                "key_owner_waiters",
                "Requests waiting on a flight, per KeyOwner shard",
            )?,
            registry,
        };
        // Make the labelled series exist from the first scrape, so dashboards and rate() see 0
        // rather than "no data" before the first error.
        // The error kinds of `redis_errors_total` and `db_errors_total` are made to exist by the
        // actors whose errors they count, where those kinds are defined.
        for actor in ["key_owner", "cache", "db"] {
            metrics.actor_restarts_total.with_label_values(&[actor]);
        }
        for to in ["open", "half_open", "closed"] {
            metrics
                .redis_breaker_transitions_total
                .with_label_values(&[to]);
        }
        for outcome in ["filled", "lost", "changed"] {
            metrics.lease_fills_total.with_label_values(&[outcome]);
        }
        for outcome in ["written", "changed", "unfenced"] {
            metrics.cache_writes_total.with_label_values(&[outcome]);
        }
        for outcome in ["near_cache", "joined", "read", "missed", "skipped"] {
            metrics
                .worker_cache_renewals_total
                .with_label_values(&[outcome]);
        }
        for result in ["cache", "database", "not_found", "peer", "error"] {
            metrics.flights_total.with_label_values(&[result]);
        }
        for kind in crate::memory::CacheKind::ALL {
            metrics
                .cache_memory_bytes
                .with_label_values(&[kind.label()]);
            for reason in crate::memory::EVICTION_REASONS {
                metrics
                    .cache_evictions_total
                    .with_label_values(&[kind.label(), reason]);
            }
        }
        Ok(metrics)
    }
}
