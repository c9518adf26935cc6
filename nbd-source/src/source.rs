//! [`NbdSource`]: the engine's `Source` over NBD. What it owns (the slots
//! and their tasks) and the `Source` methods; connecting is in `open.rs`,
//! reconnecting in `slot.rs`, the request path in `retry.rs`.

use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use lazy_fetch::fingerprint::Fingerprint;
use lazy_fetch::proof::{self, ChunkHashes};
use lazy_fetch::source::{Class, Extent, Health, Source};
use lazy_fetch::state::SourceId;
use nbd_server::client::Client;
use tokio::task::JoinHandle;

use crate::RemoteHashes;
use crate::connect::Common;
use crate::error::errno_error;
use crate::slot::{NOT_CONNECTED_YET, Slot, check_slot};

/// An NBD export read through one foreground and N background connections
/// that reconnect on their own.
pub struct NbdSource {
    pub(crate) common: Arc<Common>,
    pub(crate) foreground: Arc<Slot>,
    pub(crate) background: Vec<Arc<Slot>>,
    pub(crate) next_background: AtomicUsize,
    pub(crate) tasks: Vec<JoinHandle<()>>,
}

impl Drop for NbdSource {
    fn drop(&mut self) {
        // The tasks hold the slots (and so the clients): stopping them
        // closes the connections.
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl NbdSource {
    /// Size of the disk being migrated.
    pub fn size(&self) -> u64 {
        self.common.size
    }

    /// The URI, normalised (what [`Source::id`] records).
    pub fn location(&self) -> &str {
        &self.common.location
    }

    /// Connections re-established after one was lost.
    pub fn reconnects(&self) -> u64 {
        self.common.reconnects.load(Ordering::Relaxed)
    }
}

impl Source for NbdSource {
    fn id(&self) -> SourceId {
        SourceId {
            kind: "nbd".into(),
            location: self.common.location.clone(),
            size: self.common.size,
        }
    }

    async fn read(&self, offset: u64, len: usize, class: Class) -> io::Result<Vec<u8>> {
        let end = offset.checked_add(len as u64);
        if end.is_none_or(|e| e > self.common.size) {
            return Err(errno_error(
                libc::EINVAL,
                format!(
                    "read of {len} bytes at {offset} is beyond the end of NBD source {} ({} bytes)",
                    self.common.location, self.common.size
                ),
            ));
        }
        if len == 0 {
            return Ok(Vec::new());
        }
        // Learn the largest request the server takes from a connection.
        let max = self
            .with_retry(class, |c| async move { Ok(c.max_payload()) })
            .await?
            .max(512);
        let pieces = (0..len).step_by(max as usize).map(|at| {
            let n = u32::try_from(len - at).map_or(max, |n| n.min(max));
            let off = offset + at as u64;
            self.with_retry(class, move |c| async move { c.read(off, n).await })
        });
        let parts = futures_util::future::try_join_all(pieces).await?;
        if parts.len() == 1 {
            return Ok(parts.into_iter().next().unwrap_or_default());
        }
        Ok(parts.concat())
    }

    async fn block_status(&self, offset: u64, len: u64) -> io::Result<Option<Vec<Extent>>> {
        let len = len.min(self.common.size.saturating_sub(offset));
        if len == 0 {
            return Ok(Some(Vec::new()));
        }
        // The client takes a u32 length; the engine asks again from where
        // the answer ends.
        const MAX: u32 = u32::MAX - 0xfff; // the largest 4 KiB multiple
        let len = u32::try_from(len).map_or(MAX, |l| l.min(MAX));
        self.with_retry(Class::Background, move |c| async move {
            if !c.can_block_status() {
                return Ok(None);
            }
            c.block_status(offset, len).await.map(Some)
        })
        .await
    }

    /// Install the fingerprint: every later connection is checked as it
    /// connects, and the ones already open are checked now (a resume: the
    /// first connections of a lazy source may be up already). Connections
    /// not up yet are not waited for: they are checked when they connect.
    async fn install_fingerprint(&self, fp: Arc<Fingerprint>) -> io::Result<()> {
        *self
            .common
            .fingerprint
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(fp);
        // A resumed source connects in the background: let the foreground
        // connection's first attempt end (bounded by the connect timeout;
        // a source that is down fails it at once), so a different disk is
        // refused here rather than at some later fetch.
        let deadline = tokio::time::Instant::now() + self.common.opts.connect_timeout;
        let mut changed = self.common.changed.subscribe();
        loop {
            let first_attempt_over = {
                let st = self.foreground.lock();
                st.connected_once
                    || st
                        .outage
                        .as_ref()
                        .is_some_and(|o| o.last_error != NOT_CONNECTED_YET)
            };
            if first_attempt_over || self.common.refused().is_some() {
                break;
            }
            if tokio::time::timeout_at(deadline, changed.changed())
                .await
                .is_err()
            {
                break;
            }
        }
        // Every open connection, together.
        let checks = std::iter::once(&self.foreground)
            .chain(self.background.iter())
            .map(|slot| check_slot(&self.common, slot));
        let results = futures_util::future::join_all(checks).await;
        if let Some(Err(why)) = results.into_iter().find(|r| r.is_err()) {
            self.common.notify_changed();
            return Err(io::Error::other(why));
        }
        // A connection that connected (and was checked) during the wait.
        match self.common.refused() {
            Some(why) if self.common.foreign.load(Ordering::Relaxed) => Err(io::Error::other(why)),
            _ => Ok(()),
        }
    }

    /// A connection to the server's hash export for `chunk` (served by
    /// `stream export` beside the disk); `None` when it has none (nbdkit,
    /// qemu-nbd, an older `stream export`) or it cannot be reached.
    async fn chunk_hashes(&self, chunk: u64) -> Option<Box<dyn ChunkHashes>> {
        let c = &self.common;
        let name = proof::export_name(chunk, &c.uri.export);
        match Client::connect_tls(
            &c.uri.endpoint,
            &name,
            c.tls.as_ref(),
            c.opts.connect_timeout,
        )
        .await
        {
            Ok(client) => {
                let hashes = RemoteHashes::new(client, c.size.div_ceil(chunk));
                if hashes.is_none() {
                    tracing::warn!(
                        "source {}: its export {name:?} is not the hash table of this disk; \
                         reading the disk instead",
                        c.location
                    );
                }
                hashes.map(|h| Box::new(h) as Box<dyn ChunkHashes>)
            }
            Err(e) => {
                tracing::debug!("source {}: no hash export {name:?}: {e}", c.location);
                None
            }
        }
    }

    fn health(&self) -> Health {
        if let Some(why) = self.common.refused() {
            return Health::Down(why);
        }
        let oldest = std::iter::once(&self.foreground)
            .chain(self.background.iter())
            .filter_map(|s| s.outage().map(|o| (s.name.clone(), o)))
            .min_by_key(|(_, o)| o.since);
        match oldest {
            None => Health::Up,
            Some((slot, o)) if o.since.elapsed() >= self.common.opts.foreground_retry_window => {
                Health::Down(format!(
                    "unreachable since {} ({slot} connection): last error: {}",
                    o.since_text(),
                    o.last_error
                ))
            }
            Some((slot, o)) => Health::Reconnecting(format!(
                "since {} ({slot} connection): last error: {}",
                o.since_text(),
                o.last_error
            )),
        }
    }
}
