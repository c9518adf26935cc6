//! The header (`state.json`): what a migration is (source, target, sizes,
//! chunk size, phase, what finalize did), sealed with a checksum so a
//! damaged header is refused rather than trusted.

use std::path::Path;

use serde::{Deserialize, Serialize};

use super::hash16;
use crate::error::{Error, Result};
use crate::units::Geometry;

pub const FORMAT: &str = "stream-state";
pub const VERSION: u32 = 1;

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
    /// A migration copied by `stream seed` while the legacy disk was in
    /// use: what was copied may differ from the source since.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<SeedRecord>,
}

/// The passes of `stream seed` over a disk still in use.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SeedRecord {
    /// Complete passes.
    pub passes: u32,
    /// Unix seconds at the end of the last complete pass.
    pub last_pass_at: u64,
    /// Chunks the last pass found changed since the pass before (every
    /// chunk for the first).
    pub changed_last_pass: u64,
    /// Set by every pass, cleared by the cutover: until then the copy is
    /// not trusted, and `stream start` first compares it with the source
    /// and forgets every chunk that changed.
    pub cutover_pending: bool,
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

impl Header {
    pub fn geometry(&self) -> Geometry {
        Geometry::new(self.size, self.chunk_size).expect("validated when the header was loaded")
    }

    pub(super) fn seal(&self) -> Vec<u8> {
        let canonical = serde_json::to_vec(self).expect("header serialises");
        let sealed = Sealed {
            header: self.clone(),
            checksum: blake3::hash(&canonical).to_hex().to_string(),
        };
        let mut v = serde_json::to_vec_pretty(&sealed).expect("header serialises");
        v.push(b'\n');
        v
    }

    pub(super) fn unseal(path: &Path, bytes: &[u8]) -> Result<Header> {
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
