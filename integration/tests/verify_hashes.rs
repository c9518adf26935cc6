//! `stream verify` of a migration whose source is `stream export` proves
//! target == source with the hashes the source computes where the disk is
//! (issue 15): it reads no source data, moves at most 64 bytes per chunk
//! over the link (counted by a proxy in front of the export), and still
//! finds a byte flipped in the target or in the source. Against a server
//! with no hash export it reads, and says so.

use std::time::Duration;

use integration::Start;
use integration::finalize::Finalize;
use integration::image::{MIB, dense_file};
use integration::proxy::Proxy;
use serde_json::Value;

const CHUNKS: u64 = 1024; // 64 MiB in 64 KiB chunks

fn verify(state: &std::path::Path) -> (bool, Value, String) {
    let out = integration::finalize::verify(state, true);
    let doc: Value = integration::finalize::json_stdout(&out);
    (out.status.success(), doc, out.stderr_lossy())
}

#[test]
fn verify_against_stream_export_moves_hashes_not_data_and_finds_a_flipped_byte() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("source.img");
    dense_file(&src, CHUNKS * 64 * 1024, 0x5eed);
    let (_export, proxy) = Proxy::in_front_of_export(&src);
    let target = dir.path().join("target.img");
    let start = Start::new(proxy.uri(""), &target, dir.path()).chunk_size("64K");
    let state = start.state_dir().to_path_buf();
    let mut running = start.spawn();
    running.wait_hydrated(Duration::from_secs(120));
    let reaped = running.reap_in_background(Duration::from_secs(120));
    Finalize::new(&state).run_ok(Duration::from_secs(120));
    assert!(reaped.join().unwrap().expect("start exited").success());

    let before = proxy.bytes();
    let (ok, doc, err) = verify(&state);
    let moved = proxy.bytes() - before;
    assert!(ok, "{doc}\n{err}");
    assert_eq!(doc["source_hashes"], true, "{doc}");
    assert_eq!(doc["source_bytes_read"], 0, "{doc}");
    assert_eq!(doc["chunks_compared_with_source"], CHUNKS, "{doc}");
    eprintln!(
        "verify of {CHUNKS} chunks ({} MiB): {moved} bytes through the link, {:.1} per chunk",
        CHUNKS * 64 * 1024 / MIB,
        moved as f64 / CHUNKS as f64
    );
    assert!(
        moved <= 64 * CHUNKS,
        "{moved} bytes crossed the link for {CHUNKS} chunks (goal: <= 64 per chunk)"
    );

    // A byte flipped in the target (as a disk might) is found...
    let at = 5 * MIB + 77;
    let byte = std::fs::read(&target).unwrap()[at as usize];
    integration::fault::damage(&target, at, &[byte ^ 0x10]);
    let (ok, doc, _) = verify(&state);
    assert!(!ok, "{doc}");
    assert_eq!(
        doc["mismatches"][0]["offset"],
        (at / 65536) * 65536,
        "{doc}"
    );
    integration::fault::damage(&target, at, &[byte]);

    // ... and so is one flipped in the source.
    let at = 40 * MIB + 3;
    let byte = std::fs::read(&src).unwrap()[at as usize];
    integration::fault::damage(&src, at, &[byte ^ 0x01]);
    let (ok, doc, _) = verify(&state);
    assert!(!ok, "{doc}");
    assert_eq!(
        doc["mismatches"][0]["offset"],
        (at / 65536) * 65536,
        "{doc}"
    );
    assert_eq!(doc["mismatches"][0]["against"], "source", "{doc}");
}

#[test]
fn verify_against_a_server_without_hashes_reads_and_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("source.img");
    dense_file(&src, 4 * MIB, 7);
    let nbdkit = integration::fault::Nbdkit::file(dir.path(), &src, &[]);
    let start = Start::new(nbdkit.uri(), dir.path().join("target.img"), dir.path());
    let state = start.state_dir().to_path_buf();
    let mut running = start.spawn();
    running.wait_hydrated(Duration::from_secs(60));
    let reaped = running.reap_in_background(Duration::from_secs(120));
    Finalize::new(&state).run_ok(Duration::from_secs(120));
    assert!(reaped.join().unwrap().expect("start exited").success());
    let (ok, doc, err) = verify(&state);
    assert!(ok, "{doc}\n{err}");
    assert_eq!(doc["source_hashes"], false, "{doc}");
    assert_eq!(doc["source_bytes_read"], 4 * MIB, "{doc}");
    assert!(err.contains("serves no chunk hashes"), "{err}");
}
