//! All settings, read once from environment variables (12-factor).
//!
//! Every variable has a default that gives a working local service. A value that does not parse
//! stops start-up with a [`ConfigError`] naming the variable and what it accepts: a typo in
//! `CACHE_TTL_SECS` must not silently become the default.

use std::borrow::Cow;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use crate::tls::{PemFile, PemKind, SslMode};

/// The service's settings. Built by [`Settings::from_env`] in `main`, or directly by tests.
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
    /// `REDIS_URL`: Redis connection URL (`rediss://` for TLS).
    pub redis_url: String,
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
    /// `BREAKER_FAILURES`: consecutive Redis failures that open the circuit breaker.
    pub breaker_failures: u32,
    /// `BREAKER_OPEN_MS`: how long an open breaker skips Redis before probing it.
    pub breaker_open: Duration,
    /// `SHUTDOWN_DRAIN_MS`: after SIGTERM, how long the service keeps serving with `/readyz`
    /// answering 503 (and every response closing its connection) before it stops accepting,
    /// so that its load balancer takes it out first (0: stop accepting at once).
    pub shutdown_drain: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            http_addr: SocketAddr::from(([0, 0, 0, 0], 8080)),
            admin_addr: None,
            http_workers: default_parallelism(),
            database_url: "postgres://postgres@127.0.0.1:5432/singleflight".to_owned(),
            database_listen_url: None,
            database_read_urls: Vec::new(),
            database_pooler: Pooler::Auto,
            migrate: true,
            database_ca: None,
            redis_url: "redis://127.0.0.1:6379/".to_owned(),
            redis_ca: None,
            redis_client_cert: None,
            cache_ttl: Duration::from_secs(30),
            cache_grace: Duration::from_secs(30),
            ttl_jitter_pct: 10,
            key_owner_shards: default_shards(),
            db_pool_size: 10,
            db_pool_min_idle: 10,
            db_connect_timeout: Duration::from_millis(5000),
            db_batch_max: 100,
            db_query_timeout: Duration::from_millis(1000),
            redis_timeout: Duration::from_millis(50),
            request_timeout: Duration::from_millis(2000),
            flight_timeout: Duration::from_millis(5000),
            coalesce: true,
            near_cache_ttl: Duration::from_millis(1000),
            near_cache_capacity: 10_000,
            worker_cache_capacity: 10_000,
            max_stale: Duration::from_secs(300),
            negative_ttl: Duration::from_secs(5),
            max_pending_keys: 10_000,
            max_waiters_per_key: 10_000,
            lease_ttl: Duration::from_millis(1000),
            breaker_failures: 5,
            breaker_open: Duration::from_millis(1000),
            shutdown_drain: Duration::from_millis(3000),
        }
    }
}

fn default_parallelism() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get())
}

/// One owner shard per two cores: each shard is a thread of its own, and on a 2-core machine a
/// second owner thread competes with the HTTP workers for the same cores (see BENCHMARKS.md).
fn default_shards() -> usize {
    (default_parallelism() / 2).max(1)
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

impl std::str::FromStr for Pooler {
    type Err = ();

    fn from_str(s: &str) -> Result<Self, ()> {
        match s.to_ascii_lowercase().as_str() {
            "auto" => Ok(Pooler::Auto),
            "none" => Ok(Pooler::None),
            "transaction" => Ok(Pooler::Transaction),
            _ => Err(()),
        }
    }
}

impl Settings {
    /// The URL for session work (`LISTEN`, the migration lock).
    pub fn listen_url(&self) -> &str {
        self.database_listen_url
            .as_deref()
            .unwrap_or(&self.database_url)
    }
}

/// A configuration value that cannot be used. The message names the variable, the value and what
/// would be accepted, so the operator can fix it without reading code.
#[derive(Debug, thiserror::Error)]
#[error("invalid {var}={value:?}: expected {expected}")]
pub struct ConfigError {
    pub var: &'static str,
    pub value: String,
    pub expected: Cow<'static, str>,
}

impl Settings {
    /// Reads the process environment.
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_vars(&std::env::vars().collect())
    }

    /// Reads settings from a map of variables; absent or empty variables take the default.
    ///
    /// One row per variable: its field, its name, the kind of value it takes (which says what is
    /// accepted, and so what an error says), and its default.
    pub fn from_vars(vars: &HashMap<String, String>) -> Result<Self, ConfigError> {
        let env = Vars(vars);
        let d = Settings::default();
        env.retired(
            "DB_ACQUIRE_TIMEOUT_MS",
            "it unset: it was retired, since a load now waits for a connection as long as its \
             flight has left (FLIGHT_TIMEOUT_MS), and connections are opened in the background \
             within DB_CONNECT_TIMEOUT_MS",
        )?;
        // Read first: DB_POOL_MIN_IDLE is bounded by it, and defaults to it (unset: keep every
        // connection of the pool open).
        let db_pool_size = env.positive("DB_POOL_SIZE", d.db_pool_size as usize)? as u32;
        Ok(Settings {
            http_addr: env.parse("HTTP_ADDR", "an address like 0.0.0.0:8080", d.http_addr)?,
            admin_addr: env.read(
                "ADMIN_ADDR",
                "an address like 0.0.0.0:9090, or unset",
                None,
                |v| v.parse().ok().map(Some),
            )?,
            http_workers: env.positive("HTTP_WORKERS", d.http_workers)?,
            database_url: env.url("DATABASE_URL", POSTGRES_URL, d.database_url)?,
            database_listen_url: env.optional_url("DATABASE_LISTEN_URL", POSTGRES_URL)?,
            database_read_urls: env.url_list("DATABASE_READ_URL", POSTGRES_URL)?,
            database_pooler: env.parse(
                "DATABASE_POOLER",
                "auto, none or transaction",
                d.database_pooler,
            )?,
            migrate: env.on_off("MIGRATE", d.migrate)?,
            database_ca: env.pem_file("DATABASE_CA_FILE", PemKind::Certificates)?,
            redis_url: env.url("REDIS_URL", REDIS_URL, d.redis_url)?,
            redis_ca: env.pem_file("REDIS_CA_FILE", PemKind::Certificates)?,
            redis_client_cert: env
                .client_cert("REDIS_CLIENT_CERT_FILE", "REDIS_CLIENT_KEY_FILE")?,
            cache_ttl: Duration::from_secs(
                env.positive("CACHE_TTL_SECS", d.cache_ttl.as_secs() as usize)? as u64,
            ),
            cache_grace: env.secs_or_zero("CACHE_GRACE_SECS", d.cache_grace)?,
            ttl_jitter_pct: env.percent("TTL_JITTER_PCT", d.ttl_jitter_pct)?,
            key_owner_shards: env.positive("KEY_OWNER_SHARDS", d.key_owner_shards)?,
            db_pool_size,
            db_pool_min_idle: env
                .whole(
                    "DB_POOL_MIN_IDLE",
                    "a whole number from 0 to DB_POOL_SIZE",
                    0..=u64::from(db_pool_size),
                )?
                .map_or(db_pool_size, |n| n as u32),
            db_connect_timeout: env.millis("DB_CONNECT_TIMEOUT_MS", 1, d.db_connect_timeout)?,
            db_batch_max: env.positive("DB_BATCH_MAX", d.db_batch_max)?,
            db_query_timeout: env.millis("DB_QUERY_TIMEOUT_MS", 1, d.db_query_timeout)?,
            redis_timeout: env.millis("REDIS_TIMEOUT_MS", 1, d.redis_timeout)?,
            request_timeout: env.millis("REQUEST_TIMEOUT_MS", 1, d.request_timeout)?,
            flight_timeout: env.millis("FLIGHT_TIMEOUT_MS", 1, d.flight_timeout)?,
            coalesce: env.on_off("COALESCE", d.coalesce)?,
            near_cache_ttl: env.millis("NEAR_CACHE_TTL_MS", 0, d.near_cache_ttl)?,
            near_cache_capacity: env.positive("NEAR_CACHE_CAPACITY", d.near_cache_capacity)?,
            worker_cache_capacity: env
                .whole(
                    "WORKER_CACHE_CAPACITY",
                    "a whole number from 0 (off) to 100000",
                    0..=100_000,
                )?
                .map_or(d.worker_cache_capacity, |n| n as usize),
            max_stale: env.secs_or_zero("MAX_STALE_SECS", d.max_stale)?,
            negative_ttl: env.secs_or_zero("NEGATIVE_TTL_SECS", d.negative_ttl)?,
            max_pending_keys: env.positive("MAX_PENDING_KEYS", d.max_pending_keys)?,
            max_waiters_per_key: env.positive("MAX_WAITERS_PER_KEY", d.max_waiters_per_key)?,
            lease_ttl: env.lease_ttl("LEASE_TTL_MS", d.lease_ttl)?,
            breaker_failures: env.positive("BREAKER_FAILURES", d.breaker_failures as usize)? as u32,
            breaker_open: env.millis("BREAKER_OPEN_MS", 1, d.breaker_open)?,
            shutdown_drain: env.millis("SHUTDOWN_DRAIN_MS", 0, d.shutdown_drain)?,
        })
    }
}

/// What a URL variable accepts: its schemes, an example for the error message, and any further
/// check of the whole URL.
struct UrlKind {
    schemes: &'static [&'static str],
    example: &'static str,
    check: fn(&str) -> bool,
}

const POSTGRES_URL: UrlKind = UrlKind {
    schemes: &["postgres", "postgresql"],
    example: SslMode::EXPECTED,
    check: |url| SslMode::split_url(url).is_some(),
};

const REDIS_URL: UrlKind = UrlKind {
    schemes: &["redis", "rediss"],
    example: "a URL like redis://127.0.0.1:6379/ (rediss:// for TLS)",
    check: |_| true,
};

/// The variables, read by kind of value. Each reader takes the variable's name, returns the
/// default when it is absent or empty, and otherwise the value or a [`ConfigError`] naming the
/// variable, the value and what the kind accepts.
struct Vars<'a>(&'a HashMap<String, String>);

impl Vars<'_> {
    fn get(&self, var: &str) -> Option<&str> {
        self.0.get(var).map(|v| v.trim()).filter(|v| !v.is_empty())
    }

    /// The one way a variable is read: `default` when it is unset or empty; otherwise what `read`
    /// makes of its value, or, if that is nothing, an error naming the variable, the value and
    /// `expected`.
    fn read<T>(
        &self,
        var: &'static str,
        expected: &'static str,
        default: T,
        read: impl FnOnce(&str) -> Option<T>,
    ) -> Result<T, ConfigError> {
        let Some(v) = self.get(var) else {
            return Ok(default);
        };
        read(v).ok_or_else(|| ConfigError {
            var,
            value: v.to_owned(),
            expected: expected.into(),
        })
    }

    /// A variable that is no longer read: setting it is an error saying why.
    fn retired(&self, var: &'static str, why: &'static str) -> Result<(), ConfigError> {
        self.read(var, why, (), |_| None)
    }

    fn parse<T: std::str::FromStr>(
        &self,
        var: &'static str,
        expected: &'static str,
        default: T,
    ) -> Result<T, ConfigError> {
        self.read(var, expected, default, |v| v.parse().ok())
    }

    /// A whole number within `range`, or `None` when the variable is not set.
    fn whole(
        &self,
        var: &'static str,
        expected: &'static str,
        range: std::ops::RangeInclusive<u64>,
    ) -> Result<Option<u64>, ConfigError> {
        self.read(var, expected, None, |v| {
            v.parse().ok().filter(|n| range.contains(n)).map(Some)
        })
    }

    fn positive(&self, var: &'static str, default: usize) -> Result<usize, ConfigError> {
        let n = self.whole(var, "a whole number from 1 to 100000", 1..=100_000)?;
        Ok(n.map_or(default, |n| n as usize))
    }

    /// Milliseconds from `min` (0 meaning "off") to 600000.
    fn millis(
        &self,
        var: &'static str,
        min: u64,
        default: Duration,
    ) -> Result<Duration, ConfigError> {
        let expected = if min == 0 {
            "milliseconds, a whole number from 0 (off) to 600000"
        } else {
            "milliseconds, a whole number from 1 to 600000"
        };
        let n = self.whole(var, expected, min..=600_000)?;
        Ok(n.map_or(default, Duration::from_millis))
    }

    /// Zero (off), or long enough for a holder to renew its lease a few times per period.
    fn lease_ttl(&self, var: &'static str, default: Duration) -> Result<Duration, ConfigError> {
        let expected = "milliseconds: 0 (off), or a whole number from 100 to 60000";
        let n = self.read(var, expected, None, |v| {
            v.parse::<u64>()
                .ok()
                .filter(|n| *n == 0 || (100..=60_000).contains(n))
                .map(Some)
        })?;
        Ok(n.map_or(default, Duration::from_millis))
    }

    fn secs_or_zero(&self, var: &'static str, default: Duration) -> Result<Duration, ConfigError> {
        let expected = "seconds, a whole number from 0 (off) to 86400";
        let n = self.whole(var, expected, 0..=86_400)?;
        Ok(n.map_or(default, Duration::from_secs))
    }

    fn percent(&self, var: &'static str, default: u32) -> Result<u32, ConfigError> {
        let n = self.whole(var, "a whole percentage from 0 to 50", 0..=50)?;
        Ok(n.map_or(default, |n| n as u32))
    }

    fn on_off(&self, var: &'static str, default: bool) -> Result<bool, ConfigError> {
        self.read(var, "on or off", default, |v| {
            match v.to_ascii_lowercase().as_str() {
                "on" | "true" | "1" | "yes" => Some(true),
                "off" | "false" | "0" | "no" => Some(false),
                _ => None,
            }
        })
    }

    /// A URL, or `None` when the variable is unset.
    fn optional_url(
        &self,
        var: &'static str,
        kind: UrlKind,
    ) -> Result<Option<String>, ConfigError> {
        match self.get(var) {
            None => Ok(None),
            Some(_) => self.url(var, kind, String::new()).map(Some),
        }
    }

    /// Comma-separated URLs, each checked as [`Vars::url`] checks one; none when unset.
    fn url_list(&self, var: &'static str, kind: UrlKind) -> Result<Vec<String>, ConfigError> {
        let Some(list) = self.get(var) else {
            return Ok(Vec::new());
        };
        list.split(',')
            .map(str::trim)
            .map(|url| {
                let one = HashMap::from([(var.to_owned(), url.to_owned())]);
                Vars(&one)
                    .url(var, UrlKind { ..kind }, String::new())
                    .and_then(|read| {
                        if read.is_empty() {
                            Err(ConfigError {
                                var,
                                value: list.to_owned(),
                                expected: "comma-separated URLs with nothing empty between \
                                           the commas"
                                    .into(),
                            })
                        } else {
                            Ok(read)
                        }
                    })
            })
            .collect()
    }

    fn url(
        &self,
        var: &'static str,
        kind: UrlKind,
        default: String,
    ) -> Result<String, ConfigError> {
        self.read(var, kind.example, default, |v| {
            let scheme_ok = v
                .split_once("://")
                .is_some_and(|(scheme, rest)| kind.schemes.contains(&scheme) && !rest.is_empty());
            (scheme_ok && (kind.check)(v)).then(|| v.to_owned())
        })
    }

    /// A PEM file, read and checked now, so that a missing or wrong file stops start-up with the
    /// variable's name rather than failing every connection later.
    fn pem_file(&self, var: &'static str, kind: PemKind) -> Result<Option<PemFile>, ConfigError> {
        let Some(path) = self.get(var) else {
            return Ok(None);
        };
        let what = match kind {
            PemKind::Certificates => "a readable PEM file of certificates",
            PemKind::PrivateKey => "a readable PEM file with a private key",
        };
        PemFile::read(Path::new(path), kind)
            .map(Some)
            .map_err(|why| ConfigError {
                var,
                value: path.to_owned(),
                expected: format!("{what}; {why}").into(),
            })
    }

    /// A client certificate and its key: both or neither.
    fn client_cert(
        &self,
        cert_var: &'static str,
        key_var: &'static str,
    ) -> Result<Option<(PemFile, PemFile)>, ConfigError> {
        let cert = self.pem_file(cert_var, PemKind::Certificates)?;
        let key = self.pem_file(key_var, PemKind::PrivateKey)?;
        match (cert, key) {
            (Some(cert), Some(key)) => Ok(Some((cert, key))),
            (None, None) => Ok(None),
            (Some(cert), None) => Err(ConfigError {
                var: key_var,
                value: String::new(),
                expected: format!("the key of {cert_var}={}", cert.path.display()).into(),
            }),
            (None, Some(key)) => Err(ConfigError {
                var: cert_var,
                value: String::new(),
                expected: format!("the certificate for {key_var}={}", key.path.display()).into(),
            }),
        }
    }
}

#[cfg(test)]
mod tests;
