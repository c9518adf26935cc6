//! Issue 18: the SSH source beside the NBD source, same disk, same link.
//!
//! One legacy disk (pseudo-random data in every block, so neither source
//! can skip a hole: SFTP cannot see them anyway), served two ways from this
//! machine: `stream export DISK` on 127.0.0.1 (NBD), and Debian's sshd
//! with its `sftp-server` (SSH). In front of each, the same delaying TCP
//! proxy (half the round trip added in each direction, per buffer read
//! from the socket), so both see the same link. Per link delay and source:
//!
//! - **cold 4 KiB reads**: a fresh `stream start --no-hydrate`, fio's nbd
//!   engine reading 4 KiB at random at queue depth 1, 400 reads (nearly
//!   every one in a chunk never fetched); p50 and p99 completion latency;
//! - **hydration**: a fresh `stream start`, from launch to hydration
//!   complete; the rate, and the CPU seconds per GiB on each side: the
//!   cloud side is `stream start` and its `ssh` children, the legacy side
//!   `stream export`, or sshd's processes for the session (sshd, its
//!   session child, sftp-server).
//!
//! Every process is in a `ChildGuard` (killed by PID on drop); every wait
//! has a deadline. The disk and targets are removed at the end.
//!
//! ```text
//! cargo build --release -p stream-cli --bin stream -p stream-benches --bin ssh_bench
//! target/release/ssh_bench [--delays 0,1,5] [--mib 512] [--dir DIR]
//! ```

use std::fmt::Write as _;
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use stream_benches::cpu::process_cpu_time;
use stream_benches::fio::{self, RAND_READ_4K_QD1};
use stream_benches::lazy::{StartSpec, StreamStart};
use stream_benches::report::{loadavg, machine};
use stream_benches::scratch::ScratchDir;
use stream_benches::servers::read_uri_line;
use test_support::child::ChildGuard;
use test_support::sshd::Sshd;

const USAGE: &str = "\
usage: ssh_bench [--delays 0,1,5] [--mib 512] [--runs 3] [--data-pct 100]
                 [--stream-bin PATH] [--dir DIR]

  --delays LIST  link round trips in ms (default 0,1,5)
  --mib N        disk size in MiB (default 512)
  --data-pct N   share of 64 KiB chunks holding data, the rest holes
                 (default 100: no holes); NBD skips holes, SFTP cannot see them
  --runs N       runs of each measure, reported as medians (default 3)";

const LONG: Duration = Duration::from_secs(1800);
/// Cold reads per run.
const COLD_READS: u64 = 400;

struct Options {
    delays: Vec<u64>,
    mib: u64,
    runs: usize,
    data_pct: u64,
    stream_bin: PathBuf,
    dir: PathBuf,
}

fn parse_args() -> Result<Options, String> {
    let target = stream_benches::bench_main::target_dir();
    let mut o = Options {
        delays: vec![0, 1, 5],
        mib: 512,
        runs: 3,
        data_pct: 100,
        stream_bin: target.join("release/stream"),
        dir: target.join("ssh-bench"),
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = || args.next().ok_or_else(|| format!("{a} needs a value"));
        match a.as_str() {
            "--delays" => {
                o.delays = value()?
                    .split(',')
                    .map(|d| d.parse().map_err(|_| format!("bad delay {d:?}")))
                    .collect::<Result<_, _>>()?;
            }
            "--mib" => o.mib = value()?.parse().map_err(|_| "bad --mib".to_string())?,
            "--data-pct" => {
                o.data_pct = value()?
                    .parse()
                    .ok()
                    .filter(|&n| (1..=100).contains(&n))
                    .ok_or("bad --data-pct (1 to 100)")?
            }
            "--runs" => {
                o.runs = value()?
                    .parse()
                    .ok()
                    .filter(|&n| n > 0)
                    .ok_or("bad --runs")?
            }
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
        "ssh_bench",
        USAGE,
        parse_args(),
        |o: &Options| o.stream_bin.as_path(),
        run,
    )
}

/// A TCP proxy that holds every buffer `one_way` before passing it on.
struct DelayProxy {
    port: u16,
    stop: Arc<AtomicBool>,
}

impl DelayProxy {
    fn start(upstream: SocketAddr, one_way: Duration) -> io::Result<DelayProxy> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let port = listener.local_addr()?.port();
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        thread::spawn(move || {
            for client in listener.incoming() {
                if s.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(client) = client else { continue };
                let Ok(server) = TcpStream::connect(upstream) else {
                    continue;
                };
                let _ = client.set_nodelay(true);
                let _ = server.set_nodelay(true);
                for (from, to) in [(&client, &server), (&server, &client)] {
                    let (Ok(from), Ok(to)) = (from.try_clone(), to.try_clone()) else {
                        continue;
                    };
                    pump(from, to, one_way);
                }
            }
        });
        Ok(DelayProxy { port, stop })
    }
}

impl Drop for DelayProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

/// `from` to `to`, each buffer released `delay` after it was read.
fn pump(mut from: TcpStream, mut to: TcpStream, delay: Duration) {
    let (tx, rx) = mpsc::channel::<(Instant, Vec<u8>)>();
    thread::spawn(move || {
        let mut buf = vec![0u8; 256 * 1024];
        loop {
            match from.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if tx
                        .send((Instant::now() + delay, buf[..n].to_vec()))
                        .is_err()
                    {
                        break;
                    }
                }
            }
        }
        let _ = from.shutdown(Shutdown::Both);
    });
    thread::spawn(move || {
        for (due, bytes) in rx {
            let now = Instant::now();
            if due > now {
                thread::sleep(due - now);
            }
            if to.write_all(&bytes).is_err() {
                break;
            }
        }
        let _ = to.shutdown(Shutdown::Both);
    });
}

/// CPU time of `pid` and every process below it, now.
fn tree_cpu(pid: u32) -> Duration {
    let mut total = process_cpu_time(pid).unwrap_or_default();
    let mut stack = vec![pid];
    let Ok(entries) = fs::read_dir("/proc") else {
        return total;
    };
    let parents: Vec<(u32, u32)> = entries
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|p| {
            let stat = fs::read_to_string(format!("/proc/{p}/stat")).ok()?;
            let rest = &stat[stat.rfind(')')? + 1..];
            let ppid = rest.split_whitespace().nth(1)?.parse().ok()?;
            Some((p, ppid))
        })
        .collect();
    while let Some(p) = stack.pop() {
        for &(child, parent) in &parents {
            if parent == p {
                total += process_cpu_time(child).unwrap_or_default();
                stack.push(child);
            }
        }
    }
    total
}

#[derive(Debug, Default)]
struct Row {
    delay: u64,
    kind: &'static str,
    p50_us: f64,
    p99_us: f64,
    reads: u64,
    hydrate_s: f64,
    mib_s: f64,
    cloud_cpu_per_gib: f64,
    legacy_cpu_per_gib: f64,
}

impl Row {
    /// Each measure's median over `runs` (of one delay and source).
    fn median_of(runs: &[Row]) -> Row {
        use stream_benches::stats::median;
        let m = |f: fn(&Row) -> f64| median(&runs.iter().map(f).collect::<Vec<_>>());
        Row {
            delay: runs[0].delay,
            kind: runs[0].kind,
            p50_us: m(|r| r.p50_us),
            p99_us: m(|r| r.p99_us),
            reads: runs.iter().map(|r| r.reads).sum(),
            hydrate_s: m(|r| r.hydrate_s),
            mib_s: m(|r| r.mib_s),
            cloud_cpu_per_gib: m(|r| r.cloud_cpu_per_gib),
            legacy_cpu_per_gib: m(|r| r.legacy_cpu_per_gib),
        }
    }
}

fn run(opts: &Options) -> io::Result<String> {
    fs::create_dir_all(&opts.dir)?;
    let dir = opts.dir.canonicalize()?;
    let bin = opts.stream_bin.canonicalize()?;
    let data = ScratchDir(dir.join("data"));
    let _ = fs::remove_dir_all(&data.0);
    fs::create_dir_all(&data.0)?;
    let disk = data.0.join("legacy.img");
    let size = opts.mib << 20;
    match opts.data_pct {
        100 => stream_benches::testfile::create(&disk, size)?,
        pct => sparse_disk(&disk, size, pct)?,
    }
    stream_benches::testfile::warm(&disk)?;

    // The two legacy sides.
    let mut export = {
        let mut cmd = Command::new(&bin);
        cmd.arg("export")
            .arg(&disk)
            .args(["--listen", "127.0.0.1:0"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(File::create(dir.join("export.log"))?);
        ChildGuard::spawn("stream export", &mut cmd)?.kill_on_drop()
    };
    let export_uri = read_uri_line(&mut export, &dir.join("export.log"))?;
    let export_addr: SocketAddr = export_uri
        .trim_start_matches("nbd://")
        .split('/')
        .next()
        .and_then(|a| a.parse().ok())
        .ok_or_else(|| io::Error::other(format!("export URI {export_uri}")))?;
    let sshd = Sshd::start(&dir);
    let sshd_addr: SocketAddr = format!("127.0.0.1:{}", sshd.port)
        .parse()
        .map_err(io::Error::other)?;

    let mut out = String::new();
    let _ = writeln!(
        out,
        "- command: `target/release/ssh_bench --delays {} --mib {} --runs {} --data-pct {}`",
        opts.delays
            .iter()
            .map(u64::to_string)
            .collect::<Vec<_>>()
            .join(","),
        opts.mib,
        opts.runs,
        opts.data_pct
    );
    for (k, v) in machine() {
        let _ = writeln!(out, "- {k}: {v}");
    }
    let _ = writeln!(out, "- ssh: {}", version("ssh", &["-V"]));
    let _ = writeln!(out, "- load average at start: {}\n", loadavg());
    let mut rows = Vec::new();
    for &delay in &opts.delays {
        let one_way = Duration::from_micros(delay * 500);
        for kind in ["nbd", "ssh"] {
            let (upstream, legacy_pid) = match kind {
                "nbd" => (export_addr, export.pid()),
                _ => (sshd_addr, sshd.pid()),
            };
            let proxy = DelayProxy::start(upstream, one_way)?;
            let source = match kind {
                "nbd" => format!("nbd://127.0.0.1:{}/", proxy.port),
                _ => sshd.uri_via(proxy.port, &disk),
            };
            let mut runs = Vec::new();
            for run in 0..opts.runs {
                let mut row = Row {
                    delay,
                    kind,
                    ..Row::default()
                };
                // Cold reads.
                let run_dir = data.0.join(format!("{kind}-{delay}-{run}-cold"));
                fs::create_dir_all(&run_dir)?;
                let start = StreamStart::spawn(&spec(&bin, &source, &run_dir, size, true, &dir))?;
                // A fixed number of reads, few enough that nearly every one
                // lands in a chunk not fetched yet (COLD_READS of the disk's
                // chunks: about 5% repeats at 256 MiB).
                let r = fio::run_with(
                    start.uri(),
                    RAND_READ_4K_QD1,
                    None,
                    &dir.join(format!("fio-{kind}-{delay}.json")),
                    &[format!("--number_ios={COLD_READS}")],
                )?;
                row.p50_us = r.clat_p50_ns as f64 / 1000.0;
                row.p99_us = r.clat_p99_ns as f64 / 1000.0;
                row.reads = r.total_ios;
                start.stop()?;
                fs::remove_dir_all(&run_dir)?;
                // Hydration.
                let run_dir = data.0.join(format!("{kind}-{delay}-{run}-hydrate"));
                fs::create_dir_all(&run_dir)?;
                let legacy0 = tree_cpu(legacy_pid);
                let start = StreamStart::spawn(&spec(&bin, &source, &run_dir, size, false, &dir))?;
                let mut cloud = Duration::ZERO;
                let pid = start.pid();
                let took = start
                    .wait_hydrated(LONG, Duration::from_millis(50), |_| cloud = tree_cpu(pid))?
                    .ok_or_else(|| io::Error::other("hydration did not finish"))?;
                let legacy = tree_cpu(legacy_pid).saturating_sub(legacy0);
                start.stop()?;
                fs::remove_dir_all(&run_dir)?;
                let gib = size as f64 / (1u64 << 30) as f64;
                row.hydrate_s = took.as_secs_f64();
                row.mib_s = opts.mib as f64 / row.hydrate_s;
                row.cloud_cpu_per_gib = cloud.as_secs_f64() / gib;
                row.legacy_cpu_per_gib = legacy.as_secs_f64() / gib;
                eprintln!("ssh_bench: {row:?}");
                runs.push(row);
            }
            rows.push(Row::median_of(&runs));
        }
    }
    let _ = writeln!(
        out,
        "Medians of {} runs (reads: all runs together).\n\n\
         | link RTT | source | cold 4 KiB p50 µs | p99 µs | reads | hydration s | MiB/s | \
         cloud CPU s/GiB | legacy CPU s/GiB |\n|---:|---|---:|---:|---:|---:|---:|---:|---:|",
        opts.runs
    );
    for r in &rows {
        let _ = writeln!(
            out,
            "| {} ms | {} | {:.0} | {:.0} | {} | {:.2} | {:.0} | {:.2} | {:.2} |",
            r.delay,
            r.kind,
            r.p50_us,
            r.p99_us,
            r.reads,
            r.hydrate_s,
            r.mib_s,
            r.cloud_cpu_per_gib,
            r.legacy_cpu_per_gib
        );
    }
    let _ = writeln!(
        out,
        "\n| link RTT | ssh/nbd cold p50 | ssh/nbd hydration rate |\n|---:|---:|---:|"
    );
    for pair in rows.chunks(2) {
        if let [n, s] = pair {
            let _ = writeln!(
                out,
                "| {} ms | {:.2}x | {:.2}x |",
                n.delay,
                s.p50_us / n.p50_us,
                s.mib_s / n.mib_s
            );
        }
    }
    let _ = writeln!(out, "\n- load average at end: {}", loadavg());
    drop(sshd);
    Ok(out)
}

fn spec<'a>(
    bin: &'a Path,
    source: &'a str,
    run_dir: &Path,
    size: u64,
    no_hydrate: bool,
    logs: &Path,
) -> StartSpec<'a> {
    let name = run_dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    StartSpec {
        bin,
        source,
        target: run_dir.join("target.raw"),
        state: run_dir.join("state"),
        socket: run_dir.join("start.sock"),
        log: logs.join(format!("start-{name}.log")),
        size,
        no_hydrate,
    }
}

fn version(program: &str, args: &[&str]) -> String {
    Command::new(program)
        .args(args)
        .output()
        .map(|o| {
            let text = [o.stdout, o.stderr].concat();
            String::from_utf8_lossy(&text).trim().to_string()
        })
        .unwrap_or_else(|e| format!("{program}: {e}"))
}

/// A sparse disk of `size` bytes: pseudo-random data in `pct`% of its
/// 64 KiB chunks (chosen at random), holes elsewhere.
fn sparse_disk(path: &Path, size: u64, pct: u64) -> io::Result<()> {
    use std::os::unix::fs::FileExt;
    let f = File::create(path)?;
    f.set_len(size)?;
    let mut rng = test_support::Rng::new(0x18);
    let mut buf = vec![0u8; 64 << 10];
    for c in 0..size / (64 << 10) {
        if rng.below(100) < pct {
            rng.fill(&mut buf);
            f.write_all_at(&buf, c * (64 << 10))?;
        }
    }
    f.sync_all()
}
