//! A cold read of a whole chunk is answered from the source's bytes before
//! the chunk is stored, and the store still comes before anything else
//! touches the chunk: seen with a target whose writes wait at a gate.

#![allow(
    clippy::cast_possible_truncation,
    reason = "test fixtures: offsets of a small in-memory disk, byte patterns"
)]

use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use block_device::flatten;
use lazy_fetch::source::memory::MemorySource;
use lazy_fetch::target::memory::MemoryBackend;
use lazy_fetch::target::{Backend, Target};
use lazy_fetch::{OpenOptions, Volume};

const CHUNK: u64 = 64 << 10;
const SIZE: u64 = 8 * CHUNK;
const BOUND: Duration = Duration::from_secs(20);

/// Writes wait until the gate opens; `started` counts those that arrived.
#[derive(Debug)]
struct Gated {
    inner: MemoryBackend,
    open: Mutex<bool>,
    opened: Condvar,
    started: AtomicUsize,
}

impl Gated {
    fn open_gate(&self) {
        *self.open.lock().unwrap() = true;
        self.opened.notify_all();
    }
}

impl Backend for Gated {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, data: &[u8], offset: u64) -> io::Result<()> {
        self.started.fetch_add(1, Ordering::SeqCst);
        let mut open = self.open.lock().unwrap();
        while !*open {
            open = self.opened.wait(open).unwrap();
        }
        drop(open);
        self.inner.write_at(data, offset)
    }
    fn zero(&self, offset: u64, len: u64, allocate: bool) -> io::Result<()> {
        self.inner.zero(offset, len, allocate)
    }
    fn sync(&self) -> io::Result<()> {
        self.inner.sync()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_whole_chunk_is_answered_before_it_is_stored_and_stored_before_a_write() {
    let data: Vec<u8> = (0..SIZE).map(|i| (i * 7 % 251) as u8 | 1).collect();
    let dir = tempfile::tempdir().unwrap();
    let gated = Arc::new(Gated {
        inner: MemoryBackend::new(SIZE),
        open: Mutex::new(false),
        opened: Condvar::new(),
        started: AtomicUsize::new(0),
    });
    let target = Target::with_backend(gated.clone(), dir.path().join("gated"), SIZE, false);
    let v = Volume::open(
        MemorySource::new(data.clone(), Vec::new()),
        &OpenOptions {
            target: dir.path().join("gated"),
            state_dir: dir.path().join("state"),
            chunk_size: Some(CHUNK),
            target_device: Some(target),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let before = gated.started.load(Ordering::SeqCst);
    // The read comes back while its chunk's write waits at the gate.
    let Ok(got) = tokio::time::timeout(BOUND, v.read(2 * CHUNK, CHUNK)).await else {
        // Let the held write go, or the runtime waits for it forever.
        gated.open_gate();
        panic!("a whole-chunk read waited for its target write");
    };
    let got = got.unwrap();
    assert_eq!(flatten(got), data[2 * CHUNK as usize..3 * CHUNK as usize]);
    // A client write to the same chunk waits for the store (the lock).
    let writer = tokio::spawn({
        let v = v.clone();
        async move { v.write(2 * CHUNK + 10, vec![9; 5], false).await }
    });
    // The store is the one write at the gate: the answer came first.
    tokio::time::timeout(BOUND, async {
        while gated.started.load(Ordering::SeqCst) == before {
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("the chunk was never stored");
    gated.open_gate();
    tokio::time::timeout(BOUND, writer)
        .await
        .expect("the client write never finished")
        .unwrap()
        .unwrap();
    let mut want = data[2 * CHUNK as usize..3 * CHUNK as usize].to_vec();
    want[10..15].fill(9);
    let got = flatten(v.read(2 * CHUNK, CHUNK).await.unwrap());
    assert!(
        got == want,
        "the chunk lost the client's write or the source's bytes"
    );
    let mut stored = vec![0u8; CHUNK as usize];
    gated.inner.read_at(&mut stored, 2 * CHUNK).unwrap();
    assert!(stored == want, "the target does not hold what was served");
}
