//! Prefetch around a miss, on a far link: a client read that misses also
//! starts a background fetch of the other absent chunks of the aligned
//! *extent* around it, so the reads that follow nearby (a booting OS reads
//! clustered, not sequentially) find their chunks present or already in
//! flight instead of paying a round trip each.
//!
//! Nearly every byte is fetched once in a migration anyway (hydration, or
//! finalize's after `--no-hydrate`; all but chunks a client overwrites
//! whole first), so what a prefetch risks is not the bytes but the link
//! and the CPU they take while clients wait. Three measures bound it:
//!
//! - *The round trip*: nothing is prefetched while a foreground fetch
//!   takes less than [`MIN_RTT`] (smoothed, from the [`MIN_SAMPLES`]th
//!   fetch on): on a near source a miss costs less than fetching and
//!   storing its neighbours does.
//! - *The bandwidth-delay product*: an extent is never more than the link
//!   carries in one round trip (the bandwidth measured on earlier
//!   extents), so a client's next miss waits at most about one more round
//!   trip behind it on a shared link; and never more than [`MAX_EXTENT`].
//! - *Use*: the extent doubles while at least one prefetched chunk in 16
//!   is read by a client, halves below one in 64, and stops when none is.
//!   Random reads over a large disk read almost none of what a prefetch
//!   brings (with a floor of 2 chunks they still cost 5-10% of their p50
//!   at 5 ms, issue 19); a boot read 6-25% of it, epoch by epoch.
//!
//! While use or the bandwidth has turned it off, one miss in
//! [`PROBE_EVERY`] still prefetches the [`PROBE_CHUNKS`] that follow it, so
//! a workload that changes (a boot after a scan) or a link that clears
//! turns it back on.
//!
//! At most [`SLOTS`] extents are in flight. Prefetches use
//! [`Class::Background`] (the hydration connection: never queued ahead of
//! a client's fetch), lock their chunks before the client's own fetch goes
//! out (a client reading one of them waits for it instead of fetching it
//! again), never touch the chunks of the request that missed, and run in
//! `behind` tasks, so a flush or a stop waits for them. Chunks of 4 MiB or
//! more are never prefetched around (an extent would be one chunk).

use std::sync::OnceLock;
use std::time::Duration;

use super::*;
use crate::presence::Bitmap;

/// A foreground fetch slower than this (smoothed) turns prefetch on.
pub const MIN_RTT: Duration = Duration::from_millis(2);

/// Foreground fetches timed before their round trip is trusted (unless
/// prefetch was asked for on every miss): one slow fetch on a loaded
/// machine is not a far link.
const MIN_SAMPLES: u64 = 4;

/// Largest extent, in bytes.
pub const MAX_EXTENT: u64 = 4 << 20;

/// Extent a far link starts with, in bytes, until use says otherwise.
const FIRST_EXTENT: u64 = 1 << 20;

/// Prefetches between two verdicts on the extent.
const EPOCH: u64 = 8;

/// While use or the bandwidth has turned prefetch off: one miss in this
/// many probes.
const PROBE_EVERY: u64 = 128;

/// Chunks a probe fetches.
const PROBE_CHUNKS: u64 = 4;

/// Probes between two verdicts (so prefetch comes back within
/// `PROBE_EVERY x PROBE_EPOCH` misses of clustered reads).
const PROBE_EPOCH: u64 = 2;

/// Extents in flight at once: a miss while all are busy prefetches
/// nothing (bounds the bytes held to `SLOTS` x [`MAX_EXTENT`], invariant 8).
pub const SLOTS: usize = 4;

#[derive(Debug)]
pub(super) struct Prefetch {
    /// Chunks a prefetch stored that no client has read since (allocated
    /// at the first prefetch: one bit per chunk).
    unread: OnceLock<Bitmap>,
    /// Prefetched chunks read by a client since the last verdict.
    hits: AtomicU64,
    /// Smoothed time of a foreground fetch, µs: the source's round trip as
    /// clients see it (0 before the first).
    rtt_us: AtomicU64,
    /// Foreground fetches timed.
    samples: AtomicU64,
    /// Round trip from which prefetch starts, µs ([`MIN_RTT`], or what
    /// [`Volume::set_prefetch_min_rtt`] set; `u64::MAX`: never).
    min_rtt_us: AtomicU64,
    tune: Mutex<Tune>,
    slots: Arc<tokio::sync::Semaphore>,
}

#[derive(Debug)]
struct Tune {
    /// Extent use asks for, in chunks (a power of two; 1: off, probing).
    wanted: u64,
    /// Misses since the last probe, while off.
    since_probe: u64,
    /// Smoothed bandwidth of whole extents, bytes/s (0: not measured yet).
    bandwidth: u64,
    /// Prefetches and chunks since the last verdict.
    issued: u64,
    chunks: u64,
}

impl Prefetch {
    pub(super) fn new(chunk_size: u64) -> Prefetch {
        Prefetch {
            unread: OnceLock::new(),
            hits: AtomicU64::new(0),
            rtt_us: AtomicU64::new(0),
            samples: AtomicU64::new(0),
            min_rtt_us: AtomicU64::new(u64::try_from(MIN_RTT.as_micros()).unwrap_or(u64::MAX)),
            tune: Mutex::new(Tune {
                wanted: first_chunks(chunk_size),
                since_probe: 0,
                bandwidth: 0,
                issued: 0,
                chunks: 0,
            }),
            slots: Arc::new(tokio::sync::Semaphore::new(SLOTS)),
        }
    }
}

/// The largest power of two at most `n` (1 for 0).
fn pow2_floor(n: u64) -> u64 {
    if n <= 1 {
        1
    } else {
        1 << (63 - n.leading_zeros())
    }
}

/// Chunks of the extent a far link starts with (and comes back to):
/// [`FIRST_EXTENT`], and at least 2 chunks where [`MAX_EXTENT`] holds them
/// (1 MiB chunks still prefetch 2).
fn first_chunks(chunk: u64) -> u64 {
    pow2_floor(FIRST_EXTENT / chunk)
        .max(2)
        .min(pow2_floor(MAX_EXTENT / chunk))
}

/// Chunks per extent: what use wants, within the bandwidth-delay product
/// (`bandwidth` bytes/s, 0 if not measured yet) and [`MAX_EXTENT`]; 1 (no
/// prefetch) below the minimal round trip.
fn extent_chunks(rtt: Duration, min_rtt: Duration, bandwidth: u64, wanted: u64, chunk: u64) -> u64 {
    if rtt < min_rtt {
        return 1;
    }
    let mut n = wanted.min(MAX_EXTENT / chunk);
    #[expect(
        clippy::cast_possible_truncation,
        reason = "a float `as` saturates, and the extent is capped above anyway"
    )]
    if bandwidth > 0 {
        let bdp = rtt.as_secs_f64() * bandwidth as f64 / chunk as f64;
        n = n.min(if bdp >= 1.0 { bdp as u64 } else { 1 });
    }
    pow2_floor(n)
}

/// The extent use asks for next, from the prefetched chunks read (`hits`)
/// among `chunks` prefetched: doubled at one in 16 or more (up to
/// [`MAX_EXTENT`]; from off, straight back to [`FIRST_EXTENT`]), halved
/// below one in 64 (down to 1: off), off at once if none was read (random
/// reads pay for 8 extents, not for the 32 of halving down: issue 19's p99
/// of cold 4 KiB reads at 5 ms was 1.25x the source's with halving).
fn verdict(wanted: u64, hits: u64, chunks: u64, chunk: u64) -> u64 {
    let most = pow2_floor(MAX_EXTENT / chunk);
    if hits * 16 >= chunks {
        if wanted <= 1 {
            first_chunks(chunk)
        } else {
            (wanted * 2).min(most)
        }
    } else if hits == 0 {
        1
    } else if hits * 64 < chunks {
        (wanted / 2).max(1)
    } else {
        wanted
    }
}

impl<S: Source> Volume<S> {
    /// Record a foreground fetch that took `took` (stats and the smoothed
    /// round trip).
    pub(super) fn note_fg_fetch(&self, took: Duration) {
        self.stats.foreground_fetch.record(took);
        let us = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
        let p = &self.prefetch;
        let old = p.rtt_us.load(Ordering::Relaxed);
        let new = if old == 0 { us } else { (old * 7 + us) / 8 };
        p.rtt_us.store(new.max(1), Ordering::Relaxed);
        p.samples.fetch_add(1, Ordering::Relaxed);
    }

    /// Prefetch from another round trip than the 2 ms default (`stream start
    /// --prefetch-rtt`): zero prefetches on every miss once a foreground
    /// fetch has been timed, `None` never.
    pub fn set_prefetch_min_rtt(&self, d: Option<Duration>) {
        let us = d.map_or(u64::MAX, |d| {
            u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
        });
        self.prefetch.min_rtt_us.store(us, Ordering::Relaxed);
    }

    /// Chunks `chunks` were read by a client: count the prefetched ones.
    pub(super) fn note_read(&self, chunks: Range<u64>) {
        let Some(unread) = self.prefetch.unread.get() else {
            return;
        };
        let mut n = 0;
        for i in chunks {
            if unread.get(i) && unread.clear(i) {
                n += 1;
            }
        }
        if n > 0 {
            self.prefetch.hits.fetch_add(n, Ordering::Relaxed);
            Stats::add(&self.stats.prefetched_chunks_read, n);
        }
    }

    /// A read of `request` (chunks) missed at chunk `c`: prefetch the other
    /// absent chunks of the extent around `c`, outside `request`.
    pub(super) fn prefetch_around(self: &Arc<Self>, c: ChunkIndex, request: Range<u64>) {
        let p = &self.prefetch;
        let rtt = Duration::from_micros(p.rtt_us.load(Ordering::Relaxed));
        let min_rtt = Duration::from_micros(p.min_rtt_us.load(Ordering::Relaxed));
        if rtt.is_zero() || rtt < min_rtt || self.read_only {
            return;
        }
        if !min_rtt.is_zero() && p.samples.load(Ordering::Relaxed) < MIN_SAMPLES {
            return;
        }
        let chunk = self.geometry.chunk_size();
        let (n, probe) = {
            let mut t = p.tune.lock().expect("poisoned");
            if t.issued >= EPOCH || t.wanted <= 1 && t.issued >= PROBE_EPOCH {
                let hits = p.hits.swap(0, Ordering::Relaxed);
                let was = t.wanted;
                t.wanted = verdict(t.wanted, hits, t.chunks.max(1), chunk);
                tracing::debug!(
                    "prefetch: {hits} of {} chunks read; extent {was} -> {} chunks \
                     (round trip {rtt:?}, {} MB/s)",
                    t.chunks,
                    t.wanted,
                    t.bandwidth / 1_000_000
                );
                (t.issued, t.chunks) = (0, 0);
            }
            let n = if t.wanted > 1 {
                extent_chunks(rtt, min_rtt, t.bandwidth, t.wanted, chunk)
            } else {
                1
            };
            if n > 1 {
                (n, false)
            } else {
                // Off by use or by the bandwidth measured: probe now and
                // then, or neither could ever change its mind. Not held to
                // that bandwidth: a probe is small, and measures it afresh.
                t.since_probe += 1;
                if t.since_probe < PROBE_EVERY {
                    return;
                }
                t.since_probe = 0;
                (extent_chunks(rtt, min_rtt, 0, PROBE_CHUNKS, chunk), true)
            }
        };
        if n <= 1 {
            return;
        }
        let Ok(slot) = p.slots.clone().try_acquire_owned() else {
            return;
        };
        // An extent is aligned; a probe looks just ahead of the request
        // (where a reader moving forward goes next).
        let start = if probe { request.end } else { c.0 - c.0 % n };
        let end = (start + n).min(self.geometry.chunks());
        // After the miss first (where reads go next), then before it.
        let mut runs = Vec::new();
        for (from, to) in [
            (request.end.max(start), end),
            (start, request.start.min(end)),
        ] {
            let mut i = from;
            while i < to {
                let run = self.lock_run(ChunkIndex(i), mem_len(to - i).min(MAX_RUN));
                i += (run.len() as u64).max(1);
                if !run.is_empty() {
                    runs.push(run);
                }
            }
        }
        if runs.is_empty() {
            return;
        }
        let chunks: u64 = runs.iter().map(|r| r.len() as u64).sum();
        {
            let mut t = p.tune.lock().expect("poisoned");
            t.issued += 1;
            t.chunks += chunks;
        }
        p.unread.get_or_init(|| Bitmap::new(self.geometry.chunks()));
        let volume = self.clone();
        self.behind(async move {
            let started = Instant::now();
            let fetches = runs.into_iter().map(|run| {
                let v = &volume;
                async move {
                    let r = v.fetch_locked(&run, Class::Background, Keep::Cached).await;
                    match r {
                        Ok(_) => {
                            // Before the locks go: a client waiting on one
                            // of these chunks reads it after this.
                            let unread = v.prefetch.unread.get().expect("set before the fetch");
                            for g in &run {
                                unread.set(g.index().0);
                            }
                            Stats::add(&v.stats.chunks_prefetched, run.len() as u64);
                            run.len() as u64
                        }
                        Err(e) => {
                            tracing::debug!("prefetch of chunk {}: {e}", run[0].index().0);
                            0
                        }
                    }
                }
            });
            let fetched = futures_util::future::join_all(fetches)
                .await
                .into_iter()
                .sum::<u64>();
            if fetched > 0 {
                volume.note_extent(fetched * chunk, started.elapsed());
            }
            drop(slot);
        });
    }

    /// An extent of `bytes` took `took` from the first request to the last
    /// store: what beyond one round trip was its transfer.
    fn note_extent(&self, bytes: u64, took: Duration) {
        let rtt = Duration::from_micros(self.prefetch.rtt_us.load(Ordering::Relaxed));
        let transfer = took
            .saturating_sub(rtt)
            .max(took / 8)
            .max(Duration::from_micros(1));
        #[expect(
            clippy::cast_possible_truncation,
            reason = "bytes per second; a float `as` saturates"
        )]
        let sample = (bytes as f64 / transfer.as_secs_f64()) as u64;
        tracing::debug!("prefetch extent: {bytes} bytes in {took:?}, rtt {rtt:?}: {sample} B/s");
        let mut t = self.prefetch.tune.lock().expect("poisoned");
        t.bandwidth = if t.bandwidth == 0 {
            sample
        } else {
            (t.bandwidth / 4) * 3 + sample / 4
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);
    const K64: u64 = 64 << 10;

    #[test]
    fn a_near_source_is_never_prefetched_around() {
        assert_eq!(extent_chunks(MS, MIN_RTT, 0, 64, K64), 1);
        assert_eq!(extent_chunks(MS, MIN_RTT, 1 << 30, 64, K64), 1);
    }

    #[test]
    fn the_extent_is_what_use_wants_within_the_bandwidth_delay_product() {
        // 10 ms, unmeasured: what use wants, at most 4 MiB.
        assert_eq!(extent_chunks(10 * MS, MIN_RTT, 0, 16, K64), 16);
        assert_eq!(extent_chunks(10 * MS, MIN_RTT, 0, 1024, K64), 64);
        // 10 ms at 1 Gbit/s carries 1.25 MB a round trip: 16 chunks.
        assert_eq!(extent_chunks(10 * MS, MIN_RTT, 125_000_000, 64, K64), 16);
        // 10 ms at 10 Mbit/s carries 12.5 kB: less than a chunk, no prefetch.
        assert_eq!(extent_chunks(10 * MS, MIN_RTT, 1_250_000, 64, K64), 1);
        // Chunks as large as the cap are never prefetched around.
        assert_eq!(extent_chunks(10 * MS, MIN_RTT, 0, 64, 4 << 20), 1);
    }

    #[test]
    fn use_doubles_or_halves_the_extent() {
        assert_eq!(verdict(16, 16, 128, K64), 32, "1 in 8 read");
        assert_eq!(verdict(64, 64, 512, K64), 64, "at the cap");
        assert_eq!(verdict(16, 1, 128, K64), 8, "1 in 128 read");
        assert_eq!(verdict(16, 0, 128, K64), 1, "none read: off");
        assert_eq!(verdict(2, 0, 16, K64), 1, "off");
        assert_eq!(verdict(1, 0, 32, K64), 1, "probes read nothing: still off");
        assert_eq!(verdict(1, 2, 32, K64), 16, "probes were read: back on");
        assert_eq!(verdict(16, 4, 128, K64), 16, "1 in 32: kept");
    }

    #[test]
    fn large_chunks_start_at_two_within_the_cap() {
        assert_eq!(first_chunks(K64), 16);
        assert_eq!(first_chunks(1 << 20), 2);
        assert_eq!(first_chunks(2 << 20), 2);
        assert_eq!(first_chunks(4 << 20), 1, "one chunk fills the cap");
        assert_eq!(verdict(1, 2, 8, 1 << 20), 2, "back on at 2 chunks");
    }

    #[test]
    fn powers_of_two_round_down() {
        assert_eq!(pow2_floor(0), 1);
        assert_eq!(pow2_floor(1), 1);
        assert_eq!(pow2_floor(17), 16);
        assert_eq!(pow2_floor(64), 64);
    }
}
