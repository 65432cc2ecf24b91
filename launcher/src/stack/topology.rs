//! With `REDIS_MODE=cluster` or `REDIS_MODE=sentinel`: Redis as production runs it, instead of the
//! single server, from the same `redis-server` (see [`crate::redis_cluster`] and
//! [`crate::redis_sentinel`] for what each is and how it becomes ready).
//!
//! - cluster: three masters on REDIS_PORT, +1 and +2 (cluster bus ports +10000, Redis's default),
//!   files in `redis-cluster/` (`node-<i>.{log,pid,port}`, `nodes-<port>.conf`). The service gets
//!   `REDIS_URL=redis://127.0.0.1:a,redis://127.0.0.1:b,redis://127.0.0.1:c`.
//! - sentinel: a master on REDIS_PORT, its replica on +1, three sentinels on +2, +3 and +4
//!   monitoring the master as [`SENTINEL_MASTER`], files in `redis-sentinel/` (`node-<i>.*`,
//!   `sentinel-<i>.*`, `sentinel-<port>.conf`). The service gets `REDIS_SENTINELS` and
//!   `REDIS_SENTINEL_MASTER`, and no `REDIS_URL`: after a failover the first master is not the
//!   master any more, and only the sentinels know which is.
//!
//! Each member is a daemon of its own (a pid file, a port file, a log), found again and reused
//! like the single Redis. When none of a topology runs, `start` makes it anew (the cluster's and
//! the sentinels' state files are deleted first: the data is a cache). When only some run (a node
//! was killed to watch a failover), the missing ones are started again: a cluster node rejoins
//! with its `nodes-<port>.conf` (its slots, not its keys), a sentinel with the file it rewrote,
//! a data node as a replica of the master the sentinels name. `stop` and `status` cover whatever
//! was started, whatever REDIS_MODE says now; the other commands use the mode that runs unless
//! REDIS_MODE is set (and `start` in another mode than the one that runs refuses).

use std::fs;
use std::path::Path;
use std::time::Duration;

use super::daemons::Daemon;
use super::servers::{make_dir, shut_down_redis};
use super::settings::RedisMode;
use super::{say, Failure, Stack};
use crate::process;
use crate::redis::{self, Redis};
use crate::redis_cluster::{self, Node as ClusterNode};
use crate::redis_sentinel::{self, Node as DataNode, Sentinel};
use crate::Server;

/// The name the sentinels monitor the master under (`REDIS_SENTINEL_MASTER`).
pub const SENTINEL_MASTER: &str = "singleflight";

/// How long a topology may take to be ready once its members answer: about 2 s (Redis's own
/// delays), far more allowed for a loaded machine.
const READY_LIMIT: Duration = Duration::from_secs(30);

/// What a member of a topology is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Role {
    /// A data node: a cluster master, or the sentinel set's master or replica.
    Node,
    Sentinel,
}

/// One server of a topology: its role, its number among those of its role (from 1), and its
/// port's distance from REDIS_PORT.
#[derive(Clone, Copy, Debug)]
struct Member {
    role: Role,
    index: u16,
    offset: u16,
}

impl Member {
    /// Its files' name (`node-2`, `sentinel-1`); `redis-<that>` in the messages.
    fn file(self) -> String {
        match self.role {
            Role::Node => format!("node-{}", self.index),
            Role::Sentinel => format!("sentinel-{}", self.index),
        }
    }
}

/// The members of `mode`, data nodes first (the order they start in).
fn members(mode: RedisMode) -> Vec<Member> {
    let (nodes, sentinels) = match mode {
        RedisMode::Single => (0, 0),
        RedisMode::Cluster => (3, 0),
        RedisMode::Sentinel => (2, 3),
    };
    let node = |index| Member {
        role: Role::Node,
        index,
        offset: index - 1,
    };
    let sentinel = |index| Member {
        role: Role::Sentinel,
        index,
        offset: nodes + index - 1,
    };
    (1..=nodes)
        .map(node)
        .chain((1..=sentinels).map(sentinel))
        .collect()
}

/// A member as this stack finds it: its daemon, and its port (its port file's if it was
/// started, else REDIS_PORT + its offset).
struct Found {
    member: Member,
    daemon: Daemon,
    port: u16,
}

impl Stack {
    /// Where `mode`'s files are.
    fn topology_dir(&self, mode: RedisMode) -> &str {
        match mode {
            RedisMode::Sentinel => &self.s.layout.redis_sentinel_dir,
            _ => &self.s.layout.redis_cluster_dir,
        }
    }

    /// Every member of `mode`, data nodes first.
    fn topology(&self, mode: RedisMode) -> Vec<Found> {
        members(mode)
            .into_iter()
            .map(|member| {
                let daemon = self.topology_daemon(self.topology_dir(mode), &member.file());
                let port = daemon
                    .port()
                    .unwrap_or_else(|| self.s.redis.number.saturating_add(member.offset));
                Found {
                    member,
                    daemon,
                    port,
                }
            })
            .collect()
    }

    /// The ports of `mode`'s members of `role`.
    fn topology_ports(&self, mode: RedisMode, role: Role) -> Vec<u16> {
        self.topology(mode)
            .into_iter()
            .filter(|found| found.member.role == role)
            .map(|found| found.port)
            .collect()
    }

    /// True if a member of `mode` was started here (a pid file exists), whatever REDIS_MODE says.
    pub(super) fn topology_started(&self, mode: RedisMode) -> bool {
        self.topology(mode)
            .iter()
            .any(|found| Path::new(&found.daemon.pid_file).exists())
    }

    /// True if a Redis server of `mode` runs here (for a topology: any member).
    fn redis_runs(&self, mode: RedisMode) -> bool {
        match mode {
            RedisMode::Single => self.redis().pid().is_some(),
            _ => self
                .topology(mode)
                .iter()
                .any(|found| found.daemon.pid().is_some()),
        }
    }

    /// REDIS_PORT of the members of `mode` that run: the first running member's port, less its
    /// offset.
    fn running_base(&self, mode: RedisMode) -> Option<u16> {
        self.topology(mode).into_iter().find_map(|found| {
            found.daemon.pid()?;
            found.port.checked_sub(found.member.offset)
        })
    }

    /// Takes the mode of the Redis of this stack that runs, unless REDIS_MODE was set: like a
    /// port nobody chose, the mode nobody chose is the one that runs.
    pub(super) fn adopt_redis_mode(&mut self) {
        if self.s.redis_mode_chosen {
            return;
        }
        if let Some(mode) = RedisMode::ALL.into_iter().find(|m| self.redis_runs(*m)) {
            self.s.redis_mode = mode;
        }
    }

    /// For `env`, `seed`, `status` and `restart`: the Redis of this stack that runs, in its mode
    /// unless REDIS_MODE was set, and on its REDIS_PORT. The names of the servers of that mode
    /// that do not run (`redis`, `redis-node-2`, ...).
    pub(super) fn find_running_redis(&mut self) -> Vec<String> {
        self.adopt_redis_mode();
        let mode = self.s.redis_mode;
        if mode == RedisMode::Single {
            let redis = self.redis();
            if redis.pid().is_some() {
                self.s.redis.number = redis.port().unwrap_or(self.s.redis.number);
                return Vec::new();
            }
            return vec!["redis".to_owned()];
        }
        if let Some(base) = self.running_base(mode) {
            self.s.redis.number = base;
        }
        self.topology(mode)
            .into_iter()
            .filter(|found| found.daemon.pid().is_none())
            .map(|found| found.daemon.name)
            .collect()
    }

    /// The service's Redis settings for REDIS_MODE: `REDIS_URL`, or the sentinels and the name
    /// they know the master by.
    pub(super) fn redis_env(&self) -> Vec<(String, String)> {
        let list = |ports: Vec<u16>, scheme: &str| {
            let addrs: Vec<String> = ports
                .iter()
                .map(|port| format!("{scheme}127.0.0.1:{port}"))
                .collect();
            addrs.join(",")
        };
        match self.s.redis_mode {
            RedisMode::Single => vec![(
                "REDIS_URL".into(),
                format!("redis://127.0.0.1:{}/", self.s.redis.number),
            )],
            RedisMode::Cluster => vec![(
                "REDIS_URL".into(),
                list(
                    self.topology_ports(RedisMode::Cluster, Role::Node),
                    "redis://",
                ),
            )],
            RedisMode::Sentinel => vec![
                (
                    "REDIS_SENTINELS".into(),
                    list(self.topology_ports(RedisMode::Sentinel, Role::Sentinel), ""),
                ),
                ("REDIS_SENTINEL_MASTER".into(), SENTINEL_MASTER.into()),
            ],
        }
    }

    /// Where Redis is, in one line for `up` and `start` (after `redis     `).
    pub(super) fn redis_where(&self) -> String {
        let ports = |role| self.topology_ports(self.s.redis_mode, role);
        let span = |ports: Vec<u16>| match (ports.first(), ports.last()) {
            (Some(first), Some(last)) => format!("127.0.0.1:{first}-{last}"),
            _ => String::new(),
        };
        match self.s.redis_mode {
            RedisMode::Single => format!("127.0.0.1:{}", self.s.redis.number),
            RedisMode::Cluster => format!(
                "cluster of 3 masters {} (bus ports +10000)",
                span(ports(Role::Node))
            ),
            RedisMode::Sentinel => {
                // As the data nodes say now: a failover may have swapped them.
                let nodes = ports(Role::Node);
                let (masters, replicas): (Vec<u16>, Vec<u16>) = nodes
                    .iter()
                    .partition(|port| redis::role(**port).as_deref() == Ok("master"));
                let shown = |ports: Vec<u16>| match ports.as_slice() {
                    [port] => format!("127.0.0.1:{port}"),
                    _ => format!("{ports:?}"),
                };
                format!(
                    "master {}, replica {}, sentinels {} (master name '{SENTINEL_MASTER}')",
                    shown(masters),
                    shown(replicas),
                    span(ports(Role::Sentinel))
                )
            }
        }
    }

    /// Fails before anything starts if a Redis of this project runs in another mode than
    /// REDIS_MODE, or a port of REDIS_MODE's is held by something that is not ours.
    pub(super) fn redis_preflight(&self) -> Result<(), Failure> {
        let mode = self.s.redis_mode;
        if let Some(other) = RedisMode::ALL
            .into_iter()
            .find(|m| *m != mode && self.redis_runs(*m))
        {
            let (me, again) = (&self.s.me, self.s.again());
            return Err(Failure::new(
                format!(
                    "this project's Redis runs with REDIS_MODE={}, not {}.",
                    other.name(),
                    mode.name()
                ),
                [
                    format!("use it as is: REDIS_MODE={} {again}", other.name()),
                    format!(
                        "or replace it: {me} stop && REDIS_MODE={} {again}",
                        mode.name()
                    ),
                ],
            ));
        }
        if mode == RedisMode::Single {
            let redis = self.s.redis.number;
            if self.redis().pid().is_none() && process::port_open(redis) {
                return Err(self.port_taken("redis", redis, "REDIS_PORT"));
            }
            return Ok(());
        }
        if self.running_base(mode).is_some() {
            // Its ports are those it runs on, checked as its members start.
            return Ok(());
        }
        for found in self.topology(mode) {
            self.member_port_free(mode, &found)?;
        }
        Ok(())
    }

    /// Fails if a port `found` is to start on (a cluster node's bus port too) is held.
    fn member_port_free(&self, mode: RedisMode, found: &Found) -> Result<(), Failure> {
        let name = &found.daemon.name;
        if process::port_open(found.port) {
            return Err(self.port_taken(name, found.port, "REDIS_PORT"));
        }
        let bus = found.port.saturating_add(10_000);
        if mode == RedisMode::Cluster && process::port_open(bus) {
            let what = format!("{name} (cluster bus)");
            let instead = u32::from(found.port) + 1;
            return Err(self.port_taken_suggesting(&what, bus, "REDIS_PORT", instead));
        }
        Ok(())
    }

    /// Starts REDIS_MODE's topology (or reuses it, starting the members that are missing), and
    /// waits until it is ready: the cluster ok, or the sentinels ready to fail over.
    pub(super) fn topology_start(&mut self) -> Result<(), Failure> {
        let mode = self.s.redis_mode;
        if let Some(base) = self.running_base(mode) {
            let what = format!("redis {}", mode.name());
            self.s.redis = self.adopt(&what, "REDIS_PORT", self.s.redis, base)?;
        }
        let (me, again) = (self.s.me.clone(), self.s.again());
        let restart = format!("restart it: {me} stop && {again}");
        let found = self.topology(mode);
        let fresh = found.iter().all(|f| f.daemon.pid().is_none());
        self.make_stack_dir()?;
        let dir = self.topology_dir(mode).to_owned();
        make_dir(&dir)?;
        if fresh {
            clear_state(&dir);
        }
        let binary = redis::binary().unwrap_or_else(|| "redis-server".into());
        let base = self.s.redis.number;
        let redis_on = |port| Redis {
            binary: binary.clone(),
            port,
            dir: dir.clone().into(),
            databases: None,
            tls: None,
        };
        for f in &found {
            let name = &f.daemon.name;
            if let Some(pid) = f.daemon.pid() {
                say(&format!(
                    "{name}: already running (pid {pid}) on 127.0.0.1:{}, reusing it",
                    f.port
                ));
                continue;
            }
            self.member_port_free(mode, f)?;
            let server: Box<dyn Server> = match (mode, f.member.role) {
                (RedisMode::Cluster, _) => Box::new(ClusterNode {
                    redis: redis_on(f.port),
                    bus_port: None,
                }),
                (_, Role::Node) => {
                    let replica_of = if fresh {
                        (f.member.index > 1).then_some(base)
                    } else {
                        Some(self.sentinels_master(f.port, &restart)?)
                    };
                    Box::new(DataNode {
                        redis: redis_on(f.port),
                        replica_of,
                    })
                }
                (_, Role::Sentinel) => {
                    let sentinel = Sentinel {
                        binary: binary.clone(),
                        port: f.port,
                        dir: dir.clone().into(),
                    };
                    if fresh {
                        if f.member.index == 1 {
                            // A sentinel learns the replicas from the master's INFO, which it
                            // asks for at once and then every 10 s: link them first.
                            self.wait_linked(base + 1, base, &dir, &restart)?;
                        }
                        sentinel
                            .write_config("scripts/stack.sh", SENTINEL_MASTER, base)
                            .map_err(|e| Failure::new(e.to_string(), []))?;
                    } else if !sentinel.config_file().exists() {
                        return Err(Failure::new(
                            format!(
                                "{name} is not running and its configuration file {} is gone.",
                                sentinel.config_file().display()
                            ),
                            [restart.clone()],
                        ));
                    }
                    Box::new(sentinel)
                }
            };
            say(&format!(
                "{name}: starting on 127.0.0.1:{} (log: {})",
                f.port, f.daemon.log
            ));
            let not_ready = format!(
                "{name} did not answer PING on 127.0.0.1:{} within 10 s (log above, full log: {}).",
                f.port, f.daemon.log
            );
            f.daemon
                .launch(server.as_ref(), f.port, &self.s, not_ready)?;
        }
        match mode {
            RedisMode::Cluster => self.cluster_ready(fresh, &dir, &restart),
            _ => self.sentinels_ready(&dir, &restart),
        }
    }

    /// The master the running sentinels name, for a data node on `port` that starts again as its
    /// replica: a failure if none names one, or names that very node.
    fn sentinels_master(&self, port: u16, restart: &str) -> Result<u16, Failure> {
        let master = self
            .topology(RedisMode::Sentinel)
            .into_iter()
            .filter(|f| f.member.role == Role::Sentinel && f.daemon.pid().is_some())
            .find_map(|f| redis_sentinel::master_port(f.port, SENTINEL_MASTER).ok());
        match master {
            Some(master) if master != port => Ok(master),
            _ => Err(Failure::new(
                format!("redis-sentinel: no running sentinel names a master that runs, so the data node on 127.0.0.1:{port} cannot rejoin as its replica."),
                [restart.to_owned()],
            )),
        }
    }

    /// Waits until the new replica on `replica` follows the master on `master`.
    fn wait_linked(
        &self,
        replica: u16,
        master: u16,
        dir: &str,
        restart: &str,
    ) -> Result<(), Failure> {
        process::poll(READY_LIMIT, || redis_sentinel::check_linked(replica, master)).map_err(|last| {
            Failure::new(
                format!("the replica on 127.0.0.1:{replica} did not follow its master within {READY_LIMIT:?}: {last}."),
                [format!("see the logs in {dir}; {restart}")],
            )
        })
    }

    /// A new cluster formed, then (new or not) every node ok.
    fn cluster_ready(&self, fresh: bool, dir: &str, restart: &str) -> Result<(), Failure> {
        let ports = self.topology_ports(RedisMode::Cluster, Role::Node);
        let failed = |problem: String| {
            Failure::new(
                format!("the Redis cluster on {ports:?} is not ok: {problem}."),
                [format!("see the logs in {dir}; {restart}")],
            )
        };
        if fresh {
            let nodes: Vec<(u16, u16)> = ports.iter().map(|p| (*p, p + 10_000)).collect();
            say("redis cluster: forming (3 masters, 16384 slots in 3 ranges)");
            redis_cluster::form(&nodes).map_err(failed)?;
        }
        redis_cluster::wait_ok(&ports, READY_LIMIT).map_err(failed)?;
        say("redis cluster: ok, every node sees all 16384 slots served");
        Ok(())
    }

    /// The sentinels ready to fail over the master they name, whose replica is the other node.
    fn sentinels_ready(&self, dir: &str, restart: &str) -> Result<(), Failure> {
        let (nodes, sentinels) = (
            self.topology_ports(RedisMode::Sentinel, Role::Node),
            self.topology_ports(RedisMode::Sentinel, Role::Sentinel),
        );
        let failed = |problem: String| {
            Failure::new(
                format!("the Redis sentinels on {sentinels:?} are not ready: {problem}."),
                [format!("see the logs in {dir}; {restart}")],
            )
        };
        // Which node is the master is asked again on every look: on a busy machine the
        // sentinels may fail over once more while a member that was down comes back.
        let (master, replica) = process::poll(READY_LIMIT, || {
            let master = redis_sentinel::master_port(sentinels[0], SENTINEL_MASTER)?;
            let Some(&replica) = nodes.iter().find(|port| **port != master) else {
                return Err(format!(
                    "they name 127.0.0.1:{master}, which is not one of {nodes:?}"
                ));
            };
            redis_sentinel::check_ready(&sentinels, SENTINEL_MASTER, master, replica)?;
            Ok((master, replica))
        })
        .map_err(|last| {
            failed(format!(
                "the sentinels of {SENTINEL_MASTER:?} were not ready after {READY_LIMIT:?}: {last}"
            ))
        })?;
        say(&format!(
            "redis sentinels: ready, master 127.0.0.1:{master} (replica 127.0.0.1:{replica}) monitored as '{SENTINEL_MASTER}'"
        ));
        Ok(())
    }

    /// Stops every member of `mode` that runs: the sentinels first, so that they do not fail
    /// over while the data nodes stop.
    pub(super) fn topology_stop(&self, mode: RedisMode) -> Result<(), Failure> {
        let mut found = self.topology(mode);
        found.sort_by_key(|f| f.member.role != Role::Sentinel);
        for f in found {
            f.daemon.stop(|pid| shut_down_redis(f.port, pid))?;
        }
        Ok(())
    }

    /// `status`'s lines for `mode`'s topology: its state, then each member.
    pub(super) fn topology_status(&self, mode: RedisMode) {
        let found = self.topology(mode);
        let ports = |role| self.topology_ports(mode, role);
        let state = if found.iter().all(|f| f.daemon.pid().is_none()) {
            "not running".to_owned()
        } else {
            match mode {
                RedisMode::Cluster => match redis_cluster::check_ok(&ports(Role::Node)) {
                    Ok(()) => "ok, every node sees all 16384 slots served".to_owned(),
                    Err(problem) => format!("not ok: {problem}"),
                },
                _ => {
                    let sentinels = ports(Role::Sentinel);
                    let named = sentinels
                        .iter()
                        .find_map(|s| redis_sentinel::master_port(*s, SENTINEL_MASTER).ok());
                    match named {
                        Some(master) => format!(
                            "the sentinels name master 127.0.0.1:{master} ('{SENTINEL_MASTER}')"
                        ),
                        None => "no sentinel names a master".to_owned(),
                    }
                }
            }
        };
        println!("redis-{}: {state}", mode.name());
        println!("          data dir: {}", self.topology_dir(mode));
        for f in found {
            let name = &f.daemon.name;
            match f.daemon.pid() {
                Some(pid) => {
                    let role = match redis::role(f.port).as_deref() {
                        Ok("slave") => "replica".to_owned(),
                        Ok(role) => role.to_owned(),
                        Err(_) => "does not answer ROLE".to_owned(),
                    };
                    println!(
                        "{name}: running, pid {pid}, port {} (127.0.0.1), {role}",
                        f.port
                    );
                }
                None => println!("{name}: not running (port {} when started)", f.port),
            }
            println!("          log file: {}", f.daemon.log);
        }
    }
}

/// Deletes what a topology in `dir` remembers (the cluster's `nodes-*.conf`, the sentinels'
/// `sentinel-*.conf`, the pid and port files), so that it starts anew. Its logs stay.
fn clear_state(dir: &str) {
    for entry in fs::read_dir(dir).into_iter().flatten().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let state = name.ends_with(".conf") || name.ends_with(".pid") || name.ends_with(".port");
        if state {
            let _ = fs::remove_file(entry.path());
        }
    }
}
