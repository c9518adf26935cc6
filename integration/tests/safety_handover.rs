//! Issue 12, "Data safety", case 10: a `stream finalize` that does not
//! complete its handover gives the running `stream start` its
//! `--rate-limit` and `--no-hydrate` back, whichever way it ends: an error
//! (here its `--timeout`), or finalize killed while it waits.
//!
//! The source is nbdkit's random plugin, 4 GiB: far more than hydration
//! can copy in the few seconds each test runs, at full speed or not.

use std::thread;
use std::time::{Duration, Instant};

use integration::finalize::Finalize;
use integration::image::MIB;
use integration::tls::Nbdkit;
use integration::{Running, Start};

const SIZE: u64 = 4 << 30;

fn random_source(dir: &std::path::Path) -> Nbdkit {
    Nbdkit::spawn(dir, &["-t", "1", "random", "size=4G", "seed=12"])
}

fn present(running: &Running) -> u64 {
    running.status()["volume"]["bytes_present"]
        .as_u64()
        .expect("bytes_present")
}

/// Bytes made present over `window` (measured, not a synchronisation).
fn growth(running: &Running, window: Duration) -> (u64, Duration) {
    let (t0, b0) = (Instant::now(), present(running));
    thread::sleep(window);
    let b1 = present(running);
    (b1.saturating_sub(b0), t0.elapsed())
}

#[test]
fn rate_limit_is_back_after_a_finalize_that_timed_out() {
    let dir = tempfile::tempdir().unwrap();
    let kit = random_source(dir.path());
    let uri = format!("nbd+unix:///?socket={}", kit.socket.display());
    let start = Start::new(&uri, dir.path().join("target.img"), dir.path())
        .chunk_size("64K")
        .rate_limit(Some("1M"));
    let mut running = start.spawn();
    running.wait_for("hydration to begin", Duration::from_secs(30), |st| {
        st["volume"]["bytes_present"].as_u64().unwrap_or(0) > 0
    });

    let out = Finalize::new(start.state_dir())
        .args(&["--timeout", "2s"])
        .run_fails(Duration::from_secs(60));
    assert!(
        out.stderr_lossy().contains("--timeout expired"),
        "finalize failed for another reason: {}",
        out.describe()
    );
    running.assert_alive();
    // Let the full-speed runs in flight when finalize gave up land, then
    // measure: at 1 MiB/s, one run of 16 chunks (1 MiB) per second, plus
    // the bucket's one-second burst.
    let _ = growth(&running, Duration::from_secs(2));
    let (grown, took) = growth(&running, Duration::from_secs(4));
    let rate = grown as f64 / took.as_secs_f64();
    eprintln!(
        "hydration after the failed finalize: {grown} bytes in {took:?} ({:.2} MiB/s)",
        rate / MIB as f64
    );
    assert!(
        grown <= 4 * MIB + took.as_secs() * MIB,
        "--rate-limit 1M not restored: {grown} bytes in {took:?} ({:.1} MiB/s)\n{}",
        rate / MIB as f64,
        running.log()
    );
    assert!(
        present(&running) < SIZE,
        "hydration completed: the test proves nothing"
    );
}

#[test]
fn no_hydrate_is_back_after_finalize_is_killed_mid_handover() {
    let dir = tempfile::tempdir().unwrap();
    let kit = random_source(dir.path());
    let uri = format!("nbd+unix:///?socket={}", kit.socket.display());
    let start = Start::new(&uri, dir.path().join("target.img"), dir.path())
        .chunk_size("64K")
        .no_hydrate(true);
    let mut running = start.spawn();
    assert_eq!(present(&running), 0, "--no-hydrate hydrated");

    let mut fin = Finalize::new(start.state_dir()).spawn(dir.path());
    running.wait_for(
        "finalize to start hydration",
        Duration::from_secs(30),
        |st| st["volume"]["bytes_present"].as_u64().unwrap_or(0) > 8 * MIB,
    );
    fin.wait_for(
        "finalize to report hydration",
        Duration::from_secs(30),
        |f| f.stderr().contains("hydrat"),
    );
    fin.kill9();

    // The handover notices the dropped connection at its next progress
    // event (each second) and turns hydration off again: it stops growing.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        running.assert_alive();
        let (grown, took) = growth(&running, Duration::from_secs(1));
        if grown == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "hydration still runs ({grown} bytes in {took:?}) after finalize was killed: \
             --no-hydrate not restored\n{}",
            running.log()
        );
    }
    assert!(
        present(&running) < SIZE,
        "hydration completed: the test proves nothing"
    );
    assert!(
        running.log().contains("did not complete the handover"),
        "no log line says hydration was turned back\n{}",
        running.log()
    );
}
