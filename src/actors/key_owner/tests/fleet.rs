//! The fleet lease (the Redis side is faked: `FakeCache` keeps leases as Redis would).

use super::*;

#[actix_rt::test]
async fn the_lease_holder_loads_once_and_fills_under_its_token() {
    let h = leased().start();
    let answers = h.burst(7, 50).await;
    assert_eq!(h.queries(), 1);
    assert_eq!(count(&answers, XCache::Miss), 1);
    assert_eq!(count(&answers, XCache::Shared), 49);
    h.idle().await;
    assert_eq!(h.lease_claims.get(), 1, "one lease claimed");
    assert_eq!(
        h.lease_fills.get(),
        1,
        "the value written by the lease's fill"
    );
    assert_eq!(h.sets(), 0, "not by a plain write");
    assert_eq!(h.metrics.lease_claims_total.get(), 1);
    // Filled: the next flight (after the near cache) finds it without a lease.
    assert_eq!(loaded_by(&h.one(7).await).as_deref(), Some("query 0"));
}

#[actix_rt::test]
async fn a_flight_waits_on_another_replicas_lease_and_shares_its_fill() {
    let h = leased().start();
    h.hold_as_peer(8, Duration::from_secs(60)).await;
    let waiting: Vec<_> = (0..20).map(|_| h.ask(8)).collect();
    eventually("the flight waits on the peer", || {
        h.metrics.lease_waits_total.get() == 1 && h.waiting() == 20
    })
    .await;
    h.fill_as_peer(8, "peer").await;
    for rx in waiting {
        let answer = receive(rx).await;
        assert_eq!(answer.x_cache, XCache::Shared);
        assert_eq!(loaded_by(&answer).as_deref(), Some("peer"));
    }
    assert_eq!(h.queries(), 0, "the peer loaded it, not us");
    assert_eq!(h.metrics.lease_wait_seconds.get_sample_count(), 1);
    assert_eq!(h.metrics.lease_takeovers_total.get(), 0);
    h.idle().await;
}

#[actix_rt::test]
async fn a_lease_that_runs_out_unfilled_is_taken_over_without_a_notice() {
    let h = leased().start();
    h.hold_as_peer(9, Duration::from_millis(150)).await;
    // No fill, no notice: the peer died. The owner looks again when the lease runs out.
    let answers = h.burst(9, 10).await;
    assert!(answers.iter().all(|a| a.result.is_ok()), "{answers:?}");
    assert_eq!(h.queries(), 1, "one take-over load");
    assert_eq!(h.metrics.lease_takeovers_total.get(), 1);
    assert_eq!(count(&answers, XCache::Miss), 1);
    h.idle().await;
}

#[actix_rt::test]
async fn with_lease_calls_failing_the_owner_coalesces_on_its_own() {
    let h = leased().lease_failing(true).start();
    let answers = h.burst(10, 30).await;
    assert!(answers.iter().all(|a| a.result.is_ok()), "{answers:?}");
    assert_eq!(h.queries(), 1);
    h.idle().await;
    assert_eq!(h.sets(), 1, "written with a plain write");
}

#[actix_rt::test]
async fn a_change_makes_the_holder_release_its_lease_and_write_nothing() {
    let h = leased().db_delay(Duration::from_millis(300)).start();
    let before = h.ask(11);
    eventually("the lease is claimed", || h.lease_claims.get() == 1).await;
    h.owner.send(Invalidate(11)).await.unwrap();
    eventually("the lease is released", || h.lease_releases.get() == 1).await;
    // The request from before the change is answered by the old load; one after it starts anew.
    let after = h.one(11).await;
    assert_eq!(loaded_by(&after).as_deref(), Some("query 1"));
    assert!(receive(before).await.result.is_ok());
    h.idle().await;
    assert_eq!(h.lease_fills.get(), 1, "only the new flight fills");
    assert_eq!(h.lease_claims.get(), 2);
}

#[actix_rt::test]
async fn a_change_while_waiting_on_a_peer_loads_for_the_earlier_waiters_at_once() {
    let h = leased().db_delay(Duration::from_millis(10)).start();
    h.hold_as_peer(12, Duration::from_secs(60)).await;
    let before = h.ask(12);
    eventually("the flight waits on the peer", || {
        h.metrics.lease_waits_total.get() == 1
    })
    .await;
    h.owner.send(Invalidate(12)).await.unwrap();
    // Answered by its own load, not after the peer's 60 s lease.
    let answer = receive(before).await;
    assert_eq!(loaded_by(&answer).as_deref(), Some("query 0"));
    h.idle().await;
    assert_eq!(h.lease_fills.get(), 0, "a superseded flight fills nothing");
}

#[actix_rt::test]
async fn a_soft_expired_value_is_served_while_a_peer_refreshes_it() {
    let h = leased().stale_cached(vec![13]).start();
    h.hold_as_peer(13, Duration::from_secs(60)).await;
    let answers = h.burst(13, 5).await;
    assert!(
        answers.iter().all(|a| a.x_cache == XCache::Stale),
        "{answers:?}"
    );
    assert_eq!(h.queries(), 0, "the peer refreshes, not us");
    h.fill_as_peer(13, "refreshed").await;
    h.idle().await;
    let answer = h.one(13).await;
    assert_eq!(answer.x_cache, XCache::Hit);
    assert_eq!(loaded_by(&answer).as_deref(), Some("refreshed"));
    assert_eq!(h.queries(), 0);
    assert_eq!(h.metrics.refreshes_total.get(), 0, "no refresh of our own");
}

#[actix_rt::test]
async fn a_superseded_holder_stops_extending_the_lease_it_gave_up() {
    let h = leased()
        // Extended every 50 ms while a 600 ms load runs.
        .lease_ttl(Some(Duration::from_millis(150)))
        .db_delay(Duration::from_millis(600))
        .start();
    let before = h.ask(16);
    eventually("the lease is claimed", || h.lease_claims.get() == 1).await;
    h.owner.send(Invalidate(16)).await.unwrap();
    let extensions_at_change = h.lease_extend_calls.get();
    assert!(receive(before).await.result.is_ok());
    h.idle().await;
    assert!(
        h.lease_extend_calls.get() <= extensions_at_change + 1,
        "extended after giving the lease up: {} then {}",
        extensions_at_change,
        h.lease_extend_calls.get()
    );
}

#[actix_rt::test]
async fn a_fill_that_wrote_nothing_makes_waiters_load_at_once() {
    let h = leased().start();
    h.hold_as_peer(17, Duration::from_secs(60)).await;
    let waiting = h.ask(17);
    eventually("the flight waits on the peer", || {
        h.metrics.lease_waits_total.get() == 1
    })
    .await;
    h.owner.do_send(PeerFilled {
        id: 17,
        wrote_nothing: true,
    });
    let answer = receive(waiting).await;
    assert_eq!(loaded_by(&answer).as_deref(), Some("query 0"));
}

#[actix_rt::test]
async fn a_wait_on_another_replica_lasts_no_longer_than_a_flight() {
    let h = leased()
        .owner(OwnerSettings {
            flight_timeout: Duration::from_millis(300),
            ..OwnerSettings::default()
        })
        .db_delay(Duration::from_millis(10))
        .start();
    // A peer that holds the lease for a minute and never fills.
    h.hold_as_peer(18, Duration::from_secs(60)).await;
    let answer = h.one(18).await;
    assert_eq!(loaded_by(&answer).as_deref(), Some("query 0"));
    h.idle().await;
}

#[actix_rt::test]
async fn stopping_hands_back_a_lease_still_held_and_its_load_still_answers() {
    use crate::actors::key_owner::HandBack;
    let h = leased().db_delay(Duration::from_millis(300)).start();
    let asked = h.ask(12);
    eventually("the lease is claimed", || h.lease_claims.get() == 1).await;
    let handed = h.owner.send(HandBack).await.unwrap();
    assert_eq!(handed, 1, "the held lease is given back");
    assert_eq!(
        h.lease_releases.get(),
        1,
        "released by the time HandBack answers"
    );
    assert_eq!(
        h.owner.send(HandBack).await.unwrap(),
        0,
        "nothing is held twice"
    );
    // The request waiting on the load is still answered by it, which fills under no lease.
    assert!(receive(asked).await.result.is_ok());
    h.idle().await;
    assert_eq!(h.lease_fills.get(), 0, "no fill under a lease given back");
}
