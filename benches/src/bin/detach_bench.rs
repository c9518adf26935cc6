//! Issue 15, point 5: what moving a running guest onto native storage
//! costs it, live (`stream detach`) and cold (power off, `stream
//! finalize`, boot from the target).
//!
//! **A. Live detach: the guest's I/O pause.** Goal: under 1 s, flat in the
//! disk's size. The boot fixture's writer guest (`stream.init=/sbin/writer`:
//! 256 KiB with `conv=fsync`, a synced counter, then `STREAM-COUNT n
//! uptime` on the console, in a loop) runs from `stream start`'s export
//! (qemu: raw node `disk0` over an nbd node, as `integration/tests/
//! live_detach.rs` runs it). Once hydration is complete and the writer
//! has run ten more rounds, `stream detach --json` switches it onto the
//! target and finalizes. Measured:
//!
//! - `reopen_ms`, QEMU's `blockdev-reopen` round trip, from the
//!   `switched` event `stream detach` prints;
//! - the guest-side pause: the largest gap between consecutive counts'
//!   uptimes (the guest's clock, 10 ms resolution) from the last count
//!   before `stream detach` started to the fifth after it exited, minus the
//!   median gap of the ten rounds before it started (their largest gap
//!   is reported too: the noise without a detach). The window spans the
//!   whole command, so a stall at the prepare flush, at the switch, at the
//!   nbd node's removal or under finalize all count; where the largest gap
//!   ended is reported relative to the `switched` event;
//! - the wall time of `stream detach` (prepare, switch, finalize), and the
//!   part of it up to the `switched` event.
//!
//! On the fixture (512 MiB) the writer is then stopped from the console and
//! must report no I/O error. With `--padded N`, the same runs over a 16 GiB
//! source: `disk.img` followed by pseudo-random bytes (not zeros: every
//! chunk is data to hydrate and hash), written once and deleted at the end;
//! there the writer is not stopped (it would sha256 16 GiB under TCG),
//! qemu is killed after ten counts past the detach.
//!
//! **B. Cold cutover beside a plain reboot.** Goal: downtime within 1.2x +
//! 5 s of a reboot. The guest boots the default `/sbin/init` (read-only
//! root, ~14 MiB read, `STREAM-BOOT-OK`, power-off) from the export while
//! `stream start` hydrates; after qemu exits, `stream finalize --state DIR`
//! (the running start hands over), then the guest boots from the target
//! file (raw over a file node, no NBD). Downtime: the first qemu's exit to
//! the second boot's marker. The plain reboot: that second qemu's exit to
//! the marker of a third boot from the same file.
//!
//! Every process is in a `ChildGuard` (killed by PID on drop); every wait
//! is on a console line, a process exit or the status socket, with a
//! deadline. Logs stay in `--dir` (one directory per run); targets, state
//! and the padded source are removed.
//!
//! ```text
//! cargo build --release -p stream-cli --bin stream -p stream-benches --bin detach_bench
//! target/release/detach_bench [--reps 3] [--padded 1] [--cold 3]
//! ```

use std::ffi::CString;
use std::fmt::Write as _;
use std::fs::{self, File};
use std::io::{self, Write};
use std::mem::MaybeUninit;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use stream_benches::boot::{self, BootImage, Guest, GuestDisk, GuestSpec, Lines};
use stream_benches::lazy::{StartSpec, StreamStart};
use stream_benches::report::{loadavg, machine, shell_line};
use stream_benches::scratch::ScratchDir;
use stream_benches::stats::{median, range};
use test_support::child::ChildGuard;
use test_support::rng::Rng;

const USAGE: &str = "\
usage: detach_bench [--reps N] [--padded N] [--cold N] [--pad-gib G]
                    [--stream-bin PATH] [--image-dir DIR] [--dir DIR]

  --reps N     live detaches of the fixture's writer guest (default 3)
  --padded N   live detaches over the fixture padded to G GiB (default 1;
               needs G + G + 4 GiB free under --dir)
  --cold N     cold cutovers, each beside a plain reboot (default 3)
  --pad-gib G  size of the padded source (default 16)
Needs target/release/stream (or --stream-bin), qemu-system-x86_64 and
nbdinfo; builds the image with vendor-fixtures/boot/build-image (cached in
--image-dir, default target/boot-image). Logs: --dir (default
target/detach-bench).";

/// Writer rounds (gaps) before `stream detach` (the baseline) and after it.
const BASELINE: usize = 10;
const AFTER: usize = 10;
/// Counts past `stream detach`'s exit inside the pause window.
const WINDOW_AFTER: usize = 5;
const BOOT: Duration = Duration::from_secs(300);
const HYDRATE: Duration = Duration::from_secs(3600);
const COUNTS: Duration = Duration::from_secs(300);
const COMMAND: Duration = Duration::from_secs(1200);
/// The writer's end: remount, sha256 of 512 MiB under TCG, power-off.
const WRITER_END: Duration = Duration::from_secs(900);
const POWEROFF: Duration = Duration::from_secs(60);
/// Room beyond the padded source and its target (state, logs, margin).
const SPARE: u64 = 4 << 30;

struct Options {
    reps: usize,
    padded: usize,
    cold: usize,
    pad_gib: u64,
    stream_bin: PathBuf,
    image_dir: PathBuf,
    dir: PathBuf,
}

fn parse_args() -> Result<Options, String> {
    let target = stream_benches::bench_main::target_dir();
    let mut o = Options {
        reps: 3,
        padded: 1,
        cold: 3,
        pad_gib: 16,
        stream_bin: target.join("release/stream"),
        image_dir: target.join("boot-image"),
        dir: target.join("detach-bench"),
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = |name: &str| args.next().ok_or(format!("{name} needs a value"));
        let num = |s: String| s.parse::<u64>().map_err(|e| format!("{s}: {e}"));
        match a.as_str() {
            "--reps" => o.reps = num(value("--reps")?)? as usize,
            "--padded" => o.padded = num(value("--padded")?)? as usize,
            "--cold" => o.cold = num(value("--cold")?)? as usize,
            "--pad-gib" => o.pad_gib = num(value("--pad-gib")?)?.max(1),
            "--stream-bin" => o.stream_bin = value("--stream-bin")?.into(),
            "--image-dir" => o.image_dir = value("--image-dir")?.into(),
            "--dir" => o.dir = value("--dir")?.into(),
            "-h" | "--help" => return Err(String::new()),
            other => return Err(format!("unknown argument {other}")),
        }
    }
    Ok(o)
}

fn main() -> ExitCode {
    stream_benches::bench_main::run(
        "detach_bench",
        USAGE,
        parse_args(),
        |o: &Options| o.stream_bin.as_path(),
        run,
    )
}

fn run(opts: &Options) -> io::Result<String> {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let image = boot::build_image(&repo, &opts.image_dir)?;
    fs::create_dir_all(&opts.dir)?;
    let load_start = loadavg();
    let mut fixture = Vec::new();
    for rep in 1..=opts.reps {
        let run = live_once(
            opts,
            &image,
            &image.disk,
            &opts.dir.join(format!("live-{rep}")),
        )?;
        eprintln!("detach_bench: fixture {rep}: {run:?}");
        fixture.push(run);
    }
    let mut padded = Vec::new();
    if opts.padded > 0 {
        let size = opts.pad_gib << 30;
        let need = 2 * size + SPARE;
        let free = free_bytes(&opts.dir)?;
        if free < need {
            return Err(io::Error::other(format!(
                "the padded runs need {} GiB free under {} (a {} GiB source and its target, \
                 plus {} GiB); only {:.1} GiB are: free some, pass --dir elsewhere, or \
                 --padded 0",
                need >> 30,
                opts.dir.display(),
                opts.pad_gib,
                SPARE >> 30,
                free as f64 / (1u64 << 30) as f64
            )));
        }
        let scratch = ScratchDir(opts.dir.join("padded-source"));
        fs::create_dir_all(&scratch.0)?;
        let source = scratch.0.join("source.img");
        let t = Instant::now();
        pad(&image.disk, &source, size)?;
        eprintln!(
            "detach_bench: padded source of {} GiB written in {:.1} s",
            opts.pad_gib,
            t.elapsed().as_secs_f64()
        );
        for rep in 1..=opts.padded {
            let dir = opts.dir.join(format!("live-padded-{rep}"));
            let run = live_once(opts, &image, &source, &dir)?;
            eprintln!("detach_bench: padded {rep}: {run:?}");
            padded.push(run);
        }
    }
    let mut cold = Vec::new();
    for rep in 1..=opts.cold {
        let run = cold_once(opts, &image, &opts.dir.join(format!("cold-{rep}")))?;
        eprintln!("detach_bench: cold {rep}: {run:?}");
        cold.push(run);
    }
    Ok(report(opts, &fixture, &padded, &cold, &load_start))
}

/// One live detach, as measured.
#[derive(Debug)]
struct Live {
    load: String,
    /// `stream start`'s start to hydration complete.
    hydrate_s: f64,
    reopen_ms: f64,
    /// `stream detach`'s start to its `switched` event (prepare, add,
    /// reopen), and to its exit.
    to_switch_s: f64,
    detach_s: f64,
    gaps: Gaps,
}

fn live_once(opts: &Options, image: &BootImage, source: &Path, dir: &Path) -> io::Result<Live> {
    let _ = fs::remove_dir_all(dir);
    let data = ScratchDir(dir.join("data"));
    fs::create_dir_all(&data.0)?;
    let spec = StartSpec {
        bin: &opts.stream_bin,
        source: source
            .to_str()
            .ok_or_else(|| io::Error::other("the source path is not UTF-8"))?,
        target: data.0.join("target.raw"),
        state: data.0.join("state"),
        socket: data.0.join("nbd.sock"),
        log: dir.join("start.log"),
        size: fs::metadata(source)?.len(),
        no_hydrate: false,
    };
    let mut start = StreamStart::spawn(&spec)?;
    let qmp = data.0.join("qmp.sock");
    let cmd = boot::guest_command(&GuestSpec {
        kernel: &image.kernel,
        initrd: &image.initrd,
        disk: GuestDisk::Nbd(&spec.socket),
        init: Some("/sbin/writer"),
        qmp: Some(&qmp),
    })?;
    let mut guest = Guest::spawn(cmd, &dir.join("console.log"), true)?;
    guest.wait_line("STREAM-WRITER-START", BOOT, |l| {
        l.starts_with("STREAM-WRITER-START") || l.starts_with("STREAM-WRITER-FAIL")
    })?;
    let hydrated = start
        .wait_hydrated(HYDRATE, Duration::from_millis(200), |_| {})?
        .ok_or_else(|| io::Error::other(format!("hydration not complete within {HYDRATE:?}")))?;
    let n = last_count(&guest.console);
    guest.wait_line("the baseline counts", COUNTS, |l| {
        count(l).is_some_and(|(c, _)| c > n + BASELINE as u64)
    })?;

    let load = loadavg();
    let mut cmd = Command::new(&opts.stream_bin);
    cmd.arg("detach")
        .arg("--state")
        .arg(&spec.state)
        .arg("--qmp")
        .arg(&qmp)
        .args(["--device", "vda", "--timeout", "600s", "--json"])
        .stdin(Stdio::null())
        .stdout(File::create(dir.join("detach.out"))?)
        .stderr(Stdio::piped());
    let began = Instant::now();
    let mut detach = ChildGuard::spawn("stream detach", &mut cmd)?;
    let events = Lines::read(
        detach.child_mut().stderr.take().expect("stderr is piped"),
        File::create(dir.join("detach.err"))?,
    );
    let status = detach.wait_timeout(COMMAND)?;
    let ended = Instant::now();
    let logs = format!(
        "see {} and {}",
        dir.join("detach.err").display(),
        dir.join("start.log").display()
    );
    match status {
        Some(s) if s.success() => {}
        Some(s) => return Err(io::Error::other(format!("stream detach: {s}; {logs}"))),
        None => return Err(io::Error::other(format!("stream detach hung; {logs}"))),
    }
    let (_, switched_at, switched) = events
        .wait(Instant::now() + Duration::from_secs(10), |l| {
            l.contains(r#""event":"switched""#)
        })
        .map_err(|_| {
            io::Error::other(format!("stream detach printed no switched event; {logs}"))
        })?;
    let switched: serde_json::Value = serde_json::from_str(&switched)
        .map_err(|e| io::Error::other(format!("switched event {switched:?}: {e}")))?;
    let reopen_ms = switched["reopen_ms"]
        .as_f64()
        .ok_or_else(|| io::Error::other(format!("no reopen_ms in {switched}")))?;
    let report = fs::read_to_string(dir.join("detach.out"))?;
    if !report.contains(r#""phase":"finalized""#) {
        return Err(io::Error::other(format!(
            "stream detach's report is not finalized: {report}"
        )));
    }
    // Handed over: the start has nothing left to serve.
    if start
        .server
        .guard
        .wait_timeout(Duration::from_secs(60))?
        .is_none()
    {
        return Err(io::Error::other(format!(
            "stream start still runs 60 s after the detach; {logs}"
        )));
    }

    let n = last_count(&guest.console);
    guest.wait_line("counts after the detach", COUNTS, |l| {
        count(l).is_some_and(|(c, _)| c >= n + AFTER as u64)
    })?;
    if source == image.disk {
        guest.send_line("stop")?;
        let (_, _, done) = guest.wait_line("the writer's end", WRITER_END, |l| {
            l.starts_with("STREAM-WRITER-DONE") || l.starts_with("STREAM-WRITER-FAIL")
        })?;
        if !(done.contains(" status=0 ") && done.contains(" ioerrors=0 ")) {
            return Err(guest.fail(&format!("the writer ended badly: {done}")));
        }
        guest.wait_exit(POWEROFF)?;
    }
    let lines = guest.console.snapshot();
    drop(guest);
    if let Some((_, bad)) = lines.iter().find(|(_, l)| {
        l.contains("I/O error") || l.contains("STREAM-WRITER-IOERR") || l.contains("FAIL")
    }) {
        return Err(io::Error::other(format!(
            "the guest saw an error: {bad}; console in {}",
            dir.join("console.log").display()
        )));
    }
    let counts: Vec<_> = lines
        .iter()
        .filter_map(|(at, l)| count(l).map(|(_, up)| (*at, up)))
        .collect();
    // For a second look: each count's arrival from the detach's start
    // (host clock) beside its uptime (guest clock).
    let mut tsv = String::from("host_s\tuptime_s\n");
    for (at, up) in &counts {
        let _ = writeln!(tsv, "{:.3}\t{up:.2}", secs_from(began, *at));
    }
    let _ = writeln!(
        tsv,
        "# switched {:.3}, ended {:.3}",
        switched_at.duration_since(began).as_secs_f64(),
        ended.duration_since(began).as_secs_f64()
    );
    fs::write(dir.join("counts.tsv"), tsv)?;
    let gaps = Gaps::around(&counts, began, ended, switched_at)
        .ok_or_else(|| io::Error::other("too few counts around the detach to measure the pause"))?;
    Ok(Live {
        load,
        hydrate_s: hydrated.as_secs_f64(),
        reopen_ms,
        to_switch_s: switched_at.duration_since(began).as_secs_f64(),
        detach_s: ended.duration_since(began).as_secs_f64(),
        gaps,
    })
}

/// `STREAM-COUNT n uptime`: the count and the guest's uptime in seconds.
fn count(line: &str) -> Option<(u64, f64)> {
    let mut words = line.strip_prefix("STREAM-COUNT ")?.split(' ');
    Some((words.next()?.parse().ok()?, words.next()?.parse().ok()?))
}

fn last_count(console: &Lines) -> u64 {
    let lines = console.snapshot();
    lines
        .iter()
        .filter_map(|(_, l)| count(l))
        .map(|c| c.0)
        .max()
        .unwrap_or(0)
}

/// The writer's rhythm around a detach, from each count's arrival on the
/// host and its uptime in the guest.
#[derive(Debug, PartialEq)]
struct Gaps {
    /// Median and largest gap of the [`BASELINE`] rounds before the
    /// detach (the largest shows the noise without a detach).
    median_ms: f64,
    baseline_max_ms: f64,
    /// Largest gap from the last count before the detach to the
    /// [`WINDOW_AFTER`]th after it.
    max_ms: f64,
    /// When the count that ended the largest gap arrived, from the
    /// `switched` event (negative: before it).
    max_at_s: f64,
}

impl Gaps {
    fn pause_ms(&self) -> f64 {
        self.max_ms - self.median_ms
    }

    /// `counts`: (arrival, uptime) of each count in order; the detach ran
    /// from `began` to `ended` and printed `switched` at `switched`.
    fn around(
        counts: &[(Instant, f64)],
        began: Instant,
        ended: Instant,
        switched: Instant,
    ) -> Option<Gaps> {
        let first = counts.iter().rposition(|(at, _)| *at < began)?;
        let after = counts.iter().position(|(at, _)| *at > ended)?;
        let last = after + WINDOW_AFTER - 1;
        if first < BASELINE || last >= counts.len() {
            return None;
        }
        let gap = |i: usize| (counts[i + 1].1 - counts[i].1) * 1e3;
        let baseline: Vec<f64> = (first - BASELINE..first).map(gap).collect();
        let (max_i, max_ms) = (first..last)
            .map(|i| (i, gap(i)))
            .max_by(|a, b| a.1.total_cmp(&b.1))?;
        Some(Gaps {
            median_ms: median(&baseline),
            baseline_max_ms: range(&baseline).1,
            max_ms,
            max_at_s: secs_from(switched, counts[max_i + 1].0),
        })
    }
}

/// `to - from` in seconds, negative when `to` came first.
fn secs_from(from: Instant, to: Instant) -> f64 {
    match to.checked_duration_since(from) {
        Some(d) => d.as_secs_f64(),
        None => -from.duration_since(to).as_secs_f64(),
    }
}

/// One cold cutover and the plain reboot after it.
#[derive(Debug)]
struct Cold {
    load: String,
    /// Whether hydration was complete when the first guest powered off.
    hydrated: bool,
    finalize_s: f64,
    downtime_s: f64,
    reboot_s: f64,
}

fn cold_once(opts: &Options, image: &BootImage, dir: &Path) -> io::Result<Cold> {
    let _ = fs::remove_dir_all(dir);
    let data = ScratchDir(dir.join("data"));
    fs::create_dir_all(&data.0)?;
    let spec = StartSpec {
        bin: &opts.stream_bin,
        source: image
            .disk
            .to_str()
            .ok_or_else(|| io::Error::other("the image path is not UTF-8"))?,
        target: data.0.join("target.raw"),
        state: data.0.join("state"),
        socket: data.0.join("nbd.sock"),
        log: dir.join("start.log"),
        size: fs::metadata(&image.disk)?.len(),
        no_hydrate: false,
    };
    let load = loadavg();
    let mut start = StreamStart::spawn(&spec)?;
    let (_, off) = boot_from(
        image,
        GuestDisk::Nbd(&spec.socket),
        &dir.join("console-1.log"),
    )?;
    let hydrated = start.status()?["volume"]["hydration_complete"].as_bool() == Some(true);

    let log = dir.join("finalize.log");
    let mut cmd = Command::new(&opts.stream_bin);
    cmd.arg("finalize")
        .arg("--state")
        .arg(&spec.state)
        .stdin(Stdio::null())
        .stdout(File::create(&log)?)
        .stderr(File::create(log.with_extension("stderr"))?);
    let t = Instant::now();
    let status = ChildGuard::spawn("stream finalize", &mut cmd)?.wait_timeout(COMMAND)?;
    let finalize_s = t.elapsed().as_secs_f64();
    if status.is_none_or(|s| !s.success()) {
        return Err(io::Error::other(format!(
            "stream finalize: {status:?}; see {}",
            log.display()
        )));
    }
    if start
        .server
        .guard
        .wait_timeout(Duration::from_secs(60))?
        .is_none()
    {
        return Err(io::Error::other(
            "stream start still runs 60 s after finalize",
        ));
    }

    let native = GuestDisk::File(&spec.target);
    let (marker, off2) = boot_from(image, native, &dir.join("console-2.log"))?;
    let native = GuestDisk::File(&spec.target);
    let (marker3, _) = boot_from(image, native, &dir.join("console-3.log"))?;
    Ok(Cold {
        load,
        hydrated,
        finalize_s,
        downtime_s: marker.duration_since(off).as_secs_f64(),
        reboot_s: marker3.duration_since(off2).as_secs_f64(),
    })
}

/// Boot `/sbin/init` from `disk`: when its marker arrived and when qemu
/// exited after the power-off.
fn boot_from(image: &BootImage, disk: GuestDisk, log: &Path) -> io::Result<(Instant, Instant)> {
    let cmd = boot::guest_command(&GuestSpec {
        kernel: &image.kernel,
        initrd: &image.initrd,
        disk,
        init: None,
        qmp: None,
    })?;
    let mut guest = Guest::spawn(cmd, log, false)?;
    let (_, at, line) = guest.wait_line(boot::MARKER, BOOT, |l| {
        l.contains(boot::MARKER) || l.contains(boot::FAIL_MARKER)
    })?;
    if line.contains(boot::FAIL_MARKER) {
        return Err(guest.fail(&format!("the boot failed: {line}")));
    }
    let (off, _) = guest.wait_exit(POWEROFF)?;
    Ok((at, off))
}

/// `disk` followed by pseudo-random bytes (a fixed seed) up to `size`,
/// synced.
fn pad(disk: &Path, path: &Path, size: u64) -> io::Result<()> {
    let mut out = File::create(path)?;
    let mut left = size.saturating_sub(io::copy(&mut File::open(disk)?, &mut out)?);
    let mut rng = Rng::new(0x5eed_1505);
    let mut buf = vec![0u8; 8 << 20];
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        rng.fill(&mut buf[..n]);
        out.write_all(&buf[..n])?;
        left -= n as u64;
    }
    out.sync_all()
}

/// Bytes an unprivileged user may still write on the file system of `path`.
fn free_bytes(path: &Path) -> io::Result<u64> {
    let c = CString::new(path.as_os_str().as_bytes())?;
    let mut st = MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: `c` is a NUL-terminated path and `st` has room for the
    // struct statvfs(3) fills.
    if unsafe { libc::statvfs(c.as_ptr(), st.as_mut_ptr()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: statvfs returned 0, so it filled `st`.
    let st = unsafe { st.assume_init() };
    Ok(st.f_bavail * st.f_frsize)
}

/// The markdown tables, with the command line, machine and load.
fn report(opts: &Options, fixture: &[Live], padded: &[Live], cold: &[Cold], load: &str) -> String {
    let mut out = String::new();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let _ = writeln!(
        out,
        "- command: `target/release/detach_bench {}`",
        args.join(" ")
    );
    let _ = writeln!(
        out,
        "- date: {}",
        shell_line("date", &["-u", "+%Y-%m-%d %H:%M UTC"])
    );
    for (k, v) in machine()
        .into_iter()
        .filter(|(k, _)| matches!(*k, "machine" | "stream"))
    {
        let _ = writeln!(out, "- {k}: {v}");
    }
    let qemu = shell_line("qemu-system-x86_64", &["--version"]);
    let _ = writeln!(out, "- qemu: {qemu}");
    let _ = writeln!(
        out,
        "- load average: {load} at start, {} at end\n",
        loadavg()
    );

    if !fixture.is_empty() || !padded.is_empty() {
        let _ = writeln!(
            out,
            "| disk | run | load | hydration s | detach s | to switch s | reopen ms | \
             median gap ms | largest gap before ms | largest gap ms | pause ms | \
             largest gap ends, s from switch |"
        );
        let _ = writeln!(
            out,
            "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
        );
        let padded_name = format!("{} GiB", opts.pad_gib);
        for (name, runs) in [("512 MiB", fixture), (padded_name.as_str(), padded)] {
            for (i, r) in runs.iter().enumerate() {
                let _ = writeln!(
                    out,
                    "| {name} | {} | {} | {:.1} | {:.2} | {:.2} | {:.1} | {:.0} | {:.0} | {:.0} | {:.0} | {:+.2} |",
                    i + 1,
                    r.load,
                    r.hydrate_s,
                    r.detach_s,
                    r.to_switch_s,
                    r.reopen_ms,
                    r.gaps.median_ms,
                    r.gaps.baseline_max_ms,
                    r.gaps.max_ms,
                    r.gaps.pause_ms(),
                    r.gaps.max_at_s
                );
            }
            if runs.len() > 1 {
                let col = |f: &dyn Fn(&Live) -> f64| runs.iter().map(f).collect::<Vec<_>>();
                let cols = [
                    col(&|r| r.hydrate_s),
                    col(&|r| r.detach_s),
                    col(&|r| r.to_switch_s),
                    col(&|r| r.reopen_ms),
                    col(&|r| r.gaps.median_ms),
                    col(&|r| r.gaps.baseline_max_ms),
                    col(&|r| r.gaps.max_ms),
                    col(&|r| r.gaps.pause_ms()),
                ];
                for (label, pick) in [("median", median as fn(&[f64]) -> f64), ("max", max)] {
                    let v: Vec<f64> = cols.iter().map(|c| pick(c)).collect();
                    let _ = writeln!(
                        out,
                        "| {name} | **{label}** | | {:.1} | {:.2} | {:.2} | {:.1} | {:.0} | {:.0} | {:.0} | **{:.0}** | |",
                        v[0], v[1], v[2], v[3], v[4], v[5], v[6], v[7]
                    );
                }
            }
        }
        out.push('\n');
    }
    if !cold.is_empty() {
        let _ = writeln!(
            out,
            "| run | load | hydrated at power-off | finalize s | cold downtime s | \
             plain reboot s | ratio | goal: ≤ 1.2 × reboot + 5 s |"
        );
        let _ = writeln!(out, "|---|---|---|---:|---:|---:|---:|---|");
        for (i, r) in cold.iter().enumerate() {
            let _ = writeln!(
                out,
                "| {} | {} | {} | {:.2} | {:.2} | {:.2} | {:.2}× | {} |",
                i + 1,
                r.load,
                if r.hydrated { "yes" } else { "no" },
                r.finalize_s,
                r.downtime_s,
                r.reboot_s,
                r.downtime_s / r.reboot_s,
                if r.downtime_s <= 1.2 * r.reboot_s + 5.0 {
                    "met"
                } else {
                    "**missed**"
                }
            );
        }
        if cold.len() > 1 {
            let col = |f: &dyn Fn(&Cold) -> f64| cold.iter().map(f).collect::<Vec<_>>();
            let cols = [
                col(&|r| r.finalize_s),
                col(&|r| r.downtime_s),
                col(&|r| r.reboot_s),
                col(&|r| r.downtime_s / r.reboot_s),
            ];
            for (label, pick) in [("median", median as fn(&[f64]) -> f64), ("max", max)] {
                let v: Vec<f64> = cols.iter().map(|c| pick(c)).collect();
                let _ = writeln!(
                    out,
                    "| **{label}** | | | {:.2} | {:.2} | {:.2} | {:.2}× | |",
                    v[0], v[1], v[2], v[3]
                );
            }
        }
    }
    out
}

fn max(values: &[f64]) -> f64 {
    range(values).1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn count_lines_are_parsed_and_others_are_not() {
        assert_eq!(count("STREAM-COUNT 12 34.56"), Some((12, 34.56)));
        assert_eq!(count("STREAM-COUNT 12"), None);
        assert_eq!(count("STREAM-WRITER-START"), None);
    }

    #[test]
    fn the_pause_is_the_largest_gap_around_the_detach_above_the_baseline() {
        // One count every 100 ms (guest and host alike), but 700 ms
        // between counts 15 and 16; the detach runs from 14.5 to 17.5.
        let t0 = Instant::now();
        let mut up = 0.0;
        let counts: Vec<(Instant, f64)> = (0..30)
            .map(|i| {
                up += if i == 16 { 0.7 } else { 0.1 };
                (t0 + Duration::from_secs_f64(up), up)
            })
            .collect();
        let at = |s: f64| t0 + Duration::from_secs_f64(s);
        let g = Gaps::around(&counts, at(1.55), at(2.35), at(1.9)).unwrap();
        assert!((g.median_ms - 100.0).abs() < 1e-6, "{g:?}");
        assert!((g.baseline_max_ms - 100.0).abs() < 1e-6, "{g:?}");
        assert!((g.max_ms - 700.0).abs() < 1e-6, "{g:?}");
        assert!((g.pause_ms() - 600.0).abs() < 1e-6);
        // Count 16 arrived at 2.3 s, 0.4 s after the switch.
        assert!((g.max_at_s - 0.4).abs() < 1e-6, "{g:?}");
        // Not enough counts before the detach for a baseline.
        assert_eq!(Gaps::around(&counts, at(0.5), at(0.6), at(0.55)), None);
    }
}
