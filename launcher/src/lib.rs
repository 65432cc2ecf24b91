//! The one launcher of singleflight's native servers: `scripts/stack.sh` (through the `stack`
//! binary) and the tests (through the test kit) start PostgreSQL (and streaming replicas of it),
//! Redis, Prometheus, HAProxy, PgBouncer and replicas of the service with this crate, so that
//! what it takes to run each server is written once.
//!
//! # What is where
//!
//! - One module a server, holding everything about it that does not depend on who runs it:
//!   [`postgres`] (its binaries, `initdb`'s flags, the settings, running as the `postgres` user
//!   when we are root, `pg_isready`, the stale lock files of a crash, creating a database, TLS,
//!   streaming replicas that apply the WAL late), [`redis`] (its command line,
//!   `PING`/`INFO`/`SHUTDOWN` over RESP, TLS), [`redis_cluster`] (masters in cluster mode,
//!   formed without questions, the slot-migration protocol), [`redis_sentinel`] (a master, its
//!   replica and three sentinels, waiting for a failover), [`prometheus`] (the scrape config rendered from the
//!   project's `prometheus.yaml`, `promtool`, `/-/ready`, the targets' health), [`haproxy`] (its
//!   configuration in front of the replicas, `haproxy -c`), [`pgbouncer`] (transaction mode in
//!   front of PostgreSQL: its ini file, run as `postgres` when we are root, ready once a query
//!   passes through it) and [`replica`] (the service binary on a port of its own). Each
//!   describes a running server as a [`Server`] (its command, its readiness probe, how long it
//!   may take, the signal it dies with) and says how a daemon of it is stopped (its `STOP`
//!   steps). Where its output goes is the caller's choice: the stack's `.stack/` layout, a test's
//!   directory.
//! - [`process`]: what both lifetimes share: waiting for a server to be ready (or to exit), one-shot
//!   programs, signals, `/proc` (is a pid alive, which program is it), log tails, users, ports.
//! - Two lifetimes, kept thin: [`attached`] is the test kit's (the server dies with the test process,
//!   lives in a temporary directory, on a free port), [`detached`] is the stack's (a daemon in a
//!   session of its own that outlives the command that started it, found again through its pid
//!   file).
//! - [`stack`]: `scripts/stack.sh`'s commands (`up`, `start`, `stop`, `status`, `env`, `help`):
//!   the environment it reads, the `.stack/` layout, the packages it installs, its messages. The
//!   `stack` binary is only its entry point.
//! - [`probe`]: asking a server whether it serves (a TCP connect, an HTTP GET, a Redis command
//!   and its reply, arrays included, a PostgreSQL query), with the standard library alone.
//!
//! Nothing here is async, and nothing is a dependency of the service: the service must never link
//! the code that launches it.

pub mod attached;
pub mod detached;
pub mod haproxy;
pub mod pgbouncer;
pub mod postgres;
pub mod probe;
pub mod process;
pub mod prometheus;
pub mod redis;
pub mod redis_cluster;
pub mod redis_sentinel;
pub mod replica;
pub mod stack;

pub use process::{Error, Server};
