//! Two deployments on one Redis, kept apart by `CACHE_KEY_PREFIX`: each serves its own
//! database's templates, and every key and channel carries its prefix.

use crate::support::spawn_app_with;

#[actix_rt::test]
async fn deployments_sharing_a_redis_keep_apart_by_their_key_prefix() {
    let a = spawn_app_with(|s| s.cache_key_prefix = "shop-a:".to_owned()).await;
    let shared = a.redis_url.clone();
    let b = spawn_app_with(|s| {
        s.redis_url = shared;
        s.cache_key_prefix = "shop-b:".to_owned();
    })
    .await;
    // The two databases differ in template 5.
    b.execute_sql("UPDATE templates SET name = 'Shop B''s own' WHERE id = 5")
        .await;

    for app in [&a, &b] {
        assert_eq!(app.template(5).await.status(), 200);
    }
    let a_body = a.template(5).await.text().await.expect("a body");
    let b_body = b.template(5).await.text().await.expect("a body");
    assert!(
        !a_body.contains("Shop B's own"),
        "A serves its own: {a_body}"
    );
    assert!(
        b_body.contains("Shop B's own"),
        "B serves its own: {b_body}"
    );

    let client = redis::Client::open(a.redis_url.as_str()).expect("redis URL");
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .expect("connect to redis");
    let mut keys: Vec<String> = redis::cmd("KEYS")
        .arg("*template:{5}*")
        .query_async(&mut conn)
        .await
        .expect("KEYS");
    keys.sort();
    assert!(
        keys.contains(&"shop-a:template:{5}".to_owned())
            && keys.contains(&"shop-b:template:{5}".to_owned()),
        "{keys:?}"
    );
    assert!(
        keys.iter()
            .all(|k| k.starts_with("shop-a:") || k.starts_with("shop-b:")),
        "every key carries its deployment's prefix: {keys:?}"
    );
    let channels: Vec<String> = redis::cmd("PUBSUB")
        .arg("CHANNELS")
        .arg("*singleflight:fills:*")
        .query_async(&mut conn)
        .await
        .expect("PUBSUB CHANNELS");
    for prefix in ["shop-a:", "shop-b:"] {
        assert!(
            channels.iter().any(|c| c.starts_with(prefix)),
            "{prefix}'s fills channel: {channels:?}"
        );
    }
}
