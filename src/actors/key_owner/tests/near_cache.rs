//! The near cache: fresh answers without I/O, never past the Redis entry's soft expiry,
//! remembered answers standing in for failed loads, and its bound.

use super::*;

#[actix_rt::test]
async fn the_near_cache_answers_fresh_keys_without_a_cache_read() {
    let h = Setup::default()
        .owner(near_cache_ttl(1000))
        .db_delay(Duration::ZERO)
        .start();
    assert_eq!(h.one(4).await.x_cache, XCache::Miss);
    for _ in 0..50 {
        assert_eq!(h.one(4).await.x_cache, XCache::Hit);
    }
    assert_eq!(h.gets(), 1, "no Redis read while fresh");
    assert_eq!(h.metrics.near_cache_hits_total.get(), 50);

    // Let the near-cache TTL run out.
    tokio::time::sleep(Duration::from_millis(1050)).await;
    assert_eq!(
        h.one(4).await.x_cache,
        XCache::Hit,
        "from Redis after the near TTL"
    );
    assert_eq!(h.gets(), 2);
    assert_eq!(h.queries(), 1);
}

#[actix_rt::test]
async fn the_near_cache_never_answers_hit_past_the_soft_expiry() {
    // Near cache 5 s, but the Redis entry is fresh for only 1 s more.
    let h = Setup::default()
        .expiring_cached(vec![(6, Duration::from_secs(1))])
        .db_delay(Duration::from_millis(300))
        .owner(near_cache_ttl(5000))
        .start();
    assert_eq!(h.one(6).await.x_cache, XCache::Hit);
    assert_eq!(h.one(6).await.x_cache, XCache::Hit, "near cache");
    assert_eq!(h.gets(), 1);
    // Let the soft expiry pass.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let answers = h.burst(6, 10).await;
    assert!(
        answers.iter().all(|a| a.x_cache == XCache::Stale),
        "{:?}",
        answers[0]
    );
    assert_eq!(h.gets(), 2, "back to Redis, which says soft-expired");
    // The owner counts the refresh just after answering the waiters, on its own thread.
    h.idle().await;
    assert_eq!(h.metrics.refreshes_total.get(), 1);
}

#[actix_rt::test]
async fn not_found_is_remembered_too() {
    let h = Setup::default()
        .forgetful_cache(true)
        .db_delay(Duration::ZERO)
        .start();
    for _ in 0..20 {
        assert_eq!(h.one(5555).await.result, Ok(Lookup::NotFound));
    }
    assert_eq!(h.queries(), 1, "one query per unknown id per window");
}

#[actix_rt::test]
async fn a_failed_load_answers_a_remembered_value_as_stale() {
    let h = failing_after_one_load(near_cache_ttl(50));
    let fresh = h.one(6).await;
    assert_eq!(fresh.x_cache, XCache::Miss);
    // Let the near-cache TTL run out.
    tokio::time::sleep(Duration::from_millis(80)).await;

    let answers = h.burst(6, 10).await;
    assert!(answers
        .iter()
        .all(|a| a.x_cache == XCache::Stale && a.result == fresh.result));
    assert_eq!(h.metrics.stale_answers_total.get(), 10);
    assert_eq!(h.queries(), 2, "the failed reload was one query");
}

#[actix_rt::test]
async fn without_max_stale_a_failed_load_is_an_error() {
    let h = failing_after_one_load(OwnerSettings {
        near_cache_ttl: Duration::from_millis(50),
        max_stale: Duration::ZERO,
        ..Default::default()
    });
    assert!(h.one(6).await.result.is_ok());
    // Let the near-cache TTL run out.
    tokio::time::sleep(Duration::from_millis(80)).await;
    assert!(matches!(
        h.one(6).await.result,
        Err(FlightError::Database(_))
    ));
}

#[actix_rt::test]
async fn the_near_cache_is_bounded() {
    let h = Setup::default()
        .forgetful_cache(true)
        .db_delay(Duration::ZERO)
        .owner(OwnerSettings {
            near_cache_capacity: 10,
            ..Default::default()
        })
        .start();
    for id in 1..=30 {
        let _ = h.one(id).await;
    }
    // Ids 21..=30 are remembered; 1 was evicted and must be loaded again.
    let _ = h.one(30).await;
    assert_eq!(h.queries(), 30);
    let _ = h.one(1).await;
    assert_eq!(h.queries(), 31);
}
