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
//!    chunks are returned whole to "old" by `recover`.
//! 4. *No fetch needed*: whole-chunk writes, trims and write-zeroes never
//!    read the source (`write_chunk`, `zero_chunks`).
//! 5. *Holes stay holes*: source holes and all-zero chunks become `zero`
//!    without a data write (`store_zero`).
//! 6. *State names source, target, chunk size*: checked in [`Volume::open`].
//! 7. *Foreground first*: foreground fetches use [`Class::Foreground`]
//!    (their own source connection) and are counted in `fg_active`; every
//!    client request stamps `fg_last`; the hydrator yields while either
//!    says clients are busy ([`Volume::foreground_busy`]). Cold reads answer
//!    with their own piece first (`read_piece_first`).
//! 8. *Bounded memory*: three bits per chunk, the single-flight table (only
//!    chunks in flight), and the pending journal entries (flushed by the
//!    persister when they grow).
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

use futures_util::future::{BoxFuture, try_join_all};
use nbd_server::{Extent, Piece};

use crate::error::{Error, Result};
use crate::fingerprint::Fingerprint;
use crate::hashes::ChunkHashes;
use crate::inflight::{ChunkGuard, ChunkLocks};
use crate::presence::{ChunkState, PresenceMap};
use crate::source::{Class, Source};
use crate::state::{self, Header, Phase, StateDir};
use crate::stats::Stats;
use crate::target::Target;
use crate::units::{ChunkIndex, DEFAULT_CHUNK, Geometry};
use crate::wal::{self, Change, Wal};
use crate::watchdog::{Requests, Wait, waiting};

/// Longest run of chunks one background fetch reads.
pub const MAX_RUN: usize = 16;
/// CACHE requests fetching at once on a volume (each holds one run).
pub const CACHE_SLOTS: usize = 4;
/// A client request within this window makes CACHE yield (as hydration).
const CACHE_YIELD_WINDOW: std::time::Duration = std::time::Duration::from_millis(20);
/// Largest readahead window, in chunks.
const MAX_READAHEAD: u64 = 32;

/// How to open a volume.
#[derive(Clone, Debug, Default)]
pub struct OpenOptions {
    pub target: PathBuf,
    pub state_dir: PathBuf,
    /// Required to match an existing state; the default for a new one.
    pub chunk_size: Option<u64>,
    /// Open a finalized migration too (for `stream verify`; never to serve).
    /// Its target belongs to the new instance: it is opened read-only, never
    /// marked running, recovered or replayed onto ([`Volume::read_only`]).
    pub allow_finalized: bool,
    /// Opened to serve clients (`stream start`), not to finish or check it.
    pub serving: bool,
    /// An already open target (tests: in-memory or fault-injecting
    /// backends); `target` then only names it.
    pub target_device: Option<Target>,
}

/// The target `opts` names: the one given, or the file or device opened
/// (and created, if `may_create`) at `opts.target`.
fn open_target(opts: &OpenOptions, size: u64, may_create: bool) -> Result<(Target, bool)> {
    match &opts.target_device {
        Some(t) if t.size() < size => Err(Error::Invalid(format!(
            "target {} holds {} bytes but the source has {size}",
            t.path().display(),
            t.size()
        ))),
        Some(t) => Ok((t.clone(), false)),
        None => Target::open(&opts.target, size, may_create),
    }
}

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
}

/// Readahead state. One task at a time fetches chunks `at..until`; a
/// sequential read that wants more extends `until` while it runs, so no
/// request for readahead is ever dropped.
#[derive(Debug, Default)]
struct Readahead {
    /// Byte offset a sequential read would start at next.
    next: u64,
    window: u64,
    at: u64,
    until: u64,
    running: bool,
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
    /// Create or resume the migration in `opts.state_dir`.
    pub async fn open(source: S, opts: &OpenOptions) -> Result<Arc<Volume<S>>> {
        let sid = source.id();
        // The legacy disk is only ever read: refuse a target that is the
        // source under another name (an NBD source names nothing local).
        if sid.kind == "file" {
            crate::target::identity::check_distinct(Path::new(&sid.location), &opts.target)?;
        }
        let (state, header, map, target, read_only) = if StateDir::exists(&opts.state_dir) {
            let (state, header, map) = StateDir::open(&opts.state_dir)?;
            if header.phase == Phase::Finalized && !opts.allow_finalized {
                return Err(Error::Finalized {
                    dir: opts.state_dir.clone(),
                });
            }
            let cinder = header.finalize.as_ref().and_then(|f| f.cinder.as_ref());
            if let Some(c) = cinder
                && opts.serving
            {
                return Err(Error::Invalid(format!(
                    "finalize already handed the target to Cinder ({}); run `stream finalize` \
                     again to complete it instead of serving the volume",
                    c.volume_id.as_deref().unwrap_or("manage call in progress")
                )));
            }
            if let Some(cs) = opts.chunk_size.filter(|&cs| cs != header.chunk_size) {
                return Err(Error::Mismatch {
                    what: "chunk size",
                    recorded: header.chunk_size.to_string(),
                    given: cs.to_string(),
                });
            }
            if (sid.kind.as_str(), sid.location.as_str())
                != (header.source.kind.as_str(), header.source.location.as_str())
            {
                return Err(Error::Mismatch {
                    what: "source",
                    recorded: header.source.location.clone(),
                    given: sid.location.clone(),
                });
            }
            if sid.size != header.source.size {
                return Err(Error::Mismatch {
                    what: "source size",
                    recorded: header.source.size.to_string(),
                    given: sid.size.to_string(),
                });
            }
            // A finalized target belongs to the new instance: nothing here
            // may write to it again, so it is not even opened for writing.
            let read_only = header.phase == Phase::Finalized;
            let target = if read_only && opts.target_device.is_none() {
                Target::open_read_only(&opts.target, header.size)?
            } else {
                open_target(opts, header.size, false)?.0
            };
            let tid = target.id(header.target.created_sparse);
            let same_target = tid.path == header.target.path
                && tid.kind == header.target.kind
                && (tid.dev, tid.ino) == (header.target.dev, header.target.ino);
            if !same_target {
                return Err(Error::Mismatch {
                    what: "target",
                    recorded: format!(
                        "{} ({} dev {} inode {})",
                        header.target.path,
                        header.target.kind,
                        header.target.dev,
                        header.target.ino
                    ),
                    given: format!(
                        "{} ({} dev {} inode {})",
                        tid.path, tid.kind, tid.dev, tid.ino
                    ),
                });
            }
            // The target's marker names the migration that last took it:
            // another one (`stream start --overwrite-target` with another
            // state) means this state describes a target that is gone.
            match crate::target::identity::read_marker(&opts.target) {
                Ok(Some((m, place)))
                    if !m.migration.is_empty()
                        && header
                            .migration_id
                            .as_ref()
                            .is_some_and(|id| *id != m.migration) =>
                {
                    return Err(Error::Invalid(format!(
                        "the target {} was taken over by another migration since this one \
                         last ran (its {place} names state {}, source {}, phase {}): this \
                         state no longer describes it, and resuming would write over that \
                         migration. Use that migration's state, or give this one another target",
                        opts.target.display(),
                        m.state_dir,
                        m.source,
                        m.phase
                    )));
                }
                Ok(None) if opts.serving => state.mark_target(&header),
                _ => {}
            }
            (state, header, map, target, read_only)
        } else {
            let geometry = Geometry::new(sid.size, opts.chunk_size.unwrap_or(DEFAULT_CHUNK))
                .map_err(Error::Invalid)?;
            if geometry.size() == 0 {
                return Err(Error::Invalid("the source is empty (0 bytes)".into()));
            }
            let (target, created) = open_target(opts, sid.size, true)?;
            let header = Header {
                format: state::FORMAT.into(),
                version: state::VERSION,
                source: sid.clone(),
                target: target.id(created),
                size: sid.size,
                chunk_size: geometry.chunk_size(),
                phase: Phase::Streaming,
                created_at: now_secs(),
                finalized_at: None,
                finalize: None,
                migration_id: Some(state::new_migration_id(&opts.state_dir)),
            };
            let (state, map) = StateDir::create(&opts.state_dir, &header)?;
            Fingerprint::discard(&opts.state_dir)?;
            (state, header, map, target, false)
        };
        // The source must still be the disk the chunks came from. A
        // finalized migration fetches nothing (verify compares instead), so
        // its source is not sampled: that would read chunks over the link
        // that the comparison then reads or hashes anyway.
        let fingerprint = Arc::new(Fingerprint::load(&opts.state_dir, header.geometry())?);
        if !read_only {
            source
                .install_fingerprint(fingerprint.clone())
                .await
                .map_err(|e| Error::Invalid(e.to_string()))?;
        }
        // Read-only: no running marker, so no recovery and no replay, ever.
        let unclean = !read_only && state.mark_running()?;
        let state_io = |source| Error::StateIo {
            dir: opts.state_dir.clone(),
            source,
        };
        let mut replayed = Vec::new();
        if read_only {
            // Leave every file as it is: nothing is replayed onto the target.
        } else if unclean {
            // Make every logged in-place change whole before anything else
            // looks at the target.
            let (n, touched) = wal::replay(&opts.state_dir, &target)
                .await
                .map_err(state_io)?;
            if n > 0 {
                tracing::warn!(
                    "replayed {n} logged in-place changes cut short by the unclean stop"
                );
            }
            replayed = touched;
        } else {
            wal::remove_all(&opts.state_dir).map_err(state_io)?;
        }
        let wal = Wal::open(&opts.state_dir, !read_only).map_err(state_io)?;
        // The kept manifest: chunk records, stale where clients changed
        // chunks in place (replayed changes included: the map may not know
        // of their writes).
        let hashes = if read_only {
            None
        } else {
            let h = ChunkHashes::open(&opts.state_dir, &map, !unclean).map_err(state_io)?;
            let g = header.geometry();
            for (offset, len) in replayed {
                for i in g.chunks_of(offset, len.max(1)) {
                    h.mark_dirty(ChunkIndex(i));
                }
            }
            Some(Arc::new(h))
        };
        let volume = Arc::new(Volume {
            geometry: header.geometry(),
            source,
            target,
            map,
            locks: Arc::new(ChunkLocks::default()),
            state: Arc::new(state),
            sparse_target: header.target.created_sparse,
            header: Mutex::new(header),
            persist: tokio::sync::Mutex::new(()),
            wal,
            stats: Stats::default(),
            fg_active: AtomicUsize::new(0),
            fg_last: AtomicU64::new(0),
            readahead: Mutex::new(Readahead::default()),
            readahead_alive: Arc::new((AtomicUsize::new(0), tokio::sync::Notify::new())),
            requests: Arc::new(Requests::default()),
            cache_slots: tokio::sync::Semaphore::new(CACHE_SLOTS),
            opened: Instant::now(),
            fingerprint,
            read_only,
            hashes,
        });
        volume.stats.resume(&volume.state.load_totals());
        if unclean {
            volume.recover().await?;
        }
        Ok(volume)
    }

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
        last != 0
            && (self.opened.elapsed().as_nanos() as u64).saturating_sub(last)
                < window.as_nanos() as u64
    }

    fn note_foreground(&self) {
        let now = (self.opened.elapsed().as_nanos() as u64).max(1);
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

    /// Make the map consistent with the target after an unclean stop (see
    /// the module docs), and persist the result.
    async fn recover(&self) -> Result<()> {
        let target = self.target.clone();
        let size = self.geometry.size();
        let extents = tokio::task::spawn_blocking(move || target.data_extents(0, size))
            .await
            .map_err(|e| Error::ReadTarget {
                offset: 0,
                source: std::io::Error::other(e),
            })?
            .map_err(|source| Error::ReadTarget { offset: 0, source })?;
        let (mut punched, mut demoted) = (0u64, 0u64);
        for (s, e) in extents {
            for i in self.geometry.chunks_of(s, e - s) {
                let c = ChunkIndex(i);
                let r = self.geometry.bytes(c);
                match (self.map.state(c), self.sparse_target) {
                    (ChunkState::Data, _) | (ChunkState::Absent, false) => {}
                    (ChunkState::Absent | ChunkState::Zero, true) => {
                        self.target
                            .zero(r.start, r.end - r.start, false)
                            .await
                            .map_err(|source| Error::WriteTarget { index: c, source })?;
                        punched += 1;
                    }
                    (ChunkState::Zero, false) => {
                        let written = self.map.is_written(c);
                        self.stale(r.start, r.end - r.start);
                        self.map.set(c, ChunkState::Data, false);
                        self.state.record(c, ChunkState::Data, written);
                        demoted += 1;
                    }
                }
            }
        }
        tracing::warn!(
            "{}: the last run did not stop cleanly; unflushed writes were dropped \
             ({punched} chunks of the target cleared to match the map, {demoted} zero chunks now read from the target)",
            self.state.path().display()
        );
        self.flush().await
    }

    /// Read `[offset, offset + len)` as pieces.
    pub async fn read(self: &Arc<Self>, offset: u64, len: u64) -> Result<Vec<Piece>> {
        self.note_foreground();
        self.note_sequential(offset, len);
        let mut parts: Vec<BoxFuture<'_, Result<Piece>>> = Vec::new();
        let end = offset + len;
        let mut at = offset;
        let chunks = self.geometry.chunks_of(offset, len);
        let mut i = chunks.start;
        while i < chunks.end {
            let c = ChunkIndex(i);
            let state = self.map.state(c);
            // Extend a run of chunks in the same present state.
            let mut j = i + 1;
            if state != ChunkState::Absent {
                while j < chunks.end && self.map.state(ChunkIndex(j)) == state {
                    j += 1;
                }
            }
            let run_end = self.geometry.bytes(ChunkIndex(j - 1)).end.min(end);
            let (s, e) = (at, run_end);
            parts.push(match state {
                ChunkState::Zero => Box::pin(async move { Ok(Piece::Zero(e - s)) }),
                ChunkState::Data => Box::pin(async move {
                    self.target
                        .read_at(s, (e - s) as usize)
                        .await
                        .map(Piece::Data)
                        .map_err(|source| Error::ReadTarget { offset: s, source })
                }),
                ChunkState::Absent => Box::pin(self.read_absent(c, s, e)),
            });
            at = run_end;
            i = j;
        }
        let mut pieces = try_join_all(parts).await?;
        // Neighbouring zero pieces become one hole.
        pieces.dedup_by(|b, a| match (a, b) {
            (Piece::Zero(x), Piece::Zero(y)) => {
                *x += *y;
                true
            }
            _ => false,
        });
        Ok(pieces)
    }

    /// Serve `[s, e)` of chunk `c`, which was absent when looked at.
    async fn read_absent(self: &Arc<Self>, c: ChunkIndex, s: u64, e: u64) -> Result<Piece> {
        let r = self.geometry.bytes(c);
        let g = self.locks.lock(c).await;
        match self.map.state(c) {
            ChunkState::Zero => return Ok(Piece::Zero(e - s)),
            ChunkState::Data => {
                drop(g);
                return self
                    .target
                    .read_at(s, (e - s) as usize)
                    .await
                    .map(Piece::Data)
                    .map_err(|source| Error::ReadTarget { offset: s, source });
            }
            ChunkState::Absent => {}
        }
        let started = Instant::now();
        Stats::add(&self.stats.chunks_fetched_on_demand, 1);
        if s != r.start || e != r.end {
            return self.read_piece_first(g, s, e, started).await;
        }
        let fetched = match self.fetch_locked(&[g], Class::Foreground).await {
            Ok(f) => f,
            // The target is full: the chunk stays absent (nothing was
            // marked), but a read must not fail for want of room to cache
            // it. Serve it from the source, under the same lock.
            Err(err) if err.kind() == crate::error::ErrorKind::NoSpace => {
                let data = self
                    .source_read(s, (e - s) as usize, Class::Foreground)
                    .await
                    .map_err(|source| {
                        Stats::add(&self.stats.source_errors, 1);
                        Error::FetchChunk { index: c, source }
                    })?;
                Stats::add(&self.stats.bytes_fetched, e - s);
                self.stats.foreground_fetch.record(started.elapsed());
                return Ok(Piece::Data(data));
            }
            Err(err) => return Err(err),
        };
        self.stats.foreground_fetch.record(started.elapsed());
        Ok(match fetched {
            Fetched::Zero => Piece::Zero(e - s),
            Fetched::Data(buf) if s == r.start && e == r.end => Piece::Data(buf),
            Fetched::Data(buf) => {
                Piece::Data(buf[(s - r.start) as usize..(e - r.start) as usize].to_vec())
            }
        })
    }

    /// A client waits for `[s, e)`, part of the absent chunk locked by `g`:
    /// read just that piece (4 KiB aligned) from the source and answer with
    /// it, while a task that keeps the chunk's lock fetches and stores the
    /// whole chunk, in parallel on the foreground connection. The client
    /// waits one source round trip for a few KiB instead of for the whole
    /// chunk and its target write. The piece is never stored, so the chunk
    /// is still fetched once (invariant 2); the source does not change, so
    /// the piece equals what the chunk will hold, and any write to the
    /// chunk waits for the lock, so it lands after the chunk is stored.
    async fn read_piece_first(
        self: &Arc<Self>,
        g: ChunkGuard,
        s: u64,
        e: u64,
        started: Instant,
    ) -> Result<Piece> {
        let c = g.index();
        let r = self.geometry.bytes(c);
        let ps = (s & !4095).max(r.start);
        let pe = e.next_multiple_of(4096).min(r.end);
        let volume = self.clone();
        let alive = self.readahead_alive.clone();
        alive.0.fetch_add(1, Ordering::AcqRel);
        let whole = tokio::spawn(async move {
            let fetched = volume.fetch_locked(&[g], Class::Foreground).await;
            drop(volume);
            alive.0.fetch_sub(1, Ordering::AcqRel);
            alive.1.notify_waiters();
            fetched
        });
        let piece = {
            let _fg = ForegroundGuard::new(&self.fg_active);
            self.source_read(ps, (pe - ps) as usize, Class::Foreground)
                .await
        };
        match piece {
            Ok(data) if data.len() == (pe - ps) as usize => {
                Stats::add(&self.stats.bytes_fetched, pe - ps);
                self.stats.foreground_fetch.record(started.elapsed());
                Ok(Piece::Data(
                    data[(s - ps) as usize..(e - ps) as usize].to_vec(),
                ))
            }
            // Fall back on the whole chunk (its error, if it fails too).
            _ => {
                let fetched = whole.await.map_err(|join| Error::FetchChunk {
                    index: c,
                    source: std::io::Error::other(join),
                })??;
                self.stats.foreground_fetch.record(started.elapsed());
                Ok(match fetched {
                    Fetched::Zero => Piece::Zero(e - s),
                    Fetched::Data(buf) => {
                        Piece::Data(buf[(s - r.start) as usize..(e - r.start) as usize].to_vec())
                    }
                })
            }
        }
    }

    /// Fetch the contiguous absent chunks whose locks are `guards` (in
    /// order) with one source read, and store them. The returned buffer
    /// covers all of them (all zero and `Fetched::Zero` if every chunk was).
    pub async fn fetch_locked(&self, guards: &[ChunkGuard], class: Class) -> Result<Fetched> {
        let first = guards.first().expect("at least one chunk").index();
        let last = guards.last().expect("at least one chunk").index();
        let range = self.geometry.bytes(first).start..self.geometry.bytes(last).end;
        let len = (range.end - range.start) as usize;
        let _fg = (class == Class::Foreground).then(|| ForegroundGuard::new(&self.fg_active));
        let data = self
            .source_read(range.start, len, class)
            .await
            .map_err(|source| {
                Stats::add(&self.stats.source_errors, 1);
                Error::FetchChunk {
                    index: first,
                    source,
                }
            })?;
        if data.len() != len {
            return Err(Error::FetchChunk {
                index: first,
                source: std::io::Error::other("source returned a short read"),
            });
        }
        // Durable before the chunk can be marked present.
        self.fingerprint.offer_async(first.0, &data).await?;
        Stats::add(&self.stats.bytes_fetched, len as u64);
        // Which chunks are all zero, and the blake3 of the others for the
        // kept manifest, from the bytes in hand, off the runtime threads.
        let (g, start, keep) = (self.geometry, range.start, self.hashes.is_some());
        let chunks: Vec<ChunkIndex> = guards.iter().map(|g| g.index()).collect();
        let (data, zero, digests) = tokio::task::spawn_blocking(move || {
            let mut zero = Vec::with_capacity(chunks.len());
            let mut digests = Vec::with_capacity(chunks.len());
            for c in chunks {
                let r = g.bytes(c);
                let piece = &data[(r.start - start) as usize..(r.end - start) as usize];
                let z = is_zero(piece);
                zero.push(z);
                digests.push(match (z, keep) {
                    (false, true) => *blake3::hash(piece).as_bytes(),
                    _ => [0u8; 32],
                });
            }
            (data, zero, digests)
        })
        .await
        .map_err(|e| Error::FetchChunk {
            index: first,
            source: std::io::Error::other(e),
        })?;
        if zero.iter().all(|&z| z) {
            self.store_zero(first.0..last.0 + 1, false, false).await?;
            Stats::add(&self.stats.chunks_found_zero, guards.len() as u64);
            return Ok(Fetched::Zero);
        }
        let data = if zero.iter().any(|&z| z) {
            // Write only the data chunks; zero ones stay holes.
            for (g, z) in guards.iter().zip(&zero) {
                let c = g.index();
                let r = self.geometry.bytes(c);
                if *z {
                    self.store_zero(c.0..c.0 + 1, false, false).await?;
                    Stats::add(&self.stats.chunks_found_zero, 1);
                } else {
                    let piece = data
                        [(r.start - range.start) as usize..(r.end - range.start) as usize]
                        .to_vec();
                    self.target
                        .write_at(r.start, piece)
                        .await
                        .map_err(|source| self.target_error(c, source))?;
                    self.record_hashes(c, &digests[(c.0 - first.0) as usize..][..1])?;
                    self.mark(c, ChunkState::Data, false);
                }
            }
            data
        } else {
            let data = self
                .target
                .write_at(range.start, data)
                .await
                .map_err(|source| self.target_error(first, source))?;
            self.record_hashes(first, &digests)?;
            for g in guards {
                self.mark(g.index(), ChunkState::Data, false);
            }
            data
        };
        Ok(Fetched::Data(data))
    }

    /// Record the kept-manifest hashes of the chunks from `first`, after
    /// their target write and before they are marked present (the same
    /// order as the map: a flush syncs the records before the journal).
    fn record_hashes(&self, first: ChunkIndex, digests: &[[u8; 32]]) -> Result<()> {
        match &self.hashes {
            Some(h) => h
                .record_run(first, digests)
                .map_err(|source| self.wal_error(source)),
            None => Ok(()),
        }
    }

    /// Whether chunk `c` (present, data) has a current kept hash: recorded
    /// as it became present and not changed in place since.
    pub fn hash_is_kept(&self, c: ChunkIndex) -> bool {
        self.map.state(c) == ChunkState::Data
            && self.hashes.as_ref().is_some_and(|h| !h.is_dirty(c))
    }

    /// Chunks whose kept hash is stale (changed in place since).
    pub fn stale_hashes(&self) -> u64 {
        self.hashes.as_ref().map_or(0, |h| h.dirty_count())
    }

    /// The kept hashes of chunks `first..first + n` as stored (meaningful
    /// where [`Volume::hash_is_kept`]).
    pub async fn kept_hashes(&self, first: ChunkIndex, n: u64) -> Result<Vec<[u8; 32]>> {
        let Some(h) = self.hashes.clone() else {
            return Ok(vec![[0u8; 32]; n as usize]);
        };
        let dir = self.state.path().to_path_buf();
        tokio::task::spawn_blocking(move || h.read(first, n))
            .await
            .map_err(std::io::Error::other)
            .and_then(|r| r)
            .map(|b| {
                b.chunks_exact(32)
                    .map(|r| <[u8; 32]>::try_from(r).expect("32 bytes"))
                    .collect()
            })
            .map_err(|source| Error::StateIo { dir, source })
    }

    /// Re-derive up to `max` stale kept hashes from the target (the
    /// background pass behind finalize's speed): each chunk under its lock,
    /// so no client change can slip between the read and the record.
    /// Chunks someone holds are skipped this time. Returns how many were
    /// rehashed.
    pub async fn rehash_stale(&self, max: usize) -> Result<usize> {
        let Some(h) = self.hashes.clone() else {
            return Ok(0);
        };
        let mut done = 0;
        let mut from = 0;
        while done < max {
            let Some(c) = h.next_dirty(from) else { break };
            from = c.0 + 1;
            let Some(_g) = self.locks.try_lock(c) else {
                continue;
            };
            if !h.is_dirty(c) {
                continue;
            }
            if self.map.state(c) != ChunkState::Data {
                // Zero or absent: no record is read for it.
                continue;
            }
            let r = self.geometry.bytes(c);
            let data = self
                .target
                .read_at(r.start, (r.end - r.start) as usize)
                .await
                .map_err(|source| Error::ReadTarget {
                    offset: r.start,
                    source,
                })?;
            let digest = tokio::task::spawn_blocking(move || *blake3::hash(&data).as_bytes())
                .await
                .map_err(|e| Error::ReadTarget {
                    offset: r.start,
                    source: std::io::Error::other(e),
                })?;
            self.record_hashes(c, &[digest])?;
            done += 1;
        }
        Ok(done)
    }

    /// Chunks in `[offset, offset + len)` changed in place or by a client:
    /// their records are stale until rehashed.
    fn stale(&self, offset: u64, len: u64) {
        if let Some(h) = &self.hashes {
            for i in self.geometry.chunks_of(offset, len.max(1)) {
                h.mark_dirty(ChunkIndex(i));
            }
        }
    }

    /// Read the source, noted as what the current request waits for.
    async fn source_read(&self, offset: u64, len: usize, class: Class) -> std::io::Result<Vec<u8>> {
        let wait = Wait::SourceRead {
            offset,
            len: len as u64,
        };
        waiting(wait, self.source.read(offset, len, class)).await
    }

    /// The client requests in flight, for the watchdog and `status`.
    pub fn requests(&self) -> &Arc<Requests> {
        &self.requests
    }

    fn wal_error(&self, source: std::io::Error) -> Error {
        Error::PersistMap {
            dir: self.state.path().to_path_buf(),
            source,
        }
    }

    /// Bytes in the current generation of the write-ahead log.
    pub fn wal_len(&self) -> u64 {
        self.wal.len()
    }

    fn target_error(&self, index: ChunkIndex, source: std::io::Error) -> Error {
        Stats::add(&self.stats.target_errors, 1);
        Error::WriteTarget { index, source }
    }

    /// The one way a present chunk's bytes change in place (a write, or
    /// zeroing part or all of it): the change is logged first and applied
    /// while its log generation is held, so a crash in the middle of the
    /// target write is replayed whole (invariant 3, `wal`). `c` is the first
    /// chunk touched, locked by the caller with every other one.
    async fn change_in_place(&self, c: ChunkIndex, offset: u64, change: InPlace) -> Result<()> {
        match &change {
            InPlace::Write(d) => self.stale(offset, d.len() as u64),
            InPlace::Zero { len, .. } => self.stale(offset, *len),
        }
        let logged = self.wal.hold().await;
        let record = match &change {
            InPlace::Write(data) => Change::Write(data),
            &InPlace::Zero { len, allocate } => Change::Zero { len, allocate },
        };
        logged
            .log(offset, record)
            .await
            .map_err(|source| self.wal_error(source))?;
        let done = match change {
            InPlace::Write(data) => self.target.write_at(offset, data).await.map(drop),
            InPlace::Zero { len, allocate } => self.target.zero(offset, len, allocate).await,
        };
        drop(logged);
        done.map_err(|source| self.target_error(c, source))
    }

    /// Set the state of `c` and record it for the journal (under its lock,
    /// after the target write).
    fn mark(&self, c: ChunkIndex, state: ChunkState, written: bool) {
        self.map.set(c, state, written);
        self.state.record(c, state, self.map.is_written(c));
    }

    /// Make the chunks `run` (all locked by the caller) zero chunks. The
    /// target is only touched where it may hold something else: a target we
    /// did not create sparse, a chunk that held data, or `allocate`.
    async fn store_zero(&self, run: Range<u64>, written: bool, allocate: bool) -> Result<()> {
        let any_present = run
            .clone()
            .any(|i| self.map.state(ChunkIndex(i)) != ChunkState::Absent);
        if !self.sparse_target || allocate || any_present {
            let s = self.geometry.bytes(ChunkIndex(run.start)).start;
            let e = self.geometry.bytes(ChunkIndex(run.end - 1)).end;
            let first = ChunkIndex(run.start);
            if any_present {
                // Zeroing a present chunk changes it in place.
                let change = InPlace::Zero {
                    len: e - s,
                    allocate,
                };
                self.change_in_place(first, s, change).await?;
            } else {
                self.target
                    .zero(s, e - s, allocate)
                    .await
                    .map_err(|source| self.target_error(first, source))?;
            }
        }
        for i in run {
            self.mark(ChunkIndex(i), ChunkState::Zero, written);
        }
        Ok(())
    }

    /// Write `data` at `offset`; with `fua`, durable before returning.
    pub async fn write(&self, offset: u64, data: Vec<u8>, fua: bool) -> Result<()> {
        self.note_foreground();
        Stats::add(&self.stats.bytes_written_by_clients, data.len() as u64);
        let chunks = self.geometry.chunks_of(offset, data.len() as u64);
        if chunks.end - chunks.start == 1 {
            self.write_chunk(ChunkIndex(chunks.start), offset, data)
                .await?;
        } else {
            let mut parts = Vec::new();
            let mut at = offset;
            for i in chunks {
                let c = ChunkIndex(i);
                let e = self.geometry.bytes(c).end.min(offset + data.len() as u64);
                let piece = data[(at - offset) as usize..(e - offset) as usize].to_vec();
                parts.push(self.write_chunk(c, at, piece));
                at = e;
            }
            try_join_all(parts).await?;
        }
        if fua {
            self.flush().await?;
        }
        Ok(())
    }

    /// Write within one chunk (invariants 2 and 4).
    async fn write_chunk(&self, c: ChunkIndex, offset: u64, data: Vec<u8>) -> Result<()> {
        let _g = self.locks.lock(c).await;
        let r = self.geometry.bytes(c);
        let whole = offset == r.start && offset + data.len() as u64 == r.end;
        match self.map.state(c) {
            // The target holds the chunk (data, or zeros for a zero chunk):
            // write in place.
            ChunkState::Data | ChunkState::Zero => {
                self.change_in_place(c, offset, InPlace::Write(data))
                    .await?;
                if self.map.state(c) == ChunkState::Zero || !self.map.is_written(c) {
                    self.mark(c, ChunkState::Data, true);
                }
            }
            ChunkState::Absent if whole => {
                self.stale(offset, data.len() as u64);
                self.target
                    .write_at(offset, data)
                    .await
                    .map_err(|source| self.target_error(c, source))?;
                self.mark(c, ChunkState::Data, true);
            }
            ChunkState::Absent => {
                // Fetch, overlay, write the whole chunk once.
                let started = Instant::now();
                let _fg = ForegroundGuard::new(&self.fg_active);
                let mut buf = self
                    .source_read(r.start, (r.end - r.start) as usize, Class::Foreground)
                    .await
                    .map_err(|source| {
                        Stats::add(&self.stats.source_errors, 1);
                        Error::FetchChunk { index: c, source }
                    })?;
                // The source's bytes, before the client's overlay.
                self.fingerprint.offer_async(c.0, &buf).await?;
                Stats::add(&self.stats.bytes_fetched, r.end - r.start);
                Stats::add(&self.stats.chunks_fetched_on_demand, 1);
                self.stats.foreground_fetch.record(started.elapsed());
                let at = (offset - r.start) as usize;
                buf[at..at + data.len()].copy_from_slice(&data);
                self.stale(r.start, r.end - r.start);
                self.target
                    .write_at(r.start, buf)
                    .await
                    .map_err(|source| self.target_error(c, source))?;
                self.mark(c, ChunkState::Data, true);
            }
        }
        Ok(())
    }

    /// Trim: whole chunks become zero chunks (punched); partial chunks are
    /// left as they are, which the spec allows for a hint.
    pub async fn trim(&self, offset: u64, len: u64, fua: bool) -> Result<()> {
        Stats::add(&self.stats.bytes_written_by_clients, len);
        self.zero_range(offset, len, false, false).await?;
        if fua {
            self.flush().await?;
        }
        Ok(())
    }

    /// Write zeroes. `allocate` is NBD's NO_HOLE; with `fast`, fail with
    /// `ENOTSUP` (before changing anything) if a partial chunk would need a
    /// fetch.
    pub async fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        allocate: bool,
        fast: bool,
        fua: bool,
    ) -> Result<std::result::Result<(), FastZeroUnsupported>> {
        if fast {
            let chunks = self.geometry.chunks_of(offset, len);
            let needs_fetch = [chunks.start, chunks.end - 1].into_iter().any(|i| {
                let c = ChunkIndex(i);
                !self.geometry.covers(c, offset, len) && self.map.state(c) == ChunkState::Absent
            });
            if needs_fetch {
                return Ok(Err(FastZeroUnsupported));
            }
        }
        Stats::add(&self.stats.bytes_written_by_clients, len);
        self.zero_range(offset, len, allocate, true).await?;
        if fua {
            self.flush().await?;
        }
        Ok(Ok(()))
    }

    async fn zero_range(&self, offset: u64, len: u64, allocate: bool, partial: bool) -> Result<()> {
        let end = offset + len;
        let chunks = self.geometry.chunks_of(offset, len);
        let mut whole_run: Vec<ChunkGuard> = Vec::new();
        for i in chunks {
            let c = ChunkIndex(i);
            if self.geometry.covers(c, offset, len) {
                let g = self.locks.lock(c).await;
                let already = self.map.state(c) == ChunkState::Zero && self.map.is_written(c);
                if already && !allocate {
                    continue;
                }
                // Keep runs short so locks are not held across huge ranges.
                if whole_run.len() == 1024 {
                    self.zero_locked_run(&mut whole_run, allocate).await?;
                }
                whole_run.push(g);
                continue;
            }
            self.zero_locked_run(&mut whole_run, allocate).await?;
            if !partial {
                continue;
            }
            let r = self.geometry.bytes(c);
            let (s, e) = (offset.max(r.start), end.min(r.end));
            let g = self.locks.lock(c).await;
            match self.map.state(c) {
                ChunkState::Zero => self.mark(c, ChunkState::Zero, true),
                ChunkState::Data => {
                    let change = InPlace::Zero {
                        len: e - s,
                        allocate: true,
                    };
                    self.change_in_place(c, s, change).await?;
                    self.mark(c, ChunkState::Data, true);
                }
                ChunkState::Absent => {
                    drop(g);
                    self.write_chunk(c, s, vec![0u8; (e - s) as usize]).await?;
                }
            }
        }
        self.zero_locked_run(&mut whole_run, allocate).await
    }

    /// Zero the locked whole chunks in `run` (contiguous stretches share one
    /// target call) and release them.
    async fn zero_locked_run(&self, run: &mut Vec<ChunkGuard>, allocate: bool) -> Result<()> {
        let mut start = 0;
        while start < run.len() {
            let mut end = start + 1;
            while end < run.len() && run[end].index().0 == run[end - 1].index().0 + 1 {
                end += 1;
            }
            let first = run[start].index().0;
            let last = run[end - 1].index().0;
            self.store_zero(first..last + 1, true, allocate).await?;
            start = end;
        }
        run.clear();
        Ok(())
    }

    /// Make every write that completed before this call durable, with the
    /// map entries that describe it (invariant 3; order in `state`).
    pub async fn flush(&self) -> Result<()> {
        let _one_at_a_time = waiting(Wait::FlushQueue, self.persist.lock()).await;
        // Every in-place change logged so far reaches the target before the
        // sync below; the log that covers them can go once it is done.
        let retired = self
            .wal
            .rotate()
            .await
            .map_err(|source| self.wal_error(source))?;
        let entries = self.state.take_pending();
        let snapshot = (self.state.journal_len() > state::CHECKPOINT_AFTER)
            .then(|| state::map_bytes(&self.map));
        let checkpointed = snapshot.is_some();
        if let Err(e) = self.target.sync().await {
            self.state.restore_pending(entries);
            Stats::add(&self.stats.target_errors, 1);
            return Err(Error::SyncTarget(e));
        }
        let st = self.state.clone();
        let hashes = self.hashes.clone();
        let dir = self.state.path().to_path_buf();
        let journal = tokio::task::spawn_blocking(move || {
            // The records of the chunks the journal is about to call
            // present, durable before it does.
            if let Some(Err(source)) = hashes.as_ref().map(|h| h.sync()) {
                st.restore_pending(entries);
                return Err(Error::PersistMap { dir, source });
            }
            if let Err(e) = st.append(&entries) {
                st.restore_pending(entries);
                return Err(e);
            }
            match snapshot {
                Some(s) => st.checkpoint(&s),
                None => Ok(()),
            }
        });
        waiting(Wait::Journal, journal)
            .await
            .map_err(|e| Error::PersistMap {
                dir: self.state.path().to_path_buf(),
                source: std::io::Error::other(e),
            })??;
        self.wal
            .remove(retired)
            .map_err(|source| self.wal_error(source))?;
        if checkpointed {
            self.save_totals().await?;
        }
        Ok(())
    }

    /// Save the cumulative counters beside the state.
    pub async fn save_totals(&self) -> Result<()> {
        let st = self.state.clone();
        let totals = self.stats.totals();
        tokio::task::spawn_blocking(move || st.save_totals(&totals))
            .await
            .map_err(|e| Error::PersistMap {
                dir: self.state.path().to_path_buf(),
                source: std::io::Error::other(e),
            })?
    }

    /// Entries waiting for the next flush.
    pub fn pending_entries(&self) -> usize {
        self.state.pending()
    }

    /// Wait until no background task (readahead, whole-chunk fetch) runs:
    /// they hold the volume.
    pub async fn idle(&self) {
        loop {
            let done = self.readahead_alive.1.notified();
            tokio::pin!(done);
            done.as_mut().enable();
            if self.readahead_alive.0.load(Ordering::Acquire) == 0 {
                return;
            }
            done.await;
        }
    }

    /// Final persist and checkpoint of a clean stop.
    pub async fn close(&self) -> Result<()> {
        self.idle().await;
        self.flush().await?;
        let _g = self.persist.lock().await;
        let st = self.state.clone();
        let snapshot = state::map_bytes(&self.map);
        let totals = self.stats.totals();
        let hashes = self.hashes.clone();
        let dir = self.state.path().to_path_buf();
        tokio::task::spawn_blocking(move || {
            st.checkpoint(&snapshot)?;
            st.save_totals(&totals)?;
            // Which kept hashes are stale, for the next open (an unclean
            // stop takes every written chunk as stale instead).
            if let Some(Err(source)) = hashes.as_ref().map(|h| h.save_dirty()) {
                return Err(Error::PersistMap { dir, source });
            }
            st.mark_clean()
        })
        .await
        .map_err(|e| Error::PersistMap {
            dir: self.state.path().to_path_buf(),
            source: std::io::Error::other(e),
        })?
    }

    /// Learn the source's holes in `[offset, offset + len)`: whole absent
    /// chunks inside an extent the source says reads as zeros become zero
    /// chunks without a fetch. Chunks someone else holds are skipped.
    /// Returns how many chunks were learnt.
    pub async fn learn_holes(&self, offset: u64, len: u64) -> Result<u64> {
        let extents = match self.source.block_status(offset, len).await {
            Ok(Some(e)) => e,
            Ok(None) => return Ok(0),
            Err(e) => {
                tracing::debug!("source block status failed: {e}");
                return Ok(0);
            }
        };
        let mut learnt = 0;
        let mut at = offset;
        for Extent { length, zero, .. } in extents {
            let (s, e) = (at, (at + length).min(self.geometry.size()));
            at = e;
            if !zero || e <= s {
                continue;
            }
            let first = s.div_ceil(self.geometry.chunk_size());
            let last = self.geometry.chunks_of(s, e - s).end;
            let mut run = Vec::new();
            for i in first..last {
                let c = ChunkIndex(i);
                if !self.geometry.covers(c, s, e - s) || self.map.state(c) != ChunkState::Absent {
                    continue;
                }
                let Some(g) = self.locks.try_lock(c) else {
                    continue;
                };
                if self.map.state(c) != ChunkState::Absent {
                    continue;
                }
                if run
                    .last()
                    .is_some_and(|p: &ChunkGuard| p.index().0 + 1 != i)
                {
                    learnt += self.zero_source_run(&mut run).await?;
                }
                run.push(g);
                if run.len() >= 4096 {
                    learnt += self.zero_source_run(&mut run).await?;
                }
            }
            learnt += self.zero_source_run(&mut run).await?;
            if at >= offset + len {
                break;
            }
        }
        Ok(learnt)
    }

    async fn zero_source_run(&self, run: &mut Vec<ChunkGuard>) -> Result<u64> {
        let Some(first) = run.first().map(|g| g.index().0) else {
            return Ok(0);
        };
        let n = run.len() as u64;
        self.store_zero(first..first + n, false, false).await?;
        Stats::add(&self.stats.chunks_source_holes, n);
        run.clear();
        Ok(n)
    }

    /// Allocation of the volume from `offset`. Zero is reported only where
    /// it is known: zero chunks (source holes, trimmed or zeroed chunks,
    /// chunks found all zero). Absent chunks are reported as data, after
    /// asking the source about its holes.
    pub async fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        let end = (offset + len).min(self.geometry.size());
        let chunks = self.geometry.chunks_of(offset, end - offset);
        if chunks
            .clone()
            .any(|i| self.map.state(ChunkIndex(i)) == ChunkState::Absent)
        {
            self.learn_holes(offset, end - offset).await?;
        }
        let mut out: Vec<Extent> = Vec::new();
        for i in chunks {
            let c = ChunkIndex(i);
            let r = self.geometry.bytes(c);
            let n = r.end.min(end) - r.start.max(offset);
            let ext = match self.map.state(c) {
                ChunkState::Zero => Extent {
                    length: n,
                    hole: self.sparse_target,
                    zero: true,
                },
                ChunkState::Data | ChunkState::Absent => Extent::data(n),
            };
            match out.last_mut() {
                Some(l) if (l.hole, l.zero) == (ext.hole, ext.zero) => l.length += n,
                _ => out.push(ext),
            }
        }
        Ok(out)
    }

    /// Prefetch `[offset, offset + len)` (NBD CACHE): fetch the absent
    /// chunks into the target and drop the bytes. Memory is bounded
    /// whatever the length and however many CACHE requests run: runs of at
    /// most [`MAX_RUN`] chunks, at most [`CACHE_SLOTS`] runs at a time on
    /// the volume (issue 13: one 512 MiB CACHE held 512 MiB, once per
    /// request in flight).
    pub async fn cache(self: &Arc<Self>, offset: u64, len: u64) -> Result<()> {
        let chunks = self.geometry.chunks_of(offset, len);
        let mut i = chunks.start;
        while i < chunks.end {
            let c = ChunkIndex(i);
            if self.map.state(c) != ChunkState::Absent {
                i += 1;
                continue;
            }
            // A prefetch hint yields to clients as hydration does: while
            // they are busy, one run at a time on the volume, after giving
            // their requests a head start.
            let busy = self.foreground_busy(CACHE_YIELD_WINDOW);
            if busy {
                let deadline = Instant::now() + CACHE_YIELD_WINDOW;
                while self.foreground_busy(CACHE_YIELD_WINDOW) && Instant::now() < deadline {
                    tokio::time::sleep(std::time::Duration::from_millis(1)).await;
                }
            }
            let slots = if busy { CACHE_SLOTS as u32 } else { 1 };
            let _slot = self
                .cache_slots
                .acquire_many(slots)
                .await
                .expect("never closed");
            let max = ((chunks.end - i) as usize).min(MAX_RUN);
            let mut guards = self.lock_run(c, max);
            if guards.is_empty() {
                // Someone else is changing it: wait for them, then look again.
                let g = self.locks.lock(c).await;
                if self.map.state(c) != ChunkState::Absent {
                    i += 1;
                    continue;
                }
                guards.push(g);
            }
            let n = guards.len();
            self.fetch_locked(&guards, Class::Background).await?;
            Stats::add(&self.stats.chunks_fetched_on_demand, n as u64);
            i += n as u64;
        }
        Ok(())
    }

    /// Sequential reads of absent data (a booting OS) start readahead of the
    /// chunks that follow, in a window that doubles up to [`MAX_READAHEAD`].
    fn note_sequential(self: &Arc<Self>, offset: u64, len: u64) {
        let end = offset + len;
        let next = self.geometry.chunk_of(end.min(self.geometry.size() - 1)).0;
        {
            let mut ra = self.readahead.lock().expect("poisoned");
            let sequential =
                offset == ra.next && offset != 0 || (offset < ra.next && end > ra.next);
            ra.next = end;
            if !sequential {
                ra.window = 0;
                return;
            }
            ra.window = (ra.window * 2).clamp(4, MAX_READAHEAD);
            let until = (next + ra.window).min(self.geometry.chunks());
            if ra.running {
                // Extend the window of the task that runs.
                ra.at = ra.at.max(next);
                ra.until = ra.until.max(until);
            } else {
                (ra.at, ra.until) = (next, until);
            }
            if ra.running || ra.at >= ra.until {
                return;
            }
            ra.running = true;
        }
        self.readahead_alive.0.fetch_add(1, Ordering::AcqRel);
        let volume = self.clone();
        let alive = self.readahead_alive.clone();
        tokio::spawn(async move {
            loop {
                let (i, until) = {
                    let mut ra = volume.readahead.lock().expect("poisoned");
                    if ra.at >= ra.until {
                        ra.running = false;
                        break;
                    }
                    (ra.at, ra.until)
                };
                let n = match volume
                    .fetch_run_from(
                        ChunkIndex(i),
                        ((until - i) as usize).min(MAX_RUN),
                        Class::Foreground,
                    )
                    .await
                {
                    // Present or busy (a client is fetching it): move on.
                    Ok(0) | Err(_) => 1,
                    Ok(n) => n as u64,
                };
                let mut ra = volume.readahead.lock().expect("poisoned");
                ra.at = ra.at.max(i + n);
            }
            drop(volume);
            alive.0.fetch_sub(1, Ordering::AcqRel);
            alive.1.notify_waiters();
        });
    }

    /// Lock up to `max` contiguous absent chunks from `start` (skipping none:
    /// the run stops at the first present or busy chunk), fetch them with
    /// one source read and store them. Returns how many chunks it covered
    /// (0 if `start` was present or busy).
    pub async fn fetch_run_from(
        &self,
        start: ChunkIndex,
        max: usize,
        class: Class,
    ) -> Result<usize> {
        let guards = self.lock_run(start, max);
        self.fetch_run(guards, class).await
    }

    /// Lock up to `max` contiguous absent chunks from `start`, without
    /// waiting: the run stops at the first present or busy chunk.
    pub fn lock_run(&self, start: ChunkIndex, max: usize) -> Vec<ChunkGuard> {
        let mut guards = Vec::new();
        let mut i = start.0;
        while guards.len() < max && i < self.geometry.chunks() {
            let c = ChunkIndex(i);
            if self.map.state(c) != ChunkState::Absent {
                break;
            }
            let Some(g) = self.locks.try_lock(c) else {
                break;
            };
            if self.map.state(c) != ChunkState::Absent {
                break;
            }
            guards.push(g);
            i += 1;
        }
        guards
    }

    /// Fetch and store a run locked by [`Volume::lock_run`]; returns its length.
    pub async fn fetch_run(&self, guards: Vec<ChunkGuard>, class: Class) -> Result<usize> {
        if guards.is_empty() {
            return Ok(0);
        }
        self.fetch_locked(&guards, class).await?;
        Stats::add(&self.stats.chunks_hydrated, guards.len() as u64);
        Ok(guards.len())
    }
}

/// A snapshot of a volume's progress and counters (`stream status`).
#[derive(Clone, Debug, serde::Serialize)]
pub struct Status {
    pub phase: Phase,
    pub source: String,
    pub target: String,
    pub state_dir: String,
    pub size: u64,
    pub chunk_size: u64,
    pub chunks_total: u64,
    pub chunks_present: u64,
    pub bytes_present: u64,
    pub chunks_zero: u64,
    pub chunks_written: u64,
    pub bytes_fetched: u64,
    pub chunks_fetched_on_demand: u64,
    pub chunks_hydrated: u64,
    pub chunks_source_holes: u64,
    pub chunks_found_zero: u64,
    pub foreground_fetches: u64,
    pub foreground_fetch_p50_us: Option<u64>,
    pub foreground_fetch_p99_us: Option<u64>,
    pub source_health: crate::source::Health,
    /// `down` with the error while target writes fail (a full target).
    pub target_health: crate::source::Health,
    pub source_errors: u64,
    pub target_errors: u64,
    pub hydration_complete: bool,
    pub uptime_secs: f64,
    /// Client requests in flight now.
    pub requests_in_flight: u64,
    /// Age of the oldest of them (a stuck request shows here).
    pub oldest_request_secs: Option<f64>,
}

impl<S: Source> Volume<S> {
    pub fn status(&self) -> Status {
        let h = self.header();
        let g = self.geometry;
        let present = self.map.present_count();
        let last = ChunkIndex(g.chunks() - 1);
        // Every chunk is chunk_size long but the last.
        let short = g.chunk_size() - (g.bytes(last).end - g.bytes(last).start);
        let bytes_present =
            present * g.chunk_size() - if self.map.is_present(last) { short } else { 0 };
        let s = &self.stats;
        Status {
            phase: h.phase,
            source: h.source.location,
            target: h.target.path,
            state_dir: self.state.path().display().to_string(),
            size: g.size(),
            chunk_size: g.chunk_size(),
            chunks_total: g.chunks(),
            chunks_present: present,
            bytes_present,
            chunks_zero: self.map.zero_count(),
            chunks_written: self.map.written_count(),
            bytes_fetched: Stats::get(&s.bytes_fetched),
            chunks_fetched_on_demand: Stats::get(&s.chunks_fetched_on_demand),
            chunks_hydrated: Stats::get(&s.chunks_hydrated),
            chunks_source_holes: Stats::get(&s.chunks_source_holes),
            chunks_found_zero: Stats::get(&s.chunks_found_zero),
            foreground_fetches: s.foreground_fetch.count(),
            foreground_fetch_p50_us: s.foreground_fetch.quantile_us(0.5),
            foreground_fetch_p99_us: s.foreground_fetch.quantile_us(0.99),
            source_health: self.source.health(),
            target_health: self.target.health(),
            source_errors: Stats::get(&s.source_errors),
            target_errors: Stats::get(&s.target_errors),
            hydration_complete: self.map.is_complete(),
            uptime_secs: self.opened.elapsed().as_secs_f64(),
            requests_in_flight: self.requests.len() as u64,
            oldest_request_secs: self.requests.oldest_age().map(|d| d.as_secs_f64()),
        }
    }
}

/// A fast write-zeroes could not be fast (NBD answers `ENOTSUP`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FastZeroUnsupported;
