//! The file backend against a model: seeded random writes, trims and
//! write-zeroes (punched or not, FUA or not) from several tasks at once on
//! disjoint ranges, and after each round every byte read back (through the
//! pieces `read` returns) and every extent `block_status` calls zero agree
//! with the model. `STREAM_FILE_MODEL_SEEDS` sets how many seeds (default 8).

use std::sync::{Arc, Mutex};

use block_device::file::FileDevice;
use block_device::{BlockDevice, Piece, ZeroFlags};
use test_support::Rng;

const SIZE: u64 = 4 << 20;
const TASKS: u64 = 4;
const OPS: usize = 60;

async fn read_all(dev: &FileDevice, offset: u64, len: u64) -> Vec<u8> {
    let mut out = Vec::new();
    let len = u32::try_from(len).expect("the model's reads are below 4 GiB");
    for p in dev.read(offset, len).await.unwrap() {
        match p {
            Piece::Data(d) => out.extend_from_slice(&d),
            Piece::Zero(n) => out.resize(out.len() + usize::try_from(n).unwrap(), 0),
        }
    }
    out
}

/// One task's operations, inside its own quarter of the device.
async fn task(dev: Arc<FileDevice>, model: Arc<Mutex<Vec<u8>>>, mut rng: Rng, lane: u64) {
    let lane_len = SIZE / TASKS;
    for _ in 0..OPS {
        let len = 1 + rng.below(256 << 10);
        let start = lane * lane_len + rng.below(lane_len - len);
        let span = usize::try_from(start).unwrap()..usize::try_from(start + len).unwrap();
        match rng.below(4) {
            0 | 1 => {
                let data = rng.filled(span.len());
                dev.write(start, data.clone(), rng.below(2) == 0)
                    .await
                    .unwrap();
                model.lock().unwrap()[span].copy_from_slice(&data);
            }
            2 => {
                let flags = ZeroFlags {
                    may_trim: rng.below(2) == 0,
                    fast: false,
                    fua: rng.below(2) == 0,
                };
                dev.write_zeroes(start, len, flags).await.unwrap();
                model.lock().unwrap()[span].fill(0);
            }
            _ => {
                // A trim leaves the content undefined by NBD; the file
                // backend punches, so it reads as zeros.
                dev.trim(start, len, false).await.unwrap();
                model.lock().unwrap()[span].fill(0);
            }
        }
        if rng.below(8) == 0 {
            dev.flush().await.unwrap();
        }
    }
}

async fn run_seed(seed: u64) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("disk");
    let mut rng = Rng::new(seed);
    std::fs::write(&path, rng.filled(usize::try_from(SIZE).unwrap())).unwrap();
    let model = Arc::new(Mutex::new(std::fs::read(&path).unwrap()));
    let dev = Arc::new(FileDevice::open(&path, true).unwrap());
    let mut tasks = tokio::task::JoinSet::new();
    for lane in 0..TASKS {
        let r = Rng::new(rng.next());
        tasks.spawn(task(dev.clone(), model.clone(), r, lane));
    }
    while let Some(t) = tasks.join_next().await {
        t.unwrap();
    }
    let want = model.lock().unwrap().clone();
    let mut at = 0;
    while at < SIZE {
        let len = (1 + rng.below(1 << 20)).min(SIZE - at);
        let got = read_all(&dev, at, len).await;
        let (s, e) = (
            usize::try_from(at).unwrap(),
            usize::try_from(at + len).unwrap(),
        );
        assert!(
            got == want[s..e],
            "seed {seed}: bytes {at}+{len} differ from the model"
        );
        at += len;
    }
    // Every extent said to be zero is zero in the model.
    let mut at = 0;
    while at < SIZE {
        for ext in dev.block_status(at, SIZE - at).await.unwrap() {
            let (s, e) = (
                usize::try_from(at).unwrap(),
                usize::try_from(at + ext.length).unwrap(),
            );
            if ext.zero {
                assert!(
                    want[s..e].iter().all(|&b| b == 0),
                    "seed {seed}: extent {at}+{} is called zero but holds data",
                    ext.length
                );
            }
            at += ext.length;
        }
    }
    dev.flush().await.unwrap();
    assert!(
        std::fs::read(&path).unwrap() == want,
        "seed {seed}: the file differs"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_writes_zeroes_and_trims_match_a_model() {
    let seeds: u64 = std::env::var("STREAM_FILE_MODEL_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(8);
    for seed in 0..seeds {
        run_seed(seed).await;
    }
}
