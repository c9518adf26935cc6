//! `stream finalize` and `stream verify` as child processes, and what they
//! leave in the state directory.
//!
//! A [`Finalize`] is a command line that can be run to completion
//! ([`Finalize::run`], bounded by a deadline) or spawned to be interrupted
//! ([`Finalize::spawn`]: its stdout and stderr go to files the test polls,
//! so a test can wait for "waiting for 1 NBD client(s)" or for the
//! manifest's temp file and then SIGKILL it). Every `OS_*` variable of the
//! test's environment is removed, so only what a test sets reaches the
//! Cinder code.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use crate::tool::{self, Output};
use crate::{binary, start};

/// A `stream finalize --state DIR ...` command line.
#[derive(Clone, Debug)]
pub struct Finalize {
    state: PathBuf,
    args: Vec<String>,
    env: Vec<(String, String)>,
}

impl Finalize {
    pub fn new(state: &Path) -> Self {
        Finalize {
            state: state.to_path_buf(),
            args: Vec::new(),
            env: Vec::new(),
        }
    }

    /// Appends arguments (`["--timeout", "5s"]`).
    pub fn args(mut self, args: &[&str]) -> Self {
        self.args.extend(args.iter().map(|a| (*a).to_owned()));
        self
    }

    /// Sets an environment variable of the child.
    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.to_owned(), value.to_owned()));
        self
    }

    pub fn command(&self) -> Command {
        let mut cmd = Command::new(binary::stream_bin());
        cmd.arg("finalize").arg("--state").arg(&self.state);
        cmd.args(&self.args);
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("OS_") {
                cmd.env_remove(k);
            }
        }
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        if std::env::var_os("RUST_LOG").is_none() {
            cmd.env("RUST_LOG", "info");
        }
        cmd
    }

    /// Runs to completion (any status) within `timeout`.
    pub fn run(&self, timeout: Duration) -> Output {
        tool::run(&mut self.command(), timeout)
    }

    /// Runs to completion and asserts success.
    pub fn run_ok(&self, timeout: Duration) -> Output {
        let out = self.run(timeout);
        assert!(out.status.success(), "{}", out.describe());
        out
    }

    /// Runs to completion and asserts a non-zero exit.
    pub fn run_fails(&self, timeout: Duration) -> Output {
        let out = self.run(timeout);
        assert!(
            !out.status.success(),
            "stream finalize was expected to fail: {}",
            out.describe()
        );
        out
    }

    /// Starts it in the background; stdout and stderr go to files in `dir`.
    pub fn spawn(&self, dir: &Path) -> Spawned {
        let stdout = dir.join("finalize.stdout");
        let stderr = dir.join("finalize.stderr");
        let child = self
            .command()
            .stdin(Stdio::null())
            .stdout(File::create(&stdout).expect("finalize stdout file"))
            .stderr(File::create(&stderr).expect("finalize stderr file"))
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", binary::stream_bin().display()));
        Spawned {
            child: Some(child),
            stdout,
            stderr,
        }
    }
}

/// A `stream finalize` running in the background; killed and reaped on drop.
pub struct Spawned {
    child: Option<Child>,
    stdout: PathBuf,
    stderr: PathBuf,
}

impl Spawned {
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    pub fn stdout(&self) -> String {
        std::fs::read_to_string(&self.stdout).unwrap_or_default()
    }

    fn describe(&self) -> String {
        format!(
            "--- finalize stdout ---\n{}\n--- finalize stderr ---\n{}",
            self.stdout(),
            self.stderr()
        )
    }

    /// Polls `cond` until it holds; panics after `timeout` or when finalize
    /// exits first (it got past the point the test wanted to catch).
    pub fn wait_for(&mut self, what: &str, timeout: Duration, cond: impl Fn(&Spawned) -> bool) {
        let deadline = Instant::now() + timeout;
        loop {
            if cond(self) {
                return;
            }
            let child = self.child.as_mut().expect("running");
            if let Some(status) = child.try_wait().expect("try_wait") {
                // One last look: it may have happened just before the exit.
                assert!(
                    cond(self),
                    "stream finalize exited ({status}) before {what}\n{}",
                    self.describe()
                );
                return;
            }
            assert!(
                Instant::now() < deadline,
                "waited {timeout:?} for {what}\n{}",
                self.describe()
            );
            // Bounds the poll rate only; the condition is what we wait on.
            thread::sleep(Duration::from_millis(2));
        }
    }

    /// SIGKILL and reap; asserts it was still running.
    pub fn kill9(mut self) {
        let mut child = self.child.take().expect("running");
        let pid = child.id() as libc::pid_t;
        // SAFETY: kill(2) with the PID of our own unreaped child.
        let rc = unsafe { libc::kill(pid, libc::SIGKILL) };
        assert_eq!(rc, 0, "kill({pid}, SIGKILL) failed");
        let status = tool::wait_deadline(&mut child, Duration::from_secs(10))
            .expect("a SIGKILLed process is reaped");
        assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&status),
            Some(libc::SIGKILL),
            "stream finalize ended with {status} before the SIGKILL\n{}",
            self.describe()
        );
    }

    /// Waits for it to exit within `timeout`.
    pub fn wait(mut self, timeout: Duration) -> (ExitStatus, String, String) {
        let mut child = self.child.take().expect("running");
        let status = tool::wait_deadline(&mut child, timeout)
            .unwrap_or_else(|| panic!("stream finalize still running after {timeout:?}"));
        (status, self.stdout(), self.stderr())
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            test_support::child::kill_and_reap(&mut child);
        }
        if thread::panicking() {
            eprintln!("{}", self.describe());
        }
    }
}

/// `stream verify --state DIR [--json]`, run to completion (any status).
pub fn verify(state: &Path, json: bool) -> Output {
    let mut cmd = Command::new(binary::stream_bin());
    cmd.arg("verify").arg("--state").arg(state);
    if json {
        cmd.arg("--json");
    }
    tool::run(&mut cmd, Duration::from_secs(120))
}

/// The header of `state.json` (unlocked read, like `stream status`).
pub fn header(state: &Path) -> serde_json::Value {
    let path = state.join("state.json");
    let text =
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    let v: serde_json::Value = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("{} is not JSON ({e}): {text}", path.display()));
    v["header"].clone()
}

/// The one JSON document a `--json` command printed on stdout.
pub fn json_stdout(out: &Output) -> serde_json::Value {
    let text = out.stdout_lossy();
    serde_json::from_str(text.trim())
        .unwrap_or_else(|e| panic!("stdout is not one JSON document ({e}): {}", out.describe()))
}

/// `stream status --state DIR --json` of a running `stream start`, parsed.
pub fn status(state: &Path) -> serde_json::Value {
    let out = start::status_json(state);
    assert!(out.status.success(), "{}", out.describe());
    json_stdout(&out)
}

/// The manifest of `report` describes `target` chunk for chunk: its chunk
/// hashes (`STATE/manifest.chunks`) are the blake3 of each chunk of the
/// target, and `chunk_hashes_blake3` is the blake3 of that list.
pub fn assert_manifest_matches_target(report: &serde_json::Value, state: &Path, target: &Path) {
    let m = &report["manifest"];
    let chunk = m["chunk_size"].as_u64().expect("chunk_size") as usize;
    let list = std::fs::read(state.join("manifest.chunks")).expect("manifest.chunks");
    assert_eq!(
        m["chunk_hashes_blake3"].as_str(),
        Some(blake3::hash(&list).to_hex().as_str()),
        "chunk_hashes_blake3 is not the blake3 of manifest.chunks: {report}"
    );
    let data = std::fs::read(target).expect("read the target");
    let want: Vec<u8> = data
        .chunks(chunk)
        .flat_map(|c| *blake3::hash(c).as_bytes())
        .collect();
    assert!(
        list == want,
        "the manifest's chunk hashes are not those of the target's chunks: {report}"
    );
}
