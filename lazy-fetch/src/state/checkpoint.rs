//! The checkpoint (`map`): the three bitmaps, a generation and a checksum.
//! Its snapshot is taken *before* the target sync of the persist cycle
//! that writes it, and it is written with the next generation; the journal
//! is then restarted with that generation (see the module above).

use std::fs;
use std::io;
use std::path::Path;

use super::journal::Journal;
use super::{HASH_LEN, StateDir, hash16, write_atomic};
use crate::error::{Error, Result};
use crate::presence::{Bitmap, PresenceMap};
use crate::units::mem_len;

const MAP_MAGIC: &[u8; 8] = b"STRMMAP1";

impl StateDir {
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

pub(super) fn write_checkpoint(dir: &Path, bitmaps: &[u8], generation: u64) -> io::Result<()> {
    let mut v = Vec::with_capacity(bitmaps.len() + 48);
    v.extend_from_slice(MAP_MAGIC);
    v.extend_from_slice(&generation.to_le_bytes());
    v.extend_from_slice(&(bitmaps.len() as u64).to_le_bytes());
    v.extend_from_slice(bitmaps);
    let h = hash16(&[&v]);
    v.extend_from_slice(&h);
    write_atomic(dir, "map", &v)
}

pub(super) fn read_checkpoint(dir: &Path, chunks: u64) -> Result<(PresenceMap, u64)> {
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
    let len = u64::from_le_bytes(body[16..24].try_into().expect("8"));
    let bitmaps = &body[24..];
    if len == 0 && bitmaps.is_empty() {
        return Ok((PresenceMap::new(chunks), generation));
    }
    // Compared as u64: a length from the file is never truncated.
    let one = chunks.div_ceil(64) * 8;
    if len != bitmaps.len() as u64 || bitmaps.len() as u64 != 3 * one {
        return Err(corrupt("size does not match the header's geometry"));
    }
    let one = mem_len(one);
    let parts: Option<Vec<Bitmap>> = (0..3)
        .map(|i| Bitmap::from_bytes(chunks, &bitmaps[i * one..(i + 1) * one]))
        .collect();
    let mut parts = parts.ok_or_else(|| corrupt("bits set past the last chunk"))?;
    let written = parts.pop().expect("3");
    let zero = parts.pop().expect("3");
    let present = parts.pop().expect("3");
    Ok((PresenceMap::from_parts(present, zero, written), generation))
}
