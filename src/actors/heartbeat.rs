//! The change listener's proof that it hears (see "Proving that it hears" in
//! [`super::listener`]): which heartbeat is awaited, and what each tick decides.
//!
//! Every tick gives the verdict on the heartbeat sent at the previous one, then a new one goes
//! out. A heartbeat that was sent (committed through the pool) and not heard by the next tick
//! makes the listener deaf; the first of its own heartbeats heard while deaf makes it hear
//! again. A heartbeat that could not be sent gives no verdict. Every replica's listener hears
//! every replica's heartbeats: only its own tokens count.

use std::hash::BuildHasher;

use crate::template::unix_ms_now;

/// How a heartbeat's payload starts (a template's is a number, or `*`).
pub const PREFIX: &str = "heartbeat ";

/// What a tick decided about the listener's hearing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Nothing changed.
    Same,
    /// A heartbeat went out and did not come back.
    WentDeaf,
    /// A heartbeat came back after a deaf spell.
    HearsAgain,
}

#[derive(Debug, Clone)]
pub struct Heartbeat {
    /// Drawn when the listener starts: with the count, a token no other replica sends.
    seed: u64,
    /// Heartbeats made so far: the next one's number.
    made: u64,
    /// The last heartbeat sent and not heard yet.
    awaited: Option<String>,
    deaf: bool,
    /// Heard while deaf: said at the next tick.
    heard_while_deaf: bool,
}

impl Heartbeat {
    pub fn new() -> Self {
        let seed = std::collections::hash_map::RandomState::new()
            .hash_one((std::process::id(), unix_ms_now()));
        Heartbeat {
            seed,
            made: 0,
            awaited: None,
            deaf: false,
            heard_while_deaf: false,
        }
    }

    #[cfg(test)]
    pub fn is_deaf(&self) -> bool {
        self.deaf
    }

    /// The verdict on the last heartbeat (call at every tick, before [`Heartbeat::next`]).
    pub fn verdict(&mut self) -> Verdict {
        let unheard = self.awaited.take().is_some();
        if std::mem::take(&mut self.heard_while_deaf) {
            self.deaf = false;
            return Verdict::HearsAgain;
        }
        if unheard && !self.deaf {
            self.deaf = true;
            return Verdict::WentDeaf;
        }
        Verdict::Same
    }

    /// The payload of the next heartbeat; [`Heartbeat::sent`] once it is committed.
    pub fn next(&mut self) -> String {
        let n = self.made;
        self.made += 1;
        format!("{PREFIX}{:016x}-{n}", self.seed)
    }

    /// `payload` went out: it is awaited until the next tick.
    pub fn sent(&mut self, payload: String) {
        self.awaited = Some(payload);
    }

    /// A heartbeat payload arrived on the listener's connection.
    pub fn heard(&mut self, payload: &str) {
        if self.awaited.as_deref() == Some(payload) {
            self.awaited = None;
            self.heard_while_deaf |= self.deaf;
        }
    }

    /// The listener (re)connected: nothing is awaited on the new connection yet.
    pub fn reconnected(&mut self) {
        self.awaited = None;
    }
}

impl Default for Heartbeat {
    fn default() -> Self {
        Heartbeat::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One tick: the verdict, then a heartbeat that goes out and (if `heard`) comes back.
    fn tick(beat: &mut Heartbeat, sent: bool, heard: bool) -> Verdict {
        let verdict = beat.verdict();
        let payload = beat.next();
        if sent {
            beat.sent(payload.clone());
        }
        if heard {
            beat.heard(&payload);
        }
        verdict
    }

    #[test]
    fn a_heartbeat_sent_and_not_heard_makes_it_deaf_until_one_is_heard() {
        let mut beat = Heartbeat::new();
        assert_eq!(tick(&mut beat, true, true), Verdict::Same);
        assert_eq!(
            tick(&mut beat, true, false),
            Verdict::Same,
            "heard last time"
        );
        assert_eq!(tick(&mut beat, true, false), Verdict::WentDeaf);
        assert!(beat.is_deaf());
        assert_eq!(tick(&mut beat, true, true), Verdict::Same, "said once");
        assert_eq!(tick(&mut beat, true, true), Verdict::HearsAgain);
        assert!(!beat.is_deaf());
        assert_eq!(tick(&mut beat, true, true), Verdict::Same);
    }

    #[test]
    fn a_heartbeat_that_could_not_be_sent_proves_nothing() {
        let mut beat = Heartbeat::new();
        tick(&mut beat, false, false);
        assert_eq!(tick(&mut beat, false, false), Verdict::Same);
        assert!(!beat.is_deaf());
    }

    #[test]
    fn only_its_own_heartbeats_count() {
        let (mut mine, mut theirs) = (Heartbeat::new(), Heartbeat::new());
        mine.verdict();
        let payload = mine.next();
        mine.sent(payload);
        let other = theirs.next();
        assert!(other.starts_with(PREFIX));
        mine.heard(&other);
        assert_eq!(mine.verdict(), Verdict::WentDeaf);
    }

    #[test]
    fn a_reconnect_awaits_nothing_from_the_old_connection() {
        let mut beat = Heartbeat::new();
        beat.verdict();
        let payload = beat.next();
        beat.sent(payload);
        beat.reconnected();
        assert_eq!(beat.verdict(), Verdict::Same);
    }
}
