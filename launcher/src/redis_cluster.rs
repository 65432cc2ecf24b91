//! Redis Cluster from Debian's `redis-server` (Redis 7): masters started with cluster mode on,
//! formed into one cluster without `redis-cli`'s questions, and the real slot-migration protocol,
//! so that the service's cluster client meets `MOVED`, `ASK` and a slot that changes hands as it
//! would in production.
//!
//! # Forming
//!
//! [`form`] does what `redis-cli --cluster create` does, minus the replicas: each node gets its
//! share of the 16384 slots (`CLUSTER ADDSLOTSRANGE`) and a distinct config epoch (`CLUSTER
//! SET-CONFIG-EPOCH`, so that no epoch collision has to be resolved later), then the first node
//! meets the others (`CLUSTER MEET`, with the bus port). Gossip does the rest; [`wait_ok`] waits
//! until every node says `cluster_state:ok` and sees every slot served by the expected number of
//! masters. A master turns `ok` no sooner than 2 s after it starts (Redis's rejoin delay), so a
//! new cluster takes about that long.
//!
//! # Ports
//!
//! Each node listens on its port and talks to the others on its cluster bus port: its port +
//! 10000 unless told otherwise ([`Node::bus_port`]). The tests choose both (a free port + 10000
//! may be in the kernel's ephemeral range); the stack keeps Redis's default.
//!
//! # Files
//!
//! A node writes its view of the cluster to `nodes-<port>.conf` in its directory (Redis insists on
//! one) and nothing else: persistence is off, as for every Redis here. A node restarted with its
//! file rejoins with its slots (and no keys); a node without one is a new, empty node.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use crate::probe::{self, Reply};
use crate::process::{self, Server};
use crate::redis::{self, Redis};

/// How many hash slots a cluster has.
pub const SLOTS: u16 = 16384;

/// `--cluster-node-timeout`: how long a node may not answer before the others mark it failing.
/// Short, so that a test that kills one sees the cluster react within seconds.
pub const NODE_TIMEOUT: Duration = Duration::from_millis(2000);

/// How many keys one `MIGRATE` moves at most.
const MIGRATE_BATCH: usize = 100;

/// `MIGRATE`'s own timeout, in milliseconds: below the probe's 2 s, so that a stuck target is
/// reported by `MIGRATE` itself.
const MIGRATE_TIMEOUT_MS: &str = "1500";

/// A master of a cluster: a [`Redis`] (loopback, no persistence, foreground) with cluster mode on.
pub struct Node {
    pub redis: Redis,
    /// `--cluster-port`: `None` for Redis's default, the port + 10000.
    pub bus_port: Option<u16>,
}

impl Node {
    /// Where the node keeps its view of the cluster: `nodes-<port>.conf` in its directory.
    pub fn config_file(&self) -> PathBuf {
        self.redis
            .dir
            .join(format!("nodes-{}.conf", self.redis.port))
    }

    /// The bus port it listens on.
    pub fn bus(&self) -> u16 {
        self.bus_port
            .unwrap_or_else(|| self.redis.port.saturating_add(10000))
    }
}

impl Server for Node {
    fn name(&self) -> String {
        format!("redis-server (cluster node :{})", self.redis.port)
    }

    fn command(&self) -> Command {
        let mut command = self.redis.command();
        command
            .args(["--cluster-enabled", "yes", "--cluster-config-file"])
            .arg(self.config_file())
            .arg("--cluster-node-timeout")
            .arg(NODE_TIMEOUT.as_millis().to_string());
        if let Some(bus) = self.bus_port {
            command.arg("--cluster-port").arg(bus.to_string());
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

/// The slots node `i` of `n` serves when the cluster is formed: 16384 split in `n` ranges as
/// `redis-cli --cluster create` splits them (0-5460, 5461-10922, 10923-16383 for three).
pub fn slot_range(i: usize, n: usize) -> (u16, u16) {
    let share = f64::from(SLOTS) / n as f64;
    let first = (i as f64 * share).round() as u16;
    let last = ((i + 1) as f64 * share).round() as u16 - 1;
    (first, last)
}

/// Forms a cluster of the new, empty nodes `(port, bus port)`: their slots, their epochs, and the
/// first one meeting the others. Returns at once; [`wait_ok`] waits for gossip to finish.
pub fn form(nodes: &[(u16, u16)]) -> Result<(), String> {
    let formed = |port: u16, what: &str, e: String| {
        format!("forming the cluster: {what} on port {port}: {e}")
    };
    for (i, &(port, _)) in nodes.iter().enumerate() {
        let (first, last) = slot_range(i, nodes.len());
        let (first, last) = (first.to_string(), last.to_string());
        probe::redis(port, &["CLUSTER", "ADDSLOTSRANGE", &first, &last])
            .map_err(|e| formed(port, "CLUSTER ADDSLOTSRANGE", e))?;
        let epoch = (i + 1).to_string();
        probe::redis(port, &["CLUSTER", "SET-CONFIG-EPOCH", &epoch])
            .map_err(|e| formed(port, "CLUSTER SET-CONFIG-EPOCH", e))?;
    }
    let Some(((first, _), others)) = nodes.split_first() else {
        return Err("forming the cluster: no nodes".to_owned());
    };
    for (port, bus) in others {
        let (port, bus) = (port.to_string(), bus.to_string());
        probe::redis(*first, &["CLUSTER", "MEET", "127.0.0.1", &port, &bus])
            .map_err(|e| formed(*first, "CLUSTER MEET", e))?;
    }
    Ok(())
}

/// `Ok` if every node of `ports` says `cluster_state:ok`, knows them all, and sees all 16384
/// slots served by as many masters; otherwise what the first node that does not saw.
pub fn check_ok(ports: &[u16]) -> Result<(), String> {
    for &port in ports {
        let info = probe::redis(port, &["CLUSTER", "INFO"])?;
        let field = |name: &str| redis::info_field(&info, name).unwrap_or_default();
        let n = ports.len().to_string();
        let slots = SLOTS.to_string();
        let good = field("cluster_state") == "ok"
            && field("cluster_slots_assigned") == slots
            && field("cluster_slots_ok") == slots
            && field("cluster_known_nodes") == n
            && field("cluster_size") == n;
        if !good {
            return Err(format!(
                "node :{port} says cluster_state:{}, slots assigned {} and ok {} of {SLOTS}, \
                 {} known nodes and {} masters serving slots, of {n}",
                field("cluster_state"),
                field("cluster_slots_assigned"),
                field("cluster_slots_ok"),
                field("cluster_known_nodes"),
                field("cluster_size"),
            ));
        }
    }
    Ok(())
}

/// Waits until [`check_ok`] holds, up to `limit`; the error says what was seen last.
pub fn wait_ok(ports: &[u16], limit: Duration) -> Result<(), String> {
    process::poll(limit, || check_ok(ports)).map_err(|last| {
        format!("the cluster of ports {ports:?} was not ok after {limit:?}: {last}")
    })
}

/// The node id of the node on `port` (`CLUSTER MYID`).
pub fn my_id(port: u16) -> Result<String, String> {
    probe::redis(port, &["CLUSTER", "MYID"])
}

/// The slot of `key` (`CLUSTER KEYSLOT`, asked of the node on `port`).
pub fn keyslot(port: u16, key: &str) -> Result<u16, String> {
    probe::redis_reply(port, &["CLUSTER", "KEYSLOT", key])?
        .number()
        .ok_or_else(|| format!("CLUSTER KEYSLOT on port {port} did not answer a number"))
}

/// The port of the master serving `slot`, as the node on `port` sees it (`CLUSTER SLOTS`).
pub fn slot_owner(port: u16, slot: u16) -> Result<u16, String> {
    let slots = probe::redis_reply(port, &["CLUSTER", "SLOTS"])?;
    // Each entry: first slot, last slot, then the master [ip, port, id, ...], then replicas.
    slots
        .items()
        .iter()
        .find_map(|range| {
            let [first, last, master, ..] = range.items() else {
                return None;
            };
            let (first, last) = (first.number::<u16>()?, last.number::<u16>()?);
            (first..=last)
                .contains(&slot)
                .then(|| master.items().get(1)?.number())?
        })
        .ok_or_else(|| format!("the node on port {port} knows no master serving slot {slot}"))
}

/// How many keys the node on `port` holds (`DBSIZE`).
pub fn dbsize(port: u16) -> Result<u64, String> {
    probe::redis_reply(port, &["DBSIZE"])?
        .number()
        .ok_or_else(|| format!("DBSIZE on port {port} did not answer a number"))
}

/// Moves `slot` and its keys from the master on `from` to the master on `to` by the protocol
/// `redis-cli --cluster reshard` follows: the target `IMPORTING`, the source `MIGRATING`, the keys
/// `MIGRATE`d in batches until the source has none left in the slot, then `SETSLOT ... NODE` on
/// the target, the source and every other master of `masters` (so that none of them redirects to
/// the old owner). While it runs, a client asking the source for a key already moved gets `ASK`.
pub fn migrate_slot(masters: &[u16], slot: u16, from: u16, to: u16) -> Result<(), String> {
    if from == to {
        return Err(format!("slot {slot}: from and to are both port {from}"));
    }
    let slot_text = slot.to_string();
    let failed =
        |step: &str, e: String| format!("migrating slot {slot} from :{from} to :{to}: {step}: {e}");
    let (from_id, to_id) = (my_id(from)?, my_id(to)?);
    probe::redis(
        to,
        &["CLUSTER", "SETSLOT", &slot_text, "IMPORTING", &from_id],
    )
    .map_err(|e| failed("SETSLOT IMPORTING", e))?;
    probe::redis(
        from,
        &["CLUSTER", "SETSLOT", &slot_text, "MIGRATING", &to_id],
    )
    .map_err(|e| failed("SETSLOT MIGRATING", e))?;
    let batch = MIGRATE_BATCH.to_string();
    let to_text = to.to_string();
    loop {
        let keys = probe::redis_reply(from, &["CLUSTER", "GETKEYSINSLOT", &slot_text, &batch])
            .map_err(|e| failed("GETKEYSINSLOT", e))?;
        let keys: Vec<String> = keys.items().iter().map(Reply::text).collect();
        if keys.is_empty() {
            break;
        }
        let mut command = vec![
            "MIGRATE",
            "127.0.0.1",
            &to_text,
            "",
            "0",
            MIGRATE_TIMEOUT_MS,
            "KEYS",
        ];
        command.extend(keys.iter().map(String::as_str));
        probe::redis(from, &command).map_err(|e| failed("MIGRATE", e))?;
    }
    // The target first: once the source lets go, clients it redirects must find the slot served.
    let mut order = vec![to, from];
    order.extend(masters.iter().filter(|port| **port != to && **port != from));
    for port in order {
        probe::redis(port, &["CLUSTER", "SETSLOT", &slot_text, "NODE", &to_id])
            .map_err(|e| failed(&format!("SETSLOT NODE on :{port}"), e))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_split_as_redis_cli_splits_them() {
        let three: Vec<_> = (0..3).map(|i| slot_range(i, 3)).collect();
        assert_eq!(three, [(0, 5460), (5461, 10922), (10923, 16383)]);
        assert_eq!(slot_range(0, 1), (0, SLOTS - 1));
        for n in 1..=7 {
            let ranges: Vec<_> = (0..n).map(|i| slot_range(i, n)).collect();
            assert_eq!(ranges[0].0, 0);
            assert_eq!(ranges[n - 1].1, SLOTS - 1);
            assert!(
                ranges.windows(2).all(|w| w[1].0 == w[0].1 + 1),
                "{ranges:?}"
            );
        }
    }
}
