//! What the tests of every crate share, so each does not carry its own
//! copy (issue 14). For now: seeded randomness. The harness for real
//! servers and clients still lives in `integration/` (its `src/`), and the
//! in-memory and fault-injecting sources and targets in the engine
//! (`lazy_fetch::source::memory`, `lazy_fetch::target::{memory, fault}`),
//! where the engine's own tests reach them.

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

    /// `n` random bytes.
    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
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
}
