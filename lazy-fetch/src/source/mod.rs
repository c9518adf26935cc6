//! Where the legacy disk is read from.
//!
//! A source is positional reads, a size and an optional block status (its
//! holes are learnt and never fetched). Reads say whether they serve a
//! client now ([`Class::Foreground`]) or the background hydration, so a
//! source with a queue can keep the two apart (invariant 7).
//!
//! Here: the trait, a local file or block device (`file.rs`) and the
//! in-memory source of the tests (`memory.rs`). The NBD source is the
//! `nbd-source` crate, so the engine depends on no protocol crate.

pub mod file;
pub mod memory;

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
    ) -> impl Future<Output = Option<Box<dyn crate::proof::ChunkHashes>>> + Send {
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
