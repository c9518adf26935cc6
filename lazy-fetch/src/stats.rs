//! Counters of a running volume, cheap enough to bump on every request.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// A latency histogram with power-of-two microsecond buckets.
#[derive(Debug)]
pub struct Histogram {
    buckets: [AtomicU64; 32],
    /// Sum of the recorded samples in microseconds (for a Prometheus `_sum`).
    sum_us: AtomicU64,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            buckets: std::array::from_fn(|_| AtomicU64::new(0)),
            sum_us: AtomicU64::new(0),
        }
    }
}

impl Histogram {
    pub fn record(&self, d: Duration) {
        // Saturates: u64 microseconds is 584,000 years.
        let us = u64::try_from(d.as_micros().max(1)).unwrap_or(u64::MAX);
        let b = (63 - us.leading_zeros()) as usize;
        self.buckets[b.min(31)].fetch_add(1, Ordering::Relaxed);
        self.sum_us.fetch_add(us, Ordering::Relaxed);
    }

    /// Per-bucket counts: bucket `i` holds samples below `2 << i`
    /// microseconds (and at least `1 << i`, but for bucket 0); the last
    /// bucket also holds everything longer.
    pub fn bucket_counts(&self) -> [u64; 32] {
        std::array::from_fn(|i| self.buckets[i].load(Ordering::Relaxed))
    }

    /// Sum of every recorded sample, in microseconds.
    pub fn sum_us(&self) -> u64 {
        self.sum_us.load(Ordering::Relaxed)
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
        #[expect(
            clippy::cast_possible_truncation,
            reason = "q is a quantile in [0, 1], so the rank is at most `total`; float `as` saturates"
        )]
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
    /// Seeded copies found equal to the source by their hash, made present
    /// without a fetch (`candidate`; also counted as hydrated or fetched
    /// on demand, whichever made them present).
    pub chunks_confirmed: AtomicU64,
    /// Chunks fetched around a miss (`volume/prefetch.rs`), in this run.
    pub chunks_prefetched: AtomicU64,
    /// Of those, the ones a client read since, in this run.
    pub prefetched_chunks_read: AtomicU64,
    /// Foreground fetches and their latency.
    pub foreground_fetch: Histogram,
    pub source_errors: AtomicU64,
    pub target_errors: AtomicU64,
    /// Bytes clients asked to write, trim or zero, in this run.
    pub bytes_written_by_clients: AtomicU64,
}

/// The cumulative counters, saved in the state directory (`stats.json`)
/// at every checkpoint and clean stop, so that the manifest's counts span
/// every run of a migration. Statistics only: a crash loses the increments
/// since the last save.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Totals {
    pub bytes_fetched: u64,
    pub chunks_fetched_on_demand: u64,
    pub chunks_hydrated: u64,
    pub chunks_source_holes: u64,
    pub chunks_found_zero: u64,
    #[serde(default)]
    pub chunks_confirmed: u64,
}

impl Stats {
    pub fn totals(&self) -> Totals {
        Totals {
            bytes_fetched: Self::get(&self.bytes_fetched),
            chunks_fetched_on_demand: Self::get(&self.chunks_fetched_on_demand),
            chunks_hydrated: Self::get(&self.chunks_hydrated),
            chunks_source_holes: Self::get(&self.chunks_source_holes),
            chunks_found_zero: Self::get(&self.chunks_found_zero),
            chunks_confirmed: Self::get(&self.chunks_confirmed),
        }
    }

    /// Start from the totals of earlier runs.
    pub fn resume(&self, t: &Totals) {
        Self::add(&self.bytes_fetched, t.bytes_fetched);
        Self::add(&self.chunks_fetched_on_demand, t.chunks_fetched_on_demand);
        Self::add(&self.chunks_hydrated, t.chunks_hydrated);
        Self::add(&self.chunks_source_holes, t.chunks_source_holes);
        Self::add(&self.chunks_found_zero, t.chunks_found_zero);
        Self::add(&self.chunks_confirmed, t.chunks_confirmed);
    }

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
        assert_eq!(h.bucket_counts().iter().sum::<u64>(), 100);
        assert_eq!(h.bucket_counts()[6], 99, "100 us lies in [64, 128)");
        assert_eq!(h.sum_us(), 99 * 100 + 50_000);
    }
}
