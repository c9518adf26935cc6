//! What every backend must do, run against each of them: one suite for
//! the targets (file, memory, fault-injecting with no fault armed) and one
//! for the sources (file, memory); plus the single-flight promise seen
//! from the source: a chunk is fetched once however many clients race.

#![allow(
    clippy::cast_possible_truncation,
    reason = "test fixtures: offsets and sizes of small in-memory disks, byte patterns"
)]

use std::io::Write;
use std::sync::Arc;

use block_device::flatten;
use lazy_fetch::source::file::FileSource;
use lazy_fetch::source::memory::MemorySource;
use lazy_fetch::source::{Class, Source};
use lazy_fetch::target::Target;
use lazy_fetch::target::fault::FaultBackend;
use lazy_fetch::target::memory::MemoryBackend;
use lazy_fetch::{OpenOptions, Volume};

const SIZE: u64 = 64 * 4096 + 1000;

fn pattern(len: u64) -> Vec<u8> {
    (0..len).map(|i| (i * 31 % 251) as u8 | 1).collect()
}

/// Writes read back, zeroing reads as zeros (allocated or not), sync
/// succeeds, and the data extents cover every byte written.
async fn target_conformance(t: Target) {
    assert!(t.size() >= SIZE);
    let data = pattern(3 * 4096 + 17);
    t.write_at(4096 + 5, data.clone()).await.unwrap();
    assert_eq!(t.read_at(4096 + 5, data.len()).await.unwrap(), data);
    t.zero(8192, 4096, false).await.unwrap();
    assert!(t.read_at(8192, 4096).await.unwrap().iter().all(|&b| b == 0));
    t.zero(4096 + 5, 10, true).await.unwrap();
    assert!(
        t.read_at(4096 + 5, 10)
            .await
            .unwrap()
            .iter()
            .all(|&b| b == 0)
    );
    assert_eq!(t.read_at(4096 + 15, 10).await.unwrap(), data[10..20]);
    // A bulk write (hydration's, around the page cache where the backend
    // can) over bytes a buffered write left: what is read back is the
    // bulk write's, and a buffered write over part of it after that wins
    // there (direct and buffered I/O on one file stay coherent).
    let bulk = pattern(8 * 4096)
        .iter()
        .map(|b| b ^ 0x5a)
        .collect::<Vec<_>>();
    t.write_at(16 * 4096, vec![7; 4096]).await.unwrap();
    t.write_bulk(16 * 4096, bulk.clone()).await.unwrap();
    assert_eq!(t.read_at(16 * 4096, bulk.len()).await.unwrap(), bulk);
    t.write_at(17 * 4096 + 9, vec![3; 100]).await.unwrap();
    let mut want = bulk.clone();
    want[4096 + 9..4096 + 109].fill(3);
    assert_eq!(t.read_at(16 * 4096, bulk.len()).await.unwrap(), want);
    // Unaligned bulk writes are taken too (through the page cache).
    t.write_bulk(30 * 4096 + 1, vec![4; 5000]).await.unwrap();
    assert_eq!(t.read_at(30 * 4096 + 1, 5000).await.unwrap(), vec![4; 5000]);
    t.sync().await.unwrap();
    let extents = t.data_extents(0, SIZE).unwrap();
    for at in [4096 + 15, 3 * 4096] {
        assert!(
            extents.iter().any(|&(s, e)| s <= at && at < e),
            "byte {at} was written but no data extent covers it: {extents:?}"
        );
    }
}

#[tokio::test]
async fn every_target_backend_conforms() {
    let dir = tempfile::tempdir().unwrap();
    let (file, created) = Target::open(&dir.path().join("t"), SIZE, true).unwrap();
    assert!(created);
    target_conformance(file).await;
    let mem = Arc::new(MemoryBackend::new(SIZE));
    target_conformance(Target::with_backend(mem, "memory".into(), SIZE, false)).await;
    let faulty = Arc::new(FaultBackend::new(Arc::new(MemoryBackend::new(SIZE)), 7));
    target_conformance(Target::with_backend(faulty, "fault".into(), SIZE, false)).await;
}

/// Reads return the bytes asked for, short of nothing; the id names the
/// size; a hole the source reports reads as zeros.
async fn source_conformance(s: &impl Source, data: &[u8], hole: Option<(u64, u64)>) {
    assert_eq!(s.id().size, data.len() as u64);
    for (off, len) in [(0u64, 4096usize), (4095, 3), (SIZE - 1000, 1000)] {
        let got = s.read(off, len, Class::Background).await.unwrap();
        assert_eq!(
            got,
            data[off as usize..off as usize + len],
            "read {off}+{len}"
        );
    }
    if let Some((hs, he)) = hole
        && let Some(extents) = s.block_status(0, SIZE).await.unwrap()
    {
        let mut at = 0;
        for e in extents {
            if e.zero {
                assert!(
                    data[at as usize..(at + e.length) as usize]
                        .iter()
                        .all(|&b| b == 0)
                );
            }
            at += e.length;
        }
        assert!(
            s.read(hs, (he - hs) as usize, Class::Foreground)
                .await
                .unwrap()
                .iter()
                .all(|&b| b == 0)
        );
    }
}

#[tokio::test]
async fn every_source_conforms() {
    let mut data = pattern(SIZE);
    let hole = (16 * 4096, 20 * 4096);
    data[hole.0 as usize..hole.1 as usize].fill(0);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("src");
    {
        let mut f = std::fs::File::create(&path).unwrap();
        f.write_all(&data[..hole.0 as usize]).unwrap();
    }
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        f.write_all_at(&data[hole.1 as usize..], hole.1).unwrap();
    }
    source_conformance(&FileSource::open(&path).unwrap(), &data, Some(hole)).await;
    let mem = MemorySource::new(data.clone(), std::iter::once(hole.0..hole.1).collect())
        .with_delays(3, 50);
    source_conformance(&mem, &data, Some(hole)).await;
}

/// Sixteen clients read the same absent chunks at once (whole chunks,
/// pieces, CACHE and a write into one of them): each chunk comes from the
/// source exactly once (invariant 2).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_chunk_is_fetched_once_however_many_clients_race_for_it() {
    const C: u64 = 16384;
    let data = pattern(SIZE);
    let dir = tempfile::tempdir().unwrap();
    let source = MemorySource::new(data.clone(), Vec::new()).with_delays(11, 2000);
    let v = Volume::open(
        source,
        &OpenOptions {
            target: dir.path().join("t"),
            state_dir: dir.path().join("state"),
            chunk_size: Some(C),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..16u64 {
        let v = v.clone();
        tasks.spawn(async move {
            match i % 4 {
                0 => {
                    flatten(v.read(8 * C, 4 * C).await.unwrap());
                }
                1 => {
                    flatten(v.read(9 * C + 100, 50).await.unwrap());
                }
                2 => v.cache(8 * C, 4 * C).await.unwrap(),
                _ => v.write(10 * C + 7, vec![9; 3], false).await.unwrap(),
            }
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.unwrap();
    }
    v.idle().await;
    // Whole-chunk fetches (a piece-first read of a few KiB for a waiting
    // client is not stored and not a fetch).
    let reads = v.source().reads();
    for c in 8..12u64 {
        let fetched = reads
            .iter()
            .filter(|&&(off, len)| off <= c * C && c * C + C <= off + len as u64)
            .count();
        assert_eq!(fetched, 1, "chunk {c} fetched {fetched} times: {reads:?}");
    }
    let pieces = reads.iter().filter(|&&(_, len)| (len as u64) < C).count();
    eprintln!(
        "{} source reads, {pieces} of them piece-first reads",
        reads.len()
    );
    let got = flatten(v.read(8 * C, 4 * C).await.unwrap());
    let mut want = data[(8 * C) as usize..(12 * C) as usize].to_vec();
    want[(2 * C + 7) as usize..(2 * C + 10) as usize].fill(9);
    assert_eq!(got, want);
}
