//! `GET /template-details?id=N`: validate; answer from this worker's cache of fresh answers if
//! it holds the key; otherwise ask the key's owner, wait at most the request deadline, answer.
//! Either way, the copies that came due for renewal are asked for in the background.

use std::rc::Rc;

use actix_web::http::header::{self, HeaderName, HeaderValue};
use actix_web::{web, HttpMessage, HttpRequest, HttpResponse, ResponseError};
use tokio::sync::oneshot;
use tracing::Span;

use actix::prelude::SendError;

use crate::actors::key_owner::{shard_for, FlightError, GetTemplate, Renew, ShedReason, XCache};
use crate::http::error::{mime_json, ApiError};
use crate::http::request_id::{self, RequestId};
use crate::http::{AppState, WorkerState};
use crate::telemetry;
use crate::template::Lookup;

/// The largest id the API accepts, spelled out for error messages.
const ID_RANGE: &str = "a positive integer from 1 to 9223372036854775807";

const X_CACHE: HeaderName = HeaderName::from_static("x-cache");

pub async fn template_details(req: HttpRequest) -> Result<HttpResponse, ApiError> {
    reject_body(&req)?;
    let id = parse_id(req.query_string())?;

    // Borrowed, not extracted: `web::Data` would clone (and drop) an `Arc` that every worker
    // shares, an atomic write to one cache line from every core on every request.
    let state = req.app_data::<web::Data<AppState>>();
    let worker = req.app_data::<Rc<WorkerState>>();
    if let Some(worker) = worker {
        let (kept, due) = {
            let mut cache = worker.cache.borrow_mut();
            (cache.get(id), cache.due_renewals())
        };
        if let Some(state) = state {
            for due in due {
                renew(state, worker, due);
            }
        }
        if let Some(hit) = kept {
            worker.counts.worker_cache_hit();
            if telemetry::exporting() {
                record_answer(&Span::current(), id, XCache::Hit);
            }
            if let (true, Some(state)) = (hit.renew, state) {
                renew(state, worker, id);
            }
            return Ok(respond(id, hit.lookup, XCache::Hit));
        }
    }
    let state =
        state.ok_or_else(|| ApiError::Unavailable("the service is not set up".to_owned()))?;

    let (reply, answer) = oneshot::channel();
    let owner = &state.owners[shard_for(id, state.owners.len())];
    let span = request_span(&req);
    span.record("template.id", id);
    // `try_send` never waits on the owner's mailbox, and never queues beyond its bound: a full
    // mailbox (the owner is behind) sheds the request at once, as the owner's own bounds do.
    let asked = GetTemplate {
        id,
        reply,
        span: span.clone(),
    };
    match owner.try_send(asked) {
        Ok(()) => {}
        Err(SendError::Full(_)) => {
            let reason = ShedReason::Mailbox;
            let label = reason.label();
            state
                .metrics
                .shed_requests_total
                .with_label_values(&[label])
                .inc();
            return Err(ApiError::Unavailable(FlightError::Shed(reason).to_string()));
        }
        Err(SendError::Closed(_)) => {
            return Err(ApiError::Unavailable(format!(
                "template {id} cannot be loaded right now: its key owner is not running"
            )))
        }
    }

    let answer = match tokio::time::timeout(state.request_timeout, answer).await {
        Ok(Ok(answer)) => answer,
        Ok(Err(_owner_gone)) => {
            return Err(ApiError::Unavailable(format!(
                "template {id} cannot be loaded right now: its key owner is not running"
            )))
        }
        Err(_deadline) => {
            // Leaving only drops our receiver: the flight goes on and fills the cache.
            state.metrics.waiter_timeouts_total.inc();
            return Err(ApiError::Unavailable(format!(
                "template {id} could not be loaded within {} ms; retry shortly",
                state.request_timeout.as_millis()
            )));
        }
    };
    if let Some(worker) = worker {
        worker.cache.borrow_mut().keep(id, &answer);
    }
    span.record("cache", answer.x_cache.as_str());
    match answer.result {
        Ok(lookup) => Ok(respond(id, lookup, answer.x_cache)),
        Err(e @ FlightError::Shed(_)) => Err(ApiError::Unavailable(e.to_string())),
        Err(e) => Err(ApiError::Unavailable(format!(
            "template {id} cannot be loaded right now: {e}"
        ))),
    }
}

/// The request's span: while spans are exported, the one its middleware made (see
/// [`crate::http::serve`]); otherwise one made now, so that a request that goes on to its key's
/// owner has one (the log lines written for it name its id), while one its worker's cache
/// answers makes none.
fn request_span(req: &HttpRequest) -> Span {
    if telemetry::exporting() {
        return Span::current();
    }
    let id = req
        .extensions()
        .get::<RequestId>()
        .cloned()
        .unwrap_or_default();
    request_id::request_span(req.method(), req.path(), &id)
}

/// Records on the request's span what it asked for and how it was answered.
fn record_answer(span: &Span, id: i64, x_cache: XCache) {
    span.record("template.id", id);
    span.record("cache", x_cache.as_str());
}

/// Puts `id` in this worker's next renewal for its owner; the first id of a batch schedules the
/// batch, sent [`AppState::renewal_batch`] later. The owner's answers refill the cache as they
/// come; no request waits on them. A renewal the owner drops (nothing fresh to give), or one
/// that outlasts the request deadline, leaves the copy to run out as it would have.
fn renew(state: &AppState, worker: &Rc<WorkerState>, id: i64) {
    let shard = shard_for(id, state.owners.len());
    let mut pending = worker.renewals.borrow_mut();
    if pending.len() <= shard {
        pending.resize_with(state.owners.len(), Vec::new);
    }
    pending[shard].push(id);
    if pending[shard].len() > 1 {
        return;
    }
    let owner = state.owners[shard].clone();
    let (worker, deadline, batch) = (
        Rc::clone(worker),
        state.request_timeout,
        state.renewal_batch,
    );
    actix_web::rt::spawn(async move {
        tokio::time::sleep(batch).await;
        let ids = std::mem::take(&mut worker.renewals.borrow_mut()[shard]);
        let mut renewals = Vec::with_capacity(ids.len());
        let answers: Vec<_> = ids
            .into_iter()
            .map(|id| {
                let (reply, answer) = oneshot::channel();
                renewals.push((id, reply));
                let worker = Rc::clone(&worker);
                async move {
                    if let Ok(answer) = answer.await {
                        worker.cache.borrow_mut().keep_renewal(id, &answer);
                    }
                }
            })
            .collect();
        // A renewal that finds the mailbox full is dropped: the copies run out as they would
        // have, and the next request for them asks the owner.
        let _ = owner.try_send(Renew { renewals });
        let _ = tokio::time::timeout(deadline, futures_util::future::join_all(answers)).await;
    });
}

/// The response for what a lookup found: the body as it was cached (a reference-counted buffer,
/// not a copy) and static header values, so a hit allocates nothing of its own.
fn respond(id: i64, lookup: Lookup, x_cache: XCache) -> HttpResponse {
    let x_cache = HeaderValue::from_static(x_cache.as_str());
    match lookup {
        Lookup::Found(body) => HttpResponse::Ok()
            .insert_header((header::CONTENT_TYPE, mime_json()))
            .insert_header((X_CACHE, x_cache))
            .body(body),
        Lookup::NotFound => {
            let mut response = ApiError::TemplateNotFound(id).error_response();
            response.headers_mut().insert(X_CACHE, x_cache);
            response
        }
    }
}

/// `GET /template-details` takes no body: a request that carries one is a client mistake.
fn reject_body(req: &HttpRequest) -> Result<(), ApiError> {
    let headers = req.headers();
    let has_length = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim() != "0");
    if has_length || headers.contains_key(header::TRANSFER_ENCODING) {
        return Err(ApiError::BadRequest(
            "GET /template-details takes no request body; pass the id in the query string: ?id=N"
                .to_owned(),
        ));
    }
    Ok(())
}

/// Extracts the one `id` parameter. Other parameters (cache busters and the like) are ignored.
pub fn parse_id(query: &str) -> Result<i64, ApiError> {
    // The common case, `id=N` and nothing else, read without decoding or allocating. Up to 18
    // digits always fit; anything else (other parameters, escapes, signs, zero, longer numbers)
    // takes the full path below, which gives every error its message.
    if let Some(digits) = query.strip_prefix("id=") {
        if (1..=18).contains(&digits.len()) && digits.bytes().all(|b| b.is_ascii_digit()) {
            let id = digits
                .bytes()
                .fold(0i64, |n, b| n * 10 + i64::from(b - b'0'));
            if id > 0 {
                return Ok(id);
            }
        }
    }
    parse_decoded(query)
}

/// [`parse_id`] for any query string: URL-decoded, every mistake named.
fn parse_decoded(query: &str) -> Result<i64, ApiError> {
    let pairs: Vec<(String, String)> = serde_urlencoded::from_str(query).map_err(|_| {
        ApiError::BadRequest(format!(
            "the query string is not valid URL encoding; expected ?id=N with N {ID_RANGE}"
        ))
    })?;
    let mut ids = pairs.into_iter().filter(|(k, _)| k == "id").map(|(_, v)| v);
    let (Some(raw), None) = (ids.next(), ids.next()) else {
        let count = query
            .split('&')
            .filter(|p| p.split('=').next() == Some("id"))
            .count();
        return Err(ApiError::BadRequest(if count == 0 {
            format!("missing query parameter `id`: expected ?id=N with N {ID_RANGE}")
        } else {
            format!("query parameter `id` was given {count} times: give it exactly once")
        }));
    };
    let shown = shorten(&raw);
    let bad = |why: &str| {
        ApiError::BadRequest(format!("invalid id {shown:?}: {why}; expected {ID_RANGE}"))
    };
    if raw.is_empty() {
        return Err(ApiError::BadRequest(format!(
            "query parameter `id` is empty: expected {ID_RANGE}"
        )));
    }
    let (negative, digits) = match raw.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, raw.as_str()),
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad("not a whole number"));
    }
    if negative && digits.bytes().any(|b| b != b'0') {
        return Err(bad("it is negative"));
    }
    match digits.parse::<i64>() {
        Err(_) => Err(bad("it is too large")),
        Ok(0) => Err(bad("ids start at 1")),
        Ok(id) => Ok(id),
    }
}

/// Echoing a megabyte of garbage back in an error helps nobody.
fn shorten(raw: &str) -> String {
    const MAX: usize = 40;
    match raw.char_indices().nth(MAX) {
        Some((cut, _)) => format!("{}…", &raw[..cut]),
        None => raw.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(query: &str) -> String {
        match parse_id(query) {
            Err(ApiError::BadRequest(m)) => m,
            other => panic!("{query:?} should be rejected, got {other:?}"),
        }
    }

    #[test]
    fn accepts_the_full_positive_range() {
        assert_eq!(parse_id("id=1").ok(), Some(1));
        assert_eq!(parse_id("id=9223372036854775807").ok(), Some(i64::MAX));
        assert_eq!(parse_id("id=0042").ok(), Some(42));
        assert_eq!(
            parse_id("id=5&_=123").ok(),
            Some(5),
            "other parameters are ignored"
        );
    }

    #[test]
    fn rejects_each_malformed_id_with_a_reason() {
        for (query, reason) in [
            ("", "missing"),
            ("foo=1", "missing"),
            ("id=", "empty"),
            ("id", "empty"),
            ("id=0", "start at 1"),
            ("id=-0", "start at 1"),
            ("id=-3", "negative"),
            ("id=abc", "not a whole number"),
            ("id=1.5", "not a whole number"),
            ("id=+1", "not a whole number"),
            ("id=%201", "not a whole number"),
            ("id=1e3", "not a whole number"),
            ("id=9223372036854775808", "too large"),
            ("id=99999999999999999999999999", "too large"),
            ("id=1&id=2", "2 times"),
            ("id=1&id=1", "2 times"),
        ] {
            let m = message(query);
            assert!(m.contains(reason), "{query:?}: {m}");
        }
    }

    #[test]
    fn the_plain_case_reads_as_the_full_parser_does() {
        let queries = (1..=2000).map(|n| format!("id={n}")).chain(
            [
                "id=0",
                "id=00",
                "id=007",
                "id=",
                "id=-1",
                "id=+1",
                "id=1a",
                "id=1&x=2",
                "id=%31",
                "id=999999999999999999",
                "id=9999999999999999999",
                "id=100000000000000000",
            ]
            .map(String::from),
        );
        for query in queries {
            let (fast, full) = (parse_id(&query), parse_decoded(&query));
            match (&fast, &full) {
                (Ok(a), Ok(b)) => assert_eq!(a, b, "{query}"),
                (Err(a), Err(b)) => assert_eq!(a.to_string(), b.to_string(), "{query}"),
                _ => panic!("{query}: {fast:?} against {full:?}"),
            }
        }
    }

    #[test]
    fn long_values_are_shortened_in_messages() {
        let m = message(&format!("id={}", "x".repeat(10_000)));
        assert!(m.len() < 200, "{m}");
    }

    /// An owner too busy to read its mailbox (a stalled thread): requests beyond the mailbox's
    /// bound are shed at once, with a 503 that says why, and counted; those it holds are
    /// answered once the owner goes on. No request is queued without bound or left hanging.
    #[actix_rt::test]
    async fn a_full_owner_mailbox_sheds_requests_at_once() {
        use std::time::Duration;

        use actix::prelude::*;
        use actix_web::{test, App};

        use crate::actors::fakes::{owner_deps, DbMode, FakeCache, FakeDb};
        use crate::actors::key_owner::{Generations, KeyOwner, OwnerSettings};
        use crate::actors::Alive;
        use crate::metrics::Metrics;

        let fakes = Arbiter::new();
        let store = FakeCache::entries((1..=100).map(|id| (id, Duration::from_secs(60))), "x");
        let cache = FakeCache::start_in_arbiter(&fakes.handle(), |_| FakeCache::new(store));
        let db = FakeDb::start_in_arbiter(&fakes.handle(), |_| {
            FakeDb::new(DbMode::Rows, Duration::ZERO)
        });
        let metrics = Metrics::new().expect("metrics");
        let (settings, generations) = (OwnerSettings::default(), Generations::default());
        let deps = owner_deps(&cache, &db, None, settings, metrics.clone(), generations);
        let owner_thread = Arbiter::new();
        let owner =
            KeyOwner::start_in_arbiter(&owner_thread.handle(), move |_| KeyOwner::new(0, deps));
        owner.send(Alive).await.expect("the owner started");
        // From now on the owner's thread is busy until told to go on.
        let (go_on, busy) = std::sync::mpsc::channel::<()>();
        owner_thread.spawn(async move {
            let _ = busy.recv_timeout(Duration::from_secs(30));
        });
        let state = AppState {
            owners: vec![owner.clone()],
            db_probe: db.recipient(),
            cache_probe: cache.recipient(),
            listener_probe: owner.clone().recipient(),
            draining: Default::default(),
            request_timeout: Duration::from_secs(30),
            renewal_batch: Duration::from_millis(20),
            metrics: metrics.clone(),
        };
        let app = test::init_service(
            App::new()
                .app_data(web::Data::new(state))
                .configure(crate::http::template_route),
        )
        .await;
        let counter = metrics.shed_requests_total.clone();
        let shed = move || {
            counter
                .with_label_values(&[ShedReason::Mailbox.label()])
                .get()
        };
        // Once requests are being shed, the owner goes on.
        let watched = shed.clone();
        let watcher = std::thread::spawn(move || {
            let started = std::time::Instant::now();
            while watched() == 0 && started.elapsed() < Duration::from_secs(20) {
                std::thread::sleep(Duration::from_millis(5));
            }
            let _ = go_on.send(());
        });
        let sent = 4096 + 200;
        let requests = (0..sent).map(|n| {
            let uri = format!("/template-details?id={}", 1 + n % 100);
            test::call_service(&app, test::TestRequest::get().uri(&uri).to_request())
        });
        let responses = futures_util::future::join_all(requests).await;
        watcher.join().expect("the watcher ends");
        let mut answered = 0;
        let mut refused = 0;
        for response in responses {
            match response.status().as_u16() {
                200 => answered += 1,
                503 => {
                    let body = test::read_body(response).await;
                    let body = String::from_utf8_lossy(&body);
                    assert!(body.contains("queue is full"), "{body}");
                    refused += 1;
                }
                other => panic!("status {other}"),
            }
        }
        assert!(refused > 0, "some requests were shed");
        assert!(
            answered >= 4096,
            "the mailbox's bound was queued: {answered}"
        );
        assert_eq!((answered + refused, shed()), (sent, refused as u64));
    }
}
