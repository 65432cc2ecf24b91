//! PostgreSQL, Redis and Prometheus as the stack runs them: started once and reused while they
//! run, found again through their pid files (PostgreSQL's own `postmaster.pid`), stopped by pid.
//!
//! Reuse and ports: a server of this project already running on another port is adopted when the
//! user did not choose the port (the later messages, `env` and the service's URLs then use the
//! running one), and reported when they did. A port held by anything else stops `start` before
//! that server starts, with who holds it.

use std::fs;
use std::os::unix::fs::{chown, MetadataExt, PermissionsExt};
use std::path::Path;

use super::settings::Port;
use super::{after_log, may, own_name, owner_name, say, Failure, Stack};
use crate::postgres::{self, Initdb, Leftovers, Postgres};
use crate::process::{self, is_root, Pid, User, SIGHUP, SIGTERM};
use crate::prometheus::{self, Prometheus, Scrape};
use crate::redis::{self, Redis};
use crate::{detached, Error};

impl Stack {
    // ----------------------------------------------------------- common --

    /// Makes STACK_DIR, searchable by the postgres user even under umask 077.
    pub(super) fn make_stack_dir(&self) -> Result<(), Failure> {
        let stack = &self.s.layout.stack;
        if !Path::new(stack).is_dir() {
            make_dir(stack)?;
            set_mode(stack, 0o755)?;
        }
        if !may(stack, libc::W_OK) {
            return Err(Failure::new(
                format!("{stack} is not writable by you (was it created by a root run?)."),
                [format!(
                    "run this script as root again (sudo {}), or remove it: sudo rm -rf {stack}",
                    self.s.again()
                )],
            ));
        }
        Ok(())
    }

    /// The port to use for a server of ours found running on `running`: that one if the user did
    /// not choose one, a failure if they chose another.
    pub(super) fn adopt(
        &self,
        name: &str,
        var: &str,
        port: Port,
        running: u16,
    ) -> Result<Port, Failure> {
        if running != port.number && port.chosen {
            let (me, again) = (&self.s.me, self.s.again());
            return Err(Failure::new(
                format!(
                    "this project's {name} is already running on port {running}, not {var}={}.",
                    port.number
                ),
                [
                    format!("use it as is: {var}={running} {again}"),
                    format!("or move it: {me} stop && {var}={} {again}", port.number),
                ],
            ));
        }
        Ok(Port {
            number: running,
            ..port
        })
    }

    // ------------------------------------------------------- postgresql --

    /// The running postmaster of our data directory: its pid and port.
    pub(super) fn pg_running(&self) -> Option<(u32, Option<u16>)> {
        postgres::postmaster(self.s.layout.pg_data.as_ref())
    }

    /// True if the pg directory exists but we cannot look inside (a root run made it).
    pub(super) fn pg_unreadable(&self) -> bool {
        let dir = &self.s.layout.pg_dir;
        Path::new(dir).is_dir() && !may(dir, libc::X_OK)
    }

    /// Starts PostgreSQL (or reuses it), then makes sure the service's database exists.
    pub(super) fn pg_start(&mut self) -> Result<(), Failure> {
        self.find_pg_bins();
        if let Some((pid, running)) = self.pg_running() {
            let port = self.s.pg;
            self.s.pg = self.adopt("postgres", "PG_PORT", port, running.unwrap_or(port.number))?;
            say(&format!(
                "postgres: already running (pid {pid}) on 127.0.0.1:{}, reusing it",
                self.s.pg.number
            ));
        } else {
            self.pg_launch()?;
        }
        self.pg_ensure_db()
    }

    fn pg_launch(&mut self) -> Result<(), Failure> {
        let port = self.s.pg.number;
        if process::port_open(port) {
            return Err(self.port_taken("postgres", port, "PG_PORT"));
        }
        let user = self.pg_prepare_dirs()?;
        let Some(bins) = self.pg_bins.clone() else {
            return Err(Failure::new(
                "PostgreSQL is not installed.",
                [format!(
                    "run '{}' again as root to install it.",
                    self.s.again()
                )],
            ));
        };
        self.pg_initdb(&bins, user)?;
        self.pg_clear_stale_locks()?;
        let l = &self.s.layout;
        say(&format!(
            "postgres: starting on 127.0.0.1:{port} (log: {})",
            l.pg_log
        ));
        let server = Postgres {
            bins,
            data: l.pg_data.clone().into(),
            socket_dir: l.pg_sock.clone().into(),
            cwd: l.pg_dir.clone().into(),
            port,
            user,
            settings: Vec::new(),
        };
        let started = self
            .pg_log_file(user)
            .and_then(|()| detached::spawn(&server, l.pg_log.as_ref()))
            .and_then(|mut child| process::wait_ready(&server, &mut child, l.pg_log.as_ref()));
        if let Err(error) = started {
            return Err(after_log(
                &l.pg_log,
                &error,
                format!("postgres failed to start (log above, full log: {}).", l.pg_log),
                [format!(
                    "fix the cause in the log, then run '{}' again (or '{} stop' first if it is half up).",
                    self.s.again(),
                    self.s.me
                )],
            ));
        }
        let Some((pid, _)) = self.pg_running() else {
            return Err(Failure::new(
                format!("postgres answers, but no postmaster of {} runs.", l.pg_data),
                [format!("see {}", l.pg_log)],
            ));
        };
        say(&format!("postgres: started (pid {pid})"));
        Ok(())
    }

    /// The server's log, created before the server opens it, belonging to the postgres user like
    /// everything under `pg/`.
    fn pg_log_file(&self, user: Option<User>) -> Result<(), Error> {
        let log = &self.s.layout.pg_log;
        fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .map_err(Error::io(format!("create {log}")))?;
        if let Some(user) = user {
            chown(log, Some(user.uid), Some(user.gid))
                .map_err(Error::io(format!("chown {log}")))?;
        }
        Ok(())
    }

    /// The pg directory and the socket directory, private to the server's user: `Some(postgres)`
    /// when we are root, who may not run PostgreSQL.
    fn pg_prepare_dirs(&self) -> Result<Option<User>, Failure> {
        self.make_stack_dir()?;
        let l = &self.s.layout;
        let owned_by_other = fs::metadata(&l.pg_dir).is_ok_and(|m| m.uid() != process::euid());
        if !is_root() && owned_by_other {
            return Err(Failure::new(
                format!(
                    "{} belongs to {}, not to you (was it created by a root run?).",
                    l.pg_dir,
                    owner_name(&l.pg_dir)
                ),
                [format!(
                    "run this script as root again, or remove the local data: sudo rm -rf {}",
                    l.pg_dir
                )],
            ));
        }
        for dir in [&l.pg_dir, &l.pg_sock] {
            make_dir(dir)?;
            set_mode(dir, 0o700)?;
        }
        let Some(user) = server_user()? else {
            return Ok(None);
        };
        for path in [&l.pg_dir, &l.pg_sock, &l.pg_log] {
            if Path::new(path).exists() {
                chown(path, Some(user.uid), Some(user.gid)).map_err(|e| {
                    Failure::new(format!("could not chown {path} to postgres: {e}"), [])
                })?;
            }
        }
        if process::unreachable_by(user, l.pg_dir.as_ref()).is_some() {
            return Err(Failure::new(
                format!("the 'postgres' user cannot reach {} (a parent directory is not searchable by others, e.g. /root is 0700).", l.pg_dir),
                ["move the repository somewhere like /work or /srv, or make its parent directories searchable: chmod o+x <dir>".to_owned()],
            ));
        }
        Ok(Some(user))
    }

    /// A new cluster in the data directory, unless there is one (made by the same major version).
    fn pg_initdb(&self, bins: &postgres::Bins, user: Option<User>) -> Result<(), Failure> {
        let l = &self.s.layout;
        let again = self.s.again();
        let data = Path::new(&l.pg_data);
        let version = fs::read_to_string(data.join("PG_VERSION")).unwrap_or_default();
        if !version.is_empty() {
            let have = version.trim_end_matches('\n');
            if bins.dir != Path::new("/usr/lib/postgresql").join(have).join("bin") {
                return Err(Failure::new(
                    format!(
                        "{} was created by PostgreSQL {have}, but its binaries are not installed (found: {}).",
                        l.pg_data,
                        bins.dir.display()
                    ),
                    [format!("install them (apt-get install postgresql-{have}), or throw the local data away: rm -rf {}", l.pg_dir)],
                ));
            }
            return Ok(());
        }
        if fs::read_dir(data).is_ok_and(|mut entries| entries.next().is_some()) {
            return Err(Failure::new(
                format!(
                    "{} exists but is not a PostgreSQL data directory (an interrupted initdb?).",
                    l.pg_data
                ),
                [format!(
                    "remove it and try again: rm -rf {} && {again}",
                    l.pg_data
                )],
            ));
        }
        let initdb = Initdb {
            bins,
            data,
            cwd: l.pg_dir.as_ref(),
            user,
            throwaway: false,
            password_file: None,
        };
        let log = format!("{}/initdb.log", l.pg_dir);
        say(&format!(
            "postgres: initializing a new cluster in {} ({})",
            l.pg_data,
            bins.program("initdb").display()
        ));
        let ran = fs::File::create(&log)
            .map_err(Error::io(format!("create {log}")))
            .and_then(|file| {
                let mut command = initdb.command();
                let stderr = file.try_clone().map_err(Error::io(format!("open {log}")))?;
                command.stdout(file).stderr(stderr);
                command.spawn().map_err(Error::io("run initdb"))
            })
            .and_then(|mut child| process::finish("initdb", &mut child, log.as_ref(), None));
        if let Err(error) = ran {
            return Err(after_log(
                &log,
                &error,
                format!("initdb failed (full output: {log})."),
                [format!(
                    "fix the cause above, then: rm -rf {} && {again}",
                    l.pg_data
                )],
            ));
        }
        Ok(())
    }

    /// After a crash `postmaster.pid` and the socket lock file stay behind, and postgres refuses to
    /// start while their pid is still taken (by a zombie, or a reused pid). They are removed only
    /// if no live postgres process still works in our data directory.
    fn pg_clear_stale_locks(&self) -> Result<(), Failure> {
        let l = &self.s.layout;
        match postgres::leftovers(l.pg_data.as_ref(), l.pg_sock.as_ref()) {
            Leftovers::None => Ok(()),
            Leftovers::Busy(pid) => Err(Failure::new(
                format!(
                    "leftover postgres processes (e.g. pid {pid}) still use {} after a crash.",
                    l.pg_data
                ),
                [format!(
                    "wait a few seconds or stop them (kill {pid}), then run '{}' again.",
                    self.s.again()
                )],
            )),
            Leftovers::StaleLocks { files, old_pid } => {
                let names: Vec<String> = files
                    .iter()
                    .filter_map(|f| f.file_name().map(|n| n.to_string_lossy().into_owned()))
                    .collect();
                let gone = old_pid
                    .map(|pid| format!(" (pid {pid} is gone)"))
                    .unwrap_or_default();
                say(&format!(
                    "postgres: removing stale lock files left by a crash{gone}: {}",
                    names.join(" ")
                ));
                for file in files {
                    let _ = fs::remove_file(file);
                }
                Ok(())
            }
        }
    }

    /// The service's database, created if missing.
    fn pg_ensure_db(&self) -> Result<(), Failure> {
        let l = &self.s.layout;
        let (port, name) = (self.s.pg.number, super::settings::DB_NAME);
        let failed = |headline: String, error: Error| {
            Failure::new(
                headline,
                [
                    error.to_string(),
                    format!(
                        "see {}; try '{} stop' then '{}'.",
                        l.pg_log,
                        self.s.me,
                        self.s.again()
                    ),
                ],
            )
        };
        let exists = postgres::database_exists(port, name)
            .map_err(|e| failed(format!("cannot query postgres on 127.0.0.1:{port}."), e))?;
        if exists {
            say(&format!("postgres: database '{name}' exists"));
            return Ok(());
        }
        postgres::create_database(port, name)
            .map_err(|e| failed(format!("could not create database '{name}'."), e))?;
        say(&format!("postgres: created database '{name}'"));
        Ok(())
    }

    pub(super) fn pg_stop(&mut self) -> Result<(), Failure> {
        let Some((pid, _)) = self.pg_running() else {
            if self.pg_unreadable() {
                let dir = &self.s.layout.pg_dir;
                return Err(Failure::new(
                    format!(
                        "cannot inspect {dir} as {} (it belongs to {}).",
                        own_name(),
                        owner_name(dir)
                    ),
                    [format!("run: sudo {} stop", self.s.me)],
                ));
            }
            say("postgres: not running");
            return Ok(());
        };
        self.find_pg_bins();
        say(&format!("postgres: stopping (pid {pid}, fast shutdown)"));
        if !process::stop(pid, &postgres::STOP) {
            let log = &self.s.layout.pg_log;
            let next = match self.pg_bins {
                Some(_) => format!("see {log}; try again, or as a last resort: kill -QUIT {pid} (immediate shutdown)"),
                None => format!("see {log}; as a last resort: kill -QUIT {pid}"),
            };
            return Err(Failure::new(
                format!("postgres (pid {pid}) did not stop within 30 s."),
                [next],
            ));
        }
        say("postgres: stopped");
        Ok(())
    }

    // ------------------------------------------------------------ redis --

    pub(super) fn redis_start(&mut self) -> Result<(), Failure> {
        let (me, again) = (self.s.me.clone(), self.s.again());
        let daemon = self.redis();
        if let Some(pid) = daemon.pid() {
            let running = daemon.port().unwrap_or(self.s.redis.number);
            self.s.redis = self.adopt("redis", "REDIS_PORT", self.s.redis, running)?;
            let port = self.s.redis.number;
            if redis::process_id(port) != Some(pid) {
                return Err(Failure::new(
                    format!("this project's redis-server (pid {pid}) runs but does not answer on 127.0.0.1:{port}."),
                    [format!("see {}; restart it: {me} stop && {again}", daemon.log)],
                ));
            }
            say(&format!(
                "redis: already running (pid {pid}) on 127.0.0.1:{port}, reusing it"
            ));
            return Ok(());
        }
        let port = self.s.redis.number;
        if process::port_open(port) {
            return Err(self.port_taken("redis", port, "REDIS_PORT"));
        }
        self.make_stack_dir()?;
        let l = &self.s.layout;
        make_dir(&l.redis_dir)?;
        let _ = fs::remove_file(&daemon.pid_file);
        say(&format!(
            "redis: starting on 127.0.0.1:{port} (log: {})",
            daemon.log
        ));
        let server = Redis {
            binary: redis::binary().unwrap_or_else(|| "redis-server".into()),
            port,
            dir: l.redis_dir.clone().into(),
            databases: None,
            tls: None,
        };
        let log = daemon.log.as_ref();
        let mut child = detached::spawn(&server, log).map_err(|e| self.redis_refused(&e))?;
        write_number(&daemon.pid_file, child.id())?;
        write_number(&daemon.port_file, u32::from(port))?;
        match process::wait_ready(&server, &mut child, log) {
            Ok(()) => {}
            Err(error @ Error::Exited { .. }) => return Err(self.redis_refused(&error)),
            Err(error) => {
                return Err(after_log(
                    &daemon.log,
                    &error,
                    format!("redis did not answer PING on 127.0.0.1:{port} within 10 s (log above, full log: {}).", daemon.log),
                    [format!("fix the cause in the log, then run '{me} stop' and '{again}' again.")],
                ))
            }
        }
        say(&format!("redis: started (pid {})", child.id()));
        Ok(())
    }

    /// Redis exited, or could not even be started.
    fn redis_refused(&self, error: &Error) -> Failure {
        let log = &self.s.layout.redis_log;
        after_log(
            log,
            error,
            format!("redis-server refused to start (see above and {log})."),
            [format!(
                "fix the cause, then run '{}' again.",
                self.s.again()
            )],
        )
    }

    pub(super) fn redis_stop(&mut self) -> Result<(), Failure> {
        let daemon = self.redis();
        let port = daemon.port().unwrap_or(self.s.redis.number);
        daemon.stop(|pid| shut_down_redis(port, pid))
    }

    // ------------------------------------------------------- prometheus --

    /// Starts Prometheus scraping the service (or each replica), or reuses it: reloaded with
    /// SIGHUP if what it should scrape changed.
    pub(super) fn prom_start(&mut self) -> Result<(), Failure> {
        let targets = self.service_targets()?;
        let target = targets.join(" ");
        self.make_stack_dir()?;
        let l = &self.s.layout;
        make_dir(&l.prom_dir)?;
        make_dir(&l.prom_data)?;
        let new = format!("{}.new", l.prom_config);
        self.prom_render_config(&new, &targets)?;
        let (me, again) = (self.s.me.clone(), self.s.again());
        let daemon = self.prom();
        if let Some(pid) = daemon.pid() {
            let running = daemon.port().unwrap_or(self.s.prom.number);
            self.s.prom = self.adopt("prometheus", "PROM_PORT", self.s.prom, running)?;
            let port = self.s.prom;
            let l = &self.s.layout;
            let server = self.prometheus_server();
            let answers = process::wait_ready(&server, &mut Pid(pid), l.prom_log.as_ref()).is_ok()
                && prometheus::keeps_data_in(port.number, &l.prom_data);
            if !answers {
                return Err(Failure::new(
                    format!("this project's prometheus (pid {pid}) runs but does not answer on 127.0.0.1:{}.", port.number),
                    [format!("see {}; restart it: {me} stop && {again}", l.prom_log)],
                ));
            }
            if fs::read(&new).ok() == fs::read(&l.prom_config).ok() {
                let _ = fs::remove_file(&new);
            } else {
                rename(&new, &l.prom_config)?;
                write_text(&l.prom_target, &format!("{target}\n"))?;
                // Prometheus reloads its configuration on SIGHUP.
                process::send(pid, SIGHUP);
                say(&format!(
                    "prometheus: scrape config changed, reloaded it (now scraping {target})"
                ));
            }
            say(&format!(
                "prometheus: already running (pid {pid}) on 127.0.0.1:{}, reusing it",
                port.number
            ));
            return Ok(());
        }
        let port = self.s.prom.number;
        if process::port_open(port) {
            return Err(self.port_taken("prometheus", port, "PROM_PORT"));
        }
        rename(&new, &l.prom_config)?;
        write_text(&l.prom_target, &format!("{target}\n"))?;
        let _ = fs::remove_file(&l.prom_pid);
        say(&format!(
            "prometheus: starting on 127.0.0.1:{port}, scraping {target} every 5 s (log: {})",
            l.prom_log
        ));
        let server = self.prometheus_server();
        let not_ready = format!(
            "prometheus did not become ready on 127.0.0.1:{port} within 30 s (log above, full log: {}).",
            l.prom_log
        );
        daemon.launch(&server, port, &self.s, not_ready)?;
        Ok(())
    }

    /// Our Prometheus as it runs (or is to run) on PROM_PORT.
    fn prometheus_server(&self) -> Prometheus {
        let l = &self.s.layout;
        Prometheus {
            config: l.prom_config.clone().into(),
            data: l.prom_data.clone().into(),
            port: self.s.prom.number,
        }
    }

    /// Writes the project's scrape config, pointed at `targets`, to `file`, and checks it.
    fn prom_render_config(&self, file: &str, targets: &[String]) -> Result<(), Failure> {
        let source = &self.s.layout.prom_source;
        let scrape = Scrape {
            source: source.as_ref(),
            targets,
            interval: None,
            written_by: "scripts/stack.sh",
        };
        let config = prometheus::render(&scrape).map_err(|error| match error {
            prometheus::ConfigError::NoDiscovery | prometheus::ConfigError::NoInterval => Failure::new(
                format!(
                    "{source} does not contain the line '{}', so this script cannot point it at the service.",
                    prometheus::COMPOSE_DISCOVERY
                ),
                [format!("keep that line exactly as it is in {source}; docker-compose.yaml needs it too.")],
            ),
            prometheus::ConfigError::Unreadable(_) => Failure::new(
                format!("{source} is missing (the scrape config the native and the compose stack share)."),
                [format!("restore it: git -C '{}' checkout -- prometheus.yaml", self.s.root.display())],
            ),
        })?;
        write_text(file, &config)?;
        prometheus::check(file.as_ref()).map_err(|error| {
            let output = match &error {
                Error::Rejected { output, .. } => format!("{output}\n"),
                other => format!("{other}\n"),
            };
            Failure::new(
                format!("promtool rejects the scrape config made from {source} (output above)."),
                [format!(
                    "fix {source} (check it with: promtool check config prometheus.yaml), then run '{}' again.",
                    self.s.again()
                )],
            )
            .after(output)
        })
    }

    pub(super) fn prom_stop(&mut self) -> Result<(), Failure> {
        self.prom().stop(drop)
    }

    /// `host:port` where Prometheus finds the service: HTTP_ADDR (the service's own default
    /// 0.0.0.0:8080), with a wildcard or localhost host turned into loopback.
    pub(super) fn service_target(&self) -> Result<String, Failure> {
        let addr = self.s.http_addr.as_deref().unwrap_or("0.0.0.0:8080");
        let port = addr.rsplit_once(':').and_then(|(host, port)| {
            let digits = (1..=5).contains(&port.len()) && port.bytes().all(|b| b.is_ascii_digit());
            let port: u16 = port.parse().ok().filter(|p| digits && *p >= 1)?;
            Some((host, port))
        });
        let Some((host, port)) = port else {
            return Err(Failure::new(
                format!("HTTP_ADDR={addr} has no fixed TCP port, and Prometheus needs one to scrape the service."),
                [format!(
                    "use an address like 0.0.0.0:8080 or 127.0.0.1:8081: HTTP_ADDR=0.0.0.0:8080 {}",
                    self.s.again()
                )],
            ));
        };
        let host = match host {
            "0.0.0.0" | "" | "localhost" => "127.0.0.1",
            "[::]" => "[::1]",
            other => other,
        };
        Ok(format!("{host}:{port}"))
    }

    /// Every `host:port` Prometheus scrapes: each replica's with a fleet, else the service's.
    pub(super) fn service_targets(&self) -> Result<Vec<String>, Failure> {
        if self.s.fleet() {
            Ok((1..=self.s.replicas)
                .map(|i| format!("127.0.0.1:{}", self.s.replica_port(i)))
                .collect())
        } else {
            Ok(vec![self.service_target()?])
        }
    }
}

/// The first step of stopping the Redis server (or sentinel) `pid` that was started on `port`:
/// `SHUTDOWN NOSAVE` only to the server on that port if it really is ours; else SIGTERM.
pub(super) fn shut_down_redis(port: u16, pid: u32) {
    if !(redis::process_id(port) == Some(pid) && redis::shutdown(port).is_ok()) {
        process::send(pid, SIGTERM);
    }
}

/// Who runs PostgreSQL and PgBouncer, which refuse to run as root: `Some(postgres)` when we are
/// root, else ourselves (`None`).
pub(super) fn server_user() -> Result<Option<User>, Failure> {
    if !is_root() {
        return Ok(None);
    }
    match User::named("postgres") {
        Some(user) => Ok(Some(user)),
        None => Err(Failure::new(
            "there is no 'postgres' system user (PostgreSQL and PgBouncer refuse to run as root).",
            ["reinstall the package that creates it: apt-get install --reinstall postgresql-common".to_owned()],
        )),
    }
}

// ------------------------------------------------------------- files --

/// `mkdir -p dir`.
pub(super) fn make_dir(dir: &str) -> Result<(), Failure> {
    fs::create_dir_all(dir)
        .map_err(|e| Failure::new(format!("cannot create directory {dir}: {e}"), []))
}

pub(super) fn set_mode(path: &str, mode: u32) -> Result<(), Failure> {
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .map_err(|e| Failure::new(format!("cannot chmod {path}: {e}"), []))
}

/// Writes `text` to `file`.
pub(super) fn write_text(file: &str, text: &str) -> Result<(), Failure> {
    fs::write(file, text).map_err(|e| Failure::new(format!("cannot write {file}: {e}"), []))
}

/// Writes a pid or port file.
pub(super) fn write_number(file: &str, number: u32) -> Result<(), Failure> {
    write_text(file, &format!("{number}\n"))
}

pub(super) fn rename(from: &str, to: &str) -> Result<(), Failure> {
    fs::rename(from, to).map_err(|e| Failure::new(format!("cannot move {from} to {to}: {e}"), []))
}

/// Removes each file, if it is there.
pub(super) fn remove_files(files: &[&str]) {
    for file in files {
        let _ = fs::remove_file(file);
    }
}
