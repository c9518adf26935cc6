//! `stream export` as a child process.
//!
//! Readiness is the one URI line the server prints on stdout; the harness
//! waits for it with a deadline and never sleeps. The [`Server`] guard kills
//! the child by PID and reaps it on drop, and when the test is panicking it
//! prints the server's stderr log, which is otherwise kept in a file.

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::Duration;

use crate::{binary, tool, wire};

/// How long a server may take to print its URI.
pub const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// Where a server listens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Addr {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Listen {
    /// `--listen 127.0.0.1:0`.
    Tcp,
    /// `--socket <tempdir>/nbd.sock`.
    Unix,
}

/// A `stream export` command line being put together.
#[derive(Clone, Debug)]
pub struct Export {
    path: PathBuf,
    listen: Listen,
    name: Option<String>,
    description: Option<String>,
    writable: bool,
    extra: Vec<String>,
}

impl Export {
    /// Read-only export of `path` on `127.0.0.1:0`.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Export {
            path: path.into(),
            listen: Listen::Tcp,
            name: None,
            description: None,
            writable: false,
            extra: Vec::new(),
        }
    }

    /// More arguments, appended as given (e.g. `--tls-psk FILE`).
    pub fn args(mut self, args: &[&str]) -> Self {
        self.extra.extend(args.iter().map(|a| a.to_string()));
        self
    }

    /// Listen on a unix socket in a fresh temp directory instead.
    pub fn unix(mut self) -> Self {
        self.listen = Listen::Unix;
        self
    }

    pub fn name(mut self, name: &str) -> Self {
        self.name = Some(name.to_owned());
        self
    }

    pub fn description(mut self, text: &str) -> Self {
        self.description = Some(text.to_owned());
        self
    }

    pub fn writable(mut self) -> Self {
        self.writable = true;
        self
    }

    /// Starts the server and waits for its URI line.
    pub fn spawn(self) -> Server {
        let dir = tempfile::Builder::new()
            .prefix("stream-export-")
            .tempdir()
            .expect("server temp dir");
        let log = dir.path().join("stderr.log");
        let mut cmd = Command::new(binary::stream_bin());
        cmd.arg("export").arg(&self.path);
        let socket = dir.path().join("nbd.sock");
        match self.listen {
            Listen::Tcp => cmd.args(["--listen", "127.0.0.1:0"]),
            Listen::Unix => cmd.arg("--socket").arg(&socket),
        };
        if let Some(name) = &self.name {
            cmd.args(["--name", name]);
        }
        if let Some(text) = &self.description {
            cmd.args(["--description", text]);
        }
        if self.writable {
            cmd.arg("--writable");
        }
        cmd.args(&self.extra);
        if std::env::var_os("RUST_LOG").is_none() {
            cmd.env("RUST_LOG", "debug");
        }
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(File::create(&log).expect("server log file"))
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", binary::stream_bin().display()));
        let uri = read_uri_line(&mut child, READY_TIMEOUT);
        let mut server = Server {
            child: Some(child),
            uri: String::new(),
            addr: Addr::Unix(PathBuf::new()),
            log,
            _dir: dir,
        };
        let uri = match uri {
            Ok(uri) => uri,
            Err(why) => panic!("stream export did not get ready: {why}\n{}", server.log()),
        };
        let addr = match parse_uri(&uri) {
            Some((addr, _name)) => addr,
            None => panic!(
                "stream export printed {uri:?}, not an NBD URI\n{}",
                server.log()
            ),
        };
        match (&addr, self.listen) {
            (Addr::Tcp(sa), Listen::Tcp) => {
                assert!(
                    sa.ip().is_loopback() && sa.port() != 0,
                    "URI {uri} for --listen 127.0.0.1:0"
                )
            }
            (Addr::Unix(p), Listen::Unix) => {
                assert_eq!(p, &socket, "URI {uri} names another socket than --socket")
            }
            _ => panic!(
                "URI {uri} does not match the listener asked for ({:?})",
                self.listen
            ),
        }
        server.uri = uri;
        server.addr = addr;
        server
    }
}

/// Reads the first stdout line on a thread; the thread then keeps draining
/// stdout so the server can never block on a full pipe.
pub fn read_uri_line(child: &mut Child, timeout: Duration) -> Result<String, String> {
    let stdout = child.stdout.take().expect("piped stdout");
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let mut lines = BufReader::new(stdout).lines();
        let first = lines.next();
        let _ = tx.send(first);
        for _ in lines {}
    });
    match rx.recv_timeout(timeout) {
        Ok(Some(Ok(line))) => Ok(line.trim_end().to_owned()),
        Ok(Some(Err(e))) => Err(format!("reading stdout: {e}")),
        Ok(None) => Err(format!(
            "stdout closed before a URI line (exit status {:?})",
            tool::wait_deadline(child, Duration::from_secs(5))
        )),
        Err(_) => Err(format!("no URI line on stdout within {timeout:?}")),
    }
}

/// Parses the two URI forms `stream export` prints:
/// `nbd://HOST:PORT/NAME` and `nbd+unix:///NAME?socket=PATH`, and their
/// TLS forms `nbds://`, `nbds+unix://`. Returns the address and the export
/// name (no percent-decoding: tests use plain names).
pub fn parse_uri(uri: &str) -> Option<(Addr, String)> {
    let uri = match uri.strip_prefix("nbds") {
        Some(rest) => format!("nbd{rest}"),
        None => uri.to_owned(),
    };
    if let Some(rest) = uri.strip_prefix("nbd://") {
        let rest = rest.split_once('?').map_or(rest, |(r, _)| r);
        let (authority, name) = rest.split_once('/').unwrap_or((rest, ""));
        let addr: SocketAddr = authority.parse().ok()?;
        Some((Addr::Tcp(addr), name.to_owned()))
    } else if let Some(rest) = uri.strip_prefix("nbd+unix://") {
        let rest = rest.strip_prefix('/')?;
        let (name, query) = rest.split_once('?')?;
        let socket = query.split('&').find_map(|kv| kv.strip_prefix("socket="))?;
        Some((Addr::Unix(PathBuf::from(socket)), name.to_owned()))
    } else {
        None
    }
}

/// A running `stream export`; killed and reaped on drop.
pub struct Server {
    child: Option<Child>,
    /// The URI the server printed.
    pub uri: String,
    pub addr: Addr,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Server {
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("server running").id()
    }

    /// A raw protocol connection (greeting not yet read).
    pub fn connect(&self) -> wire::Conn {
        wire::Conn::connect(&self.addr)
            .unwrap_or_else(|e| panic!("connect to {}: {e}\n{}", self.uri, self.log()))
    }

    /// The server's stderr so far, for failure messages.
    pub fn log(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let tail: Vec<&str> = text.lines().rev().take(200).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        format!(
            "--- stream export stderr (last 200 lines) ---\n{}",
            tail.join("\n")
        )
    }

    /// Resident set size of the server, from /proc.
    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()))
            .expect("server /proc status");
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .expect("VmRSS in /proc status")
    }

    /// `None` while the server runs; its exit status once it has exited.
    pub fn try_status(&mut self) -> Option<ExitStatus> {
        self.child
            .as_mut()
            .expect("server not yet reaped")
            .try_wait()
            .expect("try_wait")
    }

    /// Sends `signal` to the server.
    pub fn signal(&self, signal: i32) {
        let pid = self.pid() as libc::pid_t;
        // SAFETY: kill(2) with the PID of our own unreaped child, which
        // cannot have been recycled because we have not waited on it.
        let rc = unsafe { libc::kill(pid, signal) };
        assert_eq!(rc, 0, "kill({pid}, {signal}) failed");
    }

    /// Waits up to `timeout` for the server to exit; `None` when it was
    /// still running (it is then killed and reaped).
    pub fn wait(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let mut child = self.child.take().expect("server running");
        tool::wait_deadline(&mut child, timeout)
    }

    /// [`Server::signal`] then [`Server::wait`].
    pub fn signal_and_wait(&mut self, signal: i32, timeout: Duration) -> Option<ExitStatus> {
        self.signal(signal);
        self.wait(timeout)
    }

    /// Asserts the server process is still running (it did not crash).
    pub fn assert_alive(&mut self) {
        if let Some(status) = self.try_status() {
            panic!("stream export exited with {status}\n{}", self.log());
        }
    }

    pub fn log_path(&self) -> &Path {
        &self.log
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            test_support::child::kill_and_reap(&mut child);
        }
        if thread::panicking() {
            eprintln!("{}", self.log());
        }
    }
}

/// Peak resident set (VmHWM) of process `pid`, in KiB.
pub fn peak_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|e| panic!("/proc/{pid}/status: {e}"));
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .expect("VmHWM in /proc status")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_both_uri_forms() {
        assert_eq!(
            parse_uri("nbd://127.0.0.1:4000/"),
            Some((Addr::Tcp("127.0.0.1:4000".parse().unwrap()), String::new()))
        );
        assert_eq!(
            parse_uri("nbd://127.0.0.1:4000/disk"),
            Some((Addr::Tcp("127.0.0.1:4000".parse().unwrap()), "disk".into()))
        );
        assert_eq!(
            parse_uri("nbd+unix:///disk?socket=/tmp/x.sock"),
            Some((Addr::Unix("/tmp/x.sock".into()), "disk".into()))
        );
        assert_eq!(parse_uri("http://x/"), None);
    }
}
