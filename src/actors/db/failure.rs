//! What a failed connection attempt or query says about PostgreSQL: the evidence that decides
//! whether the database is down (see [`super::reachability`]).
//!
//! Read from the error's SQLSTATE and its kind, never from its text (which changes with the
//! server's version and language, and differs between PostgreSQL and the poolers in front of
//! it):
//!
//! | SQLSTATE / error | evidence |
//! |---|---|
//! | `53300` too many connections, other class `53` | [`Evidence::Busy`]: answered, full; waited for like a busy pool |
//! | class `08` (connection exception), `57P01` admin shutdown, `57P02` crash shutdown, `57P03` cannot connect now | [`Evidence::Unreachable`] |
//! | refused, reset, unanswered (no SQLSTATE: the network said so) | [`Evidence::Unreachable`] |
//! | class `28` (authentication), `3D000` no such database, a certificate that fails the check | [`Evidence::Rejected`] |
//! | anything else while connecting (a protocol surprise) | [`Evidence::Unreachable`] |
//! | a statement of the connection's set-up that failed on its own | as a query's, below |
//!
//! A query's own failure is not evidence against the server: a query cancelled for running too
//! long (`57014`, whether by the service's timeout or the server's `statement_timeout`) is a
//! slow query, and an error in the query says the server answered. Only a connection that was
//! lost under a query (closed, or no longer able to send) is [`Evidence::Unreachable`]; even
//! then the database is declared down only once a probe confirms it.

use diesel::result::{DatabaseErrorKind, Error as QueryError};
use tokio_postgres::error::SqlState;

use crate::tls::PgConnectError;

/// What one failure says about the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Evidence {
    /// The server answered and is full (too many connections, out of resources): busy, not
    /// down.
    Busy,
    /// The server could not be reached, or ended or refused the connection (down, restarting,
    /// shutting down, a network in between that drops or resets): a probe confirms whether it
    /// is down.
    Unreachable,
    /// The server answered and turned the service away (authentication, an unknown database, a
    /// certificate that fails the check): no connection will succeed until the settings change.
    Rejected,
    /// The query failed on its own (an error, or cancelled for running too long): the server is
    /// there.
    QueryFailed,
}

impl Evidence {
    /// What failed, in words for `/readyz` and error answers: never the driver's own text, which
    /// may name hosts, users and server internals.
    pub fn describe(self) -> &'static str {
        match self {
            Evidence::Busy => "PostgreSQL is full (too many connections)",
            Evidence::Unreachable => "PostgreSQL refused or did not answer connections",
            Evidence::Rejected => {
                "PostgreSQL rejected the service's credentials, database name or TLS settings"
            }
            Evidence::QueryFailed => "a query failed",
        }
    }

    /// Counts against the server: the database may be down.
    pub fn against_the_server(self) -> bool {
        matches!(self, Evidence::Unreachable | Evidence::Rejected)
    }

    /// What a failed connection attempt says.
    pub fn of_connect(e: &PgConnectError) -> Evidence {
        match e {
            _ if e.certificate_rejected() => Evidence::Rejected,
            PgConnectError::Connect(e) => match e.code() {
                Some(code) => Evidence::of_sqlstate(code),
                // No SQLSTATE: the network, TLS or the connection closing said it.
                None => Evidence::Unreachable,
            },
            // Connected: what the set-up's own statements said (a transaction-mode pooler may
            // fail them without anything being wrong with the server).
            PgConnectError::Setup(diesel::ConnectionError::CouldntSetupConfiguration(e)) => {
                Evidence::of_query(e)
            }
            PgConnectError::Setup(_) => Evidence::Unreachable,
        }
    }

    /// What an error the server sent while connecting says.
    pub fn of_sqlstate(code: &SqlState) -> Evidence {
        let code = code.code();
        let class = &code[..2.min(code.len())];
        match (class, code) {
            ("53", _) => Evidence::Busy,
            ("28", _) | (_, "3D000") => Evidence::Rejected,
            ("08", _) | (_, "57P01" | "57P02" | "57P03") => Evidence::Unreachable,
            _ => Evidence::Unreachable,
        }
    }

    /// What a failed query says: only a connection lost under it counts against the server.
    pub fn of_query(e: &QueryError) -> Evidence {
        match e {
            QueryError::DatabaseError(
                DatabaseErrorKind::ClosedConnection | DatabaseErrorKind::UnableToSendCommand,
                _,
            ) => Evidence::Unreachable,
            _ => Evidence::QueryFailed,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_server_is_busy_not_down() {
        assert_eq!(
            Evidence::of_sqlstate(&SqlState::TOO_MANY_CONNECTIONS),
            Evidence::Busy
        );
        assert_eq!(
            Evidence::of_sqlstate(&SqlState::OUT_OF_MEMORY),
            Evidence::Busy
        );
        assert!(!Evidence::Busy.against_the_server());
    }

    #[test]
    fn connection_exceptions_and_shutdowns_are_unreachable() {
        for code in [
            SqlState::CONNECTION_EXCEPTION,
            SqlState::CONNECTION_FAILURE,
            SqlState::SQLCLIENT_UNABLE_TO_ESTABLISH_SQLCONNECTION,
            SqlState::PROTOCOL_VIOLATION,
            SqlState::ADMIN_SHUTDOWN,
            SqlState::CRASH_SHUTDOWN,
            SqlState::CANNOT_CONNECT_NOW,
        ] {
            assert_eq!(
                Evidence::of_sqlstate(&code),
                Evidence::Unreachable,
                "{code:?}"
            );
        }
    }

    #[test]
    fn credentials_and_database_names_turned_away_are_rejected() {
        for code in [
            SqlState::INVALID_PASSWORD,
            SqlState::INVALID_AUTHORIZATION_SPECIFICATION,
            SqlState::INVALID_CATALOG_NAME,
        ] {
            assert_eq!(Evidence::of_sqlstate(&code), Evidence::Rejected, "{code:?}");
        }
    }

    #[test]
    fn a_query_that_fails_on_its_own_is_not_evidence_against_the_server() {
        let info = || Box::new("canceling statement due to statement timeout".to_owned()) as _;
        let cancelled = QueryError::DatabaseError(DatabaseErrorKind::Unknown, info());
        assert_eq!(Evidence::of_query(&cancelled), Evidence::QueryFailed);
        assert_eq!(
            Evidence::of_query(&QueryError::NotFound),
            Evidence::QueryFailed
        );
        let lost = QueryError::DatabaseError(DatabaseErrorKind::ClosedConnection, info());
        assert_eq!(Evidence::of_query(&lost), Evidence::Unreachable);
    }
}
