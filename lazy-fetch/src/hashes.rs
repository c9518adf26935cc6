//! The kept manifest: the blake3 of each chunk, recorded as the chunk
//! becomes present, so finalize need not read the whole target (issue 15).
//!
//! Files in the state directory:
//!
//! | file           | content                                               |
//! |----------------|-------------------------------------------------------|
//! | `hashes`       | 32 bytes per chunk at `index * 32` (sparse; unset = zero bytes) |
//! | `hashes.dirty` | at a clean stop: the chunks whose record is stale      |
//!
//! Which records are trusted: a chunk's record is the hash of its bytes
//! unless the chunk is *dirty* — changed in place since its record was
//! written (a client write, trim or zeroing of part of a present chunk) —
//! or it is a zero chunk (whose hash is known without a record). Dirty
//! chunks are rehashed from the target later (a background pass, or
//! finalize), which costs time proportional to what clients changed, not
//! to the disk.
//!
//! Durability order (the same as the map's, see `state`): a record is
//! written (not synced) while the chunk's lock is held, before the chunk
//! is marked present; a flush syncs this file after the target and before
//! the journal. So every chunk the durable map calls present has its
//! record durable, or is dirty. The dirty set lives in memory and is saved
//! at a clean stop; after an unclean one every chunk a client ever wrote is
//! taken as dirty (conservative: a crash costs rehashing the written
//! chunks, never a wrong manifest).

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::presence::{Bitmap, PresenceMap};
use crate::units::ChunkIndex;

/// Bytes of one record.
pub const RECORD: u64 = 32;

const DIRTY_MAGIC: &[u8; 8] = b"STRMDRT1";

#[derive(Debug)]
pub struct ChunkHashes {
    file: File,
    dir: PathBuf,
    chunks: u64,
    dirty: Bitmap,
}

fn hash16(b: &[u8]) -> [u8; 16] {
    let mut out = [0u8; 16];
    out.copy_from_slice(&blake3::hash(b).as_bytes()[..16]);
    out
}

impl ChunkHashes {
    /// Open (or create) the records of a volume of `chunks` chunks in
    /// `dir`. After a clean stop the saved dirty set is loaded; otherwise
    /// (or when it is missing or damaged) every chunk in `written` is
    /// dirty.
    pub fn open(dir: &Path, map: &PresenceMap, clean: bool) -> io::Result<ChunkHashes> {
        let chunks = map.chunks();
        let path = dir.join("hashes");
        let fresh = !path.exists();
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)?;
        let len = chunks * RECORD;
        if file.metadata()?.len() != len {
            file.set_len(len)?;
        }
        let saved = (clean && !fresh)
            .then(|| std::fs::read(dir.join("hashes.dirty")).ok())
            .flatten()
            .and_then(|b| parse_dirty(&b, chunks));
        let dirty = match saved {
            Some(d) => d,
            None => {
                // No records yet for chunks already present (a migration
                // begun before records were kept): all of them are stale.
                // Otherwise, after an unclean stop, every written chunk.
                let d = Bitmap::new(chunks);
                for i in 0..chunks {
                    let c = ChunkIndex(i);
                    if (fresh && map.is_present(c)) || map.is_written(c) {
                        d.set(i);
                    }
                }
                d
            }
        };
        // A stale saved set must never outlive the run that reads it.
        let _ = std::fs::remove_file(dir.join("hashes.dirty"));
        Ok(ChunkHashes {
            file,
            dir: dir.to_path_buf(),
            chunks,
            dirty,
        })
    }

    /// Record the hash of chunk `c`'s bytes (call under its lock, before it
    /// is marked present); it is no longer dirty.
    pub fn record(&self, c: ChunkIndex, hash: &[u8; 32]) -> io::Result<()> {
        self.file.write_all_at(hash, c.0 * RECORD)?;
        self.dirty.clear(c.0);
        Ok(())
    }

    /// Record the hashes of the contiguous chunks from `first`.
    pub fn record_run(&self, first: ChunkIndex, hashes: &[[u8; 32]]) -> io::Result<()> {
        self.file
            .write_all_at(hashes.as_flattened(), first.0 * RECORD)?;
        for i in 0..hashes.len() as u64 {
            self.dirty.clear(first.0 + i);
        }
        Ok(())
    }

    /// Chunk `c` changed in place: its record is stale until rehashed.
    pub fn mark_dirty(&self, c: ChunkIndex) {
        self.dirty.set(c.0);
    }

    pub fn is_dirty(&self, c: ChunkIndex) -> bool {
        self.dirty.get(c.0)
    }

    pub fn dirty_count(&self) -> u64 {
        self.dirty.count_ones()
    }

    /// The first dirty chunk at or after `from`.
    pub fn next_dirty(&self, from: u64) -> Option<ChunkIndex> {
        self.dirty.next_set(from).map(ChunkIndex)
    }

    /// The records of chunks `first..first + n`, as stored.
    pub fn read(&self, first: ChunkIndex, n: u64) -> io::Result<Vec<u8>> {
        let len =
            usize::try_from(n * RECORD).expect("callers read a window of at most 65536 records");
        let mut buf = vec![0u8; len];
        self.file.read_exact_at(&mut buf, first.0 * RECORD)?;
        Ok(buf)
    }

    /// Make the records written so far durable (a flush, after the target
    /// sync and before the journal).
    pub fn sync(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    /// Save the dirty set (a clean stop, after the last sync).
    pub fn save_dirty(&self) -> io::Result<()> {
        let bits = self.dirty.to_bytes();
        let mut v = Vec::with_capacity(bits.len() + 32);
        v.extend_from_slice(DIRTY_MAGIC);
        v.extend_from_slice(&self.chunks.to_le_bytes());
        v.extend_from_slice(&bits);
        let h = hash16(&v);
        v.extend_from_slice(&h);
        let tmp = self.dir.join(".hashes.dirty.tmp");
        {
            let f = File::create(&tmp)?;
            f.write_all_at(&v, 0)?;
            f.sync_all()?;
        }
        std::fs::rename(&tmp, self.dir.join("hashes.dirty"))?;
        File::open(&self.dir)?.sync_all()
    }
}

fn parse_dirty(b: &[u8], chunks: u64) -> Option<Bitmap> {
    if b.len() < 32 || &b[..8] != DIRTY_MAGIC {
        return None;
    }
    let (body, h) = b.split_at(b.len() - 16);
    if hash16(body) != h {
        return None;
    }
    if u64::from_le_bytes(body[8..16].try_into().ok()?) != chunks {
        return None;
    }
    Bitmap::from_bytes(chunks, &body[16..])
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::presence::ChunkState;

    fn map(chunks: u64, written: &[u64]) -> PresenceMap {
        let m = PresenceMap::new(chunks);
        for &w in written {
            m.set(ChunkIndex(w), ChunkState::Data, true);
        }
        m
    }

    #[test]
    fn records_survive_reopen_and_dirty_is_kept_only_across_a_clean_stop() {
        let dir = tempfile::tempdir().unwrap();
        let written = map(10, &[3, 7]);
        let h = ChunkHashes::open(dir.path(), &written, false).unwrap();
        // Unclean (or first) open: every written chunk is dirty.
        assert!(h.is_dirty(ChunkIndex(3)) && h.is_dirty(ChunkIndex(7)));
        assert_eq!(h.dirty_count(), 2);
        h.record(ChunkIndex(3), &[0xab; 32]).unwrap();
        h.record(ChunkIndex(5), &[0xcd; 32]).unwrap();
        assert!(!h.is_dirty(ChunkIndex(3)));
        h.mark_dirty(ChunkIndex(5));
        h.sync().unwrap();
        h.save_dirty().unwrap();
        drop(h);

        let h = ChunkHashes::open(dir.path(), &written, true).unwrap();
        assert_eq!(&h.read(ChunkIndex(3), 1).unwrap(), &[0xab; 32]);
        assert_eq!(
            (
                h.is_dirty(ChunkIndex(3)),
                h.is_dirty(ChunkIndex(5)),
                h.is_dirty(ChunkIndex(7))
            ),
            (false, true, true)
        );
        assert_eq!(h.next_dirty(0), Some(ChunkIndex(5)));
        drop(h);
        // The saved set was consumed: an unclean stop now falls back to
        // "every written chunk".
        let h = ChunkHashes::open(dir.path(), &written, true).unwrap();
        assert_eq!(
            (
                h.is_dirty(ChunkIndex(3)),
                h.is_dirty(ChunkIndex(5)),
                h.is_dirty(ChunkIndex(7))
            ),
            (true, false, true)
        );
    }

    #[test]
    fn a_migration_from_before_records_has_every_present_chunk_stale() {
        let dir = tempfile::tempdir().unwrap();
        let m = PresenceMap::new(4);
        m.set(ChunkIndex(0), ChunkState::Data, false);
        m.set(ChunkIndex(2), ChunkState::Zero, false);
        let h = ChunkHashes::open(dir.path(), &m, true).unwrap();
        assert!(h.is_dirty(ChunkIndex(0)) && h.is_dirty(ChunkIndex(2)));
        assert!(!h.is_dirty(ChunkIndex(1)));
    }

    #[test]
    fn a_damaged_dirty_file_falls_back_to_the_written_chunks() {
        let dir = tempfile::tempdir().unwrap();
        let written = map(4, &[1]);
        let h = ChunkHashes::open(dir.path(), &written, false).unwrap();
        h.record(ChunkIndex(1), &[1; 32]).unwrap();
        h.save_dirty().unwrap();
        drop(h);
        let p = dir.path().join("hashes.dirty");
        let mut b = std::fs::read(&p).unwrap();
        b[9] ^= 1;
        std::fs::write(&p, b).unwrap();
        let h = ChunkHashes::open(dir.path(), &written, true).unwrap();
        assert!(h.is_dirty(ChunkIndex(1)));
    }
}
