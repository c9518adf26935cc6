//! A 1 MiB in-memory block device that claims every capability, so the
//! fuzzer reaches every command path of the server.

use std::io;
use std::sync::Mutex;

use nbd_server::device::{BlockDevice, Capabilities, Extent, Piece, ZeroFlags};

/// Size of the fuzzed device; real client captures are made against a
/// disk of the same size so their requests stay in bounds.
pub const SIZE: u64 = 1 << 20;
/// Granularity of the allocation map reported by `block_status`.
const GRAIN: u64 = 64 * 1024;

pub struct MemDisk {
    data: Mutex<Vec<u8>>,
    writable: bool,
}

impl MemDisk {
    /// A disk whose first half holds a byte pattern and whose second half
    /// is zero (reported as a hole).
    pub fn new(writable: bool) -> Self {
        let mut data = vec![0u8; SIZE as usize];
        for (i, b) in data[..SIZE as usize / 2].iter_mut().enumerate() {
            *b = (i % 251) as u8 + 1;
        }
        MemDisk {
            data: Mutex::new(data),
            writable,
        }
    }

    fn check(&self, offset: u64, len: u64) -> io::Result<(usize, usize)> {
        // The server promises in-bounds ranges; an out-of-bounds call is
        // a server bug the fuzzer should see as a panic.
        let end = offset.checked_add(len).expect("offset + len overflows");
        assert!(end <= SIZE, "device called out of bounds: {offset}+{len}");
        Ok((offset as usize, end as usize))
    }

    fn check_writable(&self) -> io::Result<()> {
        if self.writable {
            Ok(())
        } else {
            Err(io::Error::from_raw_os_error(libc::EROFS))
        }
    }
}

impl BlockDevice for MemDisk {
    fn size(&self) -> u64 {
        SIZE
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            write: self.writable,
            flush: self.writable,
            fua: self.writable,
            trim: self.writable,
            zero: self.writable,
            fast_zero: self.writable,
            cache: true,
            extents: true,
            multi_conn: true,
            rotational: false,
        }
    }

    async fn read(&self, offset: u64, len: u32) -> io::Result<Vec<Piece>> {
        let (a, b) = self.check(offset, len.into())?;
        let data = self.data.lock().unwrap();
        Ok(vec![Piece::Data(data[a..b].to_vec())])
    }

    async fn write(&self, offset: u64, buf: Vec<u8>, _fua: bool) -> io::Result<()> {
        self.check_writable()?;
        let (a, b) = self.check(offset, buf.len() as u64)?;
        self.data.lock().unwrap()[a..b].copy_from_slice(&buf);
        Ok(())
    }

    async fn flush(&self) -> io::Result<()> {
        Ok(())
    }

    async fn trim(&self, offset: u64, len: u64, _fua: bool) -> io::Result<()> {
        self.check_writable()?;
        let (a, b) = self.check(offset, len)?;
        self.data.lock().unwrap()[a..b].fill(0);
        Ok(())
    }

    async fn write_zeroes(&self, offset: u64, len: u64, _flags: ZeroFlags) -> io::Result<()> {
        self.check_writable()?;
        let (a, b) = self.check(offset, len)?;
        self.data.lock().unwrap()[a..b].fill(0);
        Ok(())
    }

    async fn cache(&self, offset: u64, len: u64) -> io::Result<()> {
        self.check(offset, len)?;
        Ok(())
    }

    /// Extents of [`GRAIN`] bytes each: holes where the grain is all zero.
    async fn block_status(&self, offset: u64, len: u64) -> io::Result<Vec<Extent>> {
        let (a, b) = self.check(offset, len)?;
        assert!(a < b, "block_status of an empty range at {offset}");
        let data = self.data.lock().unwrap();
        let mut out: Vec<Extent> = Vec::new();
        let mut pos = a as u64;
        while pos < b as u64 {
            let end = ((pos / GRAIN + 1) * GRAIN).min(b as u64);
            let zero = data[pos as usize..end as usize].iter().all(|&x| x == 0);
            let ext = if zero {
                Extent::hole(end - pos)
            } else {
                Extent::data(end - pos)
            };
            match out.last_mut() {
                Some(last) if last.hole == ext.hole => last.length += ext.length,
                _ => out.push(ext),
            }
            pos = end;
        }
        Ok(out)
    }
}
