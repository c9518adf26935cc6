//! Which migration a command means: `--state DIR`, or `--target PATH`
//! whose state directory is derived as `stream start` derives it.

use std::path::PathBuf;

use lazy_fetch::state;

/// The state directory a command should use.
pub fn resolve_state(state: Option<PathBuf>, target: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    match (state, target) {
        (Some(s), _) => Ok(s),
        (None, Some(t)) => Ok(state::default_dir(&t)),
        (None, None) => anyhow::bail!(
            "say which migration: --state DIR or --target PATH (`stream status` lists the running ones)"
        ),
    }
}
