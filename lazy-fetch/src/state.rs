//! The state directory of one migration, and how the presence map is made
//! durable.
//!
//! Files:
//!
//! | file         | content                                                    |
//! |--------------|------------------------------------------------------------|
//! | `state.json` | header: source, target, sizes, chunk size, phase; checksummed |
//! | `map`        | checkpoint: the three bitmaps, a generation, a checksum     |
//! | `journal`    | batches of chunk state changes since the checkpoint         |
//! | `lock`       | `flock`ed by the running `stream start` (holds its pid)     |
//! | `fingerprint.json` | blake3 of sampled source chunks (one per 1/16 of the disk), checked on resume and reconnect |
//! | `wal.N`      | the write-ahead log of in-place changes (see `wal`)         |
//! | `hashes`     | the kept manifest's records (see `hashes`)                  |
//!
//! Durability order (invariant 1: a chunk marked present in the durable
//! state has its correct data durable in the target):
//!
//! 1. the volume writes the chunk's data to the target, then sets its bits,
//!    then [`StateDir::record`]s an entry, all under the chunk's lock;
//! 2. a persist cycle takes the recorded entries, syncs the target, and
//!    only then appends the entries to the journal and syncs the journal.
//!
//! An entry taken in step 2 was recorded after its target write completed,
//! so the sync covers it. A checkpoint snapshots the bitmaps *before* that
//! target sync, for the same reason, and is written with the next
//! generation; the journal is then restarted with that generation, and a
//! journal whose generation differs from the checkpoint's is stale and
//! ignored (the checkpoint already contains it).
//!
//! Every batch carries a sequence number and a checksum. At open, replay
//! stops at the first bad batch; if nothing valid follows it, it was a torn
//! write of an unacknowledged flush and is cut off; if a valid batch
//! follows, the journal is damaged in the middle and the state is refused
//! rather than trusted.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, FileExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::presence::{Bitmap, ChunkState, PresenceMap};
use crate::units::{ChunkIndex, Geometry};

pub const FORMAT: &str = "stream-state";
pub const VERSION: u32 = 1;

const MAP_MAGIC: &[u8; 8] = b"STRMMAP1";
const JOURNAL_MAGIC: &[u8; 8] = b"STRMJRN1";
const BATCH_MAGIC: u32 = 0x4a42_4154; // "JBAT"
const HASH_LEN: usize = 16;
/// Journal size after which a persist cycle also writes a checkpoint.
pub const CHECKPOINT_AFTER: u64 = 16 << 20;

/// Phase of a migration.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Serving and hydrating.
    Streaming,
    /// `finalize` has started: hydrate, flush, manifest, verify.
    Finalizing,
    /// The target is native storage now; never served again.
    Finalized,
}

/// What identifies the source.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceId {
    /// `file` or `nbd`.
    pub kind: String,
    /// Canonical path or NBD URI.
    pub location: String,
    pub size: u64,
}

/// What identifies the target.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TargetId {
    pub path: String,
    /// `file` or `block`.
    pub kind: String,
    pub size: u64,
    /// Device and inode of a file, or the device number of a block device:
    /// a target replaced by another file of the same name is caught.
    pub dev: u64,
    pub ino: u64,
    /// We created the target sparse, so every chunk not yet written reads
    /// as zeros; zero chunks then need no target write at all.
    pub created_sparse: bool,
}

/// `state.json`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Header {
    pub format: String,
    pub version: u32,
    pub source: SourceId,
    pub target: TargetId,
    pub size: u64,
    pub chunk_size: u64,
    pub phase: Phase,
    /// Unix seconds.
    pub created_at: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finalized_at: Option<u64>,
    /// Progress of `stream finalize`, so an interrupted run resumes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finalize: Option<FinalizeRecord>,
    /// Names this migration apart from any other (see [`new_migration_id`]);
    /// the target's marker carries it too. Absent in states made before
    /// markers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migration_id: Option<String>,
    /// Set once by `stream detach` when every chunk is present and durable:
    /// from then on the guest may be switched onto the target at any moment
    /// and write it directly, so nothing of the stream writes the target on
    /// its own again (see `Volume::prepare_detach`). Never cleared.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detach: Option<DetachRecord>,
}

/// When `stream detach` made the target shared with the guest.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DetachRecord {
    /// Unix seconds.
    pub prepared_at: u64,
}

/// A new migration's identifier: 128 bits of blake3 over the time in
/// nanoseconds, the pid, the state directory and a process-wide counter.
/// Two migrations created in the same second still differ.
pub fn new_migration_id(dir: &Path) -> String {
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let h = hash16(&[
        &nanos.to_le_bytes(),
        &std::process::id().to_le_bytes(),
        &n.to_le_bytes(),
        dir.as_os_str().as_encoded_bytes(),
    ]);
    h.iter().map(|b| format!("{b:02x}")).collect()
}

/// What `stream finalize` has done so far. Steps are recorded after they
/// complete; a step with an outside effect (the Cinder manage call) records
/// its intent first, so a rerun looks before it calls again.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FinalizeRecord {
    pub started_at: u64,
    /// The manifest describes the target as it is now (cleared if the
    /// volume is served again, since clients may write).
    #[serde(default)]
    pub manifest_written: bool,
    #[serde(default)]
    pub verified: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cinder: Option<CinderRecord>,
}

/// The Cinder manage-existing step.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CinderRecord {
    /// `host@backend#pool` given to finalize.
    pub host: String,
    /// The LV name Cinder was asked to adopt.
    pub source_name: String,
    /// Name asked for the new volume.
    pub volume_name: Option<String>,
    /// Set once Cinder answered with the new volume.
    pub volume_id: Option<String>,
}

#[derive(Serialize, Deserialize)]
struct Sealed {
    header: Header,
    /// blake3 of the canonical JSON of `header`.
    checksum: String,
}

fn hash16(parts: &[&[u8]]) -> [u8; HASH_LEN] {
    let mut h = blake3::Hasher::new();
    for p in parts {
        h.update(p);
    }
    let mut out = [0u8; HASH_LEN];
    out.copy_from_slice(&h.finalize().as_bytes()[..HASH_LEN]);
    out
}

/// Write `bytes` to `dir/name` atomically: temp file, fsync, rename, fsync dir.
fn write_atomic(dir: &Path, name: &str, bytes: &[u8]) -> io::Result<()> {
    let tmp = dir.join(format!(".{name}.tmp"));
    {
        let mut f = File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    fs::rename(&tmp, dir.join(name))?;
    File::open(dir)?.sync_all()
}

impl Header {
    pub fn geometry(&self) -> Geometry {
        Geometry::new(self.size, self.chunk_size).expect("validated when the header was loaded")
    }

    fn seal(&self) -> Vec<u8> {
        let canonical = serde_json::to_vec(self).expect("header serialises");
        let sealed = Sealed {
            header: self.clone(),
            checksum: blake3::hash(&canonical).to_hex().to_string(),
        };
        let mut v = serde_json::to_vec_pretty(&sealed).expect("header serialises");
        v.push(b'\n');
        v
    }

    fn unseal(path: &Path, bytes: &[u8]) -> Result<Header> {
        let corrupt = |detail: String| Error::StateCorrupt {
            path: path.to_path_buf(),
            detail,
        };
        let sealed: Sealed =
            serde_json::from_slice(bytes).map_err(|e| corrupt(format!("not valid JSON: {e}")))?;
        let h = sealed.header;
        if h.format != FORMAT {
            return Err(corrupt(format!("format is {:?}, not {FORMAT:?}", h.format)));
        }
        if h.version != VERSION {
            return Err(corrupt(format!(
                "version {} is not the version {VERSION} this stream reads",
                h.version
            )));
        }
        let canonical = serde_json::to_vec(&h).expect("header serialises");
        if blake3::hash(&canonical).to_hex().as_str() != sealed.checksum {
            return Err(corrupt("checksum does not match the content".into()));
        }
        Geometry::new(h.size, h.chunk_size).map_err(corrupt)?;
        Ok(h)
    }
}

/// Where a migration's state lives when `--state` is not given: beside a
/// target file (`DIR/.NAME.stream`), or under `/var/lib/stream/` for a block
/// device (whose directory, such as /dev/VG, is no place for it).
pub fn default_dir(target: &Path) -> PathBuf {
    use std::os::unix::fs::FileTypeExt;
    let is_block = fs::metadata(target)
        .map(|m| m.file_type().is_block_device())
        .unwrap_or(false);
    if is_block || target.starts_with("/dev") {
        let flat: String = target
            .to_string_lossy()
            .trim_start_matches('/')
            .chars()
            .map(|c| if c == '/' { '_' } else { c })
            .collect();
        return PathBuf::from("/var/lib/stream").join(flat);
    }
    let name = target
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "target".into());
    let parent = target
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    parent.join(format!(".{name}.stream"))
}

/// The control socket of the `stream start` serving this state directory.
pub fn control_socket(dir: &Path) -> PathBuf {
    dir.join("control.sock")
}

/// An open, locked state directory.
#[derive(Debug)]
pub struct StateDir {
    dir: PathBuf,
    _lock: Lock,
    journal: Mutex<Journal>,
    /// Entries recorded since the last persist cycle took them.
    dirty: Mutex<Vec<u64>>,
}

/// The two `flock`s held while a state directory is open.
#[derive(Debug)]
struct Lock {
    _dir: File,
    _file: File,
}

#[derive(Debug)]
struct Journal {
    file: File,
    generation: u64,
    len: u64,
    next_seq: u64,
}

/// A journal entry: a run of `count` chunks from `c` that became `state`.
/// Bits: chunk index (42) | count - 1 (20) | written (1) | zero (1).
/// Hydration and hole learning make long runs, so one entry often stands
/// for thousands of chunks.
const COUNT_BITS: u32 = 20;
const MAX_COUNT: u64 = 1 << COUNT_BITS;

fn entry(c: ChunkIndex, count: u64, state: ChunkState, written: bool) -> u64 {
    debug_assert!((1..=MAX_COUNT).contains(&count) && c.0 < 1 << 42);
    let zero = match state {
        ChunkState::Zero => 1,
        ChunkState::Data => 0,
        ChunkState::Absent => panic!("absent is never journaled"),
    };
    (c.0 << (COUNT_BITS + 2)) | ((count - 1) << 2) | (u64::from(written) << 1) | zero
}

fn entry_parts(e: u64) -> (u64, u64, u64) {
    (
        e >> (COUNT_BITS + 2),
        ((e >> 2) & (MAX_COUNT - 1)) + 1,
        e & 3,
    )
}

fn apply(map: &PresenceMap, e: u64) -> bool {
    let (first, count, flags) = entry_parts(e);
    if first
        .checked_add(count)
        .is_none_or(|end| end > map.chunks())
    {
        return false;
    }
    let state = if flags & 1 != 0 {
        ChunkState::Zero
    } else {
        ChunkState::Data
    };
    for i in first..first + count {
        map.set(ChunkIndex(i), state, flags & 2 != 0);
    }
    true
}

impl StateDir {
    pub fn path(&self) -> &Path {
        &self.dir
    }

    fn io(&self, source: io::Error) -> Error {
        Error::StateIo {
            dir: self.dir.clone(),
            source,
        }
    }

    /// Lock the state directory for this process: `flock` on the
    /// directory itself, which cannot be unlinked from under us while it
    /// holds the state (a `lock` file can: deleting it let a second
    /// `stream start` lock a new file of the same name), then on the
    /// `lock` file, which holds the pid for the refusal message and is what
    /// `stream finalize` and `status` probe.
    fn lock(dir: &Path) -> Result<Lock> {
        let io = |source| Error::StateIo {
            dir: dir.to_path_buf(),
            source,
        };
        let holder = || {
            fs::read_to_string(dir.join("lock"))
                .map(|s| format!("pid {}", s.trim()))
                .unwrap_or_else(|_| "its lock file was removed".into())
        };
        let d = File::open(dir).map_err(io)?;
        // SAFETY: flock on an fd we own.
        if unsafe { libc::flock(d.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            return Err(Error::Locked {
                dir: dir.to_path_buf(),
                holder: holder(),
            });
        }
        let path = dir.join("lock");
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(io)?;
        // SAFETY: flock on an fd we own.
        let r = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if r != 0 {
            return Err(Error::Locked {
                dir: dir.to_path_buf(),
                holder: holder(),
            });
        }
        f.set_len(0).ok();
        let _ = f.write_all_at(std::process::id().to_string().as_bytes(), 0);
        Ok(Lock { _dir: d, _file: f })
    }

    /// Whether a process holds the state in `dir` (a running `stream
    /// start`): probed on the directory's own lock, which no one can
    /// remove from under its holder. Taken and released at once.
    pub fn in_use(dir: &Path) -> Result<bool> {
        let d = File::open(dir).map_err(|source| Error::StateIo {
            dir: dir.to_path_buf(),
            source,
        })?;
        // SAFETY: flock on an fd we own; released when it is closed below.
        let free = unsafe { libc::flock(d.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0;
        Ok(!free)
    }

    /// Whether `dir` holds a migration's state.
    pub fn exists(dir: &Path) -> bool {
        dir.join("state.json").exists()
    }

    /// Read the header only, without locking (for `status` and `finalize`
    /// run beside a live `start`).
    pub fn read_header(dir: &Path) -> Result<Header> {
        let path = dir.join("state.json");
        let bytes = fs::read(&path).map_err(|source| Error::StateIo {
            dir: dir.to_path_buf(),
            source,
        })?;
        Header::unseal(&path, &bytes)
    }

    /// Refuse to create a migration in `dir` when it already holds one, or
    /// the map or journal of one whose header was lost. A missing `dir` is
    /// fine.
    pub fn check_creatable(dir: &Path) -> Result<()> {
        if Self::exists(dir) {
            return Err(Error::Invalid(format!(
                "{} already holds a migration",
                dir.display()
            )));
        }
        // No header, but the map or journal of a migration with progress:
        // the header was lost, not never written (a crash while creating
        // leaves an empty map and journal). Starting afresh would forget
        // which chunks clients wrote and refetch them over their data.
        if let Some(what) = progress_without_header(dir) {
            return Err(Error::StateCorrupt {
                path: dir.join("state.json"),
                detail: format!("missing, but {what}"),
            });
        }
        Ok(())
    }

    /// Create a new state directory for a fresh migration.
    pub fn create(dir: &Path, header: &Header) -> Result<(StateDir, PresenceMap)> {
        let io = |source| Error::StateIo {
            dir: dir.to_path_buf(),
            source,
        };
        // Only its owner may read a migration's state (the write-ahead log
        // holds guest data); directories that already exist keep theirs.
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(io)?;
        let lock = Self::lock(dir)?;
        Self::check_creatable(dir)?;
        let map = PresenceMap::new(header.geometry().chunks());
        // An empty payload stands for "every bit clear": a new 1 TiB
        // migration need not write (and sync) megabytes of zeros.
        write_checkpoint(dir, &[], 1).map_err(io)?;
        let journal = Journal::create(dir, 1).map_err(io)?;
        // The header last: a directory without it is not a migration yet.
        write_atomic(dir, "state.json", &header.seal()).map_err(io)?;
        // Then the target's marker, so a later `stream start` without this
        // state recognises it (a crash before it leaves a state that
        // resumes; the marker is written again at each phase change).
        mark_target(dir, header);
        Ok((
            StateDir {
                dir: dir.to_path_buf(),
                _lock: lock,
                journal: Mutex::new(journal),
                dirty: Mutex::new(Vec::new()),
            },
            map,
        ))
    }

    /// Open and lock an existing state directory; replay its journal.
    pub fn open(dir: &Path) -> Result<(StateDir, Header, PresenceMap)> {
        let lock = Self::lock(dir)?;
        let header = Self::read_header(dir)?;
        let chunks = header.geometry().chunks();
        let (map, generation) = read_checkpoint(dir, chunks)?;
        let journal = Journal::open(dir, generation, &map)?;
        Ok((
            StateDir {
                dir: dir.to_path_buf(),
                _lock: lock,
                journal: Mutex::new(journal),
                dirty: Mutex::new(Vec::new()),
            },
            header,
            map,
        ))
    }

    /// Mark the target with this migration and its phase (done at create
    /// and at every header write; for a migration older than markers,
    /// call it on resume).
    pub fn mark_target(&self, header: &Header) {
        mark_target(&self.dir, header);
    }

    /// Replace the header (phase changes).
    pub fn write_header(&self, header: &Header) -> Result<()> {
        write_atomic(&self.dir, "state.json", &header.seal()).map_err(|e| self.io(e))?;
        mark_target(&self.dir, header);
        Ok(())
    }

    /// Record that chunk `c` became `state`. Call under the chunk's lock,
    /// after the target write and the bitmap update.
    pub fn record(&self, c: ChunkIndex, state: ChunkState, written: bool) {
        let mut d = self.dirty.lock().expect("poisoned");
        // Extend the last run when this chunk continues it in the same state.
        if let Some(last) = d.last_mut() {
            let (first, count, flags) = entry_parts(*last);
            if first + count == c.0 && count < MAX_COUNT && flags == entry(c, 1, state, written) & 3
            {
                *last = entry(ChunkIndex(first), count + 1, state, written);
                return;
            }
        }
        d.push(entry(c, 1, state, written));
    }

    /// Entries waiting for a persist cycle.
    pub fn pending(&self) -> usize {
        self.dirty.lock().expect("poisoned").len()
    }

    /// Step 2a of a persist cycle: take the recorded entries.
    pub fn take_pending(&self) -> Vec<u64> {
        std::mem::take(&mut *self.dirty.lock().expect("poisoned"))
    }

    /// Put back entries a failed persist cycle took, ahead of newer ones, so
    /// a later flush still covers them.
    pub fn restore_pending(&self, mut entries: Vec<u64>) {
        let mut d = self.dirty.lock().expect("poisoned");
        entries.append(&mut d);
        *d = entries;
    }

    /// Whether the last run ended without a clean shutdown (the `running`
    /// marker is still there); marks this run as running.
    pub fn mark_running(&self) -> Result<bool> {
        let p = self.dir.join("running");
        let unclean = p.exists();
        write_atomic(
            &self.dir,
            "running",
            std::process::id().to_string().as_bytes(),
        )
        .map_err(|e| self.io(e))?;
        Ok(unclean)
    }

    /// Counters of earlier runs (`stats.json`), or zeros.
    pub fn load_totals(&self) -> crate::stats::Totals {
        fs::read(self.dir.join("stats.json"))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default()
    }

    /// Save the counters (blocking; atomic replace).
    pub fn save_totals(&self, t: &crate::stats::Totals) -> Result<()> {
        let bytes = serde_json::to_vec_pretty(t).expect("totals serialise");
        write_atomic(&self.dir, "stats.json", &bytes).map_err(|e| self.io(e))
    }

    /// Record a clean shutdown (after the final checkpoint).
    pub fn mark_clean(&self) -> Result<()> {
        match fs::remove_file(self.dir.join("running")) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(self.io(e)),
        }
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| self.io(e))
    }

    /// Step 2b, after the target sync: append and sync. Blocking.
    pub fn append(&self, entries: &[u64]) -> Result<()> {
        if entries.is_empty() {
            return Ok(());
        }
        let mut j = self.journal.lock().expect("poisoned");
        j.append(entries).map_err(|source| Error::PersistMap {
            dir: self.dir.clone(),
            source,
        })
    }

    pub fn journal_len(&self) -> u64 {
        self.journal.lock().expect("poisoned").len
    }

    /// Write `snapshot` (taken before the last target sync) as the new
    /// checkpoint and restart the journal. Blocking.
    pub fn checkpoint(&self, snapshot: &[u8]) -> Result<()> {
        let mut j = self.journal.lock().expect("poisoned");
        let generation = j.generation + 1;
        let persist = |source| Error::PersistMap {
            dir: self.dir.clone(),
            source,
        };
        write_checkpoint(&self.dir, snapshot, generation).map_err(persist)?;
        *j = Journal::create(&self.dir, generation).map_err(persist)?;
        Ok(())
    }
}

/// The bitmaps of `map` as checkpoint payload.
pub fn map_bytes(map: &PresenceMap) -> Vec<u8> {
    let mut v = Vec::new();
    for b in map.bitmaps() {
        v.extend_from_slice(&b.to_bytes());
    }
    v
}

fn write_checkpoint(dir: &Path, bitmaps: &[u8], generation: u64) -> io::Result<()> {
    let mut v = Vec::with_capacity(bitmaps.len() + 48);
    v.extend_from_slice(MAP_MAGIC);
    v.extend_from_slice(&generation.to_le_bytes());
    v.extend_from_slice(&(bitmaps.len() as u64).to_le_bytes());
    v.extend_from_slice(bitmaps);
    let h = hash16(&[&v]);
    v.extend_from_slice(&h);
    write_atomic(dir, "map", &v)
}

/// What in `dir` shows a migration made progress there: a map with bits,
/// a journal with batches, or a write-ahead log with records.
/// Mark the target with the migration's phase (see `target::identity`).
/// A marker that cannot be written weakens only the check of a later
/// `stream start` without this state, so it is a warning, not a failure.
fn mark_target(dir: &Path, header: &Header) {
    let marker = crate::target::identity::Marker {
        phase: match header.phase {
            Phase::Finalized => "finalized",
            Phase::Streaming | Phase::Finalizing => "streaming",
        }
        .into(),
        state_dir: fs::canonicalize(dir)
            .unwrap_or_else(|_| dir.to_path_buf())
            .display()
            .to_string(),
        source: header.source.location.clone(),
        at: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        migration: header.migration_id.clone().unwrap_or_default(),
    };
    let target = Path::new(&header.target.path);
    if let Err(e) = crate::target::identity::write_marker(target, &marker) {
        tracing::warn!(
            "cannot mark the target {} as {} (a `stream start` without this state will not \
             recognise it by its marker): {e}",
            target.display(),
            marker.phase
        );
    }
}

fn progress_without_header(dir: &Path) -> Option<String> {
    let len = |name: &str| fs::metadata(dir.join(name)).map(|m| m.len()).ok();
    if len("map").is_some_and(|n| n > 24 + HASH_LEN as u64) {
        return Some("the map holds chunk states".into());
    }
    if len("journal").is_some_and(|n| n > Journal::HEADER_LEN) {
        return Some("the journal holds flushed batches".into());
    }
    let wal = fs::read_dir(dir).ok()?.flatten().find(|e| {
        e.file_name().to_string_lossy().starts_with("wal.")
            && e.metadata().is_ok_and(|m| m.len() > 0)
    });
    wal.map(|e| format!("{} holds logged writes", e.file_name().to_string_lossy()))
}

fn read_checkpoint(dir: &Path, chunks: u64) -> Result<(PresenceMap, u64)> {
    let path = dir.join("map");
    let corrupt = |detail: &str| Error::StateCorrupt {
        path: path.clone(),
        detail: detail.to_string(),
    };
    let v = match fs::read(&path) {
        Ok(v) => v,
        // Written at create, before the header, and only ever replaced.
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(corrupt("missing")),
        Err(source) => {
            return Err(Error::StateIo {
                dir: dir.to_path_buf(),
                source,
            });
        }
    };
    if v.len() < 24 + HASH_LEN || &v[..8] != MAP_MAGIC {
        return Err(corrupt("not a presence map"));
    }
    let (body, h) = v.split_at(v.len() - HASH_LEN);
    if hash16(&[body]) != h {
        return Err(corrupt("checksum does not match (torn or damaged)"));
    }
    let generation = u64::from_le_bytes(body[8..16].try_into().expect("8"));
    let len = u64::from_le_bytes(body[16..24].try_into().expect("8")) as usize;
    let bitmaps = &body[24..];
    if len == 0 && bitmaps.is_empty() {
        return Ok((PresenceMap::new(chunks), generation));
    }
    let one = chunks.div_ceil(64) as usize * 8;
    if len != bitmaps.len() || bitmaps.len() != 3 * one {
        return Err(corrupt("size does not match the header's geometry"));
    }
    let parts: Option<Vec<Bitmap>> = (0..3)
        .map(|i| Bitmap::from_bytes(chunks, &bitmaps[i * one..(i + 1) * one]))
        .collect();
    let mut parts = parts.ok_or_else(|| corrupt("bits set past the last chunk"))?;
    let written = parts.pop().expect("3");
    let zero = parts.pop().expect("3");
    let present = parts.pop().expect("3");
    Ok((PresenceMap::from_parts(present, zero, written), generation))
}

impl Journal {
    const HEADER_LEN: u64 = 16;

    fn create(dir: &Path, generation: u64) -> io::Result<Journal> {
        let path = dir.join("journal");
        let mut header = Vec::with_capacity(16);
        header.extend_from_slice(JOURNAL_MAGIC);
        header.extend_from_slice(&generation.to_le_bytes());
        write_atomic(dir, "journal", &header)?;
        let file = OpenOptions::new().read(true).write(true).open(&path)?;
        Ok(Journal {
            file,
            generation,
            len: Self::HEADER_LEN,
            next_seq: 0,
        })
    }

    /// Open the journal and replay it onto `map` if it belongs to the
    /// checkpoint's generation.
    fn open(dir: &Path, generation: u64, map: &PresenceMap) -> Result<Journal> {
        let path = dir.join("journal");
        let io = |source| Error::StateIo {
            dir: dir.to_path_buf(),
            source,
        };
        // `create` writes the journal, whole, before the header, and it is
        // only ever replaced by rename; so once the header exists a missing
        // or empty journal was lost after, never "not started yet", and
        // the batches flushed since the last checkpoint went with it.
        // Starting a new one would make the chunks they recorded absent
        // (clients' writes refetched from the source over their data).
        let lost = |what: &str| Error::StateCorrupt {
            path: path.clone(),
            detail: format!(
                "{what}, but the header shows the migration was created, and every created \
                 migration has a journal: the writes flushed since the last checkpoint of the \
                 map (generation {generation}) were recorded only there"
            ),
        };
        let bytes = match fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(lost("missing")),
            Err(e) => return Err(io(e)),
        };
        if bytes.is_empty() {
            return Err(lost("empty"));
        }
        // The journal is only ever created whole (written and renamed into
        // place), so a short file or a wrong magic is damage, not a torn
        // create: its batches may be acknowledged flushes, and dropping
        // them would make written chunks absent (refetched over the
        // client's data). Only an older generation is legitimately stale.
        if bytes.len() < Self::HEADER_LEN as usize || &bytes[..8] != JOURNAL_MAGIC {
            return Err(Error::StateCorrupt {
                path,
                detail: "journal header is damaged (bad magic or cut short)".into(),
            });
        }
        let found = u64::from_le_bytes(bytes[8..16].try_into().expect("8"));
        if found > generation {
            return Err(Error::StateCorrupt {
                path,
                detail: format!("journal generation {found} is newer than the map's {generation}"),
            });
        }
        if found < generation {
            // Written before the checkpoint we loaded (a crash between the
            // two renames): the checkpoint already holds all of it.
            return Journal::create(dir, generation).map_err(io);
        }
        let mut at = Self::HEADER_LEN as usize;
        let mut seq = 0u64;
        while let Some((entries, next)) = parse_batch(&bytes, at, seq) {
            for e in entries {
                if !apply(map, e) {
                    return Err(Error::StateCorrupt {
                        path,
                        detail: format!("journal names a chunk past the end at byte {at}"),
                    });
                }
            }
            at = next;
            seq += 1;
        }
        if at < bytes.len() {
            // A bad batch. Torn tail, or damage in the middle?
            let later_valid = (at + 1..bytes.len()).any(|p| {
                bytes[p..].starts_with(&BATCH_MAGIC.to_le_bytes())
                    && (seq..seq + 1024).any(|s| parse_batch(&bytes, p, s).is_some())
            });
            if later_valid {
                return Err(Error::StateCorrupt {
                    path,
                    detail: format!(
                        "journal batch {seq} at byte {at} is damaged but later batches are intact"
                    ),
                });
            }
            tracing::warn!(
                "journal {}: {} bytes of a torn last batch discarded (a flush that was never acknowledged)",
                path.display(),
                bytes.len() - at
            );
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(io)?;
        file.set_len(at as u64).map_err(io)?;
        file.sync_all().map_err(io)?;
        Ok(Journal {
            file,
            generation,
            len: at as u64,
            next_seq: seq,
        })
    }

    fn append(&mut self, entries: &[u64]) -> io::Result<()> {
        let mut v = Vec::with_capacity(16 + entries.len() * 8 + HASH_LEN);
        v.extend_from_slice(&BATCH_MAGIC.to_le_bytes());
        v.extend_from_slice(&self.next_seq.to_le_bytes());
        v.extend_from_slice(&(entries.len() as u32).to_le_bytes());
        for e in entries {
            v.extend_from_slice(&e.to_le_bytes());
        }
        let h = hash16(&[&v]);
        v.extend_from_slice(&h);
        self.file.write_all_at(&v, self.len)?;
        self.file.sync_data()?;
        self.len += v.len() as u64;
        self.next_seq += 1;
        Ok(())
    }
}

/// Parse the batch at `at` with sequence `seq`: its entries and where the
/// next batch starts, or `None` if it is not a whole, valid batch.
fn parse_batch(bytes: &[u8], at: usize, seq: u64) -> Option<(Vec<u64>, usize)> {
    let head = bytes.get(at..at + 16)?;
    if u32::from_le_bytes(head[0..4].try_into().ok()?) != BATCH_MAGIC {
        return None;
    }
    if u64::from_le_bytes(head[4..12].try_into().ok()?) != seq {
        return None;
    }
    let count = u32::from_le_bytes(head[12..16].try_into().ok()?) as usize;
    let body_end = at.checked_add(16)?.checked_add(count.checked_mul(8)?)?;
    let h = bytes.get(body_end..body_end.checked_add(HASH_LEN)?)?;
    if hash16(&[&bytes[at..body_end]]) != h {
        return None;
    }
    let entries = bytes[at + 16..body_end]
        .chunks_exact(8)
        .map(|b| u64::from_le_bytes(b.try_into().expect("8")))
        .collect();
    Some((entries, body_end + HASH_LEN))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header() -> Header {
        Header {
            format: FORMAT.into(),
            version: VERSION,
            source: SourceId {
                kind: "file".into(),
                location: "/src".into(),
                size: 1 << 20,
            },
            target: TargetId {
                path: "/tgt".into(),
                kind: "file".into(),
                size: 1 << 20,
                dev: 1,
                ino: 2,
                created_sparse: true,
            },
            size: 1 << 20,
            chunk_size: 65536,
            phase: Phase::Streaming,
            created_at: 0,
            finalized_at: None,
            finalize: None,
            migration_id: None,
            detach: None,
        }
    }

    #[test]
    fn journal_replay_restores_recorded_states() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (st, map) = StateDir::create(dir.path(), &header()).unwrap();
            map.set(ChunkIndex(3), ChunkState::Data, false);
            st.record(ChunkIndex(3), ChunkState::Data, false);
            st.record(ChunkIndex(5), ChunkState::Zero, true);
            let e = st.take_pending();
            st.append(&e).unwrap();
            // Recorded but never persisted: must not survive.
            st.record(ChunkIndex(7), ChunkState::Data, false);
        }
        let (_st, h, map) = StateDir::open(dir.path()).unwrap();
        assert_eq!(h, header());
        assert_eq!(map.state(ChunkIndex(3)), ChunkState::Data);
        assert_eq!(map.state(ChunkIndex(5)), ChunkState::Zero);
        assert!(map.is_written(ChunkIndex(5)));
        assert_eq!(map.state(ChunkIndex(7)), ChunkState::Absent);
    }

    #[test]
    fn consecutive_records_coalesce_into_one_run_and_replay_whole() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (st, _) = StateDir::create(dir.path(), &header()).unwrap();
            for i in 0..10 {
                st.record(ChunkIndex(i), ChunkState::Zero, false);
            }
            st.record(ChunkIndex(10), ChunkState::Data, false);
            st.record(ChunkIndex(12), ChunkState::Data, false);
            assert_eq!(st.pending(), 3);
            let e = st.take_pending();
            st.append(&e).unwrap();
        }
        let (_, _, map) = StateDir::open(dir.path()).unwrap();
        assert_eq!(map.state(ChunkIndex(9)), ChunkState::Zero);
        assert_eq!(map.state(ChunkIndex(10)), ChunkState::Data);
        assert_eq!(map.state(ChunkIndex(11)), ChunkState::Absent);
        assert_eq!(map.present_count(), 12);
    }

    #[test]
    fn second_open_of_a_locked_state_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (_st, _) = StateDir::create(dir.path(), &header()).unwrap();
        let e = StateDir::open(dir.path()).unwrap_err();
        assert!(matches!(e, Error::Locked { .. }), "{e}");
    }

    #[test]
    fn torn_journal_tail_is_cut_and_earlier_batches_kept() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (st, _) = StateDir::create(dir.path(), &header()).unwrap();
            st.append(&[entry(ChunkIndex(1), 1, ChunkState::Data, false)])
                .unwrap();
            st.append(&[entry(ChunkIndex(2), 1, ChunkState::Data, false)])
                .unwrap();
        }
        let j = dir.path().join("journal");
        let len = fs::metadata(&j).unwrap().len();
        OpenOptions::new()
            .write(true)
            .open(&j)
            .unwrap()
            .set_len(len - 5)
            .unwrap();
        let (st, _, map) = StateDir::open(dir.path()).unwrap();
        assert!(map.is_present(ChunkIndex(1)));
        assert!(!map.is_present(ChunkIndex(2)));
        // Appending after the cut continues the sequence.
        st.append(&[entry(ChunkIndex(4), 1, ChunkState::Data, false)])
            .unwrap();
        drop(st);
        let (_, _, map) = StateDir::open(dir.path()).unwrap();
        assert!(map.is_present(ChunkIndex(4)));
    }

    #[test]
    fn damage_in_the_middle_of_the_journal_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (st, _) = StateDir::create(dir.path(), &header()).unwrap();
            for i in 0..3 {
                st.append(&[entry(ChunkIndex(i), 1, ChunkState::Data, false)])
                    .unwrap();
            }
        }
        let j = dir.path().join("journal");
        let mut bytes = fs::read(&j).unwrap();
        bytes[16 + 17] ^= 0xff; // inside the first batch's entry
        fs::write(&j, bytes).unwrap();
        let e = StateDir::open(dir.path()).unwrap_err();
        assert!(matches!(e, Error::StateCorrupt { .. }), "{e}");
    }

    #[test]
    fn lost_header_with_progress_is_refused_not_started_afresh() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (st, _) = StateDir::create(dir.path(), &header()).unwrap();
            st.append(&[entry(ChunkIndex(1), 1, ChunkState::Data, true)])
                .unwrap();
        }
        fs::remove_file(dir.path().join("state.json")).unwrap();
        let e = StateDir::create(dir.path(), &header()).unwrap_err();
        assert!(matches!(e, Error::StateCorrupt { .. }), "{e}");

        // A crash while creating (no header, nothing recorded) starts afresh.
        let dir = tempfile::tempdir().unwrap();
        drop(StateDir::create(dir.path(), &header()).unwrap());
        fs::remove_file(dir.path().join("state.json")).unwrap();
        StateDir::create(dir.path(), &header()).unwrap();
    }

    #[test]
    fn damaged_journal_header_is_refused_not_taken_for_stale() {
        for damage in [0usize, 9] {
            let dir = tempfile::tempdir().unwrap();
            {
                let (st, _) = StateDir::create(dir.path(), &header()).unwrap();
                st.append(&[entry(ChunkIndex(1), 1, ChunkState::Data, true)])
                    .unwrap();
            }
            let j = dir.path().join("journal");
            let mut bytes = fs::read(&j).unwrap();
            // The magic, or the generation made newer than the map's.
            bytes[damage] ^= 0x40;
            fs::write(&j, bytes).unwrap();
            let e = StateDir::open(dir.path()).unwrap_err();
            assert!(
                matches!(e, Error::StateCorrupt { .. }),
                "byte {damage}: {e}"
            );
        }
    }

    #[test]
    fn damaged_header_or_map_is_refused_not_trusted() {
        let dir = tempfile::tempdir().unwrap();
        drop(StateDir::create(dir.path(), &header()).unwrap());
        let p = dir.path().join("state.json");
        let text = fs::read_to_string(&p).unwrap().replace("65536", "65537");
        fs::write(&p, text).unwrap();
        assert!(matches!(
            StateDir::open(dir.path()).unwrap_err(),
            Error::StateCorrupt { .. }
        ));

        let dir = tempfile::tempdir().unwrap();
        drop(StateDir::create(dir.path(), &header()).unwrap());
        let m = dir.path().join("map");
        let mut bytes = fs::read(&m).unwrap();
        bytes[30] ^= 1;
        fs::write(&m, bytes).unwrap();
        assert!(matches!(
            StateDir::open(dir.path()).unwrap_err(),
            Error::StateCorrupt { .. }
        ));
    }

    #[test]
    fn missing_or_empty_journal_is_refused_not_recreated() {
        for how in ["removed", "emptied"] {
            let dir = tempfile::tempdir().unwrap();
            {
                let (st, _) = StateDir::create(dir.path(), &header()).unwrap();
                st.append(&[entry(ChunkIndex(1), 1, ChunkState::Data, true)])
                    .unwrap();
            }
            let j = dir.path().join("journal");
            if how == "removed" {
                fs::remove_file(&j).unwrap();
            } else {
                fs::write(&j, b"").unwrap();
            }
            let e = StateDir::open(dir.path()).unwrap_err();
            assert!(matches!(e, Error::StateCorrupt { .. }), "{how}: {e}");
            assert!(e.to_string().contains("journal"), "{how}: {e}");
            // Refused, not replaced by a new journal.
            assert_eq!(j.exists(), how == "emptied", "{how}");
        }
    }

    #[test]
    fn deleting_the_lock_file_does_not_admit_a_second_open() {
        let dir = tempfile::tempdir().unwrap();
        let (_st, _) = StateDir::create(dir.path(), &header()).unwrap();
        fs::remove_file(dir.path().join("lock")).unwrap();
        let e = StateDir::open(dir.path()).unwrap_err();
        assert!(matches!(e, Error::Locked { .. }), "{e}");
    }

    #[test]
    fn damaged_state_advice_does_not_say_restore_a_backup() {
        let e = Error::StateCorrupt {
            path: "/s/map".into(),
            detail: "x".into(),
        }
        .to_string();
        assert!(!e.contains("from a backup"), "{e}");
        assert!(e.contains("do not restore an older copy"), "{e}");
    }

    #[test]
    fn checkpoint_supersedes_the_old_journal() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (st, map) = StateDir::create(dir.path(), &header()).unwrap();
            map.set(ChunkIndex(2), ChunkState::Zero, false);
            st.append(&[entry(ChunkIndex(2), 1, ChunkState::Zero, false)])
                .unwrap();
            st.checkpoint(&map_bytes(&map)).unwrap();
            st.append(&[entry(ChunkIndex(9), 1, ChunkState::Data, true)])
                .unwrap();
        }
        let (_, _, map) = StateDir::open(dir.path()).unwrap();
        assert_eq!(map.state(ChunkIndex(2)), ChunkState::Zero);
        assert_eq!(map.state(ChunkIndex(9)), ChunkState::Data);
        assert_eq!(map.present_count(), 2);
    }
}
