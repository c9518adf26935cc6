//! Issue 16: `stream seed` copies the legacy disk while it is written, in
//! passes; at the cutover `stream start` serves at once and compares each
//! copied chunk with the source as it is needed (32-byte hashes from a
//! real `stream export`, counted on the wire by a proxy), fetching only
//! the chunks that changed; finalize --verify proves target == the stopped
//! source plus the new instance's writes. A source that serves no hashes
//! is refused at the cutover unless `--refetch-all`.

use std::collections::BTreeSet;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use integration::finalize::Finalize;
use integration::proxy::Proxy;
use integration::{Start, binary, tool};
use serde_json::Value;
use test_support::Rng;

const CHUNK: u64 = 64 * 1024;
const CHUNKS: u64 = 1024; // 64 MiB
const T: Duration = Duration::from_secs(120);

/// A 64 MiB disk with data in about 30% of its chunks, the rest holes.
fn legacy_disk(path: &Path, seed: u64) {
    let mut rng = Rng::new(seed);
    let f = std::fs::File::create(path).unwrap();
    f.set_len(CHUNKS * CHUNK).unwrap();
    for c in 0..CHUNKS {
        if rng.below(10) < 3 {
            f.write_all_at(&rng.filled(CHUNK as usize), c * CHUNK)
                .unwrap();
        }
    }
}

/// Write 100 random bytes into chunk `c` of the legacy disk.
fn scribble(path: &Path, rng: &mut Rng, c: u64) {
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(&rng.filled(100), c * CHUNK + rng.below(CHUNK - 100))
        .unwrap();
}

fn seed_pass(source: &str, target: &Path, state: &Path, extra: &[&str]) -> Value {
    let out = tool::run_ok(
        Command::new(binary::stream_bin())
            .args(["seed", "--source", source, "--target"])
            .arg(target)
            .arg("--state")
            .arg(state)
            .arg("--json")
            .args(extra),
        T,
    );
    let last = out.stdout_lossy().lines().last().unwrap_or("").to_string();
    let report: Value = serde_json::from_str(&last)
        .unwrap_or_else(|e| panic!("stream seed printed no report ({e}): {}", out.describe()));
    assert!(
        integration::ops::schema("seed").is_valid(&report),
        "off docs/schema/seed.json: {report}"
    );
    let events = integration::ops::schema("finalize-event");
    for line in out.stderr_lossy().lines().filter(|l| l.starts_with('{')) {
        let v: Value = serde_json::from_str(line).unwrap();
        assert!(events.is_valid(&v), "event off its schema: {line}");
    }
    report
}

fn status(state: &Path) -> Value {
    let out = tool::run_ok(
        Command::new(binary::stream_bin())
            .args(["status", "--json", "--state"])
            .arg(state),
        T,
    );
    serde_json::from_str(out.stdout_lossy().trim()).unwrap()
}

#[test]
fn seed_while_written_then_a_cutover_fetches_only_the_changes_and_finalize_proves_it() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("legacy.img");
    legacy_disk(&src, 16);
    let (_export, proxy) = Proxy::in_front_of_export(&src);
    let target = dir.path().join("target.img");
    let state = dir.path().join("state");

    // Pass 1 while the legacy server writes.
    let writing = Arc::new(AtomicBool::new(true));
    let written = Arc::new(Mutex::new(BTreeSet::new()));
    let writer = {
        let (src, writing, written) = (src.clone(), writing.clone(), written.clone());
        std::thread::spawn(move || {
            let mut rng = Rng::new(7);
            while writing.load(Ordering::Relaxed) {
                let c = rng.below(CHUNKS);
                scribble(&src, &mut rng, c);
                written.lock().unwrap().insert(c);
                std::thread::sleep(Duration::from_millis(2));
            }
        })
    };
    let first = seed_pass(&proxy.uri(""), &target, &state, &["--rate-limit", "32M"]);
    writing.store(false, Ordering::Relaxed);
    writer.join().unwrap();
    assert_eq!(first["pass"], 1, "{first}");
    assert_eq!(first["changed_chunks"], CHUNKS, "{first}");
    let during = written.lock().unwrap().clone();
    assert!(
        !during.is_empty(),
        "the writer wrote nothing during the first pass"
    );

    // Pass 2: only chunks the writer touched can differ, and afterwards the
    // copy is the disk, byte for byte (nothing writes now).
    let second = seed_pass(&proxy.uri(""), &target, &state, &[]);
    assert_eq!(second["pass"], 2, "{second}");
    assert_eq!(second["source_hashes"], true, "{second}");
    let changed = second["changed_chunks"].as_u64().unwrap();
    assert!(
        changed <= during.len() as u64,
        "pass 2 found {changed} changed chunks, the writer touched only {}",
        during.len()
    );
    assert!(
        std::fs::read(&target).unwrap() == std::fs::read(&src).unwrap(),
        "after a quiet pass the copy differs from the legacy disk"
    );
    // Between passes nothing runs; status says where the seed is.
    let st = status(&state);
    assert_eq!(st["phase"], "seeded", "{st}");
    assert_eq!(st["seed"]["passes"], 2, "{st}");
    assert_eq!(st["seed"]["changed_last_pass"], changed, "{st}");

    // The legacy server keeps running a little (2% of the chunks), stops.
    let mut rng = Rng::new(99);
    let mut late = BTreeSet::new();
    while late.len() < 20 {
        let c = rng.below(CHUNKS);
        scribble(&src, &mut rng, c);
        late.insert(c);
    }

    // Cutover: serves at once, comparing nothing yet: every copied chunk
    // is a candidate, absent until its hash is compared with the source's.
    let before = proxy.bytes();
    let start = Start::new(proxy.uri(""), &target, dir.path()).no_hydrate(true);
    let running = start.spawn();
    let delta_bytes = proxy.bytes() - before;
    let st = status(&state);
    let v = &st["volume"];
    assert_eq!(v["chunks_present"], 0, "{st}");
    assert_eq!(v["chunks_to_confirm"], CHUNKS, "{st}");
    assert!(
        delta_bytes <= 16 * 1024,
        "the cutover moved {delta_bytes} bytes before serving"
    );
    assert!(
        running
            .log()
            .contains(&format!("{CHUNKS} copied chunks are compared")),
        "{}",
        running.log()
    );
    let fetched_before = v["bytes_fetched"].as_u64().unwrap();

    // The new instance writes.
    tool::run_ok(
        Command::new(tool::require_tool("qemu-io", "qemu-utils"))
            .args(["-f", "raw", "-c", "write -P 0x5a 655360 4096"])
            .arg(&running.uri),
        T,
    );
    drop(running);
    // Hydration brings the rest: the late chunks only.
    let start = Start::new(proxy.uri(""), &target, dir.path());
    let mut running = start.spawn();
    let st = running.wait_hydrated(T);
    let fetched = st["volume"]["bytes_fetched"].as_u64().unwrap() - fetched_before;
    let after_stop = proxy.bytes() - before;
    assert!(
        fetched <= late.len() as u64 * CHUNK,
        "the cutover fetched {fetched} bytes for {} changed chunks",
        late.len()
    );
    assert_eq!(st["volume"]["chunks_to_confirm"], 0, "{st}");
    let confirmed = st["volume"]["chunks_confirmed"].as_u64().unwrap();
    assert!(confirmed > 0, "{st}");
    let reaped = running.reap_in_background(T);
    Finalize::new(&state).args(&["--verify"]).run_ok(T);
    assert!(reaped.join().unwrap().expect("start exited").success());
    eprintln!(
        "seed: pass 1 copied {} bytes; pass 2 found {changed} chunks changed (the writer \
         touched {}); the cutover moved {delta_bytes} bytes before serving; after it \
         {confirmed} chunks were confirmed by hash, {fetched} bytes fetched for {} changed \
         chunks, {after_stop} bytes crossed the link in all",
        first["bytes_copied"],
        during.len(),
        late.len()
    );
    let mut want = std::fs::read(&src).unwrap();
    want[655360..655360 + 4096].fill(0x5a);
    assert!(
        std::fs::read(&target).unwrap() == want,
        "the target is not the stopped legacy disk plus the instance's write"
    );
}

#[test]
fn a_cutover_from_a_server_without_hashes_is_refused_unless_refetch_all() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("legacy.img");
    legacy_disk(&src, 3);
    let kit = test_support::nbdkit::Nbdkit::file(dir.path(), &src, &[]);
    let target = dir.path().join("target.img");
    let state = dir.path().join("state");
    let first = seed_pass(&kit.uri(), &target, &state, &[]);
    assert_eq!(first["pass"], 1, "{first}");
    let start = Start::new(kit.uri(), &target, dir.path()).no_hydrate(true);
    let out = start.refused();
    let err = out.stderr_lossy();
    assert!(
        err.contains("serves no chunk hashes") && err.contains("--refetch-all"),
        "{err}"
    );
    // Nothing changed by the refusal: the next start still finds a seed
    // awaiting its cutover, with every chunk copied (and now forgets them).
    let start = start.args(&["--refetch-all"]);
    let running = start.spawn();
    let st = status(&state);
    assert_eq!(st["volume"]["chunks_present"], 0, "{st}");
    assert_eq!(st["volume"]["seed"]["passes"], 1, "{st}");
    assert_eq!(st["volume"]["seed"]["cutover_pending"], false, "{st}");
    assert!(
        running
            .log()
            .contains(&format!("{CHUNKS} of {CHUNKS} chunks changed")),
        "{}",
        running.log()
    );
    drop(running);
    let mut running = Start::new(kit.uri(), &target, dir.path()).spawn();
    running.wait_hydrated(T);
    let reaped = running.reap_in_background(T);
    Finalize::new(&state).args(&["--verify"]).run_ok(T);
    assert!(reaped.join().unwrap().expect("start exited").success());
    assert!(std::fs::read(&target).unwrap() == std::fs::read(&src).unwrap());
}

#[test]
fn a_killed_pass_is_resumed_by_the_next_and_a_started_migration_is_never_seeded() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("legacy.img");
    legacy_disk(&src, 5);
    let target = dir.path().join("target.img");
    let state = dir.path().join("state");
    let source = src.to_str().unwrap();
    // A slow first pass, killed once it has copied something.
    let mut child = Command::new(binary::stream_bin())
        .args(["seed", "--source", source, "--target"])
        .arg(&target)
        .arg("--state")
        .arg(&state)
        .args(["--rate-limit", "4M", "--json"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let copied = std::io::BufRead::lines(std::io::BufReader::new(stderr))
        .map_while(Result::ok)
        .find(|l| {
            serde_json::from_str::<Value>(l)
                .is_ok_and(|v| v["step"] == "seed" && v["done"].as_u64() > Some(0))
        });
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(copied.is_some(), "the first pass reported no progress");
    // The next pass finishes the copy, and the copy is the disk.
    let next = seed_pass(source, &target, &state, &[]);
    assert_eq!(next["pass"], 1, "{next}");
    assert!(std::fs::read(&target).unwrap() == std::fs::read(&src).unwrap());

    // A migration `stream start` began is not seeded (clients may write).
    let other = dir.path().join("other");
    std::fs::create_dir(&other).unwrap();
    let started = Start::new(source, other.join("target.img"), &other);
    drop(started.spawn());
    let out = tool::run(
        Command::new(binary::stream_bin())
            .args(["seed", "--source", source, "--target"])
            .arg(other.join("target.img"))
            .arg("--state")
            .arg(other.join("state")),
        T,
    );
    assert!(!out.status.success(), "{}", out.describe());
    assert!(
        out.stderr_lossy().contains("not a seeded one"),
        "{}",
        out.describe()
    );
}
