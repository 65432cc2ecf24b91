//! Superseding: after a change, no request joins the old flight, and nothing loaded before it
//! is answered to later requests or left in Redis.

use super::*;

#[actix_rt::test]
async fn invalidate_drops_the_key_everywhere() {
    let h = Setup::default().db_delay(Duration::ZERO).start();
    assert_eq!(h.one(9).await.x_cache, XCache::Miss);
    assert_eq!(h.one(9).await.x_cache, XCache::Hit);
    assert_eq!(h.gets(), 1, "near cache");
    h.idle().await;

    h.owner.do_send(Invalidate(9));
    assert_eq!(
        h.one(9).await.x_cache,
        XCache::Miss,
        "reloaded, not served from memory or the cache"
    );
    assert_eq!(h.dels(), 1);
    assert_eq!(h.queries(), 2);
    assert_eq!(h.metrics.invalidations_total.get(), 1);
}

#[actix_rt::test]
async fn after_an_invalidation_new_requests_never_join_the_old_flight() {
    let h = Setup::default()
        .db_delay(Duration::from_millis(200))
        .start();
    let before = h.ask(10);
    eventually("the first load is in the air", || h.queries() == 1).await;
    h.owner.do_send(Invalidate(10));
    let after = h.burst(10, 5).await;

    let before = receive(before).await;
    assert_eq!(before.x_cache, XCache::Miss);
    assert_eq!(
        loaded_by(&before).as_deref(),
        Some("query 0"),
        "joined before"
    );
    for answer in &after {
        assert_eq!(
            loaded_by(answer).as_deref(),
            Some("query 1"),
            "a load that began after the change"
        );
    }
    assert_eq!(count(&after, XCache::Miss), 1, "a new flight of their own");
    assert_eq!(count(&after, XCache::Shared), 4);
    h.idle().await;
    assert_eq!(h.sets(), 1, "only the new flight wrote to the cache");
    assert_eq!(h.dels(), 1, "only the invalidation's own delete");
    let next = h.one(10).await;
    assert_eq!(loaded_by(&next).as_deref(), Some("query 1"));
}

#[actix_rt::test]
async fn a_flight_superseded_during_its_cache_write_deletes_what_it_wrote() {
    let h = Setup::default()
        .cache_set_delay(Duration::from_millis(200))
        .owner(near_cache_ttl(0))
        .start();
    let answer = h.one(10).await;
    assert_eq!(answer.x_cache, XCache::Miss);
    assert_eq!(h.sets(), 0, "the write is still in the air");
    h.owner.do_send(Invalidate(10));
    eventually("the late write was deleted", || {
        h.sets() == 1 && h.dels() == 2
    })
    .await;
    h.idle().await;
    let next = h.one(10).await;
    assert_eq!(next.x_cache, XCache::Miss, "not found in the cache");
    assert_eq!(loaded_by(&next).as_deref(), Some("query 1"));
}

#[actix_rt::test]
async fn an_invalidated_refresh_stops_serving_its_old_value() {
    let h = Setup::default()
        .stale_cached(vec![8])
        .db_delays(HashMap::from([(8, Duration::from_millis(300))]))
        .owner(near_cache_ttl(0))
        .start();
    let first = h.one(8).await;
    assert_eq!(first.x_cache, XCache::Stale);
    assert_eq!(loaded_by(&first).as_deref(), Some("cached"));
    h.owner.do_send(Invalidate(8));
    let after = h.one(8).await;
    assert_ne!(after.x_cache, XCache::Stale, "{after:?}");
    assert_eq!(loaded_by(&after).as_deref(), Some("query 1"));
    h.idle().await;
    assert_eq!(h.sets(), 1, "the superseded refresh wrote nothing");
}

#[actix_rt::test]
async fn forget_all_empties_the_near_cache_and_supersedes_every_flight() {
    let h = Setup::default()
        .db_delay(Duration::ZERO)
        .db_delays(HashMap::from([(20, Duration::from_millis(200))]))
        .start();
    for id in 1..=5 {
        let _ = h.one(id).await;
    }
    h.idle().await;
    let in_the_air = h.ask(20);
    eventually("key 20 is loading", || h.queries() == 6).await;
    h.owner.do_send(ForgetAll);
    for id in 1..=5 {
        assert_eq!(
            h.one(id).await.x_cache,
            XCache::Hit,
            "from the (fake) Redis, not memory"
        );
    }
    assert_eq!(h.gets(), 11);
    let after = h.one(20).await;
    assert_eq!(loaded_by(&after).as_deref(), Some("query 6"));
    assert_eq!(
        loaded_by(&receive(in_the_air).await).as_deref(),
        Some("query 5")
    );
}
