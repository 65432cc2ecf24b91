//! All settings, read once from environment variables (12-factor) or the command line.
//!
//! Every setting is defined once, in [`options`]: its variable, its meaning (`singleflight
//! --help`), its default and the kind of value it accepts ([`kinds`]). A value that does not
//! parse stops start-up with a [`ConfigError`] naming the variable and what it accepts: a typo
//! in `CACHE_TTL_SECS` must not silently become the default.

mod kinds;
mod options;

use std::borrow::Cow;
use std::collections::HashMap;
use std::ffi::OsString;
use std::net::SocketAddr;
use std::time::Duration;

use clap::{CommandFactory, FromArgMatches};

use crate::telemetry::TelemetrySettings;
use crate::tls::PemFile;
use options::{Cli, Options};

pub use options::Action;

/// The service's settings. Built by [`Invocation::from_command_line`] in `main`, by
/// [`Settings::from_env`] or [`Settings::from_vars`], or directly by tests.
#[derive(Debug, Clone)]
pub struct Settings {
    /// `HTTP_ADDR`: where the HTTP server listens. Port 0 picks a free port (tests).
    pub http_addr: SocketAddr,
    /// `ADMIN_ADDR`: when set, `/metrics`, `/healthz` and `/readyz` are served on this address
    /// and not on `HTTP_ADDR` (unset: everything on `HTTP_ADDR`, as the seed has it).
    pub admin_addr: Option<SocketAddr>,
    /// `HTTP_WORKERS`: actix-web worker threads (default: number of cores).
    pub http_workers: usize,
    /// `DATABASE_URL`: PostgreSQL connection URL; its `sslmode` (libpq's values, default
    /// `prefer`) says whether to encrypt and what to check (see [`crate::tls`]).
    pub database_url: String,
    /// `DATABASE_LISTEN_URL`: a direct connection to the primary for the work that needs a
    /// session of its own — `LISTEN` for change notifications and the migration lock — when
    /// `DATABASE_URL` goes through a transaction-mode pooler (unset: `DATABASE_URL`).
    pub database_listen_url: Option<String>,
    /// `DATABASE_READ_URL`: read replicas (comma-separated), which loads go to unless a replica
    /// may not have replayed a change the service knows of.
    pub database_read_urls: Vec<String>,
    /// `DATABASE_POOLER`: whether `DATABASE_URL` goes through a transaction-mode pooler, which
    /// keeps no session state from one transaction to the next (see [`Pooler`]).
    pub database_pooler: Pooler,
    /// `MIGRATE`: `on` applies pending migrations at start-up; `off` only checks that the
    /// schema and trigger the service needs are there (a database the service does not own).
    pub migrate: bool,
    /// `DATABASE_CA_FILE`: PEM CA certificates for `sslmode=verify-ca|verify-full` (unset: the
    /// system's trust store).
    pub database_ca: Option<PemFile>,
    /// `REDIS_URL`: Redis connection URL (`rediss://` for TLS), or comma-separated seed nodes
    /// of a cluster.
    pub redis_url: String,
    /// `REDIS_SENTINELS`: the sentinels to ask for the master (none: `REDIS_URL` names it).
    pub redis_sentinels: Vec<String>,
    /// `REDIS_SENTINEL_MASTER`: the name the sentinels watch the master under.
    pub redis_sentinel_master: String,
    /// `REDIS_CA_FILE`: PEM CA certificates for `rediss://` (unset: the system's trust store).
    pub redis_ca: Option<PemFile>,
    /// `REDIS_CLIENT_CERT_FILE` and `REDIS_CLIENT_KEY_FILE`: a client certificate (PEM chain)
    /// and its key, for a Redis that asks for one; both or neither.
    pub redis_client_cert: Option<(PemFile, PemFile)>,
    /// `CACHE_TTL_SECS`: how long a cached template is fresh (its soft TTL).
    pub cache_ttl: Duration,
    /// `CACHE_GRACE_SECS`: how much longer Redis keeps it, to answer while one background
    /// refresh runs (refresh-ahead); zero makes expiry a plain miss.
    pub cache_grace: Duration,
    /// `TTL_JITTER_PCT`: each write's TTL is spread by up to this many percent either way.
    pub ttl_jitter_pct: u32,
    /// `KEY_OWNER_SHARDS`: number of KeyOwner actors, each on its own thread.
    pub key_owner_shards: usize,
    /// `DB_POOL_SIZE`: maximum PostgreSQL connections held by the DbActor's pool.
    pub db_pool_size: u32,
    /// `DB_POOL_MIN_IDLE`: connections kept open while idle, opened at start and replaced in the
    /// background, so that no request waits for one to be opened (at most `DB_POOL_SIZE`).
    pub db_pool_min_idle: u32,
    /// `DB_CONNECT_TIMEOUT_MS`: longest time to open one connection (off the request path).
    pub db_connect_timeout: Duration,
    /// `DB_BATCH_MAX`: most template ids sent in one query when loads queue for a connection
    /// (1 sends every load alone).
    pub db_batch_max: usize,
    /// `DB_QUERY_TIMEOUT_MS`: longest a query may run; the server is then asked to cancel it.
    pub db_query_timeout: Duration,
    /// `REDIS_TIMEOUT_MS`: longest wait for one Redis command (and for connecting).
    pub redis_timeout: Duration,
    /// `REQUEST_TIMEOUT_MS`: no `/template-details` request is answered later than this.
    pub request_timeout: Duration,
    /// `FLIGHT_TIMEOUT_MS`: longest a flight (cache read, DB load, cache write) may take before
    /// every waiter is answered with an error and the key is released.
    pub flight_timeout: Duration,
    /// `COALESCE`: `on` deduplicates concurrent loads of one key; `off` is the A/B baseline.
    pub coalesce: bool,
    /// `NEAR_CACHE_TTL_MS`: how long an owner serves a key from its own memory without asking
    /// Redis; zero disables the near cache.
    pub near_cache_ttl: Duration,
    /// `NEAR_CACHE_CAPACITY`: keys each owner remembers (least recently used go first).
    pub near_cache_capacity: usize,
    /// `WORKER_CACHE_CAPACITY`: fresh answers each HTTP worker keeps to answer without a message
    /// to the key's owner (never longer than the owner's near cache would); 0 turns it off.
    pub worker_cache_capacity: usize,
    /// `CACHE_MEMORY_MB`, in bytes: the budget of every cache together (see [`crate::memory`]).
    pub cache_memory_bytes: usize,
    /// `INFLIGHT_MEMORY_MB`, in bytes: what the flights in the air may hold together (see
    /// `actors::key_owner::in_air`).
    pub inflight_memory_bytes: usize,
    /// `MAX_STALE_SECS`: how old a remembered value may be and still be served (`X-Cache: STALE`)
    /// when loading a fresh one fails.
    pub max_stale: Duration,
    /// `NEGATIVE_TTL_SECS`: how long "no such template" is cached.
    pub negative_ttl: Duration,
    /// `MAX_PENDING_KEYS`: keys with a flight in progress per owner; beyond, requests for new
    /// keys are shed (503) at once.
    pub max_pending_keys: usize,
    /// `MAX_WAITERS_PER_KEY`: requests waiting on one flight; beyond, shed (503) at once.
    pub max_waiters_per_key: usize,
    /// `LEASE_TTL_MS`: how long a replica's claim to load a key for the whole fleet lasts
    /// without renewal (a holder renews it while it loads); zero turns the fleet lease off, so
    /// each replica coalesces only its own requests.
    pub lease_ttl: Duration,
    /// `CACHE_KEY_PREFIX`: before every Redis key and channel (empty: `template:N` as ever).
    pub cache_key_prefix: String,
    /// `BREAKER_FAILURES`: consecutive Redis failures that open the circuit breaker.
    pub breaker_failures: u32,
    /// `BREAKER_OPEN_MS`: how long an open breaker skips Redis before probing it.
    pub breaker_open: Duration,
    /// `SHUTDOWN_DRAIN_MS`: after SIGTERM, how long the service keeps serving with `/readyz`
    /// answering 503 (and every response closing its connection) before it stops accepting,
    /// so that its load balancer takes it out first (0: stop accepting at once).
    pub shutdown_drain: Duration,
}

/// The declared defaults ([`Options`]), as if no variable were set.
impl Default for Settings {
    fn default() -> Self {
        Settings::from_vars(&HashMap::new())
            .expect("the declared defaults are valid (a unit test checks them)")
    }
}

/// What sits between the service and PostgreSQL on `DATABASE_URL`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pooler {
    /// Found out at run time: loads start as over a direct connection, and the first sign that
    /// session state does not persist (a load that fails, then succeeds in a transaction)
    /// switches to `transaction` for good.
    Auto,
    /// A direct connection, or a session-mode pooler: prepared statements are kept per
    /// connection (one round trip per load).
    None,
    /// A transaction-mode pooler (PgBouncer, RDS Proxy, Supavisor...): every load runs in a
    /// transaction of its own, its statement prepared and closed within it.
    Transaction,
}

impl Settings {
    /// Each HTTP worker's cache's and each owner's near cache's share of `CACHE_MEMORY_MB`
    /// (the worker caches' half goes to the owners when the worker caches are off).
    pub fn cache_shares(&self) -> crate::memory::Shares {
        let workers = if self.coalesce && self.worker_cache_capacity > 0 {
            self.http_workers
        } else {
            0
        };
        crate::memory::Shares::split(self.cache_memory_bytes, workers, self.key_owner_shards)
    }

    /// The URL for session work (`LISTEN`, the migration lock).
    pub fn listen_url(&self) -> &str {
        self.database_listen_url
            .as_deref()
            .unwrap_or(&self.database_url)
    }
}

/// A configuration value that cannot be used. The message names the variable, the value and what
/// would be accepted, so the operator can fix it without reading code.
#[derive(Debug, Clone, thiserror::Error)]
#[error("invalid {var}={value:?}: expected {expected}")]
pub struct ConfigError {
    pub var: String,
    pub value: String,
    pub expected: Cow<'static, str>,
}

/// Why the command line gave no settings to run with.
#[derive(Debug)]
pub enum Rejected {
    /// A value that cannot be used.
    Config(ConfigError),
    /// Not a run: `--help` or `--version` (exit 0), or a command line that cannot be read, such as
    /// an unknown option (exit 2). clap's error prints the help, the version or the mistake.
    Clap(clap::Error),
}

impl From<clap::Error> for Rejected {
    /// Takes the [`ConfigError`] a kind of value put inside clap's error back out of it.
    fn from(e: clap::Error) -> Self {
        match std::error::Error::source(&e).and_then(|s| s.downcast_ref::<ConfigError>()) {
            Some(config) => Rejected::Config(config.clone()),
            None => Rejected::Clap(e),
        }
    }
}

impl From<Rejected> for ConfigError {
    /// For callers that give no command line, where only a value can be wrong.
    fn from(rejected: Rejected) -> Self {
        match rejected {
            Rejected::Config(e) => e,
            Rejected::Clap(e) => ConfigError {
                var: "the command line".to_owned(),
                value: String::new(),
                expected: e.render().to_string().into(),
            },
        }
    }
}

/// What `singleflight` was asked to do, and the settings to do it with.
#[derive(Debug)]
pub struct Invocation {
    /// `None`: serve.
    pub action: Option<Action>,
    /// `RUST_LOG` and `OTEL_EXPORTER_OTLP_ENDPOINT`: what the logger and the span exporter are
    /// installed with, once per process.
    pub telemetry: TelemetrySettings,
    pub settings: Settings,
}

impl Invocation {
    /// Reads the process's command line and environment; an option on the command line wins
    /// over its variable.
    pub fn from_command_line() -> Result<Self, Rejected> {
        Self::parse(std::env::args_os())
    }

    /// Reads `args` (the program's name first) and the process environment.
    pub fn parse<I, T>(args: I) -> Result<Self, Rejected>
    where
        I: IntoIterator<Item = T>,
        T: Into<OsString> + Clone,
    {
        Self::parse_with(command(), args)
    }

    fn parse_with<I, T>(command: clap::Command, args: I) -> Result<Self, Rejected>
    where
        I: IntoIterator<Item = T>,
        T: Into<OsString> + Clone,
    {
        let matches = command.try_get_matches_from(args)?;
        let Cli { action, options } = Cli::from_arg_matches(&matches)?;
        let (telemetry, settings) = options.into_settings().map_err(Rejected::Config)?;
        Ok(Invocation {
            action,
            telemetry,
            settings,
        })
    }
}

/// The command line: every setting as `--the-variable` and `THE_VARIABLE`, with `--help` and
/// `--version`. Environment values are not shown in the help: URLs carry passwords.
pub fn command() -> clap::Command {
    Cli::command().mut_args(|arg| arg.hide_env_values(true))
}

impl Settings {
    /// Reads the process environment.
    pub fn from_env() -> Result<Self, ConfigError> {
        Ok(Invocation::parse(["singleflight"])?.settings)
    }

    /// Reads settings from a map of variables alone; absent or blank variables take the default.
    ///
    /// Every variable is handed to clap as its option, blank when the map lacks it: so the
    /// process environment, which clap would read otherwise, plays no part.
    pub fn from_vars(vars: &HashMap<String, String>) -> Result<Self, ConfigError> {
        let command = command();
        let options: Vec<String> = command
            .get_arguments()
            .filter_map(|arg| {
                let var = arg.get_env()?.to_str()?;
                let value = vars.get(var).map_or("", String::as_str);
                Some(format!("--{}={value}", arg.get_long()?))
            })
            .collect();
        let args = std::iter::once("singleflight".to_owned()).chain(options);
        Ok(Invocation::parse_with(command, args)?.settings)
    }
}

impl Options {
    /// The settings, once the checks that involve more than one variable pass; and the log
    /// filter and the span exporter's collector, which are not settings of the service but of
    /// the process's logger and span subscriber.
    fn into_settings(self) -> Result<(TelemetrySettings, Settings), ConfigError> {
        // Every field is named, so that an option cannot be defined and then forgotten here.
        let Options {
            http_addr,
            admin_addr,
            http_workers,
            database_url,
            database_listen_url,
            database_read_url,
            database_pooler,
            migrate,
            database_ca_file,
            redis_url,
            redis_sentinels,
            redis_sentinel_master,
            redis_ca_file,
            redis_client_cert_file,
            redis_client_key_file,
            cache_ttl_secs,
            cache_grace_secs,
            ttl_jitter_pct,
            key_owner_shards,
            db_pool_size,
            db_pool_min_idle,
            db_connect_timeout_ms,
            db_batch_max,
            db_query_timeout_ms,
            redis_timeout_ms,
            request_timeout_ms,
            flight_timeout_ms,
            coalesce,
            near_cache_ttl_ms,
            near_cache_capacity,
            worker_cache_capacity,
            cache_memory_mb,
            inflight_memory_mb,
            max_stale_secs,
            negative_ttl_secs,
            max_pending_keys,
            max_waiters_per_key,
            breaker_failures,
            breaker_open_ms,
            shutdown_drain_ms,
            lease_ttl_ms,
            cache_key_prefix,
            rust_log,
            otel_exporter_otlp_endpoint,
            db_acquire_timeout_ms: kinds::NotSet,
        } = self;
        // Unset: keep every connection of the pool open.
        let db_pool_min_idle = match db_pool_min_idle {
            None => db_pool_size,
            Some(idle) if idle <= db_pool_size => idle,
            Some(idle) => {
                return Err(ConfigError {
                    var: "DB_POOL_MIN_IDLE".to_owned(),
                    value: idle.to_string(),
                    expected: kinds::IDLE_CONNECTIONS.expected().into(),
                })
            }
        };
        let settings = Settings {
            http_addr,
            admin_addr,
            http_workers: http_workers as usize,
            database_url,
            database_listen_url,
            database_read_urls: database_read_url,
            database_pooler,
            migrate,
            database_ca: database_ca_file,
            redis_url,
            redis_sentinels,
            redis_sentinel_master,
            redis_ca: redis_ca_file,
            redis_client_cert: client_cert(redis_client_cert_file, redis_client_key_file)?,
            cache_ttl: cache_ttl_secs,
            cache_grace: cache_grace_secs,
            ttl_jitter_pct: ttl_jitter_pct as u32,
            key_owner_shards: key_owner_shards as usize,
            db_pool_size: db_pool_size as u32,
            db_pool_min_idle: db_pool_min_idle as u32,
            db_connect_timeout: db_connect_timeout_ms,
            db_batch_max: db_batch_max as usize,
            db_query_timeout: db_query_timeout_ms,
            redis_timeout: redis_timeout_ms,
            request_timeout: request_timeout_ms,
            flight_timeout: flight_timeout_ms,
            coalesce,
            near_cache_ttl: near_cache_ttl_ms,
            near_cache_capacity: near_cache_capacity as usize,
            worker_cache_capacity: worker_cache_capacity as usize,
            cache_memory_bytes: cache_memory_mb as usize * 1_000_000,
            inflight_memory_bytes: inflight_memory_mb as usize * 1_000_000,
            max_stale: max_stale_secs,
            negative_ttl: negative_ttl_secs,
            max_pending_keys: max_pending_keys as usize,
            max_waiters_per_key: max_waiters_per_key as usize,
            lease_ttl: lease_ttl_ms,
            cache_key_prefix,
            breaker_failures: breaker_failures as u32,
            breaker_open: breaker_open_ms,
            shutdown_drain: shutdown_drain_ms,
        };
        let telemetry = TelemetrySettings {
            log_filter: rust_log,
            otlp_endpoint: otel_exporter_otlp_endpoint,
        };
        Ok((telemetry, settings))
    }
}

/// A client certificate and its key: both or neither.
fn client_cert(
    cert: Option<PemFile>,
    key: Option<PemFile>,
) -> Result<Option<(PemFile, PemFile)>, ConfigError> {
    let (cert_var, key_var) = ("REDIS_CLIENT_CERT_FILE", "REDIS_CLIENT_KEY_FILE");
    match (cert, key) {
        (Some(cert), Some(key)) => Ok(Some((cert, key))),
        (None, None) => Ok(None),
        (Some(cert), None) => Err(ConfigError {
            var: key_var.to_owned(),
            value: String::new(),
            expected: format!("the key of {cert_var}={}", cert.path.display()).into(),
        }),
        (None, Some(key)) => Err(ConfigError {
            var: cert_var.to_owned(),
            value: String::new(),
            expected: format!("the certificate for {key_var}={}", key.path.display()).into(),
        }),
    }
}

#[cfg(test)]
mod tests;
