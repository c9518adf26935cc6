//! `stream start`: create or resume a migration, serve it, hydrate it.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use lazy_fetch::frontend::VolumeDevice;
use lazy_fetch::source::Source;
use lazy_fetch::source::file::FileSource;
use lazy_fetch::state::{self, StateDir};
use lazy_fetch::target::identity;
use lazy_fetch::units::parse_size;
use lazy_fetch::{OpenOptions, Volume, hydrate};
use nbd_server::{Export, Listener, Server, Shutdown};
use nbd_source::{NbdOptions, NbdSource};
use ssh_source::{SshOptions, SshSource};

use crate::source::AnySource;

use crate::control;

#[derive(clap::Args)]
pub struct StartArgs {
    /// The legacy disk: an NBD URI (nbd://HOST[:PORT]/EXPORT,
    /// nbd+unix:///EXPORT?socket=PATH; with TLS nbds://HOST/EXPORT?tls-psk-file=FILE
    /// or ?tls-certificates=DIR), a disk on a legacy host read through its
    /// own sshd with nothing installed there
    /// (ssh://[USER@]HOST[:PORT]/PATH[?identity=KEY&known-hosts=FILE]; keys
    /// from the agent, ~/.ssh and ~/.ssh/config as for `ssh`), or a local
    /// file or block device.
    #[arg(long, value_name = "URI|PATH")]
    source: String,
    /// Native storage to fill: a file (created sparse with the source's size
    /// when missing) or a block device at least as large as the source.
    #[arg(long, value_name = "PATH")]
    target: PathBuf,
    /// State directory of this migration [default: beside a target file as
    /// .NAME.stream, or /var/lib/stream/... for a block device].
    #[arg(long, value_name = "DIR")]
    state: Option<PathBuf>,
    /// Chunk size, the unit of fetching and of the presence map (power of
    /// two, 4K to 16M) [default: 64K; a resumed migration keeps its own].
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    chunk_size: Option<u64>,
    /// TCP address of the NBD export; port 0 picks a free port.
    #[arg(
        long,
        value_name = "ADDR",
        default_value = "127.0.0.1:10809",
        conflicts_with = "socket"
    )]
    listen: String,
    /// Serve the NBD export on this unix socket instead of TCP.
    #[arg(long, value_name = "PATH")]
    socket: Option<PathBuf>,
    /// Export name clients select (the empty name selects it too).
    #[arg(long, default_value = "")]
    name: String,
    /// Limit background hydration to this many bytes per second (e.g. 50M);
    /// fetches for clients are never limited.
    #[arg(long, value_name = "BYTES/s", value_parser = parse_size)]
    rate_limit: Option<u64>,
    /// For a migration seeded with `stream seed` whose source serves no
    /// chunk hashes (nbdkit, qemu-nbd, an older `stream export`): fetch
    /// every chunk again at the cutover instead of refusing (the seeded copy
    /// cannot be checked against the source without reading all of it).
    #[arg(long)]
    refetch_all: bool,
    /// Serve only: fetch chunks when clients touch them, hydrate nothing else.
    #[arg(long)]
    no_hydrate: bool,
    /// When a fetch from the source takes this long (a far link), a read
    /// that misses also fetches the absent chunks around it, in the
    /// background: up to 4 MiB, no more than the link carries in one round
    /// trip, more while clients read what it brings and less while they do
    /// not. `0` prefetches on every miss, `off` never [e.g. 5ms, 0, off].
    #[arg(long, value_name = "TIME", default_value = "2ms", value_parser = parse_prefetch_rtt)]
    prefetch_rtt: PrefetchRtt,
    #[command(flatten)]
    mount: crate::mount::MountArgs,
    #[command(flatten)]
    tls: crate::tls_args::TlsArgs,
    #[command(flatten)]
    limits: crate::limits::LimitArgs,
    /// Name of this migration in the run directory, for `stream status`
    /// and the metrics' `migration` label [default: the target's file name;
    /// /dev/vg/lv gives vg-lv].
    #[arg(long, value_name = "ID", value_parser = crate::rundir::parse_id)]
    id: Option<String>,
    /// Serve Prometheus metrics over HTTP on this PORT (on 127.0.0.1) or
    /// IP:PORT.
    #[arg(long, value_name = "ADDR", value_parser = crate::metrics::parse_addr)]
    metrics: Option<std::net::SocketAddr>,
    /// When ready, print one JSON object (schema in docs/json-schema.md)
    /// instead of the bare URI, and no progress bar.
    #[arg(long)]
    json: bool,
    /// Warn (once per request, with what it waits for) about a client
    /// request unanswered this long.
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = crate::finalize::parse_duration)]
    warn_after: Duration,
    /// After SIGINT/SIGTERM, wait this long for in-flight requests and the
    /// final save, then exit anyway (status 1, listing what was stuck;
    /// flushed writes are safe and the next start recovers). A second
    /// signal exits at once.
    #[arg(long, value_name = "DURATION", default_value = "60s", value_parser = crate::finalize::parse_duration)]
    stop_timeout: Duration,
    /// An NBD source request unanswered this long marks its connection
    /// dead and is sent again on a new one. Raise it for slow or lossy
    /// links, where a large read may take longer; lower it to give up on a
    /// hung server sooner.
    #[arg(long, value_name = "DURATION", default_value = "20s", value_parser = crate::finalize::parse_duration)]
    source_stall_timeout: Duration,
    /// An ssh:// source whose host key is not in known_hosts: record it on
    /// first use (ssh's StrictHostKeyChecking=accept-new) instead of
    /// refusing. Check the fingerprint the refusal prints first. A changed
    /// key is refused whatever this says.
    #[arg(long)]
    accept_new_host_key: bool,
    /// Start a new migration even though the target is not new: it holds
    /// non-zero data, or the marker of a migration whose state directory
    /// is not the one given. Its content is overwritten with the source's.
    /// A finalized target is refused even so.
    #[arg(long)]
    overwrite_target: bool,
}

pub async fn run(args: StartArgs) -> anyhow::Result<()> {
    let t0 = Instant::now();
    let state_dir = args
        .state
        .clone()
        .unwrap_or_else(|| state::default_dir(&args.target));
    let id = args
        .id
        .clone()
        .unwrap_or_else(|| crate::rundir::default_id(&args.target));
    let recorded = StateDir::exists(&state_dir)
        .then(|| StateDir::read_header(&state_dir).ok())
        .flatten();
    let expected = recorded.as_ref().map(|h| h.source.size);
    // A seeded migration before its cutover: the source has changed since
    // the copy (the legacy server ran); the delta below finds what.
    let cutover = recorded
        .as_ref()
        .and_then(|h| h.seed.as_ref())
        .is_some_and(|s| s.cutover_pending);
    if let Some(chosen) = &args.id {
        // A taken --id fails before the volume is opened.
        crate::rundir::preflight(&crate::rundir::dir(), chosen).await?;
    }
    if let Some(dir) = &args.mount.mount {
        // A bad mount point fails before any state is created.
        crate::mount::preflight(dir)?;
    }
    let tls = args.tls.server_tls()?;
    if args.socket.is_none() && !args.mount.mount_only {
        args.tls.check_listen(&args.listen)?;
    }
    let source = open_source(
        &args.source,
        expected,
        args.source_stall_timeout,
        args.accept_new_host_key,
    )
    .await?;
    if !StateDir::exists(&state_dir) {
        // A new migration: refuse before anything is created or written.
        StateDir::check_creatable(&state_dir)
            .with_context(|| format!("cannot start the migration in {}", state_dir.display()))?;
        if !args.source.contains("://") {
            identity::check_distinct(Path::new(&args.source), &args.target)?;
        }
        check_target_is_new(&args.target, &state_dir, args.overwrite_target)?;
    }
    let volume = Volume::open(
        source,
        &OpenOptions {
            target: args.target.clone(),
            state_dir: state_dir.clone(),
            chunk_size: args.chunk_size,
            allow_finalized: false,
            serving: true,
            target_device: None,
            source_may_differ: cutover,
        },
    )
    .await
    .with_context(|| format!("cannot start the migration in {}", state_dir.display()))?;
    if cutover {
        cutover_from_seed(&volume, args.refetch_all).await?;
    }

    volume.serve_again()?;
    volume.set_prefetch_min_rtt(args.prefetch_rtt.0);

    let listener = match (&args.socket, args.mount.mount_only) {
        (_, true) => None,
        (Some(path), false) => Some(Listener::bind_unix(path).with_context(|| {
            format!(
                "the NBD export of {}: choose another --socket",
                args.target.display()
            )
        })?),
        (None, false) => Some(Listener::bind_tcp(&args.listen).await.with_context(|| {
            format!(
                "the NBD export of {}: give each migration its own --listen port",
                args.target.display()
            )
        })?),
    };
    let file = args
        .mount
        .mount
        .as_ref()
        .map(|d| d.join(fuse_frontend::FILE_NAME));
    // What clients use: the NBD URI, or with --mount-only the file.
    let uri = match (&listener, &file) {
        (Some(l), _) => crate::tls_args::client_uri(l.uri(&args.name)?, tls.as_ref()),
        (None, Some(f)) => f.display().to_string(),
        (None, None) => unreachable!("--mount-only requires --mount"),
    };
    let server = Server::with_limits(
        vec![Export {
            name: args.name.clone(),
            description: Some(format!("stream of {}", volume.header().source.location)),
            device: VolumeDevice(volume.clone()),
        }],
        tls,
        args.limits.limits(),
    );
    let shutdown = Shutdown::new();
    let requests = volume.requests().clone();
    let stuck = {
        let r = requests.clone();
        move || r.snapshot().iter().map(|o| o.to_string()).collect()
    };
    crate::shutdown_on_signals(shutdown.clone(), args.stop_timeout, stuck)?;
    let watchdog = tokio::spawn(lazy_fetch::watchdog::run(requests, args.warn_after));
    let outages = tokio::spawn(lazy_fetch::health::log_source_outages(volume.clone()));

    let hydration = hydrate::Options::limited(args.rate_limit);
    hydration
        .enabled
        .store(!args.no_hydrate, std::sync::atomic::Ordering::Relaxed);
    let control_listener = control::bind(&state::control_socket(&state_dir))?;
    let counted = server.clone();
    let ctx = Arc::new(control::Context_ {
        volume: volume.clone(),
        export_uri: uri.clone(),
        clients: Arc::new(move || counted.connected_clients()),
        rate: control::RateMeter::default(),
        hydration: hydration.clone(),
        shutdown: shutdown.clone(),
        handed_over: Arc::new(std::sync::atomic::AtomicBool::new(false)),
    });
    let metrics = match args.metrics {
        Some(addr) => {
            let l = crate::metrics::bind(addr).await?;
            let bound = l.local_addr()?;
            Some((l, bound))
        }
        None => None,
    };
    let control_task = tokio::spawn(control::serve(control_listener, ctx.clone()));
    let persister = tokio::spawn(volume.clone().upkeep());
    let hydrator = {
        let stop = shutdown.clone();
        tokio::spawn(hydrate::run(volume.clone(), hydration, async move {
            stop.wait().await
        }))
    };
    // After a seeded cutover: compare the source's chunk hashes with the
    // copy, beside the clients, so fetches need no round trip for them.
    if volume.candidates_left() > 0 {
        let (v, stop) = (volume.clone(), shutdown.clone());
        tokio::spawn(async move {
            let t0 = Instant::now();
            tokio::select! {
                _ = stop.wait() => {}
                r = v.sweep_candidates() => match r {
                    Ok(()) => tracing::info!(
                        "the source's chunk hashes compared with the seeded copy in {:.2} s",
                        t0.elapsed().as_secs_f64()
                    ),
                    Err(e) => tracing::warn!(
                        "comparing the source's chunk hashes stopped ({e}); each chunk is \
                         compared as it is fetched instead"
                    ),
                },
            }
        });
    }

    let fuse = crate::mount::mount(VolumeDevice(volume.clone()), &args.mount).await?;
    if let (Some(f), Some(_)) = (&file, &listener) {
        tracing::info!("also serving the volume as the file {}", f.display());
    }
    let st = volume.status();
    tracing::info!(
        "serving {} at {uri} ({} of {} chunks present, state {}), ready in {:?}",
        args.target.display(),
        st.chunks_present,
        st.chunks_total,
        state_dir.display(),
        t0.elapsed()
    );
    let metrics_addr = metrics.as_ref().map(|(_, a)| a.to_string());
    if let Some(a) = &metrics_addr {
        tracing::info!("metrics at http://{a}/metrics");
    }
    let run_dir = crate::rundir::dir();
    // Absolute, so `stream status` finds it from any directory.
    let state_abs = std::fs::canonicalize(&state_dir).unwrap_or_else(|_| state_dir.clone());
    let mut entry = crate::rundir::Entry {
        schema: crate::rundir::SCHEMA,
        id: id.clone(),
        pid: std::process::id(),
        state_dir: state_abs.clone(),
        control_socket: state::control_socket(&state_abs),
        source: st.source.clone(),
        target: st.target.clone(),
        export_uri: uri.clone(),
        metrics: metrics_addr.clone(),
        started_at: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
    };
    let _registration = crate::rundir::register(&run_dir, &mut entry, args.id.is_some()).await?;
    let id = entry.id;
    let metrics =
        metrics.map(|(l, _)| tokio::spawn(crate::metrics::serve(l, ctx.clone(), id.clone())));
    {
        let mut out = std::io::stdout().lock();
        if args.json {
            let ready = serde_json::json!({
                "schema": control::SCHEMA,
                "event": "ready",
                "id": id,
                "pid": std::process::id(),
                "export_uri": uri,
                "state_dir": state_abs,
                "run_dir": run_dir,
                "metrics": metrics_addr,
                "source": st.source,
                "target": st.target,
                "size": st.size,
            });
            writeln!(out, "{ready}")?;
        } else {
            writeln!(out, "{uri}")?;
        }
        out.flush()?;
    }
    crate::notify::notify(&format!("READY=1\nSTATUS=serving {uri}"));
    let bar = (!args.json).then(|| progress_bar(ctx.clone()));

    match listener {
        Some(l) => server.serve(l, shutdown.clone()).await?,
        None => shutdown.wait().await,
    }
    crate::notify::notify("STOPPING=1\nSTATUS=saving the state");
    if let Some(bar) = bar {
        bar.abort();
    }
    if let Some(task) = metrics {
        task.abort();
    }
    watchdog.abort();
    outages.abort();
    // No FUSE request may reach a closed volume.
    if let Some(fuse) = fuse {
        fuse.unmount().await?;
    }
    let _ = hydrator.await;
    persister.abort();
    control_task.abort();
    let _ = std::fs::remove_file(state::control_socket(&state_dir));
    volume
        .close()
        .await
        .with_context(|| format!("final save of the state in {}", state_dir.display()))?;
    let st = volume.status();
    if ctx.handed_over.load(std::sync::atomic::Ordering::Relaxed) {
        tracing::info!(
            "stopped: the volume is handed over to `stream finalize`, which finishes the \
             migration; do not start it again unless that finalize fails \
             (`stream status --state {}` shows where it is)",
            state_dir.display()
        );
    } else {
        tracing::info!(
            "stopped cleanly: {} of {} chunks present; run the same command to resume",
            st.chunks_present,
            st.chunks_total
        );
    }
    Ok(())
}

/// On a terminal: one bar of bytes present, with the hydration rate and
/// ETA and the clients connected, until the task is aborted.
fn progress_bar(ctx: Arc<control::Context_<AnySource>>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        if !crate::output::bars_enabled() {
            return;
        }
        let size = ctx.volume.status().size;
        let bar = crate::output::byte_bar_with_msg(size, "present");
        loop {
            let r = control::status_reply(&ctx);
            bar.set_position(r.volume.bytes_present);
            bar.set_message(crate::status::rate_eta(&r));
            if r.volume.hydration_complete {
                bar.set_message(format!("hydrated; {} client(s)", r.connected_clients));
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    })
}

/// A new migration overwrites its whole target, so it starts only on a
/// target that is new: missing, or all zeros without another migration's
/// marker (see `lazy_fetch::target::identity` for how both are checked),
/// unless `overwrite` says its content may go. A finalized target is
/// native storage and is refused even then.
fn check_target_is_new(target: &Path, state_dir: &Path, overwrite: bool) -> anyhow::Result<()> {
    match std::fs::metadata(target) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => anyhow::bail!("cannot open the target {}: {e}", target.display()),
        Ok(_) => {}
    }
    let marker = identity::read_marker(target)
        .with_context(|| format!("cannot read the marker of the target {}", target.display()))?;
    if let Some((m, place)) = &marker
        && m.is_finalized()
    {
        let remove = match place {
            identity::MarkerPlace::Xattr => {
                format!("setfattr -x {} {}", identity::XATTR, target.display())
            }
            identity::MarkerPlace::Registry(p) => format!("rm {}", p.display()),
        };
        anyhow::bail!(
            "the target {} was finalized by the migration whose state is {} (source {}; found \
             its {place}): it is native storage now, and `stream start` does not write it \
             again, not even with --overwrite-target. If it really is to be reused, remove \
             the marker first: {remove}",
            target.display(),
            m.state_dir,
            m.source
        );
    }
    let content = if overwrite {
        None
    } else {
        let (at, sampled) = identity::first_nonzero(target)
            .with_context(|| format!("cannot read the target {}", target.display()))?;
        at.map(|at| (at, sampled))
    };
    if overwrite {
        if let Some((m, place)) = &marker {
            tracing::warn!(
                "--overwrite-target: overwriting {}, the target of the migration whose state \
                 is {} ({place})",
                target.display(),
                m.state_dir
            );
        }
        return Ok(());
    }
    if let Some((m, place)) = &marker {
        anyhow::bail!(
            "the target {} belongs to a migration whose state is {} (source {}; found its \
             {place}), not to the state given, {}, which holds no migration. To resume that \
             migration, give --state {}. If its state is lost, the target holds that \
             migration's data and clients' writes, and a new migration overwrites them all: \
             add --overwrite-target only if they may be lost",
            target.display(),
            m.state_dir,
            m.source,
            state_dir.display(),
            m.state_dir
        );
    }
    if let Some((at, sampled)) = content {
        anyhow::bail!(
            "the target {} is not new: it holds non-zero data (at byte {at}{}), and no \
             migration state was found for it in {}. A new migration overwrites the whole \
             target with the source. If it is the target of a migration whose state \
             directory is elsewhere, give that --state; add --overwrite-target only if its \
             content may be lost",
            target.display(),
            if sampled {
                ", found by sampling the device"
            } else {
                ""
            },
            state_dir.display()
        );
    }
    Ok(())
}

/// The cutover of a seeded migration (`stream seed`): the legacy server has
/// stopped; every chunk whose copy differs from the source now is
/// forgotten (fetched again on demand, then by hydration), and the copy is
/// trusted from here on. Before anything is served.
async fn cutover_from_seed(
    volume: &Arc<Volume<AnySource>>,
    refetch_all: bool,
) -> anyhow::Result<()> {
    let t0 = Instant::now();
    let g = volume.geometry();
    // A source that serves its chunk hashes: nothing is compared now. Every
    // copied chunk becomes a candidate, compared with the source's hash
    // when it is first needed (on demand, then by hydration).
    if volume.source().chunk_hashes(g.chunk_size()).await.is_some() {
        let made = volume.make_candidates().await?;
        end_cutover(volume)?;
        tracing::info!(
            "cutover from the seed in {:.2} s: {made} copied chunks are compared with the \
             source's hashes as they are needed (only changed ones are fetched)",
            t0.elapsed().as_secs_f64()
        );
        return Ok(());
    }
    let changed = match volume.changed_chunks(&|_, _| {}).await? {
        Some(list) => list,
        None if refetch_all => {
            tracing::warn!(
                "the source serves no chunk hashes: every chunk is fetched again (--refetch-all)"
            );
            (0..g.chunks()).collect()
        }
        None => anyhow::bail!(
            "the source {} serves no chunk hashes (nbdkit, qemu-nbd or an older stream \
             export), so the seeded copy cannot be checked against it without reading the \
             whole disk over the link. Serve the legacy disk with `stream export` (it computes \
             the hashes where the disk is), or add --refetch-all to fetch every chunk again; \
             nothing was changed",
            volume.header().source.location
        ),
    };
    let forgotten = volume.forget_changed(&changed).await?;
    end_cutover(volume)?;
    tracing::info!(
        "cutover from the seed: {forgotten} of {} chunks changed since it was copied ({} bytes \
         to fetch), found in {:.2} s; the rest is served from the target",
        g.chunks(),
        forgotten.saturating_mul(g.chunk_size()).min(g.size()),
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}

/// The copy is trusted from here on (as far as the cutover left it).
fn end_cutover(volume: &Arc<Volume<AnySource>>) -> anyhow::Result<()> {
    volume.update_header(|h| {
        if let Some(s) = h.seed.as_mut() {
            s.cutover_pending = false;
        }
    })?;
    Ok(())
}

/// The source named on the command line (or recorded in a state header):
/// an NBD URI, an `ssh://` URI or a local path. `expected_size` is the size
/// a resumed migration recorded; an NBD or SSH source is then connected
/// when first needed. `accept_new_host_key`: an SSH source records an
/// unknown host's key on first use instead of refusing.
pub async fn open_source(
    spec: &str,
    expected_size: Option<u64>,
    stall_timeout: Duration,
    accept_new_host_key: bool,
) -> anyhow::Result<AnySource> {
    if ssh_source::is_ssh(spec) {
        let opts = SshOptions {
            stall_timeout,
            accept_new_host_key,
            ..SshOptions::default()
        };
        let source = match expected_size {
            Some(size) => SshSource::lazy(spec, size, opts)?,
            None => SshSource::connect(spec, opts).await.context(
                "a new migration needs its source once, to learn its size; nothing was created",
            )?,
        };
        return Ok(AnySource::Ssh(Box::new(source)));
    }
    if spec.contains("://") {
        let opts = NbdOptions {
            stall_timeout,
            ..NbdOptions::default()
        };
        let source = match expected_size {
            Some(size) => NbdSource::lazy(spec, size, opts)?,
            None => NbdSource::connect(spec, opts).await.context(
                "a new migration needs its source once, to learn its size: check that \
                 `stream export` (or the NBD server) runs on the legacy host and that this \
                 host reaches it, then run the same command again",
            )?,
        };
        return Ok(AnySource::Nbd(source));
    }
    let path = PathBuf::from(spec);
    Ok(AnySource::File(FileSource::open(&path).with_context(
        || format!("cannot open the source {}", path.display()),
    )?))
}

/// `--prefetch-rtt`: from which source round trip reads prefetch around a
/// miss (`None`: never).
#[derive(Clone, Copy, Debug)]
struct PrefetchRtt(Option<Duration>);

/// `2ms`, `0`, `1s`, `off`.
fn parse_prefetch_rtt(s: &str) -> Result<PrefetchRtt, String> {
    let s = s.trim();
    if s == "off" {
        return Ok(PrefetchRtt(None));
    }
    let bad = || format!("cannot parse {s:?} as a round trip (use e.g. 2ms, 1s, 0 or off)");
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = num.parse().map_err(|_| bad())?;
    let d = match unit {
        "ms" => Duration::from_millis(n),
        "s" => Duration::from_secs(n),
        "" if n == 0 => Duration::ZERO,
        _ => return Err(bad()),
    };
    Ok(PrefetchRtt(Some(d)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefetch_rtt_takes_milliseconds_seconds_zero_and_off() {
        let ms = |s| parse_prefetch_rtt(s).map(|p| p.0);
        assert_eq!(ms("2ms"), Ok(Some(Duration::from_millis(2))));
        assert_eq!(ms("1s"), Ok(Some(Duration::from_secs(1))));
        assert_eq!(ms("0"), Ok(Some(Duration::ZERO)));
        assert_eq!(ms("off"), Ok(None));
        for bad in ["2", "5m", "ms", "-1ms", ""] {
            assert!(ms(bad).is_err(), "{bad:?} was taken");
        }
    }
}
