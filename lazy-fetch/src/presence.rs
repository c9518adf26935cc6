//! The presence map: what the target holds for each chunk.
//!
//! Three bitmaps of one bit per chunk, `Vec<AtomicU64>` each (style: vm-memory's
//! atomic bitmap):
//!
//! | present | zero | meaning                                               |
//! |---------|------|-------------------------------------------------------|
//! | 0       | -    | absent: the target's bytes mean nothing; fetch first  |
//! | 1       | 0    | the target holds the chunk's data                     |
//! | 1       | 1    | the chunk reads as zeros and the target holds zeros   |
//!
//! `written` is set once a client has written the chunk (write, trim or
//! write-zeroes): such a chunk is the instance's own and is never compared
//! with, or refilled from, the source.
//!
//! A chunk goes back to absent only through `forget` (a seeded migration,
//! before serving). Bits are only set by the volume while
//! it holds the chunk's single-flight lock, *after* the target write they
//! describe has completed (so an fsync issued after reading a bit covers the
//! data; see `state` for the order and `volume/persist.rs` for the flush). Readers load with `Acquire` and writers store with
//! `Release`, pairing the bit with the target write that preceded it.
//! Counters are kept beside the bits so progress is O(1).

use std::sync::atomic::{AtomicU64, Ordering};

use crate::units::ChunkIndex;

/// One bit per chunk.
#[derive(Debug)]
pub struct Bitmap {
    words: Vec<AtomicU64>,
    len: u64,
}

impl Bitmap {
    pub fn new(len: u64) -> Bitmap {
        let words = (0..len.div_ceil(64)).map(|_| AtomicU64::new(0)).collect();
        Bitmap { words, len }
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn get(&self, i: u64) -> bool {
        debug_assert!(i < self.len);
        self.words[(i / 64) as usize].load(Ordering::Acquire) & (1 << (i % 64)) != 0
    }

    /// Set bit `i`; returns whether it was clear before.
    pub fn set(&self, i: u64) -> bool {
        let mask = 1 << (i % 64);
        self.words[(i / 64) as usize].fetch_or(mask, Ordering::Release) & mask == 0
    }

    /// Clear bit `i`; returns whether it was set before.
    pub fn clear(&self, i: u64) -> bool {
        let mask = 1 << (i % 64);
        self.words[(i / 64) as usize].fetch_and(!mask, Ordering::Release) & mask != 0
    }

    pub fn count_ones(&self) -> u64 {
        self.words
            .iter()
            .map(|w| u64::from(w.load(Ordering::Relaxed).count_ones()))
            .sum()
    }

    /// First clear bit at or after `from`, if any.
    pub fn next_clear(&self, from: u64) -> Option<u64> {
        self.next_where(from, true)
    }

    /// The first set bit at or after `from`, a word at a time.
    pub fn next_set(&self, from: u64) -> Option<u64> {
        self.next_where(from, false)
    }

    fn next_where(&self, from: u64, clear: bool) -> Option<u64> {
        let mut i = from;
        while i < self.len {
            let w = self.words[(i / 64) as usize].load(Ordering::Acquire);
            let shifted = if clear { !w } else { w } >> (i % 64);
            if shifted == 0 {
                i = (i / 64 + 1) * 64;
                continue;
            }
            let found = i + u64::from(shifted.trailing_zeros());
            return (found < self.len).then_some(found);
        }
        None
    }

    /// The words as little-endian bytes (persistence).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.words.len() * 8);
        for w in &self.words {
            out.extend_from_slice(&w.load(Ordering::Acquire).to_le_bytes());
        }
        out
    }

    /// Rebuild from [`Bitmap::to_bytes`]; `None` if the length is wrong or
    /// bits past `len` are set (a sign of a map from another geometry).
    pub fn from_bytes(len: u64, bytes: &[u8]) -> Option<Bitmap> {
        // `len` comes from a state file: too large for memory is wrong too.
        let words = usize::try_from(len.div_ceil(64)).ok()?;
        if bytes.len() != words * 8 {
            return None;
        }
        let b = Bitmap::new(len);
        for (i, chunk) in bytes.chunks_exact(8).enumerate() {
            let v = u64::from_le_bytes(chunk.try_into().expect("8 bytes"));
            b.words[i].store(v, Ordering::Relaxed);
        }
        let tail = len % 64;
        if tail != 0 && words > 0 && b.words[words - 1].load(Ordering::Relaxed) >> tail != 0 {
            return None;
        }
        Some(b)
    }
}

/// The state of one chunk as the volume sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChunkState {
    Absent,
    Data,
    Zero,
}

/// The three bitmaps of a volume.
#[derive(Debug)]
pub struct PresenceMap {
    present: Bitmap,
    zero: Bitmap,
    written: Bitmap,
    present_count: AtomicU64,
}

impl PresenceMap {
    pub fn new(chunks: u64) -> PresenceMap {
        PresenceMap {
            present: Bitmap::new(chunks),
            zero: Bitmap::new(chunks),
            written: Bitmap::new(chunks),
            present_count: AtomicU64::new(0),
        }
    }

    pub fn from_parts(present: Bitmap, zero: Bitmap, written: Bitmap) -> PresenceMap {
        let count = present.count_ones();
        PresenceMap {
            present,
            zero,
            written,
            present_count: AtomicU64::new(count),
        }
    }

    pub fn chunks(&self) -> u64 {
        self.present.len()
    }

    pub fn state(&self, c: ChunkIndex) -> ChunkState {
        if !self.present.get(c.0) {
            ChunkState::Absent
        } else if self.zero.get(c.0) {
            ChunkState::Zero
        } else {
            ChunkState::Data
        }
    }

    pub fn is_present(&self, c: ChunkIndex) -> bool {
        self.present.get(c.0)
    }

    pub fn is_written(&self, c: ChunkIndex) -> bool {
        self.written.get(c.0)
    }

    /// Record that chunk `c` now holds `state` (never `Absent`). Set the
    /// zero bit before the present bit when becoming zero, and clear it
    /// before when becoming data, so a reader that sees "present" never sees
    /// a stale zero flag.
    pub fn set(&self, c: ChunkIndex, state: ChunkState, written: bool) {
        match state {
            ChunkState::Absent => panic!("a chunk never goes back to absent"),
            ChunkState::Zero => {
                self.zero.set(c.0);
            }
            ChunkState::Data => {
                self.zero.clear(c.0);
            }
        }
        if written {
            self.written.set(c.0);
        }
        if self.present.set(c.0) {
            self.present_count.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Make chunk `c` absent again: only for a seeded migration's delta or
    /// cutover, before anything serves or fetches
    /// (`Volume::forget_changed`, `Volume::make_candidates`), and
    /// never for a chunk a client wrote (its write would be lost). Returns
    /// whether it was present.
    pub(crate) fn forget(&self, c: ChunkIndex) -> bool {
        debug_assert!(!self.written.get(c.0), "a written chunk is never forgotten");
        let was = self.present.clear(c.0);
        self.zero.clear(c.0);
        if was {
            self.present_count.fetch_sub(1, Ordering::Relaxed);
        }
        was
    }

    /// Chunks present (data or zero).
    pub fn present_count(&self) -> u64 {
        self.present_count.load(Ordering::Relaxed)
    }

    pub fn written_count(&self) -> u64 {
        self.written.count_ones()
    }

    pub fn zero_count(&self) -> u64 {
        // Zero bits are only meaningful on present chunks, and only ever set
        // together with present.
        self.zero.count_ones()
    }

    /// Every chunk is present: hydration is complete.
    pub fn is_complete(&self) -> bool {
        self.present_count() == self.chunks()
    }

    /// First absent chunk at or after `from`.
    pub fn next_absent(&self, from: u64) -> Option<ChunkIndex> {
        self.present.next_clear(from).map(ChunkIndex)
    }

    pub fn bitmaps(&self) -> [&Bitmap; 3] {
        [&self.present, &self.zero, &self.written]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn next_clear_skips_full_words_and_stops_at_len() {
        let b = Bitmap::new(130);
        for i in 0..129 {
            b.set(i);
        }
        assert_eq!(b.next_clear(0), Some(129));
        b.set(129);
        assert_eq!(b.next_clear(0), None);
        b.clear(64);
        assert_eq!(b.next_clear(3), Some(64));
    }

    #[test]
    fn next_set_skips_empty_words_and_stops_at_len() {
        let b = Bitmap::new(200);
        assert_eq!(b.next_set(0), None);
        b.set(130);
        b.set(199);
        assert_eq!(b.next_set(0), Some(130));
        assert_eq!(b.next_set(131), Some(199));
        assert_eq!(b.next_set(200), None);
    }

    #[test]
    fn bitmap_bytes_round_trip_and_reject_stray_tail_bits() {
        let b = Bitmap::new(70);
        b.set(0);
        b.set(69);
        let bytes = b.to_bytes();
        let back = Bitmap::from_bytes(70, &bytes).unwrap();
        assert!(back.get(0) && back.get(69) && !back.get(1));
        assert!(Bitmap::from_bytes(69, &bytes).is_none());
        assert!(Bitmap::from_bytes(200, &bytes).is_none());
    }

    #[test]
    fn states_move_from_absent_to_data_or_zero_and_count_once() {
        let m = PresenceMap::new(4);
        assert_eq!(m.state(ChunkIndex(1)), ChunkState::Absent);
        m.set(ChunkIndex(1), ChunkState::Zero, false);
        assert_eq!(m.state(ChunkIndex(1)), ChunkState::Zero);
        m.set(ChunkIndex(1), ChunkState::Data, true);
        assert_eq!(m.state(ChunkIndex(1)), ChunkState::Data);
        assert!(m.is_written(ChunkIndex(1)));
        assert_eq!(m.present_count(), 1);
        for i in 0..4 {
            m.set(ChunkIndex(i), ChunkState::Data, false);
        }
        assert!(m.is_complete());
        assert_eq!(m.next_absent(0), None);
    }
}
