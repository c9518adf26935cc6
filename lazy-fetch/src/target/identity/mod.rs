//! Who a path really is, for the checks that keep the legacy disk read-only
//! and a used target from being overwritten by accident.
//!
//! - `alias.rs`: whether two paths can change the same bytes (a source and
//!   its target must not).
//! - `marker.rs`: the mark a migration leaves on its target.
//! - `content.rs`: whether a target holds data already.
//!
//! The sysfs helpers they share are here.

mod alias;
mod content;
mod marker;
#[cfg(test)]
mod tests;

use std::fs;
use std::path::{Path, PathBuf};

pub use alias::check_distinct;
pub use content::first_nonzero;
pub use marker::{
    Marker, MarkerPlace, REGISTRY_ENV, XATTR, read_marker, registry_dir, write_marker,
};

const MAX_DEPTH: usize = 8;

fn major(dev: u64) -> u64 {
    ((dev >> 8) & 0xfff) | ((dev >> 32) & !0xfff)
}

fn minor(dev: u64) -> u64 {
    (dev & 0xff) | ((dev >> 12) & !0xff)
}

fn sysfs(major: u64, minor: u64) -> PathBuf {
    PathBuf::from(format!("/sys/dev/block/{major}:{minor}"))
}

fn read_trim(p: &Path) -> Option<String> {
    fs::read_to_string(p).ok().map(|s| s.trim().to_owned())
}

fn read_u64(p: &Path) -> Option<u64> {
    read_trim(p)?.parse().ok()
}
