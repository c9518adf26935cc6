//! Prefetch around a miss (`volume/prefetch.rs`): on a far link a read that
//! misses also fetches the absent chunks of the aligned extent around it,
//! outside the request, in the background; a client reading one of them
//! later is served from the target without a source read, and counted. On
//! a near source nothing is prefetched.

#![allow(
    clippy::cast_possible_truncation,
    reason = "test fixtures: offsets of a small in-memory disk, byte patterns"
)]

use std::sync::Arc;
use std::time::Duration;

use block_device::flatten;
use lazy_fetch::source::memory::MemorySource;
use lazy_fetch::{OpenOptions, Volume};

const CHUNK: u64 = 64 << 10;
/// 64 chunks: four 1 MiB extents, the extent a far link starts with.
const SIZE: u64 = 64 * CHUNK;
const BOUND: Duration = Duration::from_secs(20);

fn pattern(size: u64) -> Vec<u8> {
    (0..size).map(|i| (i * 13 % 251) as u8 | 1).collect()
}

async fn open(dir: &std::path::Path) -> (Arc<Volume<MemorySource>>, Vec<u8>) {
    let data = pattern(SIZE);
    let v = open_source(dir, MemorySource::new(data.clone(), Vec::new())).await;
    (v, data)
}

async fn open_source(dir: &std::path::Path, source: MemorySource) -> Arc<Volume<MemorySource>> {
    Volume::open(
        source,
        &OpenOptions {
            target: dir.join("target.img"),
            state_dir: dir.join("state"),
            chunk_size: Some(CHUNK),
            ..Default::default()
        },
    )
    .await
    .unwrap()
}

fn bytes(data: &[u8], at: u64, len: u64) -> &[u8] {
    &data[at as usize..(at + len) as usize]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_miss_on_a_far_link_brings_its_extent_and_later_reads_find_it() {
    let dir = tempfile::tempdir().unwrap();
    let (v, data) = open(dir.path()).await;
    // Any timed round trip counts as far.
    v.set_prefetch_min_rtt(Some(Duration::ZERO));
    // The first miss times the round trip; nothing to judge it by before.
    let got = flatten(v.read(40 * CHUNK + 100, 4096).await.unwrap());
    assert_eq!(got, bytes(&data, 40 * CHUNK + 100, 4096));
    tokio::time::timeout(BOUND, v.idle()).await.unwrap();
    assert_eq!(v.status().chunks_prefetched, 0, "{:?}", v.status());
    // A miss of two chunks in the second extent (chunks 16..32): the other
    // 14 chunks of it come in the background, the two read do not.
    let got = flatten(v.read(20 * CHUNK + 512, CHUNK).await.unwrap());
    assert_eq!(got, bytes(&data, 20 * CHUNK + 512, CHUNK));
    tokio::time::timeout(BOUND, v.idle()).await.unwrap();
    let st = v.status();
    assert_eq!(st.chunks_prefetched, 14, "{st:?}");
    for c in 16..32 {
        assert!(
            v.map().is_present(lazy_fetch::units::ChunkIndex(c)),
            "chunk {c} of the extent is absent"
        );
    }
    assert!(
        !v.map().is_present(lazy_fetch::units::ChunkIndex(32)),
        "the next extent was fetched too"
    );
    // Reads there now touch no source: served from the target, counted.
    let reads = v.source().reads().len();
    let got = flatten(v.read(17 * CHUNK, 3 * CHUNK).await.unwrap());
    assert_eq!(got, bytes(&data, 17 * CHUNK, 3 * CHUNK));
    assert_eq!(
        v.source().reads().len(),
        reads,
        "a prefetched chunk was fetched again"
    );
    // 17 and 18 were prefetched, 19.. too; 20 was the miss itself.
    assert_eq!(v.status().prefetched_chunks_read, 3, "{:?}", v.status());
    // Read again: counted once.
    flatten(v.read(17 * CHUNK, CHUNK).await.unwrap());
    assert_eq!(v.status().prefetched_chunks_read, 3);
    v.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_near_source_or_prefetch_off_fetches_only_what_is_read() {
    // The default (2 ms: slower than any fetch from memory), and off.
    for setting in [None, Some(None)] {
        let dir = tempfile::tempdir().unwrap();
        let (v, data) = open(dir.path()).await;
        if let Some(off) = setting {
            v.set_prefetch_min_rtt(off);
        }
        for c in [3u64, 20, 40, 41] {
            let got = flatten(v.read(c * CHUNK, 4096).await.unwrap());
            assert_eq!(got, bytes(&data, c * CHUNK, 4096));
        }
        tokio::time::timeout(BOUND, v.idle()).await.unwrap();
        let st = v.status();
        assert_eq!(st.chunks_prefetched, 0, "{setting:?}: {st:?}");
        assert_eq!(st.chunks_present, 4, "{setting:?}: {st:?}");
        v.close().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_sent_with_a_prefetch_in_flight_are_kept() {
    let dir = tempfile::tempdir().unwrap();
    let (v, mut data) = open(dir.path()).await;
    v.set_prefetch_min_rtt(Some(Duration::ZERO));
    flatten(v.read(0, 4096).await.unwrap());
    tokio::time::timeout(BOUND, v.idle()).await.unwrap();
    // The miss at chunk 33 locks 32..48 but 33 for the prefetch; writes to
    // them, sent at once, wait for the chunk they hit and land over it.
    let read = v.read(33 * CHUNK, 4096);
    let writes: Vec<_> = (34..48u64)
        .map(|c| {
            let v = v.clone();
            tokio::spawn(async move { v.write(c * CHUNK + 7, vec![0xee; 100], false).await })
        })
        .collect();
    flatten(read.await.unwrap());
    for w in writes {
        tokio::time::timeout(BOUND, w)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
    }
    tokio::time::timeout(BOUND, v.idle()).await.unwrap();
    for c in 34..48u64 {
        let at = (c * CHUNK + 7) as usize;
        data[at..at + 100].fill(0xee);
    }
    let got = flatten(v.read(32 * CHUNK, 16 * CHUNK).await.unwrap());
    assert!(
        got == data[32 * CHUNK as usize..48 * CHUNK as usize],
        "a write was lost under the prefetch, or the prefetch under a write"
    );
    v.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_that_never_use_it_turn_prefetch_off_and_clustered_reads_back_on() {
    const CHUNKS: u64 = 2048;
    let dir = tempfile::tempdir().unwrap();
    // A far link: round trips of 0-5 ms, so the bandwidth-delay product
    // never stands in for use here.
    let source = MemorySource::new(pattern(CHUNKS * CHUNK), Vec::new()).with_delays(7, 5000);
    let v = open_source(dir.path(), source).await;
    v.set_prefetch_min_rtt(Some(Duration::ZERO));
    let read = |c: u64| {
        let v = v.clone();
        async move {
            flatten(v.read(c * CHUNK, 4096).await.unwrap());
            tokio::time::timeout(BOUND, v.idle()).await.unwrap();
            v.status().chunks_prefetched
        }
    };
    // One read in each 1 MiB extent of the first half, never near another:
    // nothing prefetched is ever read. 8 misses prefetch, then off.
    let mut at_miss = Vec::new();
    for e in 0..64 {
        at_miss.push(read(e * 16 + 3).await);
    }
    assert!(at_miss[8] >= 8, "{at_miss:?}");
    // Then at most a probe (3 chunks here) now and then.
    assert!(
        at_miss[63] - at_miss[31] <= 6,
        "still prefetching after 32 misses that read none of it: {at_miss:?}"
    );
    assert_eq!(v.status().prefetched_chunks_read, 0);
    // Clustered reads in the second half (the first 4 KiB of every chunk:
    // not sequential, so readahead stays out): the probes' chunks are read,
    // and prefetch comes back to whole extents.
    let before = v.status().chunks_prefetched;
    for c in 1024..CHUNKS {
        read(c).await;
    }
    let st = v.status();
    assert!(
        st.chunks_prefetched - before >= 256,
        "prefetch did not come back for clustered reads: {st:?}"
    );
    assert!(st.prefetched_chunks_read > 0, "{st:?}");
    v.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_round_trip_is_trusted_from_the_fourth_fetch() {
    let dir = tempfile::tempdir().unwrap();
    let source = MemorySource::new(pattern(SIZE), Vec::new()).with_delays(3, 3000);
    let v = open_source(dir.path(), source).await;
    // Any timed fetch is slow enough here, as one slow fetch on a loaded
    // machine would be for the 2 ms default.
    v.set_prefetch_min_rtt(Some(Duration::from_micros(1)));
    for c in [1u64, 20, 40, 60] {
        flatten(v.read(c * CHUNK, 4096).await.unwrap());
        tokio::time::timeout(BOUND, v.idle()).await.unwrap();
        assert_eq!(
            v.status().chunks_prefetched,
            0,
            "prefetched on {} timed fetch(es)",
            v.status().foreground_fetches
        );
    }
    flatten(v.read(8 * CHUNK, 4096).await.unwrap());
    tokio::time::timeout(BOUND, v.idle()).await.unwrap();
    assert!(v.status().chunks_prefetched > 0, "{:?}", v.status());
    v.close().await.unwrap();
}
