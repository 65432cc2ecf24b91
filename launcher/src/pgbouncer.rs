//! PgBouncer in transaction mode in front of one PostgreSQL server: its configuration (the ini
//! file and the auth file beside it), its command line, its readiness, and stopping it.
//!
//! # Why transaction mode, and what it costs
//!
//! Managed PostgreSQL is often reached through a transaction-mode pooler (PgBouncer, RDS Proxy,
//! Supavisor): a client holds a server connection only for the length of a transaction, so
//! whatever a client leaves on a session (a `SET`, a prepared statement, a `LISTEN`) may reach
//! another client or be lost. The stack (`POOLER=pgbouncer`) and the test kit run it so that the
//! service meets that here before it does in production. Debian's package is 1.18: it cannot carry
//! prepared statements in this mode (1.21 added that), and it refuses a start-up parameter it
//! does not know. tokio-postgres sends only `user`, `database`, `client_encoding` (which PgBouncer
//! tracks per client) and `application_name` or `options` when the URL sets them, so nothing needs
//! ignoring ([`Config`] leaves `ignore_startup_parameters` empty): a URL with `options` fails
//! loudly rather than losing its settings.
//!
//! # Configuration
//!
//! [`Config::ini`] writes it: `127.0.0.1:<port>` only (no Unix socket: a second PgBouncer on the
//! same port number would fight over `/tmp/.s.PGSQL.<port>`), `[databases] * = host=127.0.0.1
//! port=<pg port>` so that any database name reaches the same server, `auth_type = trust` for the
//! users the auth file lists (the superuser `postgres`, whom the server trusts on loopback too),
//! and that user as the admin console's (`psql -d pgbouncer -c 'SHOW POOLS'`). A server connection
//! that fails is retried after 1 s rather than PgBouncer's 15 s, so that a PostgreSQL restarted
//! under it is used again within a second.
//!
//! # Running as root
//!
//! PgBouncer refuses to run as root ("PgBouncer should not run as root"). Like PostgreSQL, it then
//! runs as the `postgres` user through [`process::run_as`] (not its own `-u`, which would switch
//! user after the launcher set the death signal, and so clear it); its files must be readable by
//! that user on a path it can search. It stays in the foreground (no `-d`) and logs to stderr,
//! which the lifetime sends to the log its caller chose.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::probe::PgConnection;
use crate::process::{self, run_as, Server, StopStep, User, SIGINT, SIGTERM};

/// The steps of a stop: SIGINT (PAUSE then SHUTDOWN: transactions in progress finish) and up to
/// 10 s, then SIGTERM (immediate) and up to 5 s.
pub const STOP: [StopStep; 2] = [
    (Some(SIGINT), Duration::from_secs(10)),
    (Some(SIGTERM), Duration::from_secs(5)),
];

/// The program name its process shows (`/proc/<pid>/comm`).
pub const PROGRAM: &str = "pgbouncer";

/// The user clients connect as: the one the auth file lists, and the admin console's.
pub const USER: &str = "postgres";

/// `pgbouncer` on `PATH`, or Debian's `/usr/sbin/pgbouncer` (not on a normal user's `PATH`).
pub fn binary() -> Option<PathBuf> {
    process::find_in_path(PROGRAM).or_else(|| {
        let debian = Path::new("/usr/sbin/pgbouncer");
        process::is_executable(debian).then(|| debian.to_owned())
    })
}

/// What the ini file says.
pub struct Config<'a> {
    /// Who writes it, for its header (it is rewritten on every start).
    pub written_by: &'a str,
    /// Where PgBouncer listens, on `127.0.0.1`.
    pub port: u16,
    /// The PostgreSQL server on `127.0.0.1` it pools connections to.
    pub pg_port: u16,
    /// Where the caller wrote [`AUTH_FILE`] (readable by the user PgBouncer runs as).
    pub auth_file: &'a Path,
}

/// The auth file: the users PgBouncer lets in, each with the password it would check (none:
/// `auth_type = trust` checks nothing, but still wants the user listed).
pub const AUTH_FILE: &str = "\"postgres\" \"\"\n";

impl Config<'_> {
    /// The ini file's text.
    pub fn ini(&self) -> String {
        format!(
            "; Written by {written_by} (rewritten on every start): PgBouncer in transaction mode on
; 127.0.0.1:{port} in front of PostgreSQL on 127.0.0.1:{pg_port}.
[databases]
; Any database name: the same one on the server.
* = host=127.0.0.1 port={pg_port}

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {port}
; No Unix socket: another PgBouncer on the same port number would share its path in /tmp.
unix_socket_dir =
auth_type = trust
auth_file = {auth_file}
admin_users = {USER}
pool_mode = transaction
max_client_conn = 1000
default_pool_size = 20
; After a failed server login, try again in 1 s (default 15 s): PostgreSQL may just be starting.
server_login_retry = 1
",
            written_by = self.written_by,
            port = self.port,
            pg_port = self.pg_port,
            auth_file = self.auth_file.display(),
        )
    }
}

/// PgBouncer on `127.0.0.1:port`, run with a file holding [`Config::ini`] (readable by the user
/// it runs as).
pub struct PgBouncer {
    /// From [`binary`].
    pub binary: PathBuf,
    pub config: PathBuf,
    pub port: u16,
    /// `Some(postgres)` when we are root.
    pub user: Option<User>,
    /// The directory to run in: one the user may enter (our own may be `/root`).
    pub cwd: PathBuf,
}

impl Server for PgBouncer {
    fn name(&self) -> String {
        PROGRAM.to_owned()
    }

    fn command(&self) -> Command {
        let mut command = Command::new(&self.binary);
        command.arg(&self.config).current_dir(&self.cwd);
        run_as(&mut command, self.user);
        command
    }

    /// Ready once a query through it reaches the server: PgBouncer listens before it has
    /// connected to PostgreSQL, and a pool that cannot log in is no pool.
    fn probe(&self) -> Result<(), String> {
        ready(self.port)
    }

    fn ready_within(&self) -> Duration {
        Duration::from_secs(10)
    }
}

/// Whether `SELECT 1` through the PgBouncer on `port` (as [`USER`], on database `postgres`)
/// answers.
pub fn ready(port: u16) -> Result<(), String> {
    match PgConnection::connect(port, USER, "postgres")?.value("SELECT 1")? {
        Some(one) if one == "1" => Ok(()),
        other => Err(format!(
            "SELECT 1 through PgBouncer on port {port} answered {other:?}"
        )),
    }
}
