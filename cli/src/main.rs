//! `stream`: move a legacy server's disk into native storage while the new
//! instance already runs from it.
//!
//! # Layout
//!
//! Argument parsing and wiring only; no engine logic lives here.
//! - `export`: `stream export`, a read-only NBD export of a local disk (runs
//!   on the legacy host), built on `nbd_server`.
//! - `start`: `stream start`, a `lazy_fetch::Volume` served by the NBD server,
//!   hydrated in the background, with a control socket (`control`).
//! - `status`: `stream status`, asks that control socket.
//! - `mount`: `--mount DIR` of `stream start`, the FUSE file `DIR/disk.raw`.
//! - `finalize`: `stream finalize` and `stream verify`, the end of a migration.
//! - `demo`: `stream demo`, the whole job on a generated disk.
//! - `tls_args`: the TLS flags of the NBD listeners, and the refusal to serve
//!   plaintext to other hosts.
//! - `output`: logs, progress bars and colour on stderr (`--log-format`,
//!   `--quiet`, `NO_COLOR`).
//! - `rundir`: the run directory where every `stream start` registers, so
//!   `stream status` lists them all.
//! - `metrics`: `stream start --metrics`, a Prometheus endpoint.
//! - `notify`: systemd's readiness notification (`Type=notify`).

mod cinder;
mod control;
mod demo;
mod detach;
mod export;
mod finalize;
mod limits;
mod locate;
mod metrics;
mod mount;
mod notify;
mod output;
mod qmp;
mod rundir;
mod seed;
mod source;
mod start;
mod status;
mod tls_args;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Buffers of 64 KiB and more are page-aligned mappings, freed ones kept for
/// reuse, so hydration writes the source's reply buffers to the target
/// around the page cache without copying them (`lazy_fetch::target::alloc`).
#[global_allocator]
static ALLOC: lazy_fetch::target::alloc::BlockAligned = lazy_fetch::target::alloc::BlockAligned;

#[derive(Parser)]
#[command(
    name = "stream",
    version,
    about = "Live streaming migration of legacy disks into OpenStack",
    long_about = "Live streaming migration of legacy disks into OpenStack.\n\n\
        The new instance boots at once from an NBD export whose blocks are fetched \
        lazily from the legacy disk, while the rest is copied in the background; \
        `stream detach` then moves the running guest onto native storage (or, with \
        the guest stopped, `stream finalize` hands the volume over).",
    after_long_help = "A cutover, in short (docs/cutover.md has the whole runbook):\n\
        \n  legacy host:  stream export /dev/sda --listen 10.0.0.5:10809 --tls-psk /etc/stream/keys.psk\n\
        \n  cloud host:   stream start --source 'nbds://10.0.0.5:10809/?tls-psk-file=/etc/stream/keys.psk' \\\n\
        \x20                   --target /dev/vg/mig-db01\n\
        \x20               (boot the instance from the NBD URI it prints)\n\
        \n                stream status --target /dev/vg/mig-db01 --watch\n\
        \n                stream verify --target /dev/vg/mig-db01\n\
        \n                stream detach --target /dev/vg/mig-db01 --libvirt db01-interim --device vda\n\
        \x20               (the guest goes on, now from native storage; with the guest\n\
        \x20                stopped instead: stream finalize --target /dev/vg/mig-db01)\n\
        \nThe legacy disk is only ever read, so rolling back is powering the legacy server on."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Log format on stderr; filter with RUST_LOG (e.g. RUST_LOG=debug,
    /// RUST_LOG=lazy_fetch=debug,info).
    #[arg(
        long,
        global = true,
        value_enum,
        default_value = "text",
        value_name = "FORMAT"
    )]
    log_format: output::LogFormat,
    /// No progress bars or progress lines on stderr (logs still obey RUST_LOG).
    #[arg(long, short, global = true)]
    quiet: bool,
    /// Where every `stream start` registers itself, so `stream status` lists
    /// them all [default: /run/stream as root, else $XDG_RUNTIME_DIR/stream].
    #[arg(long, global = true, env = "STREAM_RUN_DIR", value_name = "DIR")]
    run_dir: Option<std::path::PathBuf>,
}

#[derive(Subcommand)]
enum Command {
    /// Serve a local disk (file or block device) over NBD, read-only by default.
    ///
    /// Run it on the legacy host. When it is ready it prints the NBD URI of the
    /// export on stdout (one line); logs go to stderr (filter with RUST_LOG).
    /// Started with systemd socket activation (LISTEN_FDS), as
    /// `nbdinfo -- [ stream export DISK ]` does, it serves the inherited
    /// socket and prints nothing. SIGINT/SIGTERM stop it after in-flight
    /// requests are answered.
    Export(export::ExportArgs),
    /// Create or resume a migration: serve the volume over NBD at once and
    /// copy the source into the target in the background.
    ///
    /// Every chunk a client touches first is fetched from the source, written
    /// to the target and served; every other chunk is hydrated in the
    /// background. Running the same command again resumes where it stopped.
    /// Prints the NBD URI of the export on stdout when ready.
    Start(start::StartArgs),
    /// Show the progress of a running migration, or list every migration.
    ///
    /// With --state or --target: that migration's progress, rates, ETA, fetch
    /// latency and source health. With neither: one line per `stream start`
    /// registered in the run directory (--run-dir), including those that
    /// stopped without cleaning up ("not running").
    Status(status::StatusArgs),
    /// Finish a migration: hydrate the rest, write the manifest, optionally
    /// verify, and hand the target over as native storage.
    ///
    /// Talks to the running `stream start` of the state directory (it hands
    /// the volume over once hydrated and once its clients are gone), or does
    /// the work itself when none runs. Re-runnable: an interrupted finalize
    /// resumes where it stopped. Prints the native path to boot from.
    Finalize(finalize::FinalizeArgs),
    /// Re-read source and target and compare every chunk no client wrote,
    /// and check the chunks clients wrote against the manifest.
    Verify(finalize::VerifyArgs),
    /// Copy the legacy disk into the target while the legacy server still
    /// runs, in passes; the cutover (`stream start`) then fetches only what
    /// changed since.
    ///
    /// Each pass compares the copy with the source (32 bytes per chunk over
    /// the link with `stream export`), copies again what changed and reports
    /// how much that was, and the estimate of the cutover's transfer. Run it
    /// again until that is small; then stop the legacy server and run
    /// `stream start` on the same target and state: it serves at once.
    Seed(seed::SeedArgs),
    /// Move a running QEMU guest from the export onto the target, live, and
    /// finalize: the guest keeps running, now from native storage.
    ///
    /// For a guest that QEMU runs from this migration's NBD export (a raw
    /// node over an nbd node, as docs/cutover.md starts it) with a QMP
    /// socket. The running `stream start` hydrates the rest at full speed
    /// and shares the target; QEMU then reopens the guest's disk onto the
    /// target (`blockdev-reopen`: a drain of the guest's in-flight I/O, no
    /// copy) and drops the export; the migration is finalized. Re-runnable
    /// after a crash at any step. Run `stream verify` before it: once the
    /// guest writes the target directly, a comparison reports its writes.
    Detach(detach::DetachArgs),
    /// Run the whole job on a small generated disk on this machine: export,
    /// stream, read and write at once, hydrate, check the copy.
    Demo(demo::DemoArgs),
    /// Print a shell completion script on stdout.
    ///
    /// Install it where the shell looks:
    ///
    /// bash:  stream completions bash > /etc/bash_completion.d/stream
    /// zsh:   stream completions zsh > "${fpath[1]}/_stream"
    /// fish:  stream completions fish > ~/.config/fish/completions/stream.fish
    #[command(verbatim_doc_comment)]
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Command::Completions { shell } = cli.command {
        use clap::CommandFactory;
        let mut script = Vec::new();
        clap_complete::generate(shell, &mut Cli::command(), "stream", &mut script);
        output::stdout(format_args!("{}", String::from_utf8_lossy(&script)));
        return ExitCode::SUCCESS;
    }
    rundir::set(cli.run_dir.clone());
    // Taken before any thread exists: it edits the environment.
    // SAFETY: single-threaded here, and called once.
    let activation = unsafe { nbd_server::server::take_activation_fd() };
    let log_format = cli.log_format;
    output::init(cli.quiet, log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("stream: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        match cli.command {
            Command::Export(args) => export::run(args, activation).await,
            Command::Start(args) => start::run(args).await,
            Command::Status(args) => status::run(args).await,
            Command::Demo(args) => demo::run(args).await,
            Command::Finalize(args) => finalize::run(args).await,
            Command::Verify(args) => finalize::verify(args).await,
            Command::Detach(args) => detach::run(args).await,
            Command::Seed(args) => seed::run(args).await,
            Command::Completions { .. } => unreachable!("answered before the runtime starts"),
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if log_format == output::LogFormat::Json => {
            tracing::error!(error = %format!("{e:#}"), "stream failed");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("stream: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// How long `stream export` waits after a signal for in-flight requests.
pub(crate) const DEFAULT_STOP_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// Trigger `shutdown` on SIGINT or SIGTERM. A second signal exits at once;
/// so does `stop_timeout` after the first, with what `stuck` names (the
/// requests still in flight) logged: a stuck request must not keep the
/// process from stopping.
pub(crate) fn shutdown_on_signals(
    shutdown: nbd_server::Shutdown,
    stop_timeout: std::time::Duration,
    stuck: impl Fn() -> Vec<String> + Send + 'static,
) -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut int = signal(SignalKind::interrupt())?;
    let mut term = signal(SignalKind::terminate())?;
    tokio::spawn(async move {
        tokio::select! {
            _ = int.recv() => {}
            _ = term.recv() => {}
        }
        tracing::info!("signal received: finishing in-flight requests (signal again to quit now)");
        shutdown.trigger();
        tokio::select! {
            _ = int.recv() => {}
            _ = term.recv() => {}
            _ = tokio::time::sleep(stop_timeout) => {
                for r in stuck() {
                    tracing::error!("still in flight: {r}");
                }
                tracing::error!(
                    "did not stop within {stop_timeout:?} of the signal: exiting without a clean \
                     stop (flushed writes are safe; the next start recovers the rest)"
                );
                std::process::exit(1);
            }
        }
        std::process::exit(130);
    });
    Ok(())
}
