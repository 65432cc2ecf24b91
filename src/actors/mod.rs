//! The actors: a sharded set of [`key_owner::KeyOwner`]s that deduplicate loads, the
//! [`cache::CacheActor`]s that own Redis connections, and the [`db::DbActor`] that owns the
//! PostgreSQL pool, and the [`listener::ChangeListener`] that turns row changes into
//! invalidations.

pub mod cache;
pub mod db;
pub mod key_owner;
pub mod listener;
