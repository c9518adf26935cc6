//! Listeners, the export table, and shutdown.
//!
//! A [`Server`] owns its exports; [`Server::serve`] accepts on a
//! [`Listener`] until [`Shutdown`] is triggered, then stops accepting and
//! waits for every connection to answer what it accepted. Each connection
//! is [`Server::serve_stream`]: the handshake (bounded by a timeout, so a
//! silent client cannot hold a task forever), then the transmission phase
//! in [`crate::connection`]. `serve_stream` works on any byte stream, which
//! is also how the fuzz target drives a whole session. A server built
//! [`Server::with_tls`] upgrades the stream when a client sends
//! `NBD_OPT_STARTTLS` (see [`crate::tls`]); the TLS handshake and the rest
//! of the options share the same handshake timeout.

use std::io;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio::task::JoinSet;

use crate::device::BlockDevice;
use crate::handshake::{self, ExportInfo, Outcome, TlsPhase};
pub use crate::shutdown::Shutdown;
use crate::tls::ServerTls;

/// How long a client may take to finish the handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);

/// One export: a name clients select and the device behind it.
pub struct Export<D> {
    pub name: String,
    pub description: Option<String>,
    pub device: D,
}

/// What one server lets its clients take (issue 13: one process serves
/// one volume to whoever reaches it; a hostile client must not take the
/// process, the host or the other clients down).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Sessions at once (handshake or transmission). Beyond it a new
    /// connection is accepted and closed at once, and the refusal logged:
    /// accepting frees the kernel's queue and keeps file descriptors for
    /// the clients already served and the control plane.
    pub max_connections: usize,
    /// Request and reply payload bytes held at once across connections
    /// beyond each connection's own reserve (see [`crate::connection`]).
    pub buffer_budget: u64,
}

/// Sessions at once unless configured.
pub const DEFAULT_MAX_CONNECTIONS: usize = 128;
/// Payload bytes held across connections unless configured.
pub const DEFAULT_BUFFER_BUDGET: u64 = 256 << 20;

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: DEFAULT_MAX_CONNECTIONS,
            buffer_budget: DEFAULT_BUFFER_BUDGET,
        }
    }
}

/// An NBD server over a fixed set of exports of one device type. The first
/// export is the default (the empty name selects it).
pub struct Server<D> {
    devices: Vec<Arc<D>>,
    infos: Vec<ExportInfo>,
    clients: AtomicUsize,
    /// Sessions accepted and not yet ended (handshake or transmission).
    sessions: Arc<AtomicUsize>,
    /// Connections refused at the cap, and when that was last logged.
    refused: AtomicUsize,
    refusal_logged: std::sync::Mutex<Option<tokio::time::Instant>>,
    limits: Limits,
    budget: Arc<crate::connection::Budget>,
    tls: Option<ServerTls>,
}

impl<D: BlockDevice> Server<D> {
    /// A server without TLS (`NBD_OPT_STARTTLS` is refused).
    pub fn new(exports: Vec<Export<D>>) -> Arc<Self> {
        Server::with_tls(exports, None)
    }

    /// A server offering (or requiring, per its mode) TLS with `tls`.
    pub fn with_tls(exports: Vec<Export<D>>, tls: Option<ServerTls>) -> Arc<Self> {
        Server::with_limits(exports, tls, Limits::default())
    }

    /// A server with `tls` and `limits`.
    pub fn with_limits(
        exports: Vec<Export<D>>,
        tls: Option<ServerTls>,
        limits: Limits,
    ) -> Arc<Self> {
        Server::with_unlisted(exports, Vec::new(), tls, limits)
    }

    /// A server whose `unlisted` exports are selected by exact name only
    /// (`NBD_OPT_LIST` shows `exports` alone).
    pub fn with_unlisted(
        exports: Vec<Export<D>>,
        unlisted: Vec<Export<D>>,
        tls: Option<ServerTls>,
        limits: Limits,
    ) -> Arc<Self> {
        let listed = exports.len();
        let exports: Vec<Export<D>> = exports.into_iter().chain(unlisted).collect();
        let infos = exports
            .iter()
            .enumerate()
            .map(|(i, e)| ExportInfo {
                name: e.name.clone(),
                description: e.description.clone(),
                size: e.device.size(),
                capabilities: e.device.capabilities(),
                block_sizes: e.device.block_sizes(),
                listed: i < listed,
            })
            .collect();
        Arc::new(Server {
            devices: exports.into_iter().map(|e| Arc::new(e.device)).collect(),
            infos,
            clients: AtomicUsize::new(0),
            sessions: Arc::new(AtomicUsize::new(0)),
            refused: AtomicUsize::new(0),
            refusal_logged: std::sync::Mutex::new(None),
            budget: crate::connection::Budget::new(limits.buffer_budget),
            limits,
            tls,
        })
    }

    /// Clients currently in the transmission phase.
    pub fn connected_clients(&self) -> usize {
        self.clients.load(Ordering::Relaxed)
    }

    /// Accept connections until `shutdown`, then wait for all of them.
    pub async fn serve(self: &Arc<Self>, listener: Listener, shutdown: Shutdown) -> io::Result<()> {
        let mut tasks = JoinSet::new();
        loop {
            tokio::select! {
                _ = shutdown.wait() => break,
                Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
                accepted = listener.accept() => match accepted {
                    Ok((stream, peer)) => {
                        let Some(session) = self.admit(&peer) else {
                            drop(stream);
                            continue;
                        };
                        let server = self.clone();
                        let shutdown = shutdown.clone();
                        tasks.spawn(async move {
                            server.serve_stream(stream, peer, shutdown).await;
                            drop(session);
                        });
                    }
                    Err(e) => {
                        // EMFILE and friends: log and breathe instead of spinning.
                        tracing::warn!("accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            }
        }
        drop(listener);
        while tasks.join_next().await.is_some() {}
        Ok(())
    }

    /// Sessions in progress (handshake or transmission).
    pub fn sessions(&self) -> usize {
        self.sessions.load(Ordering::Relaxed)
    }

    /// Connections refused at the cap so far.
    pub fn refused_connections(&self) -> usize {
        self.refused.load(Ordering::Relaxed)
    }

    /// Count a new session in, or refuse it at the cap (logged at most once
    /// a second, with the count since).
    fn admit(&self, peer: &str) -> Option<SessionSlot> {
        let n = self.sessions.fetch_add(1, Ordering::AcqRel);
        let slot = SessionSlot(self.sessions.clone());
        if n < self.limits.max_connections {
            return Some(slot);
        }
        drop(slot);
        let refused = self.refused.fetch_add(1, Ordering::Relaxed) + 1;
        let mut last = self.refusal_logged.lock().expect("poisoned");
        let now = tokio::time::Instant::now();
        if last.is_none_or(|t| now.duration_since(t) >= Duration::from_secs(1)) {
            *last = Some(now);
            tracing::warn!(
                %peer,
                "refused a connection: {} sessions already (the limit, --max-connections); \
                 {refused} refused so far",
                self.limits.max_connections
            );
        }
        None
    }

    /// Run one whole client session on `stream`.
    pub async fn serve_stream<S>(self: &Arc<Self>, mut stream: S, peer: String, shutdown: Shutdown)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let stopping = shutdown.clone();
        let is_stopping = move || stopping.is_triggered();
        let deadline = tokio::time::Instant::now() + HANDSHAKE_TIMEOUT;
        let phase = match &self.tls {
            None => TlsPhase::Unavailable,
            Some(t) => TlsPhase::Offered {
                required: t.required(),
            },
        };
        let negotiated = tokio::select! {
            _ = shutdown.wait() => return,
            r = tokio::time::timeout_at(
                deadline,
                handshake::negotiate(&mut stream, &self.infos, phase, &is_stopping),
            ) => r,
        };
        let resume = match self.handshake_result(negotiated, &peer) {
            Some(Outcome::Transmission { export, negotiated }) => {
                return self
                    .transmit(stream, export, negotiated, peer, shutdown)
                    .await;
            }
            Some(Outcome::StartTls(resume)) => resume,
            _ => return,
        };
        // `StartTls` is only returned when TLS was offered.
        let Some(tls) = &self.tls else { return };
        let upgraded = tokio::select! {
            _ = shutdown.wait() => return,
            r = tokio::time::timeout_at(deadline, async {
                let mut s = tls.accept(stream).await?;
                let outcome = handshake::resume(&mut s, &self.infos, resume, &is_stopping).await;
                Ok::<_, crate::tls::TlsError>((s, outcome))
            }) => r,
        };
        let (stream, outcome) = match upgraded {
            Ok(Ok((s, outcome))) => (s, outcome),
            Ok(Err(e)) => {
                tracing::info!(%peer, "TLS ({}) refused: {e}", tls.kind());
                return;
            }
            Err(_) => {
                tracing::info!(%peer, "handshake timed out after {HANDSHAKE_TIMEOUT:?}");
                return;
            }
        };
        if let Some(Outcome::Transmission { export, negotiated }) =
            self.handshake_result(Ok(outcome), &peer)
        {
            self.transmit(stream, export, negotiated, peer, shutdown)
                .await;
        }
    }

    /// Log how a handshake ended; `Some` if the session goes on.
    fn handshake_result(
        &self,
        r: Result<Result<Outcome, handshake::HandshakeError>, tokio::time::error::Elapsed>,
        peer: &str,
    ) -> Option<Outcome> {
        match r {
            Ok(Ok(Outcome::Aborted)) => {
                tracing::debug!(%peer, "client aborted the handshake");
                None
            }
            Ok(Ok(o)) => Some(o),
            Ok(Err(e)) => {
                tracing::info!(%peer, "handshake ended: {e}");
                None
            }
            Err(_) => {
                tracing::info!(%peer, "handshake timed out after {HANDSHAKE_TIMEOUT:?}");
                None
            }
        }
    }

    /// The transmission phase of a negotiated session, plain or TLS.
    async fn transmit<S>(
        self: &Arc<Self>,
        stream: S,
        export: usize,
        n: crate::request::Negotiated,
        peer: String,
        shutdown: Shutdown,
    ) where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        tracing::info!(%peer, export = %self.infos[export].name, structured = n.structured,
            flags = format_args!("{:#06x}", n.transmission_flags), "client connected");
        self.clients.fetch_add(1, Ordering::Relaxed);
        let (rd, wr) = tokio::io::split(stream);
        let r = crate::connection::transmit(
            rd,
            wr,
            self.devices[export].clone(),
            n,
            shutdown,
            &peer,
            self.budget.clone(),
        )
        .await;
        self.clients.fetch_sub(1, Ordering::Relaxed);
        match r {
            Ok(()) => tracing::info!(%peer, "client disconnected"),
            Err(e) => tracing::info!(%peer, "connection ended: {e}"),
        }
    }
}

/// One session counted in [`Server::sessions`] until dropped.
struct SessionSlot(Arc<AtomicUsize>);

impl Drop for SessionSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Where the server accepts connections.
pub enum Listener {
    Tcp(TcpListener),
    /// The path is removed when the listener is dropped, if we created it.
    Unix(UnixListener, Option<PathBuf>),
}

impl Listener {
    pub async fn bind_tcp(addr: &str) -> io::Result<Listener> {
        let l = TcpListener::bind(addr)
            .await
            .map_err(|e| io::Error::new(e.kind(), format!("cannot listen on {addr}: {e}")))?;
        Ok(Listener::Tcp(l))
    }

    /// Bind a unix socket at `path`. A stale socket file left by a crashed
    /// run (nobody accepting) is replaced; a live one is an error.
    pub fn bind_unix(path: &Path) -> io::Result<Listener> {
        use std::os::unix::fs::FileTypeExt;
        if let Ok(meta) = std::fs::symlink_metadata(path) {
            if !meta.file_type().is_socket() {
                return Err(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    format!("{} exists and is not a socket", path.display()),
                ));
            }
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    format!("{} is in use by a running server", path.display()),
                ));
            }
            std::fs::remove_file(path)?;
        }
        let l = UnixListener::bind(path).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("cannot listen on {}: {e}", path.display()),
            )
        })?;
        Ok(Listener::Unix(l, Some(path.to_path_buf())))
    }

    /// Wrap a listening socket inherited through systemd socket activation
    /// (see [`take_activation_fd`]). Must be called inside a tokio runtime.
    pub fn from_activation_fd(fd: OwnedFd) -> io::Result<Listener> {
        // SAFETY: sockaddr_storage is plain old data; all zeros is valid.
        let mut addr: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
        let mut len = libc::socklen_t::try_from(std::mem::size_of::<libc::sockaddr_storage>())
            .expect("sockaddr_storage is 128 bytes");
        // SAFETY: addr and len are valid for writes of the given size.
        let rc = unsafe {
            libc::getsockname(
                std::os::fd::AsRawFd::as_raw_fd(&fd),
                (&raw mut addr).cast(),
                &mut len,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        if addr.ss_family as i32 == libc::AF_UNIX {
            let l = std::os::unix::net::UnixListener::from(fd);
            l.set_nonblocking(true)?;
            Ok(Listener::Unix(UnixListener::from_std(l)?, None))
        } else {
            let l = std::net::TcpListener::from(fd);
            l.set_nonblocking(true)?;
            Ok(Listener::Tcp(TcpListener::from_std(l)?))
        }
    }

    pub async fn accept(&self) -> io::Result<(Conn, String)> {
        match self {
            Listener::Tcp(l) => {
                let (s, peer) = l.accept().await?;
                s.set_nodelay(true)?;
                Ok((Conn::Tcp(s), peer.to_string()))
            }
            Listener::Unix(l, _) => {
                let (s, _) = l.accept().await?;
                Ok((Conn::Unix(s), "unix".to_string()))
            }
        }
    }

    /// The NBD URI a client would use to reach `export` here.
    pub fn uri(&self, export: &str) -> io::Result<String> {
        let name = percent_encode(export);
        match self {
            Listener::Tcp(l) => Ok(format!("nbd://{}/{name}", l.local_addr()?)),
            Listener::Unix(l, _) => {
                let addr = l.local_addr()?;
                let path = addr
                    .as_pathname()
                    .map(|p| p.display().to_string())
                    .unwrap_or_default();
                Ok(format!(
                    "nbd+unix:///{name}?socket={}",
                    percent_encode(&path)
                ))
            }
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Listener::Unix(_, Some(path)) = self {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Take the listening socket passed by systemd-style socket activation
/// (`LISTEN_PID` equal to our pid, `LISTEN_FDS` >= 1, the socket at fd 3),
/// as nbdkit and qemu-nbd accept it; `nbdinfo -- [ CMD ]` and
/// `nbdcopy -- [ CMD ]` start servers this way. The variables are removed
/// so children do not inherit them.
///
/// # Safety
///
/// Call before any other thread exists (it edits the environment), and at
/// most once (it takes ownership of fd 3).
pub unsafe fn take_activation_fd() -> Option<OwnedFd> {
    const SD_LISTEN_FDS_START: RawFd = 3;
    let pid = std::env::var("LISTEN_PID").ok()?;
    let fds = std::env::var("LISTEN_FDS").ok()?;
    if pid.parse::<u32>().ok()? != std::process::id() {
        return None;
    }
    let n: i32 = fds.parse().ok()?;
    // SAFETY: the caller guarantees no other thread reads the environment.
    unsafe {
        std::env::remove_var("LISTEN_PID");
        std::env::remove_var("LISTEN_FDS");
        std::env::remove_var("LISTEN_FDNAMES");
    }
    if n < 1 {
        return None;
    }
    // SAFETY: systemd's protocol hands us fd 3 open and owned by no one
    // else in this process; the caller takes it only once.
    let fd = unsafe { OwnedFd::from_raw_fd(SD_LISTEN_FDS_START) };
    // SAFETY: plain fcntl on an fd we own.
    unsafe {
        let flags = libc::fcntl(SD_LISTEN_FDS_START, libc::F_GETFD);
        libc::fcntl(SD_LISTEN_FDS_START, libc::F_SETFD, flags | libc::FD_CLOEXEC);
    }
    Some(fd)
}

/// Percent-encode everything but RFC 3986 unreserved characters and `/`.
fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~/".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// An accepted connection of either kind.
pub enum Conn {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            Conn::Unix(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Conn::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            Conn::Unix(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Conn::Tcp(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Conn::Unix(s) => Pin::new(s).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Tcp(s) => Pin::new(s).poll_flush(cx),
            Conn::Unix(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            Conn::Unix(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}
