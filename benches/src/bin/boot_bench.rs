//! The time-to-boot benchmark of issue 6: a real OS (the Debian image of
//! `vendor-fixtures/boot/build-image`) booted with qemu-system-x86_64 under
//! TCG from the NBD export of each peer, timed to the marker line on the
//! serial console, with the bytes each peer fetched from the source.
//!
//! For each read delay of the imitated link (0, 1 and 5 ms) and each peer,
//! a fresh source is started: nbdkit serving the image file behind its
//! `stats` and `delay` filters on a unix socket. The peer then serves it:
//!
//! - `direct`: no peer, qemu reads the source itself (the reference);
//! - `stream`: `stream start --no-hydrate` with a fresh target and state;
//! - `stream+hydrate`: the same with background hydration on;
//! - `nbdkit-cache`: nbdkit's nbd plugin behind `--filter=cache
//!   cache-on-read=true`;
//! - `qsd-cor`: qemu-storage-daemon exporting a `copy-on-read` filter over
//!   a fresh qcow2 overlay whose backing node is the NBD source;
//! - `copy-first`: `nbdcopy` the whole source to a file, then serve the
//!   copy with `stream export`.
//!
//! "ready" is from the peer's start until it answers `nbdinfo` (for
//! copy-first it includes the copy); "to marker" is from qemu's start to
//! the marker line. The bytes and reads fetched come from the source's
//! stats file, written when it stops after the boot, so they count
//! everything each peer read (for `stream+hydrate` that includes the
//! hydration that went on during the boot and until the stop; its
//! `bytes_fetched` at the marker is in the notes).
//!
//! ```text
//! cargo build --release --bin stream
//! cargo run --release -p stream-benches --bin boot_bench -- [--delays 0,1,5] [--peers ...]
//! ```

use std::fmt::Write as _;
use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use stream_benches::boot::{self, BootImage, BootSpec};
use stream_benches::lazy::{StartSpec, StreamStart, counter};
use stream_benches::report::{machine, shell_line};
use stream_benches::servers::{
    self, Binaries, RATE_BURST, ServerKind, Transport, wait_until_served,
};
use stream_benches::stats::{median, range};
use test_support::child::ChildGuard;
use test_support::tool::find_tool;

const USAGE: &str = "\
usage: boot_bench [--delays 0,1,5] [--peers direct,stream,...] [--reps N]
                  [--timeout SECS] [--stream-bin PATH] [--image-dir DIR]
                  [--dir DIR] [--rate BITS/s]

Needs `cargo build --release --bin stream` first (or --stream-bin), and
qemu-system-x86_64, qemu-storage-daemon, qemu-img, nbdkit, nbdcopy and
nbdinfo on PATH; builds the image with vendor-fixtures/boot/build-image
(cached in --image-dir, default target/boot-image).
  --peers    any of direct, stream, stream+hydrate, nbdkit-cache, qsd-cor,
             copy-first (default: all)
  --reps N   boots per peer and delay (default 1)
  --timeout  bound of one boot, qemu start to marker (default 120)
  --rate     also limit the imitated link's bandwidth (nbdkit's rate
             filter, bits per second across connections, e.g. 1G, 100M;
             bursts of 1 ms)";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Peer {
    Direct,
    Stream,
    StreamHydrate,
    NbdkitCache,
    QsdCor,
    CopyFirst,
}

impl Peer {
    const ALL: [Peer; 6] = [
        Peer::Direct,
        Peer::Stream,
        Peer::StreamHydrate,
        Peer::NbdkitCache,
        Peer::QsdCor,
        Peer::CopyFirst,
    ];

    fn name(self) -> &'static str {
        match self {
            Peer::Direct => "direct",
            Peer::Stream => "stream",
            Peer::StreamHydrate => "stream+hydrate",
            Peer::NbdkitCache => "nbdkit-cache",
            Peer::QsdCor => "qsd-cor",
            Peer::CopyFirst => "copy-first",
        }
    }

    fn parse(s: &str) -> Option<Peer> {
        Peer::ALL.into_iter().find(|p| p.name() == s)
    }

    /// What the table says the peer is.
    fn describe(self) -> &'static str {
        match self {
            Peer::Direct => "source directly (no peer)",
            Peer::Stream => "`stream start --no-hydrate`",
            Peer::StreamHydrate => "`stream start` (hydrating)",
            Peer::NbdkitCache => "nbdkit nbd + cache-on-read",
            Peer::QsdCor => "qemu-storage-daemon COR overlay",
            Peer::CopyFirst => "nbdcopy, then `stream export`",
        }
    }
}

struct Options {
    delays: Vec<u64>,
    peers: Vec<Peer>,
    reps: usize,
    timeout: Duration,
    stream_bin: PathBuf,
    image_dir: PathBuf,
    dir: PathBuf,
    /// Bandwidth of the imitated link (nbdkit rate filter), if limited.
    rate: Option<String>,
}

fn parse_args() -> Result<Options, String> {
    let target = stream_benches::bench_main::target_dir();
    let mut o = Options {
        delays: vec![0, 1, 5],
        peers: Peer::ALL.to_vec(),
        reps: 1,
        timeout: Duration::from_secs(120),
        stream_bin: target.join("release/stream"),
        image_dir: target.join("boot-image"),
        dir: target.join("boot-bench"),
        rate: None,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = |name: &str| args.next().ok_or(format!("{name} needs a value"));
        let num = |s: &str| s.parse::<u64>().map_err(|e| format!("{s}: {e}"));
        match a.as_str() {
            "--delays" => {
                o.delays = value("--delays")?
                    .split(',')
                    .map(num)
                    .collect::<Result<_, _>>()?
            }
            "--peers" => {
                o.peers = value("--peers")?
                    .split(',')
                    .map(|s| Peer::parse(s).ok_or(format!("unknown peer {s}")))
                    .collect::<Result<_, _>>()?
            }
            "--reps" => o.reps = num(&value("--reps")?)? as usize,
            "--timeout" => o.timeout = Duration::from_secs(num(&value("--timeout")?)?.max(1)),
            "--stream-bin" => o.stream_bin = value("--stream-bin")?.into(),
            "--image-dir" => o.image_dir = value("--image-dir")?.into(),
            "--dir" => o.dir = value("--dir")?.into(),
            "--rate" => o.rate = Some(value("--rate")?),
            "-h" | "--help" => return Err(String::new()),
            other => return Err(format!("unknown argument {other}")),
        }
    }
    if o.reps == 0 || o.delays.is_empty() || o.peers.is_empty() {
        return Err("nothing to measure".into());
    }
    Ok(o)
}

fn main() -> ExitCode {
    let opts = match parse_args() {
        Ok(o) => o,
        Err(e) => {
            if !e.is_empty() {
                eprintln!("boot_bench: {e}");
            }
            eprintln!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    let needs_stream = opts
        .peers
        .iter()
        .any(|p| matches!(p, Peer::Stream | Peer::StreamHydrate | Peer::CopyFirst));
    if needs_stream && !opts.stream_bin.is_file() {
        eprintln!(
            "boot_bench: {} not found: run `cargo build --release --bin stream` first \
             (or pass --stream-bin)",
            opts.stream_bin.display()
        );
        return ExitCode::from(2);
    }
    match run(&opts) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("boot_bench: {e}");
            ExitCode::FAILURE
        }
    }
}

/// A scratch directory removed (with everything in it) on drop.
struct ScratchDir(PathBuf);

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// One boot's line of the table.
struct Row {
    delay_ms: u64,
    peer: Peer,
    ready: Duration,
    to_marker: Duration,
    reads: u64,
    bytes: u64,
    /// `stream start`'s `bytes_fetched` when the marker appeared.
    fetched_at_marker: Option<u64>,
    /// copy-first: how long the copy took (part of `ready`).
    copy: Option<Duration>,
}

fn run(opts: &Options) -> io::Result<()> {
    let started = Instant::now();
    for tool in [
        "qemu-system-x86_64",
        "qemu-storage-daemon",
        "qemu-img",
        "nbdkit",
        "nbdcopy",
        "nbdinfo",
    ] {
        if find_tool(tool).is_none() {
            return Err(io::Error::other(format!(
                "{tool} not found on PATH (Debian: qemu-system-x86, qemu-utils, nbdkit, libnbd-bin)"
            )));
        }
    }
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    eprintln!(
        "building or finding the image in {}",
        opts.image_dir.display()
    );
    let image = boot::build_image(&repo, &opts.image_dir)?;
    let size = fs::metadata(&image.disk)?.len();
    let scratch = ScratchDir(opts.dir.join(format!("run.{}", std::process::id())));
    fs::create_dir_all(&scratch.0)?;
    let mut rows = Vec::new();
    for &delay in &opts.delays {
        for &peer in &opts.peers {
            for rep in 0..opts.reps {
                let tag = format!("{}-{delay}ms-{rep}", peer.name().replace('+', "-"));
                let dir = scratch.0.join(&tag);
                fs::create_dir_all(&dir)?;
                let row = one_boot(opts, &image, size, delay, peer, &dir)?;
                eprintln!(
                    "{delay} ms {:<15} ready {:6.2} s  marker {:6.2} s  {:7.2} MiB in {} reads",
                    peer.name(),
                    row.ready.as_secs_f64(),
                    row.to_marker.as_secs_f64(),
                    mib(row.bytes),
                    row.reads
                );
                rows.push(row);
                let _ = fs::remove_dir_all(&dir);
            }
        }
    }
    println!("{}", report(opts, &image, size, &rows, started.elapsed()));
    Ok(())
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / f64::from(1 << 20)
}

/// A peer that serves the source while one VM boots from it.
struct Serving {
    uri: String,
    /// Guards to stop after the boot, the peer's own processes.
    guards: Vec<ChildGuard>,
    stream: Option<StreamStart>,
    ready: Duration,
    copy: Option<Duration>,
}

fn one_boot(
    opts: &Options,
    image: &BootImage,
    size: u64,
    delay: u64,
    peer: Peer,
    dir: &Path,
) -> io::Result<Row> {
    let statsfile = dir.join("source.stats");
    let mut params = vec![
        image.disk.display().to_string(),
        format!("statsfile={}", statsfile.display()),
    ];
    let mut filters = vec!["stats"];
    if delay > 0 {
        filters.push("delay");
        params.push(format!("delay-read={delay}ms"));
    }
    if let Some(rate) = &opts.rate {
        filters.push("rate");
        params.push(format!("rate={rate}"));
        params.push(format!("burstiness={RATE_BURST}"));
    }
    let source = servers::start_nbdkit_source(&filters, "file", &params, size, dir, "source")?;

    let mut serving = start_peer(opts, peer, &source.uri, size, dir)?;
    let result = boot::boot_once(&BootSpec {
        disk: &serving.uri,
        kernel: &image.kernel,
        initrd: &image.initrd,
        timeout: opts.timeout,
        log: dir.join("console.log"),
    });
    let result = match result {
        Ok(r) => r,
        Err(e) => {
            // Keep the logs of a failed boot where they can be read.
            let keep = opts.dir.join(format!("failed-{}", std::process::id()));
            let _ = fs::create_dir_all(&keep);
            for f in ["console.log", "console.stderr"] {
                let _ = fs::copy(dir.join(f), keep.join(f));
            }
            return Err(io::Error::other(format!(
                "{} at {delay} ms: {e} (logs copied to {})",
                peer.name(),
                keep.display()
            )));
        }
    };
    let fetched_at_marker = match &serving.stream {
        Some(s) => Some(counter(&s.status()?, "bytes_fetched")),
        None => None,
    };
    if let Some(s) = serving.stream.take() {
        s.stop()?;
    }
    for g in serving.guards.drain(..).rev() {
        g.stop()?;
    }
    // nbdkit writes its stats file when it stops.
    source.guard.stop()?;
    let text = fs::read_to_string(&statsfile)
        .map_err(|e| io::Error::other(format!("source stats {}: {e}", statsfile.display())))?;
    // No read line when nothing was read.
    let (reads, bytes) = boot::parse_nbdkit_stats_reads(&text).unwrap_or((0, 0));
    if !result.marker_line.contains("bytes=") {
        return Err(io::Error::other(format!(
            "{} at {delay} ms: the marker line {:?} lacks what the guest read",
            peer.name(),
            result.marker_line
        )));
    }
    Ok(Row {
        delay_ms: delay,
        peer,
        ready: serving.ready,
        to_marker: result.to_marker,
        reads,
        bytes,
        fetched_at_marker,
        copy: serving.copy,
    })
}

fn start_peer(
    opts: &Options,
    peer: Peer,
    source: &str,
    size: u64,
    dir: &Path,
) -> io::Result<Serving> {
    let t0 = Instant::now();
    let sock = dir.join("peer.sock");
    let log = dir.join("peer.log");
    let unix_uri = format!("nbd+unix:///?socket={}", sock.display());
    let mut s = Serving {
        uri: String::new(),
        guards: Vec::new(),
        stream: None,
        ready: Duration::ZERO,
        copy: None,
    };
    match peer {
        Peer::Direct => s.uri = source.to_string(),
        Peer::Stream | Peer::StreamHydrate => {
            let st = StreamStart::spawn(&StartSpec {
                bin: &opts.stream_bin,
                source,
                target: dir.join("target.img"),
                state: dir.join("state"),
                socket: sock,
                log,
                size,
                no_hydrate: peer == Peer::Stream,
            })?;
            s.uri = st.uri().to_string();
            s.stream = Some(st);
        }
        Peer::NbdkitCache => {
            let source_sock = source
                .strip_prefix("nbd+unix:///?socket=")
                .expect("the source is nbdkit on a unix socket");
            let mut cmd = Command::new("nbdkit");
            cmd.args(["-f", "-r", "-U"])
                .arg(&sock)
                .args(["--filter=cache", "nbd"])
                .arg(format!("socket={source_sock}"))
                .arg("cache-on-read=true")
                // The cache file goes to $TMPDIR: keep it in the scratch.
                .env("TMPDIR", dir)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(File::create(&log)?);
            let mut g = ChildGuard::spawn("nbdkit nbd+cache", &mut cmd)?;
            wait_until_served(&mut g, &unix_uri, size, &log)?;
            s.guards.push(g);
            s.uri = unix_uri;
        }
        Peer::QsdCor => {
            let source_sock = source
                .strip_prefix("nbd+unix:///?socket=")
                .expect("the source is nbdkit on a unix socket");
            let overlay = dir.join("overlay.qcow2");
            let out = Command::new("qemu-img")
                .args(["create", "-q", "-f", "qcow2"])
                .arg(&overlay)
                .arg(size.to_string())
                .output()?;
            if !out.status.success() {
                return Err(io::Error::other(format!(
                    "qemu-img create {}: {}",
                    overlay.display(),
                    String::from_utf8_lossy(&out.stderr).trim()
                )));
            }
            let mut cmd = Command::new("qemu-storage-daemon");
            cmd.arg("--blockdev")
                .arg(format!(
                    "driver=nbd,node-name=src,server.type=unix,server.path={source_sock},read-only=on"
                ))
                .arg("--blockdev")
                .arg(format!(
                    "driver=file,node-name=ovf,filename={}",
                    overlay.display()
                ))
                .args([
                    "--blockdev",
                    "driver=qcow2,node-name=ov,file=ovf,backing=src",
                    "--blockdev",
                    "driver=copy-on-read,node-name=cor,file=ov",
                    "--nbd-server",
                ])
                .arg(format!("addr.type=unix,addr.path={}", sock.display()))
                .args(["--export", "type=nbd,id=e,node-name=cor,name=,writable=off"])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(File::create(&log)?);
            let mut g = ChildGuard::spawn("qemu-storage-daemon", &mut cmd)?;
            wait_until_served(&mut g, &unix_uri, size, &log)?;
            s.guards.push(g);
            s.uri = unix_uri;
        }
        Peer::CopyFirst => {
            let copy = dir.join("copy.img");
            let copy_log = dir.join("nbdcopy.log");
            let mut cmd = Command::new("nbdcopy");
            cmd.arg(source)
                .arg(&copy)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(File::create(&copy_log)?);
            let mut g = ChildGuard::spawn("nbdcopy", &mut cmd)?;
            match g.wait_timeout(opts.timeout)? {
                Some(st) if st.success() => {}
                other => {
                    return Err(io::Error::other(format!(
                        "nbdcopy {source} {}: {other:?}; see {}",
                        copy.display(),
                        copy_log.display()
                    )));
                }
            }
            s.copy = Some(t0.elapsed());
            let srv = servers::start(
                ServerKind::Stream,
                Transport::Unix,
                &copy,
                size,
                dir,
                &Binaries {
                    stream: opts.stream_bin.clone(),
                },
                "copy",
            )?;
            s.uri = srv.uri.clone();
            s.guards.push(srv.guard);
        }
    }
    s.ready = t0.elapsed();
    Ok(s)
}

fn report(opts: &Options, image: &BootImage, size: u64, rows: &[Row], took: Duration) -> String {
    let mut r = String::new();
    let _ = writeln!(r, "## Time to boot a real OS (boot_bench)\n");
    for (k, v) in machine() {
        let _ = writeln!(r, "- {k}: {v}");
    }
    let _ = writeln!(
        r,
        "- qemu-system-x86_64: {}",
        shell_line("qemu-system-x86_64", &["--version"])
    );
    let _ = writeln!(
        r,
        "- image ({:.0} MiB), from vendor-fixtures/boot/build-image:",
        mib(size)
    );
    for line in image.manifest.lines() {
        let _ = writeln!(r, "  - `{line}`");
    }
    let _ = writeln!(
        r,
        "- {} boot(s) per peer and delay (medians, min-max in brackets), run took {:.0} s{}\n",
        opts.reps,
        took.as_secs_f64(),
        match &opts.rate {
            Some(r) => format!(
                "; the link limited to {r}bit/s (nbdkit's rate filter, bursts of {RATE_BURST} s)"
            ),
            None => String::new(),
        }
    );
    let _ = writeln!(
        r,
        "| delay | peer | ready (s) | to marker (s) | total (s) | source reads | fetched (MiB) | notes |"
    );
    let _ = writeln!(r, "|---|---|---:|---:|---:|---:|---:|---|");
    // The repetitions of one peer and delay are consecutive.
    for group in rows.chunk_by(|a, b| a.delay_ms == b.delay_ms && a.peer == b.peer) {
        let of = |f: &dyn Fn(&Row) -> f64| group.iter().map(f).collect::<Vec<_>>();
        let ready = of(&|x| x.ready.as_secs_f64());
        let marker = of(&|x| x.to_marker.as_secs_f64());
        let total = of(&|x| (x.ready + x.to_marker).as_secs_f64());
        let reads = of(&|x| x.reads as f64);
        let bytes = of(&|x| mib(x.bytes));
        let spread = |v: &[f64]| {
            if v.len() < 2 {
                String::new()
            } else {
                let (lo, hi) = range(v);
                format!(" [{lo:.2}-{hi:.2}]")
            }
        };
        let mut notes = Vec::new();
        let at_marker: Vec<f64> = group
            .iter()
            .filter_map(|x| x.fetched_at_marker.map(mib))
            .collect();
        if !at_marker.is_empty() {
            notes.push(format!(
                "`bytes_fetched` at the marker {:.2} MiB",
                median(&at_marker)
            ));
        }
        let copy: Vec<f64> = group
            .iter()
            .filter_map(|x| x.copy.map(|d| d.as_secs_f64()))
            .collect();
        if !copy.is_empty() {
            notes.push(format!("copy {:.2} s", median(&copy)));
        }
        let _ = writeln!(
            r,
            "| {} ms | {} | {:.2} | {:.2}{} | {:.2}{} | {:.0} | {:.2} | {} |",
            group[0].delay_ms,
            group[0].peer.describe(),
            median(&ready),
            median(&marker),
            spread(&marker),
            median(&total),
            spread(&total),
            median(&reads),
            median(&bytes),
            notes.join("; ")
        );
    }
    r
}
