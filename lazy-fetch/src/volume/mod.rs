//! The volume: the virtual disk a client sees, backed by a source that is
//! fetched lazily into a target.
//!
//! Chunk states (see `presence`) and who moves each edge, always while
//! holding the chunk's single-flight lock (`inflight`):
//!
//! ```text
//!            client read / hydrator / readahead: fetch
//!   absent ────────────────────────────────────────────▶ data
//!     │  │   (fetched bytes all zero, or a source hole)     │ ▲
//!     │  └───────────────────────────────────────▶ zero ◀───┘ │ trim / write-zeroes
//!     │                                            │          │ of a whole chunk
//!     │        client write (whole chunk: no fetch)└──────────┘ client write
//!     └─────────────────────────────────────────────▶ data+written
//! ```
//!
//! One edge goes back: a seeded migration's delta *forgets* data and zero
//! chunks whose copy differs from the source (`delta`), or at the cutover
//! makes every copied chunk an absent *candidate* whose bytes are compared
//! with the source's hash when it is fetched (`candidate`); both only
//! before anything serves or fetches and never for a written chunk
//! (`Volume::forget_changed` and `Volume::make_candidates` check;
//! `PresenceMap::set` refuses absent).
//!
//! Invariants of the design and where they are enforced:
//!
//! 1. *Durable map implies durable data*: bits are set only after the
//!    target write they describe completed, and [`Volume::flush`] syncs the
//!    target before journaling (order documented in `state`).
//! 2. *Single flight; acknowledged writes are never overwritten by source
//!    data*: every change takes the chunk lock and re-checks the state
//!    under it; a fetch only ever fills an *absent* chunk, and a write to an
//!    absent chunk fetches, overlays and writes in one step under the lock
//!    (`write_chunk`).
//! 3. *FLUSH and FUA*: [`Volume::flush`] makes the target and the map
//!    durable; FUA writes call it before answering. *Unflushed writes
//!    never become a mix*: changes to present chunks are logged first
//!    (`wal`, replayed at an unclean start); changes to absent or zero
//!    chunks are returned whole to "old" by `recover`. Except on a target
//!    shared with a guest (`detach`): nothing is logged, replayed or
//!    cleared there (`change_in_place`, `open`, `recover` check
//!    `target_shared`), and the client re-sends a write cut short.
//! 4. *No fetch needed*: whole-chunk writes, trims and write-zeroes never
//!    read the source (`write_chunk`, `zero_chunks`).
//! 5. *Holes stay holes*: source holes and all-zero chunks become `zero`
//!    without a data write (`store_zero`), except over a candidate, whose
//!    target bytes are an old copy, not zeros.
//! 6. *State names source, target, chunk size*: checked in [`Volume::open`].
//! 7. *Foreground first*: foreground fetches use [`Class::Foreground`]
//!    (their own source connection) and are counted in `fg_active`; every
//!    client request stamps `fg_last`; the hydrator yields while either
//!    says clients are busy ([`Volume::foreground_busy`]). Cold reads answer
//!    with their own piece first (`read_piece_first`), or with a whole
//!    chunk before it is stored (`read_chunk_first`); in both, a task
//!    (`behind`) keeps the chunk's lock until it is stored, so invariant 2
//!    holds for whatever touches the chunk next. Prefetches around a miss
//!    (`prefetch_around`) use [`Class::Background`] and do not yield:
//!    clients asked for them, and at most `prefetch::SLOTS` extents run;
//!    they take their chunks' locks with `try_lock` only (`lock_run`),
//!    outside the request that missed, so they never wait on a client and
//!    a client's read of one of them waits for its store.
//! 8. *Bounded memory*: three bits per chunk (three more while a seeded
//!    cutover's candidates are unresolved), the single-flight table (only
//!    chunks in flight), and the pending journal entries (flushed by the
//!    persister when they grow). Fetched bytes are held per run in flight:
//!    hydration's runs are at most 2 MiB or one chunk (`hydrate::idle_run`),
//!    `Options::workers` of them; CACHE's ([`CACHE_SLOTS`] at a time) and
//!    readahead's runs at most [`MAX_RUN`] chunks; prefetch's extents at
//!    most `prefetch::MAX_EXTENT`, `prefetch::SLOTS` of them at a time
//!    (and one more bit per chunk once a prefetch ran).
//! 9. *A seeded copy is trusted only once compared*: an absent candidate
//!    becomes present only when the blake3 of its bytes read from the
//!    target, under its lock, equals the source's hash
//!    (`confirm_or_fetch`); the sweep's in-memory verdicts use the kept
//!    record, which cannot change while the chunk is absent (records are
//!    written only by a fetch, under the lock, just before the chunk is
//!    marked present: `store_fetched`, `confirm_or_fetch`). Zeros are
//!    written over a candidate, never assumed (`store_zero`), and
//!    recovery does not clear candidates (`recover`). The set is dropped
//!    at open once none is absent (`open`).
//!
//! Layout, by job: `open.rs` (opening, identity checks, crash recovery),
//! `io.rs` (the client I/O path and the one in-place change function),
//! `fetch.rs` (fetching absent chunks, runs, holes, CACHE), `readahead.rs`,
//! `prefetch.rs` (the extent around a miss on a far link),
//! `persist.rs` (flush, close, the kept manifest's records), `status.rs`,
//! `detach.rs` (sharing the target with a guest switched onto it live).
//! The struct, its accessors and the small helpers stay here.
//!
//! Crash recovery: after an unclean stop the journal may lag the target
//! (writes that were never flushed). For a target we created sparse,
//! every absent or zero chunk must read as zeros there, so ranges of the
//! target that hold data for such chunks are punched again; on other
//! targets zero chunks are demoted to data (the target is then the truth).
//! Either outcome is what NBD allows for unflushed writes, and the target
//! always equals what clients read.

use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use block_device::{Extent, Piece};
use futures_util::future::{BoxFuture, try_join_all};

use crate::error::{Error, Result};
use crate::fingerprint::Fingerprint;
use crate::hashes::ChunkHashes;
use crate::inflight::{ChunkGuard, ChunkLocks};
use crate::presence::{ChunkState, PresenceMap};
use crate::source::{Class, Source};
use crate::state::{self, Header, Phase, StateDir};
use crate::stats::Stats;
use crate::target::Target;
use crate::units::{ChunkIndex, DEFAULT_CHUNK, Geometry, mem_len};
use crate::wal::{self, Change, Wal};
use crate::watchdog::{Requests, Wait, waiting};

mod candidate;
mod delta;
mod detach;
mod fetch;
mod io;
mod open;
mod persist;
mod prefetch;
mod readahead;
mod status;

pub use fetch::Keep;
pub use open::OpenOptions;
use prefetch::Prefetch;
use readahead::Readahead;
pub use status::Status;

/// Longest run of chunks one background fetch reads.
pub const MAX_RUN: usize = 16;
/// CACHE requests fetching at once on a volume (each holds one run).
pub const CACHE_SLOTS: usize = 4;
/// A client request within this window makes CACHE yield (as hydration).
const CACHE_YIELD_WINDOW: std::time::Duration = std::time::Duration::from_millis(20);
/// Largest readahead window, in chunks.
const MAX_READAHEAD: u64 = 32;

pub struct Volume<S> {
    geometry: Geometry,
    source: S,
    target: Target,
    map: PresenceMap,
    locks: Arc<ChunkLocks>,
    state: Arc<StateDir>,
    header: Mutex<Header>,
    /// Absent and zero chunks read as zeros in the target (we created it
    /// sparse), so zero chunks need no target write.
    sparse_target: bool,
    persist: tokio::sync::Mutex<()>,
    /// Log of in-place changes to present chunks (see `wal`).
    wal: Wal,
    pub stats: Stats,
    /// Foreground fetches in flight; the hydrator yields while nonzero.
    fg_active: AtomicUsize,
    /// When a client request last arrived (ns since `opened`): reads of
    /// present chunks are foreground load too, though they fetch nothing.
    fg_last: AtomicU64,
    readahead: Mutex<Readahead>,
    /// Prefetch around misses on a far link (`prefetch`).
    prefetch: Prefetch,
    /// Background tasks (readahead, whole-chunk fetches behind a piece-first
    /// read) still holding the volume, and their end. Shared apart from the
    /// volume so a task drops its handle on the volume *before* it counts
    /// itself out; `idle` then means nobody holds it.
    readahead_alive: Arc<(AtomicUsize, tokio::sync::Notify)>,
    /// Client requests in flight and what each waits for (`watchdog`).
    requests: Arc<Requests>,
    /// Runs CACHE requests may fetch at once (bounds their memory).
    cache_slots: tokio::sync::Semaphore,
    opened: Instant,
    /// Samples of the source, checked on resume and reconnect (see
    /// `fingerprint`); fetches add to it.
    fingerprint: Arc<Fingerprint>,
    /// A finalized migration: the target is open `O_RDONLY`.
    read_only: bool,
    /// The blake3 of each chunk as it became present (`hashes`); `None`
    /// when read-only.
    hashes: Option<Arc<ChunkHashes>>,
    /// The guest may write the target directly (`stream detach` prepared
    /// it, see `detach`): in-place changes are no longer logged, and
    /// nothing replays or clears chunks of the target on its own.
    shared_target: std::sync::atomic::AtomicBool,
    /// Absent chunks whose target bytes are a seeded copy, compared with
    /// the source's hash before they are fetched (`candidate`); set at a
    /// seeded migration's cutover.
    candidates: std::sync::OnceLock<candidate::Candidates>,
}

/// An in-place change to a present chunk (see [`Volume::change_in_place`]).
enum InPlace {
    Write(Vec<u8>),
    Zero { len: u64, allocate: bool },
}

/// What a fetch brought in.
pub enum Fetched {
    Zero,
    Data(Vec<u8>),
}

fn is_zero(buf: &[u8]) -> bool {
    // SAFETY: every bit pattern is a valid u64, and align_to only hands
    // out the aligned middle as u64s.
    let (head, words, tail) = unsafe { buf.align_to::<u64>() };
    head.iter().all(|&b| b == 0) && words.iter().all(|&w| w == 0) && tail.iter().all(|&b| b == 0)
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Counts one foreground fetch in `fg_active` while it lives.
struct ForegroundGuard<'a>(&'a AtomicUsize);

impl<'a> ForegroundGuard<'a> {
    fn new(active: &'a AtomicUsize) -> Self {
        active.fetch_add(1, Ordering::Relaxed);
        ForegroundGuard(active)
    }
}
impl Drop for ForegroundGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl<S: Source> Volume<S> {
    pub fn geometry(&self) -> Geometry {
        self.geometry
    }

    pub fn map(&self) -> &PresenceMap {
        &self.map
    }

    pub fn source(&self) -> &S {
        &self.source
    }

    pub fn target(&self) -> &Target {
        &self.target
    }

    pub fn state_dir(&self) -> &Path {
        self.state.path()
    }

    /// Opened read-only: a finalized migration (see [`OpenOptions`]).
    pub fn read_only(&self) -> bool {
        self.read_only
    }

    pub fn header(&self) -> Header {
        self.header.lock().expect("poisoned").clone()
    }

    pub fn uptime(&self) -> std::time::Duration {
        self.opened.elapsed()
    }

    /// Foreground fetches in flight right now.
    pub fn foreground_active(&self) -> usize {
        self.fg_active.load(Ordering::Relaxed)
    }

    /// Whether clients are busy: a fetch for them is in flight, or one of
    /// their requests arrived within `window`.
    pub fn foreground_busy(&self, window: std::time::Duration) -> bool {
        if self.foreground_active() > 0 {
            return true;
        }
        let last = self.fg_last.load(Ordering::Relaxed);
        last != 0 && nanos(self.opened.elapsed()).saturating_sub(last) < nanos(window)
    }

    /// Background work (hydration, CACHE) gives clients a head start: if
    /// they are busy, wait until they have been quiet for `window`, at most
    /// `window`. Returns whether they were busy.
    pub async fn yield_to_clients(&self, window: std::time::Duration) -> bool {
        if !self.foreground_busy(window) {
            return false;
        }
        let deadline = Instant::now() + window;
        while self.foreground_busy(window) && Instant::now() < deadline {
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
        true
    }

    fn note_foreground(&self) {
        let now = nanos(self.opened.elapsed()).max(1);
        self.fg_last.store(now, Ordering::Relaxed);
    }

    /// Change the header (phase, finalize progress) and save it.
    pub fn update_header(&self, f: impl FnOnce(&mut Header)) -> Result<Header> {
        let mut h = self.header.lock().expect("poisoned");
        let mut new = h.clone();
        f(&mut new);
        if new.phase == Phase::Finalized && new.finalized_at.is_none() {
            new.finalized_at = Some(now_secs());
        }
        self.state.write_header(&new)?;
        *h = new.clone();
        Ok(new)
    }

    /// The client requests in flight, for the watchdog and `status`.
    pub fn requests(&self) -> &Arc<Requests> {
        &self.requests
    }
}

/// A fast write-zeroes could not be fast (NBD answers `ENOTSUP`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FastZeroUnsupported;

/// A duration in nanoseconds, saturating (u64 nanoseconds is 584 years).
fn nanos(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}
