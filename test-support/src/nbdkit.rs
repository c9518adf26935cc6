//! nbdkit on a unix socket, for tests and benchmarks that need a real
//! server (a source with filters, a peer to compare with).
//!
//! [`Nbdkit::start`] runs `nbdkit -f -U SOCKET ARGS...` (ARGS: options and
//! `--filter=`s, then the plugin and its parameters) in a
//! [`ChildGuard`], stderr to a log file, and returns once the socket
//! accepts a connection: no sleep stands in for readiness, the poll only
//! bounds the wait, and an nbdkit that exits first is reported with its
//! log. [`Nbdkit::spawn`] and [`Nbdkit::file`] are the panicking forms
//! tests use, in a directory of their own.

use std::ffi::OsStr;
use std::fs::File;
use std::io;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use crate::child::ChildGuard;
use crate::tool::require_tool;

/// How long nbdkit may take to start listening.
const READY: Duration = Duration::from_secs(30);
const POLL: Duration = Duration::from_millis(10);

/// A running nbdkit; stopped by PID and reaped when dropped (its guard).
pub struct Nbdkit {
    pub guard: ChildGuard,
    pub socket: PathBuf,
    /// nbdkit's stderr.
    pub log_path: PathBuf,
}

impl Nbdkit {
    /// `nbdkit -f -U SOCKET ARGS...` with stderr to `log`, once `socket`
    /// accepts (a stale socket file is removed first). Stopped on drop
    /// with `SIGTERM`, then `SIGKILL` (see [`ChildGuard`]).
    pub fn start(socket: &Path, log: &Path, args: &[impl AsRef<OsStr>]) -> io::Result<Nbdkit> {
        let _ = std::fs::remove_file(socket);
        let mut cmd = Command::new("nbdkit");
        cmd.arg("-f")
            .arg("-U")
            .arg(socket)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(log)?);
        let plugin = args
            .iter()
            .map(|a| a.as_ref().to_string_lossy())
            .find(|a| !a.starts_with('-'))
            .unwrap_or_default();
        let guard = ChildGuard::spawn(format!("nbdkit {plugin}"), &mut cmd)?;
        let mut kit = Nbdkit {
            guard,
            socket: socket.to_path_buf(),
            log_path: log.to_path_buf(),
        };
        let deadline = Instant::now() + READY;
        while UnixStream::connect(socket).is_err() {
            if let Some(status) = kit.guard.try_wait()? {
                return Err(io::Error::other(format!(
                    "nbdkit {args:?} exited with {status} before listening\n{}",
                    kit.log(),
                    args = args.iter().map(AsRef::as_ref).collect::<Vec<_>>(),
                )));
            }
            if Instant::now() >= deadline {
                return Err(io::Error::other(format!(
                    "nbdkit not listening on {} within {READY:?}\n{}",
                    socket.display(),
                    kit.log()
                )));
            }
            thread::sleep(POLL);
        }
        Ok(kit)
    }

    /// [`Nbdkit::start`] on `dir/nbdkit.sock`, log `dir/nbdkit.log`;
    /// panics if nbdkit is missing (naming the package) or does not
    /// listen. `SIGKILL`ed on drop.
    pub fn spawn(dir: &Path, args: &[&str]) -> Nbdkit {
        require_tool("nbdkit", "nbdkit");
        let mut kit = Nbdkit::start(&dir.join("nbdkit.sock"), &dir.join("nbdkit.log"), args)
            .unwrap_or_else(|e| panic!("{e}"));
        kit.guard = kit.guard.kill_on_drop();
        kit
    }

    /// nbdkit serving `file` read-only with extra filter arguments (e.g.
    /// `--filter=error error-pread-rate=10%`: the `--` ones go before the
    /// plugin, the others after it), as [`Nbdkit::spawn`]. One thread
    /// (`-t 1`): nbdkit 1.32 aborts when a connection is cut while several
    /// threads have requests in flight.
    pub fn file(dir: &Path, file: &Path, filter_args: &[&str]) -> Nbdkit {
        let file = file.to_str().expect("a UTF-8 path");
        let mut args = vec!["-r", "-t", "1"];
        args.extend(filter_args.iter().filter(|a| a.starts_with("--")));
        args.extend(["file", file]);
        args.extend(filter_args.iter().filter(|a| !a.starts_with("--")));
        Nbdkit::spawn(dir, &args)
    }

    /// `nbd+unix:///?socket=PATH`.
    pub fn uri(&self) -> String {
        format!("nbd+unix:///?socket={}", self.socket.display())
    }

    /// nbdkit's stderr so far, with a header line.
    pub fn log(&self) -> String {
        format!(
            "--- nbdkit stderr ---\n{}",
            std::fs::read_to_string(&self.log_path).unwrap_or_default()
        )
    }

    /// Whether it still runs (it must not crash under the test).
    pub fn alive(&mut self) -> bool {
        self.guard.alive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nbdkit_serves_once_started_and_is_gone_after_drop() {
        let dir = std::env::temp_dir().join(format!("ts-nbdkit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut kit = Nbdkit::spawn(&dir, &["memory", "size=1M"]);
        assert!(kit.alive());
        UnixStream::connect(&kit.socket).expect("serving");
        assert!(kit.uri().ends_with("nbdkit.sock"));
        let pid = kit.guard.pid();
        drop(kit);
        assert!(!Path::new(&format!("/proc/{pid}/stat")).exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn an_nbdkit_that_exits_is_reported_with_its_log() {
        let dir = std::env::temp_dir().join(format!("ts-nbdkit-bad-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let err = Nbdkit::start(
            &dir.join("s.sock"),
            &dir.join("s.log"),
            &["no-such-plugin-here"],
        )
        .err()
        .expect("nbdkit without its plugin fails");
        assert!(err.to_string().contains("nbdkit stderr"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
