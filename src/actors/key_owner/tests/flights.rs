//! Flights: one cache read and at most one load per key however many ask, keys that never
//! wait on each other, failures that reach every waiter and are never cached, bounds that shed,
//! and refresh-ahead of a soft-expired value.

use super::*;

#[actix_rt::test]
async fn a_cold_stampede_costs_one_cache_read_and_one_query() {
    let h = Setup::default().start();
    let answers = h.burst(7, 200).await;

    assert_eq!(h.gets(), 1, "one Redis read");
    assert_eq!(h.queries(), 1, "one database query");
    let first = &answers[0].result;
    assert!(matches!(first, Ok(Lookup::Found(_))));
    assert!(
        answers.iter().all(|a| &a.result == first),
        "identical answers"
    );
    assert_eq!(count(&answers, XCache::Miss), 1);
    assert_eq!(count(&answers, XCache::Shared), 199);
    assert_eq!(h.metrics.singleflight_shared_total.get(), 199);
    assert_eq!(h.metrics.cache_misses_total.get(), 200);
    h.idle().await;
    assert_eq!(h.sets(), 1, "one cache fill");
}

#[actix_rt::test]
async fn a_hot_key_is_read_from_the_cache_once_per_flight() {
    let h = Setup::default()
        .cached(vec![3])
        .cache_delay(Duration::from_millis(50))
        .start();
    let answers = h.burst(3, 200).await;
    assert_eq!(h.gets(), 1);
    assert_eq!(h.queries(), 0);
    assert_eq!(count(&answers, XCache::Hit), 200);
    assert_eq!(h.metrics.cache_hits_total.get(), 200);
    assert_eq!(h.metrics.cache_reads_coalesced_total.get(), 199);
}

#[actix_rt::test]
async fn a_request_after_the_flight_finds_the_cache_filled() {
    // No near cache: the second answer can only come from what the flight wrote.
    let h = Setup::default().owner(near_cache_ttl(0)).start();
    let first = h.one(9).await;
    assert_eq!(first.x_cache, XCache::Miss);
    h.idle().await;
    assert_eq!(h.sets(), 1, "the flight wrote what it loaded");
    let again = h.one(9).await;
    assert_eq!(again.x_cache, XCache::Hit);
    assert_eq!(again.result, first.result, "the value the flight wrote");
    assert_eq!(h.gets(), 2, "read from the cache, not from memory");
    assert_eq!(h.queries(), 1);
}

#[actix_rt::test]
async fn a_request_during_the_cache_write_gets_the_loaded_value_at_once() {
    let h = Setup::default()
        .cache_set_delay(Duration::from_millis(300))
        .owner(near_cache_ttl(0))
        .start();
    let first = h.one(9).await;
    assert_eq!(
        first.x_cache,
        XCache::Miss,
        "answered before the write lands"
    );
    assert_eq!(h.pending_flights(), 1, "the write is still in the air");
    let during = h.one(9).await;
    assert_eq!(during.x_cache, XCache::Shared);
    assert_eq!(during.result, first.result);
    assert_eq!((h.queries(), h.gets()), (1, 1), "no second read or load");
    h.idle().await;
    assert_eq!(h.sets(), 1);
}

#[actix_rt::test]
async fn a_slow_key_does_not_delay_other_keys_on_the_same_owner() {
    let h = Setup::default()
        .db_delays(HashMap::from([(1, Duration::from_secs(3))]))
        .db_delay(Duration::from_millis(10))
        .start();
    let slow = h.ask(1);
    eventually("key 1's flight is loading", || h.queries() == 1).await;

    let started = Instant::now();
    let fast = h.one(2).await;
    assert!(matches!(fast.result, Ok(Lookup::Found(_))));
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "key 2 waited {:?} behind key 1's 3 s load",
        started.elapsed()
    );
    assert!(
        h.metrics
            .flights_total
            .with_label_values(&["database"])
            .get()
            <= 1,
        "key 1 is still loading"
    );
    drop(slow);
}

#[actix_rt::test]
async fn a_waiter_that_leaves_does_not_cancel_the_flight() {
    let h = Setup::default().start();
    // Every waiter but the last goes away before the load finishes, the first one included.
    let gone: Vec<_> = (0..10).map(|_| h.ask(11)).collect();
    let stays = h.ask(11);
    eventually("the waiters joined", || h.waiting() == 11).await;
    drop(gone);
    let answer = receive(stays).await;
    assert!(matches!(answer.result, Ok(Lookup::Found(_))));
    h.idle().await;
    assert_eq!(h.sets(), 1, "the flight filled the cache");

    // Even when every waiter leaves, the flight completes and fills the cache.
    let leaves = h.ask(12);
    eventually("the flight started", || h.queries() == 2).await;
    drop(leaves);
    eventually("the abandoned flight filled the cache", || h.sets() == 2).await;
    assert_eq!(h.one(12).await.x_cache, XCache::Hit);
    assert_eq!(h.queries(), 2);
}

#[actix_rt::test]
async fn a_request_whose_client_is_gone_starts_no_work() {
    let h = Setup::default().start();
    let (reply, answer) = oneshot::channel();
    drop(answer);
    h.owner.do_send(GetTemplate {
        id: 13,
        reply,
        span: tracing::Span::none(),
    });
    eventually("the owner saw it", || {
        h.metrics.requests_abandoned_total.get() == 1
    })
    .await;
    assert_eq!((h.gets(), h.queries()), (0, 0), "no read, no load");
    assert_eq!(h.pending_flights(), 0);
    assert_eq!(
        h.metrics.cache_hits_total.get() + h.metrics.cache_misses_total.get(),
        0
    );
}

#[actix_rt::test]
async fn a_failed_flight_answers_every_waiter_and_is_not_cached() {
    let h = Setup::default().mode(DbMode::FailFirst(1)).start();
    let answers = h.burst(5, 50).await;
    assert!(answers
        .iter()
        .all(|a| matches!(a.result, Err(FlightError::Database(_)))));
    assert_eq!(h.queries(), 1);
    h.idle().await;
    assert_eq!(h.sets(), 0, "errors are not cached");

    let retry = h.one(5).await;
    assert!(
        matches!(retry.result, Ok(Lookup::Found(_))),
        "the next request tries again"
    );
    assert_eq!(h.queries(), 2);
}

#[actix_rt::test]
async fn a_flight_that_times_out_answers_every_waiter_and_leaves_no_entry() {
    let h = Setup::default()
        .mode(DbMode::Hang)
        .owner(OwnerSettings {
            flight_timeout: Duration::from_millis(200),
            ..Default::default()
        })
        .start();
    let answers = h.burst(5, 20).await;
    assert!(answers
        .iter()
        .all(|a| a.result == Err(FlightError::Timeout(Duration::from_millis(200)))));
    h.idle().await;
    let _ = h.one(5).await;
    assert_eq!(h.queries(), 2, "a new flight after the failed one");
}

#[actix_rt::test]
async fn a_panic_in_a_database_call_is_reported_as_a_panic_to_every_waiter() {
    let h = Setup::default().mode(DbMode::Panic).start();
    let answers = h.burst(5, 20).await;
    let panicked = Err(FlightError::Panicked("a database call"));
    assert!(
        answers.iter().all(|a| a.result == panicked),
        "{:?}",
        answers[0]
    );
    h.idle().await;
    assert_eq!(h.sets(), 0, "nothing cached");
    // The owner and the (fake) database actor both survived: the next request loads again.
    assert_eq!(h.one(5).await.result, panicked);
    assert_eq!(h.queries(), 2);
}

#[actix_rt::test]
async fn an_owner_that_panics_answers_its_waiters_and_is_restarted() {
    let h = Setup::default()
        .db_delay(Duration::from_millis(300))
        .start();
    let _ = h.one(3).await;
    let waiters: Vec<_> = (0..5).map(|_| h.ask(4)).collect();
    eventually("the waiters joined", || h.waiting() == 5).await;

    h.owner.do_send(Bug);
    for rx in waiters {
        let answer = receive(rx).await;
        assert_eq!(answer.result, Err(FlightError::Panicked("the key owner")));
    }
    assert_eq!(
        h.metrics
            .actor_restarts_total
            .with_label_values(&["key_owner"])
            .get(),
        1
    );
    assert_eq!((h.pending_flights(), h.waiting()), (0, 0));
    // Same address, fresh state: key 3 is no longer remembered, and is served from the cache.
    let after = h.one(3).await;
    assert_eq!(after.x_cache, XCache::Hit);
    assert_eq!(
        h.gets(),
        3,
        "read from the cache again, not from the lost near cache"
    );
    assert!(h.one(4).await.result.is_ok());
}

#[actix_rt::test]
async fn not_found_is_shared_like_any_answer() {
    let h = Setup::default().start();
    let answers = h.burst(5000, 30).await;
    assert!(answers.iter().all(|a| a.result == Ok(Lookup::NotFound)));
    assert_eq!(h.queries(), 1);
}

#[actix_rt::test]
async fn coalesce_off_makes_every_request_load_on_its_own() {
    let h = Setup::default()
        .owner(OwnerSettings {
            coalesce: false,
            ..Default::default()
        })
        .start();
    let answers = h.burst(8, 50).await;
    assert_eq!(h.gets(), 50);
    assert_eq!(h.queries(), 50);
    assert_eq!(count(&answers, XCache::Miss), 50);
    assert_eq!(h.metrics.singleflight_shared_total.get(), 0);
    assert_eq!((h.pending_flights(), h.waiting()), (0, 0));
}

#[actix_rt::test]
async fn requests_beyond_the_owner_bounds_are_shed_at_once() {
    let h = Setup::default()
        .db_delay(Duration::from_millis(1000))
        .owner(OwnerSettings {
            max_pending_keys: 2,
            max_waiters_per_key: 3,
            ..Default::default()
        })
        .start();
    let first = h.ask(1);
    let second = h.ask(2);
    let started = Instant::now();
    let third = h.one(3).await;
    assert_eq!(
        third.result,
        Err(FlightError::Shed(ShedReason::PendingKeys))
    );
    assert!(
        started.elapsed() < Duration::from_millis(250),
        "shed without waiting"
    );

    let joined: Vec<_> = (0..4).map(|_| h.ask(1)).collect();
    let mut shed = 0;
    for rx in joined {
        if receive(rx).await.result == Err(FlightError::Shed(ShedReason::Waiters)) {
            shed += 1;
        }
    }
    assert_eq!(shed, 2, "key 1 takes its starter and 2 more waiters");
    assert!(receive(first).await.result.is_ok());
    assert!(receive(second).await.result.is_ok());
    assert_eq!(h.shed("pending_keys"), 1);
    assert_eq!(h.shed("waiters"), 2);
    h.idle().await;
    assert!(
        h.one(3).await.result.is_ok(),
        "served once the load is gone"
    );
}

#[actix_rt::test]
async fn flights_beyond_the_owners_bytes_in_the_air_wait_parked_then_are_shed() {
    use crate::actors::key_owner::in_air::FIRST_ESTIMATE;
    let h = Setup::default()
        .db_delay(Duration::from_millis(500))
        .owner(OwnerSettings {
            // Room for two flights whose bodies are not known yet, not three.
            in_air_bytes: 2 * FIRST_ESTIMATE + FIRST_ESTIMATE / 2,
            ..Default::default()
        })
        .start();
    let started = Instant::now();
    let in_air = [h.ask(1), h.ask(2)];
    // Parked: they start when the first two have landed.
    let parked = [h.ask(3), h.ask(4)];
    let shed = h.one(5).await;
    assert_eq!(shed.result, Err(FlightError::Shed(ShedReason::Memory)));
    let held = h.metrics.inflight_memory_bytes.get();
    assert_eq!(held, 2 * FIRST_ESTIMATE as i64, "two flights in the air");
    // Joining a flight, parked or not, holds no more bytes: never shed for them.
    let joined = [h.ask(1), h.ask(3)];
    for rx in in_air.into_iter().chain(joined).chain(parked) {
        assert!(receive(rx).await.result.is_ok());
    }
    assert!(
        started.elapsed() >= Duration::from_millis(1000),
        "the parked flights loaded after the others"
    );
    assert_eq!(h.queries(), 4, "one load per key");
    assert_eq!(h.shed("memory"), 1);
    h.idle().await;
    assert_eq!(h.metrics.inflight_memory_bytes.get(), 0);
    assert!(h.one(5).await.result.is_ok(), "served once they landed");
}

#[actix_rt::test]
async fn a_soft_expired_value_is_answered_at_once_as_stale_and_refreshed_once() {
    let h = Setup::default()
        .stale_cached(vec![8])
        .db_delay(Duration::from_millis(300))
        .start();
    let answers = h.burst(8, 50).await;
    // The near cache included: nobody gets a soft-expired value as a HIT.
    assert_eq!(count(&answers, XCache::Stale), 50, "{:?}", answers[0]);
    assert!(answers
        .iter()
        .all(|a| loaded_by(a).as_deref() == Some("cached")));
    // Every answer arrived while the refresh was still loading: nobody waited on the database.
    eventually("the refresh was sent", || h.queries() == 1).await;
    assert_eq!(h.sets(), 0, "the refresh has not written yet");
    assert_eq!(h.metrics.refreshes_total.get(), 1);

    h.idle().await;
    assert_eq!(h.queries(), 1, "exactly one refresh");
    assert_eq!(h.sets(), 1, "the refresh rewrote the entry");
    let after = h.one(8).await;
    assert_eq!(after.x_cache, XCache::Hit);
    assert_eq!(loaded_by(&after).as_deref(), Some("query 0"));
    assert_eq!(h.metrics.cache_misses_total.get(), 0, "no request missed");
}

#[actix_rt::test]
async fn requests_during_a_refresh_get_the_soft_expired_value_at_once() {
    // No near cache: only the refreshing flight itself can spare them the wait.
    let h = Setup::default()
        .stale_cached(vec![8])
        .db_delay(Duration::from_millis(300))
        .owner(near_cache_ttl(0))
        .start();
    assert_eq!(h.one(8).await.x_cache, XCache::Stale);
    let during = h.burst(8, 20).await;
    assert!(
        during.iter().all(|a| a.x_cache == XCache::Stale),
        "{:?}",
        during[0]
    );
    assert_eq!(h.sets(), 0, "answered while the refresh is still loading");
    assert_eq!(h.metrics.refreshes_total.get(), 1);

    h.idle().await;
    assert_eq!(
        h.one(8).await.x_cache,
        XCache::Hit,
        "the refreshed value, from the cache"
    );
    assert_eq!(h.queries(), 1);
}

#[test]
fn shard_for_spreads_keys_and_stays_in_range() {
    for shards in 1..=8 {
        let mut seen = vec![0usize; shards];
        for id in 1..=8000 {
            let s = shard_for(id, shards);
            assert!(s < shards);
            seen[s] += 1;
        }
        let expected = 8000 / shards;
        assert!(
            seen.iter().all(|&n| n > expected * 3 / 4),
            "{shards} shards: {seen:?}"
        );
    }
    assert!(shard_for(i64::MAX, 3) < 3 && shard_for(-1, 3) < 3);
}
