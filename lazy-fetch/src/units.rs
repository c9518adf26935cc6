//! Offsets, chunk indexes and the geometry that relates them.
//!
//! A volume is cut into chunks of one power-of-two size (the last chunk may
//! be short). [`ChunkIndex`] is a newtype so a byte offset can never be used
//! where a chunk number is meant; it has only the arithmetic that makes
//! sense (next), and the byte range of a chunk comes from
//! [`Geometry`], which knows the size of the last one.

use std::fmt;
use std::ops::Range;

/// The number of a chunk, from 0.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ChunkIndex(pub u64);

impl ChunkIndex {
    pub fn next(self) -> ChunkIndex {
        ChunkIndex(self.0 + 1)
    }
}

impl fmt::Display for ChunkIndex {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "#{}", self.0)
    }
}

/// Smallest and largest chunk sizes we accept.
pub const MIN_CHUNK: u64 = 4096;
pub const MAX_CHUNK: u64 = 16 << 20;
pub const DEFAULT_CHUNK: u64 = 64 * 1024;

/// A length or offset inside a buffer the engine holds in memory (a chunk
/// of at most [`MAX_CHUNK`] bytes, a run of at most twice
/// [`MAX_RUN`](crate::volume::MAX_RUN) chunks, one client request) as a
/// `usize`. Such a span fits by construction; the conversion is checked
/// anyway, so a broken bound panics here instead of truncating.
pub fn mem_len(n: u64) -> usize {
    usize::try_from(n).expect("a span of an in-memory buffer (chunk, run or request) fits usize")
}

/// Size of the volume and of its chunks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Geometry {
    size: u64,
    chunk_shift: u32,
}

impl Geometry {
    /// `chunk_size` must be a power of two within [`MIN_CHUNK`, `MAX_CHUNK`].
    pub fn new(size: u64, chunk_size: u64) -> Result<Geometry, String> {
        if !chunk_size.is_power_of_two() || !(MIN_CHUNK..=MAX_CHUNK).contains(&chunk_size) {
            return Err(format!(
                "chunk size {chunk_size} must be a power of two between {MIN_CHUNK} and {MAX_CHUNK}"
            ));
        }
        Ok(Geometry {
            size,
            chunk_shift: chunk_size.trailing_zeros(),
        })
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn chunk_size(&self) -> u64 {
        1 << self.chunk_shift
    }

    /// Number of chunks (the last one may be short).
    pub fn chunks(&self) -> u64 {
        self.size.div_ceil(self.chunk_size())
    }

    pub fn chunk_of(&self, offset: u64) -> ChunkIndex {
        ChunkIndex(offset >> self.chunk_shift)
    }

    /// Byte range of chunk `c`.
    pub fn bytes(&self, c: ChunkIndex) -> Range<u64> {
        let start = c.0 << self.chunk_shift;
        start..(start + self.chunk_size()).min(self.size)
    }

    /// Chunks touched by `[offset, offset + len)` (empty when `len` is 0).
    pub fn chunks_of(&self, offset: u64, len: u64) -> Range<u64> {
        if len == 0 {
            return 0..0;
        }
        let first = offset >> self.chunk_shift;
        let last = (offset + len - 1) >> self.chunk_shift;
        first..last + 1
    }

    /// Whether `[offset, offset + len)` covers chunk `c` entirely.
    pub fn covers(&self, c: ChunkIndex, offset: u64, len: u64) -> bool {
        let r = self.bytes(c);
        offset <= r.start && offset + len >= r.end
    }
}

/// Parse sizes such as `65536`, `64K`, `64KiB`, `1M`, `10G`, `100M/s`.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s
        .trim()
        .trim_end_matches("/s")
        .trim_end_matches('B')
        .trim_end_matches('i');
    let (num, mult) = match t.char_indices().find(|(_, ch)| !ch.is_ascii_digit()) {
        None => (t, 1u64),
        Some((i, _)) => {
            let mult = match t[i..].to_ascii_uppercase().as_str() {
                "K" => 1 << 10,
                "M" => 1 << 20,
                "G" => 1 << 30,
                "T" => 1 << 40,
                _ => return Err(format!("cannot parse size {s:?} (use e.g. 64K, 4M, 1G)")),
            };
            (&t[..i], mult)
        }
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("cannot parse size {s:?} (use e.g. 64K, 4M, 1G)"))?;
    n.checked_mul(mult)
        .ok_or_else(|| format!("size {s:?} is too large"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn last_chunk_is_short_and_ranges_are_clipped() {
        let g = Geometry::new(100_000, 65536).unwrap();
        assert_eq!(g.chunks(), 2);
        assert_eq!(g.bytes(ChunkIndex(1)), 65536..100_000);
        assert_eq!(g.chunks_of(65535, 2), 0..2);
        assert_eq!(g.chunks_of(0, 0), 0..0);
        assert!(g.covers(ChunkIndex(1), 65536, 100_000 - 65536));
        assert!(!g.covers(ChunkIndex(0), 1, 65535));
    }

    #[test]
    fn chunk_size_must_be_a_power_of_two_in_range() {
        assert!(Geometry::new(1, 3000).is_err());
        assert!(Geometry::new(1, 2048).is_err());
        assert!(Geometry::new(1, 1 << 30).is_err());
        assert!(Geometry::new(1, 1 << 20).is_ok());
    }

    #[test]
    fn sizes_parse_with_binary_suffixes() {
        assert_eq!(parse_size("64K"), Ok(65536));
        assert_eq!(parse_size("64KiB"), Ok(65536));
        assert_eq!(parse_size("100M/s"), Ok(100 << 20));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert!(parse_size("12Q").is_err());
        assert!(parse_size("").is_err());
    }
}
