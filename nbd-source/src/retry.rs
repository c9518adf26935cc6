//! The request path: which connection a read takes, and the retry rules.
//!
//! - A read waits for its slot's connection, then sends. A connection-fatal
//!   error ([`ClientError::is_connection_fatal`]) or no reply within
//!   [`NbdOptions::stall_timeout`](crate::NbdOptions::stall_timeout) marks
//!   the connection dead and the read is sent again on the next one.
//! - A read keeps trying until its retry window (per class) expires, then
//!   fails with `EIO` and a message naming the URI, since when it has been
//!   unreachable and the last error.
//! - A per-request error from the server (`EINVAL`, `ENOSPC`, ...) is
//!   returned at once with its errno; only `EIO` is retried, at most
//!   [`NbdOptions::server_eio_retries`](crate::NbdOptions::server_eio_retries)
//!   times.
//!
//! Errors returned by reads carry their errno; [`errno_of`](crate::errno_of)
//! reads it back.

use std::future::Future;
use std::io;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime};

use lazy_fetch::source::Class;
use nbd_server::client::{Client, ClientError};
use nbd_server::proto::Errno;

use crate::NbdSource;
use crate::error::{errno_error, source_chain};
use crate::outage::utc;
use crate::slot::Slot;

/// Pause before resending a read the server failed with `EIO`.
const EIO_RETRY_PAUSE: Duration = Duration::from_millis(50);

impl NbdSource {
    /// The slot a request of `class` goes to: the foreground one, or a
    /// background one in turn, preferring one that is connected.
    pub(crate) fn slot(&self, class: Class) -> &Slot {
        if class == Class::Foreground {
            return &self.foreground;
        }
        let n = self.background.len();
        let start = self.next_background.fetch_add(1, Ordering::Relaxed);
        (0..n)
            .map(|k| &*self.background[(start + k) % n])
            .find(|s| s.live().is_some())
            .unwrap_or(&self.background[start % n])
    }

    pub(crate) fn window(&self, class: Class) -> Duration {
        match class {
            Class::Foreground => self.common.opts.foreground_retry_window,
            Class::Background => self.common.opts.background_retry_window,
        }
    }

    pub(crate) fn unreachable(&self, slot: &Slot, started: Instant) -> io::Error {
        let message = match slot.outage() {
            Some(o) => format!(
                "NBD source {} is unreachable since {}: last error: {}",
                self.common.location,
                o.since_text(),
                o.last_error
            ),
            None => format!(
                "NBD source {} did not answer for {:.1} s (since {})",
                self.common.location,
                started.elapsed().as_secs_f64(),
                utc(SystemTime::now() - started.elapsed()),
            ),
        };
        errno_error(libc::EIO, message)
    }

    pub(crate) fn refused_error(&self, why: String) -> io::Error {
        errno_error(libc::EIO, why)
    }

    /// Wait (until `deadline`) for a connection in `slot`.
    pub(crate) async fn client(
        &self,
        slot: &Slot,
        deadline: tokio::time::Instant,
        started: Instant,
    ) -> io::Result<(u64, Client)> {
        let mut changed = self.common.changed.subscribe();
        loop {
            if let Some(why) = self.common.refused() {
                return Err(self.refused_error(why));
            }
            if let Some(live) = slot.live() {
                return Ok(live);
            }
            slot.wake.notify_one();
            if tokio::time::timeout_at(deadline, changed.changed())
                .await
                .is_err()
            {
                return Err(self.unreachable(slot, started));
            }
        }
    }

    /// Run `op` on a connection of `class` with the retry rules of the
    /// module docs.
    pub(crate) async fn with_retry<T, F, Fut>(&self, class: Class, op: F) -> io::Result<T>
    where
        F: Fn(Client) -> Fut,
        Fut: Future<Output = Result<T, ClientError>>,
    {
        let started = Instant::now();
        let deadline = tokio::time::Instant::from_std(started + self.window(class));
        let mut eio_left = self.common.opts.server_eio_retries;
        loop {
            let slot = self.slot(class);
            let (generation, client) = self.client(slot, deadline, started).await?;
            let stall = tokio::time::Instant::now() + self.common.opts.stall_timeout;
            match tokio::time::timeout_at(deadline.min(stall), op(client)).await {
                Ok(Ok(v)) => return Ok(v),
                Ok(Err(e)) if e.is_connection_fatal() => {
                    slot.mark_dead(generation, format!("{e}{}", source_chain(&e)));
                }
                Ok(Err(e)) if e.errno() == Some(Errno::Io) && eio_left > 0 => {
                    eio_left -= 1;
                    tracing::debug!("NBD source request failed, retrying: {e}");
                    let pause = tokio::time::Instant::now() + EIO_RETRY_PAUSE;
                    tokio::time::sleep_until(pause.min(deadline)).await;
                }
                Ok(Err(e)) => {
                    let errno = e.errno().map_or(libc::EIO, Errno::to_os);
                    return Err(errno_error(
                        errno,
                        format!("NBD source {}: {e}", self.common.location),
                    ));
                }
                Err(_) if tokio::time::Instant::now() >= deadline => {
                    return Err(self.unreachable(slot, started));
                }
                Err(_) => slot.mark_dead(
                    generation,
                    format!(
                        "no reply within {:?}; connection abandoned",
                        self.common.opts.stall_timeout
                    ),
                ),
            }
        }
    }
}
