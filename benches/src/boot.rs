//! Time to boot a real OS from an NBD export.
//!
//! The disk is the small Debian image `vendor-fixtures/boot/build-image`
//! builds (the cloud kernel, a busybox initramfs that loads virtio_blk, and
//! an ext4 root whose `/sbin/init` reads ~14 MiB and prints
//! [`MARKER`]). [`build_image`] runs that script (it caches) and returns
//! where the files are and the manifest it printed (package versions and
//! checksums).
//!
//! [`boot_once`] boots it with qemu-system-x86_64 under TCG, by direct
//! kernel boot, with the export as a read-only virtio disk. The serial
//! console is qemu's stdout; a reader thread stamps each line as it
//! arrives and copies it to a log, so the time to the marker is measured
//! from the qemu process start to the line itself, with no polling. The
//! guest powers off after the marker (`-no-reboot` makes a panic exit
//! too), and qemu's exit is waited for with a bound.
//!
//! The same pieces serve `detach_bench` (issue 15): [`Lines`] is the
//! stamping reader (also used there on `stream detach`'s stderr),
//! [`Guest`] a running qemu whose console can be waited on and typed
//! into, and [`guest_command`] the machine with its disk as a raw node
//! over an NBD or file node and QMP, the shape `stream detach` switches.

use std::fs::File;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{ChildStdin, Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use test_support::child::ChildGuard;

/// The line the image's `/sbin/init` prints on the console once booted.
pub const MARKER: &str = "STREAM-BOOT-OK";
/// The line the image prints when its boot fails (then it powers off).
pub const FAIL_MARKER: &str = "STREAM-BOOT-FAIL";
/// How long qemu gets to exit after the marker (the guest powers off).
const POWEROFF_TIMEOUT: Duration = Duration::from_secs(30);
const BUILD_TIMEOUT: Duration = Duration::from_secs(600);

/// The built image: kernel, initramfs, the disk to serve, and the
/// manifest (pinned package versions, sha256 of each file).
pub struct BootImage {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub disk: PathBuf,
    pub manifest: String,
}

/// Run `vendor-fixtures/boot/build-image OUTDIR` of the repository at
/// `repo` (it only prints its manifest when the image is already there).
pub fn build_image(repo: &Path, out: &Path) -> io::Result<BootImage> {
    let script = repo.join("vendor-fixtures/boot/build-image");
    if !script.is_file() {
        return Err(io::Error::other(format!(
            "{} not found: pass the repository root",
            script.display()
        )));
    }
    std::fs::create_dir_all(out)?;
    let manifest_path = out.join("manifest.txt");
    let log = out.join("build.log");
    let mut cmd = Command::new(&script);
    cmd.arg(out)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(File::create(&log)?);
    let mut guard = ChildGuard::spawn("build-image", &mut cmd)?;
    match guard.wait_timeout(BUILD_TIMEOUT)? {
        Some(s) if s.success() => {}
        Some(s) => {
            return Err(io::Error::other(format!(
                "{} failed ({s}); see {}",
                script.display(),
                log.display()
            )));
        }
        None => {
            return Err(io::Error::other(format!(
                "{} took over {BUILD_TIMEOUT:?}; see {}",
                script.display(),
                log.display()
            )));
        }
    }
    let image = BootImage {
        kernel: out.join("vmlinuz"),
        initrd: out.join("initrd.img"),
        disk: out.join("disk.img"),
        manifest: std::fs::read_to_string(&manifest_path)?,
    };
    for f in [&image.kernel, &image.initrd, &image.disk] {
        if !f.is_file() {
            return Err(io::Error::other(format!(
                "build-image left no {}; see {}",
                f.display(),
                log.display()
            )));
        }
    }
    Ok(image)
}

/// One boot to run.
pub struct BootSpec<'a> {
    /// NBD URI of the export to boot from, e.g. `nbd+unix:///?socket=S`
    /// (qemu's `-drive file=` syntax: no commas).
    pub disk: &'a str,
    pub kernel: &'a Path,
    pub initrd: &'a Path,
    /// The whole boot, qemu start to the marker.
    pub timeout: Duration,
    /// Where the serial console (and qemu's stderr, beside it with
    /// `.stderr`) is copied.
    pub log: PathBuf,
}

/// What one boot measured.
#[derive(Debug)]
pub struct BootResult {
    /// From the qemu process start to the marker line.
    pub to_marker: Duration,
    /// The marker line as printed (it carries what the guest read).
    pub marker_line: String,
    /// From the qemu process start to its exit after the poweroff.
    pub to_exit: Duration,
    pub exit: ExitStatus,
}

impl BootResult {
    pub fn seconds_to_marker(&self) -> f64 {
        self.to_marker.as_secs_f64()
    }
}

/// The qemu command line for `spec`: q35 under TCG, 512 MiB, no default
/// devices, serial console on stdout, the export as a read-only virtio
/// disk, direct kernel boot.
pub fn qemu_command(spec: &BootSpec) -> io::Result<Command> {
    if spec.disk.contains(',') {
        return Err(io::Error::other(format!(
            "NBD URI {} has a comma, which qemu's -drive option cannot take",
            spec.disk
        )));
    }
    let mut cmd = machine_command(spec.kernel, spec.initrd, "console=ttyS0 quiet panic=-1")?;
    cmd.arg("-drive").arg(format!(
        "file={},format=raw,if=virtio,readonly=on",
        spec.disk
    ));
    Ok(cmd)
}

/// The machine every boot here uses, without a disk: q35 under TCG,
/// 512 MiB, no default devices, serial console on stdio, no reboot (a
/// poweroff or panic ends qemu), direct kernel boot with `append`.
fn machine_command(kernel: &Path, initrd: &Path, append: &str) -> io::Result<Command> {
    for f in [kernel, initrd] {
        if !f.is_file() {
            return Err(io::Error::other(format!(
                "{} not found: run vendor-fixtures/boot/build-image",
                f.display()
            )));
        }
    }
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args(["-machine", "q35,accel=tcg", "-m", "512"])
        .args(["-nodefaults", "-no-user-config", "-display", "none"])
        .args(["-serial", "stdio", "-no-reboot"])
        .arg("-kernel")
        .arg(kernel)
        .arg("-initrd")
        .arg(initrd)
        .args(["-append", append]);
    Ok(cmd)
}

/// Boot once; an error if the guest reports a failure, qemu exits without
/// the marker, or `spec.timeout` passes first (qemu is then killed).
pub fn boot_once(spec: &BootSpec) -> io::Result<BootResult> {
    let mut guest = Guest::spawn(qemu_command(spec)?, &spec.log, false)?;
    let booting = |e: io::Error| io::Error::other(format!("boot from {}: {e}", spec.disk));
    let (_, at, marker_line) = guest
        .wait_line(MARKER, spec.timeout, |l| {
            l.contains(MARKER) || l.contains(FAIL_MARKER)
        })
        .map_err(booting)?;
    if marker_line.contains(FAIL_MARKER) {
        return Err(booting(
            guest.fail(&format!("the guest failed: {marker_line}")),
        ));
    }
    let (exited, exit) = guest.wait_exit(POWEROFF_TIMEOUT).map_err(booting)?;
    Ok(BootResult {
        to_marker: at.duration_since(guest.started),
        marker_line,
        to_exit: exited.duration_since(guest.started),
        exit,
    })
}

/// Where a [`Guest`]'s disk comes from. Either way it is `vda`: a raw
/// format node `disk0` over a protocol node `disk0-file`, read-write, as
/// `integration/src/guest.rs` (the live-detach test) builds it, so `stream
/// detach --device vda` can switch it.
pub enum GuestDisk<'a> {
    /// `stream start`'s export on this unix socket; a request waits up to
    /// 60 s for a server that went away (`reconnect-delay`).
    Nbd(&'a Path),
    /// A raw file: the native disk after a migration.
    File(&'a Path),
}

/// A guest for the live-detach and cutover benchmarks.
pub struct GuestSpec<'a> {
    pub kernel: &'a Path,
    pub initrd: &'a Path,
    pub disk: GuestDisk<'a>,
    /// `stream.init=` (e.g. `/sbin/writer`); `None` runs `/sbin/init`.
    pub init: Option<&'a str>,
    /// QMP on this unix socket (`server=on,wait=off`).
    pub qmp: Option<&'a Path>,
}

/// The qemu command line for `spec`: the machine of [`qemu_command`], the
/// disk by `-blockdev` (see [`GuestDisk`]).
pub fn guest_command(spec: &GuestSpec) -> io::Result<Command> {
    let file_node = match spec.disk {
        GuestDisk::Nbd(socket) => serde_json::json!({
            "driver": "nbd", "node-name": "disk0-file",
            "server": {"type": "unix", "path": socket},
            "reconnect-delay": 60,
        }),
        GuestDisk::File(path) => serde_json::json!({
            "driver": "file", "node-name": "disk0-file", "filename": path,
        }),
    };
    let mut append = String::from("console=ttyS0 quiet panic=-1");
    if let Some(init) = spec.init {
        append.push_str(&format!(" stream.init={init}"));
    }
    let mut cmd = machine_command(spec.kernel, spec.initrd, &append)?;
    cmd.arg("-blockdev")
        .arg(file_node.to_string())
        .args([
            "-blockdev",
            r#"{"driver":"raw","node-name":"disk0","file":"disk0-file"}"#,
        ])
        .args(["-device", "virtio-blk-pci,drive=disk0,id=vda"]);
    if let Some(qmp) = spec.qmp {
        cmd.arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", qmp.display()));
    }
    Ok(cmd)
}

/// Lines a child prints, each stamped by a reader thread the moment it
/// arrives and copied to a log, so a caller waits for a line with a
/// deadline (no polling, no sleeps) and later reads when each came.
#[derive(Clone)]
pub struct Lines(Arc<(Mutex<Seen>, Condvar)>);

#[derive(Default)]
struct Seen {
    lines: Vec<(Instant, String)>,
    /// The stream ended (for qemu's console: qemu exited).
    eof: bool,
}

impl Lines {
    /// Start reading `from` until its end.
    pub fn read(from: impl Read + Send + 'static, mut log: File) -> Lines {
        let lines = Lines(Arc::default());
        let shared = lines.0.clone();
        thread::spawn(move || {
            let mut r = BufReader::new(from);
            let mut buf = Vec::new();
            loop {
                buf.clear();
                let done = !matches!(r.read_until(b'\n', &mut buf), Ok(n) if n > 0);
                let at = Instant::now();
                let mut seen = shared.0.lock().unwrap_or_else(|e| e.into_inner());
                if done {
                    seen.eof = true;
                } else {
                    let line = String::from_utf8_lossy(&buf).trim_end().to_string();
                    let _ = writeln!(log, "{line}");
                    seen.lines.push((at, line));
                }
                shared.1.notify_all();
                if done {
                    break;
                }
            }
        });
        lines
    }

    /// Every line so far, with its arrival.
    pub fn snapshot(&self) -> Vec<(Instant, String)> {
        self.0
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .lines
            .clone()
    }

    /// The first line (index, arrival, text) for which `pred` holds, from
    /// the start, waiting until `deadline`. `UnexpectedEof` if the stream
    /// ended without one, `TimedOut` if the deadline passed.
    pub fn wait(
        &self,
        deadline: Instant,
        pred: impl Fn(&str) -> bool,
    ) -> io::Result<(usize, Instant, String)> {
        let (lock, cv) = &*self.0;
        let mut seen = lock.lock().unwrap_or_else(|e| e.into_inner());
        let mut from = 0;
        loop {
            if let Some(i) = seen.lines[from..].iter().position(|(_, l)| pred(l)) {
                let (at, line) = seen.lines[from + i].clone();
                return Ok((from + i, at, line));
            }
            from = seen.lines.len();
            if seen.eof {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(io::ErrorKind::TimedOut.into());
            }
            seen = cv
                .wait_timeout(seen, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}

/// A running qemu whose serial console is its stdout (read into [`Lines`],
/// copied to a log) and, optionally, its stdin. Stopped by PID and reaped
/// when dropped.
pub struct Guest {
    guard: ChildGuard,
    stdin: Option<ChildStdin>,
    pub console: Lines,
    /// Just before the spawn: boot times count from here.
    pub started: Instant,
    log: PathBuf,
}

impl Guest {
    /// Spawn `cmd`, the console copied to `log` and qemu's stderr to `log`
    /// with the extension `.stderr`; `stdin` keeps the console's input
    /// open for [`Guest::send_line`].
    pub fn spawn(mut cmd: Command, log: &Path, stdin: bool) -> io::Result<Guest> {
        cmd.stdin(if stdin { Stdio::piped() } else { Stdio::null() })
            .stdout(Stdio::piped())
            .stderr(File::create(log.with_extension("stderr"))?);
        let copy = File::create(log)?;
        let started = Instant::now();
        let mut guard = ChildGuard::spawn("qemu-system-x86_64", &mut cmd)?;
        let stdout = guard.child_mut().stdout.take().expect("stdout is piped");
        let stdin = guard.child_mut().stdin.take();
        Ok(Guest {
            guard,
            stdin,
            console: Lines::read(stdout, copy),
            started,
            log: log.to_path_buf(),
        })
    }

    /// [`Lines::wait`] within `timeout`, the error naming `what` and the
    /// logs.
    pub fn wait_line(
        &self,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&str) -> bool,
    ) -> io::Result<(usize, Instant, String)> {
        self.console
            .wait(Instant::now() + timeout, pred)
            .map_err(|e| match e.kind() {
                io::ErrorKind::UnexpectedEof => self.fail(&format!("qemu exited before {what}")),
                io::ErrorKind::TimedOut => self.fail(&format!("no {what} within {timeout:?}")),
                _ => e,
            })
    }

    /// Type a line on the console.
    pub fn send_line(&mut self, line: &str) -> io::Result<()> {
        let stdin = self
            .stdin
            .as_mut()
            .ok_or_else(|| io::Error::other("the guest was started without console input"))?;
        writeln!(stdin, "{line}")?;
        stdin.flush()
    }

    /// Wait (bounded) for qemu to exit, e.g. after the guest powered off;
    /// returns when the exit was seen (within the 5 ms the wait polls).
    pub fn wait_exit(&mut self, timeout: Duration) -> io::Result<(Instant, ExitStatus)> {
        match self.guard.wait_timeout(timeout)? {
            Some(status) => Ok((Instant::now(), status)),
            None => Err(self.fail(&format!("qemu still running after {timeout:?}"))),
        }
    }

    /// An error naming the console log and qemu's stderr log.
    pub fn fail(&self, what: &str) -> io::Error {
        io::Error::other(format!(
            "{what}; console in {}, qemu's stderr in {}",
            self.log.display(),
            self.log.with_extension("stderr").display()
        ))
    }
}

/// `read: N ops, T s, X UNIT, ...` of nbdkit's stats filter file: the
/// read ops and bytes (to the 0.01 of the unit nbdkit prints).
pub fn parse_nbdkit_stats_reads(text: &str) -> Option<(u64, u64)> {
    let line = text.lines().find_map(|l| l.trim().strip_prefix("read:"))?;
    let mut parts = line.split(',').map(str::trim);
    let ops = parts.next()?.strip_suffix(" ops")?.parse().ok()?;
    let _time = parts.next()?;
    let (num, unit) = parts.next()?.split_once(' ')?;
    let num: f64 = num.parse().ok()?;
    let scale: u64 = match unit {
        "bytes" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "TiB" => 1 << 40,
        _ => return None,
    };
    Some((ops, (num * scale as f64).round() as u64))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_reads_are_parsed_with_their_unit() {
        let text = "total: 771 ops, 8.344594 s, 16.45 MiB, 1.97 MiB/s\n\
                    read: 771 ops, 0.893697 s, 16.45 MiB, 18.40 MiB/s op, 1.97 MiB/s total\n";
        let (ops, bytes) = parse_nbdkit_stats_reads(text).unwrap();
        assert_eq!(ops, 771);
        assert_eq!(bytes, (16.45 * 1048576.0_f64).round() as u64);
        assert_eq!(
            parse_nbdkit_stats_reads("read: 3 ops, 0.1 s, 512 bytes, 1 MiB/s\n"),
            Some((3, 512))
        );
        assert_eq!(parse_nbdkit_stats_reads("total: 0 ops\n"), None);
    }

    #[test]
    fn a_uri_with_a_comma_is_refused_before_qemu_starts() {
        let spec = BootSpec {
            disk: "nbd+unix:///?socket=/tmp/a,b",
            kernel: Path::new("/nonexistent"),
            initrd: Path::new("/nonexistent"),
            timeout: Duration::from_secs(1),
            log: PathBuf::from("/tmp/unused"),
        };
        let e = qemu_command(&spec).err().unwrap();
        assert!(e.to_string().contains("comma"), "{e}");
    }
}
