//! One process per state directory: the `flock`s a `stream start` holds
//! while the state is open, and the probe `finalize` and `status` use.

use std::fs::{self, File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::Path;

use super::StateDir;
use crate::error::{Error, Result};

/// The two `flock`s held while a state directory is open.
#[derive(Debug)]
pub(super) struct Lock {
    _dir: File,
    _file: File,
}

impl StateDir {
    /// Lock the state directory for this process: `flock` on the
    /// directory itself, which cannot be unlinked from under us while it
    /// holds the state (a `lock` file can: deleting it let a second
    /// `stream start` lock a new file of the same name), then on the
    /// `lock` file, which holds the pid for the refusal message and is what
    /// `stream finalize` and `status` probe.
    pub(super) fn lock(dir: &Path) -> Result<Lock> {
        let io = |source| Error::StateIo {
            dir: dir.to_path_buf(),
            source,
        };
        let holder = || {
            fs::read_to_string(dir.join("lock"))
                .map(|s| format!("pid {}", s.trim()))
                .unwrap_or_else(|_| "its lock file was removed".into())
        };
        let d = File::open(dir).map_err(io)?;
        // SAFETY: flock(2) on the fd of a File alive for the call; it touches
        // no memory, and the lock goes with the fd.
        if unsafe { libc::flock(d.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            return Err(Error::Locked {
                dir: dir.to_path_buf(),
                holder: holder(),
            });
        }
        let path = dir.join("lock");
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(io)?;
        // SAFETY: flock(2) on the fd of a File alive for the call; it touches
        // no memory, and the lock goes with the fd.
        let r = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if r != 0 {
            return Err(Error::Locked {
                dir: dir.to_path_buf(),
                holder: holder(),
            });
        }
        f.set_len(0).ok();
        let _ = f.write_all_at(std::process::id().to_string().as_bytes(), 0);
        Ok(Lock { _dir: d, _file: f })
    }

    /// Whether a process holds the state in `dir` (a running `stream
    /// start`): probed on the directory's own lock, which no one can
    /// remove from under its holder. Taken and released at once.
    pub fn in_use(dir: &Path) -> Result<bool> {
        let d = File::open(dir).map_err(|source| Error::StateIo {
            dir: dir.to_path_buf(),
            source,
        })?;
        // SAFETY: flock on an fd we own; released when it is closed below.
        let free = unsafe { libc::flock(d.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0;
        Ok(!free)
    }
}
