//! `stream finalize` when the source cannot be reached: it fails within
//! its `--timeout`, saying what is missing, and loses nothing; once the
//! source is back the same command finishes the migration.

use std::time::{Duration, Instant};

use integration::Start;
use integration::finalize::{self, Finalize};
use integration::image::{KIB, MIB, assert_same_bytes, assert_same_file};
use integration::proxy::Proxy;
use integration::start::{mixed_image, read_export};

#[test]
fn finalize_without_the_source_fails_cleanly_then_succeeds() {
    let dir = tempfile::tempdir().unwrap();
    let img = mixed_image(dir.path());
    let (export, proxy) = Proxy::in_front_of_export(&img.path);
    let start = Start::new(proxy.uri(""), dir.path().join("target.img"), dir.path())
        .chunk_size("64K")
        .no_hydrate(true);
    let state = start.state_dir().to_path_buf();

    // Serve only, read a little, stop cleanly: most chunks stay absent.
    let running = start.spawn();
    let mut conn = running.open();
    for (off, len) in [(0, 256 * KIB), (3 * MIB + 777, 100_000)] {
        let got = read_export(&mut conn, off, len);
        assert_same_bytes(
            &got,
            &img.expected(off, len as usize),
            off,
            "read before finalize",
        );
    }
    drop(conn);
    running.sigterm_and_wait(Duration::from_secs(30));

    // The source host goes down.
    proxy.refuse(true);
    let t0 = Instant::now();
    let out = Finalize::new(&state)
        .args(&["--timeout", "5s"])
        .run_fails(Duration::from_secs(90));
    let took = t0.elapsed();
    assert!(
        took < Duration::from_secs(30),
        "finalize took {took:?} to give up with --timeout 5s"
    );
    let err = out.stderr_lossy();
    assert!(
        err.contains("missing") && err.contains("of 256 chunks"),
        "the failure does not say what is missing: {}",
        out.describe()
    );
    let h = finalize::header(&state);
    assert_eq!(
        h["phase"], "streaming",
        "a failed finalize changed the phase: {h}"
    );
    assert!(
        !state.join("manifest.json").exists(),
        "manifest written without the source"
    );

    // The migration is still usable: it is served again, the source still down.
    let running = start.spawn();
    let st = finalize::status(&state);
    assert_eq!(st["volume"]["phase"], "streaming", "{st}");
    assert_eq!(st["volume"]["hydration_complete"], false, "{st}");
    let mut conn = running.open();
    let got = read_export(&mut conn, 0, 256 * KIB);
    assert_same_bytes(
        &got,
        &img.expected(0, 256 * KIB as usize),
        0,
        "read of a present chunk",
    );
    drop(conn);
    running.sigterm_and_wait(Duration::from_secs(30));

    // The source is back: the same command finishes.
    proxy.refuse(false);
    let out = Finalize::new(&state)
        .args(&["--verify", "--json", "--timeout", "60s"])
        .run_ok(Duration::from_secs(120));
    let report = finalize::json_stdout(&out);
    assert_eq!(report["phase"], "finalized", "{report}");
    assert_eq!(
        report["verify"]["mismatches"],
        serde_json::json!([]),
        "{report}"
    );
    assert_eq!(
        report["manifest"]["counts"]["written_by_clients"], 0,
        "{report}"
    );
    assert_same_file(start.target_path(), &img.path);
    drop(export);
}
