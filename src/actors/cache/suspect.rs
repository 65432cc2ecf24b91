//! Which Redis entries this replica no longer trusts: entries that may be older than a change it
//! learned of, or older than a moment at which it may have missed one.
//!
//! An entry records when its load read the database (`loaded_at_ms`). It is a *suspect* — read
//! as a miss, reloaded, and overwritten by the reload — when it was loaded before either
//! - the last moment this replica may have missed changes ([`Suspects::all_before`]: the change
//!   listener reconnected, or a delete of a changed key failed and the old value may still be
//!   there), or
//! - for a row read from a read replica only, the last change to its own key that this replica
//!   learned of ([`Suspects::changed`]): such a row is stamped as of what the read replica had
//!   replayed, which may be before a change whose generation bump the load's fence already
//!   saw (see [`super::Fence`]).
//!
//! A row read from the primary needs no such record: its write is fenced on the key's
//! generation, so a load that began before a change writes nothing once any replica has bumped
//! it — decided in Redis, with no clock compared between replicas.
//!
//! While the change listener is deaf, an entry loaded longer ago than a short bound is a suspect
//! too ([`Suspects::deafness`]): a change may have gone unheard.
//!
//! The per-key records are bounded: a record older than an entry's whole life can go, since
//! every entry loaded before it has expired; past [`MAX_CHANGE_RECORDS`] every entry loaded
//! before now becomes suspect instead, which costs reloads, never freshness.

use std::collections::HashMap;
use std::time::Duration;

use crate::template::unix_ms_now;

/// Change records kept per cache actor.
const MAX_CHANGE_RECORDS: usize = 100_000;

pub(super) struct Suspects {
    /// Entries loaded before this wall-clock time (unix ms) are misses, whatever their key.
    all_before_ms: u64,
    /// Per key, when this replica last learned that its row changed.
    changed_at_ms: HashMap<i64, u64>,
    /// Longer than any entry lives in Redis (soft TTL, the largest jitter, grace).
    entry_lifetime: Duration,
    /// While the change listener is deaf: entries loaded longer ago than this are misses.
    max_age: Option<Duration>,
}

impl Suspects {
    /// `entry_lifetime`: how long an entry can live in Redis at the most.
    pub(super) fn new(entry_lifetime: Duration) -> Self {
        Suspects {
            all_before_ms: 0,
            changed_at_ms: HashMap::new(),
            entry_lifetime,
            max_age: None,
        }
    }

    /// Entries loaded before this wall-clock time (unix ms) are misses, whatever their key.
    pub(super) fn before(&self) -> u64 {
        let too_old = self.max_age.map_or(0, |age| {
            unix_ms_now().saturating_sub(age.as_millis() as u64)
        });
        self.all_before_ms.max(too_old)
    }

    /// Entries of `id` read from a read replica and stamped before this wall-clock time (unix
    /// ms) are misses too: this replica learned of a change to `id` then.
    pub(super) fn replica_rows_before(&self, id: i64) -> u64 {
        self.changed_at_ms.get(&id).copied().unwrap_or(0)
    }

    /// The change listener went deaf (`Some`: entries loaded longer than `max_age` ago are
    /// misses) or hears again (`None`).
    pub(super) fn deafness(&mut self, max_age: Option<Duration>) {
        self.max_age = max_age;
    }

    /// Every entry loaded before `unix_ms` is a miss from now on.
    pub(super) fn all_before(&mut self, unix_ms: u64) {
        self.all_before_ms = self.all_before_ms.max(unix_ms);
    }

    /// `id` changed now: its entries loaded before now are misses from now on.
    pub(super) fn changed(&mut self, id: i64) {
        self.changed_at(id, unix_ms_now());
    }

    fn changed_at(&mut self, id: i64, now: u64) {
        self.changed_at_ms.insert(id, now);
        if self.changed_at_ms.len() > MAX_CHANGE_RECORDS {
            let horizon = now.saturating_sub(self.entry_lifetime.as_millis() as u64);
            self.changed_at_ms.retain(|_, at| *at >= horizon);
            if self.changed_at_ms.len() > MAX_CHANGE_RECORDS / 2 {
                self.all_before(now);
                self.changed_at_ms.clear();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIFETIME: Duration = Duration::from_secs(60);

    #[test]
    fn a_change_makes_only_its_own_key_suspect() {
        let mut suspects = Suspects::new(LIFETIME);
        assert_eq!(suspects.before(), 0);
        suspects.changed_at(1, 5_000);
        assert_eq!(
            (
                suspects.replica_rows_before(1),
                suspects.replica_rows_before(2)
            ),
            (5_000, 0)
        );
        assert_eq!(suspects.before(), 0, "a primary row is fenced instead");
    }

    #[test]
    fn all_before_only_ever_moves_forward() {
        let mut suspects = Suspects::new(LIFETIME);
        suspects.all_before(3_000);
        assert_eq!(suspects.before(), 3_000);
        suspects.all_before(2_000);
        assert_eq!(suspects.before(), 3_000, "never moves back");
        suspects.all_before(9_000);
        assert_eq!(suspects.before(), 9_000);
    }

    #[test]
    fn records_beyond_the_bound_make_everything_before_now_suspect() {
        let mut suspects = Suspects::new(LIFETIME);
        let now = 1_000_000_000;
        // Old records go first: every entry loaded before them has expired.
        for id in 0..MAX_CHANGE_RECORDS as i64 {
            suspects.changed_at(id, now - 2 * LIFETIME.as_millis() as u64);
        }
        suspects.changed_at(-1, now);
        assert_eq!(suspects.changed_at_ms.len(), 1, "expired records dropped");
        assert_eq!(suspects.replica_rows_before(-1), now);
        assert_eq!(
            suspects.replica_rows_before(5),
            0,
            "no longer suspect: expired anyway"
        );
        // Young records that cannot be dropped: everything before now turns suspect.
        for id in 0..MAX_CHANGE_RECORDS as i64 {
            suspects.changed_at(id, now + 1);
        }
        assert!(suspects.changed_at_ms.is_empty());
        assert_eq!(suspects.before(), now + 1);
    }
}
