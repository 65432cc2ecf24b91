//! `scripts/stack.sh`, the native stack behind the README's run command, driven end to end:
//! PostgreSQL, Redis and Prometheus started for real under a temporary `STACK_DIR` on free ports,
//! then `status`, a second `start` that must reuse the same processes, `stop`, `start` again and
//! `stop`. A port held by something else must stop `start` before it starts anything.
//!
//! `seed` loads the demo templates into the running stack, once however often it runs.
//!
//! With `REPLICAS=3`, `up` loads the demo templates, then runs a fleet in the foreground: three
//! replicas of the service behind HAProxy, each scraped by Prometheus, until SIGTERM stops HAProxy
//! and the replicas.
//!
//! With `POOLER=pgbouncer`, PgBouncer runs in front of PostgreSQL: `status` reports it, `env`
//! points `DATABASE_URL` through it and `DATABASE_LISTEN_URL` past it, and `stop` stops it.
//!
//! With `REDIS_MODE=cluster`, Redis is a cluster of three masters and the service's `REDIS_URL`
//! lists them; with `REDIS_MODE=sentinel`, a master, its replica and three sentinels, and the
//! service gets `REDIS_SENTINELS`; a master killed is failed over, and `start` brings it back as
//! a replica.
//!
//! Every script run is bounded in time, and a guard runs `stop` when the test ends, however it
//! ends, so no server outlives the test.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use testkit::launcher::probe::PgConnection;

/// A first `start` may run `initdb`; on a machine without the packages it installs them first.
const START_LIMIT: Duration = Duration::from_secs(300);
const OTHER_LIMIT: Duration = Duration::from_secs(60);

/// The servers the script manages, as `status` names them (a fleet adds HAProxy and replicas).
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
    /// `REPLICAS=3` and the ports that go with it; `None` for the service alone (`HTTP_ADDR`).
    fleet: Option<Fleet>,
    /// `POOLER=pgbouncer` on this port; `None`: no pooler.
    pgbouncer_port: Option<u16>,
    /// `REDIS_MODE` (`cluster`, `sentinel`); `None`: unset, the single Redis.
    redis_mode: Option<&'static str>,
}

/// A fleet: `replicas` replicas on `base_port..base_port + replicas`, HAProxy on `lb_port`.
#[derive(Clone, Copy)]
struct Fleet {
    replicas: u16,
    lb_port: u16,
    base_port: u16,
}

impl Fleet {
    fn replica_ports(self) -> impl Iterator<Item = u16> {
        (0..self.replicas).map(move |i| self.base_port + i)
    }
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
            fleet: None,
            pgbouncer_port: None,
            redis_mode: None,
        }
    }

    /// A stack whose REDIS_PORT starts a run of five free ports (a sentinel set's), the first
    /// three of which have their cluster bus ports (+10000) free too; REDIS_MODE is set per run.
    fn with_redis_topology() -> Self {
        let mut stack = Stack::new();
        let taken = [stack.pg_port, stack.prom_port, stack.http_port];
        stack.redis_port = (0..100)
            .map(|_| free_port_run(5, &taken))
            .find(|first| {
                (first + 10_000..first + 10_003)
                    .all(|bus| TcpListener::bind((Ipv4Addr::LOCALHOST, bus)).is_ok())
            })
            .expect("five free ports with three free bus ports");
        stack
    }

    /// A stack whose `start` runs PgBouncer in front of PostgreSQL too.
    fn with_pgbouncer() -> Self {
        let mut stack = Stack::new();
        let taken = [
            stack.pg_port,
            stack.redis_port,
            stack.prom_port,
            stack.http_port,
        ];
        stack.pgbouncer_port = Some(free_port_run(1, &taken));
        stack
    }

    /// A stack whose `up` and `start` run `replicas` replicas behind HAProxy (on the port that
    /// would otherwise be the service's).
    fn with_fleet(replicas: u16) -> Self {
        let mut stack = Stack::new();
        let taken = [
            stack.pg_port,
            stack.redis_port,
            stack.prom_port,
            stack.http_port,
        ];
        stack.fleet = Some(Fleet {
            replicas,
            lb_port: stack.http_port,
            base_port: free_port_run(replicas, &taken),
        });
        stack
    }

    /// `bash scripts/stack.sh <command>` (after `prefix`, e.g. `timeout 60`), with this stack's
    /// environment: its STACK_DIR and ports, and the fleet's settings or the service's HTTP_ADDR.
    fn command(&self, prefix: &[&str], command: &str) -> Command {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/stack.sh");
        let mut cmd = match prefix.split_first() {
            Some((program, args)) => {
                let mut cmd = Command::new(program);
                cmd.args(args).arg("bash");
                cmd
            }
            None => Command::new("bash"),
        };
        cmd.arg(&script)
            .arg(command)
            .env("STACK_DIR", &self.stack_dir)
            .env("PG_PORT", self.pg_port.to_string())
            .env("REDIS_PORT", self.redis_port.to_string())
            .env("PROM_PORT", self.prom_port.to_string())
            // The binary this test run built, for the fleet and `seed`: no release build inside
            // a test.
            .env("SERVICE_BIN", env!("CARGO_BIN_EXE_singleflight"))
            .stdin(Stdio::null());
        match self.redis_mode {
            Some(mode) => cmd.env("REDIS_MODE", mode),
            None => cmd.env_remove("REDIS_MODE"),
        };
        match self.pgbouncer_port {
            Some(port) => cmd
                .env("POOLER", "pgbouncer")
                .env("PGBOUNCER_PORT", port.to_string()),
            None => cmd.env_remove("POOLER"),
        };
        match self.fleet {
            Some(fleet) => {
                cmd.env_remove("HTTP_ADDR")
                    .env("REPLICAS", fleet.replicas.to_string())
                    .env("LB_PORT", fleet.lb_port.to_string())
                    .env("REPLICA_BASE_PORT", fleet.base_port.to_string())
                    .env("RUST_LOG", "warn");
            }
            None => {
                cmd.env_remove("REPLICAS")
                    .env("HTTP_ADDR", format!("127.0.0.1:{}", self.http_port));
            }
        }
        cmd
    }

    /// Starts `stack.sh <command>` without waiting for it, its output going to files:
    /// (the process, stdout file, stderr file).
    fn spawn(&self, command: &str) -> (Child, PathBuf, PathBuf) {
        static RUNS: AtomicU32 = AtomicU32::new(0);
        let n = RUNS.fetch_add(1, Ordering::SeqCst);
        // Files, not pipes: the servers the script starts must not hold our pipes open.
        let out_path = self.tmp.path().join(format!("{n}-{command}.out"));
        let err_path = self.tmp.path().join(format!("{n}-{command}.err"));
        let child = self
            .command(&[], command)
            .stdout(File::create(&out_path).expect("stdout file"))
            .stderr(File::create(&err_path).expect("stderr file"))
            .spawn()
            .expect("run bash scripts/stack.sh");
        (child, out_path, err_path)
    }

    /// Runs `bash scripts/stack.sh <command>` against this stack, killing it at `limit`.
    fn run(&self, command: &str, limit: Duration) -> Run {
        let (mut child, out_path, err_path) = self.spawn(command);
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

    /// The servers `status` reports on: with a fleet, also `haproxy` and `replica-<i>`; with a
    /// pooler, also `pgbouncer`.
    fn servers(&self) -> Vec<String> {
        let mut servers: Vec<String> = SERVERS.iter().map(|s| s.to_string()).collect();
        if self.pgbouncer_port.is_some() {
            servers.push("pgbouncer".into());
        }
        if let Some(fleet) = self.fleet {
            servers.push("haproxy".into());
            servers.extend((1..=fleet.replicas).map(|i| format!("replica-{i}")));
        }
        servers
    }

    /// `status`, as server name → pid of the running ones (a server not running is absent).
    /// Also checks that each running server reports the port it was asked for.
    fn running(&self) -> HashMap<String, u32> {
        let run = self.run("status", OTHER_LIMIT).expect_success("status");
        let mut pids = HashMap::new();
        for server in self.servers() {
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
                u32::from(self.port_of(&server)),
                "{server} runs on the port it was given: {line}"
            );
            let pid = field("pid");
            pids.insert(server, pid);
        }
        pids
    }

    fn port_of(&self, server: &str) -> u16 {
        match (server, self.fleet) {
            ("postgres", _) => self.pg_port,
            ("pgbouncer", _) => self
                .pgbouncer_port
                .unwrap_or_else(|| panic!("no pgbouncer without POOLER")),
            ("redis", _) => self.redis_port,
            ("prometheus", _) => self.prom_port,
            ("haproxy", Some(fleet)) => fleet.lb_port,
            (replica, Some(fleet)) => {
                let i: u16 = replica
                    .strip_prefix("replica-")
                    .and_then(|i| i.parse().ok())
                    .unwrap_or_else(|| panic!("no such server: {replica}"));
                fleet.base_port + i - 1
            }
            (other, None) => panic!("no such server without a fleet: {other}"),
        }
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        // Best effort and bounded: a panic here would hide the test's own failure.
        let stopped = self
            .command(&["timeout", "90"], "stop")
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

/// Four distinct free ports, below the kernel's ephemeral range (see `testkit::ports`): a port
/// found from port 0 can be taken as the source of an outgoing connection (a replica's pool,
/// a scrape) before the script's server binds it.
fn free_ports() -> [u16; 4] {
    let mut ports = [0; 4];
    for i in 0..ports.len() {
        ports[i] = free_port_run(1, &ports[..i]);
    }
    ports
}

/// The first of `n` consecutive free ports, none of them in `taken`.
fn free_port_run(n: u16, taken: &[u16]) -> u16 {
    testkit::ports::free_port_run(n, taken).unwrap_or_else(|e| panic!("{e}"))
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
    try_http_get(port, path).unwrap_or_else(|e| panic!("GET :{port}{path}: {e}"))
}

/// [`http_get`], with a failure (nothing listening, a broken answer) as an error: the launcher's
/// own probe, which the script uses to tell a server is ready.
fn try_http_get(port: u16, path: &str) -> Result<(u16, String), String> {
    testkit::launcher::probe::http_get(port, path)
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
    let expected = match stack.fleet {
        Some(fleet) => fleet
            .replica_ports()
            .map(|port| format!("http://127.0.0.1:{port}/metrics"))
            .collect(),
        None => vec![format!("http://127.0.0.1:{}/metrics", stack.http_port)],
    };
    let expected = {
        let mut expected: Vec<String> = expected;
        expected.sort();
        expected
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (code, body) = http_get(stack.prom_port, "/api/v1/targets");
        assert_eq!(code, 200, "{body}");
        let targets: serde_json::Value = serde_json::from_str(&body).expect("targets JSON");
        let mut scrape_urls: Vec<String> = targets["data"]["activeTargets"]
            .as_array()
            .expect("activeTargets")
            .iter()
            .filter_map(|t| t["scrapeUrl"].as_str().map(str::to_owned))
            .collect();
        scrape_urls.sort();
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

/// How many templates the stack's database holds, asked on `port` (PostgreSQL or PgBouncer).
fn templates(port: u16) -> String {
    let mut db = PgConnection::connect(port, "postgres", "singleflight")
        .unwrap_or_else(|e| panic!("connect to the stack's database on :{port}: {e}"));
    db.value("SELECT count(*) FROM templates")
        .unwrap_or_else(|e| panic!("{e}"))
        .unwrap_or_default()
}

/// Runs `seed` and checks that it said so and that the demo templates are there, once.
fn assert_seeds(stack: &Stack, port: u16) {
    for run in ["seed", "seed (again)"] {
        let seeded = stack.run("seed", START_LIMIT).expect_success(run);
        assert_eq!(
            count(&seeded.stdout, "stack: demo data: "),
            1,
            "`{run}` says what it does:\n{}",
            seeded.stdout
        );
        assert_eq!(
            templates(port),
            "1200",
            "the demo templates, once, after `{run}`"
        );
    }
}

/// Runs `start` again and checks that it reused every server, the `running` ones of `status`.
fn assert_start_reuses(stack: &Stack, running: &HashMap<String, u32>) {
    let again = stack
        .run("start", START_LIMIT)
        .expect_success("start (again)");
    assert_eq!(
        count(&again.stdout, "already running"),
        stack.servers().len(),
        "every server is reused:\n{}",
        again.stdout
    );
    assert_eq!(
        &stack.running(),
        running,
        "a second start keeps the same processes"
    );
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
    assert!(
        !first.stdout.contains("demo data"),
        "`start` leaves the demo data to `seed`:\n{}",
        first.stdout
    );
    assert_seeds(&stack, stack.pg_port);

    // Second start: the same processes, reused.
    assert_start_reuses(&stack, &pids);

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

/// How many `/template-details` requests a replica's `/metrics` says it served.
fn template_requests(port: u16) -> u64 {
    let (code, text) = http_get(port, "/metrics");
    assert_eq!(code, 200, "replica :{port} serves /metrics");
    text.lines()
        .filter(|l| {
            l.starts_with("http_request_total{") && l.contains("endpoint=\"/template-details\"")
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

/// Waits for `child` to exit within `limit`; kills it and fails if it does not.
fn wait_for_exit(child: &mut Child, limit: Duration, what: &str) -> std::process::ExitStatus {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().expect("wait for stack.sh") {
            return status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what} did not exit within {limit:?}");
        }
        thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn replicas_run_behind_haproxy_and_stop_on_sigterm() {
    let stack = Stack::with_fleet(3);
    let fleet = stack.fleet.expect("a fleet");
    let (mut up, out_path, err_path) = stack.spawn("up");
    let output = || {
        format!(
            "--- stdout\n{}\n--- stderr\n{}",
            fs::read_to_string(&out_path).unwrap_or_default(),
            fs::read_to_string(&err_path).unwrap_or_default()
        )
    };

    // `up` stays in the foreground; the fleet serves through HAProxy once it is up.
    let deadline = Instant::now() + START_LIMIT;
    loop {
        if let Some(status) = up.try_wait().expect("wait for stack.sh up") {
            panic!(
                "`stack.sh up` exited ({status}) instead of serving\n{}",
                output()
            );
        }
        match try_http_get(fleet.lb_port, "/template-details?id=1") {
            Ok((200, body)) => {
                assert!(
                    body.contains("\"id\":1"),
                    "template 1 through HAProxy: {body}"
                );
                break;
            }
            Ok(_) | Err(_) if Instant::now() < deadline => {}
            other => panic!(
                "HAProxy on :{} did not serve template 1 within {START_LIMIT:?}: {other:?}\n{}",
                fleet.lb_port,
                output()
            ),
        }
        thread::sleep(Duration::from_millis(200));
    }
    for port in fleet.replica_ports() {
        let (code, body) = http_get(port, "/readyz");
        assert_eq!(code, 200, "replica :{port} is ready: {body}");
    }
    let started = fs::read_to_string(&out_path).unwrap_or_default();
    let demo = started
        .find("stack: demo data: ")
        .unwrap_or_else(|| panic!("`up` says it loads the demo data\n{}", output()));
    assert!(
        started
            .find("replica 1: starting")
            .is_some_and(|replica| demo < replica),
        "the demo data is loaded before replica 1 starts\n{}",
        output()
    );

    // Round robin: a few more requests reach every replica.
    for _ in 0..(2 * fleet.replicas) {
        let (code, body) = http_get(fleet.lb_port, "/template-details?id=2");
        assert_eq!(code, 200, "template 2 through HAProxy: {body}");
    }
    for port in fleet.replica_ports() {
        assert!(
            template_requests(port) >= 1,
            "HAProxy sent requests to the replica on :{port}"
        );
    }

    // Prometheus scrapes every replica; `status` reports every server on its port.
    assert_servers_answer(&stack);
    let pids = stack.running();
    assert_eq!(
        pids.len(),
        stack.servers().len(),
        "every server and replica runs: {pids:?}\n{}",
        output()
    );

    // SIGTERM: HAProxy and the replicas stop gracefully, `up` exits 0; the databases stay up.
    let sent = Command::new("kill")
        .args(["-TERM", &up.id().to_string()])
        .status()
        .expect("run kill");
    assert!(sent.success(), "SIGTERM sent to `stack.sh up`");
    let status = wait_for_exit(&mut up, OTHER_LIMIT, "`stack.sh up` after SIGTERM");
    assert!(
        status.success(),
        "`up` exits 0 after SIGTERM ({status})\n{}",
        output()
    );
    let after = stack.running();
    let mut left: Vec<&String> = after.keys().collect();
    left.sort();
    assert_eq!(
        left,
        ["postgres", "prometheus", "redis"],
        "only the databases and Prometheus keep running after `up` ends"
    );
    for port in fleet.replica_ports().chain([fleet.lb_port]) {
        assert!(
            connect(port).is_err(),
            "port {port} is closed after SIGTERM"
        );
    }

    stack.run("stop", OTHER_LIMIT).expect_success("stop");
    assert!(stack.running().is_empty(), "stop stops every server");
}

#[test]
fn pgbouncer_runs_in_front_of_postgres_with_pooler_set() {
    let stack = Stack::with_pgbouncer();
    let pgbouncer = stack.pgbouncer_port.expect("a PgBouncer port");
    let started = stack.run("start", START_LIMIT).expect_success("start");
    assert!(
        started.stdout.contains("pgbouncer: started (pid "),
        "start says it started PgBouncer:\n{}",
        started.stdout
    );
    let pids = stack.running();
    assert_eq!(
        pids.len(),
        4,
        "PgBouncer runs beside the three servers: {pids:?}"
    );

    // `env` sends the service through PgBouncer, and LISTEN straight to PostgreSQL.
    let env = stack.run("env", OTHER_LIMIT).expect_success("env");
    for line in [
        format!("export DATABASE_URL=postgres://postgres@127.0.0.1:{pgbouncer}/singleflight"),
        format!(
            "export DATABASE_LISTEN_URL=postgres://postgres@127.0.0.1:{}/singleflight",
            stack.pg_port
        ),
        "export DATABASE_POOLER=transaction".to_owned(),
    ] {
        assert!(
            env.stdout.lines().any(|l| l == line),
            "`env` prints {line:?}:\n{}",
            env.stdout
        );
    }
    // The demo templates go in with the stack's settings; PgBouncer serves them.
    assert_seeds(&stack, pgbouncer);

    // A second start reuses it; stop stops it.
    assert_start_reuses(&stack, &pids);
    stack.run("stop", OTHER_LIMIT).expect_success("stop");
    assert!(stack.running().is_empty(), "stop stops every server");
    assert!(
        connect(pgbouncer).is_err(),
        "PgBouncer's port is closed after stop"
    );
}

/// The line of `status` that begins with `name:`.
fn status_line<'a>(status: &'a Run, name: &str) -> &'a str {
    status
        .stdout
        .lines()
        .find(|line| line.starts_with(&format!("{name}:")))
        .unwrap_or_else(|| panic!("`status` has no {name} line:\n{}", status.stdout))
}

/// The pid in a `status` line (`<name>: running, pid <pid>, ...`).
fn status_pid(line: &str) -> u32 {
    line.split("pid ")
        .nth(1)
        .and_then(|rest| rest.split(',').next())
        .and_then(|pid| pid.parse().ok())
        .unwrap_or_else(|| panic!("no pid in `status` line {line:?}"))
}

/// `REDIS_MODE=cluster`: three masters on REDIS_PORT..+2, formed and ok, listed in the service's
/// `REDIS_URL`. Then `REDIS_MODE=sentinel`: a master, its replica and three sentinels, given to
/// the service as `REDIS_SENTINELS`; the master SIGKILLed is failed over, and `start` brings it
/// back as the new master's replica. `stop` stops every member.
#[test]
fn redis_runs_as_a_cluster_or_under_sentinels_with_redis_mode() {
    use testkit::launcher::{redis, redis_cluster, redis_sentinel};

    let mut stack = Stack::with_redis_topology();
    let p = stack.redis_port;
    let ports = |n: u16| -> Vec<u16> { (p..p + n).collect() };

    stack.redis_mode = Some("cluster");
    let started = stack
        .run("start", START_LIMIT)
        .expect_success("start (cluster)");
    assert!(
        started.stdout.contains("redis cluster: ok"),
        "start waits for the cluster:\n{}",
        started.stdout
    );
    redis_cluster::check_ok(&ports(3)).unwrap_or_else(|e| panic!("{e}"));
    let env = stack
        .run("env", OTHER_LIMIT)
        .expect_success("env (cluster)");
    let urls = format!(
        "export REDIS_URL=redis://127.0.0.1:{p},redis://127.0.0.1:{},redis://127.0.0.1:{}",
        p + 1,
        p + 2
    );
    assert!(
        env.stdout.lines().any(|line| line == urls),
        "`env` lists every master in REDIS_URL ({urls:?}):\n{}",
        env.stdout
    );
    let status = stack
        .run("status", OTHER_LIMIT)
        .expect_success("status (cluster)");
    assert!(status_line(&status, "redis-cluster").contains(": ok"));
    for i in 1..=3 {
        let line = status_line(&status, &format!("redis-node-{i}"));
        assert!(
            line.contains("running, pid ") && line.contains(&format!("port {} ", p + i - 1)),
            "{line}"
        );
    }
    stack
        .run("stop", OTHER_LIMIT)
        .expect_success("stop (cluster)");
    for port in ports(3) {
        assert!(connect(port).is_err(), "node :{port} stopped");
    }

    stack.redis_mode = Some("sentinel");
    let started = stack
        .run("start", START_LIMIT)
        .expect_success("start (sentinel)");
    assert!(
        started
            .stdout
            .contains(&format!("redis sentinels: ready, master 127.0.0.1:{p} ")),
        "start waits for the sentinels:\n{}",
        started.stdout
    );
    let env = stack
        .run("env", OTHER_LIMIT)
        .expect_success("env (sentinel)");
    for line in [
        format!(
            "export REDIS_SENTINELS=127.0.0.1:{},127.0.0.1:{},127.0.0.1:{}",
            p + 2,
            p + 3,
            p + 4
        ),
        "export REDIS_SENTINEL_MASTER=singleflight".to_owned(),
    ] {
        assert!(
            env.stdout.lines().any(|l| l == line),
            "`env` prints {line:?}:\n{}",
            env.stdout
        );
    }
    assert!(
        !env.stdout.contains("REDIS_URL"),
        "no REDIS_URL beside the sentinels:\n{}",
        env.stdout
    );
    let status = stack
        .run("status", OTHER_LIMIT)
        .expect_success("status (sentinel)");
    assert!(status_line(&status, "redis-node-1").ends_with(", master"));
    assert!(status_line(&status, "redis-node-2").ends_with(", replica"));
    for i in 1..=3 {
        assert!(status_line(&status, &format!("redis-sentinel-{i}")).ends_with(", sentinel"));
    }

    // The master dies; the sentinels promote the replica; `start` brings the old one back.
    let master = status_pid(status_line(&status, "redis-node-1"));
    assert!(
        Command::new("kill")
            .args(["-KILL", &master.to_string()])
            .status()
            .is_ok_and(|s| s.success()),
        "kill the master"
    );
    let sentinels = &ports(5)[2..];
    let new = redis_sentinel::wait_failover(sentinels, "singleflight", p, Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(new, p + 1, "the replica is promoted");
    let again = stack
        .run("start", START_LIMIT)
        .expect_success("start (after the failover)");
    // The promoted replica stays the master, unless a busy machine made the sentinels fail over
    // once more while the old one came back: either way, one master and its replica.
    let named = again
        .stdout
        .split("redis sentinels: ready, master 127.0.0.1:")
        .nth(1)
        .and_then(|rest| rest.split(' ').next())
        .and_then(|port| port.parse::<u16>().ok());
    assert!(
        again.stdout.contains("redis-node-1: starting")
            && matches!(named, Some(m) if m == p || m == p + 1),
        "start brings the old master back:\n{}",
        again.stdout
    );
    let other = if named == Some(p + 1) { p } else { p + 1 };
    assert_eq!(
        redis::role(other).as_deref(),
        Ok("slave"),
        "one of them a replica"
    );

    stack
        .run("stop", OTHER_LIMIT)
        .expect_success("stop (sentinel)");
    for port in ports(5) {
        assert!(connect(port).is_err(), "redis :{port} stopped");
    }
}

/// What the clients of [`a_rolling_restart_under_load_loses_no_request`] got.
#[derive(Default, Debug)]
struct Tally {
    ok: u64,
    other_status: Vec<u16>,
    errors: Vec<String>,
}

/// A deploy: three replicas behind HAProxy, restarted one at a time by `stack.sh restart`
/// while keep-alive clients keep asking for 100 ids through HAProxy. Every request is answered
/// 200 and none fails on its connection.
#[test]
fn a_rolling_restart_under_load_loses_no_request() {
    let stack = Stack::with_fleet(3);
    let fleet = stack.fleet.expect("a fleet");
    stack.run("start", START_LIMIT).expect_success("start");
    let before = stack.running();

    let runtime = tokio::runtime::Runtime::new().expect("a runtime");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .expect("a client");
    let clients: Vec<_> = (0..8u64)
        .map(|c| {
            let (client, stop) = (client.clone(), stop.clone());
            let url = format!("http://127.0.0.1:{}/template-details?id=", fleet.lb_port);
            runtime.spawn(async move {
                let mut tally = Tally::default();
                let mut n = c;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    n += 8;
                    match client.get(format!("{url}{}", 1 + n % 100)).send().await {
                        Ok(r) if r.status() == 200 => match r.bytes().await {
                            Ok(_) => tally.ok += 1,
                            Err(e) => tally.errors.push(e.to_string()),
                        },
                        Ok(r) => tally.other_status.push(r.status().as_u16()),
                        Err(e) => tally.errors.push(format!("{e:?}")),
                    }
                }
                tally
            })
        })
        .collect();
    thread::sleep(Duration::from_secs(1));
    let restarted = stack.run("restart", START_LIMIT).expect_success("restart");
    thread::sleep(Duration::from_secs(1));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let tallies: Vec<Tally> = runtime.block_on(async {
        let mut tallies = Vec::new();
        for client in clients {
            tallies.push(client.await.expect("a client task"));
        }
        tallies
    });

    let ok: u64 = tallies.iter().map(|t| t.ok).sum();
    let other: Vec<u16> = tallies
        .iter()
        .flat_map(|t| t.other_status.clone())
        .collect();
    let errors: Vec<String> = tallies.iter().flat_map(|t| t.errors.clone()).collect();
    println!(
        "rolling restart: {ok} answered 200, {} other statuses, {} errors",
        other.len(),
        errors.len()
    );
    assert!(other.is_empty(), "every answer 200: {other:?}");
    assert!(errors.is_empty(), "no request failed: {errors:?}");
    assert!(
        ok > 100,
        "the clients kept asking through the restart: {ok}"
    );
    for i in 1..=fleet.replicas {
        assert!(
            restarted.stdout.contains(&format!("replica {i}: stopping")),
            "restart stops replica {i}:\n{}",
            restarted.stdout
        );
    }
    let after = stack.running();
    for (name, pid) in &before {
        if name.starts_with("replica") {
            assert_ne!(
                after.get(name),
                Some(pid),
                "{name} was restarted: {after:?}"
            );
        } else {
            assert_eq!(after.get(name), Some(pid), "{name} kept running: {after:?}");
        }
    }
}
