//! The owner's collaborators and settings: everything it is given when it starts. It talks to
//! Redis and PostgreSQL only through these [`Recipient`]s, so tests put fakes behind them
//! ([`crate::actors::fakes`]).

use std::time::Duration;

use actix::prelude::*;

use super::generations::Generations;
use crate::actors::cache::{
    CacheDel, CacheGet, CacheGetMany, CacheSet, ClaimLoad, LeaseExtend, LeaseFill, LeaseRelease,
};
use crate::actors::db::FetchTemplate;
use crate::config::Settings;
use crate::metrics::Metrics;

/// The owner's behaviour and bounds; a subset of [`Settings`].
#[derive(Debug, Clone)]
pub struct OwnerSettings {
    pub flight_timeout: Duration,
    pub coalesce: bool,
    pub near_cache_ttl: Duration,
    pub near_cache_capacity: usize,
    /// This owner's share of `CACHE_MEMORY_MB`, in bytes.
    pub near_cache_bytes: usize,
    /// This owner's share of `INFLIGHT_MEMORY_MB`, in bytes.
    pub in_air_bytes: usize,
    pub negative_ttl: Duration,
    pub max_stale: Duration,
    pub max_pending_keys: usize,
    pub max_waiters_per_key: usize,
}

impl From<&Settings> for OwnerSettings {
    fn from(s: &Settings) -> Self {
        OwnerSettings {
            flight_timeout: s.flight_timeout,
            coalesce: s.coalesce,
            near_cache_ttl: s.near_cache_ttl,
            near_cache_capacity: s.near_cache_capacity,
            near_cache_bytes: s.cache_shares().near,
            in_air_bytes: s.inflight_memory_bytes / s.key_owner_shards.max(1),
            negative_ttl: s.negative_ttl,
            max_stale: s.max_stale,
            max_pending_keys: s.max_pending_keys,
            max_waiters_per_key: s.max_waiters_per_key,
        }
    }
}

impl Default for OwnerSettings {
    fn default() -> Self {
        OwnerSettings::from(&Settings::default())
    }
}

/// The owner's collaborators and settings.
#[derive(Clone)]
pub struct KeyOwnerDeps {
    pub cache_get: Recipient<CacheGet>,
    /// Workers' renewals, read in batches.
    pub cache_get_many: Recipient<CacheGetMany>,
    pub cache_set: Recipient<CacheSet>,
    pub cache_del: Recipient<CacheDel>,
    pub db: Recipient<FetchTemplate>,
    /// The fleet lease; `None` when it is off (`LEASE_TTL_MS=0`, `COALESCE=off`).
    pub lease: Option<LeaseDeps>,
    pub settings: OwnerSettings,
    pub metrics: Metrics,
    /// Bumped on every change the owner learns of; shared with the HTTP workers' caches.
    pub generations: Generations,
}

/// Where the owner claims, extends, fills and releases fleet leases (the cache actor).
#[derive(Clone)]
pub struct LeaseDeps {
    pub claim: Recipient<ClaimLoad>,
    pub extend: Recipient<LeaseExtend>,
    pub fill: Recipient<LeaseFill>,
    pub release: Recipient<LeaseRelease>,
    /// `LEASE_TTL_MS`: a holder extends its lease every third of it; a waiter looks again at
    /// the latest every quarter of it.
    pub ttl: Duration,
}
