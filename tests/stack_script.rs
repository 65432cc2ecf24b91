//! `scripts/stack.sh`, the native stack behind the README's run command, driven end to end:
//! PostgreSQL, Redis and Prometheus started for real under a temporary `STACK_DIR` on free ports,
//! then `status`, a second `start` that must reuse the same processes, `stop`, `start` again and
//! `stop`. A port held by something else must stop `start` before it starts anything.
//!
//! Every script run is bounded in time, and a guard runs `stop` when the test ends, however it
//! ends, so no server outlives the test.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread;
use std::time::{Duration, Instant};

/// A first `start` may run `initdb`; on a machine without the packages it installs them first.
const START_LIMIT: Duration = Duration::from_secs(300);
const OTHER_LIMIT: Duration = Duration::from_secs(60);

/// The servers the script manages, as `status` names them.
const SERVERS: [&str; 3] = ["postgres", "redis", "prometheus"];

/// One stack under a temporary directory. Dropping it runs `stack.sh stop`.
struct Stack {
    /// Holds STACK_DIR; removed on drop, after the servers were stopped.
    tmp: tempfile::TempDir,
    stack_dir: PathBuf,
    pg_port: u16,
    redis_port: u16,
    prom_port: u16,
    /// Where Prometheus is told the service listens (nothing listens there in this test).
    http_port: u16,
}

/// What one run of the script did.
struct Run {
    success: bool,
    stdout: String,
    stderr: String,
}

impl Run {
    fn expect_success(self, what: &str) -> Self {
        assert!(
            self.success,
            "`stack.sh {what}` failed\n--- stdout\n{}\n--- stderr\n{}",
            self.stdout, self.stderr
        );
        self
    }
}

impl Stack {
    fn new() -> Self {
        let tmp = tempfile::Builder::new()
            .prefix("singleflight-stack-")
            .tempdir()
            .expect("a temporary directory");
        // When the test runs as root the script runs PostgreSQL as the `postgres` user, which
        // must be able to reach STACK_DIR: TempDir creates its directory 0700.
        fs::set_permissions(tmp.path(), fs::Permissions::from_mode(0o755))
            .expect("make the temporary directory searchable");
        let [pg_port, redis_port, prom_port, http_port] = free_ports();
        Stack {
            stack_dir: tmp.path().join("stack"),
            tmp,
            pg_port,
            redis_port,
            prom_port,
            http_port,
        }
    }

    /// Runs `bash scripts/stack.sh <command>` against this stack, killing it at `limit`.
    fn run(&self, command: &str, limit: Duration) -> Run {
        static RUNS: AtomicU32 = AtomicU32::new(0);
        let n = RUNS.fetch_add(1, Ordering::SeqCst);
        // Files, not pipes: the servers the script starts must not hold our pipes open.
        let out_path = self.tmp.path().join(format!("{n}-{command}.out"));
        let err_path = self.tmp.path().join(format!("{n}-{command}.err"));
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/stack.sh");
        let mut child = Command::new("bash")
            .arg(&script)
            .arg(command)
            .env("STACK_DIR", &self.stack_dir)
            .env("PG_PORT", self.pg_port.to_string())
            .env("REDIS_PORT", self.redis_port.to_string())
            .env("PROM_PORT", self.prom_port.to_string())
            .env("HTTP_ADDR", format!("127.0.0.1:{}", self.http_port))
            .stdin(Stdio::null())
            .stdout(File::create(&out_path).expect("stdout file"))
            .stderr(File::create(&err_path).expect("stderr file"))
            .spawn()
            .expect("run bash scripts/stack.sh");
        let deadline = Instant::now() + limit;
        let status = loop {
            if let Some(status) = child.try_wait().expect("wait for stack.sh") {
                break Some(status);
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            thread::sleep(Duration::from_millis(50));
        };
        let run = Run {
            success: status.is_some_and(|s| s.success()),
            stdout: fs::read_to_string(&out_path).unwrap_or_default(),
            stderr: fs::read_to_string(&err_path).unwrap_or_default(),
        };
        assert!(
            status.is_some(),
            "`stack.sh {command}` did not finish within {limit:?}\n--- stdout\n{}\n--- stderr\n{}",
            run.stdout,
            run.stderr
        );
        run
    }

    /// `status`, as server name → pid of the running ones (a server not running is absent).
    /// Also checks that each running server reports the port it was asked for.
    fn running(&self) -> HashMap<&'static str, u32> {
        let run = self.run("status", OTHER_LIMIT).expect_success("status");
        let mut pids = HashMap::new();
        for server in SERVERS {
            let line = run
                .stdout
                .lines()
                .find(|l| l.starts_with(&format!("{server}:")))
                .unwrap_or_else(|| panic!("`status` has no {server} line:\n{}", run.stdout));
            if line.contains("not running") {
                continue;
            }
            // "<name>: running, pid <pid>, port <port> (127.0.0.1)..."
            let field = |name: &str| -> u32 {
                line.split(&format!("{name} "))
                    .nth(1)
                    .and_then(|rest| rest.split([',', ' ']).next())
                    .and_then(|v| v.parse().ok())
                    .unwrap_or_else(|| panic!("no {name} in `status` line {line:?}"))
            };
            assert_eq!(
                field("port"),
                u32::from(self.port_of(server)),
                "{server} runs on the port it was given: {line}"
            );
            pids.insert(server, field("pid"));
        }
        pids
    }

    fn port_of(&self, server: &str) -> u16 {
        match server {
            "postgres" => self.pg_port,
            "redis" => self.redis_port,
            _ => self.prom_port,
        }
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        // Best effort and bounded: a panic here would hide the test's own failure.
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/stack.sh");
        let stopped = Command::new("timeout")
            .args(["60", "bash"])
            .arg(&script)
            .arg("stop")
            .env("STACK_DIR", &self.stack_dir)
            .env("PG_PORT", self.pg_port.to_string())
            .env("REDIS_PORT", self.redis_port.to_string())
            .env("PROM_PORT", self.prom_port.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        if !stopped.is_ok_and(|s| s.success()) {
            eprintln!(
                "stack_script: `stack.sh stop` failed for {}; servers may still run",
                self.stack_dir.display()
            );
        }
    }
}

/// Four distinct ports that were free a moment ago (all bound at once, so no two are equal).
fn free_ports() -> [u16; 4] {
    let listeners: Vec<TcpListener> = (0..4)
        .map(|_| TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind a free port"))
        .collect();
    let ports: Vec<u16> = listeners
        .iter()
        .map(|l| l.local_addr().expect("local address").port())
        .collect();
    [ports[0], ports[1], ports[2], ports[3]]
}

fn connect(port: u16) -> std::io::Result<TcpStream> {
    let stream = TcpStream::connect_timeout(
        &SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
        Duration::from_secs(2),
    )?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    stream.set_write_timeout(Some(Duration::from_secs(5)))?;
    Ok(stream)
}

/// A plain HTTP/1.0 GET on loopback: (status code, body).
fn http_get(port: u16, path: &str) -> (u16, String) {
    let mut stream = connect(port).unwrap_or_else(|e| panic!("connect to :{port}: {e}"));
    write!(stream, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").expect("send request");
    let mut response = String::new();
    stream
        .read_to_string(&mut response)
        .expect("read the response");
    let (head, body) = response
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("not an HTTP response: {response:?}"));
    let code = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status code in {head:?}"));
    (code, body.to_owned())
}

/// Checks that each server really serves on its port, and that Prometheus scrapes the
/// service's address (the project's prometheus.yaml with its compose target rewritten).
fn assert_servers_answer(stack: &Stack) {
    let mut redis = connect(stack.redis_port).expect("connect to redis");
    redis.write_all(b"PING\r\n").expect("send PING");
    let mut pong = [0u8; 7];
    redis.read_exact(&mut pong).expect("read the PING answer");
    assert_eq!(&pong, b"+PONG\r\n", "redis answers PING");

    connect(stack.pg_port).expect("postgres accepts TCP connections");

    let (code, _) = http_get(stack.prom_port, "/-/ready");
    assert_eq!(code, 200, "prometheus is ready");
    // Prometheus lists its targets a moment after it is ready.
    let expected = vec![format!("http://127.0.0.1:{}/metrics", stack.http_port)];
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (code, body) = http_get(stack.prom_port, "/api/v1/targets");
        assert_eq!(code, 200, "{body}");
        let targets: serde_json::Value = serde_json::from_str(&body).expect("targets JSON");
        let scrape_urls: Vec<String> = targets["data"]["activeTargets"]
            .as_array()
            .expect("activeTargets")
            .iter()
            .filter_map(|t| t["scrapeUrl"].as_str().map(str::to_owned))
            .collect();
        if scrape_urls == expected {
            return;
        }
        assert!(
            scrape_urls.is_empty() && Instant::now() < deadline,
            "prometheus scrapes the service's HTTP_ADDR, not the compose target: \
             expected {expected:?}, got {scrape_urls:?}"
        );
        thread::sleep(Duration::from_millis(200));
    }
}

fn count(text: &str, needle: &str) -> usize {
    text.matches(needle).count()
}

#[test]
fn stack_starts_reuses_stops_and_starts_again() {
    let stack = Stack::new();

    // A port held by someone else: a clear message, and nothing started.
    let squatter = TcpListener::bind((Ipv4Addr::LOCALHOST, stack.prom_port))
        .expect("hold the Prometheus port");
    let refused = stack.run("start", START_LIMIT);
    assert!(!refused.success, "start must fail while PROM_PORT is taken");
    assert!(
        refused.stderr.contains(&format!(
            "port {} (for prometheus) is already in use",
            stack.prom_port
        )) && refused.stderr.contains("PROM_PORT="),
        "the message names the port and the variable to change:\n{}",
        refused.stderr
    );
    assert!(
        stack.running().is_empty(),
        "nothing starts when a port is taken"
    );
    drop(squatter);

    // First start: everything comes up where it was asked to, under STACK_DIR.
    let first = stack.run("start", START_LIMIT).expect_success("start");
    for (what, port) in [
        ("postgres", stack.pg_port),
        ("redis", stack.redis_port),
        ("prometheus", stack.prom_port),
    ] {
        assert!(
            first.stdout.contains(&format!("127.0.0.1:{port}")),
            "start says where {what} listens:\n{}",
            first.stdout
        );
    }
    let pids = stack.running();
    assert_eq!(pids.len(), 3, "all three servers run: {pids:?}");
    for path in [
        "pg/data/PG_VERSION",
        "redis/redis.pid",
        "prometheus/prometheus.pid",
        "prometheus/prometheus.yaml",
    ] {
        assert!(
            stack.stack_dir.join(path).exists(),
            "{path} is under STACK_DIR"
        );
    }
    assert_servers_answer(&stack);

    // Second start: the same processes, reused.
    let again = stack
        .run("start", START_LIMIT)
        .expect_success("start (again)");
    assert_eq!(
        count(&again.stdout, "already running"),
        3,
        "every server is reused:\n{}",
        again.stdout
    );
    assert_eq!(
        stack.running(),
        pids,
        "a second start keeps the same processes"
    );

    // Stop: nothing runs, nothing listens.
    stack.run("stop", OTHER_LIMIT).expect_success("stop");
    assert!(stack.running().is_empty(), "stop stops every server");
    for server in SERVERS {
        assert!(
            connect(stack.port_of(server)).is_err(),
            "{server}'s port is closed after stop"
        );
    }

    // Start again: new processes on the kept data.
    let restart = stack
        .run("start", START_LIMIT)
        .expect_success("start (after stop)");
    assert!(
        restart.stdout.contains("database 'singleflight' exists"),
        "the data directory is kept across stop/start:\n{}",
        restart.stdout
    );
    let new_pids = stack.running();
    assert_eq!(
        new_pids.len(),
        3,
        "all three servers run again: {new_pids:?}"
    );
    for server in SERVERS {
        assert_ne!(new_pids[server], pids[server], "{server} was started anew");
    }
    assert_servers_answer(&stack);

    stack
        .run("stop", OTHER_LIMIT)
        .expect_success("stop (final)");
    assert!(
        stack.running().is_empty(),
        "the final stop stops every server"
    );
}
