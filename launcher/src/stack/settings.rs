//! What `stack.sh` reads from its environment, checked before anything starts, and where its state
//! lives (the `.stack/` layout).
//!
//! A variable set to the empty string counts as unset for its value (the default applies), but a
//! port variable that is set at all counts as *chosen*: a stack already running on another port is
//! then reported instead of adopted.

use std::env;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Component, Path, PathBuf};

use super::Failure;

/// The database the service uses.
pub const DB_NAME: &str = "singleflight";

/// Most replicas a fleet may have.
const MAX_REPLICAS: u16 = 16;

/// How the stack runs Redis (`REDIS_MODE`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RedisMode {
    /// One server on REDIS_PORT (the default).
    Single,
    /// Three masters of a Redis Cluster on REDIS_PORT, +1 and +2 (bus ports +10000).
    Cluster,
    /// A master on REDIS_PORT, its replica on +1, three sentinels on +2, +3 and +4.
    Sentinel,
}

impl RedisMode {
    /// Every mode, in the order `stop` and `status` go through them.
    pub const ALL: [RedisMode; 3] = [RedisMode::Single, RedisMode::Cluster, RedisMode::Sentinel];

    /// As `REDIS_MODE` spells it.
    pub fn name(self) -> &'static str {
        match self {
            RedisMode::Single => "single",
            RedisMode::Cluster => "cluster",
            RedisMode::Sentinel => "sentinel",
        }
    }

    /// How many ports from REDIS_PORT on it takes.
    pub fn ports(self) -> u16 {
        match self {
            RedisMode::Single => 1,
            RedisMode::Cluster => 3,
            RedisMode::Sentinel => 5,
        }
    }
}

/// A server's port, and whether the user chose it.
#[derive(Clone, Copy, Debug)]
pub struct Port {
    pub number: u16,
    /// The variable was set (even to the empty string).
    pub chosen: bool,
}

/// Everything the commands need to know before they run.
pub struct Settings {
    /// How the user called us (`$0` of the script), for the messages.
    pub me: String,
    /// The command as given (`up` when none).
    pub command: String,
    /// The repository: where `prometheus.yaml` is and where cargo builds the service.
    pub root: PathBuf,
    pub layout: Layout,
    pub pg: Port,
    /// REDIS_PORT: the single Redis's, or the first of a topology's (see [`RedisMode`]).
    pub redis: Port,
    pub redis_mode: RedisMode,
    /// `REDIS_MODE` was set (to anything but the empty string): `env` then reports that mode,
    /// not whichever runs.
    pub redis_mode_chosen: bool,
    pub prom: Port,
    /// `POOLER=pgbouncer`: PgBouncer in transaction mode in front of PostgreSQL, and the service's
    /// `DATABASE_URL` through it.
    pub pgbouncer: bool,
    /// `PGBOUNCER_PORT`, used with [`Settings::pgbouncer`].
    pub pgbouncer_port: Port,
    /// 1: the service alone; more: a fleet behind HAProxy.
    pub replicas: u16,
    pub lb_port: u16,
    pub replica_base_port: u16,
    /// `HTTP_ADDR`, if set and not empty.
    pub http_addr: Option<String>,
    /// `RUST_LOG`, if set and not empty.
    pub rust_log: Option<String>,
    /// `SERVICE_BIN`, if set and not empty.
    pub service_bin: Option<String>,
}

/// A variable's value, with the empty string as unset.
fn var(name: &str) -> Option<String> {
    env::var_os(name)
        .map(|v| v.to_string_lossy().into_owned())
        .filter(|v| !v.is_empty())
}

impl Settings {
    /// Reads and checks the environment for `command`, called as `me`.
    pub fn from_env(me: String, command: String) -> Result<Settings, Failure> {
        let root = repository_root(&me);
        let mut stack = var("STACK_DIR").unwrap_or_else(|| format!("{}/.stack", root.display()));
        if !stack.starts_with('/') {
            stack = format!("{}/{stack}", logical_cwd().display());
        }
        let mut settings = Settings {
            layout: Layout::new(stack, &root),
            root,
            pg: Port::default_for("PG_PORT"),
            redis: Port::default_for("REDIS_PORT"),
            redis_mode: RedisMode::Single,
            redis_mode_chosen: var("REDIS_MODE").is_some(),
            prom: Port::default_for("PROM_PORT"),
            pgbouncer: false,
            pgbouncer_port: Port::default_for("PGBOUNCER_PORT"),
            replicas: 1,
            lb_port: 8080,
            replica_base_port: 8081,
            http_addr: var("HTTP_ADDR"),
            rust_log: var("RUST_LOG"),
            service_bin: var("SERVICE_BIN"),
            me,
            command,
        };
        settings.check_stack_dir()?;
        settings.pg.number = settings.port_value("PG_PORT")?;
        settings.redis.number = settings.port_value("REDIS_PORT")?;
        settings.prom.number = settings.port_value("PROM_PORT")?;
        let (pg, redis, prom) = (
            settings.pg.number,
            settings.redis.number,
            settings.prom.number,
        );
        if pg == redis || pg == prom || redis == prom {
            return Err(Failure::new(
                format!("PG_PORT={pg}, REDIS_PORT={redis} and PROM_PORT={prom} must be three different ports."),
                [format!("e.g. PG_PORT=5433 REDIS_PORT=6380 PROM_PORT=9091 {} {}", settings.me, settings.command)],
            ));
        }
        settings.check_pooler()?;
        settings.check_fleet()?;
        settings.check_redis_mode()?;
        Ok(settings)
    }

    /// With REPLICAS > 1: a fleet of replicas behind HAProxy.
    pub fn fleet(&self) -> bool {
        self.replicas > 1
    }

    /// Replica `i`'s port (from 1).
    pub fn replica_port(&self, i: u16) -> u16 {
        self.replica_base_port + i - 1
    }

    /// "`<me> <command>`": how to run the same again, for the messages.
    pub fn again(&self) -> String {
        format!("{} {}", self.me, self.command)
    }

    /// STACK_DIR may not contain quotes or line breaks: the paths under it go unquoted into the
    /// shell lines the messages suggest (`rm -rf <dir>`), and PostgreSQL's option strings (the
    /// `-k` socket directory recorded in `postmaster.opts`) cannot carry them.
    fn check_stack_dir(&self) -> Result<(), Failure> {
        let stack = &self.layout.stack;
        if stack.contains(['\'', '"', '\n']) {
            return Err(Failure::new(
                format!("STACK_DIR={stack} contains a quote or a line break, which PostgreSQL's options cannot carry."),
                [format!("use a plain path, e.g. STACK_DIR=/tmp/singleflight-stack {}", self.again())],
            ));
        }
        Ok(())
    }

    /// The value of port variable `name` (its default if unset or empty), checked.
    fn port_value(&self, name: &str) -> Result<u16, Failure> {
        let value = var(name).unwrap_or_else(|| default_port(name).to_string());
        let number = (1..=5).contains(&value.len()) && value.bytes().all(|b| b.is_ascii_digit());
        match value.parse::<u16>() {
            Ok(port) if number && port >= 1 => Ok(port),
            _ => {
                let example = match name {
                    "PG_PORT" => 5433,
                    "PGBOUNCER_PORT" => 6433,
                    "PROM_PORT" => 9091,
                    "LB_PORT" => 8090,
                    "REPLICA_BASE_PORT" => 8091,
                    _ => 6380,
                };
                Err(Failure::new(
                    format!("{name}={value} is not a valid TCP port."),
                    [format!(
                        "use a number between 1 and 65535, e.g. {name}={example} {}",
                        self.again()
                    )],
                ))
            }
        }
    }

    /// POOLER, and with `POOLER=pgbouncer` PGBOUNCER_PORT: valid, and clear of the other servers'.
    fn check_pooler(&mut self) -> Result<(), Failure> {
        self.pgbouncer = match var("POOLER").as_deref() {
            None | Some("none") => false,
            Some("pgbouncer") => true,
            Some(other) => {
                return Err(Failure::new(
                    format!("POOLER={other} is not a pooler this script runs."),
                    [format!(
                        "use POOLER=pgbouncer (PgBouncer in transaction mode), or leave it unset: POOLER=pgbouncer {}",
                        self.again()
                    )],
                ))
            }
        };
        if !self.pgbouncer {
            // Not used to start anything; `stop` and `status` still name it for a PgBouncer an
            // earlier run left.
            self.pgbouncer_port.number = var("PGBOUNCER_PORT")
                .and_then(|v| v.parse().ok())
                .unwrap_or(self.pgbouncer_port.number);
            return Ok(());
        }
        self.pgbouncer_port.number = self.port_value("PGBOUNCER_PORT")?;
        let port = self.pgbouncer_port.number;
        let others = [
            ("PG_PORT", self.pg.number),
            ("REDIS_PORT", self.redis.number),
            ("PROM_PORT", self.prom.number),
        ];
        if let Some((name, _)) = others.iter().find(|(_, other)| *other == port) {
            return Err(Failure::new(
                format!("PGBOUNCER_PORT and {name} are both {port}."),
                [format!(
                    "give PgBouncer another port, e.g. PGBOUNCER_PORT=6432 {}",
                    self.again()
                )],
            ));
        }
        Ok(())
    }

    /// REDIS_MODE, and with a cluster or sentinels the run of ports from REDIS_PORT (and the
    /// cluster's bus ports): within range, and clear of the other servers' ports.
    fn check_redis_mode(&mut self) -> Result<(), Failure> {
        self.redis_mode = match var("REDIS_MODE").as_deref() {
            None | Some("single") => RedisMode::Single,
            Some("cluster") => RedisMode::Cluster,
            Some("sentinel") => RedisMode::Sentinel,
            Some(other) => {
                return Err(Failure::new(
                    format!("REDIS_MODE={other} is not a way this script runs Redis."),
                    [format!(
                        "use single (the default: one server), cluster (three masters of a Redis Cluster) or sentinel (a master, a replica and three sentinels), e.g. REDIS_MODE=cluster {}",
                        self.again()
                    )],
                ))
            }
        };
        let mode = self.redis_mode;
        if mode == RedisMode::Single {
            return Ok(());
        }
        let first = u32::from(self.redis.number);
        let mut last = first + u32::from(mode.ports()) - 1;
        if mode == RedisMode::Cluster {
            // The bus ports, Redis's default: each node's port + 10000.
            last += 10_000;
        }
        if last > 65535 {
            return Err(Failure::new(
                format!(
                    "REDIS_PORT={first} leaves no room for REDIS_MODE={} (ports up to {last}).",
                    mode.name()
                ),
                [format!(
                    "use a lower one, e.g. REDIS_PORT=6379 {}",
                    self.again()
                )],
            ));
        }
        let cluster = mode == RedisMode::Cluster;
        let span = first..first + u32::from(mode.ports());
        let bus = if cluster {
            format!(
                " and the cluster bus ports {}-{}",
                first + 10_000,
                span.end + 9_999
            )
        } else {
            String::new()
        };
        // The first port after all of Redis's, for the suggestion.
        let after = if cluster { span.end + 10_000 } else { span.end };
        // Each other server's variable, and the ports it stands for.
        let one = |port: u16| u32::from(port)..u32::from(port) + 1;
        let mut others = vec![
            ("PG_PORT", one(self.pg.number)),
            ("PROM_PORT", one(self.prom.number)),
        ];
        if self.pgbouncer {
            others.push(("PGBOUNCER_PORT", one(self.pgbouncer_port.number)));
        }
        if self.fleet() {
            others.push(("LB_PORT", one(self.lb_port)));
            let base = u32::from(self.replica_base_port);
            others.push(("REPLICA_BASE_PORT", base..base + u32::from(self.replicas)));
        }
        let taken = |port: &u32| {
            span.contains(port) || (cluster && span.contains(&port.saturating_sub(10_000)))
        };
        for (name, ports) in others {
            if ports.clone().any(|port| taken(&port)) {
                let shown = if ports.len() == 1 {
                    format!("{name}={}", ports.start)
                } else {
                    format!(
                        "{name}={} ({}-{} with REPLICAS={})",
                        ports.start,
                        ports.start,
                        ports.end - 1,
                        ports.len()
                    )
                };
                return Err(Failure::new(
                    format!(
                        "{shown} takes one of Redis's ports with REDIS_MODE={}: {first}-{}{bus}.",
                        mode.name(),
                        span.end - 1,
                    ),
                    [format!(
                        "move REDIS_PORT or {name}, e.g. {name}={after} {}",
                        self.again()
                    )],
                ));
            }
        }
        Ok(())
    }

    /// REPLICAS, and with REPLICAS > 1 the fleet's ports: valid, and clear of the other servers'.
    fn check_fleet(&mut self) -> Result<(), Failure> {
        let replicas = var("REPLICAS").unwrap_or_else(|| "1".to_owned());
        let valid =
            (1..=2).contains(&replicas.len()) && replicas.bytes().all(|b| b.is_ascii_digit());
        self.replicas = match replicas.parse::<u16>() {
            Ok(n) if valid && (1..=MAX_REPLICAS).contains(&n) => n,
            _ => {
                return Err(Failure::new(
                    format!(
                    "REPLICAS={replicas} is not a number of replicas between 1 and {MAX_REPLICAS}."
                ),
                    [format!(
                        "e.g. REPLICAS=3 {} (or leave it unset for the service alone)",
                        self.again()
                    )],
                ))
            }
        };
        if !self.fleet() {
            // Not used to start anything; `stop` and `status` still name them for a fleet an
            // earlier run left.
            self.lb_port = var("LB_PORT").and_then(|v| v.parse().ok()).unwrap_or(8080);
            self.replica_base_port = var("REPLICA_BASE_PORT")
                .and_then(|v| v.parse().ok())
                .unwrap_or(8081);
            return Ok(());
        }
        self.lb_port = self.port_value("LB_PORT")?;
        self.replica_base_port = self.port_value("REPLICA_BASE_PORT")?;
        let (base, n) = (u32::from(self.replica_base_port), u32::from(self.replicas));
        let last = base + n - 1;
        if last > 65535 {
            return Err(Failure::new(
                format!("REPLICA_BASE_PORT={base} leaves no room for {n} replicas (ports up to {last})."),
                [format!("use a lower one, e.g. REPLICA_BASE_PORT=8081 {}", self.again())],
            ));
        }
        let mut others = vec![
            ("LB_PORT", self.lb_port),
            ("PG_PORT", self.pg.number),
            ("REDIS_PORT", self.redis.number),
            ("PROM_PORT", self.prom.number),
        ];
        if self.pgbouncer {
            others.push(("PGBOUNCER_PORT", self.pgbouncer_port.number));
        }
        for (name, port) in others {
            if (base..=last).contains(&u32::from(port)) {
                return Err(Failure::new(
                    format!("{name}={port} is one of the replicas' ports ({base}-{last}: REPLICA_BASE_PORT={base} and REPLICAS={n})."),
                    [format!("move one of them, e.g. REPLICA_BASE_PORT={} {}", last + 1, self.again())],
                ));
            }
            if name != "LB_PORT" && port == self.lb_port {
                return Err(Failure::new(
                    format!("LB_PORT and {name} are both {port}."),
                    [format!(
                        "give HAProxy another port, e.g. LB_PORT=8080 {}",
                        self.again()
                    )],
                ));
            }
        }
        if let Some(addr) = &self.http_addr {
            if self.command == "up" || self.command == "start" {
                super::warn(&format!(
                    "note: HTTP_ADDR={addr} is not used with REPLICAS={n}: replica i listens on 127.0.0.1:REPLICA_BASE_PORT+i-1, HAProxy on :{}",
                    self.lb_port
                ));
            }
        }
        Ok(())
    }
}

impl Port {
    /// Port variable `name` before its value is checked: chosen if set at all.
    fn default_for(name: &str) -> Port {
        Port {
            number: default_port(name),
            chosen: env::var_os(name).is_some(),
        }
    }
}

/// The default of each port variable.
fn default_port(name: &str) -> u16 {
    match name {
        "PG_PORT" => 5432,
        "REDIS_PORT" => 6379,
        "PROM_PORT" => 9090,
        "LB_PORT" => 8080,
        "PGBOUNCER_PORT" => 6432,
        _ => 8081,
    }
}

/// The repository root: the parent of the directory the script is in (`me` is the script's path
/// as it was run), as the script's own `cd "$(dirname "$0")/.." && pwd -P` found it.
fn repository_root(me: &str) -> PathBuf {
    let script_dir = Path::new(me)
        .parent()
        .filter(|dir| !dir.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let mut root = PathBuf::new();
    // `cd` resolves `..` in the path as written before it looks at the file system.
    for component in logical_cwd().join(script_dir).join("..").components() {
        match component {
            Component::ParentDir => {
                root.pop();
            }
            Component::CurDir => {}
            other => root.push(other),
        }
    }
    fs::canonicalize(&root).unwrap_or(root)
}

/// The working directory as the shell names it (`$PWD`, which keeps the symbolic links the user
/// went through), if it is really where we are; else the physical one.
fn logical_cwd() -> PathBuf {
    let physical = env::current_dir().unwrap_or_else(|_| PathBuf::from("/"));
    let same = |a: &Path, b: &Path| match (fs::metadata(a), fs::metadata(b)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    };
    match env::var_os("PWD").map(PathBuf::from) {
        Some(pwd) if pwd.is_absolute() && same(&pwd, &physical) => pwd,
        _ => physical,
    }
}

/// Where everything lives under STACK_DIR, as the messages name it (the paths are written as the
/// user gave STACK_DIR, not normalized).
pub struct Layout {
    pub stack: String,
    pub pg_dir: String,
    pub pg_data: String,
    pub pg_log: String,
    /// The Unix socket's directory.
    pub pg_sock: String,
    pub redis_dir: String,
    pub redis_log: String,
    pub redis_pid: String,
    pub redis_port: String,
    /// REDIS_MODE=cluster: the nodes' files (`node-<i>.*`) and their `nodes-<port>.conf`.
    pub redis_cluster_dir: String,
    /// REDIS_MODE=sentinel: the data nodes' files (`node-<i>.*`), the sentinels'
    /// (`sentinel-<i>.*`) and their `sentinel-<port>.conf`.
    pub redis_sentinel_dir: String,
    pub prom_dir: String,
    pub prom_data: String,
    pub prom_log: String,
    pub prom_pid: String,
    pub prom_port: String,
    pub prom_config: String,
    /// The targets the running Prometheus scrapes, for `status`.
    pub prom_target: String,
    /// The project's `prometheus.yaml` (in the repository, not under STACK_DIR).
    pub prom_source: String,
    pub app_dir: String,
    pub lb_dir: String,
    pub lb_config: String,
    pub lb_log: String,
    pub lb_pid: String,
    pub lb_port: String,
    pub pgbouncer_dir: String,
    pub pgbouncer_config: String,
    /// The users PgBouncer lets in (`postgres`, trusted).
    pub pgbouncer_auth: String,
    pub pgbouncer_log: String,
    pub pgbouncer_pid: String,
    pub pgbouncer_port: String,
}

impl Layout {
    fn new(stack: String, root: &Path) -> Layout {
        let at = |path: &str| format!("{stack}/{path}");
        Layout {
            pg_dir: at("pg"),
            pg_data: at("pg/data"),
            pg_log: at("pg/postgres.log"),
            pg_sock: at("pg/run"),
            redis_dir: at("redis"),
            redis_log: at("redis/redis.log"),
            redis_pid: at("redis/redis.pid"),
            redis_port: at("redis/redis.port"),
            redis_cluster_dir: at("redis-cluster"),
            redis_sentinel_dir: at("redis-sentinel"),
            prom_dir: at("prometheus"),
            prom_data: at("prometheus/data"),
            prom_log: at("prometheus/prometheus.log"),
            prom_pid: at("prometheus/prometheus.pid"),
            prom_port: at("prometheus/prometheus.port"),
            prom_config: at("prometheus/prometheus.yaml"),
            prom_target: at("prometheus/prometheus.target"),
            prom_source: format!("{}/prometheus.yaml", root.display()),
            app_dir: at("app"),
            lb_dir: at("haproxy"),
            lb_config: at("haproxy/haproxy.cfg"),
            lb_log: at("haproxy/haproxy.log"),
            lb_pid: at("haproxy/haproxy.pid"),
            lb_port: at("haproxy/haproxy.port"),
            pgbouncer_dir: at("pgbouncer"),
            pgbouncer_config: at("pgbouncer/pgbouncer.ini"),
            pgbouncer_auth: at("pgbouncer/userlist.txt"),
            pgbouncer_log: at("pgbouncer/pgbouncer.log"),
            pgbouncer_pid: at("pgbouncer/pgbouncer.pid"),
            pgbouncer_port: at("pgbouncer/pgbouncer.port"),
            stack,
        }
    }

    /// Replica `i`'s file with extension `ext` (`log`, `pid`, `port`).
    pub fn replica(&self, i: u16, ext: &str) -> String {
        format!("{}/replica-{i}.{ext}", self.app_dir)
    }
}
