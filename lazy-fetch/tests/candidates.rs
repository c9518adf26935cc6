//! A seeded migration's cutover that serves at once: every copied chunk
//! becomes an absent candidate, compared with the source's hash when it is
//! fetched. Unchanged chunks become present without a data read, changed
//! ones are fetched; a crash, a source that stops serving hashes, and
//! clients racing fetches over candidates all end with the target equal to
//! the stopped source plus the clients' writes.

#![allow(
    clippy::cast_possible_truncation,
    reason = "test fixtures: offsets and sizes of a small disk, byte patterns"
)]

mod common;

use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use block_device::{Extent, flatten};
use futures_util::future::BoxFuture;
use lazy_fetch::proof::ChunkHashes;
use lazy_fetch::source::file::FileSource;
use lazy_fetch::source::{Class, Source};
use lazy_fetch::state::SourceId;
use lazy_fetch::{OpenOptions, Volume};
use test_support::Rng;

const CHUNK: u64 = 4096;
const CHUNKS: u64 = 64;

/// A local file that also serves its chunk hashes, as `stream export`
/// does; the knobs make the hash reader fail, or vanish.
struct Hashing {
    file: FileSource,
    path: PathBuf,
    knobs: Arc<Knobs>,
}

struct Knobs {
    /// `chunk_hashes` answers `None` (an nbdkit behind the same URI).
    no_hashes: AtomicBool,
    /// Every Nth hash read fails (0: never).
    fail_every: AtomicU64,
    hash_reads: AtomicU64,
    /// Bytes of chunk data read.
    data_read: AtomicU64,
    /// While set, data reads wait for a permit of `resume`.
    hold: AtomicBool,
    resume: tokio::sync::Semaphore,
}

impl Default for Knobs {
    fn default() -> Self {
        Knobs {
            no_hashes: AtomicBool::new(false),
            fail_every: AtomicU64::new(0),
            hash_reads: AtomicU64::new(0),
            data_read: AtomicU64::new(0),
            hold: AtomicBool::new(false),
            resume: tokio::sync::Semaphore::new(0),
        }
    }
}

struct FileHashes {
    path: PathBuf,
    knobs: Arc<Knobs>,
}

impl ChunkHashes for FileHashes {
    fn read(&self, first: u64, n: u64) -> BoxFuture<'_, io::Result<Vec<[u8; 32]>>> {
        Box::pin(async move {
            let k = self.knobs.hash_reads.fetch_add(1, Ordering::Relaxed) + 1;
            let every = self.knobs.fail_every.load(Ordering::Relaxed);
            if every > 0 && k % every == 0 {
                return Err(io::Error::other("injected: the hash export went away"));
            }
            let disk = std::fs::read(&self.path)?;
            Ok((first..first + n)
                .map(|c| {
                    let s = (c * CHUNK) as usize;
                    let e = ((c + 1) * CHUNK).min(disk.len() as u64) as usize;
                    *blake3::hash(&disk[s..e]).as_bytes()
                })
                .collect())
        })
    }
}

impl Source for Hashing {
    fn id(&self) -> SourceId {
        self.file.id()
    }

    async fn read(&self, offset: u64, len: usize, class: Class) -> io::Result<Vec<u8>> {
        self.knobs
            .data_read
            .fetch_add(len as u64, Ordering::Relaxed);
        if self.knobs.hold.load(Ordering::Acquire) {
            drop(self.knobs.resume.acquire().await);
        }
        self.file.read(offset, len, class).await
    }

    async fn block_status(&self, offset: u64, len: u64) -> io::Result<Option<Vec<Extent>>> {
        self.file.block_status(offset, len).await
    }

    async fn chunk_hashes(&self, _chunk: u64) -> Option<Box<dyn ChunkHashes>> {
        if self.knobs.no_hashes.load(Ordering::Relaxed) {
            return None;
        }
        Some(Box::new(FileHashes {
            path: self.path.clone(),
            knobs: self.knobs.clone(),
        }))
    }
}

async fn open(dir: &Path, knobs: &Arc<Knobs>) -> Arc<Volume<Hashing>> {
    let path = dir.join("src");
    Volume::open(
        Hashing {
            file: FileSource::open(&path).unwrap(),
            path,
            knobs: knobs.clone(),
        },
        &OpenOptions {
            target: dir.join("tgt"),
            state_dir: dir.join("state"),
            chunk_size: Some(CHUNK),
            source_may_differ: true,
            ..Default::default()
        },
    )
    .await
    .unwrap()
}

fn write_src(dir: &Path, c: u64, byte: u8) {
    common::write_src(dir, CHUNK, c, byte);
}

/// A source of `CHUNKS` chunks, every third one data, the last one short,
/// copied into the target by a first "seed" (hydration) and closed.
async fn seeded(dir: &Path, knobs: &Arc<Knobs>) {
    let f = std::fs::File::create(dir.join("src")).unwrap();
    f.set_len(CHUNKS * CHUNK - 1000).unwrap();
    for c in (0..CHUNKS - 1).step_by(3) {
        f.write_all_at(&vec![c as u8 + 1; CHUNK as usize], c * CHUNK)
            .unwrap();
    }
    let v = open(dir, knobs).await;
    common::hydrate_all(&v).await;
    v.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unchanged_chunks_are_confirmed_without_a_data_read_and_changed_ones_fetched() {
    let dir = tempfile::tempdir().unwrap();
    let knobs = Arc::new(Knobs::default());
    seeded(dir.path(), &knobs).await;
    // The legacy disk changes after the seed: a data chunk, a hole that
    // gets data, a data chunk that becomes zeros, the short last chunk.
    write_src(dir.path(), 3, 0xee);
    write_src(dir.path(), 4, 0xee);
    std::fs::OpenOptions::new()
        .write(true)
        .open(dir.path().join("src"))
        .unwrap()
        .write_all_at(&[0; CHUNK as usize], 6 * CHUNK)
        .unwrap();
    write_src(dir.path(), CHUNKS - 1, 0xee);

    let v = open(dir.path(), &knobs).await;
    assert_eq!(v.make_candidates().await.unwrap(), CHUNKS);
    assert_eq!(v.map().present_count(), 0, "every copied chunk is absent");
    assert_eq!(v.candidates_left(), CHUNKS);
    // The target still holds the old copy: nothing was cleared.
    let tgt = std::fs::read(dir.path().join("tgt")).unwrap();
    assert!(tgt[..CHUNK as usize].iter().all(|&b| b == 1));

    let holes_before = v.status().chunks_source_holes;
    knobs.data_read.store(0, Ordering::Relaxed);
    // A piece of an unchanged chunk, then of a changed one.
    let src = std::fs::read(dir.path().join("src")).unwrap();
    assert_eq!(flatten(v.read(10, 100).await.unwrap()), src[10..110]);
    assert_eq!(knobs.data_read.load(Ordering::Relaxed), 0);
    let at = (3 * CHUNK) as usize;
    assert_eq!(
        flatten(v.read(at as u64, 4096).await.unwrap()),
        src[at..at + 4096]
    );
    assert_eq!(knobs.data_read.load(Ordering::Relaxed), CHUNK);

    common::hydrate_all(&v).await;
    assert_eq!(std::fs::read(dir.path().join("tgt")).unwrap(), src);
    assert_eq!(
        knobs.data_read.load(Ordering::Relaxed),
        4 * CHUNK - 1000,
        "only the four changed chunks were read (the last one short)"
    );
    let st = v.status();
    // The source's holes are learnt as holes (zeros written over the old
    // copy); the other unchanged chunks are confirmed.
    let holes = st.chunks_source_holes - holes_before;
    assert!(holes > 0);
    assert_eq!(st.chunks_confirmed + holes, CHUNKS - 4);
    assert_eq!(st.chunks_to_confirm, 0);
    assert!(v.map().is_complete());
    // The kept hashes are the source's: the next comparison finds nothing.
    assert_eq!(v.changed_chunks(&|_, _| {}).await.unwrap(), Some(vec![]));
    // Every candidate resolved: the next start drops the set, not loads it.
    v.close().await.unwrap();
    drop(v);
    assert!(dir.path().join("state/candidates").exists());
    let v = open(dir.path(), &knobs).await;
    assert!(!dir.path().join("state/candidates").exists());
    assert_eq!(v.candidates_left(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn behind_the_sweep_a_fetch_asks_the_source_nothing_but_changed_data() {
    let dir = tempfile::tempdir().unwrap();
    let knobs = Arc::new(Knobs::default());
    seeded(dir.path(), &knobs).await;
    for c in [3, 4, 30] {
        write_src(dir.path(), c, 0x77);
    }
    let v = open(dir.path(), &knobs).await;
    v.make_candidates().await.unwrap();
    v.sweep_candidates().await.unwrap();
    assert_eq!(
        knobs.hash_reads.load(Ordering::Relaxed),
        1,
        "one request for all {CHUNKS} chunks"
    );
    knobs.data_read.store(0, Ordering::Relaxed);
    let src = std::fs::read(dir.path().join("src")).unwrap();
    // Every chunk read once, one at a time, as a guest would.
    for c in 0..CHUNKS {
        let s = c * CHUNK + 100;
        let got = flatten(v.read(s, 200).await.unwrap());
        assert_eq!(got, src[s as usize..s as usize + 200], "chunk {c}");
    }
    assert_eq!(
        knobs.hash_reads.load(Ordering::Relaxed),
        1,
        "no more hash requests"
    );
    assert_eq!(
        knobs.data_read.load(Ordering::Relaxed),
        3 * CHUNK,
        "only the changed chunks were read"
    );
    assert!(v.map().is_complete());
    v.flush().await.unwrap();
    assert_eq!(std::fs::read(dir.path().join("tgt")).unwrap(), src);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cutover_is_refused_while_a_fetch_is_in_flight() {
    let dir = tempfile::tempdir().unwrap();
    let knobs = Arc::new(Knobs::default());
    seeded(dir.path(), &knobs).await;
    // Forget one chunk (a pass found it changed) so a read must fetch it.
    let v = open(dir.path(), &knobs).await;
    v.forget_changed(&[0]).await.unwrap();
    knobs.hold.store(true, Ordering::Release);
    let reader = {
        let v = v.clone();
        tokio::spawn(async move { v.read(0, 4096).await.map(flatten) })
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while v.foreground_active() == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the read never fetched"
        );
        tokio::task::yield_now().await;
    }
    let err = v.make_candidates().await.unwrap_err().to_string();
    assert!(err.contains("serving"), "{err}");
    assert_eq!(v.candidates_left(), 0, "nothing was made a candidate");
    knobs.hold.store(false, Ordering::Release);
    // Enough for every read held, whether it waits already or not yet.
    knobs.resume.add_permits(16);
    let src = std::fs::read(dir.path().join("src")).unwrap();
    assert_eq!(reader.await.unwrap().unwrap(), src[..4096]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_after_the_cutover_keeps_the_candidates_and_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let knobs = Arc::new(Knobs::default());
    seeded(dir.path(), &knobs).await;
    write_src(dir.path(), 9, 0xaa);
    write_src(dir.path(), 10, 0xaa);
    let v = open(dir.path(), &knobs).await;
    v.make_candidates().await.unwrap();
    // Some chunks resolved, one written, then a crash (no close).
    v.fetch_run_from(lazy_fetch::units::ChunkIndex(8), 4, Class::Background)
        .await
        .unwrap();
    v.write(20 * CHUNK + 7, vec![0x55; 33], false)
        .await
        .unwrap();
    v.flush().await.unwrap();
    let left = v.candidates_left();
    assert_eq!(left, CHUNKS - 5);
    drop(v);

    let v = open(dir.path(), &knobs).await;
    assert_eq!(v.candidates_left(), left, "the set survived the crash");
    assert_eq!(v.map().present_count(), 5);
    knobs.data_read.store(0, Ordering::Relaxed);
    common::hydrate_all(&v).await;
    assert_eq!(
        knobs.data_read.load(Ordering::Relaxed),
        0,
        "recovery left the candidates' bytes for comparison"
    );
    let mut want = std::fs::read(dir.path().join("src")).unwrap();
    want[(20 * CHUNK + 7) as usize..(20 * CHUNK + 40) as usize].fill(0x55);
    assert_eq!(std::fs::read(dir.path().join("tgt")).unwrap(), want);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_hashes_candidates_are_fetched_and_trims_over_them_read_zeros() {
    let dir = tempfile::tempdir().unwrap();
    let knobs = Arc::new(Knobs::default());
    seeded(dir.path(), &knobs).await;
    let v = open(dir.path(), &knobs).await;
    v.make_candidates().await.unwrap();
    knobs.no_hashes.store(true, Ordering::Relaxed);
    // Chunk 0 holds data in the target; trimmed, it must read zeros there
    // too, though an absent chunk of a sparse target is normally a hole.
    v.trim(0, CHUNK, false).await.unwrap();
    v.write_zeroes(3 * CHUNK, CHUNK, false, false, false)
        .await
        .unwrap()
        .unwrap();
    knobs.data_read.store(0, Ordering::Relaxed);
    common::hydrate_all(&v).await;
    let mut want = std::fs::read(dir.path().join("src")).unwrap();
    want[..CHUNK as usize].fill(0);
    want[(3 * CHUNK) as usize..(4 * CHUNK) as usize].fill(0);
    assert_eq!(std::fs::read(dir.path().join("tgt")).unwrap(), want);
    assert_eq!(v.status().chunks_confirmed, 0);
    assert!(
        knobs.data_read.load(Ordering::Relaxed) > 0,
        "fetched instead"
    );
}

/// After the cutover, clients (each in its own lane of chunks, so the model
/// is exact) read, write, trim and zero while background fetches race them
/// over runs that span every lane and the hash reader fails now and then;
/// every read, and the target at the end (after a crash and a resume for
/// half the schedules), match the stopped source plus the writes.
/// `STREAM_DELTA_SEEDS` sets how many schedules (default 12).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn clients_and_fetches_race_over_candidates_and_match_the_model() {
    const LANES: u64 = 4;
    let seeds: u64 = std::env::var("STREAM_DELTA_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(12);
    for seed in 0..seeds {
        let dir = tempfile::tempdir().unwrap();
        let knobs = Arc::new(Knobs::default());
        let mut rng = Rng::new(seed + 101);
        let size = CHUNKS * CHUNK;
        let mut disk = rng.filled(size as usize);
        for c in 0..CHUNKS {
            if rng.below(3) == 0 {
                disk[(c * CHUNK) as usize..((c + 1) * CHUNK) as usize].fill(0);
            }
        }
        std::fs::write(dir.path().join("src"), &disk).unwrap();
        let v = open(dir.path(), &knobs).await;
        common::hydrate_all(&v).await;
        v.close().await.unwrap();
        drop(v);
        for c in 0..CHUNKS {
            if rng.below(3) == 0 {
                write_src(dir.path(), c, rng.below(256) as u8);
            }
        }
        knobs.fail_every.store(1 + rng.below(6), Ordering::Relaxed);
        let v = open(dir.path(), &knobs).await;
        v.make_candidates().await.unwrap();
        if (seed / 2) % 2 == 0 {
            // Every read that misses also prefetches the chunks around it.
            v.set_prefetch_min_rtt(Some(std::time::Duration::ZERO));
        }
        let model = Arc::new(std::sync::Mutex::new(
            std::fs::read(dir.path().join("src")).unwrap(),
        ));
        let mut tasks = tokio::task::JoinSet::new();
        for lane in 0..LANES {
            let (v, model, mut rng) = (v.clone(), model.clone(), Rng::new(rng.next()));
            tasks.spawn(async move {
                for _ in 0..40 {
                    let c = rng.below(CHUNKS / LANES) * LANES + lane;
                    let off = c * CHUNK + rng.below(CHUNK - 512);
                    let len = 1 + rng.below(512);
                    let (s, e) = (off as usize, (off + len) as usize);
                    let (cs, ce) = ((c * CHUNK) as usize, ((c + 1) * CHUNK) as usize);
                    match rng.below(6) {
                        0 | 1 => {
                            let data = rng.filled(len as usize);
                            v.write(off, data.clone(), false).await.unwrap();
                            model.lock().unwrap()[s..e].copy_from_slice(&data);
                        }
                        2 => {
                            v.trim(c * CHUNK, CHUNK, false).await.unwrap();
                            model.lock().unwrap()[cs..ce].fill(0);
                        }
                        3 => {
                            v.write_zeroes(off, len, false, false, false)
                                .await
                                .unwrap()
                                .unwrap();
                            model.lock().unwrap()[s..e].fill(0);
                        }
                        _ => {
                            let got = flatten(v.read(off, len).await.unwrap());
                            assert!(
                                got == model.lock().unwrap()[s..e],
                                "seed {seed}: read {off}+{len}"
                            );
                        }
                    }
                    tokio::task::yield_now().await;
                }
            });
        }
        // The sweep races the clients and the final hydration (a third of
        // the schedules go without it: every fetch then asks for its run's
        // hashes). While every hash request fails it retries forever, by
        // design (it ends once no candidate is left), so it is stopped
        // after the hydration rather than awaited.
        let sweep = (seed % 3 != 0).then(|| {
            let v = v.clone();
            tokio::spawn(async move { v.sweep_candidates().await })
        });
        common::spawn_fetchers(&mut tasks, &v, &mut rng, CHUNKS);
        while let Some(t) = tasks.join_next().await {
            t.unwrap();
        }
        let v = if seed % 2 == 1 {
            if let Some(s) = &sweep {
                s.abort();
            }
            // A crash after a flush: everything acknowledged is durable.
            v.flush().await.unwrap();
            drop(v);
            open(dir.path(), &knobs).await
        } else {
            v
        };
        common::hydrate_all(&v).await;
        if let Some(s) = sweep {
            s.abort();
            if let Ok(r) = s.await {
                r.unwrap();
            }
        }
        let want = model.lock().unwrap().clone();
        assert!(
            std::fs::read(dir.path().join("tgt")).unwrap() == want,
            "seed {seed}: the target differs from the stopped source plus the writes"
        );
        assert_eq!(v.candidates_left(), 0, "seed {seed}");
    }
}
