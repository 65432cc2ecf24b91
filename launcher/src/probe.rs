//! Asking a server on loopback whether it serves, with the standard library alone: a TCP connect,
//! an HTTP/1.0 GET (Prometheus, HAProxy, the service) and a Redis command over RESP. No client
//! library: these are the few bytes a readiness check needs, and the launcher must build quickly.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::time::Duration;

/// How long one probe may take: a server that needs longer to answer is not ready.
const TIMEOUT: Duration = Duration::from_secs(2);

/// A connection to `127.0.0.1:port`, with [`TIMEOUT`] on connecting, reading and writing.
pub fn connect(port: u16) -> Result<TcpStream, String> {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let stream = TcpStream::connect_timeout(&addr, TIMEOUT)
        .map_err(|e| format!("TCP connect to 127.0.0.1:{port}: {e}"))?;
    stream
        .set_read_timeout(Some(TIMEOUT))
        .and_then(|()| stream.set_write_timeout(Some(TIMEOUT)))
        .map_err(|e| format!("socket timeouts for 127.0.0.1:{port}: {e}"))?;
    Ok(stream)
}

/// `GET path` on `127.0.0.1:port`: the status code and the body. HTTP/1.0, so the server closes
/// the connection after the answer and sends no chunked body.
pub fn http_get(port: u16, path: &str) -> Result<(u16, String), String> {
    let mut stream = connect(port)?;
    write!(
        stream,
        "GET {path} HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| format!("GET :{port}{path}: {e}"))?;
    let mut response = Vec::new();
    stream
        .read_to_end(&mut response)
        .map_err(|e| format!("GET :{port}{path}: {e}"))?;
    let response = String::from_utf8_lossy(&response);
    let (head, body) = response
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("GET :{port}{path}: not an HTTP response"))?;
    let code = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("GET :{port}{path}: no status code in {head:?}"))?;
    Ok((code, body.to_owned()))
}

/// The body of `GET path` if it answers with a success (below 400, as `curl -f` counts).
pub fn http_ok(port: u16, path: &str) -> Result<String, String> {
    match http_get(port, path)? {
        (code, body) if code < 400 => Ok(body),
        (code, _) => Err(format!("GET :{port}{path} answered {code}")),
    }
}

/// Sends one Redis command (as a RESP array) to `127.0.0.1:port` and returns its reply: a simple
/// or bulk string, an integer as text, or an empty string if the server closed the connection
/// (as `SHUTDOWN` does). An error reply is an `Err`.
pub fn redis(port: u16, command: &[&str]) -> Result<String, String> {
    let mut stream = connect(port)?;
    let mut request = format!("*{}\r\n", command.len());
    for word in command {
        request.push_str(&format!("${}\r\n{word}\r\n", word.len()));
    }
    stream
        .write_all(request.as_bytes())
        .map_err(|e| format!("sending {} to Redis on port {port}: {e}", command[0]))?;
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    let read = reader
        .read_line(&mut line)
        .map_err(|e| format!("reading Redis's answer on port {port}: {e}"))?;
    if read == 0 {
        return Ok(String::new());
    }
    let line = line.trim_end_matches(['\r', '\n']);
    match line.split_at(line.len().min(1)) {
        ("+" | ":", rest) => Ok(rest.to_owned()),
        ("-", error) => Err(format!("Redis on port {port} answered: {error}")),
        ("$", len) => {
            let len: usize = len
                .parse()
                .map_err(|_| format!("Redis on port {port} sent a bad length: {line:?}"))?;
            let mut bulk = vec![0; len + 2];
            reader
                .read_exact(&mut bulk)
                .map_err(|e| format!("reading Redis's answer on port {port}: {e}"))?;
            bulk.truncate(len);
            Ok(String::from_utf8_lossy(&bulk).into_owned())
        }
        _ => Err(format!("Redis on port {port} answered {line:?}")),
    }
}
