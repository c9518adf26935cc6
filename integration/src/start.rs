//! `stream start` as a child process, and `stream status` to watch it.
//!
//! A [`Start`] is a command line that can be spawned again and again with
//! the same arguments (resume after a clean stop or a crash): its unix
//! socket, state directory and log live in a directory the test owns, and
//! every run appends its stderr to the same log, behind a banner, so a
//! failure shows the whole history of the migration.
//!
//! Readiness is the URI line on stdout, awaited with a deadline; progress
//! is `stream status --json`, polled with a deadline ([`Running::wait_for`]).
//! A [`Running`] is killed by PID and reaped on drop; when the test is
//! panicking it prints the log tail.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use crate::server::{Addr, READY_TIMEOUT, parse_uri, read_uri_line};
use crate::tool::{self, Output};
use crate::{binary, wire};

/// How long a status query may take.
const STATUS_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Listen {
    Tcp,
    Unix,
}

/// A `stream start` command line.
#[derive(Clone, Debug)]
pub struct Start {
    source: String,
    target: PathBuf,
    state: PathBuf,
    dir: PathBuf,
    listen: Listen,
    socket: PathBuf,
    chunk_size: Option<String>,
    name: Option<String>,
    rate_limit: Option<String>,
    no_hydrate: bool,
    extra: Vec<String>,
}

impl Start {
    /// `stream start --source SOURCE --target TARGET --state DIR/state
    /// --socket DIR/nbd.sock`; the log goes to `DIR/start.log`.
    pub fn new(
        source: impl AsRef<std::ffi::OsStr>,
        target: impl Into<PathBuf>,
        dir: &Path,
    ) -> Self {
        Start {
            source: source.as_ref().to_string_lossy().into_owned(),
            target: target.into(),
            state: dir.join("state"),
            dir: dir.to_path_buf(),
            listen: Listen::Unix,
            socket: dir.join("nbd.sock"),
            chunk_size: None,
            name: None,
            rate_limit: None,
            no_hydrate: false,
            extra: Vec::new(),
        }
    }

    /// More arguments, appended as given (e.g. `--mount DIR`).
    pub fn args(mut self, args: &[&str]) -> Self {
        self.extra.extend(args.iter().map(|a| a.to_string()));
        self
    }

    pub fn state(mut self, dir: impl Into<PathBuf>) -> Self {
        self.state = dir.into();
        self
    }

    pub fn source(mut self, source: impl AsRef<std::ffi::OsStr>) -> Self {
        self.source = source.as_ref().to_string_lossy().into_owned();
        self
    }

    pub fn target(mut self, target: impl Into<PathBuf>) -> Self {
        self.target = target.into();
        self
    }

    /// Serve on this unix socket (the default is `DIR/nbd.sock`).
    pub fn socket(mut self, path: impl Into<PathBuf>) -> Self {
        self.listen = Listen::Unix;
        self.socket = path.into();
        self
    }

    /// `--listen 127.0.0.1:0` instead of a unix socket.
    pub fn tcp(mut self) -> Self {
        self.listen = Listen::Tcp;
        self
    }

    pub fn chunk_size(mut self, size: &str) -> Self {
        self.chunk_size = Some(size.to_owned());
        self
    }

    pub fn name(mut self, name: &str) -> Self {
        self.name = Some(name.to_owned());
        self
    }

    /// `--rate-limit SIZE`; `None` removes it.
    pub fn rate_limit(mut self, rate: Option<&str>) -> Self {
        self.rate_limit = rate.map(str::to_owned);
        self
    }

    pub fn no_hydrate(mut self, yes: bool) -> Self {
        self.no_hydrate = yes;
        self
    }

    pub fn state_dir(&self) -> &Path {
        &self.state
    }

    pub fn target_path(&self) -> &Path {
        &self.target
    }

    /// The shared stderr log of every run of this command line.
    pub fn log_path(&self) -> PathBuf {
        self.dir.join("start.log")
    }

    /// The command line, ready to spawn.
    pub fn command(&self) -> Command {
        let mut cmd = Command::new(binary::stream_bin());
        cmd.arg("start")
            .arg("--source")
            .arg(&self.source)
            .arg("--target")
            .arg(&self.target)
            .arg("--state")
            .arg(&self.state);
        match self.listen {
            Listen::Tcp => cmd.args(["--listen", "127.0.0.1:0"]),
            Listen::Unix => cmd.arg("--socket").arg(&self.socket),
        };
        if let Some(cs) = &self.chunk_size {
            cmd.args(["--chunk-size", cs]);
        }
        if let Some(name) = &self.name {
            cmd.args(["--name", name]);
        }
        if let Some(rate) = &self.rate_limit {
            cmd.args(["--rate-limit", rate]);
        }
        if self.no_hydrate {
            cmd.arg("--no-hydrate");
        }
        cmd.args(&self.extra);
        if std::env::var_os("RUST_LOG").is_none() {
            cmd.env("RUST_LOG", "info");
        }
        cmd
    }

    fn open_log(&self, banner: &str) -> File {
        let mut log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("start log file");
        writeln!(log, "===== {banner} =====").expect("write log banner");
        log
    }

    /// Starts and waits for the URI line; `Err` carries the exit status
    /// (when it exited) and the log, for tests that expect a refusal.
    pub fn try_spawn(&self) -> Result<Running, String> {
        let log = self.open_log(&format!("{:?}", self.command()));
        let mut child = self
            .command()
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", binary::stream_bin().display()));
        let uri = read_uri_line(&mut child, READY_TIMEOUT);
        let mut running = Running {
            child: Some(child),
            uri: String::new(),
            addr: Addr::Unix(PathBuf::new()),
            start: self.clone(),
        };
        let uri = match uri {
            Ok(uri) => uri,
            Err(why) => {
                // Reap it (killing it if it still runs) before reporting.
                let status = running
                    .child
                    .take()
                    .and_then(|mut c| tool::wait_deadline(&mut c, Duration::from_secs(10)));
                return Err(format!(
                    "stream start did not get ready: {why} (status {status:?})\n{}",
                    running.log()
                ));
            }
        };
        let Some((addr, _name)) = parse_uri(&uri) else {
            return Err(format!(
                "stream start printed {uri:?}, not an NBD URI\n{}",
                running.log()
            ));
        };
        if self.listen == Listen::Unix {
            assert_eq!(
                addr,
                Addr::Unix(self.socket.clone()),
                "URI {uri} names another socket than --socket"
            );
        }
        running.uri = uri;
        running.addr = addr;
        Ok(running)
    }

    /// Starts and waits for the URI line; panics with the log otherwise.
    pub fn spawn(&self) -> Running {
        self.try_spawn().unwrap_or_else(|why| panic!("{why}"))
    }

    /// Runs a `stream start` that must be refused: asserts a non-zero exit
    /// within the deadline and without a URI, and returns its output.
    pub fn refused(&self) -> Output {
        let _ = self.open_log("expecting a refusal");
        let out = tool::run(&mut self.command(), Duration::from_secs(30));
        assert!(
            !out.status.success() && out.stdout.is_empty(),
            "stream start was expected to refuse, but: {}",
            out.describe()
        );
        out
    }
}

/// A running `stream start`; killed (SIGKILL) and reaped on drop.
pub struct Running {
    child: Option<Child>,
    /// The URI it printed.
    pub uri: String,
    pub addr: Addr,
    start: Start,
}

impl Running {
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("stream start running").id()
    }

    /// A raw protocol connection (greeting not yet read).
    pub fn connect(&self) -> wire::Conn {
        wire::Conn::connect(&self.addr)
            .unwrap_or_else(|e| panic!("connect to {}: {e}\n{}", self.uri, self.log()))
    }

    /// A connection negotiated to the transmission phase of the export.
    pub fn open(&self) -> wire::Conn {
        let mut conn = self.connect();
        let name = parse_uri(&self.uri).map(|(_, n)| n).unwrap_or_default();
        conn.negotiate(&name, true);
        conn
    }

    /// The tail of the shared log, for failure messages.
    pub fn log(&self) -> String {
        log_tail(&self.start.log_path())
    }

    /// `stream status --state DIR --json`, parsed; panics when it fails.
    pub fn status(&self) -> serde_json::Value {
        let out = status_json(self.start.state_dir());
        assert!(out.status.success(), "{}\n{}", out.describe(), self.log());
        let line = out.stdout_lossy();
        serde_json::from_str(line.trim())
            .unwrap_or_else(|e| panic!("stream status --json printed no JSON ({e}): {line:?}"))
    }

    /// Polls `stream status --json` until `done` holds for it; returns that
    /// status. Panics (with the last status and the log) after `timeout`,
    /// or when the process exits.
    pub fn wait_for(
        &mut self,
        what: &str,
        timeout: Duration,
        done: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let deadline = Instant::now() + timeout;
        loop {
            self.assert_alive();
            let st = self.status();
            if done(&st) {
                return st;
            }
            if Instant::now() >= deadline {
                panic!(
                    "waited {timeout:?} for {what}; last status: {st}\n{}",
                    self.log()
                );
            }
            // Bounds the poll rate only; the condition is what we wait on.
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits until every chunk is present.
    pub fn wait_hydrated(&mut self, timeout: Duration) -> serde_json::Value {
        self.wait_for("hydration to complete", timeout, |st| {
            st["volume"]["hydration_complete"] == true
        })
    }

    /// `None` while it runs; its exit status once it has exited.
    pub fn try_status(&mut self) -> Option<ExitStatus> {
        self.child
            .as_mut()
            .expect("not yet reaped")
            .try_wait()
            .expect("try_wait")
    }

    pub fn assert_alive(&mut self) {
        if let Some(status) = self.try_status() {
            panic!("stream start exited with {status}\n{}", self.log());
        }
    }

    pub fn signal(&self, signal: i32) {
        let pid = self.pid() as libc::pid_t;
        // SAFETY: kill(2) with the PID of our own unreaped child, which
        // cannot have been recycled because we have not waited on it.
        let rc = unsafe { libc::kill(pid, signal) };
        assert_eq!(rc, 0, "kill({pid}, {signal}) failed");
    }

    /// SIGTERM, then waits for a clean exit (status 0) within `timeout`.
    pub fn sigterm_and_wait(self, timeout: Duration) {
        self.signal_and_wait(libc::SIGTERM, timeout)
    }

    /// `signal` (SIGINT or SIGTERM), then waits for a clean exit within
    /// `timeout`.
    pub fn signal_and_wait(mut self, signal: i32, timeout: Duration) {
        self.signal(signal);
        let mut child = self.child.take().expect("running");
        match tool::wait_deadline(&mut child, timeout) {
            Some(status) if status.success() => {}
            Some(status) => panic!(
                "stream start exited with {status} after signal {signal}\n{}",
                self.log()
            ),
            None => panic!(
                "stream start still running {timeout:?} after signal {signal}; killed it\n{}",
                self.log()
            ),
        }
    }

    /// Waits for it to exit by itself (e.g. after handing the volume over
    /// to `stream finalize`) within `timeout`; returns the exit status.
    pub fn wait_exit(mut self, timeout: Duration) -> ExitStatus {
        let mut child = self.child.take().expect("running");
        tool::wait_deadline(&mut child, timeout).unwrap_or_else(|| {
            panic!(
                "stream start still running after {timeout:?}; killed it\n{}",
                self.log()
            )
        })
    }

    /// Reaps it on a thread as soon as it exits (as a shell or systemd
    /// would), killing it after `timeout`; the thread returns its exit
    /// status, `None` when it had to be killed. For a `stream start` that
    /// is to hand over to `stream finalize`: a child nobody reaps stays a
    /// zombie in `/proc`, which `stream finalize` takes for a live process.
    pub fn reap_in_background(
        mut self,
        timeout: Duration,
    ) -> thread::JoinHandle<Option<ExitStatus>> {
        let mut child = self.child.take().expect("running");
        thread::spawn(move || tool::wait_deadline(&mut child, timeout))
    }

    /// SIGKILL and reap: a crash at whatever point it was.
    pub fn kill9(mut self) {
        self.signal(libc::SIGKILL);
        let mut child = self.child.take().expect("running");
        let status = tool::wait_deadline(&mut child, Duration::from_secs(10))
            .expect("a SIGKILLed process is reaped");
        assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&status),
            Some(libc::SIGKILL),
            "stream start ended with {status} before the SIGKILL\n{}",
            self.log()
        );
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            test_support::child::kill_and_reap(&mut child);
        }
        if thread::panicking() {
            eprintln!("{}", self.log());
        }
    }
}

/// `stream status --state DIR --json`, run to completion (any status).
pub fn status_json(state: &Path) -> Output {
    tool::run(
        Command::new(binary::stream_bin())
            .args(["status", "--json", "--state"])
            .arg(state),
        STATUS_TIMEOUT,
    )
}

/// The last 200 lines of a log file, under a heading.
pub fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    let from = lines.len().saturating_sub(200);
    format!(
        "--- {} (last 200 lines) ---\n{}",
        path.display(),
        lines[from..].join("\n")
    )
}

/// A loop device attached to a file (`LoopDevice::attach(file, read_only)`);
/// detached on drop.
pub use test_support::loopdev::LoopDevice;

/// A block device reachable as `/dev/VG/LV` without LVM: a directory
/// `/dev/VG` holding a symlink `LV` to it, as udev makes for a real LV.
/// Both are removed on drop (drop it before the [`LoopDevice`]).
pub struct DevLv {
    pub vg: String,
    pub lv: String,
    /// `/dev/VG/LV`.
    pub path: PathBuf,
}

impl DevLv {
    /// `/dev/VG/LV -> device`; `vg` must not exist yet (use a unique name).
    pub fn create(vg: &str, lv: &str, device: &Path) -> DevLv {
        let dir = Path::new("/dev").join(vg);
        std::fs::create_dir(&dir).unwrap_or_else(|e| panic!("mkdir {}: {e}", dir.display()));
        let path = dir.join(lv);
        let made = DevLv {
            vg: vg.to_owned(),
            lv: lv.to_owned(),
            path: path.clone(),
        };
        std::os::unix::fs::symlink(device, &path)
            .unwrap_or_else(|e| panic!("symlink {} -> {}: {e}", path.display(), device.display()));
        made
    }
}

impl Drop for DevLv {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
        if let Some(dir) = self.path.parent() {
            if let Err(e) = std::fs::remove_dir(dir) {
                eprintln!("removing {}: {e}", dir.display());
            }
        }
    }
}

/// The 16 MiB source of the `stream start` tests, in 64 KiB chunks:
///
/// | range              | content                                         |
/// |--------------------|-------------------------------------------------|
/// | 0 .. 1 MiB+4 KiB   | data (ends inside a chunk)                      |
/// | .. 3 MiB           | hole                                            |
/// | 3 .. 5 MiB         | data                                            |
/// | 5 .. 6 MiB         | allocated zeros (data to `SEEK_DATA`, all zero) |
/// | 6 MiB+12345 ..+300000 | data at unaligned ends                       |
/// | .. 12 MiB          | hole                                            |
/// | 12 .. 13 MiB       | data                                            |
/// | .. 16 MiB          | trailing hole                                   |
pub fn mixed_image(dir: &Path) -> crate::SparseImage {
    use crate::Region;
    use crate::image::{KIB, MIB};
    use std::os::unix::fs::FileExt;
    let img = crate::SparseImage::create(
        dir.join("source.img"),
        16 * MIB,
        &[
            Region::new(0, MIB + 4 * KIB),
            Region::new(3 * MIB, 2 * MIB),
            Region::new(6 * MIB + 12345, 300_000),
            Region::new(12 * MIB, MIB),
        ],
        0x57a7,
    );
    let f = OpenOptions::new()
        .write(true)
        .open(&img.path)
        .expect("open source image");
    f.write_all_at(&vec![0; MIB as usize], 5 * MIB)
        .expect("write the allocated zero region");
    f.sync_all().expect("sync source image");
    img
}

/// Reads `len` bytes at `offset` through an open connection, in reads of
/// at most 1 MiB.
pub fn read_export(conn: &mut wire::Conn, offset: u64, len: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(len as usize);
    let mut at = offset;
    while at < offset + len {
        let n = (offset + len - at).min(1 << 20) as u32;
        out.extend_from_slice(&conn.read_ok(at, n));
        at += u64::from(n);
    }
    out
}

/// One extent of `nbdinfo --map --json`: offset, length, type bits
/// (1 = hole, 2 = zero).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapExtent {
    pub offset: u64,
    pub length: u64,
    pub kind: u32,
}

impl MapExtent {
    pub fn is_zero(&self) -> bool {
        self.kind & 2 != 0
    }
}

/// `nbdinfo --map --json URI` (base:allocation), parsed; the extents must
/// tile the export from 0 without gaps.
pub fn nbdinfo_map(uri: &str) -> Vec<MapExtent> {
    let nbdinfo = tool::require_tool("nbdinfo", "libnbd-bin");
    let out = tool::run_ok(
        Command::new(nbdinfo).args(["--map", "--json", uri]),
        Duration::from_secs(60),
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("nbdinfo --map --json: {e}\n{}", out.describe()));
    let mut at = 0;
    v.as_array()
        .unwrap_or_else(|| panic!("nbdinfo --map --json is no array: {v}"))
        .iter()
        .map(|e| {
            let x = MapExtent {
                offset: e["offset"].as_u64().expect("offset"),
                length: e["length"].as_u64().expect("length"),
                kind: e["type"].as_u64().expect("type") as u32,
            };
            assert_eq!(x.offset, at, "extents do not tile the export: {v}");
            at += x.length;
            x
        })
        .collect()
}

/// Removes, on drop, the registry entries (`stream start` marks a block
/// device target there) that name the state directory `0`, so the test
/// leaves nothing behind in /var/lib/stream/targets, pass or fail.
pub struct ForgetMarker(pub std::path::PathBuf);

impl ForgetMarker {
    pub fn registry() -> std::path::PathBuf {
        std::env::var_os("STREAM_TARGET_REGISTRY")
            .map(std::path::PathBuf::from)
            .unwrap_or_else(|| "/var/lib/stream/targets".into())
    }

    /// The registry entries naming this state directory.
    pub fn entries(&self) -> Vec<std::path::PathBuf> {
        let Ok(state) = std::fs::canonicalize(&self.0) else {
            return Vec::new();
        };
        let Ok(dir) = std::fs::read_dir(Self::registry()) else {
            return Vec::new();
        };
        dir.flatten()
            .map(|e| e.path())
            .filter(|p| {
                std::fs::read(p)
                    .ok()
                    .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
                    .is_some_and(|v| v["state_dir"] == state.display().to_string())
            })
            .collect()
    }
}

impl Drop for ForgetMarker {
    fn drop(&mut self) {
        for p in self.entries() {
            let _ = std::fs::remove_file(p);
        }
    }
}
