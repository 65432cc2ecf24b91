//! With `POOLER=pgbouncer`: PgBouncer in transaction mode in front of the stack's PostgreSQL
//! (`pgbouncer/*`), the way managed PostgreSQL is often reached. The service then gets
//! `DATABASE_URL` through it, and `DATABASE_LISTEN_URL` straight to PostgreSQL for what needs a
//! session of its own (`LISTEN`, the migration lock), with `DATABASE_POOLER=transaction`.
//!
//! Like Redis, it is found again through its pid file and reused while it runs with the same
//! configuration; a configuration that changed (PostgreSQL moved) restarts it. `stop` and
//! `status` find it through its pid file, whatever POOLER says now. It runs as the `postgres`
//! user when we are root, as PostgreSQL does.

use std::fs;

use super::servers::{make_dir, rename, server_user, set_mode, write_text};
use super::{say, Failure, Stack};
use crate::pgbouncer::{self, PgBouncer};
use crate::process;

impl Stack {
    /// True if a PgBouncer was started here (its pid file exists), whatever POOLER says now.
    pub(super) fn pgbouncer_started(&self) -> bool {
        fs::metadata(&self.s.layout.pgbouncer_pid).is_ok()
    }

    /// Starts PgBouncer in front of PostgreSQL (which runs by now), or reuses it.
    pub(super) fn pgbouncer_start(&mut self) -> Result<(), Failure> {
        let daemon = self.pgbouncer();
        let running = daemon.pid();
        if running.is_some() {
            let port = daemon.port().unwrap_or(self.s.pgbouncer_port.number);
            self.s.pgbouncer_port =
                self.adopt("pgbouncer", "PGBOUNCER_PORT", self.s.pgbouncer_port, port)?;
        }
        let port = self.s.pgbouncer_port.number;
        let user = server_user()?;
        self.make_stack_dir()?;
        let l = &self.s.layout;
        make_dir(&l.pgbouncer_dir)?;
        // PgBouncer may run as another user: it must read both files (neither holds a secret).
        set_mode(&l.pgbouncer_dir, 0o755)?;
        write_text(&l.pgbouncer_auth, pgbouncer::AUTH_FILE)?;
        set_mode(&l.pgbouncer_auth, 0o644)?;
        let config = pgbouncer::Config {
            written_by: "scripts/stack.sh",
            port,
            pg_port: self.s.pg.number,
            auth_file: l.pgbouncer_auth.as_ref(),
        };
        let new = format!("{}.new", l.pgbouncer_config);
        write_text(&new, &config.ini())?;
        set_mode(&new, 0o644)?;
        if let Some(pid) = running {
            if fs::read(&new).ok() == fs::read(&l.pgbouncer_config).ok() {
                let _ = fs::remove_file(&new);
                let (me, again) = (&self.s.me, self.s.again());
                pgbouncer::ready(port).map_err(|problem| {
                    Failure::new(
                        format!("this project's pgbouncer (pid {pid}) runs but does not pass a query on to postgres: {problem}."),
                        [format!("see {}; restart it: {me} stop && {again}", daemon.log)],
                    )
                })?;
                say(&format!(
                    "pgbouncer: already running (pid {pid}) on 127.0.0.1:{port}, reusing it"
                ));
                return Ok(());
            }
            say("pgbouncer: its configuration changed (PG_PORT or PGBOUNCER_PORT), restarting it");
            daemon.stop(drop)?;
        }
        if process::port_open(port) {
            return Err(self.port_taken("pgbouncer", port, "PGBOUNCER_PORT"));
        }
        rename(&new, &l.pgbouncer_config)?;
        daemon.forget();
        say(&format!(
            "pgbouncer: starting on 127.0.0.1:{port}, transaction mode in front of postgres on 127.0.0.1:{} (log: {})",
            self.s.pg.number, daemon.log
        ));
        let server = PgBouncer {
            binary: pgbouncer::binary().unwrap_or_else(|| pgbouncer::PROGRAM.into()),
            config: l.pgbouncer_config.clone().into(),
            port,
            user,
            cwd: l.pgbouncer_dir.clone().into(),
        };
        let not_ready = format!(
            "pgbouncer did not pass a query on to postgres on 127.0.0.1:{port} within 10 s (log above, full log: {}).",
            daemon.log
        );
        daemon.launch(&server, port, &self.s, not_ready)?;
        Ok(())
    }

    /// Stops PgBouncer if this stack started one.
    pub(super) fn pgbouncer_stop(&self) -> Result<(), Failure> {
        self.pgbouncer().stop(drop)
    }

    /// `status`'s lines for PgBouncer.
    pub(super) fn pgbouncer_status(&self) {
        let daemon = self.pgbouncer();
        let l = &self.s.layout;
        match daemon.pid() {
            Some(pid) => {
                let port = daemon.port().unwrap_or(self.s.pgbouncer_port.number);
                let serving = match pgbouncer::ready(port) {
                    Ok(()) => "passes queries on to postgres".to_owned(),
                    Err(problem) => format!("does not pass queries on: {problem}"),
                };
                println!("pgbouncer: running, pid {pid}, port {port} (127.0.0.1), transaction mode, {serving}");
            }
            None => println!(
                "pgbouncer: not running (port {} when started)",
                daemon.port().unwrap_or(self.s.pgbouncer_port.number)
            ),
        }
        println!("          config:   {}", l.pgbouncer_config);
        println!("          log file: {}", l.pgbouncer_log);
        println!("          pid file: {}", l.pgbouncer_pid);
    }
}
