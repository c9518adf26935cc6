//! The client half of the source-side proof (issue 15): the records of a
//! hash export (`lazy_fetch::proof`, served by `stream export` as
//! `blake3/SIZE/NAME`) read over one NBD connection, so the verifier
//! compares 32 bytes per chunk instead of reading the chunk.

use std::io;

use futures_util::future::BoxFuture;
use lazy_fetch::proof::{ChunkHashes, HASH_LEN};
use nbd_server::client::Client;

/// The chunk hashes a source computes where the disk is, read over one
/// NBD connection to its hash export: 32 bytes per chunk cross the link.
pub struct RemoteHashes {
    client: Client,
    chunks: u64,
}

impl RemoteHashes {
    /// A connection to a hash export of `chunks` records (checked).
    pub fn new(client: Client, chunks: u64) -> Option<RemoteHashes> {
        (client.size() == chunks * HASH_LEN).then_some(RemoteHashes { client, chunks })
    }

    pub fn chunks(&self) -> u64 {
        self.chunks
    }

    /// Records of chunks `first..first + n`.
    pub async fn read(&self, first: u64, n: u64) -> io::Result<Vec<[u8; 32]>> {
        let max = u64::from(self.client.max_payload().max(4096)) / HASH_LEN * HASH_LEN;
        let (mut at, end) = (first * HASH_LEN, (first + n) * HASH_LEN);
        let mut out =
            Vec::with_capacity(usize::try_from(n).expect("a window of records in memory"));
        while at < end {
            let len = (end - at).min(max);
            let bytes = self
                .client
                .read(at, u32::try_from(len).expect("at most max_payload, a u32"))
                .await
                .map_err(io::Error::other)?;
            out.extend(
                bytes
                    .chunks_exact(usize::try_from(HASH_LEN).expect("HASH_LEN is 32"))
                    .map(|r| <[u8; 32]>::try_from(r).expect("32 bytes")),
            );
            at += len;
        }
        Ok(out)
    }
}

impl ChunkHashes for RemoteHashes {
    fn read(&self, first: u64, n: u64) -> BoxFuture<'_, io::Result<Vec<[u8; 32]>>> {
        Box::pin(RemoteHashes::read(self, first, n))
    }
}
