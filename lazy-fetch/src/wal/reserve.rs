//! Room for the log, taken up front (issue 13): the state directory's
//! file system is on the clients' write path.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

/// Space reserved for the current generation, allocated when the log
/// opens and moved to each new generation once the old one is removed. The state directory's file system is on
/// the clients' write path (a write to a copied chunk is logged before it
/// lands), so a full `/var/lib/stream` would turn into client ENOSPC; the
/// reserve means the log never needs new blocks until it holds this much
/// between two flushes (issue 13).
pub const RESERVE: u64 = 64 << 20;

static RESERVE_WARNED: AtomicBool = AtomicBool::new(false);

/// Allocate [`RESERVE`] bytes for `f` without changing its size (replay
/// reads only what was written). A file system that cannot is told once.
pub(super) fn reserve(f: &File, dir: &Path) {
    // SAFETY: fallocate on an fd we own; no memory is passed.
    let r = unsafe {
        libc::fallocate64(
            f.as_raw_fd(),
            libc::FALLOC_FL_KEEP_SIZE,
            0,
            RESERVE as libc::off64_t,
        )
    };
    if r == 0 {
        return;
    }
    let e = io::Error::last_os_error();
    let unsupported = matches!(e.raw_os_error(), Some(libc::EOPNOTSUPP | libc::ENOSYS));
    if !unsupported && !RESERVE_WARNED.swap(true, Ordering::Relaxed) {
        tracing::warn!(
            "state directory {}: cannot reserve {} MiB for the write-ahead log ({e}): client \
             writes to copied chunks fail with ENOSPC once its file system is full; free space there",
            dir.display(),
            RESERVE >> 20
        );
    }
}

/// Warn at start when the state directory's file system has little room.
pub(super) fn warn_if_short_of_room(dir: &Path) {
    let Ok(c) = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()) else {
        return;
    };
    // SAFETY: statvfs with a NUL-terminated path and a zeroed out-struct.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: as above: a valid path and a struct we own.
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return;
    }
    let free = st.f_bavail as u64 * st.f_frsize as u64;
    if free < 4 * RESERVE {
        tracing::warn!(
            "state directory {}: only {} MiB free; client writes to copied chunks are logged \
             there before they land (up to {} MiB between flushes) and fail with ENOSPC when it \
             fills: give it more room (see docs/operations.md)",
            dir.display(),
            free >> 20,
            RESERVE >> 20
        );
    }
}
