//! Seeded randomness with no dependency: the same seed gives the same run
//! on any machine, so a failing seed in a message reproduces the failure.

/// xorshift64*: deterministic and seedable, with no dependency, so a
/// failing seed reproduces the same run anywhere.
#[derive(Clone, Debug)]
pub struct Rng(pub u64);

impl Rng {
    /// A generator from `seed` (any value; zero is made odd).
    pub fn new(seed: u64) -> Rng {
        Rng(seed | 1)
    }

    #[allow(clippy::should_implement_trait)]
    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// A number in `0..n` (0 when `n` is 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    /// `n` random bytes, one per draw (its low byte).
    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next().to_le_bytes()[0]).collect()
    }

    /// Fills `buf` eight bytes per draw (little-endian words; a short tail
    /// takes the first bytes of one more word): fast enough for files of
    /// gigabytes.
    pub fn fill(&mut self, buf: &mut [u8]) {
        let mut words = buf.chunks_exact_mut(8);
        for word in &mut words {
            word.copy_from_slice(&self.next().to_le_bytes());
        }
        let tail = words.into_remainder();
        let n = tail.len();
        if n > 0 {
            tail.copy_from_slice(&self.next().to_le_bytes()[..n]);
        }
    }

    /// `len` bytes from [`Rng::fill`].
    pub fn filled(&mut self, len: usize) -> Vec<u8> {
        let mut v = vec![0; len];
        self.fill(&mut v);
        v
    }
}

/// splitmix64: a well-mixed function of one word, for streams addressed by
/// position (word `i` of seed `s` is `splitmix64(s ^ f(i))`), so any
/// sub-range can be regenerated on its own without running a generator
/// from the start.
pub fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_seed_gives_the_same_run_and_below_stays_below() {
        let (mut a, mut b) = (Rng::new(7), Rng::new(7));
        assert_eq!(a.bytes(64), b.bytes(64));
        assert!((0..1000).all(|_| a.below(10) < 10));
        assert_eq!(a.below(0), 0);
    }

    #[test]
    fn fill_is_whole_words_then_the_head_of_one_more() {
        let mut words = Rng::new(3);
        let want: Vec<u8> = (0..3).flat_map(|_| words.next().to_le_bytes()).collect();
        assert_eq!(Rng::new(3).filled(21), want[..21]);
    }
}
