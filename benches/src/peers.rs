//! The migrators the suite compares, each started the way its own
//! documentation shows, in front of one NBD source on a unix socket:
//!
//! - [`PeerKind::Direct`]: no migrator, the client reads the source itself
//!   (the baseline for cold latency).
//! - [`PeerKind::Stream`]: `stream start --source SRC --target T ...`,
//!   with `--no-hydrate` when a scenario wants no background copy.
//! - [`PeerKind::Qsd`]: QEMU's image streaming. `qemu-img create -f qcow2
//!   -o data_file=T -b SRC -F raw O` makes a qcow2 overlay whose backing
//!   file is the NBD source and whose data sit in the target `T` at their
//!   guest offsets (QEMU refuses `data_file_raw` with a backing file, but
//!   once streamed `T` is a raw disk like ours); `qemu-storage-daemon`
//!   opens it under a `copy-on-read` filter, exports the filter over NBD,
//!   and a `block-stream` job started over QMP hydrates in the background.
//! - [`PeerKind::NbdkitCache`]: `nbdkit --filter=cache nbd socket=SRC
//!   cache-on-read=true`: reads fill a local cache file; nothing hydrates
//!   in the background, so the copy is never complete by itself.
//! - [`PeerKind::CopyThenServe`]: `nbdcopy SRC T`, then `qemu-nbd` serves
//!   `T`: the user waits for the whole copy before the first byte.
//!
//! Every process lives in a [`ChildGuard`]; every wait is bounded.

use std::fmt;
use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use crate::lazy::{StartSpec, StreamStart, counter};
use crate::qmp::Qmp;
use crate::servers::wait_until_served;
use crate::{cpu, mem};
use test_support::child::ChildGuard;

const POLL: Duration = Duration::from_millis(50);
/// How often the end of a background copy is looked for: as often as the
/// end of nbdcopy's copy is (`ChildGuard::wait_timeout`), so neither time
/// carries more of the poll than the other (at 50 ms stream's carried 25 ms
/// on average, 3% of a 1 GiB copy).
const HYDRATED_POLL: Duration = Duration::from_millis(5);

/// Progress samples of a background copy: `(seconds since start, fraction
/// copied)`.
pub type Samples = Vec<(f64, f64)>;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PeerKind {
    Direct,
    Stream,
    Qsd,
    NbdkitCache,
    CopyThenServe,
}

impl PeerKind {
    pub const ALL: [PeerKind; 5] = [
        PeerKind::Direct,
        PeerKind::Stream,
        PeerKind::Qsd,
        PeerKind::NbdkitCache,
        PeerKind::CopyThenServe,
    ];

    /// Short name used in JSON and file names.
    pub fn slug(self) -> &'static str {
        match self {
            PeerKind::Direct => "direct",
            PeerKind::Stream => "stream",
            PeerKind::Qsd => "qsd-stream",
            PeerKind::NbdkitCache => "nbdkit-cache",
            PeerKind::CopyThenServe => "nbdcopy-then-serve",
        }
    }

    pub fn parse(s: &str) -> Option<PeerKind> {
        PeerKind::ALL.into_iter().find(|k| k.slug() == s)
    }

    /// Whether the peer copies the whole disk to the target by itself.
    pub fn hydrates(self) -> bool {
        matches!(
            self,
            PeerKind::Stream | PeerKind::Qsd | PeerKind::CopyThenServe
        )
    }
}

impl fmt::Display for PeerKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PeerKind::Direct => "source direct",
            PeerKind::Stream => "stream start",
            PeerKind::Qsd => "qemu-storage-daemon + block-stream",
            PeerKind::NbdkitCache => "nbdkit nbd + cache filter",
            PeerKind::CopyThenServe => "nbdcopy, then qemu-nbd",
        })
    }
}

/// Peak resident memory and CPU time of a server process.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Usage {
    pub peak_rss_kib: u64,
    pub cpu: Duration,
}

/// Read `pid`'s usage now (zero if it is gone).
pub fn usage_of(pid: u32) -> Usage {
    Usage {
        peak_rss_kib: mem::status_kib(pid, "VmHWM").unwrap_or(0),
        cpu: cpu::process_cpu_time(pid).unwrap_or_default(),
    }
}

/// What a peer needs to start.
pub struct PeerSpec<'a> {
    pub kind: PeerKind,
    /// NBD URI of the source (`nbd+unix:///?socket=...`).
    pub source_uri: &'a str,
    /// The source's unix socket (for nbdkit's nbd plugin).
    pub source_socket: &'a Path,
    pub size: u64,
    /// A fresh directory for this peer's target, state and sockets.
    pub dir: &'a Path,
    pub stream_bin: &'a Path,
    /// Copy the whole disk in the background (stream, qsd).
    pub hydrate: bool,
    /// Bound on a full copy (nbdcopy).
    pub copy_timeout: Duration,
}

enum Running {
    Direct,
    Stream(StreamStart),
    Qsd {
        guard: ChildGuard,
        qmp: Qmp,
        job: bool,
    },
    Server(ChildGuard),
}

/// A started peer, serving `uri`. Stopped when dropped.
pub struct Peer {
    pub kind: PeerKind,
    pub uri: String,
    /// Time from the start until the first byte could be served.
    pub ready_after: Duration,
    /// The full copy done before serving (copy-then-serve only): its time
    /// and the copier's usage.
    pub copy: Option<(Duration, Usage)>,
    started: Instant,
    running: Running,
    log: PathBuf,
}

impl Peer {
    pub fn start(spec: &PeerSpec) -> io::Result<Peer> {
        fs::create_dir_all(spec.dir)?;
        let log = spec.dir.join(format!("{}.log", spec.kind.slug()));
        let sock = spec.dir.join("peer.sock");
        let target = spec.dir.join("target.img");
        let started = Instant::now();
        let mut copy = None;
        let (uri, running) = match spec.kind {
            PeerKind::Direct => (spec.source_uri.to_string(), Running::Direct),
            PeerKind::Stream => {
                let s = StreamStart::spawn(&StartSpec {
                    bin: spec.stream_bin,
                    source: spec.source_uri,
                    target,
                    state: spec.dir.join("state"),
                    socket: sock,
                    log: log.clone(),
                    size: spec.size,
                    no_hydrate: !spec.hydrate,
                })?;
                (s.uri().to_string(), Running::Stream(s))
            }
            PeerKind::Qsd => start_qsd(spec, &target, &sock, &log)?,
            PeerKind::NbdkitCache => {
                let mut cmd = Command::new("nbdkit");
                cmd.args(["-f", "-U"])
                    .arg(&sock)
                    .args(["--filter=cache", "nbd"])
                    .arg(format!("socket={}", spec.source_socket.display()))
                    .arg("cache-on-read=true")
                    // The cache file goes to $TMPDIR: the same disk as the
                    // other peers' targets.
                    .env("TMPDIR", spec.dir)
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(File::create(&log)?);
                let mut g = ChildGuard::spawn("nbdkit cache", &mut cmd)?;
                let uri = format!("nbd+unix:///?socket={}", sock.display());
                wait_until_served(&mut g, &uri, spec.size, &log)?;
                (uri, Running::Server(g))
            }
            PeerKind::CopyThenServe => {
                copy = Some(nbdcopy(
                    spec.source_uri,
                    &target,
                    spec.size,
                    spec.copy_timeout,
                )?);
                let mut cmd = Command::new("qemu-nbd");
                cmd.args(["-f", "raw", "--persistent", "--shared=16"])
                    .arg(format!("--socket={}", sock.display()))
                    .arg(&target)
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(File::create(&log)?);
                let mut g = ChildGuard::spawn("qemu-nbd", &mut cmd)?;
                let uri = format!("nbd+unix:///?socket={}", sock.display());
                wait_until_served(&mut g, &uri, spec.size, &log)?;
                (uri, Running::Server(g))
            }
        };
        Ok(Peer {
            kind: spec.kind,
            uri,
            ready_after: started.elapsed(),
            copy,
            started,
            running,
            log,
        })
    }

    /// PID of the serving process (`None` for the direct baseline).
    pub fn pid(&self) -> Option<u32> {
        match &self.running {
            Running::Direct => None,
            Running::Stream(s) => Some(s.pid()),
            Running::Qsd { guard, .. } | Running::Server(guard) => Some(guard.pid()),
        }
    }

    /// `stream status --json` of a `stream start` peer (`None` for others).
    pub fn stream_status(&self) -> Option<io::Result<serde_json::Value>> {
        match &self.running {
            Running::Stream(s) => Some(s.status()),
            _ => None,
        }
    }

    pub fn usage(&self) -> Option<Usage> {
        self.pid().map(usage_of)
    }

    /// Progress of the background copy as a fraction (`None`: this peer
    /// has none running).
    pub fn progress(&mut self) -> io::Result<Option<f64>> {
        match &mut self.running {
            Running::Stream(s) => {
                let st = s.status()?;
                let size = counter(&st, "size").max(1);
                if st["volume"]["hydration_complete"].as_bool() == Some(true) {
                    return Ok(Some(1.0));
                }
                Ok(Some(counter(&st, "bytes_present") as f64 / size as f64))
            }
            Running::Qsd { qmp, job: true, .. } => {
                let jobs = qmp.execute("query-block-jobs", serde_json::json!({}))?;
                match jobs.as_array().and_then(|a| a.first()) {
                    None => Ok(Some(1.0)),
                    Some(j) => {
                        if let Some(e) = j.get("error") {
                            return Err(io::Error::other(format!("block-stream failed: {e}")));
                        }
                        let len = j["len"].as_f64().unwrap_or(1.0).max(1.0);
                        Ok(Some(j["offset"].as_f64().unwrap_or(0.0) / len))
                    }
                }
            }
            _ => Ok(None),
        }
    }

    /// Poll until the background copy is complete; the time since the
    /// start and the progress samples `(seconds, fraction)`. `None` for a
    /// peer that copies nothing in the background; an error on timeout.
    pub fn wait_hydrated(&mut self, timeout: Duration) -> io::Result<Option<(Duration, Samples)>> {
        if let Some((took, _)) = self.copy {
            return Ok(Some((took, vec![(0.0, 0.0), (took.as_secs_f64(), 1.0)])));
        }
        let deadline = Instant::now() + timeout;
        let mut samples = Vec::new();
        loop {
            let Some(p) = self.progress()? else {
                return Ok(None);
            };
            let t = self.started.elapsed();
            samples.push((t.as_secs_f64(), p));
            if p >= 1.0 {
                return Ok(Some((t, samples)));
            }
            if Instant::now() >= deadline {
                return Err(io::Error::other(format!(
                    "{}: copy {:.0}% done after {timeout:?}; log {}",
                    self.kind,
                    100.0 * p,
                    self.log.display()
                )));
            }
            thread::sleep(HYDRATED_POLL);
        }
    }

    /// Stop the peer: a running block-stream job is cancelled and waited
    /// for first, so no connection to the source is cut with reads in
    /// flight (nbdkit 1.32.5 aborts on that).
    pub fn stop(self) -> io::Result<()> {
        match self.running {
            Running::Direct => Ok(()),
            Running::Stream(s) => s.stop().map(drop),
            Running::Qsd {
                guard,
                mut qmp,
                job,
            } => {
                if job {
                    let _ = qmp.execute(
                        "block-job-cancel",
                        serde_json::json!({"device": "hydrate", "force": true}),
                    );
                    let deadline = Instant::now() + Duration::from_secs(10);
                    while Instant::now() < deadline {
                        let jobs = qmp.execute("query-block-jobs", serde_json::json!({}))?;
                        if jobs.as_array().is_none_or(|a| a.is_empty()) {
                            break;
                        }
                        thread::sleep(Duration::from_millis(20));
                    }
                }
                let _ = qmp.execute("quit", serde_json::json!({}));
                drop(qmp);
                guard.stop().map(drop)
            }
            Running::Server(g) => g.stop().map(drop),
        }
    }
}

fn start_qsd(
    spec: &PeerSpec,
    target: &Path,
    sock: &Path,
    log: &Path,
) -> io::Result<(String, Running)> {
    let overlay = spec.dir.join("overlay.qcow2");
    let qmp_sock = spec.dir.join("qmp.sock");
    run_quiet(
        Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "-o"])
            .arg(format!("data_file={}", target.display()))
            .args(["-b", spec.source_uri, "-F", "raw"])
            .arg(&overlay)
            .arg(spec.size.to_string()),
        "qemu-img create",
    )?;
    let mut cmd = Command::new("qemu-storage-daemon");
    cmd.arg("--blockdev")
        .arg(format!(
            "driver=qcow2,node-name=fmt,file.driver=file,file.filename={}",
            overlay.display()
        ))
        .args(["--blockdev", "driver=copy-on-read,node-name=cor,file=fmt"])
        .arg("--nbd-server")
        .arg(format!("addr.type=unix,addr.path={}", sock.display()))
        .args([
            "--export",
            "type=nbd,id=exp0,node-name=cor,name=vol,writable=on",
        ])
        .arg("--chardev")
        .arg(format!(
            "socket,id=qmp,path={},server=on,wait=off",
            qmp_sock.display()
        ))
        .args(["--monitor", "chardev=qmp"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(File::create(log)?);
    let mut g = ChildGuard::spawn("qemu-storage-daemon", &mut cmd)?;
    let uri = format!("nbd+unix:///vol?socket={}", sock.display());
    wait_until_served(&mut g, &uri, spec.size, log)?;
    let mut qmp = Qmp::connect(&qmp_sock, Duration::from_secs(10))?;
    if spec.hydrate {
        qmp.execute(
            "block-stream",
            serde_json::json!({"job-id": "hydrate", "device": "fmt"}),
        )?;
    }
    Ok((
        uri,
        Running::Qsd {
            guard: g,
            qmp,
            job: spec.hydrate,
        },
    ))
}

/// Run a short command to completion (30 s bound), failing with its log.
fn run_quiet(cmd: &mut Command, what: &str) -> io::Result<()> {
    let out = cmd.stdin(Stdio::null()).output()?;
    if !out.status.success() {
        return Err(io::Error::other(format!(
            "{what} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

/// `nbdcopy SRC DEST` into a fresh sparse file of `size` bytes (as the
/// other peers' targets start): the wall time and nbdcopy's usage (sampled
/// every 50 ms until it exits, so the last few ms of CPU may be missed).
pub fn nbdcopy(
    src: &str,
    dest: &Path,
    size: u64,
    timeout: Duration,
) -> io::Result<(Duration, Usage)> {
    nbdcopy_with(src, dest, size, timeout, false)
}

/// [`nbdcopy`], with `--flush` when `durable`: the copy is on the device,
/// not only in the page cache, when it exits (as a hydrated chunk is).
pub fn nbdcopy_with(
    src: &str,
    dest: &Path,
    size: u64,
    timeout: Duration,
    durable: bool,
) -> io::Result<(Duration, Usage)> {
    let _ = fs::remove_file(dest);
    File::create(dest)?.set_len(size)?;
    let mut cmd = Command::new("nbdcopy");
    if durable {
        cmd.arg("--flush");
    }
    cmd.arg(src)
        .arg(dest)
        .stdin(Stdio::null())
        .stdout(Stdio::null());
    let t0 = Instant::now();
    let mut g = ChildGuard::spawn("nbdcopy", &mut cmd)?;
    let pid = g.pid();
    let (stop, rss, cpu_ns) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
    );
    let sampler = {
        let (stop, rss, cpu_ns) = (stop.clone(), rss.clone(), cpu_ns.clone());
        thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let u = usage_of(pid);
                if u.peak_rss_kib > 0 {
                    rss.fetch_max(u.peak_rss_kib, Ordering::Relaxed);
                    cpu_ns.fetch_max(u.cpu.as_nanos() as u64, Ordering::Relaxed);
                }
                thread::sleep(POLL);
            }
        })
    };
    let status = g.wait_timeout(timeout);
    let took = t0.elapsed();
    stop.store(true, Ordering::Relaxed);
    let _ = sampler.join();
    let status =
        status?.ok_or_else(|| io::Error::other(format!("nbdcopy ran past {timeout:?}")))?;
    if !status.success() {
        return Err(io::Error::other(format!("nbdcopy {src} failed: {status}")));
    }
    Ok((
        took,
        Usage {
            peak_rss_kib: rss.load(Ordering::Relaxed),
            cpu: Duration::from_nanos(cpu_ns.load(Ordering::Relaxed)),
        },
    ))
}
