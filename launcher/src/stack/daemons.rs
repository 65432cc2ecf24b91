//! The servers the stack finds again through a pid file and a port file of its own: Redis (and
//! the members of a Redis Cluster or sentinel set), Prometheus, PgBouncer, HAProxy and the
//! replicas (PostgreSQL keeps its own `postmaster.pid`). One way to
//! find one, to start one and to stop one, whatever the server.

use std::path::Path;
use std::process::Child;
use std::time::Duration;

use super::servers::{remove_files, write_number};
use super::settings::Settings;
use super::{after_log, say, Failure, Stack};
use crate::process::{self, StopStep, SIGTERM};
use crate::{detached, haproxy, pgbouncer, prometheus, redis, replica, Error, Server};

/// A daemon of the stack, as its files and messages know it.
pub(super) struct Daemon {
    /// As the messages name it: `redis`, `prometheus`, `haproxy`, `replica 2`.
    pub name: String,
    pub pid_file: String,
    pub port_file: String,
    pub log: String,
    /// Whether a process's program name (`/proc/<pid>/comm`) is this server's: a pid in a stale
    /// pid file may belong to another program by now.
    pub is_it: fn(&str) -> bool,
    /// How it stops (its module's steps).
    pub steps: &'static [StopStep],
    /// Whether its stop lets open requests finish (said so in the message).
    pub graceful: bool,
}

impl Daemon {
    /// `name` with its `[pid file, port file, log]`.
    fn new(
        name: &str,
        [pid_file, port_file, log]: [&String; 3],
        is_it: fn(&str) -> bool,
        steps: &'static [StopStep],
        graceful: bool,
    ) -> Daemon {
        Daemon {
            name: name.to_owned(),
            pid_file: pid_file.clone(),
            port_file: port_file.clone(),
            log: log.clone(),
            is_it,
            steps,
            graceful,
        }
    }

    /// Its pid, if its pid file names a live process of its program.
    pub fn pid(&self) -> Option<u32> {
        process::running_from_pid_file(self.pid_file.as_ref(), self.is_it)
    }

    /// The port it was started on, from its port file.
    pub fn port(&self) -> Option<u16> {
        process::read_number(self.port_file.as_ref())
    }

    /// Removes its pid and port files.
    pub fn forget(&self) {
        remove_files(&[&self.pid_file, &self.port_file]);
    }

    /// Starts `server` as a daemon on `port`, writes down its pid and port, and waits until it is
    /// ready. If it is not, it is stopped and forgotten, and the failure says `not_ready` after
    /// the tail of its log.
    pub fn launch(
        &self,
        server: &dyn Server,
        port: u16,
        settings: &Settings,
        not_ready: String,
    ) -> Result<Child, Failure> {
        let not_ready = |error: &Error| {
            let next = format!(
                "fix the cause in the log, then run '{}' again.",
                settings.again()
            );
            after_log(&self.log, error, not_ready.clone(), [next])
        };
        let log = Path::new(&self.log);
        let mut child = detached::spawn(server, log).map_err(|e| not_ready(&e))?;
        let pid = child.id();
        write_number(&self.pid_file, pid)?;
        write_number(&self.port_file, u32::from(port))?;
        if let Err(error) = process::wait_ready(server, &mut child, log) {
            let failure = not_ready(&error);
            process::send(pid, SIGTERM);
            self.forget();
            return Err(failure);
        }
        if self.pid() != Some(pid) {
            return Err(Failure::new(
                format!(
                    "{} answers, but pid {pid} from {} is not it.",
                    self.name, self.pid_file
                ),
                [format!(
                    "run '{} stop', then '{}' again.",
                    settings.me,
                    settings.again()
                )],
            ));
        }
        say(&format!("{}: started (pid {pid})", self.name));
        Ok(child)
    }

    /// Stops it if it runs (`first` is done before its stop steps: Redis's `SHUTDOWN`), and
    /// forgets it.
    pub fn stop(&self, first: impl FnOnce(u32)) -> Result<(), Failure> {
        let Some(pid) = self.pid() else {
            say(&format!("{}: not running", self.name));
            self.forget();
            return Ok(());
        };
        let graceful = if self.graceful { ", graceful" } else { "" };
        say(&format!("{}: stopping (pid {pid}{graceful})", self.name));
        first(pid);
        if !process::stop(pid, self.steps) {
            let within: Duration = self.steps.iter().map(|(_, wait)| *wait).sum();
            return Err(Failure::new(
                format!(
                    "{} (pid {pid}) did not stop within {} s.",
                    self.name,
                    within.as_secs()
                ),
                [format!(
                    "see {}; as a last resort: kill -KILL {pid}",
                    self.log
                )],
            ));
        }
        self.forget();
        say(&format!("{}: stopped", self.name));
        Ok(())
    }
}

impl Stack {
    pub(super) fn redis(&self) -> Daemon {
        let l = &self.s.layout;
        let files = [&l.redis_pid, &l.redis_port, &l.redis_log];
        let is_it = |comm: &str| comm.starts_with("redis-server");
        Daemon::new("redis", files, is_it, &redis::STOP, false)
    }

    /// Member `member` (`node-2`, `sentinel-1`) of the Redis topology whose files are in `dir`
    /// (REDIS_MODE=cluster or sentinel): `redis-<member>` in the messages.
    pub(super) fn topology_daemon(&self, dir: &str, member: &str) -> Daemon {
        let file = |ext: &str| format!("{dir}/{member}.{ext}");
        let files = [&file("pid"), &file("port"), &file("log")];
        let is_it = |comm: &str| comm.starts_with("redis-server");
        Daemon::new(
            &format!("redis-{member}"),
            files,
            is_it,
            &redis::STOP,
            false,
        )
    }

    pub(super) fn prom(&self) -> Daemon {
        let l = &self.s.layout;
        let files = [&l.prom_pid, &l.prom_port, &l.prom_log];
        Daemon::new(
            "prometheus",
            files,
            |c| c == "prometheus",
            &prometheus::STOP,
            false,
        )
    }

    pub(super) fn pgbouncer(&self) -> Daemon {
        let l = &self.s.layout;
        let files = [&l.pgbouncer_pid, &l.pgbouncer_port, &l.pgbouncer_log];
        let is_it = |comm: &str| comm == pgbouncer::PROGRAM;
        Daemon::new("pgbouncer", files, is_it, &pgbouncer::STOP, true)
    }

    pub(super) fn lb(&self) -> Daemon {
        let l = &self.s.layout;
        let files = [&l.lb_pid, &l.lb_port, &l.lb_log];
        Daemon::new("haproxy", files, |c| c == "haproxy", &haproxy::STOP, true)
    }

    /// Replica `i` (from 1).
    pub(super) fn replica_daemon(&self, i: u16) -> Daemon {
        let l = &self.s.layout;
        let files = [
            &l.replica(i, "pid"),
            &l.replica(i, "port"),
            &l.replica(i, "log"),
        ];
        let is_it = |comm: &str| comm == replica::PROGRAM;
        Daemon::new(&format!("replica {i}"), files, is_it, &replica::STOP, true)
    }
}
