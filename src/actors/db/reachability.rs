//! Whether PostgreSQL is down, decided on evidence: the state the [`DbActor`](super::DbActor)
//! fails loads fast on (see "Failing fast where the database is known to be down" in the module
//! docs of [`super`]).
//!
//! | state | entered when | loads | leaves it |
//! |---|---|---|---|
//! | up | start; a probe or any connection opens; a query is answered | sent | evidence against the server ([`super::failure`]): suspect |
//! | suspect | a connection attempt failed, or a connection was lost under a query | sent | a probe at once: down if it fails, up if it connects |
//! | down | a probe confirmed it | failed at once | a probe, every half second, connects: up |
//!
//! One slow query, a full server or a failed query is never evidence: only connections refused
//! or unanswered are, and only a probe's own failure turns them into "down". Connection set-ups
//! (which bb8 runs in background tasks) and loads report what they saw; loads read the state
//! before they wait for a connection, and wait on it ([`Reachability::until_down`]) so that a load
//! already waiting is released the moment the database goes down. The `db_available` gauge shows
//! it (1 up or suspect, 0 down).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;

use super::failure::Evidence;
use prometheus::IntGauge;

/// Where PostgreSQL stands, as far as the service can tell.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Standing {
    Up,
    /// Evidence came in; a probe is confirming it.
    Suspect(Evidence),
    /// A probe confirmed the evidence: loads fail at once until a probe connects.
    Down(Evidence),
}

/// Written by connection set-ups, loads and probes; read by loads and readiness. Cloning shares
/// the same state.
#[derive(Clone)]
pub struct Reachability {
    state: Arc<watch::Sender<Standing>>,
    /// 1 while not down, 0 while down (`db_available` for the primary; none for a replica,
    /// whose health its routing tracks).
    /// When PostgreSQL last answered (a connection opened, a query answered), in milliseconds
    /// since `epoch`: an idle service checks on it now and then ([`Reachability::quiet_for`]).
    answered_ms: Arc<AtomicU64>,
    epoch: Instant,
    gauge: Option<IntGauge>,
}

impl Reachability {
    pub(super) fn new(gauge: Option<IntGauge>) -> Self {
        if let Some(gauge) = &gauge {
            gauge.set(1);
        }
        Reachability {
            state: Arc::new(watch::Sender::new(Standing::Up)),
            answered_ms: Arc::new(AtomicU64::new(0)),
            epoch: Instant::now(),
            gauge,
        }
    }

    fn publish(&self, available: bool) {
        if let Some(gauge) = &self.gauge {
            gauge.set(i64::from(available));
        }
    }

    pub fn standing(&self) -> Standing {
        *self.state.borrow()
    }

    /// A connection opened or a query answered: up.
    pub(super) fn up(&self) {
        let now_ms = self.epoch.elapsed().as_millis() as u64;
        self.answered_ms.store(now_ms, Ordering::Relaxed);
        if self.standing() == Standing::Up {
            return;
        }
        let was = self.state.send_replace(Standing::Up);
        if let Standing::Down(_) = was {
            log::info!("PostgreSQL answers again");
            self.publish(true);
        }
    }

    /// A failure that says `evidence` (`detail`: the driver's words, for the log). Evidence
    /// against the server makes an up database suspect; anything else changes nothing.
    pub(super) fn saw(&self, evidence: Evidence, detail: &str) {
        if !evidence.against_the_server() {
            return;
        }
        let suspected = self.state.send_if_modified(|standing| match standing {
            Standing::Up => {
                *standing = Standing::Suspect(evidence);
                true
            }
            _ => false,
        });
        if suspected {
            log::warn!("PostgreSQL may be down ({detail}); confirming with a probe");
        }
    }

    /// A probe failed with `evidence`: down.
    pub(super) fn confirm_down(&self, evidence: Evidence, detail: &str) {
        let was = self.state.send_replace(Standing::Down(evidence));
        if !matches!(was, Standing::Down(_)) {
            log::warn!(
                "PostgreSQL is down ({detail}): {}; failing loads fast until a probe connects",
                evidence.describe()
            );
            self.publish(false);
        }
    }

    /// How long PostgreSQL has not answered anything (nothing asked of it, or nothing answered).
    pub(super) fn quiet_for(&self) -> Duration {
        let answered = Duration::from_millis(self.answered_ms.load(Ordering::Relaxed));
        self.epoch.elapsed().saturating_sub(answered)
    }

    /// What the database is down with, or `None` while it is not known to be down.
    pub fn down(&self) -> Option<Evidence> {
        match self.standing() {
            Standing::Down(evidence) => Some(evidence),
            _ => None,
        }
    }

    /// Resolves when the database is (or goes) down, with why.
    pub(super) async fn until_down(&self) -> Evidence {
        let mut rx = self.state.subscribe();
        let standing = match rx.wait_for(|s| matches!(s, Standing::Down(_))).await {
            Ok(standing) => *standing,
            // The sender lives as long as `self`: unreachable, but never resolve wrongly.
            Err(_) => return std::future::pending().await,
        };
        match standing {
            Standing::Down(evidence) => evidence,
            _ => std::future::pending().await,
        }
    }

    /// Resolves when there is something for a probe to settle: the database is suspect or
    /// down.
    pub(super) async fn until_in_doubt(&self) {
        let mut rx = self.state.subscribe();
        if rx.wait_for(|s| *s != Standing::Up).await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[actix_rt::test]
    async fn evidence_makes_it_suspect_and_only_a_probe_makes_it_down() {
        let metrics = crate::metrics::Metrics::new().expect("metrics");
        let reach = Reachability::new(Some(metrics.db_available.clone()));
        reach.saw(Evidence::QueryFailed, "a query failed");
        reach.saw(Evidence::Busy, "too many clients");
        assert_eq!(reach.standing(), Standing::Up, "not evidence against it");
        reach.saw(Evidence::Unreachable, "refused");
        assert_eq!(reach.standing(), Standing::Suspect(Evidence::Unreachable));
        assert_eq!(reach.down(), None, "loads still go out");
        assert_eq!(metrics.db_available.get(), 1);
        reach.confirm_down(Evidence::Unreachable, "refused again");
        assert_eq!(reach.down(), Some(Evidence::Unreachable));
        assert_eq!(metrics.db_available.get(), 0);
        reach.saw(Evidence::Rejected, "more evidence");
        assert_eq!(reach.down(), Some(Evidence::Unreachable), "down stays down");
        reach.up();
        assert_eq!(reach.standing(), Standing::Up);
        assert_eq!(metrics.db_available.get(), 1);
    }

    #[actix_rt::test]
    async fn waiters_are_released_when_it_goes_down_and_probes_when_in_doubt() {
        let metrics = crate::metrics::Metrics::new().expect("metrics");
        let reach = Reachability::new(Some(metrics.db_available.clone()));
        let down = actix_rt::spawn({
            let reach = reach.clone();
            async move { reach.until_down().await }
        });
        let doubt = actix_rt::spawn({
            let reach = reach.clone();
            async move { reach.until_in_doubt().await }
        });
        reach.saw(Evidence::Unreachable, "refused");
        tokio::time::timeout(Duration::from_secs(5), doubt)
            .await
            .expect("a probe is due")
            .expect("joined");
        assert!(!down.is_finished(), "suspect is not down");
        reach.confirm_down(Evidence::Rejected, "password authentication failed");
        let why = tokio::time::timeout(Duration::from_secs(5), down)
            .await
            .expect("released")
            .expect("joined");
        assert_eq!(why, Evidence::Rejected);
    }
}
