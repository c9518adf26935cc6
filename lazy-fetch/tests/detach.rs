//! A target shared with a guest switched onto it live (`stream detach`):
//! nothing of the engine writes it on its own once shared, even after a
//! crash, and a write through the export is no longer logged.

#![allow(
    clippy::cast_possible_truncation,
    reason = "test fixtures: offsets and sizes of small in-memory disks, byte patterns"
)]

mod common;

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

use lazy_fetch::source::file::FileSource;
use lazy_fetch::{OpenOptions, Volume};

const CHUNK: u64 = 4096;
const CHUNKS: u64 = 32;

fn opts(dir: &Path) -> OpenOptions {
    OpenOptions {
        target: dir.join("tgt"),
        state_dir: dir.join("state"),
        chunk_size: Some(CHUNK),
        serving: true,
        ..Default::default()
    }
}

/// A source whose chunks 0, 4, 8, ... hold data and the rest are zeros.
async fn open(dir: &Path) -> Arc<Volume<FileSource>> {
    let src = dir.join("src");
    if !src.exists() {
        let f = std::fs::File::create(&src).unwrap();
        f.set_len(CHUNKS * CHUNK).unwrap();
        for c in (0..CHUNKS).step_by(4) {
            f.write_all_at(&vec![c as u8 + 1; CHUNK as usize], c * CHUNK)
                .unwrap();
        }
    }
    Volume::open(FileSource::open(&src).unwrap(), &opts(dir))
        .await
        .unwrap()
}

async fn read(v: &Arc<Volume<FileSource>>, c: u64) -> Vec<u8> {
    block_device::flatten(v.read(c * CHUNK, CHUNK).await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn detach_is_refused_until_every_chunk_is_present() {
    let dir = tempfile::tempdir().unwrap();
    let v = open(dir.path()).await;
    let err = v.prepare_detach().await.unwrap_err().to_string();
    assert!(err.contains("32 chunks are not yet copied"), "{err}");
    assert!(!v.target_shared());
    assert!(v.header().detach.is_none());

    common::hydrate_all(&v).await;
    v.prepare_detach().await.unwrap();
    v.prepare_detach().await.unwrap();
    assert!(v.target_shared());
    let prepared = v.header().detach.expect("recorded");

    // An in-place change of a present chunk is no longer logged.
    v.write(CHUNK + 10, vec![7; 100], false).await.unwrap();
    assert_eq!(v.wal_len(), 0);
    assert_eq!(&read(&v, 1).await[10..110], &[7; 100][..]);
    v.close().await.unwrap();
    drop(v);

    // Durable, and the same record after a clean reopen.
    let v = open(dir.path()).await;
    assert!(v.target_shared());
    assert_eq!(v.header().detach, Some(prepared));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_crash_a_shared_target_is_neither_replayed_onto_nor_cleared() {
    let dir = tempfile::tempdir().unwrap();
    let v = open(dir.path()).await;
    common::hydrate_all(&v).await;
    v.prepare_detach().await.unwrap();
    assert_eq!(v.stale_hashes(), 0);
    // Through the export, never flushed: chunk 1 (zero until now) and
    // chunk 4 (data) change.
    v.write(CHUNK, vec![0x11; CHUNK as usize], false)
        .await
        .unwrap();
    v.write(4 * CHUNK, vec![0x44; 512], false).await.unwrap();
    // The process dies (no close: the state stays marked running) ...
    drop(v);
    // ... and the guest, switched onto the target, writes chunk 2 (a zero
    // chunk in the map) and chunk 8 directly.
    let tgt = std::fs::OpenOptions::new()
        .write(true)
        .open(dir.path().join("tgt"))
        .unwrap();
    tgt.write_all_at(&[0x22; 100], 2 * CHUNK + 7).unwrap();
    tgt.write_all_at(&[0x88; 64], 8 * CHUNK).unwrap();
    drop(tgt);

    let v = open(dir.path()).await;
    assert!(v.target_shared());
    // Nothing cleared or put back: what was written, whoever wrote it, reads.
    assert_eq!(read(&v, 1).await, vec![0x11; CHUNK as usize]);
    assert_eq!(&read(&v, 2).await[7..107], &[0x22; 100][..]);
    assert_eq!(&read(&v, 4).await[..512], &[0x44; 512][..]);
    assert_eq!(&read(&v, 8).await[..64], &[0x88; 64][..]);
    let target = std::fs::read(dir.path().join("tgt")).unwrap();
    assert_eq!(
        &target[2 * CHUNK as usize + 7..2 * CHUNK as usize + 107],
        &[0x22; 100][..]
    );
    // Which chunks the guest wrote is unknown: no kept hash is trusted.
    assert_eq!(v.stale_hashes(), CHUNKS);
}
