//! The cache actor's writes outside the lease ([`CacheSet`]) and its deletes ([`CacheDel`]).
//!
//! Every write is fenced in Redis, as the lease's fill is (see [`super::lease`]): one script
//! writes the value only if the key's generation is still the one read before the load began
//! ([`super::Fence`]), and a change deletes the value and bumps the generation in one script.
//! So a load that read the row before a change — however slow, whatever its replica's clock
//! says — cannot put the old row back once any replica has learned of the change.

use std::sync::LazyLock;

use actix::prelude::*;

use super::{CacheActor, CacheDel, CacheError, CacheSet};
use crate::template::unix_ms_now;

/// How long a key's generation outlives its last change: far longer than any flight, so a load
/// that read it cannot see it expire and start again from zero.
const GENERATION_TTL_MS: i64 = 3_600_000;

/// KEYS: value, generation. ARGV: the generation the load began under, value, expiry (ms).
/// Returns 1 if written, 0 if the generation moved (nothing written).
static SET_FENCED: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r"
        if (redis.call('GET', KEYS[2]) or '0') ~= ARGV[1] then return 0 end
        redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
        return 1
        ",
    )
});

/// KEYS: value, generation. ARGV: the generation's TTL (ms). Deletes the value and bumps the
/// generation, so that fills and writes of loads that began before now write nothing.
///
/// Sent as `EVAL` with its text every time, never as `EVALSHA`: a Redis that does not know a
/// script (it restarted, failed over, or its scripts were flushed) answers `EVALSHA` with
/// `NOSCRIPT`, and redis-rs then loads the script and sends it again, one round trip later. The
/// reads that the owner started after the change are queued behind the delete on the same
/// connection, and would run before its second try: they would find the old value and answer it
/// as fresh, with copy terms of after the change. Changes are rare, so the text costs nothing.
const CHANGED: &str = r"
        redis.call('DEL', KEYS[1])
        redis.call('INCR', KEYS[2])
        redis.call('PEXPIRE', KEYS[2], ARGV[1])
        return 1
        ";

impl CacheActor {
    fn count_write(&self, outcome: &str) {
        self.metrics
            .cache_writes_total
            .with_label_values(&[outcome])
            .inc();
    }
}

impl Handler<CacheSet> for CacheActor {
    type Result = ResponseActFuture<Self, Result<bool, CacheError>>;

    fn handle(&mut self, set: CacheSet, _: &mut Self::Context) -> Self::Result {
        let CacheSet {
            id,
            lookup,
            loaded_at_ms,
            from_replica,
            fence,
        } = set;
        let Some(fence) = fence else {
            self.count_write("unfenced");
            return Box::pin(fut::ready(Ok(false)));
        };
        if fence.epoch != self.epoch {
            // Redis restarted or failed over since the load began: what it read may be gone.
            self.count_write("changed");
            return Box::pin(fut::ready(Ok(false)));
        }
        let Some((value, hard_ms)) =
            self.entry_to_write(id, lookup, loaded_at_ms, fence.epoch, from_replica)
        else {
            return Box::pin(fut::ready(Ok(false)));
        };
        let conn = self.connection();
        let keys = self.settings.keys.clone();
        let timeout = self.settings.timeout;
        let written = self.call(async move {
            let mut conn = conn.await?;
            SET_FENCED
                .key(keys.value(id))
                .key(keys.generation(id))
                .arg(fence.generation)
                .arg(value)
                .arg(hard_ms)
                .invoke_async::<i64>(&mut conn)
                .await
                .map(|written| written == 1)
                .map_err(|e| CacheError::from_redis(e, timeout))
        });
        Box::pin(written.map(|result, actor, _| {
            if let Ok(written) = result {
                actor.count_write(if written { "written" } else { "changed" });
            }
            result
        }))
    }
}

impl Handler<CacheDel> for CacheActor {
    type Result = ();

    fn handle(&mut self, CacheDel(id): CacheDel, ctx: &mut Self::Context) {
        self.suspects.changed(id);
        let conn = self.connection();
        let keys = self.settings.keys.clone();
        let timeout = self.settings.timeout;
        let del = self.call(async move {
            let mut conn = conn.await?;
            redis::cmd("EVAL")
                .arg(CHANGED)
                .arg(2)
                .arg(keys.value(id))
                .arg(keys.generation(id))
                .arg(GENERATION_TTL_MS)
                .query_async::<i64>(&mut conn)
                .await
                .map(drop)
                .map_err(|e| CacheError::from_redis(e, timeout))
        });
        // A delete that fails or is skipped (Redis unreachable, breaker open) would leave the
        // old value to be served for a whole TTL once Redis answers again: instead, every entry
        // written before now becomes suspect (served, but refreshed on first read).
        ctx.spawn(del.map(|result, actor, _| {
            if result.is_err() {
                actor.suspects.all_before(unix_ms_now());
            }
        }));
    }
}
