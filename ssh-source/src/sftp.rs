//! The client half of SFTP version 3 (draft-ietf-secsh-filexfer-02, what
//! every OpenSSH since the 2000s speaks), only what reading a disk needs:
//! INIT, OPEN for reading, FSTAT, READ. Requests carry ids and any number
//! may be in flight; one task reads the replies and hands each to its
//! request, so a read of a run is many 32 KiB requests sent at once (one
//! round trip, not one per request).
//!
//! Everything below works on any byte stream: the session gives it the
//! stdin and stdout of `ssh -s HOST sftp`.

use std::collections::HashMap;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::oneshot;

const INIT: u8 = 1;
const VERSION: u8 = 2;
const OPEN: u8 = 3;
const READ: u8 = 5;
const FSTAT: u8 = 8;
const STATUS: u8 = 101;
const HANDLE: u8 = 102;
const DATA: u8 = 103;
const ATTRS: u8 = 105;

const FXF_READ: u32 = 1;
const FX_EOF: u32 = 1;
const FX_NO_SUCH_FILE: u32 = 2;
const FX_PERMISSION_DENIED: u32 = 3;

const ATTR_SIZE: u32 = 0x1;
const ATTR_UIDGID: u32 = 0x2;
const ATTR_PERMISSIONS: u32 = 0x4;

/// Largest READ asked for: what OpenSSH's own client asks, and at most what
/// old sftp-servers answer (they cap a READ at 64 KiB).
pub const READ_LEN: u32 = 32 * 1024;
/// Bound on one reply (a READ of `READ_LEN` plus headers, with margin).
const MAX_PACKET: u32 = 256 * 1024;

/// A reply: its type and what follows the request id.
struct Reply {
    kind: u8,
    body: Vec<u8>,
}

type Pending = Arc<Mutex<HashMap<u32, oneshot::Sender<Reply>>>>;

/// One SFTP session over a byte stream.
pub struct Sftp<W> {
    writer: tokio::sync::Mutex<W>,
    pending: Pending,
    next_id: AtomicU32,
    /// The reply stream ended (or broke): the session is dead.
    dead: Arc<AtomicBool>,
    reader: tokio::task::JoinHandle<()>,
}

impl<W> Drop for Sftp<W> {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

/// Ends the session when dropped before `done` (see `Sftp::call`):
/// marks it dead and fails every request waiting for a reply.
struct Sending<'a> {
    dead: &'a AtomicBool,
    pending: &'a Pending,
    done: bool,
}

impl Drop for Sending<'_> {
    fn drop(&mut self) {
        if !self.done {
            self.dead.store(true, Ordering::Release);
            self.pending.lock().expect("poisoned").clear();
        }
    }
}

/// What FSTAT says of the disk.
#[derive(Clone, Copy, Debug, Default)]
pub struct Attrs {
    pub size: Option<u64>,
    pub permissions: Option<u32>,
}

impl Attrs {
    /// A block device (its size reads as 0 through stat).
    pub fn is_block_device(&self) -> bool {
        self.permissions.is_some_and(|p| p & 0o170000 == 0o060000)
    }
}

fn put_u32(v: &mut Vec<u8>, x: u32) {
    v.extend_from_slice(&x.to_be_bytes());
}

fn put_str(v: &mut Vec<u8>, s: &[u8]) {
    put_u32(v, u32::try_from(s.len()).expect("short strings only"));
    v.extend_from_slice(s);
}

/// A cursor over a reply's body.
struct Body<'a>(&'a [u8]);

impl<'a> Body<'a> {
    fn bad() -> io::Error {
        io::Error::new(io::ErrorKind::InvalidData, "a malformed SFTP reply")
    }
    fn take(&mut self, n: usize) -> io::Result<&'a [u8]> {
        if self.0.len() < n {
            return Err(Self::bad());
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }
    fn u32(&mut self) -> io::Result<u32> {
        Ok(u32::from_be_bytes(self.take(4)?.try_into().expect("4")))
    }
    fn u64(&mut self) -> io::Result<u64> {
        Ok(u64::from_be_bytes(self.take(8)?.try_into().expect("8")))
    }
    fn string(&mut self) -> io::Result<&'a [u8]> {
        let n = self.u32()? as usize;
        self.take(n)
    }
}

/// A STATUS reply as an error (`Ok(())` for OK, `None` for EOF).
fn status(body: &[u8], what: &str) -> io::Result<Option<()>> {
    let mut b = Body(body);
    let code = b.u32()?;
    let msg = String::from_utf8_lossy(b.string().unwrap_or(b"")).into_owned();
    let kind = match code {
        0 => return Ok(Some(())),
        FX_EOF => return Ok(None),
        FX_NO_SUCH_FILE => io::ErrorKind::NotFound,
        FX_PERMISSION_DENIED => io::ErrorKind::PermissionDenied,
        _ => io::ErrorKind::Other,
    };
    Err(io::Error::new(
        kind,
        format!("the SFTP server refused {what}: {msg} (status {code})"),
    ))
}

impl<W: AsyncWrite + Unpin + Send + 'static> Sftp<W> {
    /// Say INIT, read VERSION, then start reading replies.
    pub async fn start<R: AsyncRead + Unpin + Send + 'static>(
        mut reader: R,
        mut writer: W,
    ) -> io::Result<Sftp<W>> {
        let mut init = Vec::new();
        put_u32(&mut init, 5);
        init.push(INIT);
        put_u32(&mut init, 3);
        writer.write_all(&init).await?;
        writer.flush().await?;
        let (kind, body) = read_packet(&mut reader).await?;
        if kind != VERSION || body.len() < 4 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("the server answered INIT with packet type {kind}, not VERSION"),
            ));
        }
        let version = u32::from_be_bytes(body[..4].try_into().expect("4"));
        if version < 3 {
            return Err(io::Error::other(format!(
                "the SFTP server speaks version {version}; 3 is needed"
            )));
        }
        let pending: Pending = Arc::default();
        let dead = Arc::new(AtomicBool::new(false));
        let (p, d) = (pending.clone(), dead.clone());
        let reader = tokio::spawn(async move {
            loop {
                let Ok((kind, body)) = read_packet(&mut reader).await else {
                    break;
                };
                if body.len() < 4 {
                    break;
                }
                let id = u32::from_be_bytes(body[..4].try_into().expect("4"));
                let tx = p.lock().expect("poisoned").remove(&id);
                if let Some(tx) = tx {
                    let mut body = body;
                    body.drain(..4);
                    let _ = tx.send(Reply { kind, body });
                }
            }
            d.store(true, Ordering::Release);
            // Every request still waiting learns the session is gone.
            p.lock().expect("poisoned").clear();
        });
        Ok(Sftp {
            writer: tokio::sync::Mutex::new(writer),
            pending,
            next_id: AtomicU32::new(1),
            dead,
            reader,
        })
    }

    /// Whether the reply stream has ended.
    pub fn is_dead(&self) -> bool {
        self.dead.load(Ordering::Acquire)
    }

    fn lost() -> io::Error {
        io::Error::new(
            io::ErrorKind::ConnectionAborted,
            "the SSH session ended (ssh exited or the link broke)",
        )
    }

    /// Send a request of `kind` with `payload` after its id; its reply.
    async fn call(&self, kind: u8, payload: &[u8]) -> io::Result<Reply> {
        if self.is_dead() {
            return Err(Self::lost());
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.pending.lock().expect("poisoned").insert(id, tx);
        let mut pkt = Vec::with_capacity(payload.len() + 9);
        put_u32(
            &mut pkt,
            u32::try_from(payload.len() + 5).expect("short requests only"),
        );
        pkt.push(kind);
        put_u32(&mut pkt, id);
        pkt.extend_from_slice(payload);
        let sent = {
            let mut w = self.writer.lock().await;
            // From here a cancelled call (a stall timeout drops it) may
            // leave half a packet on the wire: the stream is then out of
            // step with the server, and the session must end, not carry
            // the next request after the half one.
            let mut whole = Sending {
                dead: &self.dead,
                pending: &self.pending,
                done: false,
            };
            let sent = match w.write_all(&pkt).await {
                Ok(()) => w.flush().await,
                Err(e) => Err(e),
            };
            whole.done = true;
            sent
        };
        if let Err(e) = sent {
            self.pending.lock().expect("poisoned").remove(&id);
            return Err(io::Error::new(io::ErrorKind::ConnectionAborted, e));
        }
        // The reader may have ended between the check and the insert.
        if self.is_dead() {
            self.pending.lock().expect("poisoned").remove(&id);
        }
        rx.await.map_err(|_| Self::lost())
    }

    /// Open `path` for reading; its handle.
    pub async fn open(&self, path: &str) -> io::Result<Vec<u8>> {
        let mut p = Vec::new();
        put_str(&mut p, path.as_bytes());
        put_u32(&mut p, FXF_READ);
        put_u32(&mut p, 0);
        let r = self.call(OPEN, &p).await?;
        match r.kind {
            HANDLE => Ok(Body(&r.body).string()?.to_vec()),
            STATUS => {
                status(&r.body, &format!("to open {path}"))?;
                Err(Body::bad())
            }
            _ => Err(Body::bad()),
        }
    }

    pub async fn fstat(&self, handle: &[u8]) -> io::Result<Attrs> {
        let mut p = Vec::new();
        put_str(&mut p, handle);
        let r = self.call(FSTAT, &p).await?;
        match r.kind {
            ATTRS => {
                let mut b = Body(&r.body);
                let flags = b.u32()?;
                let mut a = Attrs::default();
                if flags & ATTR_SIZE != 0 {
                    a.size = Some(b.u64()?);
                }
                if flags & ATTR_UIDGID != 0 {
                    b.take(8)?;
                }
                if flags & ATTR_PERMISSIONS != 0 {
                    a.permissions = Some(b.u32()?);
                }
                Ok(a)
            }
            STATUS => {
                status(&r.body, "to stat the disk")?;
                Err(Body::bad())
            }
            _ => Err(Body::bad()),
        }
    }

    /// One READ of at most [`READ_LEN`] bytes: what the server sent (less
    /// than asked is allowed), empty at the end of the file.
    pub async fn read_once(&self, handle: &[u8], offset: u64, len: u32) -> io::Result<Vec<u8>> {
        let mut p = Vec::with_capacity(handle.len() + 16);
        put_str(&mut p, handle);
        p.extend_from_slice(&offset.to_be_bytes());
        put_u32(&mut p, len.min(READ_LEN));
        let r = self.call(READ, &p).await?;
        match r.kind {
            DATA => {
                let n = Body(&r.body).u32()? as usize;
                if r.body.len() != n + 4 {
                    return Err(Body::bad());
                }
                let mut data = r.body;
                data.drain(..4);
                Ok(data)
            }
            STATUS => match status(&r.body, "a read")? {
                None => Ok(Vec::new()),
                Some(()) => Err(Body::bad()),
            },
            _ => Err(Body::bad()),
        }
    }

    /// Exactly `len` bytes at `offset`: [`READ_LEN`] requests all sent at
    /// once; a short answer is completed by asking for the rest. The end
    /// of the file before `len` bytes is an error (`UnexpectedEof`).
    pub async fn read_exact(&self, handle: &[u8], offset: u64, len: usize) -> io::Result<Vec<u8>> {
        let step = READ_LEN as usize;
        let parts = (0..len.div_ceil(step)).map(|i| {
            let at = i * step;
            let n = step.min(len - at);
            self.read_part(handle, offset + at as u64, n)
        });
        let parts = futures_util::future::try_join_all(parts).await?;
        Ok(parts.concat())
    }

    async fn read_part(&self, handle: &[u8], offset: u64, len: usize) -> io::Result<Vec<u8>> {
        let mut out = self
            .read_once(
                handle,
                offset,
                u32::try_from(len).expect("at most READ_LEN"),
            )
            .await?;
        while out.len() < len {
            let more = self
                .read_once(
                    handle,
                    offset + out.len() as u64,
                    u32::try_from(len - out.len()).expect("at most READ_LEN"),
                )
                .await?;
            if more.is_empty() {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!(
                        "the disk ended at {} while {len} bytes at {offset} were read",
                        offset + out.len() as u64
                    ),
                ));
            }
            out.extend_from_slice(&more);
        }
        out.truncate(len);
        Ok(out)
    }
}

/// One packet: its type and the rest.
async fn read_packet<R: AsyncRead + Unpin>(r: &mut R) -> io::Result<(u8, Vec<u8>)> {
    let len = r.read_u32().await?;
    if len == 0 || len > MAX_PACKET {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("an SFTP packet of {len} bytes"),
        ));
    }
    let kind = r.read_u8().await?;
    let mut buf = vec![0u8; len as usize - 1];
    r.read_exact(&mut buf).await?;
    Ok((kind, buf))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Debian's sftp-server spoken to over its stdin and stdout, as ssh
    /// would carry it.
    async fn local_server() -> (Sftp<tokio::process::ChildStdin>, tokio::process::Child) {
        let bin = "/usr/lib/openssh/sftp-server";
        assert!(
            std::path::Path::new(bin).exists(),
            "{bin} is missing: install the Debian package openssh-sftp-server"
        );
        let mut child = tokio::process::Command::new(bin)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let sftp = Sftp::start(child.stdout.take().unwrap(), child.stdin.take().unwrap())
            .await
            .unwrap();
        (sftp, child)
    }

    /// Reads dropped before their answers arrive (what the stall timeout
    /// does) leave the session in step: the answers go to no one, and the
    /// next read gets its own bytes.
    #[tokio::test]
    async fn reads_dropped_before_their_answers_do_not_disturb_the_next() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.img");
        let data: Vec<u8> = (0..(4u32 << 20)).map(|i| (i * 7 % 251) as u8).collect();
        std::fs::write(&path, &data).unwrap();
        let (sftp, _child) = local_server().await;
        let h = sftp.open(path.to_str().unwrap()).await.unwrap();
        for round in 0..20u64 {
            let at = round * 65536;
            let cut = futures_util::FutureExt::now_or_never(sftp.read_exact(&h, at, 1 << 20));
            assert!(cut.is_none(), "round {round}: finished in one poll");
            let off = (round * 12345) % (3 << 20);
            let got = sftp.read_exact(&h, off, 100_000).await.unwrap();
            assert!(
                got == data[off as usize..off as usize + 100_000],
                "round {round}: another read's bytes"
            );
        }
        assert!(!sftp.is_dead());
    }
}
