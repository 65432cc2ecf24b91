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

/// A Redis reply (RESP2, which every server here speaks unless a client asks for RESP3): enough
/// for the launcher's own questions, among them the arrays of `CLUSTER SLOTS`, `ROLE` and the
/// `SENTINEL` commands. An error reply is not a `Reply` but the `Err` of [`redis_reply`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reply {
    /// A simple or bulk string (bulk strings are read as UTF-8, lossily).
    Text(String),
    Integer(i64),
    /// A null bulk string or null array: "no such thing" (`GET` of a missing key, a sentinel
    /// asked for a master it does not monitor).
    Nil,
    Array(Vec<Reply>),
}

impl Reply {
    /// The reply as text: a string as is, an integer in decimal, nil as the empty string, an
    /// array as its elements' texts one a line (nested arrays flattened).
    pub fn text(&self) -> String {
        match self {
            Reply::Text(text) => text.clone(),
            Reply::Integer(n) => n.to_string(),
            Reply::Nil => String::new(),
            Reply::Array(items) => items.iter().map(Reply::text).collect::<Vec<_>>().join("\n"),
        }
    }

    /// The elements of an array reply (none for nil, or for anything else).
    pub fn items(&self) -> &[Reply] {
        match self {
            Reply::Array(items) => items,
            _ => &[],
        }
    }

    /// A string or integer reply as a number.
    pub fn number<T: std::str::FromStr>(&self) -> Option<T> {
        match self {
            Reply::Text(text) => text.parse().ok(),
            Reply::Integer(n) => n.to_string().parse().ok(),
            _ => None,
        }
    }

    /// A flat array of alternating names and values (`SENTINEL master`, each entry of
    /// `SENTINEL replicas`): the value of `name`.
    pub fn field(&self, name: &str) -> Option<&Reply> {
        self.items()
            .chunks(2)
            .find(|pair| matches!(&pair[0], Reply::Text(key) if key == name))
            .and_then(|pair| pair.get(1))
    }
}

/// Sends one Redis command (as a RESP array) to `127.0.0.1:port` and returns its reply as text
/// ([`Reply::text`]): a simple or bulk string, an integer, an array one element a line, or an
/// empty string if the server closed the connection (as `SHUTDOWN` does). An error reply is an
/// `Err`.
pub fn redis(port: u16, command: &[&str]) -> Result<String, String> {
    redis_reply(port, command).map(|reply| reply.text())
}

/// Sends one Redis command (as a RESP array) to `127.0.0.1:port` and returns its reply, [`Nil`]
/// if the server closed the connection instead (as `SHUTDOWN` does). An error reply is an `Err`
/// that quotes it.
///
/// [`Nil`]: Reply::Nil
pub fn redis_reply(port: u16, command: &[&str]) -> Result<Reply, String> {
    let mut stream = connect(port)?;
    let mut request = format!("*{}\r\n", command.len());
    for word in command {
        request.push_str(&format!("${}\r\n{word}\r\n", word.len()));
    }
    let name = command.first().copied().unwrap_or_default();
    stream
        .write_all(request.as_bytes())
        .map_err(|e| format!("sending {name} to Redis on port {port}: {e}"))?;
    let mut reader = BufReader::new(stream);
    match read_reply(&mut reader, port)? {
        Some(Ok(reply)) => Ok(reply),
        Some(Err(error)) => Err(format!("Redis on port {port} answered: {error}")),
        None => Ok(Reply::Nil),
    }
}

/// Reads one reply: `None` if the connection ended before it began; `Some(Err(text))` for an
/// error reply.
fn read_reply(
    reader: &mut impl BufRead,
    port: u16,
) -> Result<Option<Result<Reply, String>>, String> {
    let failed = |e: std::io::Error| format!("reading Redis's answer on port {port}: {e}");
    let mut line = String::new();
    if reader.read_line(&mut line).map_err(failed)? == 0 {
        return Ok(None);
    }
    let line = line.trim_end_matches(['\r', '\n']);
    let bad = || format!("Redis on port {port} answered {line:?}");
    let reply = match line.split_at(line.len().min(1)) {
        ("+", text) => Reply::Text(text.to_owned()),
        ("-", error) => return Ok(Some(Err(error.to_owned()))),
        (":", n) => Reply::Integer(n.parse().map_err(|_| bad())?),
        ("$", "-1") | ("*", "-1") => Reply::Nil,
        ("$", len) => {
            let len: usize = len.parse().map_err(|_| bad())?;
            let mut bulk = vec![0; len + 2];
            reader.read_exact(&mut bulk).map_err(failed)?;
            bulk.truncate(len);
            Reply::Text(String::from_utf8_lossy(&bulk).into_owned())
        }
        ("*", len) => {
            let len: usize = len.parse().map_err(|_| bad())?;
            let mut items = Vec::with_capacity(len.min(1024));
            for _ in 0..len {
                match read_reply(reader, port)? {
                    Some(Ok(item)) => items.push(item),
                    // An error inside an array (a transaction's): the whole answer is an error.
                    Some(Err(error)) => return Ok(Some(Err(error))),
                    None => {
                        return Err(format!(
                            "Redis on port {port} closed the connection inside an array"
                        ))
                    }
                }
            }
            Reply::Array(items)
        }
        _ => return Err(bad()),
    };
    Ok(Some(Ok(reply)))
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

#[cfg(test)]
mod tests {
    use super::*;

    fn read(bytes: &[u8]) -> Option<Result<Reply, String>> {
        read_reply(&mut BufReader::new(bytes), 0).expect("a well-formed reply")
    }

    #[test]
    fn redis_replies_are_read_arrays_and_nils_included() {
        use Reply::{Array, Integer, Nil, Text};
        assert_eq!(read(b"+OK\r\n"), Some(Ok(Text("OK".into()))));
        assert_eq!(read(b":42\r\n"), Some(Ok(Integer(42))));
        assert_eq!(read(b"$-1\r\n"), Some(Ok(Nil)));
        assert_eq!(read(b"*-1\r\n"), Some(Ok(Nil)));
        assert_eq!(read(b"-ERR no\r\n"), Some(Err("ERR no".into())));
        assert_eq!(read(b""), None, "the server closed the connection");
        // CLUSTER SLOTS' shape: [first, last, [ip, port, id]].
        let slots =
            read(b"*1\r\n*3\r\n:0\r\n:5460\r\n*3\r\n$9\r\n127.0.0.1\r\n:7000\r\n$2\r\nid\r\n")
                .and_then(Result::ok)
                .expect("an array");
        let range = &slots.items()[0];
        assert_eq!(range.items()[1].number::<u16>(), Some(5460));
        assert_eq!(range.items()[2].items()[1].number::<u16>(), Some(7000));
        assert_eq!(range.text(), "0\n5460\n127.0.0.1\n7000\nid");
        // SENTINEL master's shape: names and values in turn.
        let master = Array(vec![
            Text("name".into()),
            Text("m".into()),
            Text("flags".into()),
            Text("master".into()),
        ]);
        assert_eq!(master.field("flags"), Some(&Text("master".into())));
        assert_eq!(master.field("master"), None, "values are not names");
        assert!(read_reply(&mut BufReader::new(&b"*2\r\n:1\r\n"[..]), 0).is_err());
    }
}
