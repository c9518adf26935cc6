//! The target: a regular file (created sparse with the source's size when
//! missing) or an existing block device at least as large as the source.
//!
//! It holds raw disk data only; everything else lives in the state
//! directory. All I/O runs on the blocking pool.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::state::TargetId;

#[derive(Clone, Debug)]
pub struct Target {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    file: File,
    path: PathBuf,
    block_device: bool,
    size: u64,
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
                let f = OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create_new(true)
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
        let canonical = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
        Ok((
            Target {
                inner: Arc::new(Inner {
                    file,
                    path: canonical,
                    block_device,
                    size: actual,
                }),
            },
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
        Ok(Target {
            inner: Arc::new(Inner {
                file,
                path: canonical,
                block_device,
                size: actual,
            }),
        })
    }

    pub fn id(&self, created_sparse: bool) -> TargetId {
        let meta = self.inner.file.metadata().ok();
        let (dev, ino) = match (&meta, self.inner.block_device) {
            (Some(m), true) => (m.rdev(), 0),
            (Some(m), false) => (m.dev(), m.ino()),
            (None, _) => (0, 0),
        };
        TargetId {
            path: self.inner.path.display().to_string(),
            kind: if self.inner.block_device {
                "block"
            } else {
                "file"
            }
            .into(),
            size: self.inner.size,
            dev,
            ino,
            created_sparse,
        }
    }

    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    pub fn is_block_device(&self) -> bool {
        self.inner.block_device
    }

    async fn blocking<T, F>(&self, f: F) -> io::Result<T>
    where
        F: FnOnce(&Inner) -> io::Result<T> + Send + 'static,
        T: Send + 'static,
    {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || f(&inner))
            .await
            .map_err(io::Error::other)?
    }

    pub async fn read_at(&self, offset: u64, len: usize) -> io::Result<Vec<u8>> {
        self.blocking(move |t| {
            let mut buf = vec![0u8; len];
            t.file.read_exact_at(&mut buf, offset)?;
            Ok(buf)
        })
        .await
    }

    /// Write `data` at `offset` and hand the buffer back.
    pub async fn write_at(&self, offset: u64, data: Vec<u8>) -> io::Result<Vec<u8>> {
        self.blocking(move |t| {
            t.file.write_all_at(&data, offset)?;
            Ok(data)
        })
        .await
    }

    /// Make `[offset, offset + len)` read as zeros; `allocate` keeps it
    /// provisioned (NBD's NO_HOLE).
    pub async fn zero(&self, offset: u64, len: u64, allocate: bool) -> io::Result<()> {
        self.blocking(move |t| {
            nbd_server::file::zero_range(&t.file, t.block_device, offset, len, !allocate, false)
        })
        .await
    }

    pub async fn sync(&self) -> io::Result<()> {
        self.blocking(|t| t.file.sync_data()).await
    }

    /// Data extents of `[offset, end)` (a block device is all data).
    pub fn data_extents(&self, offset: u64, end: u64) -> io::Result<Vec<(u64, u64)>> {
        if self.inner.block_device {
            return Ok(vec![(offset, end)]);
        }
        Ok(
            nbd_server::file::extents(&self.inner.file, offset, end, usize::MAX)?
                .into_iter()
                .filter(|r| r.2)
                .map(|r| (r.0, r.1))
                .collect(),
        )
    }
}
