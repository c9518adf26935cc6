//! The manifest and the verifier on a real migration: clean runs pass, a
//! corrupted chunk is reported with its byte range and what it differs from.

#![allow(
    clippy::cast_possible_truncation,
    reason = "test fixtures: offsets and sizes of small in-memory disks, byte patterns"
)]

mod common;

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

use lazy_fetch::manifest::{self, Manifest};
use lazy_fetch::source::file::FileSource;
use lazy_fetch::{OpenOptions, Volume};

const CHUNK: u64 = 4096;

fn flip(path: &Path, offset: u64) {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, offset).unwrap();
    b[0] ^= 0xff;
    f.write_all_at(&b, offset).unwrap();
}

fn target_chunk_hashes(path: &Path) -> Vec<[u8; 32]> {
    std::fs::read(path)
        .unwrap()
        .chunks(CHUNK as usize)
        .map(|c| *blake3::hash(c).as_bytes())
        .collect()
}

fn open_opts(dir: &Path) -> OpenOptions {
    OpenOptions {
        target: dir.join("tgt"),
        state_dir: dir.join("state"),
        chunk_size: Some(CHUNK),
        ..Default::default()
    }
}

async fn migrated(dir: &Path) -> Arc<Volume<FileSource>> {
    let src = dir.join("src");
    let f = std::fs::File::create(&src).unwrap();
    f.set_len(64 * CHUNK).unwrap();
    for c in (0..64).step_by(3) {
        f.write_all_at(&vec![c as u8 + 1; CHUNK as usize], c * CHUNK)
            .unwrap();
    }
    let v = Volume::open(
        FileSource::open(&src).unwrap(),
        &OpenOptions {
            target: dir.join("tgt"),
            state_dir: dir.join("state"),
            chunk_size: Some(CHUNK),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    // A client writes into chunk 10 (no source data there) and trims 12.
    v.write(10 * CHUNK + 5, vec![0xee; 100], false)
        .await
        .unwrap();
    v.trim(12 * CHUNK, CHUNK, false).await.unwrap();
    common::hydrate_all(&v).await;
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_passes_on_a_clean_migration_and_catches_a_corrupted_chunk() {
    let dir = tempfile::tempdir().unwrap();
    let v = migrated(dir.path()).await;
    let m = manifest::write(&v, &|_, _| {}).await.unwrap();
    assert_eq!(m.counts.chunks, 64);
    assert_eq!(m.counts.written_by_clients, 2);
    assert_eq!(
        Manifest::load(dir.path().join("state").as_path()).unwrap(),
        m
    );
    // Built from the kept hashes (and the map), it equals the target.
    assert_eq!(
        m.chunk_hashes(&dir.path().join("state")).unwrap(),
        target_chunk_hashes(&dir.path().join("tgt"))
    );
    assert_eq!(m.disk_blake3, None);

    let report = manifest::verify(&v, &m, &|_, _| {}).await.unwrap();
    assert!(report.ok(), "{report:?}");
    assert_eq!(report.chunks_checked, 64);
    assert_eq!(report.chunks_compared_with_manifest, 2);

    // A chunk copied from the source, damaged on the target.
    flip(&dir.path().join("tgt"), 3 * CHUNK + 7);
    // A chunk the client wrote, damaged too.
    flip(&dir.path().join("tgt"), 10 * CHUNK + 50);
    let report = manifest::verify(&v, &m, &|_, _| {}).await.unwrap();
    assert!(!report.ok());
    let got: Vec<_> = report
        .mismatches
        .iter()
        .map(|m| (m.offset, m.length, m.against))
        .collect();
    assert_eq!(
        got,
        vec![
            (3 * CHUNK, CHUNK, "source"),
            (10 * CHUNK, CHUNK, "manifest")
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn swapped_chunk_hashes_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let v = migrated(dir.path()).await;
    let m = manifest::write(&v, &|_, _| {}).await.unwrap();
    let hashes = dir.path().join("state").join(manifest::CHUNK_HASHES);
    flip(&hashes, 40);
    assert!(manifest::verify(&v, &m, &|_, _| {}).await.is_err());
}

/// The kept hashes stay true across in-place client changes, a clean
/// restart and a crash whose logged writes are replayed: the manifest then
/// reads only the chunks changed since their hash was recorded, and still
/// equals the target chunk for chunk.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kept_hashes_stay_true_across_writes_restarts_and_a_crash() {
    let dir = tempfile::tempdir().unwrap();
    let v = migrated(dir.path()).await;
    // In place into present chunks: a write, a partial zeroing.
    v.write(3 * CHUNK + 10, vec![0x42; 50], false)
        .await
        .unwrap();
    v.write_zeroes(6 * CHUNK + 100, 200, true, false, false)
        .await
        .unwrap()
        .unwrap();
    assert!(v.stale_hashes() >= 2);
    // The background pass re-derives them from the target.
    let before = v.stale_hashes();
    assert_eq!(v.rehash_stale(1).await.unwrap(), 1);
    assert_eq!(v.stale_hashes(), before - 1);
    v.close().await.unwrap();
    drop(v);
    // Clean restart: the stale set comes back.
    let src = FileSource::open(&dir.path().join("src")).unwrap();
    let v = Volume::open(src, &open_opts(dir.path())).await.unwrap();
    // Chunk 3 was rehashed (the first stale one), 6 was not.
    assert!(v.hash_is_kept(lazy_fetch::units::ChunkIndex(3)));
    assert!(!v.hash_is_kept(lazy_fetch::units::ChunkIndex(6)));
    assert!(v.hash_is_kept(lazy_fetch::units::ChunkIndex(9)));
    // A write that is logged and then lost with the process (no flush, no
    // close): replayed at the next open, the chunk's hash is stale then.
    v.write(9 * CHUNK, vec![0x99; 300], false).await.unwrap();
    v.idle().await;
    drop(v);
    let src = FileSource::open(&dir.path().join("src")).unwrap();
    let v = Volume::open(src, &open_opts(dir.path())).await.unwrap();
    let m = manifest::write(&v, &|_, _| {}).await.unwrap();
    assert_eq!(
        m.chunk_hashes(&dir.path().join("state")).unwrap(),
        target_chunk_hashes(&dir.path().join("tgt")),
        "the manifest built from kept hashes equals the target"
    );
}
