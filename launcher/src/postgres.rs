//! PostgreSQL: its binaries, `initdb`, the server's settings, its readiness, the lock files a crash
//! leaves, creating a database, and streaming replicas that apply the primary's WAL late.
//!
//! # Running as root
//!
//! PostgreSQL refuses to run as root. When we are root (containers, CI), `initdb` and `postgres`
//! run as the `postgres` system user ([`Postgres::user`], applied through
//! [`CommandExt::uid`]/[`CommandExt::gid`]; see [`crate::attached`] for why not `runuser`), on a
//! directory chowned to it, and every directory on the way must be searchable by it
//! ([`crate::process::unreachable_by`]).
//!
//! # One server, two uses
//!
//! The stack keeps its data (`.stack/pg/data`) and stops the server with a fast shutdown; the
//! tests throw theirs away, so they add [`THROWAWAY`] and skip `initdb`'s fsync. Both listen on
//! `127.0.0.1` only, put the Unix socket where they choose (`-k`: Debian's `/var/run/postgresql`
//! may not exist or not be writable for us), and are ready when `pg_isready` says so.
//!
//! # Streaming replicas
//!
//! A replica is a copy of a running primary's data directory made by `pg_basebackup -R`
//! ([`Basebackup`], run as the same user as the primary), started as a [`Postgres`] with
//! [`standby_settings`]: a hot standby that applies each transaction a fixed delay after the
//! primary committed it, so that a test can see what a lagging replica serves. Like any server
//! here it is ready when `pg_isready` says so (a hot standby accepts connections once its copy is
//! consistent). [`current_wal_lsn`] and [`replayed`] tell when it has caught up with the primary,
//! over [`PgConnection`].

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::probe::PgConnection;
use crate::process::{self, run_as, Error, Server, Signal, StopStep, User, SIGINT, SIGQUIT};

/// Where Debian installs each major version: `/usr/lib/postgresql/<version>/bin`. Debian does not
/// put `initdb` or `postgres` on `PATH`, hence no `PATH` search.
const INSTALLED: &str = "/usr/lib/postgresql";

/// Settings for data nobody keeps (the tests'): durability off (`fsync`, `synchronous_commit`,
/// `full_page_writes`), which makes DDL per test much faster; `max_connections=300` leaves room
/// for many parallel tests each with its own pool; small `shared_buffers` keeps the footprint low.
pub const THROWAWAY: [&str; 5] = [
    "fsync=off",
    "synchronous_commit=off",
    "full_page_writes=off",
    "max_connections=300",
    "shared_buffers=32MB",
];

/// `pg_hba.conf` for a server that takes TCP clients over TLS and with a password only (the TLS
/// tests'); the socket stays trusted, so `pg_isready` works the same way.
pub const TLS_ONLY_HBA: &str = "local all all trust\nhostssl all all 127.0.0.1/32 scram-sha-256\n";

/// The steps of a fast shutdown: SIGINT (open transactions are rolled back, then a checkpoint),
/// for up to 30 s.
pub const STOP: [StopStep; 1] = [(Some(SIGINT), Duration::from_secs(30))];

/// The programs of one installed major version.
#[derive(Clone, Debug)]
pub struct Bins {
    /// `/usr/lib/postgresql/<version>/bin`.
    pub dir: PathBuf,
}

impl Bins {
    /// The binaries of major version `preferred` if they are installed, else the newest installed
    /// version's; `None` if PostgreSQL is not installed.
    pub fn find(preferred: Option<&str>) -> Option<Bins> {
        let installed = |dir: PathBuf| process::is_executable(&dir.join("postgres")).then_some(dir);
        if let Some(dir) =
            preferred.and_then(|v| installed(Path::new(INSTALLED).join(v).join("bin")))
        {
            return Some(Bins { dir });
        }
        let mut versions: Vec<String> = fs::read_dir(INSTALLED)
            .into_iter()
            .flatten()
            .flatten()
            .filter(|entry| entry.path().join("bin/postgres").exists())
            .filter_map(|entry| entry.file_name().into_string().ok())
            .collect();
        versions.sort_by_key(|v| version_key(v));
        let newest = versions.pop()?;
        Some(Bins {
            dir: Path::new(INSTALLED).join(newest).join("bin"),
        })
    }

    /// The path of program `name` (`initdb`, `psql`, ...).
    pub fn program(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// Whether every one of `names` is there and executable.
    pub fn have(&self, names: &[&str]) -> bool {
        names
            .iter()
            .all(|name| process::is_executable(&self.program(name)))
    }
}

/// Orders version directories as `sort -V` does for them: numerically, part by part.
fn version_key(version: &str) -> Vec<u64> {
    version
        .split('.')
        .map(|part| part.parse().unwrap_or(0))
        .collect()
}

/// The major version that created data directory `data` (its `PG_VERSION`), if it says.
pub fn data_version(data: &Path) -> Option<String> {
    let version = fs::read_to_string(data.join("PG_VERSION")).ok()?;
    Some(version.trim_end_matches('\n').to_owned())
}

/// `initdb` for a new cluster in `data`: superuser `postgres` with trust authentication (only
/// loopback can reach it), UTF8 and the C locale, so that sorting and encoding do not depend on
/// the machine's locale. `throwaway` skips the fsync that costs most of initdb's time; a
/// `password_file` gives the superuser a password (for clients that must use one).
pub struct Initdb<'a> {
    pub bins: &'a Bins,
    pub data: &'a Path,
    /// The directory to run in: one the postgres user may enter (our own may be `/root`).
    pub cwd: &'a Path,
    pub user: Option<User>,
    pub throwaway: bool,
    pub password_file: Option<&'a Path>,
}

impl Initdb<'_> {
    pub fn command(&self) -> Command {
        let mut command = Command::new(self.bins.program("initdb"));
        command
            .arg("-D")
            .arg(self.data)
            .args(["-U", "postgres", "--auth=trust", "-E", "UTF8", "--locale=C"])
            .current_dir(self.cwd);
        if self.throwaway {
            command.arg("--no-sync");
        }
        if let Some(file) = self.password_file {
            command.arg(format!("--pwfile={}", file.display()));
        }
        run_as(&mut command, self.user);
        command
    }
}

/// `pg_basebackup` for a streaming replica of the server on `127.0.0.1:primary_port`: a copy of
/// its data directory in `data` (which must not exist yet; its parent must belong to `user`),
/// with `-R`, which writes `standby.signal` and the `primary_conninfo` that points back at the
/// primary, so that a server started on `data` streams the primary's WAL and replays it. The
/// primary's default `pg_hba.conf` (from [`Initdb`]) trusts replication connections on loopback.
/// `--checkpoint=fast`: the backup starts at once instead of after a spread checkpoint.
pub struct Basebackup<'a> {
    pub bins: &'a Bins,
    pub primary_port: u16,
    pub data: &'a Path,
    /// The directory to run in (see [`Initdb::cwd`]).
    pub cwd: &'a Path,
    pub user: Option<User>,
    /// Skips the fsync of the copy, as [`Initdb::throwaway`] does.
    pub throwaway: bool,
}

impl Basebackup<'_> {
    pub fn command(&self) -> Command {
        let mut command = Command::new(self.bins.program("pg_basebackup"));
        command
            .arg("-D")
            .arg(self.data)
            .args([
                "-R",
                "--checkpoint=fast",
                "-h",
                "127.0.0.1",
                "-U",
                "postgres",
            ])
            .arg("-p")
            .arg(self.primary_port.to_string())
            .current_dir(self.cwd);
        if self.throwaway {
            command.arg("--no-sync");
        }
        run_as(&mut command, self.user);
        command
    }
}

/// The settings of a replica made by [`Basebackup`] that answers read-only queries
/// (`hot_standby`) and applies each transaction `apply_delay` after the primary committed it
/// (`recovery_min_apply_delay`): a replica that lags by a known amount, for the code that must
/// not read a change from a replica before it has it. A hot standby also needs
/// `max_connections` (and the other limits) at least the primary's: give it the primary's
/// settings too.
pub fn standby_settings(apply_delay: Duration) -> Vec<String> {
    vec![
        "hot_standby=on".to_owned(),
        format!("recovery_min_apply_delay={}ms", apply_delay.as_millis()),
    ]
}

/// The primary's WAL position now (`pg_current_wal_lsn()`, as text: `0/3000148`).
pub fn current_wal_lsn(port: u16) -> Result<String, String> {
    PgConnection::connect(port, "postgres", "postgres")?
        .value("SELECT pg_current_wal_lsn()")?
        .ok_or_else(|| format!("pg_current_wal_lsn() on port {port} is NULL"))
}

/// Whether the replica on `port` has replayed the WAL up to `lsn` (its
/// `pg_last_wal_replay_lsn()` is at or past it).
pub fn replayed(port: u16, lsn: &str) -> Result<bool, String> {
    if !lsn.bytes().all(|b| b.is_ascii_hexdigit() || b == b'/') {
        return Err(format!("{lsn:?} is not a WAL position"));
    }
    let sql = format!("SELECT pg_last_wal_replay_lsn() >= '{lsn}'::pg_lsn");
    match PgConnection::connect(port, "postgres", "postgres")?
        .value(&sql)?
        .as_deref()
    {
        Some("t") => Ok(true),
        Some("f") => Ok(false),
        _ => Err(format!(
            "the server on port {port} is not a replica (it replays no WAL)"
        )),
    }
}

/// A PostgreSQL server on `127.0.0.1:port`, run directly (never through `pg_ctl`, which would fork
/// it away from the lifetime that spawns it).
pub struct Postgres {
    pub bins: Bins,
    pub data: PathBuf,
    /// Where the Unix socket goes (`-k`).
    pub socket_dir: PathBuf,
    /// The directory to run in (see [`Initdb::cwd`]).
    pub cwd: PathBuf,
    pub port: u16,
    /// `Some(postgres)` when we are root.
    pub user: Option<User>,
    /// More `name=value` settings: [`THROWAWAY`], TLS's.
    pub settings: Vec<String>,
}

impl Server for Postgres {
    fn name(&self) -> String {
        "postgres".to_owned()
    }

    fn command(&self) -> Command {
        let mut command = Command::new(self.bins.program("postgres"));
        command
            .arg("-D")
            .arg(&self.data)
            .arg("-p")
            .arg(self.port.to_string())
            .arg("-k")
            .arg(&self.socket_dir)
            .args(["-c", "listen_addresses=127.0.0.1"])
            .args(self.settings.iter().flat_map(|s| ["-c", s.as_str()]))
            .current_dir(&self.cwd);
        run_as(&mut command, self.user);
        command
    }

    /// The port accepting connections is not enough: the postmaster listens before start-up
    /// finishes and answers "the database system is starting up" until then. `pg_isready` asks
    /// the real question.
    fn probe(&self) -> Result<(), String> {
        crate::probe::connect(self.port)?;
        let status = Command::new(self.bins.program("pg_isready"))
            .args([
                "-q",
                "-h",
                "127.0.0.1",
                "-U",
                "postgres",
                "-d",
                "postgres",
                "-t",
                "2",
            ])
            .arg("-p")
            .arg(self.port.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map_err(|e| format!("could not run pg_isready: {e}"))?;
        if status.success() {
            Ok(())
        } else {
            Err(format!("pg_isready -p {}: {status}", self.port))
        }
    }

    /// Immediate shutdown: the postmaster tells its backends to quit and exits without a
    /// checkpoint, which throwaway data does not need.
    fn death_signal(&self) -> Signal {
        SIGQUIT
    }
}

/// The settings that make the server take TLS with `cert` and `key` (the files must belong to the
/// server's user and be private: PostgreSQL refuses a key others may read).
pub fn tls_settings(cert: &Path, key: &Path) -> Vec<String> {
    vec![
        "ssl=on".to_owned(),
        format!("ssl_cert_file={}", cert.display()),
        format!("ssl_key_file={}", key.display()),
    ]
}

/// The postmaster of `data` if it runs: its pid and the port it listens on, from
/// `postmaster.pid` (line 1 and line 4), checked against `/proc`.
pub fn postmaster(data: &Path) -> Option<(u32, Option<u16>)> {
    let text = fs::read_to_string(data.join("postmaster.pid")).ok()?;
    let mut lines = text.lines();
    let pid: u32 = lines
        .next()
        .filter(|l| !l.is_empty() && l.bytes().all(|b| b.is_ascii_digit()))?
        .parse()
        .ok()?;
    let running = process::alive(pid) && process::comm(pid).as_deref() == Some("postgres");
    running.then(|| (pid, lines.nth(2).and_then(|port| port.parse().ok())))
}

/// What a crash left behind in a data directory.
#[derive(Debug, PartialEq)]
pub enum Leftovers {
    /// Nothing: or a live postmaster owns the lock, and postgres itself will say so.
    None,
    /// Lock files whose postmaster is gone (`old_pid`, if `postmaster.pid` named one): postgres
    /// refuses to start while their pid is taken (by a not-yet-reaped zombie, or a reused pid).
    StaleLocks {
        files: Vec<PathBuf>,
        old_pid: Option<String>,
    },
    /// A postgres process (this pid) still works in the data directory after a crash: the lock
    /// files are not stale yet.
    Busy(u32),
}

/// Looks for lock files a crash left in `data` and in the socket directory `socket_dir`.
/// `data` is compared with each postgres process's working directory as written.
pub fn leftovers(data: &Path, socket_dir: &Path) -> Leftovers {
    let pid_file = data.join("postmaster.pid");
    let mut files = Vec::new();
    let mut old_pid = None;
    if pid_file.exists() {
        let text = fs::read_to_string(&pid_file).unwrap_or_default();
        let first = text.lines().next().unwrap_or_default().to_owned();
        if first.parse::<u32>().is_ok_and(|pid| {
            process::alive(pid) && process::comm(pid).as_deref() == Some("postgres")
        }) {
            return Leftovers::None;
        }
        old_pid = Some(first).filter(|p| !p.is_empty());
        files.push(pid_file);
    }
    let mut sockets: Vec<PathBuf> = fs::read_dir(socket_dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(".s.PGSQL."))
        .map(|e| e.path())
        .collect();
    sockets.sort();
    files.extend(sockets);
    if files.is_empty() {
        return Leftovers::None;
    }
    let mut pids: Vec<String> = fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|name| name.bytes().all(|b| b.is_ascii_digit()))
        .collect();
    pids.sort();
    for pid in pids.iter().filter_map(|p| p.parse::<u32>().ok()) {
        let works_here = process::comm(pid).as_deref() == Some("postgres")
            && process::alive(pid)
            && fs::read_link(format!("/proc/{pid}/cwd")).is_ok_and(|cwd| cwd == data);
        if works_here {
            return Leftovers::Busy(pid);
        }
    }
    Leftovers::StaleLocks { files, old_pid }
}

/// Whether database `name` exists on the server at `127.0.0.1:port`, asked as the superuser.
pub fn database_exists(port: u16, name: &str) -> Result<bool, Error> {
    let sql = format!(
        "SELECT 1 FROM pg_database WHERE datname = '{}'",
        name.replace('\'', "''")
    );
    PgConnection::connect(port, "postgres", "postgres")
        .and_then(|mut server| server.value(&sql))
        .map(|found| found.is_some())
        .map_err(Error::Unavailable)
}

/// Creates database `name` on the server at `127.0.0.1:port`, as the superuser.
pub fn create_database(port: u16, name: &str) -> Result<(), Error> {
    let sql = format!("CREATE DATABASE \"{}\"", name.replace('"', "\"\""));
    PgConnection::connect(port, "postgres", "postgres")
        .and_then(|mut server| server.query(&sql))
        .map(drop)
        .map_err(Error::Unavailable)
}
