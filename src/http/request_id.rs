//! Request ids and request spans.
//!
//! Every request has an id: the `X-Request-Id` it came with, when it is a plain token, or one
//! made here. Its response carries it back, and every log line written for it names it (see
//! [`crate::telemetry::logs`]). Its `request` span ([`request_span`]) holds it; while spans are
//! exported every request has that span, continuing the caller's trace when a W3C `traceparent`
//! came with it; otherwise only a request that goes on to its key's owner makes one.

use actix_web::http::header::{HeaderMap, HeaderName, HeaderValue};
use actix_web::http::{Method, StatusCode};
use opentelemetry::propagation::Extractor;
use tracing::field::Empty;
use tracing_opentelemetry::OpenTelemetrySpanExt;

pub const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// The longest id kept as it came; a longer one is replaced.
pub const MAX_LEN: usize = 128;

/// A request's id: a header value, so that answering with it copies nothing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestId(pub HeaderValue);

impl RequestId {
    /// The id of a request with `headers`: its `X-Request-Id` if that is 1 to [`MAX_LEN`]
    /// visible ASCII characters (a proxy's or the client's id, kept so that their logs and ours
    /// meet), else a new one. A request with several keeps the first.
    pub fn of(headers: &HeaderMap) -> RequestId {
        match headers.get(X_REQUEST_ID) {
            Some(given) if is_token(given.as_bytes()) => RequestId(given.clone()),
            _ => RequestId::new(),
        }
    }

    /// A new id: 32 lowercase hex digits (128 random bits), as a trace id is written.
    pub fn new() -> RequestId {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let mut bits = fastrand::u128(..);
        let mut text = [0u8; 32];
        for digit in text.iter_mut().rev() {
            *digit = HEX[(bits & 0xf) as usize];
            bits >>= 4;
        }
        RequestId(HeaderValue::from_bytes(&text).expect("hex digits are a valid header value"))
    }

    pub fn as_str(&self) -> &str {
        // Only visible ASCII gets here (checked, or made as hex digits).
        self.0.to_str().unwrap_or_default()
    }
}

impl Default for RequestId {
    fn default() -> Self {
        RequestId::new()
    }
}

impl std::fmt::Display for RequestId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The `request` span of a request for `path` with `id`: what a collector shows of an HTTP
/// server span (OpenTelemetry's names), and the id that log lines under it name. Its status, and
/// for `/template-details` the id and the `X-Cache` answer, are recorded when known.
pub fn request_span(method: &Method, path: &str, id: &RequestId) -> tracing::Span {
    let route = super::endpoint(path);
    tracing::info_span!(
        "request",
        otel.name = %format_args!("{method} {route}"),
        otel.kind = "server",
        otel.status_code = Empty,
        http.request.method = %method,
        http.route = route,
        url.path = path,
        request_id = %id,
        http.response.status_code = Empty,
        template.id = Empty,
        cache = Empty,
    )
}

/// A request span for the request with `headers`, under the caller's span when a `traceparent`
/// names one (only while spans are exported: there is no trace to continue otherwise).
pub fn continue_trace(span: &tracing::Span, headers: &HeaderMap) {
    if headers.contains_key("traceparent") {
        let parent = opentelemetry::global::get_text_map_propagator(|propagator| {
            propagator.extract(&Headers(headers))
        });
        // Refused only for a span that has already started children: this one has none.
        let _ = span.set_parent(parent);
    }
}

/// Records the response's status on its request span; a 5xx marks the span as failed.
pub fn record_status(span: &tracing::Span, status: StatusCode) {
    span.record("http.response.status_code", status.as_u16());
    if status.is_server_error() {
        span.record("otel.status_code", "ERROR");
    }
}

struct Headers<'a>(&'a HeaderMap);

impl Extractor for Headers<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|value| value.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(HeaderName::as_str).collect()
    }
}

fn is_token(bytes: &[u8]) -> bool {
    (1..=MAX_LEN).contains(&bytes.len()) && bytes.iter().all(|b| (0x21..=0x7e).contains(b))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id_of(value: &[u8]) -> RequestId {
        let mut headers = HeaderMap::new();
        let value = HeaderValue::from_bytes(value).expect("a header value");
        headers.insert(X_REQUEST_ID, value);
        RequestId::of(&headers)
    }

    fn is_made(id: &RequestId) -> bool {
        id.as_str().len() == 32 && id.as_str().bytes().all(|b| b.is_ascii_hexdigit())
    }

    #[test]
    fn a_plain_id_is_kept_and_anything_else_is_replaced() {
        assert_eq!(id_of(b"req-42").as_str(), "req-42");
        let uuid = b"0b5e1f6c-1d2e-4f3a-9b8c-7d6e5f4a3b2c";
        assert_eq!(id_of(uuid).as_str().as_bytes(), uuid);
        assert!(is_made(&RequestId::of(&HeaderMap::new())), "none given");
        assert!(is_made(&id_of(b"")), "empty");
        assert!(is_made(&id_of(b"two words")), "a space");
        assert!(is_made(&id_of("caf\u{e9}".as_bytes())), "not ASCII");
        assert!(is_made(&id_of(&[b'x'; MAX_LEN + 1])), "too long");
        assert_eq!(id_of(&[b'x'; MAX_LEN]).as_str().len(), MAX_LEN);
    }

    #[test]
    fn made_ids_differ() {
        let (a, b) = (RequestId::new(), RequestId::new());
        assert!(is_made(&a) && is_made(&b));
        assert_ne!(a, b);
    }
}
