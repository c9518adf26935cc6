//! Faults injected through real seams, beyond the [`crate::proxy`]: a
//! small tmpfs that fills up under a target (and grows again), a source
//! served by nbdkit behind its error filter, and damage to state files.
//!
//! Each is undone on drop (unmount, kill by PID), so a failing test leaves
//! nothing mounted or running.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::tool;

/// A tmpfs of a given size mounted on a directory the test owns;
/// unmounted on drop.
pub struct Tmpfs {
    pub path: PathBuf,
}

impl Tmpfs {
    /// `mount -t tmpfs -o size=SIZE tmpfs DIR` (creates `DIR`).
    pub fn mount(dir: &Path, size: &str) -> Tmpfs {
        let mount = tool::require_tool("mount", "mount");
        std::fs::create_dir_all(dir).unwrap_or_else(|e| panic!("mkdir {}: {e}", dir.display()));
        tool::run_ok(
            Command::new(mount)
                .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
                .arg(dir),
            Duration::from_secs(30),
        );
        Tmpfs {
            path: dir.to_path_buf(),
        }
    }

    /// `mount -o remount,size=SIZE DIR`: make room (or take it away).
    pub fn resize(&self, size: &str) {
        tool::run_ok(
            Command::new("mount")
                .args(["-o", &format!("remount,size={size}")])
                .arg(&self.path),
            Duration::from_secs(30),
        );
    }

    /// Bytes free, from statvfs.
    pub fn free(&self) -> u64 {
        let c = std::ffi::CString::new(self.path.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: statvfs on a NUL-terminated path into a zeroed struct.
        let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
        let rc = unsafe { libc::statvfs(c.as_ptr(), &mut st) };
        assert_eq!(rc, 0, "statvfs {}", self.path.display());
        st.f_bavail * st.f_frsize
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let out = tool::run(
            Command::new("umount").arg(&self.path),
            Duration::from_secs(30),
        );
        if !out.status.success() {
            eprintln!("unmounting {}: {}", self.path.display(), out.describe());
        }
    }
}

/// nbdkit serving a file read-only on a unix socket, with extra filter
/// arguments (e.g. `--filter=error error-pread-rate=10%`); one thread
/// (`-t 1`: nbdkit 1.32 aborts when a connection is cut while several
/// threads have requests in flight). Killed by PID on drop.
pub struct Nbdkit {
    child: Option<Child>,
    pub socket: PathBuf,
    log: PathBuf,
}

impl Nbdkit {
    pub fn file(dir: &Path, file: &Path, filter_args: &[&str]) -> Nbdkit {
        let nbdkit = tool::require_tool("nbdkit", "nbdkit");
        let socket = dir.join("nbdkit.sock");
        let log = dir.join("nbdkit.log");
        let err = std::fs::File::create(&log).expect("nbdkit log");
        let mut cmd = Command::new(nbdkit);
        cmd.args(["-f", "-r", "-t", "1", "-U"])
            .arg(&socket)
            .args(filter_args.iter().filter(|a| a.starts_with("--")))
            .arg("file")
            .arg(file)
            .args(filter_args.iter().filter(|a| !a.starts_with("--")))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(err);
        let child = cmd.spawn().expect("spawn nbdkit");
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut me = Nbdkit {
            child: Some(child),
            socket,
            log,
        };
        while !me.socket.exists() {
            if let Some(status) = me.child.as_mut().unwrap().try_wait().expect("try_wait") {
                panic!("nbdkit exited with {status}: {}", me.log());
            }
            assert!(Instant::now() < deadline, "nbdkit socket never appeared");
            std::thread::sleep(Duration::from_millis(10));
        }
        me
    }

    /// `nbd+unix:///?socket=PATH`.
    pub fn uri(&self) -> String {
        format!("nbd+unix:///?socket={}", self.socket.display())
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Whether it still runs (it must not crash under the test).
    pub fn alive(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| c.try_wait().expect("try_wait").is_none())
    }
}

impl Drop for Nbdkit {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = tool::wait_deadline(&mut c, Duration::from_secs(10));
        }
    }
}

/// Overwrites `bytes` at `offset` of `path` (state-file damage).
pub fn damage(path: &Path, offset: u64, bytes: &[u8]) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    f.write_all_at(bytes, offset)
        .unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}

/// Cuts `path` to `len` bytes (a torn write).
pub fn truncate(path: &Path, len: u64) {
    std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .and_then(|f| f.set_len(len))
        .unwrap_or_else(|e| panic!("truncate {}: {e}", path.display()));
}
