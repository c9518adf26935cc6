//! An NBD export as a source: `nbd://host[:port]/export` or
//! `nbd+unix:///export?socket=PATH`, or their TLS forms `nbds://`,
//! `nbds+unix://` with credentials in the URI (`tls-psk-file=`,
//! `tls-certificates=`): loaded once when the source is opened, used by
//! every connection and reconnect.
//!
//! # Connections (invariant 7)
//!
//! One source holds several NBD connections, each in a *slot*: one
//! foreground slot for [`Class::Foreground`] reads (a client is waiting) and
//! N background slots (default 2) for hydration and block status. A 64 KiB
//! foreground read therefore never waits behind 1 MiB hydration reads on the
//! same TCP stream, nor behind their replies in the server's queue for that
//! connection.
//!
//! | thing                         | owner                                        | notes |
//! |-------------------------------|----------------------------------------------|-------|
//! | a slot's `Client`             | `SlotState::client`, under a std mutex never held across `.await` | readers take a clone (and its generation) and drop the lock before sending |
//! | (re)connecting a slot         | that slot's task alone (`run_slot`)        | so there is one connect attempt at a time per slot, never a herd of readers dialling |
//! | declaring a connection dead   | anyone: a reader that saw a connection-fatal error or a stall, or the slot task polling `is_closed` | only if the generation still matches, so a late reader cannot kill the *new* connection |
//! | outage record (`Outage`)      | the slot: set when its connection is lost or a connect fails, cleared by a successful connect | feeds [`Source::health`] and the "unreachable since" messages |
//! | size refusal (`Common::refused`) | set by a slot task that reached a server of another size, cleared when one of the right size answers | while set, every read fails at once with `EIO` |
//! | the slot tasks                | [`NbdSource`]; aborted when it is dropped, which drops the clients and closes the sockets | |
//!
//! # Retry rules
//!
//! - A read waits for its slot's connection, then sends. A connection-fatal
//!   error ([`ClientError::is_connection_fatal`]) or no reply within
//!   [`NbdOptions::stall_timeout`] marks the connection dead and the read is
//!   sent again on the next one.
//! - Reconnects back off exponentially per slot, from
//!   [`NbdOptions::backoff_initial`] doubling to [`NbdOptions::backoff_max`];
//!   a success resets the backoff and counts in [`NbdSource::reconnects`].
//! - A read keeps trying until its retry window (per class) expires, then
//!   fails with `EIO` and a message naming the URI, since when it has been
//!   unreachable and the last error.
//! - A per-request error from the server (`EINVAL`, `ENOSPC`, ...) is
//!   returned at once with its errno; only `EIO` is retried, at most
//!   [`NbdOptions::server_eio_retries`] times.
//! - The size of every new connection is checked against the size of the
//!   disk being migrated. A server of another size is refused loudly: health
//!   is `Down`, reads fail at once with `EIO`; data from a different disk is
//!   never served.
//! - Once the volume installed its fingerprint ([`Source::install_fingerprint`]),
//!   every new connection also reads the sampled chunks and compares them
//!   before it serves a read: a disk of the same size but other content is
//!   refused the same way. A connection made before the fingerprint was
//!   installed is checked by the install itself.
//!
//! Errors returned by reads carry their errno; [`errno_of`] reads it back.

use std::future::Future;
use std::io;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use nbd_server::client::{Client, ClientError};
use nbd_server::proto::Errno;
use nbd_server::tls::ClientTls;
use nbd_server::uri::{NbdUri, UriError};
use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;

use super::{Class, Extent, Health, Source};
use crate::fingerprint::Fingerprint;
use crate::state::SourceId;

/// How often a slot task checks that an idle connection is still open.
const LIVENESS_POLL: Duration = Duration::from_millis(100);
/// The outage of a slot whose first connect attempt has not ended.
const NOT_CONNECTED_YET: &str = "not connected yet";
/// Pause before resending a read the server failed with `EIO`.
const EIO_RETRY_PAUSE: Duration = Duration::from_millis(50);

/// Tuning of an [`NbdSource`].
#[derive(Clone, Debug)]
pub struct NbdOptions {
    /// Connections for hydration and block status (at least 1).
    pub background_connections: usize,
    /// Bound on one connect plus handshake.
    pub connect_timeout: Duration,
    /// How long a foreground read keeps retrying before `EIO`.
    pub foreground_retry_window: Duration,
    /// How long a background read or block status keeps retrying.
    pub background_retry_window: Duration,
    /// A request without a reply for this long marks its connection dead.
    pub stall_timeout: Duration,
    /// First reconnect backoff after a failed attempt.
    pub backoff_initial: Duration,
    /// Cap of the doubling backoff.
    pub backoff_max: Duration,
    /// How many times a read the server failed with `EIO` is resent.
    pub server_eio_retries: u32,
}

impl Default for NbdOptions {
    fn default() -> Self {
        NbdOptions {
            background_connections: 2,
            connect_timeout: Duration::from_secs(10),
            foreground_retry_window: Duration::from_secs(30),
            background_retry_window: Duration::from_secs(30),
            stall_timeout: Duration::from_secs(20),
            backoff_initial: Duration::from_millis(100),
            backoff_max: Duration::from_secs(5),
            server_eio_retries: 2,
        }
    }
}

/// Why an NBD source could not be opened.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NbdSourceError {
    #[error("source {uri:?} is not a valid NBD URI: {source}")]
    Uri {
        uri: String,
        #[source]
        source: UriError,
    },
    #[error("source {uri}: {source}")]
    Tls {
        uri: String,
        #[source]
        source: nbd_server::tls::TlsError,
    },
    #[error("source {uri} is unreachable: {source}{}", source_chain(.source))]
    Connect {
        uri: String,
        #[source]
        source: ClientError,
    },
    #[error("source {uri} is empty (0 bytes)")]
    Empty { uri: String },
}

fn source_chain(e: &ClientError) -> String {
    let mut s = String::new();
    let mut cur = std::error::Error::source(e);
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// The message of a failed read, keeping its errno through `io::Error`.
#[derive(Debug)]
struct ReadError {
    errno: i32,
    message: String,
}

impl std::fmt::Display for ReadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for ReadError {}

fn errno_error(errno: i32, message: String) -> io::Error {
    io::Error::new(
        io::Error::from_raw_os_error(errno).kind(),
        ReadError { errno, message },
    )
}

/// The errno of an error returned by [`NbdSource`] (or of a plain OS error).
pub fn errno_of(e: &io::Error) -> Option<i32> {
    e.raw_os_error().or_else(|| {
        e.get_ref()
            .and_then(|inner| inner.downcast_ref::<ReadError>())
            .map(|x| x.errno)
    })
}

/// Since when a slot has had no usable connection, and why.
#[derive(Clone, Debug)]
struct Outage {
    since: Instant,
    since_wall: SystemTime,
    last_error: String,
}

impl Outage {
    fn new(last_error: String) -> Outage {
        Outage {
            since: Instant::now(),
            since_wall: SystemTime::now(),
            last_error,
        }
    }

    fn since_text(&self) -> String {
        format!(
            "{} ({:.1} s ago)",
            utc(self.since_wall),
            self.since.elapsed().as_secs_f64()
        )
    }
}

struct SlotState {
    client: Option<Client>,
    /// Bumped on every new connection.
    generation: u64,
    /// A connection was established once (a later one is a *re*connect).
    connected_once: bool,
    /// The current connection was checked against the fingerprint (or
    /// none was installed when it connected, see `run_slot`).
    fingerprint_checked: bool,
    outage: Option<Outage>,
}

struct Slot {
    name: String,
    state: Mutex<SlotState>,
    /// Readers ask the slot task to look at its connection now.
    wake: Notify,
}

impl Slot {
    fn new(name: String, client: Option<Client>, outage: Option<Outage>) -> Slot {
        Slot {
            name,
            state: Mutex::new(SlotState {
                connected_once: client.is_some(),
                fingerprint_checked: false,
                client,
                generation: 0,
                outage,
            }),
            wake: Notify::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, SlotState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The open connection and its generation.
    fn live(&self) -> Option<(u64, Client)> {
        let st = self.lock();
        match &st.client {
            Some(c) if !c.is_closed() => Some((st.generation, c.clone())),
            _ => None,
        }
    }

    /// Forget connection `generation` (if it is still the current one).
    fn mark_dead(&self, generation: u64, why: String) {
        {
            let mut st = self.lock();
            if st.generation != generation || st.client.is_none() {
                return;
            }
            st.client = None;
            match &mut st.outage {
                Some(o) => o.last_error = why,
                None => st.outage = Some(Outage::new(why)),
            }
        }
        self.wake.notify_one();
    }

    fn outage(&self) -> Option<Outage> {
        self.lock().outage.clone()
    }
}

/// What the slot tasks and the readers share.
struct Common {
    uri: NbdUri,
    /// TLS credentials of an `nbds` URI, loaded once for every (re)connect.
    tls: Option<ClientTls>,
    location: String,
    size: u64,
    opts: NbdOptions,
    reconnects: AtomicU64,
    /// Set while the server answering has another size than the disk, or
    /// other content than the fingerprint recorded.
    refused: Mutex<Option<String>>,
    /// Installed by the volume; checked on every new connection.
    fingerprint: Mutex<Option<Arc<Fingerprint>>>,
    /// `refused` is set because the content differs from the fingerprint.
    foreign: std::sync::atomic::AtomicBool,
    /// Bumped on every slot change; readers waiting for a connection watch it.
    changed: watch::Sender<u64>,
}

impl Common {
    fn refused(&self) -> Option<String> {
        self.refused
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn set_refused(&self, why: Option<String>) {
        if why.is_none() {
            self.foreign.store(false, Ordering::Relaxed);
        }
        *self.refused.lock().unwrap_or_else(|p| p.into_inner()) = why;
    }

    fn fingerprint(&self) -> Option<Arc<Fingerprint>> {
        self.fingerprint
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Compare the fingerprint's samples with what `client` reads. A
    /// mismatch refuses the source (reads fail at once) and is returned as
    /// the error; a read that fails is an ordinary connect failure.
    async fn check_fingerprint(&self, client: &Client, fp: &Fingerprint) -> Result<(), String> {
        let max = client.max_payload().max(4096) as usize;
        let found = Fingerprint::check(&fp.samples(), fp.geometry(), &self.location, |o, n| {
            let client = client.clone();
            async move {
                let mut out = Vec::with_capacity(n);
                while out.len() < n {
                    let k = (n - out.len()).min(max) as u32;
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

    fn notify_changed(&self) {
        self.changed.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// One connect attempt, with the size check.
    async fn connect_once(&self) -> Result<Client, String> {
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

/// Keep one slot connected: wait while its connection lives, reconnect
/// with backoff when it does not. The only place a slot connects.
async fn run_slot(common: Arc<Common>, slot: Arc<Slot>) {
    let opts = &common.opts;
    let mut backoff = opts.backoff_initial;
    loop {
        while slot.live().is_some() {
            tokio::select! {
                _ = slot.wake.notified() => {}
                _ = tokio::time::sleep(LIVENESS_POLL) => {}
            }
        }
        {
            let mut st = slot.lock();
            if st.client.take().is_some() || st.outage.is_none() {
                let o = st
                    .outage
                    .get_or_insert_with(|| Outage::new("connection closed".into()));
                tracing::warn!(slot = %slot.name, uri = %common.location,
                    "NBD source connection lost: {}", o.last_error);
            }
        }
        common.notify_changed();
        let had_fingerprint = common.fingerprint().is_some();
        match common.connect_once().await {
            Ok(client) => {
                {
                    let mut st = slot.lock();
                    st.client = Some(client);
                    st.generation += 1;
                    st.fingerprint_checked = had_fingerprint;
                    st.outage = None;
                    if st.connected_once {
                        common.reconnects.fetch_add(1, Ordering::Relaxed);
                        tracing::info!(slot = %slot.name, uri = %common.location,
                            "NBD source reconnected");
                    }
                    st.connected_once = true;
                }
                backoff = opts.backoff_initial;
                // Installed while this connection was being made: check it
                // now (the install may have looked before it was stored).
                if !had_fingerprint && common.fingerprint().is_some() {
                    let _ = check_slot(&common, &slot).await;
                }
                common.notify_changed();
            }
            Err(why) => {
                tracing::debug!(slot = %slot.name, uri = %common.location,
                    "NBD source connect failed (next try in {backoff:?}): {why}");
                {
                    let mut st = slot.lock();
                    match &mut st.outage {
                        Some(o) => o.last_error = why,
                        None => st.outage = Some(Outage::new(why)),
                    }
                }
                common.notify_changed();
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(opts.backoff_max);
            }
        }
    }
}

/// Check the live connection of `slot` against the installed fingerprint
/// unless it was already; a mismatch drops the connection (and refuses the
/// source, see `check_fingerprint`).
async fn check_slot(common: &Common, slot: &Slot) -> Result<(), String> {
    let Some(fp) = common.fingerprint() else {
        return Ok(());
    };
    let (generation, client) = {
        let st = slot.lock();
        match &st.client {
            Some(c) if !st.fingerprint_checked && !c.is_closed() => (st.generation, c.clone()),
            _ => return Ok(()),
        }
    };
    match common.check_fingerprint(&client, &fp).await {
        Ok(()) => {
            let mut st = slot.lock();
            if st.generation == generation {
                st.fingerprint_checked = true;
            }
            Ok(())
        }
        Err(why) if common.refused().is_some() => {
            slot.mark_dead(generation, why.clone());
            Err(why)
        }
        // Could not read it: the connection is in doubt; let the slot
        // reconnect, which checks again.
        Err(why) => {
            slot.mark_dead(generation, why.clone());
            Ok(())
        }
    }
}

/// An NBD export read through one foreground and N background connections
/// that reconnect on their own.
pub struct NbdSource {
    common: Arc<Common>,
    foreground: Arc<Slot>,
    background: Vec<Arc<Slot>>,
    next_background: AtomicUsize,
    tasks: Vec<JoinHandle<()>>,
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

    fn start(common: Arc<Common>, foreground: Slot, background: Vec<Slot>) -> NbdSource {
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

    /// The slot a request of `class` goes to: the foreground one, or a
    /// background one in turn, preferring one that is connected.
    fn slot(&self, class: Class) -> &Slot {
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

    fn window(&self, class: Class) -> Duration {
        match class {
            Class::Foreground => self.common.opts.foreground_retry_window,
            Class::Background => self.common.opts.background_retry_window,
        }
    }

    fn unreachable(&self, slot: &Slot, started: Instant) -> io::Error {
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

    fn refused_error(&self, why: String) -> io::Error {
        errno_error(libc::EIO, why)
    }

    /// Wait (until `deadline`) for a connection in `slot`.
    async fn client(
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
    async fn with_retry<T, F, Fut>(&self, class: Class, op: F) -> io::Result<T>
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
            .await? as usize;
        let pieces = (0..len).step_by(max.max(512)).map(|at| {
            let n = (len - at).min(max.max(512)) as u32;
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
        let len = len.min(u64::from(u32::MAX) & !0xfff) as u32;
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
    async fn chunk_hashes(&self, chunk: u64) -> Option<crate::proof::RemoteHashes> {
        let c = &self.common;
        let name = crate::proof::export_name(chunk, &c.uri.export);
        match Client::connect_tls(
            &c.uri.endpoint,
            &name,
            c.tls.as_ref(),
            c.opts.connect_timeout,
        )
        .await
        {
            Ok(client) => {
                let hashes = crate::proof::RemoteHashes::new(client, c.size.div_ceil(chunk));
                if hashes.is_none() {
                    tracing::warn!(
                        "source {}: its export {name:?} is not the hash table of this disk; \
                         reading the disk instead",
                        c.location
                    );
                }
                hashes
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

/// `t` as an RFC 3339 UTC time, to the second.
fn utc(t: SystemTime) -> String {
    let secs = t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_formats_known_instants() {
        assert_eq!(utc(UNIX_EPOCH), "1970-01-01T00:00:00Z");
        let t = UNIX_EPOCH + Duration::from_secs(1_709_210_096);
        assert_eq!(utc(t), "2024-02-29T12:34:56Z");
    }

    #[test]
    fn tls_uri_with_a_missing_key_file_is_refused_at_once() {
        let Err(e) = parse("nbds://host/export?tls-psk-file=/nonexistent/keys.psk") else {
            panic!("a missing PSK file must be refused")
        };
        let msg = e.to_string();
        assert!(msg.contains("/nonexistent/keys.psk"), "{msg}");
        assert!(msg.contains("PSK file"), "{msg}");
    }

    #[test]
    fn errno_survives_io_error_wrapping() {
        let e = errno_error(libc::EIO, "x".into());
        assert_eq!(errno_of(&e), Some(libc::EIO));
        assert_eq!(e.to_string(), "x");
    }
}
