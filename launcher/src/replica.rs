//! A replica of the service: the service binary on `127.0.0.1:port`, with the settings the stack
//! gives it (`DATABASE_URL`, `REDIS_URL`, `RUST_LOG`); every other variable of the README's
//! configuration table passes through from the caller's environment.
//!
//! It is ready once `GET /readyz` answers 200 (it has applied pending migrations and reaches
//! PostgreSQL), and SIGTERM is its graceful shutdown (it gives in-flight requests up to 10 s).

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use crate::probe;
use crate::process::{Server, StopStep, SIGTERM};

/// The steps of a stop: SIGTERM, then up to 15 s.
pub const STOP: [StopStep; 1] = [(Some(SIGTERM), Duration::from_secs(15))];

/// The program name a replica's process shows (`/proc/<pid>/comm`).
pub const PROGRAM: &str = "singleflight";

/// Whether the service on `127.0.0.1:port` (a replica, or HAProxy in front of ready ones)
/// answers `GET /readyz` with a success.
pub fn ready(port: u16) -> Result<(), String> {
    probe::http_ok(port, "/readyz").map(drop)
}

/// Replica `index` (from 1) of the service.
pub struct Replica {
    pub index: u16,
    /// The service binary.
    pub binary: PathBuf,
    pub port: u16,
    /// `DATABASE_URL`, `REDIS_URL`, `RUST_LOG`, ...: set on top of the inherited environment.
    pub env: Vec<(String, String)>,
}

impl Server for Replica {
    fn name(&self) -> String {
        format!("replica {}", self.index)
    }

    fn command(&self) -> Command {
        let mut command = Command::new(&self.binary);
        command
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .env("HTTP_ADDR", format!("127.0.0.1:{}", self.port));
        command
    }

    fn probe(&self) -> Result<(), String> {
        ready(self.port)
    }

    /// It applies migrations and waits for PostgreSQL first.
    fn ready_within(&self) -> Duration {
        Duration::from_secs(60)
    }
}
