//! The commands: `up`, `start`, `stop`, `status`, `env`, `seed` (`help` is [`super::USAGE`]).

use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, ExitCode, Stdio};

use super::settings::{RedisMode, DB_NAME};
use super::{port_holder, say, warn, Failure, Stack};
use crate::process;
use crate::prometheus;

impl Stack {
    /// PostgreSQL (and PgBouncer with `POOLER=pgbouncer`), Redis and Prometheus started (or
    /// reused), after the checks that need no server:
    /// Prometheus's port clear of the service's, the packages there, no port held by another
    /// program.
    pub(super) fn start_stack(&mut self) -> Result<(), Failure> {
        if !self.s.fleet() {
            let target = self.service_target()?;
            let http_port = target.rsplit(':').next().unwrap_or_default();
            if http_port == self.s.prom.number.to_string() {
                return Err(Failure::new(
                    format!(
                        "PROM_PORT and the service's HTTP port (HTTP_ADDR={}) are both {}.",
                        self.s.http_addr.as_deref().unwrap_or("0.0.0.0:8080"),
                        self.s.prom.number
                    ),
                    [format!(
                        "give Prometheus another port, e.g. PROM_PORT=9090 {}",
                        self.s.again()
                    )],
                ));
            }
        }
        self.adopt_redis_mode();
        self.ensure_packages()?;
        self.preflight_ports()?;
        if self.s.fleet() {
            self.fleet_preflight_ports()?;
        }
        self.pg_start()?;
        if self.s.pgbouncer {
            self.pgbouncer_start()?;
        }
        match self.s.redis_mode {
            RedisMode::Single => self.redis_start()?,
            _ => self.topology_start()?,
        }
        self.prom_start()
    }

    /// `up`'s first lines: where PostgreSQL (and PgBouncer), Redis and Prometheus (scraping
    /// `targets`) are.
    pub(super) fn say_where_servers_are(&self, targets: &str) {
        let env = self.service_env();
        let value = |name: &str| {
            env.iter()
                .find(|(n, _)| n == name)
                .map_or(String::new(), |(_, v)| v.clone())
        };
        let (pg, redis, prom) = (self.s.pg.number, self.s.redis.number, self.s.prom.number);
        if self.s.pgbouncer {
            let pgbouncer = self.s.pgbouncer_port.number;
            say(&format!(
                "postgres  127.0.0.1:{pg}   DATABASE_LISTEN_URL={}",
                value("DATABASE_LISTEN_URL")
            ));
            say(&format!(
                "pgbouncer 127.0.0.1:{pgbouncer}   DATABASE_URL={}   (transaction mode, DATABASE_POOLER=transaction)",
                value("DATABASE_URL")
            ));
        } else {
            say(&format!(
                "postgres  127.0.0.1:{pg}   DATABASE_URL={}",
                value("DATABASE_URL")
            ));
        }
        match self.s.redis_mode {
            RedisMode::Single => say(&format!(
                "redis     127.0.0.1:{redis}   REDIS_URL={}",
                value("REDIS_URL")
            )),
            RedisMode::Cluster => say(&format!(
                "redis     {}   REDIS_URL={}",
                self.redis_where(),
                value("REDIS_URL")
            )),
            RedisMode::Sentinel => say(&format!(
                "redis     {}   REDIS_SENTINELS={} REDIS_SENTINEL_MASTER={}",
                self.redis_where(),
                value("REDIS_SENTINELS"),
                value("REDIS_SENTINEL_MASTER")
            )),
        }
        say(&format!("prometheus http://127.0.0.1:{prom}   scrapes {targets} every 5 s (targets: http://127.0.0.1:{prom}/targets)"));
    }

    /// Fails before anything starts if a port is held by something that is not ours.
    fn preflight_ports(&self) -> Result<(), Failure> {
        let (pg, prom) = (self.s.pg.number, self.s.prom.number);
        if self.pg_running().is_none() && process::port_open(pg) {
            return Err(self.port_taken("postgres", pg, "PG_PORT"));
        }
        self.redis_preflight()?;
        if self.prom().pid().is_none() && process::port_open(prom) {
            return Err(self.port_taken("prometheus", prom, "PROM_PORT"));
        }
        let pgbouncer = self.s.pgbouncer_port.number;
        if self.s.pgbouncer && self.pgbouncer().pid().is_none() && process::port_open(pgbouncer) {
            return Err(self.port_taken("pgbouncer", pgbouncer, "PGBOUNCER_PORT"));
        }
        Ok(())
    }

    /// `start`: the servers in the background (with a fleet, the replicas and HAProxy too), and
    /// where they are.
    /// `restart`: the fleet's replicas one at a time (see [`Stack::fleet_restart`]), with
    /// SERVICE_BIN or a fresh release build.
    pub(super) fn restart(&mut self) -> Result<ExitCode, Failure> {
        // The replicas come back with the Redis that runs, whatever REDIS_MODE says now.
        self.find_running_redis();
        let binary = self.service_binary()?;
        self.fleet_restart(&binary)?;
        Ok(ExitCode::SUCCESS)
    }

    pub(super) fn start(&mut self) -> Result<ExitCode, Failure> {
        self.start_stack()?;
        if self.s.fleet() {
            let binary = self.service_binary()?;
            // Dropped: the daemons outlive this command.
            self.fleet_start(&binary, &mut Vec::new())?;
        }
        let targets = self.service_targets()?.join(" ");
        let (l, me) = (&self.s.layout, &self.s.me);
        let (pg, redis, prom) = (self.s.pg.number, self.s.redis.number, self.s.prom.number);
        say("ready:");
        say(&format!(
            "  postgres  127.0.0.1:{pg}  db '{DB_NAME}', user postgres (trust)  data {}",
            l.pg_data
        ));
        if self.s.pgbouncer {
            say(&format!(
                "  pgbouncer 127.0.0.1:{}  transaction mode in front of postgres, any database name  log {}",
                self.s.pgbouncer_port.number, l.pgbouncer_log
            ));
        }
        match self.s.redis_mode {
            RedisMode::Single => say(&format!(
                "  redis     127.0.0.1:{redis}  dir {}",
                l.redis_dir
            )),
            RedisMode::Cluster => say(&format!(
                "  redis     {}  dir {}",
                self.redis_where(),
                l.redis_cluster_dir
            )),
            RedisMode::Sentinel => say(&format!(
                "  redis     {}  dir {}",
                self.redis_where(),
                l.redis_sentinel_dir
            )),
        }
        say(&format!("  prometheus http://127.0.0.1:{prom}  scrapes the service at {targets} every 5 s  data {}", l.prom_data));
        if self.s.fleet() {
            let lb = self.s.lb_port;
            say(&format!(
                "  haproxy   http://127.0.0.1:{lb}  round robin over {} replicas (127.0.0.1:{}-{}), logs in {}",
                self.s.replicas,
                self.s.replica_base_port,
                self.s.replica_port(self.s.replicas),
                l.app_dir
            ));
            say(&format!(
                "try:       curl 'http://localhost:{lb}/template-details?id=1'"
            ));
        } else {
            say(&format!(
                "to point the service (or tests) at it:  eval \"$({me} env)\""
            ));
        }
        say(&format!("stop it with: {me} stop"));
        Ok(ExitCode::SUCCESS)
    }

    /// `stop`: the fleet (if one runs), PgBouncer (if one runs), PostgreSQL (fast shutdown),
    /// Redis (the single server, or every member of a cluster or sentinel set started here) and
    /// Prometheus; fine if they are stopped already.
    pub(super) fn stop(&mut self) -> Result<ExitCode, Failure> {
        self.adopt_redis_mode();
        if self.s.fleet() || self.fleet_started() {
            self.fleet_stop()?;
        }
        if self.s.pgbouncer || self.pgbouncer_started() {
            self.pgbouncer_stop()?;
        }
        self.pg_stop()?;
        for mode in RedisMode::ALL {
            match mode {
                RedisMode::Single if self.redis_shown(mode) => self.redis_stop()?,
                RedisMode::Single => {}
                _ if self.redis_shown(mode) => self.topology_stop(mode)?,
                _ => {}
            }
        }
        self.prom_stop()?;
        Ok(ExitCode::SUCCESS)
    }

    /// `status`: running or not, pid, port, data directory and log of each server.
    pub(super) fn status(&mut self) -> Result<ExitCode, Failure> {
        self.find_pg_bins();
        self.find_running_redis();
        let l = &self.s.layout;
        let not_running = |name: &str, port: u16| {
            println!("{name} not running (port {port} when started)");
            if process::port_open(port) {
                let holder = port_holder(port).into_iter().next().unwrap_or_default();
                println!("          note: port {port} is in use by something else: {holder}");
            }
        };
        match self.pg_running() {
            Some((pid, port)) => {
                let port = port.map(|p| p.to_string()).unwrap_or_default();
                println!("postgres: running, pid {pid}, port {port} (127.0.0.1)");
            }
            None => not_running("postgres:", self.s.pg.number),
        }
        if Path::new(&l.pg_data).exists() {
            println!("          data dir: {}", l.pg_data);
        } else if self.pg_unreadable() {
            println!(
                "          data dir: {} (not readable by you; try: sudo {} status)",
                l.pg_data, self.s.me
            );
        } else {
            println!("          data dir: {} (not created yet)", l.pg_data);
        }
        println!("          log file: {}", l.pg_log);
        let bins = self.pg_bins.as_ref();
        let bins = bins.map_or("not installed".to_owned(), |b| b.dir.display().to_string());
        println!("          binaries: {bins}");
        if self.s.pgbouncer || self.pgbouncer_started() {
            self.pgbouncer_status();
        }
        if self.redis_shown(RedisMode::Single) {
            let redis = self.redis();
            match redis.pid() {
                Some(pid) => println!(
                    "redis:    running, pid {pid}, port {} (127.0.0.1)",
                    redis.port().unwrap_or(self.s.redis.number)
                ),
                None => not_running("redis:   ", self.s.redis.number),
            }
            println!("          data dir: {}", l.redis_dir);
            println!("          log file: {}", l.redis_log);
            println!("          pid file: {}", l.redis_pid);
        }
        for mode in [RedisMode::Cluster, RedisMode::Sentinel] {
            if self.redis_shown(mode) {
                self.topology_status(mode);
            }
        }
        let prom = self.prom();
        match prom.pid() {
            Some(pid) => {
                let port = prom.port().unwrap_or(self.s.prom.number);
                println!("prometheus: running, pid {pid}, port {port} (127.0.0.1), http://127.0.0.1:{port}/targets");
                let target = std::fs::read_to_string(&l.prom_target)
                    .map(|t| t.trim_end_matches('\n').to_owned())
                    .unwrap_or_else(|_| "unknown".to_owned());
                println!(
                    "          scrapes: {target} every 5 s, {}",
                    prometheus::target_health(port)
                );
            }
            None => not_running("prometheus:", self.s.prom.number),
        }
        println!("          data dir: {}", l.prom_data);
        println!("          log file: {}", l.prom_log);
        println!(
            "          config:   {} (from {})",
            l.prom_config, l.prom_source
        );
        if self.s.fleet() || self.fleet_started() {
            self.fleet_status();
        }
        Ok(ExitCode::SUCCESS)
    }

    /// `env`: export lines for the running stack (its running ports), with a warning for what
    /// does not run.
    pub(super) fn env(&mut self) -> Result<ExitCode, Failure> {
        let down = self.find_running();
        if !down.is_empty() {
            warn(&format!(
                "warning: not running: {} (start with: {} start)",
                down.join(" "),
                self.s.me
            ));
        }
        for (name, value) in self.service_env() {
            if name != "RUST_LOG" {
                println!("export {name}={value}");
            }
        }
        Ok(ExitCode::SUCCESS)
    }

    /// Whether `stop` and `status` cover Redis in `mode`: REDIS_MODE's, and any other this stack
    /// started (its pid files are there).
    fn redis_shown(&self, mode: RedisMode) -> bool {
        self.s.redis_mode == mode
            || match mode {
                RedisMode::Single => Path::new(&self.s.layout.redis_pid).exists(),
                _ => self.topology_started(mode),
            }
    }

    /// Takes the ports of the servers of this stack that run (PgBouncer's with
    /// `POOLER=pgbouncer`, Redis's in the mode that runs unless REDIS_MODE is set); the names of
    /// those that do not.
    fn find_running(&mut self) -> Vec<String> {
        let mut down = Vec::new();
        if let Some((_, port)) = self.pg_running() {
            if let Some(port) = port {
                self.s.pg.number = port;
            }
        } else if self.pg_unreadable() {
            warn(&format!(
                "warning: cannot inspect {} as {}; assuming PG_PORT={} (sudo {} env shows the real one)",
                self.s.layout.pg_dir,
                super::own_name(),
                self.s.pg.number,
                self.s.me
            ));
        } else {
            down.push("postgres".to_owned());
        }
        if self.s.pgbouncer {
            let pgbouncer = self.pgbouncer();
            if pgbouncer.pid().is_some() {
                self.s.pgbouncer_port.number =
                    pgbouncer.port().unwrap_or(self.s.pgbouncer_port.number);
            } else {
                down.push("pgbouncer".to_owned());
            }
        }
        down.extend(self.find_running_redis());
        down
    }

    /// `seed`: the demo templates into the running stack's database, with the service binary
    /// (SERVICE_BIN, or a fresh release build), for those who run the service themselves.
    pub(super) fn seed(&mut self) -> Result<ExitCode, Failure> {
        let down = self.find_running();
        if down
            .iter()
            .any(|server| server == "postgres" || server == "pgbouncer")
        {
            return Err(Failure::new(
                format!("not running: {}.", down.join(" ")),
                [format!("start the stack first: {} start", self.s.me)],
            ));
        }
        let binary = self.service_binary()?;
        self.seed_demo(Command::new(binary))?;
        Ok(ExitCode::SUCCESS)
    }

    /// Runs `service seed-demo` (`service`: the binary, or `cargo run ... --`) against the stack:
    /// the schema prepared as the service's start-up does, then the demo templates into an empty
    /// `templates` table only (so running it again changes nothing). The service no longer
    /// finds them in its migrations.
    pub(super) fn seed_demo(&self, mut service: Command) -> Result<(), Failure> {
        say("demo data: singleflight seed-demo (the schema as at start-up, then the demo templates if the templates table is empty)");
        let seeded = service
            .arg("seed-demo")
            .current_dir(&self.s.root)
            .envs(self.service_env())
            .stdin(Stdio::null())
            .status()
            .is_ok_and(|status| status.success());
        if !seeded {
            return Err(Failure::new(
                "singleflight seed-demo failed (output above).",
                [format!(
                    "fix the cause, then run '{}' again (or '{} seed' alone).",
                    self.s.again(),
                    self.s.me
                )],
            ));
        }
        Ok(())
    }

    /// `up`: the servers, then the service in the foreground (`cargo run --release`), which
    /// replaces this process; with a fleet, [`Stack::up_fleet`].
    pub(super) fn up(&mut self) -> Result<ExitCode, Failure> {
        if self.s.fleet() {
            return self.up_fleet();
        }
        // The service's own default is 0.0.0.0:8080.
        let addr = self
            .s
            .http_addr
            .clone()
            .unwrap_or_else(|| "0.0.0.0:8080".to_owned());
        let (http_host, http_port) = match addr.rsplit_once(':') {
            Some((host, port)) => (host.to_owned(), port.to_owned()),
            None => (addr.clone(), addr.clone()),
        };
        let numeric = !http_port.is_empty() && http_port.bytes().all(|b| b.is_ascii_digit());
        if let Some(port) = http_port.parse::<u16>().ok().filter(|p| numeric && *p != 0) {
            if process::port_open(port) {
                return Err(Failure::new(
                    format!("port {port} (for the service's HTTP server) is already in use."),
                    [
                        port_holder(port).into_iter().next().unwrap_or_default(),
                        format!(
                            "stop whatever holds it (an earlier 'stack.sh up'?), or choose another address, e.g.: HTTP_ADDR=0.0.0.0:{} {} up",
                            u32::from(port) + 1,
                            self.s.me
                        ),
                    ],
                ));
            }
        }
        self.start_stack()?;
        let (shown_host, curl_host) = match http_host.as_str() {
            "0.0.0.0" | "[::]" | "" | "127.0.0.1" | "localhost" => ("127.0.0.1", "localhost"),
            other => (other, other),
        };
        let me = &self.s.me;
        self.say_where_servers_are(&self.service_target()?);
        say(&format!(
            "service   http://{shown_host}:{http_port}   (HTTP_ADDR={}, RUST_LOG={})",
            self.s
                .http_addr
                .as_deref()
                .unwrap_or("<service default 0.0.0.0:8080>"),
            self.rust_log()
        ));
        say(&format!(
            "try:      curl 'http://{curl_host}:{http_port}/template-details?id=1'"
        ));
        let cargo_run = || {
            let mut command = Command::new("cargo");
            command.args(["run", "--release", "--bin", "singleflight"]);
            command
        };
        let mut seed = cargo_run();
        seed.arg("--");
        self.seed_demo(seed)?;
        say(&format!("building and running the service (cargo run --release); Ctrl-C stops it; PostgreSQL, Redis and Prometheus keep running ('{me} stop' stops them)"));
        let error = cargo_run()
            .current_dir(&self.s.root)
            .envs(self.service_env())
            .exec();
        Err(Failure::new(format!("cannot run cargo: {error}"), []))
    }
}
