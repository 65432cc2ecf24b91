//! The fleet-wide lease: one replica loads a key for every replica.
//!
//! Each replica coalesces its own requests in its key owners; the lease coalesces the replicas.
//! A key's lease is a Redis key next to its value (`template:N:lease`) holding the token of the
//! flight that claimed it, with a TTL (`LEASE_TTL_MS`) the holder extends while it loads:
//!
//! 1. [`ClaimLoad`]: one script reads the value and, when there is none, claims the lease
//!    (`SET NX PX`) — or says how long the current holder's lease has left. A soft-expired,
//!    suspect or undecodable value is returned too (as far as it is usable) and the lease is
//!    claimed to reload it, so refresh-ahead is one refresh per expiry across the fleet. That
//!    second claim names the value it judged: if another replica has filled the key since, the
//!    script returns the new value instead of claiming.
//! 2. [`LeaseExtend`]: the holder extends its lease while its load runs, if it still holds it.
//! 3. [`LeaseFill`]: one script writes the loaded value only if the token still holds the lease
//!    and the key has not changed since the claim, deletes the lease and publishes the id on the
//!    fills channel ([`fills_channel`]). A holder whose lease ran out and was taken over writes
//!    nothing: the new holder will.
//! 4. [`LeaseRelease`]: a holder that will not fill (its load failed, or a change superseded it)
//!    deletes its lease and publishes the id, so waiters retry at once instead of at expiry.
//!
//! Replicas that found the lease held wait for the notice on the fills channel ([`fills_channel`]) (one subscription
//! per replica, see [`crate::actors::fills`]), checking again when the holder's lease would run
//! out in case the holder died or the notice was lost.
//!
//! Every script is one atomic step in Redis, so no two replicas can both claim a lease, and a
//! value is never written by a flight that no longer holds it.
//!
//! # Changes
//! Every replica that learns of a change deletes the value and bumps the key's *generation*
//! (`template:N:gen`, see [`super::CacheDel`]). A lease records the generation it was claimed
//! in (`token|generation`), and a fill whose generation is no longer current writes nothing: its
//! load may have read the row before the change, and some replica already knows of it. So no
//! replica that learned of a change can find a value loaded before it filled after its delete —
//! decided inside Redis, whatever the replicas' clocks say.

use std::sync::LazyLock;
use std::time::Duration;

use actix::prelude::*;
use bytes::Bytes;
use redis::Value;

use super::link::Conn;
use super::reads::{generation, usable, Distrust};
use super::{CacheActor, CacheError, Cached, Fence, Keys};
use crate::template::Lookup;

/// The pub/sub channel on which holders announce that a key was filled or released, on a single
/// Redis (see [`super::Keys::fills_channel`]; a cluster has one per slot).
pub fn fills_channel(settings: &super::CacheSettings) -> String {
    let db = super::client(settings).map_or(0, |c| c.get_connection_info().redis_settings().db());
    settings.keys.fills_channel(db)
}

/// How a notice about `id` is published on `conn`: `PUBLISH` on the single channel, or, in a
/// cluster, `SPUBLISH` on the shard channel of the key's slot (which a script may publish to,
/// as it is in the slot of the keys it touches).
fn publish_to(conn: &Conn, keys: &Keys, single: &str, id: i64) -> (&'static str, String) {
    if conn.is_cluster() {
        ("SPUBLISH", keys.fills_channel_of(id))
    } else {
        ("PUBLISH", single.to_owned())
    }
}

/// Identifies one claim: the replica (a random number drawn at start-up) and its flight.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseToken(pub String);

/// Read `id`'s value; when it is missing or not fresh, claim the lease to load it.
#[derive(Debug, Message)]
#[rtype(result = "Result<Claim, CacheError>")]
pub struct ClaimLoad {
    pub id: i64,
    pub token: LeaseToken,
}

/// What [`ClaimLoad`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claim {
    /// The value, if one is usable: fresh (then `lease` is `None`) or soft-expired.
    pub value: Option<Cached>,
    /// Who loads the key, when it needs loading.
    pub lease: Option<LeaseState>,
    /// The generation and epoch the claim saw: what a load after it writes under, when it writes
    /// outside the lease (a wait that lasted a flight, a peer's fill that wrote nothing).
    pub fence: Fence,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseState {
    /// The lease is ours: load the key and fill it.
    Ours,
    /// Another flight (most likely another replica's) holds it for this much longer.
    Theirs { expires_in: Duration },
}

/// Extend the lease, if `token` still holds it. `Ok(false)`: it does not.
#[derive(Debug, Message)]
#[rtype(result = "Result<bool, CacheError>")]
pub struct LeaseExtend {
    pub id: i64,
    pub token: LeaseToken,
}

/// Write what the holder loaded, if `token` still holds the lease and the key has not changed
/// since it was claimed; then delete the lease and announce the fill. `Ok(false)`: nothing was
/// written (the lease was gone, or the key changed).
#[derive(Debug, Message)]
#[rtype(result = "Result<bool, CacheError>")]
pub struct LeaseFill {
    pub id: i64,
    pub token: LeaseToken,
    pub lookup: Lookup,
    /// When the database read began (unix ms), as in [`super::CacheSet`].
    pub loaded_at_ms: u64,
    /// As in [`super::CacheSet`].
    pub from_replica: bool,
    /// The Redis epoch of the claim: a Redis restarted or failed over since gets nothing.
    pub epoch: u64,
}

/// Give the lease up without filling (if `token` still holds it), and announce it.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct LeaseRelease {
    pub id: i64,
    pub token: LeaseToken,
}

/// The payload of a notice for `id`; ` empty` when the fill wrote nothing (a "not found" that is
/// not cached), so that waiters load for themselves at once rather than one after another.
pub fn notice(id: i64, wrote: bool) -> String {
    if wrote {
        id.to_string()
    } else {
        format!("{id} empty")
    }
}

/// KEYS: value, lease, generation. ARGV: token, TTL (ms), mode, seen value.
/// Mode `value`: return the value when there is one; mode `seen`: claim unless the value is no
/// longer the one seen (then return the new one).
/// Returns `{0, generation, value}`, `{1, generation}` (claimed) or `{2, generation, ms the
/// holder's lease has left}`.
static CLAIM: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r"
        local g = redis.call('GET', KEYS[3]) or '0'
        local v = redis.call('GET', KEYS[1])
        if v and (ARGV[3] == 'value' or v ~= ARGV[4]) then return {0, g, v} end
        if redis.call('SET', KEYS[2], ARGV[1] .. '|' .. g, 'NX', 'PX', ARGV[2]) then
            return {1, g}
        end
        return {2, g, redis.call('PTTL', KEYS[2])}
        ",
    )
});

/// Whether the lease value `v` was claimed under token `ARGV[1]` (whatever its generation).
const HELD_BY_TOKEN: &str = "
    local function held(v) return v and string.sub(v, 1, #ARGV[1] + 1) == ARGV[1] .. '|' end
";

/// KEYS: lease. ARGV: token, TTL (ms). Returns 1 if extended.
static EXTEND: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(&format!(
        "{HELD_BY_TOKEN}
        if not held(redis.call('GET', KEYS[1])) then return 0 end
        return redis.call('PEXPIRE', KEYS[1], ARGV[2])
        "
    ))
});

/// KEYS: value, lease, generation. ARGV: token, value, expiry (ms; "0" writes nothing),
/// channel, notice, publish command (`PUBLISH`, or `SPUBLISH` in a cluster).
/// Returns 1 if written (or nothing to write), 0 if the token no longer held the lease, 2 if the
/// key changed since the claim (nothing written; the lease is ended and announced).
static FILL: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(&format!(
        "{HELD_BY_TOKEN}
        local v = redis.call('GET', KEYS[2])
        if not held(v) then return 0 end
        redis.call('DEL', KEYS[2])
        local g = redis.call('GET', KEYS[3]) or '0'
        if v ~= ARGV[1] .. '|' .. g then
            redis.call(ARGV[6], ARGV[4], ARGV[5])
            return 2
        end
        if ARGV[3] ~= '0' then redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3]) end
        redis.call(ARGV[6], ARGV[4], ARGV[5])
        return 1
        "
    ))
});

/// KEYS: lease. ARGV: token, channel, notice, publish command. Returns 1 if the token held the
/// lease.
static RELEASE: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(&format!(
        "{HELD_BY_TOKEN}
        if not held(redis.call('GET', KEYS[1])) then return 0 end
        redis.call('DEL', KEYS[1])
        redis.call(ARGV[4], ARGV[2], ARGV[3])
        return 1
        "
    ))
});

/// What one run of [`CLAIM`] returned, with the key's generation.
enum ClaimReply {
    Value(Vec<u8>),
    Lease(LeaseState),
}

fn parse_claim(reply: Value) -> Result<(ClaimReply, i64), CacheError> {
    let unexpected = |v: &Value| CacheError::Protocol(format!("unexpected lease reply {v:?}"));
    let Value::Array(items) = &reply else {
        return Err(unexpected(&reply));
    };
    let (generation_raw, claim) = match items.as_slice() {
        [Value::Int(0), Value::BulkString(g), Value::BulkString(raw)] => {
            (g, ClaimReply::Value(raw.clone()))
        }
        [Value::Int(1), Value::BulkString(g)] => (g, ClaimReply::Lease(LeaseState::Ours)),
        [Value::Int(2), Value::BulkString(g), Value::Int(ms)] => (
            g,
            ClaimReply::Lease(LeaseState::Theirs {
                // -2: the lease expired between the SET and the PTTL; -1 cannot happen (it is
                // always set with a TTL). Either way, look again soon.
                expires_in: Duration::from_millis((*ms).max(0) as u64),
            }),
        ),
        _ => return Err(unexpected(&reply)),
    };
    Ok((claim, generation(Some(generation_raw.clone()))?))
}

impl CacheActor {
    fn lease_ttl_ms(&self) -> u64 {
        self.settings.lease_ttl.as_millis().max(1) as u64
    }
}

impl Handler<ClaimLoad> for CacheActor {
    type Result = ResponseActFuture<Self, Result<Claim, CacheError>>;

    fn handle(
        &mut self,
        ClaimLoad { id, token }: ClaimLoad,
        _: &mut Self::Context,
    ) -> Self::Result {
        let conn = self.connection();
        let keys = self.settings.keys.clone();
        let timeout = self.settings.timeout;
        let epoch = self.epoch;
        let distrust = Distrust::of(&self.suspects, id, epoch);
        let metrics = self.metrics.clone();
        let ttl_ms = self.lease_ttl_ms();
        self.call(async move {
            let conn = conn.await?;
            // `seen`: the value judged not fresh, which the claim must find unchanged.
            let claim = |seen: Option<Vec<u8>>| {
                let mut conn = conn.clone();
                let token = token.0.clone();
                let keys = keys.clone();
                async move {
                    let mode = if seen.is_some() { "seen" } else { "value" };
                    let reply: Value = CLAIM
                        .key(keys.value(id))
                        .key(keys.lease(id))
                        .key(keys.generation(id))
                        .arg(token)
                        .arg(ttl_ms)
                        .arg(mode)
                        .arg(seen.unwrap_or_default())
                        .invoke_async(&mut conn)
                        .await
                        .map_err(|e| CacheError::from_redis(e, timeout))?;
                    parse_claim(reply)
                }
            };
            // Another replica may fill the key between a look and a claim; a claim that finds a
            // new value looks at it instead. A value that keeps changing is a failed call.
            for _ in 0..3 {
                let (raw, generation) = match claim(None).await? {
                    (ClaimReply::Lease(state), generation) => {
                        return Ok(Claim {
                            value: None,
                            lease: Some(state),
                            fence: Fence { generation, epoch },
                        })
                    }
                    (ClaimReply::Value(raw), generation) => (Bytes::from(raw), generation),
                };
                let value = match usable(raw.clone(), id, distrust, &metrics) {
                    Ok(Some(cached)) if !cached.is_soft_expired() => {
                        return Ok(Claim {
                            value: Some(cached),
                            lease: None,
                            fence: Fence { generation, epoch },
                        })
                    }
                    Ok(value) => value,
                    Err(e) => {
                        metrics
                            .redis_errors_total
                            .with_label_values(&[e.kind()])
                            .inc();
                        None
                    }
                };
                // Soft-expired, suspect or not a template: reload it under the lease, unless it
                // changed meanwhile.
                if let (ClaimReply::Lease(state), generation) = claim(Some(raw.to_vec())).await? {
                    return Ok(Claim {
                        value,
                        lease: Some(state),
                        fence: Fence { generation, epoch },
                    });
                }
            }
            Err(CacheError::Protocol(format!(
                "template {id}'s value kept changing while its lease was claimed"
            )))
        })
    }
}

impl Handler<LeaseExtend> for CacheActor {
    type Result = ResponseActFuture<Self, Result<bool, CacheError>>;

    fn handle(
        &mut self,
        LeaseExtend { id, token }: LeaseExtend,
        _: &mut Self::Context,
    ) -> Self::Result {
        let conn = self.connection();
        let keys = self.settings.keys.clone();
        let timeout = self.settings.timeout;
        let ttl_ms = self.lease_ttl_ms();
        self.call(async move {
            let mut conn = conn.await?;
            EXTEND
                .key(keys.lease(id))
                .arg(token.0)
                .arg(ttl_ms)
                .invoke_async::<i64>(&mut conn)
                .await
                .map(|extended| extended == 1)
                .map_err(|e| CacheError::from_redis(e, timeout))
        })
    }
}

impl Handler<LeaseFill> for CacheActor {
    type Result = ResponseActFuture<Self, Result<bool, CacheError>>;

    fn handle(&mut self, fill: LeaseFill, _: &mut Self::Context) -> Self::Result {
        let LeaseFill {
            id,
            token,
            lookup,
            loaded_at_ms,
            from_replica,
            epoch,
        } = fill;
        // A Redis restarted or failed over since the claim may lack the change that makes this
        // load old: write nothing, but end the lease and tell the waiters, who load themselves.
        let same_redis = epoch == self.epoch;
        // Nothing to write (a "not found" that is not cached) does the same.
        let (value, expires_ms) = same_redis
            .then(|| self.entry_to_write(id, lookup, loaded_at_ms, epoch, from_replica))
            .flatten()
            .unwrap_or((Vec::new(), 0));
        let conn = self.connection();
        let keys = self.settings.keys.clone();
        let timeout = self.settings.timeout;
        let metrics = self.metrics.clone();
        let channel = self.fills_channel.clone();
        self.call(async move {
            let mut conn = conn.await?;
            let (publish, channel) = publish_to(&conn, &keys, &channel, id);
            let filled = FILL
                .key(keys.value(id))
                .key(keys.lease(id))
                .key(keys.generation(id))
                .arg(token.0)
                .arg(value)
                .arg(expires_ms)
                .arg(channel)
                .arg(notice(id, expires_ms != 0))
                .arg(publish)
                .invoke_async::<i64>(&mut conn)
                .await
                .map_err(|e| CacheError::from_redis(e, timeout))?;
            let outcome = match filled {
                1 if !same_redis => "changed",
                1 => "filled",
                2 => "changed",
                _ => "lost",
            };
            metrics
                .lease_fills_total
                .with_label_values(&[outcome])
                .inc();
            Ok(outcome == "filled")
        })
    }
}

impl Handler<LeaseRelease> for CacheActor {
    /// Ends when Redis has answered (or the call failed): [`HandBack`] waits for it.
    ///
    /// [`HandBack`]: crate::actors::key_owner::HandBack
    type Result = ResponseActFuture<Self, ()>;

    fn handle(
        &mut self,
        LeaseRelease { id, token }: LeaseRelease,
        _: &mut Self::Context,
    ) -> Self::Result {
        let conn = self.connection();
        let keys = self.settings.keys.clone();
        let timeout = self.settings.timeout;
        let channel = self.fills_channel.clone();
        let release = self.call(async move {
            let mut conn = conn.await?;
            let (publish, channel) = publish_to(&conn, &keys, &channel, id);
            RELEASE
                .key(keys.lease(id))
                .arg(token.0)
                .arg(channel)
                .arg(notice(id, true))
                .arg(publish)
                .invoke_async::<i64>(&mut conn)
                .await
                .map(|_| ())
                .map_err(|e| CacheError::from_redis(e, timeout))
        });
        // A release that fails costs the waiters at most the rest of the lease period.
        Box::pin(release.map(|_, _, _| ()))
    }
}
