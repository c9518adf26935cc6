//! The block-device interface: what every frontend (the NBD server, the
//! FUSE mount) serves and every backend (a file or block device, the
//! lazy-fetch volume, the hash table of a disk) implements, with the one
//! rule that maps a device error onto the errno a client sees. It knows no
//! protocol: `nbd-server` and `fuse-frontend` are built on it, and the
//! engine implements it without depending on either.
//!
//! A device is a range of bytes with positional I/O and, optionally, an
//! allocation map. It knows nothing of NBD: offsets are absolute byte
//! offsets, lengths are already checked against [`BlockDevice::size`] by the
//! frontend, and errors are `io::Error`s whose errno every frontend reads
//! with the one rule of [`errno_of`] and maps onto its own wire values. Every capability defaults to "no", as nbdkit's
//! `can_*` callbacks do: a backend opts in to what it really does.
//!
//! Methods take `&self` and may run concurrently from many connections; a
//! backend that needs ordering between them provides it itself.

use std::future::Future;
use std::io;

pub mod file;

pub use file::FileDevice;

/// The largest payload of one request, and the default largest block
/// (32 MiB, as NBD servers commonly advertise).
pub const MAX_PAYLOAD: u32 = 32 * 1024 * 1024;

/// Block size constraints (`NBD_INFO_BLOCK_SIZE`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockSizes {
    pub minimum: u32,
    pub preferred: u32,
    pub maximum: u32,
}

impl Default for BlockSizes {
    /// The spec's defaults: any alignment, 4 KiB preferred, 32 MiB payloads.
    fn default() -> Self {
        BlockSizes {
            minimum: 1,
            preferred: 4096,
            maximum: MAX_PAYLOAD,
        }
    }
}

/// What a device can do. Everything defaults to `false`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Capabilities {
    /// Accepts `write`, and `trim`/`write_zeroes` where those are set.
    pub write: bool,
    /// `flush` makes every completed write durable.
    pub flush: bool,
    /// `fua` on a write makes that write durable before it returns.
    pub fua: bool,
    /// `trim` may discard data (reads after it are unspecified until written).
    pub trim: bool,
    /// `write_zeroes` is implemented natively (not by the caller writing zeros).
    pub zero: bool,
    /// `write_zeroes` with `fast` set answers `ENOTSUP` quickly when it has
    /// no fast path, instead of writing.
    pub fast_zero: bool,
    /// `cache` does something useful (prefetch).
    pub cache: bool,
    /// `block_status` reports real allocation, not just "all data".
    pub extents: bool,
    /// All connections see one cache, so a flush on one covers writes made
    /// on another (NBD's `CAN_MULTI_CONN`).
    pub multi_conn: bool,
    /// The medium is rotational (a hint for clients' schedulers).
    pub rotational: bool,
}

/// One piece of a read: bytes, or a run of zeros the device knows about
/// without reading (a hole). A read returns consecutive pieces covering
/// exactly the requested range.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Piece {
    Data(Vec<u8>),
    Zero(u64),
}

impl Piece {
    pub fn len(&self) -> u64 {
        match self {
            Piece::Data(d) => d.len() as u64,
            Piece::Zero(n) => *n,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Concatenate pieces into one buffer, materialising holes as zeros.
pub fn flatten(pieces: Vec<Piece>) -> Vec<u8> {
    if let [Piece::Data(_)] = pieces.as_slice() {
        let Some(Piece::Data(d)) = pieces.into_iter().next() else {
            unreachable!()
        };
        return d;
    }
    let total: u64 = pieces.iter().map(Piece::len).sum();
    let mut out = Vec::with_capacity(
        usize::try_from(total).expect("the pieces of one read: at most u32::MAX bytes"),
    );
    for p in pieces {
        match p {
            Piece::Data(d) => out.extend_from_slice(&d),
            Piece::Zero(n) => out.resize(
                out.len()
                    + usize::try_from(n).expect("a piece of one read: at most u32::MAX bytes"),
                0,
            ),
        }
    }
    out
}

/// Allocation status of a run of bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    pub length: u64,
    /// Not allocated in the backing store.
    pub hole: bool,
    /// Known to read as zeros. Must only be set when that is certain:
    /// clients such as nbdcopy and qemu-img skip extents flagged zero.
    pub zero: bool,
}

impl Extent {
    pub const fn data(length: u64) -> Self {
        Extent {
            length,
            hole: false,
            zero: false,
        }
    }

    pub const fn hole(length: u64) -> Self {
        Extent {
            length,
            hole: true,
            zero: true,
        }
    }
}

/// Flags of a write-zeroes request.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ZeroFlags {
    /// The range may be deallocated (punched) rather than written.
    pub may_trim: bool,
    /// Fail with `ENOTSUP` at once unless zeroing is faster than writing.
    pub fast: bool,
    /// Durable before returning.
    pub fua: bool,
}

/// An error that carries the errno a client should see beside a message
/// for the log (an `io::Error` cannot hold both an OS code and a message).
#[derive(Debug)]
pub struct ErrnoError {
    pub errno: i32,
    pub message: String,
}

impl std::fmt::Display for ErrnoError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for ErrnoError {}

/// An `io::Error` that frontends answer with `errno`, logged as `message`.
pub fn with_errno(errno: i32, message: String) -> io::Error {
    io::Error::new(
        io::Error::from_raw_os_error(errno).kind(),
        ErrnoError { errno, message },
    )
}

/// The errno a client should see for a device error, the one rule every
/// frontend (NBD, FUSE) applies: the OS's code, else the one it was made
/// with ([`with_errno`]), else one of its kind; `EIO` when nothing says.
pub fn errno_of(e: &io::Error) -> i32 {
    if let Some(code) = e.raw_os_error() {
        return code;
    }
    if let Some(x) = e.get_ref().and_then(|i| i.downcast_ref::<ErrnoError>()) {
        return x.errno;
    }
    match e.kind() {
        io::ErrorKind::PermissionDenied => libc::EPERM,
        io::ErrorKind::InvalidInput => libc::EINVAL,
        io::ErrorKind::OutOfMemory => libc::ENOMEM,
        io::ErrorKind::Unsupported => libc::EOPNOTSUPP,
        io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded => libc::ENOSPC,
        _ => libc::EIO,
    }
}

fn unsupported() -> io::Error {
    io::Error::from_raw_os_error(libc::EOPNOTSUPP)
}

/// A block device the NBD server (and the FUSE frontend) can serve.
///
/// All I/O methods return `Send` futures so connections can run them on any
/// runtime thread. Blocking work (file I/O, fsync) belongs on
/// `tokio::task::spawn_blocking`, never on the async threads.
pub trait BlockDevice: Send + Sync + 'static {
    /// Size in bytes. Constant for the life of the device.
    fn size(&self) -> u64;

    fn capabilities(&self) -> Capabilities;

    fn block_sizes(&self) -> BlockSizes {
        BlockSizes::default()
    }

    /// Read `len` bytes at `offset` (the range is within the device).
    fn read(&self, offset: u64, len: u32) -> impl Future<Output = io::Result<Vec<Piece>>> + Send;

    fn write(
        &self,
        _offset: u64,
        _data: Vec<u8>,
        _fua: bool,
    ) -> impl Future<Output = io::Result<()>> + Send {
        async { Err(unsupported()) }
    }

    fn flush(&self) -> impl Future<Output = io::Result<()>> + Send {
        async { Ok(()) }
    }

    fn trim(
        &self,
        _offset: u64,
        _len: u64,
        _fua: bool,
    ) -> impl Future<Output = io::Result<()>> + Send {
        async { Err(unsupported()) }
    }

    fn write_zeroes(
        &self,
        _offset: u64,
        _len: u64,
        _flags: ZeroFlags,
    ) -> impl Future<Output = io::Result<()>> + Send {
        async { Err(unsupported()) }
    }

    /// Prefetch hint. Success says nothing about what was cached.
    fn cache(&self, _offset: u64, _len: u64) -> impl Future<Output = io::Result<()>> + Send {
        async { Ok(()) }
    }

    /// Allocation status from `offset`: one or more consecutive extents, the
    /// first starting at `offset`. May cover less than `len` (the caller
    /// asks again) but never nothing. The default says "all data".
    fn block_status(
        &self,
        _offset: u64,
        len: u64,
    ) -> impl Future<Output = io::Result<Vec<Extent>>> + Send {
        async move { Ok(vec![Extent::data(len)]) }
    }
}

impl<D: BlockDevice> BlockDevice for std::sync::Arc<D> {
    fn size(&self) -> u64 {
        (**self).size()
    }
    fn capabilities(&self) -> Capabilities {
        (**self).capabilities()
    }
    fn block_sizes(&self) -> BlockSizes {
        (**self).block_sizes()
    }
    fn read(&self, offset: u64, len: u32) -> impl Future<Output = io::Result<Vec<Piece>>> + Send {
        (**self).read(offset, len)
    }
    fn write(
        &self,
        offset: u64,
        data: Vec<u8>,
        fua: bool,
    ) -> impl Future<Output = io::Result<()>> + Send {
        (**self).write(offset, data, fua)
    }
    fn flush(&self) -> impl Future<Output = io::Result<()>> + Send {
        (**self).flush()
    }
    fn trim(
        &self,
        offset: u64,
        len: u64,
        fua: bool,
    ) -> impl Future<Output = io::Result<()>> + Send {
        (**self).trim(offset, len, fua)
    }
    fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        flags: ZeroFlags,
    ) -> impl Future<Output = io::Result<()>> + Send {
        (**self).write_zeroes(offset, len, flags)
    }
    fn cache(&self, offset: u64, len: u64) -> impl Future<Output = io::Result<()>> + Send {
        (**self).cache(offset, len)
    }
    fn block_status(
        &self,
        offset: u64,
        len: u64,
    ) -> impl Future<Output = io::Result<Vec<Extent>>> + Send {
        (**self).block_status(offset, len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flatten_materialises_holes_between_data() {
        let out = flatten(vec![
            Piece::Data(vec![1, 2]),
            Piece::Zero(3),
            Piece::Data(vec![9]),
        ]);
        assert_eq!(out, vec![1, 2, 0, 0, 0, 9]);
    }

    #[test]
    fn flatten_of_one_data_piece_is_that_buffer() {
        assert_eq!(flatten(vec![Piece::Data(vec![7; 5])]), vec![7; 5]);
    }
}
