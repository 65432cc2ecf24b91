//! Whether PostgreSQL is known to be unreachable, and why: the state the [`DbActor`](super::DbActor)
//! fails loads fast on (see "Failing fast where the database is known to be down" in the module
//! docs of [`super`]).
//!
//! Connection set-ups (which bb8 runs in background tasks) and loads report what they saw
//! ([`Reachability::up`], [`Reachability::down`]); loads read it before they wait for a
//! connection, and wait on it ([`Reachability::until_down`]) so that a load already waiting is
//! released the moment the database goes down. The `db_available` gauge shows it.

use std::sync::Arc;

use tokio::sync::watch;

use crate::metrics::Metrics;

/// Whether PostgreSQL is known to be unreachable, and why. Written by the connection set-up (which
/// bb8 runs in background tasks on the actor's thread) and by loads; read by loads, which also
/// wait on it to be released the moment it goes down.
#[derive(Clone)]
pub struct Reachability {
    /// `None` while reachable; `Some(why)` while down.
    state: Arc<watch::Sender<Option<String>>>,
    metrics: Metrics,
}

impl Reachability {
    pub(super) fn new(metrics: Metrics) -> Self {
        metrics.db_available.set(1);
        Reachability {
            state: Arc::new(watch::Sender::new(None)),
            metrics,
        }
    }

    /// A connection opened or a query answered: reachable.
    pub(super) fn up(&self) {
        let changed = self.state.send_if_modified(|s| s.take().is_some());
        if changed {
            log::info!("the database is reachable again");
            self.metrics.db_available.set(1);
        }
    }

    /// A connection refused or unanswered, or a query never answered: down.
    pub(super) fn down(&self, why: String) {
        let changed = self.state.send_if_modified(|s| {
            let was_up = s.is_none();
            *s = Some(why.clone());
            was_up
        });
        if changed {
            log::warn!("the database is unreachable ({why}); failing loads fast until it answers");
            self.metrics.db_available.set(0);
        }
    }

    /// Why the database is down, or `None` while it is reachable.
    pub fn why_down(&self) -> Option<String> {
        self.state.borrow().clone()
    }

    /// Resolves when the database is (or goes) down, with the reason.
    pub(super) async fn until_down(&self) -> String {
        let mut rx = self.state.subscribe();
        let why = match rx.wait_for(Option::is_some).await {
            Ok(why) => why.clone().unwrap_or_default(),
            // The sender lives as long as `self`: unreachable, but never resolve wrongly.
            Err(_) => return std::future::pending().await,
        };
        why
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[actix_rt::test]
    async fn reachability_releases_waiters_when_it_goes_down() {
        let reach = Reachability::new(Metrics::new().expect("metrics"));
        assert_eq!(reach.why_down(), None);
        let waiting = actix_rt::spawn({
            let reach = reach.clone();
            async move { reach.until_down().await }
        });
        reach.down("refused".into());
        let why = tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .expect("released")
            .expect("joined");
        assert_eq!(why, "refused");
        assert_eq!(reach.metrics.db_available.get(), 0);
        reach.up();
        assert_eq!(reach.why_down(), None);
        assert_eq!(reach.metrics.db_available.get(), 1);
    }
}
