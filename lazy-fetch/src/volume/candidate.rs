//! A seeded migration's cutover that serves at once (issue 16): every chunk
//! `stream seed` copied becomes absent, but keeps its bytes in the target as
//! a *candidate*, compared with the source before it is trusted. Equal, the
//! chunk becomes present without a data transfer; different (the legacy
//! server changed it after the last pass), it is fetched as any absent
//! chunk.
//!
//! Why not compare before serving: that waits for the legacy host to hash
//! its whole disk after the stop, which grows with the disk (1.8 s at
//! 16 GiB, 30% data). Here `stream start` serves after one checkpoint, and
//! the comparison runs beside the new instance:
//!
//! - a *sweep* (`Volume::sweep_candidates`, started with the server) reads
//!   the source's chunk hashes in order, 4096 a request (32 bytes a chunk,
//!   computed where the disk is), and notes in memory which candidates the
//!   source still agrees with (their hash at the copy, kept in `hashes`, or
//!   the zero chunk's). Behind the sweep a candidate costs no round trip:
//!   an agreeing one is confirmed locally, the others are fetched at once;
//! - ahead of the sweep (the first reads after the cutover), a fetch asks
//!   the source for the hashes of just its run: one round trip.
//!
//! Safety rests on comparing the *target's bytes*, never the record alone:
//! a candidate is confirmed only when the blake3 of the bytes read from the
//! target equals the source's hash, so a candidate changed since (a crash
//! in the middle of fetching it over the old copy, an unflushed client
//! write lost in a crash) simply does not match and is fetched. The
//! candidate set is a hint, never trusted data, with one consequence: on a
//! target created sparse an absent chunk normally reads as zeros there, and
//! a candidate does not, so every path that makes an absent chunk zero
//! without writing it writes zeros over a candidate (`store_zero`), and
//! crash recovery leaves candidates alone rather than clearing them.
//!
//! The set is written (`state/candidates.rs`) before the checkpoint that
//! makes the chunks absent, so a crash between the two leaves chunks
//! present with a set that merely lists them; a cutover repeated after such
//! a crash adds to the set, never drops from it. Memory: three bits a chunk
//! (candidate, was zero, agrees), beside the map's three.

use super::*;
use crate::manifest::ZeroHashes;
use crate::presence::Bitmap;

/// After the source failed to give a hash reader, how long fetches go
/// straight to the source before asking again.
const RETRY_HASHES_AFTER: std::time::Duration = std::time::Duration::from_secs(5);
/// Chunk hashes per request of the sweep.
const SWEEP_BATCH: u64 = 4096;
/// The sweep's backoff while the source fails (doubling from 1 s).
const SWEEP_MAX_BACKOFF: std::time::Duration = std::time::Duration::from_secs(30);

/// The candidate chunks, what the sweep learnt of them, and the source's
/// hash reader.
pub(super) struct Candidates {
    bits: Bitmap,
    /// Which candidates were zero chunks (their expected hash is the zero
    /// chunk's, not a record).
    zero: Bitmap,
    /// Candidates whose source hash equals their expected one, for chunks
    /// below `swept_to`.
    agrees: Bitmap,
    /// Chunks below this have been compared with the source by the sweep.
    swept_to: AtomicU64,
    /// Candidates still absent (kept by `Volume::mark`, for `status`).
    left: AtomicU64,
    zeros: ZeroHashes,
    remote: tokio::sync::Mutex<Remote>,
}

#[derive(Default)]
struct Remote {
    reader: Option<Arc<dyn crate::proof::ChunkHashes>>,
    /// No reader before this (the last attempt failed).
    not_before: Option<Instant>,
}

/// What comparing one chunk found.
#[derive(Clone, Copy)]
enum Verdict {
    /// Not a candidate, or it differs, or the source's hash was not had.
    Fetch,
    /// The candidate's bytes are the source's: all zero.
    Zero,
    /// The candidate's bytes are the source's, with this blake3.
    Data([u8; 32]),
}

impl Candidates {
    /// `map`'s candidates: `bits`, of which `zero` were zero chunks.
    pub(super) fn new(bits: Bitmap, zero: Bitmap, chunk: u64, map: &PresenceMap) -> Candidates {
        let n = bits.len();
        let left = absent_among(&bits, map);
        Candidates {
            bits,
            zero,
            agrees: Bitmap::new(n),
            swept_to: AtomicU64::new(0),
            left: AtomicU64::new(left),
            zeros: ZeroHashes::new(chunk),
            remote: tokio::sync::Mutex::new(Remote::default()),
        }
    }

    pub(super) fn bits_get(&self, c: ChunkIndex) -> bool {
        self.bits.get(c.0)
    }

    /// The source's hashes of chunks `first..first + n`.
    async fn source_hashes<S: Source>(
        &self,
        source: &S,
        chunk: u64,
        first: u64,
        n: u64,
    ) -> std::io::Result<Vec<[u8; 32]>> {
        let reader = {
            let mut r = self.remote.lock().await;
            if r.reader.is_none() && r.not_before.is_none_or(|t| Instant::now() >= t) {
                r.reader = source.chunk_hashes(chunk).await.map(Arc::from);
                r.not_before = r
                    .reader
                    .is_none()
                    .then(|| Instant::now() + RETRY_HASHES_AFTER);
            }
            r.reader.clone()
        };
        let Some(reader) = reader else {
            return Err(std::io::Error::other(
                "the source serves no chunk hashes now",
            ));
        };
        match reader.read(first, n).await {
            Ok(h) if h.len() as u64 == n => Ok(h),
            Ok(h) => Err(std::io::Error::other(format!(
                "the source sent {} chunk hashes for {n}",
                h.len()
            ))),
            Err(e) => {
                // Drop a broken reader so the next fetch connects again.
                let mut r = self.remote.lock().await;
                if r.reader.as_ref().is_some_and(|x| Arc::ptr_eq(x, &reader)) {
                    r.reader = None;
                }
                Err(e)
            }
        }
    }
}

/// How many of the chunks set in `bits` are absent in `map`.
pub(super) fn absent_among(bits: &Bitmap, map: &PresenceMap) -> u64 {
    let mut n = 0;
    let mut at = 0;
    while let Some(i) = bits.next_set(at) {
        if !map.is_present(ChunkIndex(i)) {
            n += 1;
        }
        at = i + 1;
    }
    n
}

impl<S: Source> Volume<S> {
    /// Whether chunk `c`'s bytes in the target are a seeded copy still to
    /// be compared (meaningful for an absent chunk only).
    pub(super) fn is_candidate(&self, c: ChunkIndex) -> bool {
        self.candidates.get().is_some_and(|k| k.bits.get(c.0))
    }

    /// Absent chunks whose seeded copy is still to be compared.
    pub fn candidates_left(&self) -> u64 {
        self.candidates
            .get()
            .map_or(0, |k| k.left.load(Ordering::Relaxed))
    }

    /// Chunk `c`, absent until now, became present (under its lock).
    pub(super) fn candidate_resolved(&self, c: ChunkIndex) {
        if let Some(k) = self.candidates.get().filter(|k| k.bits.get(c.0)) {
            k.left.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// The cutover of a seeded migration whose source serves chunk hashes:
    /// every present chunk becomes an absent candidate, durably, before
    /// anything serves or fetches; returns how many. Refused once a client
    /// wrote (as [`Volume::forget_changed`]).
    pub async fn make_candidates(&self) -> Result<u64> {
        self.check_may_forget()?;
        let g = self.geometry;
        let k = self.candidates.get_or_init(|| {
            Candidates::new(
                Bitmap::new(g.chunks()),
                Bitmap::new(g.chunks()),
                g.chunk_size(),
                &self.map,
            )
        });
        let mut made = 0;
        for i in 0..g.chunks() {
            match self.map.state(ChunkIndex(i)) {
                ChunkState::Absent => continue,
                ChunkState::Zero => k.zero.set(i),
                ChunkState::Data => k.zero.clear(i),
            };
            k.bits.set(i);
            made += 1;
        }
        let copy = |b: &Bitmap| Bitmap::from_bytes(g.chunks(), &b.to_bytes()).expect("same size");
        let (bits, zero) = (copy(&k.bits), copy(&k.zero));
        let st = self.state.clone();
        let persist = |e: tokio::task::JoinError| Error::PersistMap {
            dir: self.state.path().to_path_buf(),
            source: std::io::Error::other(e),
        };
        tokio::task::spawn_blocking(move || st.write_candidates(&bits, &zero))
            .await
            .map_err(persist)??;
        for i in 0..g.chunks() {
            if k.bits.get(i) {
                self.map.forget(ChunkIndex(i));
            }
        }
        k.left
            .store(absent_among(&k.bits, &self.map), Ordering::Relaxed);
        self.checkpoint_now().await?;
        self.flush().await?;
        Ok(made)
    }

    /// What the sweep learnt of candidate `c`: whether the source agrees
    /// with its copy, or `None` when the sweep has not reached it.
    fn swept_expectation(&self, k: &Candidates, c: ChunkIndex) -> Option<bool> {
        (c.0 < k.swept_to.load(Ordering::Acquire)).then(|| k.agrees.get(c.0))
    }

    /// Compare the source's hashes of every candidate with what was
    /// copied, in order, 4096 chunks a request, so fetches behind it need
    /// no round trip (see the module docs). Runs until every chunk is
    /// swept; while the source fails it waits and tries again.
    pub async fn sweep_candidates(&self) -> Result<()> {
        let Some(k) = self.candidates.get() else {
            return Ok(());
        };
        let g = self.geometry;
        let n = g.chunks();
        let mut backoff = std::time::Duration::from_secs(1);
        let mut first = k.swept_to.load(Ordering::Acquire);
        while first < n {
            let count = SWEEP_BATCH.min(n - first);
            let wanted = (first..first + count)
                .any(|i| k.bits.get(i) && !self.map.is_present(ChunkIndex(i)));
            if wanted {
                let theirs = match k
                    .source_hashes(&self.source, g.chunk_size(), first, count)
                    .await
                {
                    Ok(h) => h,
                    Err(e) => {
                        tracing::debug!("the candidate sweep waits {backoff:?}: {e}");
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(SWEEP_MAX_BACKOFF);
                        continue;
                    }
                };
                backoff = std::time::Duration::from_secs(1);
                let kept = self.kept_hashes(ChunkIndex(first), count).await?;
                for j in 0..count {
                    let c = ChunkIndex(first + j);
                    let r = g.bytes(c);
                    let ours = match (k.bits.get(c.0), k.zero.get(c.0)) {
                        (false, _) => continue,
                        (true, true) => k.zeros.of(r.end - r.start),
                        (true, false) if self.hashes.as_ref().is_some_and(|h| !h.is_dirty(c)) => {
                            kept[mem_len(j)]
                        }
                        (true, false) => continue,
                    };
                    if ours == theirs[mem_len(j)] {
                        k.agrees.set(c.0);
                    }
                }
            }
            first += count;
            k.swept_to.store(first, Ordering::Release);
        }
        Ok(())
    }

    /// Make present the candidates among the absent chunks locked by
    /// `guards` (contiguous, in order) whose bytes match the source, and
    /// fetch the rest with one source read per stretch. The buffer covers
    /// them all, as [`Volume::fetch_locked`]'s.
    pub(super) async fn confirm_or_fetch(
        &self,
        k: &Candidates,
        guards: &[ChunkGuard],
        class: Class,
        keep: Keep,
    ) -> Result<Fetched> {
        let g = self.geometry;
        let first = guards.first().expect("at least one chunk").index();
        let last = guards.last().expect("at least one chunk").index();
        let range = g.bytes(first).start..g.bytes(last).end;
        let n = guards.len() as u64;
        let len_of = |c: ChunkIndex| g.bytes(c).end - g.bytes(c).start;
        // The hash each chunk must have to be confirmed, if any.
        let swept: Option<Vec<bool>> = guards
            .iter()
            .map(|x| {
                let c = x.index();
                match k.bits.get(c.0) {
                    true => self.swept_expectation(k, c),
                    false => Some(false),
                }
            })
            .collect();
        let expected: Vec<Option<[u8; 32]>> = match swept {
            // Behind the sweep: no round trip.
            Some(agree) => {
                let kept = match agree.iter().any(|&a| a) {
                    true => self.kept_hashes(first, n).await?,
                    false => Vec::new(),
                };
                guards
                    .iter()
                    .zip(&agree)
                    .enumerate()
                    .map(|(j, (x, &a))| {
                        let c = x.index();
                        a.then(|| match k.zero.get(c.0) {
                            true => k.zeros.of(len_of(c)),
                            false => kept[j],
                        })
                    })
                    .collect()
            }
            // Ahead of it: ask the source for this run's hashes.
            None => {
                let _fg =
                    (class == Class::Foreground).then(|| ForegroundGuard::new(&self.fg_active));
                let wait = Wait::SourceRead {
                    offset: range.start,
                    len: n * crate::proof::HASH_LEN,
                };
                let theirs = waiting(
                    wait,
                    k.source_hashes(&self.source, g.chunk_size(), first.0, n),
                )
                .await
                .inspect_err(|e| tracing::debug!("chunk hashes from the source: {e}"))
                .ok();
                guards
                    .iter()
                    .enumerate()
                    .map(|(j, x)| {
                        let t = theirs.as_ref()?;
                        k.bits.get(x.index().0).then_some(t[j])
                    })
                    .collect()
            }
        };
        let (mut buf, verdicts) = if expected.iter().any(Option::is_some) {
            let ours = self
                .target
                .read_at(range.start, mem_len(range.end - range.start))
                .await
                .map_err(|source| Error::ReadTarget {
                    offset: range.start,
                    source,
                })?;
            let zero = k.zeros.of(g.chunk_size());
            let short_zero = k.zeros.of(len_of(last));
            let start = range.start;
            tokio::task::spawn_blocking(move || {
                let v: Vec<Verdict> = expected
                    .iter()
                    .enumerate()
                    .map(|(j, e)| {
                        let Some(e) = e else {
                            return Verdict::Fetch;
                        };
                        let r = g.bytes(ChunkIndex(first.0 + j as u64));
                        let piece = &ours[mem_len(r.start - start)..mem_len(r.end - start)];
                        let zero = if j + 1 == expected.len() {
                            short_zero
                        } else {
                            zero
                        };
                        if *e == zero {
                            return match is_zero(piece) {
                                true => Verdict::Zero,
                                false => Verdict::Fetch,
                            };
                        }
                        match blake3::hash(piece).as_bytes() == e {
                            true => Verdict::Data(*e),
                            false => Verdict::Fetch,
                        }
                    })
                    .collect();
                (ours, v)
            })
            .await
            .map_err(|e| Error::FetchChunk {
                index: first,
                source: std::io::Error::other(e),
            })?
        } else {
            (
                vec![0u8; mem_len(range.end - range.start)],
                vec![Verdict::Fetch; guards.len()],
            )
        };
        let mut confirmed = 0;
        for (x, v) in guards.iter().zip(&verdicts) {
            let c = x.index();
            match v {
                Verdict::Fetch => continue,
                Verdict::Zero => self.mark(c, ChunkState::Zero, false),
                Verdict::Data(h) => {
                    let r = g.bytes(c);
                    let piece = &buf[mem_len(r.start - range.start)..mem_len(r.end - range.start)];
                    // The source's bytes: a sample for the fingerprint too.
                    self.fingerprint.offer_async(c.0, piece).await?;
                    self.record_hashes(c, &[*h])?;
                    self.mark(c, ChunkState::Data, false);
                }
            }
            confirmed += 1;
        }
        Stats::add(&self.stats.chunks_confirmed, confirmed);
        // The rest from the source, one read per stretch.
        let mut j = 0;
        while j < guards.len() {
            if !matches!(verdicts[j], Verdict::Fetch) {
                j += 1;
                continue;
            }
            let mut e = j + 1;
            while e < guards.len() && matches!(verdicts[e], Verdict::Fetch) {
                e += 1;
            }
            let s = g.bytes(guards[j].index()).start;
            let end = g.bytes(guards[e - 1].index()).end;
            let at = mem_len(s - range.start)..mem_len(end - range.start);
            match self.fetch_from_source(&guards[j..e], class, keep).await? {
                Fetched::Zero => buf[at].fill(0),
                Fetched::Data(d) => buf[at].copy_from_slice(&d),
            }
            j = e;
        }
        Ok(Fetched::Data(buf))
    }
}
