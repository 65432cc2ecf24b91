//! Workers' renewals (`Renew`): a copy in steady use is renewed in the background.

use super::*;

impl Harness {
    /// Sends one worker's renewal of `ids`; each receiver gets an answer only if it has terms.
    fn renew(&self, ids: &[i64]) -> Vec<oneshot::Receiver<Answer>> {
        let (renewals, answers) = ids
            .iter()
            .map(|&id| {
                let (reply, answer) = oneshot::channel();
                ((id, reply), answer)
            })
            .unzip();
        self.owner.do_send(Renew { renewals });
        answers
    }

    fn renew_one(&self, id: i64) -> oneshot::Receiver<Answer> {
        self.renew(&[id]).remove(0)
    }

    fn renewals(&self, outcome: &str) -> u64 {
        self.metrics
            .worker_cache_renewals_total
            .with_label_values(&[outcome])
            .get()
    }

    /// Every request metric an answer moves, summed: a renewal must move none.
    fn request_counts(&self) -> u64 {
        let m = &self.metrics;
        m.cache_hits_total.get()
            + m.cache_misses_total.get()
            + m.near_cache_hits_total.get()
            + m.singleflight_shared_total.get()
            + m.stale_answers_total.get()
            + m.cache_reads_coalesced_total.get()
    }
}

/// An owner whose Redis holds `cached` and takes 100 ms to answer a read: long enough to act
/// while a renewal's read is in the air.
fn reading_slowly(cached: Vec<i64>) -> Harness {
    Setup::default()
        .cached(cached)
        .cache_delay(Duration::from_millis(100))
        .owner(near_cache_ttl(60_000))
        .start()
}

/// Waits (a clock running out) until `terms` are due for renewal.
async fn until_due(terms: CopyTerms) {
    tokio::time::sleep(terms.renew_at.saturating_duration_since(Instant::now())).await;
}

#[actix_rt::test]
async fn a_due_renewal_reads_redis_again_and_gives_later_terms() {
    let h = Setup::default()
        .cached(vec![5])
        .owner(near_cache_ttl(1000))
        .start();
    let first = h.one(5).await;
    let terms = first.terms.expect("a fresh flight answer fills");
    let ttl = Duration::from_millis(1000);
    assert!(
        terms.renew_at < terms.fresh_until,
        "due in its last quarter"
    );
    assert!(terms.fresh_until - terms.renew_at <= ttl / 4 + Duration::from_millis(1));
    let mut worker = h.worker_cache(10);
    worker.keep(5, &first);
    assert!(!worker.get(5).expect("kept").renew, "not due yet");

    until_due(terms).await;
    let due = worker.get(5).expect("still fresh");
    assert!(due.renew, "the first hit once due asks for a renewal");
    assert!(!worker.get(5).expect("kept").renew, "once per copy");
    let (counts, gets) = (h.request_counts(), h.gets());
    let renewed = receive(h.renew_one(5)).await;
    assert_eq!(h.cache_get_manys.get(), 1, "read from Redis again");
    assert_eq!(
        (h.gets(), h.renewals("read")),
        (gets, 1),
        "and by no flight"
    );
    let renewed_terms = renewed.terms.expect("a renewal is answered with terms");
    assert!(renewed_terms.fresh_until > terms.fresh_until);
    assert!(renewed_terms.renew_at > terms.fresh_until - ttl / 4);
    worker.keep(5, &renewed);
    assert!(!worker.get(5).expect("renewed").renew, "not due again yet");

    // Another worker's renewal of the same copy: the owner's entry is already renewed.
    let again = receive(h.renew_one(5)).await;
    assert_eq!(again.terms, Some(renewed_terms));
    assert_eq!((h.cache_get_manys.get(), h.renewals("near_cache")), (1, 1));
    assert_eq!(h.request_counts(), counts, "renewals are not requests");
    assert_eq!(h.queries(), 0);
    assert_eq!(
        h.metrics.flights_total.with_label_values(&["cache"]).get(),
        1
    );
    // The owner answers the renewed entry as a near-cache hit, with the same terms.
    assert_eq!(h.one(5).await.terms, Some(renewed_terms));
}

#[actix_rt::test]
async fn renewals_of_many_keys_are_one_redis_read() {
    let h = Setup::default()
        .cached((1..=50).collect())
        .owner(near_cache_ttl(60_000))
        .start();
    let ids: Vec<i64> = (1..=60).collect();
    let answers = h.renew(&ids);
    for (id, rx) in ids.iter().zip(answers) {
        if *id <= 50 {
            let renewed = receive(rx).await;
            assert_eq!(loaded_by(&renewed).as_deref(), Some("cached"), "{id}");
            assert!(renewed.terms.is_some(), "{id}");
        } else {
            dropped(rx).await;
        }
    }
    assert_eq!(h.cache_get_manys.get(), 1, "one round trip for all 60");
    assert_eq!((h.renewals("read"), h.renewals("missed")), (50, 10));
    assert_eq!((h.gets(), h.queries()), (0, 0), "no flight, no load");
    // What was read is remembered: the owner answers it from memory now.
    assert_eq!(h.one(7).await.x_cache, XCache::Hit);
    assert_eq!(h.gets(), 0);
}

#[actix_rt::test]
async fn a_renewal_never_loads_from_the_database() {
    for setup in [
        // Redis always empty: the value came from PostgreSQL.
        Setup::default()
            .forgetful_cache(true)
            .db_delay(Duration::ZERO)
            .owner(near_cache_ttl(200)),
        // The same under the fleet lease: a renewal claims nothing.
        leased()
            .forgetful_cache(true)
            .db_delay(Duration::ZERO)
            .owner(near_cache_ttl(200)),
    ] {
        let leased = setup.lease_ttl.is_some();
        let h = setup.start();
        let first = h.one(6).await;
        assert_eq!((first.x_cache, h.queries()), (XCache::Miss, 1));
        let claims = h.lease_claims.get();
        until_due(first.terms.expect("remembered")).await;
        dropped(h.renew_one(6)).await;
        assert_eq!(h.renewals("missed"), 1, "lease {leased}");
        assert_eq!(h.pending_flights(), 0, "lease {leased}: no flight");
        assert_eq!(
            h.queries(),
            1,
            "lease {leased}: the database is asked by requests only"
        );
        assert_eq!(h.lease_claims.get(), claims, "lease {leased}");
    }
}

#[actix_rt::test]
async fn a_renewal_joins_the_keys_flight_and_shares_its_terms() {
    let h = Setup::default()
        .db_delay(Duration::from_millis(150))
        .owner(near_cache_ttl(60_000))
        .start();
    let request = h.ask(8);
    eventually("the request's load is in the air", || h.queries() == 1).await;
    let renewal = h.renew_one(8);
    let request = receive(request).await;
    assert_eq!(request.x_cache, XCache::Miss);
    let renewed = receive(renewal).await;
    assert!(renewed.terms.is_some());
    assert_eq!(renewed.terms, request.terms);
    assert_eq!(h.renewals("joined"), 1);
    assert_eq!((h.queries(), h.cache_get_manys.get()), (1, 0));
    assert_eq!(
        h.metrics.cache_misses_total.get(),
        1,
        "one request, one miss"
    );
    h.idle().await;
}

#[actix_rt::test]
async fn a_change_during_a_renewals_read_gives_it_nothing_to_keep() {
    let h = reading_slowly(vec![9, 10]);
    let mut answers = h.renew(&[9, 10]);
    eventually("the read is in the air", || h.cache_get_manys.get() == 1).await;
    h.owner.send(Invalidate(9)).await.expect("owner running");
    let other = receive(answers.remove(1)).await;
    assert!(other.terms.is_some(), "the unchanged key is renewed");
    dropped(answers.remove(0)).await;
    assert_eq!((h.renewals("read"), h.renewals("missed")), (1, 1));
    // Nothing of the read before the change was remembered: a request reads again.
    h.one(9).await;
    assert_eq!(h.gets(), 1);
}

#[actix_rt::test]
async fn a_renewal_waits_through_a_refresh_but_never_starts_one() {
    let h = Setup::default()
        .stale_cached(vec![11, 12])
        .db_delay(Duration::from_millis(150))
        .owner(near_cache_ttl(60_000))
        .start();
    // Alone, a renewal of a soft-expired value gets nothing and refreshes nothing.
    dropped(h.renew_one(12)).await;
    assert_eq!((h.renewals("missed"), h.queries()), (1, 0));
    assert_eq!(h.metrics.refreshes_total.get(), 0);

    // Joined to a request's refresh, it waits for the refreshed value.
    let request = receive(h.ask(11)).await;
    assert_eq!(
        request.x_cache,
        XCache::Stale,
        "the request gets the old value at once"
    );
    let renewal = h.renew_one(11);
    let renewed = receive(renewal).await;
    assert_eq!(loaded_by(&renewed).as_deref(), Some("query 0"));
    assert!(renewed.terms.is_some(), "the refreshed value, to keep");
    assert_eq!(h.metrics.refreshes_total.get(), 1);
    assert_eq!(h.renewals("joined"), 1);
    h.idle().await;
}

#[actix_rt::test]
async fn renewals_of_one_key_from_two_workers_share_one_read() {
    let h = reading_slowly(vec![13]);
    let first = h.renew_one(13);
    eventually("the first worker's read is in the air", || {
        h.cache_get_manys.get() == 1
    })
    .await;
    let second = h.renew_one(13);
    let (first, second) = (receive(first).await, receive(second).await);
    assert!(first.terms.is_some() && first.terms == second.terms);
    assert_eq!(h.cache_get_manys.get(), 1, "one read for both workers");
    assert_eq!(h.renewals("read"), 2);
    // A third, once the entry is renewed, is answered from it.
    assert_eq!(receive(h.renew_one(13)).await.terms, first.terms);
    assert_eq!((h.cache_get_manys.get(), h.renewals("near_cache")), (1, 1));
}

#[actix_rt::test]
async fn forget_all_during_a_renewals_read_gives_it_nothing_to_keep() {
    let h = reading_slowly(vec![14]);
    let renewal = h.renew_one(14);
    eventually("the read is in the air", || h.cache_get_manys.get() == 1).await;
    h.owner.send(ForgetAll).await.expect("owner running");
    dropped(renewal).await;
    assert_eq!(h.renewals("missed"), 1);
    h.one(14).await;
    assert_eq!(h.gets(), 1, "nothing of the read was remembered");
}

#[actix_rt::test]
async fn renewals_joined_to_a_flight_are_not_requests_and_a_change_leaves_them_nothing() {
    let h = Setup::default()
        .db_delay(Duration::from_millis(200))
        .owner(OwnerSettings {
            max_waiters_per_key: 2,
            ..near_cache_ttl(60_000)
        })
        .start();
    let request = h.ask(15);
    eventually("the load is in the air", || h.queries() == 1).await;
    let renewals = h.renew(&[15, 15, 15]);
    // Renewals take none of the flight's request slots (their own are as many), and are not
    // counted as waiting.
    let second = h.ask(15);
    eventually("the second request joined", || h.waiting() == 2).await;
    h.owner.send(Invalidate(15)).await.expect("owner running");
    for renewal in renewals {
        dropped(renewal).await;
    }
    // Bounded on their own: two joined, the third was skipped.
    assert_eq!(h.renewals("skipped"), 1);
    assert_eq!(h.renewals("missed"), 2, "superseded: nothing to keep");
    assert_eq!(receive(request).await.x_cache, XCache::Miss);
    assert_eq!(receive(second).await.x_cache, XCache::Shared);
    assert_eq!(h.shed("waiters"), 0);
    h.idle().await;
}
