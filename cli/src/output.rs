//! How `stream` talks to its user: logs, progress bars, colour.
//!
//! - stdout carries results only (a URI, a report, JSON documents), so a
//!   script can read it whatever else happens.
//! - stderr carries logs (tracing, `RUST_LOG` filters, `--log-format
//!   text|json`) and progress bars. Bars are drawn only when stderr is a
//!   terminal and neither `--quiet` nor `--json` is given; colour only on a
//!   terminal without `NO_COLOR`. Log lines are printed above the bars
//!   (through [`LogWriter`]) so neither garbles the other.

use std::io::{IsTerminal, Write};
use std::sync::OnceLock;

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// One human-readable line per event.
    Text,
    /// One JSON object per event (tracing-subscriber's JSON format).
    Json,
}

struct Settings {
    quiet: bool,
    stderr_tty: bool,
    no_color: bool,
    bars: MultiProgress,
}

static SETTINGS: OnceLock<Settings> = OnceLock::new();

fn settings() -> &'static Settings {
    SETTINGS.get_or_init(|| Settings::detect(false))
}

impl Settings {
    fn detect(quiet: bool) -> Settings {
        let stderr_tty = std::io::stderr().is_terminal();
        let no_color = std::env::var_os("NO_COLOR").is_some_and(|v| !v.is_empty());
        let bars = MultiProgress::with_draw_target(if stderr_tty && !quiet {
            ProgressDrawTarget::stderr()
        } else {
            ProgressDrawTarget::hidden()
        });
        Settings {
            quiet,
            stderr_tty,
            no_color,
            bars,
        }
    }
}

/// Decide once, before anything prints; also installs the logger.
pub fn init(quiet: bool, format: LogFormat) {
    let s = SETTINGS.get_or_init(|| Settings::detect(quiet));
    init_logging(format, s.stderr_tty && !s.no_color);
}

fn init_logging(format: LogFormat, ansi: bool) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(|| LogWriter)
        // A log line that cannot be written is dropped. By default
        // tracing-subscriber reports it with `eprintln!`, which panics
        // when stderr is what failed (its reader gone): the task that
        // logged died, the signal handler with it, or the whole export at
        // its first line.
        .log_internal_errors(false)
        .with_target(false);
    match format {
        LogFormat::Text => builder.with_ansi(ansi).init(),
        LogFormat::Json => builder
            .json()
            .with_current_span(false)
            .with_ansi(false)
            .init(),
    }
}

/// Whether progress bars are drawn (a terminal on stderr, no `--quiet`);
/// callers also leave them out under `--json`.
pub fn bars_enabled() -> bool {
    let s = settings();
    s.stderr_tty && !s.quiet
}

/// `--quiet`: no progress lines either.
pub fn quiet() -> bool {
    settings().quiet
}

/// A byte-progress bar with rate and ETA, or a hidden one.
pub fn byte_bar(total: u64, prefix: &str) -> ProgressBar {
    bar(
        total,
        prefix,
        "{prefix:>10} [{elapsed_precise}] {bar:30.cyan/blue} {bytes}/{total_bytes} {bytes_per_sec} ETA {eta} {msg}",
    )
}

/// A bar whose rate and ETA the caller writes into the message (when they
/// come from elsewhere, e.g. a running `stream start`).
pub fn byte_bar_with_msg(total: u64, prefix: &str) -> ProgressBar {
    bar(
        total,
        prefix,
        "{prefix:>10} {bar:30.cyan/blue} {bytes}/{total_bytes} {msg}",
    )
}

/// A bar counting chunks.
pub fn chunk_bar(total: u64, prefix: &str) -> ProgressBar {
    bar(
        total,
        prefix,
        "{prefix:>10} [{elapsed_precise}] {bar:30.cyan/blue} {pos}/{len} chunks ETA {eta}",
    )
}

fn bar(total: u64, prefix: &str, template: &str) -> ProgressBar {
    if !bars_enabled() {
        return ProgressBar::hidden();
    }
    let s = settings();
    let template = if s.no_color {
        template.replace(".cyan/blue", "")
    } else {
        template.to_string()
    };
    let style = ProgressStyle::with_template(&template)
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ");
    let bar = s.bars.add(ProgressBar::new(total));
    bar.set_style(style);
    bar.set_prefix(prefix.to_string());
    bar
}

/// The logger's writer: prints above any progress bar.
pub struct LogWriter;

impl Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match SETTINGS.get() {
            Some(s) if !s.bars.is_hidden() => s.bars.suspend(|| std::io::stderr().write(buf)),
            _ => std::io::stderr().write(buf),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

/// A progress line for stderr when no bar is drawn (not a terminal):
/// printed unless `--quiet`.
pub fn note(line: &str) {
    if quiet() {
        return;
    }
    match SETTINGS.get() {
        Some(s) if !s.bars.is_hidden() => s.bars.suspend(|| eprintln!("{line}")),
        _ => eprintln!("{line}"),
    }
}

/// Write to stdout; when its reader is gone (`stream status | head -0`),
/// end quietly as Unix tools do, killed by SIGPIPE, instead of panicking
/// as `println!` does.
pub fn stdout(args: std::fmt::Arguments<'_>) {
    let mut out = std::io::stdout().lock();
    let done = out.write_fmt(args).and_then(|()| out.flush());
    match done {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => die_of_sigpipe(),
        // Another failure to print a result is worth saying on stderr.
        Err(e) => {
            eprintln!("stream: cannot write to stdout: {e}");
            std::process::exit(1);
        }
    }
}

fn die_of_sigpipe() -> ! {
    // SAFETY: restoring the default disposition and raising the signal in
    // our own process; Rust's runtime had set SIGPIPE to ignored.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        libc::raise(libc::SIGPIPE);
    }
    std::process::exit(141)
}

/// `print!` to stdout through [`stdout`].
#[macro_export]
macro_rules! out {
    ($($t:tt)*) => { $crate::output::stdout(format_args!($($t)*)) };
}

/// `println!` to stdout through [`stdout`].
#[macro_export]
macro_rules! outln {
    () => { $crate::output::stdout(format_args!("\n")) };
    ($($t:tt)*) => { $crate::output::stdout(format_args!("{}\n", format_args!($($t)*))) };
}
