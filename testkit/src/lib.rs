//! What singleflight's tests and benches share, and nothing that needs the service crate.
//!
//! - [`servers`]: one real PostgreSQL and one Redis per test process, on free loopback ports,
//!   that die with the process (PostgreSQL run as the `postgres` user when we are root); on
//!   demand, PgBouncer in transaction mode in front of that PostgreSQL, and a primary of its own
//!   with a replica that applies its WAL late.
//! - [`redis_topologies`]: a Redis Cluster of three masters per test process (slots migrated on
//!   demand, by the real protocol), and a sentinel set (master, replica, three sentinels) of a
//!   test's own, whose master the test may kill.
//! - [`launcher`]: how those servers (and the dashboard test's Prometheus) are run and tied to the
//!   test process: the launcher crate, which `scripts/stack.sh` runs its servers with too.
//! - [`certs`]: a throwaway CA and certificates, for the TLS variant of the servers.
//! - [`fault_proxy`]: a TCP proxy that plays an unreachable, refusing or slow backend.
//! - [`otlp`]: an OTLP/HTTP trace receiver, to check the spans the service exports.
//! - [`prom`]: reading a `/metrics` scrape (the `promtext` crate, which the load generator uses
//!   too).
//! - [`ports`]: free loopback ports for servers started in another process, outside the
//!   kernel's ephemeral range so that no outgoing connection takes one first.
//! - [`poll::until`]: waiting for a condition with a bound, instead of sleeping.
//! - [`workspace::binary`]: another member's binary (the load generator), built and found.
//!
//! The app-specific harness (`spawn_app`, `TestApp`) needs the service crate, so it stays in the
//! service's `tests/api/support/`, which re-exports these modules. This crate is a
//! dev-dependency only: `cargo tree -e normal -p singleflight` must never show it.

pub use launcher;
pub use promtext as prom;

pub mod certs;
pub mod fault_proxy;
pub mod otlp;
pub mod poll;
pub mod ports;
pub mod redis_topologies;
pub mod servers;
pub mod workspace;
