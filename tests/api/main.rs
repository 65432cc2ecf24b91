//! Black-box tests through real HTTP against real PostgreSQL and Redis, which the support module
//! starts on free loopback ports. One binary, so one pair of servers serves every test; each test
//! gets its own database and its own Redis keyspace, so tests run in parallel.

mod support;

mod config;
mod dashboard;
mod db_batching;
mod faults;
mod fencing;
mod fleet;
mod freshness;
mod health;
mod loadtest;
mod memory;
mod metrics;
mod migrate;
mod pooler;
mod redis_cluster;
mod redis_down;
mod replicas;
mod sentinel;
mod shared_redis;
mod shutdown;
mod slow_network;
mod template_details;
mod tls;
mod traces;
mod worker_cache;
