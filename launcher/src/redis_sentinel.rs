//! Redis Sentinel from Debian's `redis-server` (Redis 7): a master, one replica of it, and three
//! sentinels watching them, so that the service finds its master through the sentinels and meets
//! a real failover (a replica promoted, the sentinels naming it) when the master dies.
//!
//! # The set
//!
//! Two data [`Node`]s (the first started as the master, the second with `--replicaof`) and three
//! [`Sentinel`]s (`redis-server <config> --sentinel`), each with a configuration file of its own:
//! a sentinel rewrites its file as it learns (its id, the replica, the other sentinels, every
//! failover), so the file must be writable and never shared. Each sentinel monitors the master
//! under one name with a quorum of 2: two sentinels must agree that it is down before one of them
//! is elected to fail over.
//!
//! # Timing
//!
//! The master is declared down after [`DOWN_AFTER`] without an answer; the failover then takes a
//! second or two (an election, the replica promoted, the new master announced), so the sentinels
//! name the replica about 2–3 s after the master died. A sentinel discovers the replica from the
//! master's `INFO` and the other sentinels from their hello messages (every 2 s), so a new set is
//! ready ([`check_ready`]) about 2 s after its sentinels start. Until then a failover could not
//! happen: a test must not kill the master of a set that is not ready.
//!
//! Persistence is off on both data nodes, as for every Redis here; the replica's first full
//! synchronisation goes over the socket at once (`repl-diskless-sync-delay 0`, where Redis would
//! wait 5 s for more replicas to join) and straight into its memory (`repl-diskless-load
//! on-empty-db`, where it would write a dump file first).

use std::fs;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use crate::probe::{self, Reply};
use crate::process::{self, Error, Server};
use crate::redis::{self, Redis};

/// How long the master may not answer before a sentinel thinks it down.
pub const DOWN_AFTER: Duration = Duration::from_millis(1000);

/// How long a failover may take before the sentinels try again (with another leader).
pub const FAILOVER_TIMEOUT: Duration = Duration::from_millis(5000);

/// How many sentinels must agree that the master is down.
pub const QUORUM: u8 = 2;

/// A data node: a [`Redis`] (loopback, no persistence, foreground) that starts as the master, or
/// as a replica of the master on `replica_of`. Sentinels may turn either into the other later.
pub struct Node {
    pub redis: Redis,
    pub replica_of: Option<u16>,
}

impl Server for Node {
    fn name(&self) -> String {
        match self.replica_of {
            None => format!("redis-server (master :{})", self.redis.port),
            Some(master) => format!("redis-server (replica :{} of :{master})", self.redis.port),
        }
    }

    fn command(&self) -> Command {
        let mut command = self.redis.command();
        // Both ways over the socket: the master streams its snapshot at once, and a replica
        // loads it straight into its empty memory, so neither writes a dump file.
        command.args([
            "--repl-diskless-sync-delay",
            "0",
            "--repl-diskless-load",
            "on-empty-db",
        ]);
        if let Some(master) = self.replica_of {
            command
                .args(["--replicaof", "127.0.0.1"])
                .arg(master.to_string());
        }
        command
    }

    fn probe(&self) -> Result<(), String> {
        redis::ping(self.redis.port)
    }

    fn ready_within(&self) -> Duration {
        self.redis.ready_within()
    }
}

/// A sentinel on `127.0.0.1:port`, its configuration file `sentinel-<port>.conf` in `dir` (which
/// [`Sentinel::write_config`] writes before the first start).
pub struct Sentinel {
    /// `redis-server`, from [`redis::binary`]: `--sentinel` makes it one.
    pub binary: PathBuf,
    pub port: u16,
    /// Its working directory, where its configuration file is.
    pub dir: PathBuf,
}

impl Sentinel {
    /// Its configuration file, which it rewrites as it learns.
    pub fn config_file(&self) -> PathBuf {
        self.dir.join(format!("sentinel-{}.conf", self.port))
    }

    /// Writes a new configuration file: this sentinel on loopback, monitoring the master on
    /// `master_port` as `master_name`. `written_by` goes into its first comment line.
    pub fn write_config(
        &self,
        written_by: &str,
        master_name: &str,
        master_port: u16,
    ) -> Result<(), Error> {
        let file = self.config_file();
        let (down, failover) = (DOWN_AFTER.as_millis(), FAILOVER_TIMEOUT.as_millis());
        let text = format!(
            "# Written by {written_by}; the sentinel rewrites it as it learns (its id, the replica,\n\
             # the other sentinels, each failover). Deleted and written anew when the set starts.\n\
             port {port}\n\
             bind 127.0.0.1\n\
             daemonize no\n\
             dir \"{dir}\"\n\
             sentinel resolve-hostnames no\n\
             sentinel monitor {master_name} 127.0.0.1 {master_port} {QUORUM}\n\
             sentinel down-after-milliseconds {master_name} {down}\n\
             sentinel failover-timeout {master_name} {failover}\n\
             sentinel parallel-syncs {master_name} 1\n",
            port = self.port,
            dir = self.dir.display(),
        );
        fs::write(&file, text).map_err(Error::io(format!("write {}", file.display())))
    }
}

impl Server for Sentinel {
    fn name(&self) -> String {
        format!("redis-server (sentinel :{})", self.port)
    }

    fn command(&self) -> Command {
        let mut command = Command::new(&self.binary);
        command
            .arg(self.config_file())
            .arg("--sentinel")
            .current_dir(&self.dir);
        command
    }

    fn probe(&self) -> Result<(), String> {
        redis::ping(self.port)
    }

    fn ready_within(&self) -> Duration {
        Duration::from_secs(10)
    }
}

/// The port of the master the sentinel on `sentinel` names for `master_name` now
/// (`SENTINEL get-master-addr-by-name`).
pub fn master_port(sentinel: u16, master_name: &str) -> Result<u16, String> {
    let reply = probe::redis_reply(
        sentinel,
        &["SENTINEL", "get-master-addr-by-name", master_name],
    )?;
    match reply.items() {
        [_, port] => port.number(),
        _ => None,
    }
    .ok_or_else(|| {
        format!("the sentinel on port {sentinel} names no master {master_name:?} (it answered {reply:?})")
    })
}

/// `Ok` once the set can fail over: every sentinel names the master on `master`, sees it up, knows
/// the replica on `replica` (up) and the other sentinels; and the replica's link to the master is
/// up. Otherwise what the first check that failed saw.
pub fn check_ready(
    sentinels: &[u16],
    master_name: &str,
    master: u16,
    replica: u16,
) -> Result<(), String> {
    check_linked(replica, master)?;
    for &sentinel in sentinels {
        let named = master_port(sentinel, master_name)?;
        if named != master {
            return Err(format!(
                "the sentinel on port {sentinel} names master {named}, not {master}"
            ));
        }
        let state = probe::redis_reply(sentinel, &["SENTINEL", "master", master_name])?;
        let field = |name: &str| state.field(name).map(Reply::text).unwrap_or_default();
        let others = (sentinels.len() - 1).to_string();
        if field("flags") != "master" || field("num-other-sentinels") != others {
            return Err(format!(
                "the sentinel on port {sentinel} sees the master with flags {:?} and {} other \
                 sentinels, of {others}",
                field("flags"),
                field("num-other-sentinels")
            ));
        }
        let replicas = probe::redis_reply(sentinel, &["SENTINEL", "replicas", master_name])?;
        let known = replicas.items().iter().any(|entry| {
            entry.field("port").and_then(Reply::number::<u16>) == Some(replica)
                && entry.field("flags").map(Reply::text).as_deref() == Some("slave")
        });
        if !known {
            return Err(format!(
                "the sentinel on port {sentinel} does not know the replica on port {replica} as up"
            ));
        }
    }
    Ok(())
}

/// `Ok` if the node on `replica` is a replica of the one on `master` with its link up
/// (`INFO replication`): it has had its first full copy and follows the master's writes.
pub fn check_linked(replica: u16, master: u16) -> Result<(), String> {
    let info = probe::redis(replica, &["INFO", "replication"])?;
    let link = redis::info_field(&info, "master_link_status").unwrap_or("none");
    let of = redis::info_field(&info, "master_port").unwrap_or("none");
    if link != "up" || of != master.to_string() {
        return Err(format!(
            "the node on port {replica} has master_link_status:{link} to port {of}, not up to {master}"
        ));
    }
    Ok(())
}

/// Waits until [`check_ready`] holds, up to `limit`; the error says what was seen last.
pub fn wait_ready(
    sentinels: &[u16],
    master_name: &str,
    master: u16,
    replica: u16,
    limit: Duration,
) -> Result<(), String> {
    process::poll(limit, || {
        check_ready(sentinels, master_name, master, replica)
    })
    .map_err(|last| {
        format!("the sentinels of {master_name:?} were not ready after {limit:?}: {last}")
    })
}

/// The new master's port once every sentinel names one other than `old` and it answers `ROLE`
/// as a master (so it takes writes); otherwise what was seen.
pub fn check_failed_over(sentinels: &[u16], master_name: &str, old: u16) -> Result<u16, String> {
    let mut named = Vec::with_capacity(sentinels.len());
    for &sentinel in sentinels {
        named.push(master_port(sentinel, master_name)?);
    }
    let new = named[0];
    if new == old || named.iter().any(|port| *port != new) {
        return Err(format!(
            "the sentinels {sentinels:?} name masters {named:?} (the old one: {old})"
        ));
    }
    match redis::role(new)?.as_str() {
        "master" => Ok(new),
        role => Err(format!(
            "the sentinels name port {new}, which is still a {role}"
        )),
    }
}

/// Waits until [`check_failed_over`] gives the new master, up to `limit`.
pub fn wait_failover(
    sentinels: &[u16],
    master_name: &str,
    old: u16,
    limit: Duration,
) -> Result<u16, String> {
    process::poll(limit, || check_failed_over(sentinels, master_name, old))
        .map_err(|last| format!("no failover away from port {old} within {limit:?}: {last}"))
}
