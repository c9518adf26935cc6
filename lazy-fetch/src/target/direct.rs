//! Writes that bypass the page cache (`O_DIRECT`), for hydration.
//!
//! Hydration writes the whole disk once, and nobody is about to read what
//! it writes. Through the page cache every byte is copied by the kernel
//! into a fresh page (half of `stream start`'s CPU while hydrating, issue
//! 19's profile), written back later, and the final sync waits for that
//! writeback; concurrent buffered writes also spin on the file's inode
//! lock. A direct write hands the buffer to the device instead. Reads that
//! clients are waiting for (foreground fetches, readahead, CACHE) still go
//! through the page cache, where the client's next read finds them.
//!
//! `O_DIRECT` needs the offset, the length and the buffer aligned to the
//! device's logical block; 4 KiB covers every device we write to (the
//! smallest chunk is 4 KiB, so whole chunks always are). A buffer that
//! already starts on the boundary is written as it is: with `stream`'s
//! allocator (`alloc.rs`) the source's reply buffers do. Any other comes
//! through a small pool of aligned buffers: one copy in user space instead
//! of one in the kernel. Where the file system refuses `O_DIRECT` (at open or
//! with `EINVAL` at the first write), writes go through the page cache as
//! before; nothing is written twice differently, since a refused direct
//! write wrote nothing.
//!
//! Mixing direct and buffered I/O on one file is coherent on Linux: a
//! direct write first writes back and afterwards drops the page-cache
//! pages of its range. The chunk locks keep a buffered write and a direct
//! write from ever covering the same chunk at the same time (invariant 2
//! in `volume/mod.rs`: every change to a chunk holds its lock).

use std::alloc::Layout;
use std::fs::File;
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::ptr::NonNull;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

/// Alignment of offsets, lengths and buffers.
const ALIGN: usize = 4096;

/// Buffers kept for reuse (as many as hydration has runs in flight).
const POOL: usize = 8;

/// A second handle on the target opened with `O_DIRECT`.
#[derive(Debug)]
pub struct Direct {
    file: File,
    pool: Mutex<Vec<Aligned>>,
    /// Set when the file system refused a direct write: buffered from then on.
    refused: AtomicBool,
}

impl Direct {
    /// Reopen `file` (the same inode, through `/proc/self/fd`) with
    /// `O_DIRECT`; `None` where the file system does not allow it.
    pub fn open(file: &File) -> Option<Direct> {
        use std::os::fd::AsRawFd;
        let path = format!("/proc/self/fd/{}", file.as_raw_fd());
        match std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(&path)
        {
            Ok(file) => Some(Direct {
                file,
                pool: Mutex::new(Vec::new()),
                refused: AtomicBool::new(false),
            }),
            Err(e) => {
                tracing::debug!("target: no O_DIRECT ({e}); hydration writes are buffered");
                None
            }
        }
    }

    /// Write `data` at `offset` directly if it is aligned; `None` if it was
    /// not attempted (unaligned, or direct writes were refused), and the
    /// caller writes it through the page cache.
    pub fn write_at(&self, data: &[u8], offset: u64) -> Option<io::Result<()>> {
        let aligned = offset % ALIGN as u64 == 0 && data.len() % ALIGN == 0 && !data.is_empty();
        if !aligned || self.refused.load(Ordering::Relaxed) {
            return None;
        }
        let r = if data.as_ptr().align_offset(ALIGN) == 0 {
            // Already on the boundary (`alloc.rs`): no copy.
            self.file.write_all_at(data, offset)
        } else {
            let mut buf = self.take(data.len())?;
            buf.as_mut_slice(data.len()).copy_from_slice(data);
            let r = self.file.write_all_at(buf.as_slice(data.len()), offset);
            self.give(buf);
            r
        };
        match r {
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                if !self.refused.swap(true, Ordering::Relaxed) {
                    tracing::info!(
                        "target: the file system refused a direct write ({e}); \
                         hydration writes go through the page cache"
                    );
                }
                None
            }
            r => Some(r),
        }
    }

    /// An aligned buffer of at least `len` bytes: a pooled one, or a new one
    /// (`None` if memory cannot be had).
    fn take(&self, len: usize) -> Option<Aligned> {
        let mut pool = self.pool.lock().expect("poisoned");
        if let Some(i) = pool.iter().position(|b| b.len >= len) {
            return Some(pool.swap_remove(i));
        }
        drop(pool);
        Aligned::new(len)
    }

    fn give(&self, buf: Aligned) {
        let mut pool = self.pool.lock().expect("poisoned");
        if pool.len() < POOL {
            pool.push(buf);
        } else if let Some(i) = pool.iter().position(|b| b.len < buf.len) {
            // Keep the larger one.
            pool[i] = buf;
        }
    }
}

/// `len` bytes aligned to [`ALIGN`], uninitialised until written.
#[derive(Debug)]
struct Aligned {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: an owned allocation, like a Vec<u8>.
unsafe impl Send for Aligned {}

impl Aligned {
    fn layout(len: usize) -> Option<Layout> {
        Layout::from_size_align(len, ALIGN).ok()
    }

    fn new(len: usize) -> Option<Aligned> {
        let layout = Aligned::layout(len)?;
        // SAFETY: `len` is non-zero (the caller writes at least one block).
        let ptr = NonNull::new(unsafe { std::alloc::alloc(layout) })?;
        Some(Aligned { ptr, len })
    }

    /// The first `n` bytes, to fill. Writing through it initialises them.
    fn as_mut_slice(&mut self, n: usize) -> &mut [u8] {
        assert!(n <= self.len);
        // SAFETY: in bounds of our allocation; u8 has no invalid values, and
        // the caller overwrites the slice before reading it (copy_from_slice).
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), n) }
    }

    fn as_slice(&self, n: usize) -> &[u8] {
        assert!(n <= self.len);
        // SAFETY: in bounds; filled by `as_mut_slice` before every use.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), n) }
    }
}

impl Drop for Aligned {
    fn drop(&mut self) {
        let layout = Aligned::layout(self.len).expect("made from it");
        // SAFETY: allocated in `new` with this layout.
        unsafe { std::alloc::dealloc(self.ptr.as_ptr(), layout) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_buffers_go_as_they_are_others_through_the_pool_unaligned_ranges_to_the_caller() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.img");
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        f.set_len(1 << 20).unwrap();
        let Some(d) = Direct::open(&f) else {
            // tmpfs before Linux 6.6 refuses O_DIRECT: nothing to test there.
            return;
        };
        // The same bytes at an address on the boundary and at one off it,
        // whatever the allocator does.
        let mut space = vec![0u8; 65536 + 2 * ALIGN];
        let at = space.as_ptr().align_offset(ALIGN);
        for (i, b) in space.iter_mut().enumerate() {
            *b = u8::try_from(i.wrapping_sub(at) % 251).expect("below 251");
        }
        let on = &space[at..at + 65536];
        let off = &space[at + 16..at + 16 + 65536];
        // On the boundary: written as it is, no pooled buffer taken.
        d.write_at(on, 65536).unwrap().unwrap();
        assert!(d.pool.lock().unwrap().is_empty());
        let mut back = vec![0u8; 65536];
        f.read_exact_at(&mut back, 65536).unwrap();
        assert_eq!(back, on);
        assert!(d.write_at(&on[..4000], 0).is_none());
        assert!(d.write_at(on, 100).is_none());
        // Off it: copied through a pooled buffer, which is reused.
        d.write_at(off, 0).unwrap().unwrap();
        d.write_at(off, 0).unwrap().unwrap();
        assert_eq!(d.pool.lock().unwrap().len(), 1);
        f.read_exact_at(&mut back, 0).unwrap();
        assert_eq!(back, off);
    }
}
