//! The target: a regular file (created sparse with the source's size when
//! missing) or an existing block device at least as large as the source.
//!
//! It holds raw disk data only; everything else lives in the state
//! directory. [`Target::open`] checks it and wraps it in a [`FileBackend`].

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::Path;
use std::sync::Arc;

use super::{Backend, Target};
use crate::error::{Error, Result};

/// A regular file or a block device.
#[derive(Debug)]
pub struct FileBackend {
    file: File,
    block_device: bool,
    /// The same file opened with `O_DIRECT`, for hydration's writes.
    direct: Option<super::direct::Direct>,
}

fn invalid(msg: String) -> Error {
    Error::Invalid(msg)
}

impl Target {
    /// Open the target at `path` for a volume of `size` bytes, creating a
    /// sparse file if nothing is there and `may_create`. Returns the target
    /// and whether it was created now.
    pub fn open(path: &Path, size: u64, may_create: bool) -> Result<(Target, bool)> {
        let (file, created) = match OpenOptions::new().read(true).write(true).open(path) {
            Ok(f) => (f, false),
            Err(e) if e.kind() == io::ErrorKind::NotFound && may_create => {
                // A copy of a server's disk: readable by its owner only,
                // whatever the umask (issue 13).
                let f = OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(path)
                    .map_err(|e| {
                        invalid(format!("cannot create target {}: {e}", path.display()))
                    })?;
                f.set_len(size)
                    .map_err(|e| invalid(format!("cannot size target {}: {e}", path.display())))?;
                f.sync_all()
                    .map_err(|e| invalid(format!("cannot sync target {}: {e}", path.display())))?;
                (f, true)
            }
            Err(e) => {
                return Err(invalid(format!(
                    "cannot open target {}: {e}",
                    path.display()
                )));
            }
        };
        let meta = file
            .metadata()
            .map_err(|e| invalid(format!("target {}: {e}", path.display())))?;
        let ft = meta.file_type();
        let block_device = ft.is_block_device();
        let actual = if block_device {
            use std::io::Seek;
            (&file)
                .seek(io::SeekFrom::End(0))
                .map_err(|e| invalid(format!("target {}: {e}", path.display())))?
        } else if ft.is_file() {
            meta.len()
        } else {
            return Err(invalid(format!(
                "target {} is neither a regular file nor a block device",
                path.display()
            )));
        };
        if block_device && actual < size {
            return Err(invalid(format!(
                "target {} holds {actual} bytes but the source has {size}: give a block device at least as large",
                path.display()
            )));
        }
        if !block_device && actual != size {
            return Err(invalid(format!(
                "target file {} is {actual} bytes but the source is {size}: remove it to let \
                 `stream start` create it, or give a file of exactly the source's size",
                path.display()
            )));
        }
        if !block_device {
            // One process writes a target file at a time, whatever state
            // directory each was given (`flock` follows the inode, so a
            // symlink or hard link is the same lock). Not on block devices:
            // udev takes a shared `flock` while it probes a device, which
            // would refuse a start for a moment after each change.
            use std::os::fd::AsRawFd;
            // SAFETY: flock on an fd we own; released when it is closed.
            let r = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
            if r != 0 {
                return Err(invalid(format!(
                    "target {} is in use by another `stream` process; stop it first \
                     (`stream status` lists the running migrations)",
                    path.display()
                )));
            }
        }
        let canonical = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
        let direct = super::direct::Direct::open(&file);
        let backend = Arc::new(FileBackend {
            file,
            block_device,
            direct,
        });
        Ok((
            Target::with_backend(backend, canonical, actual, block_device),
            created,
        ))
    }

    /// Open the target of a finalized migration, which belongs to the new
    /// instance: read-only (`O_RDONLY`), so nothing can write to it.
    pub fn open_read_only(path: &Path, size: u64) -> Result<Target> {
        let file = OpenOptions::new()
            .read(true)
            .open(path)
            .map_err(|e| invalid(format!("cannot open target {}: {e}", path.display())))?;
        let meta = file
            .metadata()
            .map_err(|e| invalid(format!("target {}: {e}", path.display())))?;
        let block_device = meta.file_type().is_block_device();
        let actual = if block_device {
            use std::io::Seek;
            (&file)
                .seek(io::SeekFrom::End(0))
                .map_err(|e| invalid(format!("target {}: {e}", path.display())))?
        } else {
            meta.len()
        };
        if actual < size {
            return Err(invalid(format!(
                "target {} holds {actual} bytes but the migration recorded {size}",
                path.display()
            )));
        }
        let canonical = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
        let backend = Arc::new(FileBackend {
            file,
            block_device,
            direct: None,
        });
        Ok(Target::with_backend(
            backend,
            canonical,
            actual,
            block_device,
        ))
    }
}

impl Backend for FileBackend {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }

    fn write_at(&self, data: &[u8], offset: u64) -> io::Result<()> {
        self.file.write_all_at(data, offset)
    }

    fn write_bulk(&self, data: &[u8], offset: u64) -> io::Result<()> {
        match self.direct.as_ref().and_then(|d| d.write_at(data, offset)) {
            Some(r) => r,
            None => self.file.write_all_at(data, offset),
        }
    }

    fn zero(&self, offset: u64, len: u64, allocate: bool) -> io::Result<()> {
        block_device::file::zero_range(&self.file, self.block_device, offset, len, !allocate, false)
    }

    fn sync(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    /// A block device is all data; a file's holes are found with SEEK_DATA.
    fn data_extents(&self, offset: u64, end: u64) -> io::Result<Vec<(u64, u64)>> {
        if self.block_device {
            return Ok(vec![(offset, end)]);
        }
        Ok(
            block_device::file::extents(&self.file, offset, end, usize::MAX)?
                .into_iter()
                .filter(|r| r.2)
                .map(|r| (r.0, r.1))
                .collect(),
        )
    }

    fn identity(&self) -> (u64, u64) {
        match (self.file.metadata(), self.block_device) {
            (Ok(m), true) => (m.rdev(), 0),
            (Ok(m), false) => (m.dev(), m.ino()),
            (Err(_), _) => (0, 0),
        }
    }
}
