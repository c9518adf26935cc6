//! `stream start` under test: a lazily fetched volume served over NBD,
//! and the progress its control socket reports.
//!
//! [`StreamStart::spawn`] runs `stream start --source URI --target T
//! --state D --socket S [--no-hydrate]` in a [`ChildGuard`], waits for the
//! URI line it prints when ready and for `nbdinfo` to see the size.
//! [`StreamStart::status`] asks `D/control.sock` (the socket `stream status
//! --json` reads) for the same JSON reply: one request line, one reply
//! line, with a timeout. Polling every 50 ms that way costs no process
//! start on a machine with two cores.

use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use crate::servers::{RunningServer, ServerKind, read_uri_line, wait_until_served};
use test_support::child::ChildGuard;

/// How long one status request may take.
const STATUS_TIMEOUT: Duration = Duration::from_secs(5);

/// One `stream start` to run.
pub struct StartSpec<'a> {
    pub bin: &'a Path,
    /// NBD URI (or path) of the source.
    pub source: &'a str,
    pub target: PathBuf,
    pub state: PathBuf,
    /// Unix socket the volume is served on.
    pub socket: PathBuf,
    /// stderr of the server.
    pub log: PathBuf,
    /// Size of the source, to check the export.
    pub size: u64,
    pub no_hydrate: bool,
}

/// A running `stream start`; stopped (SIGTERM, then SIGKILL) when dropped.
pub struct StreamStart {
    pub server: RunningServer,
    pub state: PathBuf,
    /// When the process was started (hydration time counts from here).
    pub started: Instant,
    /// From the process start to its URI line (ready to serve), before
    /// the `nbdinfo` check.
    pub to_uri: Duration,
}

impl StreamStart {
    pub fn spawn(spec: &StartSpec) -> io::Result<StreamStart> {
        let _ = std::fs::remove_file(&spec.socket);
        let mut cmd = Command::new(spec.bin);
        cmd.arg("start")
            .args(["--source", spec.source, "--target"])
            .arg(&spec.target)
            .arg("--state")
            .arg(&spec.state)
            .arg("--socket")
            .arg(&spec.socket);
        if spec.no_hydrate {
            cmd.arg("--no-hydrate");
        }
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&spec.log)?);
        let started = Instant::now();
        let mut guard = ChildGuard::spawn("stream start", &mut cmd)?;
        let uri = read_uri_line(&mut guard, &spec.log)?;
        let to_uri = started.elapsed();
        wait_until_served(&mut guard, &uri, spec.size, &spec.log)?;
        Ok(StreamStart {
            server: RunningServer {
                kind: ServerKind::Stream,
                uri,
                guard,
                log: spec.log.clone(),
            },
            state: spec.state.clone(),
            started,
            to_uri,
        })
    }

    pub fn pid(&self) -> u32 {
        self.server.pid()
    }

    pub fn uri(&self) -> &str {
        &self.server.uri
    }

    /// The status reply (`stream status --json`): `volume.*` holds the
    /// counters.
    pub fn status(&self) -> io::Result<serde_json::Value> {
        let sock = self.state.join("control.sock");
        let mut s = UnixStream::connect(&sock)?;
        s.set_read_timeout(Some(STATUS_TIMEOUT))?;
        s.set_write_timeout(Some(STATUS_TIMEOUT))?;
        s.write_all(b"{\"cmd\":\"status\"}\n")?;
        let mut line = String::new();
        BufReader::new(s).read_line(&mut line)?;
        serde_json::from_str(&line)
            .map_err(|e| io::Error::other(format!("status reply {line:?}: {e}")))
    }

    /// Poll until `volume.hydration_complete`; `each` sees every reply.
    /// Returns the time since the process started, or `None` if `timeout`
    /// passed first.
    pub fn wait_hydrated(
        &self,
        timeout: Duration,
        poll: Duration,
        mut each: impl FnMut(&serde_json::Value),
    ) -> io::Result<Option<Duration>> {
        let deadline = Instant::now() + timeout;
        loop {
            let st = self.status()?;
            each(&st);
            if st["volume"]["hydration_complete"].as_bool() == Some(true) {
                return Ok(Some(self.started.elapsed()));
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            thread::sleep(poll);
        }
    }

    /// SIGTERM (the clean stop that saves the state), bounded; see
    /// [`ChildGuard::stop`].
    pub fn stop(self) -> io::Result<(ExitStatus, bool)> {
        self.server.guard.stop()
    }
}

/// A counter of the status reply's `volume` object (0 when missing).
pub fn counter(status: &serde_json::Value, key: &str) -> u64 {
    status["volume"][key].as_u64().unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counter_reads_volume_fields_and_defaults_to_zero() {
        let v: serde_json::Value =
            serde_json::from_str(r#"{"volume":{"bytes_fetched":42}}"#).unwrap();
        assert_eq!(counter(&v, "bytes_fetched"), 42);
        assert_eq!(counter(&v, "chunks_hydrated"), 0);
    }
}
