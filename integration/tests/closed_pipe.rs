//! `stream status`, `stream completions` (and the other commands that
//! print results) end quietly when stdout's reader is gone, as Unix tools
//! do (`stream status | head -0`), instead of panicking with exit 101
//! (issue 13). A server whose log reader is gone (stderr a closed pipe, as
//! after `ssh legacy 'stream export ... &'` disconnects) goes on serving
//! and still stops on SIGTERM.

use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::process::ExitStatusExt;
use std::process::{Command, Stdio};
use std::time::Duration;

use integration::binary::stream_bin;
use integration::image::MIB;
use integration::server::{READY_TIMEOUT, read_uri_line};
use integration::{SparseImage, Start, tool};
use test_support::child::ChildGuard;

/// The write end of a pipe whose read end is already closed.
fn closed_pipe() -> OwnedFd {
    let mut fds = [0; 2];
    // SAFETY: pipe(2) into a local array; both fds are owned below.
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    // SAFETY: fresh descriptors from pipe(2), owned once each.
    let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    drop(read);
    write
}

/// Runs `args` with stdout a pipe whose read end is already closed.
fn run_into_closed_pipe(args: &[&str]) -> (std::process::ExitStatus, String) {
    let write = closed_pipe();
    let mut child = Command::new(stream_bin())
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::from(write))
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let status = tool::wait_deadline(&mut child, Duration::from_secs(30))
        .unwrap_or_else(|| panic!("stream {args:?} still running after 30 s"));
    let mut err = String::new();
    std::io::Read::read_to_string(&mut stderr, &mut err).unwrap();
    (status, err)
}

fn assert_quiet(args: &[&str]) {
    let (status, err) = run_into_closed_pipe(args);
    assert!(
        status.signal() == Some(libc::SIGPIPE),
        "stream {args:?} into a closed pipe: {status}, stderr:\n{err}"
    );
    assert!(!err.contains("panicked"), "stream {args:?}: {err}");
}

#[test]
fn completions_into_a_closed_pipe_end_quietly() {
    assert_quiet(&["completions", "bash"]);
}

#[test]
fn status_into_a_closed_pipe_ends_quietly() {
    let dir = tempfile::tempdir().unwrap();
    let img = SparseImage::create(dir.path().join("source.img"), 4 * MIB, &[], 1);
    let start = Start::new(&img.path, dir.path().join("target.img"), dir.path()).no_hydrate(true);
    let running = start.spawn();
    let state = start.state_dir().to_str().unwrap().to_string();
    assert_quiet(&["status", "--state", &state]);
    assert_quiet(&["status", "--state", &state, "--json"]);
    running.sigterm_and_wait(Duration::from_secs(30));
}

#[test]
fn finalize_and_verify_into_a_closed_pipe_end_quietly() {
    let dir = tempfile::tempdir().unwrap();
    let img = SparseImage::create(dir.path().join("source.img"), 4 * MIB, &[], 1);
    let start = Start::new(&img.path, dir.path().join("target.img"), dir.path());
    let mut running = start.spawn();
    running.wait_hydrated(Duration::from_secs(60));
    running.sigterm_and_wait(Duration::from_secs(30));
    let state = start.state_dir().to_str().unwrap().to_string();
    // The report of a finalize (its work is done before it prints), then
    // a verify of the finalized migration.
    assert_quiet(&["finalize", "--state", &state]);
    assert_quiet(&["verify", "--state", &state]);
}

/// tracing-subscriber reports a failed log write with `eprintln!`, which
/// panics when stderr is what failed: the export died at its first log
/// line, before printing its URI, and a task that logged later (the
/// signal handler) died with it, so SIGTERM no longer stopped the server.
#[test]
fn export_with_its_log_reader_gone_serves_and_stops_on_sigterm() {
    let nbdcopy = tool::require_tool("nbdcopy", "libnbd-bin");
    let dir = tempfile::tempdir().unwrap();
    let img = SparseImage::standard(dir.path());
    let mut cmd = Command::new(stream_bin());
    cmd.args([
        "export",
        img.path.to_str().unwrap(),
        "--listen",
        "127.0.0.1:0",
    ])
    // Logs on every connection and at the signal.
    .env("RUST_LOG", "debug")
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::from(closed_pipe()));
    let mut server = ChildGuard::spawn("stream export", &mut cmd).unwrap();
    let uri = read_uri_line(server.child_mut(), READY_TIMEOUT)
        .unwrap_or_else(|why| panic!("stream export with stderr a closed pipe: {why}"));
    let copy = dir.path().join("copy.img");
    tool::run_ok(
        Command::new(nbdcopy).arg(&uri).arg(&copy),
        Duration::from_secs(60),
    );
    assert!(integration::image::read_file(&copy) == img.expected_all());
    let (status, termed) = server.stop().unwrap();
    assert!(termed && status.success(), "SIGTERM: {status}");
}
