//! Outside tools, each run bounded by a deadline: test-support's
//! [`require_tool`] (a missing tool names its Debian package) and
//! [`run`] (output captured, killed at its deadline), plus what only the
//! end-to-end tests need: python3 with the libnbd bindings.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

pub use test_support::child::wait_deadline;
pub use test_support::tool::{Output, require_tool, run, run_ok};

/// The interpreter that sees Debian's `python3-libnbd` (a pyenv or venv
/// `python3` earlier in PATH would not).
pub const SYSTEM_PYTHON: &str = "/usr/bin/python3";

/// `/usr/bin/python3` with the libnbd bindings; panics naming the package.
pub fn require_python_nbd() -> PathBuf {
    let python = PathBuf::from(SYSTEM_PYTHON);
    let ok = python.is_file() && {
        let out = run(
            Command::new(&python).args(["-c", "import nbd"]),
            Duration::from_secs(30),
        );
        out.status.success()
    };
    assert!(
        ok,
        "{SYSTEM_PYTHON} cannot `import nbd`: install the Debian package `python3-libnbd` \
         (apt-get install -y python3-libnbd; integration/run-tests does this for you)"
    );
    python
}
