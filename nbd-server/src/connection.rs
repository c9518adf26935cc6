//! The transmission phase of one connection.
//!
//! One reader loop parses requests in arrival order; each accepted request
//! runs as its own task and queues its finished reply for one writer task,
//! so requests are served concurrently and answered out of order.
//!
//! In-flight bookkeeping (who owns what):
//!
//! | item            | owner                        | released when                       |
//! |-----------------|------------------------------|-------------------------------------|
//! | request header  | reader loop                  | parsed                              |
//! | write payload   | reader, then the request task| the device call returns             |
//! | in-flight permit| request task, then the queue | the writer has written the reply    |
//! | reply buffers   | the queue, then the writer   | written                             |
//!
//! Permits bound memory and concurrency per connection: a request costs one
//! permit plus one per 64 KiB of payload, out of [`INFLIGHT_PERMITS`], so at
//! most 64 MiB of payload is held per connection whatever the client sends.
//! The reader waits for permits before reading a payload, which pushes back
//! on a client that sends faster than the device serves.
//!
//! Across connections, payload bytes (a WRITE's data until it is stored, a
//! READ's reply until it is written to the socket) also come out of the
//! server's [`Budget`]: each connection first uses a reserve of its own
//! ([`RESERVE_BYTES`]), enough for a guest's small requests at depth, and
//! only what does not fit there waits for the shared budget. A client that
//! never reads its replies therefore holds at most its reserve plus what it
//! took of the budget, and the reader loops of the connections it starves
//! wait instead of allocating (backpressure); small requests of others
//! still run out of their reserves.
//!
//! A request that fails its checks gets an error reply and the stream goes
//! on; a rejected WRITE still has its payload read and dropped, or the next
//! header would be read from the middle of it. Only a bad request magic, an
//! i/o error, `NBD_CMD_DISC` or shutdown end the loop; then every accepted
//! request is still answered before the socket closes.

use std::io;
use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, BufWriter};
use tokio::sync::{Semaphore, mpsc};

use crate::device::{BlockDevice, ZeroFlags};
use crate::proto::{self, Errno, RequestHeader};
use crate::reply::{self, Reply};
use crate::request::{self, Command, Negotiated};
use crate::shutdown::Shutdown;

/// In-flight budget of one connection (see the module docs).
pub const INFLIGHT_PERMITS: u32 = 1024;
const PERMIT_BYTES: u32 = 64 * 1024;

/// Payload bytes a connection may hold without touching the shared budget.
pub const RESERVE_BYTES: u32 = 2 << 20;

/// Payload bytes all connections of a server may hold beyond their
/// reserves, in [`PERMIT_BYTES`] units.
#[derive(Debug)]
pub struct Budget {
    units: Arc<Semaphore>,
}

impl Budget {
    /// A budget of `bytes`, at least one largest request.
    pub fn new(bytes: u64) -> Arc<Budget> {
        let min = u64::from(crate::proto::MAX_PAYLOAD);
        let units = bytes.max(min).div_ceil(u64::from(PERMIT_BYTES));
        Arc::new(Budget {
            units: Arc::new(Semaphore::new(
                usize::try_from(units).unwrap_or(Semaphore::MAX_PERMITS),
            )),
        })
    }

    /// Unused bytes of the budget now.
    pub fn available(&self) -> u64 {
        self.units.available_permits() as u64 * u64::from(PERMIT_BYTES)
    }
}

/// What a queued reply holds until it is written.
struct Held {
    _inflight: tokio::sync::OwnedSemaphorePermit,
    _bytes: Option<tokio::sync::OwnedSemaphorePermit>,
}

type Queued = (Reply, Held);

fn payload_units(cmd: &Command) -> u32 {
    match *cmd {
        Command::Read { len, .. } | Command::Write { len, .. } => len.div_ceil(PERMIT_BYTES),
        _ => 0,
    }
}

fn cost(cmd: &Command) -> u32 {
    let payload = match *cmd {
        Command::Read { len, .. } | Command::Write { len, .. } => len,
        _ => 0,
    };
    1 + payload / PERMIT_BYTES
}

/// Serve requests from `rd`, replying on `wr`, until the client disconnects.
pub async fn transmit<R, W, D>(
    rd: R,
    wr: W,
    device: Arc<D>,
    n: Negotiated,
    shutdown: Shutdown,
    peer: &str,
    budget: Arc<Budget>,
) -> io::Result<()>
where
    R: AsyncRead + Unpin + Send,
    W: AsyncWrite + Unpin + Send + 'static,
    D: BlockDevice,
{
    let permits = Arc::new(Semaphore::new(INFLIGHT_PERMITS as usize));
    let reserve = Arc::new(Semaphore::new((RESERVE_BYTES / PERMIT_BYTES) as usize));
    let (tx, rx) = mpsc::unbounded_channel::<Queued>();
    let writer = tokio::spawn(write_replies(wr, rx));
    let mut rd = BufReader::with_capacity(64 * 1024, rd);

    let result = loop {
        let mut header = [0u8; proto::REQUEST_LEN];
        let read = tokio::select! {
            biased;
            _ = shutdown.wait() => break Ok(()),
            _ = tx.closed() => break Ok(()),
            r = rd.read_exact(&mut header) => r,
        };
        match read {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => break Ok(()),
            Err(e) => break Err(e),
        }
        let h = match RequestHeader::decode(&header) {
            Ok(h) => h,
            Err(bad) => {
                tracing::warn!(%peer, "{bad}: cannot resynchronise, closing the connection");
                break Ok(());
            }
        };
        tracing::trace!(%peer, cmd = proto::command_name(h.command), h.offset, h.length, "request");
        let cmd = match request::check(&h, &n) {
            Ok(Command::Disc) => break Ok(()),
            Ok(cmd) => cmd,
            Err(refusal) => {
                if h.command == proto::CMD_WRITE {
                    let skipped = tokio::io::copy(
                        &mut (&mut rd).take(u64::from(h.length)),
                        &mut tokio::io::sink(),
                    )
                    .await;
                    if let Err(e) = skipped {
                        break Err(e);
                    }
                }
                tracing::debug!(%peer, cmd = proto::command_name(h.command), h.offset, h.length,
                    errno = %refusal.errno, "refused: {}", refusal.message);
                let permit = permits.clone().acquire_owned().await.expect("never closed");
                let held = Held {
                    _inflight: permit,
                    _bytes: None,
                };
                let _ = tx.send((
                    reply::error(h.cookie, n.structured, refusal.errno, refusal.message),
                    held,
                ));
                continue;
            }
        };
        let permit = permits
            .clone()
            .acquire_many_owned(cost(&cmd))
            .await
            .expect("semaphore is never closed");
        let units = payload_units(&cmd);
        let bytes = if units == 0 {
            None
        } else if let Ok(p) = reserve.clone().try_acquire_many_owned(units) {
            Some(p)
        } else {
            let shared = budget.units.clone().acquire_many_owned(units);
            let p = tokio::select! {
                biased;
                _ = shutdown.wait() => break Ok(()),
                p = shared => p.expect("semaphore is never closed"),
            };
            Some(p)
        };
        let permit = Held {
            _inflight: permit,
            _bytes: bytes,
        };
        let payload = match cmd {
            Command::Write { len, .. } => {
                let mut data = vec![0u8; len as usize];
                if let Err(e) = rd.read_exact(&mut data).await {
                    break Err(e);
                }
                Some(data)
            }
            _ => None,
        };
        let device = device.clone();
        let tx = tx.clone();
        tokio::spawn(async move {
            let reply = execute(&*device, cmd, h.cookie, &n, payload).await;
            // If the writer is gone the client is too; the permit is
            // released with the dropped message.
            let _ = tx.send((reply, permit));
        });
    };

    // Every accepted request is answered before the socket closes: wait
    // until all permits are back (each is returned after its reply is
    // written, or dropped if the writer failed).
    let _all = permits.acquire_many(INFLIGHT_PERMITS).await;
    drop(tx);
    match writer.await {
        Ok(Ok(())) => result,
        Ok(Err(e)) if result.is_ok() => Err(e),
        Ok(Err(_)) => result,
        Err(join) => Err(io::Error::other(join)),
    }
}

/// The writer: replies are written whole, in the order they finish; while
/// more are ready they are coalesced into one buffer flush.
async fn write_replies<W>(wr: W, mut rx: mpsc::UnboundedReceiver<Queued>) -> io::Result<()>
where
    W: AsyncWrite + Unpin,
{
    let mut w = BufWriter::with_capacity(256 * 1024, wr);
    while let Some((reply, permit)) = rx.recv().await {
        write_reply(&mut w, &reply).await?;
        drop(permit);
        while let Ok((reply, permit)) = rx.try_recv() {
            write_reply(&mut w, &reply).await?;
            drop(permit);
        }
        w.flush().await?;
    }
    w.flush().await?;
    w.shutdown().await
}

async fn write_reply<W: AsyncWrite + Unpin>(w: &mut BufWriter<W>, reply: &Reply) -> io::Result<()> {
    for part in &reply.parts {
        w.write_all(part).await?;
    }
    Ok(())
}

/// Run one accepted command on the device and build its reply.
async fn execute<D: BlockDevice>(
    device: &D,
    cmd: Command,
    cookie: u64,
    n: &Negotiated,
    payload: Option<Vec<u8>>,
) -> Reply {
    let structured = n.structured;
    let fail = |e: io::Error| {
        let errno = Errno::from_io(&e);
        tracing::debug!(?cmd, %errno, "device error: {e}");
        reply::error(cookie, structured, errno, &e.to_string())
    };
    let done = |r: io::Result<()>| match r {
        Ok(()) => reply::ok(cookie),
        Err(e) => fail(e),
    };
    match cmd {
        Command::Read { offset, len, df } => {
            if len == 0 {
                return reply::read(cookie, structured, df, offset, Vec::new());
            }
            match device.read(offset, len).await {
                Ok(pieces) if pieces.iter().map(|p| p.len()).sum::<u64>() == u64::from(len) => {
                    reply::read(cookie, structured, df, offset, pieces)
                }
                Ok(_) => fail(io::Error::other("device returned a short read")),
                Err(e) => fail(e),
            }
        }
        Command::Write { offset, len, fua } => {
            if len == 0 {
                return reply::ok(cookie);
            }
            done(device.write(offset, payload.unwrap_or_default(), fua).await)
        }
        Command::Flush => done(device.flush().await),
        Command::Trim { offset, len, fua } => {
            if len == 0 {
                return reply::ok(cookie);
            }
            done(device.trim(offset, u64::from(len), fua).await)
        }
        Command::Cache { offset, len } => {
            if len == 0 {
                return reply::ok(cookie);
            }
            done(device.cache(offset, u64::from(len)).await)
        }
        Command::WriteZeroes {
            offset,
            len,
            fua,
            no_hole,
            fast,
        } => {
            if len == 0 {
                return reply::ok(cookie);
            }
            let flags = ZeroFlags {
                may_trim: !no_hole,
                fast,
                fua,
            };
            done(device.write_zeroes(offset, u64::from(len), flags).await)
        }
        Command::BlockStatus {
            offset,
            len,
            req_one,
        } => match device.block_status(offset, u64::from(len)).await {
            Ok(extents) => {
                let d = reply::descriptors(&extents, len, req_one);
                let id = n.base_allocation.expect("checked by request::check");
                reply::block_status(cookie, id, &d)
            }
            Err(e) => fail(e),
        },
        Command::Disc => unreachable!("DISC ends the reader loop"),
    }
}
