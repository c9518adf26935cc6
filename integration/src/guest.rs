//! A real guest for the live tests: the boot fixture of
//! `vendor-fixtures/boot` (the Debian cloud kernel, a busybox initramfs,
//! an ext4 root) under qemu-system-x86_64 with TCG, its disk a raw node
//! over an NBD node on the export (or over a file), QMP on a unix socket,
//! and its serial console on qemu's stdin and stdout.
//!
//! A reader thread collects the console's lines (and copies them to a
//! log), so a test waits for a line with a deadline instead of sleeping.
//! qemu is killed by its PID and reaped on drop.

use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use crate::{binary, tool};

/// The fixture's files.
pub struct BootImage {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub disk: PathBuf,
}

/// Build the fixture into `target/boot-image` (the script only prints its
/// manifest when the pinned image is there already), one test at a time.
pub fn boot_image() -> BootImage {
    let root = binary::workspace_root();
    let out = root.join("target/boot-image");
    std::fs::create_dir_all(&out).expect("create target/boot-image");
    let lock = File::create(root.join("target/boot-image.lock")).expect("create the build lock");
    // SAFETY: flock on a descriptor we own; released when `lock` closes.
    let rc = unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) };
    assert_eq!(rc, 0, "flock target/boot-image.lock");
    let script = root.join("vendor-fixtures/boot/build-image");
    tool::run_ok(Command::new(&script).arg(&out), Duration::from_secs(600));
    BootImage {
        kernel: out.join("vmlinuz"),
        initrd: out.join("initrd.img"),
        disk: out.join("disk.img"),
    }
}

/// Where the guest's disk comes from.
pub enum Disk<'a> {
    /// An NBD export on a unix socket; requests wait up to 60 s for a
    /// server that went away to come back (`reconnect-delay`).
    Nbd(&'a Path),
    /// A raw file or block device.
    File(&'a Path),
}

pub struct Guest {
    child: Option<Child>,
    stdin: ChildStdin,
    console: Arc<(Mutex<Vec<String>>, Condvar)>,
    log: PathBuf,
}

impl Guest {
    /// Boot `image` with `disk` as `vda` (node `disk0` over node
    /// `disk0-file`), running `init` from the disk (`stream.init=`), QMP on
    /// `qmp`, the console copied to `log`.
    pub fn start(image: &BootImage, disk: Disk, qmp: &Path, init: &str, log: &Path) -> Guest {
        let qemu = tool::require_tool("qemu-system-x86_64", "qemu-system-x86");
        let file_node = match disk {
            Disk::Nbd(socket) => serde_json::json!({
                "driver": "nbd", "node-name": "disk0-file",
                "server": {"type": "unix", "path": socket},
                "reconnect-delay": 60,
            }),
            Disk::File(path) => serde_json::json!({
                "driver": "file", "node-name": "disk0-file", "filename": path,
            }),
        };
        let mut child = Command::new(qemu)
            .args(["-machine", "q35,accel=tcg", "-m", "512", "-nodefaults"])
            .args(["-no-user-config", "-display", "none", "-serial", "stdio"])
            .arg("-no-reboot")
            .arg("-kernel")
            .arg(&image.kernel)
            .arg("-initrd")
            .arg(&image.initrd)
            .arg("-append")
            .arg(format!("console=ttyS0 panic=-1 stream.init={init}"))
            .arg("-blockdev")
            .arg(file_node.to_string())
            .args([
                "-blockdev",
                r#"{"driver":"raw","node-name":"disk0","file":"disk0-file"}"#,
            ])
            .args(["-device", "virtio-blk-pci,drive=disk0,id=vda"])
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", qmp.display()))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(File::create(log.with_extension("stderr")).expect("create the qemu log"))
            .spawn()
            .expect("start qemu-system-x86_64");
        let stdin = child.stdin.take().expect("piped stdin");
        let stdout = child.stdout.take().expect("piped stdout");
        let console = Arc::new((Mutex::new(Vec::new()), Condvar::new()));
        let lines = console.clone();
        let mut copy = File::create(log).expect("create the console log");
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let _ = writeln!(copy, "{line}");
                lines.0.lock().expect("poisoned").push(line);
                lines.1.notify_all();
            }
        });
        Guest {
            child: Some(child),
            stdin,
            console,
            log: log.to_path_buf(),
        }
    }

    /// The first console line (from the start) for which `pred` holds,
    /// waiting up to `timeout`; panics with the console's end otherwise.
    pub fn wait_line(&self, what: &str, timeout: Duration, pred: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + timeout;
        let (lines, cv) = &*self.console;
        let mut seen = lines.lock().expect("poisoned");
        loop {
            if let Some(l) = seen.iter().find(|l| pred(l)) {
                return l.clone();
            }
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "the guest did not print {what} within {timeout:?}; its console ends with:\n{}",
                tail(&seen)
            );
            seen = cv.wait_timeout(seen, left).expect("poisoned").0;
        }
    }

    /// Every console line so far.
    pub fn lines(&self) -> Vec<String> {
        self.console.0.lock().expect("poisoned").clone()
    }

    /// Type a line on the console.
    pub fn send_line(&mut self, line: &str) {
        writeln!(self.stdin, "{line}").expect("write to the guest's console");
        self.stdin.flush().expect("flush the guest's console");
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// Wait for qemu to exit (the guest powered off).
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let mut child = self.child.take().expect("running");
        tool::wait_deadline(&mut child, timeout).unwrap_or_else(|| {
            panic!(
                "qemu did not exit within {timeout:?}; console in {}:\n{}",
                self.log.display(),
                tail(&self.lines())
            )
        })
    }
}

fn tail(lines: &[String]) -> String {
    lines[lines.len().saturating_sub(30)..].join("\n")
}

impl Drop for Guest {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = tool::wait_deadline(&mut child, Duration::from_secs(10));
        }
    }
}
