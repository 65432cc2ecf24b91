//! An OTLP/HTTP trace receiver, to check the spans the service exports.
//!
//! The tracing tests point the service's `opentelemetry-otlp` exporter at a [`Receiver`]
//! (`OTEL_EXPORTER_OTLP_ENDPOINT` = [`Receiver::endpoint`]; the exporter appends `/v1/traces`)
//! and then [`Receiver::wait_for`] the spans they expect. It takes both encodings the exporter
//! writes: `http/protobuf` (`application/x-protobuf`, the default) and `http/json`
//! (`application/json`, trace and span ids as hex), and answers each in its own encoding.
//! Compressed bodies are refused with 415: leave `OTEL_EXPORTER_OTLP_COMPRESSION` unset.
//!
//! It is the smallest HTTP/1.1 server that serves the exporter: keep-alive, `Content-Length` or
//! chunked bodies, one request at a time per connection. Bad input never panics it; it answers
//! 400 (undecodable body, broken framing), 404 (other paths), 405 (other methods) or 415.
//!
//! # Runtime
//!
//! The receiver is a task on the test's own tokio runtime (actix's current-thread one included),
//! so it answers while the test awaits — [`Receiver::wait_for`] does. The exporter must therefore
//! send from a thread of its own, as the SDK's batch span processor does: a simple processor
//! calling the blocking client on the test's thread would wait for a receiver that cannot run.
//! Dropping the [`Receiver`] aborts the task and every connection's, closing the port.

use std::collections::BTreeMap;
use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::common::v1::AnyValue;
use prost::Message;
use tokio::io::{
    AsyncBufRead, AsyncBufReadExt, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader,
};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{JoinHandle, JoinSet};

/// The path the exporter posts spans to, under the endpoint.
pub const TRACES_PATH: &str = "/v1/traces";
/// How often [`Receiver::wait_for`] looks at the spans received.
const POLL_EVERY: Duration = Duration::from_millis(20);
/// The longest request or header line accepted.
const MAX_LINE: u64 = 16 * 1024;
/// The largest body accepted (the exporter's batches are far smaller).
const MAX_BODY: usize = 64 * 1024 * 1024;
const PROTOBUF: &str = "application/x-protobuf";
const JSON: &str = "application/json";

/// One span as received, with ids as lowercase hex and attribute values as text.
#[derive(Debug, Clone)]
pub struct ReceivedSpan {
    /// The span's name.
    pub name: String,
    /// 32 hex digits.
    pub trace_id: String,
    /// 16 hex digits.
    pub span_id: String,
    /// The parent's span id; `""` for a root span.
    pub parent_span_id: String,
    /// `opentelemetry_proto::tonic::trace::v1::span::SpanKind` as a number (2 = server).
    pub kind: i32,
    /// Strings as they are; ints, doubles and bools through `to_string`; other kinds (arrays,
    /// key-value lists, bytes) in their `Debug` form.
    pub attributes: BTreeMap<String, String>,
    /// The linked spans, as (trace id, span id) in hex.
    pub links: Vec<(String, String)>,
    /// The events' names, in order.
    pub events: Vec<String>,
    /// `opentelemetry_proto::tonic::trace::v1::status::StatusCode` as a number (2 = error);
    /// 0 (unset) when the span has no status.
    pub status_code: i32,
    /// The `service.name` attribute of the span's resource, rendered like `attributes`.
    pub service_name: Option<String>,
    /// When the span started, in nanoseconds since the Unix epoch.
    pub start_unix_nano: u64,
    /// When the span ended, in nanoseconds since the Unix epoch.
    pub end_unix_nano: u64,
}

/// What the connections record, for the test to read.
#[derive(Debug, Default)]
struct Received {
    spans: Vec<ReceivedSpan>,
    requests: usize,
}

/// An OTLP/HTTP trace receiver on a free loopback port; stops when dropped.
#[derive(Debug)]
pub struct Receiver {
    address: SocketAddr,
    received: Arc<Mutex<Received>>,
    task: JoinHandle<()>,
}

impl Receiver {
    /// Binds 127.0.0.1 on a free port and serves on a task of the current tokio runtime.
    pub async fn start() -> io::Result<Receiver> {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await?;
        let address = listener.local_addr()?;
        let received = Arc::new(Mutex::new(Received::default()));
        let task = tokio::spawn(serve(listener, Arc::clone(&received)));
        Ok(Receiver {
            address,
            received,
            task,
        })
    }

    /// The base URL, `http://127.0.0.1:<port>`, for `OTEL_EXPORTER_OTLP_ENDPOINT`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.address)
    }

    /// Every span received so far, in the order received.
    pub fn spans(&self) -> Vec<ReceivedSpan> {
        lock(&self.received).spans.clone()
    }

    /// How many export requests were accepted (answered 200) so far.
    pub fn requests(&self) -> usize {
        lock(&self.received).requests
    }

    /// Looks at the spans received every 20 ms until `done` holds for them, and returns them.
    ///
    /// # Panics
    ///
    /// When `timeout` passes first, listing the names of the spans received.
    pub async fn wait_for(
        &self,
        timeout: Duration,
        done: impl Fn(&[ReceivedSpan]) -> bool,
    ) -> Vec<ReceivedSpan> {
        let snapshot = || std::future::ready(self.spans());
        let polled = crate::poll::until(timeout, POLL_EVERY, snapshot, |spans| done(spans)).await;
        if !polled.done {
            let names: Vec<&str> = polled.last.iter().map(|span| span.name.as_str()).collect();
            panic!(
                "the OTLP spans received did not satisfy the condition within {timeout:?} \
                 ({} export requests); span names received: {names:?}",
                self.requests()
            );
        }
        polled.last
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        // The connections live in the task's JoinSet, so they are aborted with it.
        self.task.abort();
    }
}

fn lock(received: &Mutex<Received>) -> std::sync::MutexGuard<'_, Received> {
    received.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Accepts connections and serves each on a task of its own, until aborted.
async fn serve(listener: TcpListener, received: Arc<Mutex<Received>>) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    connections.spawn(serve_connection(stream, Arc::clone(&received)));
                }
                // Out of file descriptors or the like: give the system a moment, do not spin.
                Err(_) => tokio::time::sleep(POLL_EVERY).await,
            },
            // Reaps finished connections, so that the set does not grow with every one.
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

async fn serve_connection(stream: TcpStream, received: Arc<Mutex<Received>>) {
    let mut stream = BufReader::new(stream);
    loop {
        let request = match read_request(&mut stream).await {
            Ok(request) => request,
            // Broken framing: say why, then close, since the next request cannot be found.
            Err(error) if error.kind() == io::ErrorKind::InvalidData => {
                let response = Response::text(400, format!("malformed HTTP request: {error}"));
                let _ = write_response(&mut stream, &response, true).await;
                return;
            }
            // Closed by the client (between requests or not), or reset.
            Err(_) => return,
        };
        let response = handle(&request, &received);
        let close = !request.keep_alive;
        if write_response(&mut stream, &response, close).await.is_err() || close {
            return;
        }
    }
}

/// One HTTP request, body read whole.
struct Request {
    method: String,
    path: String,
    /// Names in lowercase.
    headers: Vec<(String, String)>,
    keep_alive: bool,
    body: Vec<u8>,
}

impl Request {
    fn header(&self, name: &str) -> Option<&str> {
        let mut matching = self.headers.iter().filter(|(key, _)| key == name);
        matching.next().map(|(_, value)| value.as_str())
    }

    /// Whether header `name` has `token` in its value, ignoring case.
    fn has(&self, name: &str, token: &str) -> bool {
        let value = self.header(name).unwrap_or_default();
        value.to_ascii_lowercase().contains(token)
    }
}

fn invalid(message: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message.into())
}

/// A line without its CRLF; `UnexpectedEof` when the stream ends first.
async fn read_line<R: AsyncBufRead + Unpin>(reader: &mut R) -> io::Result<String> {
    let mut line = Vec::new();
    let mut limited = (&mut *reader).take(MAX_LINE);
    limited.read_until(b'\n', &mut line).await?;
    if line.is_empty() {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    if !line.ends_with(b"\n") {
        return Err(invalid("a line too long, or cut short"));
    }
    let line = String::from_utf8(line).map_err(|_| invalid("a line is not UTF-8"))?;
    Ok(line.trim_end_matches(['\r', '\n']).to_owned())
}

/// The next request on the connection (`UnexpectedEof` when the client closed it).
async fn read_request<R: AsyncBufRead + Unpin>(reader: &mut R) -> io::Result<Request> {
    let request_line = read_line(reader).await?;
    let mut parts = request_line.split(' ');
    let (Some(method), Some(target), Some(version @ ("HTTP/1.1" | "HTTP/1.0")), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(invalid(format!("bad request line {request_line:?}")));
    };
    let mut headers = Vec::new();
    loop {
        let line = read_line(reader).await?;
        if line.is_empty() {
            break;
        }
        let (name, value) = line
            .split_once(':')
            .ok_or_else(|| invalid(format!("bad header {line:?}")))?;
        headers.push((name.trim().to_ascii_lowercase(), value.trim().to_owned()));
    }
    let path = target.split_once('?').map_or(target, |(path, _query)| path);
    let mut request = Request {
        method: method.to_owned(),
        path: path.to_owned(),
        headers,
        keep_alive: false,
        body: Vec::new(),
    };
    request.keep_alive = version == "HTTP/1.1" && !request.has("connection", "close");
    if request.has("transfer-encoding", "chunked") {
        request.body = read_chunked_body(reader).await?;
    } else if let Some(length) = request.header("content-length") {
        let length = length
            .parse()
            .map_err(|_| invalid(format!("bad Content-Length {length:?}")))?;
        request.body = read_exactly(reader, length, Vec::new()).await?;
    }
    Ok(request)
}

/// Appends `length` bytes from `reader` to `body`, within [`MAX_BODY`] in all.
async fn read_exactly<R: AsyncBufRead + Unpin>(
    reader: &mut R,
    length: usize,
    mut body: Vec<u8>,
) -> io::Result<Vec<u8>> {
    let start = body.len();
    if start.saturating_add(length) > MAX_BODY {
        return Err(invalid(format!("body over the {MAX_BODY}-byte limit")));
    }
    body.resize(start + length, 0);
    reader.read_exact(&mut body[start..]).await?;
    Ok(body)
}

async fn read_chunked_body<R: AsyncBufRead + Unpin>(reader: &mut R) -> io::Result<Vec<u8>> {
    let mut body = Vec::new();
    loop {
        let line = read_line(reader).await?;
        let size_text = line.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size_text, 16)
            .map_err(|_| invalid(format!("bad chunk size {line:?}")))?;
        if size == 0 {
            // Skips the trailers, up to the empty line that ends the body.
            while !read_line(reader).await?.is_empty() {}
            return Ok(body);
        }
        body = read_exactly(reader, size, body).await?;
        if !read_line(reader).await?.is_empty() {
            return Err(invalid("a chunk is not followed by CRLF"));
        }
    }
}

/// An answer: status, Content-Type and body.
struct Response(u16, &'static str, Vec<u8>);

impl Response {
    fn text(status: u16, message: String) -> Response {
        Response(status, "text/plain; charset=utf-8", message.into_bytes())
    }
}

async fn write_response<W: AsyncWrite + Unpin>(
    writer: &mut W,
    response: &Response,
    close: bool,
) -> io::Result<()> {
    let Response(status, content_type, body) = response;
    let reason = match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        _ => "Unsupported Media Type",
    };
    let allow = if *status == 405 {
        "Allow: POST\r\n"
    } else {
        ""
    };
    let connection = if close { "Connection: close\r\n" } else { "" };
    let length = body.len();
    let head = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {length}\r\n\
         {allow}{connection}\r\n"
    );
    writer.write_all(head.as_bytes()).await?;
    writer.write_all(body).await?;
    writer.flush().await
}

/// Why a compressed body is refused.
const COMPRESSED: &str = "Content-Encoding (compressed bodies) is not supported by this test \
                          receiver: leave OTEL_EXPORTER_OTLP_COMPRESSION unset";

/// Answers one request, recording its spans when it is a valid export.
fn handle(request: &Request, received: &Mutex<Received>) -> Response {
    let Request {
        method, path, body, ..
    } = request;
    let content_type = request.header("content-type").unwrap_or_default();
    let media_type = content_type.split(';').next().unwrap_or_default().trim();
    let media_type = media_type.to_ascii_lowercase();
    let decoded = match media_type.as_str() {
        _ if path != TRACES_PATH => {
            return Response::text(404, format!("no {path:?} here: spans go to {TRACES_PATH}"));
        }
        _ if method != "POST" => {
            return Response::text(405, format!("{method} {TRACES_PATH}: only POST is served"));
        }
        _ if request.header("content-encoding").is_some() => {
            return Response::text(415, COMPRESSED.to_owned());
        }
        PROTOBUF => {
            let decoded = ExportTraceServiceRequest::decode(body.as_slice());
            decoded.map_err(|error| error.to_string())
        }
        JSON => serde_json::from_slice(body).map_err(|error| error.to_string()),
        _ => {
            let message = format!("Content-Type {content_type:?}: neither {PROTOBUF} nor {JSON}");
            return Response::text(415, message);
        }
    };
    let export = match decoded {
        Ok(export) => export,
        Err(error) => {
            let message = format!("not an ExportTraceServiceRequest ({content_type}): {error}");
            return Response::text(400, message);
        }
    };
    let mut received = lock(received);
    received.spans.extend(received_spans(&export));
    received.requests += 1;
    if media_type == JSON {
        // The empty ExportTraceServiceResponse, in OTLP/JSON.
        Response(200, JSON, b"{}".to_vec())
    } else {
        let empty = ExportTraceServiceResponse::default();
        Response(200, PROTOBUF, empty.encode_to_vec())
    }
}

fn received_spans(export: &ExportTraceServiceRequest) -> Vec<ReceivedSpan> {
    let mut spans = Vec::new();
    for resource_spans in &export.resource_spans {
        let resource = resource_spans.resource.iter();
        let mut resource_attributes = resource.flat_map(|resource| &resource.attributes);
        let service_name = resource_attributes
            .find(|attribute| attribute.key == "service.name")
            .map(|attribute| render(&attribute.value));
        let scopes = resource_spans.scope_spans.iter();
        for span in scopes.flat_map(|scope| &scope.spans) {
            let attributes = span.attributes.iter();
            let links = span.links.iter();
            spans.push(ReceivedSpan {
                name: span.name.clone(),
                trace_id: hex(&span.trace_id),
                span_id: hex(&span.span_id),
                parent_span_id: hex(&span.parent_span_id),
                kind: span.kind,
                attributes: attributes
                    .map(|kv| (kv.key.clone(), render(&kv.value)))
                    .collect(),
                links: links
                    .map(|link| (hex(&link.trace_id), hex(&link.span_id)))
                    .collect(),
                events: span.events.iter().map(|event| event.name.clone()).collect(),
                status_code: span.status.as_ref().map_or(0, |status| status.code),
                service_name: service_name.clone(),
                start_unix_nano: span.start_time_unix_nano,
                end_unix_nano: span.end_time_unix_nano,
            });
        }
    }
    spans
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}

/// An attribute value as text; see [`ReceivedSpan::attributes`].
fn render(value: &Option<AnyValue>) -> String {
    match value.as_ref().and_then(|value| value.value.as_ref()) {
        None => String::new(),
        Some(Value::StringValue(text)) => text.clone(),
        Some(Value::BoolValue(flag)) => flag.to_string(),
        Some(Value::IntValue(number)) => number.to_string(),
        Some(Value::DoubleValue(number)) => number.to_string(),
        Some(other) => format!("{other:?}"),
    }
}

#[cfg(test)]
mod tests;
