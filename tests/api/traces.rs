//! Traces and request ids, as an operator meets them: the service binary exporting its spans to
//! an OTLP/HTTP receiver (the test kit's, decoding what a collector would), its log lines naming
//! the request they were written for, and every response carrying its `X-Request-Id`.

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::Duration;

use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};
use testkit::otlp::{ReceivedSpan, Receiver};

use crate::support::{demo_database_url, header, ports, servers, spawn_app};

/// The service binary, killed when dropped; its log lines go to a file the test reads.
struct Service {
    child: std::process::Child,
    url: String,
    log: tempfile::NamedTempFile,
}

impl Drop for Service {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

impl Service {
    /// Starts the binary on `database_url` and a Redis keyspace of its own (every id cold),
    /// with `env` on top, and waits until it is ready.
    async fn start(database_url: &str, env: &[(&str, &str)]) -> Service {
        let servers = servers::servers();
        let port = ports::free_port().expect("a free port");
        let log = tempfile::NamedTempFile::new().expect("a log file");
        let child = Command::new(env!("CARGO_BIN_EXE_singleflight"))
            .env("HTTP_ADDR", format!("127.0.0.1:{port}"))
            .env("HTTP_WORKERS", "2")
            .env("KEY_OWNER_SHARDS", "1")
            .env("DATABASE_URL", database_url)
            .env("REDIS_URL", servers.redis_url(servers::next_redis_db()))
            .env("RUST_LOG", "info")
            .env("RUST_LOG_STYLE", "never")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(log.reopen().expect("the log file"))
            .spawn()
            .expect("start the service binary");
        let service = Service {
            child,
            url: format!("http://127.0.0.1:{port}"),
            log,
        };
        let client = reqwest::Client::new();
        let ready = testkit::poll::until(
            Duration::from_secs(30),
            Duration::from_millis(50),
            || async {
                let answer = client.get(format!("{}/readyz", service.url)).send().await;
                answer.is_ok_and(|r| r.status() == 200)
            },
            |ready| *ready,
        )
        .await;
        assert!(ready.done, "not ready; its log:\n{}", service.log_text());
        service
    }

    fn log_text(&self) -> String {
        let mut text = String::new();
        let mut file = self.log.reopen().expect("the log file");
        file.read_to_string(&mut text).expect("read the log");
        text
    }
}

/// The one span named `name` whose `key` attribute is `value`.
fn span<'a>(spans: &'a [ReceivedSpan], name: &str, key: &str, value: &str) -> &'a ReceivedSpan {
    let found: Vec<_> = spans
        .iter()
        .filter(|s| s.name == name && s.attributes.get(key).map(String::as_str) == Some(value))
        .collect();
    assert_eq!(found.len(), 1, "one {name} with {key}={value}: {spans:#?}");
    found[0]
}

/// The one span named `name` whose parent is `parent`.
fn child<'a>(spans: &'a [ReceivedSpan], parent: &ReceivedSpan, name: &str) -> &'a ReceivedSpan {
    let found: Vec<_> = spans
        .iter()
        .filter(|s| s.name == name && s.parent_span_id == parent.span_id)
        .collect();
    assert_eq!(
        found.len(),
        1,
        "one {name} under {} ({}): {spans:#?}",
        parent.name,
        parent.span_id
    );
    assert_eq!(
        found[0].trace_id, parent.trace_id,
        "{name} in its parent's trace"
    );
    found[0]
}

const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CALLER_SPAN: &str = "00f067aa0ba902b7";

#[actix_rt::test]
async fn a_cold_requests_stages_reach_an_otlp_receiver_as_one_trace_under_the_callers_span() {
    let receiver = Receiver::start().await.expect("an OTLP receiver");
    let endpoint = receiver.endpoint();
    let service = Service::start(
        &demo_database_url().await,
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint),
            // Sent every 100 ms rather than every 5 s: the test waits for them.
            ("OTEL_BSP_SCHEDULE_DELAY", "100"),
        ],
    )
    .await;
    let client = reqwest::Client::new();
    let cold = client
        .get(format!("{}/template-details?id=7", service.url))
        .header("traceparent", format!("00-{TRACE}-{CALLER_SPAN}-01"))
        .header("x-request-id", "cold-7")
        .send()
        .await
        .expect("answered");
    assert_eq!(cold.status(), 200);
    assert_eq!(header(&cold, "x-request-id"), "cold-7");
    assert_eq!(header(&cold, "x-cache"), "MISS");
    let hit = client
        .get(format!("{}/template-details?id=7", service.url))
        .send()
        .await
        .expect("answered");
    assert_eq!(header(&hit, "x-cache"), "HIT");
    let hit_id = header(&hit, "x-request-id");

    let spans = receiver
        .wait_for(Duration::from_secs(20), |spans| {
            let has = |name: &str| spans.iter().any(|s| s.name == name);
            let requests = spans.iter().filter(|s| s.name == "GET /template-details");
            requests.count() >= 2
                && ["redis.write", "db.query", "pool.checkout"].map(has) == [true; 3]
        })
        .await;

    let request = span(&spans, "GET /template-details", "request_id", "cold-7");
    assert_eq!(request.trace_id, TRACE, "the caller's trace goes on");
    assert_eq!(
        request.parent_span_id, CALLER_SPAN,
        "under the caller's span"
    );
    assert_eq!(request.kind, 2, "a server span");
    for (key, value) in [
        ("http.request.method", "GET"),
        ("http.route", "/template-details"),
        ("http.response.status_code", "200"),
        ("template.id", "7"),
        ("cache", "MISS"),
    ] {
        assert_eq!(
            request.attributes.get(key).map(String::as_str),
            Some(value),
            "{key}"
        );
    }
    assert_eq!(request.service_name.as_deref(), Some("singleflight"));

    let near = child(&spans, request, "near_cache");
    assert_eq!(
        near.attributes.get("hit").map(String::as_str),
        Some("false")
    );
    let flight = child(&spans, request, "flight");
    assert_eq!(
        flight.attributes.get("template.id").map(String::as_str),
        Some("7")
    );
    // The fleet lease is on by default: the first read is the one that claims it.
    let read = child(&spans, flight, "redis.read");
    assert_eq!(
        read.attributes.get("lease").map(String::as_str),
        Some("true")
    );
    let load = child(&spans, flight, "db.load");
    child(&spans, load, "pool.checkout");
    let query = child(&spans, load, "db.query");
    assert_eq!(
        query.attributes.get("db.batch.size").map(String::as_str),
        Some("1")
    );
    let write = child(&spans, flight, "redis.write");
    for (earlier, later) in [(read, load), (load, write)] {
        assert!(
            earlier.end_unix_nano <= later.start_unix_nano,
            "{} ends before {} starts",
            earlier.name,
            later.name
        );
    }

    // The second request was answered from its worker's cache: a span of its own, no flight.
    let hit = span(&spans, "GET /template-details", "request_id", &hit_id);
    assert_eq!(hit.attributes.get("cache").map(String::as_str), Some("HIT"));
    assert_ne!(hit.trace_id, TRACE, "a trace of its own");
    assert!(
        !spans.iter().any(|s| s.parent_span_id == hit.span_id),
        "a worker-cache hit has no stages"
    );
}

#[actix_rt::test]
async fn spans_go_as_json_when_otlp_protocol_says_so_and_requests_that_join_a_flight_link_to_it() {
    let receiver = Receiver::start().await.expect("an OTLP receiver");
    let endpoint = receiver.endpoint();
    let database_url = demo_database_url().await;
    let patient = "10000";
    let service = Service::start(
        &database_url,
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json"),
            ("OTEL_BSP_SCHEDULE_DELAY", "100"),
            ("REQUEST_TIMEOUT_MS", patient),
            ("FLIGHT_TIMEOUT_MS", patient),
            ("DB_QUERY_TIMEOUT_MS", patient),
        ],
    )
    .await;
    // The load waits on another client's lock until every request has joined its flight.
    let holder = hold_templates(&database_url).await;
    let client = reqwest::Client::new();
    let burst = (0..20).map(|_| {
        let request = client.get(format!("{}/template-details?id=11", service.url));
        async move { request.send().await.expect("answered") }
    });
    let burst = actix_rt::spawn(futures_util::future::join_all(burst));
    let waiting = testkit::poll::until(
        Duration::from_secs(10),
        Duration::from_millis(20),
        || async {
            let metrics = client.get(format!("{}/metrics", service.url)).send().await;
            let text = metrics
                .expect("scraped")
                .text()
                .await
                .expect("metrics text");
            crate::support::sum_metric(&text, "key_owner_waiters")
        },
        |waiters| *waiters >= 20.0,
    )
    .await;
    assert!(
        waiting.done,
        "20 requests wait on the flight: {}",
        waiting.last
    );
    release(holder).await;
    let answers = burst.await.expect("the burst");
    let caches: Vec<String> = answers.iter().map(|a| header(a, "x-cache")).collect();
    assert!(answers.iter().all(|a| a.status() == 200), "{caches:?}");
    assert_eq!(
        caches.iter().filter(|c| *c == "SHARED").count(),
        19,
        "{caches:?}"
    );

    let spans = receiver
        .wait_for(Duration::from_secs(20), |spans| {
            let requests = spans.iter().filter(|s| s.name == "GET /template-details");
            requests.count() >= 20 && spans.iter().any(|s| s.name == "redis.write")
        })
        .await;
    let flight = {
        let flights: Vec<_> = spans.iter().filter(|s| s.name == "flight").collect();
        assert_eq!(flights.len(), 1, "one flight: {flights:#?}");
        flights[0]
    };
    let shared: Vec<_> = spans
        .iter()
        .filter(|s| s.attributes.get("cache").map(String::as_str) == Some("SHARED"))
        .collect();
    assert_eq!(shared.len(), 19);
    for request in shared {
        let link = (flight.trace_id.clone(), flight.span_id.clone());
        assert!(
            request.links.contains(&link),
            "a SHARED request links to the flight that answered it: {request:#?}"
        );
    }
}

/// Another client of PostgreSQL holding the templates table: the service's loads wait.
async fn hold_templates(database_url: &str) -> AsyncPgConnection {
    let mut holder = AsyncPgConnection::establish(database_url)
        .await
        .expect("connect");
    for sql in ["BEGIN", "LOCK TABLE templates IN ACCESS EXCLUSIVE MODE"] {
        diesel::sql_query(sql)
            .execute(&mut holder)
            .await
            .expect(sql);
    }
    holder
}

async fn release(mut holder: AsyncPgConnection) {
    diesel::sql_query("ROLLBACK")
        .execute(&mut holder)
        .await
        .expect("rollback");
}

#[actix_rt::test]
async fn a_log_line_written_for_a_request_names_its_id_wherever_it_was_written() {
    let database_url = demo_database_url().await;
    let service = Service::start(&database_url, &[("DB_QUERY_TIMEOUT_MS", "300")]).await;
    // Another client holds the table: the load's query gets no answer within its bound, and
    // the database actor logs the failed load.
    let holder = hold_templates(&database_url).await;
    let failed = reqwest::Client::new()
        .get(format!("{}/template-details?id=9", service.url))
        .header("x-request-id", "locked-out-9")
        .send()
        .await
        .expect("answered");
    assert_eq!(failed.status(), 503);
    assert_eq!(
        header(&failed, "x-request-id"),
        "locked-out-9",
        "errors carry it too"
    );
    release(holder).await;

    let polled = testkit::poll::until(
        Duration::from_secs(10),
        Duration::from_millis(20),
        || async { service.log_text() },
        |log| log.contains("loading template 9 failed"),
    )
    .await;
    let log = polled.last;
    let line = log
        .lines()
        .find(|line| line.contains("loading template 9 failed"))
        .unwrap_or_else(|| panic!("no line about template 9:\n{log}"));
    assert!(
        line.contains("WARN") && line.contains(" request_id=locked-out-9] "),
        "the database actor's line names the request: {line}"
    );
    assert!(
        log.contains("INFO  actix_server::"),
        "a dependency's `tracing` events are log lines too:\n{log}"
    );
    let start_up = log.lines().next().expect("a first line");
    assert!(
        !start_up.contains("request_id="),
        "a line written for no request names none: {start_up}"
    );
}

#[actix_rt::test]
async fn every_answer_carries_a_request_id_kept_when_sane_and_made_otherwise() {
    let app = spawn_app().await;
    let get = |path: &'static str, id: Option<&'static str>| {
        let mut request = app.client.get(format!("{}{path}", app.address));
        if let Some(id) = id {
            request = request.header("x-request-id", id);
        }
        async move { request.send().await.expect("answered") }
    };
    let made = |response: &reqwest::Response| {
        let id = header(response, "x-request-id");
        assert!(
            id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit()),
            "a made id: {id:?}"
        );
        id
    };
    for path in [
        "/template-details?id=1",
        "/template-details?id=x",
        "/nowhere",
        "/readyz",
    ] {
        let kept = get(path, Some("client-id_1.2")).await;
        assert_eq!(header(&kept, "x-request-id"), "client-id_1.2", "{path}");
        let first = made(&get(path, None).await);
        let second = made(&get(path, None).await);
        assert_ne!(first, second, "{path}: each request its own");
    }
    let too_long = "x".repeat(129);
    let replaced = app
        .client
        .get(format!("{}/template-details?id=1", app.address))
        .header("x-request-id", too_long.as_str())
        .send()
        .await
        .expect("answered");
    assert_eq!(
        replaced.status(),
        200,
        "an odd id costs the request nothing"
    );
    made(&replaced);
}

#[test]
fn a_protocol_the_exporter_does_not_speak_stops_start_up_naming_the_variable() {
    let output = Command::new(env!("CARGO_BIN_EXE_singleflight"))
        .env("HTTP_ADDR", "127.0.0.1:0")
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4317")
        .env("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")
        .output()
        .expect("run the service binary");
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("OTEL_EXPORTER_OTLP_PROTOCOL=\"grpc\"") && stderr.contains("http/json"),
        "{stderr}"
    );
}
