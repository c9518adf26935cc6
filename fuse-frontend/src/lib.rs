//! The FUSE frontend: any [`BlockDevice`] (the streaming volume, or a plain
//! `nbd_server::FileDevice`) as one file, `DIR/disk.raw`, for hypervisors,
//! `losetup` and tools that want a path rather than an NBD URI.
//!
//! Like the NBD server, this is a thin adapter over the block-device trait:
//! it knows nothing of chunks, fetching or the map, so the volume keeps
//! every engine invariant whichever frontend a request came through.
//!
//! # What each file operation becomes
//!
//! | on `disk.raw`                          | on the device                        |
//! |----------------------------------------|--------------------------------------|
//! | `read`                                 | `read` (holes materialised as zeros) |
//! | `write` (`O_SYNC`/`O_DSYNC`: FUA)      | `write`                              |
//! | `fsync`, `fdatasync`                   | `flush`: the durability of NBD FLUSH |
//! | `fallocate(PUNCH_HOLE)`                | `write_zeroes`, may deallocate       |
//! | `fallocate(PUNCH_HOLE\|NO_HIDE_STALE)` | `trim`                               |
//! | `fallocate(ZERO_RANGE)`                | `write_zeroes`, keeps allocation     |
//! | `lseek(SEEK_DATA / SEEK_HOLE)`         | `block_status` (when it has extents) |
//! | `truncate` to another size             | refused: `EPERM`                     |
//!
//! A punched hole must read back as zeros, which NBD's trim does not
//! promise (the volume leaves partial chunks of a trim as they are), so a
//! plain punch is a write-zeroes that may deallocate: for whole chunks that
//! is exactly what a trim does. Only `NO_HIDE_STALE`, which allows stale
//! data, maps to trim itself.
//!
//! The directory holds `disk.raw` and nothing else; its size is the
//! device's and never changes.
//!
//! # Data path and concurrency
//!
//! Files are opened `FOPEN_DIRECT_IO`: no page cache sits between a reader
//! of `disk.raw` and the device, so what NBD clients write is seen at once
//! through the file and the reverse, and a write is acknowledged only by
//! the device (never parked in a kernel cache `fsync` would have to find).
//! `FOPEN_PARALLEL_DIRECT_WRITES` and `FUSE_ASYNC_DIO` let the kernel send
//! many requests at once (libaio, a loop device); `FUSE_MAX_PAGES` with a
//! 1 MiB `max_write` and `max_read` lets a 1 MiB request arrive whole rather
//! than in 4 KiB or 128 KiB pieces.
//!
//! fuser reads requests on its own threads ([`MountOptions::threads`]).
//! Those threads never wait for the device: each I/O request is spawned
//! onto the tokio runtime given to [`Mount::new`] together with its reply
//! object, and the task answers the kernel when the device is done. So
//! requests are served concurrently, and nothing calls `block_on` (which
//! would panic, or stall, on a runtime thread).
//!
//! # Lifecycle
//!
//! [`preflight`] checks the mount point before anything is opened: missing,
//! not a directory, not empty, already a mount point, or a *stale* mount
//! left by a run that died (`stat` fails with `ENOTCONN`; the error gives
//! the command that clears it), and that `/dev/fuse` (and, when not root,
//! `fusermount3`) exist.
//!
//! [`Mount::unmount`] (and `Drop`) unmounts, closes the gate so no new
//! request reaches the device, and waits for the requests in flight, so
//! the caller may close the device afterwards. When the file is still open
//! (a loop device, a running VM) the unmount is lazy: the name disappears,
//! the holders' further requests fail with `EIO`, and [`MountError::Busy`]
//! says so.

use std::ffi::{CString, OsStr};
use std::future::Future;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant, SystemTime};

use block_device::flatten;
use block_device::{BlockDevice, Capabilities, ZeroFlags};
use fuser::{
    BackgroundSession, Config, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags,
    INodeNo, InitFlags, KernelConfig, LockOwner, MountOption, OpenAccMode, OpenFlags, ReplyAttr,
    ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyLseek, ReplyOpen, ReplyStatfs,
    ReplyWrite, ReplyXattr, Request, SessionACL, TimeOrNow, WriteFlags,
};
use tokio::runtime::Handle;

/// The one file of the mount.
pub const FILE_NAME: &str = "disk.raw";
/// Largest read or write the kernel is asked to send in one request.
pub const MAX_REQUEST: u32 = 1 << 20;

const ROOT: INodeNo = INodeNo::ROOT;
const FILE: INodeNo = INodeNo(2);
/// Attributes never change (fixed size, fixed mode), so the kernel may
/// keep them as long as it likes.
const TTL: Duration = Duration::from_secs(3600);
/// linux/falloc.h: a punch that may leave stale data (not in the libc crate).
const FALLOC_FL_NO_HIDE_STALE: i32 = 0x04;
/// How long an unmount retries a busy mount before unmounting lazily.
const BUSY_WAIT: Duration = Duration::from_secs(2);
/// How long an unmount waits for requests in flight to be answered.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// How to mount.
#[derive(Clone, Debug)]
pub struct MountOptions {
    /// Refuse writes even when the device accepts them.
    pub read_only: bool,
    /// Let other users (e.g. the hypervisor's) open the file; the kernel
    /// still checks the file's mode (0644, or 0444 read-only).
    pub allow_other: bool,
    /// fuser threads reading requests from the kernel (they only dispatch;
    /// the device work runs on the tokio runtime).
    pub threads: usize,
}

impl Default for MountOptions {
    fn default() -> Self {
        MountOptions {
            read_only: false,
            allow_other: false,
            threads: 2,
        }
    }
}

/// Why a mount point cannot be used, or a mount not ended cleanly.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MountError {
    #[error("the mount point {dir} does not exist (create an empty directory)")]
    Missing { dir: PathBuf },
    #[error("the mount point {dir} is not a directory")]
    NotADirectory { dir: PathBuf },
    #[error("the mount point {dir} is not empty (use an empty directory)")]
    NotEmpty { dir: PathBuf },
    #[error("{dir} is already a mount point ({fstype}); unmount it or choose another directory")]
    AlreadyMounted { dir: PathBuf, fstype: String },
    #[error(
        "{dir} holds a stale FUSE mount from a run that did not unmount \
         (stat: transport endpoint is not connected); clear it with \
         `fusermount3 -u {dir}` (or, as root, `umount -l {dir}`) and try again"
    )]
    Stale { dir: PathBuf },
    #[error("cannot check the mount point {dir}")]
    Inspect {
        dir: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "{path} is missing: this machine has no FUSE (load it with `modprobe fuse`; \
         in a container, pass the device in with --device /dev/fuse)"
    )]
    NoFuseDevice { path: PathBuf },
    #[error(
        "fusermount3 is not installed, and mounting without root needs it \
         (apt-get install fuse3)"
    )]
    NoFusermount,
    #[error("cannot mount the FUSE file system on {dir}")]
    Mount {
        dir: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "{dir}/{FILE_NAME} was still open (a loop device or a VM?); it was unmounted \
         lazily and its users now get I/O errors"
    )]
    Busy { dir: PathBuf },
    #[error("cannot unmount {dir}")]
    Unmount {
        dir: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// Check that `dir` can be mounted on, and that this machine can mount.
pub fn preflight(dir: &Path) -> Result<(), MountError> {
    check_fuse(
        Path::new("/dev/fuse"),
        is_root(),
        find_in_path("fusermount3"),
    )?;
    check_dir(dir)
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

fn find_in_path(tool: &str) -> bool {
    if std::env::var_os("FUSERMOUNT_PATH").is_some_and(|p| Path::new(&p).is_file()) {
        return true;
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path).any(|d| d.join(tool).is_file())
}

fn check_fuse(dev: &Path, root: bool, fusermount: bool) -> Result<(), MountError> {
    if !dev.exists() {
        return Err(MountError::NoFuseDevice {
            path: dev.to_path_buf(),
        });
    }
    // Root mounts with mount(2) itself; anyone else goes through the setuid
    // helper.
    if !root && !fusermount {
        return Err(MountError::NoFusermount);
    }
    Ok(())
}

fn check_dir(dir: &Path) -> Result<(), MountError> {
    let owned = || dir.to_path_buf();
    let meta = match std::fs::metadata(dir) {
        Ok(m) => m,
        Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => {
            return Err(MountError::Stale { dir: owned() });
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(MountError::Missing { dir: owned() });
        }
        Err(source) => {
            return Err(MountError::Inspect {
                dir: owned(),
                source,
            });
        }
    };
    if !meta.is_dir() {
        return Err(MountError::NotADirectory { dir: owned() });
    }
    if let Some(fstype) = mounted_at(dir) {
        return Err(MountError::AlreadyMounted {
            dir: owned(),
            fstype,
        });
    }
    let mut entries = std::fs::read_dir(dir).map_err(|source| MountError::Inspect {
        dir: owned(),
        source,
    })?;
    if entries.next().is_some() {
        return Err(MountError::NotEmpty { dir: owned() });
    }
    Ok(())
}

/// The file-system type mounted at `dir`, if `dir` is a mount point.
pub fn mounted_at(dir: &Path) -> Option<String> {
    let canon = dir.canonicalize().ok()?;
    let text = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    // Fields: id parent major:minor root mountpoint options [optional...] - fstype source ...
    let mut found = None;
    for line in text.lines() {
        let mut fields = line.split(' ');
        let Some(point) = fields.nth(4) else { continue };
        if unescape_mountinfo(point) != canon.as_os_str().as_bytes() {
            continue;
        }
        let fstype = line
            .split(" - ")
            .nth(1)
            .and_then(|rest| rest.split(' ').next())
            .unwrap_or("unknown");
        // The last line for a path is the mount on top.
        found = Some(fstype.to_string());
    }
    if found.is_some() {
        return found;
    }
    // A mount point in another namespace view still has its own device.
    let here = std::fs::metadata(&canon).ok()?;
    let parent = std::fs::metadata(canon.parent()?).ok()?;
    (here.dev() != parent.dev()).then(|| "unknown".to_string())
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape_mountinfo(s: &str) -> Vec<u8> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() {
            let oct = &b[i + 1..i + 4];
            if oct.iter().all(|c| (b'0'..=b'7').contains(c)) {
                out.push((oct[0] - b'0') * 64 + (oct[1] - b'0') * 8 + (oct[2] - b'0'));
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    out
}

/// Requests admitted and not yet answered, and whether new ones may enter.
/// A std mutex: held for a counter update only, never across an await.
#[derive(Default)]
struct Gate {
    state: Mutex<GateState>,
    idle: Condvar,
}

#[derive(Default)]
struct GateState {
    closed: bool,
    inflight: usize,
}

/// One admitted request; leaving the gate when dropped (also on a panic in
/// the task, whose dropped reply fuser answers with `EIO`).
struct Ticket(Arc<Gate>);

impl Gate {
    fn enter(self: &Arc<Self>) -> Option<Ticket> {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if s.closed {
            return None;
        }
        s.inflight += 1;
        Some(Ticket(self.clone()))
    }

    /// Admit nothing more; wait up to `timeout` for what is in flight.
    /// True when everything was answered.
    fn close_and_drain(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        s.closed = true;
        while s.inflight > 0 {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            s = self
                .idle
                .wait_timeout(s, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        true
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let mut s = self.0.state.lock().unwrap_or_else(|e| e.into_inner());
        s.inflight -= 1;
        if s.inflight == 0 {
            self.0.idle.notify_all();
        }
    }
}

/// The replies an I/O request may get: answered from a runtime task.
trait Refuse: Send + 'static {
    fn refuse(self, e: Errno);
}

macro_rules! refuse {
    ($($t:ty),*) => {$(
        impl Refuse for $t {
            fn refuse(self, e: Errno) {
                self.error(e)
            }
        }
    )*};
}
refuse!(ReplyData, ReplyWrite, ReplyEmpty, ReplyLseek);

/// The same rule as the NBD frontend (`block_device::errno_of`): a
/// full target is `ENOSPC` here too, not `EIO`.
fn errno(e: &io::Error) -> Errno {
    Errno::from_i32(block_device::errno_of(e))
}

/// The file system fuser drives: one directory, one file, one device.
struct Disk<D> {
    device: Arc<D>,
    runtime: Handle,
    gate: Arc<Gate>,
    size: u64,
    caps: Capabilities,
    writable: bool,
    file: FileAttr,
    root: FileAttr,
}

impl<D: BlockDevice> Disk<D> {
    fn new(device: D, runtime: Handle, gate: Arc<Gate>, read_only: bool) -> Self {
        let size = device.size();
        let caps = device.capabilities();
        let writable = caps.write && !read_only;
        let now = SystemTime::now();
        // SAFETY: getegid/geteuid have no preconditions and cannot fail.
        let (uid, gid) = unsafe { (libc::geteuid(), libc::getegid()) };
        let attr = |ino, kind, perm, size: u64, nlink| FileAttr {
            ino,
            size,
            blocks: size.div_ceil(512),
            atime: now,
            mtime: now,
            ctime: now,
            crtime: now,
            kind,
            perm,
            nlink,
            uid,
            gid,
            rdev: 0,
            blksize: device.block_sizes().preferred.clamp(512, 1 << 20),
            flags: 0,
        };
        let file = attr(
            FILE,
            FileType::RegularFile,
            if writable { 0o644 } else { 0o444 },
            size,
            1,
        );
        let root = attr(ROOT, FileType::Directory, 0o755, 0, 2);
        Disk {
            device: Arc::new(device),
            runtime,
            gate,
            size,
            caps,
            writable,
            file,
            root,
        }
    }

    /// Run `op` on the runtime with the device and the reply, if the gate
    /// admits it; answer `EIO` at once when it does not (unmounting).
    fn spawn<R, F, Fut>(&self, reply: R, op: F)
    where
        R: Refuse,
        F: FnOnce(Arc<D>, R) -> Fut,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let Some(ticket) = self.gate.enter() else {
            return reply.refuse(Errno::EIO);
        };
        let fut = op(self.device.clone(), reply);
        self.runtime.spawn(async move {
            let _ticket = ticket;
            fut.await
        });
    }

    /// Clamp `[offset, offset + len)` to the device; `None` past the end.
    fn clamp(&self, offset: u64, len: u64) -> Option<u64> {
        (offset < self.size).then(|| len.min(self.size - offset))
    }
}

impl<D: BlockDevice> Filesystem for Disk<D> {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> io::Result<()> {
        // Whole 1 MiB requests: max_pages follows max_write.
        if let Err(nearest) = config.set_max_write(MAX_REQUEST) {
            let _ = config.set_max_write(nearest);
        }
        let _ = config.set_max_background(128);
        let wanted = InitFlags::FUSE_ASYNC_DIO | InitFlags::FUSE_MAX_PAGES;
        let have = config.capabilities() & wanted;
        if let Err(missing) = config.add_capabilities(have) {
            tracing::debug!("FUSE kernel lacks {missing:?}");
        }
        if have != wanted {
            tracing::info!(
                "the kernel's FUSE lacks {:?}: large or parallel requests may be split",
                wanted & !have
            );
        }
        Ok(())
    }

    /// No extended attributes: answered as such (the default logs a
    /// warning for every `ls -l` that asks for SELinux labels).
    fn getxattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _name: &OsStr,
        _size: u32,
        reply: ReplyXattr,
    ) {
        reply.error(Errno::ENODATA);
    }

    fn listxattr(&self, _req: &Request, _ino: INodeNo, size: u32, reply: ReplyXattr) {
        if size == 0 {
            reply.size(0);
        } else {
            reply.data(&[]);
        }
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        if parent == ROOT && name == FILE_NAME {
            reply.entry(&TTL, &self.file, fuser::Generation(0));
        } else {
            reply.error(Errno::ENOENT);
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match ino {
            ROOT => reply.attr(&TTL, &self.root),
            FILE => reply.attr(&TTL, &self.file),
            _ => reply.error(Errno::ENOENT),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<TimeOrNow>,
        _mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let attr = match ino {
            ROOT => &self.root,
            FILE => &self.file,
            _ => return reply.error(Errno::ENOENT),
        };
        // The disk's size is the device's; mode and owner are fixed. Times
        // are accepted and forgotten (touch works).
        let resize = size.is_some_and(|s| s != attr.size);
        if resize || mode.is_some() || uid.is_some() || gid.is_some() {
            return reply.error(Errno::EPERM);
        }
        reply.attr(&TTL, attr)
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        if ino != FILE {
            return reply.error(Errno::EISDIR);
        }
        if flags.acc_mode() != OpenAccMode::O_RDONLY && !self.writable {
            return reply.error(Errno::EROFS);
        }
        reply.opened(
            FileHandle(0),
            FopenFlags::FOPEN_DIRECT_IO | FopenFlags::FOPEN_PARALLEL_DIRECT_WRITES,
        );
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        if ino != FILE {
            return reply.error(Errno::EISDIR);
        }
        let Some(len) = self.clamp(offset, u64::from(size)).filter(|&l| l > 0) else {
            return reply.data(&[]);
        };
        self.spawn(reply, move |dev, reply| async move {
            let len = u32::try_from(len).expect("at most `size`, a u32");
            match dev.read(offset, len).await {
                Ok(pieces) => reply.data(&flatten(pieces)),
                Err(e) => reply.error(errno(&e)),
            }
        });
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        if ino != FILE {
            return reply.error(Errno::EISDIR);
        }
        if !self.writable {
            return reply.error(Errno::EROFS);
        }
        // A disk does not grow: past the end is "no space", a write across
        // it is short.
        let Some(len) = self.clamp(offset, data.len() as u64).filter(|&l| l > 0) else {
            return reply.error(Errno::ENOSPC);
        };
        // At most `data.len()`, so both conversions fit.
        let data = data[..usize::try_from(len).expect("at most data.len()")].to_vec();
        let len = u32::try_from(len).expect("a FUSE write request has a u32 size");
        let fua = flags.0 & (libc::O_SYNC | libc::O_DSYNC) != 0 && self.caps.fua;
        let sync_after = flags.0 & (libc::O_SYNC | libc::O_DSYNC) != 0 && !self.caps.fua;
        self.spawn(reply, move |dev, reply| async move {
            let mut r = dev.write(offset, data, fua).await;
            if r.is_ok() && sync_after {
                r = dev.flush().await;
            }
            match r {
                Ok(()) => reply.written(len),
                Err(e) => reply.error(errno(&e)),
            }
        });
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        // close(2) is no durability point: every write was already answered
        // by the device, and fsync is what makes them durable.
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        if ino != FILE {
            return reply.ok();
        }
        self.spawn(reply, move |dev, reply| async move {
            match dev.flush().await {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(errno(&e)),
            }
        });
    }

    fn fallocate(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        if ino != FILE {
            return reply.error(Errno::EISDIR);
        }
        let known = libc::FALLOC_FL_KEEP_SIZE
            | libc::FALLOC_FL_PUNCH_HOLE
            | libc::FALLOC_FL_ZERO_RANGE
            | FALLOC_FL_NO_HIDE_STALE;
        if mode & !known != 0 {
            // Collapse, insert, unshare: a disk has no such thing.
            return reply.error(Errno::EOPNOTSUPP);
        }
        let punch = mode & libc::FALLOC_FL_PUNCH_HOLE != 0;
        let zero = mode & libc::FALLOC_FL_ZERO_RANGE != 0;
        let end = offset.saturating_add(length);
        if !punch && !zero {
            // Preallocation: every byte of the disk already exists; growing
            // it is refused like a truncate.
            return if end <= self.size || mode & libc::FALLOC_FL_KEEP_SIZE != 0 {
                reply.ok()
            } else {
                reply.error(Errno::EPERM)
            };
        }
        if !self.writable {
            return reply.error(Errno::EROFS);
        }
        // Punch and zero of a range reaching past the end stop at the end,
        // as they do for a file with KEEP_SIZE.
        let Some(len) = self.clamp(offset, length).filter(|&l| l > 0) else {
            return reply.ok();
        };
        let stale_ok = punch && mode & FALLOC_FL_NO_HIDE_STALE != 0;
        let caps = self.caps;
        self.spawn(reply, move |dev, reply| async move {
            let r = if stale_ok && caps.trim {
                dev.trim(offset, len, false).await
            } else if caps.zero {
                let flags = ZeroFlags {
                    may_trim: punch,
                    fast: false,
                    fua: false,
                };
                dev.write_zeroes(offset, len, flags).await
            } else {
                Err(io::Error::from_raw_os_error(libc::EOPNOTSUPP))
            };
            match r {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(errno(&e)),
            }
        });
    }

    fn lseek(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: i64,
        whence: i32,
        reply: ReplyLseek,
    ) {
        // Only SEEK_DATA and SEEK_HOLE come here; ENOSYS lets the kernel
        // answer "all data" itself when the device knows no extents.
        if ino != FILE || !self.caps.extents {
            return reply.error(Errno::ENOSYS);
        }
        if whence != libc::SEEK_DATA && whence != libc::SEEK_HOLE {
            return reply.error(Errno::EINVAL);
        }
        let size = self.size;
        let Ok(start) = u64::try_from(offset) else {
            return reply.error(Errno::ENXIO);
        };
        if start >= size {
            return reply.error(Errno::ENXIO);
        }
        let want_data = whence == libc::SEEK_DATA;
        self.spawn(reply, move |dev, reply| async move {
            match seek(&*dev, start, size, want_data).await {
                Ok(Some(pos)) => reply.offset(pos as i64),
                Ok(None) => reply.error(Errno::ENXIO),
                Err(e) => reply.error(errno(&e)),
            }
        });
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        if ino != ROOT {
            return reply.error(Errno::ENOTDIR);
        }
        reply.opened(FileHandle(0), FopenFlags::empty());
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        if ino != ROOT {
            return reply.error(Errno::ENOTDIR);
        }
        let entries = [
            (ROOT, FileType::Directory, "."),
            (ROOT, FileType::Directory, ".."),
            (FILE, FileType::RegularFile, FILE_NAME),
        ];
        // The offset comes from the caller (any seekdir): one past the
        // entries lists nothing, even where usize is narrower than u64.
        let skip = usize::try_from(offset).unwrap_or(usize::MAX);
        for (i, (ino, kind, name)) in entries.into_iter().enumerate().skip(skip) {
            if reply.add(ino, (i + 1) as u64, kind, name) {
                break;
            }
        }
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let blocks = self.size.div_ceil(4096);
        reply.statfs(blocks, 0, 0, 2, 0, 4096, 255, 4096);
    }
}

/// SEEK_DATA / SEEK_HOLE from `start`: the first byte of data (or of a run
/// known to read as zeros), or `None` for data past the last data byte.
/// The end of the disk counts as a hole, as for any file.
async fn seek<D: BlockDevice>(
    dev: &D,
    start: u64,
    size: u64,
    want_data: bool,
) -> io::Result<Option<u64>> {
    let mut pos = start;
    while pos < size {
        let extents = dev.block_status(pos, size - pos).await?;
        if extents.is_empty() {
            break;
        }
        for e in extents {
            if e.length == 0 {
                continue;
            }
            if e.zero != want_data {
                return Ok(Some(pos));
            }
            pos = (pos + e.length).min(size);
            if pos >= size {
                break;
            }
        }
    }
    Ok((!want_data).then_some(size))
}

/// A mounted device: `dir()/disk.raw`, served until unmounted or dropped.
pub struct Mount {
    dir: PathBuf,
    session: Option<BackgroundSession>,
    gate: Arc<Gate>,
}

impl std::fmt::Debug for Mount {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mount").field("dir", &self.dir).finish()
    }
}

impl Mount {
    /// Check `dir` ([`preflight`]), mount `device` on it and serve it on
    /// fuser's own threads, with the device's futures run on `runtime`.
    ///
    /// Blocking (mount(2) and the FUSE handshake): from async code call it
    /// in `spawn_blocking`.
    pub fn new<D: BlockDevice>(
        device: D,
        dir: &Path,
        opts: &MountOptions,
        runtime: Handle,
    ) -> Result<Mount, MountError> {
        preflight(dir)?;
        let dir = dir.canonicalize().map_err(|source| MountError::Inspect {
            dir: dir.to_path_buf(),
            source,
        })?;
        let gate = Arc::new(Gate::default());
        let disk = Disk::new(device, runtime, gate.clone(), opts.read_only);
        let mut config = Config::default();
        config.mount_options = vec![
            MountOption::FSName("stream".into()),
            MountOption::Subtype("stream".into()),
            MountOption::DefaultPermissions,
            MountOption::NoSuid,
            MountOption::NoDev,
            MountOption::NoExec,
            MountOption::NoAtime,
            MountOption::CUSTOM(format!("max_read={MAX_REQUEST}")),
            if disk.writable {
                MountOption::RW
            } else {
                MountOption::RO
            },
        ];
        config.acl = if opts.allow_other {
            SessionACL::All
        } else {
            SessionACL::Owner
        };
        config.n_threads = Some(opts.threads.max(1));
        config.clone_fd = opts.threads > 1;
        let session = fuser::spawn_mount(disk, &dir, &config).map_err(|source| {
            if source.kind() == io::ErrorKind::NotFound && !find_in_path("fusermount3") {
                MountError::NoFusermount
            } else {
                MountError::Mount {
                    dir: dir.clone(),
                    source,
                }
            }
        })?;
        tracing::info!("serving {}/{FILE_NAME}", dir.display());
        Ok(Mount {
            dir,
            session: Some(session),
            gate,
        })
    }

    /// The mount point.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The served file, `dir()/disk.raw`.
    pub fn file(&self) -> PathBuf {
        self.dir.join(FILE_NAME)
    }

    /// Unmount, refuse new requests and wait for those in flight, so the
    /// device may be closed afterwards. Blocking.
    ///
    /// Still open by someone: unmounted lazily, and [`MountError::Busy`].
    pub fn unmount(mut self) -> Result<(), MountError> {
        self.stop(BUSY_WAIT, DRAIN_TIMEOUT)
    }

    fn stop(&mut self, busy_wait: Duration, drain: Duration) -> Result<(), MountError> {
        let Some(session) = self.session.take() else {
            return Ok(());
        };
        let detached = match umount_retrying(&self.dir, busy_wait) {
            Ok(()) => false,
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                umount(&self.dir, true).map_err(|source| MountError::Unmount {
                    dir: self.dir.clone(),
                    source,
                })?;
                true
            }
            // Not mounted any more (someone ran fusermount3 -u): the session
            // has ended already.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => false,
            Err(source) => {
                self.session = Some(session);
                return Err(MountError::Unmount {
                    dir: self.dir.clone(),
                    source,
                });
            }
        };
        if !self.gate.close_and_drain(drain) {
            tracing::warn!(
                "{}: requests still in flight after {drain:?}; stopping anyway",
                self.dir.display()
            );
        }
        if detached {
            // The connection lives on while the file is open; its thread
            // answers EIO until the last holder lets go, and must not try to
            // unmount a path that may hold another mount by then.
            std::mem::forget(session);
            return Err(MountError::Busy {
                dir: self.dir.clone(),
            });
        }
        // Unmounted: the kernel ended the connection and the threads exit.
        // The session is then forgotten rather than dropped: fuser's drop
        // would unmount the path again (it takes an ended connection for a
        // live one), which could hit a new mount there. What leaks is one
        // closed-connection fd.
        let deadline = Instant::now() + drain.max(Duration::from_secs(1));
        while !session.guard.is_finished() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        if !session.guard.is_finished() {
            tracing::warn!("FUSE threads of {} still running", self.dir.display());
        }
        std::mem::forget(session);
        Ok(())
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        // Do not wait long here: drop may run on a runtime thread that the
        // requests in flight need.
        let short = Duration::from_millis(100);
        if let Err(e) = self.stop(short, short) {
            tracing::warn!("{e}");
        }
    }
}

/// umount(2), retried while `EBUSY` for up to `wait`: a file closed just
/// before (or a descriptor a forking thread briefly copied) lets go soon.
fn umount_retrying(dir: &Path, wait: Duration) -> io::Result<()> {
    let deadline = Instant::now() + wait;
    loop {
        match umount(dir, false) {
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(20));
            }
            r => return r,
        }
    }
}

/// umount(2) of `dir`, or `fusermount3 -u` where that is refused (not root).
fn umount(dir: &Path, lazy: bool) -> io::Result<()> {
    let c = CString::new(dir.as_os_str().as_bytes())?;
    let flags = if lazy { libc::MNT_DETACH } else { 0 };
    // SAFETY: a valid NUL-terminated path; umount2 has no other preconditions.
    if unsafe { libc::umount2(c.as_ptr(), flags) } == 0 {
        return Ok(());
    }
    let err = io::Error::last_os_error();
    if err.raw_os_error() != Some(libc::EPERM) {
        return Err(err);
    }
    let mut cmd = std::process::Command::new("fusermount3");
    cmd.arg("-u");
    if lazy {
        cmd.arg("-z");
    }
    let out = cmd.arg(dir).output()?;
    if out.status.success() {
        return Ok(());
    }
    let text = String::from_utf8_lossy(&out.stderr);
    let code = if text.contains("busy") {
        libc::EBUSY
    } else if text.contains("not found") || text.contains("not mounted") {
        libc::EINVAL
    } else {
        libc::EPERM
    };
    Err(io::Error::from_raw_os_error(code))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Issue 12, case 11: the FUSE frontend read only OS codes, so the
    /// engine's "target full" reached a FUSE client as EIO (NBD said
    /// ENOSPC). Both now read the errno by one rule.
    #[test]
    fn a_full_target_is_enospc_through_fuse_as_through_nbd() {
        let full = lazy_fetch::Error::WriteTarget {
            index: lazy_fetch::units::ChunkIndex(3),
            source: io::Error::from_raw_os_error(libc::ENOSPC),
        }
        .to_io();
        assert_eq!(i32::from(errno(&full)), libc::ENOSPC);
        assert_eq!(
            nbd_server::proto::Errno::from_io(&full),
            nbd_server::proto::Errno::NoSpc
        );
        let source = lazy_fetch::Error::FetchChunk {
            index: lazy_fetch::units::ChunkIndex(3),
            source: io::Error::other("link down"),
        }
        .to_io();
        assert_eq!(i32::from(errno(&source)), libc::EIO);
    }

    #[test]
    fn a_missing_fuse_device_is_named_with_the_fix() {
        let err = check_fuse(Path::new("/nonexistent/fuse"), true, true).unwrap_err();
        assert!(matches!(err, MountError::NoFuseDevice { .. }));
        assert!(err.to_string().contains("modprobe fuse"), "{err}");
    }

    #[test]
    fn without_root_fusermount3_is_required() {
        let dev = Path::new("/");
        assert!(matches!(
            check_fuse(dev, false, false),
            Err(MountError::NoFusermount)
        ));
        assert!(check_fuse(dev, true, false).is_ok());
        assert!(check_fuse(dev, false, true).is_ok());
    }

    #[test]
    fn a_missing_or_non_empty_dir_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let missing = tmp.path().join("nope");
        assert!(matches!(
            check_dir(&missing),
            Err(MountError::Missing { .. })
        ));
        let file = tmp.path().join("file");
        std::fs::write(&file, b"x").unwrap();
        assert!(matches!(
            check_dir(&file),
            Err(MountError::NotADirectory { .. })
        ));
        assert!(matches!(
            check_dir(tmp.path()),
            Err(MountError::NotEmpty { .. })
        ));
        let empty = tmp.path().join("empty");
        std::fs::create_dir(&empty).unwrap();
        check_dir(&empty).unwrap();
    }

    #[test]
    fn the_stale_mount_message_gives_the_command_to_clear_it() {
        let err = MountError::Stale {
            dir: PathBuf::from("/mnt/disk"),
        };
        let text = err.to_string();
        assert!(text.contains("fusermount3 -u /mnt/disk"), "{text}");
        assert!(text.contains("umount -l /mnt/disk"), "{text}");
    }

    #[test]
    fn root_is_a_mount_point() {
        assert!(mounted_at(Path::new("/")).is_some());
    }

    #[test]
    fn mountinfo_escapes_are_undone() {
        assert_eq!(unescape_mountinfo(r"/a\040b\134c"), b"/a b\\c".to_vec());
        assert_eq!(unescape_mountinfo(r"/plain"), b"/plain".to_vec());
    }

    #[test]
    fn the_gate_drains_then_refuses() {
        let gate = Arc::new(Gate::default());
        let t = gate.enter().unwrap();
        let g = gate.clone();
        let waiter = std::thread::spawn(move || g.close_and_drain(Duration::from_secs(10)));
        std::thread::sleep(Duration::from_millis(20));
        drop(t);
        assert!(waiter.join().unwrap());
        assert!(gate.enter().is_none());
    }
}
