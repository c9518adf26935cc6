//! `stream finalize` at the end of a whole migration: a client writes while
//! hydration runs, finalize waits for it to disconnect, then proves the
//! target (manifest, `--verify`), and the migration is never served again.
//! `stream verify` then catches corrupted chunks with their ranges.

use std::os::unix::fs::FileExt;
use std::time::Duration;

use integration::finalize::{self, Finalize};
use integration::image::{KIB, MIB, assert_same_bytes, read_file};
use integration::start::mixed_image;
use integration::wire::{CMD_FLUSH, Conn};
use integration::{Export, Running, Start};
use serde_json::json;

const CHUNK: u64 = 64 * KIB;

/// (pattern byte, offset, length): none touches the chunk at 3 MiB or the
/// hole chunk at 8 MiB, which test 2 corrupts as "no client wrote it".
const WRITES: [(u8, u64, u64); 4] = [
    (0x11, CHUNK + 1000, 3000),  // inside an absent data chunk
    (0x22, 2 * MIB - 777, 2000), // across a chunk boundary, in a hole
    (0x44, 4 * MIB, 2 * CHUNK),  // two whole chunks
    (0x66, 16 * MIB - 513, 513), // the last bytes of the disk
];

/// Sends the writes and a flush on `conn`; returns the model after them.
fn write_and_flush(conn: &mut Conn, mut model: Vec<u8>) -> Vec<u8> {
    for (i, &(p, off, len)) in WRITES.iter().enumerate() {
        let data = vec![p; len as usize];
        let cookie = 0x1000 + i as u64;
        conn.write_request(0, cookie, off, &data)
            .expect("send WRITE");
        assert_eq!(
            conn.finish(cookie).expect("WRITE reply"),
            0,
            "WRITE {off}+{len} failed"
        );
        model[off as usize..(off + len) as usize].fill(p);
    }
    assert_eq!(
        conn.command(0, CMD_FLUSH, 0, 0).expect("FLUSH"),
        0,
        "FLUSH failed"
    );
    model
}

fn assert_finalized_report(
    report: &serde_json::Value,
    state: &std::path::Path,
    target: &std::path::Path,
) {
    assert_eq!(report["schema"], 1, "{report}");
    assert_eq!(report["phase"], "finalized", "{report}");
    let m = &report["manifest"];
    assert_eq!(m["format"], "stream-manifest", "{report}");
    assert_eq!(m["size"], 16 * MIB, "{report}");
    assert_eq!(m["chunk_size"], CHUNK, "{report}");
    assert_eq!(m["counts"]["chunks"], 16 * MIB / CHUNK, "{report}");
    let written = m["counts"]["written_by_clients"]
        .as_u64()
        .expect("written_by_clients");
    // 1 + 2 (across a boundary) + 2 + 1 chunks.
    assert_eq!(written, 6, "chunks written by the client: {report}");
    assert!(m["counts"]["zero"].as_u64().unwrap() > 0, "{report}");
    integration::finalize::assert_manifest_matches_target(report, state, target);
}

#[test]
fn full_migration_with_writes_finalizes_and_verifies() {
    let dir = tempfile::tempdir().unwrap();
    let img = mixed_image(dir.path());
    let export = Export::new(&img.path).unix().spawn();
    // About 5 MiB of data at 256 KiB/s: hydration is far from done when
    // finalize starts, so finalize has to speed it up.
    let start = Start::new(&export.uri, dir.path().join("target.img"), dir.path())
        .chunk_size("64K")
        .rate_limit(Some("256K"));
    let state = start.state_dir().to_path_buf();
    let running = start.spawn();
    let mut conn = running.open();
    let model = write_and_flush(&mut conn, img.expected_all());
    let st = finalize::status(&state);
    assert_eq!(
        st["volume"]["hydration_complete"], false,
        "hydration finished before finalize: {st}"
    );

    // A client is still connected: without --force finalize waits, and
    // gives up after --timeout; the migration keeps serving.
    let out = Finalize::new(&state)
        .args(&["--verify", "--json", "--timeout", "5s"])
        .run_fails(Duration::from_secs(60));
    let err = out.stderr_lossy();
    assert!(
        err.contains("still connected") && err.contains("client"),
        "the refusal does not say a client is connected: {}",
        out.describe()
    );
    let mut running = running;
    running.assert_alive();
    let st = finalize::status(&state);
    assert_eq!(st["connected_clients"], 1, "{st}");
    assert_eq!(st["volume"]["phase"], "streaming", "{st}");
    let (p, off, len) = WRITES[2];
    assert_eq!(
        conn.read_ok(off, len as u32),
        vec![p; len as usize],
        "served after the refusal"
    );
    assert!(
        !state.join("manifest.json").exists(),
        "a manifest with a client connected"
    );

    // The client goes: finalize hands over, proves the copy, finalizes.
    drop(conn);
    let reaper = reap(running);
    let out = Finalize::new(&state)
        .args(&["--verify", "--json"])
        .run_ok(Duration::from_secs(120));
    let report = finalize::json_stdout(&out);
    let target = start.target_path();
    assert_eq!(
        report["native_path"].as_str(),
        Some(target.to_str().unwrap()),
        "{report}"
    );
    assert_finalized_report(&report, &state, target);
    let v = &report["verify"];
    assert_eq!(v["mismatches"], json!([]), "{report}");
    assert_eq!(v["chunks_checked"], 16 * MIB / CHUNK, "{report}");
    assert_eq!(v["chunks_compared_with_manifest"], 6, "{report}");
    let status = exit_status(reaper);
    assert!(
        status.success(),
        "stream start exited with {status} after the handover"
    );

    assert_same_bytes(
        &read_file(target),
        &model,
        0,
        "target after finalize (source + writes)",
    );
    assert_eq!(finalize::header(&state)["phase"], "finalized");
    let out = finalize::verify(&state, false);
    assert!(out.status.success(), "stream verify: {}", out.describe());

    // Never served again; finalize again just reports.
    let out = start.refused();
    assert!(
        out.stderr_lossy().contains("finalized"),
        "the refusal does not say the migration is finalized: {}",
        out.describe()
    );
    let again = Finalize::new(&state)
        .args(&["--json"])
        .run_ok(Duration::from_secs(60));
    assert_eq!(
        finalize::json_stdout(&again)["manifest"],
        report["manifest"]
    );
    drop(export);
}

/// `stream start` hands over and exits while finalize runs; reap it then.
fn reap(running: Running) -> std::thread::JoinHandle<Option<std::process::ExitStatus>> {
    running.reap_in_background(Duration::from_secs(120))
}

fn exit_status(
    reaper: std::thread::JoinHandle<Option<std::process::ExitStatus>>,
) -> std::process::ExitStatus {
    reaper
        .join()
        .expect("reaper thread")
        .expect("stream start did not exit after handing over")
}

fn flip_byte(path: &std::path::Path, offset: u64) {
    let f = std::fs::OpenOptions::new()
        .write(true)
        .read(true)
        .open(path)
        .unwrap();
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, offset).unwrap();
    f.write_all_at(&[b[0] ^ 0xff], offset).unwrap();
    f.sync_all().unwrap();
}

#[test]
fn verify_catches_a_corrupted_chunk_with_its_range() {
    let dir = tempfile::tempdir().unwrap();
    let img = mixed_image(dir.path());
    let start = Start::new(&img.path, dir.path().join("target.img"), dir.path())
        .chunk_size("64K")
        .rate_limit(None);
    let state = start.state_dir().to_path_buf();
    let running = start.spawn();
    let mut conn = running.open();
    write_and_flush(&mut conn, img.expected_all());
    drop(conn);
    let reaper = reap(running);
    let out = Finalize::new(&state)
        .args(&["--json"])
        .run_ok(Duration::from_secs(120));
    assert_finalized_report(&finalize::json_stdout(&out), &state, start.target_path());
    assert!(exit_status(reaper).success());
    let out = finalize::verify(&state, true);
    assert!(
        out.status.success(),
        "verify before corrupting: {}",
        out.describe()
    );

    // A data chunk no client wrote, a chunk the client wrote, and a hole
    // chunk no client wrote (a hole of the sparse target until now).
    let target = start.target_path();
    flip_byte(target, 3 * MIB + 100);
    flip_byte(target, 4 * MIB + CHUNK + 7);
    flip_byte(target, 8 * MIB + 5);
    let out = finalize::verify(&state, true);
    assert!(
        !out.status.success(),
        "verify passed a corrupted target: {}",
        out.describe()
    );
    let report = finalize::json_stdout(&out);
    assert_eq!(
        report["mismatches"],
        json!([
            {"offset": 3 * MIB, "length": CHUNK, "against": "source"},
            {"offset": 4 * MIB + CHUNK, "length": CHUNK, "against": "manifest"},
            {"offset": 8 * MIB, "length": CHUNK, "against": "source"},
        ]),
        "{}",
        out.describe()
    );
    assert_eq!(report["chunks_checked"], 16 * MIB / CHUNK, "{report}");
    // Without --json the ranges are in the message.
    let out = finalize::verify(&state, false);
    assert!(!out.status.success());
    let err = out.stderr_lossy();
    for (from, to) in [
        (3 * MIB, 3 * MIB + CHUNK),
        (4 * MIB + CHUNK, 4 * MIB + 2 * CHUNK),
    ] {
        assert!(
            err.contains(&format!("{from}..{to}")),
            "range {from}..{to} not named: {}",
            out.describe()
        );
    }
}
