//! singleflight: a read-through template service that ends cache stampedes.
//!
//! `GET /template-details?id=N` reads a template through Redis (cache-aside) backed by
//! PostgreSQL. Requests for one key go to the one [`actors::key_owner::KeyOwner`] that owns it,
//! which runs at most one load per key at a time and answers every waiter with its result.

pub mod actors;
pub mod config;
pub mod demo;
pub mod http;
pub mod memory;
pub mod metrics;
pub mod migrate;
pub mod schema;
pub mod shutdown;
pub mod startup;
pub mod telemetry;
pub mod template;
pub mod tls;
