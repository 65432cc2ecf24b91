//! `scripts/stack.sh`: PostgreSQL, Redis and Prometheus run natively (no Docker), with all their
//! state under `STACK_DIR` (`.stack/` at the repository root by default); with `REPLICAS=N`, a
//! fleet of N replicas of the service behind HAProxy too; with `POOLER=pgbouncer`, PgBouncer in
//! transaction mode between the service and PostgreSQL. The service's demo templates are data, not
//! schema: `up` loads them with `singleflight seed-demo` before the service starts, and `seed`
//! loads them into a stack someone else runs the service against. The script builds the `stack` binary and
//! runs it with its own name as `argv[0]`, so every message here names the script as the user
//! called it.
//!
//! - [`settings`]: the environment it reads (ports, REPLICAS, STACK_DIR, ...), checked before
//!   anything starts, and the `.stack/` layout.
//! - `packages`: what it installs with apt-get when something is missing (as root).
//! - `daemons`: the one way to find (pid file, port file), start and stop the servers that keep
//!   no pid file of their own: Redis, Prometheus, PgBouncer, HAProxy, the replicas.
//! - `servers`: starting, reusing and stopping PostgreSQL, Redis and Prometheus.
//! - `pooler`: PgBouncer in front of PostgreSQL, with `POOLER=pgbouncer`.
//! - `topology`: with `REDIS_MODE=cluster` or `sentinel`, a Redis Cluster or a sentinel set
//!   instead of the single Redis.
//! - `fleet`: the replicas and HAProxy, and `up`'s foreground with a fleet; the service's
//!   environment and binary.
//! - `commands`: `up`, `start`, `stop`, `status`, `env`, `seed` (and the demo data step).
//!
//! Run it through the script: the repository root (where `prometheus.yaml` is, where cargo builds
//! the service) is found from the script's path in `argv[0]`, as the script itself found it.
//!
//! Every server is a daemon of the [`crate::detached`] lifetime: it outlives the command, which
//! finds it again through its pid file and reuses it. What each server is (its command line, its
//! readiness, how it stops) is its module's, shared with the tests.
//!
//! Every failure is a [`Failure`]: a headline, then what to do next, printed the way the script
//! always printed them (`stack: error: ...`), with exit code 1.

mod commands;
mod daemons;
mod fleet;
mod packages;
mod pooler;
mod servers;
pub mod settings;
mod topology;

use std::io::Write;
use std::path::Path;
use std::process::{Command, ExitCode, Stdio};

use crate::postgres::Bins;
use settings::Settings;

/// The help text (`stack.sh help`), the one description of the commands and variables.
pub const USAGE: &str = include_str!("usage.txt");

/// The commands, for the message about an unknown one.
const COMMANDS: &str = "up (default), start, stop, status, env, seed, restart";

/// Runs the command in this process's arguments; the exit code to end with.
pub fn main() -> ExitCode {
    let mut args = std::env::args_os().map(|a| a.to_string_lossy().into_owned());
    let me = args.next().unwrap_or_else(|| "stack".to_owned());
    let command = args
        .next()
        .filter(|c| !c.is_empty())
        .unwrap_or_else(|| "up".to_owned());
    match command.as_str() {
        "help" | "-h" | "--help" => {
            print!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        "up" | "start" | "stop" | "status" | "env" | "seed" | "restart" => {}
        _ => {
            eprint!("{USAGE}");
            Failure::new(
                format!("unknown command '{command}'."),
                [format!("use one of: {COMMANDS}")],
            )
            .print();
            return ExitCode::FAILURE;
        }
    }
    let done = Settings::from_env(me, command).and_then(|settings| {
        let mut stack = Stack {
            s: settings,
            pg_bins: None,
        };
        match stack.s.command.as_str() {
            "up" => stack.up(),
            "start" => stack.start(),
            "stop" => stack.stop(),
            "status" => stack.status(),
            "seed" => stack.seed(),
            "restart" => stack.restart(),
            _ => stack.env(),
        }
    });
    match done {
        Ok(code) => code,
        Err(failure) => {
            failure.print();
            ExitCode::FAILURE
        }
    }
}

/// A command that cannot go on: what went wrong and what to do next.
#[derive(Debug)]
pub struct Failure {
    /// Printed as is before the headline: a log's tail, a checker's output.
    shown_first: String,
    headline: String,
    /// One line each: what to do next.
    next: Vec<String>,
}

impl Failure {
    pub fn new(headline: impl Into<String>, next: impl IntoIterator<Item = String>) -> Failure {
        Failure {
            shown_first: String::new(),
            headline: headline.into(),
            next: next.into_iter().collect(),
        }
    }

    /// The same failure, with `text` shown before it.
    fn after(mut self, text: impl Into<String>) -> Failure {
        self.shown_first = text.into();
        self
    }

    /// `stack: error: <headline>`, then each next step indented under it, on stderr.
    fn print(&self) {
        let mut text = self.shown_first.clone();
        text.push_str(&format!("stack: error: {}\n", self.headline));
        for line in &self.next {
            text.push_str(&format!("       {line}\n"));
        }
        let _ = std::io::stderr().write_all(text.as_bytes());
    }
}

/// A progress line on stdout.
fn say(line: &str) {
    println!("stack: {line}");
}

/// A warning or note on stderr.
fn warn(line: &str) {
    eprintln!("stack: {line}");
}

/// The state of one command: its settings (whose ports `start` may change to those of a stack
/// already running) and the PostgreSQL binaries it found.
struct Stack {
    s: Settings,
    pg_bins: Option<Bins>,
}

impl Stack {
    /// Fails if a port is held by something that is not this project's server: who holds it, a
    /// hint for the usual suspects, and which variable moves the server elsewhere.
    fn port_taken(&self, what: &str, port: u16, var: &str) -> Failure {
        self.port_taken_suggesting(what, port, var, u32::from(port) + 1)
    }

    /// [`Stack::port_taken`], suggesting `var=instead` (a cluster's bus port is REDIS_PORT +
    /// 10000 and more: the port after the held one would not move it).
    fn port_taken_suggesting(&self, what: &str, port: u16, var: &str, instead: u32) -> Failure {
        let me = &self.s.me;
        let mut holder = port_holder(port).join("\n");
        if holder.is_empty() {
            holder = format!("(could not tell who holds it; try: sudo ss -ltnp 'sport = :{port}')");
        }
        let hint = |lines: [&str; 2]| lines.map(str::to_owned).to_vec();
        let mut next = vec![holder.clone()];
        next.extend(if holder.contains("postgres") {
            hint(["if this is Debian's own cluster (see: pg_lsclusters), this script leaves it alone;",
                  "stop it yourself if you do not need it (pg_ctlcluster <version> main stop), or use another port."])
        } else if holder.contains("redis") {
            hint(["if this is the system redis-server service, this script leaves it alone;",
                  "stop it yourself if you do not need it (service redis-server stop), or use another port."])
        } else if holder.contains("prometheus") {
            hint(["if this is the system prometheus service (Debian's package starts one on :9090 where systemd runs),",
                  "stop it yourself if you do not need it (systemctl disable --now prometheus), or use another port."])
        } else if holder.contains("singleflight") || holder.contains("cargo") {
            hint([&format!("this looks like the service itself: an earlier '{me} up' or a 'cargo run' of your own?"),
                  "stop it (Ctrl-C where it runs), or use another port."])
        } else if holder.contains("pgbouncer") {
            hint(["if this is the system pgbouncer service (Debian's package starts one on :6432 where systemd runs),",
                  "stop it yourself if you do not need it (systemctl disable --now pgbouncer), or use another port."])
        } else if holder.contains("haproxy") {
            hint(["if this is the system haproxy service (service haproxy status), this script leaves it alone;",
                  "stop it yourself if you do not need it (service haproxy stop), or use another port."])
        } else {
            Vec::new()
        });
        next.push(format!(
            "choose another port, e.g.: {var}={instead} {}",
            self.s.again()
        ));
        next.push(format!(
            "('{me} env', 'status' and 'stop' find the running ports on their own)"
        ));
        Failure::new(
            format!("port {port} (for {what}) is already in use by something that is not this project's {what}."),
            next,
        )
    }
}

/// Who listens on `port`, one line a socket ("127.0.0.1:5432 is held by postgres (pid 12)"), if
/// `ss -ltnp` can tell; nothing if `ss` is not there.
fn port_holder(port: u16) -> Vec<String> {
    let Ok(output) = Command::new("ss")
        .args(["-Hltnp", &format!("sport = :{port}")])
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
    else {
        return Vec::new();
    };
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(|line| {
            let local = line.split_whitespace().nth(3).unwrap_or_default();
            let who = holder_of(line).unwrap_or_else(|| {
                "an unknown process (ss could not tell; try: sudo ss -ltnp)".to_owned()
            });
            format!("{local} is held by {who}")
        })
        .collect()
}

/// `name (pid N)` from the first `users:(("name",pid=N` of an `ss` line.
fn holder_of(line: &str) -> Option<String> {
    let rest = &line[line.find("users:((\"")? + 9..];
    let (name, rest) = rest.split_once('"')?;
    let rest = rest.strip_prefix(",pid=")?;
    let pid: String = rest.chars().take_while(char::is_ascii_digit).collect();
    (!pid.is_empty()).then(|| format!("{name} (pid {pid})"))
}

/// Whether we may `mode` (`libc::W_OK`, `libc::X_OK`) `path`, as `[[ -w ]]` and `[[ -x ]]` ask.
fn may(path: &str, mode: libc::c_int) -> bool {
    let Ok(path) = std::ffi::CString::new(path) else {
        return false;
    };
    // SAFETY: access(2) reads the NUL-terminated string we own and nothing else.
    unsafe { libc::access(path.as_ptr(), mode) == 0 }
}

/// The name of the owner of `path`, as `stat -c %U` prints it.
fn owner_name(path: &str) -> String {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path)
        .ok()
        .and_then(|m| crate::process::user_name(m.uid()))
        .unwrap_or_else(|| "UNKNOWN".to_owned())
}

/// Our own user name, as `id -un` prints it.
fn own_name() -> String {
    let uid = crate::process::euid();
    crate::process::user_name(uid).unwrap_or_else(|| uid.to_string())
}

/// A failure shown after the last 20 lines of `log` (what went wrong is usually there), and after
/// `error` itself when the log cannot hold it (the program could not even be started).
fn after_log(
    log: &str,
    error: &crate::Error,
    headline: String,
    next: impl IntoIterator<Item = String>,
) -> Failure {
    let mut shown = crate::process::tail(Path::new(log), 20);
    if let crate::Error::Io { .. } = error {
        shown.push_str(&format!("{error}\n"));
    }
    Failure::new(headline, next).after(shown)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_holder_is_read_from_ss_as_awk_read_it() {
        let line = r#"LISTEN 0      4096       127.0.0.1:9090      0.0.0.0:*    users:(("prometheus",pid=4242,fd=7))"#;
        assert_eq!(holder_of(line).as_deref(), Some("prometheus (pid 4242)"));
        assert_eq!(holder_of("LISTEN 0 128 127.0.0.1:9090 0.0.0.0:*"), None);
    }
}
