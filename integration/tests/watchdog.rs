//! A request the engine cannot answer (its source stalls) is named in the
//! log once it passes `--warn-after`, with what it waits for; `stream
//! status` shows its age; and SIGTERM still ends the process within
//! `--stop-timeout` (issue 12: while a FLUSH was wedged, SIGTERM did not
//! end `stream start`).

use std::time::{Duration, Instant};

use integration::Start;
use integration::proxy::Proxy;
use integration::start::mixed_image;
use integration::wire::{CMD_READ, request_bytes};

#[test]
fn a_stuck_read_is_named_shown_in_status_and_sigterm_still_ends_the_process() {
    let dir = tempfile::tempdir().unwrap();
    let img = mixed_image(dir.path());
    let (_export, proxy) = Proxy::in_front_of_export(&img.path);
    let start = Start::new(proxy.uri(""), dir.path().join("target.img"), dir.path())
        .no_hydrate(true)
        .args(&["--warn-after", "1s", "--stop-timeout", "3s"]);
    let mut running = start.spawn();
    let mut conn = running.open();

    // The link stalls; a client reads data the target does not have yet.
    proxy.hold(true);
    conn.send(&request_bytes(0, CMD_READ, 7, 3 << 20, 4096))
        .unwrap();

    let st = running.wait_for("a request older than 2 s", Duration::from_secs(30), |st| {
        st["volume"]["oldest_request_secs"].as_f64().unwrap_or(0.0) > 2.0
    });
    assert_eq!(st["volume"]["requests_in_flight"], 1, "{st}");
    let log = running.log();
    let warnings: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("a client request is stuck"))
        .collect();
    assert_eq!(warnings.len(), 1, "one warning per request:\n{log}");
    let w = warnings[0];
    assert!(
        w.contains("READ of 4096 bytes at offset 3145728")
            && w.contains("waiting for a source read"),
        "the warning names the command, range and what it waits for: {w}"
    );

    // SIGTERM with the read still stuck: out within the stop timeout.
    let t0 = Instant::now();
    running.signal(libc::SIGTERM);
    let status = running.wait_exit(Duration::from_secs(30));
    let took = t0.elapsed();
    assert_eq!(status.code(), Some(1), "exit status after a forced stop");
    assert!(took < Duration::from_secs(20), "stopped after {took:?}");
    let log = integration::start::log_tail(&start.log_path());
    assert!(
        log.contains("still in flight: READ of 4096 bytes")
            && log.contains("did not stop within 3s"),
        "the forced stop says what was stuck:\n{log}"
    );
    proxy.hold(false);
}

/// `--source-stall-timeout` sets when a source request without a reply
/// marks its connection dead (fixed at 20 s before; issue 13).
#[test]
fn the_source_stall_timeout_is_the_flag_given() {
    let dir = tempfile::tempdir().unwrap();
    let img = mixed_image(dir.path());
    let (_export, proxy) = Proxy::in_front_of_export(&img.path);
    let start = Start::new(proxy.uri(""), dir.path().join("target.img"), dir.path())
        .no_hydrate(true)
        .args(&["--source-stall-timeout", "2s"]);
    let running = start.spawn();
    let mut conn = running.open();
    proxy.hold(true);
    let t0 = Instant::now();
    conn.send(&request_bytes(0, CMD_READ, 9, 3 << 20, 4096))
        .unwrap();
    let deadline = t0 + Duration::from_secs(15);
    let log = loop {
        let log = running.log();
        if log.contains("no reply within 2s") || Instant::now() > deadline {
            break log;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(
        log.contains("no reply within 2s"),
        "the stalled connection is given up after 2 s, not 20:\n{log}"
    );
    proxy.hold(false);
    drop(conn);
    running.sigterm_and_wait(Duration::from_secs(30));
}
