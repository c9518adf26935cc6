//! `candidates`: the absent chunks whose bytes in the target are a copy made
//! by `stream seed` and may still equal the source, and which of them were
//! zero chunks (see `volume/candidate.rs`). Two bitmaps with a magic and a
//! checksum, written once at the cutover, before the map that makes those
//! chunks absent.
//!
//! Only ever a hint: a candidate's bytes are compared with the source's
//! hash before they are trusted, so a lost or stale file costs fetches,
//! never data. It is still checksummed, so a damaged file is not read as
//! "these chunks hold no copy" (which would let a sparse target's absent
//! chunks be taken for zeros where they hold the old copy).

use std::fs;
use std::io;

use super::{HASH_LEN, StateDir, hash16, write_atomic};
use crate::error::{Error, Result};
use crate::presence::Bitmap;

const MAGIC: &[u8; 8] = b"STRMCND1";
const FILE: &str = "candidates";

impl StateDir {
    /// Write the candidates and which of them were zero chunks (blocking;
    /// atomic replace, synced).
    pub fn write_candidates(&self, bits: &Bitmap, zero: &Bitmap) -> Result<()> {
        let (a, b) = (bits.to_bytes(), zero.to_bytes());
        let mut v = Vec::with_capacity(a.len() + b.len() + 16 + HASH_LEN);
        v.extend_from_slice(MAGIC);
        v.extend_from_slice(&bits.len().to_le_bytes());
        v.extend_from_slice(&a);
        v.extend_from_slice(&b);
        let h = hash16(&[&v]);
        v.extend_from_slice(&h);
        write_atomic(&self.dir, FILE, &v).map_err(|e| self.io(e))
    }

    /// Forget the candidates (every one is present: the set means
    /// nothing any more). Blocking; synced.
    pub fn remove_candidates(&self) -> Result<()> {
        match fs::remove_file(self.dir.join(FILE)) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(self.io(e)),
        }
        std::fs::File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| self.io(e))
    }

    /// The candidates of a migration of `chunks` chunks and which were zero
    /// chunks, if it has them.
    pub fn read_candidates(&self, chunks: u64) -> Result<Option<(Bitmap, Bitmap)>> {
        let path = self.dir.join(FILE);
        let v = match fs::read(&path) {
            Ok(v) => v,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(self.io(e)),
        };
        let corrupt = |detail: &str| Error::StateCorrupt {
            path: path.clone(),
            detail: detail.to_string(),
        };
        if v.len() < 16 + HASH_LEN || &v[..8] != MAGIC {
            return Err(corrupt("not a candidate map"));
        }
        let (body, h) = v.split_at(v.len() - HASH_LEN);
        if hash16(&[body]) != h {
            return Err(corrupt("checksum does not match (torn or damaged)"));
        }
        let len = u64::from_le_bytes(body[8..16].try_into().expect("8"));
        if len != chunks {
            return Err(corrupt("size does not match the header's geometry"));
        }
        let one = (body.len() - 16) / 2;
        let bits = Bitmap::from_bytes(len, &body[16..16 + one]);
        let zero = Bitmap::from_bytes(len, &body[16 + one..]);
        match (bits, zero) {
            (Some(b), Some(z)) => Ok(Some((b, z))),
            _ => Err(corrupt("size does not match the header's geometry")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::Header;

    fn header() -> Header {
        crate::state::tests::sample_header()
    }

    #[test]
    fn round_trip_and_damage_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let h = header();
        let chunks = h.geometry().chunks();
        let (st, _) = StateDir::create(dir.path(), &h).unwrap();
        assert!(st.read_candidates(chunks).unwrap().is_none());
        let (b, z) = (Bitmap::new(chunks), Bitmap::new(chunks));
        b.set(0);
        b.set(chunks - 1);
        z.set(chunks - 1);
        st.write_candidates(&b, &z).unwrap();
        let (back, zero) = st.read_candidates(chunks).unwrap().unwrap();
        assert!(back.get(0) && back.get(chunks - 1));
        assert_eq!(back.count_ones(), 2);
        assert!(zero.get(chunks - 1) && !zero.get(0));
        assert!(st.read_candidates(chunks + 1).is_err(), "another geometry");
        let p = dir.path().join(FILE);
        let mut v = fs::read(&p).unwrap();
        v[20] ^= 1;
        fs::write(&p, v).unwrap();
        assert!(st.read_candidates(chunks).is_err(), "a flipped bit");
    }
}
