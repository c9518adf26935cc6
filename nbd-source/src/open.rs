//! Opening a source: the URI and its TLS credentials checked at once, then
//! either a first connection (a new migration learns the size) or none (a
//! resume knows the size and connects in the background).

use std::sync::atomic::{AtomicU64, AtomicUsize};
use std::sync::{Arc, Mutex};

use nbd_server::client::Client;
use nbd_server::tls::ClientTls;
use nbd_server::uri::NbdUri;
use tokio::sync::watch;

use crate::connect::Common;
use crate::outage::Outage;
use crate::slot::{NOT_CONNECTED_YET, Slot, run_slot};
use crate::{NbdOptions, NbdSource, NbdSourceError};

/// The URI, and for `nbds` its TLS credentials, loaded now so a bad key
/// file fails the command at once rather than every reconnect.
fn parse(uri: &str) -> Result<(NbdUri, Option<ClientTls>), NbdSourceError> {
    let parsed = NbdUri::parse(uri).map_err(|source| NbdSourceError::Uri {
        uri: uri.to_string(),
        source,
    })?;
    let tls = match parsed.client_tls() {
        Some(config) => Some(
            ClientTls::new(&config).map_err(|source| NbdSourceError::Tls {
                uri: parsed.to_string(),
                source,
            })?,
        ),
        None => None,
    };
    Ok((parsed, tls))
}

impl NbdSource {
    /// Open a source for a new migration: connect (within
    /// `opts.connect_timeout`) to learn its size. Must run in a tokio
    /// runtime.
    pub async fn connect(uri: &str, opts: NbdOptions) -> Result<NbdSource, NbdSourceError> {
        let (parsed, tls) = parse(uri)?;
        let location = parsed.to_string();
        let first = Client::connect_tls(
            &parsed.endpoint,
            &parsed.export,
            tls.as_ref(),
            opts.connect_timeout,
        )
        .await
        .map_err(|source| NbdSourceError::Connect {
            uri: location.clone(),
            source,
        })?;
        let size = first.size();
        if size == 0 {
            return Err(NbdSourceError::Empty { uri: location });
        }
        let common = Arc::new(Common {
            uri: parsed,
            tls,
            location,
            size,
            opts: opts.clone(),
            reconnects: AtomicU64::new(0),
            refused: Mutex::new(None),
            fingerprint: Mutex::new(None),
            foreign: std::sync::atomic::AtomicBool::new(false),
            changed: watch::channel(0).0,
        });
        // The background connections are opened now too, so the first
        // hydration read does not pay for a handshake; one that fails is
        // left to its slot task.
        let n = opts.background_connections.max(1);
        let mut attempts = Vec::with_capacity(n);
        for _ in 0..n {
            let c = common.clone();
            attempts.push(async move { c.connect_once().await });
        }
        let results = futures_util::future::join_all(attempts).await;
        let background = results
            .into_iter()
            .enumerate()
            .map(|(i, r)| {
                let name = format!("background {}", i + 1);
                match r {
                    Ok(c) => Slot::new(name, Some(c), None),
                    Err(why) => Slot::new(name, None, Some(Outage::new(why))),
                }
            })
            .collect();
        let foreground = Slot::new("foreground".into(), Some(first), None);
        Ok(NbdSource::start(common, foreground, background))
    }

    /// Open a source for a resumed migration without connecting: returns at
    /// once, and connects in the background. A server whose size is not
    /// `expected_size` is refused (see the module docs). Fails only on a
    /// URI it cannot use. Must be called in a tokio runtime (it spawns).
    pub fn lazy(
        uri: &str,
        expected_size: u64,
        opts: NbdOptions,
    ) -> Result<NbdSource, NbdSourceError> {
        let (parsed, tls) = parse(uri)?;
        let location = parsed.to_string();
        let common = Arc::new(Common {
            uri: parsed,
            tls,
            location,
            size: expected_size,
            opts: opts.clone(),
            reconnects: AtomicU64::new(0),
            refused: Mutex::new(None),
            fingerprint: Mutex::new(None),
            foreign: std::sync::atomic::AtomicBool::new(false),
            changed: watch::channel(0).0,
        });
        let not_yet = || Some(Outage::new(NOT_CONNECTED_YET.into()));
        let foreground = Slot::new("foreground".into(), None, not_yet());
        let background = (0..opts.background_connections.max(1))
            .map(|i| Slot::new(format!("background {}", i + 1), None, not_yet()))
            .collect();
        Ok(NbdSource::start(common, foreground, background))
    }

    pub(crate) fn start(common: Arc<Common>, foreground: Slot, background: Vec<Slot>) -> NbdSource {
        let foreground = Arc::new(foreground);
        let background: Vec<Arc<Slot>> = background.into_iter().map(Arc::new).collect();
        let tasks = std::iter::once(&foreground)
            .chain(background.iter())
            .map(|s| tokio::spawn(run_slot(common.clone(), s.clone())))
            .collect();
        NbdSource {
            common,
            foreground,
            background,
            next_background: AtomicUsize::new(0),
            tasks,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_uri_with_a_missing_key_file_is_refused_at_once() {
        let Err(e) = parse("nbds://host/export?tls-psk-file=/nonexistent/keys.psk") else {
            panic!("a missing PSK file must be refused")
        };
        let msg = e.to_string();
        assert!(msg.contains("/nonexistent/keys.psk"), "{msg}");
        assert!(msg.contains("PSK file"), "{msg}");
    }
}
