//! A seeded migration's delta: chunks whose copy differs from a (local)
//! source are found and forgotten, durably, and fetched again; a crash
//! right after forgetting leaves them absent and cleared; a volume clients
//! wrote to is never rolled back.

#![allow(
    clippy::cast_possible_truncation,
    reason = "test fixtures: offsets and sizes of a small disk, byte patterns"
)]

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

use lazy_fetch::source::file::FileSource;
use lazy_fetch::{OpenOptions, Volume, hydrate};

const CHUNK: u64 = 4096;
const CHUNKS: u64 = 64;

async fn open(dir: &Path) -> Arc<Volume<FileSource>> {
    Volume::open(
        FileSource::open(&dir.join("src")).unwrap(),
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
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(dir.join("src"))
        .unwrap();
    f.write_all_at(&[byte; 10], c * CHUNK + 5).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changed_chunks_are_found_forgotten_durably_and_fetched_again() {
    let dir = tempfile::tempdir().unwrap();
    let f = std::fs::File::create(dir.path().join("src")).unwrap();
    f.set_len(CHUNKS * CHUNK).unwrap();
    for c in (0..CHUNKS).step_by(3) {
        f.write_all_at(&vec![c as u8 + 1; CHUNK as usize], c * CHUNK)
            .unwrap();
    }
    let v = open(dir.path()).await;
    hydrate::run(
        v.clone(),
        hydrate::Options::default(),
        std::future::pending(),
    )
    .await;
    v.flush().await.unwrap();
    assert_eq!(v.changed_chunks(&|_, _| {}).await.unwrap(), Some(vec![]));
    v.close().await.unwrap();
    drop(v);

    // The legacy disk changes: a data chunk, a zero chunk, the last chunk.
    for c in [3, 4, CHUNKS - 1] {
        write_src(dir.path(), c, 0xee);
    }
    let v = open(dir.path()).await;
    let changed = v.changed_chunks(&|_, _| {}).await.unwrap().unwrap();
    assert_eq!(changed, vec![3, 4, CHUNKS - 1]);
    assert_eq!(v.forget_changed(&changed).await.unwrap(), 3);
    assert_eq!(v.map().present_count(), CHUNKS - 3);
    // A crash now (no close): the forgotten chunks stay absent, cleared.
    drop(v);
    let v = open(dir.path()).await;
    assert_eq!(v.map().present_count(), CHUNKS - 3);
    let tgt = std::fs::read(dir.path().join("tgt")).unwrap();
    assert!(
        tgt[(3 * CHUNK) as usize..(5 * CHUNK) as usize]
            .iter()
            .all(|&b| b == 0)
    );
    hydrate::run(
        v.clone(),
        hydrate::Options::default(),
        std::future::pending(),
    )
    .await;
    v.flush().await.unwrap();
    assert_eq!(v.changed_chunks(&|_, _| {}).await.unwrap(), Some(vec![]));
    assert!(
        std::fs::read(dir.path().join("tgt")).unwrap()
            == std::fs::read(dir.path().join("src")).unwrap()
    );

    // Once a client wrote, nothing is forgotten any more.
    v.write(0, vec![1; 100], false).await.unwrap();
    let err = v.forget_changed(&[5]).await.unwrap_err().to_string();
    assert!(err.contains("clients have written"), "{err}");
    assert_eq!(v.map().present_count(), CHUNKS);
}
