//! The NBD servers under test and how each is started.
//!
//! Every server exports the same file read-only, one at a time, over a
//! unix socket or TCP on 127.0.0.1, with its own defaults otherwise:
//!
//! - `stream export FILE --socket S` / `--listen 127.0.0.1:0`; the URI is
//!   the one line it prints on stdout when ready.
//! - `qemu-nbd -r -f raw --persistent --shared=16 ...`: read-only, raw (no
//!   format probing), more than one client, default cache (writeback) and
//!   aio (threads), as its manual page shows for serving an image.
//! - `nbdkit -f -r ... file FILE`: the file plugin in its default
//!   (parallel) thread model.
//!
//! A server counts as ready once `nbdinfo --size` over its URI returns the
//! file's size, so a measurement never races the server's startup.

use std::fmt;
use std::fs::File;
use std::io::{self, BufRead, BufReader};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use test_support::child::ChildGuard;
use test_support::nbdkit::Nbdkit;

const READY_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ServerKind {
    Stream,
    QemuNbd,
    Nbdkit,
}

impl ServerKind {
    pub const ALL: [ServerKind; 3] = [ServerKind::Stream, ServerKind::QemuNbd, ServerKind::Nbdkit];

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "stream" => Some(ServerKind::Stream),
            "qemu-nbd" => Some(ServerKind::QemuNbd),
            "nbdkit" => Some(ServerKind::Nbdkit),
            _ => None,
        }
    }
}

impl fmt::Display for ServerKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ServerKind::Stream => "stream export",
            ServerKind::QemuNbd => "qemu-nbd",
            ServerKind::Nbdkit => "nbdkit file",
        })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    Unix,
    Tcp,
}

impl Transport {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "unix" => Some(Transport::Unix),
            "tcp" => Some(Transport::Tcp),
            _ => None,
        }
    }
}

impl fmt::Display for Transport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Transport::Unix => "unix",
            Transport::Tcp => "tcp",
        })
    }
}

/// A server that answered `nbdinfo`; stopped when dropped.
pub struct RunningServer {
    pub kind: ServerKind,
    pub uri: String,
    pub guard: ChildGuard,
    pub log: PathBuf,
}

impl RunningServer {
    pub fn pid(&self) -> u32 {
        self.guard.pid()
    }
}

/// Where each server's binary is.
pub struct Binaries {
    pub stream: PathBuf,
}

/// Start `kind` exporting `file` over `transport`; `tag` makes the socket
/// and log names unique within `workdir`.
pub fn start(
    kind: ServerKind,
    transport: Transport,
    file: &Path,
    size: u64,
    workdir: &Path,
    bins: &Binaries,
    tag: &str,
) -> io::Result<RunningServer> {
    let slug = match kind {
        ServerKind::Stream => "stream",
        ServerKind::QemuNbd => "qemu-nbd",
        ServerKind::Nbdkit => "nbdkit",
    };
    let sock = workdir.join(format!("{slug}-{tag}.sock"));
    let log = workdir.join(format!("{slug}-{tag}.log"));
    let _ = std::fs::remove_file(&sock);
    let port = match transport {
        Transport::Unix => 0,
        Transport::Tcp => free_port()?,
    };
    let (program, args): (PathBuf, Vec<String>) = {
        let f = file.display().to_string();
        let s = sock.display().to_string();
        match (kind, transport) {
            (ServerKind::Stream, Transport::Unix) => (
                bins.stream.clone(),
                vec!["export".into(), f, "--socket".into(), s],
            ),
            (ServerKind::Stream, Transport::Tcp) => (
                bins.stream.clone(),
                vec!["export".into(), f, "--listen".into(), "127.0.0.1:0".into()],
            ),
            (ServerKind::QemuNbd, t) => {
                let mut a: Vec<String> = ["-r", "-f", "raw", "--persistent", "--shared=16"]
                    .map(String::from)
                    .into();
                match t {
                    Transport::Unix => a.push(format!("--socket={s}")),
                    Transport::Tcp => {
                        a.extend(["--bind=127.0.0.1".into(), format!("--port={port}")])
                    }
                }
                a.push(f);
                ("qemu-nbd".into(), a)
            }
            (ServerKind::Nbdkit, t) => {
                let mut a: Vec<String> = vec!["-f".into(), "-r".into()];
                match t {
                    Transport::Unix => a.extend(["-U".into(), s]),
                    Transport::Tcp => a.extend([
                        "-i".into(),
                        "127.0.0.1".into(),
                        "-p".into(),
                        port.to_string(),
                    ]),
                }
                a.extend(["file".into(), f]);
                ("nbdkit".into(), a)
            }
        }
    };
    let mut cmd = Command::new(&program);
    cmd.args(&args)
        .stdin(Stdio::null())
        .stdout(if kind == ServerKind::Stream {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stderr(File::create(&log)?);
    let mut guard = ChildGuard::spawn(format!("{kind} ({transport})"), &mut cmd)?;

    let uri = match kind {
        ServerKind::Stream => read_uri_line(&mut guard, &log)?,
        _ => match transport {
            Transport::Unix => format!("nbd+unix:///?socket={}", sock.display()),
            Transport::Tcp => format!("nbd://127.0.0.1:{port}/"),
        },
    };
    wait_until_served(&mut guard, &uri, size, &log)?;
    Ok(RunningServer {
        kind,
        uri,
        guard,
        log,
    })
}

/// Seconds of its rate nbdkit's `rate` filter lets a client burst (its
/// `burstiness`): a link sends at its rate from the first byte, where the
/// filter's default of 2 s would carry a whole boot at 1 Gbit/s unlimited.
pub const RATE_BURST: f64 = 0.001;

/// nbdkit as a *source*: `plugin` with `params`, behind `filters` (e.g.
/// `delay` with `delay-read=1ms` among the params to imitate a remote
/// link), read-only on a unix socket in `workdir` (test-support's
/// launcher, then the `nbdinfo` size check). Unlike [`start`] it serves
/// generated disks too (`random`, `sparse-random`, ...).
pub fn start_nbdkit_source(
    filters: &[&str],
    plugin: &str,
    params: &[String],
    size: u64,
    workdir: &Path,
    tag: &str,
) -> io::Result<RunningServer> {
    let sock = workdir.join(format!("nbdkit-{tag}.sock"));
    let log = workdir.join(format!("nbdkit-{tag}.log"));
    let mut args: Vec<String> = vec!["-r".into()];
    args.extend(filters.iter().map(|f| format!("--filter={f}")));
    args.push(plugin.into());
    args.extend(params.iter().cloned());
    let Nbdkit {
        mut guard,
        log_path,
        ..
    } = Nbdkit::start(&sock, &log, &args)?;
    let uri = format!("nbd+unix:///?socket={}", sock.display());
    wait_until_served(&mut guard, &uri, size, &log_path)?;
    Ok(RunningServer {
        kind: ServerKind::Nbdkit,
        uri,
        guard,
        log: log_path,
    })
}

/// A TCP port that was free a moment ago (bound then released).
fn free_port() -> io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// `stream export` prints exactly one line, its URI, when it is ready.
pub fn read_uri_line(guard: &mut ChildGuard, log: &Path) -> io::Result<String> {
    let stdout = guard
        .child_mut()
        .stdout
        .take()
        .expect("stdout is piped for stream");
    let (tx, rx) = mpsc::channel();
    // The reader thread ends at EOF, i.e. when the server exits.
    thread::spawn(move || {
        let mut line = String::new();
        let r = BufReader::new(stdout).read_line(&mut line).map(|_| line);
        let _ = tx.send(r);
    });
    match rx.recv_timeout(READY_TIMEOUT) {
        Ok(Ok(line)) if !line.trim().is_empty() => Ok(line.trim().to_string()),
        Ok(Ok(_)) => Err(io::Error::other(format!(
            "{} exited without printing its URI; see {}",
            guard.name(),
            log.display()
        ))),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(io::Error::other(format!(
            "{} printed no URI within {READY_TIMEOUT:?}; see {}",
            guard.name(),
            log.display()
        ))),
    }
}

/// Poll with `nbdinfo --size` until the server answers with the right size.
pub fn wait_until_served(
    guard: &mut ChildGuard,
    uri: &str,
    size: u64,
    log: &Path,
) -> io::Result<()> {
    let deadline = Instant::now() + READY_TIMEOUT;
    let mut last = String::new();
    while Instant::now() < deadline {
        if let Some(status) = guard.try_wait()? {
            return Err(io::Error::other(format!(
                "{} exited ({status}) before serving; see {}",
                guard.name(),
                log.display()
            )));
        }
        let out = nbdinfo_size(uri)?;
        match out {
            Ok(n) if n == size => return Ok(()),
            Ok(n) => {
                return Err(io::Error::other(format!(
                    "{} reports size {n}, expected {size}",
                    guard.name()
                )));
            }
            Err(e) => last = e,
        }
        thread::sleep(Duration::from_millis(50));
    }
    Err(io::Error::other(format!(
        "{} not serving {uri} within {READY_TIMEOUT:?}: {last}",
        guard.name()
    )))
}

/// `nbdinfo --size URI`: outer error if nbdinfo cannot run, inner error if
/// the server did not answer (yet).
fn nbdinfo_size(uri: &str) -> io::Result<Result<u64, String>> {
    let tmp = std::env::temp_dir().join(format!("nbdinfo-{}.out", std::process::id()));
    let mut cmd = Command::new("nbdinfo");
    cmd.args(["--size", uri])
        .stdin(Stdio::null())
        .stdout(File::create(&tmp)?)
        .stderr(Stdio::null());
    let mut guard = ChildGuard::spawn("nbdinfo", &mut cmd)?;
    let status = guard.wait_timeout(Duration::from_secs(10))?;
    let text = std::fs::read_to_string(&tmp).unwrap_or_default();
    let _ = std::fs::remove_file(&tmp);
    Ok(match status {
        Some(s) if s.success() => text
            .trim()
            .parse()
            .map_err(|_| format!("nbdinfo printed {text:?}")),
        Some(s) => Err(format!("nbdinfo: {s}")),
        None => Err("nbdinfo timed out".into()),
    })
}
