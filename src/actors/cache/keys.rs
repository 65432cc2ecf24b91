//! The names the service gives things in Redis, all behind `CACHE_KEY_PREFIX` (empty by default),
//! so that deployments sharing one Redis keep apart:
//!
//! | name | holds |
//! |---|---|
//! | `{prefix}template:{N}` | template N's entry (see [`crate::template::Entry`]) |
//! | `{prefix}template:{N}:lease` | the fleet lease on loading it (see [`super::lease`]) |
//! | `{prefix}template:{N}:gen` | its generation, bumped by every change |
//! | `{prefix}singleflight:fills:DB` | the channel of lease fills and releases, for database DB |
//! | `{prefix}singleflight:fills:{T}` | in a cluster: the shard channel of fills and releases of the keys of one slot |
//!
//! The braces are Redis Cluster's *hash tag*: only `N` decides the slot, so the three keys of a
//! template live in one slot, and each script that touches them runs on one node. On a single
//! Redis they are only characters.
//!
//! # Notices in a cluster
//! A script can only publish to a shard channel of its own slot. So each slot has a channel,
//! whose tag `T` is a short text that hashes to that slot ([`slot_tag`]), and a replica
//! subscribes to all 16,384 of them (see [`crate::actors::fills`]): each node delivers the
//! notices of its own slots to its own subscribers, and nothing crosses the cluster bus.

use std::sync::{Arc, LazyLock};

/// Redis Cluster's slots.
pub const SLOTS: u16 = 16_384;

/// The names, with their prefix. Cloning shares the prefix.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Keys {
    prefix: Arc<str>,
}

impl Keys {
    pub fn new(prefix: &str) -> Keys {
        Keys {
            prefix: prefix.into(),
        }
    }

    /// Template `id`'s entry.
    pub fn value(&self, id: i64) -> String {
        format!("{}template:{{{id}}}", self.prefix)
    }

    /// The fleet lease on loading template `id`.
    pub fn lease(&self, id: i64) -> String {
        format!("{}:lease", self.value(id))
    }

    /// Template `id`'s generation: bumped by every replica that learns the row changed.
    pub fn generation(&self, id: i64) -> String {
        format!("{}:gen", self.value(id))
    }

    /// The pub/sub channel of lease fills and releases on a single Redis. Pub/sub ignores
    /// database numbers, so the channel names the database `db`: services sharing a Redis on
    /// different databases do not hear each other.
    pub fn fills_channel(&self, db: i64) -> String {
        format!("{}singleflight:fills:{db}", self.prefix)
    }

    /// In a cluster: the shard channel of fills and releases of the keys in `slot`.
    pub fn slot_channel(&self, slot: u16) -> String {
        format!("{}singleflight:fills:{{{}}}", self.prefix, slot_tag(slot))
    }

    /// In a cluster: the shard channel on which template `id`'s fills are announced.
    pub fn fills_channel_of(&self, id: i64) -> String {
        self.slot_channel(slot_of(id))
    }
}

/// The cluster slot of template `id`'s keys: CRC16 of its hash tag, modulo 16,384.
pub fn slot_of(id: i64) -> u16 {
    slot(id.to_string().as_bytes())
}

fn slot(tag: &[u8]) -> u16 {
    crc16::State::<crc16::XMODEM>::calculate(tag) % SLOTS
}

/// A short text that hashes to `slot`: the first decimal number that does.
pub fn slot_tag(slot: u16) -> &'static str {
    static TAGS: LazyLock<Vec<String>> = LazyLock::new(|| {
        let mut tags = vec![String::new(); usize::from(SLOTS)];
        let mut missing = tags.len();
        // About 170,000 numbers cover every slot (the coupon collector's n ln n).
        let mut n = 0u64;
        while missing > 0 {
            let text = n.to_string();
            let tag = &mut tags[usize::from(self::slot(text.as_bytes()))];
            if tag.is_empty() {
                *tag = text;
                missing -= 1;
            }
            n += 1;
        }
        tags
    });
    &TAGS[usize::from(slot % SLOTS)]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_prefix_goes_before_every_name_and_braces_only_around_the_id() {
        let plain = Keys::default();
        assert_eq!(plain.value(7), "template:{7}");
        assert_eq!(plain.lease(7), "template:{7}:lease");
        assert_eq!(plain.generation(7), "template:{7}:gen");
        assert_eq!(plain.fills_channel(3), "singleflight:fills:3");
        let shop = Keys::new("shop-a:");
        assert_eq!(shop.value(7), "shop-a:template:{7}");
        assert_eq!(shop.lease(7), "shop-a:template:{7}:lease");
        assert_eq!(shop.generation(7), "shop-a:template:{7}:gen");
        assert_eq!(shop.fills_channel(3), "shop-a:singleflight:fills:3");
    }

    #[test]
    fn slots_are_redis_clusters() {
        // Values from Redis's own CLUSTER KEYSLOT.
        assert_eq!(slot(b"foo"), 12_182);
        assert_eq!(slot(b"123456789"), 12_739);
        assert_eq!(slot_of(7), slot(b"7"));
    }

    #[test]
    fn every_slot_has_a_tag_that_hashes_to_it_and_a_templates_channel_shares_its_slot() {
        for s in 0..SLOTS {
            assert_eq!(slot(slot_tag(s).as_bytes()), s);
        }
        let keys = Keys::new("p:");
        for id in [0, 1, 7, 1_200, -5, i64::MAX] {
            let channel = keys.fills_channel_of(id);
            let tag = channel.split_once('{').unwrap().1.trim_end_matches('}');
            assert_eq!(slot(tag.as_bytes()), slot_of(id), "{channel}");
        }
    }
}
