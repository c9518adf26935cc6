//! The manifest: proof of what the target holds at the end of a migration,
//! and the verifier that checks a target against its source and manifest.
//!
//! `manifest.json` in the state directory carries the sizes, the chunk size,
//! the source and target identity, times and counts (chunks fetched on
//! demand, hydrated, written by clients, holes). The blake3 of every chunk
//! is kept beside it in `manifest.chunks` (32 bytes per chunk, in order;
//! 512 MiB for 1 TiB in 64 KiB chunks, too much for JSON), whose own
//! blake3 is in the JSON so it cannot be swapped: that is the digest of
//! the disk.
//!
//! Building it reads the target only where it must (issue 15): a zero
//! chunk's hash is known; a chunk whose hash was recorded as it became
//! present and that nobody changed since (`hashes`: the kept manifest)
//! takes its record; only chunks changed in place since their record (by
//! clients) are read and hashed. So finalize costs time in what clients
//! changed, not in the disk's size. Version 1 manifests also had the
//! blake3 of the whole disk (`disk_blake3`), which needs every byte read;
//! version 2 leaves it out.
//!
//! Verification compares, chunk by chunk, every chunk no client wrote with
//! the source (a source extent known to be zero is compared with zeros
//! without reading the source), and every chunk a client wrote with the
//! manifest. Mismatches are reported as merged byte ranges.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use futures_util::StreamExt;
use futures_util::stream::FuturesOrdered;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::presence::ChunkState;
use crate::source::{Class, Source};
use crate::state::{SourceId, TargetId};
use crate::units::{ChunkIndex, Geometry, mem_len};
use crate::volume::Volume;

pub const MANIFEST: &str = "manifest.json";
pub const CHUNK_HASHES: &str = "manifest.chunks";
/// Chunks read and hashed concurrently.
const IN_FLIGHT: usize = 8;

/// Source hashes read per request when the source computes them.
const REMOTE_WINDOW: u64 = 4096;
/// Kept hashes read from the state directory at a time.
const RECORD_WINDOW: u64 = 65536;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counts {
    pub chunks: u64,
    pub fetched_on_demand: u64,
    pub hydrated: u64,
    pub written_by_clients: u64,
    pub zero: u64,
    pub source_holes: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: String,
    pub version: u32,
    pub size: u64,
    pub chunk_size: u64,
    pub source: SourceId,
    pub target: TargetId,
    /// Unix seconds.
    pub migration_started_at: u64,
    pub manifest_written_at: u64,
    pub counts: Counts,
    /// blake3 of the whole disk, hex (version 1 only: it needs every byte
    /// of the target read; version 2 identifies the disk by the blake3 of
    /// its chunk hashes, `chunk_hashes_blake3`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_blake3: Option<String>,
    /// File with the blake3 of every chunk, and its own blake3 (hex).
    pub chunk_hashes_file: String,
    pub chunk_hashes_blake3: String,
}

impl Manifest {
    pub fn load(state_dir: &Path) -> Result<Manifest> {
        let path = state_dir.join(MANIFEST);
        let bytes = std::fs::read(&path).map_err(|source| Error::StateIo {
            dir: state_dir.to_path_buf(),
            source,
        })?;
        serde_json::from_slice(&bytes).map_err(|e| Error::StateCorrupt {
            path,
            detail: e.to_string(),
        })
    }

    /// The chunk hashes, checked against the manifest.
    pub fn chunk_hashes(&self, state_dir: &Path) -> Result<Vec<[u8; 32]>> {
        let path = state_dir.join(&self.chunk_hashes_file);
        let bytes = std::fs::read(&path).map_err(|source| Error::StateIo {
            dir: state_dir.to_path_buf(),
            source,
        })?;
        if blake3::hash(&bytes).to_hex().as_str() != self.chunk_hashes_blake3
            || bytes.len() % 32 != 0
        {
            return Err(Error::StateCorrupt {
                path,
                detail: "chunk hashes do not match the manifest".into(),
            });
        }
        Ok(bytes
            .chunks_exact(32)
            .map(|c| c.try_into().expect("32 bytes"))
            .collect())
    }
}

pub(crate) fn zero_hash(len: u64) -> blake3::Hash {
    blake3::hash(&vec![0u8; mem_len(len)])
}

/// The hash of a zero chunk of any length, a whole chunk's computed once:
/// most zero chunks are whole, and hashing a fresh zero buffer for each
/// would cost more than all the rest of a manifest or a delta.
pub(crate) struct ZeroHashes {
    chunk: u64,
    full: [u8; 32],
}

impl ZeroHashes {
    pub(crate) fn new(chunk: u64) -> ZeroHashes {
        ZeroHashes {
            chunk,
            full: *zero_hash(chunk).as_bytes(),
        }
    }

    pub(crate) fn of(&self, len: u64) -> [u8; 32] {
        match len == self.chunk {
            true => self.full,
            false => *zero_hash(len).as_bytes(),
        }
    }
}

/// Read chunk `c` of the target (zeros for a hole of a sparse target).
async fn target_chunk<S: Source>(v: &Volume<S>, c: ChunkIndex) -> Result<Vec<u8>> {
    let r = v.geometry().bytes(c);
    let len = mem_len(r.end - r.start);
    if v.map().state(c) == ChunkState::Zero && v.header().target.created_sparse {
        // Confirm it is a hole; if the target holds data there, read it.
        let t = v.target().clone();
        let (s, e) = (r.start, r.end);
        let data = tokio::task::spawn_blocking(move || t.data_extents(s, e))
            .await
            .map_err(|e| Error::ReadTarget {
                offset: s,
                source: std::io::Error::other(e),
            })?
            .map_err(|source| Error::ReadTarget { offset: s, source })?;
        if data.is_empty() {
            return Ok(vec![0u8; len]);
        }
    }
    v.target()
        .read_at(r.start, len)
        .await
        .map_err(|source| Error::ReadTarget {
            offset: r.start,
            source,
        })
}

/// Write the manifest of a complete volume from what is known of each
/// chunk, reading the target only for chunks changed since their hash was
/// recorded (see the module docs). `progress(done, total)` is called as
/// chunks are done; returns the manifest and how many chunks were read.
pub async fn write<S: Source>(
    v: &Arc<Volume<S>>,
    progress: &(dyn Fn(u64, u64) + Send + Sync),
) -> Result<Manifest> {
    let g = v.geometry();
    let dir = v.state_dir().to_path_buf();
    let io = |source| Error::StateIo {
        dir: dir.clone(),
        source,
    };
    let hashes_path = dir.join(format!(".{CHUNK_HASHES}.tmp"));
    let mut hashes_file = std::io::BufWriter::new(std::fs::File::create(&hashes_path).map_err(io)?);
    let mut list = blake3::Hasher::new();
    let zeros = ZeroHashes::new(g.chunk_size());
    let mut pending = FuturesOrdered::new();
    let mut next = 0u64;
    let total = g.chunks();
    let mut done = 0u64;
    let mut read = 0u64;
    let mut records: (u64, Vec<[u8; 32]>) = (0, Vec::new());
    // Each chunk's hash, in order, into the list's digest and the file.
    let mut emit = |h: [u8; 32], was_read: bool| -> Result<()> {
        read += u64::from(was_read);
        list.update(&h);
        hashes_file.write_all(&h).map_err(io)?;
        done += 1;
        if done % 1024 == 0 || done == total {
            progress(done, total);
        }
        Ok(())
    };
    loop {
        while pending.len() < IN_FLIGHT && next < total {
            let c = ChunkIndex(next);
            let r = g.bytes(c);
            let known = match v.map().state(c) {
                ChunkState::Zero => Some(zeros.of(r.end - r.start)),
                _ if v.hash_is_kept(c) => {
                    if next >= records.0 + records.1.len() as u64 {
                        let n = RECORD_WINDOW.min(total - next);
                        records = (next, v.kept_hashes(c, n).await?);
                    }
                    Some(records.1[mem_len(next - records.0)])
                }
                _ => None,
            };
            next += 1;
            // A known hash with nothing ahead of it is written at once: after
            // hydration nearly every chunk is, and a future per chunk cost
            // more than the rest of finalize at 16 GiB (262,144 of them).
            if let (Some(h), true) = (known, pending.is_empty()) {
                emit(h, false)?;
                continue;
            }
            let v = v.clone();
            pending.push_back(async move {
                match known {
                    Some(h) => Ok::<_, Error>((h, false)),
                    None => Ok((*blake3::hash(&target_chunk(&v, c).await?).as_bytes(), true)),
                }
            });
        }
        let Some(r) = pending.next().await else {
            if next < total {
                continue;
            }
            break;
        };
        let (h, was_read) = r?;
        emit(h, was_read)?;
    }
    tracing::info!(
        "manifest: {total} chunks, {read} read from the target (changed since their hash was \
         recorded), the rest from the kept hashes and the map"
    );
    hashes_file.flush().map_err(io)?;
    hashes_file.get_ref().sync_all().map_err(io)?;
    drop(hashes_file);
    std::fs::rename(&hashes_path, dir.join(CHUNK_HASHES)).map_err(io)?;

    let h = v.header();
    let st = v.status();
    let m = Manifest {
        format: "stream-manifest".into(),
        version: 2,
        size: g.size(),
        chunk_size: g.chunk_size(),
        source: h.source.clone(),
        target: h.target.clone(),
        migration_started_at: h.created_at,
        manifest_written_at: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        counts: Counts {
            chunks: total,
            fetched_on_demand: st.chunks_fetched_on_demand,
            hydrated: st.chunks_hydrated,
            written_by_clients: st.chunks_written,
            zero: st.chunks_zero,
            source_holes: st.chunks_source_holes,
        },
        disk_blake3: None,
        chunk_hashes_file: CHUNK_HASHES.into(),
        chunk_hashes_blake3: list.finalize().to_hex().to_string(),
    };
    let mut json = serde_json::to_vec_pretty(&m).expect("manifest serialises");
    json.push(b'\n');
    let tmp = dir.join(format!(".{MANIFEST}.tmp"));
    std::fs::write(&tmp, &json).map_err(io)?;
    std::fs::File::open(&tmp)
        .and_then(|f| f.sync_all())
        .map_err(io)?;
    std::fs::rename(&tmp, dir.join(MANIFEST)).map_err(io)?;
    std::fs::File::open(&dir)
        .and_then(|d| d.sync_all())
        .map_err(io)?;
    Ok(m)
}

/// One mismatching byte range found by [`verify`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Mismatch {
    pub offset: u64,
    pub length: u64,
    /// `source` (a chunk no client wrote differs from the source) or
    /// `manifest` (a chunk differs from the hash recorded at finalize).
    pub against: &'static str,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct VerifyReport {
    pub chunks_checked: u64,
    pub chunks_compared_with_source: u64,
    pub chunks_compared_with_manifest: u64,
    pub source_bytes_read: u64,
    /// The source computed its chunk hashes (`stream export`): they were
    /// compared instead of reading its chunks.
    pub source_hashes: bool,
    /// Bytes of those hashes read over the link (32 per chunk).
    pub source_hash_bytes: u64,
    pub mismatches: Vec<Mismatch>,
}

impl VerifyReport {
    pub fn ok(&self) -> bool {
        self.mismatches.is_empty()
    }

    fn add(&mut self, g: Geometry, c: ChunkIndex, against: &'static str) {
        let r = g.bytes(c);
        if let Some(last) = self.mismatches.last_mut()
            && last.against == against
            && last.offset + last.length == r.start
        {
            last.length += r.end - r.start;
            return;
        }
        self.mismatches.push(Mismatch {
            offset: r.start,
            length: r.end - r.start,
            against,
        });
    }
}

/// Compare the target with its source and manifest (see the module docs).
pub async fn verify<S: Source>(
    v: &Arc<Volume<S>>,
    manifest: &Manifest,
    progress: &(dyn Fn(u64, u64) + Send + Sync),
) -> Result<VerifyReport> {
    let g = v.geometry();
    let hashes = manifest.chunk_hashes(v.state_dir())?;
    if hashes.len() as u64 != g.chunks() || manifest.size != g.size() {
        return Err(Error::StateCorrupt {
            path: v.state_dir().join(MANIFEST),
            detail: "manifest does not describe this volume".into(),
        });
    }
    // Where the source reads as zeros, compare with zeros instead of reading.
    let chunks =
        usize::try_from(g.chunks()).expect("the chunk count: the presence map is in memory");
    let mut source_zero = vec![false; chunks];
    let mut at = 0u64;
    while at < g.size() {
        let len = (g.size() - at).min(1 << 30);
        match v.source().block_status(at, len).await {
            Ok(Some(extents)) if !extents.is_empty() => {
                for e in extents {
                    if e.zero {
                        let first = at.div_ceil(g.chunk_size());
                        for i in first..g.chunks() {
                            let c = ChunkIndex(i);
                            if !g.covers(c, at, e.length) {
                                break;
                            }
                            source_zero[mem_len(i)] = true;
                        }
                    }
                    at += e.length;
                }
            }
            _ => at += len,
        }
    }
    let mut report = VerifyReport::default();
    // Chunks no client wrote are compared with the source: with the hashes
    // it computes where the disk is when it serves them (32 bytes a chunk
    // over the link), else by reading them.
    let remote = v.source().chunk_hashes(g.chunk_size()).await;
    report.source_hashes = remote.is_some();
    match &remote {
        Some(_) => tracing::info!(
            "verify: the source computes its own chunk hashes; 32 bytes per chunk cross the link"
        ),
        None => tracing::info!(
            "verify: the source serves no chunk hashes (nbdkit, qemu-nbd, a local disk or an \
             older stream export): reading its chunks to compare"
        ),
    }
    let mut window: (u64, Vec<[u8; 32]>) = (0, Vec::new());
    let mut pending = FuturesOrdered::new();
    let mut next = 0u64;
    let total = g.chunks();
    loop {
        while pending.len() < IN_FLIGHT && next < total {
            let c = ChunkIndex(next);
            let v = v.clone();
            let written = v.map().is_written(c);
            // `next < total`, and both vectors hold `total` entries.
            let zero_source = source_zero[mem_len(next)];
            let expect_manifest = hashes[mem_len(next)];
            let source_hash = match &remote {
                Some(r) if !written && !zero_source => {
                    if next >= window.0 + window.1.len() as u64 {
                        let n = REMOTE_WINDOW.min(total - next);
                        let got = r
                            .read(next, n)
                            .await
                            .map_err(|source| Error::FetchChunk { index: c, source })?;
                        report.source_hash_bytes += n * crate::proof::HASH_LEN;
                        window = (next, got);
                    }
                    Some(window.1[mem_len(next - window.0)])
                }
                _ => None,
            };
            pending.push_back(async move {
                let target = blake3::hash(&target_chunk(&v, c).await?);
                let r = v.geometry().bytes(c);
                if written {
                    return Ok::<_, Error>((
                        c,
                        target.as_bytes() == &expect_manifest,
                        "manifest",
                        0,
                    ));
                }
                if let Some(h) = source_hash {
                    return Ok((c, target.as_bytes() == &h, "source", 0));
                }
                let (source, read) = if zero_source {
                    (zero_hash(r.end - r.start), 0)
                } else {
                    let data = v
                        .source()
                        .read(r.start, mem_len(r.end - r.start), Class::Background)
                        .await
                        .map_err(|source| Error::FetchChunk { index: c, source })?;
                    (blake3::hash(&data), r.end - r.start)
                };
                Ok((c, target == source, "source", read))
            });
            next += 1;
        }
        let Some(r) = pending.next().await else { break };
        let (c, same, against, read) = r?;
        report.chunks_checked += 1;
        report.source_bytes_read += read;
        if against == "manifest" {
            report.chunks_compared_with_manifest += 1;
        } else {
            report.chunks_compared_with_source += 1;
        }
        if !same {
            report.add(g, c, against);
        }
        if report.chunks_checked % 1024 == 0 || report.chunks_checked == total {
            progress(report.chunks_checked, total);
        }
    }
    Ok(report)
}

/// Paths of the manifest files in `state_dir`.
pub fn paths(state_dir: &Path) -> (PathBuf, PathBuf) {
    (state_dir.join(MANIFEST), state_dir.join(CHUNK_HASHES))
}
