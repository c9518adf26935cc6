//! One record of the log: magic, kind, offset, length, the bytes (for a
//! write), a checksum. A record that is cut short or fails its checksum is
//! not parsed, which is how a torn last append is told from a whole one.

use super::Change;

/// Records since the length became 64 bits ("WRE2").
const RECORD_MAGIC: u32 = 0x5752_4532;
/// Records of earlier releases, whose length was 32 bits ("WREC"): still
/// replayed, so an upgrade after a crash loses nothing.
pub(super) const RECORD_MAGIC_V1: u32 = 0x5752_4543;
const HEADER_LEN: usize = 4 + 1 + 8 + 8;
const HEADER_LEN_V1: usize = 4 + 1 + 8 + 4;
const HASH_LEN: usize = 16;

pub(super) fn hash16(parts: &[&[u8]]) -> [u8; HASH_LEN] {
    let mut h = blake3::Hasher::new();
    for p in parts {
        h.update(p);
    }
    let mut out = [0u8; HASH_LEN];
    out.copy_from_slice(&h.finalize().as_bytes()[..HASH_LEN]);
    out
}

pub(super) fn encode(offset: u64, change: Change<'_>) -> Vec<u8> {
    let (kind, len, data): (u8, u64, &[u8]) = match change {
        Change::Write(d) => (0, d.len() as u64, d),
        Change::Zero { len, allocate } => (1 + u8::from(allocate), len, &[]),
    };
    let mut v = Vec::with_capacity(HEADER_LEN + data.len() + HASH_LEN);
    v.extend_from_slice(&RECORD_MAGIC.to_le_bytes());
    v.push(kind);
    v.extend_from_slice(&offset.to_le_bytes());
    v.extend_from_slice(&len.to_le_bytes());
    v.extend_from_slice(data);
    let h = hash16(&[&v]);
    v.extend_from_slice(&h);
    v
}

pub(super) fn parse(bytes: &[u8], at: usize) -> Option<(u64, Change<'_>, usize)> {
    let magic = u32::from_le_bytes(bytes.get(at..at + 4)?.try_into().ok()?);
    let header_len = match magic {
        RECORD_MAGIC => HEADER_LEN,
        RECORD_MAGIC_V1 => HEADER_LEN_V1,
        _ => return None,
    };
    let h = bytes.get(at..at + header_len)?;
    let kind = h[4];
    let offset = u64::from_le_bytes(h[5..13].try_into().ok()?);
    let len = match magic {
        RECORD_MAGIC => u64::from_le_bytes(h[13..21].try_into().ok()?),
        _ => u64::from(u32::from_le_bytes(h[13..17].try_into().ok()?)),
    };
    let data_len = if kind == 0 {
        usize::try_from(len).ok()?
    } else {
        0
    };
    let body_end = (at + header_len).checked_add(data_len)?;
    let hash = bytes.get(body_end..body_end + HASH_LEN)?;
    if hash16(&[&bytes[at..body_end]]) != hash {
        return None;
    }
    let change = match kind {
        0 => Change::Write(&bytes[at + header_len..body_end]),
        1 | 2 => Change::Zero {
            len,
            allocate: kind == 2,
        },
        _ => return None,
    };
    Some((offset, change, body_end + HASH_LEN))
}
