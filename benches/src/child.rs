//! A child process owned by a guard.
//!
//! Every process the harness starts (servers, fio, nbdinfo) lives in a
//! [`ChildGuard`]. Dropping the guard sends `SIGTERM` to that PID, waits a
//! bounded time, then `SIGKILL`s and reaps it: no process outlives the run,
//! even when the harness returns early with an error. Children also get
//! `PR_SET_PDEATHSIG`, so they die if the harness itself is killed.

use std::io;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, ExitStatus};
use std::thread;
use std::time::{Duration, Instant};

/// How long a child gets between `SIGTERM` and `SIGKILL`.
const TERM_GRACE: Duration = Duration::from_secs(5);
const POLL: Duration = Duration::from_millis(10);

pub struct ChildGuard {
    name: String,
    child: Option<Child>,
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
        })
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
        if let Some(child) = self.child.take() {
            match terminate(child) {
                Ok((_, true)) => {}
                Ok((_, false)) => eprintln!("{}: ignored SIGTERM, killed", self.name),
                Err(e) => eprintln!("{}: cannot stop: {e}", self.name),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dropping_the_guard_kills_and_reaps_the_child() {
        let guard = ChildGuard::spawn("sleep", Command::new("sleep").arg("60")).unwrap();
        let pid = guard.pid();
        drop(guard);
        // Reaped: the PID no longer names a process of ours.
        assert!(!std::path::Path::new(&format!("/proc/{pid}/stat")).exists());
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
}
