//! The export benchmark: `stream export` against qemu-nbd and nbdkit.
//!
//! One run creates a test file, then serves it with each server in turn
//! (never two at once: the machine may have only 2 cores) and drives each
//! with fio's nbd engine: 4 KiB random reads at QD16 and 1 MiB sequential
//! reads at QD4. Each repetition starts the servers afresh in a rotated
//! order, warms each one up, and measures both workloads while sampling
//! the server's CPU time. The table shows medians over repetitions.
//!
//! Build the server first, then run:
//!
//! ```text
//! cargo build --release --bin stream
//! cargo run --release -p stream-benches --bin export-bench -- [--quick] [--write benches/RESULTS.md]
//! ```

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs;
use std::io;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use stream_benches::cpu::process_cpu_time;
use stream_benches::fio::{self, FioResult, RAND_READ_4K, SEQ_READ_1M, Workload};
use stream_benches::report::{self, write_between_markers};
use stream_benches::scratch::ScratchDir;
use stream_benches::servers::{self, Binaries, ServerKind, Transport};
use stream_benches::stats::{median, range};
use stream_benches::testfile;

const USAGE: &str = "\
usage: export-bench [--quick] [--size-mib N] [--runtime SECS] [--reps N]
                    [--servers stream,qemu-nbd,nbdkit] [--transports unix,tcp]
                    [--stream-bin PATH] [--dir DIR] [--write FILE]

Needs `cargo build --release --bin stream` first (or --stream-bin), and
fio (nbd engine), nbdinfo, qemu-nbd and nbdkit on PATH.
  --quick        4 s runs, 1 s warm-up (default 15 s, 3 s)
  --write FILE   also write the report into FILE (replacing the section
                 between the export-bench markers, keeping the rest)";

const BEGIN_MARK: &str = "<!-- export-bench:begin (generated; edit outside the markers) -->";
const END_MARK: &str = "<!-- export-bench:end -->";

struct Options {
    size: u64,
    runtime: Duration,
    warmup: Duration,
    reps: usize,
    servers: Vec<ServerKind>,
    transports: Vec<Transport>,
    stream_bin: PathBuf,
    dir: PathBuf,
    write: Option<PathBuf>,
}

fn parse_args() -> Result<Options, String> {
    let target = stream_benches::bench_main::target_dir();
    let mut o = Options {
        size: 1 << 30,
        runtime: Duration::from_secs(15),
        warmup: Duration::from_secs(3),
        reps: 3,
        servers: ServerKind::ALL.to_vec(),
        transports: vec![Transport::Unix, Transport::Tcp],
        stream_bin: target.join("release/stream"),
        dir: std::env::temp_dir(),
        write: None,
    };
    let mut args = std::env::args().skip(1);
    let mut runtime_set = false;
    while let Some(a) = args.next() {
        let mut value = |name: &str| args.next().ok_or(format!("{name} needs a value"));
        match a.as_str() {
            "--quick" => {
                if !runtime_set {
                    o.runtime = Duration::from_secs(4);
                }
                o.warmup = Duration::from_secs(1);
            }
            "--size-mib" => {
                let n: u64 = value("--size-mib")?.parse().map_err(|e| format!("{e}"))?;
                o.size = n << 20;
            }
            "--runtime" => {
                let n: u64 = value("--runtime")?.parse().map_err(|e| format!("{e}"))?;
                o.runtime = Duration::from_secs(n.max(1));
                runtime_set = true;
            }
            "--reps" => o.reps = value("--reps")?.parse().map_err(|e| format!("{e}"))?,
            "--servers" => {
                o.servers = value("--servers")?
                    .split(',')
                    .map(|s| ServerKind::parse(s).ok_or(format!("unknown server {s}")))
                    .collect::<Result<_, _>>()?
            }
            "--transports" => {
                o.transports = value("--transports")?
                    .split(',')
                    .map(|s| Transport::parse(s).ok_or(format!("unknown transport {s}")))
                    .collect::<Result<_, _>>()?
            }
            "--stream-bin" => o.stream_bin = value("--stream-bin")?.into(),
            "--dir" => o.dir = value("--dir")?.into(),
            "--write" => o.write = Some(value("--write")?.into()),
            "-h" | "--help" => return Err(String::new()),
            other => return Err(format!("unknown argument {other}")),
        }
    }
    if o.reps == 0 || o.servers.is_empty() || o.transports.is_empty() {
        return Err("nothing to measure".into());
    }
    Ok(o)
}

/// One measured fio run and the server CPU time it cost.
struct Sample {
    transport: Transport,
    server: ServerKind,
    workload: &'static str,
    fio: FioResult,
    server_cpu: Duration,
}

fn main() -> ExitCode {
    let opts = match parse_args() {
        Ok(o) => o,
        Err(e) => {
            if !e.is_empty() {
                eprintln!("export-bench: {e}");
            }
            eprintln!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    if opts.servers.contains(&ServerKind::Stream) && !opts.stream_bin.is_file() {
        eprintln!(
            "export-bench: {} not found: run `cargo build --release --bin stream` first \
             (or pass --stream-bin, or --servers qemu-nbd,nbdkit)",
            opts.stream_bin.display()
        );
        return ExitCode::from(2);
    }
    match run(&opts) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("export-bench: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(opts: &Options) -> io::Result<()> {
    let started = Instant::now();
    let scratch = ScratchDir(
        opts.dir
            .join(format!("export-bench.{}", std::process::id())),
    );
    fs::create_dir_all(&scratch.0)?;
    let file = scratch.0.join("disk.img");
    eprintln!(
        "creating {} MiB test file {}",
        opts.size >> 20,
        file.display()
    );
    testfile::create(&file, opts.size)?;
    testfile::warm(&file)?;

    let bins = Binaries {
        stream: opts.stream_bin.clone(),
    };
    let workloads = [RAND_READ_4K, SEQ_READ_1M];
    let mut samples = Vec::new();
    let mut exits = Vec::new();
    for &transport in &opts.transports {
        for rep in 0..opts.reps {
            // Rotate the order so no server always runs first or last.
            let n = opts.servers.len();
            for i in 0..n {
                let kind = opts.servers[(i + rep) % n];
                // Keep the file hot however long the previous server ran.
                testfile::warm(&file)?;
                let tag = format!("{transport}-{rep}");
                let server =
                    servers::start(kind, transport, &file, opts.size, &scratch.0, &bins, &tag)?;
                eprintln!(
                    "[{transport} rep {rep}] {kind} pid {} at {}",
                    server.pid(),
                    server.uri
                );
                let json = scratch.0.join("fio.json");
                fio::run(&server.uri, RAND_READ_4K, opts.warmup, &json)?;
                for w in workloads {
                    let before = process_cpu_time(server.pid())?;
                    let r = fio::run(&server.uri, w, opts.runtime, &json)?;
                    let after = process_cpu_time(server.pid())?;
                    eprintln!(
                        "    {:<18} {:>10.0} IOPS {:>8.1} MiB/s  p50 {:>7.1} us  p99 {:>7.1} us",
                        w.name,
                        r.iops,
                        r.bw_bytes / (1 << 20) as f64,
                        r.clat_p50_ns as f64 / 1e3,
                        r.clat_p99_ns as f64 / 1e3
                    );
                    samples.push(Sample {
                        transport,
                        server: kind,
                        workload: w.name,
                        fio: r,
                        server_cpu: after.saturating_sub(before),
                    });
                }
                let log = server.log.clone();
                let (status, on_term) = server.guard.stop()?;
                if !on_term || !status.success() {
                    exits.push(format!(
                        "{kind} ({transport}): {status}{}; log {}",
                        if on_term { "" } else { ", needed SIGKILL" },
                        log.display()
                    ));
                }
            }
        }
    }
    let report = report(opts, &workloads, &samples, &exits, started.elapsed());
    println!("{report}");
    if let Some(path) = &opts.write {
        write_between_markers(path, &report, BEGIN_MARK, END_MARK)?;
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}

/// Aggregates over the repetitions of one (transport, workload, server).
struct Row {
    iops: f64,
    iops_range: (f64, f64),
    mib_s: f64,
    p50_us: f64,
    p99_us: f64,
    cpu_pct: f64,
    cpu_us_per_io: f64,
    cpu_s_per_gib: f64,
    client_cpu_pct: f64,
}

fn aggregate(samples: &[&Sample]) -> Row {
    let col =
        |f: &dyn Fn(&FioResult) -> f64| -> Vec<f64> { samples.iter().map(|s| f(&s.fio)).collect() };
    let iops = col(&|r| r.iops);
    let cpu: f64 = samples.iter().map(|s| s.server_cpu.as_secs_f64()).sum();
    let wall: f64 = samples.iter().map(|s| s.fio.runtime.as_secs_f64()).sum();
    let ios: u64 = samples.iter().map(|s| s.fio.total_ios).sum();
    let bytes: u64 = samples.iter().map(|s| s.fio.io_bytes).sum();
    Row {
        iops: median(&iops),
        iops_range: range(&iops),
        mib_s: median(&col(&|r| r.bw_bytes)) / (1 << 20) as f64,
        p50_us: median(&col(&|r| r.clat_p50_ns as f64)) / 1e3,
        p99_us: median(&col(&|r| r.clat_p99_ns as f64)) / 1e3,
        cpu_pct: 100.0 * cpu / wall,
        cpu_us_per_io: 1e6 * cpu / ios as f64,
        cpu_s_per_gib: cpu / (bytes as f64 / (1u64 << 30) as f64),
        client_cpu_pct: median(&col(&|r| r.client_cpu_pct)),
    }
}

fn report(
    opts: &Options,
    workloads: &[Workload],
    samples: &[Sample],
    exits: &[String],
    elapsed: Duration,
) -> String {
    let mut out = String::new();
    report::write_header(&mut out, BEGIN_MARK, "Export benchmark", "export-bench");
    let _ = writeln!(
        out,
        "- method: {} MiB pseudo-random file, page-cache hot; servers one at a time, \
         restarted for each of {} repetitions in rotated order; {} s fio warm-up, then \
         {} s per workload (fio nbd engine, 1 job, 1 connection); medians over repetitions; \
         server CPU = utime+stime of the server process over the measured fio run; \
         wall time {:.0} s",
        opts.size >> 20,
        opts.reps,
        opts.warmup.as_secs(),
        opts.runtime.as_secs(),
        elapsed.as_secs_f64()
    );
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "| transport | workload | server | IOPS (min–max) | MiB/s | p50 µs | p99 µs | vs qemu-nbd | server CPU % | CPU µs/IO | CPU s/GiB | fio CPU % |"
    );
    let _ = writeln!(
        out,
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    );
    for &t in &opts.transports {
        for w in workloads {
            let mut rows = BTreeMap::new();
            for (i, &k) in opts.servers.iter().enumerate() {
                let s: Vec<&Sample> = samples
                    .iter()
                    .filter(|s| s.transport == t && s.server == k && s.workload == w.name)
                    .collect();
                if !s.is_empty() {
                    rows.insert(i, (k, aggregate(&s)));
                }
            }
            let base = rows
                .values()
                .find(|(k, _)| *k == ServerKind::QemuNbd)
                .map(|(_, r)| r.iops);
            for (k, r) in rows.values() {
                let ratio = base.map_or("–".to_string(), |b| format!("{:.2}×", r.iops / b));
                let _ = writeln!(
                    out,
                    "| {t} | {} | {k} | {:.0} ({:.0}–{:.0}) | {:.1} | {:.1} | {:.1} | {ratio} | {:.0} | {:.2} | {:.3} | {:.0} |",
                    w.name,
                    r.iops,
                    r.iops_range.0,
                    r.iops_range.1,
                    r.mib_s,
                    r.p50_us,
                    r.p99_us,
                    r.cpu_pct,
                    r.cpu_us_per_io,
                    r.cpu_s_per_gib,
                    r.client_cpu_pct,
                );
            }
        }
    }
    if !exits.is_empty() {
        let _ = writeln!(out, "\nServers that did not exit cleanly on SIGTERM:\n");
        for e in exits {
            let _ = writeln!(out, "- {e}");
        }
    }
    let _ = writeln!(out, "{END_MARK}");
    out
}
