//! Real PostgreSQL and Redis servers for the integration tests.
//!
//! One PostgreSQL 15 server and one Redis server are started lazily, once per
//! test *process*, on free loopback ports, and shared by every test in that
//! process. Sharing is what keeps the suite fast: `initdb` plus server start
//! costs on the order of a second, so paying it once instead of per test is
//! the difference between a usable and an unusable suite. Isolation between
//! tests comes from elsewhere: each test creates its own PostgreSQL database
//! (via [`Servers::pg_admin_url`]) and takes its own Redis logical database
//! (via [`next_redis_db`]).
//!
//! # Why the servers die with the test process
//!
//! Rust never runs destructors for statics, and the test harness ends with
//! `exit()`, so "kill the children in `Drop`" cannot work. Instead every child
//! is spawned with `prctl(PR_SET_PDEATHSIG, sig)`: the kernel sends `sig` to
//! the child when its parent dies. On Linux "parent" means the *thread* that
//! forked the child, not the process, so the children are spawned from a
//! dedicated thread that never returns (it parks forever). That thread only
//! dies when the whole process does: normal exit, panic abort, `SIGKILL`,
//! Ctrl-C. PostgreSQL gets `SIGQUIT` (immediate shutdown: the postmaster
//! tells its backends to quit and exits without a checkpoint, which we do not
//! need for throwaway data), Redis gets `SIGTERM` (it has nothing to save,
//! because it runs with `--save "" --appendonly no`).
//!
//! # Running as root
//!
//! PostgreSQL refuses to run as root. When the test process is root (as in
//! containers and CI images), `initdb` and `postgres` are run as the
//! `postgres` system user through [`CommandExt::uid`]/[`CommandExt::gid`],
//! not through `runuser`/`su`, because those wrappers would become the
//! parent of `postgres` and do not forward our death signal to it. std
//! applies `setgid`/`setuid` in the child *before* it runs `pre_exec`
//! closures (see `do_exec` in `library/std/src/sys/process/unix/unix.rs`),
//! which matters because the kernel clears `PDEATHSIG` on a credential
//! change: setting it in `pre_exec` therefore happens after the uid switch
//! and survives. `exec` of a non-set-uid binary keeps it.
//!
//! # The TLS variant
//!
//! [`tls_servers`] starts a second pair the same way, for the TLS tests only: PostgreSQL with
//! `ssl=on` that accepts TCP clients only over TLS and only with a password (`hostssl` +
//! `scram-sha-256`), and Redis with a `--tls-port` (clients may show a certificate, and it is
//! checked if they do). Their certificates come from a CA generated for the process
//! ([`crate::certs`]); the PEM files are in [`TlsServers`]. Redis keeps a plain port on
//! loopback too, only so that readiness is checked the same way as for the shared one.
//!
//! # Disk usage
//!
//! All files live in `$TMPDIR/singleflight-tests/<pid>/`. Each process, when
//! it starts its servers, deletes the sibling directories whose process is
//! no longer alive, so repeated runs do not fill the disk even though no
//! process ever cleans up after itself.

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream};
use std::os::raw::{c_int, c_ulong};
use std::os::unix::fs::{chown, MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{mpsc, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

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

/// The result of the one start attempt. A failure is stored too (as its
/// message), so that after one failed start every other test fails at once
/// with the same explanation instead of each retrying for 30 s in a
/// half-initialised temp dir.
static SERVERS: OnceLock<Result<Servers, String>> = OnceLock::new();

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
    match SERVERS.get_or_init(|| start_all(Variant::Plain).map(|(servers, _)| servers)) {
        Ok(servers) => servers,
        Err(message) => panic!("test servers could not be started: {message}"),
    }
}

static TLS_SERVERS: OnceLock<Result<TlsServers, String>> = OnceLock::new();

/// The TLS variant (see the module docs): started on first call, once per process, like
/// [`servers`].
///
/// # Panics
///
/// As [`servers`] does.
pub fn tls_servers() -> &'static TlsServers {
    let start = || {
        let files = base_dir()?.join("tls");
        fs::create_dir(&files).map_err(|e| format!("could not create {}: {e}", files.display()))?;
        let certs = crate::certs::generate()?;
        let (plain, redis_tls_port) = start_all(Variant::Tls {
            certs: certs.clone(),
            dir: files.clone(),
        })?;
        let write = |name: &str, pem: &str| {
            let path = files.join(name);
            fs::write(&path, pem)
                .map(|()| path.clone())
                .map_err(|e| format!("could not write {}: {e}", path.display()))
        };
        Ok(TlsServers {
            plain,
            redis_tls_port: redis_tls_port.unwrap_or_default(),
            pg_password: PG_TLS_PASSWORD.to_owned(),
            ca_file: write("ca.pem", &certs.ca)?,
            unrelated_ca_file: write("unrelated-ca.pem", &crate::certs::unrelated_ca()?)?,
            client_cert_file: write("client.pem", &certs.client_cert)?,
            client_key_file: write("client.key", &certs.client_key)?,
        })
    };
    match TLS_SERVERS.get_or_init(start) {
        Ok(servers) => servers,
        Err(message) => panic!("TLS test servers could not be started: {message}"),
    }
}

/// The TLS PostgreSQL's superuser password: with URL-reserved characters percent-encoded, so a
/// password that needs encoding is what every TLS test connects with.
const PG_TLS_PASSWORD: &str = "s3cret%2Fpass";
/// The same, decoded, as PostgreSQL is told it.
const PG_TLS_PASSWORD_PLAIN: &str = "s3cret/pass";

/// Which pair of servers to start.
#[derive(Clone)]
enum Variant {
    Plain,
    /// With certificates; its files in `dir`.
    Tls {
        certs: crate::certs::TestCerts,
        dir: PathBuf,
    },
}

/// Number of Redis logical databases; must match `--databases` below.
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
         raise REDIS_DATABASES in tests/api/support/servers.rs",
        REDIS_DATABASES - 1
    );
    db
}

// ---------------------------------------------------------------------------
// Start-up orchestration
// ---------------------------------------------------------------------------

/// Upper bound for each wait (initdb, each server's readiness).
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// Delay between readiness probes: short, because start-up is on the
/// critical path of every test run, but not a busy loop.
const POLL_INTERVAL: Duration = Duration::from_millis(25);

/// Spawns the thread that owns the children and waits for its report.
///
/// The thread must outlive the children because `PR_SET_PDEATHSIG` fires
/// when the *forking thread* exits (see the module docs); so on success it
/// parks forever, holding the [`Child`] handles. On failure it drops the
/// handles, which stops whatever did start, and exits.
fn start_all(variant: Variant) -> Result<(Servers, Option<u16>), String> {
    let (tx, rx) = mpsc::channel();
    thread::Builder::new()
        .name("test-servers-parent".into())
        .spawn(move || match start_children(variant) {
            Ok((servers, children)) => {
                // The receiver is alive: start_all is blocked in recv().
                let _ = tx.send(Ok(servers));
                // Never return: our death would SIGQUIT/SIGTERM the servers.
                let _children = children;
                loop {
                    thread::park();
                }
            }
            Err(message) => {
                let _ = tx.send(Err(message));
            }
        })
        .map_err(|e| format!("could not spawn the thread that owns the servers: {e}"))?;
    rx.recv().unwrap_or_else(|_| {
        Err("the thread starting the servers panicked before reporting \
             (its panic message is printed above)"
            .to_string())
    })
}

/// Does the actual work on the owning thread: directories, binaries,
/// `initdb`, then both servers. Returns the guards of the running children (and the TLS port of
/// Redis, for the TLS variant).
type Started = ((Servers, Option<u16>), Vec<ChildGuard>);

fn start_children(variant: Variant) -> Result<Started, String> {
    let pg_bins = PgBins::find()?;
    let redis_server = find_in_path("redis-server").ok_or_else(|| {
        "`redis-server` not found in PATH; install the Debian package `redis-server` \
         (apt-get install redis-server)"
            .to_string()
    })?;

    let base = match &variant {
        Variant::Plain => base_dir()?,
        Variant::Tls { dir, .. } => dir.clone(),
    };
    // Only root needs (and can) switch user; otherwise run as ourselves.
    let pg_user = if current_euid()? == 0 {
        let user = lookup_user("postgres")?;
        check_traversable(&base)?;
        Some(user)
    } else {
        None
    };

    let pg_dir = base.join("pg");
    fs::create_dir(&pg_dir).map_err(|e| format!("could not create {}: {e}", pg_dir.display()))?;
    if let Some(user) = pg_user {
        // initdb creates `data` inside `pg_dir`, so the postgres user must own
        // the parent too; root owning it would make initdb fail with EACCES.
        chown(&pg_dir, Some(user.uid), Some(user.gid))
            .map_err(|e| format!("could not chown {} to postgres: {e}", pg_dir.display()))?;
    }
    let data_dir = pg_dir.join("data");
    let tls_certs = match &variant {
        Variant::Plain => None,
        Variant::Tls { certs, .. } => Some(certs),
    };
    let mut auth = vec!["--auth=trust".to_owned()];
    if tls_certs.is_some() {
        let pwfile = write_private(&pg_dir, "pwfile", PG_TLS_PASSWORD_PLAIN, pg_user)?;
        auth.push(format!("--pwfile={}", pwfile.display()));
    }
    run_initdb(
        &pg_bins,
        &data_dir,
        &pg_dir,
        pg_user,
        &base.join("initdb.log"),
        &auth,
    )?;
    let mut pg_settings = Vec::new();
    if let Some(certs) = tls_certs {
        // TCP clients: TLS and a password, nothing else; the socket (pg_isready) stays trusted.
        fs::write(
            data_dir.join("pg_hba.conf"),
            "local all all trust\nhostssl all all 127.0.0.1/32 scram-sha-256\n",
        )
        .map_err(|e| format!("could not write pg_hba.conf: {e}"))?;
        // PostgreSQL refuses a key readable by others, or not owned by itself (or root).
        let cert = write_private(&pg_dir, "server.crt", &certs.server_cert, pg_user)?;
        let key = write_private(&pg_dir, "server.key", &certs.server_key, pg_user)?;
        pg_settings.extend([
            "ssl=on".to_owned(),
            format!("ssl_cert_file={}", cert.display()),
            format!("ssl_key_file={}", key.display()),
        ]);
    }

    let (pg_port, pg) = start_postgres(
        &pg_bins,
        &data_dir,
        pg_user,
        &base.join("postgres.log"),
        &pg_settings,
    )?;
    let redis_dir = base.join("redis");
    fs::create_dir(&redis_dir)
        .map_err(|e| format!("could not create {}: {e}", redis_dir.display()))?;
    let redis_tls = match tls_certs {
        None => None,
        Some(certs) => Some(RedisTls {
            port: free_port()?,
            cert: write_private(&redis_dir, "server.crt", &certs.server_cert, None)?,
            key: write_private(&redis_dir, "server.key", &certs.server_key, None)?,
            ca: write_private(&redis_dir, "ca.crt", &certs.ca, None)?,
        }),
    };
    // If Redis fails, `pg` is dropped on the `?` and stops postgres.
    let (redis_port, redis) = start_redis(
        &redis_server,
        &redis_dir,
        &base.join("redis.log"),
        redis_tls.as_ref(),
    )?;

    Ok((
        (
            Servers {
                pg_port,
                redis_port,
            },
            redis_tls.map(|tls| tls.port),
        ),
        vec![pg, redis],
    ))
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

/// The process's directory for server files, made (and stale ones of dead processes removed)
/// once, whichever variant starts first.
fn base_dir() -> Result<PathBuf, String> {
    static BASE: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    BASE.get_or_init(prepare_base_dir).clone()
}

// ---------------------------------------------------------------------------
// Binaries and users
// ---------------------------------------------------------------------------

/// Absolute paths of the PostgreSQL programs we need, all from one version.
struct PgBins {
    initdb: PathBuf,
    postgres: PathBuf,
    pg_isready: PathBuf,
}

impl PgBins {
    /// Prefers `/usr/lib/postgresql/15/bin` (the version the service is
    /// tested against), falls back to the newest `/usr/lib/postgresql/*/bin`.
    /// Debian does not put `initdb`/`postgres` in PATH, hence no PATH search.
    fn find() -> Result<PgBins, String> {
        let from = |dir: &Path| PgBins {
            initdb: dir.join("initdb"),
            postgres: dir.join("postgres"),
            pg_isready: dir.join("pg_isready"),
        };
        let complete =
            |b: &PgBins| b.initdb.is_file() && b.postgres.is_file() && b.pg_isready.is_file();

        let preferred = from(Path::new("/usr/lib/postgresql/15/bin"));
        if complete(&preferred) {
            return Ok(preferred);
        }
        let mut versions: Vec<(u32, PathBuf)> = fs::read_dir("/usr/lib/postgresql")
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|entry| {
                let version = entry.file_name().to_str()?.parse::<u32>().ok()?;
                Some((version, entry.path().join("bin")))
            })
            .collect();
        versions.sort();
        versions
            .into_iter()
            .rev()
            .map(|(_, dir)| from(&dir))
            .find(complete)
            .ok_or_else(|| {
                "PostgreSQL server binaries (initdb, postgres, pg_isready) not found in \
                 /usr/lib/postgresql/15/bin or /usr/lib/postgresql/*/bin; install the Debian \
                 package `postgresql` (apt-get install postgresql)"
                    .to_string()
            })
    }
}

/// First executable file called `name` in `$PATH`.
fn find_in_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|candidate| {
            fs::metadata(candidate).is_ok_and(|m| m.is_file() && m.mode() & 0o111 != 0)
        })
}

/// Effective uid of this process, without libc: `/proc/self` is owned by the
/// process's effective uid.
fn current_euid() -> Result<u32, String> {
    fs::metadata("/proc/self")
        .map(|m| m.uid())
        .map_err(|e| format!("could not stat /proc/self to find our effective uid: {e}"))
}

/// A uid/gid pair to run a child as.
#[derive(Clone, Copy, Debug)]
struct User {
    uid: u32,
    gid: u32,
}

/// Looks `name` up in `/etc/passwd` (`name:x:uid:gid:...`). Good enough for
/// the system users Debian packages create; no NSS needed.
fn lookup_user(name: &str) -> Result<User, String> {
    let passwd = fs::read_to_string("/etc/passwd")
        .map_err(|e| format!("could not read /etc/passwd to find the `{name}` user: {e}"))?;
    passwd
        .lines()
        .filter_map(|line| {
            let mut fields = line.split(':');
            if fields.next()? != name {
                return None;
            }
            let _password = fields.next()?;
            let uid = fields.next()?.parse().ok()?;
            let gid = fields.next()?.parse().ok()?;
            Some(User { uid, gid })
        })
        .next()
        .ok_or_else(|| {
            format!(
                "running as root, but there is no `{name}` user in /etc/passwd to run \
                 PostgreSQL as (PostgreSQL refuses to run as root); install the Debian \
                 package `postgresql`, which creates it"
            )
        })
}

/// When postgres runs as another user it must be able to reach its data
/// directory: every ancestor needs the "others may search" bit. Checking up
/// front turns an obscure initdb failure into a clear message (e.g. with
/// `TMPDIR=/root/tmp`).
fn check_traversable(base: &Path) -> Result<(), String> {
    for dir in base.ancestors() {
        let mode = fs::metadata(dir)
            .map_err(|e| format!("could not stat {}: {e}", dir.display()))?
            .mode();
        if mode & 0o001 == 0 {
            return Err(format!(
                "{} is not searchable by other users (mode {:o}), so the `postgres` user \
                 cannot reach its data dir under {}; set TMPDIR to a directory such as /tmp",
                dir.display(),
                mode & 0o7777,
                base.display()
            ));
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Temp directories
// ---------------------------------------------------------------------------

/// Creates `$TMPDIR/singleflight-tests/<pid>` (empty) after deleting the
/// siblings left by processes that are gone.
///
/// A fixed, pid-named layout (rather than a random `tempfile` dir) is what
/// makes the cleanup possible: a directory's owner is known from its name,
/// and `/proc/<pid>` tells whether that owner is still running, so
/// concurrently running test binaries never delete each other's servers.
fn prepare_base_dir() -> Result<PathBuf, String> {
    let root = std::env::temp_dir().join("singleflight-tests");
    fs::create_dir_all(&root).map_err(|e| format!("could not create {}: {e}", root.display()))?;
    // Shared by every user of the machine, like /tmp itself: world-writable
    // with the sticky bit, so a non-root run can create its directory next to
    // one made by a root run (and the postgres user can traverse it), while
    // nobody can delete other users' directories. Fails harmlessly when
    // another user created it.
    let _ = fs::set_permissions(&root, fs::Permissions::from_mode(0o1777));

    let own_pid = std::process::id();
    if let Ok(entries) = fs::read_dir(&root) {
        for entry in entries.flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<u32>().ok())
            else {
                continue;
            };
            if pid != own_pid && !Path::new("/proc").join(pid.to_string()).exists() {
                // Best effort: a failure only costs disk space.
                let _ = fs::remove_dir_all(entry.path());
            }
        }
    }

    let base = root.join(own_pid.to_string());
    // Left over by an earlier, dead process that had our (recycled) pid.
    if base.exists() {
        fs::remove_dir_all(&base)
            .map_err(|e| format!("could not remove stale {}: {e}", base.display()))?;
    }
    fs::create_dir(&base).map_err(|e| format!("could not create {}: {e}", base.display()))?;
    fs::set_permissions(&base, fs::Permissions::from_mode(0o755))
        .map_err(|e| format!("could not chmod {}: {e}", base.display()))?;
    Ok(base)
}

// ---------------------------------------------------------------------------
// Child processes
// ---------------------------------------------------------------------------

const PR_SET_PDEATHSIG: c_int = 1;
const SIGQUIT: c_int = 3;
const SIGTERM: c_int = 15;
const ESRCH: i32 = 3;

// There is no libc crate among the dev-dependencies; these are plain libc
// symbols that std already links against.
unsafe extern "C" {
    fn prctl(option: c_int, ...) -> c_int;
    fn getppid() -> c_int;
    fn kill(pid: c_int, sig: c_int) -> c_int;
}

/// Makes the kernel send `signal` to the child when the thread spawning it
/// dies (see the module docs for why that thread never dies before the
/// process).
///
/// Also closes the race where the process exits between `fork` and the
/// `prctl`: the child would then already be orphaned and never get the
/// signal, so it checks that its parent is still us and otherwise fails the
/// spawn instead of exec'ing an immortal server.
fn die_with_parent(cmd: &mut Command, signal: c_int) {
    let parent_pid = std::process::id() as c_int;
    // SAFETY: the closure runs in the forked child, where only
    // async-signal-safe operations are allowed (another thread of the parent
    // may have held the malloc lock at fork time). It only calls `prctl` and
    // `getppid`, which are raw system calls and async-signal-safe, reads
    // errno, and builds `io::Error`s from OS error codes, which does not
    // allocate. It captures a plain integer, touches no shared state and
    // takes no locks.
    unsafe {
        cmd.pre_exec(move || {
            if prctl(PR_SET_PDEATHSIG, signal as c_ulong) == -1 {
                return Err(io::Error::last_os_error());
            }
            if getppid() != parent_pid {
                return Err(io::Error::from_raw_os_error(ESRCH));
            }
            Ok(())
        });
    }
}

/// Common set-up of every server command: no stdin, output appended to
/// `log`, optional user switch, and death with the owning thread.
fn configure(
    cmd: &mut Command,
    log: &Path,
    user: Option<User>,
    signal: c_int,
) -> Result<(), String> {
    let file = File::options()
        .create(true)
        .append(true)
        .open(log)
        .map_err(|e| format!("could not open log file {}: {e}", log.display()))?;
    let file2 = file
        .try_clone()
        .map_err(|e| format!("could not duplicate log file handle {}: {e}", log.display()))?;
    cmd.stdin(Stdio::null()).stdout(file).stderr(file2);
    if let Some(user) = user {
        // gid first is what std does internally as well; setting both is
        // required, uid alone would leave us in root's group.
        cmd.gid(user.gid).uid(user.uid);
    }
    die_with_parent(cmd, signal);
    Ok(())
}

/// A running child that is stopped when dropped. Only dropped on the failure
/// paths: on success the guards live on the parked owning thread forever,
/// and the children die through `PDEATHSIG` instead.
struct ChildGuard {
    child: Child,
    name: &'static str,
    stop_signal: c_int,
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Ok(Some(_)) = self.child.try_wait() {
            return;
        }
        // Polite signal first (postgres cleans up its shared memory and
        // backends on SIGQUIT; SIGKILL would orphan the backends briefly).
        // SAFETY: kill(2) on a pid we spawned and have not reaped yet, so it
        // cannot be a recycled pid.
        unsafe {
            kill(self.child.id() as c_int, self.stop_signal);
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            thread::sleep(POLL_INTERVAL);
        }
        eprintln!(
            "test servers: {} ignored its stop signal, killing it",
            self.name
        );
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Why a server did not come up.
enum StartFailure {
    /// The process exited: typically it lost the race for its port, which is
    /// worth one retry with a new port.
    Exited(String),
    /// Not ready in time, or could not even be spawned: not retried.
    Fatal(String),
}

/// Polls `probe` until it says ready, the child exits, or [`START_TIMEOUT`]
/// passes.
fn wait_ready(
    guard: &mut ChildGuard,
    log: &Path,
    mut probe: impl FnMut() -> Result<(), String>,
) -> Result<(), StartFailure> {
    let started = Instant::now();
    loop {
        match guard.child.try_wait() {
            Ok(Some(status)) => {
                return Err(StartFailure::Exited(format!(
                    "{} exited during start-up ({status}); last {} lines of {}:\n{}",
                    guard.name,
                    LOG_TAIL_LINES,
                    log.display(),
                    log_tail(log)
                )))
            }
            Ok(None) => {}
            Err(e) => {
                return Err(StartFailure::Fatal(format!(
                    "could not wait for {}: {e}",
                    guard.name
                )))
            }
        }
        let last_problem = match probe() {
            Ok(()) => return Ok(()),
            Err(problem) => problem,
        };
        if started.elapsed() > START_TIMEOUT {
            return Err(StartFailure::Fatal(format!(
                "{} was not ready after {:?} (last check: {last_problem}); last {} lines of {}:\n{}",
                guard.name,
                START_TIMEOUT,
                LOG_TAIL_LINES,
                log.display(),
                log_tail(log)
            )));
        }
        thread::sleep(POLL_INTERVAL);
    }
}

/// Starts a server on a free port, retrying once with a new port if the
/// process exits during start-up (another test process can pick the same port
/// between our probe and the server's bind).
fn start_on_free_port(
    name: &'static str,
    log: &Path,
    stop_signal: c_int,
    mut command_for_port: impl FnMut(u16) -> Result<Command, String>,
    mut probe: impl FnMut(u16) -> Result<(), String>,
) -> Result<(u16, ChildGuard), String> {
    let mut first_failure = None;
    for _attempt in 0..2 {
        let port = free_port()?;
        let mut cmd = command_for_port(port)?;
        let child = cmd
            .spawn()
            .map_err(|e| format!("could not spawn {name} ({cmd:?}): {e}"))?;
        let mut guard = ChildGuard {
            child,
            name,
            stop_signal,
        };
        match wait_ready(&mut guard, log, || probe(port)) {
            Ok(()) => return Ok((port, guard)),
            Err(StartFailure::Exited(message)) if first_failure.is_none() => {
                first_failure = Some(message);
            }
            Err(StartFailure::Exited(message)) | Err(StartFailure::Fatal(message)) => {
                return Err(match first_failure {
                    Some(first) => format!("{message}\n(first attempt: {first})"),
                    None => message,
                })
            }
        }
    }
    Err(first_failure.unwrap_or_else(|| format!("{name} did not start")))
}

/// Can something connect to `127.0.0.1:port` right now?
fn tcp_accepts(port: u16) -> Result<TcpStream, String> {
    let addr = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, port));
    TcpStream::connect_timeout(&addr, Duration::from_millis(500))
        .map_err(|e| format!("TCP connect to 127.0.0.1:{port}: {e}"))
}

// ---------------------------------------------------------------------------
// PostgreSQL
// ---------------------------------------------------------------------------

/// Creates the cluster. `--no-sync` because the data is throwaway and
/// fsyncing the catalog costs most of initdb's time; `--locale=C` and UTF8
/// make sorting and encoding independent of the machine's locale settings;
/// `--auth=trust` so tests connect without passwords.
fn run_initdb(
    bins: &PgBins,
    data_dir: &Path,
    cwd: &Path,
    user: Option<User>,
    log: &Path,
    auth: &[String],
) -> Result<(), String> {
    let mut cmd = Command::new(&bins.initdb);
    cmd.arg("-D")
        .arg(data_dir)
        .args(auth)
        .args(["-U", "postgres", "--no-sync", "-E", "UTF8", "--locale=C"])
        // The postgres user may not be allowed into our cwd (e.g. /root),
        // which makes initdb complain; its own parent dir is always fine.
        .current_dir(cwd);
    configure(&mut cmd, log, user, SIGTERM)?;
    let child = cmd
        .spawn()
        .map_err(|e| format!("could not spawn initdb ({cmd:?}): {e}"))?;
    let mut guard = ChildGuard {
        child,
        name: "initdb",
        stop_signal: SIGTERM,
    };
    let started = Instant::now();
    loop {
        match guard.child.try_wait() {
            Ok(Some(status)) if status.success() => return Ok(()),
            Ok(Some(status)) => {
                return Err(format!(
                    "initdb failed ({status}); command: {cmd:?}; last {} lines of {}:\n{}",
                    LOG_TAIL_LINES,
                    log.display(),
                    log_tail(log)
                ))
            }
            Ok(None) if started.elapsed() > START_TIMEOUT => {
                return Err(format!(
                    "initdb did not finish within {START_TIMEOUT:?}; last {} lines of {}:\n{}",
                    LOG_TAIL_LINES,
                    log.display(),
                    log_tail(log)
                ))
            }
            Ok(None) => thread::sleep(POLL_INTERVAL),
            Err(e) => return Err(format!("could not wait for initdb: {e}")),
        }
    }
}

/// Starts the postmaster directly (not via `pg_ctl`, which would fork it
/// away from us and defeat `PDEATHSIG`).
///
/// Settings: listen on loopback only; the Unix socket goes into the data dir
/// (`-k`) because the default `/var/run/postgresql` may not exist or be
/// writable; durability is switched off (`fsync`, `synchronous_commit`,
/// `full_page_writes`) because the data is throwaway and this makes DDL per
/// test much faster; `max_connections=300` leaves room for many parallel
/// tests each with its own pool; small `shared_buffers` keeps the footprint
/// low. PostgreSQL gets `SIGQUIT` on our death: immediate shutdown.
fn start_postgres(
    bins: &PgBins,
    data_dir: &Path,
    user: Option<User>,
    log: &Path,
    settings: &[String],
) -> Result<(u16, ChildGuard), String> {
    start_on_free_port(
        "postgres",
        log,
        SIGQUIT,
        |port| {
            let mut cmd = Command::new(&bins.postgres);
            cmd.arg("-D")
                .arg(data_dir)
                .arg("-p")
                .arg(port.to_string())
                .arg("-k")
                .arg(data_dir)
                .args([
                    "-c",
                    "listen_addresses=127.0.0.1",
                    "-c",
                    "fsync=off",
                    "-c",
                    "synchronous_commit=off",
                    "-c",
                    "full_page_writes=off",
                    "-c",
                    "max_connections=300",
                    "-c",
                    "shared_buffers=32MB",
                ])
                .args(settings.iter().flat_map(|s| ["-c", s.as_str()]))
                .current_dir(data_dir);
            configure(&mut cmd, log, user, SIGQUIT)?;
            Ok(cmd)
        },
        |port| {
            // The port accepting connections is not enough: the postmaster
            // listens before recovery/start-up finishes and answers "the
            // database system is starting up" until then. pg_isready asks
            // the real question.
            tcp_accepts(port)?;
            let status = Command::new(&bins.pg_isready)
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
                .arg(port.to_string())
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .map_err(|e| format!("could not run {}: {e}", bins.pg_isready.display()))?;
            if status.success() {
                Ok(())
            } else {
                Err(format!("pg_isready -p {port}: {status}"))
            }
        },
    )
}

// ---------------------------------------------------------------------------
// Redis
// ---------------------------------------------------------------------------

/// Starts `redis-server` in the foreground (`--daemonize no`, so it stays our
/// child and `PDEATHSIG` applies) with persistence off (`--save ""
/// --appendonly no`: throwaway data, and no fork-for-snapshot pauses) and
/// `--databases 10000` so every test can have its own logical database.
/// `--dir` keeps any file Redis might write inside our temp dir.
/// Redis's TLS port and the PEM files it serves it with.
struct RedisTls {
    port: u16,
    cert: PathBuf,
    key: PathBuf,
    ca: PathBuf,
}

fn start_redis(
    redis_server: &Path,
    dir: &Path,
    log: &Path,
    tls: Option<&RedisTls>,
) -> Result<(u16, ChildGuard), String> {
    let databases = REDIS_DATABASES.to_string();
    start_on_free_port(
        "redis-server",
        log,
        SIGTERM,
        |port| {
            let mut cmd = Command::new(redis_server);
            cmd.arg("--port")
                .arg(port.to_string())
                .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
                .args(["--databases", &databases, "--daemonize", "no"])
                .arg("--dir")
                .arg(dir)
                .current_dir(dir);
            if let Some(tls) = tls {
                cmd.arg("--tls-port")
                    .arg(tls.port.to_string())
                    .arg("--tls-cert-file")
                    .arg(&tls.cert)
                    .arg("--tls-key-file")
                    .arg(&tls.key)
                    .arg("--tls-ca-cert-file")
                    .arg(&tls.ca)
                    // A client certificate is checked when shown, not required.
                    .args(["--tls-auth-clients", "optional"]);
            }
            configure(&mut cmd, log, None, SIGTERM)?;
            Ok(cmd)
        },
        redis_ping,
    )
}

/// Sends `PING` over a raw TCP connection and expects `+PONG`: proves Redis
/// is not only listening but serving commands.
fn redis_ping(port: u16) -> Result<(), String> {
    let mut stream = tcp_accepts(port)?;
    let timeout = Some(Duration::from_secs(1));
    stream
        .set_read_timeout(timeout)
        .and_then(|()| stream.set_write_timeout(timeout))
        .map_err(|e| format!("setting socket timeouts for Redis on port {port}: {e}"))?;
    stream
        .write_all(b"PING\r\n")
        .map_err(|e| format!("sending PING to Redis on port {port}: {e}"))?;
    let mut reply = [0u8; 64];
    let n = stream
        .read(&mut reply)
        .map_err(|e| format!("reading the PING reply from Redis on port {port}: {e}"))?;
    let reply = String::from_utf8_lossy(&reply[..n]);
    if reply.starts_with("+PONG") {
        Ok(())
    } else {
        Err(format!("Redis on port {port} answered PING with {reply:?}"))
    }
}

// ---------------------------------------------------------------------------
// Diagnostics
// ---------------------------------------------------------------------------

/// How much of a server log goes into a panic message.
const LOG_TAIL_LINES: usize = 40;

/// The last [`LOG_TAIL_LINES`] lines of `log`, for panic messages.
fn log_tail(log: &Path) -> String {
    match fs::read(log) {
        Ok(bytes) => {
            let text = String::from_utf8_lossy(&bytes);
            let lines: Vec<&str> = text.lines().collect();
            let tail = &lines[lines.len().saturating_sub(LOG_TAIL_LINES)..];
            if tail.is_empty() {
                "<log is empty>".to_string()
            } else {
                tail.join("\n")
            }
        }
        Err(e) => format!("<could not read {}: {e}>", log.display()),
    }
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
    tcp_accepts(s.pg_port).unwrap_or_else(|e| panic!("postgres does not accept connections: {e}"));
    tcp_accepts(s.redis_port).unwrap_or_else(|e| panic!("redis does not accept connections: {e}"));
    redis_ping(s.redis_port).unwrap_or_else(|e| panic!("redis does not answer PING: {e}"));
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
