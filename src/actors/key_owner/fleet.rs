//! A flight's part in the fleet lease (see "Fleet" in the module docs of [`super`], and
//! [`crate::actors::cache::ClaimLoad`] for the Redis side): claiming a key's lease, loading under
//! it while extending it, waiting on another replica that holds it, and giving it back.
//!
//! A flight's [`Role`] moves like this (a change supersedes it from any role; see
//! [`super::supersede`]):
//!
//! | role | entered when | leaves it |
//! |---|---|---|
//! | local | the lease is off; Redis failed; a wait lasted a flight; a peer's fill wrote nothing | never: it loads on its own |
//! | claiming | the flight starts; a wait is woken (notice or timer) | by Redis's answer: a value ends the flight, the lease makes it holding, another's lease makes it awaiting, a failure makes it local |
//! | holding | the claim got the lease | when its load ends: the fill (or the release, if it failed) |
//! | awaiting | another replica holds the lease | woken by that replica's notice ([`super::PeerFilled`]) or by its timer: claiming again |

use std::cell::Cell;
use std::hash::BuildHasher;
use std::rc::Rc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use tracing::{info_span, Span};

use super::answers::{answer, Settled};
use super::deps::LeaseDeps;
use super::flight::Phase;
use super::messages::{FlightError, Origin};
use super::KeyOwner;
use crate::actors::cache::{Claim, ClaimLoad, LeaseExtend, LeaseRelease, LeaseState, LeaseToken};
use crate::actors::contain;
use crate::template::{unix_ms_now, Lookup};

/// A flight's part in the fleet lease.
pub(super) enum Role {
    /// On its own: the lease is off, Redis failed, or the flight was superseded.
    Local,
    /// A [`ClaimLoad`] is in the air.
    Claiming {
        /// The wait on another replica's lease that this claim ends, if it follows one.
        after: Option<Waited>,
        /// A notice arrived while the claim was in the air: the claim may have seen the lease
        /// just before the fill, so a wait it starts looks again at once.
        notice_missed: bool,
    },
    /// This flight holds the lease: it loads the key and fills it for the fleet.
    Holding {
        token: LeaseToken,
        /// Cleared to stop extending the lease (the flight was superseded and gave it up).
        extending: Rc<Cell<bool>>,
    },
    /// Another replica holds the lease: waiting for its fill notice, or for its lease to run
    /// out.
    Awaiting {
        since: Instant,
        /// The timer that looks at the lease again.
        timer: SpawnHandle,
    },
}

/// A wait on another replica's lease, ended by a new claim.
#[derive(Debug, Clone, Copy)]
pub(super) struct Waited {
    since: Instant,
    woken_by: Wake,
}

/// What ended a wait on another replica's lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Wake {
    /// The holder's notice (a fill or a release): a claim after it is not a take-over.
    Notice,
    /// The timer: the lease may have run out unfilled (the holder died).
    Timer,
}

impl KeyOwner {
    /// The lease token of flight `flight_id`: unique across the fleet.
    fn token(&self, flight_id: u64) -> LeaseToken {
        LeaseToken(format!("{:016x}-{}-{flight_id}", self.replica, self.shard))
    }

    /// Asks Redis for `id`'s value or, when it needs loading, for its lease; `after` is the
    /// wait this claim ends, if any.
    pub(super) fn claim(
        &mut self,
        id: i64,
        flight_id: u64,
        after: Option<Waited>,
        ctx: &mut Context<Self>,
    ) {
        let Some(lease) = &self.deps.lease else {
            return self.load(id, flight_id, ctx);
        };
        let token = self.token(flight_id);
        let ask = lease.claim.send(ClaimLoad {
            id,
            token: token.clone(),
        });
        let Some((flight, _)) = self.flight_mut(id, flight_id) else {
            return;
        };
        flight.role = Role::Claiming {
            after,
            notice_missed: false,
        };
        // A failed call (Redis down, breaker open, the cache actor gone) is `None`.
        let ask = async move { Ok(ask.await.ok().and_then(Result::ok)) };
        let spans = self.stage_spans(
            id,
            flight_id,
            |f| info_span!(parent: f, "redis.read", lease = true),
        );
        self.spawn_stage(ctx, spans, ask, move |owner, result, ctx| {
            owner.on_claim(id, flight_id, token, result.ok().flatten(), ctx)
        });
    }

    /// What Redis said about `id`: a fresh value ends the flight; otherwise this flight loads
    /// under the lease, waits for the replica that holds it, or — Redis failing — loads on its
    /// own. A soft-expired value is answered at once, as without the lease.
    fn on_claim(
        &mut self,
        id: i64,
        flight_id: u64,
        token: LeaseToken,
        claim: Option<Claim>,
        ctx: &mut Context<Self>,
    ) {
        let claiming = match self.flight_mut(id, flight_id) {
            Some((flight, true)) => match flight.role {
                Role::Claiming {
                    after,
                    notice_missed,
                } => Some((after, notice_missed)),
                _ => None,
            },
            _ => None,
        };
        let Some((after, notice_missed)) = claiming else {
            // Superseded (it loads on its own now) or ended: a lease it got goes back at once.
            if let Some(Claim {
                lease: Some(LeaseState::Ours),
                ..
            }) = claim
            {
                self.release(id, token);
            }
            return;
        };
        let waited_since = after.map(|waited| waited.since);
        if let (Some(claim), Some((flight, _))) = (&claim, self.flight_mut(id, flight_id)) {
            flight.fence = Some(claim.fence);
        }
        if let Some(cached) = claim.as_ref().and_then(|claim| claim.value.as_ref()) {
            self.holds(id, flight_id, &cached.lookup);
        }
        match claim {
            Some(Claim {
                value: Some(cached),
                lease: None,
                ..
            }) => {
                self.end_wait(id, flight_id, waited_since);
                self.near_cache
                    .remember(id, &cached.lookup, Instant::now(), cached.fresh_for);
                let origin = match waited_since {
                    Some(_) => Origin::Peer,
                    None => Origin::Cache,
                };
                self.finish(id, flight_id, Settled::Fresh(cached.lookup, origin));
            }
            Some(Claim {
                value,
                lease: Some(state),
                ..
            }) => {
                if let Some(cached) = value {
                    self.revalidate(id, flight_id, cached.lookup);
                }
                match state {
                    LeaseState::Ours => {
                        if after.is_some_and(|waited| waited.woken_by == Wake::Timer) {
                            self.deps.metrics.lease_takeovers_total.inc();
                        }
                        self.end_wait(id, flight_id, waited_since);
                        self.deps.metrics.lease_claims_total.inc();
                        if let Some((flight, _)) = self.flight_mut(id, flight_id) {
                            flight.role = Role::Holding {
                                token,
                                extending: Rc::new(Cell::new(true)),
                            };
                        }
                        self.load(id, flight_id, ctx);
                    }
                    LeaseState::Theirs { expires_in } => {
                        self.await_peer(id, flight_id, waited_since, notice_missed, expires_in, ctx)
                    }
                }
            }
            _ => {
                // Redis failed: coalesce locally, as without the lease.
                self.end_wait(id, flight_id, waited_since);
                self.load_locally(id, flight_id, ctx);
            }
        }
    }

    /// A soft-expired value for `id`: its waiters get it now (`STALE`), and so do arrivals while
    /// it is reloaded; renewals wait for the reload. A flight already refreshing keeps the value
    /// it serves.
    fn revalidate(&mut self, id: i64, flight_id: u64, stale: Lookup) {
        let Some((flight, _)) = self.flight_mut(id, flight_id) else {
            return;
        };
        if matches!(flight.phase, Phase::Refreshing(_)) {
            return;
        }
        flight.phase = Phase::Refreshing(stale.clone());
        let settled = Settled::Revalidating(stale);
        for waiter in self.take_waiters(id, flight_id) {
            answer(&self.deps.metrics, waiter, &settled, None);
        }
    }

    /// Another replica holds `id`'s lease for `expires_in`: wait for its notice, and look again
    /// by the time the lease would run out (sooner, in case a notice is lost). `waited_since`:
    /// when this flight's wait on it began, if it already waited.
    fn await_peer(
        &mut self,
        id: i64,
        flight_id: u64,
        waited_since: Option<Instant>,
        notice_missed: bool,
        expires_in: Duration,
        ctx: &mut Context<Self>,
    ) {
        let Some(lease_ttl) = self.deps.lease.as_ref().map(|l| l.ttl) else {
            return;
        };
        let since = waited_since.unwrap_or_else(|| {
            self.deps.metrics.lease_waits_total.inc();
            Instant::now()
        });
        if waited_since.is_none() {
            let span = info_span!(parent: &self.flight_span(id, flight_id), "lease.wait");
            if let Some((flight, _)) = self.flight_mut(id, flight_id) {
                flight.lease_wait = span;
            }
        }
        if since.elapsed() >= self.deps.settings.flight_timeout {
            // The holder keeps extending but never fills: as long as a flight may take, and no
            // longer, this flight's waiters depend on another replica.
            self.end_wait(id, flight_id, Some(since));
            return self.load_locally(id, flight_id, ctx);
        }
        if notice_missed {
            let woken = Waited {
                since,
                woken_by: Wake::Notice,
            };
            return self.claim(id, flight_id, Some(woken), ctx);
        }
        let delay = (expires_in + Duration::from_millis(2)).min(lease_ttl / 4);
        let timer = ctx.run_later(delay, move |owner, ctx| {
            contain(owner, ctx, "a lease timer", |owner, ctx| {
                owner.wake(id, flight_id, Wake::Timer, ctx)
            });
        });
        if let Some((flight, _)) = self.flight_mut(id, flight_id) {
            flight.role = Role::Awaiting { since, timer };
        }
    }

    /// Looks at the lease again for a flight waiting on it, after a notice or when its timer
    /// fires. A notice that arrives while a claim is in the air is remembered for that claim.
    pub(super) fn wake(&mut self, id: i64, flight_id: u64, by: Wake, ctx: &mut Context<Self>) {
        let Some((flight, true)) = self.flight_mut(id, flight_id) else {
            return;
        };
        match &mut flight.role {
            Role::Claiming { notice_missed, .. } if by == Wake::Notice => *notice_missed = true,
            Role::Awaiting { since, timer } => {
                let (since, timer) = (*since, *timer);
                ctx.cancel_future(timer);
                let woken = Waited {
                    since,
                    woken_by: by,
                };
                self.claim(id, flight_id, Some(woken), ctx);
            }
            _ => {}
        }
    }

    /// Stops waiting on another replica's lease for `id` and loads it here, as without the
    /// lease (a fill that wrote nothing).
    pub(super) fn load_alone(&mut self, id: i64, flight_id: u64, ctx: &mut Context<Self>) {
        let Some((flight, true)) = self.flight_mut(id, flight_id) else {
            return;
        };
        let Role::Awaiting { since, timer } = flight.role else {
            return;
        };
        ctx.cancel_future(timer);
        self.end_wait(id, flight_id, Some(since));
        self.load_locally(id, flight_id, ctx);
    }

    /// The flight takes no further part in the lease and loads the key on its own.
    fn load_locally(&mut self, id: i64, flight_id: u64, ctx: &mut Context<Self>) {
        if let Some((flight, _)) = self.flight_mut(id, flight_id) {
            flight.role = Role::Local;
        }
        self.load(id, flight_id, ctx);
    }

    /// A wait on another replica's lease that began at `waited_since` (if any) is over.
    fn end_wait(&mut self, id: i64, flight_id: u64, waited_since: Option<Instant>) {
        if let Some((flight, _)) = self.flight_mut(id, flight_id) {
            flight.lease_wait = Span::none();
        }
        if let Some(since) = waited_since {
            let waited = since.elapsed().as_secs_f64();
            self.deps.metrics.lease_wait_seconds.observe(waited);
        }
    }

    /// [`HandBack`](super::HandBack): gives up the lease of every flight that holds one and is
    /// not filling it (a fill in the air ends the lease itself); those flights go on alone.
    /// The future ends when Redis has taken every release, with their count.
    pub(super) fn hand_back(&mut self) -> impl std::future::Future<Output = usize> + 'static {
        let mut releases = Vec::new();
        for (&id, flight) in &mut self.flights {
            if matches!(flight.phase, Phase::Filling(_)) {
                continue;
            }
            if let Role::Holding { extending, .. } = &flight.role {
                extending.set(false);
                if let Role::Holding { token, .. } =
                    std::mem::replace(&mut flight.role, Role::Local)
                {
                    releases.push(LeaseRelease { id, token });
                }
            }
        }
        let release = self.deps.lease.as_ref().map(|lease| lease.release.clone());
        async move {
            let Some(release) = release else { return 0 };
            let sent = releases.into_iter().map(|r| release.send(r));
            let answered = futures_util::future::join_all(sent).await;
            answered.into_iter().filter(Result::is_ok).count()
        }
    }

    /// Gives `id`'s lease up: the waiting replicas look again at once.
    pub(super) fn release(&self, id: i64, token: LeaseToken) {
        if let Some(lease) = &self.deps.lease {
            lease.release.do_send(LeaseRelease { id, token });
        }
    }
}

/// A random number for this owner's lease tokens, drawn when it starts: with the shard and the
/// flight id, it makes tokens unique across the fleet.
pub(super) fn replica_token_seed(shard: usize) -> u64 {
    std::collections::hash_map::RandomState::new().hash_one((
        std::process::id(),
        shard,
        unix_ms_now(),
    ))
}

/// `load`, with the lease extended every third of its TTL until the load ends or `keep` is
/// cleared.
pub(super) async fn extending<T>(
    id: i64,
    token: LeaseToken,
    lease: LeaseDeps,
    keep: Rc<Cell<bool>>,
    load: impl std::future::Future<Output = Result<T, FlightError>>,
) -> Result<T, FlightError> {
    let every = lease.ttl / 3;
    let extend = async move {
        loop {
            tokio::time::sleep(every).await;
            if !keep.get() {
                return;
            }
            let extension = LeaseExtend {
                id,
                token: token.clone(),
            };
            // An extension that fails leaves the lease to run out: then another replica may
            // take over, and this holder's fill writes nothing.
            let _ = lease.extend.send(extension).await;
        }
    };
    let (load, extend) = (std::pin::pin!(load), std::pin::pin!(extend));
    match futures_util::future::select(load, extend).await {
        futures_util::future::Either::Left((loaded, _)) => loaded,
        futures_util::future::Either::Right((_, load)) => load.await,
    }
}
