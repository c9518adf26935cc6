//! What the FUSE tests set up around a mount, each undone on drop: a loop
//! device, a kernel file-system mount, a stale FUSE mount; and a watchdog
//! that bounds a test whose own process serves the FUSE file (a hung
//! request would otherwise hang the test forever in the kernel).
//!
//! Every guard names exactly what it made (a loop device path, a mount
//! point); nothing here matches processes or devices by name.

use std::ffi::CString;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use crate::tool::{require_tool, run, run_ok};

const TOOL_TIMEOUT: Duration = Duration::from_secs(60);

/// Panics unless this test can mount FUSE and loop devices (root, /dev/fuse).
pub fn require_fuse() {
    assert!(
        Path::new("/dev/fuse").exists(),
        "/dev/fuse is missing: the FUSE tests need the fuse module (modprobe fuse)"
    );
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    assert!(
        root,
        "the FUSE tests mount file systems and loop devices: run them as root"
    );
}

/// Ends the whole test process when a test runs past its deadline, after
/// lazily unmounting the directories it was told about (so no stale mount
/// is left behind in a temp dir). Disarmed on drop.
pub struct Watchdog {
    stop: Option<mpsc::Sender<()>>,
    thread: Option<thread::JoinHandle<()>>,
}

impl Watchdog {
    pub fn start(test: &str, timeout: Duration, mounts: &[&Path]) -> Watchdog {
        let (tx, rx) = mpsc::channel::<()>();
        let test = test.to_string();
        let mounts: Vec<PathBuf> = mounts.iter().map(|p| p.to_path_buf()).collect();
        let thread = thread::spawn(move || {
            if let Err(mpsc::RecvTimeoutError::Timeout) = rx.recv_timeout(timeout) {
                eprintln!("{test}: still running after {timeout:?}; detaching mounts and exiting");
                for m in &mounts {
                    detach(m);
                }
                std::process::exit(124);
            }
        });
        Watchdog {
            stop: Some(tx),
            thread: Some(thread),
        }
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// umount2(MNT_DETACH), ignoring errors (cleanup only).
pub fn detach(dir: &Path) {
    if let Ok(c) = CString::new(dir.as_os_str().as_bytes()) {
        // SAFETY: a valid NUL-terminated path.
        unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
    }
}

/// A loop device over a file, detached on drop.
pub use test_support::loopdev::LoopDevice;

/// A kernel file system mounted from a device, unmounted on drop.
pub struct FsMount {
    pub dir: PathBuf,
}

impl FsMount {
    pub fn mount(device: &Path, dir: &Path, options: &str) -> FsMount {
        run_ok(
            Command::new("mount")
                .args(["-t", "ext4", "-o", options])
                .arg(device)
                .arg(dir),
            TOOL_TIMEOUT,
        );
        FsMount {
            dir: dir.to_path_buf(),
        }
    }

    /// Unmount now, asserting success (so writeback errors fail the test).
    ///
    /// EBUSY is retried for a while: a test binary runs tests on several
    /// threads, and a `fork` by another thread briefly holds a copy of every
    /// open descriptor (files of this mount included) until its `exec`
    /// closes them, which under load can outlast one `umount` attempt.
    pub fn unmount(mut self) {
        let deadline = Instant::now() + TOOL_TIMEOUT;
        loop {
            let out = run(Command::new("umount").arg(&self.dir), TOOL_TIMEOUT);
            if out.status.success() {
                break;
            }
            let busy = out.stderr_lossy().contains("busy");
            assert!(busy && Instant::now() < deadline, "{}", out.describe());
            thread::sleep(Duration::from_millis(50));
        }
        self.dir = PathBuf::new();
    }
}

impl Drop for FsMount {
    fn drop(&mut self) {
        if self.dir.as_os_str().is_empty() {
            return;
        }
        let out = run(Command::new("umount").arg(&self.dir), TOOL_TIMEOUT);
        if !out.status.success() {
            detach(&self.dir);
        }
    }
}

/// An ext4 image of `size` bytes holding `files` (name, content) at its
/// root, made by `mkfs.ext4 -d` from a temp dir (no mount needed).
pub fn ext4_image(path: &Path, size: u64, files: &[(&str, Vec<u8>)]) {
    let mkfs = require_tool("mkfs.ext4", "e2fsprogs");
    let src = tempfile::tempdir().expect("temp dir");
    for (name, bytes) in files {
        let p = src.path().join(name);
        if let Some(parent) = p.parent() {
            std::fs::create_dir_all(parent).expect("mkdir");
        }
        std::fs::write(&p, bytes).expect("write fixture file");
    }
    let f = std::fs::File::create(path).expect("create image");
    f.set_len(size).expect("size image");
    drop(f);
    run_ok(
        Command::new(mkfs)
            .args([
                "-q",
                "-F",
                "-b",
                "4096",
                "-E",
                "lazy_itable_init=0,nodiscard",
            ])
            .arg("-d")
            .arg(src.path())
            .arg(path),
        TOOL_TIMEOUT,
    );
}

/// A FUSE mount whose server is gone, exactly as a crashed daemon leaves
/// it: mounted on `dir` with a /dev/fuse fd that is then closed, so `stat`
/// of `dir` fails with ENOTCONN. Detached on drop.
pub struct StaleMount {
    pub dir: PathBuf,
}

impl StaleMount {
    pub fn create(dir: &Path) -> StaleMount {
        let fuse = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/fuse")
            .expect("open /dev/fuse");
        let data = format!(
            "fd={},rootmode=40000,user_id=0,group_id=0",
            fuse.as_raw_fd()
        );
        let src = CString::new("stale").unwrap();
        let target = CString::new(dir.as_os_str().as_bytes()).unwrap();
        let fstype = CString::new("fuse.stale").unwrap();
        let data = CString::new(data).unwrap();
        // SAFETY: valid NUL-terminated strings; the fd is open for the call.
        let r = unsafe {
            libc::mount(
                src.as_ptr(),
                target.as_ptr(),
                fstype.as_ptr(),
                libc::MS_NOSUID | libc::MS_NODEV,
                data.as_ptr().cast(),
            )
        };
        assert_eq!(r, 0, "mount fuse: {}", std::io::Error::last_os_error());
        drop(fuse);
        StaleMount {
            dir: dir.to_path_buf(),
        }
    }
}

impl Drop for StaleMount {
    fn drop(&mut self) {
        detach(&self.dir);
    }
}
