//! Any source `stream start` can be given: a local file or block device, an
//! NBD export, or a disk on a legacy host read through its sshd. It is
//! wiring: it lives in the binary, so neither the engine nor a source
//! crate depends on another source's protocol.

use std::io;
use std::sync::Arc;

use lazy_fetch::fingerprint::Fingerprint;
use lazy_fetch::proof::ChunkHashes;
use lazy_fetch::source::file::FileSource;
use lazy_fetch::source::{Class, Extent, Health, Source};
use lazy_fetch::state::SourceId;

use nbd_source::NbdSource;
use ssh_source::SshSource;

/// Any source `stream start` can be given.
pub enum AnySource {
    File(FileSource),
    Nbd(NbdSource),
    // Boxed: its session slots and options make it the largest by far.
    Ssh(Box<SshSource>),
}

impl Source for AnySource {
    fn id(&self) -> SourceId {
        match self {
            AnySource::File(s) => s.id(),
            AnySource::Nbd(s) => s.id(),
            AnySource::Ssh(s) => s.id(),
        }
    }

    async fn read(&self, offset: u64, len: usize, class: Class) -> io::Result<Vec<u8>> {
        match self {
            AnySource::File(s) => s.read(offset, len, class).await,
            AnySource::Nbd(s) => s.read(offset, len, class).await,
            AnySource::Ssh(s) => s.read(offset, len, class).await,
        }
    }

    async fn block_status(&self, offset: u64, len: u64) -> io::Result<Option<Vec<Extent>>> {
        match self {
            AnySource::File(s) => s.block_status(offset, len).await,
            AnySource::Nbd(s) => s.block_status(offset, len).await,
            AnySource::Ssh(s) => s.block_status(offset, len).await,
        }
    }

    fn health(&self) -> Health {
        match self {
            AnySource::File(s) => s.health(),
            AnySource::Nbd(s) => s.health(),
            AnySource::Ssh(s) => s.health(),
        }
    }

    async fn chunk_hashes(&self, chunk: u64) -> Option<Box<dyn ChunkHashes>> {
        match self {
            AnySource::File(s) => s.chunk_hashes(chunk).await,
            AnySource::Nbd(s) => s.chunk_hashes(chunk).await,
            AnySource::Ssh(s) => s.chunk_hashes(chunk).await,
        }
    }

    async fn install_fingerprint(&self, fp: Arc<Fingerprint>) -> io::Result<()> {
        match self {
            AnySource::File(s) => s.install_fingerprint(fp).await,
            AnySource::Nbd(s) => s.install_fingerprint(fp).await,
            AnySource::Ssh(s) => s.install_fingerprint(fp).await,
        }
    }
}
