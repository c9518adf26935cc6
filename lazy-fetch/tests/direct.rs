//! Hydration writes around the page cache (`target/direct.rs`), while what
//! a client fetched stays in it: seen from the kernel with `mincore` on
//! the target file after a full hydration.

#![allow(
    clippy::cast_possible_truncation,
    reason = "test fixtures: small disks"
)]

mod common;

use std::io::Write;

use block_device::flatten;
use lazy_fetch::source::file::FileSource;
use lazy_fetch::{OpenOptions, Volume};
use test_support::Rng;

const CHUNK: u64 = 64 << 10;
const SIZE: u64 = 32 << 20;

/// Fraction of the pages of `[offset, offset + len)` of `path` in the page cache.
fn resident(path: &std::path::Path, offset: u64, len: u64) -> f64 {
    use std::os::fd::AsRawFd;
    let f = std::fs::File::open(path).unwrap();
    let page = 4096usize;
    // SAFETY: a read-only shared mapping of a file we keep open; only
    // mincore looks at it.
    let map = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len as usize,
            libc::PROT_READ,
            libc::MAP_SHARED,
            f.as_raw_fd(),
            offset as libc::off_t,
        )
    };
    assert_ne!(map, libc::MAP_FAILED, "mmap of the target");
    let mut vec = vec![0u8; len as usize / page];
    // SAFETY: `vec` has one byte per page of the mapping.
    let r = unsafe { libc::mincore(map, len as usize, vec.as_mut_ptr()) };
    assert_eq!(r, 0, "mincore: {}", std::io::Error::last_os_error());
    // SAFETY: unmapping what we mapped.
    unsafe { libc::munmap(map, len as usize) };
    vec.iter().filter(|&&b| b & 1 != 0).count() as f64 / vec.len() as f64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hydration_bypasses_the_page_cache_and_client_fetches_do_not() {
    // On the build's disk, not /tmp: tmpfs takes O_DIRECT (Linux 6.6+) but is
    // the page cache itself, so nothing there could be seen bypassing it.
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let mut data = vec![0u8; SIZE as usize];
    let mut rng = Rng::new(19);
    for b in data.chunks_mut(8) {
        b.copy_from_slice(&rng.next().to_le_bytes()[..b.len()]);
    }
    std::fs::File::create(dir.path().join("src"))
        .unwrap()
        .write_all(&data)
        .unwrap();
    let target = dir.path().join("tgt");
    let v = Volume::open(
        FileSource::open(&dir.path().join("src")).unwrap(),
        &OpenOptions {
            target: target.clone(),
            state_dir: dir.path().join("state"),
            chunk_size: Some(CHUNK),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    // A client reads chunk 3 first (a foreground fetch).
    let got = flatten(v.read(3 * CHUNK, CHUNK).await.unwrap());
    assert_eq!(got, data[3 * CHUNK as usize..4 * CHUNK as usize]);
    common::hydrate_all(&v).await;
    let client = resident(&target, 3 * CHUNK, CHUNK);
    let rest = resident(&target, 8 * CHUNK, SIZE - 8 * CHUNK);
    assert!(
        client == 1.0,
        "the chunk a client fetched should stay in the page cache: {:.0}% resident",
        100.0 * client
    );
    assert!(
        rest < 0.1,
        "hydration wrote through the page cache ({:.0}% of the hydrated pages resident); \
         does the file system of {} refuse O_DIRECT, or keep everything in memory (tmpfs)?",
        100.0 * rest,
        dir.path().display()
    );
    let back = std::fs::read(&target).unwrap();
    assert!(
        back == data,
        "the target differs from the source after hydration"
    );
}
