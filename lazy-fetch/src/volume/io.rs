//! The I/O path of client requests: reads, writes, trims, write-zeroes
//! and block status, each chunk changed under its lock; in-place changes
//! to present chunks go through one function that logs them first.

use super::*;

impl<S: Source> Volume<S> {
    /// Read `[offset, offset + len)` as pieces.
    pub async fn read(self: &Arc<Self>, offset: u64, len: u64) -> Result<Vec<Piece>> {
        self.note_foreground();
        self.note_sequential(offset, len);
        let mut parts: Vec<BoxFuture<'_, Result<Piece>>> = Vec::new();
        let end = offset + len;
        let mut at = offset;
        let chunks = self.geometry.chunks_of(offset, len);
        let mut i = chunks.start;
        let mut missed = None;
        while i < chunks.end {
            let c = ChunkIndex(i);
            let state = self.map.state(c);
            if state == ChunkState::Absent && missed.is_none() {
                missed = Some(c);
            }
            // Extend a run of chunks in the same present state.
            let mut j = i + 1;
            if state != ChunkState::Absent {
                while j < chunks.end && self.map.state(ChunkIndex(j)) == state {
                    j += 1;
                }
            }
            let run_end = self.geometry.bytes(ChunkIndex(j - 1)).end.min(end);
            let (s, e) = (at, run_end);
            parts.push(match state {
                ChunkState::Zero => Box::pin(async move { Ok(Piece::Zero(e - s)) }),
                ChunkState::Data => Box::pin(async move {
                    self.target
                        .read_at(s, mem_len(e - s))
                        .await
                        .map(Piece::Data)
                        .map_err(|source| Error::ReadTarget { offset: s, source })
                }),
                ChunkState::Absent => Box::pin(self.read_absent(c, s, e)),
            });
            at = run_end;
            i = j;
        }
        if let Some(c) = missed {
            // Before this read's own fetches go out (`prefetch`).
            self.prefetch_around(c, chunks.clone());
        }
        let mut pieces = try_join_all(parts).await?;
        self.note_read(chunks);
        // Neighbouring zero pieces become one hole.
        pieces.dedup_by(|b, a| match (a, b) {
            (Piece::Zero(x), Piece::Zero(y)) => {
                *x += *y;
                true
            }
            _ => false,
        });
        Ok(pieces)
    }

    /// The one way a present chunk's bytes change in place (a write, or
    /// zeroing part or all of it): the change is logged first and applied
    /// while its log generation is held, so a crash in the middle of the
    /// target write is replayed whole (invariant 3, `wal`). `c` is the first
    /// chunk touched, locked by the caller with every other one.
    pub(super) async fn change_in_place(
        &self,
        c: ChunkIndex,
        offset: u64,
        change: InPlace,
    ) -> Result<()> {
        match &change {
            InPlace::Write(d) => self.stale(offset, d.len() as u64),
            InPlace::Zero { len, .. } => self.stale(offset, *len),
        }
        let logged = self.wal.hold().await;
        // A shared target is never replayed onto (the guest may write it
        // directly since), so nothing is logged for it: a change cut short
        // is re-sent by the client, which never had its answer (`detach`).
        // Read under the hold: `prepare_detach` sets the flag before the
        // rotation that waits for this hold, so a change that still logs
        // lands in the generation that rotation retires.
        if !self.target_shared() {
            let record = match &change {
                InPlace::Write(data) => Change::Write(data),
                &InPlace::Zero { len, allocate } => Change::Zero { len, allocate },
            };
            logged
                .log(offset, record)
                .await
                .map_err(|source| self.wal_error(source))?;
        }
        let done = match change {
            InPlace::Write(data) => self.target.write_at(offset, data).await.map(drop),
            InPlace::Zero { len, allocate } => self.target.zero(offset, len, allocate).await,
        };
        drop(logged);
        done.map_err(|source| self.target_error(c, source))
    }

    /// Set the state of `c` and record it for the journal (under its lock,
    /// after the target write).
    pub(super) fn mark(&self, c: ChunkIndex, state: ChunkState, written: bool) {
        let was_absent = self.map.state(c) == ChunkState::Absent;
        self.map.set(c, state, written);
        if was_absent {
            self.candidate_resolved(c);
        }
        self.state.record(c, state, self.map.is_written(c));
    }

    /// Make the chunks `run` (all locked by the caller) zero chunks. The
    /// target is only touched where it may hold something else: a target we
    /// did not create sparse, a chunk that held data, or `allocate`.
    pub(super) async fn store_zero(
        &self,
        run: Range<u64>,
        written: bool,
        allocate: bool,
    ) -> Result<()> {
        let any_present = run
            .clone()
            .any(|i| self.map.state(ChunkIndex(i)) != ChunkState::Absent);
        // A candidate's target bytes are an old copy, not zeros (looked at
        // only where nothing else already decides the write).
        let any_candidate = || run.clone().any(|i| self.is_candidate(ChunkIndex(i)));
        if !self.sparse_target || allocate || any_present || any_candidate() {
            let s = self.geometry.bytes(ChunkIndex(run.start)).start;
            let e = self.geometry.bytes(ChunkIndex(run.end - 1)).end;
            let first = ChunkIndex(run.start);
            if any_present {
                // Zeroing a present chunk changes it in place.
                let change = InPlace::Zero {
                    len: e - s,
                    allocate,
                };
                self.change_in_place(first, s, change).await?;
            } else {
                self.target
                    .zero(s, e - s, allocate)
                    .await
                    .map_err(|source| self.target_error(first, source))?;
            }
        }
        for i in run {
            self.mark(ChunkIndex(i), ChunkState::Zero, written);
        }
        Ok(())
    }

    /// Write `data` at `offset`; with `fua`, durable before returning.
    pub async fn write(&self, offset: u64, data: Vec<u8>, fua: bool) -> Result<()> {
        self.note_foreground();
        Stats::add(&self.stats.bytes_written_by_clients, data.len() as u64);
        let chunks = self.geometry.chunks_of(offset, data.len() as u64);
        if chunks.end - chunks.start == 1 {
            self.write_chunk(ChunkIndex(chunks.start), offset, data)
                .await?;
        } else {
            let mut parts = Vec::new();
            let mut at = offset;
            for i in chunks {
                let c = ChunkIndex(i);
                let e = self.geometry.bytes(c).end.min(offset + data.len() as u64);
                let piece = data[mem_len(at - offset)..mem_len(e - offset)].to_vec();
                parts.push(self.write_chunk(c, at, piece));
                at = e;
            }
            try_join_all(parts).await?;
        }
        if fua {
            self.flush().await?;
        }
        Ok(())
    }

    /// Write within one chunk (invariants 2 and 4).
    pub(super) async fn write_chunk(
        &self,
        c: ChunkIndex,
        offset: u64,
        data: Vec<u8>,
    ) -> Result<()> {
        let g = self.locks.lock(c).await;
        let r = self.geometry.bytes(c);
        let whole = offset == r.start && offset + data.len() as u64 == r.end;
        if !whole && self.map.state(c) == ChunkState::Absent {
            if let Some(k) = self.candidates.get().filter(|k| k.bits_get(c)) {
                // Compared (or fetched) into place first, then written as
                // any present chunk.
                self.confirm_or_fetch(k, std::slice::from_ref(&g), Class::Foreground, Keep::Cached)
                    .await?;
            }
        }
        match self.map.state(c) {
            // The target holds the chunk (data, or zeros for a zero chunk):
            // write in place.
            ChunkState::Data | ChunkState::Zero => {
                self.change_in_place(c, offset, InPlace::Write(data))
                    .await?;
                if self.map.state(c) == ChunkState::Zero || !self.map.is_written(c) {
                    self.mark(c, ChunkState::Data, true);
                }
            }
            ChunkState::Absent if whole => {
                self.stale(offset, data.len() as u64);
                self.target
                    .write_at(offset, data)
                    .await
                    .map_err(|source| self.target_error(c, source))?;
                self.mark(c, ChunkState::Data, true);
            }
            ChunkState::Absent => {
                // Fetch, overlay, write the whole chunk once.
                let started = Instant::now();
                let _fg = ForegroundGuard::new(&self.fg_active);
                let mut buf = self
                    .source_read(r.start, mem_len(r.end - r.start), Class::Foreground)
                    .await
                    .map_err(|source| {
                        Stats::add(&self.stats.source_errors, 1);
                        Error::FetchChunk { index: c, source }
                    })?;
                // The source's bytes, before the client's overlay.
                self.fingerprint.offer_async(c.0, &buf).await?;
                Stats::add(&self.stats.bytes_fetched, r.end - r.start);
                Stats::add(&self.stats.chunks_fetched_on_demand, 1);
                self.note_fg_fetch(started.elapsed());
                let at = mem_len(offset - r.start);
                buf[at..at + data.len()].copy_from_slice(&data);
                self.stale(r.start, r.end - r.start);
                self.target
                    .write_at(r.start, buf)
                    .await
                    .map_err(|source| self.target_error(c, source))?;
                self.mark(c, ChunkState::Data, true);
            }
        }
        Ok(())
    }

    /// Trim: whole chunks become zero chunks (punched); partial chunks are
    /// left as they are, which the spec allows for a hint.
    pub async fn trim(&self, offset: u64, len: u64, fua: bool) -> Result<()> {
        Stats::add(&self.stats.bytes_written_by_clients, len);
        self.zero_range(offset, len, false, false).await?;
        if fua {
            self.flush().await?;
        }
        Ok(())
    }

    /// Write zeroes. `allocate` is NBD's NO_HOLE; with `fast`, fail with
    /// `ENOTSUP` (before changing anything) if a partial chunk would need a
    /// fetch.
    pub async fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        allocate: bool,
        fast: bool,
        fua: bool,
    ) -> Result<std::result::Result<(), FastZeroUnsupported>> {
        if fast {
            let chunks = self.geometry.chunks_of(offset, len);
            let needs_fetch = [chunks.start, chunks.end - 1].into_iter().any(|i| {
                let c = ChunkIndex(i);
                !self.geometry.covers(c, offset, len) && self.map.state(c) == ChunkState::Absent
            });
            if needs_fetch {
                return Ok(Err(FastZeroUnsupported));
            }
        }
        Stats::add(&self.stats.bytes_written_by_clients, len);
        self.zero_range(offset, len, allocate, true).await?;
        if fua {
            self.flush().await?;
        }
        Ok(Ok(()))
    }

    pub(super) async fn zero_range(
        &self,
        offset: u64,
        len: u64,
        allocate: bool,
        partial: bool,
    ) -> Result<()> {
        let end = offset + len;
        let chunks = self.geometry.chunks_of(offset, len);
        let mut whole_run: Vec<ChunkGuard> = Vec::new();
        for i in chunks {
            let c = ChunkIndex(i);
            if self.geometry.covers(c, offset, len) {
                let g = self.locks.lock(c).await;
                let already = self.map.state(c) == ChunkState::Zero && self.map.is_written(c);
                if already && !allocate {
                    continue;
                }
                // Keep runs short so locks are not held across huge ranges.
                if whole_run.len() == 1024 {
                    self.zero_locked_run(&mut whole_run, allocate).await?;
                }
                whole_run.push(g);
                continue;
            }
            self.zero_locked_run(&mut whole_run, allocate).await?;
            if !partial {
                continue;
            }
            let r = self.geometry.bytes(c);
            let (s, e) = (offset.max(r.start), end.min(r.end));
            let g = self.locks.lock(c).await;
            match self.map.state(c) {
                ChunkState::Zero => self.mark(c, ChunkState::Zero, true),
                ChunkState::Data => {
                    let change = InPlace::Zero {
                        len: e - s,
                        allocate: true,
                    };
                    self.change_in_place(c, s, change).await?;
                    self.mark(c, ChunkState::Data, true);
                }
                ChunkState::Absent => {
                    drop(g);
                    self.write_chunk(c, s, vec![0u8; mem_len(e - s)]).await?;
                }
            }
        }
        self.zero_locked_run(&mut whole_run, allocate).await
    }

    /// Zero the locked whole chunks in `run` (contiguous stretches share one
    /// target call) and release them.
    pub(super) async fn zero_locked_run(
        &self,
        run: &mut Vec<ChunkGuard>,
        allocate: bool,
    ) -> Result<()> {
        let mut start = 0;
        while start < run.len() {
            let mut end = start + 1;
            while end < run.len() && run[end].index().0 == run[end - 1].index().0 + 1 {
                end += 1;
            }
            let first = run[start].index().0;
            let last = run[end - 1].index().0;
            self.store_zero(first..last + 1, true, allocate).await?;
            start = end;
        }
        run.clear();
        Ok(())
    }

    /// Allocation of the volume from `offset`. Zero is reported only where
    /// it is known: zero chunks (source holes, trimmed or zeroed chunks,
    /// chunks found all zero). Absent chunks are reported as data, after
    /// asking the source about its holes.
    pub async fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        let end = (offset + len).min(self.geometry.size());
        let chunks = self.geometry.chunks_of(offset, end - offset);
        if chunks
            .clone()
            .any(|i| self.map.state(ChunkIndex(i)) == ChunkState::Absent)
        {
            self.learn_holes(offset, end - offset).await?;
        }
        let mut out: Vec<Extent> = Vec::new();
        for i in chunks {
            let c = ChunkIndex(i);
            let r = self.geometry.bytes(c);
            let n = r.end.min(end) - r.start.max(offset);
            let ext = match self.map.state(c) {
                ChunkState::Zero => Extent {
                    length: n,
                    hole: self.sparse_target,
                    zero: true,
                },
                ChunkState::Data | ChunkState::Absent => Extent::data(n),
            };
            match out.last_mut() {
                Some(l) if (l.hole, l.zero) == (ext.hole, ext.zero) => l.length += n,
                _ => out.push(ext),
            }
        }
        Ok(out)
    }
}
