//! The engine's source over SSH: two sessions (one for the reads a client
//! waits on, one for hydration, so a 32-request hydration run never queues
//! ahead of a 4 KiB foreground read), each reconnected on failure.
//!
//! Rules, as the NBD source's: a read that fails because the session died
//! (ssh exited, the link broke, no answer within the stall timeout) is sent
//! again on a new session, with a doubling backoff, until its retry window
//! ends; then it fails with `EIO` and a message naming the host, since
//! when, and the last error. A reason retrying cannot fix (an unknown or
//! changed host key, a refused login, no such disk) fails at once. Every
//! new session checks the disk's size against the migration's.
//!
//! Holes: SFTP cannot see them, so every chunk is read; the engine finds
//! all-zero chunks by content and never writes them (they cost the link,
//! not the target).

use std::io;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use lazy_fetch::source::{Class, Health, Source};
use lazy_fetch::state::SourceId;

use crate::session::{ConnectError, Endpoint, Session};
use crate::uri::SshUri;

/// Tuning of an [`SshSource`].
#[derive(Clone, Debug)]
pub struct SshOptions {
    /// Bound on starting ssh, logging in and opening the disk.
    pub connect_timeout: Duration,
    /// How long a read keeps retrying before `EIO`.
    pub retry_window: Duration,
    /// A read without an answer for this long ends its session.
    pub stall_timeout: Duration,
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
    /// Record an unknown host's key on first use (`--accept-new-host-key`).
    pub accept_new_host_key: bool,
}

impl Default for SshOptions {
    fn default() -> Self {
        SshOptions {
            connect_timeout: Duration::from_secs(15),
            retry_window: Duration::from_secs(30),
            stall_timeout: Duration::from_secs(20),
            backoff_initial: Duration::from_millis(100),
            backoff_max: Duration::from_secs(5),
            accept_new_host_key: false,
        }
    }
}

/// One session slot: the live session, if any.
#[derive(Default)]
struct Slot(tokio::sync::Mutex<Option<Arc<Session>>>);

/// A disk on a legacy host, read through its sshd.
pub struct SshSource {
    location: String,
    endpoint: Endpoint,
    size: u64,
    opts: SshOptions,
    foreground: Slot,
    background: Slot,
    health: Mutex<(Health, Option<Instant>)>,
}

/// Where `spec` says the disk is, and how to reach it.
fn endpoint(spec: &str, opts: &SshOptions) -> io::Result<Endpoint> {
    let uri = SshUri::parse(spec).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    Ok(Endpoint {
        uri,
        accept_new_host_key: opts.accept_new_host_key,
        connect_timeout: opts.connect_timeout,
    })
}

impl SshSource {
    /// Connect now and learn the disk's size (a new migration).
    pub async fn connect(spec: &str, opts: SshOptions) -> io::Result<SshSource> {
        let endpoint = endpoint(spec, &opts)?;
        let session = endpoint.connect().await.map_err(io::Error::other)?;
        let size = session.size().await?;
        if size == 0 {
            return Err(io::Error::other(format!(
                "{}: {} is empty",
                endpoint.uri.endpoint(),
                endpoint.uri.path
            )));
        }
        let s = SshSource::new(spec, endpoint, size, opts);
        *s.background.0.lock().await = Some(Arc::new(session));
        Ok(s)
    }

    /// A resumed migration: the size is known; sessions start when needed
    /// (and check it).
    pub fn lazy(spec: &str, size: u64, opts: SshOptions) -> io::Result<SshSource> {
        let endpoint = endpoint(spec, &opts)?;
        Ok(SshSource::new(spec, endpoint, size, opts))
    }

    fn new(spec: &str, endpoint: Endpoint, size: u64, opts: SshOptions) -> SshSource {
        SshSource {
            location: spec.to_string(),
            endpoint,
            size,
            opts,
            foreground: Slot::default(),
            background: Slot::default(),
            health: Mutex::new((Health::Up, None)),
        }
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    fn slot(&self, class: Class) -> &Slot {
        match class {
            Class::Foreground => &self.foreground,
            Class::Background => &self.background,
        }
    }

    /// The slot's live session, or a new one (size checked).
    async fn session(&self, slot: &Slot) -> Result<Arc<Session>, ConnectError> {
        let mut s = slot.0.lock().await;
        if let Some(live) = s.as_ref().filter(|x| !x.is_dead()) {
            return Ok(live.clone());
        }
        *s = None;
        let session = self.endpoint.connect().await?;
        let size = session
            .size()
            .await
            .map_err(|e| ConnectError::Transient(e.to_string()))?;
        if size != self.size {
            return Err(ConnectError::Permanent(format!(
                "{}: {} is {size} bytes now, but the migration began from {} bytes: it is \
                 not the same disk, and nothing more is read from it",
                self.endpoint.uri.endpoint(),
                self.endpoint.uri.path,
                self.size
            )));
        }
        tracing::debug!(
            "{}: a new session ({})",
            self.endpoint.uri.endpoint(),
            session.kind()
        );
        let session = Arc::new(session);
        *s = Some(session.clone());
        Ok(session)
    }

    /// Drop `dead` from the slot, if it is still the slot's session.
    async fn discard(&self, slot: &Slot, dead: &Arc<Session>) {
        let mut s = slot.0.lock().await;
        if s.as_ref().is_some_and(|x| Arc::ptr_eq(x, dead)) {
            *s = None;
        }
    }

    fn note(&self, up: Result<(), String>) {
        let mut h = self.health.lock().expect("poisoned");
        match up {
            Ok(()) => *h = (Health::Up, None),
            Err(why) => {
                let since = h.1.unwrap_or_else(Instant::now);
                *h = (Health::Reconnecting(why), Some(since));
            }
        }
    }

    async fn read_with_retries(
        &self,
        offset: u64,
        len: usize,
        class: Class,
    ) -> io::Result<Vec<u8>> {
        if offset + len as u64 > self.size {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("a read past the end of the disk ({offset}+{len})"),
            ));
        }
        let slot = self.slot(class);
        let deadline = Instant::now() + self.opts.retry_window;
        let mut backoff = self.opts.backoff_initial;
        loop {
            let last = match self.session(slot).await {
                Err(e) if e.is_permanent() => {
                    self.note(Err(e.to_string()));
                    return Err(io::Error::other(e.to_string()));
                }
                Err(e) => e.to_string(),
                Ok(session) => {
                    let read = tokio::time::timeout(
                        self.opts.stall_timeout,
                        session.read_exact(offset, len),
                    )
                    .await;
                    match read {
                        Ok(Ok(data)) => {
                            self.note(Ok(()));
                            return Ok(data);
                        }
                        Ok(Err(e)) if e.kind() == io::ErrorKind::UnexpectedEof => {
                            return Err(io::Error::other(format!(
                                "{}: {e}: the disk shrank",
                                self.endpoint.uri.endpoint()
                            )));
                        }
                        Ok(Err(e)) => {
                            self.discard(slot, &session).await;
                            e.to_string()
                        }
                        Err(_) => {
                            self.discard(slot, &session).await;
                            format!("no answer within {:?}", self.opts.stall_timeout)
                        }
                    }
                }
            };
            self.note(Err(last.clone()));
            if Instant::now() + backoff > deadline {
                let since = self.health.lock().expect("poisoned").1;
                let ago = since.map(|t| t.elapsed().as_secs()).unwrap_or(0);
                // `Other`: clients see EIO (the block-device errno rule).
                return Err(io::Error::other(format!(
                    "{}: unreachable for {ago} s (retried for {:?}); last error: {last}",
                    self.endpoint.uri.endpoint(),
                    self.opts.retry_window
                )));
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(self.opts.backoff_max);
        }
    }
}

impl Source for SshSource {
    fn id(&self) -> SourceId {
        SourceId {
            kind: "ssh".into(),
            location: self.location.clone(),
            size: self.size,
        }
    }

    async fn read(&self, offset: u64, len: usize, class: Class) -> io::Result<Vec<u8>> {
        self.read_with_retries(offset, len, class).await
    }

    fn health(&self) -> Health {
        self.health.lock().expect("poisoned").0.clone()
    }
}
