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
        // SAFETY: as above: a valid path and a struct we own.
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

/// nbdkit serving a file (`Nbdkit::file`, read-only, one thread, behind
/// filters such as `--filter=error error-pread-rate=10%`); killed by PID
/// on drop.
pub use test_support::nbdkit::Nbdkit;

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

/// qemu-io driven on its stdin one command at a time: each command is
/// sent only after the prompt of the previous one (qemu-io leaves a second
/// command that arrives in the same read unprocessed), for a client that
/// must live across server restarts (`reconnect-delay`). Killed by PID on
/// drop.
pub struct QemuIo {
    child: Option<Child>,
    stdin: Option<std::process::ChildStdin>,
    /// Output lines, and `None` for each prompt.
    events: std::sync::mpsc::Receiver<Option<String>>,
    /// Every line it printed, for failure messages.
    pub transcript: Vec<String>,
}

const PROMPT: &[u8] = b"qemu-io> ";

impl QemuIo {
    /// `qemu-io --image-opts driver=nbd,server.type=unix,server.path=SOCKET,
    /// reconnect-delay=DELAY`; returns once it shows its first prompt.
    pub fn nbd_unix(socket: &Path, reconnect_delay: u32) -> QemuIo {
        let qemu_io = tool::require_tool("qemu-io", "qemu-utils");
        let opts = format!(
            "driver=nbd,server.type=unix,server.path={},reconnect-delay={reconnect_delay}",
            socket.display()
        );
        let mut child = Command::new(qemu_io)
            .args(["--image-opts", &opts])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn qemu-io");
        let (tx, events) = std::sync::mpsc::channel();
        let out = child.stdout.take().unwrap();
        let tx2 = tx.clone();
        std::thread::spawn(move || split_prompts(out, tx2));
        let err = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(err).lines() {
                let Ok(line) = line else { break };
                if tx.send(Some(line)).is_err() {
                    break;
                }
            }
        });
        let mut q = QemuIo {
            stdin: child.stdin.take(),
            child: Some(child),
            events,
            transcript: Vec::new(),
        };
        q.until_prompt("start", Duration::from_secs(30));
        q
    }

    fn send(&mut self, command: &str) {
        use std::io::Write;
        let stdin = self.stdin.as_mut().expect("qemu-io stdin");
        self.transcript.push(format!("> {command}"));
        writeln!(stdin, "{command}")
            .and_then(|_| stdin.flush())
            .unwrap_or_else(|e| panic!("qemu-io stdin: {e}\n{}", self.transcript.join("\n")));
    }

    /// The lines printed up to the next prompt.
    fn until_prompt(&mut self, what: &str, timeout: Duration) -> Vec<String> {
        let deadline = Instant::now() + timeout;
        let mut lines = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.events.recv_timeout(left) {
                Ok(Some(line)) => {
                    self.transcript.push(line.clone());
                    lines.push(line);
                }
                Ok(None) => return lines,
                Err(e) => panic!(
                    "qemu-io: no prompt after {what} within {timeout:?} ({e})\n{}",
                    self.transcript.join("\n")
                ),
            }
        }
    }

    /// Sends `cmd` (one `read`, `write` or `flush`) and waits for its
    /// answer; panics on any error or pattern mismatch, or after `timeout`.
    pub fn run(&mut self, cmd: &str, timeout: Duration) {
        self.send(cmd);
        let lines = self.until_prompt(cmd, timeout);
        let bad = ["fail", "error", "Error", "Pattern verification"];
        if let Some(l) = lines.iter().find(|l| bad.iter().any(|b| l.contains(b))) {
            panic!("qemu-io: {cmd}: {l}\n{}", self.transcript.join("\n"));
        }
        let answered = lines
            .iter()
            .any(|l| l.starts_with("wrote ") || l.starts_with("read "));
        assert!(
            answered || cmd == "flush",
            "qemu-io: {cmd}: no answer\n{}",
            self.transcript.join("\n")
        );
    }

    /// `quit`, and its exit status within 30 s.
    pub fn quit(mut self) -> std::process::ExitStatus {
        self.send("quit");
        drop(self.stdin.take());
        let mut child = self.child.take().expect("qemu-io");
        tool::wait_deadline(&mut child, Duration::from_secs(30))
            .unwrap_or_else(|| panic!("qemu-io did not quit\n{}", self.transcript.join("\n")))
    }
}

/// Splits qemu-io's stdout into lines and prompts (a prompt has no newline
/// after it).
fn split_prompts(mut out: impl std::io::Read, tx: std::sync::mpsc::Sender<Option<String>>) {
    let mut pending: Vec<u8> = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = match out.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        pending.extend_from_slice(&buf[..n]);
        loop {
            if pending.starts_with(PROMPT) {
                pending.drain(..PROMPT.len());
                if tx.send(None).is_err() {
                    return;
                }
            } else if let Some(i) = pending.iter().position(|&b| b == b'\n') {
                let line = String::from_utf8_lossy(&pending[..i]).into_owned();
                pending.drain(..=i);
                if tx.send(Some(line)).is_err() {
                    return;
                }
            } else {
                break;
            }
        }
    }
}

impl Drop for QemuIo {
    fn drop(&mut self) {
        drop(self.stdin.take());
        if let Some(mut c) = self.child.take() {
            test_support::child::kill_and_reap(&mut c);
        }
    }
}
