//! Encoding of transmission replies.
//!
//! A reply is built whole before it is queued for the writer, as a list of
//! buffers written back to back, so replies to different requests never
//! interleave inside a message. Once structured replies are negotiated every
//! READ reply, success or error, is structured (libnbd drops a connection
//! that answers a READ with a simple reply); other successful commands use
//! the 16-byte simple reply, which the spec allows and every client accepts.

use crate::device::{Extent, Piece};
use crate::proto::{self, ChunkHeader, Errno};

/// One reply, as buffers to write in order.
#[derive(Debug, Default)]
pub struct Reply {
    pub parts: Vec<Vec<u8>>,
}

impl Reply {
    pub fn len(&self) -> usize {
        self.parts.iter().map(Vec::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Flatten (tests and fuzzing).
    pub fn to_bytes(&self) -> Vec<u8> {
        self.parts.concat()
    }

    fn chunk(&mut self, cookie: u64, kind: u16, done: bool, payload: Vec<u8>) {
        let header = ChunkHeader {
            flags: if done { proto::REPLY_FLAG_DONE } else { 0 },
            kind,
            cookie,
            // At most 2^20 descriptors (8 MiB) or one MAX_STRING message.
            length: proto::wire_u32(payload.len(), "a reply chunk"),
        };
        self.parts.push(header.encode().to_vec());
        if !payload.is_empty() {
            self.parts.push(payload);
        }
    }
}

/// Success without payload.
pub fn ok(cookie: u64) -> Reply {
    Reply {
        parts: vec![proto::simple_reply_header(0, cookie).to_vec()],
    }
}

/// An error, structured (with the message) when structured replies are on.
pub fn error(cookie: u64, structured: bool, errno: Errno, message: &str) -> Reply {
    if structured {
        let mut r = Reply::default();
        r.chunk(
            cookie,
            proto::REPLY_TYPE_ERROR,
            true,
            proto::encode_error_chunk(errno, message, None),
        );
        r
    } else {
        Reply {
            parts: vec![proto::simple_reply_header(errno.code(), cookie).to_vec()],
        }
    }
}

/// A successful read of `pieces` starting at `offset`.
///
/// Structured: one `OFFSET_DATA` or `OFFSET_HOLE` chunk per piece, the last
/// one flagged done (all data is in hand, so no error can follow it); with
/// `df` the pieces are merged into one data chunk as the spec requires.
/// Simple: the header then the bytes, holes written as zeros.
pub fn read(cookie: u64, structured: bool, df: bool, offset: u64, pieces: Vec<Piece>) -> Reply {
    let mut r = Reply::default();
    if !structured {
        r.parts.push(proto::simple_reply_header(0, cookie).to_vec());
        for p in pieces {
            match p {
                Piece::Data(d) if !d.is_empty() => r.parts.push(d),
                Piece::Data(_) => {}
                Piece::Zero(n) => r.parts.push(vec![
                    0;
                    usize::try_from(n).expect(
                        "a piece of one read: at most MAX_PAYLOAD"
                    )
                ]),
            }
        }
        return r;
    }
    let pieces: Vec<Piece> = if df && pieces.len() > 1 {
        vec![Piece::Data(crate::device::flatten(pieces))]
    } else {
        pieces.into_iter().filter(|p| !p.is_empty()).collect()
    };
    if pieces.is_empty() {
        r.chunk(cookie, proto::REPLY_TYPE_NONE, true, Vec::new());
        return r;
    }
    let last = pieces.len() - 1;
    let mut at = offset;
    for (i, p) in pieces.into_iter().enumerate() {
        let len = p.len();
        match p {
            Piece::Data(d) => {
                // Header, then the 8-byte offset, then the data as its own
                // buffer so large reads are never copied.
                let header = ChunkHeader {
                    flags: if i == last { proto::REPLY_FLAG_DONE } else { 0 },
                    kind: proto::REPLY_TYPE_OFFSET_DATA,
                    cookie,
                    length: 8 + proto::wire_u32(
                        d.len(),
                        "a piece of one read (at most MAX_PAYLOAD)",
                    ),
                };
                let mut head = header.encode().to_vec();
                head.extend_from_slice(&at.to_be_bytes());
                r.parts.push(head);
                r.parts.push(d);
            }
            Piece::Zero(n) => {
                let mut payload = at.to_be_bytes().to_vec();
                let n = u32::try_from(n).expect("a piece of one read: at most MAX_PAYLOAD");
                payload.extend_from_slice(&n.to_be_bytes());
                r.chunk(cookie, proto::REPLY_TYPE_OFFSET_HOLE, i == last, payload);
            }
        }
        at += len;
    }
    r
}

/// Turn a device's extents into wire descriptors for a request of `len`
/// bytes: empty extents dropped, neighbours with equal flags merged, the
/// total clipped to the request (so `REQ_ONE`'s limit always holds), at most
/// `max_descriptors`, and never none (an unknown range is reported as data,
/// which the spec says is always safe).
pub fn descriptors(extents: &[Extent], len: u32, req_one: bool) -> Vec<(u32, u32)> {
    const MAX_DESCRIPTORS: usize = 1 << 20;
    let limit = if req_one { 1 } else { MAX_DESCRIPTORS };
    let mut out: Vec<(u32, u32)> = Vec::new();
    let mut remaining = u64::from(len);
    for e in extents {
        if remaining == 0 {
            break;
        }
        if e.length == 0 {
            continue;
        }
        let flags = (if e.hole { proto::STATE_HOLE } else { 0 })
            | (if e.zero { proto::STATE_ZERO } else { 0 });
        // At most `remaining`, which starts at the u32 `len`.
        let take = u32::try_from(e.length.min(remaining)).expect("at most len");
        remaining -= u64::from(take);
        let full = out.len() == limit;
        match out.last_mut() {
            Some((l, f)) if *f == flags => *l += take,
            _ if full => break,
            _ => out.push((take, flags)),
        }
    }
    if out.is_empty() {
        out.push((len, 0));
    }
    out
}

/// A successful block status reply for one metadata context.
pub fn block_status(cookie: u64, context_id: u32, descriptors: &[(u32, u32)]) -> Reply {
    let mut payload = Vec::with_capacity(4 + 8 * descriptors.len());
    payload.extend_from_slice(&context_id.to_be_bytes());
    for (len, flags) in descriptors {
        payload.extend_from_slice(&len.to_be_bytes());
        payload.extend_from_slice(&flags.to_be_bytes());
    }
    let mut r = Reply::default();
    r.chunk(cookie, proto::REPLY_TYPE_BLOCK_STATUS, true, payload);
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn structured_read_sends_holes_as_hole_chunks_and_marks_last_done() {
        let r = read(
            7,
            true,
            false,
            4096,
            vec![Piece::Data(vec![1; 512]), Piece::Zero(1024)],
        );
        let b = r.to_bytes();
        // First chunk: OFFSET_DATA, not done.
        assert_eq!(&b[4..6], &0u16.to_be_bytes());
        assert_eq!(&b[6..8], &proto::REPLY_TYPE_OFFSET_DATA.to_be_bytes());
        assert_eq!(&b[16..20], &(8u32 + 512).to_be_bytes());
        assert_eq!(&b[20..28], &4096u64.to_be_bytes());
        let second = &b[28 + 512..];
        assert_eq!(&second[4..6], &proto::REPLY_FLAG_DONE.to_be_bytes());
        assert_eq!(&second[6..8], &proto::REPLY_TYPE_OFFSET_HOLE.to_be_bytes());
        assert_eq!(&second[20..28], &(4096u64 + 512).to_be_bytes());
        assert_eq!(&second[28..32], &1024u32.to_be_bytes());
        assert_eq!(second.len(), 32);
    }

    #[test]
    fn df_read_is_one_data_chunk_with_zeros_present() {
        let r = read(
            1,
            true,
            true,
            0,
            vec![Piece::Data(vec![1; 3]), Piece::Zero(2)],
        );
        let b = r.to_bytes();
        assert_eq!(&b[6..8], &proto::REPLY_TYPE_OFFSET_DATA.to_be_bytes());
        assert_eq!(&b[4..6], &proto::REPLY_FLAG_DONE.to_be_bytes());
        assert_eq!(&b[28..], &[1, 1, 1, 0, 0]);
    }

    #[test]
    fn zero_length_structured_read_is_a_single_none_chunk() {
        let b = read(1, true, false, 0, vec![]).to_bytes();
        assert_eq!(b.len(), proto::CHUNK_HEADER_LEN);
        assert_eq!(&b[6..8], &proto::REPLY_TYPE_NONE.to_be_bytes());
        assert_eq!(&b[4..6], &proto::REPLY_FLAG_DONE.to_be_bytes());
    }

    #[test]
    fn simple_read_materialises_holes() {
        let b = read(
            9,
            false,
            false,
            0,
            vec![Piece::Zero(3), Piece::Data(vec![5])],
        )
        .to_bytes();
        assert_eq!(b.len(), 16 + 4);
        assert_eq!(&b[16..], &[0, 0, 0, 5]);
    }

    #[test]
    fn structured_error_carries_the_message() {
        let b = error(3, true, Errno::Io, "disk on fire").to_bytes();
        assert_eq!(&b[6..8], &proto::REPLY_TYPE_ERROR.to_be_bytes());
        let c = proto::decode_error_chunk(proto::REPLY_TYPE_ERROR, &b[20..]).unwrap();
        assert_eq!((c.error, c.message.as_str()), (5, "disk on fire"));
    }

    #[test]
    fn descriptors_merge_clip_and_respect_req_one() {
        let ex = [
            Extent::data(1000),
            Extent::data(24),
            Extent::hole(4096),
            Extent::data(1 << 40),
        ];
        assert_eq!(
            descriptors(&ex, 8192, false),
            vec![(1024, 0), (4096, 3), (3072, 0)]
        );
        assert_eq!(descriptors(&ex, 512, true), vec![(512, 0)]);
        assert_eq!(descriptors(&ex, 8192, true), vec![(1024, 0)]);
        assert_eq!(descriptors(&[], 77, false), vec![(77, 0)]);
    }
}
