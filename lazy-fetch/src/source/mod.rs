//! Where the legacy disk is read from.
//!
//! A source is positional reads, a size and an optional block status (its
//! holes are learnt and never fetched). Reads say whether they serve a
//! client now ([`Class::Foreground`]) or the background hydration, so a
//! source with a queue can keep the two apart (invariant 7).

pub mod file;
pub mod memory;
pub mod nbd;

use std::future::Future;
use std::io;
use std::sync::Arc;

pub use block_device::Extent;

use crate::fingerprint::Fingerprint;
use crate::state::SourceId;

/// Who is waiting for a read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Class {
    /// A client request waits on it.
    Foreground,
    /// Hydration or readahead.
    Background,
}

/// How the source is doing, for `stream status`.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case", tag = "state", content = "detail")]
pub enum Health {
    Up,
    Reconnecting(String),
    Down(String),
}

pub trait Source: Send + Sync + 'static {
    /// Identity recorded in the state and checked on resume.
    fn id(&self) -> SourceId;

    /// `len` bytes at `offset` (within the source).
    fn read(
        &self,
        offset: u64,
        len: usize,
        class: Class,
    ) -> impl Future<Output = io::Result<Vec<u8>>> + Send;

    /// Allocation from `offset`, or `None` when the source cannot tell.
    fn block_status(
        &self,
        _offset: u64,
        _len: u64,
    ) -> impl Future<Output = io::Result<Option<Vec<Extent>>>> + Send {
        async { Ok(None) }
    }

    fn health(&self) -> Health {
        Health::Up
    }

    /// The blake3 of each `chunk`-byte chunk, computed where the disk is
    /// (`stream export`'s hash exports, see `proof`), or `None` when the
    /// source cannot serve them: the caller then reads the chunks.
    fn chunk_hashes(
        &self,
        _chunk: u64,
    ) -> impl Future<Output = Option<crate::proof::RemoteHashes>> + Send {
        async { None }
    }

    /// Check the source against the migration's fingerprint now (a resume)
    /// and, for a source that reconnects, on every new connection from now
    /// on. A mismatch is an error naming the chunk; a source that refuses
    /// keeps failing its reads, so nothing of another disk is fetched.
    ///
    /// This default reads the samples (a local source: no wait).
    fn install_fingerprint(
        &self,
        fp: Arc<Fingerprint>,
    ) -> impl Future<Output = io::Result<()>> + Send {
        async move {
            let id = self.id();
            let found = Fingerprint::check(&fp.samples(), fp.geometry(), &id.location, |o, n| {
                self.read(o, n, Class::Foreground)
            })
            .await?;
            match found {
                Some(m) => Err(io::Error::other(m.to_string())),
                None => Ok(()),
            }
        }
    }
}

/// Any source `stream start` can be given.
pub enum AnySource {
    File(file::FileSource),
    Nbd(nbd::NbdSource),
}

impl Source for AnySource {
    fn id(&self) -> SourceId {
        match self {
            AnySource::File(s) => s.id(),
            AnySource::Nbd(s) => s.id(),
        }
    }

    async fn read(&self, offset: u64, len: usize, class: Class) -> io::Result<Vec<u8>> {
        match self {
            AnySource::File(s) => s.read(offset, len, class).await,
            AnySource::Nbd(s) => s.read(offset, len, class).await,
        }
    }

    async fn block_status(&self, offset: u64, len: u64) -> io::Result<Option<Vec<Extent>>> {
        match self {
            AnySource::File(s) => s.block_status(offset, len).await,
            AnySource::Nbd(s) => s.block_status(offset, len).await,
        }
    }

    fn health(&self) -> Health {
        match self {
            AnySource::File(s) => s.health(),
            AnySource::Nbd(s) => s.health(),
        }
    }

    async fn chunk_hashes(&self, chunk: u64) -> Option<crate::proof::RemoteHashes> {
        match self {
            AnySource::File(s) => s.chunk_hashes(chunk).await,
            AnySource::Nbd(s) => s.chunk_hashes(chunk).await,
        }
    }

    async fn install_fingerprint(&self, fp: Arc<Fingerprint>) -> io::Result<()> {
        match self {
            AnySource::File(s) => s.install_fingerprint(fp).await,
            AnySource::Nbd(s) => s.install_fingerprint(fp).await,
        }
    }
}
