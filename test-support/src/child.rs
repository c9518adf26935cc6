//! Child processes that never outlive the test or harness that started
//! them.
//!
//! [`ChildGuard`] owns one child. Dropping it stops the child by PID
//! (`SIGTERM`, a bounded grace, then `SIGKILL`; or `SIGKILL` at once after
//! [`ChildGuard::kill_on_drop`]) and reaps it, even when the test panics
//! or the harness returns early with an error. Children also get
//! `PR_SET_PDEATHSIG`, so they die if the process that started them is
//! killed. (Linux sends it when the *thread* that spawned the child ends:
//! spawn on the thread that will also drop the guard, as tests do.)
//!
//! For harnesses that keep a bare [`Child`] (to read its pipes or signal
//! it themselves): [`wait_deadline`] waits with a bound and
//! [`kill_and_reap`] is what their `Drop` does.

use std::io;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, ExitStatus};
use std::thread;
use std::time::{Duration, Instant};

/// How long a child gets between `SIGTERM` and `SIGKILL`.
pub const TERM_GRACE: Duration = Duration::from_secs(5);
/// How long a `SIGKILL`ed child may take to be reaped.
const REAP: Duration = Duration::from_secs(10);
/// How often a bounded wait looks again: std has no `waitpid` with a
/// timeout, and the poll only bounds the wait.
const POLL: Duration = Duration::from_millis(5);

/// A child process stopped by PID and reaped when dropped.
pub struct ChildGuard {
    name: String,
    child: Option<Child>,
    kill_on_drop: bool,
}

impl ChildGuard {
    /// Spawn `cmd`; `name` is used in messages.
    pub fn spawn(name: impl Into<String>, cmd: &mut Command) -> io::Result<Self> {
        let name = name.into();
        // SAFETY: the closure runs between fork and exec and only calls
        // prctl(2), which is async-signal-safe.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .map_err(|e| io::Error::new(e.kind(), format!("cannot start {name}: {e}")))?;
        Ok(ChildGuard {
            name,
            child: Some(child),
            kill_on_drop: false,
        })
    }

    /// On drop, `SIGKILL` at once instead of `SIGTERM` first: for servers
    /// a test is done with, whose clean shutdown it does not look at.
    pub fn kill_on_drop(mut self) -> Self {
        self.kill_on_drop = true;
        self
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    pub fn child_mut(&mut self) -> &mut Child {
        self.child.as_mut().expect("child present until stopped")
    }

    /// The exit status if the child has already exited.
    pub fn try_wait(&mut self) -> io::Result<Option<ExitStatus>> {
        self.child_mut().try_wait()
    }

    /// Whether it still runs.
    pub fn alive(&mut self) -> bool {
        matches!(self.try_wait(), Ok(None))
    }

    /// Wait until the child exits or `timeout` passes; `None` on timeout
    /// (the child is left running, the guard still owns it).
    pub fn wait_timeout(&mut self, timeout: Duration) -> io::Result<Option<ExitStatus>> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_wait()? {
                return Ok(Some(status));
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            thread::sleep(POLL);
        }
    }

    /// `SIGTERM`, wait up to [`TERM_GRACE`], then `SIGKILL`; always reaps.
    /// Returns the exit status and whether `SIGTERM` sufficed.
    pub fn stop(mut self) -> io::Result<(ExitStatus, bool)> {
        let child = self.child.take().expect("child present until stopped");
        terminate(child)
    }

    /// `SIGKILL` and reap (a crash at whatever point it was).
    pub fn kill(mut self) -> io::Result<ExitStatus> {
        let mut child = self.child.take().expect("child present until stopped");
        // Fails only for a child that already exited: the wait tells.
        let _ = child.kill();
        child.wait()
    }
}

fn terminate(mut child: Child) -> io::Result<(ExitStatus, bool)> {
    if let Some(status) = child.try_wait()? {
        return Ok((status, true));
    }
    let pid = child.id() as libc::pid_t;
    // SAFETY: kill(2) on the PID of our own unreaped child: the PID
    // cannot have been recycled before we wait on it.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let deadline = Instant::now() + TERM_GRACE;
    while Instant::now() < deadline {
        if let Some(status) = child.try_wait()? {
            return Ok((status, true));
        }
        thread::sleep(POLL);
    }
    child.kill()?;
    Ok((child.wait()?, false))
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        if self.kill_on_drop {
            kill_and_reap(&mut child);
            return;
        }
        match terminate(child) {
            Ok((_, true)) => {}
            Ok((_, false)) => eprintln!("{}: ignored SIGTERM, killed", self.name),
            Err(e) => eprintln!("{}: cannot stop: {e}", self.name),
        }
    }
}

/// Waits for `child` up to `timeout`. On timeout the child is killed and
/// reaped and `None` is returned.
pub fn wait_deadline(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Some(status),
            Ok(None) => {}
            Err(e) => panic!("waiting for child {}: {e}", child.id()),
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        thread::sleep(POLL);
    }
}

/// `SIGKILL` by PID (a no-op for a child that already exited), then reap
/// within a bound: what a harness's `Drop` does with a bare [`Child`].
pub fn kill_and_reap(child: &mut Child) {
    let _ = child.kill();
    let _ = wait_deadline(child, REAP);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reaped(pid: u32) -> bool {
        !std::path::Path::new(&format!("/proc/{pid}/stat")).exists()
    }

    #[test]
    fn dropping_the_guard_kills_and_reaps_the_child() {
        let guard = ChildGuard::spawn("sleep", Command::new("sleep").arg("60")).unwrap();
        let pid = guard.pid();
        drop(guard);
        assert!(reaped(pid));
        let guard = ChildGuard::spawn("sleep", Command::new("sleep").arg("60"))
            .unwrap()
            .kill_on_drop();
        let pid = guard.pid();
        drop(guard);
        assert!(reaped(pid));
    }

    #[test]
    fn wait_timeout_returns_none_while_running() {
        let mut guard = ChildGuard::spawn("sleep", Command::new("sleep").arg("60")).unwrap();
        assert!(
            guard
                .wait_timeout(Duration::from_millis(50))
                .unwrap()
                .is_none()
        );
        let (_, termed) = guard.stop().unwrap();
        assert!(termed);
    }

    #[test]
    fn wait_deadline_kills_what_runs_past_it() {
        let mut child = Command::new("sleep").arg("60").spawn().unwrap();
        assert!(wait_deadline(&mut child, Duration::from_millis(50)).is_none());
        assert!(child.try_wait().unwrap().is_some());
    }
}
