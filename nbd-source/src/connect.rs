//! What the slot tasks and the readers share, and the one connect attempt
//! with the checks every new connection passes before it serves a read:
//!
//! - The size of every new connection is checked against the size of the
//!   disk being migrated. A server of another size is refused loudly: health
//!   is `Down`, reads fail at once with `EIO`; data from a different disk is
//!   never served.
//! - Once the volume installed its fingerprint (`Source::install_fingerprint`),
//!   every new connection also reads the sampled chunks and compares them
//!   before it serves a read: a disk of the same size but other content is
//!   refused the same way. A connection made before the fingerprint was
//!   installed is checked by the install itself.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use lazy_fetch::fingerprint::Fingerprint;
use nbd_server::client::Client;
use nbd_server::tls::ClientTls;
use nbd_server::uri::NbdUri;
use tokio::sync::watch;

use crate::NbdOptions;
use crate::error::source_chain;

/// What the slot tasks and the readers share.
pub(crate) struct Common {
    pub(crate) uri: NbdUri,
    /// TLS credentials of an `nbds` URI, loaded once for every (re)connect.
    pub(crate) tls: Option<ClientTls>,
    pub(crate) location: String,
    pub(crate) size: u64,
    pub(crate) opts: NbdOptions,
    pub(crate) reconnects: AtomicU64,
    /// Set while the server answering has another size than the disk, or
    /// other content than the fingerprint recorded.
    pub(crate) refused: Mutex<Option<String>>,
    /// Installed by the volume; checked on every new connection.
    pub(crate) fingerprint: Mutex<Option<Arc<Fingerprint>>>,
    /// `refused` is set because the content differs from the fingerprint.
    pub(crate) foreign: std::sync::atomic::AtomicBool,
    /// Bumped on every slot change; readers waiting for a connection watch it.
    pub(crate) changed: watch::Sender<u64>,
}

impl Common {
    pub(crate) fn refused(&self) -> Option<String> {
        self.refused
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub(crate) fn set_refused(&self, why: Option<String>) {
        if why.is_none() {
            self.foreign.store(false, Ordering::Relaxed);
        }
        *self.refused.lock().unwrap_or_else(|p| p.into_inner()) = why;
    }

    pub(crate) fn fingerprint(&self) -> Option<Arc<Fingerprint>> {
        self.fingerprint
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Compare the fingerprint's samples with what `client` reads. A
    /// mismatch refuses the source (reads fail at once) and is returned as
    /// the error; a read that fails is an ordinary connect failure.
    pub(crate) async fn check_fingerprint(
        &self,
        client: &Client,
        fp: &Fingerprint,
    ) -> Result<(), String> {
        let max = client.max_payload().max(4096);
        let found = Fingerprint::check(&fp.samples(), fp.geometry(), &self.location, |o, n| {
            let client = client.clone();
            async move {
                let mut out = Vec::with_capacity(n);
                while out.len() < n {
                    let k = u32::try_from(n - out.len()).map_or(max, |k| k.min(max));
                    let part = client
                        .read(o + out.len() as u64, k)
                        .await
                        .map_err(|e| io::Error::other(format!("{e}{}", source_chain(&e))))?;
                    out.extend_from_slice(&part);
                }
                Ok(out)
            }
        })
        .await
        .map_err(|e| format!("reading the fingerprint's chunks failed: {e}"))?;
        if let Some(m) = found {
            let why = m.to_string();
            tracing::error!("{why}");
            self.set_refused(Some(why.clone()));
            self.foreign.store(true, Ordering::Relaxed);
            return Err(why);
        }
        Ok(())
    }

    pub(crate) fn notify_changed(&self) {
        self.changed.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// One connect attempt, with the size check.
    pub(crate) async fn connect_once(&self) -> Result<Client, String> {
        let client = Client::connect_tls(
            &self.uri.endpoint,
            &self.uri.export,
            self.tls.as_ref(),
            self.opts.connect_timeout,
        )
        .await
        .map_err(|e| format!("{e}{}", source_chain(&e)))?;
        if client.size() != self.size {
            let why = format!(
                "source {} now has {} bytes but the disk being migrated has {} bytes: a \
                 different disk is refused; put the original disk back behind this URI",
                self.location,
                client.size(),
                self.size
            );
            tracing::error!("{why}");
            self.set_refused(Some(why.clone()));
            return Err(why);
        }
        if let Some(fp) = self.fingerprint() {
            self.check_fingerprint(&client, &fp).await?;
        }
        self.set_refused(None);
        Ok(client)
    }
}
