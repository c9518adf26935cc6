//! Counters of a running volume, cheap enough to bump on every request.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// A latency histogram with power-of-two microsecond buckets.
#[derive(Debug)]
pub struct Histogram {
    buckets: [AtomicU64; 32],
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            buckets: std::array::from_fn(|_| AtomicU64::new(0)),
        }
    }
}

impl Histogram {
    pub fn record(&self, d: Duration) {
        let us = d.as_micros().max(1) as u64;
        let b = (63 - us.leading_zeros()) as usize;
        self.buckets[b.min(31)].fetch_add(1, Ordering::Relaxed);
    }

    pub fn count(&self) -> u64 {
        self.buckets.iter().map(|b| b.load(Ordering::Relaxed)).sum()
    }

    /// The `q` quantile (0..=1) in microseconds, as the upper bound of its
    /// bucket (so within a factor of two); `None` without samples.
    pub fn quantile_us(&self, q: f64) -> Option<u64> {
        let counts: Vec<u64> = self
            .buckets
            .iter()
            .map(|b| b.load(Ordering::Relaxed))
            .collect();
        let total: u64 = counts.iter().sum();
        if total == 0 {
            return None;
        }
        let rank = ((total as f64) * q).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (i, c) in counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return Some(2u64 << i);
            }
        }
        None
    }
}

#[derive(Debug, Default)]
pub struct Stats {
    /// Bytes read from the source (foreground, readahead and hydration).
    pub bytes_fetched: AtomicU64,
    /// Chunks fetched because a client needed them.
    pub chunks_fetched_on_demand: AtomicU64,
    /// Chunks made present by hydration or readahead.
    pub chunks_hydrated: AtomicU64,
    /// Chunks found to be holes in the source (never fetched).
    pub chunks_source_holes: AtomicU64,
    /// Chunks fetched and found all zero.
    pub chunks_found_zero: AtomicU64,
    /// Foreground fetches and their latency.
    pub foreground_fetch: Histogram,
    pub source_errors: AtomicU64,
    pub target_errors: AtomicU64,
}

impl Stats {
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_land_in_the_right_bucket() {
        let h = Histogram::default();
        for _ in 0..99 {
            h.record(Duration::from_micros(100));
        }
        h.record(Duration::from_millis(50));
        assert_eq!(h.quantile_us(0.5), Some(128));
        assert_eq!(h.quantile_us(0.99), Some(128));
        assert_eq!(h.quantile_us(1.0), Some(65536));
        assert_eq!(Histogram::default().quantile_us(0.5), None);
    }
}
