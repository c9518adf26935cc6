//! The volume under concurrency, against a model, with the schedule
//! randomized per seed.
//!
//! Many clients at once issue sub-chunk and multi-chunk writes, trims,
//! write-zeroes, reads, caches and flushes over absent and present chunks
//! while background fetches (and, for even seeds, prefetches around every
//! read that misses) race them; the source and the target answer
//! after seeded random delays, so each seed finishes I/O in another order
//! on a multi-threaded runtime. Two properties are checked:
//!
//! - *Progress*: every operation finishes. A deadlock (issue 12, case 1: a
//!   FLUSH that never returned under concurrent sub-chunk writes) shows up
//!   as the run not finishing within its bound, reported with the seed.
//! - *Content*: every read, the whole target at the end, and the manifest
//!   built from the hashes kept along the way, equal the model. Clients never overlap *in bytes* while in flight (each reserves
//!   its byte range first), but they share chunks freely, which is where
//!   the engine's locks, fetches and log must get it right.
//!
//! Why not `shuttle` or `loom`: they explore schedules of their own
//! primitives (their `Mutex`, `thread`, `future`), and the engine is built
//! on tokio's `Mutex`, `RwLock` and `Notify`, which they do not instrument.
//! Seeded jitter at every I/O seam on a real multi-threaded runtime is what
//! reaches the interleavings here; `STREAM_SCHEDULE_SEEDS=N` runs more.

#![allow(
    clippy::cast_possible_truncation,
    reason = "test fixtures: offsets and sizes of small in-memory disks, byte patterns"
)]

use std::ops::Range;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use test_support::Rng;

use block_device::flatten;
use lazy_fetch::source::Class;
use lazy_fetch::source::memory::MemorySource;
use lazy_fetch::target::Target;
use lazy_fetch::target::fault::{FaultBackend, Faults};
use lazy_fetch::target::memory::MemoryBackend;
use lazy_fetch::units::ChunkIndex;
use lazy_fetch::volume::{Keep, MAX_RUN};
use lazy_fetch::{OpenOptions, Volume};

const CHUNK: u64 = 16 << 10;
const CHUNKS: u64 = 40;
const CLIENTS: usize = 8;
const OPS_PER_CLIENT: usize = 80;
/// A run that has not finished by then is stuck: every operation here
/// takes microseconds to a few milliseconds.
const BOUND: Duration = Duration::from_secs(60);

/// Byte ranges some client is working on; a client picks a range that
/// overlaps none of them.
#[derive(Default)]
struct Reservations(Mutex<Vec<Range<u64>>>);

impl Reservations {
    fn try_take(&self, r: &Range<u64>) -> bool {
        let mut v = self.0.lock().unwrap();
        if v.iter().any(|o| o.start < r.end && r.start < o.end) {
            return false;
        }
        v.push(r.clone());
        true
    }
    fn release(&self, r: &Range<u64>) {
        let mut v = self.0.lock().unwrap();
        let i = v.iter().position(|o| o == r).unwrap();
        v.swap_remove(i);
    }
}

struct World {
    volume: Arc<Volume<MemorySource>>,
    model: Mutex<Vec<u8>>,
    busy: Reservations,
    size: u64,
}

/// One client's operations. Returns a description of the first wrong read.
async fn client(world: Arc<World>, mut rng: Rng, id: usize) -> Result<(), String> {
    let v = &world.volume;
    let size = world.size;
    for step in 0..OPS_PER_CLIENT {
        let op = rng.below(16);
        if op == 15 {
            v.flush().await.map_err(|e| format!("flush: {e}"))?;
            continue;
        }
        // Mostly sub-chunk (512 B..16 KiB, sector aligned, as a guest
        // issues), sometimes up to three chunks, sometimes unaligned.
        let len = match rng.below(4) {
            0 => 1 + rng.below(3 * CHUNK),
            1 => 512 * (1 + rng.below(3 * CHUNK / 512)),
            _ => 512 * (1 + rng.below(CHUNK / 512)),
        }
        .min(size);
        let off = match rng.below(3) {
            0 => rng.below(size - len + 1),
            _ => (rng.below(size - len + 1) / 512) * 512,
        };
        let r = off..off + len;
        if !world.busy.try_take(&r) {
            tokio::task::yield_now().await;
            continue;
        }
        let what = format!("client {id} step {step}");
        let result = async {
            match op {
                0..=4 => {
                    let got = flatten(v.read(off, len).await.map_err(|e| format!("read: {e}"))?);
                    let model = world.model.lock().unwrap();
                    if got != model[off as usize..(off + len) as usize] {
                        return Err(format!("read {off}+{len} differs from the model"));
                    }
                }
                5..=10 => {
                    let data = rng.bytes(len as usize);
                    v.write(off, data.clone(), rng.below(8) == 0)
                        .await
                        .map_err(|e| format!("write: {e}"))?;
                    world.model.lock().unwrap()[off as usize..(off + len) as usize]
                        .copy_from_slice(&data);
                }
                11 => {
                    // Our trim zeroes the whole chunks it covers only.
                    v.trim(off, len, false)
                        .await
                        .map_err(|e| format!("trim: {e}"))?;
                    let g = v.geometry();
                    let mut model = world.model.lock().unwrap();
                    for i in g.chunks_of(off, len) {
                        let c = ChunkIndex(i);
                        if g.covers(c, off, len) {
                            let b = g.bytes(c);
                            model[b.start as usize..b.end as usize].fill(0);
                        }
                    }
                }
                12 => {
                    let allocate = rng.below(2) == 0;
                    v.write_zeroes(off, len, allocate, false, rng.below(8) == 0)
                        .await
                        .map_err(|e| format!("write zeroes: {e}"))?
                        .map_err(|_| "write zeroes refused".to_string())?;
                    world.model.lock().unwrap()[off as usize..(off + len) as usize].fill(0);
                }
                13 => v.cache(off, len).await.map_err(|e| format!("cache: {e}"))?,
                _ => {
                    v.block_status(off, len)
                        .await
                        .map_err(|e| format!("block status: {e}"))?;
                }
            }
            Ok(())
        }
        .await;
        world.busy.release(&r);
        result.map_err(|e| format!("{what}: {e}"))?;
    }
    Ok(())
}

/// Background fetches of random runs, as readahead makes them (a few
/// chunks, kept in the page cache) and as hydration does (up to its
/// longest run, written around the cache), and rehashes of stale kept
/// hashes.
async fn fetcher(world: Arc<World>, mut rng: Rng) {
    for _ in 0..OPS_PER_CLIENT {
        let c = ChunkIndex(rng.below(CHUNKS));
        if rng.below(2) == 0 {
            let _ = world
                .volume
                .fetch_run_from(c, 1 + rng.below(4) as usize, Class::Background)
                .await;
        } else {
            let run = world
                .volume
                .lock_run(c, 1 + rng.below(2 * MAX_RUN as u64) as usize);
            let _ = world
                .volume
                .fetch_run(run, Class::Background, Keep::Cold)
                .await;
        }
        // The background pass that re-derives hashes clients made stale,
        // racing their writes.
        let _ = world.volume.rehash_stale(2).await;
        tokio::task::yield_now().await;
    }
}

/// Runs one schedule; returns the chunks prefetched in it.
async fn run_seed(seed: u64) -> u64 {
    let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
    let size = CHUNKS * CHUNK - 1536;
    let mut data = vec![0u8; size as usize];
    let mut holes = Vec::new();
    for c in 0..CHUNKS {
        let (s, e) = (c * CHUNK, ((c + 1) * CHUNK).min(size));
        match rng.below(4) {
            0 => holes.push(s..e),
            1 => {} // allocated zeros
            _ => data[s as usize..e as usize].copy_from_slice(&rng.bytes((e - s) as usize)),
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let memory = Arc::new(MemoryBackend::new(size));
    let faulty = Arc::new(FaultBackend::new(memory.clone(), seed));
    faulty.set(Faults {
        jitter_us: 150,
        ..Faults::default()
    });
    let target = Target::with_backend(faulty, dir.path().join("memory-target"), size, false);
    let source = MemorySource::new(data.clone(), holes).with_delays(rng.next(), 200);
    let volume = Volume::open(
        source,
        &OpenOptions {
            target: dir.path().join("memory-target"),
            state_dir: dir.path().join("state"),
            chunk_size: Some(CHUNK),
            target_device: Some(target),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    if seed % 2 == 0 {
        // Every read that misses also prefetches the chunks around it
        // (with 40 chunks of 16 KiB, the whole disk), racing the rest.
        volume.set_prefetch_min_rtt(Some(Duration::ZERO));
    } else {
        volume.set_prefetch_min_rtt(None);
    }
    let world = Arc::new(World {
        volume: volume.clone(),
        model: Mutex::new(data),
        busy: Reservations::default(),
        size,
    });
    let mut tasks = tokio::task::JoinSet::new();
    for id in 0..CLIENTS {
        let r = Rng(rng.next() | 1);
        tasks.spawn(client(world.clone(), r, id));
    }
    for _ in 0..2 {
        let r = Rng(rng.next() | 1);
        let w = world.clone();
        tasks.spawn(async move {
            fetcher(w, r).await;
            Ok(())
        });
    }
    let all = async {
        while let Some(done) = tasks.join_next().await {
            done.expect("a client panicked")?;
        }
        Ok::<(), String>(())
    };
    match tokio::time::timeout(BOUND, all).await {
        Err(_) => panic!(
            "seed {seed}: the engine did not finish {CLIENTS} clients x {OPS_PER_CLIENT} \
             operations within {BOUND:?}: stuck (a deadlock?)"
        ),
        Ok(Err(e)) => panic!("seed {seed}: {e}"),
        Ok(Ok(())) => {}
    }
    // Fill the rest, then the target must equal the model byte for byte.
    for c in 0..CHUNKS {
        volume
            .fetch_run_from(ChunkIndex(c), 1, Class::Background)
            .await
            .unwrap();
    }
    assert!(volume.map().is_complete(), "seed {seed}: not complete");
    // `stream detach`: the target becomes shared while clients go on
    // writing (their in-place changes race the log's last rotation), and
    // every read still matches the model.
    let mut tasks = tokio::task::JoinSet::new();
    for id in 0..CLIENTS {
        let r = Rng(rng.next() | 1);
        tasks.spawn(client(world.clone(), r, id));
    }
    let yields = rng.below(64);
    let v = volume.clone();
    tasks.spawn(async move {
        for _ in 0..yields {
            tokio::task::yield_now().await;
        }
        v.prepare_detach()
            .await
            .map_err(|e| format!("prepare_detach: {e}"))
    });
    let all = async {
        while let Some(done) = tasks.join_next().await {
            done.expect("a client panicked")?;
        }
        Ok::<(), String>(())
    };
    match tokio::time::timeout(BOUND, all).await {
        Err(_) => panic!("seed {seed}: clients racing prepare_detach did not finish: stuck"),
        Ok(Err(e)) => panic!("seed {seed}: {e}"),
        Ok(Ok(())) => {}
    }
    assert!(volume.target_shared(), "seed {seed}: not shared");
    assert_eq!(volume.wal_len(), 0, "seed {seed}: logged after sharing");
    // The manifest, built from the hashes kept as chunks were fetched and
    // from what clients changed since, equals the model chunk for chunk.
    let m = lazy_fetch::manifest::write(&volume, &|_, _| {})
        .await
        .unwrap();
    let kept = m.chunk_hashes(&dir.path().join("state")).unwrap();
    let model = world.model.lock().unwrap().clone();
    let want: Vec<[u8; 32]> = model
        .chunks(CHUNK as usize)
        .map(|c| *blake3::hash(c).as_bytes())
        .collect();
    assert!(
        kept == want,
        "seed {seed}: the manifest differs from the model"
    );
    let prefetched = volume.status().chunks_prefetched;
    volume.close().await.unwrap();
    assert!(
        memory.durable_image() == model,
        "seed {seed}: the synced target differs from the model"
    );
    prefetched
}

fn seeds() -> u64 {
    std::env::var("STREAM_SCHEDULE_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(24)
}

#[test]
fn concurrent_clients_and_fetches_finish_and_match_the_model() {
    let mut prefetching = 0;
    for seed in 0..seeds() {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(4)
            .enable_all()
            .build()
            .unwrap();
        let prefetched = rt.block_on(run_seed(seed));
        rt.shutdown_timeout(Duration::from_secs(5));
        assert!(
            seed % 2 == 0 || prefetched == 0,
            "seed {seed}: prefetched {prefetched} chunks with prefetch off"
        );
        prefetching += u64::from(prefetched > 0);
    }
    // The race is there: prefetches ran in at least half of the schedules
    // that allow them.
    assert!(
        prefetching * 4 >= seeds(),
        "prefetches ran in {prefetching} of {} schedules",
        seeds()
    );
}
