//! Issue 16: what a delta cutover after `stream seed` costs, beside the
//! peers that move the same disk at the same moment.
//!
//! **A. Bytes and time after the source stops.** A sparse legacy disk of
//! G GiB, pseudo-random data in 30% of its 64 KiB chunks, served by
//! `stream export` (the legacy side). Between it and the cloud side sits
//! nbdkit's `stats` filter (`nbd` plugin with `dynamic-export=true`, so the
//! hash export `blake3/SIZE/NAME` passes through): a byte counter of every
//! read, data and hashes alike, one nbdkit per phase (its stats file is
//! written when it stops). `stream seed` copies the disk (one pass); then
//! 2% of the chunks change (4 KiB of random bytes each, written straight
//! into the disk file, synced: the legacy server's writes); then nothing
//! writes (the source stopped) and `stream start` cuts over (every copied
//! chunk a candidate, compared with the source's hash when needed). Measured:
//! the time from launching `stream start` to its URI line (goal: ≤ 1 s
//! whatever the size), and the bytes read through the counter until
//! hydration is complete (goal: ≤ 3% of the disk in data plus ≤ 40 bytes
//! a chunk of hashes; data = `bytes_fetched` of the status, hashes = the
//! rest of what the counter saw).
//!
//! **B. The peers at the same moment.** `nbdcopy` of the whole export at
//! the cutover (what a copy-after-stop moves). rsync's two passes over the
//! *files* of the boot fixture's ext4 (`disk.img`, loop-mounted read-only):
//! pass 1 while it runs, a few files change (a read-write mount of the
//! same image), pass 2 at the cutover with `--no-whole-file` (the delta
//! algorithm it would use over a network; locally it defaults to whole
//! files). Beside it, `stream seed` + cutover on the same image and the
//! same change.
//!
//! **C. Booting after a delta cutover.** The fixture behind `stream
//! export` and a 10 ms link (nbdkit `delay` filter, as `boot_bench`); seed;
//! 2% of the chunks change where the boot never reads (chunks of free
//! ext4 blocks in the image's last 100 MiB, from `dumpe2fs`); `stream
//! start --no-hydrate` cuts over and the guest boots from its export. Its
//! time to the marker beside a boot from the local file (goal: ≤ 1.1x)
//! and a boot from plain lazy streaming (no seed) over the same link; and
//! the time from the stop to the marker for each way, with `nbdcopy` of
//! the whole disk over the same link (then a local boot) beside them.
//!
//! Every process is in a `ChildGuard` (killed by PID on drop); every wait
//! is on a printed line, a process exit or the status socket, with a
//! deadline. Disks, targets and states are removed at the end; logs stay
//! in `--dir`.
//!
//! ```text
//! cargo build --release -p stream-cli --bin stream -p stream-benches --bin seed_bench
//! target/release/seed_bench [--gib 4,1,16] [--peers] [--boot N]
//! ```

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use stream_benches::boot::{self, BootImage, BootSpec, parse_nbdkit_stats_reads};
use stream_benches::lazy::{self, StartSpec, StreamStart};
use stream_benches::report::{loadavg, machine, shell_line};
use stream_benches::scratch::ScratchDir;
use stream_benches::servers::read_uri_line;
use test_support::child::ChildGuard;
use test_support::nbdkit::Nbdkit;
use test_support::rng::Rng;

const USAGE: &str = "\
usage: seed_bench [--gib 4[,1,16]] [--peers] [--boot N] [--stream-bin PATH]
                  [--image-dir DIR] [--dir DIR]

  --gib LIST   disk sizes of part A, in GiB (default 4)
  --peers      part B: nbdcopy after the stop, rsync's two passes
  --boot N     part C: N boots each way (default 0: skipped)";

const CHUNK: u64 = 64 * 1024;
/// Share of chunks with data, and of chunks changed after the seed, in %.
const DATA_PCT: u64 = 30;
const CHANGE_PCT: u64 = 2;
const LONG: Duration = Duration::from_secs(3600);
const BOOT: Duration = Duration::from_secs(300);
/// Room beyond the disk's data, its copy and the nbdcopy copy.
const SPARE: u64 = 1 << 30;

struct Options {
    gib: Vec<u64>,
    peers: bool,
    boots: usize,
    stream_bin: PathBuf,
    image_dir: PathBuf,
    dir: PathBuf,
}

fn parse_args() -> Result<Options, String> {
    let target = stream_benches::bench_main::target_dir();
    let mut o = Options {
        gib: vec![4],
        peers: false,
        boots: 0,
        stream_bin: target.join("release/stream"),
        image_dir: target.join("boot-image"),
        dir: target.join("seed-bench"),
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = |name: &str| args.next().ok_or(format!("{name} needs a value"));
        let num = |s: &str| s.parse::<u64>().map_err(|e| format!("{s}: {e}"));
        match a.as_str() {
            "--gib" => {
                o.gib = value("--gib")?
                    .split(',')
                    .map(num)
                    .collect::<Result<_, _>>()?
            }
            "--peers" => o.peers = true,
            "--boot" => o.boots = num(&value("--boot")?)? as usize,
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
        "seed_bench",
        USAGE,
        parse_args(),
        |o: &Options| o.stream_bin.as_path(),
        run,
    )
}

fn run(opts: &Options) -> io::Result<String> {
    fs::create_dir_all(&opts.dir)?;
    let opts = &Options {
        dir: opts.dir.canonicalize()?,
        stream_bin: opts.stream_bin.canonicalize()?,
        image_dir: opts.image_dir.clone(),
        gib: opts.gib.clone(),
        ..*opts
    };
    let mut out = header(opts);
    let mut rows = Vec::new();
    let mut copies = Vec::new();
    for &gib in &opts.gib {
        let (row, copy) = part_a(opts, gib << 30)?;
        eprintln!("seed_bench: {gib} GiB: {row:?} {copy:?}");
        rows.push(row);
        copies.extend(copy);
    }
    table_a(&mut out, &rows, &copies);
    if opts.peers || opts.boots > 0 {
        let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let image = boot::build_image(&repo, &opts.image_dir)?;
        if opts.peers {
            let files = part_b(opts, &image)?;
            eprintln!("seed_bench: files: {files:?}");
            table_b(&mut out, &files);
        }
        if opts.boots > 0 {
            let boots = part_c(opts, &image)?;
            table_c(&mut out, &boots);
        }
    }
    let _ = writeln!(out, "- load average at end: {}", loadavg());
    Ok(out)
}

/// `stream export DISK --socket S`, ready once it printed its URI.
fn export(opts: &Options, disk: &Path, sock: &Path, log: &Path) -> io::Result<ChildGuard> {
    let _ = fs::remove_file(sock);
    let mut cmd = Command::new(&opts.stream_bin);
    cmd.arg("export")
        .arg(disk)
        .arg("--socket")
        .arg(sock)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(File::create(log)?);
    let mut guard = ChildGuard::spawn("stream export", &mut cmd)?;
    read_uri_line(&mut guard, log)?;
    Ok(guard)
}

/// nbdkit in front of the export on `upstream`: `stats` (the byte
/// counter), optionally `delay` (the link), export names passed through.
struct Counter {
    kit: Nbdkit,
    statsfile: PathBuf,
}

impl Counter {
    fn start(upstream: &Path, dir: &Path, tag: &str, delay_ms: u64) -> io::Result<Counter> {
        let statsfile = dir.join(format!("stats-{tag}.txt"));
        let mut args = vec!["-r".to_string(), "--filter=stats".into()];
        if delay_ms > 0 {
            args.push("--filter=delay".into());
        }
        args.push("nbd".into());
        args.push(format!("socket={}", upstream.display()));
        args.push("dynamic-export=true".into());
        args.push(format!("statsfile={}", statsfile.display()));
        if delay_ms > 0 {
            args.push(format!("delay-read={delay_ms}ms"));
        }
        // One socket whatever the phase: a migration's source URI is
        // part of its identity.
        let sock = dir.join("counter.sock");
        let log = dir.join(format!("counter-{tag}.log"));
        Ok(Counter {
            kit: Nbdkit::start(&sock, &log, &args)?,
            statsfile,
        })
    }

    fn uri(&self) -> String {
        format!("nbd+unix:///?socket={}", self.kit.socket.display())
    }

    /// Stop nbdkit (its stats file is written then): the bytes read.
    fn stop(self) -> io::Result<u64> {
        self.kit.guard.stop()?;
        let text = fs::read_to_string(&self.statsfile)?;
        Ok(parse_nbdkit_stats_reads(&text).map_or(0, |(_, bytes)| bytes))
    }
}

/// One `stream seed` pass; its last JSON line.
fn seed(opts: &Options, uri: &str, target: &Path, state: &Path, log: &Path) -> io::Result<Pass> {
    let out = log.with_extension("out");
    let mut cmd = Command::new(&opts.stream_bin);
    cmd.args(["seed", "--json", "--source", uri, "--target"])
        .arg(target)
        .arg("--state")
        .arg(state)
        .stdin(Stdio::null())
        .stdout(File::create(&out)?)
        .stderr(File::create(log)?);
    let t = Instant::now();
    let status = ChildGuard::spawn("stream seed", &mut cmd)?.wait_timeout(LONG)?;
    let secs = t.elapsed().as_secs_f64();
    if status.is_none_or(|s| !s.success()) {
        return Err(io::Error::other(format!(
            "stream seed: {status:?}; see {}",
            log.display()
        )));
    }
    let text = fs::read_to_string(&out)?;
    let last = text.lines().last().unwrap_or_default();
    let v: serde_json::Value = serde_json::from_str(last)
        .map_err(|e| io::Error::other(format!("stream seed printed {last:?}: {e}")))?;
    Ok(Pass {
        secs,
        copied: v["bytes_copied"].as_u64().unwrap_or(0),
    })
}

#[derive(Debug)]
struct Pass {
    secs: f64,
    copied: u64,
}

/// A sparse disk of `size` with pseudo-random data in [`DATA_PCT`]% of
/// its chunks; returns their number.
fn legacy_disk(path: &Path, size: u64) -> io::Result<u64> {
    let f = File::create(path)?;
    f.set_len(size)?;
    let mut rng = Rng::new(0x5eed_1600);
    let mut buf = vec![0u8; CHUNK as usize];
    let mut data = 0;
    for c in 0..size / CHUNK {
        if rng.below(100) < DATA_PCT {
            rng.fill(&mut buf);
            f.write_all_at(&buf, c * CHUNK)?;
            data += 1;
        }
    }
    f.sync_all()?;
    Ok(data)
}

/// 4 KiB of random bytes at a random 4 KiB of each of `chunks`, synced:
/// the legacy server's last writes.
fn scribble(path: &Path, chunks: &BTreeSet<u64>, rng: &mut Rng) -> io::Result<()> {
    let f = OpenOptions::new().write(true).open(path)?;
    for c in chunks {
        let at = c * CHUNK + rng.below(CHUNK / 4096) * 4096;
        f.write_all_at(&rng.filled(4096), at)?;
    }
    f.sync_all()
}

/// `n` distinct chunks of `0..chunks`.
fn pick(rng: &mut Rng, chunks: u64, n: u64) -> BTreeSet<u64> {
    let mut set = BTreeSet::new();
    while (set.len() as u64) < n {
        set.insert(rng.below(chunks));
    }
    set
}

/// What a cutover cost, from launching `stream start` on the seeded
/// migration.
#[derive(Debug)]
struct Cutover {
    size: u64,
    /// To the URI line (serving).
    to_uri_s: f64,
    /// To hydration complete (`None` with `--no-hydrate`).
    hydrated_s: Option<f64>,
    /// Chunks made candidates when it served (every copied chunk), and
    /// how many of them were confirmed by hash without a fetch.
    candidates: u64,
    confirmed: u64,
    /// Data fetched (status `bytes_fetched`) and everything read through
    /// the counter.
    fetched: u64,
    read: u64,
}

impl Cutover {
    fn chunks(&self) -> u64 {
        self.size.div_ceil(CHUNK)
    }
    fn hash_per_chunk(&self) -> f64 {
        self.read.saturating_sub(self.fetched) as f64 / self.chunks() as f64
    }
}

/// `stream start` on the seeded migration in `data`, through `counter`,
/// until hydration is complete; the counter is stopped to read it.
/// `seeded`: the bytes the seed copied (the status's `bytes_fetched`
/// counts them too: it is the migration's, kept in its state).
fn cutover(
    opts: &Options,
    counter: Counter,
    data: &Path,
    size: u64,
    seeded: u64,
) -> io::Result<Cutover> {
    let uri = counter.uri();
    let spec = StartSpec {
        bin: &opts.stream_bin,
        source: &uri,
        target: data.join("target.raw"),
        state: data.join("state"),
        socket: data.join("start.sock"),
        log: data.join("../start.log"),
        size,
        no_hydrate: false,
    };
    let start = StreamStart::spawn(&spec)?;
    let candidates = candidates(&spec.log)?;
    let hydrated = start
        .wait_hydrated(LONG, Duration::from_millis(50), |_| {})?
        .ok_or_else(|| io::Error::other("hydration not complete within an hour"))?;
    let status = start.status()?;
    let fetched = lazy::counter(&status, "bytes_fetched") - seeded;
    let confirmed = lazy::counter(&status, "chunks_confirmed");
    let to_uri_s = start.to_uri.as_secs_f64();
    start.stop()?;
    Ok(Cutover {
        size,
        to_uri_s,
        hydrated_s: Some(hydrated.as_secs_f64()),
        candidates,
        confirmed,
        fetched,
        read: counter.stop()?,
    })
}

/// `cutover from the seed in S s: N copied chunks are compared` in
/// `stream start`'s log.
fn candidates(log: &Path) -> io::Result<u64> {
    let text = fs::read_to_string(log)?;
    text.split("cutover from the seed in ")
        .nth(1)
        .and_then(|t| t.split(": ").nth(1))
        .and_then(|t| t.split(' ').next())
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| {
            io::Error::other(format!(
                "no cutover line in {}: was the migration seeded?",
                log.display()
            ))
        })
}

/// A full copy after the stop, as measured.
#[derive(Debug)]
struct Copy {
    size: u64,
    secs: f64,
    read: u64,
}

/// Part A at one size; with `--peers`, nbdcopy of the same stopped disk.
fn part_a(opts: &Options, size: u64) -> io::Result<(Cutover, Option<Copy>)> {
    let data_bytes = size / 100 * DATA_PCT;
    let need = 3 * data_bytes + SPARE;
    let free = free_bytes(&opts.dir)?;
    if free < need {
        return Err(io::Error::other(format!(
            "{} GiB needs {:.1} GiB free under {} (the disk's data, its copy, nbdcopy's copy \
             and 1 GiB); only {:.1} GiB are",
            size >> 30,
            need as f64 / (1u64 << 30) as f64,
            opts.dir.display(),
            free as f64 / (1u64 << 30) as f64
        )));
    }
    let dir = opts.dir.join(format!("a-{}g", size >> 30));
    let _ = fs::remove_dir_all(&dir);
    let data = ScratchDir(dir.join("data"));
    fs::create_dir_all(&data.0)?;
    let disk = data.0.join("legacy.img");
    let t = Instant::now();
    let with_data = legacy_disk(&disk, size)?;
    eprintln!(
        "seed_bench: {} GiB disk, {with_data} chunks of data, written in {:.1} s",
        size >> 30,
        t.elapsed().as_secs_f64()
    );
    let sock = data.0.join("export.sock");
    let _export = export(opts, &disk, &sock, &dir.join("export.log"))?;

    let c = Counter::start(&sock, &dir, "seed", 0)?;
    let pass = seed(
        opts,
        &c.uri(),
        &data.0.join("target.raw"),
        &data.0.join("state"),
        &dir.join("seed.log"),
    )?;
    let seed_read = c.stop()?;
    eprintln!("seed_bench: seed {pass:?}, {seed_read} bytes read");

    let chunks = size / CHUNK;
    let mut rng = Rng::new(0x16);
    scribble(
        &disk,
        &pick(&mut rng, chunks, chunks * CHANGE_PCT / 100),
        &mut rng,
    )?;

    let c = Counter::start(&sock, &dir, "cutover", 0)?;
    let cut = cutover(opts, c, &data.0, size, pass.copied)?;

    let copy = if opts.peers {
        let c = Counter::start(&sock, &dir, "nbdcopy", 0)?;
        let secs = nbdcopy(
            &c.uri(),
            &data.0.join("nbdcopy.raw"),
            &dir.join("nbdcopy.log"),
        )?;
        Some(Copy {
            size,
            secs,
            read: c.stop()?,
        })
    } else {
        None
    };
    Ok((cut, copy))
}

/// `nbdcopy URI DEST`, its stderr to `log`; the seconds it took.
fn nbdcopy(uri: &str, dest: &Path, log: &Path) -> io::Result<f64> {
    let mut cmd = Command::new("nbdcopy");
    cmd.arg(uri)
        .arg(dest)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(File::create(log)?);
    let t = Instant::now();
    let status = ChildGuard::spawn("nbdcopy", &mut cmd)?.wait_timeout(LONG)?;
    if status.is_none_or(|s| !s.success()) {
        return Err(io::Error::other(format!("nbdcopy: {status:?}")));
    }
    Ok(t.elapsed().as_secs_f64())
}

/// rsync's two passes and stream's seed + cutover over the same change.
#[derive(Debug)]
struct Files {
    files_changed: usize,
    rsync1_s: f64,
    rsync2_s: f64,
    /// rsync --stats of pass 2: bytes sent (sender to receiver) and the
    /// whole size of the files it transferred (read at the source).
    rsync2_sent: u64,
    rsync2_file_bytes: u64,
    seed: Pass,
    cut: Cutover,
}

fn part_b(opts: &Options, image: &BootImage) -> io::Result<Files> {
    let dir = opts.dir.join("b-files");
    let _ = fs::remove_dir_all(&dir);
    let data = ScratchDir(dir.join("data"));
    fs::create_dir_all(&data.0)?;
    let disk = data.0.join("legacy.img");
    fs::copy(&image.disk, &disk)?;
    let size = fs::metadata(&disk)?.len();
    let mnt = data.0.join("mnt");
    let dest = data.0.join("rsync-dest");
    fs::create_dir_all(&mnt)?;
    let sock = data.0.join("export.sock");
    let _export = export(opts, &disk, &sock, &dir.join("export.log"))?;
    let c = Counter::start(&sock, &dir, "seed", 0)?;
    let seed = seed(
        opts,
        &c.uri(),
        &data.0.join("target.raw"),
        &data.0.join("state"),
        &dir.join("seed.log"),
    )?;
    c.stop()?;

    let rsync = |log: &str| -> io::Result<(f64, String)> {
        mount(&disk, &mnt, true)?;
        let mut cmd = Command::new("rsync");
        cmd.args(["-aHAX", "--inplace", "--no-whole-file", "--stats"])
            .arg(format!("{}/", mnt.display()))
            .arg(format!("{}/", dest.display()))
            .stdin(Stdio::null())
            .stderr(File::create(dir.join(log))?);
        let t = Instant::now();
        let r = run_ok("rsync", &mut cmd);
        let secs = t.elapsed().as_secs_f64();
        umount(&mnt)?;
        Ok((secs, r?))
    };
    let (rsync1_s, _) = rsync("rsync-1.log")?;

    // A few files change: 4 KiB of random bytes inside each of the 20
    // largest files under /lib/modules (same size, new mtime).
    mount(&disk, &mnt, false)?;
    let mut files = Vec::new();
    walk(&mnt.join("lib/modules"), &mut files)?;
    files.sort_by_key(|(_, len)| std::cmp::Reverse(*len));
    files.truncate(20);
    let mut rng = Rng::new(0x16b);
    for (f, len) in &files {
        let f = OpenOptions::new().write(true).open(f)?;
        f.write_all_at(&rng.filled(4096), rng.below(len - 4096))?;
        f.sync_all()?;
    }
    umount(&mnt)?;

    let c = Counter::start(&sock, &dir, "cutover", 0)?;
    let cut = cutover(opts, c, &data.0, size, seed.copied)?;
    let (rsync2_s, stats) = rsync("rsync-2.log")?;
    fs::write(dir.join("rsync-2.stats"), &stats)?;
    let stat = |key: &str| -> u64 {
        stats
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.split_whitespace().next())
            .map_or(0, |v| v.replace(',', "").parse().unwrap_or(0))
    };
    Ok(Files {
        files_changed: files.len(),
        rsync1_s,
        rsync2_s,
        rsync2_sent: stat("Total bytes sent:"),
        rsync2_file_bytes: stat("Total transferred file size:"),
        seed,
        cut,
    })
}

fn walk(dir: &Path, out: &mut Vec<(PathBuf, u64)>) -> io::Result<()> {
    for e in fs::read_dir(dir)? {
        let e = e?;
        let t = e.file_type()?;
        if t.is_dir() {
            walk(&e.path(), out)?;
        } else if t.is_file() && e.metadata()?.len() > 8192 {
            out.push((e.path(), e.metadata()?.len()));
        }
    }
    Ok(())
}

fn mount(disk: &Path, at: &Path, read_only: bool) -> io::Result<()> {
    let opts = if read_only { "loop,ro" } else { "loop" };
    let mut cmd = Command::new("mount");
    cmd.args(["-o", opts]).arg(disk).arg(at);
    run_ok("mount", &mut cmd).map(drop)
}

fn umount(at: &Path) -> io::Result<()> {
    run_ok("umount", Command::new("umount").arg(at)).map(drop)
}

/// Run to its exit (bounded); its stdout, or an error with its status.
fn run_ok(name: &str, cmd: &mut Command) -> io::Result<String> {
    let out = dir_tmp(name);
    cmd.stdout(File::create(&out)?);
    let status = ChildGuard::spawn(name, cmd)?.wait_timeout(LONG)?;
    let text = fs::read_to_string(&out).unwrap_or_default();
    let _ = fs::remove_file(&out);
    match status {
        Some(s) if s.success() => Ok(text),
        s => Err(io::Error::other(format!("{name}: {s:?}"))),
    }
}

fn dir_tmp(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("seed-bench-{}-{name}.out", std::process::id()))
}

/// The boot times of part C, per way, in seconds.
#[derive(Debug, Default)]
struct Boots {
    local: Vec<f64>,
    delta: Vec<f64>,
    lazy: Vec<f64>,
    changed: u64,
    to_uri: Vec<f64>,
    lazy_to_uri: Vec<f64>,
    /// nbdcopy of the whole disk over the link, after the stop.
    nbdcopy: Vec<f64>,
}

fn part_c(opts: &Options, image: &BootImage) -> io::Result<Boots> {
    let dir = opts.dir.join("c-boot");
    let _ = fs::remove_dir_all(&dir);
    let data = ScratchDir(dir.join("data"));
    fs::create_dir_all(&data.0)?;
    let disk = data.0.join("legacy.img");
    fs::copy(&image.disk, &disk)?;
    let size = fs::metadata(&disk)?.len();
    let free = free_chunks(&disk, size)?;
    let want = size / CHUNK * CHANGE_PCT / 100;
    if (free.len() as u64) < want {
        return Err(io::Error::other(format!(
            "only {} free chunks in the last 100 MiB, {want} wanted",
            free.len()
        )));
    }
    let mut rng = Rng::new(0x16c);
    let mut changed = BTreeSet::new();
    while (changed.len() as u64) < want {
        changed.insert(free[rng.below(free.len() as u64) as usize]);
    }
    let sock = data.0.join("export.sock");
    let _export = export(opts, &disk, &sock, &dir.join("export.log"))?;
    let link = Counter::start(&sock, &dir, "link", 10)?;
    let uri = link.uri();
    let mut b = Boots {
        changed: changed.len() as u64,
        ..Boots::default()
    };
    let boot_from = |disk: &str, log: &str| -> io::Result<f64> {
        let r = boot::boot_once(&BootSpec {
            disk,
            kernel: &image.kernel,
            initrd: &image.initrd,
            timeout: BOOT,
            log: dir.join(log),
        })?;
        Ok(r.seconds_to_marker())
    };
    let start = |name: &str, no_hydrate: bool| -> io::Result<StreamStart> {
        let d = data.0.join(name);
        fs::create_dir_all(&d)?;
        StreamStart::spawn(&StartSpec {
            bin: &opts.stream_bin,
            source: &uri,
            target: d.join("target.raw"),
            state: d.join("state"),
            socket: d.join("start.sock"),
            log: dir.join(format!("{name}.log")),
            size,
            no_hydrate,
        })
    };
    for rep in 1..=opts.boots {
        // The delta: seed, the change, the cutover (no hydration), boot.
        let name = format!("delta-{rep}");
        let d = data.0.join(&name);
        fs::create_dir_all(&d)?;
        seed(
            opts,
            &uri,
            &d.join("target.raw"),
            &d.join("state"),
            &dir.join(format!("{name}-seed.log")),
        )?;
        scribble(&disk, &changed, &mut rng)?;
        let s = start(&name, true)?;
        b.to_uri.push(s.to_uri.as_secs_f64());
        candidates(&dir.join(format!("{name}.log")))?;
        b.delta
            .push(boot_from(s.uri(), &format!("console-{name}.log"))?);
        s.stop()?;
        let lazy = start(&format!("lazy-{rep}"), true)?;
        b.lazy_to_uri.push(lazy.to_uri.as_secs_f64());
        b.lazy
            .push(boot_from(lazy.uri(), &format!("console-lazy-{rep}.log"))?);
        lazy.stop()?;
        // A copy after the stop: nbdcopy of the whole disk over the same
        // link, then the boot is a local one.
        let copy = data.0.join("nbdcopy.raw");
        b.nbdcopy.push(nbdcopy(
            &uri,
            &copy,
            &dir.join(format!("nbdcopy-{rep}.log")),
        )?);
        fs::remove_file(&copy)?;
        b.local.push(boot_from(
            disk.to_str().expect("UTF-8 path"),
            &format!("console-local-{rep}.log"),
        )?);
        eprintln!("seed_bench: boot {rep}: {b:?}");
    }
    link.stop()?;
    Ok(b)
}

/// Chunks of `disk` (ext4) in its last 100 MiB whose blocks are all free,
/// from `dumpe2fs`'s "Free blocks:" ranges.
fn free_chunks(disk: &Path, size: u64) -> io::Result<Vec<u64>> {
    let text = run_ok("dumpe2fs", Command::new("dumpe2fs").arg(disk))?;
    let block = text
        .lines()
        .find_map(|l| l.strip_prefix("Block size:"))
        .and_then(|v| v.trim().parse::<u64>().ok())
        .ok_or_else(|| io::Error::other("dumpe2fs printed no block size"))?;
    let mut free = BTreeSet::new();
    for l in text.lines() {
        let Some(ranges) = l.trim().strip_prefix("Free blocks:") else {
            continue;
        };
        for r in ranges.split(',').map(str::trim).filter(|r| !r.is_empty()) {
            let (a, b) = r.split_once('-').unwrap_or((r, r));
            let (a, b): (u64, u64) = (
                a.parse().map_err(io::Error::other)?,
                b.parse().map_err(io::Error::other)?,
            );
            free.extend(a..=b);
        }
    }
    let per = CHUNK / block;
    let first = (size - (100 << 20)) / CHUNK;
    Ok((first..size / CHUNK)
        .filter(|c| (c * per..(c + 1) * per).all(|b| free.contains(&b)))
        .collect())
}

/// Bytes that may still be written on the file system of `path`.
fn free_bytes(path: &Path) -> io::Result<u64> {
    let out = run_ok(
        "df",
        Command::new("df").args(["--output=avail", "-B1"]).arg(path),
    )?;
    out.lines()
        .nth(1)
        .and_then(|l| l.trim().parse().ok())
        .ok_or_else(|| io::Error::other(format!("df printed {out:?}")))
}

fn header(opts: &Options) -> String {
    let mut out = String::new();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let _ = writeln!(
        out,
        "- command: `target/release/seed_bench {}`",
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
    let _ = writeln!(out, "- nbdkit: {}", shell_line("nbdkit", &["--version"]));
    let _ = writeln!(out, "- load average at start: {}", loadavg());
    let _ = writeln!(out, "- scratch: {}\n", opts.dir.display());
    out
}

fn mib(b: u64) -> f64 {
    b as f64 / (1u64 << 20) as f64
}

fn table_a(out: &mut String, rows: &[Cutover], copies: &[Copy]) {
    let _ = writeln!(
        out,
        "| disk | chunks | candidates | confirmed | to URI s | to hydrated s | data read MiB | \
         % of disk | hash bytes a chunk | goal (≤ 3% + ≤ 40 B/chunk, URI ≤ 1 s) |"
    );
    let _ = writeln!(out, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|");
    for r in rows {
        let pct = r.fetched as f64 * 100.0 / r.size as f64;
        let met = pct <= 3.0 && r.hash_per_chunk() <= 40.0 && r.to_uri_s <= 1.0;
        let _ = writeln!(
            out,
            "| {} GiB | {} | {} | {} | {:.2} | {:.1} | {:.1} | {pct:.2}% | {:.1} | {} |",
            r.size >> 30,
            r.chunks(),
            r.candidates,
            r.confirmed,
            r.to_uri_s,
            r.hydrated_s.unwrap_or(f64::NAN),
            mib(r.fetched),
            r.hash_per_chunk(),
            if met { "met" } else { "**missed**" }
        );
    }
    if !copies.is_empty() {
        let _ = writeln!(
            out,
            "\n| disk | nbdcopy after the stop: s | MiB read | % of disk |\n|---|---:|---:|---:|"
        );
        for c in copies {
            let _ = writeln!(
                out,
                "| {} GiB | {:.1} | {:.0} | {:.1}% |",
                c.size >> 30,
                c.secs,
                mib(c.read),
                c.read as f64 * 100.0 / c.size as f64
            );
        }
    }
    out.push('\n');
}

fn table_b(out: &mut String, f: &Files) {
    let _ = writeln!(
        out,
        "| 512 MiB ext4, {} files changed | before the stop s | after the stop s | \
         bytes after the stop |\n|---|---:|---:|---:|",
        f.files_changed
    );
    let _ = writeln!(
        out,
        "| rsync -aHAX --inplace --no-whole-file | {:.1} | {:.2} | {} sent ({} in the changed files, read whole) |",
        f.rsync1_s, f.rsync2_s, f.rsync2_sent, f.rsync2_file_bytes
    );
    let _ = writeln!(
        out,
        "| stream seed + start | {:.1} | {:.2} to URI, {:.2} to hydrated | {} ({} data; {} of {} chunks confirmed by hash, {:.1} B/chunk hashes) |\n",
        f.seed.secs,
        f.cut.to_uri_s,
        f.cut.hydrated_s.unwrap_or(f64::NAN),
        f.cut.read,
        f.cut.fetched,
        f.cut.confirmed,
        f.cut.candidates,
        f.cut.hash_per_chunk()
    );
}

fn table_c(out: &mut String, b: &Boots) {
    use stream_benches::stats::median;
    let _ = writeln!(
        out,
        "| boot to marker (10 ms link, {} chunks changed after the seed) | runs s | median s | vs local |\n|---|---|---:|---:|",
        b.changed
    );
    let local = median(&b.local);
    for (name, v) in [
        ("local file", &b.local),
        ("delta cutover (`--no-hydrate`)", &b.delta),
        ("lazy streaming, no seed", &b.lazy),
    ] {
        let runs: Vec<String> = v.iter().map(|s| format!("{s:.2}")).collect();
        let _ = writeln!(
            out,
            "| {name} | {} | {:.2} | {:.2}x |",
            runs.join(", "),
            median(v),
            median(v) / local
        );
    }
    let runs: Vec<String> = b.to_uri.iter().map(|s| format!("{s:.2}")).collect();
    let _ = writeln!(out, "\nDelta cutover to URI (s): {}\n", runs.join(", "));
    // From the stop of the legacy server to the new guest's marker line:
    // what the guest waits for before it boots, plus its boot.
    let _ = writeln!(
        out,
        "| stop → marker (10 ms link) | before the boot s | boot s | total s |\n|---|---:|---:|---:|"
    );
    for (name, before, boot) in [
        (
            "stream seed, delta cutover",
            median(&b.to_uri),
            median(&b.delta),
        ),
        (
            "lazy streaming, no seed",
            median(&b.lazy_to_uri),
            median(&b.lazy),
        ),
        (
            "nbdcopy of the whole disk, then a local boot",
            median(&b.nbdcopy),
            local,
        ),
    ] {
        let _ = writeln!(
            out,
            "| {name} | {before:.2} | {boot:.2} | {:.2} |",
            before + boot
        );
    }
    out.push('\n');
}
