//! With REPLICAS > 1: replicas of the service (`app/replica-<i>.*`) and HAProxy in front of them
//! (`haproxy/*`), and `up`'s foreground with them.
//!
//! Like Prometheus, each runs in a session of its own, so that Ctrl-C on `up` reaches only the
//! launcher, which then stops them in order: HAProxy first, so that no new request reaches a
//! replica that is shutting down, then the replicas, each finishing the requests it serves
//! (SIGTERM is the service's graceful shutdown).
//!
//! `stop` and `status` find a fleet through its pid files, whatever REPLICAS says now.

use std::fs;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::thread;
use std::time::Duration;

use super::servers::{make_dir, rename, write_number, write_text};
use super::{after_log, say, warn, Failure, Stack};
use crate::haproxy::{self, Haproxy};
use crate::process::{self, Pid};
use crate::replica::{self, Replica};
use crate::{detached, Error};

/// How often `up` looks at the replicas and copies their new log lines.
const FOLLOW_EVERY: Duration = Duration::from_millis(200);

impl Stack {
    // --------------------------------------------------------- replicas --

    /// Replica `i`, from its pid file.
    pub(super) fn replica_pid(&self, i: u16) -> Option<u32> {
        self.replica_daemon(i).pid()
    }

    /// The port replica `i` was started on (its port file), else the one it would get now.
    pub(super) fn replica_running_port(&self, i: u16) -> u16 {
        self.replica_daemon(i)
            .port()
            .unwrap_or_else(|| self.s.replica_port(i))
    }

    /// The numbers of the replicas that have a pid file (running or not), in order.
    pub(super) fn replica_indices(&self) -> Vec<u16> {
        let mut indices: Vec<u16> = fs::read_dir(&self.s.layout.app_dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|entry| {
                let name = entry.file_name().into_string().ok()?;
                let i = name.strip_prefix("replica-")?.strip_suffix(".pid")?;
                i.bytes()
                    .all(|b| b.is_ascii_digit())
                    .then(|| i.parse().ok())?
            })
            .collect();
        indices.sort_unstable();
        indices
    }

    /// True if a fleet was started here (a pid file of HAProxy or of a replica exists).
    pub(super) fn fleet_started(&self) -> bool {
        Path::new(&self.s.layout.lb_pid).exists() || !self.replica_indices().is_empty()
    }

    /// The service's settings for the stack started here; the other variables of the README's
    /// configuration table pass through from the caller's environment. With `POOLER=pgbouncer`,
    /// `DATABASE_URL` goes through PgBouncer and `DATABASE_LISTEN_URL` straight to PostgreSQL
    /// (`LISTEN` and the migration lock need a session of their own). Redis's settings follow
    /// REDIS_MODE (see [`Stack::redis_env`]).
    pub(super) fn service_env(&self) -> Vec<(String, String)> {
        let database = |port: u16| {
            format!(
                "postgres://postgres@127.0.0.1:{port}/{}",
                super::settings::DB_NAME
            )
        };
        let direct = database(self.s.pg.number);
        let mut env = if self.s.pgbouncer {
            vec![
                (
                    "DATABASE_URL".into(),
                    database(self.s.pgbouncer_port.number),
                ),
                ("DATABASE_LISTEN_URL".into(), direct),
                ("DATABASE_POOLER".into(), "transaction".into()),
            ]
        } else {
            vec![("DATABASE_URL".into(), direct)]
        };
        env.extend(self.redis_env());
        env.push(("RUST_LOG".into(), self.rust_log()));
        env
    }

    /// RUST_LOG for the service: the caller's, else `info`.
    pub(super) fn rust_log(&self) -> String {
        self.s.rust_log.clone().unwrap_or_else(|| "info".to_owned())
    }

    /// The service binary the replicas run: SERVICE_BIN, or that of a fresh
    /// `cargo build --release`.
    pub(super) fn service_binary(&self) -> Result<PathBuf, Failure> {
        let again = self.s.again();
        if let Some(bin) = &self.s.service_bin {
            if !process::is_executable(bin.as_ref()) {
                return Err(Failure::new(
                    format!("SERVICE_BIN={bin} is not an executable file."),
                    ["point it at a built service (cargo build --release: target/release/singleflight), or unset it to let this script build one.".to_owned()],
                ));
            }
            return Ok(bin.into());
        }
        say("building the service (cargo build --release --bin singleflight)");
        let built = Command::new("cargo")
            .args(["build", "--release", "--bin", "singleflight"])
            .current_dir(&self.s.root)
            .envs(self.service_env())
            .status()
            .is_ok_and(|s| s.success());
        if !built {
            return Err(Failure::new(
                "cargo build --release failed (output above).",
                [format!("fix the build, then run '{again}' again.")],
            ));
        }
        // CARGO_TARGET_DIR or a cargo config may move the target directory: ask cargo.
        let target = Command::new("cargo")
            .args(["metadata", "--format-version", "1", "--no-deps"])
            .current_dir(&self.s.root)
            .stderr(Stdio::null())
            .output()
            .ok()
            .and_then(|out| target_directory(&String::from_utf8_lossy(&out.stdout)))
            .unwrap_or_else(|| format!("{}/target", self.s.root.display()));
        let binary = PathBuf::from(format!("{target}/release/singleflight"));
        if !process::is_executable(&binary) {
            return Err(Failure::new(
                format!(
                    "cargo built the service, but {} is not there.",
                    binary.display()
                ),
                [format!(
                    "set SERVICE_BIN to the binary it built: SERVICE_BIN=<path> {again}"
                )],
            ));
        }
        Ok(binary)
    }

    /// Replica `i` as it is to run.
    fn replica(&self, i: u16, binary: &Path) -> Replica {
        Replica {
            index: i,
            binary: binary.to_owned(),
            port: self.replica_running_port(i),
            env: self.service_env(),
        }
    }

    /// Starts replica `i` (or reuses it); the child, if it was started here.
    fn replica_start(&self, i: u16, binary: &Path) -> Result<Option<Child>, Failure> {
        let (me, again) = (&self.s.me, self.s.again());
        let port = self.s.replica_port(i);
        let log = self.s.layout.replica(i, "log");
        if let Some(pid) = self.replica_pid(i) {
            let running = self.replica_running_port(i);
            if running != port {
                return Err(Failure::new(
                    format!(
                        "this project's replica {i} already runs on port {running}, not {port}."
                    ),
                    [format!("stop the fleet first: {me} stop && {again}")],
                ));
            }
            say(&format!(
                "replica {i}: already running (pid {pid}) on 127.0.0.1:{port}, reusing it ('{me} stop' first to run a new build)"
            ));
            return Ok(None);
        }
        if process::port_open(port) {
            return Err(self.port_taken(&format!("replica {i}"), port, "REPLICA_BASE_PORT"));
        }
        self.make_stack_dir()?;
        make_dir(&self.s.layout.app_dir)?;
        say(&format!(
            "replica {i}: starting on 127.0.0.1:{port} (log: {log})"
        ));
        let mut server = self.replica(i, binary);
        server.port = port;
        let child = detached::spawn(&server, log.as_ref())
            .map_err(|e| Failure::new(format!("replica {i} could not be started: {e}"), []))?;
        write_number(&self.s.layout.replica(i, "pid"), child.id())?;
        write_number(&self.s.layout.replica(i, "port"), u32::from(port))?;
        Ok(Some(child))
    }

    /// Waits until replica `i` answers GET /readyz with 200 (up to 60 s: it applies migrations
    /// and waits for PostgreSQL first); fails, showing its log, if it exits or does not get there.
    fn replica_wait_ready(&self, i: u16, binary: &Path) -> Result<(), Failure> {
        let (me, again) = (&self.s.me, self.s.again());
        let server = self.replica(i, binary);
        let log = self.s.layout.replica(i, "log");
        let pid: u32 = process::read_number(self.s.layout.replica(i, "pid").as_ref()).unwrap_or(0);
        match process::wait_ready(&server, &mut Pid(pid), log.as_ref()) {
            Ok(()) => {
                say(&format!("replica {i}: ready (pid {pid})"));
                Ok(())
            }
            Err(error @ Error::Exited { .. }) => Err(after_log(
                &log,
                &error,
                format!("replica {i} exited while starting (log above, full log: {log})."),
                [format!("fix the cause in the log, then run '{again}' again.")],
            )),
            Err(error) => Err(after_log(
                &log,
                &error,
                format!(
                    "replica {i} (pid {pid}) did not answer GET /readyz with 200 on 127.0.0.1:{} within 60 s (log above, full log: {log}).",
                    server.port
                ),
                [format!("fix the cause in the log, then run '{me} stop' and '{again}' again.")],
            )),
        }
    }

    fn replica_stop(&self, i: u16) -> Result<(), Failure> {
        self.replica_daemon(i).stop(drop)
    }

    // ---------------------------------------------------------- haproxy --

    /// Our haproxy, from its pid file.
    pub(super) fn lb_pid(&self) -> Option<u32> {
        self.lb().pid()
    }

    /// The port our haproxy was started on (its port file), else LB_PORT.
    pub(super) fn lb_running_port(&self) -> u16 {
        self.lb().port().unwrap_or(self.s.lb_port)
    }

    /// Starts HAProxy in front of the replicas, or reuses it if it runs with the same
    /// configuration (else restarts it); the child, if it was started here.
    fn lb_start(&self) -> Result<Option<Child>, Failure> {
        let me = &self.s.me;
        let l = &self.s.layout;
        self.make_stack_dir()?;
        make_dir(&l.lb_dir)?;
        let new = format!("{}.new", l.lb_config);
        let ports: Vec<u16> = (1..=self.s.replicas)
            .map(|i| self.s.replica_port(i))
            .collect();
        let binary = haproxy::binary().unwrap_or_else(|| "haproxy".into());
        write_text(
            &new,
            &haproxy::config("scripts/stack.sh", self.s.lb_port, &ports),
        )?;
        if let Err(error) = haproxy::check(&binary, new.as_ref()) {
            let output = match error {
                Error::Rejected { output, .. } => output,
                other => other.to_string(),
            };
            return Err(Failure::new(
                format!("haproxy rejects the configuration this script wrote to {new} (output above)."),
                [format!("this is a bug in {me}; as a workaround run the replicas without HAProxy (REPLICAS=1).")],
            )
            .after(format!("{output}\n")));
        }
        if let Some(pid) = self.lb_pid() {
            if self.lb_running_port() == self.s.lb_port
                && fs::read(&new).ok() == fs::read(&l.lb_config).ok()
            {
                let _ = fs::remove_file(&new);
                say(&format!(
                    "haproxy: already running (pid {pid}) on :{}, reusing it",
                    self.s.lb_port
                ));
                return Ok(None);
            }
            say("haproxy: its configuration changed (REPLICAS, LB_PORT or REPLICA_BASE_PORT), restarting it");
            self.lb_stop()?;
        }
        let port = self.s.lb_port;
        if process::port_open(port) {
            return Err(self.port_taken("haproxy", port, "LB_PORT"));
        }
        rename(&new, &l.lb_config)?;
        let _ = fs::remove_file(&l.lb_pid);
        say(&format!(
            "haproxy: starting on :{port}, round robin over {} replicas (log: {})",
            self.s.replicas, l.lb_log
        ));
        let server = Haproxy {
            binary,
            config: l.lb_config.clone().into(),
            port,
        };
        let not_serving = format!(
            "haproxy did not serve GET /readyz on :{port} within 10 s (log above, full log: {}).",
            l.lb_log
        );
        let child = self.lb().launch(&server, port, &self.s, not_serving)?;
        Ok(Some(child))
    }

    fn lb_stop(&self) -> Result<(), Failure> {
        self.lb().stop(drop)
    }

    // ------------------------------------------------------------ fleet --

    /// Starts (or reuses) REPLICAS replicas of `binary` and HAProxy in front of them, and stops
    /// replicas beyond REPLICAS left from an earlier, larger fleet. The processes started here
    /// go into `children`, also when a later step fails.
    pub(super) fn fleet_start(
        &self,
        binary: &Path,
        children: &mut Vec<Child>,
    ) -> Result<(), Failure> {
        // The demo templates before any replica: no migration inserts them any more.
        self.seed_demo(Command::new(binary))?;
        // Replica 1 first, alone: every replica applies pending migrations at start-up, and two
        // migrating an empty database at the same moment could collide.
        children.extend(self.replica_start(1, binary)?);
        self.replica_wait_ready(1, binary)?;
        for i in 2..=self.s.replicas {
            children.extend(self.replica_start(i, binary)?);
        }
        for i in 2..=self.s.replicas {
            self.replica_wait_ready(i, binary)?;
        }
        children.extend(self.lb_start()?);
        for i in self.replica_indices() {
            if i > self.s.replicas {
                self.replica_stop(i)?;
            }
        }
        Ok(())
    }

    /// `restart` with REPLICAS > 1: each running replica in turn, as a deploy does it: SIGTERM
    /// (it drains, finishes what it has and exits), started again from `binary`, and ready,
    /// plus one of HAProxy's health checks, before the next one stops. HAProxy stays up.
    pub(super) fn fleet_restart(&self, binary: &Path) -> Result<(), Failure> {
        let me = &self.s.me;
        if self.lb_pid().is_none() {
            return Err(Failure::new(
                "no fleet runs here to restart (HAProxy is not running).",
                [format!(
                    "start one: REPLICAS={} {me} start",
                    self.s.replicas.max(2)
                )],
            ));
        }
        for i in self.replica_indices() {
            say(&format!("replica {i}: stopping (SIGTERM: it drains first)"));
            self.replica_stop(i)?;
            // Started in the background, like `start`'s: it outlives this command.
            drop(self.replica_start(i, binary)?);
            self.replica_wait_ready(i, binary)?;
            // HAProxy checks every second and takes a replica back after one good check.
            thread::sleep(Duration::from_millis(1500));
        }
        say("every replica restarted");
        Ok(())
    }

    /// Stops HAProxy, then every replica that has a pid file.
    pub(super) fn fleet_stop(&self) -> Result<(), Failure> {
        self.lb_stop()?;
        for i in self.replica_indices() {
            self.replica_stop(i)?;
        }
        Ok(())
    }

    /// Fails before anything starts if a fleet port is held by something else.
    pub(super) fn fleet_preflight_ports(&self) -> Result<(), Failure> {
        if self.lb_pid().is_none() && process::port_open(self.s.lb_port) {
            return Err(self.port_taken("haproxy", self.s.lb_port, "LB_PORT"));
        }
        for i in 1..=self.s.replicas {
            let port = self.s.replica_port(i);
            if self.replica_pid(i).is_none() && process::port_open(port) {
                return Err(self.port_taken(&format!("replica {i}"), port, "REPLICA_BASE_PORT"));
            }
        }
        Ok(())
    }

    /// `status`'s lines for HAProxy and every replica asked for or with a pid file.
    pub(super) fn fleet_status(&self) {
        let l = &self.s.layout;
        match self.lb_pid() {
            Some(pid) => {
                let port = self.lb_running_port();
                println!("haproxy: running, pid {pid}, port {port} (all interfaces), http://127.0.0.1:{port}/");
            }
            None => println!(
                "haproxy: not running (port {} when started)",
                self.s.lb_port
            ),
        }
        println!("          config:   {}", l.lb_config);
        println!("          log file: {}", l.lb_log);
        let mut indices = self.replica_indices();
        if self.s.fleet() {
            indices.extend(1..=self.s.replicas);
        }
        indices.sort_unstable();
        indices.dedup();
        for i in indices {
            let port = self.replica_running_port(i);
            match self.replica_pid(i) {
                Some(pid) if replica::ready(port).is_ok() => {
                    println!("replica-{i}: running, pid {pid}, port {port} (127.0.0.1), ready");
                }
                Some(pid) => println!(
                    "replica-{i}: running, pid {pid}, port {port} (127.0.0.1), not ready (GET /readyz does not answer 200)"
                ),
                None => println!("replica-{i}: not running (port {port} when started)"),
            }
            println!("          log file: {}", l.replica(i, "log"));
        }
    }

    // --------------------------------------------------------------- up --

    /// `up` with REPLICAS > 1: the fleet in the foreground, its logs followed. Whatever ends it
    /// (Ctrl-C, SIGTERM, a failure while starting, every replica gone), HAProxy and the replicas
    /// started here are stopped on the way out; a failure is printed before they are.
    pub(super) fn up_fleet(&mut self) -> Result<ExitCode, Failure> {
        let me = self.s.me.clone();
        if let Some(pid) = self.lb_pid() {
            return Err(Failure::new(
                format!("this project's fleet already runs (haproxy pid {pid}, started by '{me} start' or another '{me} up')."),
                [format!(
                    "use it (http://127.0.0.1:{}/, '{me} status'), or stop it first: {me} stop",
                    self.lb_running_port()
                )],
            ));
        }
        for i in self.replica_indices() {
            if let Some(pid) = self.replica_pid(i) {
                return Err(Failure::new(
                    format!("this project's replica {i} already runs (pid {pid}, started by '{me} start' or another '{me} up')."),
                    [format!("use it ('{me} status'), or stop the fleet first: {me} stop")],
                ));
            }
        }
        self.start_stack()?;
        let binary = self.service_binary()?;
        catch_stop_signals();
        let mut children = Vec::new();
        if let Err(failure) = self.fleet_start(&binary, &mut children) {
            return Ok(self.leave(children, Some(failure)));
        }
        self.up_fleet_banner(&binary)?;
        let logs: Vec<PathBuf> = (1..=self.s.replicas)
            .map(|i| self.s.layout.replica(i, "log").into())
            .collect();
        Ok(self.follow(children, Follow::from_end(logs)))
    }

    /// What `up` prints once the fleet serves.
    fn up_fleet_banner(&self, binary: &Path) -> Result<(), Failure> {
        let (me, l, lb) = (&self.s.me, &self.s.layout, self.s.lb_port);
        let targets = self.service_targets()?.join(" ");
        self.say_where_servers_are(&targets);
        say(&format!(
            "replicas  {targets}   ({}, RUST_LOG={}, logs in {})",
            binary.display(),
            self.rust_log(),
            l.app_dir
        ));
        say(&format!("haproxy   http://127.0.0.1:{lb}   round robin over the replicas that answer GET /readyz"));
        say(&format!(
            "try:      curl 'http://localhost:{lb}/template-details?id=1'"
        ));
        say(&format!("following the replicas' logs; Ctrl-C (or SIGTERM) stops HAProxy and the replicas; PostgreSQL, Redis and Prometheus keep running ('{me} stop' stops them)"));
        Ok(())
    }

    /// Copies the replicas' new log lines to stdout and watches them until a stop signal, or
    /// until every replica has exited; then stops the fleet.
    fn follow(&self, mut children: Vec<Child>, mut logs: Follow) -> ExitCode {
        let mut gone = Vec::new();
        loop {
            thread::sleep(FOLLOW_EVERY);
            if process::interrupted() {
                return self.leave(children, None);
            }
            logs.copy_new();
            // Reap the replicas started here, so that none stays a zombie while `up` runs.
            for child in &mut children {
                let _ = child.try_wait();
            }
            let mut alive_now = 0;
            for i in 1..=self.s.replicas {
                if self.replica_pid(i).is_some() {
                    alive_now += 1;
                } else if !gone.contains(&i) {
                    gone.push(i);
                    warn(&format!(
                        "replica {i} exited (see {}); HAProxy sends its requests to the others",
                        self.s.layout.replica(i, "log")
                    ));
                }
            }
            if alive_now == 0 {
                return self.leave(
                    children,
                    Some(Failure::new(
                        format!(
                            "every replica has exited (see the logs in {}).",
                            self.s.layout.app_dir
                        ),
                        [format!("fix the cause, then run '{} up' again.", self.s.me)],
                    )),
                );
            }
        }
    }

    /// Stops HAProxy and the replicas on the way out of `up`: after `failure` (printed first), or
    /// after a stop signal (exit code 0). The `children` started here are reaped once stopped.
    fn leave(&self, children: Vec<Child>, failure: Option<Failure>) -> ExitCode {
        let code = match failure {
            Some(failure) if !process::interrupted() => {
                failure.print();
                ExitCode::FAILURE
            }
            _ => {
                say("stopping HAProxy and the replicas (PostgreSQL, Redis and Prometheus keep running)");
                ExitCode::SUCCESS
            }
        };
        let stopped = self.fleet_stop();
        for mut child in children {
            let _ = child.try_wait();
        }
        match stopped {
            Ok(()) => code,
            Err(failure) => {
                failure.print();
                ExitCode::FAILURE
            }
        }
    }
}

/// Turns SIGINT and SIGTERM into [`process::interrupt`]: they are blocked in this thread (and so
/// in every thread it starts; the children the launcher spawns clear their mask) and taken by a
/// thread of their own, so that `up` notices them between two steps and stops the fleet it
/// started instead of dying with it half up.
///
/// A signal ignored when we started stays ignored, as a shell's trap cannot catch one either: a
/// non-interactive shell starts its background jobs with SIGINT ignored, so that Ctrl-C meant for
/// the foreground does not reach them (and Linux would queue a blocked one all the same).
fn catch_stop_signals() {
    // SAFETY: sigaction only reads the current disposition into a zeroed struct we own; the
    // sigset is initialized by sigemptyset before use; pthread_sigmask and sigwait only read it.
    // No other thread exists yet whose mask this could surprise.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for signal in [libc::SIGINT, libc::SIGTERM] {
            let mut current: libc::sigaction = std::mem::zeroed();
            let ignored = libc::sigaction(signal, std::ptr::null(), &mut current) == 0
                && current.sa_sigaction == libc::SIG_IGN;
            if !ignored {
                libc::sigaddset(&mut set, signal);
            }
        }
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        thread::spawn(move || loop {
            let mut signal = 0;
            if libc::sigwait(&set, &mut signal) == 0 {
                process::interrupt();
            }
        });
    }
}

/// The replicas' logs, followed from their end (as `tail -n 0 -F`).
struct Follow {
    /// Each log and how much of it was copied.
    logs: Vec<(PathBuf, u64)>,
}

impl Follow {
    fn from_end(logs: Vec<PathBuf>) -> Follow {
        Follow {
            logs: logs
                .into_iter()
                .map(|log| {
                    let len = fs::metadata(&log).map_or(0, |m| m.len());
                    (log, len)
                })
                .collect(),
        }
    }

    /// Copies what was appended to each log since the last call to stdout.
    fn copy_new(&mut self) {
        let mut out = std::io::stdout().lock();
        for (log, copied) in &mut self.logs {
            let Ok(mut file) = fs::File::open(&*log) else {
                continue;
            };
            let len = file.metadata().map_or(0, |m| m.len());
            if len < *copied {
                // Truncated: follow it from its new start.
                *copied = 0;
            }
            let mut new = Vec::new();
            if file.seek(SeekFrom::Start(*copied)).is_ok() && file.read_to_end(&mut new).is_ok() {
                *copied += new.len() as u64;
                let _ = out.write_all(&new);
            }
        }
        let _ = out.flush();
    }
}

/// The `target_directory` of `cargo metadata`'s JSON.
fn target_directory(metadata: &str) -> Option<String> {
    let key = "\"target_directory\":\"";
    let rest = &metadata[metadata.find(key)? + key.len()..];
    Some(rest[..rest.find('"')?].to_owned())
}
