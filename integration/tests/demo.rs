//! The README's demo (`stream demo`) runs the whole job end to end:
//! export, start over NBD, reads and a write at once, hydration, finalize
//! with verify, and the target equal to the legacy disk plus the write.

use std::time::Duration;

use integration::{binary, tool};

#[test]
fn the_readme_demo_runs_start_to_finalize() {
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = std::process::Command::new(binary::stream_bin());
    cmd.args(["demo", "--size-mib", "64", "--rate-limit", "256M", "--dir"])
        .arg(dir.path());
    let out = tool::run(&mut cmd, Duration::from_secs(180));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "stream demo failed: {}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    for step in [
        "serves it read-only",
        "fetched on demand",
        "finalized: boot the instance from",
        "verified:",
        "the native target equals the legacy disk plus the instance's write",
        "demo complete",
    ] {
        assert!(
            stdout.contains(step),
            "demo output lacks {step:?}:\n{stdout}"
        );
    }
}
