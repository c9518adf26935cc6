//! A seeded migration's cutover that serves at once (issue 16): every chunk
//! `stream seed` copied becomes absent, but keeps its bytes in the target as
//! a *candidate*; fetching a candidate first asks the source for the hash of
//! the chunk (32 bytes over the link, computed where the disk is) and
//! compares it with the blake3 of the candidate's bytes read from the
//! target. Equal, the chunk becomes present without a data transfer;
//! different (the legacy server changed it after the last pass), it is
//! fetched as any absent chunk.
//!
//! Why here and not before serving: comparing every chunk at the cutover
//! (`delta`) waits for the legacy host to hash its whole disk after the
//! stop, which grows with the disk (1.8 s at 16 GiB, 30% data). Comparing
//! per chunk as it is needed puts that cost where hydration runs, after the
//! new instance is up; `stream start` serves after one checkpoint.
//!
//! Safety rests on comparing the *target's bytes*, not the hash kept when
//! they were copied: a candidate changed since (a crash in the middle of
//! fetching it over the old copy, a recovery that cleared it) simply does
//! not match and is fetched. The candidate set is a hint, never trusted
//! data, with one consequence: on a target created sparse an absent chunk
//! normally reads as zeros there, and a candidate does not, so every path
//! that makes an absent chunk zero without writing it writes zeros over a
//! candidate (`store_zero`), and crash recovery leaves candidates alone
//! rather than clearing them (they are compared before use anyway).
//!
//! The set is written (`state/candidates.rs`) before the checkpoint that
//! makes the chunks absent, so a crash between the two leaves chunks
//! present with a set that merely lists them; a cutover repeated after such
//! a crash adds to the set, never drops from it.

use super::*;
use crate::manifest::ZeroHashes;
use crate::presence::Bitmap;

/// After the source failed to give a hash reader, how long fetches go
/// straight to the source before asking again.
const RETRY_HASHES_AFTER: std::time::Duration = std::time::Duration::from_secs(5);

/// The candidate chunks and the source's hash reader.
pub(super) struct Candidates {
    bits: Bitmap,
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
    pub(super) fn bits_get(&self, c: ChunkIndex) -> bool {
        self.bits.get(c.0)
    }

    pub(super) fn new(bits: Bitmap, chunk: u64) -> Candidates {
        Candidates {
            bits,
            left: AtomicU64::new(0),
            zeros: ZeroHashes::new(chunk),
            remote: tokio::sync::Mutex::new(Remote::default()),
        }
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

    /// Count the candidates still absent (at open and after a cutover,
    /// before anything serves).
    pub(super) fn count_candidates(&self) {
        let Some(k) = self.candidates.get() else {
            return;
        };
        let mut n = 0;
        let mut at = 0;
        while let Some(i) = k.bits.next_set(at) {
            if !self.map.is_present(ChunkIndex(i)) {
                n += 1;
            }
            at = i + 1;
        }
        k.left.store(n, Ordering::Relaxed);
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
        if self.map.written_count() > 0 {
            return Err(Error::Invalid(
                "clients have written to this volume: its chunks can no longer be compared \
                 with the source and fetched again"
                    .into(),
            ));
        }
        let g = self.geometry;
        let k = self
            .candidates
            .get_or_init(|| Candidates::new(Bitmap::new(g.chunks()), g.chunk_size()));
        let mut made = 0;
        for i in 0..g.chunks() {
            if self.map.is_present(ChunkIndex(i)) {
                k.bits.set(i);
                made += 1;
            }
        }
        let copy = Bitmap::from_bytes(g.chunks(), &k.bits.to_bytes()).expect("same geometry");
        let st = self.state.clone();
        let persist = |e: tokio::task::JoinError| Error::PersistMap {
            dir: self.state.path().to_path_buf(),
            source: std::io::Error::other(e),
        };
        tokio::task::spawn_blocking(move || st.write_candidates(&copy))
            .await
            .map_err(persist)??;
        for i in 0..g.chunks() {
            if k.bits.get(i) {
                self.map.forget(ChunkIndex(i));
            }
        }
        self.count_candidates();
        let snapshot = state::map_bytes(&self.map);
        let st = self.state.clone();
        tokio::task::spawn_blocking(move || st.checkpoint(&snapshot))
            .await
            .map_err(persist)??;
        self.flush().await?;
        Ok(made)
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
    ) -> Result<Fetched> {
        let g = self.geometry;
        let first = guards.first().expect("at least one chunk").index();
        let last = guards.last().expect("at least one chunk").index();
        let range = g.bytes(first).start..g.bytes(last).end;
        let n = guards.len() as u64;
        let verdicts = {
            let _fg = (class == Class::Foreground).then(|| ForegroundGuard::new(&self.fg_active));
            let wait = Wait::SourceRead {
                offset: range.start,
                len: n * crate::proof::HASH_LEN,
            };
            let (theirs, ours) = tokio::join!(
                waiting(
                    wait,
                    k.source_hashes(&self.source, g.chunk_size(), first.0, n)
                ),
                self.target
                    .read_at(range.start, mem_len(range.end - range.start))
            );
            let ours = ours.map_err(|source| Error::ReadTarget {
                offset: range.start,
                source,
            })?;
            let theirs = theirs
                .inspect_err(|e| tracing::debug!("chunk hashes from the source: {e}"))
                .ok();
            let candidate: Vec<bool> = guards.iter().map(|x| k.bits.get(x.index().0)).collect();
            let zero = k.zeros.of(g.chunk_size());
            let short_zero = k.zeros.of(g.bytes(last).end - g.bytes(last).start);
            let start = range.start;
            tokio::task::spawn_blocking(move || {
                let v: Vec<Verdict> = (0..candidate.len())
                    .map(|j| {
                        let (Some(theirs), true) = (&theirs, candidate[j]) else {
                            return Verdict::Fetch;
                        };
                        let r = g.bytes(ChunkIndex(first.0 + j as u64));
                        let piece = &ours[mem_len(r.start - start)..mem_len(r.end - start)];
                        let zero = if j + 1 == candidate.len() {
                            short_zero
                        } else {
                            zero
                        };
                        if theirs[j] == zero {
                            return match is_zero(piece) {
                                true => Verdict::Zero,
                                false => Verdict::Fetch,
                            };
                        }
                        let ours = *blake3::hash(piece).as_bytes();
                        match ours == theirs[j] {
                            true => Verdict::Data(ours),
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
        };
        let (mut buf, verdicts) = verdicts;
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
            match self.fetch_from_source(&guards[j..e], class).await? {
                Fetched::Zero => buf[at].fill(0),
                Fetched::Data(d) => buf[at].copy_from_slice(&d),
            }
            j = e;
        }
        Ok(Fetched::Data(buf))
    }
}
