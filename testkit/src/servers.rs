//! Real PostgreSQL and Redis servers (and PgBouncer, and a lagging replica) for the integration
//! tests: the test policy. How each server is run (its command line, `initdb`, running PostgreSQL
//! as the `postgres` user when we are root, its readiness) and how it is tied to the test process
//! is the launcher's (`launcher::postgres`, `launcher::redis`, `launcher::pgbouncer`,
//! `launcher::attached`), which `scripts/stack.sh` runs its servers with too.
//!
//! One PostgreSQL 15 server and one Redis server are started lazily, once per test *process*, on
//! free loopback ports ([`crate::ports`]), and shared by every test in that process. Sharing is
//! what keeps the suite fast: `initdb` plus server start costs on the order of a second, so paying
//! it once instead of per test is the difference between a usable and an unusable suite. Isolation
//! between tests comes from elsewhere: each test creates its own PostgreSQL database (via
//! [`Servers::pg_admin_url`]) and takes its own Redis logical database (via [`next_redis_db`]).
//!
//! The servers die with the test process (see `launcher::attached` for how: a death signal from a
//! thread that never returns), and their files live under `$TMPDIR/singleflight-tests/<pid>/`,
//! which the next test process removes once this one is gone. Their data is thrown away, so
//! PostgreSQL runs with durability off (`launcher::postgres::THROWAWAY`) and `initdb` skips its
//! fsync.
//!
//! # PgBouncer, and a replica that lags
//!
//! Two more servers, each started on its first use, once per process, like the shared pair:
//!
//! - [`pgbouncer`]: PgBouncer in transaction mode (`launcher::pgbouncer`) in front of the shared
//!   PostgreSQL, so a test reaches its own database through a pooler that hands server connections
//!   out per transaction ([`PgBouncer::url`]).
//! - [`replicated`]: a primary of its own with one streaming replica that applies its WAL
//!   [`APPLY_DELAY`] late (`launcher::postgres::Basebackup`, `standby_settings`). Not a replica
//!   of the shared server: every parallel test's `CREATE DATABASE` and writes would reach it late,
//!   and [`Replicated::wait_replayed`] would wait for all of them. Its primary keeps durability off but commits synchronously (local
//!   `synchronous_commit`), so that [`Replicated::wait_replayed`] covers every commit that has
//!   returned.
//!
//! # The TLS variant
//!
//! [`tls_servers`] starts a second pair the same way, for the TLS tests only: PostgreSQL with
//! `ssl=on` that accepts TCP clients only over TLS and only with a password (`hostssl` +
//! `scram-sha-256`), and Redis with a `--tls-port` (clients may show a certificate, and it is
//! checked if they do). Their certificates come from a CA generated for the process
//! ([`crate::certs`]); the PEM files are in [`TlsServers`]. Redis keeps a plain port on loopback
//! too, only so that readiness is checked the same way as for the shared one.

use std::fs;
use std::os::unix::fs::{chown, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;
use std::thread;
use std::time::{Duration, Instant};

use launcher::attached::{self, Attached};
use launcher::pgbouncer::{self, PgBouncer as PgBouncerServer};
use launcher::postgres::{self, Basebackup, Bins, Initdb, Postgres};
#[cfg(test)]
use launcher::probe::PgConnection;
use launcher::process::{self, User};
use launcher::redis::{self, Redis};

use crate::ports::free_port;

/// Ports of the shared servers. Both listen on `127.0.0.1` only.
///
/// The struct only holds ports (not connections or pools) so that it is
/// runtime-agnostic: every test builds its own clients on its own runtime.
#[derive(Debug)]
pub struct Servers {
    /// TCP port of the PostgreSQL server (superuser `postgres`, trust auth).
    pub pg_port: u16,
    /// TCP port of the Redis server (started with `--databases 10000`).
    pub redis_port: u16,
}

impl Servers {
    /// `postgres://postgres@127.0.0.1:{pg_port}/postgres`: the superuser on
    /// the maintenance database, for `CREATE DATABASE`/`DROP DATABASE`.
    ///
    /// No password: the cluster is created with `--auth=trust` and only
    /// listens on loopback, so there is nothing to protect and nothing to
    /// configure in the tests.
    pub fn pg_admin_url(&self) -> String {
        self.pg_url("postgres")
    }

    /// `postgres://postgres@127.0.0.1:{pg_port}/{db}`: the superuser on
    /// database `db` (which the test must have created).
    pub fn pg_url(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{}", self.pg_port, db)
    }

    /// `redis://127.0.0.1:{redis_port}/{db_index}`: a Redis logical
    /// database. Use [`next_redis_db`] to get an index no other test uses.
    pub fn redis_url(&self, db_index: u32) -> String {
        format!("redis://127.0.0.1:{}/{}", self.redis_port, db_index)
    }
}

/// The TLS variant of [`Servers`] (see the module docs): same servers, with certificates.
#[derive(Debug)]
pub struct TlsServers {
    /// `pg_port`: PostgreSQL, TLS and password only over TCP; `redis_port`: Redis's plain port
    /// (for readiness checks; tests use `redis_tls_port`).
    pub plain: Servers,
    pub redis_tls_port: u16,
    /// The `postgres` superuser's password (TCP clients must give one).
    pub pg_password: String,
    /// The CA that signed both servers' certificates and [`TlsServers::client_cert_file`].
    pub ca_file: PathBuf,
    /// A CA that signed nothing here: trusting only it must fail verification.
    pub unrelated_ca_file: PathBuf,
    /// A client certificate and key signed by the CA, which Redis accepts.
    pub client_cert_file: PathBuf,
    pub client_key_file: PathBuf,
}

impl TlsServers {
    /// The superuser, with its password, on database `db` over TLS as `sslmode` says.
    pub fn pg_url(&self, db: &str, sslmode: &str) -> String {
        format!(
            "postgres://postgres:{}@127.0.0.1:{}/{db}?sslmode={sslmode}",
            self.pg_password, self.plain.pg_port
        )
    }

    /// `rediss://127.0.0.1:{redis_tls_port}/{db_index}`.
    pub fn rediss_url(&self, db_index: u32) -> String {
        format!("rediss://127.0.0.1:{}/{db_index}", self.redis_tls_port)
    }
}

/// Started servers: what the tests see, and the running processes, held for the life of the
/// process (a static is never dropped, so they stop when the process dies, by their death signal).
#[derive(Debug)]
pub(crate) struct Started<T> {
    pub(crate) servers: T,
    pub(crate) _running: Vec<Attached>,
}

/// The result of the one start attempt. A failure is stored too (as its
/// message), so that after one failed start every other test fails at once
/// with the same explanation instead of each retrying for 30 s in a
/// half-initialised temp dir.
static SERVERS: OnceLock<Result<Started<Servers>, String>> = OnceLock::new();

/// Starts both servers on first call and returns the same instance
/// afterwards.
///
/// Blocking. Safe to call from many test threads at once ([`OnceLock`] runs
/// the start exactly once and makes the other callers wait for it) and from
/// inside a tokio runtime (it never touches the runtime; it blocks the
/// calling thread for about a second, once).
///
/// # Panics
///
/// If a binary is missing (the message names the Debian package to install)
/// or a server does not become ready within ~30 s (the message says which
/// server, which check failed, and shows the tail of its log).
pub fn servers() -> &'static Servers {
    let start = || {
        let dir = attached::dir("servers").map_err(explain)?;
        let (servers, _, running) = start_pair(&dir, None)?;
        Ok(Started {
            servers,
            _running: running.into(),
        })
    };
    match SERVERS.get_or_init(start) {
        Ok(started) => &started.servers,
        Err(message) => panic!("test servers could not be started: {message}"),
    }
}

static TLS_SERVERS: OnceLock<Result<Started<TlsServers>, String>> = OnceLock::new();

/// The TLS variant (see the module docs): started on first call, once per process, like
/// [`servers`].
///
/// # Panics
///
/// As [`servers`] does.
pub fn tls_servers() -> &'static TlsServers {
    let start = || {
        let files = attached::dir("tls").map_err(explain)?;
        let certs = crate::certs::generate()?;
        let (plain, redis_tls_port, running) = start_pair(&files, Some(&certs))?;
        let write = |name: &str, pem: &str| {
            let path = files.join(name);
            fs::write(&path, pem)
                .map(|()| path.clone())
                .map_err(|e| format!("could not write {}: {e}", path.display()))
        };
        let servers = TlsServers {
            plain,
            redis_tls_port: redis_tls_port.unwrap_or_default(),
            pg_password: PG_TLS_PASSWORD.to_owned(),
            ca_file: write("ca.pem", &certs.ca)?,
            unrelated_ca_file: write("unrelated-ca.pem", &crate::certs::unrelated_ca()?)?,
            client_cert_file: write("client.pem", &certs.client_cert)?,
            client_key_file: write("client.key", &certs.client_key)?,
        };
        Ok(Started {
            servers,
            _running: running.into(),
        })
    };
    match TLS_SERVERS.get_or_init(start) {
        Ok(started) => &started.servers,
        Err(message) => panic!("TLS test servers could not be started: {message}"),
    }
}

/// PgBouncer in transaction mode in front of the shared PostgreSQL (see the module docs).
#[derive(Debug)]
pub struct PgBouncer {
    /// TCP port of PgBouncer (`127.0.0.1`; user `postgres`, trust auth, any database name).
    pub port: u16,
}

impl PgBouncer {
    /// `postgres://postgres@127.0.0.1:{port}/{db}`: database `db` of the shared PostgreSQL
    /// (which the test must have created there, through [`Servers::pg_admin_url`]), through
    /// PgBouncer.
    pub fn url(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }
}

static PGBOUNCER: OnceLock<Result<Started<PgBouncer>, String>> = OnceLock::new();

/// PgBouncer in front of [`servers`]' PostgreSQL (which it starts first if need be): started on
/// first call, once per process, like [`servers`].
///
/// # Panics
///
/// As [`servers`] does, and if `pgbouncer` is not installed (the message names the package).
pub fn pgbouncer() -> &'static PgBouncer {
    // Outside the once-cell: a failure of the shared servers panics with its own message.
    let pg_port = servers().pg_port;
    match PGBOUNCER.get_or_init(|| start_pgbouncer(pg_port)) {
        Ok(started) => &started.servers,
        Err(message) => panic!("the test PgBouncer could not be started: {message}"),
    }
}

/// A PgBouncer of one test's own, stopped when dropped.
#[derive(Debug)]
pub struct OwnPgBouncer(Started<PgBouncer>);

impl std::ops::Deref for OwnPgBouncer {
    type Target = PgBouncer;

    fn deref(&self) -> &PgBouncer {
        &self.0.servers
    }
}

/// PgBouncer in transaction mode, as [`pgbouncer`]'s, in front of whatever listens on `pg_port`
/// (e.g. a fault proxy in front of [`servers`]' PostgreSQL, to play a server that goes away
/// behind a pooler that stays).
///
/// # Panics
///
/// As [`pgbouncer`] does.
pub fn pgbouncer_in_front_of(pg_port: u16) -> OwnPgBouncer {
    match start_pgbouncer(pg_port) {
        Ok(started) => OwnPgBouncer(started),
        Err(message) => panic!("a test PgBouncer could not be started: {message}"),
    }
}

fn start_pgbouncer(pg_port: u16) -> Result<Started<PgBouncer>, String> {
    let binary = launcher::pgbouncer::binary().ok_or_else(|| {
        "`pgbouncer` not found in PATH or /usr/sbin; install the Debian package \
         `pgbouncer` (apt-get install pgbouncer)"
            .to_string()
    })?;
    let (_, user) = postgres_installed()?;
    let dir = attached::dir("pgbouncer").map_err(explain)?;
    let auth_file = write_private(&dir, "userlist.txt", pgbouncer::AUTH_FILE, user)?;
    let log = dir.join("pgbouncer.log");
    let (server, running) = attached::start_on_free_port(free_port, &log, |port| {
        let config = pgbouncer::Config {
            written_by: "the test kit (testkit/src/servers.rs)",
            port,
            pg_port,
            auth_file: &auth_file,
        };
        // Rewritten for each port tried; readable by the user PgBouncer runs as, whatever
        // our umask (it holds no secret).
        let ini = dir.join("pgbouncer.ini");
        fs::write(&ini, config.ini())
            .and_then(|()| fs::set_permissions(&ini, fs::Permissions::from_mode(0o644)))
            .map_err(launcher::Error::io(format!("write {}", ini.display())))?;
        Ok(PgBouncerServer {
            binary: binary.clone(),
            config: ini,
            port,
            user,
            cwd: dir.clone(),
        })
    })
    .map_err(explain)?;
    Ok(Started {
        servers: PgBouncer { port: server.port },
        _running: vec![running],
    })
}

/// How late [`replicated`]'s replica applies what its primary commits.
pub const APPLY_DELAY: Duration = Duration::from_secs(2);

/// A primary of its own with one streaming replica that applies its WAL [`APPLY_DELAY`] late
/// (see the module docs). Superuser `postgres`, trust auth, on both.
#[derive(Debug)]
pub struct Replicated {
    /// TCP port of the primary (`127.0.0.1`).
    pub primary_port: u16,
    /// TCP port of the replica (`127.0.0.1`; read-only).
    pub replica_port: u16,
    /// How late the replica applies each transaction: [`APPLY_DELAY`].
    pub apply_delay: Duration,
}

impl Replicated {
    /// `postgres://postgres@127.0.0.1:{primary_port}/{db}`.
    pub fn primary_url(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.primary_port)
    }

    /// `postgres://postgres@127.0.0.1:{replica_port}/{db}`: database `db` exists there
    /// [`Replicated::apply_delay`] after it was created on the primary ([`Replicated::wait_replayed`]).
    pub fn replica_url(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.replica_port)
    }

    /// Returns once the replica has replayed everything the primary had written when this was
    /// called (its `pg_last_wal_replay_lsn()` has reached the primary's `pg_current_wal_lsn()`
    /// read first): a change committed before the call (the primary writes a commit's WAL before
    /// it returns) is then visible on the replica. An
    /// error if that takes longer than `limit` (give it more than [`APPLY_DELAY`]) or a server
    /// does not answer.
    ///
    /// Blocking (a short poll over a plain connection): from async code that must keep serving
    /// meanwhile, call it on a blocking thread.
    pub fn wait_replayed(&self, limit: Duration) -> Result<(), String> {
        let started = Instant::now();
        let lsn = postgres::current_wal_lsn(self.primary_port)?;
        while !postgres::replayed(self.replica_port, &lsn)? {
            if started.elapsed() >= limit {
                return Err(format!(
                    "the replica on port {} had not replayed the primary's WAL up to {lsn} after \
                     {limit:?}",
                    self.replica_port
                ));
            }
            thread::sleep(process::POLL);
        }
        Ok(())
    }
}

static REPLICATED: OnceLock<Result<Started<Replicated>, String>> = OnceLock::new();

/// The primary and its late replica: started on first call, once per process, like [`servers`].
///
/// # Panics
///
/// As [`servers`] does, and if `pg_basebackup` fails (the message shows its log).
pub fn replicated() -> &'static Replicated {
    let start = || {
        let dir = attached::dir("replicated").map_err(explain)?;
        let (bins, user) = postgres_installed()?;
        // Durability off, but a commit returns only once its WAL is written (local
        // synchronous_commit): otherwise `pg_current_wal_lsn()` may not cover a commit that has
        // returned, and `wait_replayed` would not wait for it.
        let durable_commits = throwaway()
            .into_iter()
            .filter(|setting| !setting.starts_with("synchronous_commit="))
            .collect();
        let (primary_port, primary) = start_postgres(&dir, None, durable_commits)?;
        let replica_dir = dir.join("replica");
        owned_dir(&replica_dir, user)?;
        let data = replica_dir.join("data");
        let basebackup = Basebackup {
            bins: &bins,
            primary_port,
            data: &data,
            cwd: &replica_dir,
            user,
            throwaway: true,
        };
        attached::run(
            "pg_basebackup",
            basebackup.command(),
            &dir.join("basebackup.log"),
            INITDB_LIMIT,
        )
        .map_err(explain)?;
        // A hot standby needs the primary's limits (max_connections) or higher: the same list.
        let mut settings = throwaway();
        settings.extend(postgres::standby_settings(APPLY_DELAY));
        let (replica_port, replica) =
            start_server(&bins, user, &data, settings, &dir.join("replica.log"))?;
        Ok(Started {
            servers: Replicated {
                primary_port,
                replica_port,
                apply_delay: APPLY_DELAY,
            },
            _running: vec![replica, primary],
        })
    };
    match REPLICATED.get_or_init(start) {
        Ok(started) => &started.servers,
        Err(message) => panic!("the test primary and replica could not be started: {message}"),
    }
}

/// The TLS PostgreSQL's superuser password: with URL-reserved characters percent-encoded, so a
/// password that needs encoding is what every TLS test connects with.
const PG_TLS_PASSWORD: &str = "s3cret%2Fpass";
/// The same, decoded, as PostgreSQL is told it.
const PG_TLS_PASSWORD_PLAIN: &str = "s3cret/pass";

/// Number of Redis logical databases the shared Redis is started with.
const REDIS_DATABASES: u32 = 10_000;

/// Next index handed out by [`next_redis_db`]. Database 0 is skipped so a
/// stray client without a `/db` suffix in its URL cannot collide with a test.
static NEXT_REDIS_DB: AtomicU32 = AtomicU32::new(1);

/// A process-unique Redis logical database index, starting at 1, so each
/// test gets its own keyspace on the shared Redis (started with
/// `--databases 10000`) without `FLUSHALL` races between parallel tests.
///
/// # Panics
///
/// If more than 9 999 indexes are requested by one process.
pub fn next_redis_db() -> u32 {
    let db = NEXT_REDIS_DB.fetch_add(1, Ordering::Relaxed);
    assert!(
        db < REDIS_DATABASES,
        "next_redis_db: all {} Redis databases of this test process are used; \
         raise REDIS_DATABASES in testkit/src/servers.rs",
        REDIS_DATABASES - 1
    );
    db
}

/// How long `initdb` may take.
const INITDB_LIMIT: Duration = Duration::from_secs(30);

/// How much of a server log goes into a panic message.
const LOG_TAIL_LINES: usize = 40;

/// A launcher error as a panic message: with the last lines of the server's log, if it has one.
pub(crate) fn explain(error: launcher::Error) -> String {
    match error.log() {
        Some(log) => {
            let tail = process::tail(log, LOG_TAIL_LINES);
            let tail = if tail.is_empty() {
                "<log is empty>\n"
            } else {
                &tail
            };
            format!("{error}; its last {LOG_TAIL_LINES} lines:\n{tail}")
        }
        None => error.to_string(),
    }
}

/// PostgreSQL and Redis in `dir` (with `certs`, the TLS variant): their ports (and Redis's TLS
/// port) and the running servers.
fn start_pair(
    dir: &Path,
    certs: Option<&crate::certs::TestCerts>,
) -> Result<(Servers, Option<u16>, [Attached; 2]), String> {
    let redis_binary = redis_binary()?;
    let (pg_port, pg) = start_postgres(dir, certs, throwaway())?;

    let redis_dir = dir.join("redis");
    fs::create_dir(&redis_dir)
        .map_err(|e| format!("could not create {}: {e}", redis_dir.display()))?;
    let tls = match certs {
        None => None,
        Some(certs) => Some(redis::Tls {
            port: free_port()?,
            cert: write_private(&redis_dir, "server.crt", &certs.server_cert, None)?,
            key: write_private(&redis_dir, "server.key", &certs.server_key, None)?,
            ca: write_private(&redis_dir, "ca.crt", &certs.ca, None)?,
        }),
    };
    let tls_port = tls.as_ref().map(|tls| tls.port);
    // If Redis fails, `pg` is dropped on the `?` and stops postgres.
    let log = dir.join("redis.log");
    let (server, redis) = attached::start_on_free_port(free_port, &log, |port| {
        Ok(Redis {
            binary: redis_binary.clone(),
            port,
            dir: redis_dir.clone(),
            databases: Some(REDIS_DATABASES),
            tls: tls.clone(),
        })
    })
    .map_err(explain)?;
    let servers = Servers {
        pg_port,
        redis_port: server.port,
    };
    Ok((servers, tls_port, [pg, redis]))
}

/// `redis-server`, or what to install.
pub(crate) fn redis_binary() -> Result<PathBuf, String> {
    redis::binary().ok_or_else(|| {
        "`redis-server` not found in PATH; install the Debian package `redis-server` \
         (apt-get install redis-server)"
            .to_string()
    })
}

/// The PostgreSQL binaries (15 if installed, else the newest), and the user to run them as:
/// `Some(postgres)` when we are root (PostgreSQL refuses to run as root), else ourselves.
fn postgres_installed() -> Result<(Bins, Option<User>), String> {
    let bins = Bins::find(Some("15"))
        .filter(|bins| bins.have(&["initdb", "postgres", "pg_isready", "pg_basebackup"]))
        .ok_or_else(|| {
            "PostgreSQL server binaries (initdb, postgres, pg_isready, pg_basebackup) not found \
             in /usr/lib/postgresql/15/bin or /usr/lib/postgresql/*/bin; install the Debian \
             package `postgresql` (apt-get install postgresql)"
                .to_string()
        })?;
    // Only root needs (and can) switch user; otherwise run as ourselves.
    let user = if process::is_root() {
        Some(User::named("postgres").ok_or_else(|| {
            "running as root, but there is no `postgres` user in /etc/passwd to run \
             PostgreSQL as (PostgreSQL refuses to run as root); install the Debian \
             package `postgresql`, which creates it"
                .to_string()
        })?)
    } else {
        None
    };
    Ok((bins, user))
}

/// Creates `dir`, owned by `user` when given: `initdb` and `pg_basebackup` create their data
/// directory inside it, so the postgres user must own the parent too (root owning it would make
/// them fail with EACCES), and every directory on the way must be searchable by it.
fn owned_dir(dir: &Path, user: Option<User>) -> Result<(), String> {
    fs::create_dir(dir).map_err(|e| format!("could not create {}: {e}", dir.display()))?;
    let Some(user) = user else {
        return Ok(());
    };
    chown(dir, Some(user.uid), Some(user.gid))
        .map_err(|e| format!("could not chown {} to postgres: {e}", dir.display()))?;
    match process::unreachable_by(user, dir) {
        Some((blocker, mode)) => Err(format!(
            "{} is not searchable by the `postgres` user (mode {mode:o}), so it cannot reach \
             {}; set TMPDIR to a directory such as /tmp",
            blocker.display(),
            dir.display()
        )),
        None => Ok(()),
    }
}

/// A new cluster in `dir/pg/data`, and its server on a free port with `settings` (and TLS's, with
/// `certs`).
fn start_postgres(
    dir: &Path,
    certs: Option<&crate::certs::TestCerts>,
    mut settings: Vec<String>,
) -> Result<(u16, Attached), String> {
    let (bins, user) = postgres_installed()?;
    let pg_dir = dir.join("pg");
    owned_dir(&pg_dir, user)?;
    let data = pg_dir.join("data");
    let password_file = match certs {
        Some(_) => Some(write_private(
            &pg_dir,
            "pwfile",
            PG_TLS_PASSWORD_PLAIN,
            user,
        )?),
        None => None,
    };
    let initdb = Initdb {
        bins: &bins,
        data: &data,
        cwd: &pg_dir,
        user,
        throwaway: true,
        password_file: password_file.as_deref(),
    };
    attached::run(
        "initdb",
        initdb.command(),
        &dir.join("initdb.log"),
        INITDB_LIMIT,
    )
    .map_err(explain)?;

    if let Some(certs) = certs {
        fs::write(data.join("pg_hba.conf"), postgres::TLS_ONLY_HBA)
            .map_err(|e| format!("could not write pg_hba.conf: {e}"))?;
        let cert = write_private(&pg_dir, "server.crt", &certs.server_cert, user)?;
        let key = write_private(&pg_dir, "server.key", &certs.server_key, user)?;
        settings.extend(postgres::tls_settings(&cert, &key));
    }
    start_server(&bins, user, &data, settings, &dir.join("postgres.log"))
}

/// [`postgres::THROWAWAY`], as the settings of a server.
fn throwaway() -> Vec<String> {
    postgres::THROWAWAY.map(str::to_owned).to_vec()
}

/// The server of the cluster in `data` (made by `initdb` or `pg_basebackup`) on a free port, with
/// `settings`, its output in `log`.
fn start_server(
    bins: &Bins,
    user: Option<User>,
    data: &Path,
    settings: Vec<String>,
    log: &Path,
) -> Result<(u16, Attached), String> {
    let (server, running) = attached::start_on_free_port(free_port, log, |port| {
        Ok(Postgres {
            bins: bins.clone(),
            data: data.to_owned(),
            // The default /var/run/postgresql may not exist or be writable for us.
            socket_dir: data.to_owned(),
            cwd: data.to_owned(),
            port,
            user,
            settings: settings.clone(),
        })
    })
    .map_err(explain)?;
    Ok((server.port, running))
}

/// Writes `text` to `dir/name`, readable only by its owner (`user` when given).
fn write_private(
    dir: &Path,
    name: &str,
    text: &str,
    user: Option<User>,
) -> Result<PathBuf, String> {
    let path = dir.join(name);
    fs::write(&path, text).map_err(|e| format!("could not write {}: {e}", path.display()))?;
    fs::set_permissions(&path, fs::Permissions::from_mode(0o600))
        .map_err(|e| format!("could not chmod {}: {e}", path.display()))?;
    if let Some(user) = user {
        chown(&path, Some(user.uid), Some(user.gid))
            .map_err(|e| format!("could not chown {} to postgres: {e}", path.display()))?;
    }
    Ok(path)
}

// ---------------------------------------------------------------------------
// Self-test
// ---------------------------------------------------------------------------

/// Both servers start, accept TCP connections, and Redis serves commands.
/// Fails (by panicking) if any of that is not true.
#[test]
fn servers_start_and_answer() {
    let s = servers();
    assert_ne!(
        s.pg_port, s.redis_port,
        "postgres and redis got the same port"
    );
    launcher::probe::connect(s.pg_port)
        .unwrap_or_else(|e| panic!("postgres does not accept connections: {e}"));
    launcher::probe::connect(s.redis_port)
        .unwrap_or_else(|e| panic!("redis does not accept connections: {e}"));
    redis::ping(s.redis_port).unwrap_or_else(|e| panic!("redis does not answer PING: {e}"));
    // Same instance on every call.
    assert!(
        std::ptr::eq(s, servers()),
        "servers() returned a different instance"
    );
    let (a, b) = (next_redis_db(), next_redis_db());
    assert!(
        a >= 1 && b > a,
        "next_redis_db must count up from 1, got {a} then {b}"
    );
    assert_eq!(
        s.pg_url("x"),
        format!("postgres://postgres@127.0.0.1:{}/x", s.pg_port)
    );
    assert_eq!(
        s.redis_url(7),
        format!("redis://127.0.0.1:{}/7", s.redis_port)
    );
}

/// PgBouncer hands out server connections per transaction, not per client session: two clients
/// between transactions share the pool's one server connection (in session mode the second would
/// get a second one), a session `SET` made by one reaches the other, and a client inside a
/// transaction keeps its server connection to itself.
#[test]
fn pgbouncer_pools_server_connections_per_transaction() {
    let bouncer = pgbouncer();
    let connect = |port, db| {
        PgConnection::connect(port, "postgres", db).unwrap_or_else(|e| panic!("connect: {e}"))
    };
    let run = |connection: &mut PgConnection, sql: &str| {
        connection
            .value(sql)
            .unwrap_or_else(|e| panic!("{e}"))
            .unwrap_or_default()
    };
    // A database of its own: its pool starts empty, so it holds only the server connections
    // this test makes it open.
    let db = "pgbouncer_pooling";
    run(
        &mut connect(servers().pg_port, "postgres"),
        &format!("CREATE DATABASE {db}"),
    );
    let (mut a, mut b) = (connect(bouncer.port, db), connect(bouncer.port, db));

    let pid = "SELECT pg_backend_pid()";
    let first = run(&mut a, pid);
    assert_eq!(
        run(&mut b, pid),
        first,
        "between transactions, the second client gets the server connection the first let go \
         (a pooler in session mode would have given it one of its own)"
    );

    run(&mut a, "SET statement_timeout = '4321ms'");
    assert_eq!(
        run(&mut b, "SHOW statement_timeout"),
        "4321ms",
        "a session SET outlives its transaction and reaches the next client of that server \
         connection"
    );
    run(&mut b, "RESET statement_timeout");

    run(&mut a, "BEGIN");
    let in_transaction = run(&mut a, pid);
    assert_ne!(
        run(&mut b, pid),
        in_transaction,
        "a client inside a transaction keeps its server connection"
    );
    assert_eq!(
        run(&mut a, pid),
        in_transaction,
        "for the whole transaction"
    );
    run(&mut a, "COMMIT");
    assert!(
        std::ptr::eq(bouncer, pgbouncer()),
        "pgbouncer() returned a different instance"
    );
    assert_eq!(
        bouncer.url("x"),
        format!("postgres://postgres@127.0.0.1:{}/x", bouncer.port)
    );
}

/// The replica applies what the primary commits [`APPLY_DELAY`] late: a row inserted on the
/// primary is not on the replica before that, and is once [`Replicated::wait_replayed`] returns.
#[test]
fn replica_applies_commits_late_and_wait_replayed_waits_for_them() {
    let r = replicated();
    assert_eq!(r.apply_delay, APPLY_DELAY);
    let connect = |port| {
        PgConnection::connect(port, "postgres", "postgres")
            .unwrap_or_else(|e| panic!("connect: {e}"))
    };
    let (mut primary, mut replica) = (connect(r.primary_port), connect(r.replica_port));
    let limit = APPLY_DELAY * 10;
    primary
        .query("CREATE TABLE replicated_rows (id int)")
        .unwrap_or_else(|e| panic!("{e}"));
    r.wait_replayed(limit)
        .unwrap_or_else(|e| panic!("the table reaches the replica: {e}"));
    let rows = |replica: &mut PgConnection| {
        replica
            .value("SELECT count(*) FROM replicated_rows")
            .unwrap_or_else(|e| panic!("{e}"))
            .unwrap_or_default()
    };
    assert_eq!(rows(&mut replica), "0");

    let before_insert = Instant::now();
    primary
        .query("INSERT INTO replicated_rows VALUES (1)")
        .unwrap_or_else(|e| panic!("{e}"));
    let early = rows(&mut replica);
    // The replica applies the commit at its commit time + APPLY_DELAY, and that commit came after
    // `before_insert`: a look that ends sooner than APPLY_DELAY after it cannot see the row.
    if before_insert.elapsed() < APPLY_DELAY {
        assert_eq!(early, "0", "the row is on the replica before APPLY_DELAY");
    }
    r.wait_replayed(limit)
        .unwrap_or_else(|e| panic!("the insert reaches the replica: {e}"));
    let took = before_insert.elapsed();
    assert_eq!(
        rows(&mut replica),
        "1",
        "the row is on the replica once replayed"
    );
    assert!(
        took >= APPLY_DELAY,
        "wait_replayed returned {took:?} after the insert, before APPLY_DELAY"
    );
    assert!(
        replica
            .query("INSERT INTO replicated_rows VALUES (2)")
            .is_err(),
        "the replica is read-only"
    );
    assert_eq!(
        r.replica_url("x"),
        format!("postgres://postgres@127.0.0.1:{}/x", r.replica_port)
    );
}
