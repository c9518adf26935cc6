//! A regular file or block device as a [`BlockDevice`].
//!
//! Holes are found with `SEEK_DATA`/`SEEK_HOLE` (block devices report all
//! data through the kernel's generic implementation), so sparse files are
//! served with hole chunks and reported through block status without being
//! read. To keep the common case (reading allocated data) at one syscall,
//! the last data extent found is remembered; only trim and write-zeroes can
//! turn data into a hole, and they forget it.
//!
//! Trim punches holes; write-zeroes punches (when a hole is allowed) or
//! uses `FALLOC_FL_ZERO_RANGE`, and falls back to writing zeros from one
//! shared buffer, so a 64 MiB request never allocates 64 MiB. A fast-zero
//! request that has no fast path answers `ENOTSUP` without writing. On a
//! block device the kernel's `PUNCH_HOLE` is exactly "zero without falling
//! back to writes", which is the fast path NBD asks for.
//!
//! All I/O runs on tokio's blocking pool; the async threads never touch the
//! file. The device never changes the file's size.

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use crate::{BlockDevice, Capabilities, Extent, Piece, ZeroFlags};

/// Most extents one block status call reports; clients ask again.
const MAX_EXTENTS: usize = 4096;
/// Piece size of the write-zeroes fallback.
const ZERO_BUF: usize = 1 << 20;
static ZEROS: [u8; ZERO_BUF] = [0; ZERO_BUF];

#[derive(Debug)]
struct Inner {
    file: File,
    path: PathBuf,
    size: u64,
    block_device: bool,
    writable: bool,
    /// `[start, end)` of the last extent `SEEK_DATA`/`SEEK_HOLE` showed to
    /// be data. Writes only ever add data, so it stays true until a trim or
    /// write-zeroes, which reset it.
    known_data: Mutex<(u64, u64)>,
}

/// A file or block device served as is.
#[derive(Clone, Debug)]
pub struct FileDevice {
    inner: Arc<Inner>,
}

impl FileDevice {
    /// Open `path` (a regular file or a block device), read-only unless
    /// `writable`.
    pub fn open(path: &Path, writable: bool) -> io::Result<FileDevice> {
        let mut file = OpenOptions::new()
            .read(true)
            .write(writable)
            .open(path)
            .map_err(|e| {
                io::Error::new(e.kind(), format!("cannot open {}: {e}", path.display()))
            })?;
        let ft = file.metadata()?.file_type();
        let block_device = ft.is_block_device();
        if !ft.is_file() && !block_device {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "{} is neither a regular file nor a block device",
                    path.display()
                ),
            ));
        }
        let size = file.seek(SeekFrom::End(0))?;
        Ok(FileDevice {
            inner: Arc::new(Inner {
                file,
                path: path.to_path_buf(),
                size,
                block_device,
                writable,
                known_data: Mutex::new((0, 0)),
            }),
        })
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
}

fn errno(e: i32) -> io::Error {
    io::Error::from_raw_os_error(e)
}

/// `lseek(SEEK_DATA/SEEK_HOLE)`; `None` for ENXIO (no data past `off`).
fn seek(file: &File, off: u64, whence: i32) -> io::Result<Option<u64>> {
    // SAFETY: lseek on an fd we own; it does not touch memory.
    let r = unsafe { libc::lseek64(file.as_raw_fd(), off as i64, whence) };
    if r < 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::ENXIO) {
            return Ok(None);
        }
        return Err(e);
    }
    Ok(Some(r as u64))
}

/// The allocation of `[off, end)` of a regular file as `(start, end,
/// is_data)` runs, at most `max` of them, from `SEEK_DATA`/`SEEK_HOLE`.
pub fn extents(file: &File, off: u64, end: u64, max: usize) -> io::Result<Vec<(u64, u64, bool)>> {
    let mut out = Vec::new();
    let mut at = off;
    while at < end && out.len() < max {
        let data = seek(file, at, libc::SEEK_DATA)?.unwrap_or(end).min(end);
        if data > at {
            out.push((at, data, false));
            at = data;
            continue;
        }
        let hole = seek(file, at, libc::SEEK_HOLE)?.unwrap_or(end).min(end);
        if hole <= at {
            // Raced with a concurrent change; report the rest as data.
            out.push((at, end, true));
            break;
        }
        out.push((at, hole, true));
        at = hole;
    }
    Ok(out)
}

fn fallocate(file: &File, mode: i32, off: u64, len: u64) -> io::Result<()> {
    // SAFETY: fallocate on an fd we own; no memory is passed.
    let r = unsafe { libc::fallocate64(file.as_raw_fd(), mode, off as i64, len as i64) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Deallocate `[off, off + len)`; it reads as zeros afterwards. On a block
/// device the kernel zeroes without falling back to writes, or fails.
pub fn punch_hole(file: &File, off: u64, len: u64) -> io::Result<()> {
    fallocate(
        file,
        libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
        off,
        len,
    )
}

/// Make `[off, off + len)` read as zeros, by the fastest means allowed:
/// a punched hole when `may_trim` (or on a block device, where punching is
/// the no-fallback zeroing), `FALLOC_FL_ZERO_RANGE`, and only then writing
/// zeros from one shared 1 MiB buffer. With `fast`, `EOPNOTSUPP` instead
/// of writing.
pub fn zero_range(
    file: &File,
    block_device: bool,
    off: u64,
    len: u64,
    may_trim: bool,
    fast: bool,
) -> io::Result<()> {
    let unsupported = |e: &io::Error| {
        matches!(
            e.raw_os_error(),
            Some(libc::EOPNOTSUPP | libc::ENOSYS | libc::EINVAL)
        )
    };
    if may_trim || block_device {
        match punch_hole(file, off, len) {
            Ok(()) => return Ok(()),
            Err(e) if !unsupported(&e) => return Err(e),
            Err(_) if fast && block_device => return Err(errno(libc::EOPNOTSUPP)),
            Err(_) => {}
        }
    }
    // ZERO_RANGE may fall back to writes inside the kernel on a block
    // device; on a file system it allocates unwritten extents (fast).
    match fallocate(
        file,
        libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
        off,
        len,
    ) {
        Ok(()) => return Ok(()),
        Err(e) if !unsupported(&e) => return Err(e),
        Err(_) => {}
    }
    if fast {
        return Err(errno(libc::EOPNOTSUPP));
    }
    let mut at = off;
    let end = off + len;
    while at < end {
        let n = usize::try_from(end - at).map_or(ZERO_BUF, |n| n.min(ZERO_BUF));
        file.write_all_at(&ZEROS[..n], at)?;
        at += n as u64;
    }
    Ok(())
}

impl Inner {
    fn fd(&self) -> i32 {
        self.file.as_raw_fd()
    }

    /// The extents of `[off, end)`, remembering the last data extent.
    fn map(&self, off: u64, end: u64, max: usize) -> io::Result<Vec<(u64, u64, bool)>> {
        if self.block_device {
            return Ok(vec![(off, end, true)]);
        }
        let runs = extents(&self.file, off, end, max)?;
        if let Some(&(s, e, true)) = runs.iter().rev().find(|r| r.2) {
            *self.known_data.lock().expect("poisoned") = (s, e);
        }
        Ok(runs)
    }

    /// Whether `[off, end)` lies in one data extent, remembering the whole
    /// extent (not clipped to this request) so later reads inside it skip
    /// the lookup: on a fully allocated file one lookup serves every read.
    fn all_data(&self, off: u64, end: u64) -> io::Result<bool> {
        if self.block_device {
            return Ok(true);
        }
        let (ks, ke) = *self.known_data.lock().expect("poisoned");
        if ks <= off && end <= ke {
            return Ok(true);
        }
        if seek(&self.file, off, libc::SEEK_DATA)? != Some(off) {
            return Ok(false);
        }
        let hole = seek(&self.file, off, libc::SEEK_HOLE)?.unwrap_or(self.size);
        if hole > off {
            *self.known_data.lock().expect("poisoned") = (off, hole);
        }
        Ok(end <= hole)
    }

    fn read(&self, off: u64, len: u64) -> io::Result<Vec<Piece>> {
        let end = off + len;
        let runs = if self.all_data(off, end)? {
            vec![(off, end, true)]
        } else {
            self.map(off, end, usize::MAX)?
        };
        let mut pieces = Vec::with_capacity(runs.len());
        for (s, e, data) in runs {
            if data {
                let len =
                    usize::try_from(e - s).expect("a run of one read: at most u32::MAX bytes");
                let mut buf = vec![0u8; len];
                self.file.read_exact_at(&mut buf, s)?;
                pieces.push(Piece::Data(buf));
            } else {
                pieces.push(Piece::Zero(e - s));
            }
        }
        Ok(pieces)
    }

    fn fallocate(&self, mode: i32, off: u64, len: u64) -> io::Result<()> {
        // SAFETY: fallocate on an fd we own; no memory is passed.
        let r = unsafe { libc::fallocate64(self.fd(), mode, off as i64, len as i64) };
        if r < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        }
    }

    fn forget_known_data(&self) {
        *self.known_data.lock().expect("poisoned") = (0, 0);
    }

    fn punch(&self, off: u64, len: u64) -> io::Result<()> {
        self.forget_known_data();
        self.fallocate(
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            off,
            len,
        )
    }

    fn write_zeroes(&self, off: u64, len: u64, flags: ZeroFlags) -> io::Result<()> {
        let unsupported = |e: &io::Error| {
            matches!(
                e.raw_os_error(),
                Some(libc::EOPNOTSUPP | libc::ENOSYS | libc::EINVAL)
            )
        };
        if self.block_device {
            // PUNCH_HOLE on a block device zeroes without falling back to
            // writing (BLKDEV_ZERO_NOFALLBACK): the fast path. ZERO_RANGE may
            // fall back to writes inside the kernel, which is still correct.
            match self.punch(off, len) {
                Ok(()) => return self.sync_if(flags.fua),
                Err(e) if !unsupported(&e) => return Err(e),
                Err(_) if flags.fast => return Err(errno(libc::EOPNOTSUPP)),
                Err(_) => {}
            }
            match self.fallocate(
                libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
                off,
                len,
            ) {
                Ok(()) => return self.sync_if(flags.fua),
                Err(e) if !unsupported(&e) => return Err(e),
                Err(_) => {}
            }
        } else {
            if flags.may_trim {
                match self.punch(off, len) {
                    Ok(()) => return self.sync_if(flags.fua),
                    Err(e) if !unsupported(&e) => return Err(e),
                    Err(_) => {}
                }
            }
            self.forget_known_data();
            match self.fallocate(
                libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
                off,
                len,
            ) {
                Ok(()) => return self.sync_if(flags.fua),
                Err(e) if !unsupported(&e) => return Err(e),
                Err(_) => {}
            }
        }
        if flags.fast {
            return Err(errno(libc::EOPNOTSUPP));
        }
        let mut at = off;
        let end = off + len;
        while at < end {
            let n = usize::try_from(end - at).map_or(ZERO_BUF, |n| n.min(ZERO_BUF));
            self.file.write_all_at(&ZEROS[..n], at)?;
            at += n as u64;
        }
        self.sync_if(flags.fua)
    }

    fn sync_if(&self, fua: bool) -> io::Result<()> {
        if fua { self.file.sync_data() } else { Ok(()) }
    }

    fn check_range(&self, off: u64, len: u64) -> io::Result<()> {
        match off.checked_add(len) {
            Some(end) if end <= self.size => Ok(()),
            _ => Err(errno(if self.writable {
                libc::ENOSPC
            } else {
                libc::EINVAL
            })),
        }
    }
}

impl BlockDevice for FileDevice {
    fn size(&self) -> u64 {
        self.inner.size
    }

    fn capabilities(&self) -> Capabilities {
        let w = self.inner.writable;
        Capabilities {
            write: w,
            flush: true,
            fua: w,
            trim: w,
            zero: w,
            fast_zero: w,
            cache: true,
            extents: !self.inner.block_device,
            // One fd and one page cache behind every connection: a flush on
            // any connection covers writes made on all of them.
            multi_conn: true,
            rotational: false,
        }
    }

    async fn read(&self, offset: u64, len: u32) -> io::Result<Vec<Piece>> {
        self.blocking(move |f| {
            f.check_range(offset, u64::from(len))?;
            f.read(offset, u64::from(len))
        })
        .await
    }

    async fn write(&self, offset: u64, data: Vec<u8>, fua: bool) -> io::Result<()> {
        if !self.inner.writable {
            return Err(errno(libc::EPERM));
        }
        self.blocking(move |f| {
            f.check_range(offset, data.len() as u64)?;
            f.file.write_all_at(&data, offset)?;
            f.sync_if(fua)
        })
        .await
    }

    async fn flush(&self) -> io::Result<()> {
        if !self.inner.writable {
            return Ok(());
        }
        self.blocking(|f| f.file.sync_data()).await
    }

    async fn trim(&self, offset: u64, len: u64, fua: bool) -> io::Result<()> {
        if !self.inner.writable {
            return Err(errno(libc::EPERM));
        }
        self.blocking(move |f| {
            f.check_range(offset, len)?;
            match f.punch(offset, len) {
                // Trim is advisory: a file system that cannot punch holes
                // simply keeps the data.
                Err(e) if matches!(e.raw_os_error(), Some(libc::EOPNOTSUPP | libc::ENOSYS)) => {
                    Ok(())
                }
                r => r.and_then(|()| f.sync_if(fua)),
            }
        })
        .await
    }

    async fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> io::Result<()> {
        if !self.inner.writable {
            return Err(errno(libc::EPERM));
        }
        self.blocking(move |f| {
            f.check_range(offset, len)?;
            f.write_zeroes(offset, len, flags)
        })
        .await
    }

    async fn cache(&self, offset: u64, len: u64) -> io::Result<()> {
        self.blocking(move |f| {
            // SAFETY: fadvise on an fd we own; a hint only.
            unsafe {
                libc::posix_fadvise64(f.fd(), offset as i64, len as i64, libc::POSIX_FADV_WILLNEED)
            };
            Ok(())
        })
        .await
    }

    async fn block_status(&self, offset: u64, len: u64) -> io::Result<Vec<Extent>> {
        self.blocking(move |f| {
            let end = offset.saturating_add(len).min(f.size);
            let runs = f.map(offset, end, MAX_EXTENTS)?;
            Ok(runs
                .into_iter()
                .map(|(s, e, data)| {
                    if data {
                        Extent::data(e - s)
                    } else {
                        Extent::hole(e - s)
                    }
                })
                .collect())
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flatten;

    fn sparse_file(dir: &tempfile::TempDir) -> PathBuf {
        // 1 MiB: data at [0, 64K) and [512K, 576K), holes elsewhere.
        let p = dir.path().join("disk.img");
        let f = File::create(&p).unwrap();
        f.set_len(1 << 20).unwrap();
        f.write_all_at(&[0xaa; 65536], 0).unwrap();
        f.write_all_at(&[0xbb; 65536], 512 * 1024).unwrap();
        f.sync_all().unwrap();
        p
    }

    #[tokio::test]
    async fn read_of_a_hole_is_a_zero_piece_and_data_is_read() {
        let dir = tempfile::tempdir().unwrap();
        let dev = FileDevice::open(&sparse_file(&dir), false).unwrap();
        let pieces = dev.read(60 * 1024, 8192).await.unwrap();
        assert_eq!(pieces[0], Piece::Data(vec![0xaa; 4096]));
        assert_eq!(pieces[1], Piece::Zero(4096));
        let all = flatten(dev.read(0, 1 << 20).await.unwrap());
        assert_eq!(all.len(), 1 << 20);
        assert!(all[512 * 1024..576 * 1024].iter().all(|&b| b == 0xbb));
        assert!(all[65536..512 * 1024].iter().all(|&b| b == 0));
    }

    #[tokio::test]
    async fn block_status_reports_holes_as_hole_and_zero() {
        let dir = tempfile::tempdir().unwrap();
        let dev = FileDevice::open(&sparse_file(&dir), false).unwrap();
        let ex = dev.block_status(0, 1 << 20).await.unwrap();
        assert_eq!(
            ex,
            vec![
                Extent::data(65536),
                Extent::hole(448 * 1024),
                Extent::data(65536),
                Extent::hole(448 * 1024),
            ]
        );
    }

    #[tokio::test]
    async fn trim_punches_a_hole_and_reads_see_it() {
        let dir = tempfile::tempdir().unwrap();
        let dev = FileDevice::open(&sparse_file(&dir), true).unwrap();
        // Prime the known-data extent, then trim inside it.
        dev.read(0, 4096).await.unwrap();
        dev.trim(0, 32768, false).await.unwrap();
        let pieces = dev.read(0, 65536).await.unwrap();
        assert_eq!(pieces[0], Piece::Zero(32768));
        assert_eq!(
            dev.block_status(0, 65536).await.unwrap()[0],
            Extent::hole(32768)
        );
    }

    #[tokio::test]
    async fn write_zeroes_without_hole_allocates_and_reads_zero() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let p = sparse_file(&dir);
        let dev = FileDevice::open(&p, true).unwrap();
        let blocks_before = std::fs::metadata(&p).unwrap().blocks();
        let flags = ZeroFlags {
            may_trim: false,
            fast: false,
            fua: true,
        };
        // Inside a hole: NO_HOLE means the range ends up allocated (ext4
        // keeps it as an unwritten extent, which SEEK_DATA may still call a
        // hole; what matters is the allocation and the zeros).
        dev.write_zeroes(128 * 1024, 65536, flags).await.unwrap();
        let data = flatten(dev.read(128 * 1024, 65536).await.unwrap());
        assert!(data.iter().all(|&b| b == 0));
        assert!(std::fs::metadata(&p).unwrap().blocks() >= blocks_before + 128);
    }

    #[tokio::test]
    async fn writes_past_the_end_fail_and_never_grow_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = sparse_file(&dir);
        let dev = FileDevice::open(&p, true).unwrap();
        let e = dev
            .write((1 << 20) - 1, vec![1, 2], false)
            .await
            .unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ENOSPC));
        let flags = ZeroFlags::default();
        assert!(dev.write_zeroes(1 << 20, 4096, flags).await.is_err());
        assert_eq!(std::fs::metadata(&p).unwrap().len(), 1 << 20);
    }

    #[tokio::test]
    async fn read_only_device_refuses_writes_with_eperm() {
        let dir = tempfile::tempdir().unwrap();
        let dev = FileDevice::open(&sparse_file(&dir), false).unwrap();
        let e = dev.write(0, vec![1], false).await.unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EPERM));
        assert!(!dev.capabilities().write);
    }

    #[test]
    fn a_directory_is_refused_with_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let e = FileDevice::open(dir.path(), false).unwrap_err();
        assert!(
            e.to_string()
                .contains("neither a regular file nor a block device")
        );
    }
}
