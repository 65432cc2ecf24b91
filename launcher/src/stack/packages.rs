//! The Debian packages the stack needs, installed with apt-get when something is missing (as root;
//! anyone else is told the command). They are what the stack runs and what a developer uses beside
//! it: `psql` and `createdb`, `redis-cli`, `curl` for the URLs the messages suggest; PgBouncer
//! with `POOLER=pgbouncer`, HAProxy with a fleet.

use std::process::{Command, Stdio};

use super::{say, warn, Failure, Stack};
use crate::postgres::Bins;
use crate::process::{find_in_path, is_root};
use crate::{haproxy, pgbouncer, postgres};

impl Stack {
    /// Looks for the PostgreSQL binaries: those of the version that made the data directory if it
    /// says and they are installed, else the newest.
    pub(super) fn find_pg_bins(&mut self) {
        let version = postgres::data_version(self.s.layout.pg_data.as_ref());
        self.pg_bins = Bins::find(version.as_deref());
    }

    /// The packages to install, in the order apt-get is told them.
    fn missing_packages(&mut self) -> Vec<&'static str> {
        let mut packages = Vec::new();
        self.find_pg_bins();
        match &self.pg_bins {
            Some(bins) if bins.have(&["initdb", "pg_ctl"]) => {
                if !bins.have(&["psql", "createdb", "pg_isready"]) {
                    packages.push("postgresql-client");
                }
            }
            _ => packages.push("postgresql"),
        }
        let lacks = |program: &str| find_in_path(program).is_none();
        if lacks("redis-server") {
            packages.push("redis-server");
        }
        if lacks("redis-cli") {
            packages.push("redis-tools");
        }
        if lacks("curl") {
            packages.push("curl");
        }
        if lacks("prometheus") || lacks("promtool") {
            packages.push("prometheus");
        }
        if lacks("setsid") || (is_root() && lacks("runuser")) {
            packages.push("util-linux");
        }
        if self.s.fleet() && haproxy::binary().is_none() {
            packages.push("haproxy");
        }
        if self.s.pgbouncer && pgbouncer::binary().is_none() {
            packages.push("pgbouncer");
        }
        packages
    }

    /// Installs what is missing (as root), or says how to.
    pub(super) fn ensure_packages(&mut self) -> Result<(), Failure> {
        let packages = self.missing_packages();
        if packages.is_empty() {
            return Ok(());
        }
        let list = packages.join(" ");
        let again = self.s.again();
        if !is_root() {
            return Err(Failure::new(
                format!("missing packages: {list}"),
                [
                    "install them, then run this again:".to_owned(),
                    format!("  sudo apt-get update && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y {list}"),
                ],
            ));
        }
        say(&format!("installing missing packages: {list}"));
        if !apt_get(&["update"]) {
            return Err(Failure::new(
                "apt-get update failed.",
                [format!(
                    "check network access / apt sources, then run '{again}' again."
                )],
            ));
        }
        // No recommends: prometheus would bring node-exporter, a system service of its own.
        let mut install = vec!["install", "-y", "--no-install-recommends"];
        install.extend(&packages);
        if !apt_get(&install) {
            return Err(Failure::new(
                format!("apt-get install {list} failed."),
                [format!(
                    "fix the apt error above, then run '{again}' again."
                )],
            ));
        }
        if packages.contains(&"prometheus") {
            stop_system_service("prometheus", 9090, "PROM_PORT=9091");
        }
        if packages.contains(&"pgbouncer") {
            stop_system_service("pgbouncer", 6432, "PGBOUNCER_PORT=6433");
        }
        let still = self.missing_packages();
        if !still.is_empty() {
            return Err(Failure::new(
                format!("still missing after apt-get install: {}", still.join(" ")),
                ["check that /usr/lib/postgresql/*/bin, redis-server, redis-cli, curl, prometheus, promtool, setsid (haproxy for REPLICAS > 1, pgbouncer for POOLER=pgbouncer) exist.".to_owned()],
            ));
        }
        Ok(())
    }
}

/// `apt-get <args>`, non-interactive, its output on ours; whether it succeeded.
fn apt_get(args: &[&str]) -> bool {
    Command::new("apt-get")
        .args(args)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .status()
        .is_ok_and(|s| s.success())
}

/// Where systemd runs, installing Debian's prometheus or pgbouncer package starts a system-wide
/// service (`name`) on `port`, which would hold the port of the project's own. The stack just
/// installed it, so it takes it back out of the way (and says how to undo that, and which
/// variable, `instead`, avoids the port if that fails).
fn stop_system_service(name: &str, port: u16, instead: &str) {
    if find_in_path("systemctl").is_none() {
        return;
    }
    let systemctl = |args: &[&str]| {
        Command::new("systemctl")
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if !systemctl(&["is-active", "--quiet", name]) {
        return;
    }
    let indent = " ".repeat(name.len() + 2);
    say(&format!(
        "{name}: Debian's package started a system-wide {name} service on :{port};"
    ));
    say(&format!(
        "{indent}stopping and disabling it so the project's own can listen there"
    ));
    say(&format!(
        "{indent}(to get it back: systemctl enable --now {name})"
    ));
    if !systemctl(&["disable", "--now", name]) {
        warn(&format!("warning: could not stop the system {name} service; if :{port} stays taken, use {instead}"));
    }
}
