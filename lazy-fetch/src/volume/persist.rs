//! Persistence: flush (target, kept hashes, journal, in that order),
//! clean close, the kept manifest's records and their re-derivation.

use super::*;

impl<S: Source> Volume<S> {
    /// The upkeep of a served volume, until the task is dropped: journal
    /// what hydration made present every few seconds (a restart resumes
    /// close to where it stopped, and pending entries stay few: invariant
    /// 8), keep the write-ahead log within its reserve, save the counters,
    /// and, once every chunk is here, re-derive stale kept hashes while
    /// clients are idle. Client FLUSH and FUA persist at once regardless.
    pub async fn upkeep(self: Arc<Self>) {
        let mut tick = tokio::time::interval(std::time::Duration::from_millis(500));
        let mut last = Instant::now();
        let mut totals_saved = Instant::now();
        loop {
            tick.tick().await;
            if totals_saved.elapsed() >= std::time::Duration::from_secs(10) {
                if let Err(e) = self.save_totals().await {
                    tracing::debug!("saving counters failed: {e}");
                }
                totals_saved = Instant::now();
            }
            if self.map.is_complete()
                && self.stale_hashes() > 0
                && !self.foreground_busy(std::time::Duration::from_millis(200))
                && let Err(e) = self.rehash_stale(64).await
            {
                tracing::debug!("rehashing changed chunks failed (finalize will): {e}");
            }
            let pending = self.pending_entries();
            // Every save syncs the target, which stalls client I/O for tens
            // of ms, so not often.
            let wal_big = self.wal_len() > wal::RESERVE / 2;
            if pending > 65536
                || wal_big
                || (pending > 0 && last.elapsed() >= std::time::Duration::from_secs(5))
            {
                if let Err(e) = self.flush().await {
                    tracing::warn!("saving progress failed (will retry): {e}");
                }
                last = Instant::now();
            }
        }
    }

    /// Record the kept-manifest hashes of the chunks from `first`, after
    /// their target write and before they are marked present (the same
    /// order as the map: a flush syncs the records before the journal).
    pub(super) fn record_hashes(&self, first: ChunkIndex, digests: &[[u8; 32]]) -> Result<()> {
        match &self.hashes {
            Some(h) => h
                .record_run(first, digests)
                .map_err(|source| self.wal_error(source)),
            None => Ok(()),
        }
    }

    /// Whether chunk `c` (present, data) has a current kept hash: recorded
    /// as it became present and not changed in place since.
    pub fn hash_is_kept(&self, c: ChunkIndex) -> bool {
        self.map.state(c) == ChunkState::Data
            && self.hashes.as_ref().is_some_and(|h| !h.is_dirty(c))
    }

    /// Chunks whose kept hash is stale (changed in place since).
    pub fn stale_hashes(&self) -> u64 {
        self.hashes.as_ref().map_or(0, |h| h.dirty_count())
    }

    /// The kept hashes of chunks `first..first + n` as stored (meaningful
    /// where [`Volume::hash_is_kept`]).
    pub async fn kept_hashes(&self, first: ChunkIndex, n: u64) -> Result<Vec<[u8; 32]>> {
        let Some(h) = self.hashes.clone() else {
            return Ok(vec![[0u8; 32]; mem_len(n)]);
        };
        let dir = self.state.path().to_path_buf();
        tokio::task::spawn_blocking(move || h.read(first, n))
            .await
            .map_err(std::io::Error::other)
            .and_then(|r| r)
            .map(|b| {
                b.chunks_exact(32)
                    .map(|r| <[u8; 32]>::try_from(r).expect("32 bytes"))
                    .collect()
            })
            .map_err(|source| Error::StateIo { dir, source })
    }

    /// Re-derive up to `max` stale kept hashes from the target (the
    /// background pass behind finalize's speed): each chunk under its lock,
    /// so no client change can slip between the read and the record.
    /// Chunks someone holds are skipped this time. Returns how many were
    /// rehashed.
    pub async fn rehash_stale(&self, max: usize) -> Result<usize> {
        let Some(h) = self.hashes.clone() else {
            return Ok(0);
        };
        let mut done = 0;
        let mut from = 0;
        while done < max {
            let Some(c) = h.next_dirty(from) else { break };
            from = c.0 + 1;
            let Some(_g) = self.locks.try_lock(c) else {
                continue;
            };
            if !h.is_dirty(c) {
                continue;
            }
            if self.map.state(c) != ChunkState::Data {
                // Zero or absent: no record is read for it.
                continue;
            }
            let r = self.geometry.bytes(c);
            let data = self
                .target
                .read_at(r.start, mem_len(r.end - r.start))
                .await
                .map_err(|source| Error::ReadTarget {
                    offset: r.start,
                    source,
                })?;
            let digest = tokio::task::spawn_blocking(move || *blake3::hash(&data).as_bytes())
                .await
                .map_err(|e| Error::ReadTarget {
                    offset: r.start,
                    source: std::io::Error::other(e),
                })?;
            self.record_hashes(c, &[digest])?;
            done += 1;
        }
        Ok(done)
    }

    /// Chunks in `[offset, offset + len)` changed in place or by a client:
    /// their records are stale until rehashed.
    pub(super) fn stale(&self, offset: u64, len: u64) {
        if let Some(h) = &self.hashes {
            for i in self.geometry.chunks_of(offset, len.max(1)) {
                h.mark_dirty(ChunkIndex(i));
            }
        }
    }

    pub(super) fn wal_error(&self, source: std::io::Error) -> Error {
        Error::PersistMap {
            dir: self.state.path().to_path_buf(),
            source,
        }
    }

    /// Bytes in the current generation of the write-ahead log.
    pub fn wal_len(&self) -> u64 {
        self.wal.len()
    }

    pub(super) fn target_error(&self, index: ChunkIndex, source: std::io::Error) -> Error {
        Stats::add(&self.stats.target_errors, 1);
        Error::WriteTarget { index, source }
    }

    /// Make every write that completed before this call durable, with the
    /// map entries that describe it (invariant 3; order in `state`).
    pub async fn flush(&self) -> Result<()> {
        let _one_at_a_time = waiting(Wait::FlushQueue, self.persist.lock()).await;
        // Every in-place change logged so far reaches the target before the
        // sync below; the log that covers them can go once it is done.
        let retired = self
            .wal
            .rotate()
            .await
            .map_err(|source| self.wal_error(source))?;
        let entries = self.state.take_pending();
        let snapshot = (self.state.journal_len() > state::CHECKPOINT_AFTER)
            .then(|| state::map_bytes(&self.map));
        let checkpointed = snapshot.is_some();
        if let Err(e) = self.target.sync().await {
            self.state.restore_pending(entries);
            Stats::add(&self.stats.target_errors, 1);
            return Err(Error::SyncTarget(e));
        }
        let st = self.state.clone();
        let hashes = self.hashes.clone();
        let dir = self.state.path().to_path_buf();
        let journal = tokio::task::spawn_blocking(move || {
            // The records of the chunks the journal is about to call
            // present, durable before it does.
            if let Some(Err(source)) = hashes.as_ref().map(|h| h.sync()) {
                st.restore_pending(entries);
                return Err(Error::PersistMap { dir, source });
            }
            if let Err(e) = st.append(&entries) {
                st.restore_pending(entries);
                return Err(e);
            }
            match snapshot {
                Some(s) => st.checkpoint(&s),
                None => Ok(()),
            }
        });
        waiting(Wait::Journal, journal)
            .await
            .map_err(|e| Error::PersistMap {
                dir: self.state.path().to_path_buf(),
                source: std::io::Error::other(e),
            })??;
        self.wal
            .remove(retired)
            .map_err(|source| self.wal_error(source))?;
        if checkpointed {
            self.save_totals().await?;
        }
        Ok(())
    }

    /// Save the cumulative counters beside the state.
    pub async fn save_totals(&self) -> Result<()> {
        let st = self.state.clone();
        let totals = self.stats.totals();
        tokio::task::spawn_blocking(move || st.save_totals(&totals))
            .await
            .map_err(|e| Error::PersistMap {
                dir: self.state.path().to_path_buf(),
                source: std::io::Error::other(e),
            })?
    }

    /// Entries waiting for the next flush.
    pub fn pending_entries(&self) -> usize {
        self.state.pending()
    }

    /// Wait until no background task (readahead, whole-chunk fetch) runs:
    /// they hold the volume.
    pub async fn idle(&self) {
        loop {
            let done = self.readahead_alive.1.notified();
            tokio::pin!(done);
            done.as_mut().enable();
            if self.readahead_alive.0.load(Ordering::Acquire) == 0 {
                return;
            }
            done.await;
        }
    }

    /// Final persist and checkpoint of a clean stop.
    pub async fn close(&self) -> Result<()> {
        self.idle().await;
        self.flush().await?;
        let _g = self.persist.lock().await;
        let st = self.state.clone();
        let snapshot = state::map_bytes(&self.map);
        let totals = self.stats.totals();
        let hashes = self.hashes.clone();
        let dir = self.state.path().to_path_buf();
        tokio::task::spawn_blocking(move || {
            st.checkpoint(&snapshot)?;
            st.save_totals(&totals)?;
            // Which kept hashes are stale, for the next open (an unclean
            // stop takes every written chunk as stale instead).
            if let Some(Err(source)) = hashes.as_ref().map(|h| h.save_dirty()) {
                return Err(Error::PersistMap { dir, source });
            }
            st.mark_clean()
        })
        .await
        .map_err(|e| Error::PersistMap {
            dir: self.state.path().to_path_buf(),
            source: std::io::Error::other(e),
        })?
    }
}
