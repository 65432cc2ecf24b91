//! The kinds of value a setting takes. A kind says once what it accepts: clap runs it on the
//! value from the command line, the environment or the default, and a value it refuses becomes a
//! [`ConfigError`] naming the variable, the value and what the kind accepts.

use std::borrow::Cow;
use std::convert::Infallible;
use std::ffi::OsStr;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use clap::builder::{PossibleValue, TypedValueParser};
use clap::{Arg, Command};

use super::{ConfigError, Pooler};
use crate::tls::{PemFile, PemKind, SslMode};

/// A kind of value: what a (trimmed, non-empty) text stands for, or else what would have been
/// accepted.
pub trait Kind: Clone + Send + Sync + 'static {
    type Value: Clone + Send + Sync + 'static;

    fn read(&self, text: &str) -> Result<Self::Value, Cow<'static, str>>;

    /// The values it accepts, when they can be listed (`--help` shows them).
    fn choices(&self) -> &'static [&'static str] {
        &[]
    }
}

/// A kind as clap's value parser. A blank value means the default: the argument's
/// `default_value`, or for an optional setting (whose default is blank) its absence.
#[derive(Clone)]
pub struct Setting<K>(pub K);

impl<K: Kind> TypedValueParser for Setting<K> {
    type Value = K::Value;

    fn parse_ref(
        &self,
        cmd: &Command,
        arg: Option<&Arg>,
        value: &OsStr,
    ) -> Result<K::Value, clap::Error> {
        let given = value.to_string_lossy();
        let default = arg
            .and_then(|arg| arg.get_default_values().first())
            .map(|d| d.to_string_lossy())
            .unwrap_or_default();
        let text = match given.trim() {
            "" => default.trim(),
            text => text,
        };
        self.0.read(text).map_err(|expected| {
            let var = arg.map_or_else(String::new, |arg| match arg.get_env() {
                Some(var) => var.to_string_lossy().into_owned(),
                None => arg.get_id().as_str().to_ascii_uppercase(),
            });
            carry(
                cmd,
                arg,
                ConfigError {
                    var,
                    value: text.to_owned(),
                    expected,
                },
            )
        })
    }

    fn possible_values(&self) -> Option<Box<dyn Iterator<Item = PossibleValue> + '_>> {
        let choices = self.0.choices();
        (!choices.is_empty()).then(|| {
            Box::new(choices.iter().map(|c| PossibleValue::new(*c)))
                as Box<dyn Iterator<Item = PossibleValue>>
        })
    }
}

/// A clap error with `error` as its source, so that the [`ConfigError`] comes out of clap whole
/// (see [`super::Rejected`]). clap gives a source only to the errors of its closure parsers, so
/// one that fails with `error` is run.
fn carry(cmd: &Command, arg: Option<&Arg>, error: ConfigError) -> clap::Error {
    let value = error.value.clone();
    let fail = move |_: &str| Err::<Infallible, _>(error.clone());
    match fail.parse_ref(cmd, arg, OsStr::new(&value)) {
        Ok(never) => match never {},
        Err(e) => e,
    }
}

/// A socket address; `expected` gives an example.
#[derive(Clone, Copy)]
pub struct Address(pub &'static str);

impl Kind for Address {
    type Value = SocketAddr;

    fn read(&self, text: &str) -> Result<SocketAddr, Cow<'static, str>> {
        text.parse().map_err(|_| self.0.into())
    }
}

/// A whole number that `accepts` allows, in the unit `unit` makes of it.
#[derive(Clone, Copy)]
pub struct Whole<T> {
    accepts: fn(&u64) -> bool,
    expected: &'static str,
    unit: fn(u64) -> T,
}

impl<T> Whole<T> {
    pub fn expected(&self) -> &'static str {
        self.expected
    }
}

impl<T: Clone + Send + Sync + 'static> Kind for Whole<T> {
    type Value = T;

    fn read(&self, text: &str) -> Result<T, Cow<'static, str>> {
        text.parse()
            .ok()
            .filter(self.accepts)
            .map(self.unit)
            .ok_or(self.expected.into())
    }
}

/// A count: a whole number from 1 to 100000.
pub const COUNT: Whole<u64> = Whole {
    accepts: |n| (1..=100_000).contains(n),
    expected: "a whole number from 1 to 100000",
    unit: |n| n,
};

/// Megabytes of memory: from 1 to 1048576 (1 TB).
pub const MEGABYTES: Whole<u64> = Whole {
    accepts: |n| (1..=1_048_576).contains(n),
    expected: "a whole number of megabytes from 1 to 1048576",
    unit: |n| n,
};

/// A count where 0 turns something off.
pub const COUNT_OR_OFF: Whole<u64> = Whole {
    accepts: |n| *n <= 100_000,
    expected: "a whole number from 0 (off) to 100000",
    unit: |n| n,
};

/// Idle connections: at most `DB_POOL_SIZE`, which is checked once both are read.
pub const IDLE_CONNECTIONS: Whole<u64> = Whole {
    accepts: |n| *n <= 100_000,
    expected: "a whole number from 0 to DB_POOL_SIZE",
    unit: |n| n,
};

pub const PERCENT: Whole<u64> = Whole {
    accepts: |n| *n <= 50,
    expected: "a whole percentage from 0 to 50",
    unit: |n| n,
};

pub const MILLIS: Whole<Duration> = Whole {
    accepts: |n| (1..=600_000).contains(n),
    expected: "milliseconds, a whole number from 1 to 600000",
    unit: Duration::from_millis,
};

pub const MILLIS_OR_OFF: Whole<Duration> = Whole {
    accepts: |n| *n <= 600_000,
    expected: "milliseconds, a whole number from 0 (off) to 600000",
    unit: Duration::from_millis,
};

/// Zero (off), or long enough for a holder to renew its lease a few times per period.
pub const LEASE_MILLIS: Whole<Duration> = Whole {
    accepts: |n| *n == 0 || (100..=60_000).contains(n),
    expected: "milliseconds: 0 (off), or a whole number from 100 to 60000",
    unit: Duration::from_millis,
};

pub const SECONDS: Whole<Duration> = Whole {
    accepts: |n| (1..=100_000).contains(n),
    expected: "seconds, a whole number from 1 to 100000",
    unit: Duration::from_secs,
};

pub const SECONDS_OR_OFF: Whole<Duration> = Whole {
    accepts: |n| *n <= 86_400,
    expected: "seconds, a whole number from 0 (off) to 86400",
    unit: Duration::from_secs,
};

/// A switch. `true`, `1` and `yes` (and their opposites) are accepted too.
#[derive(Clone, Copy)]
pub struct OnOff;

impl Kind for OnOff {
    type Value = bool;

    fn read(&self, text: &str) -> Result<bool, Cow<'static, str>> {
        match text.to_ascii_lowercase().as_str() {
            "on" | "true" | "1" | "yes" => Ok(true),
            "off" | "false" | "0" | "no" => Ok(false),
            _ => Err("on or off".into()),
        }
    }

    fn choices(&self) -> &'static [&'static str] {
        &["on", "off"]
    }
}

#[derive(Clone, Copy)]
pub struct PoolerKind;

impl Kind for PoolerKind {
    type Value = Pooler;

    fn read(&self, text: &str) -> Result<Pooler, Cow<'static, str>> {
        match text.to_ascii_lowercase().as_str() {
            "auto" => Ok(Pooler::Auto),
            "none" => Ok(Pooler::None),
            "transaction" => Ok(Pooler::Transaction),
            _ => Err("auto, none or transaction".into()),
        }
    }

    fn choices(&self) -> &'static [&'static str] {
        &["auto", "none", "transaction"]
    }
}

/// A URL: its schemes, an example for the error message, and any further check of the whole URL.
#[derive(Clone, Copy)]
pub struct Url {
    schemes: &'static [&'static str],
    example: &'static str,
    check: fn(&str) -> bool,
}

pub const POSTGRES_URL: Url = Url {
    schemes: &["postgres", "postgresql"],
    example: SslMode::EXPECTED,
    check: |url| SslMode::split_url(url).is_some(),
};

pub const REDIS_URL: Url = Url {
    schemes: &["redis", "rediss"],
    example: "a URL like redis://127.0.0.1:6379/ (rediss:// for TLS)",
    check: |_| true,
};

pub const HTTP_URL: Url = Url {
    schemes: &["http", "https"],
    example: "a URL like http://otel-collector:4318 (https:// for TLS), or unset",
    check: |_| true,
};

impl Kind for Url {
    type Value = String;

    fn read(&self, text: &str) -> Result<String, Cow<'static, str>> {
        let scheme_ok = text
            .split_once("://")
            .is_some_and(|(scheme, rest)| self.schemes.contains(&scheme) && !rest.is_empty());
        if scheme_ok && (self.check)(text) {
            Ok(text.to_owned())
        } else {
            Err(self.example.into())
        }
    }
}

/// Comma-separated URLs, each checked as [`Url`] checks one; none when blank.
#[derive(Clone, Copy)]
pub struct UrlList(pub Url);

impl Kind for UrlList {
    type Value = Vec<String>;

    fn read(&self, text: &str) -> Result<Vec<String>, Cow<'static, str>> {
        if text.is_empty() {
            return Ok(Vec::new());
        }
        text.split(',')
            .map(str::trim)
            .map(|url| match url {
                "" => Err("comma-separated URLs with nothing empty between the commas".into()),
                url => self.0.read(url),
            })
            .collect()
    }
}

/// `REDIS_URL`: one URL, or comma-separated URLs (seed nodes of a cluster), each checked as
/// [`REDIS_URL`] checks one; kept as written.
#[derive(Clone, Copy)]
pub struct RedisUrls;

impl Kind for RedisUrls {
    type Value = String;

    fn read(&self, text: &str) -> Result<String, Cow<'static, str>> {
        let urls = UrlList(REDIS_URL).read(text)?;
        if urls.is_empty() {
            return Err(REDIS_URL.example.into());
        }
        Ok(text.to_owned())
    }
}

/// `REDIS_SENTINELS`: comma-separated `host:port` (or `redis://`/`rediss://` URLs, for a
/// password or TLS); none when blank.
#[derive(Clone, Copy)]
pub struct Sentinels;

impl Kind for Sentinels {
    type Value = Vec<String>;

    fn read(&self, text: &str) -> Result<Vec<String>, Cow<'static, str>> {
        if text.is_empty() {
            return Ok(Vec::new());
        }
        text.split(',')
            .map(str::trim)
            .map(|sentinel| {
                crate::actors::cache::link::sentinel_addr(sentinel)
                    .map(|_| sentinel.to_owned())
                    .map_err(|why| {
                        format!(
                            "comma-separated sentinels as host:port (e.g. \
                             10.0.0.5:26379,10.0.0.6:26379), or redis:// URLs; {why}"
                        )
                        .into()
                    })
            })
            .collect()
    }
}

/// A PEM file, read and checked now, so that a missing or wrong file stops start-up with the
/// variable's name rather than failing every connection later.
#[derive(Clone, Copy)]
pub struct Pem(pub PemKind);

impl Kind for Pem {
    type Value = PemFile;

    fn read(&self, text: &str) -> Result<PemFile, Cow<'static, str>> {
        let what = match self.0 {
            PemKind::Certificates => "a readable PEM file of certificates",
            PemKind::PrivateKey => "a readable PEM file with a private key",
        };
        PemFile::read(Path::new(text), self.0).map_err(|why| format!("{what}; {why}").into())
    }
}

/// A setting that may be left unset (blank): then `None`.
#[derive(Clone, Copy)]
pub struct Optional<K>(pub K);

impl<K: Kind> Kind for Optional<K> {
    type Value = Option<K::Value>;

    fn read(&self, text: &str) -> Result<Self::Value, Cow<'static, str>> {
        match text {
            "" => Ok(None),
            text => self.0.read(text).map(Some),
        }
    }

    fn choices(&self) -> &'static [&'static str] {
        self.0.choices()
    }
}

/// A variable that is no longer read: setting it is an error saying why.
#[derive(Clone, Copy)]
pub struct Retired(pub &'static str);

/// What a retired variable reads as: it is not set.
#[derive(Debug, Clone, Copy)]
pub struct NotSet;

impl Kind for Retired {
    type Value = NotSet;

    fn read(&self, text: &str) -> Result<NotSet, Cow<'static, str>> {
        match text {
            "" => Ok(NotSet),
            _ => Err(self.0.into()),
        }
    }
}

/// Any text (the log filter, which its reader checks).
#[derive(Clone, Copy)]
pub struct Text;

/// A prefix for Redis keys: up to 64 visible ASCII characters, no braces (Redis Cluster reads
/// `{…}` as a key's hash tag); empty for none.
#[derive(Clone, Copy)]
pub struct KeyPrefix;

impl Kind for KeyPrefix {
    type Value = String;

    fn read(&self, text: &str) -> Result<String, Cow<'static, str>> {
        let visible = text
            .bytes()
            .all(|b| (0x21..=0x7e).contains(&b) && b != b'{' && b != b'}');
        if text.len() <= 64 && visible {
            Ok(text.to_owned())
        } else {
            Err(
                "up to 64 visible ASCII characters without spaces or braces (e.g. shop-a:), or \
                 empty"
                    .into(),
            )
        }
    }
}

impl Kind for Text {
    type Value = String;

    fn read(&self, text: &str) -> Result<String, Cow<'static, str>> {
        Ok(text.to_owned())
    }
}
