//! Finding the `stream` binary under test.
//!
//! `integration` is a separate package from `stream-cli`, so cargo gives its
//! tests no `CARGO_BIN_EXE_stream`. Instead the first test of each test
//! process runs `cargo build -p stream-cli --bin stream` from the workspace
//! root (a no-op when it is fresh) and takes the executable path from
//! cargo's JSON messages, so `CARGO_TARGET_DIR` and friends are honoured.
//! `cargo test` releases the build lock before it runs test binaries, so the
//! nested build does not deadlock; `integration/run-tests` also builds the
//! binary first, so in CI the nested build only checks freshness.
//!
//! `STREAM_BIN=/path/to/stream` skips the build (e.g. to test a release
//! build).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use crate::tool;

/// The workspace root: the parent of this crate's manifest directory.
pub fn workspace_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("integration/ lives inside the workspace")
}

/// Path of the `stream` binary, built on first use.
pub fn stream_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(bin) = std::env::var_os("STREAM_BIN") {
            // Relative to the workspace root, where the README's commands
            // run (tests themselves run in integration/).
            let bin = workspace_root().join(PathBuf::from(bin));
            assert!(bin.is_file(), "STREAM_BIN={} is not a file", bin.display());
            return bin;
        }
        build()
    })
}

/// Removes from `cmd`'s environment what `cargo test` tells this package
/// about itself (`CARGO_MANIFEST_DIR`, `CARGO_PKG_*`, ...), for a nested
/// cargo build. ring's build script reruns when `CARGO_MANIFEST_DIR`
/// differs from its last run, so passing it on rebuilt ring, rustls, ureq
/// and the cli whenever the last build had run from a shell (as
/// `integration/run-tests` does first): 8 s in debug, 1.5 minutes for the
/// static release build.
pub fn without_package_env(cmd: &mut Command) -> &mut Command {
    for (key, _) in std::env::vars_os() {
        let key = key.to_string_lossy();
        let from_cargo_test = key.starts_with("CARGO_PKG_")
            || [
                "CARGO_MANIFEST_DIR",
                "CARGO_MANIFEST_PATH",
                "CARGO_CRATE_NAME",
                "CARGO_PRIMARY_PACKAGE",
                "CARGO_TARGET_TMPDIR",
                "CARGO_RUSTC_CURRENT_DIR",
            ]
            .contains(&&*key);
        if from_cargo_test {
            cmd.env_remove(&*key);
        }
    }
    cmd
}

fn build() -> PathBuf {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(workspace_root())
        .args([
            "build",
            "-p",
            "stream-cli",
            "--bin",
            "stream",
            "--message-format=json-render-diagnostics",
        ])
        .stdin(Stdio::null());
    without_package_env(&mut cmd);
    // A cold build of the whole dependency tree on 2 cores takes minutes;
    // a fresh one takes well under a second.
    let out = tool::run(&mut cmd, Duration::from_secs(900));
    assert!(
        out.status.success(),
        "building the stream binary failed ({}):\n{}",
        out.status,
        out.stderr_lossy()
    );
    for line in out.stdout_lossy().lines() {
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if msg["reason"] == "compiler-artifact" && msg["target"]["name"] == "stream" {
            if let Some(exe) = msg["executable"].as_str() {
                return PathBuf::from(exe);
            }
        }
    }
    panic!(
        "cargo built stream-cli but reported no `stream` executable:\n{}",
        out.stdout_lossy()
    );
}
