//! Where the native copy is written.
//!
//! [`Target`] is what the volume holds: a cheap handle that runs every I/O
//! of its [`Backend`] on the blocking pool (rule: never block the runtime).
//! A backend is positional reads and writes, a sync, zeroing, and, where it
//! can tell, which ranges hold data. Backends:
//!
//! - `file.rs`: a regular file (created sparse) or a block device, the
//!   only one `stream` serves from; hydration's writes bypass its page
//!   cache where the file system allows (`direct.rs`), from buffers that
//!   `stream`'s allocator starts on a block boundary (`alloc.rs`);
//! - `memory.rs`: bytes in memory with a durable image taken at each sync,
//!   for engine tests that crash without a disk;
//! - `fault.rs`: any backend with failures (ENOSPC, EIO) and scheduling
//!   delays injected, for the fault and randomized-schedule tests.

pub mod alloc;
pub mod direct;
pub mod fault;
pub mod file;
pub mod identity;
pub mod memory;

use std::fmt::Debug;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::state::TargetId;
use crate::watchdog::{Wait, waiting};

/// Blocking I/O on the native copy. Every method takes `&self`: the
/// backend serializes what needs it (positional I/O on a file needs
/// nothing).
pub trait Backend: Send + Sync + Debug + 'static {
    /// Fill `buf` from `offset`; the range is inside the target.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    fn write_at(&self, data: &[u8], offset: u64) -> io::Result<()>;
    /// A write nobody is about to read back (hydration): the backend may
    /// keep it out of the page cache (`direct.rs`). Same effect as
    /// `write_at` once it returns.
    fn write_bulk(&self, data: &[u8], offset: u64) -> io::Result<()> {
        self.write_at(data, offset)
    }
    /// Make `[offset, offset + len)` read as zeros; `allocate` keeps it
    /// provisioned (NBD's NO_HOLE).
    fn zero(&self, offset: u64, len: u64, allocate: bool) -> io::Result<()>;
    /// Make every completed write durable.
    fn sync(&self) -> io::Result<()>;
    /// Ranges of `[offset, end)` that may hold data. The default, "all of
    /// it", is always correct; a backend that knows its holes says so.
    fn data_extents(&self, offset: u64, end: u64) -> io::Result<Vec<(u64, u64)>> {
        Ok(vec![(offset, end)])
    }
    /// Device and inode (a file), or device number and 0 (a block device),
    /// recorded in the state so a replaced target is caught; 0, 0 if none.
    fn identity(&self) -> (u64, u64) {
        (0, 0)
    }
}

#[derive(Clone, Debug)]
pub struct Target {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    backend: Arc<dyn Backend>,
    path: PathBuf,
    block_device: bool,
    size: u64,
    /// Set while writes fail: since when, and the first error.
    failing: std::sync::Mutex<Option<(std::time::Instant, String)>>,
    failing_now: std::sync::atomic::AtomicBool,
}

/// The errno's name and what an operator does about it.
fn advice(e: &io::Error) -> String {
    match e.raw_os_error() {
        Some(libc::ENOSPC) => format!(
            "{e} (ENOSPC: the target is full; make room on its file system or give a larger \
             device: hydration pauses and retries, client writes to chunks not yet copied \
             fail with ENOSPC until then)"
        ),
        Some(libc::EDQUOT) => format!("{e} (EDQUOT: a disk quota is exhausted)"),
        Some(libc::EIO) => format!("{e} (EIO: the device failed; check the kernel log)"),
        Some(libc::EROFS) => format!("{e} (EROFS: the file system went read-only)"),
        _ => e.to_string(),
    }
}

impl Target {
    /// A target of `size` bytes on `backend`, named `path` in the state.
    pub fn with_backend(
        backend: Arc<dyn Backend>,
        path: PathBuf,
        size: u64,
        block_device: bool,
    ) -> Target {
        Target {
            inner: Arc::new(Inner {
                backend,
                path,
                block_device,
                size,
                failing: std::sync::Mutex::new(None),
                failing_now: std::sync::atomic::AtomicBool::new(false),
            }),
        }
    }

    /// How the target's writes are doing, for `stream status`: `Down` with
    /// the error and since when while writes fail.
    pub fn health(&self) -> crate::source::Health {
        match &*self.inner.failing.lock().expect("poisoned") {
            None => crate::source::Health::Up,
            Some((since, what)) => crate::source::Health::Down(format!(
                "writes failing for {:.0} s: {what}",
                since.elapsed().as_secs_f64()
            )),
        }
    }

    /// Log both edges of a run of failing writes, with the cause and the
    /// duration (issue 13: a full target was invisible in the log).
    fn note<T>(&self, op: &str, r: &io::Result<T>) {
        use std::sync::atomic::Ordering;
        match r {
            Ok(_) => {
                if !self.inner.failing_now.load(Ordering::Relaxed) {
                    return;
                }
                let mut f = self.inner.failing.lock().expect("poisoned");
                if let Some((since, what)) = f.take() {
                    self.inner.failing_now.store(false, Ordering::Relaxed);
                    tracing::info!(
                        "target {}: writes succeed again after {:.1} s of failures (the first: {what})",
                        self.inner.path.display(),
                        since.elapsed().as_secs_f64()
                    );
                }
            }
            Err(e) => {
                let mut f = self.inner.failing.lock().expect("poisoned");
                if f.is_none() {
                    let what = format!("{op} failed: {}", advice(e));
                    tracing::warn!("target {}: {what}", self.inner.path.display());
                    *f = Some((std::time::Instant::now(), what));
                    self.inner.failing_now.store(true, Ordering::Relaxed);
                }
            }
        }
    }

    pub fn id(&self, created_sparse: bool) -> TargetId {
        let (dev, ino) = self.inner.backend.identity();
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

    pub fn size(&self) -> u64 {
        self.inner.size
    }

    async fn blocking<T, F>(&self, f: F) -> io::Result<T>
    where
        F: FnOnce(&dyn Backend) -> io::Result<T> + Send + 'static,
        T: Send + 'static,
    {
        let inner = self.inner.clone();
        let io = tokio::task::spawn_blocking(move || f(inner.backend.as_ref()));
        waiting(Wait::Target, io).await.map_err(io::Error::other)?
    }

    pub async fn read_at(&self, offset: u64, len: usize) -> io::Result<Vec<u8>> {
        self.blocking(move |b| {
            let mut buf = vec![0u8; len];
            b.read_at(&mut buf, offset)?;
            Ok(buf)
        })
        .await
    }

    /// Write `data` at `offset` and hand the buffer back.
    pub async fn write_at(&self, offset: u64, data: Vec<u8>) -> io::Result<Vec<u8>> {
        self.write(offset, data, false).await
    }

    /// [`Target::write_at`] for bytes nobody is about to read back
    /// (hydration): kept out of the page cache where the backend can.
    pub async fn write_bulk(&self, offset: u64, data: Vec<u8>) -> io::Result<Vec<u8>> {
        self.write(offset, data, true).await
    }

    async fn write(&self, offset: u64, data: Vec<u8>, bulk: bool) -> io::Result<Vec<u8>> {
        let r = self
            .blocking(move |b| {
                if bulk {
                    b.write_bulk(&data, offset)?;
                } else {
                    b.write_at(&data, offset)?;
                }
                Ok(data)
            })
            .await;
        self.note("a write", &r);
        r
    }

    /// Make `[offset, offset + len)` read as zeros; `allocate` keeps it
    /// provisioned (NBD's NO_HOLE).
    pub async fn zero(&self, offset: u64, len: u64, allocate: bool) -> io::Result<()> {
        let r = self.blocking(move |b| b.zero(offset, len, allocate)).await;
        self.note("zeroing", &r);
        r
    }

    pub async fn sync(&self) -> io::Result<()> {
        let inner = self.inner.clone();
        let io = tokio::task::spawn_blocking(move || inner.backend.sync());
        let r = waiting(Wait::TargetSync, io)
            .await
            .map_err(io::Error::other)
            .and_then(|r| r);
        self.note("a sync", &r);
        r
    }

    /// Data extents of `[offset, end)` (blocking: call it off the runtime).
    pub fn data_extents(&self, offset: u64, end: u64) -> io::Result<Vec<(u64, u64)>> {
        self.inner.backend.data_extents(offset, end)
    }
}
