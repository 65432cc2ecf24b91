//! The test kit's lifetime: a server that dies with the test process, in a temporary directory, on
//! a free port.
//!
//! # Why the servers die with the test process
//!
//! Rust never runs destructors for statics, and the test harness ends with `exit()`, so "kill the
//! children in `Drop`" cannot stop the servers a test process shares. Instead every child is
//! spawned with `prctl(PR_SET_PDEATHSIG, sig)`: the kernel sends `sig` to the child when its
//! parent dies. On Linux "parent" means the *thread* that forked the child, not the process, so
//! every child is spawned by one owner thread that never returns: it waits for spawn requests
//! forever. That thread only dies when the whole process does: normal exit, panic abort,
//! `SIGKILL`, Ctrl-C. Each server names the signal ([`Server::death_signal`]): PostgreSQL gets
//! `SIGQUIT` (immediate shutdown, no checkpoint: the data is thrown away), the others `SIGTERM`.
//!
//! An [`Attached`] server that a test holds and drops (the dashboard test's Prometheus) is stopped
//! by its `Drop` as well: politely, then by force.
//!
//! # Running as another user
//!
//! A server run as another user (PostgreSQL as `postgres` when we are root) gets its uid and gid
//! through [`std::os::unix::process::CommandExt::uid`]/`gid`, not through `runuser` or `su`:
//! those would become the server's parent and do not pass our death signal on. std applies
//! `setgid`/`setuid` in the child *before* it runs `pre_exec` closures (see `do_exec` in
//! `library/std/src/sys/process/unix/unix.rs`), which matters because the kernel clears
//! `PDEATHSIG` on a credential change: setting it in `pre_exec` happens after the switch and
//! survives. `exec` of a non-set-uid binary keeps it.
//!
//! # Disk usage
//!
//! Every file lives under `$TMPDIR/singleflight-tests/<pid>/` ([`dir`]). Each process, when it
//! makes its directory, deletes the sibling directories whose process is no longer alive, so
//! repeated runs do not fill the disk even though no process cleans up after itself.

use std::fs;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc;
use std::sync::{Mutex, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

use crate::process::{self, Error, Server, Signal};

/// A running server tied to this process: it dies with the process, and is stopped when dropped.
#[derive(Debug)]
pub struct Attached {
    child: Child,
    name: String,
    death_signal: Signal,
}

impl Attached {
    /// The server's pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `Some(status)` if the server has exited.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }
}

impl Drop for Attached {
    fn drop(&mut self) {
        if self.exited().is_some() {
            return;
        }
        // Polite first (postgres cleans up its shared memory and backends on SIGQUIT; SIGKILL
        // would orphan the backends for a moment). The pid is our unreaped child: not recycled.
        process::send(self.child.id(), self.death_signal);
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if self.exited().is_some() {
                return;
            }
            thread::sleep(process::POLL);
        }
        eprintln!(
            "launcher: {} ignored its stop signal, killing it",
            self.name
        );
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `server`, its output appended to `log`, and waits until it is ready; on failure
/// whatever did start is stopped.
pub fn start(server: &dyn Server, log: &Path) -> Result<Attached, Error> {
    let child = spawn(&server.name(), server.command(), log, server.death_signal())?;
    let mut attached = Attached {
        child,
        name: server.name(),
        death_signal: server.death_signal(),
    };
    process::wait_ready(server, &mut attached.child, log)?;
    Ok(attached)
}

/// Starts the server `make` describes for a free port (`free_port` hands them out), its output
/// appended to `log`, retrying once with a new port if the process exits during start-up: another
/// process can take the port between the moment it was found free and the server's bind.
pub fn start_on_free_port<S: Server>(
    mut free_port: impl FnMut() -> Result<u16, String>,
    log: &Path,
    mut make: impl FnMut(u16) -> Result<S, Error>,
) -> Result<(S, Attached), Error> {
    let mut attempts = 0;
    loop {
        attempts += 1;
        let server = make(free_port().map_err(Error::Unavailable)?)?;
        match start(&server, log) {
            Ok(attached) => return Ok((server, attached)),
            Err(Error::Exited { .. }) if attempts < 2 => {}
            Err(e) => return Err(e),
        }
    }
}

/// Runs a one-shot program (`initdb`) to its end, within `limit`, its output in `log`.
pub fn run(program: &str, command: Command, log: &Path, limit: Duration) -> Result<(), Error> {
    let mut child = spawn(program, command, log, process::SIGTERM)?;
    process::finish(program, &mut child, log, Some(limit)).inspect_err(|_| {
        let _ = child.kill();
        let _ = child.wait();
    })
}

/// A new directory `<name>` (or `<name>-<n>` if taken) under this process's directory
/// `$TMPDIR/singleflight-tests/<pid>/`, searchable by other users (a server run as `postgres`
/// must reach what is inside).
pub fn dir(name: &str) -> Result<PathBuf, Error> {
    static MADE: AtomicU32 = AtomicU32::new(1);
    let base = base_dir().map_err(Error::Unavailable)?;
    let mut path = base.join(name);
    // Tests in parallel may ask for the same name: whoever creates it first has it.
    loop {
        match fs::create_dir(&path) {
            Ok(()) => break,
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                let n = MADE.fetch_add(1, Ordering::Relaxed) + 1;
                path = base.join(format!("{name}-{n}"));
            }
            Err(e) => return Err(Error::io(format!("create {}", path.display()))(e)),
        }
    }
    fs::set_permissions(&path, fs::Permissions::from_mode(0o755))
        .map_err(Error::io(format!("chmod {}", path.display())))?;
    Ok(path)
}

/// Spawns `command` from the owner thread, tied to it by `PDEATHSIG` (see the module docs), with
/// no stdin and its output appended to `log`.
fn spawn(
    name: &str,
    mut command: Command,
    log: &Path,
    death_signal: Signal,
) -> Result<Child, Error> {
    let (stdout, stderr) = process::log_output(log)?;
    command.stdin(Stdio::null()).stdout(stdout).stderr(stderr);
    die_with_parent(&mut command, death_signal);
    let failed = Error::io(format!("start {name} ({command:?})"));
    // The command travels to the owner thread, so that it is that thread which forks.
    let (reply, answer) = mpsc::channel();
    let sent = owner()
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .send(Spawn { command, reply });
    let spawned = match sent {
        Ok(()) => answer.recv().unwrap_or_else(|_| {
            Err(io::Error::other(
                "the thread that owns the servers did not answer",
            ))
        }),
        Err(_) => Err(io::Error::other("the thread that owns the servers is gone")),
    };
    spawned.map_err(failed)
}

/// A request to the owner thread: spawn `command`, and send back the result.
struct Spawn {
    command: Command,
    reply: mpsc::Sender<io::Result<Child>>,
}

/// The owner thread's queue, started on first use. The thread never returns (see the module
/// docs): its death would signal every server it spawned.
fn owner() -> &'static Mutex<mpsc::Sender<Spawn>> {
    static OWNER: OnceLock<Mutex<mpsc::Sender<Spawn>>> = OnceLock::new();
    OWNER.get_or_init(|| {
        let (requests, queue) = mpsc::channel::<Spawn>();
        let owner = move || {
            for Spawn { mut command, reply } in queue {
                let _ = reply.send(command.spawn());
            }
            // Only reached if the queue's sender is dropped, which a static never is.
            loop {
                thread::park();
            }
        };
        // Without the thread every spawn fails with "the thread ... is gone", which says why.
        let _ = thread::Builder::new()
            .name("launcher-owner".into())
            .spawn(owner);
        Mutex::new(requests)
    })
}

/// Makes the kernel send `signal` to the child when the thread spawning it dies.
///
/// Also closes the race where the process exits between `fork` and the `prctl`: the child would
/// then already be orphaned and never get the signal, so it checks that its parent is still us and
/// otherwise fails the spawn instead of running a server nobody will stop. And it clears the
/// signal mask it inherited from the spawning thread (see [`process::clear_signal_mask`]).
fn die_with_parent(command: &mut Command, signal: Signal) {
    let parent = std::process::id() as libc::pid_t;
    // SAFETY: the closure runs in the forked child, where only async-signal-safe operations are
    // allowed. It only calls prctl(2) and getppid(2), raw system calls, `clear_signal_mask` (see
    // its docs), and builds `io::Error`s from OS error codes, which does not allocate. It captures
    // plain integers and takes no locks.
    unsafe {
        command.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, signal as libc::c_ulong) == -1 {
                return Err(io::Error::last_os_error());
            }
            if libc::getppid() != parent {
                return Err(io::Error::from_raw_os_error(libc::ESRCH));
            }
            process::clear_signal_mask()
        });
    }
}

/// This process's directory, made once (and the stale ones of dead processes removed).
fn base_dir() -> Result<PathBuf, String> {
    static BASE: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    BASE.get_or_init(prepare_base_dir).clone()
}

/// Creates `$TMPDIR/singleflight-tests/<pid>` (empty) after deleting the siblings left by
/// processes that are gone.
///
/// A fixed, pid-named layout (rather than a random temporary directory) is what makes the cleanup
/// possible: a directory's owner is known from its name, and `/proc/<pid>` tells whether that
/// owner still runs, so test binaries running side by side never delete each other's servers.
fn prepare_base_dir() -> Result<PathBuf, String> {
    let root = std::env::temp_dir().join("singleflight-tests");
    fs::create_dir_all(&root).map_err(|e| format!("could not create {}: {e}", root.display()))?;
    // Shared by every user of the machine, like /tmp itself: world-writable with the sticky bit,
    // so a non-root run can create its directory next to one made by a root run (and the postgres
    // user can traverse it), while nobody can delete other users' directories. Fails harmlessly
    // when another user created it.
    let _ = fs::set_permissions(&root, fs::Permissions::from_mode(0o1777));

    let own_pid = std::process::id();
    for entry in fs::read_dir(&root).into_iter().flatten().flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        if pid != own_pid && !Path::new("/proc").join(pid.to_string()).exists() {
            // Best effort: a failure only costs disk space.
            let _ = fs::remove_dir_all(entry.path());
        }
    }

    let base = root.join(own_pid.to_string());
    // Left over by an earlier, dead process that had our (recycled) pid.
    if base.exists() {
        fs::remove_dir_all(&base)
            .map_err(|e| format!("could not remove stale {}: {e}", base.display()))?;
    }
    fs::create_dir(&base).map_err(|e| format!("could not create {}: {e}", base.display()))?;
    fs::set_permissions(&base, fs::Permissions::from_mode(0o755))
        .map_err(|e| format!("could not chmod {}: {e}", base.display()))?;
    Ok(base)
}
