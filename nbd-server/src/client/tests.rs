//! The client against a scripted server on a socket pair: well-behaved
//! replies in every shape, and the hostile ones that must end the
//! connection cleanly (never a hang, never a panic).

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

use super::*;
use crate::proto::{
    self, BASE_ALLOCATION, ChunkHeader, Errno, FLAG_FIXED_NEWSTYLE, FLAG_NO_ZEROES, IHAVEOPT, Info,
    NBDMAGIC, OPT_GO, OPT_SET_META_CONTEXT, OPT_STRUCTURED_REPLY, REP_ACK, REP_ERR_UNSUP, REP_INFO,
    REP_META_CONTEXT, REPLY_FLAG_DONE, REPLY_TYPE_BLOCK_STATUS, REPLY_TYPE_ERROR, REPLY_TYPE_NONE,
    REPLY_TYPE_OFFSET_DATA, REPLY_TYPE_OFFSET_HOLE, REQUEST_LEN, STATE_HOLE, STATE_ZERO,
    TF_HAS_FLAGS, encode_error_chunk, option_reply_header, simple_reply_header,
};

const SIZE: u64 = 1 << 20;
const CONTEXT: u32 = 42;
const FLAGS: u16 = TF_HAS_FLAGS | TF_SEND_FLUSH | TF_SEND_TRIM | TF_SEND_WRITE_ZEROES;

/// Bound every test: a hang is a failure, not a stuck CI job.
async fn bounded<F: std::future::Future>(f: F) -> F::Output {
    tokio::time::timeout(Duration::from_secs(10), f)
        .await
        .expect("test timed out")
}

/// The server end of a connection, after negotiation.
struct Server {
    s: UnixStream,
}

impl Server {
    async fn request(&mut self) -> RequestHeader {
        let mut b = [0u8; REQUEST_LEN];
        self.s.read_exact(&mut b).await.unwrap();
        RequestHeader::decode(&b).unwrap()
    }

    async fn chunk(&mut self, flags: u16, kind: u16, cookie: u64, payload: &[u8]) {
        let h = ChunkHeader {
            flags,
            kind,
            cookie,
            length: proto::wire_u32(payload.len(), "a test chunk"),
        };
        self.s.write_all(&h.encode()).await.unwrap();
        self.s.write_all(payload).await.unwrap();
    }

    async fn data(&mut self, done: bool, cookie: u64, offset: u64, data: &[u8]) {
        let mut p = offset.to_be_bytes().to_vec();
        p.extend_from_slice(data);
        let flags = if done { REPLY_FLAG_DONE } else { 0 };
        self.chunk(flags, REPLY_TYPE_OFFSET_DATA, cookie, &p).await;
    }

    async fn hole(&mut self, done: bool, cookie: u64, offset: u64, len: u32) {
        let mut p = offset.to_be_bytes().to_vec();
        p.extend_from_slice(&len.to_be_bytes());
        let flags = if done { REPLY_FLAG_DONE } else { 0 };
        self.chunk(flags, REPLY_TYPE_OFFSET_HOLE, cookie, &p).await;
    }

    async fn done(&mut self, cookie: u64) {
        self.chunk(REPLY_FLAG_DONE, REPLY_TYPE_NONE, cookie, &[])
            .await;
    }

    async fn simple(&mut self, error: u32, cookie: u64, data: &[u8]) {
        self.s
            .write_all(&simple_reply_header(error, cookie))
            .await
            .unwrap();
        self.s.write_all(data).await.unwrap();
    }
}

async fn option(s: &mut UnixStream) -> (u32, Vec<u8>) {
    let mut h = [0u8; 16];
    s.read_exact(&mut h).await.unwrap();
    assert_eq!(proto::be_u64(&h[0..8]), IHAVEOPT);
    let mut data = vec![0; proto::be_u32(&h[12..16]) as usize];
    s.read_exact(&mut data).await.unwrap();
    (proto::be_u32(&h[8..12]), data)
}

async fn reply(s: &mut UnixStream, opt: u32, rep: u32, data: &[u8]) {
    s.write_all(&option_reply_header(
        opt,
        rep,
        proto::wire_u32(data.len(), "a test reply"),
    ))
    .await
    .unwrap();
    s.write_all(data).await.unwrap();
}

/// The server half of negotiation: structured replies and
/// `base:allocation` when `structured`, then `OPT_GO`.
async fn serve_handshake(mut s: UnixStream, structured: bool, flags: u16) -> Server {
    s.write_all(&NBDMAGIC.to_be_bytes()).await.unwrap();
    s.write_all(&IHAVEOPT.to_be_bytes()).await.unwrap();
    s.write_all(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes())
        .await
        .unwrap();
    s.read_u32().await.unwrap();
    loop {
        let (opt, _) = option(&mut s).await;
        match opt {
            OPT_STRUCTURED_REPLY if structured => reply(&mut s, opt, REP_ACK, &[]).await,
            OPT_SET_META_CONTEXT => {
                let mut ctx = CONTEXT.to_be_bytes().to_vec();
                ctx.extend_from_slice(BASE_ALLOCATION.as_bytes());
                reply(&mut s, opt, REP_META_CONTEXT, &ctx).await;
                reply(&mut s, opt, REP_ACK, &[]).await;
            }
            OPT_GO => {
                let info = Info::Export { size: SIZE, flags }.encode();
                reply(&mut s, opt, REP_INFO, &info).await;
                reply(&mut s, opt, REP_ACK, &[]).await;
                return Server { s };
            }
            _ => reply(&mut s, opt, REP_ERR_UNSUP, &[]).await,
        }
    }
}

async fn pair_with(structured: bool, flags: u16) -> (Client, Server) {
    let (c, s) = UnixStream::pair().unwrap();
    let (client, server) = tokio::join!(
        over_unix_stream(c, "disk"),
        serve_handshake(s, structured, flags)
    );
    (client.unwrap(), server)
}

async fn pair(structured: bool) -> (Client, Server) {
    pair_with(structured, FLAGS).await
}

fn assert_disconnected<T: std::fmt::Debug>(r: Result<T, ClientError>, needle: &str) {
    match r {
        Err(ClientError::Disconnected { reason }) => {
            assert!(
                reason.contains(needle),
                "reason {reason:?} lacks {needle:?}"
            )
        }
        other => panic!("expected Disconnected containing {needle:?}, got {other:?}"),
    }
}

#[tokio::test]
async fn negotiated_parameters_are_exposed() {
    bounded(async {
        let (c, _s) = pair(true).await;
        assert_eq!(c.size(), SIZE);
        assert_eq!(c.transmission_flags(), FLAGS);
        assert!(c.can_write() && c.can_flush() && c.can_trim() && c.can_zero());
        assert!(!c.can_fua() && !c.can_multi_conn());
        assert!(c.structured_replies() && c.can_block_status());
        assert_eq!(c.block_sizes(), BlockSizes::default());
    })
    .await
}

#[tokio::test]
async fn structured_read_assembles_data_and_hole_chunks_in_any_order() {
    bounded(async {
        let (c, mut s) = pair(true).await;
        let server = tokio::spawn(async move {
            let r = s.request().await;
            assert_eq!((r.command, r.offset, r.length), (CMD_READ, 100, 30));
            s.data(false, r.cookie, 120, &[3; 10]).await;
            s.hole(false, r.cookie, 100, 10).await;
            s.data(true, r.cookie, 110, &[1; 10]).await;
            // Data in order, then a hole to the end (zeros not written by
            // any chunk: the buffer is filled at completion).
            let r = s.request().await;
            s.data(false, r.cookie, 0, &[5; 4]).await;
            s.hole(true, r.cookie, 4, 60).await;
            s
        });
        let got = c.read(100, 30).await.unwrap();
        let mut want = vec![0u8; 10];
        want.extend_from_slice(&[1; 10]);
        want.extend_from_slice(&[3; 10]);
        assert_eq!(got, want);
        let got = c.read(0, 64).await.unwrap();
        let mut want = vec![5u8; 4];
        want.resize(64, 0);
        assert_eq!(got, want);
        server.await.unwrap();
    })
    .await
}

#[tokio::test]
async fn replies_out_of_order_reach_their_own_requesters() {
    bounded(async {
        let (c, mut s) = pair(true).await;
        let server = tokio::spawn(async move {
            let a = s.request().await;
            let b = s.request().await;
            // Answer in reverse order, with data naming the offset.
            for r in [b, a] {
                s.data(true, r.cookie, r.offset, &[r.offset.to_le_bytes()[0]; 4])
                    .await;
            }
            s
        });
        let (x, y) = tokio::join!(c.read(1, 4), c.read(2, 4));
        assert_eq!(x.unwrap(), vec![1; 4]);
        assert_eq!(y.unwrap(), vec![2; 4]);
        server.await.unwrap();
    })
    .await
}

#[tokio::test]
async fn error_chunk_fails_only_its_request() {
    bounded(async {
        let (c, mut s) = pair(true).await;
        let server = tokio::spawn(async move {
            let r = s.request().await;
            let e = encode_error_chunk(Errno::Io, "medium error", None);
            s.chunk(0, REPLY_TYPE_ERROR, r.cookie, &e).await;
            s.done(r.cookie).await;
            let r = s.request().await;
            s.data(true, r.cookie, r.offset, &[7; 8]).await;
            s
        });
        let e = c.read(0, 8).await.unwrap_err();
        assert_eq!(e.errno(), Some(Errno::Io));
        assert!(e.to_string().contains("medium error"), "{e}");
        assert_eq!(c.read(0, 8).await.unwrap(), vec![7; 8]);
        assert!(!c.is_closed());
        server.await.unwrap();
    })
    .await
}

#[tokio::test]
async fn unknown_cookie_fails_every_request_in_flight_and_later() {
    bounded(async {
        let (c, mut s) = pair(true).await;
        let server = tokio::spawn(async move {
            s.request().await;
            s.request().await;
            s.done(0xdead).await;
            s
        });
        let (x, y) = tokio::join!(c.read(0, 8), c.flush());
        assert_disconnected(x, "unknown cookie");
        assert_disconnected(y, "unknown cookie");
        assert!(c.is_closed());
        assert_disconnected(c.read(0, 8).await, "unknown cookie");
        let _s = server.await.unwrap();
    })
    .await
}

#[tokio::test]
async fn chunk_outside_the_request_is_connection_fatal() {
    bounded(async {
        let (c, mut s) = pair(true).await;
        tokio::spawn(async move {
            let r = s.request().await;
            s.data(true, r.cookie, r.offset + 1, &[0; 8]).await;
            s
        });
        assert_disconnected(c.read(0, 8).await, "outside the request");
    })
    .await
}

#[tokio::test]
async fn overlapping_chunks_are_connection_fatal() {
    bounded(async {
        let (c, mut s) = pair(true).await;
        tokio::spawn(async move {
            let r = s.request().await;
            s.data(false, r.cookie, 0, &[0; 6]).await;
            s.hole(true, r.cookie, 4, 4).await;
            s
        });
        assert_disconnected(c.read(0, 8).await, "overlaps");
    })
    .await
}

#[tokio::test]
async fn success_that_left_bytes_uncovered_is_connection_fatal() {
    bounded(async {
        let (c, mut s) = pair(true).await;
        tokio::spawn(async move {
            let r = s.request().await;
            s.data(false, r.cookie, 0, &[0; 4]).await;
            s.done(r.cookie).await;
            s
        });
        assert_disconnected(c.read(0, 8).await, "only 4 bytes covered");
    })
    .await
}

#[tokio::test]
async fn huge_chunk_length_is_refused_before_reading_it() {
    bounded(async {
        let (c, mut s) = pair(true).await;
        tokio::spawn(async move {
            let r = s.request().await;
            let h = ChunkHeader {
                flags: REPLY_FLAG_DONE,
                kind: REPLY_TYPE_ERROR,
                cookie: r.cookie,
                length: u32::MAX,
            };
            s.s.write_all(&h.encode()).await.unwrap();
            s
        });
        assert_disconnected(c.read(0, 8).await, "error chunk length");
    })
    .await
}

#[tokio::test]
async fn bad_reply_magic_is_connection_fatal() {
    bounded(async {
        let (c, mut s) = pair(true).await;
        tokio::spawn(async move {
            s.request().await;
            s.s.write_all(&[0xff; 16]).await.unwrap();
            s
        });
        assert_disconnected(c.flush().await, "magic");
    })
    .await
}

#[tokio::test]
async fn server_hanging_up_fails_requests_in_flight() {
    bounded(async {
        let (c, mut s) = pair(true).await;
        tokio::spawn(async move {
            s.request().await;
            drop(s);
        });
        assert_disconnected(c.read(0, 8).await, "closed the connection");
        assert!(c.is_closed());
    })
    .await
}

#[tokio::test]
async fn simple_replies_carry_read_data_and_errors() {
    bounded(async {
        let (c, mut s) = pair(false).await;
        assert!(!c.structured_replies() && !c.can_block_status());
        let server = tokio::spawn(async move {
            let r = s.request().await;
            s.simple(0, r.cookie, &[9; 16]).await;
            let r = s.request().await;
            let mut payload = vec![0; r.length as usize];
            s.s.read_exact(&mut payload).await.unwrap();
            assert_eq!(payload, b"hello");
            s.simple(Errno::NoSpc.code(), r.cookie, &[]).await;
            s
        });
        assert_eq!(c.read(0, 16).await.unwrap(), vec![9; 16]);
        let e = c.write(8, b"hello", false).await.unwrap_err();
        assert_eq!(e.errno(), Some(Errno::NoSpc));
        assert_eq!(
            c.block_status(0, 4096).await.unwrap(),
            vec![Extent::data(4096)]
        );
        server.await.unwrap();
    })
    .await
}

#[tokio::test]
async fn block_status_decodes_holes_and_zeroes() {
    bounded(async {
        let (c, mut s) = pair(true).await;
        let server = tokio::spawn(async move {
            let r = s.request().await;
            assert_eq!(r.command, CMD_BLOCK_STATUS);
            let mut p = CONTEXT.to_be_bytes().to_vec();
            for (len, flags) in [
                (4096u32, 0u32),
                (8192, STATE_HOLE | STATE_ZERO),
                (512, STATE_ZERO),
            ] {
                p.extend_from_slice(&len.to_be_bytes());
                p.extend_from_slice(&flags.to_be_bytes());
            }
            s.chunk(REPLY_FLAG_DONE, REPLY_TYPE_BLOCK_STATUS, r.cookie, &p)
                .await;
            s
        });
        let e = c.block_status(0, 65536).await.unwrap();
        assert_eq!(
            e,
            vec![
                Extent::data(4096),
                Extent::hole(8192),
                Extent {
                    length: 512,
                    hole: false,
                    zero: true
                }
            ]
        );
        server.await.unwrap();
    })
    .await
}

#[tokio::test]
async fn requests_the_export_does_not_advertise_are_refused_locally() {
    bounded(async {
        let (c, _s) = pair_with(true, TF_HAS_FLAGS | TF_READ_ONLY).await;
        for e in [
            c.write(0, b"x", false).await.unwrap_err(),
            c.trim(0, 1).await.unwrap_err(),
            c.write_zeroes(0, 1, false).await.unwrap_err(),
            c.flush().await.unwrap_err(),
        ] {
            assert!(matches!(e, ClientError::Unsupported { .. }), "{e:?}");
            assert_eq!(e.errno(), Some(Errno::NotSup));
        }
        assert!(matches!(
            c.read(0, MAX_PAYLOAD + 1).await,
            Err(ClientError::InvalidArgument(_))
        ));
        assert!(!c.is_closed());
    })
    .await
}

#[tokio::test]
async fn disconnect_waits_for_requests_in_flight_then_sends_disc() {
    bounded(async {
        let (c, mut s) = pair(true).await;
        let server = tokio::spawn(async move {
            let r = s.request().await;
            // The client must not send DISC before this reply.
            tokio::time::sleep(Duration::from_millis(50)).await;
            s.data(true, r.cookie, r.offset, &[5; 4]).await;
            let d = s.request().await;
            assert_eq!(d.command, CMD_DISC);
            // Then the client closes its side.
            let mut rest = vec![];
            s.s.read_to_end(&mut rest).await.unwrap();
            assert!(rest.is_empty());
        });
        let reader = c.clone();
        let read = tokio::spawn(async move { reader.read(0, 4).await });
        // Let the read be written first.
        tokio::task::yield_now().await;
        tokio::time::sleep(Duration::from_millis(10)).await;
        c.disconnect().await.unwrap();
        assert_eq!(read.await.unwrap().unwrap(), vec![5; 4]);
        assert!(c.is_closed());
        assert_disconnected(c.read(0, 4).await, "disconnected by the client");
        server.await.unwrap();
    })
    .await
}

#[tokio::test]
async fn many_requests_in_flight_each_get_their_own_data() {
    bounded(async {
        let (c, mut s) = pair(true).await;
        let server = tokio::spawn(async move {
            let mut reqs = vec![];
            for _ in 0..64 {
                reqs.push(s.request().await);
            }
            reqs.reverse();
            for r in reqs {
                // The low byte of the sector number names the request.
                let fill = vec![(r.offset / 512).to_le_bytes()[0]; r.length as usize];
                s.data(true, r.cookie, r.offset, &fill).await;
            }
            s
        });
        let reads = (0..64u64).map(|i| {
            let c = c.clone();
            async move { (i, c.read(i * 512, 512).await) }
        });
        for (i, r) in futures_join_all(reads).await {
            assert_eq!(r.unwrap(), vec![i.to_le_bytes()[0]; 512]);
        }
        server.await.unwrap();
    })
    .await
}

/// A minimal `join_all` on tokio tasks (no `futures` dependency).
async fn futures_join_all<F>(futs: impl IntoIterator<Item = F>) -> Vec<F::Output>
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    let handles: Vec<_> = futs.into_iter().map(tokio::spawn).collect();
    let mut out = Vec::with_capacity(handles.len());
    for h in handles {
        out.push(h.await.unwrap());
    }
    out
}

#[tokio::test]
async fn write_cancelled_mid_send_closes_the_connection() {
    bounded(async {
        let (c, s) = pair(true).await;
        // The server reads nothing, so a 4 MiB write blocks part-way.
        let big = vec![1u8; 4 << 20];
        let r = tokio::time::timeout(Duration::from_millis(50), c.write(0, &big, false)).await;
        assert!(r.is_err(), "the write should still have been blocked");
        assert!(c.is_closed());
        assert_disconnected(c.flush().await, "cancelled");
        drop(s);
    })
    .await
}

#[tokio::test]
async fn writer_blocked_on_a_full_socket_wakes_when_the_reader_fails() {
    bounded(async {
        let (c, mut s) = pair(true).await;
        let writer = c.clone();
        let blocked =
            tokio::spawn(async move { writer.write(0, &vec![1u8; 4 << 20], false).await });
        tokio::time::sleep(Duration::from_millis(20)).await;
        // Garbage instead of a reply, without reading the request.
        s.s.write_all(&[0xee; 4]).await.unwrap();
        assert_disconnected(blocked.await.unwrap(), "magic");
        assert!(c.is_closed());
    })
    .await
}

#[tokio::test]
async fn dropping_every_clone_closes_the_socket() {
    bounded(async {
        let (c, mut s) = pair(true).await;
        let c2 = c.clone();
        drop(c);
        drop(c2);
        let mut rest = vec![];
        s.s.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty());
    })
    .await
}

#[tokio::test]
async fn read_waiting_for_the_rest_of_its_payload_fails_when_another_request_breaks_the_stream() {
    bounded(async {
        let (c, mut s) = pair(true).await;
        let reader = c.clone();
        let read = tokio::spawn(async move { reader.read(0, 8).await });
        let r = s.request().await;
        // Header and half the data; the reader now waits inside the chunk.
        let h = ChunkHeader {
            flags: REPLY_FLAG_DONE,
            kind: REPLY_TYPE_OFFSET_DATA,
            cookie: r.cookie,
            length: 16,
        };
        s.s.write_all(&h.encode()).await.unwrap();
        s.s.write_all(&0u64.to_be_bytes()).await.unwrap();
        s.s.write_all(&[1; 4]).await.unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
        let big = vec![1u8; 4 << 20];
        let w = tokio::time::timeout(Duration::from_millis(50), c.write(0, &big, false)).await;
        assert!(w.is_err());
        assert_disconnected(read.await.unwrap(), "cancelled");
    })
    .await
}
