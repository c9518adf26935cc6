//! `stream status` while `stream start` is mid-hydration: JSON and human
//! output, and `--watch`.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::Duration;

use integration::image::{MIB, dense_file};
use integration::{Start, binary, run_ok, tool};

#[test]
fn status_reports_progress() {
    let dir = tempfile::tempdir().unwrap();
    // 16 MiB of data at 2 MiB/s: about 8 s to hydrate; we stop long before.
    let source = dir.path().join("dense.img");
    dense_file(&source, 16 * MIB, 0xd00d);
    let start = Start::new(&source, dir.path().join("target.img"), dir.path())
        .chunk_size("64K")
        .rate_limit(Some("2M"));
    let mut running = start.spawn();
    let conn = running.open();
    let st = running.wait_for(
        "some progress and the client counted",
        Duration::from_secs(20),
        |st| {
            st["volume"]["chunks_present"].as_u64().unwrap_or(0) > 0 && st["connected_clients"] == 1
        },
    );
    // A second sample later, so the rate has a window.
    let st2 = running.wait_for("a higher count", Duration::from_secs(20), |s| {
        s["volume"]["chunks_present"].as_u64() > st["volume"]["chunks_present"].as_u64()
            && s["hydration_rate"].as_f64().unwrap_or(0.0) > 0.0
    });
    for st in [&st, &st2] {
        let v = &st["volume"];
        let n = |k: &str| {
            v[k].as_u64()
                .unwrap_or_else(|| panic!("volume.{k} is not a number: {st}"))
        };
        assert_eq!(st["schema"], 1, "{st}");
        assert_eq!(st["pid"], running.pid(), "{st}");
        assert_eq!(st["export_uri"], running.uri.as_str(), "{st}");
        assert_eq!(n("chunks_total"), 256, "{st}");
        assert_eq!(n("size"), 16 * MIB, "{st}");
        assert!(n("chunks_present") <= n("chunks_total"), "{st}");
        assert!(
            n("chunks_present") < n("chunks_total"),
            "hydrated despite the limit: {st}"
        );
        assert!(n("bytes_present") <= n("size"), "{st}");
        assert_eq!(n("bytes_present"), n("chunks_present") * 64 * 1024, "{st}");
        assert!(
            n("bytes_fetched") >= n("bytes_present").saturating_sub(n("chunks_zero") * 64 * 1024),
            "{st}"
        );
        assert_eq!(v["hydration_complete"], false, "{st}");
        assert_eq!(n("chunks_written"), 0, "{st}");
        let rate = st["hydration_rate"].as_f64().expect("hydration_rate");
        assert!(rate >= 0.0 && rate < 64.0 * MIB as f64, "rate {rate}: {st}");
        if let Some(eta) = st["eta_secs"].as_f64() {
            assert!(eta > 0.0, "{st}");
        }
    }
    let rate = st2["hydration_rate"].as_f64().unwrap();
    assert!(
        rate <= 4.0 * 2.0 * MIB as f64,
        "rate {rate} far above the 2M limit: {st2}"
    );

    // The human form says the same things.
    let out = run_ok(
        Command::new(binary::stream_bin())
            .args(["status", "--state"])
            .arg(start.state_dir()),
        Duration::from_secs(10),
    );
    let text = out.stdout_lossy();
    let present = text
        .lines()
        .find(|l| l.starts_with("present"))
        .unwrap_or_else(|| panic!("no `present` line: {text}"));
    let pct: f64 = present
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.strip_suffix('%'))
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no percentage in {present:?}"));
    assert!(pct > 0.0 && pct < 100.0, "{text}");
    assert!(text.contains("16.0 MiB"), "{text}");
    assert!(text.contains(&running.uri), "{text}");
    assert!(text.contains("1 connected"), "{text}");

    // --watch --json prints a line per second until stopped.
    let mut watch = Command::new(binary::stream_bin())
        .args(["status", "--watch", "--json", "--state"])
        .arg(start.state_dir())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn stream status --watch");
    let stdout = watch.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut presents = Vec::new();
    for _ in 0..2 {
        let line = rx
            .recv_timeout(Duration::from_secs(10))
            .expect("a --watch line within 10 s")
            .expect("read --watch");
        let v: serde_json::Value = serde_json::from_str(&line).expect("--watch JSON line");
        presents.push(v["volume"]["chunks_present"].as_u64().unwrap());
    }
    let _ = watch.kill();
    let _ = tool::wait_deadline(&mut watch, Duration::from_secs(10));
    assert!(presents[0] <= presents[1], "{presents:?}");

    drop(conn);
    running.sigterm_and_wait(Duration::from_secs(30));
    // Once stopped, status says nothing answers, and fails.
    let out = integration::start::status_json(start.state_dir());
    assert!(!out.status.success(), "{}", out.describe());
}
