//! Deep queues through `stream start` with fio's nbd engine (libnbd): four
//! connections of random writes of mixed sizes (512 B..256 KiB) at queue
//! depth 16 and 32, a FLUSH every 16 writes, over chunks already present
//! and chunks still absent on the source, every block verified by
//! checksum afterwards. At depth 32 reads that miss also prefetch around
//! them (`--prefetch-rtt 0`), so prefetches race the writes.
//!
//! Issue 12, case 1: sub-chunk writes with flushes at depth 16 wedged the
//! engine (a FLUSH that never returned) in 4 of 5 tries; fio then never
//! finished. Here every round must finish within its bound and verify.
//! `STREAM_FIO_STRESS_ROUNDS=N` runs more rounds per depth (default 1).
//!
//! Issue 16: the same load right after a seeded cutover, where every
//! chunk is a candidate compared with `stream export`'s hashes as it is
//! needed, and hydration confirms candidates under the writes; then
//! finalize --verify proves the chunks fio did not write equal the source.

use std::process::Command;
use std::time::Duration;

use integration::image::{MIB, Region};
use integration::{SparseImage, Start, require_tool, run};
use serde_json::Value;

/// One round's fio run; far more than it takes (seconds), far less than
/// the suite's patience.
const ROUND_BOUND: Duration = Duration::from_secs(120);
const STOP_TIMEOUT: Duration = Duration::from_secs(30);

fn rounds() -> usize {
    std::env::var("STREAM_FIO_STRESS_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1)
}

fn fio_jobs(text: &str) -> Vec<Value> {
    let start = text
        .find('{')
        .unwrap_or_else(|| panic!("no fio JSON:\n{text}"));
    let v: Value =
        serde_json::from_str(&text[start..]).unwrap_or_else(|e| panic!("fio JSON ({e}):\n{text}"));
    v["jobs"].as_array().expect("jobs").clone()
}

/// How the migration begins.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// `stream start` on a fresh migration, without hydration.
    Fresh,
    /// `stream seed` through a real `stream export`, the legacy disk
    /// changes, then the cutover with hydration running under the load.
    Seeded,
}

fn stress_round(depth: u32, round: usize, mode: Mode) {
    let fio = require_tool("fio", "fio");
    let dir = tempfile::tempdir().unwrap();
    // 64 MiB: data in the first 40 MiB (some of it made present below),
    // a hole after it.
    let img = SparseImage::create(
        dir.path().join("source.img"),
        64 * MIB,
        &[Region {
            offset: 0,
            len: 40 * MIB,
        }],
        round as u64 + 1,
    );
    let target = dir.path().join("target.img");
    let export = (mode == Mode::Seeded).then(|| integration::Export::new(&img.path).spawn());
    let source = match &export {
        Some(e) => e.uri.clone(),
        None => img.path.display().to_string(),
    };
    if mode == Mode::Seeded {
        integration::tool::run_ok(
            Command::new(integration::binary::stream_bin())
                .args(["seed", "--source", &source, "--target"])
                .arg(&target)
                .arg("--state")
                .arg(dir.path().join("state")),
            ROUND_BOUND,
        );
        // The legacy server wrote after the pass: 1 chunk in 16 changed.
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&img.path)
            .unwrap();
        for c in (0..64 * MIB / 65536).step_by(16) {
            std::os::unix::fs::FileExt::write_all_at(&f, &[0xa5; 512], c * 65536 + 1024).unwrap();
        }
    }
    let mut start = Start::new(&source, &target, dir.path()).no_hydrate(mode == Mode::Fresh);
    if depth == 32 {
        // Every read that misses also prefetches the chunks around it, in
        // the background, racing the writes (a far link's behaviour).
        start = start.args(&["--prefetch-rtt", "0"]);
    }
    let mut running = start.spawn();
    let uri = format!("--uri={}", running.uri);

    // Make the first 16 MiB present; the rest stays absent.
    let out = run(
        Command::new(&fio).current_dir(dir.path()).args([
            "--name=prefetch",
            "--ioengine=nbd",
            &uri,
            "--rw=read",
            "--bs=64k",
            "--size=16M",
            "--iodepth=8",
            "--output-format=json",
        ]),
        ROUND_BOUND,
    );
    assert!(
        out.status.success(),
        "prefetch: {}\n{}",
        out.describe(),
        running.log()
    );

    // Four jobs (four connections), 14 MiB each at 15 MiB steps: job
    // boundaries fall inside chunks, and jobs 0-1 write over present
    // chunks, jobs 1-3 over absent ones and the source's hole.
    let depth_arg = format!("--iodepth={depth}");
    let out = run(
        Command::new(&fio).current_dir(dir.path()).args([
            "--name=stress",
            "--ioengine=nbd",
            &uri,
            "--rw=randwrite",
            "--bsrange=512-256k",
            "--bs_unaligned=0",
            &depth_arg,
            "--numjobs=4",
            "--size=14M",
            "--offset_increment=15M",
            "--fsync=16",
            "--verify=crc32c",
            "--verify_fatal=1",
            "--verify_state_save=0",
            "--output-format=json",
        ]),
        ROUND_BOUND,
    );
    let text = out.stdout_lossy();
    assert!(
        out.status.success(),
        "fio at depth {depth}, round {round} did not finish cleanly within {ROUND_BOUND:?} \
         (a FLUSH that never returns wedges it): {}\n{}",
        out.describe(),
        running.log()
    );
    let jobs = fio_jobs(&text);
    assert_eq!(jobs.len(), 4, "{text}");
    for job in &jobs {
        assert_eq!(job["error"], 0, "{job:#}");
        assert_eq!(
            job["write"]["io_bytes"].as_u64().unwrap(),
            14 * MIB,
            "every byte written: {job:#}"
        );
        assert!(
            job["sync"]["total_ios"].as_u64().unwrap_or(0) > 0
                || job["sync"]["lat_ns"]["N"].as_u64().unwrap_or(0) > 0,
            "fio sent flushes: {job:#}"
        );
    }
    running.assert_alive();
    if depth == 32 {
        let st = running.status();
        assert!(
            st["volume"]["chunks_prefetched"].as_u64().unwrap() > 0,
            "no read prefetched anything: {st}"
        );
    }
    if mode == Mode::Seeded {
        let st = running.wait_hydrated(ROUND_BOUND);
        assert_eq!(st["volume"]["chunks_to_confirm"], 0, "{st}");
        // Fio wrote over most of the disk; what it left was confirmed.
        assert!(
            st["volume"]["chunks_confirmed"].as_u64().unwrap() > 0,
            "{st}"
        );
        let reaped = running.reap_in_background(ROUND_BOUND);
        integration::finalize::Finalize::new(&dir.path().join("state"))
            .args(&["--verify"])
            .run_ok(ROUND_BOUND);
        assert!(reaped.join().unwrap().expect("start exited").success());
        drop(export);
        return;
    }
    running.sigterm_and_wait(STOP_TIMEOUT);
}

#[test]
fn fio_depth_16_mixed_writes_with_flushes_finish_and_verify() {
    for round in 0..rounds() {
        stress_round(16, round, Mode::Fresh);
    }
}

#[test]
fn fio_depth_32_mixed_writes_with_flushes_finish_and_verify() {
    for round in 0..rounds() {
        stress_round(32, round, Mode::Fresh);
    }
}

#[test]
fn fio_depth_16_over_a_seeded_cutover_finishes_and_verifies() {
    for round in 0..rounds() {
        stress_round(16, round, Mode::Seeded);
    }
}
