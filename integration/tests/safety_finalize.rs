//! Issue 12, "Data safety": a finalized target belongs to the new instance.
//!
//! - Case 3: an interrupted `stream verify` must not make the next one
//!   "recover" the target, punching what the instance wrote there.
//! - Case 9: `stream finalize --verify` of a finalized migration verifies
//!   (read-only), and `--cinder-manage` there is refused unless done.
//!
//! The instance's write after the cutover is made by qemu-io on the target
//! file, as the instance's hypervisor would.

use std::os::fd::AsRawFd;
use std::path::Path;
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use integration::fault::Nbdkit;
use integration::finalize::{self, Finalize};
use integration::image::{KIB, MIB, file_hash, read_at};
use integration::start::mixed_image;
use integration::{Start, binary, require_tool, run_ok, tool};

/// A chunk of the mixed image's hole between 6.3 and 12 MiB: the map
/// calls it zero (a source hole), so crash recovery would punch it.
const HOLE_CHUNK: u64 = 8 * MIB;
const CHUNK: u64 = 64 * KIB;

/// A finalized migration of the mixed image from nbdkit (`filter_args`
/// for its filters); returns the nbdkit (still serving) and the start
/// command line (for its state and target).
fn finalized(dir: &Path, filter_args: &[&str]) -> (Nbdkit, Start) {
    let img = mixed_image(dir);
    let kit = Nbdkit::file(dir, &img.path, filter_args);
    let start = Start::new(kit.uri(), dir.join("target.img"), dir).chunk_size("64K");
    let running = start.spawn();
    let reaper = running.reap_in_background(Duration::from_secs(120));
    Finalize::new(start.state_dir()).run_ok(Duration::from_secs(120));
    let status = reaper.join().expect("reaper thread");
    assert!(
        status.is_some_and(|s| s.success()),
        "stream start did not hand over cleanly: {status:?}"
    );
    assert_eq!(finalize::header(start.state_dir())["phase"], "finalized");
    (kit, start)
}

/// The new instance writes `pattern` over the chunk at `offset` of the
/// target, with qemu-io (a real client of the raw file).
fn instance_writes(target: &Path, offset: u64, pattern: u8) {
    let qemu_io = require_tool("qemu-io", "qemu-utils");
    run_ok(
        Command::new(qemu_io)
            .args(["-f", "raw", "-c"])
            .arg(format!("write -P {pattern} {offset} {CHUNK}"))
            .arg(target),
        Duration::from_secs(60),
    );
    assert_eq!(
        read_at(target, offset, CHUNK as usize),
        vec![pattern; CHUNK as usize],
        "qemu-io's write is not in the target"
    );
}

/// Bytes process `pid` has read so far (`rchar` of /proc/PID/io: files
/// and sockets alike).
fn bytes_read(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/io"))
        .ok()
        .and_then(|io| {
            io.lines()
                .find_map(|l| l.strip_prefix("rchar: ").map(|n| n.trim().parse().ok()))
                .flatten()
        })
        .unwrap_or(0)
}

/// Whether some process holds the state directory's lock.
fn state_locked(state: &Path) -> bool {
    let Ok(f) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(state.join("lock"))
    else {
        return false;
    };
    // SAFETY: flock on an fd we own; released when `f` is closed.
    unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) != 0 }
}

#[test]
fn interrupted_verify_never_changes_a_finalized_target() {
    let dir = tempfile::tempdir().unwrap();
    // Slow reads (50 ms each, one at a time): verify is still comparing
    // with the source when it is interrupted.
    let (_kit, start) = finalized(dir.path(), &["--filter=delay", "rdelay=50ms"]);
    let (state, target) = (start.state_dir(), start.target_path());
    instance_writes(target, HOLE_CHUNK, 0xab);
    let after_cutover = file_hash(target);

    // Ctrl-C a verify in the middle of its comparison: it holds the
    // migration's lock and has read more than its state files and the
    // source's fingerprint (2 MiB: it is reading chunks).
    let mut child = Command::new(binary::stream_bin())
        .args(["verify", "--state"])
        .arg(state)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn stream verify");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !(state_locked(state) && bytes_read(child.id()) > 2 * MIB) {
        assert!(
            child.try_wait().expect("try_wait").is_none(),
            "stream verify exited before it was interrupted"
        );
        assert!(
            Instant::now() < deadline,
            "stream verify never opened {state:?}"
        );
        // Bounds the poll rate only; the lock is what we wait on.
        thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(
        // SAFETY: kill(2) with the PID of our own unreaped child.
        unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGINT) },
        0
    );
    let status = tool::wait_deadline(&mut child, Duration::from_secs(10))
        .expect("stream verify ends on SIGINT");
    assert!(
        !status.success(),
        "stream verify finished before the SIGINT"
    );
    assert_eq!(
        file_hash(target),
        after_cutover,
        "the interrupted verify changed the target"
    );

    // The next verify reports the instance's chunk honestly, and changes
    // nothing.
    let out = finalize::verify(state, false);
    let stderr = out.stderr_lossy();
    assert!(
        !out.status.success(),
        "verify passed a target the instance wrote: {}",
        out.describe()
    );
    assert!(
        stderr.contains(&format!(
            "MISMATCH bytes {}..{}",
            HOLE_CHUNK,
            HOLE_CHUNK + CHUNK
        )),
        "the instance's chunk is not reported: {}",
        out.describe()
    );
    assert!(
        !stderr.contains("did not stop cleanly"),
        "verify ran crash recovery on a finalized target: {}",
        out.describe()
    );
    assert_eq!(
        read_at(target, HOLE_CHUNK, CHUNK as usize),
        vec![0xab; CHUNK as usize],
        "the instance's data was punched"
    );
    assert_eq!(
        file_hash(target),
        after_cutover,
        "verify changed the target"
    );
    assert!(
        !state.join("running").exists(),
        "verify marked the finalized migration running"
    );
}

#[test]
fn finalize_verify_of_a_finalized_migration_verifies_read_only() {
    let dir = tempfile::tempdir().unwrap();
    let (_kit, start) = finalized(dir.path(), &[]);
    let (state, target) = (start.state_dir(), start.target_path());

    // Untouched since: it verifies, and says so.
    let out = Finalize::new(state)
        .args(&["--verify"])
        .run_ok(Duration::from_secs(120));
    assert!(
        out.stdout_lossy().contains("verified:"),
        "finalize --verify of a finalized migration verified nothing: {}",
        out.describe()
    );
    let json = Finalize::new(state)
        .args(&["--verify", "--json"])
        .run_ok(Duration::from_secs(120));
    let report = finalize::json_stdout(&json);
    assert!(
        report["verify"]["chunks_checked"].as_u64() == Some(16 * MIB / CHUNK),
        "{report}"
    );

    // Written by the instance since: reported, non-zero, target untouched.
    instance_writes(target, HOLE_CHUNK, 0xcd);
    let before = file_hash(target);
    let out = Finalize::new(state)
        .args(&["--verify"])
        .run_fails(Duration::from_secs(120));
    assert!(
        out.stderr_lossy().contains(&format!(
            "MISMATCH bytes {}..{}",
            HOLE_CHUNK,
            HOLE_CHUNK + CHUNK
        )),
        "{}",
        out.describe()
    );
    assert_eq!(
        file_hash(target),
        before,
        "finalize --verify changed the target"
    );
    assert_eq!(finalize::header(state)["phase"], "finalized");
}

#[test]
fn finalize_cinder_manage_after_finalize_is_refused_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let (_kit, start) = finalized(dir.path(), &[]);
    let state = start.state_dir();
    let header = finalize::header(state);
    let out = Finalize::new(state)
        .args(&["--cinder-manage", "cinder@lvm#pool"])
        .run_fails(Duration::from_secs(60));
    let stderr = out.stderr_lossy();
    assert!(
        stderr.contains("finalized") && stderr.contains("without --cinder-manage"),
        "the refusal does not say why: {}",
        out.describe()
    );
    assert_eq!(
        finalize::header(state),
        header,
        "the refused run changed the state"
    );
}
