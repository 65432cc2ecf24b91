//! The stack's lifetime: a daemon that outlives the command that started it, found again through a
//! pid file, stopped by its pid.
//!
//! Each server runs in a session of its own (`setsid`), with no controlling terminal, so Ctrl-C on
//! `stack.sh up` (which reaches the whole foreground process group) stops only what it should: the
//! service that `up` runs in the foreground, or `up` itself, which then stops the fleet in order.
//! The daemon is not told to put itself in the background: the pid spawned is the server's, and
//! that is the pid the stack writes down. Its stdout and stderr are appended to its log.
//!
//! Which pid file, which port file and which messages belong to the stack (see
//! [`crate::stack`]); what stops each server is its module's ([`crate::process::stop`] with the
//! module's steps).

use std::io;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Stdio};

use crate::process::{self, Error, Server};

/// Spawns `server` as a daemon in a session of its own, with no stdin and its output appended to
/// `log`. The [`Child`] lets a caller that stays (`stack.sh up`) reap it when it exits; dropping
/// it leaves the daemon running.
pub fn spawn(server: &dyn Server, log: &Path) -> Result<Child, Error> {
    let mut command = server.command();
    let (stdout, stderr) = process::log_output(log)?;
    command.stdin(Stdio::null()).stdout(stdout).stderr(stderr);
    // SAFETY: setsid(2) is async-signal-safe and touches no memory of ours, and so is
    // `clear_signal_mask` (see its docs); the closure captures nothing. setsid cannot fail here:
    // the child of a fork is never a process group leader.
    unsafe {
        command.pre_exec(|| {
            if libc::setsid() == -1 {
                return Err(io::Error::last_os_error());
            }
            process::clear_signal_mask()
        });
    }
    command
        .spawn()
        .map_err(Error::io(format!("start {} ({command:?})", server.name())))
}
