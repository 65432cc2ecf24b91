//! What both lifetimes share: the [`Server`] contract the server modules fill in, waiting until a
//! server is ready (or has exited), one-shot programs, signals and `/proc`, log tails, users and
//! ports.
//!
//! A lifetime ([`crate::attached`], [`crate::detached`]) only decides how a process is spawned and
//! who stops it; everything after the spawn (is it ready, did it exit, what does its log say) is
//! the same for both and lives here.

use std::fmt;
use std::fs::{self, File};
use std::io;
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

/// A Unix signal number.
pub type Signal = libc::c_int;
pub use libc::{SIGHUP, SIGINT, SIGKILL, SIGQUIT, SIGTERM, SIGUSR1};

/// Delay between two looks at a process that is starting or stopping: short, because a start is
/// on the critical path of every test run and of every `stack.sh start`, but not a busy loop.
pub const POLL: Duration = Duration::from_millis(25);

/// One server as its module describes it: everything a lifetime needs to run it, wait for it and
/// stop it. The module builds the command; the lifetime adds stdin, its own ties (a death signal,
/// or a session of its own) and the log its caller chose (the stack's layout, a test's directory)
/// before spawning it.
pub trait Server {
    /// What messages call it: `postgres`, `redis-server`, `replica 2`, ...
    fn name(&self) -> String;
    /// The program in the foreground, with its arguments, user, directory and environment. Never
    /// one that puts itself in the background: the lifetime decides what outlives what, and the
    /// pid it spawns must be the server's.
    fn command(&self) -> Command;
    /// `Ok` once it serves; otherwise what the check saw, for the message if it never does.
    fn probe(&self) -> Result<(), String>;
    /// How long it may take to become ready: 30 s unless the server needs another bound.
    fn ready_within(&self) -> Duration {
        Duration::from_secs(30)
    }
    /// The signal it gets when its owner is gone (an attached server's test process died or
    /// dropped it): SIGTERM unless the server needs another. A detached server is stopped by its
    /// module's stop steps (`STOP`) instead, which may be gentler.
    fn death_signal(&self) -> Signal {
        SIGTERM
    }
}

/// Why a server, or a program the launcher runs, did not do its part.
#[derive(Debug)]
pub enum Error {
    /// A file system or process operation failed: what was being done, and the OS's answer.
    Io { doing: String, source: io::Error },
    /// Something the launcher needs is not on this machine (a binary, a user, a free port); the
    /// text says what to install or change.
    Unavailable(String),
    /// The server's process ended before it was ready.
    Exited {
        server: String,
        status: String,
        log: PathBuf,
    },
    /// The server did not become ready in time.
    NotReady {
        server: String,
        within: Duration,
        last_check: String,
        log: PathBuf,
    },
    /// A one-shot program (initdb) failed or did not finish.
    Failed {
        program: String,
        status: String,
        log: PathBuf,
    },
    /// A checker (`promtool check config`, `haproxy -c`) rejected a configuration: its output.
    Rejected { checker: String, output: String },
    /// The wait was given up because the launcher was asked to stop (see [`interrupt`]).
    Interrupted,
}

impl Error {
    /// An [`Error::Io`] for `doing`.
    pub fn io(doing: impl Into<String>) -> impl FnOnce(io::Error) -> Error {
        let doing = doing.into();
        move |source| Error::Io { doing, source }
    }

    /// The log that tells more, if there is one.
    pub fn log(&self) -> Option<&Path> {
        match self {
            Error::Exited { log, .. } | Error::NotReady { log, .. } | Error::Failed { log, .. } => {
                Some(log)
            }
            _ => None,
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Io { doing, source } => write!(f, "could not {doing}: {source}"),
            Error::Unavailable(what) => f.write_str(what),
            Error::Exited {
                server,
                status,
                log,
            } => write!(
                f,
                "{server} exited during start-up ({status}); its log: {}",
                log.display()
            ),
            Error::NotReady {
                server,
                within,
                last_check,
                log,
            } => write!(
                f,
                "{server} was not ready after {within:?} (last check: {last_check}); its log: {}",
                log.display()
            ),
            Error::Failed {
                program,
                status,
                log,
            } => write!(f, "{program} failed ({status}); its log: {}", log.display()),
            Error::Rejected { checker, output } => write!(f, "{checker} says:\n{output}"),
            Error::Interrupted => f.write_str("interrupted"),
        }
    }
}

impl std::error::Error for Error {}

// ---------------------------------------------------------------------------
// Waiting
// ---------------------------------------------------------------------------

/// Set once the launcher is asked to stop (SIGINT or SIGTERM while `stack.sh up` runs a fleet):
/// a wait for readiness then gives up at once with [`Error::Interrupted`], so that Ctrl-C does
/// not wait for a replica that is still migrating.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// Makes every wait for readiness, now and later, give up with [`Error::Interrupted`].
pub fn interrupt() {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// Whether [`interrupt`] was called.
pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

/// A process being waited for: one we spawned (a [`Child`]) or one we only know by its pid (a
/// server an earlier run started, [`Pid`]).
pub trait Watch {
    /// `Some(how it ended)` once the process is gone.
    fn exited(&mut self) -> Option<String>;
}

impl Watch for Child {
    fn exited(&mut self) -> Option<String> {
        match self.try_wait() {
            Ok(Some(status)) => Some(status.to_string()),
            Ok(None) => None,
            Err(e) => Some(format!("could not wait for it: {e}")),
        }
    }
}

/// A process known by its pid only.
pub struct Pid(pub u32);

impl Watch for Pid {
    fn exited(&mut self) -> Option<String> {
        (!alive(self.0)).then(|| format!("pid {} is gone", self.0))
    }
}

/// Polls `server`'s probe until it says ready, the process exits, [`Server::ready_within`]
/// passes, or the launcher is interrupted; `log` is where its output goes, for the error.
pub fn wait_ready(server: &dyn Server, process: &mut dyn Watch, log: &Path) -> Result<(), Error> {
    let started = Instant::now();
    loop {
        // Before the probe: a stop asked for while the server was starting wins over its being
        // ready now.
        if interrupted() {
            return Err(Error::Interrupted);
        }
        if let Some(status) = process.exited() {
            return Err(Error::Exited {
                server: server.name(),
                status,
                log: log.to_owned(),
            });
        }
        let last_check = match server.probe() {
            Ok(()) => return Ok(()),
            Err(problem) => problem,
        };
        if started.elapsed() >= server.ready_within() {
            return Err(Error::NotReady {
                server: server.name(),
                within: server.ready_within(),
                last_check,
                log: log.to_owned(),
            });
        }
        thread::sleep(POLL);
    }
}

/// Calls `check` every [`POLL`] until it succeeds or `limit` has passed since the first call: a
/// condition waited for with a bound (a cluster formed, a failover done). The error is the last
/// check's, for the caller's message.
pub fn poll<T>(limit: Duration, mut check: impl FnMut() -> Result<T, String>) -> Result<T, String> {
    let started = Instant::now();
    loop {
        match check() {
            Ok(value) => return Ok(value),
            Err(last) if started.elapsed() >= limit => return Err(last),
            Err(_) => thread::sleep(POLL),
        }
    }
}

/// Waits for a one-shot program (`initdb`) to succeed; `limit` bounds the wait (`None`: as long
/// as it takes). Whatever it printed is in `log`.
pub fn finish(
    program: &str,
    child: &mut Child,
    log: &Path,
    limit: Option<Duration>,
) -> Result<(), Error> {
    let started = Instant::now();
    let failed = |status: String| Error::Failed {
        program: program.to_owned(),
        status,
        log: log.to_owned(),
    };
    loop {
        match child.try_wait() {
            Ok(Some(status)) if status.success() => return Ok(()),
            Ok(Some(status)) => return Err(failed(status.to_string())),
            Ok(None) if limit.is_some_and(|limit| started.elapsed() > limit) => {
                return Err(failed(format!("still running after {limit:?}")))
            }
            Ok(None) => thread::sleep(POLL),
            Err(e) => return Err(failed(format!("could not wait for it: {e}"))),
        }
    }
}

/// Runs a checker (`promtool check config FILE`, `haproxy -c -f FILE`) and returns its output
/// as an [`Error::Rejected`] if it fails. Its stdout and stderr share one pipe, so that its lines
/// come in the order it wrote them.
pub fn check(checker: &str, command: &mut Command) -> Result<(), Error> {
    let (status, text) = run_merged(command).map_err(Error::io(format!("run {checker}")))?;
    if status.success() {
        return Ok(());
    }
    Err(Error::Rejected {
        checker: checker.to_owned(),
        output: String::from_utf8_lossy(&text)
            .trim_end_matches('\n')
            .to_owned(),
    })
}

/// Runs `command` to its end with its stdout and stderr in one pipe: its status and output.
fn run_merged(command: &mut Command) -> io::Result<(std::process::ExitStatus, Vec<u8>)> {
    let (mut output, writer) = io::pipe()?;
    command
        .stdin(Stdio::null())
        .stdout(writer.try_clone()?)
        .stderr(writer);
    let mut child = command.spawn()?;
    // The command keeps the pipe's write ends: let them go, or the read never ends.
    command.stdout(Stdio::null()).stderr(Stdio::null());
    let mut text = Vec::new();
    io::Read::read_to_end(&mut output, &mut text)?;
    Ok((child.wait()?, text))
}

/// Clears the signal mask in a child between `fork` and `exec`: a mask is inherited through both,
/// std does not reset it, and a server that inherits blocked signals does not stop on them.
/// `stack.sh up` blocks SIGINT and SIGTERM (to take them in a thread of its own) while it starts
/// the fleet, whose replicas must still stop on SIGTERM; a test thread may block signals too.
///
/// # Safety
///
/// Only for a `pre_exec` closure: it calls sigemptyset(3) and sigprocmask(2), which are
/// async-signal-safe, on a set on the child's stack, and builds an `io::Error` from an OS error
/// code, which does not allocate.
pub unsafe fn clear_signal_mask() -> io::Result<()> {
    let mut set = std::mem::MaybeUninit::<libc::sigset_t>::uninit();
    if libc::sigemptyset(set.as_mut_ptr()) == -1
        || libc::sigprocmask(libc::SIG_SETMASK, set.as_ptr(), std::ptr::null_mut()) == -1
    {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Opens `log` for appending (creating it), as the stdout and stderr of a server.
pub fn log_output(log: &Path) -> Result<(Stdio, Stdio), Error> {
    let open = || {
        File::options()
            .create(true)
            .append(true)
            .open(log)
            .map_err(Error::io(format!("open the log file {}", log.display())))
    };
    Ok((open()?.into(), open()?.into()))
}

// ---------------------------------------------------------------------------
// Processes by pid
// ---------------------------------------------------------------------------

/// True if `pid` exists and is not a zombie (a container whose pid 1 does not reap promptly keeps
/// dead daemons around as zombies, and a zombie serves nothing).
pub fn alive(pid: u32) -> bool {
    let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // "pid (comm) S ...": the state follows the last ") ", since comm may hold anything.
    let state = stat
        .rfind(") ")
        .and_then(|at| stat[at + 2..].chars().next());
    matches!(state, Some(state) if state.is_ascii_alphabetic() && state != 'Z' && state != 'X')
}

/// The program name the kernel shows for `pid` (`/proc/<pid>/comm`: at most 15 bytes).
pub fn comm(pid: u32) -> Option<String> {
    fs::read_to_string(format!("/proc/{pid}/comm"))
        .ok()
        .map(|c| c.trim_end_matches('\n').to_owned())
}

/// The pid in `file` if that process is alive and `is_it` accepts its program name (`comm`): how
/// a detached server is found again. `None` if the file is missing, holds no pid, or that pid is
/// gone or now another program's.
pub fn running_from_pid_file(file: &Path, is_it: impl Fn(&str) -> bool) -> Option<u32> {
    let pid = read_number(file)?;
    (alive(pid) && comm(pid).is_some_and(|c| is_it(&c))).then_some(pid)
}

/// The number a pid or port file holds (digits alone, a trailing newline allowed).
pub fn read_number<T: std::str::FromStr>(file: &Path) -> Option<T> {
    let text = fs::read_to_string(file).ok()?;
    let digits = text.trim_end_matches('\n');
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// Sends `signal` to `pid`; false if it could not (gone, or not ours to signal).
pub fn send(pid: u32, signal: Signal) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return false;
    };
    // SAFETY: kill(2) takes plain integers and touches no memory of ours.
    unsafe { libc::kill(pid, signal) == 0 }
}

/// One step of stopping a process: send `signal` (if any), then wait up to `wait` for it to go.
pub type StopStep = (Option<Signal>, Duration);

/// Stops `pid` step by step; true once it is gone, false if it outlived every step.
pub fn stop(pid: u32, steps: &[StopStep]) -> bool {
    for (signal, wait) in steps {
        if let Some(signal) = signal {
            send(pid, *signal);
        }
        let deadline = Instant::now() + *wait;
        while alive(pid) && Instant::now() < deadline {
            thread::sleep(POLL);
        }
        if !alive(pid) {
            return true;
        }
    }
    !alive(pid)
}

// ---------------------------------------------------------------------------
// Logs
// ---------------------------------------------------------------------------

/// The last `lines` lines of `log`, as `tail -n` prints them (a last line without a newline
/// counts); empty if the file cannot be read.
pub fn tail(log: &Path, lines: usize) -> String {
    let Ok(bytes) = fs::read(log) else {
        return String::new();
    };
    let text = String::from_utf8_lossy(&bytes);
    let body = text.strip_suffix('\n').unwrap_or(&text);
    let start = body
        .rmatch_indices('\n')
        .nth(lines.saturating_sub(1))
        .map_or(0, |(at, _)| at + 1);
    if lines == 0 {
        return String::new();
    }
    text[start..].to_owned()
}

// ---------------------------------------------------------------------------
// Users, programs, ports
// ---------------------------------------------------------------------------

/// A uid/gid pair to run a child as.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct User {
    pub uid: u32,
    pub gid: u32,
}

impl User {
    /// `name` in `/etc/passwd` (`name:x:uid:gid:...`): enough for the system users Debian's
    /// packages create, with no NSS needed.
    pub fn named(name: &str) -> Option<User> {
        passwd().find_map(|fields| {
            (fields.first() == Some(&name)).then_some(())?;
            Some(User {
                uid: fields.get(2)?.parse().ok()?,
                gid: fields.get(3)?.parse().ok()?,
            })
        })
    }
}

/// The name of user `uid`, as `id -un` or `stat -c %U` print it.
pub fn user_name(uid: u32) -> Option<String> {
    let uid = uid.to_string();
    passwd().find_map(|fields| (fields.get(2) == Some(&uid.as_str())).then(|| fields[0].to_owned()))
}

/// The lines of `/etc/passwd`, split at `:`.
fn passwd() -> impl Iterator<Item = Vec<&'static str>> {
    static PASSWD: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    PASSWD
        .get_or_init(|| fs::read_to_string("/etc/passwd").unwrap_or_default())
        .lines()
        .map(|line| line.split(':').collect())
}

/// Runs `command` as `user` (`None`: as ourselves): gid first, as std applies them, since a uid
/// alone would leave the child in root's group. A server that refuses to run as root (PostgreSQL,
/// PgBouncer) gets `Some(postgres)` when we are root; see [`crate::attached`] for why this and not
/// `runuser`, nor the server's own user switch (PgBouncer's `-u`), which would clear the death
/// signal.
pub fn run_as(command: &mut Command, user: Option<User>) {
    if let Some(user) = user {
        command.gid(user.gid).uid(user.uid);
    }
}

/// This process's effective uid.
pub fn euid() -> u32 {
    // SAFETY: geteuid(2) cannot fail and touches no memory of ours.
    unsafe { libc::geteuid() }
}

/// Whether we are root, who must run PostgreSQL as another user.
pub fn is_root() -> bool {
    euid() == 0
}

/// The first directory on the way to `dir` (itself included) that `user` may not enter: a
/// server run as another user (PostgreSQL as `postgres` when we are root) must reach its data
/// directory, and `/root` (mode 0700) or a private `TMPDIR` would stop it. `None` if every one is
/// searchable; the mode is given for the message.
pub fn unreachable_by(user: User, dir: &Path) -> Option<(PathBuf, u32)> {
    dir.ancestors().find_map(|ancestor| {
        let meta = fs::metadata(ancestor).ok()?;
        let mode = meta.mode();
        let search = if meta.uid() == user.uid {
            0o100
        } else if meta.gid() == user.gid {
            0o010
        } else {
            0o001
        };
        (mode & search == 0).then(|| (ancestor.to_owned(), mode & 0o7777))
    })
}

/// The first executable file called `name` on `$PATH`, as `command -v` finds it.
pub fn find_in_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|candidate| is_executable(candidate))
}

/// A regular file with an execute bit, as `[[ -x ]]` asks for a program.
pub fn is_executable(path: &Path) -> bool {
    fs::metadata(path).is_ok_and(|m| m.is_file() && m.mode() & 0o111 != 0)
}

/// True if something accepts TCP connections on `127.0.0.1:port` (within 2 s).
pub fn port_open(port: u16) -> bool {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    TcpStream::connect_timeout(&addr, Duration::from_secs(2)).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tail_counts_lines_as_tail_does() {
        let dir = std::env::temp_dir().join(format!("launcher-tail-{}", std::process::id()));
        fs::create_dir_all(&dir).expect("a directory");
        let log = dir.join("log");
        fs::write(&log, "a\nb\nc\n").expect("write");
        assert_eq!(tail(&log, 2), "b\nc\n");
        assert_eq!(tail(&log, 5), "a\nb\nc\n");
        fs::write(&log, "a\nb\nc").expect("write");
        assert_eq!(tail(&log, 2), "b\nc");
        fs::write(&log, "").expect("write");
        assert_eq!(tail(&log, 2), "");
        assert_eq!(tail(&dir.join("absent"), 2), "");
        fs::remove_dir_all(&dir).expect("clean up");
    }

    #[test]
    fn this_process_is_alive_and_named() {
        let me = std::process::id();
        assert!(alive(me));
        assert!(comm(me).is_some());
        assert!(!alive(u32::MAX));
    }
}
