//! The control socket of a running `stream start` (`STATE/control.sock`):
//! one JSON request line in, one JSON reply line out.
//!
//! Requests: `{"cmd":"status"}`. Replies carry `"schema": 1`; see
//! docs/status.md for the fields.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use lazy_fetch::Volume;
use lazy_fetch::source::Source;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

pub const SCHEMA: u32 = 1;

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum Request {
    Status,
    /// For `stream finalize`: hydrate the rest at full speed, wait for the
    /// clients to go (or drop them with `force`), then stop serving and
    /// exit, leaving the state saved and unlocked. Answered with event
    /// lines ([`Event`]) ending in `stopping` or `error`.
    Handover {
        force: bool,
        timeout_secs: Option<u64>,
    },
    /// For `stream detach`: hydrate the rest at full speed, then share the
    /// target with the guest (`Volume::prepare_detach`) and keep serving
    /// until the guest is switched. Answered with event lines ending in
    /// `prepared` or `error`.
    PrepareDetach {
        timeout_secs: Option<u64>,
    },
}

/// Progress lines of a handover.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    Hydrating {
        bytes_present: u64,
        size: u64,
        rate: f64,
    },
    WaitingForClients {
        connected: usize,
    },
    Stopping {
        pid: u32,
    },
    /// The target is shared with the guest: it may be switched now.
    Prepared,
    Error {
        message: String,
    },
}

/// The `status` reply.
#[derive(Debug, Serialize, Deserialize)]
pub struct StatusReply {
    pub schema: u32,
    pub pid: u32,
    pub export_uri: String,
    pub connected_clients: usize,
    /// Bytes per second made present over the last few seconds.
    pub hydration_rate: f64,
    /// Seconds until every chunk is present at that rate.
    pub eta_secs: Option<f64>,
    /// The engine's own snapshot, typed on both ends of the socket.
    pub volume: lazy_fetch::volume::Status,
}

/// Samples of (time, bytes present) for the rate.
#[derive(Default)]
pub struct RateMeter {
    samples: Mutex<Vec<(Instant, u64)>>,
}

impl RateMeter {
    pub fn sample(&self, bytes: u64) -> f64 {
        let now = Instant::now();
        let mut s = self.samples.lock().expect("poisoned");
        s.push((now, bytes));
        s.retain(|(t, _)| now.duration_since(*t) <= Duration::from_secs(10));
        let (t0, b0) = s[0];
        let dt = now.duration_since(t0).as_secs_f64();
        if dt < 0.5 {
            return 0.0;
        }
        (bytes.saturating_sub(b0)) as f64 / dt
    }
}

/// Everything the control server reports on and acts on.
pub struct Context_<S> {
    pub volume: Arc<Volume<S>>,
    pub export_uri: String,
    pub clients: Arc<dyn Fn() -> usize + Send + Sync>,
    pub rate: RateMeter,
    pub hydration: lazy_fetch::hydrate::Options,
    pub shutdown: nbd_server::Shutdown,
    /// Set when `stream finalize` took the volume over (the stop is its).
    pub handed_over: Arc<std::sync::atomic::AtomicBool>,
}

/// Hydration that makes no progress this long cannot finish.
const STALL: Duration = Duration::from_secs(60);

pub fn status_reply<S: Source>(ctx: &Context_<S>) -> StatusReply {
    let st = ctx.volume.status();
    let rate = ctx.rate.sample(st.bytes_present);
    let remaining = st.size.saturating_sub(st.bytes_present);
    StatusReply {
        schema: SCHEMA,
        pid: std::process::id(),
        export_uri: ctx.export_uri.clone(),
        connected_clients: (ctx.clients)(),
        hydration_rate: rate,
        eta_secs: if remaining == 0 {
            Some(0.0)
        } else if rate > 0.0 {
            Some(remaining as f64 / rate)
        } else {
            None
        },
        volume: st,
    }
}

/// Serve the control socket until the task is dropped.
pub async fn serve<S: Source>(listener: UnixListener, ctx: Arc<Context_<S>>) {
    // Keep the rate meter fed even when nobody asks.
    let sampler = ctx.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tick.tick().await;
            sampler.rate.sample(sampler.volume.status().bytes_present);
        }
    });
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let ctx = ctx.clone();
        tokio::spawn(async move {
            if let Err(e) = handle(stream, &ctx).await {
                tracing::debug!("control request failed: {e:#}");
            }
        });
    }
}

async fn handle<S: Source>(stream: UnixStream, ctx: &Context_<S>) -> anyhow::Result<()> {
    let (rd, mut wr) = stream.into_split();
    let mut line = String::new();
    tokio::time::timeout(
        Duration::from_secs(5),
        BufReader::new(rd).read_line(&mut line),
    )
    .await
    .context("no request")??;
    let reply = match serde_json::from_str::<Request>(line.trim()) {
        Ok(Request::Status) => serde_json::to_string(&status_reply(ctx))?,
        Ok(Request::Handover {
            force,
            timeout_secs,
        }) => return handover(ctx, force, timeout_secs.map(Duration::from_secs), &mut wr).await,
        Ok(Request::PrepareDetach { timeout_secs }) => {
            return prepare_detach(ctx, timeout_secs.map(Duration::from_secs), &mut wr).await;
        }
        Err(e) => serde_json::json!({ "schema": SCHEMA, "error": e.to_string() }).to_string(),
    };
    wr.write_all(reply.as_bytes()).await?;
    wr.write_all(b"\n").await?;
    Ok(())
}

async fn send<W: tokio::io::AsyncWrite + Unpin>(wr: &mut W, e: &Event) -> anyhow::Result<()> {
    wr.write_all(serde_json::to_string(e)?.as_bytes()).await?;
    wr.write_all(b"\n").await?;
    Ok(())
}

async fn handover<S: Source, W: tokio::io::AsyncWrite + Unpin>(
    ctx: &Context_<S>,
    force: bool,
    timeout: Option<Duration>,
    wr: &mut W,
) -> anyhow::Result<()> {
    // A finalize killed a moment ago still owns its handover until its next
    // progress event fails (within a second): wait for that, not for a
    // live one.
    let Some(_active) = HandoverActive::take_within(Duration::from_secs(5)).await else {
        let message = "another `stream finalize` is already handing this volume over; \
                       wait for it to end (or stop it) and run finalize again"
            .to_string();
        return send(wr, &Event::Error { message }).await;
    };
    let deadline = timeout.map(|t| Instant::now() + t);
    let expired = || deadline.is_some_and(|d| Instant::now() > d);
    // Full speed while finalize waits; the operator's --rate-limit and
    // --no-hydrate come back on every way out but the stop itself (an
    // error, a timeout, a client still connected, finalize killed or its
    // connection dropped: the next send fails and drops this guard).
    let lifted = LiftedLimits::lift(&ctx.hydration);
    tracing::info!("finalize: hydrating the rest at full speed");
    if !hydrate_fully(ctx, deadline, wr).await? {
        return Ok(());
    }
    // Polled every 50 ms (a count is cheap), told on a change or each
    // second: a client that just left (the guest moved off the export by
    // `stream detach`) is seen at once, not a second later.
    let mut told = (Instant::now(), 0usize);
    loop {
        let connected = (ctx.clients)();
        if connected == 0 || force {
            break;
        }
        if connected != told.1 || told.0.elapsed() >= Duration::from_secs(1) {
            send(wr, &Event::WaitingForClients { connected }).await?;
            told = (Instant::now(), connected);
        }
        if expired() {
            let message = format!(
                "{connected} NBD client(s) still connected to {}: shut the instance down \
                 (or use --force to disconnect them); the migration keeps serving",
                ctx.export_uri
            );
            send(wr, &Event::Error { message }).await?;
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tracing::info!("finalize: stopping to hand the volume over");
    send(
        wr,
        &Event::Stopping {
            pid: std::process::id(),
        },
    )
    .await?;
    // Stopping: what is left of the hydration runs at full speed until the
    // export is down; the limits of this run no longer matter.
    lifted.keep();
    ctx.handed_over
        .store(true, std::sync::atomic::Ordering::Relaxed);
    ctx.shutdown.trigger();
    Ok(())
}

/// Hydrate at whatever speed the caller set until every chunk is present,
/// reporting progress; `false` (after an `error` event naming the failing
/// side) when it cannot finish by `deadline` or stalls.
async fn hydrate_fully<S: Source, W: tokio::io::AsyncWrite + Unpin>(
    ctx: &Context_<S>,
    deadline: Option<Instant>,
    wr: &mut W,
) -> anyhow::Result<bool> {
    let expired = || deadline.is_some_and(|d| Instant::now() > d);
    let mut last = (Instant::now(), 0u64);
    loop {
        let st = ctx.volume.status();
        if st.bytes_present > last.1 {
            last = (Instant::now(), st.bytes_present);
        }
        let rate = ctx.rate.sample(st.bytes_present);
        // The last event shows 100%, so a watcher sees the step end.
        send(
            wr,
            &Event::Hydrating {
                bytes_present: st.bytes_present,
                size: st.size,
                rate,
            },
        )
        .await?;
        if st.hydration_complete {
            break;
        }
        if last.0.elapsed() > STALL || expired() {
            use lazy_fetch::source::Health;
            // Name the side that is failing, and what to do about it.
            let cause = match (&st.target_health, &st.source_health) {
                (Health::Down(d), _) | (Health::Reconnecting(d), _) => format!(
                    "the target {} is failing ({d}). Make room for it (or fix the device), \
                     then run finalize again",
                    st.target
                ),
                (_, Health::Down(d)) | (_, Health::Reconnecting(d)) => format!(
                    "the source {} is unreachable ({d}). Run finalize again once it is reachable",
                    st.source
                ),
                (Health::Up, Health::Up) => format!(
                    "the source {} and the target {} both answer (see the log of `stream start` \
                     for errors). Run finalize again, with a longer --timeout if the link is slow",
                    st.source, st.target
                ),
            };
            let message = format!(
                "hydration cannot finish: {} of {} chunks are still missing ({} bytes) and \
                 {}; {cause}. The migration keeps serving",
                st.chunks_total - st.chunks_present,
                st.chunks_total,
                st.size - st.bytes_present,
                if expired() {
                    "the --timeout expired".to_string()
                } else {
                    format!("nothing arrived for {STALL:?}")
                },
            );
            send(wr, &Event::Error { message }).await?;
            return Ok(false);
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    Ok(true)
}

/// `stream detach`: every chunk present, then the target shared with the
/// guest; the export keeps serving it until its hypervisor switches it.
async fn prepare_detach<S: Source, W: tokio::io::AsyncWrite + Unpin>(
    ctx: &Context_<S>,
    timeout: Option<Duration>,
    wr: &mut W,
) -> anyhow::Result<()> {
    let Some(_active) = HandoverActive::take_within(Duration::from_secs(5)).await else {
        let message = "a `stream finalize` or `stream detach` is already taking this volume \
                       over; wait for it to end (or stop it) and run detach again"
            .to_string();
        return send(wr, &Event::Error { message }).await;
    };
    let deadline = timeout.map(|t| Instant::now() + t);
    // Full speed until complete; the operator's limits come back if this
    // gives up, and stay lifted once every chunk is present.
    let lifted = LiftedLimits::lift(&ctx.hydration);
    tracing::info!("detach: hydrating the rest at full speed");
    if !hydrate_fully(ctx, deadline, wr).await? {
        return Ok(());
    }
    match ctx.volume.prepare_detach().await {
        Ok(()) => {
            // Every chunk is present: the limits have nothing left to limit.
            lifted.keep();
            tracing::info!(
                "detach: every chunk is present and durable; the target is shared with the \
                 guest from now on (nothing here writes it on its own)"
            );
            send(wr, &Event::Prepared).await
        }
        Err(e) => {
            let message = format!("cannot share the target with the guest: {e}");
            send(wr, &Event::Error { message }).await
        }
    }
}

/// The hydration limits of `stream start` (`--rate-limit`, `--no-hydrate`)
/// while a handover lifts them; restored when dropped unless [`kept`].
///
/// [`kept`]: LiftedLimits::keep
struct LiftedLimits<'a> {
    hydration: &'a lazy_fetch::hydrate::Options,
    rate_limit: u64,
    enabled: bool,
    keep: bool,
}

impl<'a> LiftedLimits<'a> {
    fn lift(hydration: &'a lazy_fetch::hydrate::Options) -> LiftedLimits<'a> {
        use std::sync::atomic::Ordering;
        let saved = LiftedLimits {
            hydration,
            rate_limit: hydration.rate_limit.load(Ordering::Relaxed),
            enabled: hydration.enabled.load(Ordering::Relaxed),
            keep: false,
        };
        hydration.rate_limit.store(0, Ordering::Relaxed);
        hydration.enabled.store(true, Ordering::Relaxed);
        saved
    }

    fn keep(mut self) {
        self.keep = true;
    }
}

impl Drop for LiftedLimits<'_> {
    fn drop(&mut self) {
        use std::sync::atomic::Ordering;
        if self.keep {
            return;
        }
        self.hydration
            .rate_limit
            .store(self.rate_limit, Ordering::Relaxed);
        self.hydration
            .enabled
            .store(self.enabled, Ordering::Relaxed);
        tracing::info!(
            "finalize or detach did not complete the handover: hydration back to {} ({})",
            if self.enabled {
                "on"
            } else {
                "off (--no-hydrate)"
            },
            if self.rate_limit == 0 {
                "no rate limit".to_string()
            } else {
                format!("--rate-limit {} bytes/s", self.rate_limit)
            }
        );
    }
}

/// One handover at a time per `stream start`: a second one would save the
/// first one's lifted limits as the ones to restore.
static HANDOVER_ACTIVE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

struct HandoverActive;

impl HandoverActive {
    fn take() -> Option<HandoverActive> {
        HANDOVER_ACTIVE
            .compare_exchange(
                false,
                true,
                std::sync::atomic::Ordering::AcqRel,
                std::sync::atomic::Ordering::Acquire,
            )
            .is_ok()
            .then_some(HandoverActive)
    }

    async fn take_within(wait: Duration) -> Option<HandoverActive> {
        let deadline = Instant::now() + wait;
        loop {
            if let Some(active) = HandoverActive::take() {
                return Some(active);
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for HandoverActive {
    fn drop(&mut self) {
        HANDOVER_ACTIVE.store(false, std::sync::atomic::Ordering::Release);
    }
}

/// A path the kernel takes for a unix socket (`sun_path` holds 108 bytes)
/// naming the same file as `path`: `path` itself when short enough, else
/// `/proc/self/fd/N/NAME` through an open descriptor of its directory, so
/// any `--state` an operator gives works (issue 13). The descriptor (the
/// second value) must live until the bind or connect is done.
fn reachable(path: &Path) -> std::io::Result<(std::path::PathBuf, Option<std::fs::File>)> {
    use std::os::fd::AsRawFd;
    if path.as_os_str().len() <= 100 {
        return Ok((path.to_path_buf(), None));
    }
    let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else {
        return Ok((path.to_path_buf(), None));
    };
    let dir = std::fs::File::open(dir)?;
    let short = Path::new("/proc/self/fd")
        .join(dir.as_raw_fd().to_string())
        .join(name);
    Ok((short, Some(dir)))
}

/// Connect to the unix socket at `path`, however long the path.
pub async fn connect(path: &Path) -> std::io::Result<UnixStream> {
    let (short, _dir) = reachable(path)?;
    UnixStream::connect(&short).await
}

/// Bind the control socket of `state_dir` (a stale one from a crashed run
/// is replaced; the state lock already proved nobody else serves it).
pub fn bind(path: &Path) -> anyhow::Result<UnixListener> {
    let _ = std::fs::remove_file(path);
    let (short, _dir) = reachable(path)
        .with_context(|| format!("cannot open the directory of {}", path.display()))?;
    UnixListener::bind(&short)
        .with_context(|| format!("cannot create control socket {}", path.display()))
}

/// Ask the `stream start` behind `path`.
pub async fn request(path: &Path, req: &Request) -> anyhow::Result<String> {
    let stream = connect(path).await.with_context(|| {
        format!(
            "no running `stream start` answers on {}: start the migration with `stream start` \
             (the same command resumes it), or see the running ones with `stream status`",
            path.display()
        )
    })?;
    let (rd, mut wr) = stream.into_split();
    wr.write_all(serde_json::to_string(req)?.as_bytes()).await?;
    wr.write_all(b"\n").await?;
    let mut line = String::new();
    tokio::time::timeout(
        Duration::from_secs(10),
        BufReader::new(rd).read_line(&mut line),
    )
    .await
    .context("the running `stream start` did not answer within 10 s")??;
    Ok(line)
}
