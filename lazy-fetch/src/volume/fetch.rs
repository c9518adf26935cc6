//! Fetching from the source: the absent chunks a client waits for (the
//! piece it asked for answered first), runs for hydration and readahead,
//! the source's holes, and CACHE.

use super::*;

/// Whether fetched bytes also stay in the page cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Keep {
    /// A client reads them soon (its own fetch, readahead, CACHE).
    Cached,
    /// Nobody asked for them (hydration): written around the page cache
    /// where the target allows (`target/direct.rs`).
    Cold,
}

impl<S: Source> Volume<S> {
    /// Serve `[s, e)` of chunk `c`, which was absent when looked at.
    pub(super) async fn read_absent(
        self: &Arc<Self>,
        c: ChunkIndex,
        s: u64,
        e: u64,
    ) -> Result<Piece> {
        let r = self.geometry.bytes(c);
        let g = self.locks.lock(c).await;
        match self.map.state(c) {
            ChunkState::Zero => return Ok(Piece::Zero(e - s)),
            ChunkState::Data => {
                drop(g);
                return self
                    .target
                    .read_at(s, mem_len(e - s))
                    .await
                    .map(Piece::Data)
                    .map_err(|source| Error::ReadTarget { offset: s, source });
            }
            ChunkState::Absent => {}
        }
        let started = Instant::now();
        Stats::add(&self.stats.chunks_fetched_on_demand, 1);
        // A candidate is compared, not read from the source: its bytes are
        // in the target already, most likely right.
        if !self.is_candidate(c) {
            if s != r.start || e != r.end {
                return self.read_piece_first(g, s, e, started).await;
            }
            return self.read_chunk_first(g, started).await;
        }
        let fetched = match self
            .fetch_locked(&[g], Class::Foreground, Keep::Cached)
            .await
        {
            Ok(f) => f,
            // The target is full: the chunk stays absent (nothing was
            // marked), but a read must not fail for want of room to cache
            // it. Serve it from the source, under the same lock.
            Err(err) if err.kind() == crate::error::ErrorKind::NoSpace => {
                let data = self
                    .source_read(s, mem_len(e - s), Class::Foreground)
                    .await
                    .map_err(|source| {
                        Stats::add(&self.stats.source_errors, 1);
                        Error::FetchChunk { index: c, source }
                    })?;
                Stats::add(&self.stats.bytes_fetched, e - s);
                self.note_fg_fetch(started.elapsed());
                return Ok(Piece::Data(data));
            }
            Err(err) => return Err(err),
        };
        self.note_fg_fetch(started.elapsed());
        Ok(match fetched {
            Fetched::Zero => Piece::Zero(e - s),
            Fetched::Data(buf) if s == r.start && e == r.end => Piece::Data(buf),
            Fetched::Data(buf) => {
                Piece::Data(buf[mem_len(s - r.start)..mem_len(e - r.start)].to_vec())
            }
        })
    }

    /// A client waits for the whole absent chunk locked by `g`: answer it
    /// as soon as the source's bytes are in, and store the chunk behind the
    /// answer in a task that keeps the lock (its hash and target write are
    /// off the client's wait). Anything else that wants the chunk waits for
    /// the lock, so it sees the chunk stored; if storing fails the chunk
    /// stays absent, as after a failed fetch, and the client had the
    /// source's bytes either way.
    async fn read_chunk_first(self: &Arc<Self>, g: ChunkGuard, started: Instant) -> Result<Piece> {
        let c = g.index();
        let data = self
            .read_chunks(c, self.geometry.bytes(c), Class::Foreground)
            .await?;
        let answer = data.clone();
        let volume = self.clone();
        self.behind(async move {
            if let Err(e) = volume.store_fetched(&[g], data, Keep::Cached).await {
                tracing::debug!("storing chunk {} after answering: {e}", c.0);
            }
        });
        self.note_fg_fetch(started.elapsed());
        Ok(Piece::Data(answer))
    }

    /// A client waits for `[s, e)`, part of the absent chunk locked by `g`:
    /// read just that piece (4 KiB aligned) from the source and answer with
    /// it, while a task that keeps the chunk's lock fetches and stores the
    /// whole chunk, in parallel on the foreground connection. The client
    /// waits one source round trip for a few KiB instead of for the whole
    /// chunk and its target write. The piece is never stored, so the chunk
    /// is still fetched once (invariant 2); the source does not change, so
    /// the piece equals what the chunk will hold, and any write to the
    /// chunk waits for the lock, so it lands after the chunk is stored.
    pub(super) async fn read_piece_first(
        self: &Arc<Self>,
        g: ChunkGuard,
        s: u64,
        e: u64,
        started: Instant,
    ) -> Result<Piece> {
        let c = g.index();
        let r = self.geometry.bytes(c);
        let ps = (s & !4095).max(r.start);
        let pe = e.next_multiple_of(4096).min(r.end);
        let volume = self.clone();
        let whole = self.behind(async move {
            volume
                .fetch_locked(&[g], Class::Foreground, Keep::Cached)
                .await
        });
        let piece = {
            let _fg = ForegroundGuard::new(&self.fg_active);
            self.source_read(ps, mem_len(pe - ps), Class::Foreground)
                .await
        };
        match piece {
            Ok(data) if data.len() == mem_len(pe - ps) => {
                Stats::add(&self.stats.bytes_fetched, pe - ps);
                self.note_fg_fetch(started.elapsed());
                Ok(Piece::Data(data[mem_len(s - ps)..mem_len(e - ps)].to_vec()))
            }
            // Fall back on the whole chunk (its error, if it fails too).
            _ => {
                let fetched = whole.await.map_err(|join| Error::FetchChunk {
                    index: c,
                    source: std::io::Error::other(join),
                })??;
                self.note_fg_fetch(started.elapsed());
                Ok(match fetched {
                    Fetched::Zero => Piece::Zero(e - s),
                    Fetched::Data(buf) => {
                        Piece::Data(buf[mem_len(s - r.start)..mem_len(e - r.start)].to_vec())
                    }
                })
            }
        }
    }

    /// Fetch the contiguous absent chunks whose locks are `guards` (in
    /// order) and store them: candidates among them are compared with the
    /// source first (`candidate`), the rest read with one source read per
    /// stretch. The returned buffer covers all of them (`Fetched::Zero`
    /// only if every chunk was fetched and found zero).
    pub async fn fetch_locked(
        &self,
        guards: &[ChunkGuard],
        class: Class,
        keep: Keep,
    ) -> Result<Fetched> {
        if let Some(k) = self.candidates.get() {
            if guards.iter().any(|x| k.bits_get(x.index())) {
                return self.confirm_or_fetch(k, guards, class, keep).await;
            }
        }
        self.fetch_from_source(guards, class, keep).await
    }

    /// [`Volume::fetch_locked`] without candidates: one source read.
    pub(super) async fn fetch_from_source(
        &self,
        guards: &[ChunkGuard],
        class: Class,
        keep: Keep,
    ) -> Result<Fetched> {
        let (first, _, range) = self.run_of(guards);
        let data = self.read_chunks(first, range, class).await?;
        self.store_fetched(guards, data, keep).await
    }

    /// The first and last chunk of a locked run, and its bytes.
    fn run_of(&self, guards: &[ChunkGuard]) -> (ChunkIndex, ChunkIndex, std::ops::Range<u64>) {
        let first = guards.first().expect("at least one chunk").index();
        let last = guards.last().expect("at least one chunk").index();
        let range = self.geometry.bytes(first).start..self.geometry.bytes(last).end;
        (first, last, range)
    }

    /// Read `range` (chunks from `first`) from the source, whole, as a
    /// fetch: a failure or a short read is the fetch's error, and a
    /// foreground read is counted as clients waiting on the source.
    async fn read_chunks(
        &self,
        first: ChunkIndex,
        range: std::ops::Range<u64>,
        class: Class,
    ) -> Result<Vec<u8>> {
        let len = mem_len(range.end - range.start);
        let _fg = (class == Class::Foreground).then(|| ForegroundGuard::new(&self.fg_active));
        let data = self
            .source_read(range.start, len, class)
            .await
            .map_err(|source| {
                Stats::add(&self.stats.source_errors, 1);
                Error::FetchChunk {
                    index: first,
                    source,
                }
            })?;
        if data.len() != len {
            return Err(Error::FetchChunk {
                index: first,
                source: std::io::Error::other("source returned a short read"),
            });
        }
        Ok(data)
    }

    /// Run `work` (which holds chunk locks) in a task of its own, counted
    /// with readahead so a flush or a stop waits for it.
    pub(super) fn behind<T: Send + 'static>(
        self: &Arc<Self>,
        work: impl std::future::Future<Output = T> + Send + 'static,
    ) -> tokio::task::JoinHandle<T> {
        let alive = self.readahead_alive.clone();
        alive.0.fetch_add(1, Ordering::AcqRel);
        tokio::spawn(async move {
            let out = work.await;
            alive.0.fetch_sub(1, Ordering::AcqRel);
            alive.1.notify_waiters();
            out
        })
    }

    /// Store `data`, the source's bytes of the chunks locked by `guards`
    /// (contiguous, in order): zero chunks become holes, the others are
    /// written and hashed, then all are marked present.
    pub(super) async fn store_fetched(
        &self,
        guards: &[ChunkGuard],
        data: Vec<u8>,
        keep: Keep,
    ) -> Result<Fetched> {
        let (first, last, range) = self.run_of(guards);
        let len = mem_len(range.end - range.start);
        // Durable before the chunk can be marked present.
        self.fingerprint.offer_async(first.0, &data).await?;
        Stats::add(&self.stats.bytes_fetched, len as u64);
        // Which chunks are all zero, and the blake3 of the others for the
        // kept manifest, from the bytes in hand, off the runtime threads.
        let (g, start, hashed) = (self.geometry, range.start, self.hashes.is_some());
        let chunks: Vec<ChunkIndex> = guards.iter().map(|g| g.index()).collect();
        let (data, zero, digests) = tokio::task::spawn_blocking(move || {
            let mut zero = Vec::with_capacity(chunks.len());
            let mut digests = Vec::with_capacity(chunks.len());
            for c in chunks {
                let r = g.bytes(c);
                let piece = &data[mem_len(r.start - start)..mem_len(r.end - start)];
                let z = is_zero(piece);
                zero.push(z);
                digests.push(match (z, hashed) {
                    (false, true) => *blake3::hash(piece).as_bytes(),
                    _ => [0u8; 32],
                });
            }
            (data, zero, digests)
        })
        .await
        .map_err(|e| Error::FetchChunk {
            index: first,
            source: std::io::Error::other(e),
        })?;
        if zero.iter().all(|&z| z) {
            self.store_zero(first.0..last.0 + 1, false, false).await?;
            Stats::add(&self.stats.chunks_found_zero, guards.len() as u64);
            return Ok(Fetched::Zero);
        }
        let data = if zero.iter().any(|&z| z) {
            // Write only the data chunks; zero ones stay holes.
            for (g, z) in guards.iter().zip(&zero) {
                let c = g.index();
                let r = self.geometry.bytes(c);
                if *z {
                    self.store_zero(c.0..c.0 + 1, false, false).await?;
                    Stats::add(&self.stats.chunks_found_zero, 1);
                } else {
                    let piece =
                        data[mem_len(r.start - range.start)..mem_len(r.end - range.start)].to_vec();
                    self.store(r.start, piece, keep)
                        .await
                        .map_err(|source| self.target_error(c, source))?;
                    self.record_hashes(c, &digests[mem_len(c.0 - first.0)..][..1])?;
                    self.mark(c, ChunkState::Data, false);
                }
            }
            data
        } else {
            let data = self
                .store(range.start, data, keep)
                .await
                .map_err(|source| self.target_error(first, source))?;
            self.record_hashes(first, &digests)?;
            for g in guards {
                self.mark(g.index(), ChunkState::Data, false);
            }
            data
        };
        Ok(Fetched::Data(data))
    }

    /// Write fetched bytes to the target.
    async fn store(&self, offset: u64, data: Vec<u8>, keep: Keep) -> std::io::Result<Vec<u8>> {
        match keep {
            Keep::Cached => self.target.write_at(offset, data).await,
            Keep::Cold => self.target.write_bulk(offset, data).await,
        }
    }

    /// Read the source, noted as what the current request waits for.
    pub(super) async fn source_read(
        &self,
        offset: u64,
        len: usize,
        class: Class,
    ) -> std::io::Result<Vec<u8>> {
        let wait = Wait::SourceRead {
            offset,
            len: len as u64,
        };
        waiting(wait, self.source.read(offset, len, class)).await
    }

    /// Learn the source's holes in `[offset, offset + len)`: whole absent
    /// chunks inside an extent the source says reads as zeros become zero
    /// chunks without a fetch. Chunks someone else holds are skipped.
    /// Returns how many chunks were learnt.
    pub async fn learn_holes(&self, offset: u64, len: u64) -> Result<u64> {
        let extents = match self.source.block_status(offset, len).await {
            Ok(Some(e)) => e,
            Ok(None) => return Ok(0),
            Err(e) => {
                tracing::debug!("source block status failed: {e}");
                return Ok(0);
            }
        };
        let mut learnt = 0;
        let mut at = offset;
        for Extent { length, zero, .. } in extents {
            let (s, e) = (at, (at + length).min(self.geometry.size()));
            at = e;
            if !zero || e <= s {
                continue;
            }
            let first = s.div_ceil(self.geometry.chunk_size());
            let last = self.geometry.chunks_of(s, e - s).end;
            let mut run = Vec::new();
            for i in first..last {
                let c = ChunkIndex(i);
                if !self.geometry.covers(c, s, e - s) || self.map.state(c) != ChunkState::Absent {
                    continue;
                }
                let Some(g) = self.locks.try_lock(c) else {
                    continue;
                };
                if self.map.state(c) != ChunkState::Absent {
                    continue;
                }
                if run
                    .last()
                    .is_some_and(|p: &ChunkGuard| p.index().0 + 1 != i)
                {
                    learnt += self.zero_source_run(&mut run).await?;
                }
                run.push(g);
                if run.len() >= 4096 {
                    learnt += self.zero_source_run(&mut run).await?;
                }
            }
            learnt += self.zero_source_run(&mut run).await?;
            if at >= offset + len {
                break;
            }
        }
        Ok(learnt)
    }

    pub(super) async fn zero_source_run(&self, run: &mut Vec<ChunkGuard>) -> Result<u64> {
        let Some(first) = run.first().map(|g| g.index().0) else {
            return Ok(0);
        };
        let n = run.len() as u64;
        self.store_zero(first..first + n, false, false).await?;
        Stats::add(&self.stats.chunks_source_holes, n);
        run.clear();
        Ok(n)
    }

    /// Prefetch `[offset, offset + len)` (NBD CACHE): fetch the absent
    /// chunks into the target and drop the bytes. Memory is bounded
    /// whatever the length and however many CACHE requests run: runs of at
    /// most [`MAX_RUN`] chunks, at most [`CACHE_SLOTS`] runs at a time on
    /// the volume (issue 13: one 512 MiB CACHE held 512 MiB, once per
    /// request in flight).
    pub async fn cache(self: &Arc<Self>, offset: u64, len: u64) -> Result<()> {
        let chunks = self.geometry.chunks_of(offset, len);
        let mut i = chunks.start;
        while i < chunks.end {
            let c = ChunkIndex(i);
            if self.map.state(c) != ChunkState::Absent {
                i += 1;
                continue;
            }
            // A prefetch hint yields to clients as hydration does: while
            // they are busy, one run at a time on the volume, after giving
            // their requests a head start.
            let busy = self.yield_to_clients(CACHE_YIELD_WINDOW).await;
            let slots = if busy {
                u32::try_from(CACHE_SLOTS).expect("CACHE_SLOTS is 4")
            } else {
                1
            };
            let _slot = self
                .cache_slots
                .acquire_many(slots)
                .await
                .expect("never closed");
            let max = usize::try_from(chunks.end - i).map_or(MAX_RUN, |n| n.min(MAX_RUN));
            let mut guards = self.lock_run(c, max);
            if guards.is_empty() {
                // Someone else is changing it: wait for them, then look again.
                let g = self.locks.lock(c).await;
                if self.map.state(c) != ChunkState::Absent {
                    i += 1;
                    continue;
                }
                guards.push(g);
            }
            let n = guards.len();
            self.fetch_locked(&guards, Class::Background, Keep::Cached)
                .await?;
            Stats::add(&self.stats.chunks_fetched_on_demand, n as u64);
            i += n as u64;
        }
        Ok(())
    }

    /// Lock up to `max` contiguous absent chunks from `start` (skipping none:
    /// the run stops at the first present or busy chunk), fetch them with
    /// one source read and store them. Returns how many chunks it covered
    /// (0 if `start` was present or busy).
    pub async fn fetch_run_from(
        &self,
        start: ChunkIndex,
        max: usize,
        class: Class,
    ) -> Result<usize> {
        let guards = self.lock_run(start, max);
        self.fetch_run(guards, class, Keep::Cached).await
    }

    /// Lock up to `max` contiguous absent chunks from `start`, without
    /// waiting: the run stops at the first present or busy chunk.
    pub fn lock_run(&self, start: ChunkIndex, max: usize) -> Vec<ChunkGuard> {
        let mut guards = Vec::new();
        let mut i = start.0;
        while guards.len() < max && i < self.geometry.chunks() {
            let c = ChunkIndex(i);
            if self.map.state(c) != ChunkState::Absent {
                break;
            }
            let Some(g) = self.locks.try_lock(c) else {
                break;
            };
            if self.map.state(c) != ChunkState::Absent {
                break;
            }
            guards.push(g);
            i += 1;
        }
        guards
    }

    /// Fetch and store a run locked by [`Volume::lock_run`]; returns its length.
    pub async fn fetch_run(
        &self,
        guards: Vec<ChunkGuard>,
        class: Class,
        keep: Keep,
    ) -> Result<usize> {
        if guards.is_empty() {
            return Ok(0);
        }
        self.fetch_locked(&guards, class, keep).await?;
        Stats::add(&self.stats.chunks_hydrated, guards.len() as u64);
        Ok(guards.len())
    }
}
