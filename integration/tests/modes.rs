//! A target `stream start` creates is a copy of a server's disk, and its
//! state holds guest data (the write-ahead log): readable by their owner
//! only under the usual umask 022 (issue 13: the target was 0644).

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use integration::Start;
use integration::start::mixed_image;

#[test]
fn a_created_target_is_0600_and_a_created_state_directory_0700() {
    // SAFETY: umask(2) only sets this process's mask; the child inherits it.
    unsafe { libc::umask(0o022) };
    let dir = tempfile::tempdir().unwrap();
    let img = mixed_image(dir.path());
    let start = Start::new(&img.path, dir.path().join("target.img"), dir.path()).no_hydrate(true);
    let running = start.spawn();
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(start.target_path()), 0o600, "target mode");
    assert_eq!(mode(start.state_dir()), 0o700, "state directory mode");
    running.sigterm_and_wait(Duration::from_secs(30));
}
