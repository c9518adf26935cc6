//! Issue 19's memory row: peak resident memory of `stream start` fully
//! hydrating a huge sparse source, at several disk sizes with the same
//! share of data, to see whether it is flat in the disk's size.
//!
//! The source is nbdkit's `sparse-random` plugin (random data in
//! `percent`% of the disk, holes elsewhere, reported by block status; no
//! disk space on the legacy side); the target a sparse file. `stream
//! start` hydrates everything (holes learnt, data fetched); the bench
//! polls its status until complete and reads `VmHWM` (peak resident set)
//! from `/proc/PID/status` then, and the CPU time it used.
//!
//! ```text
//! cargo build --release -p stream-cli --bin stream -p stream-benches --bin mem_bench
//! target/release/mem_bench [--sizes 64G,256G,1T] [--percent 1]
//! ```

use std::fmt::Write as _;
use std::fs;
use std::io;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use stream_benches::cpu::process_cpu_time;
use stream_benches::lazy::{self, StartSpec, StreamStart};
use stream_benches::mem::status_kib;
use stream_benches::report::{loadavg, machine};
use stream_benches::scratch::ScratchDir;
use test_support::nbdkit::Nbdkit;

const USAGE: &str = "\
usage: mem_bench [--sizes 64G,256G,1T] [--percent 1] [--stream-bin PATH] [--dir DIR]";

const LONG: Duration = Duration::from_secs(3600);

struct Options {
    sizes: Vec<String>,
    percent: f64,
    stream_bin: PathBuf,
    dir: PathBuf,
}

fn parse_args() -> Result<Options, String> {
    let target = stream_benches::bench_main::target_dir();
    let mut o = Options {
        sizes: vec!["64G".into(), "256G".into(), "1T".into()],
        percent: 1.0,
        stream_bin: target.join("release/stream"),
        dir: target.join("mem-bench"),
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = || args.next().ok_or_else(|| format!("{a} needs a value"));
        match a.as_str() {
            "--sizes" => o.sizes = value()?.split(',').map(str::to_string).collect(),
            "--percent" => o.percent = value()?.parse().map_err(|_| "bad --percent".to_string())?,
            "--stream-bin" => o.stream_bin = PathBuf::from(value()?),
            "--dir" => o.dir = PathBuf::from(value()?),
            "-h" | "--help" => return Err(String::new()),
            _ => return Err(format!("unknown argument {a:?}")),
        }
    }
    Ok(o)
}

fn main() -> ExitCode {
    stream_benches::bench_main::run(
        "mem_bench",
        USAGE,
        parse_args(),
        |o: &Options| o.stream_bin.as_path(),
        run,
    )
}

fn bytes_of(size: &str) -> io::Result<u64> {
    let (n, unit) = size.split_at(size.len() - 1);
    let n: u64 = n
        .parse()
        .map_err(|_| io::Error::other(format!("bad size {size}")))?;
    Ok(n << match unit {
        "G" => 30,
        "T" => 40,
        _ => return Err(io::Error::other(format!("size {size}: use G or T"))),
    })
}

fn run(opts: &Options) -> io::Result<String> {
    fs::create_dir_all(&opts.dir)?;
    let dir = opts.dir.canonicalize()?;
    let bin = opts.stream_bin.canonicalize()?;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "- command: `target/release/mem_bench --sizes {} --percent {}`",
        opts.sizes.join(","),
        opts.percent
    );
    for (k, v) in machine() {
        let _ = writeln!(out, "- {k}: {v}");
    }
    let _ = writeln!(out, "- load average at start: {}\n", loadavg());
    let _ = writeln!(
        out,
        "| disk | data | chunks | hydrated in s | peak RSS MiB | RSS at the end MiB | CPU s | CPU s/GiB of data |\n|---|---:|---:|---:|---:|---:|---:|---:|"
    );
    for size in &opts.sizes {
        let bytes = bytes_of(size)?;
        let run_dir = ScratchDir(dir.join(format!("run-{size}")));
        let _ = fs::remove_dir_all(&run_dir.0);
        fs::create_dir_all(&run_dir.0)?;
        let kit = Nbdkit::start(
            &run_dir.0.join("nbdkit.sock"),
            &dir.join(format!("nbdkit-{size}.log")),
            &[
                "-r".to_string(),
                "sparse-random".to_string(),
                format!("size={bytes}"),
                format!("percent={}", opts.percent),
                "seed=19".to_string(),
            ],
        )?;
        let uri = kit.uri();
        let start = StreamStart::spawn(&StartSpec {
            bin: &bin,
            source: &uri,
            target: run_dir.0.join("target.raw"),
            state: run_dir.0.join("state"),
            socket: run_dir.0.join("start.sock"),
            log: dir.join(format!("start-{size}.log")),
            size: bytes,
            no_hydrate: false,
        })?;
        let pid = start.pid();
        let mut peak_seen = 0;
        let took = start
            .wait_hydrated(LONG, Duration::from_millis(500), |_| {
                peak_seen = peak_seen.max(status_kib(pid, "VmHWM").unwrap_or(0));
            })?
            .ok_or_else(|| io::Error::other("hydration did not finish within an hour"))?;
        let st = start.status()?;
        let peak = status_kib(pid, "VmHWM")?.max(peak_seen);
        let rss = status_kib(pid, "VmRSS")?;
        let cpu = process_cpu_time(pid)?;
        let data = lazy::counter(&st, "bytes_fetched");
        let chunks = st["volume"]["chunks_total"].as_u64().unwrap_or(0);
        start.stop()?;
        drop(kit);
        let gib = data as f64 / (1u64 << 30) as f64;
        let _ = writeln!(
            out,
            "| {size} | {:.2} GiB | {chunks} | {:.1} | {:.1} | {:.1} | {:.1} | {:.2} |",
            gib,
            took.as_secs_f64(),
            peak as f64 / 1024.0,
            rss as f64 / 1024.0,
            cpu.as_secs_f64(),
            cpu.as_secs_f64() / gib.max(1e-9)
        );
        eprintln!("mem_bench: {size}: {:?} peak {peak} KiB", took);
    }
    let _ = writeln!(out, "\n- load average at end: {}", loadavg());
    Ok(out)
}
