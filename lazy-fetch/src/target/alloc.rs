//! A global allocator that hands out large buffers on a page boundary, so
//! hydration's direct writes (`direct.rs`) need no copy.
//!
//! A write that bypasses the page cache needs its buffer aligned to the
//! device's block. The bytes hydration writes are the source's reply
//! buffer (a `Vec<u8>` the NBD client reads the payload into), and a
//! `Vec`'s alignment cannot be chosen; `direct.rs` therefore copied every
//! run into an aligned buffer, a quarter of hydration's CPU (issue 19's
//! profile). With this allocator installed (`stream` does, in `main.rs`),
//! every allocation of [`LARGE`] bytes or more is its own anonymous
//! mapping, page-aligned by construction, so a fetched run goes to the disk
//! as it is. Without it, or for any buffer that is not aligned, `direct.rs`
//! copies as before: alignment here is a speed-up, never a condition.
//!
//! A fresh mapping is faulted in page by page, which is what made glibc's
//! own large blocks expensive (a 1 GiB hydration took 53 000 minor faults,
//! and `posix_memalign` was worse: its blocks never raise glibc's dynamic
//! mmap threshold, 264 000 faults, and kept in its heaps they tripled the
//! peak RSS). Freed large blocks are therefore kept, up to [`CACHE_BYTES`]
//! in all, and handed out again for a request of the same size class (the
//! next power of two); a block freed when the table is full pushes out
//! blocks of other classes, since the sizes in use change (a sparse disk's
//! short runs, block status replies, then whole runs). Hydration's runs
//! fall in a few classes, so their pages stay mapped (2 800 faults for the
//! same 1 GiB), and the peak RSS is bounded by what is in use plus the
//! cache.
//!
//! Small allocations are glibc's `malloc`, as Rust's system allocator uses
//! it.

use std::alloc::{GlobalAlloc, Layout};
use std::ptr::null_mut;
use std::sync::Mutex;

/// Allocations of at least this many bytes are page-aligned mappings: the
/// smallest chunk is 4 KiB and hydration's runs are whole chunks; below
/// this a mapping per allocation would cost more than it saves.
pub const LARGE: usize = 64 * 1024;

/// The alignment direct I/O needs on every device we write to (a page:
/// every mapping starts on one).
pub const BOUNDARY: usize = 4096;

/// Freed large blocks kept for reuse, in bytes (a hydration run is up to
/// 2 MiB, with up to 8 in flight).
pub const CACHE_BYTES: usize = 16 << 20;

/// Most blocks kept (a fixed table: the allocator cannot allocate).
const SLOTS: usize = 64;

/// What `malloc` guarantees on the platforms we build for (x86-64 and
/// aarch64 glibc).
const MALLOC_ALIGN: usize = 16;

/// See the [module documentation](self).
pub struct BlockAligned;

/// Kept mappings: (address, class length), length 0 for an empty slot.
struct Cache {
    slots: [(usize, usize); SLOTS],
    bytes: usize,
}

static CACHE: Mutex<Cache> = Mutex::new(Cache {
    slots: [(0, 0); SLOTS],
    bytes: 0,
});

fn cache() -> std::sync::MutexGuard<'static, Cache> {
    // Nothing panics while holding it; a poisoned table is still consistent.
    CACHE.lock().unwrap_or_else(|p| p.into_inner())
}

/// The length of the mapping that serves `size` bytes: the next power of
/// two, so blocks of nearby sizes share a class and a kept block fits the
/// next request of its class (runs of 1 to 16 chunks, block status replies
/// and client reads all vary). The pages past `size` are address space
/// only: nothing touches them.
fn rounded(size: usize) -> usize {
    size.next_power_of_two()
}

/// Whether a layout is served by a mapping (decided from the layout alone,
/// so `dealloc` and `realloc` agree with `alloc`).
fn is_large(layout: Layout) -> bool {
    layout.size() >= LARGE && layout.align() <= BOUNDARY
}

/// A mapping of `len` (a class's) bytes: a kept one, or a fresh one (zeroed).
/// Returns the pointer and whether it is fresh.
fn map(len: usize) -> (*mut u8, bool) {
    {
        let mut c = cache();
        if let Some(s) = c.slots.iter_mut().find(|s| s.1 == len) {
            let p = s.0 as *mut u8;
            *s = (0, 0);
            c.bytes -= len;
            return (p, false);
        }
    }
    // SAFETY: an anonymous private mapping; no file, no fixed address.
    let p = unsafe {
        libc::mmap(
            null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        (null_mut(), true)
    } else {
        (p.cast(), true)
    }
}

/// Give back a mapping of `len` (a class's) bytes: kept, making room by
/// unmapping kept blocks of other classes first (the classes in use
/// change: a table full of small blocks must not turn away the runs), and
/// unmapped if it cannot be kept.
fn unmap(p: *mut u8, len: usize) {
    let mut out = [(0usize, 0usize); SLOTS + 1];
    let mut n = 0;
    {
        let mut c = cache();
        if len <= CACHE_BYTES {
            loop {
                let room = c.bytes + len <= CACHE_BYTES;
                if room {
                    if let Some(s) = c.slots.iter_mut().find(|s| s.1 == 0) {
                        *s = (p as usize, len);
                        c.bytes += len;
                        break;
                    }
                }
                // Evict one: another class if any, else one of this class.
                let victim = c
                    .slots
                    .iter()
                    .position(|s| s.1 != 0 && s.1 != len)
                    .or_else(|| c.slots.iter().position(|s| s.1 != 0))
                    .expect("a full table or too many bytes means a kept block");
                out[n] = c.slots[victim];
                n += 1;
                c.bytes -= c.slots[victim].1;
                c.slots[victim] = (0, 0);
            }
        } else {
            out[n] = (p as usize, len);
            n += 1;
        }
    }
    for &(q, l) in &out[..n] {
        // SAFETY: a mapping of `l` bytes made by `map`, no longer used (it
        // left the table, or was never kept).
        unsafe { libc::munmap(q as *mut libc::c_void, l) };
    }
}

// SAFETY: small blocks are glibc's, with at least the layout's size and
// alignment (posix_memalign above malloc's alignment), released with
// `free`. Large blocks are page-aligned anonymous mappings of their size
// class (alignment up to a page), released to the cache or with `munmap`;
// which kind a block is follows from its layout, which the caller passes
// unchanged to `dealloc` and `realloc`.
unsafe impl GlobalAlloc for BlockAligned {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if is_large(layout) {
            return map(rounded(layout.size())).0;
        }
        if layout.align() <= MALLOC_ALIGN {
            // SAFETY: plain malloc, as the system allocator does.
            return unsafe { libc::malloc(layout.size()) }.cast();
        }
        let mut p = null_mut();
        // SAFETY: the alignment is a power of two above 16, so a multiple of
        // the pointer size.
        match unsafe { libc::posix_memalign(&mut p, layout.align(), layout.size()) } {
            0 => p.cast(),
            _ => null_mut(),
        }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if is_large(layout) {
            let len = rounded(layout.size());
            let (p, fresh) = map(len);
            if !p.is_null() && !fresh {
                // SAFETY: a kept mapping of `len` bytes, ours now.
                unsafe { std::ptr::write_bytes(p, 0, layout.size()) };
            }
            return p;
        }
        if layout.align() <= MALLOC_ALIGN {
            // SAFETY: calloc's memory is zeroed and aligned for up to 16.
            return unsafe { libc::calloc(1, layout.size()) }.cast();
        }
        // SAFETY: same contract as `alloc`; zeroed below.
        let p = unsafe { self.alloc(layout) };
        if !p.is_null() {
            // SAFETY: `p` holds `layout.size()` bytes.
            unsafe { std::ptr::write_bytes(p, 0, layout.size()) };
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if is_large(layout) {
            unmap(ptr, rounded(layout.size()));
        } else {
            // SAFETY: `ptr` came from malloc, calloc, realloc or
            // posix_memalign.
            unsafe { libc::free(ptr.cast()) }
        }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: the caller's contract: `new_size` with the old alignment
        // is a valid layout.
        let new = unsafe { Layout::from_size_align_unchecked(new_size, layout.align()) };
        match (is_large(layout), is_large(new)) {
            (true, true) if rounded(layout.size()) == rounded(new_size) => ptr,
            (true, true) => {
                // SAFETY: moving our own mapping; the kernel keeps its pages.
                let p = unsafe {
                    libc::mremap(
                        ptr.cast(),
                        rounded(layout.size()),
                        rounded(new_size),
                        libc::MREMAP_MAYMOVE,
                    )
                };
                if p == libc::MAP_FAILED {
                    null_mut()
                } else {
                    p.cast()
                }
            }
            (false, false) if layout.align() <= MALLOC_ALIGN => {
                // SAFETY: `ptr` is from glibc; realloc keeps malloc's
                // alignment, all the layout asks for.
                unsafe { libc::realloc(ptr.cast(), new_size) }.cast()
            }
            _ => {
                // From one kind to the other (or an over-aligned small
                // block): allocate, copy what both hold, free the old one.
                // SAFETY: `new` is valid; both blocks hold the bytes copied.
                unsafe {
                    let p = self.alloc(new);
                    if !p.is_null() {
                        std::ptr::copy_nonoverlapping(ptr, p, layout.size().min(new_size));
                        self.dealloc(ptr, layout);
                    }
                    p
                }
            }
        }
    }
}
