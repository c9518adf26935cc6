//! Disk images with a known layout, and content comparisons.
//!
//! A [`SparseImage`] is a file of `size` bytes in which each [`Region`]
//! holds deterministic pseudo-random bytes and everything else is a hole
//! (never written, so `SEEK_HOLE` and block status see it). The expected
//! content is always reproducible from the layout alone, so tests compare
//! what a client read against [`SparseImage::expected`] rather than against
//! another read of the same file.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

pub const KIB: u64 = 1024;
pub const MIB: u64 = 1024 * KIB;

/// A data region of an image: `len` bytes at `offset`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Region {
    pub offset: u64,
    pub len: u64,
}

impl Region {
    pub const fn new(offset: u64, len: u64) -> Self {
        Region { offset, len }
    }

    pub const fn end(&self) -> u64 {
        self.offset + self.len
    }
}

/// A sparse image on disk and the layout that made it.
#[derive(Clone, Debug)]
pub struct SparseImage {
    pub path: PathBuf,
    pub size: u64,
    pub data: Vec<Region>,
    pub seed: u64,
}

impl SparseImage {
    /// Creates `path` with `size` bytes, pseudo-random bytes (from `seed`)
    /// in each of `data` (sorted, not overlapping) and holes elsewhere.
    pub fn create(path: impl Into<PathBuf>, size: u64, data: &[Region], seed: u64) -> Self {
        let path = path.into();
        let mut sorted = data.to_vec();
        sorted.sort_by_key(|r| r.offset);
        for pair in sorted.windows(2) {
            assert!(pair[0].end() <= pair[1].offset, "regions overlap: {pair:?}");
        }
        if let Some(last) = sorted.last() {
            assert!(last.end() <= size, "region {last:?} past size {size}");
        }
        let file = File::create(&path).unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
        file.set_len(size).expect("set_len");
        let image = SparseImage {
            path,
            size,
            data: sorted,
            seed,
        };
        for region in &image.data {
            let bytes = pattern(image.seed, region.offset, region.len as usize);
            file.write_all_at(&bytes, region.offset)
                .expect("write region");
        }
        file.sync_all().expect("sync image");
        image
    }

    /// The standard 8 MiB test disk: data, hole, data, long hole, short
    /// data, trailing hole; every boundary 1 MiB- or 512 KiB-aligned so any
    /// filesystem's hole granularity sees the same layout.
    pub fn standard(dir: &Path) -> Self {
        SparseImage::create(
            dir.join("disk.img"),
            8 * MIB,
            &[
                Region::new(0, MIB),
                Region::new(2 * MIB, MIB),
                Region::new(6 * MIB, 512 * KIB),
            ],
            0x5eed,
        )
    }

    /// The holes of the layout: the complement of `data` in `0..size`.
    pub fn holes(&self) -> Vec<Region> {
        let mut holes = Vec::new();
        let mut at = 0;
        for r in &self.data {
            if r.offset > at {
                holes.push(Region::new(at, r.offset - at));
            }
            at = r.end();
        }
        if at < self.size {
            holes.push(Region::new(at, self.size - at));
        }
        holes
    }

    /// The bytes the image holds in `offset..offset + len`, from the layout.
    pub fn expected(&self, offset: u64, len: usize) -> Vec<u8> {
        let mut out = vec![0; len];
        let end = offset + len as u64;
        for r in &self.data {
            let lo = r.offset.max(offset);
            let hi = r.end().min(end);
            if lo < hi {
                let bytes = pattern(self.seed, lo, (hi - lo) as usize);
                out[(lo - offset) as usize..(hi - offset) as usize].copy_from_slice(&bytes);
            }
        }
        out
    }

    /// The whole expected content.
    pub fn expected_all(&self) -> Vec<u8> {
        self.expected(0, self.size as usize)
    }
}

/// Deterministic pseudo-random bytes: byte `i` of the result is the byte
/// at absolute offset `offset + i` of the stream keyed by `seed`, so any
/// sub-range can be regenerated on its own. Each 8-byte word is
/// splitmix64 of (seed, word index).
pub fn pattern(seed: u64, offset: u64, len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len);
    let mut pos = offset;
    while out.len() < len {
        let word =
            test_support::rng::splitmix64(seed ^ (pos / 8).wrapping_mul(0x9e37_79b9_7f4a_7c15));
        let bytes = word.to_le_bytes();
        let skip = (pos % 8) as usize;
        let take = (8 - skip).min(len - out.len());
        out.extend_from_slice(&bytes[skip..skip + take]);
        pos += take as u64;
    }
    out
}

/// A file of `size` bytes of pattern from `seed` (fully allocated).
pub fn dense_file(path: &Path, size: u64, seed: u64) -> Vec<u8> {
    let bytes = pattern(seed, 0, size as usize);
    let mut f = File::create(path).unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
    f.write_all(&bytes).expect("write dense file");
    f.sync_all().expect("sync dense file");
    bytes
}

/// The whole content of a file.
pub fn read_file(path: &Path) -> Vec<u8> {
    let mut buf = Vec::new();
    File::open(path)
        .and_then(|mut f| f.read_to_end(&mut buf))
        .unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    buf
}

/// `len` bytes of a file at `offset`.
pub fn read_at(path: &Path, offset: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0; len];
    OpenOptions::new()
        .read(true)
        .open(path)
        .and_then(|f| f.read_exact_at(&mut buf, offset))
        .unwrap_or_else(|e| panic!("read {} at {offset}: {e}", path.display()));
    buf
}

/// blake3 of a file's content, hex.
pub fn file_hash(path: &Path) -> String {
    let mut hasher = blake3::Hasher::new();
    let mut f = File::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    let mut buf = vec![0; 1 << 20];
    loop {
        let n = f.read(&mut buf).expect("read for hash");
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    hasher.finalize().to_hex().to_string()
}

/// blake3 of bytes, hex.
pub fn bytes_hash(bytes: &[u8]) -> String {
    blake3::hash(bytes).to_hex().to_string()
}

/// Asserts `actual == expected`, reporting the first differing offset
/// (relative to `base`) instead of dumping megabytes.
pub fn assert_same_bytes(actual: &[u8], expected: &[u8], base: u64, what: &str) {
    if actual == expected {
        return;
    }
    assert_eq!(
        actual.len(),
        expected.len(),
        "{what}: length {} where {} was expected",
        actual.len(),
        expected.len()
    );
    let first = actual
        .iter()
        .zip(expected)
        .position(|(a, b)| a != b)
        .expect("lengths equal and contents differ");
    let end = (first + 16).min(actual.len());
    panic!(
        "{what}: first difference at offset {}: got {:02x?}, expected {:02x?}",
        base + first as u64,
        &actual[first..end],
        &expected[first..end]
    );
}

/// Asserts two files have the same content.
pub fn assert_same_file(actual: &Path, expected: &Path) {
    let a = read_file(actual);
    let b = read_file(expected);
    assert_same_bytes(
        &a,
        &b,
        0,
        &format!("{} vs {}", actual.display(), expected.display()),
    );
}

/// A file of `mib` MiB where no byte is zero (so no chunk is found all
/// zero), written quickly: one MiB of a short pattern, repeated. The
/// content at byte `b` is `((b % MIB) % 251) | 1`.
pub fn repeating_file(path: &Path, mib: u64) {
    let mut block = vec![0u8; MIB as usize];
    for (i, b) in block.iter_mut().enumerate() {
        *b = (i % 251) as u8 | 1;
    }
    let mut f = std::io::BufWriter::new(
        File::create(path).unwrap_or_else(|e| panic!("create {}: {e}", path.display())),
    );
    for _ in 0..mib {
        f.write_all(&block).expect("write repeating file");
    }
    f.flush().expect("flush repeating file");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pattern_subranges_match_the_whole() {
        let whole = pattern(7, 0, 100);
        assert_eq!(pattern(7, 13, 50), whole[13..63].to_vec());
        assert_ne!(pattern(8, 0, 100), whole);
    }

    #[test]
    fn standard_image_has_its_layout_on_disk() {
        let dir = tempfile::tempdir().unwrap();
        let img = SparseImage::standard(dir.path());
        assert_eq!(read_file(&img.path), img.expected_all());
        assert_eq!(img.holes().len(), 3);
        assert_eq!(img.expected(MIB, 16), vec![0; 16]);
    }
}
