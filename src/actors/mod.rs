//! The actors: a sharded set of [`key_owner::KeyOwner`]s that deduplicate loads, the
//! [`cache::CacheActor`]s that own Redis connections, and the [`db::DbActor`] that owns the
//! PostgreSQL pool, the [`listener::ChangeListener`] that turns row changes into
//! invalidations, and the [`fills::FillSubscriber`] that wakes flights waiting on another
//! replica's lease. The last two keep a subscription up through one loop ([`relay`]).
//!
//! Every one of them runs under an actix [`Supervisor`](actix::Supervisor): if it stops, it is
//! started again with the same address, so senders never hold a dead one. A panic does not stop
//! an actor by itself — it would unwind through the arbiter and end the actor for good, with no
//! restart — so handlers and flight callbacks run inside [`contain`], which turns a panic into a
//! stop (and so a restart that resets the actor's state).

pub mod cache;
pub mod db;
#[cfg(any(test, feature = "test-fakes"))]
pub mod fakes;
pub mod fills;
mod heartbeat;
pub mod key_owner;
pub mod listener;
mod relay;

use std::panic::{catch_unwind, AssertUnwindSafe};

use actix::{Actor, ActorContext, Context, Message};

/// The change listener is deaf (`Some(max_age)`: no cached value older than that may be served
/// without a reload) or hears again (`None`). Sent to every cache actor and key owner (see
/// [`listener`]'s "Proving that it hears").
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct Deafness(pub Option<std::time::Duration>);

/// Readiness: answered at once by a running actor (a key owner, the change listener), so that a
/// stopped or stuck one is found.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct Alive;

/// Runs `f` on `actor`. A panic inside it is logged and stops the actor (its supervisor then
/// restarts it), and `None` is returned; otherwise `f`'s result.
pub(crate) fn contain<A, R>(
    actor: &mut A,
    ctx: &mut Context<A>,
    what: &str,
    f: impl FnOnce(&mut A, &mut Context<A>) -> R,
) -> Option<R>
where
    A: Actor<Context = Context<A>>,
{
    match catch_unwind(AssertUnwindSafe(|| f(actor, ctx))) {
        Ok(result) => Some(result),
        Err(_panic) => {
            log::error!("{what} panicked; restarting the actor");
            ctx.stop();
            None
        }
    }
}
