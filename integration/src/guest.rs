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
    /// qemu, when started here; `None` for a libvirt domain.
    child: Option<Child>,
    /// The libvirt domain (and its connection URI), destroyed on drop.
    domain: Option<String>,
    input: Box<dyn Write + Send>,
    console: Arc<(Mutex<Vec<String>>, Condvar)>,
    log: PathBuf,
}

/// The console's lines, collected by a thread (and copied to `log`).
fn read_console(
    output: impl std::io::Read + Send + 'static,
    log: &Path,
) -> Arc<(Mutex<Vec<String>>, Condvar)> {
    let console = Arc::new((Mutex::new(Vec::new()), Condvar::new()));
    let lines = console.clone();
    let mut copy = File::create(log).expect("create the console log");
    thread::spawn(move || {
        for line in BufReader::new(output).lines() {
            let Ok(line) = line else { break };
            let _ = writeln!(copy, "{line}");
            lines.0.lock().expect("poisoned").push(line);
            lines.1.notify_all();
        }
    });
    console
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
        let stdin: ChildStdin = child.stdin.take().expect("piped stdin");
        let stdout = child.stdout.take().expect("piped stdout");
        Guest {
            child: Some(child),
            domain: None,
            input: Box::new(stdin),
            console: read_console(stdout, log),
            log: log.to_path_buf(),
        }
    }

    /// Run `xml` as a transient libvirt domain called `name` (`virsh
    /// create`), whose serial console connects to the unix socket
    /// `console` (listened on here before the domain starts, so no line is
    /// lost). The domain is destroyed on drop.
    pub fn libvirt(name: &str, xml: &str, console: &Path, dir: &Path, log: &Path) -> Guest {
        let virsh = tool::require_tool("virsh", "libvirt-clients");
        let listener =
            std::os::unix::net::UnixListener::bind(console).expect("bind the console socket");
        let file = dir.join(format!("{name}.xml"));
        std::fs::write(&file, xml).expect("write the domain XML");
        tool::run_ok(
            Command::new(&virsh)
                .args(["-c", LIBVIRT_URI, "create"])
                .arg(&file),
            Duration::from_secs(120),
        );
        let mut guest = Guest {
            child: None,
            domain: Some(name.to_string()),
            input: Box::new(std::io::sink()),
            console: Arc::default(),
            log: log.to_path_buf(),
        };
        // qemu connects at its start; a domain that never does is reported
        // by the accept's deadline (the socket is non-blocking until then).
        listener
            .set_nonblocking(true)
            .expect("non-blocking console listener");
        let deadline = Instant::now() + Duration::from_secs(60);
        let stream = loop {
            match listener.accept() {
                Ok((s, _)) => break s,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    assert!(
                        Instant::now() < deadline,
                        "domain {name} never opened its console"
                    );
                    thread::sleep(Duration::from_millis(20));
                }
                Err(e) => panic!("accepting the console of {name}: {e}"),
            }
        };
        stream.set_nonblocking(false).expect("blocking console");
        guest.input = Box::new(stream.try_clone().expect("clone the console socket"));
        guest.console = read_console(stream, log);
        guest
    }

    /// Whether the libvirt domain still runs (`virsh domstate`).
    fn domain_running(name: &str) -> bool {
        let out = tool::run(
            Command::new("virsh").args(["-c", LIBVIRT_URI, "domstate", name]),
            Duration::from_secs(30),
        );
        out.status.success() && out.stdout_lossy().trim() == "running"
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
        writeln!(self.input, "{line}").expect("write to the guest's console");
        self.input.flush().expect("flush the guest's console");
    }

    /// Wait for the guest to power off: qemu's exit (`true` if it exited
    /// with success), or the libvirt domain's end (always `true`).
    pub fn wait_exit(&mut self, timeout: Duration) -> bool {
        if let Some(name) = self.domain.clone() {
            let deadline = Instant::now() + timeout;
            while Guest::domain_running(&name) {
                assert!(
                    Instant::now() < deadline,
                    "domain {name} did not power off within {timeout:?}; console:\n{}",
                    tail(&self.lines())
                );
                thread::sleep(Duration::from_millis(100));
            }
            self.domain = None;
            return true;
        }
        let mut child = self.child.take().expect("running");
        let status: ExitStatus = tool::wait_deadline(&mut child, timeout).unwrap_or_else(|| {
            panic!(
                "qemu did not exit within {timeout:?}; console in {}:\n{}",
                self.log.display(),
                tail(&self.lines())
            )
        });
        status.success()
    }
}

/// The libvirt connection the tests use (a root libvirtd's system one).
pub const LIBVIRT_URI: &str = "qemu:///system";

fn tail(lines: &[String]) -> String {
    lines[lines.len().saturating_sub(30)..].join("\n")
}

impl Drop for Guest {
    fn drop(&mut self) {
        if let Some(name) = self.domain.take() {
            let _ = tool::run(
                Command::new("virsh").args(["-c", LIBVIRT_URI, "destroy", &name]),
                Duration::from_secs(30),
            );
        }
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = tool::wait_deadline(&mut child, Duration::from_secs(10));
        }
    }
}

/// A libvirtd started for a test (none when one already answers on
/// [`LIBVIRT_URI`]); killed by its PID on drop.
pub struct Libvirtd {
    child: Option<Child>,
}

impl Libvirtd {
    /// A libvirtd answering on [`LIBVIRT_URI`]: the one running, or one
    /// started here. Its QEMU driver must run QEMU as root without a
    /// security driver (`/etc/libvirt/qemu.conf`, as integration/run-tests
    /// writes it), so QEMU reaches the test's sockets and files.
    pub fn ensure(dir: &Path) -> Libvirtd {
        let virsh = tool::require_tool("virsh", "libvirt-clients");
        let answers = || {
            tool::run(
                Command::new(&virsh).args(["-c", LIBVIRT_URI, "version"]),
                Duration::from_secs(30),
            )
        };
        if answers().status.success() {
            return Libvirtd { child: None };
        }
        let daemon = tool::require_tool("libvirtd", "libvirt-daemon-driver-qemu");
        let log = dir.join("libvirtd.log");
        let child = Command::new(daemon)
            .arg("-p")
            .arg(dir.join("libvirtd.pid"))
            .stdin(std::process::Stdio::null())
            .stdout(File::create(&log).expect("create the libvirtd log"))
            .stderr(File::create(log.with_extension("stderr")).expect("libvirtd stderr"))
            .spawn()
            .expect("start libvirtd");
        let mut daemon = Libvirtd { child: Some(child) };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let out = answers();
            if out.status.success() {
                return daemon;
            }
            let exited = daemon
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten());
            assert!(
                exited.is_none() && Instant::now() < deadline,
                "libvirtd did not answer on {LIBVIRT_URI} (exited: {exited:?}); its log:\n{}\n\
                 (integration/run-tests installs libvirt and writes /etc/libvirt/qemu.conf)",
                std::fs::read_to_string(log.with_extension("stderr")).unwrap_or_default()
            );
            thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Libvirtd {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SIGTERM first: libvirtd then leaves its sockets and pid file
            // clean for the next run.
            // SAFETY: kill(2) on the pid of a child we have not reaped.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            if tool::wait_deadline(&mut child, Duration::from_secs(10)).is_none() {
                let _ = child.kill();
            }
        }
    }
}
