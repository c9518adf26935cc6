//! `stream`'s global allocator (`target/alloc.rs`): large buffers start on
//! a 4 KiB boundary, everything else behaves as the system allocator, and
//! freeing and reallocating large aligned blocks reuses memory instead of
//! mapping fresh pages each time.

#![allow(
    clippy::cast_possible_truncation,
    reason = "test patterns: counters taken as bytes"
)]

use lazy_fetch::target::alloc::{BOUNDARY, BlockAligned, LARGE};

#[global_allocator]
static ALLOC: BlockAligned = BlockAligned;

/// Minor faults of the calling thread (the tests of this file run in
/// parallel; the process's count would include theirs).
fn minor_faults() -> i64 {
    // SAFETY: a plain C struct of integers, all-zero is valid; getrusage
    // fills it.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    assert_eq!(unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut u) }, 0);
    u.ru_minflt
}

#[test]
fn large_buffers_start_on_the_boundary_and_keep_their_bytes() {
    for len in [LARGE, 64 << 10, 1 << 20, 3 << 20, 40 << 20] {
        let v: Vec<u8> = Vec::with_capacity(len);
        assert_eq!(v.as_ptr().align_offset(BOUNDARY), 0, "{len} bytes");
    }
    // Zeroed ones read as zeros, also when the block is a reused one that
    // held other bytes.
    for _ in 0..3 {
        let dirty = vec![0xa5u8; 2 << 20];
        drop(std::hint::black_box(dirty));
        let z = vec![0u8; 2 << 20];
        assert!(z.iter().all(|&b| b == 0));
    }
    // Growth keeps the contents, across the large size in both directions.
    let mut v: Vec<u8> = (0..1000u32).map(|i| i as u8).collect();
    v.extend((0..(3 << 20)).map(|i: u32| (i % 251) as u8));
    assert_eq!(
        &v[..1000],
        &(0..1000u32).map(|i| i as u8).collect::<Vec<_>>()[..]
    );
    assert_eq!(v[1000 + 300], (300 % 251) as u8);
    v.truncate(100);
    v.shrink_to_fit();
    assert_eq!(v, (0..100u32).map(|i| i as u8).collect::<Vec<_>>());
    // Alignments above malloc's.
    #[repr(align(64))]
    struct Line([u8; 64]);
    let b = Box::new(Line([7; 64]));
    assert_eq!((&raw const *b).align_offset(64), 0);
    assert_eq!(b.0[63], 7);
}

#[test]
fn large_aligned_blocks_are_reused_not_mapped_afresh() {
    // Fill the table of kept blocks with small ones first: they must make
    // room for the runs, not turn them away.
    let small: Vec<Vec<u8>> = (0..64).map(|_| vec![1u8; LARGE]).collect();
    drop(small);
    // As hydration does: fill a 1 MiB run, drop it, take the next. A
    // fresh mapping each time would be 256 faults per block, 65 536 here.
    let before = minor_faults();
    for i in 0..256u32 {
        let mut v: Vec<u8> = Vec::with_capacity(1 << 20);
        v.resize(1 << 20, i as u8);
        assert_eq!(v.as_ptr().align_offset(BOUNDARY), 0);
        std::hint::black_box(&v);
    }
    let faults = minor_faults() - before;
    assert!(
        faults < 4096,
        "{faults} minor faults for 256 blocks of 1 MiB: large blocks are mapped afresh"
    );
}

#[test]
fn threads_never_share_a_block() {
    // Blocks of several classes taken, filled, checked and freed by four
    // threads at once: a block handed out twice, or kept while in use,
    // shows as another thread's bytes.
    std::thread::scope(|s| {
        for t in 0..4u8 {
            s.spawn(move || {
                let mut held: Vec<Vec<u8>> = Vec::new();
                for i in 0..400usize {
                    let len = LARGE << (i % 5);
                    let tag = t.wrapping_mul(64).wrapping_add(i as u8);
                    held.push(vec![tag; len]);
                    if held.len() > 6 {
                        let v = held.remove(i % held.len());
                        let first = v[0];
                        assert!(v.iter().all(|&b| b == first), "a block changed under us");
                    }
                }
                for v in held {
                    assert!(v.iter().all(|&b| b == v[0]));
                }
            });
        }
    });
}
