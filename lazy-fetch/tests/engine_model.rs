//! The volume against an oracle: a `Vec<u8>` model of what every byte must
//! read as, under random reads, writes, trims, write-zeroes, hole learning,
//! hydration steps, flushes and restarts, with the hydrator racing client
//! writes in the background.

#![allow(
    clippy::cast_possible_truncation,
    reason = "test fixtures: offsets and sizes of small in-memory disks, byte patterns"
)]

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use test_support::Rng;

use block_device::flatten;
use lazy_fetch::presence::ChunkState;
use lazy_fetch::source::Class;
use lazy_fetch::source::file::FileSource;
use lazy_fetch::units::ChunkIndex;
use lazy_fetch::{OpenOptions, Volume, hydrate};

const CHUNK: u64 = 4096;

struct Fixture {
    dir: tempfile::TempDir,
    model: Vec<u8>,
}

impl Fixture {
    /// A source of `chunks` chunks (the last one short): random data, some
    /// chunks all zero but allocated, some holes.
    fn new(rng: &mut Rng, chunks: u64) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let size = chunks * CHUNK - 1000;
        let mut model = vec![0u8; size as usize];
        let f = std::fs::File::create(dir.path().join("src")).unwrap();
        f.set_len(size).unwrap();
        use std::os::unix::fs::FileExt;
        for c in 0..chunks {
            let start = c * CHUNK;
            let end = (start + CHUNK).min(size);
            match rng.below(4) {
                0 => {} // hole
                1 => f
                    .write_all_at(&vec![0u8; (end - start) as usize], start)
                    .unwrap(),
                _ => {
                    let data = rng.bytes((end - start) as usize);
                    f.write_all_at(&data, start).unwrap();
                    model[start as usize..end as usize].copy_from_slice(&data);
                }
            }
        }
        f.sync_all().unwrap();
        Fixture { dir, model }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    async fn open(&self) -> Arc<Volume<FileSource>> {
        let source = FileSource::open(&self.path("src")).unwrap();
        Volume::open(
            source,
            &OpenOptions {
                target: self.path("tgt"),
                state_dir: self.path("state"),
                chunk_size: Some(CHUNK),
                ..Default::default()
            },
        )
        .await
        .unwrap()
    }
}

async fn read_all(v: &Arc<Volume<FileSource>>, off: u64, len: u64) -> Vec<u8> {
    flatten(v.read(off, len).await.unwrap())
}

/// Every extent flagged zero must read as zeros (nbdcopy and qemu-img skip
/// them), and every byte must be covered once.
async fn check_block_status(v: &Arc<Volume<FileSource>>, model: &[u8], off: u64, len: u64) {
    let extents = v.block_status(off, len).await.unwrap();
    let mut at = off;
    for e in extents {
        if e.zero {
            assert!(
                model[at as usize..(at + e.length) as usize]
                    .iter()
                    .all(|&b| b == 0),
                "extent at {at}+{} is flagged zero but holds data",
                e.length
            );
        }
        at += e.length;
    }
    assert_eq!(at, off + len, "block status must cover the request exactly");
}

fn target_bytes(f: &Fixture) -> Vec<u8> {
    std::fs::read(f.path("tgt")).unwrap()
}

async fn random_workload(seed: u64) {
    let mut rng = Rng(seed);
    let chunks = 48;
    let mut f = Fixture::new(&mut rng, chunks);
    let size = f.model.len() as u64;
    let mut v = f.open().await;
    for step in 0..400 {
        let off = rng.below(size);
        let len = 1 + rng.below((size - off).min(3 * CHUNK));
        match rng.below(10) {
            0..=2 => {
                let got = read_all(&v, off, len).await;
                assert_eq!(
                    got,
                    f.model[off as usize..(off + len) as usize],
                    "seed {seed} step {step}: read {off}+{len}"
                );
            }
            3 | 4 => {
                let data = rng.bytes(len as usize);
                v.write(off, data.clone(), rng.below(4) == 0).await.unwrap();
                f.model[off as usize..(off + len) as usize].copy_from_slice(&data);
            }
            5 => {
                // Our trim zeroes the whole chunks it covers and leaves
                // partial ones alone.
                v.trim(off, len, false).await.unwrap();
                let g = v.geometry();
                for i in g.chunks_of(off, len) {
                    let c = ChunkIndex(i);
                    if g.covers(c, off, len) {
                        let r = g.bytes(c);
                        f.model[r.start as usize..r.end as usize].fill(0);
                    }
                }
            }
            6 => {
                let allocate = rng.below(2) == 0;
                v.write_zeroes(off, len, allocate, false, false)
                    .await
                    .unwrap()
                    .unwrap();
                f.model[off as usize..(off + len) as usize].fill(0);
            }
            7 => {
                let c = ChunkIndex(rng.below(chunks));
                v.fetch_run_from(c, 1 + rng.below(6) as usize, Class::Background)
                    .await
                    .unwrap();
            }
            8 => {
                v.learn_holes(off, len).await.unwrap();
                check_block_status(&v, &f.model, off, len).await;
            }
            _ => {
                // Flush, then drop without a clean close (as kill -9 would)
                // and reopen: the flushed state must come back as it was.
                v.flush().await.unwrap();
                v.idle().await;
                drop(v);
                v = f.open().await;
            }
        }
    }
    // Hydrate the rest; the target must then equal the model byte for byte.
    hydrate::run(
        v.clone(),
        hydrate::Options::default(),
        std::future::pending(),
    )
    .await;
    assert!(v.map().is_complete());
    assert_eq!(
        read_all(&v, 0, size).await,
        f.model,
        "seed {seed}: final read"
    );
    v.close().await.unwrap();
    assert_eq!(
        target_bytes(&f),
        f.model,
        "seed {seed}: target equals model"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_operations_match_the_model() {
    for seed in 1..=12u64 {
        tokio::time::timeout(Duration::from_secs(60), random_workload(seed * 7919))
            .await
            .expect("workload timed out");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_writes_racing_the_hydrator_are_never_overwritten() {
    for seed in [3u64, 99, 12345] {
        let mut rng = Rng(seed);
        let chunks = 256;
        let mut f = Fixture::new(&mut rng, chunks);
        let size = f.model.len() as u64;
        let v = f.open().await;
        let hydrator = tokio::spawn(hydrate::run(
            v.clone(),
            hydrate::Options::limited(Some(2 << 20)),
            std::future::pending(),
        ));
        for _ in 0..300 {
            let off = rng.below(size);
            let len = 1 + rng.below((size - off).min(2 * CHUNK));
            let data = rng.bytes(len as usize);
            v.write(off, data.clone(), false).await.unwrap();
            f.model[off as usize..(off + len) as usize].copy_from_slice(&data);
            if rng.below(8) == 0 {
                let o = rng.below(size);
                let l = 1 + rng.below((size - o).min(CHUNK * 4));
                assert_eq!(
                    read_all(&v, o, l).await,
                    f.model[o as usize..(o + l) as usize]
                );
            }
        }
        tokio::time::timeout(Duration::from_secs(60), hydrator)
            .await
            .expect("hydration finishes")
            .unwrap();
        assert!(v.map().is_complete());
        v.close().await.unwrap();
        assert_eq!(target_bytes(&f), f.model, "seed {seed}");
    }
}

#[tokio::test]
async fn whole_chunk_write_needs_no_fetch_and_reads_back() {
    let mut rng = Rng(5);
    let f = Fixture::new(&mut rng, 8);
    let v = f.open().await;
    let data = vec![0x5a; CHUNK as usize];
    v.write(CHUNK, data.clone(), false).await.unwrap();
    assert_eq!(
        v.stats
            .bytes_fetched
            .load(std::sync::atomic::Ordering::Relaxed),
        0
    );
    assert_eq!(v.map().state(ChunkIndex(1)), ChunkState::Data);
    assert!(v.map().is_written(ChunkIndex(1)));
    assert_eq!(read_all(&v, CHUNK, CHUNK).await, data);
}

#[tokio::test]
async fn unflushed_writes_after_a_crash_are_old_or_new_never_a_mix() {
    let mut rng = Rng(77);
    let f = Fixture::new(&mut rng, 32);
    let size = f.model.len() as u64;
    let v = f.open().await;
    // Some flushed state first.
    let mut flushed = f.model.clone();
    for _ in 0..20 {
        let off = rng.below(size - 100);
        let data = rng.bytes(100);
        v.write(off, data.clone(), false).await.unwrap();
        flushed[off as usize..off as usize + 100].copy_from_slice(&data);
    }
    v.flush().await.unwrap();
    // Unflushed writes of whole chunks with a recognisable pattern.
    let mut unflushed = Vec::new();
    for i in [2u64, 5, 9, 20] {
        let data = vec![i as u8 + 1; CHUNK as usize];
        v.write(i * CHUNK, data, false).await.unwrap();
        unflushed.push(i);
    }
    v.idle().await;
    drop(v);
    let v = f.open().await;
    let now = read_all(&v, 0, size).await;
    for c in 0..32u64 {
        let r = (c * CHUNK) as usize..((c + 1) * CHUNK).min(size) as usize;
        if unflushed.contains(&c) {
            let new = vec![c as u8 + 1; r.len()];
            assert!(
                now[r.clone()] == flushed[r.clone()] || now[r.clone()] == new[..],
                "chunk {c} is neither its flushed content nor the unflushed write"
            );
        } else {
            assert_eq!(now[r.clone()], flushed[r], "flushed chunk {c} changed");
        }
    }
    // And the target agrees with what is read, once whole.
    hydrate::run(
        v.clone(),
        hydrate::Options::default(),
        std::future::pending(),
    )
    .await;
    let seen = read_all(&v, 0, size).await;
    v.close().await.unwrap();
    assert_eq!(target_bytes(&f), seen);
}

#[tokio::test]
async fn a_different_target_or_chunk_size_is_refused() {
    let mut rng = Rng(9);
    let f = Fixture::new(&mut rng, 8);
    let v = f.open().await;
    v.close().await.unwrap();
    drop(v);
    let open = |target: &Path, chunk: u64| {
        let source = FileSource::open(&f.path("src")).unwrap();
        let opts = OpenOptions {
            target: target.to_path_buf(),
            state_dir: f.path("state"),
            chunk_size: Some(chunk),
            ..Default::default()
        };
        async move { Volume::open(source, &opts).await }
    };
    let e = open(&f.path("tgt"), 8192).await.err().expect("refused");
    assert!(e.to_string().contains("chunk size"), "{e}");
    // The same name, but another file: refused (inode differs).
    std::fs::rename(f.path("tgt"), f.path("tgt.old")).unwrap();
    std::fs::copy(f.path("tgt.old"), f.path("tgt")).unwrap();
    let e = open(&f.path("tgt"), CHUNK).await.err().expect("refused");
    assert!(e.to_string().contains("target"), "{e}");
    // Another source: refused.
    std::fs::rename(f.path("tgt.old"), f.path("tgt")).unwrap();
    std::fs::copy(f.path("src"), f.path("src2")).unwrap();
    let source = FileSource::open(&f.path("src2")).unwrap();
    let opts = OpenOptions {
        target: f.path("tgt"),
        state_dir: f.path("state"),
        chunk_size: None,
        ..Default::default()
    };
    let e = Volume::open(source, &opts).await.err().expect("refused");
    assert!(e.to_string().contains("source"), "{e}");
}

#[tokio::test]
async fn an_in_place_write_torn_by_a_crash_is_made_whole_by_the_log() {
    use std::os::unix::fs::FileExt;
    let mut rng = Rng(4242);
    let f = Fixture::new(&mut rng, 16);
    let v = f.open().await;
    // A chunk with data, present and durable; then an unflushed in-place
    // write to it.
    let c = (0..16u64)
        .find(|&c| {
            f.model[(c * CHUNK) as usize..((c + 1) * CHUNK) as usize]
                .iter()
                .any(|&b| b != 0)
        })
        .expect("the fixture has data chunks");
    v.fetch_run_from(ChunkIndex(c), 1, Class::Background)
        .await
        .unwrap();
    assert_eq!(v.map().state(ChunkIndex(c)), ChunkState::Data);
    v.flush().await.unwrap();
    let at = c * CHUNK + 100;
    let new = rng.bytes(3000);
    v.write(at, new.clone(), false).await.unwrap();
    // The process dies mid-pwrite: the second half never reached the target.
    let old = f.model[(at + 1500) as usize..(at + 3000) as usize].to_vec();
    let t = std::fs::OpenOptions::new()
        .write(true)
        .open(f.path("tgt"))
        .unwrap();
    t.write_all_at(&old, at + 1500).unwrap();
    v.idle().await;
    drop(v);
    let v = f.open().await;
    assert!(
        read_all(&v, at, 3000).await == new,
        "the logged write must be whole"
    );
    let mut expect = f.model.clone();
    expect[at as usize..(at + 3000) as usize].copy_from_slice(&new);
    let size = expect.len() as u64;
    hydrate::run(
        v.clone(),
        hydrate::Options::default(),
        std::future::pending(),
    )
    .await;
    assert!(read_all(&v, 0, size).await == expect);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sequential_reads_trigger_readahead_and_random_ones_do_not() {
    let mut rng = Rng(31337);
    let f = Fixture::new(&mut rng, 64);
    let v = f.open().await;
    // Random reads: nothing beyond what was read becomes present.
    for c in [40u64, 7, 23] {
        read_all(&v, c * CHUNK, 512).await;
    }
    v.idle().await;
    assert_eq!(v.map().present_count(), 3);
    // A booting OS reads sequentially: the chunks ahead are fetched.
    for i in 0..4u64 {
        let got = read_all(&v, i * CHUNK, CHUNK).await;
        assert_eq!(
            got,
            f.model[(i * CHUNK) as usize..((i + 1) * CHUNK) as usize]
        );
    }
    v.idle().await;
    assert!(
        (4..8).all(|c| v.map().is_present(ChunkIndex(c))),
        "chunks after a sequential run should have been read ahead"
    );
    assert!(
        v.stats
            .chunks_hydrated
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 4
    );
}
