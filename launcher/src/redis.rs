//! Redis: its command line, its readiness (`PING`), who it is (`INFO server`), and stopping it
//! (`SHUTDOWN NOSAVE`), over RESP with [`crate::probe::redis`].
//!
//! Persistence is always off (`--save "" --appendonly no`): the stack's and the tests' Redis hold
//! a cache, which nobody needs back after a restart, and no fork-for-snapshot pause should disturb
//! a measurement. It stays in the foreground (`--daemonize no`): the lifetime decides what
//! outlives what.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use crate::probe;
use crate::process::{self, Server, StopStep, SIGTERM};

/// The steps after `SHUTDOWN NOSAVE` (or a first SIGTERM, if that cannot be sent): wait up to
/// 10 s, then SIGTERM again and up to 5 s more.
pub const STOP: [StopStep; 2] = [
    (None, Duration::from_secs(10)),
    (Some(SIGTERM), Duration::from_secs(5)),
];

/// Redis's TLS port and the PEM files it serves it with (clients may show a certificate, and it
/// is checked if they do).
#[derive(Clone, Debug)]
pub struct Tls {
    pub port: u16,
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
}

/// A Redis server on `127.0.0.1:port`.
pub struct Redis {
    /// `redis-server`, from [`binary`].
    pub binary: PathBuf,
    pub port: u16,
    /// Its working directory, where any file it writes goes.
    pub dir: PathBuf,
    /// How many logical databases (`--databases`): the tests give each test one of its own.
    pub databases: Option<u32>,
    pub tls: Option<Tls>,
}

/// `redis-server` on `PATH`.
pub fn binary() -> Option<PathBuf> {
    process::find_in_path("redis-server")
}

impl Server for Redis {
    fn name(&self) -> String {
        "redis-server".to_owned()
    }

    fn command(&self) -> Command {
        let mut command = Command::new(&self.binary);
        command
            .arg("--port")
            .arg(self.port.to_string())
            .args(["--bind", "127.0.0.1", "--daemonize", "no"])
            .arg("--dir")
            .arg(&self.dir)
            .args(["--save", "", "--appendonly", "no"])
            .current_dir(&self.dir);
        if let Some(databases) = self.databases {
            command.arg("--databases").arg(databases.to_string());
        }
        if let Some(tls) = &self.tls {
            command
                .arg("--tls-port")
                .arg(tls.port.to_string())
                .arg("--tls-cert-file")
                .arg(&tls.cert)
                .arg("--tls-key-file")
                .arg(&tls.key)
                .arg("--tls-ca-cert-file")
                .arg(&tls.ca)
                .args(["--tls-auth-clients", "optional"]);
        }
        command
    }

    fn probe(&self) -> Result<(), String> {
        ping(self.port)
    }

    fn ready_within(&self) -> Duration {
        Duration::from_secs(10)
    }
}

/// `PING` answered with `PONG`: Redis is not only listening but serving commands.
pub fn ping(port: u16) -> Result<(), String> {
    match probe::redis(port, &["PING"])?.as_str() {
        "PONG" => Ok(()),
        other => Err(format!("Redis on port {port} answered PING with {other:?}")),
    }
}

/// The pid of the Redis answering on `port` (`INFO server`'s `process_id`): tells whether the
/// server on a port is the process a pid file names.
pub fn process_id(port: u16) -> Option<u32> {
    let info = probe::redis(port, &["INFO", "server"]).ok()?;
    info_field(&info, "process_id")?.parse().ok()
}

/// The value of `name` in an `INFO` (or `CLUSTER INFO`) answer's `name:value` lines.
pub fn info_field<'a>(info: &'a str, name: &str) -> Option<&'a str> {
    info.lines().find_map(|line| {
        line.trim_end_matches('\r')
            .strip_prefix(name)?
            .strip_prefix(':')
    })
}

/// What the server on `port` is now (`ROLE`'s first element): `master`, `slave` or `sentinel`.
pub fn role(port: u16) -> Result<String, String> {
    let reply = probe::redis_reply(port, &["ROLE"])?;
    reply
        .items()
        .first()
        .map(probe::Reply::text)
        .ok_or_else(|| format!("Redis on port {port} answered ROLE with {reply:?}"))
}

/// Asks the Redis on `port` to exit without saving.
pub fn shutdown(port: u16) -> Result<(), String> {
    probe::redis(port, &["SHUTDOWN", "NOSAVE"]).map(drop)
}
