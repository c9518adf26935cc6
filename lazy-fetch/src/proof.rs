//! Source-side proof: the blake3 of every chunk of a disk, computed where
//! the disk is and served as a small read-only device, so the cloud side
//! can prove target == source by comparing 32 bytes per chunk instead of
//! reading the legacy disk again over the link (issue 15).
//!
//! Layout of the hash device for chunk size `C` over a disk of `N` bytes:
//! `ceil(N / C)` records of [`HASH_LEN`] bytes, record `i` the blake3 of
//! bytes `[i*C, min((i+1)*C, N))` of the disk (the last chunk short, hashed
//! as it is). It is served by `stream export` as an extra export named
//! [`export_name`]`(C, NAME)` for every chunk size the engine allows, not
//! listed (`nbdinfo --list` shows only the disk), so a plain NBD client
//! never meets it by accident and an old `stream export` simply has no
//! such export (the caller then falls back to reading, and says so).
//!
//! Cost: hashing is done on the blocking pool, at most [`HASHERS`] groups
//! of chunks at a time per device whatever the clients ask, each group at
//! most [`GROUP_BYTES`] of disk: memory is bounded by their product.
//! Holes are read as zeros without I/O (the file device reports them) and
//! a whole zero chunk's hash is computed once.

use std::io;
use std::sync::Arc;

use block_device::{BlockDevice, Capabilities, Piece};
use futures_util::future::BoxFuture;

use crate::units::{MAX_CHUNK, MIN_CHUNK, mem_len};

/// Bytes of one chunk's record.
pub const HASH_LEN: u64 = 32;
/// Disk bytes hashed per blocking task.
pub const GROUP_BYTES: u64 = 16 << 20;
/// Hashing tasks at once per device.
pub const HASHERS: usize = 4;

/// The export name of the hashes of export `name` in chunks of `chunk`.
pub fn export_name(chunk: u64, name: &str) -> String {
    format!("blake3/{chunk}/{name}")
}

/// Every chunk size a migration may use, smallest first.
pub fn chunk_sizes() -> impl Iterator<Item = u64> {
    (MIN_CHUNK.trailing_zeros()..=MAX_CHUNK.trailing_zeros()).map(|s| 1u64 << s)
}

/// The hashes of `disk`'s chunks as a read-only device.
pub struct HashDevice<D> {
    disk: Arc<D>,
    chunk: u64,
    chunks: u64,
    disk_size: u64,
    zero_chunk: [u8; 32],
    hashers: Arc<tokio::sync::Semaphore>,
}

impl<D: BlockDevice> HashDevice<D> {
    pub fn new(disk: Arc<D>, chunk: u64) -> HashDevice<D> {
        let disk_size = disk.size();
        HashDevice {
            disk,
            chunk,
            chunks: disk_size.div_ceil(chunk),
            disk_size,
            zero_chunk: *blake3::hash(&vec![0u8; mem_len(chunk)]).as_bytes(),
            hashers: Arc::new(tokio::sync::Semaphore::new(HASHERS)),
        }
    }

    /// Hashes of chunks `first..end`, read as one group.
    async fn group(&self, first: u64, end: u64) -> io::Result<Vec<u8>> {
        let s = first * self.chunk;
        let e = (end * self.chunk).min(self.disk_size);
        let _slot = self.hashers.acquire().await.expect("never closed");
        // At most max(GROUP_BYTES, chunk) <= MAX_CHUNK bytes (`read` makes
        // groups of GROUP_BYTES / chunk chunks, at least one).
        let len = u32::try_from(e - s).expect("a group is at most MAX_CHUNK bytes");
        let pieces = self.disk.read(s, len).await?;
        let (chunk, zero_chunk) = (self.chunk, self.zero_chunk);
        tokio::task::spawn_blocking(move || hash_pieces(&pieces, s, e, chunk, zero_chunk))
            .await
            .map_err(io::Error::other)
    }
}

/// Hash `[s, e)` of a disk, given as `pieces`, chunk by chunk. A chunk
/// that is one zero piece whole (a hole) takes the precomputed hash.
fn hash_pieces(pieces: &[Piece], s: u64, e: u64, chunk: u64, zero_chunk: [u8; 32]) -> Vec<u8> {
    static ZEROS: [u8; 64 * 1024] = [0; 64 * 1024];
    let mut out = Vec::with_capacity(mem_len((e - s).div_ceil(chunk) * HASH_LEN));
    let mut h = blake3::Hasher::new();
    let mut at = s;
    for p in pieces {
        let mut left = p.len();
        let mut off = 0usize;
        while left > 0 {
            let chunk_start = at / chunk * chunk;
            let chunk_end = (chunk_start + chunk).min(e);
            let n = left.min(chunk_end - at);
            match p {
                Piece::Zero(_) if at == chunk_start && n == chunk => {
                    out.extend_from_slice(&zero_chunk);
                }
                Piece::Zero(_) => {
                    let mut z = n;
                    while z > 0 {
                        let k = usize::try_from(z).map_or(ZEROS.len(), |z| z.min(ZEROS.len()));
                        h.update(&ZEROS[..k]);
                        z -= k as u64;
                    }
                }
                Piece::Data(d) => {
                    h.update(&d[off..off + mem_len(n)]);
                }
            }
            off += mem_len(n);
            left -= n;
            at += n;
            let whole_hole = matches!(p, Piece::Zero(_)) && n == chunk;
            if at == chunk_end && !whole_hole {
                out.extend_from_slice(h.finalize().as_bytes());
                h.reset();
            }
        }
    }
    out
}

impl<D: BlockDevice> BlockDevice for HashDevice<D> {
    fn size(&self) -> u64 {
        self.chunks * HASH_LEN
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            // Many readers at once are fine: it never changes.
            multi_conn: true,
            ..Capabilities::default()
        }
    }

    async fn read(&self, offset: u64, len: u32) -> io::Result<Vec<Piece>> {
        let end = offset + u64::from(len);
        let first = offset / HASH_LEN;
        let last = end.div_ceil(HASH_LEN).min(self.chunks);
        let per_group = (GROUP_BYTES / self.chunk).max(1);
        let mut groups = Vec::new();
        let mut c = first;
        while c < last {
            let g_end = (c + per_group).min(last);
            groups.push(self.group(c, g_end));
            c = g_end;
        }
        let hashes: Vec<u8> = futures_util::future::try_join_all(groups).await?.concat();
        let skip = usize::try_from(offset - first * HASH_LEN).expect("below HASH_LEN");
        Ok(vec![Piece::Data(
            hashes[skip..skip + len as usize].to_vec(),
        )])
    }
}

/// A source's chunk hashes, computed where its disk is: what the verifier
/// reads instead of the chunks (`Source::chunk_hashes`). The engine sees
/// only this; the NBD client that reads a hash export over the link is
/// `nbd_source::RemoteHashes`, outside the engine.
pub trait ChunkHashes: Send + Sync {
    /// Records of chunks `first..first + n`.
    fn read(&self, first: u64, n: u64) -> BoxFuture<'_, io::Result<Vec<[u8; 32]>>>;
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Mem(Vec<u8>, Vec<(u64, u64)>);

    impl BlockDevice for Mem {
        fn size(&self) -> u64 {
            self.0.len() as u64
        }
        fn capabilities(&self) -> Capabilities {
            Capabilities::default()
        }
        /// Reports the ranges in `.1` as zero pieces (holes).
        async fn read(&self, offset: u64, len: u32) -> io::Result<Vec<Piece>> {
            let end = offset + u64::from(len);
            let mut out = Vec::new();
            let mut at = offset;
            while at < end {
                let hole = self.1.iter().find(|h| h.0 <= at && at < h.1);
                let next = match hole {
                    Some(h) => h.1.min(end),
                    None => self
                        .1
                        .iter()
                        .map(|h| h.0)
                        .filter(|&s| s > at)
                        .min()
                        .unwrap_or(end)
                        .min(end),
                };
                out.push(match hole {
                    Some(_) => Piece::Zero(next - at),
                    None => Piece::Data(self.0[mem_len(at)..mem_len(next)].to_vec()),
                });
                at = next;
            }
            Ok(out)
        }
    }

    #[tokio::test]
    async fn records_are_the_blake3_of_each_chunk_holes_and_the_short_tail_included() {
        let chunk = 4096u64;
        let size = 10 * chunk + 100;
        let mut data: Vec<u8> = (0..size).map(|i| (i * 7 % 251) as u8).collect();
        // Chunk 2 a hole, chunk 5 half a hole, chunk 7 all zero data.
        let holes = vec![(2 * chunk, 3 * chunk), (5 * chunk + 2048, 6 * chunk)];
        for (s, e) in &holes {
            data[mem_len(*s)..mem_len(*e)].fill(0);
        }
        data[mem_len(7 * chunk)..mem_len(8 * chunk)].fill(0);
        let dev = HashDevice::new(Arc::new(Mem(data.clone(), holes)), chunk);
        assert_eq!(dev.size(), 11 * HASH_LEN);
        let all = block_device::flatten(dev.read(0, 11 * 32).await.unwrap());
        for i in 0..11u64 {
            let (s, e) = (i * chunk, ((i + 1) * chunk).min(size));
            assert_eq!(
                &all[mem_len(i * 32)..mem_len(i * 32 + 32)],
                blake3::hash(&data[mem_len(s)..mem_len(e)]).as_bytes(),
                "chunk {i}"
            );
        }
        // An unaligned read is the same bytes.
        let part = block_device::flatten(dev.read(45, 100).await.unwrap());
        assert_eq!(part, all[45..145]);
    }

    #[test]
    fn names_and_sizes() {
        assert_eq!(export_name(65536, ""), "blake3/65536/");
        let sizes: Vec<u64> = chunk_sizes().collect();
        assert_eq!(sizes.first(), Some(&4096));
        assert_eq!(sizes.last(), Some(&(16 << 20)));
        assert_eq!(sizes.len(), 13);
    }
}
