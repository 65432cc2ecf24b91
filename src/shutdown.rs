//! Stopping without losing a request: drain, stop accepting, finish, hand the leases back.
//!
//! A replica is stopped on every deploy while its load balancer still sends it requests, many on
//! keep-alive connections. Closing those connections under requests in flight is what a client
//! sees as an error. So a stop ([`Shutdown::begin`], on SIGTERM or SIGINT) goes in steps:
//!
//! 1. **Drain** for `SHUTDOWN_DRAIN_MS`: the replica serves as before, but `/readyz` answers
//!    `503` (`"status": "draining"`), so the load balancer's health check takes it out, and every
//!    response carries `Connection: close`, so each keep-alive connection ends after its next
//!    answer and the client's next request opens a connection the balancer routes elsewhere.
//! 2. **Stop accepting**, and finish what was accepted: actix-web's graceful stop answers the
//!    requests in flight (each within its `REQUEST_TIMEOUT_MS`) and closes connections as they
//!    go idle, for up to [`finish_within`].
//! 3. **Hand the leases back** ([`crate::actors::key_owner::HandBack`]): a load still in the air
//!    for the fleet (a refresh, or one whose requests timed out) gives up its lease, so the other
//!    replicas load the key at once instead of waiting out `LEASE_TTL_MS`.
//! 4. Exit 0.
//!
//! A second SIGTERM or SIGINT stops at once ([`Shutdown::now`]).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use actix_web::dev::ServerHandle;

/// Whether this replica is draining: shared by `/readyz` and every HTTP worker.
#[derive(Debug, Clone, Default)]
pub struct Draining(Arc<AtomicBool>);

impl Draining {
    pub fn is_on(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }

    /// Turns it on; true if it was off.
    fn start(&self) -> bool {
        !self.0.swap(true, Ordering::Relaxed)
    }
}

/// How long the server's graceful stop may take once it stops accepting: the longest a request
/// accepted before may still need (`REQUEST_TIMEOUT_MS`), and long enough for idle keep-alive
/// connections to time out on their own (actix-web's keep-alive, 5 s) rather than be cut.
pub fn finish_within(request_timeout: Duration) -> Duration {
    const KEEP_ALIVE: Duration = Duration::from_secs(5);
    let longest = request_timeout.max(KEEP_ALIVE) + Duration::from_secs(1);
    // actix-web counts it in whole seconds.
    Duration::from_secs(longest.as_secs() + u64::from(longest.subsec_nanos() > 0))
}

/// Stops the server in the steps of the module docs.
#[derive(Clone)]
pub struct Shutdown {
    pub(crate) server: ServerHandle,
    /// `ADMIN_ADDR`'s server, when set: it answers probes through the drain, and stops with the
    /// public server.
    pub(crate) admin: Option<ServerHandle>,
    pub(crate) draining: Draining,
    pub(crate) drain: Duration,
}

impl Shutdown {
    /// Drains for `SHUTDOWN_DRAIN_MS`, then stops the server gracefully (the rest follows in
    /// [`crate::startup::Application::run_until_stopped`]). A second call does nothing.
    pub async fn begin(&self) {
        if !self.draining.start() {
            return;
        }
        if !self.drain.is_zero() {
            log::info!(
                "draining for {:?}: /readyz answers 503 and every response closes its connection, \
                 so that the load balancer moves the traffic",
                self.drain
            );
            tokio::time::sleep(self.drain).await;
        }
        log::info!("no longer accepting connections; finishing the requests in flight");
        self.server.stop(true).await;
    }

    /// Stops the server at once, cutting what is in flight.
    pub async fn now(&self) {
        self.draining.start();
        if let Some(admin) = &self.admin {
            admin.stop(false).await;
        }
        self.server.stop(false).await;
    }

    /// Whether a stop has begun.
    pub fn begun(&self) -> bool {
        self.draining.is_on()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_finish_covers_a_request_and_an_idle_keep_alive() {
        assert_eq!(
            finish_within(Duration::from_millis(2000)),
            Duration::from_secs(6)
        );
        assert_eq!(
            finish_within(Duration::from_millis(9500)),
            Duration::from_secs(11)
        );
        assert_eq!(
            finish_within(Duration::from_secs(30)),
            Duration::from_secs(31)
        );
    }

    #[test]
    fn draining_starts_once() {
        let draining = Draining::default();
        assert!(!draining.is_on());
        assert!(draining.start());
        assert!(!draining.start());
        assert!(draining.is_on());
    }
}
