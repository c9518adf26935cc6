//! The source's fingerprint: blake3 of a few chunks of the legacy disk,
//! so a different disk behind the same URI (or path) and of the same size
//! is noticed instead of being fetched into the target beside the first
//! one's chunks.
//!
//! Samples are taken from bytes already in hand: the first chunk with data
//! that a fetch brings in from each of [`REGIONS`] equal regions of the
//! disk (so the samples spread over the disk as hydration reaches it). No
//! source read is added to the fetch path; chunks clients wrote are
//! irrelevant (the sample is taken from the source's bytes, before any
//! overlay). A sample is made durable (`fingerprint.json` in the state
//! directory, replaced atomically) *before* the fetched chunk is written to
//! the target, so a chunk the map can call present always has its region's
//! sample on disk.
//!
//! Checked on every resume (`Volume::open` of an existing state, through
//! [`crate::source::Source::install_fingerprint`]) and on every reconnect of
//! an NBD source, before the new connection serves a read. A mismatch
//! refuses the source: nothing more is fetched, and the error names the
//! chunk and what to do.

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::units::Geometry;

pub const FILE: &str = "fingerprint.json";
const FORMAT: &str = "stream-fingerprint";
const VERSION: u32 = 1;
/// Regions of the disk with one sample each.
pub const REGIONS: u64 = 16;

/// One sampled chunk of the source.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sample {
    pub chunk: u64,
    /// blake3 of the chunk as the source returned it, hex.
    pub blake3: String,
}

#[derive(Debug, Serialize, Deserialize)]
struct OnDisk {
    format: String,
    version: u32,
    size: u64,
    chunk_size: u64,
    samples: Vec<Sample>,
}

/// A chunk of the source that is not what the fingerprint recorded.
#[derive(Clone, Debug)]
pub struct Mismatch {
    pub location: String,
    pub chunk: u64,
    pub offset: u64,
    pub recorded: String,
    pub found: String,
}

impl std::fmt::Display for Mismatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "source {} is not the disk this migration started from (another disk, or this one \
             written since): chunk {} (bytes {}..) hashes {} now but {} when it was fetched. \
             Nothing more is fetched from it. Put the original, unmodified disk back behind this \
             source and run the command again; to migrate the other disk, start a new migration \
             (another --target and --state)",
            self.location,
            self.chunk,
            self.offset,
            &self.found[..16.min(self.found.len())],
            &self.recorded[..16.min(self.recorded.len())],
        )
    }
}

/// The fingerprint of one migration's source, shared by the volume (which
/// adds samples) and the source (which checks them on reconnect).
#[derive(Debug)]
pub struct Fingerprint {
    dir: PathBuf,
    geometry: Geometry,
    samples: Mutex<Vec<Sample>>,
    /// Every region has its sample (the fetch path's fast exit).
    full: AtomicBool,
    /// Serialises the file's replacement, so an older list never
    /// overwrites a newer one.
    writing: Mutex<()>,
}

fn region(g: Geometry, chunk: u64) -> u64 {
    let regions = REGIONS.min(g.chunks()).max(1);
    chunk * regions / g.chunks().max(1)
}

fn chunk_len(g: Geometry, chunk: u64) -> u64 {
    let r = g.bytes(crate::units::ChunkIndex(chunk));
    r.end - r.start
}

fn is_zero(buf: &[u8]) -> bool {
    buf.iter().all(|&b| b == 0)
}

impl Fingerprint {
    /// Load the fingerprint of the state directory `dir`, or start an empty
    /// one (a new migration, or a state from before fingerprints).
    pub fn load(dir: &Path, geometry: Geometry) -> Result<Fingerprint> {
        let path = dir.join(FILE);
        let samples = match fs::read(&path) {
            Ok(bytes) => {
                let corrupt = |detail: String| Error::StateCorrupt {
                    path: path.clone(),
                    detail,
                };
                let d: OnDisk =
                    serde_json::from_slice(&bytes).map_err(|e| corrupt(e.to_string()))?;
                if d.format != FORMAT || d.version != VERSION {
                    return Err(corrupt(format!(
                        "format {} version {} is not {FORMAT} version {VERSION}",
                        d.format, d.version
                    )));
                }
                if d.size != geometry.size() || d.chunk_size != geometry.chunk_size() {
                    return Err(corrupt(format!(
                        "describes a disk of {} bytes in {}-byte chunks, but the state's is {} \
                         bytes in {}-byte chunks",
                        d.size,
                        d.chunk_size,
                        geometry.size(),
                        geometry.chunk_size()
                    )));
                }
                if let Some(s) = d.samples.iter().find(|s| {
                    s.chunk >= geometry.chunks()
                        || s.blake3.len() != 64
                        || !s.blake3.bytes().all(|b| b.is_ascii_hexdigit())
                }) {
                    return Err(corrupt(format!("sample of chunk {} is damaged", s.chunk)));
                }
                d.samples
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
            Err(source) => {
                return Err(Error::StateIo {
                    dir: dir.to_path_buf(),
                    source,
                });
            }
        };
        let fp = Fingerprint {
            dir: dir.to_path_buf(),
            geometry,
            full: AtomicBool::new(false),
            samples: Mutex::new(samples),
            writing: Mutex::new(()),
        };
        fp.update_full();
        Ok(fp)
    }

    /// Forget the fingerprint file of `dir` (a new migration there: a file
    /// left by an earlier one describes another disk).
    pub fn discard(dir: &Path) -> Result<()> {
        match fs::remove_file(dir.join(FILE)) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(Error::StateIo {
                dir: dir.to_path_buf(),
                source,
            }),
        }
    }

    fn update_full(&self) {
        let s = self.samples.lock().expect("poisoned");
        let regions = REGIONS.min(self.geometry.chunks()).max(1);
        self.full
            .store(s.len() as u64 >= regions, Ordering::Relaxed);
    }

    pub fn geometry(&self) -> Geometry {
        self.geometry
    }

    /// The samples recorded so far.
    pub fn samples(&self) -> Vec<Sample> {
        self.samples.lock().expect("poisoned").clone()
    }

    /// Offer the bytes of chunks `first..` just read from the source
    /// (`data` covers whole chunks, as a fetch reads them). Takes at most
    /// one new sample, and makes it durable before returning (blocking:
    /// call on the blocking pool, or through [`Fingerprint::offer_async`]).
    /// Returns whether a sample was taken.
    pub fn offer(&self, first: u64, data: &[u8]) -> Result<bool> {
        if self.full.load(Ordering::Relaxed) {
            return Ok(false);
        }
        let g = self.geometry;
        let cs = crate::units::mem_len(g.chunk_size());
        let sample = {
            let mut s = self.samples.lock().expect("poisoned");
            let mut taken = None;
            for (k, bytes) in data.chunks(cs).enumerate() {
                let chunk = first + k as u64;
                if chunk >= g.chunks() || bytes.len() as u64 != chunk_len(g, chunk) {
                    break;
                }
                let r = region(g, chunk);
                if s.iter().any(|x| region(g, x.chunk) == r) || is_zero(bytes) {
                    continue;
                }
                let sample = Sample {
                    chunk,
                    blake3: blake3::hash(bytes).to_hex().to_string(),
                };
                s.push(sample.clone());
                taken = Some(sample);
                break;
            }
            taken
        };
        let Some(sample) = sample else {
            return Ok(false);
        };
        self.update_full();
        if let Err(e) = self.save() {
            // Not durable: forget it, so a later fetch of the region tries
            // again.
            self.samples
                .lock()
                .expect("poisoned")
                .retain(|x| x.chunk != sample.chunk);
            self.update_full();
            return Err(e);
        }
        Ok(true)
    }

    /// [`Fingerprint::offer`] off the async workers (only when a sample may
    /// be taken: the common case returns at once).
    pub async fn offer_async(self: &std::sync::Arc<Self>, first: u64, data: &[u8]) -> Result<()> {
        if self.full.load(Ordering::Relaxed) {
            return Ok(());
        }
        // Find the candidate here (no copy of the whole run), persist on
        // the blocking pool.
        let g = self.geometry;
        let cs = crate::units::mem_len(g.chunk_size());
        let candidate = {
            let s = self.samples.lock().expect("poisoned");
            data.chunks(cs).enumerate().find_map(|(k, bytes)| {
                let chunk = first + k as u64;
                let r = region(g, chunk);
                (chunk < g.chunks()
                    && bytes.len() as u64 == chunk_len(g, chunk)
                    && !s.iter().any(|x| region(g, x.chunk) == r)
                    && !is_zero(bytes))
                .then(|| (chunk, bytes.to_vec()))
            })
        };
        let Some((chunk, bytes)) = candidate else {
            return Ok(());
        };
        let fp = self.clone();
        tokio::task::spawn_blocking(move || fp.offer(chunk, &bytes).map(|_| ()))
            .await
            .map_err(|e| Error::StateIo {
                dir: self.dir.clone(),
                source: io::Error::other(e),
            })?
    }

    /// Write the samples to `fingerprint.json` atomically (temporary file,
    /// fsync, rename, fsync of the directory).
    fn save(&self) -> Result<()> {
        let _w = self.writing.lock().expect("poisoned");
        let d = OnDisk {
            format: FORMAT.into(),
            version: VERSION,
            size: self.geometry.size(),
            chunk_size: self.geometry.chunk_size(),
            samples: self.samples(),
        };
        let mut json = serde_json::to_vec_pretty(&d).expect("fingerprint serialises");
        json.push(b'\n');
        let io = |source| Error::StateIo {
            dir: self.dir.clone(),
            source,
        };
        let tmp = self.dir.join(format!(".{FILE}.tmp"));
        {
            let mut f = fs::File::create(&tmp).map_err(io)?;
            f.write_all(&json).map_err(io)?;
            f.sync_all().map_err(io)?;
        }
        fs::rename(&tmp, self.dir.join(FILE)).map_err(io)?;
        fs::File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(io)
    }

    /// Compare `samples` with chunks read by `read(offset, len)` (four
    /// requests in flight); the first chunk that differs is
    /// returned.
    pub async fn check<F, Fut>(
        samples: &[Sample],
        geometry: Geometry,
        location: &str,
        read: F,
    ) -> io::Result<Option<Mismatch>>
    where
        F: Fn(u64, usize) -> Fut,
        Fut: std::future::Future<Output = io::Result<Vec<u8>>>,
    {
        use futures_util::{StreamExt, TryStreamExt};
        // A few at once: not one round trip per sample on a far source, and
        // at most four chunks in memory.
        let ranges: Vec<(u64, usize)> = samples
            .iter()
            .map(|s| {
                let r = geometry.bytes(crate::units::ChunkIndex(s.chunk));
                (r.start, crate::units::mem_len(r.end - r.start))
            })
            .collect();
        let hash = |data: Vec<u8>| blake3::hash(&data).to_hex().to_string();
        let found: Vec<String> = futures_util::stream::iter(ranges)
            .map(|(o, n)| read(o, n))
            .buffered(4)
            .map_ok(hash)
            .try_collect()
            .await?;
        for (s, found) in samples.iter().zip(found) {
            let r = geometry.bytes(crate::units::ChunkIndex(s.chunk));
            if found != s.blake3 {
                return Ok(Some(Mismatch {
                    location: location.to_string(),
                    chunk: s.chunk,
                    offset: r.start,
                    recorded: s.blake3.clone(),
                    found,
                }));
            }
        }
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::units::mem_len;

    #[test]
    fn one_sample_per_region_survives_a_reload() {
        let dir = tempfile::tempdir().unwrap();
        let g = Geometry::new(64 << 10 << 5, 64 << 10).unwrap(); // 32 chunks
        let fp = Fingerprint::load(dir.path(), g).unwrap();
        let zeros = vec![0u8; 64 << 10];
        assert!(!fp.offer(0, &zeros).unwrap(), "zero chunks are no evidence");
        let mut two = vec![1u8; 128 << 10];
        two[70_000] = 2;
        assert!(fp.offer(0, &two).unwrap());
        // Chunks 0 and 1 share region 0: no second sample there.
        assert!(!fp.offer(1, &two[64 << 10..]).unwrap());
        assert!(fp.offer(31, &two[..64 << 10]).unwrap());
        let again = Fingerprint::load(dir.path(), g).unwrap();
        assert_eq!(again.samples(), fp.samples());
        assert_eq!(
            again.samples().iter().map(|s| s.chunk).collect::<Vec<_>>(),
            [0, 31]
        );
    }

    #[tokio::test]
    async fn check_names_the_first_chunk_that_differs() {
        let dir = tempfile::tempdir().unwrap();
        let g = Geometry::new(1 << 20, 64 << 10).unwrap(); // 16 chunks
        let a: Vec<u8> = (0..1u32 << 20).map(|i| (i % 251) as u8 + 1).collect();
        let fp = Fingerprint::load(dir.path(), g).unwrap();
        for c in 0..16u64 {
            let r = mem_len(c << 16)..mem_len((c + 1) << 16);
            fp.offer(c, &a[r]).unwrap();
        }
        assert_eq!(fp.samples().len(), 16);
        let read = |disk: Vec<u8>| {
            move |o: u64, n: usize| {
                let d = disk[mem_len(o)..mem_len(o) + n].to_vec();
                async move { Ok(d) }
            }
        };
        let same = Fingerprint::check(&fp.samples(), g, "a", read(a.clone())).await;
        assert!(same.unwrap().is_none());
        let mut b = a.clone();
        b[(5 << 16) + 17] ^= 1;
        let m = Fingerprint::check(&fp.samples(), g, "b", read(b))
            .await
            .unwrap();
        let m = m.expect("a changed byte is noticed");
        assert_eq!((m.chunk, m.offset), (5, 5 << 16));
        let text = m.to_string();
        assert!(
            text.contains("chunk 5") && text.contains("Put the original"),
            "{text}"
        );
    }

    #[test]
    fn a_damaged_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let g = Geometry::new(1 << 20, 64 << 10).unwrap();
        std::fs::write(dir.path().join(FILE), b"{ not json").unwrap();
        let e = Fingerprint::load(dir.path(), g).unwrap_err();
        assert!(e.to_string().contains(FILE), "{e}");
    }
}
