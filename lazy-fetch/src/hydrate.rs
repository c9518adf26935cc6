//! The background pass: fetch every absent chunk until the volume is whole.
//!
//! It walks the map from a cursor, asks the source for its holes a window
//! ahead (those chunks become zero chunks without a fetch), and fetches runs
//! of contiguous absent chunks (see `idle_run`) with one source read, with
//! a few runs in flight. It never waits on a chunk someone else holds: it
//! skips it and comes back on the next lap.
//!
//! Scheduling (invariant 7): hydration reads use [`Class::Background`];
//! while clients are busy (a fetch for them in flight, or any request of
//! theirs in the last 20 ms) it drops to one short run at a time
//! (`FOREGROUND_RUN` chunks) and gives them a head start (a bounded
//! wait, so it cannot starve); the
//! `--rate-limit` is a token bucket on the bytes it fetches. When the source
//! or the target fails (the source is gone, the target is full) it backs
//! off (1 s doubling to 30 s) and tries again, so a lost source or a full
//! target pauses hydration without stopping the server. The runs in flight
//! when the fault struck fail together: one pause covers them all, so a
//! pause ends after the backoff, not after the sum of the backoffs of every
//! run that was in flight (8 runs: 1 + 2 + ... + 30 s, which held hydration
//! for 90 s after a full target had been given room).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::task::JoinSet;

use crate::source::{Class, Source};
use crate::volume::{Keep, MAX_RUN, Volume};

#[derive(Clone, Debug)]
pub struct Options {
    /// Bytes per second, 0 for unlimited. Shared so it can change while
    /// hydration runs (`stream finalize` lifts it).
    pub rate_limit: Arc<AtomicU64>,
    /// Runs in flight when there is no foreground load.
    pub workers: usize,
    /// Hydrate at all (`--no-hydrate` starts with this off; finalize turns
    /// it on).
    pub enabled: Arc<AtomicBool>,
}

impl Options {
    pub fn limited(bytes_per_sec: Option<u64>) -> Options {
        Options {
            rate_limit: Arc::new(AtomicU64::new(bytes_per_sec.unwrap_or(0))),
            ..Default::default()
        }
    }
}

impl Default for Options {
    fn default() -> Self {
        Options {
            rate_limit: Arc::new(AtomicU64::new(0)),
            workers: 8,
            enabled: Arc::new(AtomicBool::new(true)),
        }
    }
}

/// A client request within this window counts as foreground load.
const FOREGROUND_WINDOW: Duration = Duration::from_millis(20);

/// Chunks per run while clients are busy: a shorter burst at the source
/// and on the CPU for their reads to wait behind.
const FOREGROUND_RUN: usize = 4;

/// Bytes per run while clients are idle: one source read and one direct
/// write each. 2 MiB rather than 1 (16 chunks of the default size): the
/// target's direct writes are most of a run's time, and the device takes
/// larger writes faster (1 GiB at 0 ms, 4 rounds alternated: 0.70-0.80 s
/// against 0.81-0.94 s; 4 MiB runs were slower again, 0.80-0.86 s, and
/// held 45 MiB).
const RUN_BYTES: u64 = 2 << 20;

/// Chunks per run while clients are idle: [`RUN_BYTES`] of them, and no
/// more than one second of the `--rate-limit` (`rate` bytes/s, 0 for none:
/// a slow limit gets a steady trickle of small reads, not a 2 MiB burst and
/// seconds of silence, which would also delay noticing a stalled source),
/// within one chunk and `2 × MAX_RUN` chunks (so 4 KiB chunks still read
/// 128 KiB at a time, and a chunk above 2 MiB is a run of its own).
fn idle_run(chunk_size: u64, rate: u64) -> usize {
    let mut bytes = RUN_BYTES;
    if rate > 0 {
        bytes = bytes.min(rate);
    }
    usize::try_from(bytes / chunk_size).map_or(2 * MAX_RUN, |n| n.clamp(1, 2 * MAX_RUN))
}

/// Pending journal entries after which hydration saves progress itself.
const PENDING_LIMIT: usize = 65536;

/// How far ahead of the cursor source holes are learnt, in bytes.
const HOLE_WINDOW: u64 = 256 << 20;

/// A token bucket: `rate` bytes per second, bursts up to one second's worth.
struct Bucket {
    /// The configured rate, to notice a change.
    limit: u64,
    rate: f64,
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn new(rate: u64) -> Bucket {
        Bucket {
            limit: rate,
            rate: rate as f64,
            tokens: rate as f64,
            at: Instant::now(),
        }
    }

    /// Time to wait before `n` bytes may be fetched (and take them).
    fn take(&mut self, n: u64) -> Duration {
        let now = Instant::now();
        self.tokens = (self.tokens + now.duration_since(self.at).as_secs_f64() * self.rate)
            .min(self.rate.max(n as f64));
        self.at = now;
        self.tokens -= n as f64;
        if self.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.tokens / self.rate)
        }
    }
}

/// Hydrate until every chunk is present or `stop` resolves.
pub async fn run<S: Source>(
    volume: Arc<Volume<S>>,
    opts: Options,
    stop: impl std::future::Future<Output = ()>,
) {
    tokio::select! {
        _ = stop => {}
        _ = hydrate(volume.clone(), opts) => {}
    }
}

async fn hydrate<S: Source>(volume: Arc<Volume<S>>, opts: Options) {
    let g = volume.geometry();
    let mut bucket: Option<Bucket> = None;
    let mut cursor = 0u64;
    let mut holes_known_until = 0u64;
    let mut backoff = Backoff::new();
    let mut tasks: JoinSet<(crate::Result<usize>, Instant)> = JoinSet::new();
    loop {
        if volume.map().is_complete() {
            break;
        }
        if !opts.enabled.load(Ordering::Relaxed) {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        }
        let Some(c) = volume
            .map()
            .next_absent(cursor)
            .or_else(|| volume.map().next_absent(0))
        else {
            break;
        };
        let offset = g.bytes(c).start;
        if offset >= holes_known_until || offset < holes_known_until.saturating_sub(HOLE_WINDOW) {
            let len = HOLE_WINDOW.min(g.size() - offset);
            if let Err(e) = volume.learn_holes(offset, len).await {
                tracing::warn!("hydration: recording source holes failed: {e}");
            }
            holes_known_until = offset + len;
            if volume.map().state(c) != crate::presence::ChunkState::Absent {
                cursor = c.0 + 1;
                continue;
            }
        }
        // Bound the journal entries waiting in memory (invariant 8).
        if volume.pending_entries() > PENDING_LIMIT {
            if let Err(e) = volume.flush().await {
                tracing::warn!("hydration: saving progress failed: {e}");
            }
        }
        // Foreground first: one short run at a time while clients wait on
        // the source, and give their fetches a head start (bounded).
        let foreground = volume.yield_to_clients(FOREGROUND_WINDOW).await;
        let limit = if foreground { 1 } else { opts.workers.max(1) };
        while tasks.len() >= limit {
            if let Some(r) = tasks.join_next().await {
                backoff.settle(r).await;
            }
        }
        let rate = opts.rate_limit.load(Ordering::Relaxed);
        let idle = idle_run(g.chunk_size(), rate);
        let run_bytes = g.chunk_size() * idle as u64;
        if bucket.as_ref().map(|b| b.limit) != Some(rate).filter(|&r| r > 0) {
            bucket = (rate > 0).then(|| Bucket::new(rate));
        }
        if let Some(b) = bucket.as_mut() {
            let wait = b.take(run_bytes.min(g.size() - offset));
            if !wait.is_zero() {
                tokio::time::sleep(wait).await;
            }
        }
        let run = volume.lock_run(c, if foreground { FOREGROUND_RUN } else { idle });
        match run.last().map(|g| g.index().0) {
            Some(last) => {
                cursor = last + 1;
                let v = volume.clone();
                tasks.spawn(async move {
                    let r = v.fetch_run(run, Class::Background, Keep::Cold).await;
                    (r, Instant::now())
                });
            }
            None => {
                // Someone else holds this chunk (a client is fetching it):
                // it will be present soon; go on with the next one.
                cursor = c.0 + 1;
                tokio::task::yield_now().await;
            }
        }
        if cursor >= g.chunks() {
            cursor = 0;
        }
    }
    while let Some(r) = tasks.join_next().await {
        backoff.report(r);
    }
    if volume.map().is_complete() {
        if let Err(e) = volume.flush().await {
            tracing::warn!("hydration complete but the final flush failed: {e}");
        } else {
            tracing::info!(
                "hydration complete: {} chunks present",
                volume.map().present_count()
            );
        }
    }
}

/// The pause after failed runs: 1 s doubling to 30 s, reset by a success.
struct Backoff {
    next: Duration,
    /// When the last pause ended: a run that failed before then failed in
    /// the fault that pause was for, and pauses no more.
    resumed: Instant,
}

impl Backoff {
    const FIRST: Duration = Duration::from_secs(1);
    const MAX: Duration = Duration::from_secs(30);

    fn new() -> Backoff {
        Backoff {
            next: Backoff::FIRST,
            resumed: Instant::now(),
        }
    }

    /// Handle one finished run: a success resets the backoff; a failure
    /// since the last pause logs, pauses, and doubles it.
    async fn settle(&mut self, r: Result<(crate::Result<usize>, Instant), tokio::task::JoinError>) {
        if let Some(failed_at) = self.report(r) {
            if failed_at >= self.resumed {
                tracing::warn!("hydration paused for {:?}", self.next);
                tokio::time::sleep(self.next).await;
                self.resumed = Instant::now();
                self.next = (self.next * 2).min(Backoff::MAX);
            }
        }
    }

    /// Log a finished run; `Some(when)` if it failed.
    fn report(
        &mut self,
        r: Result<(crate::Result<usize>, Instant), tokio::task::JoinError>,
    ) -> Option<Instant> {
        match r {
            Ok((Ok(_), _)) => {
                self.next = Backoff::FIRST;
                None
            }
            Ok((Err(e), at)) => {
                if at >= self.resumed {
                    tracing::warn!("hydration: {e}");
                } else {
                    tracing::debug!("hydration: {e} (during the last pause)");
                }
                Some(at)
            }
            Err(e) => {
                tracing::error!("hydration task failed: {e}");
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idle_runs_are_2_mib_or_a_second_of_the_rate_within_one_chunk_and_twice_max_run() {
        assert_eq!(idle_run(64 << 10, 0), 32);
        assert_eq!(idle_run(1 << 20, 0), 2);
        assert_eq!(idle_run(16 << 20, 0), 1);
        assert_eq!(idle_run(4 << 10, 0), 2 * MAX_RUN);
        assert_eq!(idle_run(64 << 10, 512 << 10), 8);
        assert_eq!(idle_run(64 << 10, 200 << 20), 32);
        assert_eq!(idle_run(64 << 10, 1000), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn runs_failed_in_one_fault_pause_once() {
        let mut b = Backoff::new();
        let failed = || {
            Ok((
                Err(crate::Error::SourceUnavailable("gone".into())),
                Instant::now(),
            ))
        };
        // Eight runs fail at once: the first pauses, the rest do not.
        let results: Vec<_> = (0..8).map(|_| failed()).collect();
        let t = tokio::time::Instant::now();
        for r in results {
            b.settle(r).await;
        }
        assert_eq!(t.elapsed(), Duration::from_secs(1));
        // A failure after the pause pauses again, twice as long.
        b.settle(failed()).await;
        assert_eq!(t.elapsed(), Duration::from_secs(3));
        // A success resets it.
        b.settle(Ok((Ok(1), Instant::now()))).await;
        assert_eq!(b.next, Backoff::FIRST);
    }

    #[test]
    fn bucket_allows_a_burst_then_paces() {
        let mut b = Bucket::new(1000);
        assert_eq!(b.take(1000), Duration::ZERO);
        let wait = b.take(500);
        assert!(
            wait >= Duration::from_millis(400) && wait <= Duration::from_millis(600),
            "{wait:?}"
        );
    }
}
