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
//! | `candidates` | absent chunks whose target bytes are a seeded copy to confirm (see `candidates`) |
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
//! Submodules: `header.rs` (`state.json`), `lock.rs` (one process per
//! directory), `checkpoint.rs` (`map`) and `journal.rs` (the batches since
//! the checkpoint, and how a torn last batch is told from damaged ones).

mod candidates;
mod checkpoint;
mod header;
mod journal;
mod lock;
#[cfg(test)]
mod tests;

use std::fs::{self, File};
use std::io::{self, Write};
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

pub use checkpoint::map_bytes;
pub use header::{
    CinderRecord, DetachRecord, FORMAT, FinalizeRecord, Header, Phase, SeedRecord, SourceId,
    TargetId, VERSION, new_migration_id,
};

use checkpoint::{read_checkpoint, write_checkpoint};
use journal::Journal;
use lock::Lock;

use crate::error::{Error, Result};
use crate::presence::PresenceMap;

const HASH_LEN: usize = 16;
/// Journal size after which a persist cycle also writes a checkpoint.
pub const CHECKPOINT_AFTER: u64 = 16 << 20;

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
}

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

/// What in `dir` shows a migration made progress there: a map with bits,
/// a journal with batches, or a write-ahead log with records.
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
