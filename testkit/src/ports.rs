//! Free loopback ports for servers that a test starts in another process.
//!
//! Binding port 0 and letting it go hands out a port from the kernel's ephemeral range: the
//! range every outgoing connection on the machine takes its source port from. Between the
//! test letting the port go and the server binding it, any client connection (a replica's
//! pool opening connections to PostgreSQL, Prometheus starting a scrape) may take that port
//! as its source, and the server fails with "Address already in use". Linux even prefers odd
//! ports for `bind(0)` and even ones for `connect`, so the second of two consecutive ports
//! found from port 0 is exactly the kind a connection picks next.
//!
//! So the ports here come from below the ephemeral range, where the kernel never puts a
//! source port. Each is checked by binding it, picked at random so that test processes
//! running side by side rarely try the same one, and never handed out twice in one process.

use std::collections::hash_map::RandomState;
use std::collections::BTreeSet;
use std::hash::{BuildHasher, Hasher};
use std::net::{Ipv4Addr, TcpListener};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

/// Ports below this are left alone: the well-known and registered ports of the servers a
/// developer runs by hand (5432, 6379, 8080, 9090, ...).
const LOWEST: u16 = 10_000;

/// Where the ephemeral range starts when `/proc` does not say (Linux's default).
const DEFAULT_EPHEMERAL_START: u16 = 32_768;

/// Tries before giving up on finding a free run of ports.
const ATTEMPTS: usize = 500;

/// Every port this process has handed out, so two tests in one process never get the same.
static HANDED_OUT: Mutex<BTreeSet<u16>> = Mutex::new(BTreeSet::new());

/// A loopback port that was free a moment ago and that no outgoing connection will take.
pub fn free_port() -> Result<u16, String> {
    free_port_run(1, &[])
}

/// The first of `n` consecutive loopback ports that were free a moment ago, none of them in
/// `taken`, all below the kernel's ephemeral range.
pub fn free_port_run(n: u16, taken: &[u16]) -> Result<u16, String> {
    let ceiling = ephemeral_start();
    if n == 0 || ceiling <= LOWEST.saturating_add(n) {
        return Err(format!(
            "no room for {n} ports between {LOWEST} and the ephemeral range at {ceiling}"
        ));
    }
    let span = u64::from(ceiling - LOWEST - n + 1);
    let mut handed_out = HANDED_OUT.lock().unwrap_or_else(|e| e.into_inner());
    for attempt in 0..ATTEMPTS {
        let first = LOWEST + (random(attempt) % span) as u16;
        let run = first..first + n;
        if run
            .clone()
            .any(|port| taken.contains(&port) || handed_out.contains(&port))
        {
            continue;
        }
        let held: std::io::Result<Vec<TcpListener>> = run
            .clone()
            .map(|port| TcpListener::bind((Ipv4Addr::LOCALHOST, port)))
            .collect();
        if held.is_ok() {
            handed_out.extend(run);
            return Ok(first);
        }
    }
    Err(format!(
        "found no {n} consecutive free ports between {LOWEST} and {ceiling} in {ATTEMPTS} tries"
    ))
}

/// The first port of the kernel's ephemeral range (`ip_local_port_range`).
fn ephemeral_start() -> u16 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse().ok())
        .unwrap_or(DEFAULT_EPHEMERAL_START)
}

/// A random number: the standard library's randomly keyed hasher over the clock and a counter.
fn random(attempt: usize) -> u64 {
    let mut hasher = RandomState::new().build_hasher();
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    hasher.write_u128(nanos);
    hasher.write_usize(attempt);
    hasher.write_u32(std::process::id());
    hasher.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_are_free_below_the_ephemeral_range_and_never_handed_out_twice() {
        let ceiling = ephemeral_start();
        let mut seen = BTreeSet::new();
        for _ in 0..50 {
            let port = free_port().expect("a free port");
            assert!((LOWEST..ceiling).contains(&port), "{port} below {ceiling}");
            assert!(seen.insert(port), "{port} handed out twice");
            TcpListener::bind((Ipv4Addr::LOCALHOST, port)).expect("the port is free");
        }
    }

    #[test]
    fn a_run_is_consecutive_free_and_avoids_the_taken_ports() {
        let taken: Vec<u16> = (LOWEST..LOWEST + 100).collect();
        for _ in 0..20 {
            let first = free_port_run(3, &taken).expect("three free ports");
            let held: Vec<TcpListener> = (first..first + 3)
                .map(|port| TcpListener::bind((Ipv4Addr::LOCALHOST, port)).expect("free"))
                .collect();
            assert_eq!(held.len(), 3);
            assert!(
                first >= LOWEST + 100,
                "{first} is not among the taken ports"
            );
        }
    }

    #[test]
    fn a_run_that_cannot_fit_is_an_error() {
        assert!(free_port_run(0, &[]).is_err());
        assert!(free_port_run(u16::MAX, &[]).is_err());
    }
}
