//! The names the service gives things in Redis, all behind `CACHE_KEY_PREFIX` (empty by default,
//! which keeps the names below as they are), so that deployments sharing one Redis keep apart:
//!
//! | name | holds |
//! |---|---|
//! | `{prefix}template:N` | template N's entry (see [`crate::template::Entry`]) |
//! | `{prefix}template:N:lease` | the fleet lease on loading it (see [`super::lease`]) |
//! | `{prefix}template:N:gen` | its generation, bumped by every change |
//! | `{prefix}singleflight:fills:DB` | the channel of lease fills and releases, for database DB |

use std::sync::Arc;

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
        format!("{}template:{id}", self.prefix)
    }

    /// The fleet lease on loading template `id`.
    pub fn lease(&self, id: i64) -> String {
        format!("{}:lease", self.value(id))
    }

    /// Template `id`'s generation: bumped by every replica that learns the row changed.
    pub fn generation(&self, id: i64) -> String {
        format!("{}:gen", self.value(id))
    }

    /// The pub/sub channel of lease fills and releases. Pub/sub ignores database numbers, so the
    /// channel names the database `db`: services sharing a Redis on different databases do not
    /// hear each other.
    pub fn fills_channel(&self, db: i64) -> String {
        format!("{}singleflight:fills:{db}", self.prefix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_prefix_keeps_the_names_and_a_prefix_goes_before_every_one() {
        let plain = Keys::default();
        assert_eq!(plain.value(7), "template:7");
        assert_eq!(plain.lease(7), "template:7:lease");
        assert_eq!(plain.generation(7), "template:7:gen");
        assert_eq!(plain.fills_channel(3), "singleflight:fills:3");
        let shop = Keys::new("shop-a:");
        assert_eq!(shop.value(7), "shop-a:template:7");
        assert_eq!(shop.lease(7), "shop-a:template:7:lease");
        assert_eq!(shop.generation(7), "shop-a:template:7:gen");
        assert_eq!(shop.fills_channel(3), "shop-a:singleflight:fills:3");
    }
}
