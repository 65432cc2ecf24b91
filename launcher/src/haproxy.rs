//! HAProxy in front of the replicas: its configuration, its check (`haproxy -c`), its command line
//! and readiness, and its graceful stop.
//!
//! It runs with `-db` (in the foreground, no master process), so the pid spawned is the one that
//! serves. A graceful stop is SIGUSR1: it stops listening and lets open connections finish, for at
//! most `hard-stop-after`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::process::{self, Error, Server, StopStep, SIGTERM, SIGUSR1};

/// The steps of a stop: SIGUSR1 (graceful) and up to 15 s, then SIGTERM and up to 5 s.
pub const STOP: [StopStep; 2] = [
    (Some(SIGUSR1), Duration::from_secs(15)),
    (Some(SIGTERM), Duration::from_secs(5)),
];

/// `haproxy` on `PATH`, or Debian's `/usr/sbin/haproxy` (not on a normal user's `PATH`).
pub fn binary() -> Option<PathBuf> {
    process::find_in_path("haproxy").or_else(|| {
        let debian = Path::new("/usr/sbin/haproxy");
        process::is_executable(debian).then(|| debian.to_owned())
    })
}

/// The configuration for HAProxy on `:port` (all interfaces, like the service's own default) in
/// front of the replicas on `127.0.0.1:<replica_ports>`, round robin over those whose
/// `GET /readyz` answers 200.
pub fn config(written_by: &str, port: u16, replica_ports: &[u16]) -> String {
    let mut config = format!(
        "# Written by {written_by} (rewritten on every start): HAProxy on :{port} in front of
# {count} replicas of singleflight. The compose stack's counterpart is deploy/haproxy/haproxy.cfg.
global
    log stdout format raw local0 notice
    maxconn 4096
    # A graceful stop (SIGUSR1) waits for open connections at most this long.
    hard-stop-after 10s

defaults
    mode http
    log global
    option httplog
    # Errors and servers going up or down are logged, not every request.
    option dontlog-normal
    timeout connect 2s
    timeout client 30s
    timeout server 30s
    timeout http-keep-alive 10s
    # A GET whose replica refused the connection, closed it before answering or did not
    # answer in time is sent again, to another replica (a stopping replica closes its idle
    # keep-alive connections; see SHUTDOWN_DRAIN_MS in the README).
    retries 3
    option redispatch 1
    retry-on conn-failure empty-response response-timeout

frontend singleflight
    bind :{port}
    default_backend replicas

backend replicas
    balance roundrobin
    # A replica gets requests while GET /readyz answers 200: it answers 503 once it is
    # stopping, and two failed checks 1 s apart take it out within the service's default
    # SHUTDOWN_DRAIN_MS (3 s).
    option httpchk GET /readyz
    http-check expect status 200
    default-server check inter 1s fall 2 rise 1
",
        count = replica_ports.len()
    );
    for (i, replica_port) in replica_ports.iter().enumerate() {
        config.push_str(&format!(
            "    server replica-{} 127.0.0.1:{replica_port}\n",
            i + 1
        ));
    }
    config
}

/// `haproxy -c -q -f file`: its output as an [`Error::Rejected`] if it fails.
pub fn check(binary: &Path, file: &Path) -> Result<(), Error> {
    process::check(
        "haproxy -c",
        Command::new(binary).args(["-c", "-q", "-f"]).arg(file),
    )
}

/// HAProxy on `:port`.
pub struct Haproxy {
    /// From [`binary`].
    pub binary: PathBuf,
    /// The file [`config`] was written to.
    pub config: PathBuf,
    pub port: u16,
}

impl Server for Haproxy {
    fn name(&self) -> String {
        "haproxy".to_owned()
    }

    fn command(&self) -> Command {
        let mut command = Command::new(&self.binary);
        command.arg("-db").arg("-f").arg(&self.config);
        command
    }

    /// Ready once a request through it reaches a ready replica.
    fn probe(&self) -> Result<(), String> {
        crate::replica::ready(self.port)
    }

    fn ready_within(&self) -> Duration {
        Duration::from_secs(10)
    }
}
