//! The cache actor's reads: one template with its generation ([`CacheGet`]), many at once
//! ([`CacheGetMany`]), and what a raw value is worth ([`usable`]).

use std::time::Duration;

use actix::prelude::*;
use bytes::Bytes;

use super::suspect::Suspects;
use super::{CacheActor, CacheError, CacheGet, CacheGetMany, Cached, Fence, Read};
use crate::metrics::Metrics;
use crate::template::{unix_ms_now, Entry};

/// What a reader holds against an entry: loaded before `before_ms` (this replica may have
/// missed a change since, or, for a replica's row, knows of a later one), or in another Redis
/// epoch than `epoch`.
#[derive(Debug, Clone, Copy)]
pub(super) struct Distrust {
    before_ms: u64,
    replica_rows_before_ms: u64,
    epoch: u64,
}

impl Distrust {
    pub(super) fn of(suspects: &Suspects, id: i64, epoch: u64) -> Distrust {
        Distrust {
            before_ms: suspects.before(),
            replica_rows_before_ms: suspects.replica_rows_before(id),
            epoch,
        }
    }

    /// Whether `entry` is a miss. Every clock time compared is this replica's own, but for a
    /// row read from a read replica, whose stamp (as of that replica's replay) is the writer's.
    fn distrusts(&self, entry: &Entry) -> bool {
        entry.epoch != self.epoch
            || entry.loaded_at_ms < self.before_ms
            || (entry.from_replica && entry.loaded_at_ms < self.replica_rows_before_ms)
    }
}

/// What a raw Redis value for `id` is worth: a usable entry, a miss (`None`: distrusted, see
/// [`Distrust`]), or a decode error.
pub(super) fn usable(
    raw: Bytes,
    id: i64,
    distrust: Distrust,
    metrics: &Metrics,
) -> Result<Option<Cached>, CacheError> {
    let entry = Entry::decode(raw, id).ok_or(CacheError::Decode(id))?;
    if distrust.distrusts(&entry) {
        metrics.cache_suspect_entries_total.inc();
        return Ok(None);
    }
    let fresh_ms = entry.soft_expiry_ms.saturating_sub(unix_ms_now());
    Ok(Some(Cached {
        lookup: entry.lookup,
        fresh_for: Duration::from_millis(fresh_ms),
    }))
}

/// A generation as Redis holds it (a decimal counter; none is 0).
pub(super) fn generation(raw: Option<Vec<u8>>) -> Result<i64, CacheError> {
    match raw {
        None => Ok(0),
        Some(raw) => std::str::from_utf8(&raw)
            .ok()
            .and_then(|text| text.parse().ok())
            .ok_or_else(|| CacheError::Protocol("a generation that is not a number".into())),
    }
}

impl Handler<CacheGet> for CacheActor {
    type Result = ResponseActFuture<Self, Result<Read, CacheError>>;

    fn handle(&mut self, CacheGet(id): CacheGet, _: &mut Self::Context) -> Self::Result {
        let conn = self.connection();
        let keys = self.settings.keys.clone();
        let timeout = self.settings.timeout;
        let epoch = self.epoch;
        let distrust = Distrust::of(&self.suspects, id, epoch);
        let metrics = self.metrics.clone();
        self.call(async move {
            let mut conn = conn.await?;
            // One slot (the keys share a hash tag), so one command even in a cluster.
            let (value, generation_raw): (Option<Vec<u8>>, Option<Vec<u8>>) = redis::cmd("MGET")
                .arg(keys.value(id))
                .arg(keys.generation(id))
                .query_async(&mut conn)
                .await
                .map_err(|e| CacheError::from_redis(e, timeout))?;
            let fence = Fence {
                generation: generation(generation_raw)?,
                epoch,
            };
            // A value that is not an entry is a miss whose reload overwrites it.
            let value = match value.map(|raw| usable(Bytes::from(raw), id, distrust, &metrics)) {
                None => None,
                Some(Ok(value)) => value,
                Some(Err(e)) => {
                    metrics
                        .redis_errors_total
                        .with_label_values(&[e.kind()])
                        .inc();
                    None
                }
            };
            Ok(Read { value, fence })
        })
    }
}

impl Handler<CacheGetMany> for CacheActor {
    type Result = ResponseActFuture<Self, Result<Vec<Option<Cached>>, CacheError>>;

    fn handle(&mut self, CacheGetMany(ids): CacheGetMany, _: &mut Self::Context) -> Self::Result {
        if ids.is_empty() {
            return Box::pin(fut::ready(Ok(Vec::new())));
        }
        let names = self.settings.keys.clone();
        let conn = self.connection();
        let timeout = self.settings.timeout;
        let distrust: Vec<Distrust> = ids
            .iter()
            .map(|&id| Distrust::of(&self.suspects, id, self.epoch))
            .collect();
        let metrics = self.metrics.clone();
        self.call(async move {
            let mut conn = conn.await?;
            // In a cluster the client splits the keys by slot and puts the answers back in order.
            let keys: Vec<String> = ids.iter().map(|&id| names.value(id)).collect();
            let values: Vec<Option<Vec<u8>>> = redis::cmd("MGET")
                .arg(&keys)
                .query_async(&mut conn)
                .await
                .map_err(|e| CacheError::from_redis(e, timeout))?;
            let read = ids.iter().zip(distrust).zip(values);
            Ok(read
                .map(|((&id, distrust), raw)| {
                    usable(Bytes::from(raw?), id, distrust, &metrics).unwrap_or_else(|e| {
                        metrics
                            .redis_errors_total
                            .with_label_values(&[e.kind()])
                            .inc();
                        None
                    })
                })
                .collect())
        })
    }
}
