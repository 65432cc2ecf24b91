//! Redis Cluster and Redis Sentinel for the integration tests: the topologies production runs,
//! from Debian's `redis-server`, so that the service's cluster and sentinel clients meet real
//! redirections, slot migrations and failovers. How each topology is run (the nodes' command
//! lines, forming the cluster, the sentinels' configuration, readiness) is the launcher's
//! (`launcher::redis_cluster`, `launcher::redis_sentinel`), which `scripts/stack.sh` runs them
//! with too; this module is the test policy.
//!
//! - [`redis_cluster`]: three masters sharing the 16384 slots, started on first use and shared by
//!   every test of the process, like [`crate::servers::servers`] (a cluster has only database 0,
//!   so tests keep apart by key prefix). [`RedisCluster::migrate_slot`] moves a slot and its keys
//!   as a resharding does; migrations are serialized, so tests running side by side never
//!   interleave the protocol.
//! - [`own_redis_sentinels`]: a master, its replica and three sentinels of the test's own (the
//!   test kills the master), stopped when dropped.
//!
//! Every server dies with the test process (`launcher::attached`), on free loopback ports
//! ([`crate::ports`]; the cluster bus ports too), its files under the process's directory.

use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use launcher::attached::{self, Attached};
use launcher::probe;
use launcher::process::{self, SIGKILL};
use launcher::redis::Redis;
use launcher::redis_cluster::{self, Node as ClusterNode};
use launcher::redis_sentinel::{self, Node as DataNode, Sentinel};
use launcher::Error;

use crate::ports::free_port;
use crate::servers::{explain, redis_binary, Started};

/// How many masters [`redis_cluster`] has.
pub const CLUSTER_MASTERS: usize = 3;

/// How long a new cluster or sentinel set may take to be ready: about 2 s on an idle machine
/// (Redis's own delays), far more allowed for a loaded one.
const READY_LIMIT: Duration = Duration::from_secs(30);

/// The master name the sentinels of [`own_redis_sentinels`] monitor.
pub const SENTINEL_MASTER: &str = "singleflight";

// ---------------------------------------------------------------------------
// Cluster
// ---------------------------------------------------------------------------

/// A Redis Cluster of [`CLUSTER_MASTERS`] masters on `127.0.0.1`, no replicas.
#[derive(Debug)]
pub struct RedisCluster {
    /// The masters' ports, in the order their slot ranges go (0-5460, 5461-10922, 10923-16383
    /// when the cluster starts).
    pub ports: Vec<u16>,
    /// Held during [`RedisCluster::migrate_slot`]: one migration at a time.
    migrating: Mutex<()>,
}

impl RedisCluster {
    /// `redis://127.0.0.1:p1`: one node only (the service must discover the rest).
    pub fn seed_url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.ports[0])
    }

    /// `redis://127.0.0.1:p1,redis://127.0.0.1:p2,redis://127.0.0.1:p3`: every master.
    pub fn urls(&self) -> String {
        let urls: Vec<String> = self
            .ports
            .iter()
            .map(|port| format!("redis://127.0.0.1:{port}"))
            .collect();
        urls.join(",")
    }

    /// The slot of `key` (`CLUSTER KEYSLOT`: hash tags count).
    ///
    /// # Panics
    ///
    /// If the first master does not answer.
    pub fn keyslot(&self, key: &str) -> u16 {
        redis_cluster::keyslot(self.ports[0], key).unwrap_or_else(|e| panic!("{e}"))
    }

    /// The port of the master serving `slot`, as the first master sees it (every master is told
    /// at the end of a migration).
    ///
    /// # Panics
    ///
    /// If the first master does not answer.
    pub fn slot_owner(&self, slot: u16) -> u16 {
        redis_cluster::slot_owner(self.ports[0], slot).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Moves `slot` (with its keys) to master `to_port` by the real MIGRATING/IMPORTING protocol
    /// (see `launcher::redis_cluster::migrate_slot`). An error if `to_port` is not a master of
    /// this cluster or already serves the slot, or if a step fails (the slot may then be left
    /// half-migrated).
    pub fn migrate_slot(&self, slot: u16, to_port: u16) -> Result<(), String> {
        if !self.ports.contains(&to_port) {
            return Err(format!(
                "port {to_port} is not a master of the cluster {:?}",
                self.ports
            ));
        }
        let _one_at_a_time = self.migrating.lock().unwrap_or_else(|e| e.into_inner());
        let from = redis_cluster::slot_owner(self.ports[0], slot)?;
        redis_cluster::migrate_slot(&self.ports, slot, from, to_port)
    }

    /// How many keys the master on `port` holds (`DBSIZE`; every test's keys on that node).
    ///
    /// # Panics
    ///
    /// If it does not answer.
    pub fn dbsize(&self, port: u16) -> u64 {
        redis_cluster::dbsize(port).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Runs one command on the node serving `key` (follows nothing: picks the owner first) and
    /// returns the reply as text (`launcher::probe::Reply::text`: an array one element a line,
    /// nil as the empty string). A redirection (`MOVED`, `ASK` while the slot migrates) is an
    /// error like any other error reply.
    pub fn command_for_key(&self, key: &str, args: &[&str]) -> Result<String, String> {
        let port = redis_cluster::keyslot(self.ports[0], key)
            .and_then(|slot| redis_cluster::slot_owner(self.ports[0], slot))?;
        probe::redis(port, args)
    }
}

static CLUSTER: OnceLock<Result<Started<RedisCluster>, String>> = OnceLock::new();

/// The cluster of this test process: started on the first call (about 2–3 s), the same one
/// afterwards, like [`crate::servers::servers`]. Tests isolate by key prefix.
///
/// # Panics
///
/// If `redis-server` is missing, a node does not start, or the cluster is not ok within 30 s (the
/// message says what the nodes said).
pub fn redis_cluster() -> &'static RedisCluster {
    match CLUSTER.get_or_init(start_cluster) {
        Ok(started) => &started.servers,
        Err(message) => panic!("the test Redis Cluster could not be started: {message}"),
    }
}

/// The masters, each on a free port with a free bus port, formed and ok.
fn start_cluster() -> Result<Started<RedisCluster>, String> {
    let binary = redis_binary()?;
    let dir = attached::dir("redis-cluster").map_err(explain)?;
    let mut running = Vec::with_capacity(CLUSTER_MASTERS);
    let mut nodes = Vec::with_capacity(CLUSTER_MASTERS);
    for i in 1..=CLUSTER_MASTERS {
        let log = dir.join(format!("node-{i}.log"));
        // If a node fails, those already running are dropped on the `?` and stop.
        let (node, attached) = attached::start_on_free_port(free_port, &log, |port| {
            Ok(ClusterNode {
                redis: Redis {
                    binary: binary.clone(),
                    port,
                    dir: dir.clone(),
                    databases: None,
                    tls: None,
                },
                // A free port + 10000 (Redis's default) could be in the ephemeral range.
                bus_port: Some(free_port().map_err(Error::Unavailable)?),
            })
        })
        .map_err(explain)?;
        nodes.push((node.redis.port, node.bus()));
        running.push(attached);
    }
    redis_cluster::form(&nodes)?;
    let ports: Vec<u16> = nodes.iter().map(|(port, _)| *port).collect();
    redis_cluster::wait_ok(&ports, READY_LIMIT)?;
    Ok(Started {
        servers: RedisCluster {
            ports,
            migrating: Mutex::new(()),
        },
        _running: running,
    })
}

// ---------------------------------------------------------------------------
// Sentinel
// ---------------------------------------------------------------------------

/// A master, one replica of it and three sentinels monitoring it as [`SENTINEL_MASTER`], on
/// `127.0.0.1`; stopped when dropped (the sentinels first, so that they do not fail over while
/// the data nodes stop).
#[derive(Debug)]
pub struct RedisSentinels {
    /// The name the sentinels know the master by (`REDIS_SENTINEL_MASTER`).
    pub master_name: String,
    pub sentinel_ports: Vec<u16>,
    /// The two data nodes' ports; the first started as the master. Which is the master now is
    /// the sentinels' to say ([`RedisSentinels::master_port`]).
    pub node_ports: [u16; 2],
    /// Declared before `nodes`: fields drop in order.
    _sentinels: Vec<Attached>,
    /// Each data node's process and port: [`RedisSentinels::kill_master`] picks one.
    nodes: Mutex<Vec<(u16, Attached)>>,
}

impl RedisSentinels {
    /// `127.0.0.1:a,127.0.0.1:b,127.0.0.1:c`: the value for `REDIS_SENTINELS`.
    pub fn sentinels(&self) -> String {
        let addrs: Vec<String> = self
            .sentinel_ports
            .iter()
            .map(|port| format!("127.0.0.1:{port}"))
            .collect();
        addrs.join(",")
    }

    /// The master's port as the sentinels say now (the first that answers).
    ///
    /// # Panics
    ///
    /// If no sentinel names one.
    pub fn master_port(&self) -> u16 {
        let mut problems = Vec::new();
        for &sentinel in &self.sentinel_ports {
            match redis_sentinel::master_port(sentinel, &self.master_name) {
                Ok(port) => return port,
                Err(problem) => problems.push(problem),
            }
        }
        panic!("no sentinel names the master: {problems:?}")
    }

    /// The data node that is not the master now.
    pub fn replica_port(&self) -> u16 {
        let master = self.master_port();
        let [a, b] = self.node_ports;
        if a == master {
            b
        } else {
            a
        }
    }

    /// SIGKILLs the current master's process (no goodbye to its clients or the sentinels) and
    /// waits until it is gone; returns its port.
    ///
    /// # Panics
    ///
    /// If the sentinels name a master that is not one of this set's processes, or it outlives
    /// SIGKILL for 10 s.
    pub fn kill_master(&self) -> u16 {
        let port = self.master_port();
        let mut nodes = self.nodes.lock().unwrap_or_else(|e| e.into_inner());
        let (_, master) = nodes
            .iter_mut()
            .find(|(node, _)| *node == port)
            .unwrap_or_else(|| {
                panic!(
                    "the sentinels name port {port}, not one of {:?}",
                    self.node_ports
                )
            });
        // Our own unreaped child: its pid cannot have been recycled.
        process::send(master.pid(), SIGKILL);
        let gone = process::poll(Duration::from_secs(10), || match master.exited() {
            Some(_) => Ok(()),
            None => Err(format!("the master on port {port} outlived SIGKILL")),
        });
        gone.unwrap_or_else(|e| panic!("{e}"));
        port
    }

    /// Waits until every sentinel names the same master other than `old_port` and it accepts
    /// writes (`ROLE` says master); returns its port. Time it around the call: the failover is
    /// usually done 2–3 s after the master died, and takes about 10 s more when the sentinels'
    /// first election fails (they retry after twice the failover timeout).
    pub fn wait_failover(&self, old_port: u16, limit: Duration) -> Result<u16, String> {
        redis_sentinel::wait_failover(&self.sentinel_ports, &self.master_name, old_port, limit)
    }

    /// Runs one command on the server on `port` (a data node or a sentinel); the reply as text,
    /// as [`RedisCluster::command_for_key`] gives it.
    pub fn command(&self, port: u16, args: &[&str]) -> Result<String, String> {
        probe::redis(port, args)
    }
}

/// A sentinel set of the test's own (tests kill its master), ready to fail over (every sentinel
/// knows the replica and the others), stopped when dropped. About 2–3 s.
///
/// # Panics
///
/// If `redis-server` is missing, a server does not start, or the set is not ready within 30 s.
pub fn own_redis_sentinels() -> RedisSentinels {
    start_sentinels()
        .unwrap_or_else(|e| panic!("the test Redis sentinel set could not be started: {e}"))
}

/// The master, then its replica (linked), then the sentinels, then the wait until they are ready.
fn start_sentinels() -> Result<RedisSentinels, String> {
    let binary = redis_binary()?;
    let dir = attached::dir("redis-sentinels").map_err(explain)?;
    let node = |i: usize, replica_of: Option<u16>| {
        attached::start_on_free_port(free_port, &dir.join(format!("node-{i}.log")), |port| {
            Ok(DataNode {
                redis: Redis {
                    binary: binary.clone(),
                    port,
                    dir: dir.clone(),
                    databases: None,
                    tls: None,
                },
                replica_of,
            })
        })
        .map(|(node, running)| (node.redis.port, running))
        .map_err(explain)
    };
    let (master, master_running) = node(1, None)?;
    let (replica, replica_running) = node(2, Some(master))?;
    // Linked before the sentinels start: a sentinel learns the replicas from the master's INFO,
    // which it asks for at once and then only every 10 s.
    process::poll(READY_LIMIT, || {
        redis_sentinel::check_linked(replica, master)
    })?;
    let mut sentinels = Vec::with_capacity(3);
    let mut sentinel_ports = Vec::with_capacity(3);
    for i in 1..=3 {
        let log = dir.join(format!("sentinel-{i}.log"));
        let (sentinel, running) = attached::start_on_free_port(free_port, &log, |port| {
            let sentinel = Sentinel {
                binary: binary.clone(),
                port,
                dir: dir.clone(),
            };
            sentinel.write_config("testkit", SENTINEL_MASTER, master)?;
            Ok(sentinel)
        })
        .map_err(explain)?;
        sentinel_ports.push(sentinel.port);
        sentinels.push(running);
    }
    let started = Instant::now();
    redis_sentinel::wait_ready(
        &sentinel_ports,
        SENTINEL_MASTER,
        master,
        replica,
        READY_LIMIT,
    )
    .map_err(|e| {
        format!(
            "{e} (after {:?}); logs in {}",
            started.elapsed(),
            dir.display()
        )
    })?;
    Ok(RedisSentinels {
        master_name: SENTINEL_MASTER.to_owned(),
        sentinel_ports,
        node_ports: [master, replica],
        _sentinels: sentinels,
        nodes: Mutex::new(vec![(master, master_running), (replica, replica_running)]),
    })
}

// ---------------------------------------------------------------------------
// Self-tests
// ---------------------------------------------------------------------------

/// The cluster forms with every slot covered on every node, and a migrated slot moves its keys:
/// the new owner has them, every master names it, and the old one redirects with `MOVED`.
#[test]
fn cluster_forms_and_a_migrated_slot_moves_its_keys() {
    let started = Instant::now();
    let cluster = redis_cluster();
    eprintln!("redis_cluster() took {:?}", started.elapsed());
    assert_eq!(cluster.ports.len(), CLUSTER_MASTERS);
    redis_cluster::check_ok(&cluster.ports).unwrap_or_else(|e| panic!("{e}"));
    assert!(std::ptr::eq(cluster, redis_cluster()), "the same cluster");
    let p = &cluster.ports;
    assert_eq!(cluster.seed_url(), format!("redis://127.0.0.1:{}", p[0]));
    assert_eq!(
        cluster.urls(),
        format!(
            "redis://127.0.0.1:{},redis://127.0.0.1:{},redis://127.0.0.1:{}",
            p[0], p[1], p[2]
        )
    );
    assert_eq!(cluster.slot_owner(0), p[0]);
    assert_eq!(cluster.slot_owner(16383), p[2]);

    // One hash tag: every key in one slot.
    let keys: Vec<String> = (0..250)
        .map(|i| format!("{{testkit-migrate}}:{i}"))
        .collect();
    let slot = cluster.keyslot(&keys[0]);
    assert!(keys.iter().all(|key| cluster.keyslot(key) == slot));
    let from = cluster.slot_owner(slot);
    let to = *p
        .iter()
        .find(|port| **port != from)
        .expect("another master");
    for key in &keys {
        let set = cluster.command_for_key(key, &["SET", key, "moved"]);
        assert_eq!(set.as_deref(), Ok("OK"), "SET {key}");
    }
    let (from_before, to_before) = (cluster.dbsize(from), cluster.dbsize(to));
    assert!(from_before >= 250, "{from_before} keys on the owner");

    let started = Instant::now();
    cluster
        .migrate_slot(slot, to)
        .unwrap_or_else(|e| panic!("{e}"));
    eprintln!("migrating 250 keys took {:?}", started.elapsed());

    for port in p {
        assert_eq!(
            redis_cluster::slot_owner(*port, slot),
            Ok(to),
            "node :{port} names the new owner of slot {slot}"
        );
    }
    let count = |port: u16| {
        probe::redis(port, &["CLUSTER", "COUNTKEYSINSLOT", &slot.to_string()])
            .unwrap_or_else(|e| panic!("{e}"))
    };
    assert_eq!(count(from), "0", "no key left behind");
    assert_eq!(count(to), "250", "every key moved");
    assert_eq!(cluster.dbsize(from), from_before - 250);
    assert_eq!(cluster.dbsize(to), to_before + 250);
    assert_eq!(
        cluster
            .command_for_key(&keys[7], &["GET", &keys[7]])
            .as_deref(),
        Ok("moved")
    );
    let moved = probe::redis(from, &["GET", &keys[7]]);
    assert!(
        moved.as_ref().is_err_and(|e| e.contains("MOVED")),
        "the old owner redirects: {moved:?}"
    );
    assert!(
        cluster.migrate_slot(slot, to).is_err(),
        "a slot cannot move to where it is"
    );
    redis_cluster::check_ok(p).unwrap_or_else(|e| panic!("after the migration: {e}"));
}

/// How long a test gives a failover: usually 2–3 s, 10 s more if the first election fails.
#[cfg(test)]
const FAILOVER_LIMIT: Duration = Duration::from_secs(20);

/// A sentinel set fails over when its master is SIGKILLed: the replica, which had the master's
/// writes, is promoted and named by every sentinel within seconds, and takes writes.
#[test]
fn sentinels_fail_over_when_the_master_is_killed() {
    let started = Instant::now();
    let set = own_redis_sentinels();
    eprintln!("own_redis_sentinels() took {:?}", started.elapsed());
    let s = &set.sentinel_ports;
    assert_eq!(
        set.sentinels(),
        format!("127.0.0.1:{},127.0.0.1:{},127.0.0.1:{}", s[0], s[1], s[2])
    );
    let (master, replica) = (set.master_port(), set.replica_port());
    assert_eq!([master, replica], set.node_ports);
    assert_eq!(
        set.command(master, &["SET", "before", "failover"])
            .as_deref(),
        Ok("OK")
    );
    process::poll(Duration::from_secs(10), || {
        match set.command(replica, &["GET", "before"])?.as_str() {
            "failover" => Ok(()),
            other => Err(format!("the replica has {other:?}")),
        }
    })
    .unwrap_or_else(|e| panic!("the write reaches the replica: {e}"));

    let started = Instant::now();
    assert_eq!(set.kill_master(), master);
    let new = set
        .wait_failover(master, FAILOVER_LIMIT)
        .unwrap_or_else(|e| panic!("{e}"));
    eprintln!("failover took {:?}", started.elapsed());
    assert_eq!(new, replica, "the replica is promoted");
    assert_eq!(set.master_port(), replica);
    assert_eq!(
        set.command(new, &["GET", "before"]).as_deref(),
        Ok("failover")
    );
    assert_eq!(
        set.command(new, &["SET", "after", "failover"]).as_deref(),
        Ok("OK"),
        "the new master takes writes"
    );
}
