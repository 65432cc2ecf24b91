//! Every setting, defined once: its variable (the field's name in capitals, and `--the-field` on
//! the command line), its meaning (`--help`), its default and the kind of value it accepts.
//! [`super::Settings`] is built from these.

use std::net::SocketAddr;
use std::time::Duration;

use clap::{ArgAction, Parser, Subcommand};

use super::kinds::*;
use super::Pooler;
use crate::tls::{PemFile, PemKind};

#[derive(Debug, Parser)]
#[command(
    name = "singleflight",
    version,
    about = "A read-through template service that ends cache stampedes.",
    after_help = "Every option can be set by its environment variable instead (12-factor); a \
                  blank value means the default, and the command line wins over the environment."
)]
pub struct Cli {
    #[command(subcommand)]
    pub action: Option<Action>,
    #[command(flatten)]
    pub options: Options,
}

/// What to do other than serve.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Subcommand)]
pub enum Action {
    /// Prepare the schema (MIGRATE), load the demo templates into an empty table, and exit.
    SeedDemo,
}

// `::std::option::Option` and `::std::vec::Vec` are written in full where the kind itself reads
// a blank value as "none": clap's derive would otherwise treat the field as a plain optional or
// repeated argument and hand the kind the inner type.
#[derive(Debug, clap::Args)]
pub struct Options {
    /// Where the HTTP server listens (port 0 picks a free port).
    #[arg(long, env, default_value = "0.0.0.0:8080",
          value_parser = Setting(Address("an address like 0.0.0.0:8080")))]
    pub http_addr: SocketAddr,

    /// When set (e.g. 0.0.0.0:9090), /metrics, /healthz and /readyz are served on this address
    /// only; unset, everything is served on HTTP_ADDR.
    #[arg(long, env, default_value = "", hide_default_value = true,
          value_parser = Setting(Optional(Address("an address like 0.0.0.0:9090, or unset"))))]
    pub admin_addr: ::std::option::Option<SocketAddr>,

    /// actix-web worker threads (default: the number of cores).
    #[arg(long, env, default_value_t = default_parallelism(), value_parser = Setting(COUNT))]
    pub http_workers: u64,

    /// PostgreSQL, for loads; TLS as libpq's sslmode says (disable, prefer, require, verify-ca,
    /// verify-full).
    #[arg(long, env, default_value = "postgres://postgres@127.0.0.1:5432/singleflight",
          value_parser = Setting(POSTGRES_URL))]
    pub database_url: String,

    /// A direct connection to the primary for LISTEN and the migration lock, when DATABASE_URL
    /// goes through a transaction-mode pooler (unset: DATABASE_URL).
    #[arg(long, env, default_value = "", hide_default_value = true,
          value_parser = Setting(Optional(POSTGRES_URL)))]
    pub database_listen_url: ::std::option::Option<String>,

    /// Read replicas, comma-separated; loads go to them unless one may not have replayed a
    /// change the service knows of (unset: none).
    #[arg(long, env, default_value = "", hide_default_value = true,
          value_parser = Setting(UrlList(POSTGRES_URL)))]
    pub database_read_url: ::std::vec::Vec<String>,

    /// What sits in front of PostgreSQL on DATABASE_URL: a transaction-mode pooler, none (direct
    /// or session mode), or auto (found out at run time).
    #[arg(long, env, default_value = "auto", value_parser = Setting(PoolerKind))]
    pub database_pooler: Pooler,

    /// on applies pending migrations at start-up; off only checks that the schema the service
    /// needs is there (a database the service does not own).
    #[arg(long, env, default_value = "on", action = ArgAction::Set, value_parser = Setting(OnOff))]
    pub migrate: bool,

    /// PEM CA certificates that sslmode=verify-ca/verify-full check the server against (unset:
    /// the system's trust store).
    #[arg(long, env, default_value = "", hide_default_value = true,
          value_parser = Setting(Optional(Pem(PemKind::Certificates))))]
    pub database_ca_file: ::std::option::Option<PemFile>,

    /// Redis; may be down at start-up. rediss:// for TLS. Any node of a Redis Cluster (or several
    /// nodes, comma-separated) is used as the cluster. With REDIS_SENTINELS: only its user,
    /// password, database and scheme apply, to the master the sentinels name.
    #[arg(long, env, default_value = "redis://127.0.0.1:6379/", value_parser = Setting(RedisUrls))]
    pub redis_url: String,

    /// Redis Sentinel: comma-separated host:port of the sentinels (redis:// or rediss:// URLs
    /// for their password or TLS); the service asks them for the master, and again after a
    /// failover. Unset: REDIS_URL names the Redis.
    #[arg(long, env, default_value = "", hide_default_value = true,
          value_parser = Setting(Sentinels))]
    pub redis_sentinels: ::std::vec::Vec<String>,

    /// The name the sentinels watch the master under (with REDIS_SENTINELS).
    #[arg(long, env, default_value = "mymaster", value_parser = Setting(Text))]
    pub redis_sentinel_master: String,

    /// PEM CA certificates that a rediss:// server is checked against (unset: the system's trust
    /// store).
    #[arg(long, env, default_value = "", hide_default_value = true,
          value_parser = Setting(Optional(Pem(PemKind::Certificates))))]
    pub redis_ca_file: ::std::option::Option<PemFile>,

    /// PEM client certificate (chain) for a Redis that asks for one; with REDIS_CLIENT_KEY_FILE.
    #[arg(long, env, default_value = "", hide_default_value = true,
          value_parser = Setting(Optional(Pem(PemKind::Certificates))))]
    pub redis_client_cert_file: ::std::option::Option<PemFile>,

    /// PEM private key of REDIS_CLIENT_CERT_FILE; both or neither.
    #[arg(long, env, default_value = "", hide_default_value = true,
          value_parser = Setting(Optional(Pem(PemKind::PrivateKey))))]
    pub redis_client_key_file: ::std::option::Option<PemFile>,

    /// How long a cached template is fresh (its soft TTL), in seconds.
    #[arg(long, env, default_value = "30", value_parser = Setting(SECONDS))]
    pub cache_ttl_secs: Duration,

    /// How much longer Redis keeps it, to answer at once while one background refresh reloads
    /// it; 0 makes expiry a plain miss.
    #[arg(long, env, default_value = "30", value_parser = Setting(SECONDS_OR_OFF))]
    pub cache_grace_secs: Duration,

    /// Each write's TTL is spread by up to this many percent either way (0-50).
    #[arg(long, env, default_value = "10", value_parser = Setting(PERCENT))]
    pub ttl_jitter_pct: u64,

    /// KeyOwner actors, each on its own thread (default: cores / 2, at least 1).
    #[arg(long, env, default_value_t = default_shards(), value_parser = Setting(COUNT))]
    pub key_owner_shards: u64,

    /// PostgreSQL connections at most.
    #[arg(long, env, default_value = "10", value_parser = Setting(COUNT))]
    pub db_pool_size: u64,

    /// Connections kept open while idle, opened at start-up and replaced in the background
    /// (0 to DB_POOL_SIZE; default: DB_POOL_SIZE).
    #[arg(long, env, default_value = "", hide_default_value = true,
          value_parser = Setting(Optional(IDLE_CONNECTIONS)))]
    pub db_pool_min_idle: ::std::option::Option<u64>,

    /// Longest time to open one connection, off the request path, in milliseconds.
    #[arg(long, env, default_value = "5000", value_parser = Setting(MILLIS))]
    pub db_connect_timeout_ms: Duration,

    /// Most template ids sent in one query when loads queue for a connection (1 sends every load
    /// alone).
    #[arg(long, env, default_value = "100", value_parser = Setting(COUNT))]
    pub db_batch_max: u64,

    /// Longest a query may run, in milliseconds; then the server is asked to cancel it.
    #[arg(long, env, default_value = "1000", value_parser = Setting(MILLIS))]
    pub db_query_timeout_ms: Duration,

    /// Longest wait for one Redis command (and for connecting), in milliseconds.
    #[arg(long, env, default_value = "50", value_parser = Setting(MILLIS))]
    pub redis_timeout_ms: Duration,

    /// No /template-details request is answered later than this, in milliseconds.
    #[arg(long, env, default_value = "2000", value_parser = Setting(MILLIS))]
    pub request_timeout_ms: Duration,

    /// Longest one flight (cache read, load, cache write) may take before its waiters get an
    /// error and the key is released, in milliseconds.
    #[arg(long, env, default_value = "5000", value_parser = Setting(MILLIS))]
    pub flight_timeout_ms: Duration,

    /// off turns deduplication (and the near and worker caches) off, for measuring what they
    /// save.
    #[arg(long, env, default_value = "on", action = ArgAction::Set, value_parser = Setting(OnOff))]
    pub coalesce: bool,

    /// How long a KeyOwner answers a key from its own memory without asking Redis, in
    /// milliseconds; 0 disables.
    #[arg(long, env, default_value = "1000", value_parser = Setting(MILLIS_OR_OFF))]
    pub near_cache_ttl_ms: Duration,

    /// Keys each owner remembers (least recently used are forgotten first).
    #[arg(long, env, default_value = "10000", value_parser = Setting(COUNT))]
    pub near_cache_capacity: u64,

    /// Fresh answers each HTTP worker keeps, to answer a hot key without a message to its owner;
    /// 0 turns it off.
    #[arg(long, env, default_value = "10000", value_parser = Setting(COUNT_OR_OFF))]
    pub worker_cache_capacity: u64,

    /// Memory for all the service's caches together, in MB (1,000,000 bytes): the HTTP
    /// workers' caches share half, the owners' near caches (and stale values) the other half,
    /// each evicting least recently used by bytes; a body larger than its cache's share is
    /// served but not kept in memory.
    #[arg(long, env, default_value = "64", value_parser = Setting(MEGABYTES))]
    pub cache_memory_mb: u64,

    /// Memory for the bodies the flights in the air hold, in MB, each owner an equal part: a
    /// request that would start a flight beyond it is answered 503 at once.
    #[arg(long, env, default_value = "32", value_parser = Setting(MEGABYTES))]
    pub inflight_memory_mb: u64,

    /// How long after an owner last saw a value it may still serve it when a fresh load fails,
    /// in seconds; 0 disables.
    #[arg(long, env, default_value = "300", value_parser = Setting(SECONDS_OR_OFF))]
    pub max_stale_secs: Duration,

    /// How long "no such template" is cached, in seconds; 0 disables.
    #[arg(long, env, default_value = "5", value_parser = Setting(SECONDS_OR_OFF))]
    pub negative_ttl_secs: Duration,

    /// Keys loading at once per owner; a request for one more key is answered 503 at once.
    #[arg(long, env, default_value = "10000", value_parser = Setting(COUNT))]
    pub max_pending_keys: u64,

    /// Requests waiting on one key's load; one more is answered 503 at once.
    #[arg(long, env, default_value = "10000", value_parser = Setting(COUNT))]
    pub max_waiters_per_key: u64,

    /// Consecutive Redis timeouts, refusals or I/O errors that open the circuit breaker.
    #[arg(long, env, default_value = "5", value_parser = Setting(COUNT))]
    pub breaker_failures: u64,

    /// How long an open breaker skips Redis before it probes it, in milliseconds.
    #[arg(long, env, default_value = "1000", value_parser = Setting(MILLIS))]
    pub breaker_open_ms: Duration,

    /// After SIGTERM (or SIGINT), how long the service keeps serving with /readyz answering 503
    /// before it stops accepting, in milliseconds; 0 stops accepting at once.
    #[arg(long, env, default_value = "3000", value_parser = Setting(MILLIS_OR_OFF))]
    pub shutdown_drain_ms: Duration,

    /// How long a replica's lease to load a key for the fleet lasts without renewal, in
    /// milliseconds (100-60000); 0 turns the fleet lease off.
    #[arg(long, env, default_value = "1000", value_parser = Setting(LEASE_MILLIS))]
    pub lease_ttl_ms: Duration,

    /// Put before every Redis key and pub/sub channel the service uses (e.g. shop-a:), so that
    /// deployments sharing one Redis keep apart; empty keeps template:{N}.
    #[arg(long, env, default_value = "", hide_default_value = true,
          value_parser = Setting(KeyPrefix))]
    pub cache_key_prefix: String,

    /// Log filter (env_logger syntax, e.g. info or singleflight=debug).
    #[arg(long, env, default_value = "info", value_parser = Setting(Text))]
    pub rust_log: String,

    /// An OpenTelemetry collector's OTLP/HTTP base URL (e.g. http://otel-collector:4318): spans
    /// of every request and flight stage are exported to its /v1/traces, and the other OTEL_*
    /// variables apply (protocol, headers, sampler, service name); unset, none are exported.
    #[arg(long, env, default_value = "", hide_default_value = true,
          value_parser = Setting(Optional(HTTP_URL)))]
    pub otel_exporter_otlp_endpoint: ::std::option::Option<String>,

    /// Retired: a load now waits for a connection as long as its flight has left.
    #[arg(long, env, default_value = "", hide = true,
          value_parser = Setting(Retired(
              "it unset: it was retired, since a load now waits for a connection as long as its \
               flight has left (FLIGHT_TIMEOUT_MS), and connections are opened in the background \
               within DB_CONNECT_TIMEOUT_MS")))]
    pub db_acquire_timeout_ms: NotSet,
}

fn default_parallelism() -> u64 {
    std::thread::available_parallelism().map_or(2, |n| n.get() as u64)
}

/// One owner shard per two cores: each shard is a thread of its own, and on a 2-core machine a
/// second owner thread competes with the HTTP workers for the same cores (see BENCHMARKS.md).
fn default_shards() -> u64 {
    (default_parallelism() / 2).max(1)
}
