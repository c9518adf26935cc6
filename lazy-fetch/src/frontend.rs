//! The volume as a `block_device::BlockDevice`: the adapter every frontend
//! (the NBD server, the FUSE mount) serves. Errors become `io::Error`s with
//! the errno a client should see (see [`crate::Error::to_io`]).

use std::io;
use std::sync::Arc;

use block_device::{BlockDevice, Capabilities, Extent, Piece, ZeroFlags};

use crate::source::Source;
use crate::volume::Volume;

/// A shared volume, served.
pub struct VolumeDevice<S>(pub Arc<Volume<S>>);

impl<S> Clone for VolumeDevice<S> {
    fn clone(&self) -> Self {
        VolumeDevice(self.0.clone())
    }
}

impl<S: Source> BlockDevice for VolumeDevice<S> {
    fn size(&self) -> u64 {
        self.0.geometry().size()
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            write: true,
            flush: true,
            fua: true,
            trim: true,
            zero: true,
            fast_zero: true,
            cache: true,
            extents: true,
            // One volume, one map, one target behind every connection, and
            // a flush persists all of it.
            multi_conn: true,
            rotational: false,
        }
    }

    async fn read(&self, offset: u64, len: u32) -> io::Result<Vec<Piece>> {
        let v = &self.0;
        let len = u64::from(len);
        let read = v.read(offset, len);
        v.requests()
            .track("READ", offset, len, read)
            .await
            .map_err(|e| e.to_io())
    }

    async fn write(&self, offset: u64, data: Vec<u8>, fua: bool) -> io::Result<()> {
        let len = data.len() as u64;
        let write = self.0.write(offset, data, fua);
        self.0
            .requests()
            .track("WRITE", offset, len, write)
            .await
            .map_err(|e| e.to_io())
    }

    async fn flush(&self) -> io::Result<()> {
        let flush = self.0.flush();
        self.0
            .requests()
            .track("FLUSH", 0, 0, flush)
            .await
            .map_err(|e| e.to_io())
    }

    async fn trim(&self, offset: u64, len: u64, fua: bool) -> io::Result<()> {
        let trim = self.0.trim(offset, len, fua);
        self.0
            .requests()
            .track("TRIM", offset, len, trim)
            .await
            .map_err(|e| e.to_io())
    }

    async fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> io::Result<()> {
        let zero = self
            .0
            .write_zeroes(offset, len, !flags.may_trim, flags.fast, flags.fua);
        match self
            .0
            .requests()
            .track("WRITE_ZEROES", offset, len, zero)
            .await
        {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(io::Error::from_raw_os_error(libc::EOPNOTSUPP)),
            Err(e) => Err(e.to_io()),
        }
    }

    async fn cache(&self, offset: u64, len: u64) -> io::Result<()> {
        let cache = self.0.cache(offset, len);
        self.0
            .requests()
            .track("CACHE", offset, len, cache)
            .await
            .map_err(|e| e.to_io())
    }

    async fn block_status(&self, offset: u64, len: u64) -> io::Result<Vec<Extent>> {
        let status = self.0.block_status(offset, len);
        self.0
            .requests()
            .track("BLOCK_STATUS", offset, len, status)
            .await
            .map_err(|e| e.to_io())
    }
}
