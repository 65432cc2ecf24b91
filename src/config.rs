//! All settings, read once from environment variables (12-factor).
//!
//! Every variable has a default that gives a working local service. A value that does not parse
//! stops start-up with a [`ConfigError`] naming the variable and what it accepts: a typo in
//! `CACHE_TTL_SECS` must not silently become the default.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

/// The service's settings. Built by [`Settings::from_env`] in `main`, or directly by tests.
#[derive(Debug, Clone)]
pub struct Settings {
    /// `HTTP_ADDR`: where the HTTP server listens. Port 0 picks a free port (tests).
    pub http_addr: SocketAddr,
    /// `HTTP_WORKERS`: actix-web worker threads (default: number of cores).
    pub http_workers: usize,
    /// `DATABASE_URL`: PostgreSQL connection URL.
    pub database_url: String,
    /// `REDIS_URL`: Redis connection URL.
    pub redis_url: String,
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
    /// `DB_QUERY_TIMEOUT_MS`: longest a query may run; also sent as `statement_timeout`.
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
    /// `BREAKER_FAILURES`: consecutive Redis failures that open the circuit breaker.
    pub breaker_failures: u32,
    /// `BREAKER_OPEN_MS`: how long an open breaker skips Redis before probing it.
    pub breaker_open: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            http_addr: SocketAddr::from(([0, 0, 0, 0], 8080)),
            http_workers: default_parallelism(),
            database_url: "postgres://postgres@127.0.0.1:5432/singleflight".to_owned(),
            redis_url: "redis://127.0.0.1:6379/".to_owned(),
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
            max_stale: Duration::from_secs(300),
            negative_ttl: Duration::from_secs(5),
            max_pending_keys: 10_000,
            max_waiters_per_key: 10_000,
            breaker_failures: 5,
            breaker_open: Duration::from_millis(1000),
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

/// A configuration value that cannot be used. The message names the variable, the value and what
/// would be accepted, so the operator can fix it without reading code.
#[derive(Debug, thiserror::Error)]
#[error("invalid {var}={value:?}: expected {expected}")]
pub struct ConfigError {
    pub var: &'static str,
    pub value: String,
    pub expected: &'static str,
}

impl Settings {
    /// Reads the process environment.
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_vars(&std::env::vars().collect())
    }

    /// Reads settings from a map of variables; absent or empty variables take the default.
    pub fn from_vars(vars: &HashMap<String, String>) -> Result<Self, ConfigError> {
        let get = |name: &str| vars.get(name).map(|v| v.trim()).filter(|v| !v.is_empty());
        let d = Settings::default();
        if let Some(v) = get("DB_ACQUIRE_TIMEOUT_MS") {
            return Err(ConfigError {
                var: "DB_ACQUIRE_TIMEOUT_MS",
                value: v.to_owned(),
                expected: "it unset: it was retired, since a load now waits for a connection as \
                           long as its flight has left (FLIGHT_TIMEOUT_MS), and connections are \
                           opened in the background within DB_CONNECT_TIMEOUT_MS",
            });
        }
        let settings = Settings {
            http_addr: parse(
                get("HTTP_ADDR"),
                "HTTP_ADDR",
                "an address like 0.0.0.0:8080",
                d.http_addr,
            )?,
            http_workers: positive(get("HTTP_WORKERS"), "HTTP_WORKERS", d.http_workers)?,
            database_url: url(
                get("DATABASE_URL"),
                "DATABASE_URL",
                &["postgres", "postgresql"],
                d.database_url,
            )?,
            redis_url: url(get("REDIS_URL"), "REDIS_URL", &["redis"], d.redis_url)?,
            cache_ttl: Duration::from_secs(positive(
                get("CACHE_TTL_SECS"),
                "CACHE_TTL_SECS",
                d.cache_ttl.as_secs() as usize,
            )? as u64),
            cache_grace: secs_or_zero(get("CACHE_GRACE_SECS"), "CACHE_GRACE_SECS", d.cache_grace)?,
            ttl_jitter_pct: percent(get("TTL_JITTER_PCT"), "TTL_JITTER_PCT", d.ttl_jitter_pct)?,
            key_owner_shards: positive(
                get("KEY_OWNER_SHARDS"),
                "KEY_OWNER_SHARDS",
                d.key_owner_shards,
            )?,
            db_pool_size: positive(get("DB_POOL_SIZE"), "DB_POOL_SIZE", d.db_pool_size as usize)?
                as u32,
            db_pool_min_idle: match whole(
                get("DB_POOL_MIN_IDLE"),
                "DB_POOL_MIN_IDLE",
                "a whole number from 0 to DB_POOL_SIZE",
                0..=100_000,
            )? {
                Some(n) => n as u32,
                // Unset: keep every connection of the pool open.
                None => {
                    positive(get("DB_POOL_SIZE"), "DB_POOL_SIZE", d.db_pool_size as usize)? as u32
                }
            },
            db_connect_timeout: millis(
                get("DB_CONNECT_TIMEOUT_MS"),
                "DB_CONNECT_TIMEOUT_MS",
                1,
                d.db_connect_timeout,
            )?,
            db_batch_max: positive(get("DB_BATCH_MAX"), "DB_BATCH_MAX", d.db_batch_max)?,
            db_query_timeout: millis(
                get("DB_QUERY_TIMEOUT_MS"),
                "DB_QUERY_TIMEOUT_MS",
                1,
                d.db_query_timeout,
            )?,
            redis_timeout: millis(
                get("REDIS_TIMEOUT_MS"),
                "REDIS_TIMEOUT_MS",
                1,
                d.redis_timeout,
            )?,
            request_timeout: millis(
                get("REQUEST_TIMEOUT_MS"),
                "REQUEST_TIMEOUT_MS",
                1,
                d.request_timeout,
            )?,
            flight_timeout: millis(
                get("FLIGHT_TIMEOUT_MS"),
                "FLIGHT_TIMEOUT_MS",
                1,
                d.flight_timeout,
            )?,
            coalesce: on_off(get("COALESCE"), "COALESCE", d.coalesce)?,
            near_cache_ttl: millis(
                get("NEAR_CACHE_TTL_MS"),
                "NEAR_CACHE_TTL_MS",
                0,
                d.near_cache_ttl,
            )?,
            near_cache_capacity: positive(
                get("NEAR_CACHE_CAPACITY"),
                "NEAR_CACHE_CAPACITY",
                d.near_cache_capacity,
            )?,
            max_stale: secs_or_zero(get("MAX_STALE_SECS"), "MAX_STALE_SECS", d.max_stale)?,
            negative_ttl: secs_or_zero(
                get("NEGATIVE_TTL_SECS"),
                "NEGATIVE_TTL_SECS",
                d.negative_ttl,
            )?,
            max_pending_keys: positive(
                get("MAX_PENDING_KEYS"),
                "MAX_PENDING_KEYS",
                d.max_pending_keys,
            )?,
            max_waiters_per_key: positive(
                get("MAX_WAITERS_PER_KEY"),
                "MAX_WAITERS_PER_KEY",
                d.max_waiters_per_key,
            )?,
            breaker_failures: positive(
                get("BREAKER_FAILURES"),
                "BREAKER_FAILURES",
                d.breaker_failures as usize,
            )? as u32,
            breaker_open: millis(get("BREAKER_OPEN_MS"), "BREAKER_OPEN_MS", 1, d.breaker_open)?,
        };
        if settings.db_pool_min_idle > settings.db_pool_size {
            return Err(ConfigError {
                var: "DB_POOL_MIN_IDLE",
                value: settings.db_pool_min_idle.to_string(),
                expected: "a whole number from 0 to DB_POOL_SIZE",
            });
        }
        Ok(settings)
    }
}

fn parse<T: std::str::FromStr>(
    raw: Option<&str>,
    var: &'static str,
    expected: &'static str,
    default: T,
) -> Result<T, ConfigError> {
    match raw {
        None => Ok(default),
        Some(v) => v.parse().map_err(|_| ConfigError {
            var,
            value: v.to_owned(),
            expected,
        }),
    }
}

/// A whole number within `range`, or `None` when the variable is not set.
fn whole(
    raw: Option<&str>,
    var: &'static str,
    expected: &'static str,
    range: std::ops::RangeInclusive<u64>,
) -> Result<Option<u64>, ConfigError> {
    let Some(v) = raw else { return Ok(None) };
    match v.parse::<u64>() {
        Ok(n) if range.contains(&n) => Ok(Some(n)),
        _ => Err(ConfigError {
            var,
            value: v.to_owned(),
            expected,
        }),
    }
}

fn positive(raw: Option<&str>, var: &'static str, default: usize) -> Result<usize, ConfigError> {
    let n = whole(raw, var, "a whole number from 1 to 100000", 1..=100_000)?;
    Ok(n.map_or(default, |n| n as usize))
}

/// Milliseconds from `min` (0 meaning "off") to 600000.
fn millis(
    raw: Option<&str>,
    var: &'static str,
    min: u64,
    default: Duration,
) -> Result<Duration, ConfigError> {
    let expected = if min == 0 {
        "milliseconds, a whole number from 0 (off) to 600000"
    } else {
        "milliseconds, a whole number from 1 to 600000"
    };
    Ok(whole(raw, var, expected, min..=600_000)?.map_or(default, Duration::from_millis))
}

fn secs_or_zero(
    raw: Option<&str>,
    var: &'static str,
    default: Duration,
) -> Result<Duration, ConfigError> {
    let n = whole(
        raw,
        var,
        "seconds, a whole number from 0 (off) to 86400",
        0..=86_400,
    )?;
    Ok(n.map_or(default, Duration::from_secs))
}

fn percent(raw: Option<&str>, var: &'static str, default: u32) -> Result<u32, ConfigError> {
    let n = whole(raw, var, "a whole percentage from 0 to 50", 0..=50)?;
    Ok(n.map_or(default, |n| n as u32))
}

fn on_off(raw: Option<&str>, var: &'static str, default: bool) -> Result<bool, ConfigError> {
    match raw.map(str::to_ascii_lowercase).as_deref() {
        None => Ok(default),
        Some("on" | "true" | "1" | "yes") => Ok(true),
        Some("off" | "false" | "0" | "no") => Ok(false),
        Some(_) => Err(ConfigError {
            var,
            value: raw.unwrap_or_default().to_owned(),
            expected: "on or off",
        }),
    }
}

fn url(
    raw: Option<&str>,
    var: &'static str,
    schemes: &[&str],
    default: String,
) -> Result<String, ConfigError> {
    let Some(v) = raw else { return Ok(default) };
    let scheme_ok = v
        .split_once("://")
        .is_some_and(|(scheme, rest)| schemes.contains(&scheme) && !rest.is_empty());
    if scheme_ok {
        Ok(v.to_owned())
    } else {
        Err(ConfigError {
            var,
            value: v.to_owned(),
            expected: if schemes[0] == "redis" {
                "a URL like redis://127.0.0.1:6379/"
            } else {
                "a URL like postgres://user@host:5432/dbname"
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn defaults_when_nothing_is_set() {
        let s = Settings::from_vars(&HashMap::new()).expect("defaults are valid");
        assert_eq!(s.http_addr.port(), 8080);
        assert_eq!(s.cache_ttl, Duration::from_secs(30));
        assert_eq!(s.request_timeout, Duration::from_millis(2000));
        assert!(s.coalesce);
        assert!(s.key_owner_shards >= 1);
        assert_eq!(
            s.db_pool_min_idle, s.db_pool_size,
            "every connection kept open"
        );
    }

    #[test]
    fn min_idle_follows_the_pool_size_unless_set() {
        let s = Settings::from_vars(&vars(&[("DB_POOL_SIZE", "4")])).expect("valid");
        assert_eq!((s.db_pool_size, s.db_pool_min_idle), (4, 4));
        let s = Settings::from_vars(&vars(&[("DB_POOL_SIZE", "4"), ("DB_POOL_MIN_IDLE", "0")]))
            .expect("valid");
        assert_eq!(s.db_pool_min_idle, 0);
    }

    #[test]
    fn values_are_read() {
        let s = Settings::from_vars(&vars(&[
            ("HTTP_ADDR", "127.0.0.1:9000"),
            ("CACHE_TTL_SECS", "5"),
            ("KEY_OWNER_SHARDS", "4"),
            ("COALESCE", "OFF"),
            ("REDIS_TIMEOUT_MS", "20"),
        ]))
        .expect("valid");
        assert_eq!(s.http_addr, "127.0.0.1:9000".parse().unwrap());
        assert_eq!(s.cache_ttl, Duration::from_secs(5));
        assert_eq!(s.key_owner_shards, 4);
        assert!(!s.coalesce);
        assert_eq!(s.redis_timeout, Duration::from_millis(20));

        let off = Settings::from_vars(&vars(&[
            ("NEAR_CACHE_TTL_MS", "0"),
            ("CACHE_GRACE_SECS", "0"),
        ]))
        .expect("zero turns these off");
        assert!(off.near_cache_ttl.is_zero() && off.cache_grace.is_zero());
    }

    #[test]
    fn invalid_values_name_the_variable_and_what_is_accepted() {
        for (var, value, expected) in [
            ("CACHE_TTL_SECS", "thirty", "whole number"),
            ("KEY_OWNER_SHARDS", "0", "from 1"),
            ("COALESCE", "maybe", "on or off"),
            ("HTTP_ADDR", "localhost", "address"),
            ("REDIS_URL", "127.0.0.1:6379", "redis://"),
            ("DATABASE_URL", "mysql://x/y", "postgres://"),
            ("REQUEST_TIMEOUT_MS", "-5", "milliseconds"),
            ("REQUEST_TIMEOUT_MS", "0", "from 1"),
            ("TTL_JITTER_PCT", "60", "percentage"),
            ("CACHE_GRACE_SECS", "1.5", "seconds"),
            ("NEAR_CACHE_TTL_MS", "soon", "0 (off)"),
            ("DB_POOL_MIN_IDLE", "11", "to DB_POOL_SIZE"),
            ("DB_CONNECT_TIMEOUT_MS", "0", "from 1"),
            ("DB_ACQUIRE_TIMEOUT_MS", "500", "retired"),
        ] {
            let err = Settings::from_vars(&vars(&[(var, value)])).expect_err(var);
            let msg = err.to_string();
            assert!(
                msg.contains(var) && msg.contains(value) && msg.contains(expected),
                "{msg}"
            );
        }
    }
}
