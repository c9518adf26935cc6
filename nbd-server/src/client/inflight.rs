//! Requests in flight on one connection, and the task that reads replies.
//!
//! See the ownership table in the [module documentation](super) for who
//! holds what. In short: requesters insert a [`Pending`] under the state
//! lock while holding the writer lock, the reader task is the only one that
//! completes and removes entries, and [`Conn::fail`] drains them all at once
//! when the connection dies.

use std::collections::{BTreeMap, HashMap};
use std::os::fd::RawFd;
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, BufReader, BufWriter};
use tokio::sync::{Notify, oneshot, watch};

use super::error::ClientError;
use super::handshake::Negotiated;
use crate::device::Extent;
use crate::proto::{
    self, CHUNK_HEADER_LEN, CMD_BLOCK_STATUS, CMD_READ, ChunkHeader, Errno, MAX_PAYLOAD,
    MAX_STRING_U32, REPLY_TYPE_BLOCK_STATUS, REPLY_TYPE_ERROR_BIT, REPLY_TYPE_ERROR_OFFSET,
    REPLY_TYPE_NONE, REPLY_TYPE_OFFSET_DATA, REPLY_TYPE_OFFSET_HOLE, SIMPLE_REPLY_MAGIC,
    STATE_HOLE, STATE_ZERO, STRUCTURED_REPLY_MAGIC,
};

/// Largest block status chunk we read: `MAX_PAYLOAD` of descriptors plus
/// the context id (the spec asks servers for at most 2^20 descriptors,
/// 8 MiB, so this is generous).
const MAX_BLOCK_STATUS_CHUNK: u32 = MAX_PAYLOAD + 4;
/// Largest error chunk: error, message length, a 4096-byte message and an
/// offset.
const MAX_ERROR_CHUNK: u32 = 4 + 2 + MAX_STRING_U32 + 8;
/// Most disjoint pieces a read may be answered in at any one moment (chunks
/// that touch are merged). Real servers answer in order, so one piece; a
/// hostile server scattering 1-byte chunks is cut off here instead of
/// making the coverage map as large as the read.
const MAX_READ_FRAGMENTS: usize = 1 << 16;

pub(crate) type BoxRead = Box<dyn AsyncRead + Send + Unpin>;
pub(crate) type BoxWrite = Box<dyn AsyncWrite + Send + Unpin>;

/// What a completed request hands back to its waiter.
#[derive(Debug)]
pub(crate) enum Outcome {
    Data(Vec<u8>),
    Extents(Vec<Extent>),
    Done,
}

pub(crate) type Waiter = oneshot::Receiver<Result<Outcome, ClientError>>;

/// Per-command state the reader accumulates until the final chunk.
#[derive(Debug)]
pub(crate) enum Op {
    /// `buf` holds the bytes received so far: it starts empty with the
    /// request's length as capacity, grows as data arrives in order (read
    /// straight into the spare capacity: no memset of a buffer the payload
    /// overwrites, a tenth of hydration's CPU), and is zero-filled only
    /// where a chunk lands beyond its end and at completion, which is what
    /// holes read as. `covered` records which byte ranges (relative to the
    /// request offset) chunks filled; chunks may not overlap.
    Read {
        buf: Vec<u8>,
        covered: Coverage,
    },
    BlockStatus {
        extents: Option<Vec<Extent>>,
    },
    /// Commands whose success carries no payload.
    Plain,
}

/// One request waiting for its reply.
#[derive(Debug)]
pub(crate) struct Pending {
    command: u16,
    offset: u64,
    length: u32,
    op: Op,
    /// At least one structured chunk arrived (a simple reply is then a
    /// violation).
    started: bool,
    /// The first error chunk, reported once the final chunk arrives.
    error: Option<(Errno, String)>,
    tx: oneshot::Sender<Result<Outcome, ClientError>>,
}

/// Shared bookkeeping, behind a std mutex that is never held across an
/// `.await` (every critical section is a few map operations).
#[derive(Debug, Default)]
struct State {
    pending: HashMap<u64, Pending>,
    next_cookie: u64,
    /// Why the connection ended; `Some` is final.
    closed: Option<String>,
    /// `disconnect()` began: new requests are refused.
    disconnecting: bool,
}

/// One connection: negotiated parameters, the writer and the in-flight map.
pub(crate) struct Conn {
    pub(crate) info: Negotiated,
    state: Mutex<State>,
    /// Signalled whenever `pending` becomes empty or the connection closes.
    idle: Notify,
    /// Turns `true` once, when the connection closes; wakes the reader and
    /// any requester blocked on the writer.
    closed_tx: watch::Sender<bool>,
    /// The one writer: each request's header and payload are written whole
    /// while this is held, so requests never interleave on the wire.
    pub(crate) writer: tokio::sync::Mutex<BufWriter<BoxWrite>>,
    /// The socket, for `shutdown(2)` when the connection fails. Valid for
    /// as long as `writer` (which owns a half of it) lives, i.e. as long as
    /// `self`.
    fd: RawFd,
}

impl Conn {
    pub(crate) fn new(info: Negotiated, writer: BoxWrite, fd: RawFd) -> Conn {
        Conn {
            info,
            state: Mutex::new(State::default()),
            idle: Notify::new(),
            closed_tx: watch::Sender::new(false),
            writer: tokio::sync::Mutex::new(BufWriter::with_capacity(64 * 1024, writer)),
            fd,
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the map half-updated
        // in a way later users would misread; carry on with it.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn is_closed(&self) -> bool {
        self.state().closed.is_some()
    }

    /// The error every request gets once the connection is closed.
    pub(crate) fn closed_error(&self) -> ClientError {
        let reason = self
            .state()
            .closed
            .clone()
            .unwrap_or_else(|| "the reply reader stopped".into());
        ClientError::Disconnected { reason }
    }

    /// Resolves once the connection is closed.
    pub(crate) async fn wait_closed(&self) {
        let mut rx = self.closed_tx.subscribe();
        // The sender lives in `self`, so this cannot fail while we borrow it.
        let _ = rx.wait_for(|closed| *closed).await;
    }

    /// Allocate a cookie and enter the request in the map. Call with the
    /// writer lock held, just before writing the request, so the entry
    /// exists before any reply can arrive and is never left behind by a
    /// requester cancelled while queueing for the writer.
    pub(crate) fn register(
        &self,
        command: u16,
        offset: u64,
        length: u32,
        op: Op,
    ) -> Result<(u64, Waiter), ClientError> {
        let mut st = self.state();
        if let Some(reason) = &st.closed {
            return Err(ClientError::Disconnected {
                reason: reason.clone(),
            });
        }
        if st.disconnecting {
            return Err(ClientError::Disconnected {
                reason: "the client is disconnecting".into(),
            });
        }
        let cookie = st.next_cookie;
        st.next_cookie = st.next_cookie.wrapping_add(1);
        let (tx, rx) = oneshot::channel();
        st.pending.insert(
            cookie,
            Pending {
                command,
                offset,
                length,
                op,
                started: false,
                error: None,
                tx,
            },
        );
        Ok((cookie, rx))
    }

    /// Refuse new requests from now on; see `Client::disconnect`.
    pub(crate) fn begin_disconnect(&self) {
        self.state().disconnecting = true;
    }

    /// Wait until no request is in flight (or the connection closed).
    pub(crate) async fn wait_idle(&self) {
        loop {
            let notified = self.idle.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let st = self.state();
                if st.pending.is_empty() || st.closed.is_some() {
                    return;
                }
            }
            notified.await;
        }
    }

    /// End the connection: the first reason wins, every waiter gets
    /// `Disconnected`, blocked writers and the reader wake, and the socket
    /// is shut down so the server sees it at once. Idempotent, synchronous
    /// (callable from `Drop`).
    pub(crate) fn fail(&self, reason: String) {
        let drained = {
            let mut st = self.state();
            if st.closed.is_some() {
                return;
            }
            tracing::debug!(%reason, in_flight = st.pending.len(), "NBD client connection closed");
            st.closed = Some(reason.clone());
            std::mem::take(&mut st.pending)
        };
        for (_, p) in drained {
            let _ = p.tx.send(Err(ClientError::Disconnected {
                reason: reason.clone(),
            }));
        }
        self.closed_tx.send_replace(true);
        self.idle.notify_waiters();
        // SAFETY: `fd` is the socket owned by the halves in `self.writer`
        // and the reader task; `self` is alive, so the fd is still open and
        // still ours. shutdown(2) does not close or invalidate it, it only
        // ends both directions (the server sees EOF; a blocked write or read
        // returns).
        unsafe {
            libc::shutdown(self.fd, libc::SHUT_RDWR);
        }
    }

    /// Remove a finished entry and wake `disconnect` if it was the last.
    fn finish(&self, st: &mut State, cookie: u64) -> Option<Pending> {
        let p = st.pending.remove(&cookie);
        if st.pending.is_empty() {
            self.idle.notify_waiters();
        }
        p
    }
}

/// A requester between registering and having written its request whole.
/// If it is dropped armed (cancelled mid-write, or the write failed), the
/// stream holds a partial request and cannot be used again.
pub(crate) struct WriteGuard<'a> {
    pub(crate) conn: &'a Conn,
    pub(crate) command: u16,
    pub(crate) armed: bool,
}

impl Drop for WriteGuard<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.conn.fail(format!(
                "NBD_CMD_{} was cancelled or failed while being sent",
                proto::command_name(self.command)
            ));
        }
    }
}

/// The reader task: demultiplex replies until the connection ends.
pub(crate) async fn run_reader(conn: Arc<Conn>, rd: BoxRead) {
    let mut rd = BufReader::with_capacity(128 * 1024, rd);
    let err = tokio::select! {
        e = read_replies(&conn, &mut rd) => e,
        _ = conn.wait_closed() => return,
    };
    let reason = match err {
        ClientError::Disconnected { reason } => reason,
        other => other.to_string(),
    };
    conn.fail(reason);
}

/// Read replies until something fatal happens; returns what it was.
async fn read_replies<R>(conn: &Conn, rd: &mut R) -> ClientError
where
    R: AsyncRead + Unpin,
{
    loop {
        let magic = match rd.read_u32().await {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                return ClientError::Disconnected {
                    reason: "the server closed the connection".into(),
                };
            }
            Err(source) => {
                return ClientError::Io {
                    during: "reading a reply",
                    source,
                };
            }
        };
        let r = match magic {
            SIMPLE_REPLY_MAGIC => simple_reply(conn, rd).await,
            STRUCTURED_REPLY_MAGIC if conn.info.structured => chunk(conn, rd).await,
            STRUCTURED_REPLY_MAGIC => Err(violation(
                "structured reply chunk, but structured replies were not negotiated".into(),
            )),
            m => Err(violation(format!("unknown reply magic {m:#010x}"))),
        };
        if let Err(e) = r {
            return e;
        }
    }
}

fn violation(msg: String) -> ClientError {
    ClientError::Protocol(msg)
}

fn read_io(source: std::io::Error) -> ClientError {
    ClientError::Io {
        during: "reading a reply",
        source,
    }
}

fn unknown_cookie(cookie: u64) -> ClientError {
    violation(format!("reply for unknown cookie {cookie:#x}"))
}

/// The entry vanished while we awaited: only `fail` removes entries behind
/// the reader's back, so the connection is already closed and this error
/// only ends the reader (`fail` keeps the first reason). Must not lock the
/// state: callers hold it.
fn vanished() -> ClientError {
    ClientError::Disconnected {
        reason: "the connection closed while a reply was being read".into(),
    }
}

fn request_error(p: &Pending, errno: Errno, message: String) -> ClientError {
    ClientError::Request {
        command: proto::command_name(p.command),
        offset: p.offset,
        length: p.length as u64,
        errno,
        message,
    }
}

/// Read `len` bytes of payload into `buf[start..start + len]`. Bytes past
/// `buf`'s end are read into its spare capacity without zeroing it first;
/// a gap between its end and `start` (a hole, or data still to come out of
/// order) is zero-filled, and later data overwrites it.
async fn fill<R>(rd: &mut R, buf: &mut Vec<u8>, start: usize, len: usize) -> Result<(), ClientError>
where
    R: AsyncRead + Unpin,
{
    let end = start + len;
    if end <= buf.len() {
        return rd
            .read_exact(&mut buf[start..end])
            .await
            .map(drop)
            .map_err(read_io);
    }
    if start > buf.len() {
        buf.resize(start, 0);
    }
    // Bytes before the end are initialised: read those in place.
    let inside = buf.len() - start;
    rd.read_exact(&mut buf[start..]).await.map_err(read_io)?;
    buf.reserve_exact(len - inside);
    while buf.len() < end {
        let want = end - buf.len();
        let n = {
            let spare = &mut buf.spare_capacity_mut()[..want];
            let mut rb = tokio::io::ReadBuf::uninit(spare);
            std::future::poll_fn(|cx| std::pin::Pin::new(&mut *rd).poll_read(cx, &mut rb))
                .await
                .map_err(read_io)?;
            rb.filled().len()
        };
        if n == 0 {
            return Err(read_io(std::io::ErrorKind::UnexpectedEof.into()));
        }
        // SAFETY: `poll_read` initialised the first `n` bytes of the spare
        // capacity (`ReadBuf::filled`), which is within the reservation.
        unsafe { buf.set_len(buf.len() + n) };
    }
    Ok(())
}

async fn simple_reply<R>(conn: &Conn, rd: &mut R) -> Result<(), ClientError>
where
    R: AsyncRead + Unpin,
{
    let mut b = [0u8; proto::SIMPLE_REPLY_LEN - 4];
    rd.read_exact(&mut b).await.map_err(read_io)?;
    let error = proto::be_u32(&b[0..4]);
    let cookie = proto::be_u64(&b[4..12]);

    // Decide under the lock; take the read buffer out if data follows.
    let (mut buf, length) = {
        let mut st = conn.state();
        let p = st
            .pending
            .get_mut(&cookie)
            .ok_or_else(|| unknown_cookie(cookie))?;
        if p.started {
            return Err(violation(format!(
                "simple reply to cookie {cookie:#x} after structured chunks"
            )));
        }
        if error != 0 {
            let p = conn.finish(&mut st, cookie).expect("entry just seen");
            let e = request_error(&p, Errno::from_code(error), String::new());
            let _ = p.tx.send(Err(e));
            return Ok(());
        }
        match &mut p.op {
            Op::Plain => {
                let p = conn.finish(&mut st, cookie).expect("entry just seen");
                let _ = p.tx.send(Ok(Outcome::Done));
                return Ok(());
            }
            Op::BlockStatus { .. } => {
                return Err(violation(
                    "successful simple reply to NBD_CMD_BLOCK_STATUS".into(),
                ));
            }
            Op::Read { .. } if conn.info.structured => {
                return Err(violation(
                    "successful simple reply to NBD_CMD_READ although structured replies were negotiated"
                        .into(),
                ));
            }
            Op::Read { buf, .. } => (std::mem::take(buf), p.length as usize),
        }
    };
    // The payload: exactly the requested length.
    fill(rd, &mut buf, 0, length).await?;
    let mut st = conn.state();
    let p = conn.finish(&mut st, cookie).ok_or_else(vanished)?;
    drop(st);
    let _ = p.tx.send(Ok(Outcome::Data(buf)));
    Ok(())
}

async fn chunk<R>(conn: &Conn, rd: &mut R) -> Result<(), ClientError>
where
    R: AsyncRead + Unpin,
{
    let mut b = [0u8; CHUNK_HEADER_LEN - 4];
    rd.read_exact(&mut b).await.map_err(read_io)?;
    let h = ChunkHeader::decode_after_magic(&b);

    let (command, req_offset, req_len) = {
        let mut st = conn.state();
        let p = st
            .pending
            .get_mut(&h.cookie)
            .ok_or_else(|| unknown_cookie(h.cookie))?;
        p.started = true;
        (p.command, p.offset, p.length)
    };
    let cmd_name = proto::command_name(command);
    let bad = |what: String| {
        violation(format!(
            "{what} (chunk type {}, length {}, reply to NBD_CMD_{cmd_name} offset {req_offset} length {req_len})",
            h.kind, h.length
        ))
    };

    match h.kind {
        REPLY_TYPE_NONE => {
            if h.length != 0 || !h.is_done() {
                return Err(bad("NONE chunk must be empty and final".into()));
            }
        }
        REPLY_TYPE_OFFSET_DATA => {
            if command != CMD_READ {
                return Err(bad("OFFSET_DATA outside a read".into()));
            }
            if h.length < 9 || h.length - 8 > req_len {
                return Err(bad("OFFSET_DATA length out of range".into()));
            }
            let offset = rd.read_u64().await.map_err(read_io)?;
            let len = h.length - 8;
            let start = relative_start(offset, len, req_offset, req_len)
                .ok_or_else(|| bad(format!("data at offset {offset} lies outside the request")))?;
            let mut buf = {
                let mut st = conn.state();
                let p = st.pending.get_mut(&h.cookie).ok_or_else(vanished)?;
                let Op::Read { buf, covered } = &mut p.op else {
                    unreachable!("command checked above")
                };
                covered.insert(start, len).map_err(bad)?;
                std::mem::take(buf)
            };
            fill(rd, &mut buf, start as usize, len as usize).await?;
            let mut st = conn.state();
            let p = st.pending.get_mut(&h.cookie).ok_or_else(vanished)?;
            let Op::Read { buf: slot, .. } = &mut p.op else {
                unreachable!("command checked above")
            };
            *slot = buf;
        }
        REPLY_TYPE_OFFSET_HOLE => {
            if command != CMD_READ {
                return Err(bad("OFFSET_HOLE outside a read".into()));
            }
            if h.length != 12 {
                return Err(bad("OFFSET_HOLE length must be 12".into()));
            }
            let offset = rd.read_u64().await.map_err(read_io)?;
            let len = rd.read_u32().await.map_err(read_io)?;
            if len == 0 {
                return Err(bad("empty hole".into()));
            }
            let start = relative_start(offset, len, req_offset, req_len)
                .ok_or_else(|| bad(format!("hole at offset {offset} lies outside the request")))?;
            let mut st = conn.state();
            let p = st.pending.get_mut(&h.cookie).ok_or_else(vanished)?;
            let Op::Read { covered, .. } = &mut p.op else {
                unreachable!("command checked above")
            };
            // Zero-filled later: see `Op::Read`.
            covered.insert(start, len).map_err(bad)?;
        }
        REPLY_TYPE_BLOCK_STATUS => {
            if command != CMD_BLOCK_STATUS {
                return Err(bad(
                    "BLOCK_STATUS chunk outside a block status request".into()
                ));
            }
            if h.length < 12 || (h.length - 4) % 8 != 0 || h.length > MAX_BLOCK_STATUS_CHUNK {
                return Err(bad("BLOCK_STATUS length must be 4 + 8n, n >= 1".into()));
            }
            let mut data = vec![0u8; h.length as usize];
            rd.read_exact(&mut data).await.map_err(read_io)?;
            let id = proto::be_u32(&data[0..4]);
            if Some(id) != conn.info.allocation {
                return Err(bad(format!("unknown meta context id {id}")));
            }
            let extents = decode_extents(&data[4..], req_len).map_err(bad)?;
            let mut st = conn.state();
            let p = st.pending.get_mut(&h.cookie).ok_or_else(vanished)?;
            let Op::BlockStatus { extents: slot } = &mut p.op else {
                unreachable!("command checked above")
            };
            if slot.is_some() {
                return Err(bad("second BLOCK_STATUS chunk for base:allocation".into()));
            }
            *slot = Some(extents);
        }
        kind if kind & REPLY_TYPE_ERROR_BIT != 0 => {
            if h.length < 6 || h.length > MAX_ERROR_CHUNK {
                return Err(bad("error chunk length out of range".into()));
            }
            let mut data = vec![0u8; h.length as usize];
            rd.read_exact(&mut data).await.map_err(read_io)?;
            let e = proto::decode_error_chunk(kind, &data)
                .map_err(|e| bad(format!("malformed error chunk: {e}")))?;
            if e.error == 0 {
                return Err(bad("error chunk with error 0".into()));
            }
            if kind == REPLY_TYPE_ERROR_OFFSET {
                let off = e.offset.unwrap_or(0);
                if relative_start(off, 1, req_offset, req_len).is_none() {
                    return Err(bad(format!("error offset {off} lies outside the request")));
                }
            }
            let mut st = conn.state();
            let p = st.pending.get_mut(&h.cookie).ok_or_else(vanished)?;
            let message = match e.offset {
                Some(off) => format!("{} (at offset {off})", e.message),
                None => e.message,
            };
            p.error.get_or_insert((Errno::from_code(e.error), message));
        }
        other => return Err(bad(format!("unknown chunk type {other}"))),
    }

    if h.is_done() {
        complete(conn, h.cookie)?;
    }
    Ok(())
}

/// The final chunk arrived: check the reply is whole and hand it over.
fn complete(conn: &Conn, cookie: u64) -> Result<(), ClientError> {
    let mut st = conn.state();
    let p = conn.finish(&mut st, cookie).ok_or_else(vanished)?;
    drop(st);
    let result = match (&p.error, p.op) {
        (Some((errno, message)), _) => Err(ClientError::Request {
            command: proto::command_name(p.command),
            offset: p.offset,
            length: p.length as u64,
            errno: *errno,
            message: message.clone(),
        }),
        (None, Op::Read { mut buf, covered }) => {
            if covered.total != p.length as u64 {
                return Err(violation(format!(
                    "read at offset {} length {} succeeded with only {} bytes covered",
                    p.offset, p.length, covered.total
                )));
            }
            // Holes at the end read as zeros.
            buf.resize(p.length as usize, 0);
            Ok(Outcome::Data(buf))
        }
        (None, Op::BlockStatus { extents: Some(e) }) => Ok(Outcome::Extents(e)),
        (None, Op::BlockStatus { extents: None }) => {
            return Err(violation(
                "block status succeeded without a base:allocation chunk".into(),
            ));
        }
        (None, Op::Plain) => Ok(Outcome::Done),
    };
    let _ = p.tx.send(result);
    Ok(())
}

/// Where `[offset, offset + len)` starts within the request
/// `[req_offset, req_offset + req_len)`, if it lies inside it.
fn relative_start(offset: u64, len: u32, req_offset: u64, req_len: u32) -> Option<u32> {
    let start = offset.checked_sub(req_offset)?;
    let end = start.checked_add(u64::from(len))?;
    // `start <= end <= req_len`, a u32: the conversion cannot fail here.
    (end <= u64::from(req_len)).then(|| u32::try_from(start).ok())?
}

/// Descriptors of a `base:allocation` chunk, clipped to the request. The
/// spec lets the last one run past the request, but not any other.
fn decode_extents(data: &[u8], req_len: u32) -> Result<Vec<Extent>, String> {
    let mut out = Vec::with_capacity(data.len() / 8);
    let mut sum: u64 = 0;
    for d in data.chunks_exact(8) {
        if sum >= req_len as u64 {
            return Err("descriptors continue past the end of the request".into());
        }
        let length = proto::be_u32(&d[0..4]) as u64;
        let flags = proto::be_u32(&d[4..8]);
        if length == 0 {
            return Err("zero-length block status descriptor".into());
        }
        let length = length.min(req_len as u64 - sum);
        sum += length;
        out.push(Extent {
            length,
            hole: flags & STATE_HOLE != 0,
            zero: flags & STATE_ZERO != 0,
        });
    }
    Ok(out)
}

/// Byte ranges of a read already answered, kept merged; refuses overlaps.
#[derive(Debug, Default)]
pub(crate) struct Coverage {
    /// start -> end (exclusive), disjoint and non-adjacent.
    ranges: BTreeMap<u32, u32>,
    pub(crate) total: u64,
}

impl Coverage {
    fn insert(&mut self, start: u32, len: u32) -> Result<(), String> {
        // In range: `relative_start` checked `start + len <= request length`.
        let end = start + len;
        // Ranges are disjoint and sorted, so the last one starting before
        // `end` is the one reaching furthest: if any overlaps, it does.
        if let Some((&s, &e)) = self.ranges.range(..end).next_back() {
            if e > start {
                return Err(format!(
                    "chunk +{start}..+{end} overlaps an earlier one +{s}..+{e}"
                ));
            }
        }
        let mut merged = (start, end);
        if let Some((&s, &e)) = self.ranges.range(..start).next_back() {
            if e == start {
                self.ranges.remove(&s);
                merged.0 = s;
            }
        }
        if let Some(e) = self.ranges.remove(&end) {
            merged.1 = e;
        }
        self.ranges.insert(merged.0, merged.1);
        self.total += len as u64;
        if self.ranges.len() > MAX_READ_FRAGMENTS {
            return Err("read answered in too many disjoint pieces".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn coverage_merges_adjacent_chunks_in_any_order() {
        let mut c = Coverage::default();
        c.insert(10, 10).unwrap();
        c.insert(0, 10).unwrap();
        c.insert(20, 5).unwrap();
        assert_eq!(c.ranges.len(), 1);
        assert_eq!(c.total, 25);
    }

    #[test]
    fn coverage_refuses_overlap_from_either_side_and_inside() {
        let mut c = Coverage::default();
        c.insert(10, 10).unwrap();
        assert!(c.insert(5, 6).is_err());
        assert!(c.insert(19, 5).is_err());
        assert!(c.insert(12, 2).is_err());
        assert!(c.insert(0, 30).is_err());
        assert_eq!(c.total, 10);
    }

    #[test]
    fn chunk_outside_request_is_not_placed() {
        assert_eq!(relative_start(100, 10, 100, 10), Some(0));
        assert_eq!(relative_start(99, 1, 100, 10), None);
        assert_eq!(relative_start(105, 6, 100, 10), None);
        assert_eq!(relative_start(u64::MAX, 10, 100, 10), None);
    }

    #[test]
    fn extents_are_clipped_to_the_request_and_flags_decoded() {
        let mut d = vec![];
        for (len, flags) in [(4096u32, 0u32), (1 << 20, STATE_HOLE | STATE_ZERO)] {
            d.extend_from_slice(&len.to_be_bytes());
            d.extend_from_slice(&flags.to_be_bytes());
        }
        let e = decode_extents(&d, 8192).unwrap();
        assert_eq!(e, vec![Extent::data(4096), Extent::hole(4096)]);
    }

    #[test]
    fn extents_continuing_past_the_request_are_refused() {
        let mut d = vec![];
        for len in [8192u32, 512] {
            d.extend_from_slice(&len.to_be_bytes());
            d.extend_from_slice(&0u32.to_be_bytes());
        }
        assert!(decode_extents(&d, 8192).is_err());
    }
}
