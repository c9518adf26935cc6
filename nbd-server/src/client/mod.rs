//! An async NBD client with many requests in flight on one connection.
//!
//! `lazy-fetch` uses it to read NBD sources (qemu-nbd, nbdkit, `stream
//! export`); tests use it to drive our own server.
//!
//! # Layout
//!
//! - `handshake`: fixed-newstyle negotiation (`STARTTLS` when TLS is
//!   asked for, structured replies, `base:allocation`, `OPT_GO` with a
//!   fallback to `OPT_EXPORT_NAME`), bounded by [`HANDSHAKE_TIMEOUT`].
//!   With TLS ([`crate::tls::ClientTls`]) the client sends `STARTTLS` first
//!   and never falls back to plaintext.
//! - `inflight`: the map of requests in flight and the
//!   reader task that demultiplexes replies into it.
//! - `error`: [`ClientError`], one enum for the layer.
//! - this file: [`Client`], the public face: connect, capabilities, and one
//!   method per command.
//!
//! # In-flight bookkeeping
//!
//! A request is sent under the writer lock and answered by the reader task;
//! between the two it lives in the pending map. Who owns what:
//!
//! | thing                         | owner                                   | notes |
//! |-------------------------------|-----------------------------------------|-------|
//! | write half (`Conn::writer`)   | the tokio mutex; a requester holds it for one whole request (header + payload), then releases it before awaiting its reply | requests never interleave on the wire |
//! | read half                     | the reader task alone                   | dropped when the task ends |
//! | pending map (`State::pending`)| the std mutex in `Conn`, never held across `.await` | keyed by cookie |
//! | a `Pending` entry             | *inserted* by its requester, with the writer lock held, just before writing (so it exists before any reply, and a requester cancelled while queueing leaves nothing behind); *updated and removed* only by the reader, when the final chunk (or simple reply) arrives; *drained* all at once by `Conn::fail` | |
//! | a read's buffer               | the entry; the reader takes it out only while copying one chunk's payload into it, and puts it back | the entry stays in the map meanwhile, so "in flight" stays true |
//! | the reply channel (oneshot)   | sender in the entry, receiver with the requester | a requester that gave up drops the receiver; the reply is still read off the wire and discarded |
//!
//! What ends an entry:
//!
//! - its final chunk or simple reply: removed, its result sent;
//! - a connection-fatal error (I/O, bad magic, unknown cookie, a chunk that
//!   contradicts its request, a requester cancelled mid-write): `fail`
//!   records the first reason, sends `Disconnected { reason }` to every
//!   entry, refuses later requests, wakes writers blocked on the socket and
//!   shuts the socket down. Never a hang, never a panic: `Client::is_closed`
//!   then says to reconnect.
//! - `disconnect()`: refuses new requests, waits for the map to drain, then
//!   sends `NBD_CMD_DISC` and closes.
//!
//! There is no per-request timeout here; a caller that wants one wraps the
//! call in `tokio::time::timeout` (dropping the future is safe once the
//! request has been written; dropping it mid-write closes the connection).

mod error;
mod handshake;
mod inflight;

use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::{TcpStream, UnixStream};
use tokio::task::JoinHandle;

pub use self::error::ClientError;
use self::handshake::Negotiated;
use self::inflight::{Conn, Coverage, Op, Outcome, WriteGuard};
use crate::device::Extent;
use crate::proto::{
    BlockSizes, CMD_BLOCK_STATUS, CMD_DISC, CMD_FLAG_FUA, CMD_FLAG_NO_HOLE, CMD_FLUSH, CMD_READ,
    CMD_TRIM, CMD_WRITE, CMD_WRITE_ZEROES, MAX_PAYLOAD, RequestHeader, TF_CAN_MULTI_CONN,
    TF_READ_ONLY, TF_SEND_FLUSH, TF_SEND_FUA, TF_SEND_TRIM, TF_SEND_WRITE_ZEROES,
};
use crate::tls::ClientTls;
use crate::uri::{Endpoint, NbdUri};

/// How long connecting plus negotiation may take by default.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);

/// A connection to one export. Cheap to clone; clones share the connection
/// and may issue requests concurrently. The connection closes when the
/// last clone is dropped (or on [`Client::disconnect`]).
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

struct Inner {
    conn: Arc<Conn>,
    reader: JoinHandle<()>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // The reader holds the other `Arc<Conn>`; stopping it lets the
        // socket close.
        self.reader.abort();
    }
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("info", &self.inner.conn.info)
            .field("closed", &self.is_closed())
            .finish()
    }
}

impl Client {
    /// Connect to `export` at `endpoint` within [`HANDSHAKE_TIMEOUT`].
    pub async fn connect(endpoint: &Endpoint, export: &str) -> Result<Client, ClientError> {
        Client::connect_with_timeout(endpoint, export, HANDSHAKE_TIMEOUT).await
    }

    /// Connect to what an NBD URI names, with TLS for `nbds` URIs (their
    /// credentials loaded from the files the URI names).
    pub async fn connect_uri(uri: &NbdUri) -> Result<Client, ClientError> {
        let tls = match uri.client_tls() {
            Some(config) => Some(ClientTls::new(&config).map_err(|source| ClientError::Tls {
                endpoint: uri.endpoint.to_string(),
                source,
            })?),
            None => None,
        };
        Client::connect_tls(&uri.endpoint, &uri.export, tls.as_ref(), HANDSHAKE_TIMEOUT).await
    }

    /// [`Client::connect`] with a chosen bound on connect plus handshake.
    pub async fn connect_with_timeout(
        endpoint: &Endpoint,
        export: &str,
        timeout: Duration,
    ) -> Result<Client, ClientError> {
        Client::connect_tls(endpoint, export, None, timeout).await
    }

    /// Connect, with TLS if `tls` is given (credentials loaded once, shared
    /// by reconnects), within `timeout` for connect plus handshake.
    pub async fn connect_tls(
        endpoint: &Endpoint,
        export: &str,
        tls: Option<&ClientTls>,
        timeout: Duration,
    ) -> Result<Client, ClientError> {
        match tokio::time::timeout(timeout, open(endpoint, export, tls)).await {
            Ok(r) => r,
            Err(_) => Err(ClientError::HandshakeTimeout {
                endpoint: endpoint.to_string(),
                timeout,
            }),
        }
    }

    /// Negotiate `export` on an already connected unix stream (a
    /// socketpair, an inherited descriptor; the fuzz target attaches its
    /// scripted server this way). Not bounded by a timeout.
    pub async fn over_unix_stream(s: UnixStream, export: &str) -> Result<Client, ClientError> {
        over_unix_stream(s, export).await
    }

    /// Export size in bytes.
    pub fn size(&self) -> u64 {
        self.info().size
    }

    /// The transmission flags the server sent (zero if it did not set
    /// `HAS_FLAGS`).
    pub fn transmission_flags(&self) -> u16 {
        self.info().flags
    }

    /// The server's block size constraints, or the spec's defaults if it
    /// sent none.
    pub fn block_sizes(&self) -> BlockSizes {
        self.info().block_sizes
    }

    /// Longest read or write this client sends in one request: the server's
    /// maximum payload, capped at 32 MiB.
    pub fn max_payload(&self) -> u32 {
        self.info().block_sizes.maximum.min(MAX_PAYLOAD)
    }

    pub fn can_write(&self) -> bool {
        !self.flag(TF_READ_ONLY)
    }

    pub fn can_flush(&self) -> bool {
        self.flag(TF_SEND_FLUSH)
    }

    pub fn can_fua(&self) -> bool {
        self.flag(TF_SEND_FUA)
    }

    pub fn can_trim(&self) -> bool {
        self.flag(TF_SEND_TRIM)
    }

    pub fn can_zero(&self) -> bool {
        self.flag(TF_SEND_WRITE_ZEROES)
    }

    pub fn can_multi_conn(&self) -> bool {
        self.flag(TF_CAN_MULTI_CONN)
    }

    /// The server selected `base:allocation`, so [`Client::block_status`]
    /// reports real allocation rather than "all data".
    pub fn can_block_status(&self) -> bool {
        self.info().allocation.is_some()
    }

    pub fn structured_replies(&self) -> bool {
        self.info().structured
    }

    /// The connection has ended (fatal error or `disconnect`); every
    /// request will fail with [`ClientError::Disconnected`]. Reconnect.
    pub fn is_closed(&self) -> bool {
        self.inner.conn.is_closed()
    }

    /// Read `len` bytes at `offset`.
    pub async fn read(&self, offset: u64, len: u32) -> Result<Vec<u8>, ClientError> {
        if len == 0 {
            return Ok(Vec::new());
        }
        self.check_payload("read", offset, len)?;
        let op = Op::Read {
            buf: Vec::with_capacity(len as usize),
            covered: Coverage::default(),
        };
        match self.submit(CMD_READ, 0, offset, len, &[], op).await? {
            Outcome::Data(d) => Ok(d),
            other => unreachable!("read completed with {other:?}"),
        }
    }

    /// Write `data` at `offset`; with `fua`, durable before this returns.
    pub async fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<(), ClientError> {
        self.check_writable("WRITE")?;
        if data.is_empty() {
            return Ok(());
        }
        let len = u32::try_from(data.len()).unwrap_or(u32::MAX);
        self.check_payload("write", offset, len)?;
        let flags = self.fua_flag("WRITE", fua)?;
        self.submit(CMD_WRITE, flags, offset, len, data, Op::Plain)
            .await
            .map(drop)
    }

    /// Make every completed write durable.
    pub async fn flush(&self) -> Result<(), ClientError> {
        if !self.can_flush() {
            return Err(ClientError::Unsupported {
                command: "FLUSH",
                reason: "the server did not advertise NBD_FLAG_SEND_FLUSH",
            });
        }
        self.submit(CMD_FLUSH, 0, 0, 0, &[], Op::Plain)
            .await
            .map(drop)
    }

    /// Discard `len` bytes at `offset` (reads of them are then unspecified).
    pub async fn trim(&self, offset: u64, len: u32) -> Result<(), ClientError> {
        self.check_writable("TRIM")?;
        if !self.can_trim() {
            return Err(ClientError::Unsupported {
                command: "TRIM",
                reason: "the server did not advertise NBD_FLAG_SEND_TRIM",
            });
        }
        self.check_range(offset, len)?;
        self.submit(CMD_TRIM, 0, offset, len, &[], Op::Plain)
            .await
            .map(drop)
    }

    /// Make `len` bytes at `offset` read as zeros; with `no_hole` the
    /// server must keep them allocated.
    pub async fn write_zeroes(
        &self,
        offset: u64,
        len: u32,
        no_hole: bool,
    ) -> Result<(), ClientError> {
        self.check_writable("WRITE_ZEROES")?;
        if !self.can_zero() {
            return Err(ClientError::Unsupported {
                command: "WRITE_ZEROES",
                reason: "the server did not advertise NBD_FLAG_SEND_WRITE_ZEROES",
            });
        }
        self.check_range(offset, len)?;
        let flags = if no_hole { CMD_FLAG_NO_HOLE } else { 0 };
        self.submit(CMD_WRITE_ZEROES, flags, offset, len, &[], Op::Plain)
            .await
            .map(drop)
    }

    /// Allocation of `len` bytes at `offset`: consecutive extents, the
    /// first starting at `offset`, covering at most `len` bytes and at
    /// least one (the server may answer for less; ask again from the end).
    /// Without `base:allocation` this is one data extent and no round trip.
    pub async fn block_status(&self, offset: u64, len: u32) -> Result<Vec<Extent>, ClientError> {
        self.check_range(offset, len)?;
        if len == 0 {
            return Err(ClientError::InvalidArgument(
                "block status of an empty range".into(),
            ));
        }
        if !self.can_block_status() {
            let size = self.size();
            if offset >= size {
                return Err(ClientError::InvalidArgument(format!(
                    "block status at offset {offset} is beyond the export size {size}"
                )));
            }
            return Ok(vec![Extent::data((len as u64).min(size - offset))]);
        }
        let op = Op::BlockStatus { extents: None };
        match self
            .submit(CMD_BLOCK_STATUS, 0, offset, len, &[], op)
            .await?
        {
            Outcome::Extents(e) => Ok(e),
            other => unreachable!("block status completed with {other:?}"),
        }
    }

    /// Let requests in flight finish, refuse new ones, then send
    /// `NBD_CMD_DISC` and close. Closing an already closed connection
    /// succeeds.
    pub async fn disconnect(&self) -> Result<(), ClientError> {
        let conn = &*self.inner.conn;
        conn.begin_disconnect();
        conn.wait_idle().await;
        if conn.is_closed() {
            return Ok(());
        }
        let sent = tokio::select! {
            r = async {
                let mut w = conn.writer.lock().await;
                let hdr = RequestHeader {
                    flags: 0,
                    command: CMD_DISC,
                    cookie: u64::MAX,
                    offset: 0,
                    length: 0,
                };
                w.write_all(&hdr.encode()).await?;
                w.flush().await?;
                w.shutdown().await
            } => r,
            _ = conn.wait_closed() => Ok(()),
        };
        conn.fail("disconnected by the client".into());
        sent.map_err(ClientError::io("sending NBD_CMD_DISC"))
    }

    fn info(&self) -> &Negotiated {
        &self.inner.conn.info
    }

    fn flag(&self, f: u16) -> bool {
        self.info().flags & f != 0
    }

    fn check_writable(&self, command: &'static str) -> Result<(), ClientError> {
        if self.can_write() {
            Ok(())
        } else {
            Err(ClientError::Unsupported {
                command,
                reason: "the export is read-only",
            })
        }
    }

    fn fua_flag(&self, command: &'static str, fua: bool) -> Result<u16, ClientError> {
        match (fua, self.can_fua()) {
            (false, _) => Ok(0),
            (true, true) => Ok(CMD_FLAG_FUA),
            (true, false) => Err(ClientError::Unsupported {
                command,
                reason: "the server did not advertise NBD_FLAG_SEND_FUA",
            }),
        }
    }

    fn check_range(&self, offset: u64, len: u32) -> Result<(), ClientError> {
        match offset.checked_add(len as u64) {
            Some(_) => Ok(()),
            None => Err(ClientError::InvalidArgument(format!(
                "offset {offset} + length {len} overflows"
            ))),
        }
    }

    fn check_payload(&self, what: &str, offset: u64, len: u32) -> Result<(), ClientError> {
        self.check_range(offset, len)?;
        let max = self.max_payload();
        if len > max {
            return Err(ClientError::InvalidArgument(format!(
                "{what} of {len} bytes exceeds the maximum payload of {max}; split it"
            )));
        }
        Ok(())
    }

    /// Send one request and wait for its reply.
    async fn submit(
        &self,
        command: u16,
        flags: u16,
        offset: u64,
        length: u32,
        payload: &[u8],
        op: Op,
    ) -> Result<Outcome, ClientError> {
        let conn = &*self.inner.conn;
        let mut w = tokio::select! {
            biased;
            _ = conn.wait_closed() => return Err(conn.closed_error()),
            w = conn.writer.lock() => w,
        };
        let (cookie, reply) = conn.register(command, offset, length, op)?;
        let mut guard = WriteGuard {
            conn,
            command,
            armed: true,
        };
        let header = RequestHeader {
            flags,
            command,
            cookie,
            offset,
            length,
        }
        .encode();
        let sent = tokio::select! {
            r = async {
                w.write_all(&header).await?;
                w.write_all(payload).await?;
                w.flush().await
            } => r,
            // Closed under us (the reader failed): the stream is dead, stop
            // writing into it. The guard stays armed; `fail` is idempotent.
            _ = conn.wait_closed() => return Err(conn.closed_error()),
        };
        if let Err(source) = sent {
            // The guard, still armed, closes the connection on drop.
            return Err(ClientError::Io {
                during: "sending a request",
                source,
            });
        }
        guard.armed = false;
        drop(w);
        match reply.await {
            Ok(r) => r,
            // The entry was dropped without an answer: only when the reader
            // task stopped, i.e. the connection is closed.
            Err(_) => Err(conn.closed_error()),
        }
    }
}

/// Open the socket, negotiate and start the reader.
async fn open(
    endpoint: &Endpoint,
    export: &str,
    tls: Option<&ClientTls>,
) -> Result<Client, ClientError> {
    let connect_err = |source| ClientError::Connect {
        endpoint: endpoint.to_string(),
        source,
    };
    match endpoint {
        Endpoint::Tcp { host, port } => {
            let mut s = TcpStream::connect((host.as_str(), *port))
                .await
                .map_err(connect_err)?;
            s.set_nodelay(true).map_err(connect_err)?;
            if let Some(tls) = tls {
                let fd = s.as_raw_fd();
                return over_tls(s, fd, endpoint, export, tls).await;
            }
            let info = handshake::negotiate(&mut s, export).await?;
            tracing::debug!(%endpoint, export, ?info, "NBD client connected");
            let fd = s.as_raw_fd();
            let (r, w) = s.into_split();
            Ok(start(info, Box::new(r), Box::new(w), fd))
        }
        Endpoint::Unix(path) => {
            let s = connect_unix(path).await.map_err(connect_err)?;
            if let Some(tls) = tls {
                let fd = s.as_raw_fd();
                return over_tls(s, fd, endpoint, export, tls).await;
            }
            over_unix_stream(s, export).await
        }
    }
}

/// `STARTTLS`, the TLS handshake, then the options over TLS. `fd` is the
/// socket under `s`, for shutting it down on a fatal error.
async fn over_tls<S>(
    mut s: S,
    fd: RawFd,
    endpoint: &Endpoint,
    export: &str,
    tls: &ClientTls,
) -> Result<Client, ClientError>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let no_zeroes = handshake::start_tls(&mut s, export).await?;
    let mut s = tls.connect(s).await.map_err(|source| ClientError::Tls {
        endpoint: endpoint.to_string(),
        source,
    })?;
    let info = handshake::options(&mut s, export, no_zeroes)
        .await
        .map_err(|e| match e {
            ClientError::Io { source, .. } => ClientError::Tls {
                endpoint: endpoint.to_string(),
                source: crate::tls::TlsError::Rejected(source.to_string()),
            },
            e => e,
        })?;
    tracing::debug!(%endpoint, export, ?info, ?tls, "NBD client connected over TLS");
    let (r, w) = tokio::io::split(s);
    Ok(start(info, Box::new(r), Box::new(w), fd))
}

/// Negotiate on an already connected unix stream (also how the unit tests
/// attach a scripted server).
async fn over_unix_stream(mut s: UnixStream, export: &str) -> Result<Client, ClientError> {
    let info = handshake::negotiate(&mut s, export).await?;
    tracing::debug!(export, ?info, "NBD client connected");
    let fd = s.as_raw_fd();
    let (r, w) = s.into_split();
    Ok(start(info, Box::new(r), Box::new(w), fd))
}

/// Start the reader task on a negotiated connection.
fn start(info: Negotiated, rd: inflight::BoxRead, wr: inflight::BoxWrite, fd: RawFd) -> Client {
    let conn = Arc::new(Conn::new(info, wr, fd));
    let reader = tokio::spawn(inflight::run_reader(conn.clone(), rd));
    Client {
        inner: Arc::new(Inner { conn, reader }),
    }
}

/// Connect a unix socket; a path starting with NUL names a Linux abstract
/// socket (the URI form `socket=%00name`).
async fn connect_unix(path: &std::path::Path) -> std::io::Result<UnixStream> {
    use std::os::unix::ffi::OsStrExt;
    let bytes = path.as_os_str().as_bytes();
    if let Some(name) = bytes.strip_prefix(b"\0") {
        #[cfg(target_os = "linux")]
        {
            use std::os::linux::net::SocketAddrExt;
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
            let s = std::os::unix::net::UnixStream::connect_addr(&addr)?;
            s.set_nonblocking(true)?;
            return UnixStream::from_std(s);
        }
        #[cfg(not(target_os = "linux"))]
        {
            let _ = name;
            return Err(std::io::Error::new(
                std::io::ErrorKind::Unsupported,
                "abstract unix sockets exist only on Linux",
            ));
        }
    }
    UnixStream::connect(path).await
}

#[cfg(test)]
mod tests;
