//! A seeded migration's delta: chunks whose copy differs from a (local)
//! source are found and forgotten, durably, and fetched again; a crash
//! right after forgetting leaves them absent and cleared; a volume clients
//! wrote to is never rolled back.

#![allow(
    clippy::cast_possible_truncation,
    reason = "test fixtures: offsets and sizes of a small disk, byte patterns"
)]

mod common;

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

use lazy_fetch::source::file::FileSource;
use lazy_fetch::{OpenOptions, Volume};

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
    common::write_src(dir, CHUNK, c, byte);
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
    common::hydrate_all(&v).await;
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
    common::hydrate_all(&v).await;
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

/// After a delta, clients (each in its own lane of chunks, so the model is
/// exact) read and write while background fetches race them over runs
/// that span every lane, the forgotten chunks among them; every read, and
/// the target at the end, match the stopped source plus the writes.
/// `STREAM_DELTA_SEEDS` sets how many schedules (default 12).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn clients_and_fetches_race_over_forgotten_chunks_and_match_the_model() {
    use test_support::Rng;
    const LANES: u64 = 4;
    let seeds: u64 = std::env::var("STREAM_DELTA_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(12);
    for seed in 0..seeds {
        let dir = tempfile::tempdir().unwrap();
        let mut rng = Rng::new(seed + 1);
        let size = CHUNKS * CHUNK;
        std::fs::write(dir.path().join("src"), rng.filled(size as usize)).unwrap();
        let v = open(dir.path()).await;
        common::hydrate_all(&v).await;
        v.close().await.unwrap();
        drop(v);
        // The legacy disk changes in a third of its chunks, then stops.
        for c in 0..CHUNKS {
            if rng.below(3) == 0 {
                write_src(dir.path(), c, rng.below(256) as u8);
            }
        }
        let v = open(dir.path()).await;
        let changed = v.changed_chunks(&|_, _| {}).await.unwrap().unwrap();
        v.forget_changed(&changed).await.unwrap();
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
                    if rng.below(2) == 0 {
                        let data = rng.filled(len as usize);
                        v.write(off, data.clone(), false).await.unwrap();
                        model.lock().unwrap()[s..e].copy_from_slice(&data);
                    } else {
                        let got = block_device::flatten(v.read(off, len).await.unwrap());
                        assert!(
                            got == model.lock().unwrap()[s..e],
                            "seed {seed}: read {off}+{len}"
                        );
                    }
                    tokio::task::yield_now().await;
                }
            });
        }
        common::spawn_fetchers(&mut tasks, &v, &mut rng, CHUNKS);
        while let Some(t) = tasks.join_next().await {
            t.unwrap();
        }
        common::hydrate_all(&v).await;
        let want = model.lock().unwrap().clone();
        assert!(
            std::fs::read(dir.path().join("tgt")).unwrap() == want,
            "seed {seed}: the target differs from the stopped source plus the writes"
        );
    }
}
