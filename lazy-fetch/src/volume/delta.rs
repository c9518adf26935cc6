//! A seeded migration's delta (`stream seed`, then `stream start` at
//! cutover): which copied chunks differ from the source now, and forgetting
//! them so they are fetched again.
//!
//! Why: `stream seed` copies the legacy disk while it is still in use, so
//! a copied chunk may be stale by the time of the next pass or of the
//! cutover. Its kept hash (`hashes`, recorded from the bytes copied) is
//! compared with the source's hash of the same chunk, computed where the
//! disk is (`stream export`'s hash exports, 32 bytes a chunk over the link)
//! or, for a local source, by reading it here. A chunk that differs (or
//! whose kept hash is stale) is *forgotten*: absent again, to be fetched on
//! demand or by hydration. A source that serves no hashes over a link
//! cannot be compared without reading the whole disk across it: the caller
//! decides (`stream start` refuses unless told to fetch everything again).
//!
//! Forgetting is the one place a chunk goes back to absent, and it is
//! allowed only while nothing serves or fetches (right after `open`) and
//! before any client wrote (a written chunk holds data the source never
//! had): `check_may_forget` refuses otherwise. The new map is written as a checkpoint, since no journal entry can
//! say "absent"; the target ranges are then cleared on a sparse target
//! (recovery's rule: an absent chunk reads as zeros there), and after a
//! crash in between recovery clears them.

use super::*;
use crate::manifest::ZeroHashes;

/// Records compared per request.
const BATCH: u64 = 4096;

impl<S: Source> Volume<S> {
    /// The present chunks whose copy differs from the source now, in order;
    /// `None` when the source serves no chunk hashes and is not local.
    /// `progress(done, total)` as chunks are compared.
    pub async fn changed_chunks(
        &self,
        progress: &(dyn Fn(u64, u64) + Sync),
    ) -> Result<Option<Vec<u64>>> {
        let g = self.geometry;
        let n = g.chunks();
        let remote = self.source.chunk_hashes(g.chunk_size()).await;
        if remote.is_none() && self.source.id().kind != "file" {
            return Ok(None);
        }
        let zeros = ZeroHashes::new(g.chunk_size());
        let mut changed = Vec::new();
        let mut first = 0;
        while first < n {
            let k = BATCH.min(n - first);
            let theirs = match &remote {
                Some(r) => r.read(first, k).await.map_err(|source| Error::FetchChunk {
                    index: ChunkIndex(first),
                    source,
                })?,
                None => self.hash_source_locally(first, k).await?,
            };
            let kept = self.kept_hashes(ChunkIndex(first), k).await?;
            for (j, (ours, theirs)) in kept.iter().zip(&theirs).enumerate() {
                let c = ChunkIndex(first + j as u64);
                let r = g.bytes(c);
                let same = match self.map.state(c) {
                    ChunkState::Absent => continue,
                    ChunkState::Zero => zeros.of(r.end - r.start) == *theirs,
                    ChunkState::Data => self.hash_is_kept(c) && ours == theirs,
                };
                if !same {
                    changed.push(c.0);
                }
            }
            first += k;
            progress(first, n);
        }
        Ok(Some(changed))
    }

    /// The blake3 of chunks `first..first + n` of a local source, read here.
    async fn hash_source_locally(&self, first: u64, n: u64) -> Result<Vec<[u8; 32]>> {
        let g = self.geometry;
        let mut out = Vec::with_capacity(mem_len(n));
        for i in first..first + n {
            let c = ChunkIndex(i);
            let r = g.bytes(c);
            let bytes = self
                .source
                .read(r.start, mem_len(r.end - r.start), Class::Background)
                .await
                .map_err(|source| Error::FetchChunk { index: c, source })?;
            out.push(*blake3::hash(&bytes).as_bytes());
        }
        Ok(out)
    }

    /// Whether chunks may go back to absent now (the fence of the module
    /// docs, checked here for [`Volume::forget_changed`] and
    /// [`Volume::make_candidates`]): no client has written, and nothing is
    /// in flight (client requests, foreground fetches, readahead).
    pub(super) fn check_may_forget(&self) -> Result<()> {
        if self.map.written_count() > 0 {
            return Err(Error::Invalid(
                "clients have written to this volume: its chunks can no longer be compared \
                 with the source and fetched again"
                    .into(),
            ));
        }
        let busy = !self.requests.is_empty()
            || self.foreground_active() > 0
            || self.readahead_alive.0.load(Ordering::Acquire) > 0;
        if busy {
            return Err(Error::Invalid(
                "the volume is serving: chunks go back to absent only before it serves".into(),
            ));
        }
        Ok(())
    }

    /// Write the map as a checkpoint now: no journal entry can say
    /// "absent", so a map with forgotten chunks is made durable whole.
    pub(super) async fn checkpoint_now(&self) -> Result<()> {
        let snapshot = state::map_bytes(&self.map);
        let st = self.state.clone();
        tokio::task::spawn_blocking(move || st.checkpoint(&snapshot))
            .await
            .map_err(|e| Error::PersistMap {
                dir: self.state.path().to_path_buf(),
                source: std::io::Error::other(e),
            })?
    }

    /// Make `changed` (chunk indexes, in order) absent again, durably; see
    /// the module docs for when this is allowed. Returns how many were
    /// present.
    pub async fn forget_changed(&self, changed: &[u64]) -> Result<u64> {
        self.check_may_forget()?;
        let mut forgotten = 0;
        for &i in changed {
            if self.map.forget(ChunkIndex(i)) {
                forgotten += 1;
            }
        }
        self.checkpoint_now().await?;
        if self.sparse_target {
            let g = self.geometry;
            let mut at = 0;
            while at < changed.len() {
                // One clear per run of consecutive chunks.
                let start = changed[at];
                let mut end = start + 1;
                while at + 1 < changed.len() && changed[at + 1] == end {
                    at += 1;
                    end += 1;
                }
                at += 1;
                let s = g.bytes(ChunkIndex(start)).start;
                let e = g.bytes(ChunkIndex(end - 1)).end;
                self.target
                    .zero(s, e - s, false)
                    .await
                    .map_err(|source| self.target_error(ChunkIndex(start), source))?;
            }
        }
        self.flush().await?;
        Ok(forgotten)
    }
}
