//! The one thing this service serves — a template row, its JSON form, what a load found for a
//! key ([`Lookup`]) — and the format it is cached in ([`Entry`]). Every actor and the HTTP layer
//! share these types; they depend on no actor, so no actor module needs another for them.
//!
//! The JSON body is produced once, when a row is loaded from PostgreSQL, and then travels as
//! bytes: Redis stores exactly the body that clients receive, and a cache hit is answered without
//! re-serializing.

use std::time::Duration;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use diesel::prelude::*;
use serde::{Deserialize, Serialize};

use crate::schema::templates;

/// A row of `templates`, and the `200` body of `/template-details`.
#[derive(Debug, Clone, PartialEq, Eq, Queryable, Selectable, Serialize, Deserialize)]
#[diesel(table_name = templates)]
#[diesel(check_for_backend(diesel::pg::Pg))]
pub struct Template {
    pub id: i64,
    pub name: String,
    pub content: String,
    /// Serialized as RFC 3339 (chrono's serde format).
    pub updated_at: DateTime<Utc>,
}

impl Template {
    /// The response body for this template.
    pub fn to_body(&self) -> Bytes {
        // Serializing a struct of strings, an integer and a timestamp cannot fail.
        Bytes::from(serde_json::to_vec(self).unwrap_or_default())
    }

    /// Checks that cached bytes are a template body for `id`. Anything else found in Redis
    /// (another program's value, a truncated write, an older format) is treated as a miss.
    ///
    /// The whole body is parsed (a truncated one fails), but nothing of it is copied: renewals
    /// check every entry they read on the owner's thread, which shares its core with the HTTP
    /// workers, and a full [`Template`] would copy each name and content and parse each time.
    pub fn body_is_valid_for(body: &[u8], id: i64) -> bool {
        use serde::de::IgnoredAny;
        /// The fields of a [`Template`] body, only the id kept.
        #[derive(Deserialize)]
        struct Shape {
            id: i64,
            #[allow(dead_code)]
            name: IgnoredAny,
            #[allow(dead_code)]
            content: IgnoredAny,
            #[allow(dead_code)]
            updated_at: IgnoredAny,
        }
        serde_json::from_slice::<Shape>(body).is_ok_and(|shape| shape.id == id)
    }
}

/// What a flight produced for a key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lookup {
    /// The JSON body of the template.
    Found(Bytes),
    /// No template has this id.
    NotFound,
}

/// The payload stored for "no template has this id". It cannot be mistaken for a body: a body is
/// a JSON object with a `name`.
fn not_found_marker(id: i64) -> String {
    format!("{{\"not_found\":{id}}}")
}

/// An entry in Redis: one header line, then the payload (a template's JSON body, which has no
/// raw newline, or the not-found marker):
///
/// ```text
/// sf2 <loaded_at unix ms> <soft expiry unix ms> <epoch, hex> <p|r>
/// {"id":1,"name":...}
/// ```
///
/// Times are wall-clock: they give the entry's age and freshness, and are compared with another
/// replica's clock only for rows read from a read replica (`r`, see
/// [`crate::actors::cache`]'s suspects). The epoch is the Redis's the load began in (see
/// [`crate::actors::cache::Fence`]). An entry of the earlier format (`sf1`, no epoch) reads as
/// epoch 0, which no Redis has: it is reloaded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub loaded_at_ms: u64,
    pub soft_expiry_ms: u64,
    /// The epoch of the Redis in which the load began; 0 when unknown.
    pub epoch: u64,
    /// Read from a read replica (`DATABASE_READ_URL`), stamped as of what it had replayed.
    pub from_replica: bool,
    pub lookup: Lookup,
}

const ENTRY_TAG: &str = "sf2";
/// The format before epochs: `sf1 <loaded_at> <soft expiry>`.
const OLD_ENTRY_TAG: &str = "sf1";

impl Entry {
    pub fn encode(&self, id: i64) -> Vec<u8> {
        let source = if self.from_replica { 'r' } else { 'p' };
        let mut out = format!(
            "{ENTRY_TAG} {} {} {:x} {source}\n",
            self.loaded_at_ms, self.soft_expiry_ms, self.epoch
        )
        .into_bytes();
        match &self.lookup {
            Lookup::Found(body) => out.extend_from_slice(body),
            Lookup::NotFound => out.extend_from_slice(not_found_marker(id).as_bytes()),
        }
        out
    }

    /// Parses an entry for `id`; `None` for anything else (another program's value, a truncated
    /// write, an older format, a body for another id).
    pub fn decode(raw: Bytes, id: i64) -> Option<Entry> {
        let newline = raw.iter().position(|&b| b == b'\n')?;
        let header = std::str::from_utf8(&raw[..newline]).ok()?;
        let mut fields = header.split(' ');
        let old = match fields.next()? {
            ENTRY_TAG => false,
            OLD_ENTRY_TAG => true,
            _ => return None,
        };
        let loaded_at_ms = fields.next()?.parse().ok()?;
        let soft_expiry_ms = fields.next()?.parse().ok()?;
        let (epoch, from_replica) = if old {
            (0, false)
        } else {
            let epoch = u64::from_str_radix(fields.next()?, 16).ok()?;
            let from_replica = match fields.next()? {
                "p" => false,
                "r" => true,
                _ => return None,
            };
            (epoch, from_replica)
        };
        if fields.next().is_some() {
            return None;
        }
        let payload = raw.slice(newline + 1..);
        let lookup = if payload == not_found_marker(id).as_bytes() {
            Lookup::NotFound
        } else if Template::body_is_valid_for(&payload, id) {
            Lookup::Found(payload)
        } else {
            return None;
        };
        Some(Entry {
            loaded_at_ms,
            soft_expiry_ms,
            epoch,
            from_replica,
            lookup,
        })
    }
}

/// Wall-clock now, in unix milliseconds: the clock of [`Entry`] times, and of every moment
/// compared with them (when a load began, since when entries are suspect).
pub fn unix_ms_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// `ttl` spread by up to `pct` percent either way, so keys filled together do not expire
/// together. `seed` picks the point in the window (any well-mixed number will do).
pub fn jittered(ttl: Duration, pct: u32, seed: u64) -> Duration {
    if pct == 0 {
        return ttl;
    }
    // splitmix64: a cheap, well-mixed map from the seed to a uniform 64-bit number.
    let mut z = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    let unit = (z >> 11) as f64 / (1u64 << 53) as f64; // in [0, 1)
    let factor = 1.0 + (pct as f64 / 100.0) * (2.0 * unit - 1.0);
    ttl.mul_f64(factor.max(0.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Template {
        Template {
            id: 7,
            name: "Welcome email (en-US) v1".into(),
            content: "Hello {{customer.first_name}}".into(),
            updated_at: DateTime::parse_from_rfc3339("2026-11-26T10:00:00Z")
                .expect("valid timestamp")
                .with_timezone(&Utc),
        }
    }

    #[test]
    fn body_has_the_contract_fields_and_rfc3339_time() {
        let v: serde_json::Value = serde_json::from_slice(&sample().to_body()).expect("json");
        assert_eq!(v["id"], 7);
        assert_eq!(v["name"], "Welcome email (en-US) v1");
        assert_eq!(v["updated_at"], "2026-11-26T10:00:00Z");
    }

    #[test]
    fn cached_bytes_are_checked() {
        let body = sample().to_body();
        assert!(Template::body_is_valid_for(&body, 7));
        assert!(!Template::body_is_valid_for(&body, 8), "wrong id");
        assert!(
            !Template::body_is_valid_for(b"{\"id\":7}", 7),
            "missing fields"
        );
        assert!(!Template::body_is_valid_for(b"garbage", 7));
        let truncated = &body[..body.len() - 1];
        assert!(!Template::body_is_valid_for(truncated, 7), "truncated");
    }

    fn body(id: i64) -> Bytes {
        // A body's content may hold newlines; its JSON form does not, which the entry's header
        // line relies on.
        Template {
            id,
            name: "n".into(),
            content: "line one\nline two".into(),
            updated_at: Utc::now(),
        }
        .to_body()
    }

    #[test]
    fn entries_round_trip() {
        for (lookup, from_replica) in [(Lookup::Found(body(3)), true), (Lookup::NotFound, false)] {
            let entry = Entry {
                loaded_at_ms: 10,
                soft_expiry_ms: 20,
                epoch: 0xfeed_0000_0000_beef,
                from_replica,
                lookup,
            };
            let raw = Bytes::from(entry.encode(3));
            assert_eq!(Entry::decode(raw, 3), Some(entry));
        }
    }

    #[test]
    fn an_entry_of_the_format_before_epochs_reads_as_epoch_zero() {
        let mut raw = b"sf1 10 20\n".to_vec();
        raw.extend_from_slice(&body(3));
        let entry = Entry::decode(Bytes::from(raw), 3).expect("an entry");
        assert_eq!(
            (entry.loaded_at_ms, entry.epoch, entry.from_replica),
            (10, 0, false)
        );
    }

    #[test]
    fn anything_else_is_not_an_entry() {
        let good = Entry {
            loaded_at_ms: 1,
            soft_expiry_ms: 2,
            epoch: 1,
            from_replica: false,
            lookup: Lookup::Found(body(3)),
        };
        assert_eq!(
            Entry::decode(Bytes::from(good.encode(3)), 4),
            None,
            "a body for another id"
        );
        for raw in [
            body(3).to_vec(),                // a bare body (older format)
            b"sf1 1 2\n{\"id\":3}".to_vec(), // not a whole template
            b"sf1 x 2\n".to_vec(),           // a bad header
            b"sf2 1 2\n{}".to_vec(),         // no epoch
            b"sf2 1 2 a x\n{}".to_vec(),     // neither p nor r
            b"sf3 1 2 a p\n{}".to_vec(),     // another format
            b"garbage".to_vec(),
        ] {
            assert_eq!(Entry::decode(Bytes::from(raw.clone()), 3), None, "{raw:?}");
        }
    }

    #[test]
    fn jitter_spreads_ttls_over_the_window() {
        let ttl = Duration::from_secs(30);
        let ttls: Vec<Duration> = (0..1000).map(|i| jittered(ttl, 10, i)).collect();
        let (min, max) = (ttls.iter().min().unwrap(), ttls.iter().max().unwrap());
        assert!(*min >= Duration::from_secs(27) && *max <= Duration::from_secs(33));
        assert!(*min < Duration::from_millis(27_300) && *max > Duration::from_millis(32_700));
        let below = ttls.iter().filter(|t| **t < ttl).count();
        assert!((400..600).contains(&below), "{below} of 1000 below the TTL");
        assert_eq!(jittered(ttl, 0, 7), ttl);
    }
}
