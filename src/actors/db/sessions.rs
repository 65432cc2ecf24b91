//! Whether a server session lasts longer than a transaction on `DATABASE_URL`.
//!
//! Behind a transaction-mode pooler (PgBouncer, RDS Proxy, Supavisor...) a client connection is
//! handed a server connection for one transaction at a time; between transactions, and between
//! the round trips of a statement outside one, the next may be another server. Two things the
//! service does on a direct connection then break: a statement prepared on one server and run on
//! another ("does not exist"), or left behind on a server where another client prepares one of
//! the same name ("already exists"); and a session `SET` that leaks to whoever gets that server
//! next (the service sets none: its query timeout is a cancel request, see [`super::query`]).
//!
//! So in *transaction mode* every load runs in a read-only transaction of its own, with the
//! statement cache off: its statement is prepared, run and closed on one server within it.
//! Opening a connection does the same for diesel-async's own set-up (its `SET TIME ZONE` and
//! `SET CLIENT_ENCODING`, which PgBouncer tracks per client), and prepares nothing ahead. It
//! costs a load three more round trips (`BEGIN`, the separate prepare, `COMMIT`), to a pooler
//! that is usually next to the service.
//!
//! `DATABASE_POOLER=transaction` starts in it, `none` never uses it, and `auto` (the default)
//! starts as on a direct connection and switches for good on the first evidence: a load, or a
//! connection's set-up, that fails with an error of its own (not one against the server) and
//! then succeeds when run in transaction mode — after a second try as it was also failed, so
//! that a transient error (a recovery conflict on a replica, a dropped connection) does not
//! switch it. Each server (the primary, each read replica) has its own mode: the switch is
//! logged once naming the server's variable, and shown in `db_transaction_mode{server}`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use prometheus::IntGauge;

use crate::config::Pooler;
use crate::metrics::Metrics;

/// Shared by every connection set-up and load of one pool: cloning shares the same state.
#[derive(Clone)]
pub struct Sessions {
    in_transactions: Arc<AtomicBool>,
    /// `DATABASE_POOLER=auto`: may still switch.
    auto: bool,
    /// The server's `db_transaction_mode`.
    gauge: IntGauge,
    /// The server, as the switch's warning names it.
    named: Arc<str>,
}

impl std::fmt::Debug for Sessions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sessions")
            .field("in_transactions", &self.in_transactions())
            .field("auto", &self.auto)
            .finish()
    }
}

impl Sessions {
    /// The mode of `server` (`primary`, or `replica-<i>`: the `server` label of the metrics).
    pub fn new(pooler: Pooler, metrics: &Metrics, server: &str) -> Self {
        let named = match server {
            "primary" => "DATABASE_URL".to_owned(),
            replica => format!("DATABASE_READ_URL's {replica}"),
        };
        let sessions = Sessions {
            in_transactions: Arc::new(AtomicBool::new(pooler == Pooler::Transaction)),
            auto: pooler == Pooler::Auto,
            gauge: metrics.db_transaction_mode.with_label_values(&[server]),
            named: named.into(),
        };
        sessions.publish();
        sessions
    }

    /// Loads (and set-ups) run in transactions of their own.
    pub fn in_transactions(&self) -> bool {
        self.in_transactions.load(Ordering::Relaxed)
    }

    /// A failure of work run outside a transaction (`in_transaction` false) that transaction
    /// mode might cure is worth a second try in it. (Asked of the mode the work ran in, not of
    /// the current one: loads that failed together each get their second try, including those
    /// that fail after another one has already switched.)
    pub fn retry_in_transaction(&self, in_transaction: bool) -> bool {
        self.auto && !in_transaction
    }

    /// What failed on a direct connection (`detail`) worked in transaction mode: stay there.
    pub fn switch(&self, detail: &str) {
        if self.in_transactions.swap(true, Ordering::Relaxed) {
            return;
        }
        log::warn!(
            "{} behaves as a transaction-mode pooler ({detail}, twice, then the same in a \
             transaction worked): loads now run in transactions of their own, with the statement \
             cache off (DATABASE_POOLER=transaction starts that way; a direct connection is \
             faster)",
            self.named
        );
        self.publish();
    }

    fn publish(&self) {
        self.gauge.set(i64::from(self.in_transactions()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sessions(pooler: Pooler) -> Sessions {
        Sessions::new(pooler, &Metrics::new().expect("metrics"), "primary")
    }

    #[test]
    fn only_auto_retries_and_only_what_ran_outside_a_transaction() {
        assert!(sessions(Pooler::Auto).retry_in_transaction(false));
        assert!(!sessions(Pooler::Auto).retry_in_transaction(true));
        assert!(!sessions(Pooler::None).retry_in_transaction(false));
        assert!(!sessions(Pooler::Transaction).retry_in_transaction(false));
    }

    #[test]
    fn a_load_that_failed_before_another_switched_still_gets_its_second_try() {
        let auto = sessions(Pooler::Auto);
        let ran_in_transaction = auto.in_transactions();
        auto.switch("prepared statement \"s1\" does not exist");
        assert!(auto.in_transactions());
        assert!(auto.retry_in_transaction(ran_in_transaction));
    }

    #[test]
    fn the_mode_is_published_per_server_and_stays_after_a_switch() {
        let metrics = Metrics::new().expect("metrics");
        let mode = |server: &str| {
            metrics
                .db_transaction_mode
                .with_label_values(&[server])
                .get()
        };
        let primary = Sessions::new(Pooler::Auto, &metrics, "primary");
        let replica = Sessions::new(Pooler::Auto, &metrics, "replica-1");
        assert_eq!((mode("primary"), mode("replica-1")), (0, 0));
        replica.clone().switch("a failure");
        replica.switch("another failure");
        assert_eq!(
            (mode("primary"), mode("replica-1")),
            (0, 1),
            "the replica's alone"
        );
        assert!(!primary.in_transactions());
        Sessions::new(Pooler::Transaction, &metrics, "replica-2");
        assert_eq!(mode("replica-2"), 1);
    }
}
