//! HTTP workers' copies: kept from near-cache hits and from current flights' remembered fresh
//! answers, and void the moment the owner learns of a change (see `generations`).

use super::*;

/// Asks the owner for `id` as an HTTP worker does after missing its own cache: the worker keeps
/// what the owner allows it to.
async fn through_worker(h: &Harness, worker: &mut WorkerCache, id: i64) -> Answer {
    let answer = h.one(id).await;
    worker.keep(id, &answer);
    answer
}

#[actix_rt::test]
async fn a_worker_keeps_a_near_cache_hit_until_the_owner_would_stop_answering_it() {
    let h = Setup::default()
        .owner(near_cache_ttl(1000))
        .db_delay(Duration::ZERO)
        .start();
    let mut worker = h.worker_cache(10);
    let first = through_worker(&h, &mut worker, 4).await;
    assert_eq!(first.x_cache, XCache::Miss);
    assert!(first.terms.is_some(), "a remembered load gives terms too");
    // Taken out again, to see a near-cache hit give it again.
    let mut worker = h.worker_cache(10);

    let asked = Instant::now();
    let hit = through_worker(&h, &mut worker, 4).await;
    assert_eq!(hit.x_cache, XCache::Hit);
    let terms = hit.terms.expect("a near-cache hit comes with terms");
    assert!(terms.fresh_until > asked);
    assert!(
        terms.fresh_until <= Instant::now() + Duration::from_millis(1000),
        "never past the near cache's own freshness"
    );
    for _ in 0..50 {
        assert_eq!(worker.get(4).map(|h| h.lookup), hit.result.clone().ok());
    }
    assert_eq!(
        h.metrics.near_cache_hits_total.get(),
        1,
        "one message, not 51"
    );

    // Let the terms' time run out.
    tokio::time::sleep_until((terms.fresh_until + Duration::from_millis(5)).into()).await;
    assert_eq!(worker.get(4), None);
    assert!(worker.is_empty(), "an expired entry is dropped");
}

#[actix_rt::test]
async fn a_worker_never_keeps_a_copy_past_the_soft_expiry() {
    // Near cache 5 s, but the Redis entry is fresh for only 1 s more.
    let h = Setup::default()
        .expiring_cached(vec![(6, Duration::from_secs(1))])
        .owner(near_cache_ttl(5000))
        .start();
    let asked = Instant::now();
    let _ = h.one(6).await;
    let terms = h.one(6).await.terms.expect("a near-cache hit");
    assert!(terms.fresh_until <= Instant::now() + Duration::from_secs(1));
    assert!(terms.fresh_until > asked);
}

#[actix_rt::test]
async fn an_invalidation_after_a_copy_makes_the_worker_miss_at_once() {
    let h = Setup::default().db_delay(Duration::ZERO).start();
    let mut worker = h.worker_cache(10);
    for id in [9, 10] {
        let _ = through_worker(&h, &mut worker, id).await;
        let _ = through_worker(&h, &mut worker, id).await;
    }
    assert!(worker.get(9).is_some() && worker.get(10).is_some());

    // `send` returns once the owner has handled the change.
    h.owner.send(Invalidate(9)).await.expect("owner running");
    assert_eq!(
        worker.get(9),
        None,
        "the owner knows: the worker must not answer"
    );
    assert!(worker.get(10).is_some(), "another key keeps its entry");

    let reloaded = through_worker(&h, &mut worker, 9).await;
    assert_eq!(reloaded.x_cache, XCache::Miss);
    let hit = through_worker(&h, &mut worker, 9).await;
    assert_eq!(loaded_by(&hit).as_deref(), Some("query 2"));
    assert_eq!(
        worker.get(9).map(|h| h.lookup),
        hit.result.ok(),
        "kept again: the new value"
    );
}

#[actix_rt::test]
async fn forget_all_after_a_copy_makes_the_worker_miss_at_once() {
    let h = Setup::default().db_delay(Duration::ZERO).start();
    let mut worker = h.worker_cache(100);
    for id in 1..=20 {
        let _ = through_worker(&h, &mut worker, id).await;
        let _ = through_worker(&h, &mut worker, id).await;
    }
    assert!((1..=20).all(|id| worker.get(id).is_some()));
    h.owner.send(ForgetAll).await.expect("owner running");
    assert!((1..=20).all(|id| worker.get(id).is_none()));
}

#[actix_rt::test]
async fn an_owner_restart_empties_the_workers_too() {
    let h = Setup::default().db_delay(Duration::ZERO).start();
    let mut worker = h.worker_cache(10);
    let _ = through_worker(&h, &mut worker, 3).await;
    let _ = through_worker(&h, &mut worker, 3).await;
    assert!(worker.get(3).is_some());
    h.owner.do_send(Bug);
    eventually("the owner restarted", || {
        h.metrics
            .actor_restarts_total
            .with_label_values(&["key_owner"])
            .get()
            == 1
    })
    .await;
    assert_eq!(
        worker.get(3),
        None,
        "the owner forgot it, so must the worker"
    );
}

#[actix_rt::test]
async fn stale_shared_and_superseded_answers_are_never_kept() {
    // A remembered value answered because its reload failed.
    let h = failing_after_one_load(near_cache_ttl(50));
    let mut worker = h.worker_cache(10);
    let _ = h.one(6).await;
    // Let the near-cache TTL run out.
    tokio::time::sleep(Duration::from_millis(80)).await;
    let stale = through_worker(&h, &mut worker, 6).await;
    assert_eq!((stale.x_cache, stale.terms), (XCache::Stale, None));
    assert!(worker.is_empty());

    // A soft-expired value from Redis, answered while it is refreshed.
    let h = Setup::default()
        .stale_cached(vec![8])
        .db_delays(HashMap::from([(8, Duration::from_millis(200))]))
        .start();
    let mut worker = h.worker_cache(10);
    for _ in 0..3 {
        let answer = through_worker(&h, &mut worker, 8).await;
        assert_eq!((answer.x_cache, answer.terms), (XCache::Stale, None));
    }
    assert!(worker.is_empty());

    // A flight superseded by a change, and the requests that shared a flight.
    let h = Setup::default()
        .db_delay(Duration::from_millis(200))
        .start();
    let mut worker = h.worker_cache(10);
    let before = h.ask(10);
    eventually("the first load is in the air", || h.queries() == 1).await;
    h.owner.send(Invalidate(10)).await.expect("owner running");
    let after = h.burst(10, 5).await;
    let before = receive(before).await;
    assert_eq!(loaded_by(&before).as_deref(), Some("query 0"));
    assert_eq!(before.terms, None, "superseded: never kept");
    worker.keep(10, &before);
    assert!(worker.is_empty());
    // The flight after the change is the current one: its answers give terms, with its own value.
    for answer in &after {
        assert_eq!(loaded_by(answer).as_deref(), Some("query 1"));
        assert!(answer.terms.is_some(), "{:?}", answer.x_cache);
        worker.keep(10, answer);
    }
    let kept = worker.get(10).map(|h| h.lookup);
    assert_eq!(kept, after[0].result.clone().ok(), "only the new value");
}

#[actix_rt::test]
async fn coalesce_off_answers_are_never_kept() {
    let h = Setup::default()
        .owner(OwnerSettings {
            coalesce: false,
            ..Default::default()
        })
        .db_delay(Duration::ZERO)
        .start();
    for _ in 0..5 {
        assert_eq!(h.one(2).await.terms, None);
    }
}

#[actix_rt::test]
async fn a_current_flights_fresh_answers_give_terms_as_a_near_cache_hit_would() {
    // From PostgreSQL: the request that started the flight and those that shared it.
    let h = Setup::default()
        .db_delay(Duration::from_millis(100))
        .owner(near_cache_ttl(60_000))
        .start();
    let loaded = h.burst(3, 5).await;
    assert_eq!((count(&loaded, XCache::Miss), h.queries()), (1, 1));
    let hit = h.one(3).await;
    assert_eq!(hit.x_cache, XCache::Hit);
    let hit_terms = hit.terms.expect("a near-cache hit");
    for answer in &loaded {
        assert_eq!(answer.terms, Some(hit_terms), "{:?}", answer.x_cache);
    }
    let mut worker = h.worker_cache(10);
    worker.keep(3, &loaded[1]);
    assert_eq!(worker.get(3).map(|h| h.lookup), hit.result.clone().ok());

    // From Redis, answered to every request that joined the read.
    let h = Setup::default()
        .cached(vec![7])
        .cache_delay(Duration::from_millis(100))
        .owner(near_cache_ttl(60_000))
        .start();
    let read = h.burst(7, 4).await;
    assert_eq!((count(&read, XCache::Hit), h.gets()), (4, 1));
    let hit_terms = h.one(7).await.terms.expect("a near-cache hit");
    assert!(read.iter().all(|a| a.terms == Some(hit_terms)));

    // The change that supersedes the flight comes after the copy: the worker misses at once.
    h.owner.send(Invalidate(7)).await.expect("owner running");
    let mut worker = h.worker_cache(10);
    worker.keep(7, &read[0]);
    assert_eq!(worker.get(7), None);
}

#[actix_rt::test]
async fn a_flight_answer_the_owner_did_not_remember_is_never_kept() {
    // Near cache off for fresh answers: nothing is remembered as fresh.
    let h = Setup::default()
        .cached(vec![2])
        .owner(near_cache_ttl(0))
        .db_delay(Duration::ZERO)
        .start();
    for id in [1, 2] {
        for answer in h.burst(id, 3).await {
            assert!(answer.result.is_ok());
            assert_eq!(answer.terms, None, "{id}: {:?}", answer.x_cache);
        }
    }
    // A failed load, with nothing remembered: an error, never kept.
    let h = Setup::default()
        .mode(DbMode::FailAfter(0))
        .db_delay(Duration::ZERO)
        .start();
    let failed = h.one(5).await;
    assert!(failed.result.is_err());
    assert_eq!(failed.terms, None);
}

#[actix_rt::test]
async fn a_peers_fill_read_by_a_waiting_flight_gives_terms_once_remembered() {
    let h = leased().owner(near_cache_ttl(60_000)).start();
    h.hold_as_peer(11, Duration::from_secs(60)).await;
    let waiting = h.ask(11);
    eventually("the flight waits on the peer", || {
        h.metrics.lease_waits_total.get() == 1
    })
    .await;
    h.fill_as_peer(11, "peer").await;
    let shared = receive(waiting).await;
    assert_eq!(shared.x_cache, XCache::Shared);
    let hit = h.one(11).await;
    assert_eq!(hit.x_cache, XCache::Hit);
    assert_eq!(shared.terms, hit.terms);
    assert!(shared.terms.is_some());
}
