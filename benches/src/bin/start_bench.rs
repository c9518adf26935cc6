//! The start benchmark: `stream start` (a lazily fetched volume) against
//! reading its source directly, qemu-nbd and nbdcopy, for the targets of
//! issue 3, side by side in one run.
//!
//! The source is nbdkit on a unix socket, behind its `delay` filter
//! (`delay-read=1ms`) where a remote link is imitated:
//!
//! 1. **Cold reads**: fio 4 KiB random reads (QD1 and QD16) over an 8 GiB
//!    `random` disk, directly from nbdkit and through a fresh
//!    `stream start --no-hydrate` (new target and state every run); the
//!    share of reads that were cold is `chunks_fetched_on_demand` / reads.
//! 2. **Warm reads**: 4 KiB random reads at QD16 on the volume hydrated in
//!    3, against qemu-nbd serving the same target file.
//! 3. **Hydration**: time from process start until `hydration_complete`
//!    from a pseudo-random, fully allocated file (no delay and 1 ms
//!    delay), against `nbdcopy` of the same source into a fresh file in the
//!    same directory; and a `sparse-random` disk with 10 % data, where
//!    `bytes_fetched` must stay under 15 % of the disk.
//! 4. **Foreground under hydration**: QD1 4 KiB random-read p99 while
//!    hydration runs flat out against the same run with `--no-hydrate`,
//!    for cold reads (whole disk) and for reads of chunks already present
//!    (a 64 MiB region at the end, read once beforehand).
//! 5. **Memory**: peak `VmHWM` of `stream start` over a 1 TiB
//!    `sparse-random` disk (0.1 % data) while it learns holes and hydrates,
//!    then, after resetting the peak, while it serves QD16 random reads.
//!
//! Every process lives in a guard (killed by PID and reaped); every wait
//! is bounded. Build the server first, then run:
//!
//! ```text
//! cargo build --release --bin stream
//! cargo run --release -p stream-benches --bin start-bench -- [--quick] [--write benches/RESULTS.md]
//! ```

use std::fmt::Write as _;
use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use stream_benches::fio::{self, FioResult, RAND_READ_4K, RAND_READ_4K_QD1, Workload};
use stream_benches::lazy::{StartSpec, StreamStart, counter};
use stream_benches::mem;
use stream_benches::peers;
use stream_benches::report::{self, loadavg, shell_line, write_between_markers};
use stream_benches::scratch::ScratchDir;
use stream_benches::servers::{self, Binaries, ServerKind, Transport};
use stream_benches::stats::{median, range};
use stream_benches::testfile;
use test_support::child::ChildGuard;

const USAGE: &str = "\
usage: start-bench [--quick] [--reps N] [--runtime SECS] [--delay-ms N]
                   [--scenarios 1,2,3,4,5] [--stream-bin PATH] [--dir DIR]
                   [--write FILE]

Needs `cargo build --release --bin stream` first (or --stream-bin), and
fio (nbd engine), nbdinfo, nbdcopy, qemu-nbd and nbdkit on PATH.
  --quick        2 repetitions of 3 s runs, 1 GiB hydration source
                 (default 3 repetitions of 8 s runs, 4 GiB)
  --delay-ms N   read delay of the imitated remote link (default 1)
  --write FILE   also write the report into FILE (replacing the section
                 between the start-bench markers, keeping the rest)";

const BEGIN_MARK: &str = "<!-- start-bench:begin (generated; edit outside the markers) -->";
const END_MARK: &str = "<!-- start-bench:end -->";

/// Size of the cold-read source: large enough that a short run rarely
/// reads a chunk twice.
const COLD_SIZE: u64 = 8 << 30;
/// Size of the memory scenario's source.
const HUGE_SIZE: u64 = 1 << 40;
/// Region read in the "chunks already present" runs.
const PRESENT_REGION: u64 = 64 << 20;
const STATUS_POLL: Duration = Duration::from_millis(50);

struct Options {
    quick: bool,
    reps: usize,
    runtime: Duration,
    warmup: Duration,
    dense_size: u64,
    delay_ms: u64,
    hydrate_timeout: Duration,
    scenarios: Vec<u32>,
    stream_bin: PathBuf,
    dir: PathBuf,
    write: Option<PathBuf>,
}

fn parse_args() -> Result<Options, String> {
    let target = stream_benches::bench_main::target_dir();
    let mut o = Options {
        quick: false,
        reps: 3,
        runtime: Duration::from_secs(8),
        warmup: Duration::from_secs(2),
        dense_size: 4 << 30,
        delay_ms: 1,
        hydrate_timeout: Duration::from_secs(240),
        scenarios: vec![1, 2, 3, 4, 5],
        stream_bin: target.join("release/stream"),
        dir: Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/start-bench"),
        write: None,
    };
    let (mut reps_set, mut runtime_set) = (false, false);
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = |name: &str| args.next().ok_or(format!("{name} needs a value"));
        let num = |s: String| s.parse::<u64>().map_err(|e| format!("{s}: {e}"));
        match a.as_str() {
            "--quick" => o.quick = true,
            "--reps" => {
                o.reps = num(value("--reps")?)? as usize;
                reps_set = true;
            }
            "--runtime" => {
                o.runtime = Duration::from_secs(num(value("--runtime")?)?.max(1));
                runtime_set = true;
            }
            "--delay-ms" => o.delay_ms = num(value("--delay-ms")?)?,
            "--scenarios" => {
                o.scenarios = value("--scenarios")?
                    .split(',')
                    .map(|s| match s.parse() {
                        Ok(n @ 1..=5) => Ok(n),
                        _ => Err(format!("unknown scenario {s}")),
                    })
                    .collect::<Result<_, _>>()?
            }
            "--stream-bin" => o.stream_bin = value("--stream-bin")?.into(),
            "--dir" => o.dir = value("--dir")?.into(),
            "--write" => o.write = Some(value("--write")?.into()),
            "-h" | "--help" => return Err(String::new()),
            other => return Err(format!("unknown argument {other}")),
        }
    }
    if o.quick {
        if !reps_set {
            o.reps = 2;
        }
        if !runtime_set {
            o.runtime = Duration::from_secs(3);
        }
        o.warmup = Duration::from_secs(1);
        o.dense_size = 1 << 30;
        o.hydrate_timeout = Duration::from_secs(90);
    }
    if o.reps == 0 || o.scenarios.is_empty() {
        return Err("nothing to measure".into());
    }
    Ok(o)
}

/// One line of the result table.
struct Row {
    scenario: &'static str,
    measure: String,
    stream: String,
    peer: String,
    ratio: Option<f64>,
    /// Text of the target and whether it was met (`None`: informative).
    target: String,
    met: Option<bool>,
    note: String,
}

/// What the whole run found: the table and free-form notes.
#[derive(Default)]
struct Findings {
    rows: Vec<Row>,
    notes: Vec<String>,
}

fn main() -> ExitCode {
    let opts = match parse_args() {
        Ok(o) => o,
        Err(e) => {
            if !e.is_empty() {
                eprintln!("start-bench: {e}");
            }
            eprintln!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    if !opts.stream_bin.is_file() {
        eprintln!(
            "start-bench: {} not found: run `cargo build --release --bin stream` first \
             (or pass --stream-bin)",
            opts.stream_bin.display()
        );
        return ExitCode::from(2);
    }
    match run(&opts) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("start-bench: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(opts: &Options) -> io::Result<()> {
    let started = Instant::now();
    // On the same file system as the targets' peers: the repository's disk
    // (tmpfs would flatter every writer alike but is not where targets go).
    let scratch = ScratchDir(opts.dir.join(format!("run.{}", std::process::id())));
    fs::create_dir_all(&scratch.0)?;
    let mut f = Findings::default();
    let has = |n| opts.scenarios.contains(&n);
    if has(1) {
        cold_reads(opts, &scratch.0, &mut f)?;
    }
    if has(2) || has(3) {
        hydration_and_warm(opts, &scratch.0, &mut f)?;
    }
    if has(4) {
        foreground_under_hydration(opts, &scratch.0, &mut f)?;
    }
    if has(5) {
        memory(opts, &scratch.0, &mut f)?;
    }
    let report = report(opts, &f, started.elapsed());
    println!("{report}");
    if let Some(path) = &opts.write {
        write_between_markers(path, &report, BEGIN_MARK, END_MARK)?;
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}

/// A fresh target and state directory for one `stream start` run.
fn fresh_spec<'a>(
    opts: &'a Options,
    dir: &Path,
    source: &'a str,
    size: u64,
    tag: &str,
    no_hydrate: bool,
) -> io::Result<StartSpec<'a>> {
    let d = dir.join(tag);
    let _ = fs::remove_dir_all(&d);
    fs::create_dir_all(&d)?;
    Ok(StartSpec {
        bin: &opts.stream_bin,
        source,
        target: d.join("target.img"),
        state: d.join("state"),
        socket: d.join("volume.sock"),
        log: d.join("stream.log"),
        size,
        no_hydrate,
    })
}

/// Stop a `stream start` cleanly and remove its target and state.
fn stop_and_clean(s: StreamStart, spec: &StartSpec, notes: &mut Vec<String>) -> io::Result<()> {
    let (status, on_term) = s.stop()?;
    if !on_term || !status.success() {
        notes.push(format!(
            "a `stream start` did not exit cleanly on SIGTERM ({status}{}); log {}",
            if on_term { "" } else { ", needed SIGKILL" },
            spec.log.display()
        ));
    }
    if let Some(d) = spec.target.parent() {
        let _ = fs::remove_dir_all(d);
    }
    Ok(())
}

fn log_fio(what: &str, r: &FioResult) {
    eprintln!(
        "    {what:<34} {:>8.0} IOPS  p50 {:>8.1} us  p99 {:>8.1} us  ({} reads)",
        r.iops,
        r.clat_p50_ns as f64 / 1e3,
        r.clat_p99_ns as f64 / 1e3,
        r.total_ios
    );
}

fn us(ns: &[f64]) -> Vec<f64> {
    ns.iter().map(|x| x / 1e3).collect()
}

/// "median (min–max)" with `digits` decimals.
fn spread(values: &[f64], digits: usize) -> String {
    let (lo, hi) = range(values);
    if values.len() < 2 {
        return format!("{:.digits$}", median(values));
    }
    format!("{:.digits$} ({lo:.digits$}–{hi:.digits$})", median(values))
}

fn delay_params(delay_ms: u64) -> Vec<String> {
    vec![format!("delay-read={delay_ms}ms")]
}

/// Scenario 1: cold 4 KiB random reads, through `stream start --no-hydrate`
/// and directly from the delayed source.
fn cold_reads(opts: &Options, dir: &Path, f: &mut Findings) -> io::Result<()> {
    eprintln!(
        "[1] cold reads: nbdkit random {} GiB, delay-read={}ms",
        COLD_SIZE >> 30,
        opts.delay_ms
    );
    let mut params = vec![format!("size={COLD_SIZE}"), "seed=1".into()];
    params.extend(delay_params(opts.delay_ms));
    let src = servers::start_nbdkit_source(&["delay"], "random", &params, COLD_SIZE, dir, "cold")?;
    let json = dir.join("fio.json");
    for w in [RAND_READ_4K_QD1, RAND_READ_4K] {
        let (mut direct, mut lazy, mut cold_frac) = (Vec::new(), Vec::new(), Vec::new());
        for rep in 0..opts.reps {
            for turn in 0..2 {
                if (turn + rep) % 2 == 0 {
                    let r = fio::run(&src.uri, w, opts.runtime, &json)?;
                    log_fio(&format!("{} direct (rep {rep})", w.name), &r);
                    direct.push(r);
                } else {
                    let spec = fresh_spec(opts, dir, &src.uri, COLD_SIZE, "cold", true)?;
                    let s = StreamStart::spawn(&spec)?;
                    let r = fio::run(s.uri(), w, opts.runtime, &json)?;
                    let st = s.status()?;
                    let cold = counter(&st, "chunks_fetched_on_demand") as f64;
                    log_fio(&format!("{} stream (rep {rep})", w.name), &r);
                    eprintln!(
                        "      cold {:.1}% ({} fetches; engine fetch p50 {} us p99 {} us)",
                        100.0 * cold / r.total_ios as f64,
                        cold,
                        counter(&st, "foreground_fetch_p50_us"),
                        counter(&st, "foreground_fetch_p99_us")
                    );
                    cold_frac.push(100.0 * cold / r.total_ios as f64);
                    lazy.push(r);
                    stop_and_clean(s, &spec, &mut f.notes)?;
                }
            }
        }
        let cold_note = format!("{:.1}% of reads cold", median(&cold_frac));
        for (q, p, limit) in [("p50", 0.5, 1.10), ("p99", 0.99, 1.5)] {
            let pick = |v: &[FioResult]| -> Vec<f64> {
                us(&v
                    .iter()
                    .map(|r| {
                        if p < 0.9 {
                            r.clat_p50_ns as f64
                        } else {
                            r.clat_p99_ns as f64
                        }
                    })
                    .collect::<Vec<_>>())
            };
            let (a, b) = (pick(&lazy), pick(&direct));
            let ratio = median(&a) / median(&b);
            f.rows.push(Row {
                scenario: "1 cold read",
                measure: format!(
                    "4k randread QD{} {q} µs, {} ms link",
                    w.iodepth, opts.delay_ms
                ),
                stream: spread(&a, 0),
                peer: format!("{} (nbdkit direct)", spread(&b, 0)),
                ratio: Some(ratio),
                target: format!("≤ {limit:.2}×"),
                met: Some(ratio <= limit),
                note: cold_note.clone(),
            });
        }
    }
    src.guard.stop()?;
    Ok(())
}

/// `nbdcopy SRC FILE` into a fresh file ([`peers::nbdcopy`]), removed
/// afterwards; the wall time of the copy.
fn nbdcopy(src: &str, dest: &Path, size: u64, timeout: Duration) -> io::Result<Duration> {
    let (took, _) = peers::nbdcopy(src, dest, size, timeout)?;
    let _ = fs::remove_file(dest);
    Ok(took)
}

/// Hydrate a fresh `stream start`; returns it still running, with the time
/// until `hydration_complete` and the last status.
fn hydrate(
    opts: &Options,
    spec: &StartSpec,
) -> io::Result<(StreamStart, Duration, serde_json::Value)> {
    let s = StreamStart::spawn(spec)?;
    let mut last = serde_json::Value::Null;
    let took = s
        .wait_hydrated(opts.hydrate_timeout, STATUS_POLL, |st| last = st.clone())?
        .ok_or_else(|| {
            io::Error::other(format!(
                "hydration not complete after {:?} ({} of {} bytes present); log {}",
                opts.hydrate_timeout,
                counter(&last, "bytes_present"),
                counter(&last, "size"),
                spec.log.display()
            ))
        })?;
    Ok((s, took, last))
}

fn mib_s(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / (1 << 20) as f64 / d.as_secs_f64()
}

/// Warm 4 KiB QD16 random reads against `uri` after a warm-up run.
fn warm_run(opts: &Options, uri: &str, json: &Path, what: &str) -> io::Result<f64> {
    fio::run(uri, RAND_READ_4K, opts.warmup, json)?;
    let r = fio::run(uri, RAND_READ_4K, opts.runtime, json)?;
    log_fio(what, &r);
    Ok(r.iops)
}

/// Scenarios 3 and 2: hydration time against nbdcopy; then warm reads on
/// the hydrated volume against qemu-nbd on its target.
fn hydration_and_warm(opts: &Options, dir: &Path, f: &mut Findings) -> io::Result<()> {
    let size = opts.dense_size;
    let image = dir.join("dense.img");
    eprintln!(
        "[3] hydration: {} MiB pseudo-random file {}",
        size >> 20,
        image.display()
    );
    testfile::create(&image, size)?;
    let json = dir.join("fio.json");
    let bins = Binaries {
        stream: opts.stream_bin.clone(),
    };
    let copy_timeout = opts.hydrate_timeout;
    let mut warm_stream = Vec::new();
    let mut warm_qemu = Vec::new();
    for delay in [0, opts.delay_ms] {
        let mut params = vec![image.display().to_string()];
        let filters: &[&str] = if delay > 0 {
            params.extend(delay_params(delay));
            &["delay"]
        } else {
            &[]
        };
        let src = servers::start_nbdkit_source(filters, "file", &params, size, dir, "dense")?;
        let (mut lazy, mut copy) = (Vec::new(), Vec::new());
        for rep in 0..opts.reps {
            // Same hot source for both, and alternate who goes first.
            testfile::warm(&image)?;
            let mut order = [true, false];
            if rep % 2 == 1 {
                order.reverse();
            }
            for is_stream in order {
                if !is_stream {
                    let t = nbdcopy(&src.uri, &dir.join("copy.img"), size, copy_timeout)?;
                    eprintln!(
                        "    nbdcopy   delay {delay} ms rep {rep}: {:.2} s, {:.0} MiB/s",
                        t.as_secs_f64(),
                        mib_s(size, t)
                    );
                    copy.push(mib_s(size, t));
                    continue;
                }
                let spec = fresh_spec(opts, dir, &src.uri, size, "hydrate", false)?;
                let (s, t, st) = hydrate(opts, &spec)?;
                eprintln!(
                    "    stream    delay {delay} ms rep {rep}: {:.2} s, {:.0} MiB/s ({} fetched)",
                    t.as_secs_f64(),
                    mib_s(size, t),
                    counter(&st, "bytes_fetched")
                );
                lazy.push(mib_s(size, t));
                if delay == 0 && opts.scenarios.contains(&2) {
                    let target = spec.target.clone();
                    // Write back what hydration left dirty, so neither server
                    // competes with writeback.
                    File::open(&target)?.sync_all()?;
                    let run_qemu = |v: &mut Vec<f64>| -> io::Result<()> {
                        let q = servers::start(
                            ServerKind::QemuNbd,
                            Transport::Unix,
                            &target,
                            size,
                            dir,
                            &bins,
                            "warm",
                        )?;
                        v.push(warm_run(opts, &q.uri, &json, "warm qemu-nbd")?);
                        q.guard.stop()?;
                        Ok(())
                    };
                    if rep % 2 == 0 {
                        warm_stream.push(warm_run(opts, s.uri(), &json, "warm stream start")?);
                        s.stop()?;
                        run_qemu(&mut warm_qemu)?;
                    } else {
                        // qemu-nbd first, then the same migration resumed.
                        s.stop()?;
                        run_qemu(&mut warm_qemu)?;
                        let mut again = fresh_spec(opts, dir, &src.uri, size, "resume", false)?;
                        again.target = target.clone();
                        again.state = spec.state.clone();
                        let s = StreamStart::spawn(&again)?;
                        warm_stream.push(warm_run(opts, s.uri(), &json, "warm stream start")?);
                        stop_and_clean(s, &again, &mut f.notes)?;
                    }
                    let _ = fs::remove_dir_all(spec.target.parent().unwrap_or(dir));
                } else {
                    stop_and_clean(s, &spec, &mut f.notes)?;
                }
            }
        }
        let ratio = median(&lazy) / median(&copy);
        f.rows.push(Row {
            scenario: "3 hydration",
            measure: format!(
                "{} MiB dense, {} link, MiB/s",
                size >> 20,
                if delay == 0 {
                    "no delay".to_string()
                } else {
                    format!("{delay} ms")
                }
            ),
            stream: spread(&lazy, 0),
            peer: format!("{} (nbdcopy)", spread(&copy, 0)),
            ratio: Some(ratio),
            target: "≥ 0.90×".into(),
            met: Some(ratio >= 0.9),
            note: "time from process start to hydration_complete".into(),
        });
        src.guard.stop()?;
    }
    fs::remove_file(&image)?;
    if !warm_stream.is_empty() {
        let ratio = median(&warm_stream) / median(&warm_qemu);
        f.rows.push(Row {
            scenario: "2 warm read",
            measure: "4k randread QD16 IOPS, hydrated volume".into(),
            stream: spread(&warm_stream, 0),
            peer: format!("{} (qemu-nbd on target)", spread(&warm_qemu, 0)),
            ratio: Some(ratio),
            target: "≥ 1.00×".into(),
            met: Some(ratio >= 1.0),
            note: "target file synced, page-cache hot".into(),
        });
    }
    if opts.scenarios.contains(&3) {
        sparse_hydration(opts, dir, f)?;
    }
    Ok(())
}

/// Scenario 3, sparse half: a disk with 10 % data must not cost a full read.
fn sparse_hydration(opts: &Options, dir: &Path, f: &mut Findings) -> io::Result<()> {
    let size = opts.dense_size;
    eprintln!(
        "[3] sparse hydration: sparse-random {} MiB, 10% data",
        size >> 20
    );
    let params = vec![format!("size={size}"), "percent=10".into(), "seed=7".into()];
    let src = servers::start_nbdkit_source(&[], "sparse-random", &params, size, dir, "sparse")?;
    let (mut lazy, mut copy, mut fetched) = (Vec::new(), Vec::new(), Vec::new());
    for rep in 0..opts.reps {
        let t = nbdcopy(&src.uri, &dir.join("copy.img"), size, opts.hydrate_timeout)?;
        copy.push(mib_s(size, t));
        let spec = fresh_spec(opts, dir, &src.uri, size, "sparse", false)?;
        let (s, t, st) = hydrate(opts, &spec)?;
        let pct = 100.0 * counter(&st, "bytes_fetched") as f64 / size as f64;
        eprintln!(
            "    rep {rep}: stream {:.2} s ({:.1}% of the disk fetched, {} hole chunks), nbdcopy {:.0} MiB/s",
            t.as_secs_f64(),
            pct,
            counter(&st, "chunks_source_holes"),
            copy[rep]
        );
        lazy.push(mib_s(size, t));
        fetched.push(pct);
        stop_and_clean(s, &spec, &mut f.notes)?;
    }
    let data = data_percent(&src.uri).unwrap_or(f64::NAN);
    src.guard.stop()?;
    let ratio = median(&lazy) / median(&copy);
    f.rows.push(Row {
        scenario: "3 hydration",
        measure: format!("{} MiB, 10% data, disk MiB/s", size >> 20),
        stream: spread(&lazy, 0),
        peer: format!("{} (nbdcopy)", spread(&copy, 0)),
        ratio: Some(ratio),
        target: "–".into(),
        met: None,
        note: "informative: both skip holes".into(),
    });
    f.rows.push(Row {
        scenario: "3 hydration",
        measure: format!("{} MiB, 10% data: bytes fetched, % of disk", size >> 20),
        stream: spread(&fetched, 1),
        peer: format!("{data:.1} (data per nbdinfo --map)"),
        ratio: None,
        target: "≤ 15%".into(),
        met: Some(median(&fetched) <= 15.0),
        note: "`volume.bytes_fetched`".into(),
    });
    Ok(())
}

/// Percentage of `uri` that is data, from `nbdinfo --map --totals`.
fn data_percent(uri: &str) -> Option<f64> {
    let out = dir_tmp("map");
    let mut cmd = Command::new("nbdinfo");
    cmd.args(["--map", "--totals", uri])
        .stdin(Stdio::null())
        .stdout(File::create(&out).ok()?)
        .stderr(Stdio::null());
    let mut g = ChildGuard::spawn("nbdinfo", &mut cmd).ok()?;
    g.wait_timeout(Duration::from_secs(30)).ok()??;
    let text = fs::read_to_string(&out).ok()?;
    let _ = fs::remove_file(&out);
    // "  SIZE  PCT%  TYPE  DESCRIPTION": type 0 is data.
    text.lines().find_map(|l| {
        let mut w = l.split_whitespace();
        let (_, pct, ty) = (w.next()?, w.next()?, w.next()?);
        (ty == "0").then(|| pct.trim_end_matches('%').parse().ok())?
    })
}

fn dir_tmp(what: &str) -> PathBuf {
    std::env::temp_dir().join(format!("start-bench-{what}-{}", std::process::id()))
}

/// Scenario 4: foreground QD1 p99 while hydration runs flat out, against
/// the same reads with `--no-hydrate`.
fn foreground_under_hydration(opts: &Options, dir: &Path, f: &mut Findings) -> io::Result<()> {
    eprintln!(
        "[4] foreground under hydration: nbdkit random {} GiB, delay-read={}ms",
        COLD_SIZE >> 30,
        opts.delay_ms
    );
    let mut params = vec![format!("size={COLD_SIZE}"), "seed=2".into()];
    params.extend(delay_params(opts.delay_ms));
    let src = servers::start_nbdkit_source(&["delay"], "random", &params, COLD_SIZE, dir, "fg")?;
    let json = dir.join("fio.json");
    let region = [
        format!("--offset={}", COLD_SIZE - PRESENT_REGION),
        format!("--size={PRESENT_REGION}"),
    ];
    for present in [false, true] {
        let kind = if present { "present" } else { "cold" };
        let (mut idle, mut busy, mut rates, mut cold) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for rep in 0..opts.reps {
            let mut order = [false, true];
            if rep % 2 == 1 {
                order.reverse();
            }
            for hydrating in order {
                let spec = fresh_spec(opts, dir, &src.uri, COLD_SIZE, "fg", !hydrating)?;
                let s = StreamStart::spawn(&spec)?;
                let extra: &[String] = if present {
                    // Read the region once so every chunk of it is present.
                    let seq = Workload {
                        name: "seqread 1M qd4",
                        rw: "read",
                        block_size: "1M",
                        iodepth: 4,
                    };
                    fio::run_with(s.uri(), seq, None, &json, &region)?;
                    &region
                } else {
                    &[]
                };
                let before = s.status()?;
                let t0 = Instant::now();
                let r = fio::run_with(s.uri(), RAND_READ_4K_QD1, Some(opts.runtime), &json, extra)?;
                let dt = t0.elapsed();
                let after = s.status()?;
                let hydrated = (counter(&after, "chunks_hydrated")
                    - counter(&before, "chunks_hydrated"))
                    * counter(&after, "chunk_size");
                let on_demand = counter(&after, "chunks_fetched_on_demand")
                    - counter(&before, "chunks_fetched_on_demand");
                let what = format!(
                    "{kind} {} (rep {rep})",
                    if hydrating { "hydrating" } else { "idle" }
                );
                log_fio(&what, &r);
                eprintln!(
                    "      hydrated {:.0} MiB/s meanwhile; {:.1}% of reads cold; complete: {}",
                    mib_s(hydrated, dt),
                    100.0 * on_demand as f64 / r.total_ios as f64,
                    after["volume"]["hydration_complete"]
                );
                cold.push(100.0 * on_demand as f64 / r.total_ios as f64);
                if hydrating {
                    busy.push(r.clat_p99_ns as f64 / 1e3);
                    rates.push(mib_s(hydrated, dt));
                } else {
                    idle.push(r.clat_p99_ns as f64 / 1e3);
                }
                stop_and_clean(s, &spec, &mut f.notes)?;
            }
        }
        let ratio = median(&busy) / median(&idle);
        f.rows.push(Row {
            scenario: "4 fg under hydration",
            measure: format!(
                "4k randread QD1 p99 µs, {kind} chunks{}",
                if present { " (64 MiB region)" } else { "" }
            ),
            stream: format!("{} hydrating", spread(&busy, 0)),
            peer: format!("{} idle (--no-hydrate)", spread(&idle, 0)),
            ratio: Some(ratio),
            target: "≤ 2.00×".into(),
            met: Some(ratio <= 2.0),
            note: format!(
                "hydration {} MiB/s meanwhile; {:.1}% of reads cold",
                spread(&rates, 0),
                median(&cold)
            ),
        });
    }
    src.guard.stop()?;
    Ok(())
}

/// Scenario 5: peak resident memory over a 1 TiB sparse source.
fn memory(opts: &Options, dir: &Path, f: &mut Findings) -> io::Result<()> {
    eprintln!("[5] memory: sparse-random 1 TiB, 0.1% data");
    let params = vec![
        format!("size={HUGE_SIZE}"),
        "percent=0.1".into(),
        "seed=3".into(),
    ];
    let src = servers::start_nbdkit_source(&[], "sparse-random", &params, HUGE_SIZE, dir, "huge")?;
    let spec = fresh_spec(opts, dir, &src.uri, HUGE_SIZE, "huge", false)?;
    let s = StreamStart::spawn(&spec)?;
    let pid = s.pid();
    let mut rss_max = 0;
    let mut last = serde_json::Value::Null;
    let took = s.wait_hydrated(opts.hydrate_timeout, Duration::from_millis(100), |st| {
        rss_max = rss_max.max(mem::status_kib(pid, "VmRSS").unwrap_or(0));
        last = st.clone();
    })?;
    let hydrating_hwm = mem::status_kib(pid, "VmHWM")?;
    let state = match took {
        Some(t) => format!("hydration complete in {:.1} s", t.as_secs_f64()),
        None => format!(
            "hydration {:.1}% at the {} s bound",
            100.0 * counter(&last, "bytes_present") as f64 / HUGE_SIZE as f64,
            opts.hydrate_timeout.as_secs()
        ),
    };
    eprintln!(
        "    hydrating: VmHWM {} KiB (VmRSS max sampled {rss_max} KiB); {state}; {} fetched",
        hydrating_hwm,
        counter(&last, "bytes_fetched")
    );
    mem::reset_peak(pid)?;
    let json = dir.join("fio.json");
    let r = fio::run(s.uri(), RAND_READ_4K, opts.runtime, &json)?;
    log_fio("serving 1 TiB volume", &r);
    let serving_hwm = mem::status_kib(pid, "VmHWM")?;
    eprintln!("    serving: VmHWM {serving_hwm} KiB");
    stop_and_clean(s, &spec, &mut f.notes)?;
    src.guard.stop()?;
    let limit = 64 << 10;
    for (phase, kib) in [
        ("learning holes + hydrating", hydrating_hwm),
        ("serving QD16 randread", serving_hwm),
    ] {
        f.rows.push(Row {
            scenario: "5 memory",
            measure: format!("1 TiB sparse source, peak VmHWM MiB, {phase}"),
            stream: format!("{:.1}", kib as f64 / 1024.0),
            peer: "–".into(),
            ratio: None,
            target: "< 64 MiB".into(),
            met: Some(kib < limit),
            note: if phase.starts_with("learning") {
                state.clone()
            } else {
                format!("{:.0} IOPS", r.iops)
            },
        });
    }
    Ok(())
}

fn report(opts: &Options, f: &Findings, elapsed: Duration) -> String {
    let mut out = String::new();
    report::write_header(
        &mut out,
        BEGIN_MARK,
        "Start benchmark (`stream start`, issue 3)",
        "start-bench",
    );
    let _ = writeln!(out, "- nbdcopy: {}", shell_line("nbdcopy", &["--version"]));
    let _ = writeln!(
        out,
        "- method: {} mode, {} repetitions (median, min–max in parentheses), {} s fio runs; \
         sources are nbdkit on a unix socket, `--filter=delay delay-read={}ms` as the remote link \
         where a delay is named; fio nbd engine, 1 job; every `stream start` on a fresh target \
         and state unless resumed; load average at the end {}; wall time {:.0} s",
        if opts.quick { "quick" } else { "full" },
        opts.reps,
        opts.runtime.as_secs(),
        opts.delay_ms,
        loadavg(),
        elapsed.as_secs_f64()
    );
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "| scenario | measurement | stream start | peer | ratio | target | met | notes |"
    );
    let _ = writeln!(out, "|---|---|---:|---:|---:|---|---|---|");
    for r in &f.rows {
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} | {} | {} |",
            r.scenario,
            r.measure,
            r.stream,
            r.peer,
            r.ratio.map_or("–".into(), |x| format!("{x:.2}×")),
            r.target,
            match r.met {
                Some(true) => "**met**",
                Some(false) => "**missed**",
                None => "–",
            },
            r.note
        );
    }
    if !f.notes.is_empty() {
        let _ = writeln!(out);
        for n in &f.notes {
            let _ = writeln!(out, "- {n}");
        }
    }
    let _ = writeln!(out, "{END_MARK}");
    out
}
