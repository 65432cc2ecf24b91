//! One relay loop for the service's two subscriptions: the change listener's `LISTEN` connection
//! to PostgreSQL ([`super::listener`]) and the lease notices' Redis pub/sub ([`super::fills`]).
//!
//! Each [`Subscription`] is kept up forever by [`relay_forever`]: connect and subscribe; say
//! that it is (re)connected (whatever was sent while it was down is lost, and its subscriber
//! must act on that); hand on every message that arrives; check a connection that has been
//! quiet for a while with a round trip of its own, since a connection stalled behind a
//! partition neither closes nor delivers; and on any failure, say why and connect again after
//! a pause. While connected, a subscription may also act on a clock of its own
//! ([`Subscription::tick`]: the change listener proves that it hears). The loop runs on a
//! [`Relay`] actor of its own, under a supervisor.

use std::time::Duration;

use actix::prelude::*;

/// A subscription that [`relay_forever`] keeps up. Its methods bound their own waits.
pub(crate) trait Subscription {
    /// A live, subscribed connection.
    type Connection;
    /// One message as it arrives.
    type Message;

    /// Connects and subscribes.
    async fn connect(&mut self) -> Result<Self::Connection, String>;

    /// Just (re)connected: messages sent while it was not connected are lost.
    async fn connected(&mut self);

    /// The next message; `None` once the connection closed.
    async fn next(&self, conn: &mut Self::Connection) -> Option<Result<Self::Message, String>>;

    /// A round trip that proves a quiet connection still answers.
    async fn check(&self, conn: &mut Self::Connection) -> Result<(), String>;

    /// Hands one message on.
    fn relay(&mut self, message: Self::Message);

    /// How often [`Subscription::tick`] runs while connected; `None`: never.
    fn tick_every(&self) -> Option<Duration> {
        None
    }

    /// Something to do now and then while connected.
    async fn tick(&mut self) {}

    /// The connection failed (`connected`: after it was up) or could not be made, because of
    /// `why`; it is made again after the pause.
    fn interrupted(&mut self, why: &str, connected: bool);
}

/// The actor that keeps one subscription up, through [`relay_forever`] on its context. The loop
/// never ends on its own; if the actor stops anyway, its supervisor starts it again and it
/// subscribes afresh from a copy of the subscription it was given.
pub struct Relay<S> {
    subscription: S,
    quiet_check: Duration,
    retry_delay: Duration,
}

impl<S> Relay<S> {
    /// A connection quiet for `quiet_check` is checked; a failed one is made again after
    /// `retry_delay`.
    pub(crate) fn keeping(subscription: S, quiet_check: Duration, retry_delay: Duration) -> Self {
        Relay {
            subscription,
            quiet_check,
            retry_delay,
        }
    }
}

impl<S: Subscription + Clone + Unpin + 'static> Actor for Relay<S> {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        let subscription = self.subscription.clone();
        let forever = relay_forever(subscription, self.quiet_check, self.retry_delay);
        ctx.spawn(forever.into_actor(self));
    }
}

impl<S: Subscription + Clone + Unpin + 'static> Supervised for Relay<S> {}

impl<S: Subscription + Clone + Unpin + 'static> Handler<super::Alive> for Relay<S> {
    type Result = ();

    fn handle(&mut self, _: super::Alive, _: &mut Self::Context) {}
}

/// Keeps `subscription` up forever: messages relayed as they arrive, a connection quiet for
/// `quiet_check` checked, a failed one made again after `retry_delay`.
pub(crate) async fn relay_forever<S: Subscription>(
    mut subscription: S,
    quiet_check: Duration,
    retry_delay: Duration,
) {
    loop {
        match subscription.connect().await {
            Ok(mut conn) => {
                subscription.connected().await;
                let why = relay(&mut subscription, &mut conn, quiet_check).await;
                subscription.interrupted(&why, true);
            }
            Err(why) => subscription.interrupted(&why, false),
        }
        tokio::time::sleep(retry_delay).await;
    }
}

/// What the relay loop waited for.
enum Event<M> {
    Next(Option<Result<M, String>>),
    Quiet,
    Tick,
}

/// Relays messages until the connection fails; returns why it stopped.
async fn relay<S: Subscription>(
    subscription: &mut S,
    conn: &mut S::Connection,
    quiet_check: Duration,
) -> String {
    let mut ticks = subscription.tick_every().map(|every| {
        let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ticks
    });
    let mut quiet_until = tokio::time::Instant::now() + quiet_check;
    loop {
        let tick = async {
            match ticks.as_mut() {
                Some(ticks) => drop(ticks.tick().await),
                None => std::future::pending().await,
            }
        };
        let event = tokio::select! {
            next = subscription.next(conn) => Event::Next(next),
            () = tokio::time::sleep_until(quiet_until) => Event::Quiet,
            () = tick => Event::Tick,
        };
        match event {
            Event::Next(Some(Ok(message))) => {
                quiet_until = tokio::time::Instant::now() + quiet_check;
                subscription.relay(message);
            }
            Event::Next(Some(Err(why))) => return why,
            Event::Next(None) => return "the connection closed".to_owned(),
            Event::Quiet => {
                if let Err(why) = subscription.check(conn).await {
                    return why;
                }
                quiet_until = tokio::time::Instant::now() + quiet_check;
            }
            Event::Tick => subscription.tick().await,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;
    use std::collections::VecDeque;
    use std::rc::Rc;

    use tokio::sync::oneshot;

    use super::*;

    /// What a scripted connection's `next` yields: a message, a failure, or a quiet spell that
    /// lasts as long as the connection.
    enum Step {
        Message(u32),
        Fails(&'static str),
        Quiet,
    }

    /// A subscription whose connection attempts are scripted; what the loop did goes to `log`.
    struct Scripted {
        attempts: VecDeque<Result<VecDeque<Step>, &'static str>>,
        /// How many checks of a quiet connection succeed before one fails.
        checks_answered: usize,
        log: Rc<RefCell<Vec<String>>>,
        /// Told when the script is over.
        over: Option<oneshot::Sender<()>>,
    }

    impl Subscription for Scripted {
        type Connection = VecDeque<Step>;
        type Message = u32;

        async fn connect(&mut self) -> Result<Self::Connection, String> {
            match self.attempts.pop_front() {
                Some(attempt) => attempt.map_err(str::to_owned),
                None => {
                    if let Some(over) = self.over.take() {
                        let _ = over.send(());
                    }
                    std::future::pending().await
                }
            }
        }

        async fn connected(&mut self) {
            self.log.borrow_mut().push("connected".into());
        }

        async fn next(&self, conn: &mut Self::Connection) -> Option<Result<u32, String>> {
            if let Some(Step::Quiet) = conn.front() {
                return std::future::pending().await;
            }
            match conn.pop_front()? {
                Step::Message(n) => Some(Ok(n)),
                Step::Fails(why) => Some(Err(why.to_owned())),
                Step::Quiet => None,
            }
        }

        async fn check(&self, _: &mut Self::Connection) -> Result<(), String> {
            let mut log = self.log.borrow_mut();
            log.push("checked".into());
            let checks = log.iter().filter(|line| *line == "checked").count();
            if checks > self.checks_answered {
                return Err("no answer".into());
            }
            Ok(())
        }

        fn relay(&mut self, message: u32) {
            self.log.borrow_mut().push(format!("message {message}"));
        }

        fn interrupted(&mut self, why: &str, connected: bool) {
            let when = if connected {
                "after connecting"
            } else {
                "connecting"
            };
            self.log.borrow_mut().push(format!("{when}: {why}"));
        }
    }

    /// Runs the loop over `attempts` until the script is over; returns what it did.
    async fn run(
        attempts: Vec<Result<Vec<Step>, &'static str>>,
        checks_answered: usize,
    ) -> Vec<String> {
        let log = Rc::new(RefCell::new(Vec::new()));
        let (over, script_over) = oneshot::channel();
        let scripted = Scripted {
            attempts: attempts
                .into_iter()
                .map(|attempt| attempt.map(VecDeque::from))
                .collect(),
            checks_answered,
            log: log.clone(),
            over: Some(over),
        };
        let forever = relay_forever(
            scripted,
            Duration::from_millis(10),
            Duration::from_millis(1),
        );
        let bounded = tokio::time::timeout(Duration::from_secs(10), script_over);
        tokio::select! {
            () = forever => unreachable!("the loop never ends"),
            over = bounded => over.expect("the script ends").expect("told"),
        }
        log.take()
    }

    #[tokio::test]
    async fn every_failure_is_told_and_followed_by_a_new_connection() {
        let log = run(
            vec![
                Err("refused"),
                Ok(vec![Step::Message(1), Step::Message(2)]),
                Ok(vec![Step::Message(3), Step::Fails("reset")]),
                Ok(vec![Step::Quiet]),
            ],
            0,
        )
        .await;
        assert_eq!(
            log,
            [
                "connecting: refused",
                "connected",
                "message 1",
                "message 2",
                "after connecting: the connection closed",
                "connected",
                "message 3",
                "after connecting: reset",
                "connected",
                "checked",
                "after connecting: no answer",
            ]
        );
    }

    #[tokio::test]
    async fn a_quiet_connection_is_kept_while_it_answers_its_checks() {
        let log = run(vec![Ok(vec![Step::Message(1), Step::Quiet])], 3).await;
        assert_eq!(
            log,
            [
                "connected",
                "message 1",
                "checked",
                "checked",
                "checked",
                "checked",
                "after connecting: no answer",
            ]
        );
    }
}
