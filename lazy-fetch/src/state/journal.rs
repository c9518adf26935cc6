//! The journal (`journal`): batches of chunk state changes since the
//! checkpoint, each appended and synced after the target sync that covers
//! it (step 2 of the durability order in the module above).
//!
//! Every batch carries a sequence number and a checksum. At open, replay
//! stops at the first bad batch; if nothing valid follows it, it was a torn
//! write of an unacknowledged flush and is cut off; if a valid batch
//! follows, the journal is damaged in the middle and the state is refused
//! rather than trusted.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

use super::{HASH_LEN, StateDir, hash16, write_atomic};
use crate::error::{Error, Result};
use crate::presence::{ChunkState, PresenceMap};
use crate::units::{ChunkIndex, mem_len};

const JOURNAL_MAGIC: &[u8; 8] = b"STRMJRN1";
const BATCH_MAGIC: u32 = 0x4a42_4154; // "JBAT"

#[derive(Debug)]
pub(super) struct Journal {
    file: File,
    pub(super) generation: u64,
    pub(super) len: u64,
    next_seq: u64,
}

/// A journal entry: a run of `count` chunks from `c` that became `state`.
/// Bits: chunk index (42) | count - 1 (20) | written (1) | zero (1).
/// Hydration and hole learning make long runs, so one entry often stands
/// for thousands of chunks.
const COUNT_BITS: u32 = 20;
const MAX_COUNT: u64 = 1 << COUNT_BITS;

/// Most entries in one batch: its count is a u32.
const BATCH_MAX: usize = u32::MAX as usize;

pub(super) fn entry(c: ChunkIndex, count: u64, state: ChunkState, written: bool) -> u64 {
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

    /// Step 2b, after the target sync: append and sync. Blocking.
    pub fn append(&self, entries: &[u64]) -> Result<()> {
        if entries.is_empty() {
            return Ok(());
        }
        let mut j = self.journal.lock().expect("poisoned");
        // A batch counts its entries in a u32: more (only on a huge volume
        // with 4 KiB chunks) go in several batches, each one complete.
        for batch in entries.chunks(BATCH_MAX) {
            j.append(batch).map_err(|source| Error::PersistMap {
                dir: self.dir.clone(),
                source,
            })?;
        }
        Ok(())
    }

    pub fn journal_len(&self) -> u64 {
        self.journal.lock().expect("poisoned").len
    }
}

impl Journal {
    pub(super) const HEADER_LEN: u64 = 16;

    pub(super) fn create(dir: &Path, generation: u64) -> io::Result<Journal> {
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
    pub(super) fn open(dir: &Path, generation: u64, map: &PresenceMap) -> Result<Journal> {
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
        if (bytes.len() as u64) < Self::HEADER_LEN || &bytes[..8] != JOURNAL_MAGIC {
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
        let mut at = mem_len(Self::HEADER_LEN);
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
        let count = u32::try_from(entries.len()).expect("StateDir::append splits at BATCH_MAX");
        v.extend_from_slice(&count.to_le_bytes());
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
