//! Which migration a command means: `--state DIR`, or `--target PATH`
//! whose state directory is derived as `stream start` derives it.

use std::path::PathBuf;

use lazy_fetch::state::{self, Header, StateDir};

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

/// The state directory of an existing migration and its header; a clear
/// error when the directory holds none.
pub fn existing(
    state: Option<PathBuf>,
    target: Option<PathBuf>,
) -> anyhow::Result<(PathBuf, Header)> {
    let dir = resolve_state(state, target)?;
    if !StateDir::exists(&dir) {
        anyhow::bail!(
            "{} holds no migration (wrong --state or --target? `stream status` lists the \
             running ones with their state directories)",
            dir.display()
        );
    }
    let header = StateDir::read_header(&dir)?;
    Ok((dir, header))
}
