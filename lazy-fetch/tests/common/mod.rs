//! Helpers the engine's integration tests share (each test file is its own
//! crate; each uses some of these).

#![allow(
    dead_code,
    clippy::cast_possible_truncation,
    reason = "not every test file uses every helper; run lengths are small"
)]

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

use lazy_fetch::source::{Class, Source};
use lazy_fetch::units::ChunkIndex;
use lazy_fetch::{Volume, hydrate};
use test_support::Rng;

/// Hydrate `v` until every chunk is present, then flush.
pub async fn hydrate_all<S: Source>(v: &Arc<Volume<S>>) {
    hydrate::run(
        v.clone(),
        hydrate::Options::default(),
        std::future::pending(),
    )
    .await;
    v.flush().await.unwrap();
}

/// The legacy server writes: 10 bytes of `byte` into chunk `c` (of
/// `chunk` bytes) of `dir/src`.
pub fn write_src(dir: &Path, chunk: u64, c: u64, byte: u8) {
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(dir.join("src"))
        .unwrap();
    f.write_all_at(&[byte; 10], c * chunk + 5).unwrap();
}

/// Two tasks that fetch runs of 1-8 chunks from random places of a volume
/// of `chunks` chunks, 40 each, racing whatever else runs.
pub fn spawn_fetchers<S: Source>(
    tasks: &mut tokio::task::JoinSet<()>,
    v: &Arc<Volume<S>>,
    rng: &mut Rng,
    chunks: u64,
) {
    for _ in 0..2 {
        let (v, mut rng) = (v.clone(), Rng::new(rng.next()));
        tasks.spawn(async move {
            for _ in 0..40 {
                let c = ChunkIndex(rng.below(chunks));
                let _ = v
                    .fetch_run_from(c, 1 + rng.below(8) as usize, Class::Background)
                    .await;
                tokio::task::yield_now().await;
            }
        });
    }
}
