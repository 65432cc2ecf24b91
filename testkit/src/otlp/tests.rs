//! The receiver, fed by hand over real TCP connections.

use opentelemetry_proto::tonic::common::v1::KeyValue;
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::span::{Event, Link};
use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span, Status};

use super::*;

fn attribute(key: &str, value: Value) -> KeyValue {
    let value = Some(AnyValue { value: Some(value) });
    KeyValue {
        key: key.to_owned(),
        value,
        ..Default::default()
    }
}

/// Two exports of one span each: a root, then its child with attributes, a link, an event.
fn sample_exports() -> [ExportTraceServiceRequest; 2] {
    let root = Span {
        trace_id: vec![0xab; 16],
        span_id: vec![1, 2, 3, 4, 5, 6, 7, 0xf8],
        name: "GET /items".to_owned(),
        kind: 2,
        start_time_unix_nano: 1_000,
        end_time_unix_nano: 5_000,
        attributes: vec![attribute("http.response.status_code", Value::IntValue(200))],
        ..Default::default()
    };
    let child = Span {
        span_id: vec![0x0c; 8],
        parent_span_id: root.span_id.clone(),
        name: "redis GET".to_owned(),
        attributes: vec![
            attribute("db.system", Value::StringValue("redis".to_owned())),
            attribute("cache.hit", Value::BoolValue(false)),
            attribute("wait.seconds", Value::DoubleValue(0.25)),
        ],
        links: vec![Link {
            trace_id: vec![0x11; 16],
            span_id: vec![0x22; 8],
            ..Default::default()
        }],
        events: vec![Event {
            name: "retry".to_owned(),
            ..Default::default()
        }],
        status: Some(Status {
            code: 2,
            message: "boom".to_owned(),
        }),
        ..root.clone()
    };
    [root, child].map(|span| {
        let service_name = attribute("service.name", Value::StringValue("singleflight".into()));
        let resource = Resource {
            attributes: vec![service_name],
            ..Default::default()
        };
        let scope_spans = vec![ScopeSpans {
            spans: vec![span],
            ..Default::default()
        }];
        let resource_spans = ResourceSpans {
            resource: Some(resource),
            scope_spans,
            ..Default::default()
        };
        ExportTraceServiceRequest {
            resource_spans: vec![resource_spans],
        }
    })
}

/// Writes a request (its body in chunks when `chunked`), reads the status and body answered.
async fn exchange(
    connection: &mut BufReader<TcpStream>,
    head: &str,
    headers: &str,
    body: &[u8],
    chunked: bool,
) -> (u16, Vec<u8>) {
    let mut request = format!("{head} HTTP/1.1\r\nHost: localhost\r\n{headers}").into_bytes();
    if chunked {
        request.extend(b"Transfer-Encoding: chunked\r\n\r\n");
        for chunk in body.chunks(100) {
            request.extend(format!("{:x};ext=1\r\n", chunk.len()).bytes());
            request.extend(chunk);
            request.extend(b"\r\n");
        }
        request.extend(b"0\r\nX-Trailer: yes\r\n\r\n");
    } else {
        request.extend(format!("Content-Length: {}\r\n\r\n", body.len()).bytes());
        request.extend(body);
    }
    connection.write_all(&request).await.unwrap();
    let status_line = read_line(connection).await.unwrap();
    let status = status_line[9..12].parse().unwrap();
    let mut length = 0;
    loop {
        let line = read_line(connection).await.unwrap().to_ascii_lowercase();
        match line.strip_prefix("content-length: ") {
            Some(value) => length = value.parse().unwrap(),
            None if line.is_empty() => break,
            None => {}
        }
    }
    let answer = read_exactly(connection, length, Vec::new()).await;
    (status, answer.unwrap())
}

/// Posts the two sample exports on one connection, checks they were accepted and returns the
/// bodies answered.
async fn post_samples(receiver: &Receiver, headers: &str, bodies: [Vec<u8>; 2]) -> Vec<Vec<u8>> {
    let address = receiver.endpoint().replace("http://", "");
    let mut connection = BufReader::new(TcpStream::connect(address).await.unwrap());
    let mut answers = Vec::new();
    for (body, chunked) in bodies.iter().zip([false, true]) {
        let head = format!("POST {TRACES_PATH}");
        let (status, answer) = exchange(&mut connection, &head, headers, body, chunked).await;
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&answer));
        answers.push(answer);
    }
    assert_eq!(receiver.requests(), 2);
    let two_spans = |spans: &[ReceivedSpan]| spans.len() == 2;
    let spans = receiver.wait_for(Duration::from_secs(5), two_spans).await;
    let (root, child) = (&spans[0], &spans[1]);
    assert_eq!(root.name, "GET /items");
    assert_eq!(root.trace_id, "ab".repeat(16));
    assert_eq!(root.span_id, "01020304050607f8");
    assert_eq!(root.parent_span_id, "");
    assert_eq!(root.kind, 2);
    assert_eq!(root.attributes["http.response.status_code"], "200");
    assert_eq!([root.start_unix_nano, root.end_unix_nano], [1_000, 5_000]);
    assert_eq!(root.status_code, 0);
    assert_eq!(child.name, "redis GET");
    assert_eq!(child.trace_id, root.trace_id);
    assert_eq!(child.span_id, "0c".repeat(8));
    assert_eq!(child.parent_span_id, root.span_id);
    assert_eq!(child.attributes["db.system"], "redis");
    assert_eq!(child.attributes["cache.hit"], "false");
    assert_eq!(child.attributes["wait.seconds"], "0.25");
    assert_eq!(child.links, [("11".repeat(16), "22".repeat(8))]);
    assert_eq!(child.events, ["retry"]);
    assert_eq!(child.status_code, 2);
    let services: Vec<_> = spans
        .iter()
        .map(|span| span.service_name.as_deref())
        .collect();
    assert_eq!(services, [Some("singleflight"); 2]);
    answers
}

#[tokio::test]
async fn protobuf_exports_on_one_keep_alive_connection() {
    let receiver = Receiver::start().await.unwrap();
    let bodies = sample_exports().map(|export| export.encode_to_vec());
    let headers = format!("Content-Type: {PROTOBUF}\r\n");
    for answer in post_samples(&receiver, &headers, bodies).await {
        let response = ExportTraceServiceResponse::decode(answer.as_slice()).unwrap();
        assert_eq!(response, ExportTraceServiceResponse::default());
    }
}

#[tokio::test]
async fn json_exports_with_hex_ids_on_one_keep_alive_connection() {
    let receiver = Receiver::start().await.unwrap();
    let [root, child] = sample_exports();
    // Compact, and pretty as the exporter writes it; either way, ids are hex as OTLP/JSON wants.
    let bodies = [
        serde_json::to_vec(&root).unwrap(),
        serde_json::to_vec_pretty(&child).unwrap(),
    ];
    let trace_id = format!(r#""traceId":"{}""#, "ab".repeat(16));
    assert!(String::from_utf8_lossy(&bodies[0]).contains(&trace_id));
    let headers = "Content-Type: application/json; charset=utf-8\r\n";
    for answer in post_samples(&receiver, headers, bodies).await {
        let response: ExportTraceServiceResponse = serde_json::from_slice(&answer).unwrap();
        assert_eq!(response, ExportTraceServiceResponse::default());
    }
}

#[tokio::test]
async fn bad_requests_are_refused_and_the_receiver_keeps_serving() {
    let receiver = Receiver::start().await.unwrap();
    let address = receiver.endpoint().replace("http://", "");
    let mut connection = BufReader::new(TcpStream::connect(&address).await.unwrap());
    let post = format!("POST {TRACES_PATH}");
    let protobuf = format!("Content-Type: {PROTOBUF}\r\n");
    let garbage = b"\xff\xff\xff\xff{not a message".as_slice();
    let gzip = format!("{protobuf}Content-Encoding: gzip\r\n");
    let cases = [
        (post.as_str(), protobuf.as_str(), garbage, 400),
        (&post, "Content-Type: application/json\r\n", garbage, 400),
        (&post, "Content-Type: text/plain\r\n", b"", 415),
        (&post, &gzip, b"", 415),
        (&format!("GET {TRACES_PATH}"), "", b"", 405),
        ("POST /v1/logs", &protobuf, b"", 404),
    ];
    for (head, headers, body, expected) in cases {
        let (status, answer) = exchange(&mut connection, head, headers, body, false).await;
        let answer = String::from_utf8_lossy(&answer);
        assert_eq!(status, expected, "{head} {headers:?}: {answer}");
    }
    // Broken framing is answered 400, then that connection is closed.
    let mut broken = BufReader::new(TcpStream::connect(&address).await.unwrap());
    let bad_length = b"POST /v1/traces HTTP/1.1\r\nContent-Length: x\r\n\r\n";
    broken.write_all(bad_length).await.unwrap();
    let status_line = read_line(&mut broken).await.unwrap();
    assert!(status_line.starts_with("HTTP/1.1 400 "), "{status_line}");
    // The rest of the answer, up to the end of the stream: the receiver closed the connection.
    let mut rest = Vec::new();
    broken.read_to_end(&mut rest).await.unwrap();
    assert!(String::from_utf8_lossy(&rest).contains("bad Content-Length"));
    let body = sample_exports()[0].encode_to_vec();
    let (status, _) = exchange(&mut connection, &post, &protobuf, &body, false).await;
    assert_eq!(status, 200);
    assert_eq!((receiver.requests(), receiver.spans().len()), (1, 1));
}
