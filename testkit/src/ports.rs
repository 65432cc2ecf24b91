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
//! So the ports here come from outside the ephemeral range, where the kernel never puts a
//! source port: below it (from 10000), or above it where a machine's range leaves no room
//! below. Each is checked by binding it, picked at random so that test processes running side
//! by side rarely try the same one, and never handed out twice in one process. A machine whose
//! ephemeral range leaves no room on either side gets ports found from port 0, as before.

use std::collections::hash_map::RandomState;
use std::collections::BTreeSet;
use std::hash::{BuildHasher, Hasher};
use std::net::{Ipv4Addr, TcpListener};
use std::ops::RangeInclusive;
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

/// Ports below this are left alone: the well-known and registered ports of the servers a
/// developer runs by hand (5432, 6379, 8080, 9090, ...).
const LOWEST: u16 = 10_000;

/// The ephemeral range when `/proc` does not say (Linux's default).
const DEFAULT_EPHEMERAL: RangeInclusive<u16> = 32_768..=60_999;

/// Tries before giving up on finding a free run of ports.
const ATTEMPTS: usize = 500;

/// Every port this process has handed out, so two tests in one process never get the same.
static HANDED_OUT: Mutex<BTreeSet<u16>> = Mutex::new(BTreeSet::new());

/// A loopback port that was free a moment ago and that no outgoing connection will take.
pub fn free_port() -> Result<u16, String> {
    free_port_run(1, &[])
}

/// The first of `n` consecutive loopback ports that were free a moment ago, none of them in
/// `taken` or handed out before by this process, all outside the kernel's ephemeral range.
pub fn free_port_run(n: u16, taken: &[u16]) -> Result<u16, String> {
    if n == 0 {
        return Err("asked for a run of 0 ports".to_owned());
    }
    let ephemeral = ephemeral_range();
    let mut handed_out = HANDED_OUT.lock().unwrap_or_else(|e| e.into_inner());
    let usable = |first: u16| {
        let run = first..=first + (n - 1);
        !run.clone()
            .any(|port| taken.contains(&port) || handed_out.contains(&port))
            && run
                .map(|port| TcpListener::bind((Ipv4Addr::LOCALHOST, port)))
                .collect::<std::io::Result<Vec<_>>>()
                .is_ok()
    };
    let found = match firsts_outside(&ephemeral, n) {
        Some(firsts) => {
            let span = u64::from(firsts.end() - firsts.start()) + 1;
            (0..ATTEMPTS)
                .map(|attempt| firsts.start() + (random(attempt) % span) as u16)
                .find(|first| usable(*first))
        }
        // No room outside the ephemeral range: the kernel's pick, as a last resort.
        None => (0..ATTEMPTS)
            .filter_map(|_| {
                let port = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
                    .and_then(|l| l.local_addr())
                    .ok()?
                    .port();
                port.checked_add(n - 1).map(|_| port)
            })
            .find(|first| usable(*first)),
    };
    let first = found.ok_or_else(|| {
        format!("found no {n} consecutive free ports in {ATTEMPTS} tries (ephemeral range {ephemeral:?})")
    })?;
    handed_out.extend(first..=first + (n - 1));
    Ok(first)
}

/// Where a run of `n` ports may start so that all of it lies outside `ephemeral`: below it from
/// [`LOWEST`] if there is room, else above it; `None` if neither side has room.
fn firsts_outside(ephemeral: &RangeInclusive<u16>, n: u16) -> Option<RangeInclusive<u16>> {
    let below = ephemeral
        .start()
        .checked_sub(n)
        .filter(|last_first| *last_first >= LOWEST)
        .map(|last_first| LOWEST..=last_first);
    let above = || {
        let first = ephemeral.end().checked_add(1)?.max(LOWEST);
        let last_first = u16::MAX.checked_sub(n - 1)?;
        (first <= last_first).then_some(first..=last_first)
    };
    below.or_else(above)
}

/// The kernel's ephemeral range (`ip_local_port_range`).
fn ephemeral_range() -> RangeInclusive<u16> {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| {
            let mut bounds = range.split_whitespace().map(|b| b.parse::<u16>().ok());
            let (low, high) = (bounds.next()??, bounds.next()??);
            (low <= high).then_some(low..=high)
        })
        .unwrap_or(DEFAULT_EPHEMERAL)
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
    fn ports_are_free_outside_the_ephemeral_range_and_never_handed_out_twice() {
        let ephemeral = ephemeral_range();
        let mut seen = BTreeSet::new();
        for _ in 0..50 {
            let port = free_port().expect("a free port");
            if firsts_outside(&ephemeral, 1).is_some() {
                assert!(!ephemeral.contains(&port), "{port} outside {ephemeral:?}");
                assert!(port >= LOWEST, "{port}");
            }
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
                !(first..first + 3).any(|port| taken.contains(&port)),
                "{first}: none of the taken ports"
            );
        }
    }

    #[test]
    fn runs_start_below_the_ephemeral_range_or_above_it_where_there_is_room() {
        let linux = 32_768..=60_999;
        assert_eq!(firsts_outside(&linux, 1), Some(LOWEST..=32_767));
        assert_eq!(firsts_outside(&linux, 3), Some(LOWEST..=32_765));
        // A container's range from 1024: only above it.
        assert_eq!(firsts_outside(&(1024..=60_999), 3), Some(61_000..=65_533));
        assert_eq!(firsts_outside(&(10_001..=65_535), 1), Some(LOWEST..=LOWEST));
        assert_eq!(firsts_outside(&(1024..=65_535), 1), None);
        assert_eq!(firsts_outside(&linux, u16::MAX), None);
    }

    #[test]
    fn a_run_of_nothing_is_an_error() {
        assert!(free_port_run(0, &[]).is_err());
    }
}
