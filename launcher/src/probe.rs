//! Asking a server on loopback whether it serves, with the standard library alone: a TCP connect,
//! an HTTP/1.0 GET (Prometheus, HAProxy, the service), a Redis command over RESP, and PostgreSQL's
//! simple queries over its wire protocol ([`PgConnection`]: PgBouncer's readiness, a replica's
//! replay position, the stack's database, the test kit's checks of them). No client library: these are the few bytes a
//! readiness check needs, and the launcher must build quickly.

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

/// A PostgreSQL connection to `127.0.0.1:port` that runs simple queries (protocol 3.0, text
/// results): enough to ask a server, or a pooler in front of one, a question, and to hold a
/// session or a transaction open while another connection asks its own.
///
/// Only trust authentication: every server the launcher runs trusts loopback, and a server that
/// asks for a password is not one of ours. No TLS, no extended protocol, no prepared statements
/// (which PgBouncer 1.18 in transaction mode could not carry anyway). Each read and write is
/// bounded by the probe's timeout, so a query that runs longer fails.
pub struct PgConnection {
    stream: TcpStream,
    /// `127.0.0.1:port/database`, for the messages.
    server: String,
}

/// One row of a result: each column's text, `None` for NULL.
pub type PgRow = Vec<Option<String>>;

impl PgConnection {
    /// Connects as `user` to `database` and waits until the server is ready for a query.
    pub fn connect(port: u16, user: &str, database: &str) -> Result<PgConnection, String> {
        let mut connection = PgConnection {
            stream: connect(port)?,
            server: format!("127.0.0.1:{port}/{database}"),
        };
        let mut body = 196_608_i32.to_be_bytes().to_vec(); // protocol 3.0
        for (name, value) in [("user", user), ("database", database)] {
            for text in [name, value] {
                body.extend_from_slice(text.as_bytes());
                body.push(0);
            }
        }
        body.push(0);
        connection.send(None, &body)?;
        let mut refused = None;
        loop {
            match connection.receive()? {
                (b'R', body) => match read_i32(&body, 0) {
                    Some(0) => {}
                    code => {
                        return Err(format!(
                        "{} asks for authentication (request {code:?}); only trust is supported",
                        connection.server
                    ))
                    }
                },
                (b'E', body) => refused = Some(error_text(&body)),
                (b'Z', _) => break,
                // ParameterStatus, BackendKeyData, notices: nothing a probe needs.
                _ => {}
            }
            if let Some(error) = refused {
                return Err(format!(
                    "{} refused the connection: {error}",
                    connection.server
                ));
            }
        }
        Ok(connection)
    }

    /// Runs `sql` (one statement or several, as a simple query) and returns the rows of every
    /// result, in order; an error the server reports is an `Err` with its message.
    pub fn query(&mut self, sql: &str) -> Result<Vec<PgRow>, String> {
        let mut body = sql.as_bytes().to_vec();
        body.push(0);
        self.send(Some(b'Q'), &body)?;
        let mut rows = Vec::new();
        let mut failed = None;
        loop {
            match self.receive()? {
                (b'D', body) => {
                    rows.push(data_row(&body).ok_or_else(|| {
                        format!("{} sent a malformed row for {sql:?}", self.server)
                    })?)
                }
                (b'E', body) => failed = Some(error_text(&body)),
                (b'Z', _) => break,
                // RowDescription, CommandComplete, EmptyQueryResponse, notices.
                _ => {}
            }
        }
        match failed {
            Some(error) => Err(format!("{} answered {sql:?} with: {error}", self.server)),
            None => Ok(rows),
        }
    }

    /// The first column of the first row of `sql`'s result (`None`: no row, or NULL).
    pub fn value(&mut self, sql: &str) -> Result<Option<String>, String> {
        Ok(self
            .query(sql)?
            .into_iter()
            .next()
            .and_then(|row| row.into_iter().next().flatten()))
    }

    /// Sends one message: its type byte (none for the start-up message), length and body.
    fn send(&mut self, kind: Option<u8>, body: &[u8]) -> Result<(), String> {
        let mut message = Vec::with_capacity(body.len() + 5);
        message.extend(kind);
        let len = i32::try_from(body.len() + 4)
            .map_err(|_| format!("a message of {} bytes is too long", body.len()))?;
        message.extend_from_slice(&len.to_be_bytes());
        message.extend_from_slice(body);
        self.stream
            .write_all(&message)
            .map_err(|e| format!("sending to {}: {e}", self.server))
    }

    /// Reads one message: its type byte and body.
    fn receive(&mut self) -> Result<(u8, Vec<u8>), String> {
        let failed = |e: std::io::Error| format!("reading from {}: {e}", self.server);
        let mut head = [0; 5];
        self.stream.read_exact(&mut head).map_err(failed)?;
        let len = read_i32(&head, 1)
            .and_then(|len| usize::try_from(len).ok())
            .filter(|len| *len >= 4)
            .ok_or_else(|| format!("{} sent a bad message length", self.server))?;
        let mut body = vec![0; len - 4];
        self.stream.read_exact(&mut body).map_err(failed)?;
        Ok((head[0], body))
    }
}

impl Drop for PgConnection {
    /// Says goodbye (Terminate), so that the server and a pooler do not log a lost client.
    fn drop(&mut self) {
        let _ = self.send(Some(b'X'), &[]);
    }
}

/// The big-endian `i32` at `at` in `bytes`.
fn read_i32(bytes: &[u8], at: usize) -> Option<i32> {
    let four = bytes.get(at..at + 4)?;
    Some(i32::from_be_bytes([four[0], four[1], four[2], four[3]]))
}

/// A DataRow's columns: a count, then each column's length (-1: NULL) and text.
fn data_row(body: &[u8]) -> Option<PgRow> {
    let columns = u16::from_be_bytes([*body.first()?, *body.get(1)?]);
    let mut at = 2;
    let mut row = Vec::with_capacity(usize::from(columns));
    for _ in 0..columns {
        let len = read_i32(body, at)?;
        at += 4;
        let Ok(len) = usize::try_from(len) else {
            row.push(None);
            continue;
        };
        let text = body.get(at..at + len)?;
        at += len;
        row.push(Some(String::from_utf8_lossy(text).into_owned()));
    }
    Some(row)
}

/// An ErrorResponse as `SEVERITY: message (SQLSTATE code)`.
fn error_text(body: &[u8]) -> String {
    let mut severity = "ERROR".to_owned();
    let (mut message, mut code) = (String::new(), String::new());
    for field in body.split(|b| *b == 0).filter(|f| !f.is_empty()) {
        let text = String::from_utf8_lossy(&field[1..]).into_owned();
        match field[0] {
            b'S' => severity = text,
            b'M' => message = text,
            b'C' => code = text,
            _ => {}
        }
    }
    format!("{severity}: {message} (SQLSTATE {code})")
}
