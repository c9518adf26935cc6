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

use std::fs::File;
use std::io::{self, BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::mpsc;
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
    for f in [spec.kernel, spec.initrd] {
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
        .arg(spec.kernel)
        .arg("-initrd")
        .arg(spec.initrd)
        .args(["-append", "console=ttyS0 quiet panic=-1"])
        .arg("-drive")
        .arg(format!(
            "file={},format=raw,if=virtio,readonly=on",
            spec.disk
        ));
    Ok(cmd)
}

/// Boot once; an error if the guest reports a failure, qemu exits without
/// the marker, or `spec.timeout` passes first (qemu is then killed).
pub fn boot_once(spec: &BootSpec) -> io::Result<BootResult> {
    let mut cmd = qemu_command(spec)?;
    let stderr_log = spec.log.with_extension("stderr");
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(File::create(&stderr_log)?);
    let mut console = File::create(&spec.log)?;
    let started = Instant::now();
    let mut guard = ChildGuard::spawn("qemu-system-x86_64", &mut cmd)?;
    let stdout = guard.child_mut().stdout.take().expect("stdout is piped");
    let (tx, rx) = mpsc::channel::<(Instant, String)>();
    // Ends at EOF, i.e. when qemu exits; stamps each line on arrival.
    thread::spawn(move || {
        let mut r = BufReader::new(stdout);
        let mut buf = Vec::new();
        loop {
            buf.clear();
            match r.read_until(b'\n', &mut buf) {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    let at = Instant::now();
                    let line = String::from_utf8_lossy(&buf).trim_end().to_string();
                    if tx.send((at, line)).is_err() {
                        break;
                    }
                }
            }
        }
    });
    let deadline = started + spec.timeout;
    let fail = |what: String| {
        io::Error::other(format!(
            "boot from {}: {what}; console in {}, qemu's stderr in {}",
            spec.disk,
            spec.log.display(),
            stderr_log.display()
        ))
    };
    let (at, marker_line) = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok((at, line)) => {
                writeln!(console, "{line}")?;
                if line.contains(MARKER) {
                    break (at, line);
                }
                if line.contains(FAIL_MARKER) {
                    return Err(fail(format!("the guest failed: {line}")));
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                return Err(fail(format!("no {MARKER} within {:?}", spec.timeout)));
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                let status = guard.wait_timeout(Duration::from_secs(5))?;
                return Err(fail(format!("qemu exited ({status:?}) before {MARKER}")));
            }
        }
    };
    let exit = match guard.wait_timeout(POWEROFF_TIMEOUT)? {
        Some(s) => s,
        None => {
            return Err(fail(format!(
                "qemu still running {POWEROFF_TIMEOUT:?} after {MARKER}"
            )));
        }
    };
    let to_exit = started.elapsed();
    // The rest of the console (the poweroff lines), for the log.
    while let Ok((_, line)) = rx.try_recv() {
        writeln!(console, "{line}")?;
    }
    Ok(BootResult {
        to_marker: at.duration_since(started),
        marker_line,
        to_exit,
        exit,
    })
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
