//! Outside tools, each run bounded by a deadline.
//!
//! Tests must fail with a message that says what to install, not with
//! "No such file or directory": [`require_tool`] names the Debian package.
//! [`run`] captures stdout and stderr on threads (so a chatty tool cannot
//! fill a pipe and hang) and kills the tool when its deadline passes.

use std::ffi::OsStr;
use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, ExitStatus, Stdio};
use std::thread;
use std::time::Duration;

use crate::child::wait_deadline;

/// Path of `tool` in `PATH`, if it is there.
pub fn find_tool(tool: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join(tool))
        .find(|candidate| candidate.is_file())
}

/// Path of `tool` in `PATH`; panics naming the Debian `package` to install.
pub fn require_tool(tool: &str, package: &str) -> PathBuf {
    find_tool(tool).unwrap_or_else(|| {
        panic!(
            "the tool `{tool}` is not in PATH: install the Debian package `{package}` \
             (apt-get install -y {package}; integration/run-tests and benches/run do this \
             for you)"
        )
    })
}

/// What a finished tool left behind.
#[derive(Debug)]
pub struct Output {
    pub status: ExitStatus,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    /// The command line, for messages.
    pub command: String,
}

impl Output {
    pub fn stdout_lossy(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }

    pub fn stderr_lossy(&self) -> String {
        String::from_utf8_lossy(&self.stderr).into_owned()
    }

    /// A description for assertion messages.
    pub fn describe(&self) -> String {
        format!(
            "`{}` exited with {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.command,
            self.status,
            self.stdout_lossy(),
            self.stderr_lossy()
        )
    }
}

fn command_line(cmd: &Command) -> String {
    let mut words = vec![cmd.get_program().to_string_lossy().into_owned()];
    words.extend(
        cmd.get_args()
            .map(|a: &OsStr| a.to_string_lossy().into_owned()),
    );
    words.join(" ")
}

/// Runs `cmd` to completion with stdin closed; kills it and panics when it
/// is still running after `timeout`.
pub fn run(cmd: &mut Command, timeout: Duration) -> Output {
    let command = command_line(cmd);
    // Its own process group, so a timeout ends what it forked too (fio's
    // job processes hold the output pipes: killing only the parent left
    // the drain below waiting for them forever).
    let mut child = cmd
        .process_group(0)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start `{command}`: {e}"));
    let stdout = drain(child.stdout.take().expect("piped stdout"));
    let stderr = drain(child.stderr.take().expect("piped stderr"));
    let status = wait_deadline(&mut child, timeout);
    if status.is_none() {
        // SAFETY: killpg(2) of the group our own child leads; the child is
        // reaped but the group id is not reused while members remain.
        unsafe { libc::killpg(child.id() as libc::pid_t, libc::SIGKILL) };
    }
    let stdout = stdout.join().expect("stdout reader");
    let stderr = stderr.join().expect("stderr reader");
    match status {
        Some(status) => Output {
            status,
            stdout,
            stderr,
            command,
        },
        None => panic!(
            "`{command}` still running after {timeout:?}; killed it\n--- stdout ---\n{}\n--- stderr ---\n{}",
            String::from_utf8_lossy(&stdout),
            String::from_utf8_lossy(&stderr)
        ),
    }
}

/// [`run`], then asserts a zero exit status.
pub fn run_ok(cmd: &mut Command, timeout: Duration) -> Output {
    let out = run(cmd, timeout);
    assert!(out.status.success(), "{}", out.describe());
    out
}

fn drain(mut pipe: impl Read + Send + 'static) -> thread::JoinHandle<Vec<u8>> {
    thread::spawn(move || {
        let mut buf = Vec::new();
        // A read error just ends the capture; the exit status tells the story.
        let _ = pipe.read_to_end(&mut buf);
        buf
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[should_panic(expected = "install the Debian package `no-such-package`")]
    fn a_missing_tool_names_its_debian_package() {
        require_tool("no-such-tool-for-stream-tests", "no-such-package");
    }

    #[test]
    fn a_tool_on_path_is_found() {
        assert!(find_tool("sh").is_some());
    }

    /// fio with several jobs forks; its children hold the output pipes.
    #[test]
    fn a_forking_tool_past_its_deadline_is_killed_with_its_children() {
        let started = std::time::Instant::now();
        let result = std::panic::catch_unwind(|| {
            run(
                Command::new("sh").args(["-c", "sleep 30 & sleep 30"]),
                Duration::from_millis(200),
            )
        });
        assert!(result.is_err(), "a 30 s sleep finished within 200 ms");
        assert!(started.elapsed() < Duration::from_secs(10));
    }

    #[test]
    fn a_tool_past_its_deadline_is_killed() {
        let started = std::time::Instant::now();
        let result = std::panic::catch_unwind(|| {
            run(Command::new("sleep").arg("30"), Duration::from_millis(200))
        });
        assert!(result.is_err(), "a 30 s sleep finished within 200 ms");
        assert!(started.elapsed() < Duration::from_secs(10));
    }
}
