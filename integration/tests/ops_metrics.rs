//! `stream start --metrics`: the Prometheus endpoint scraped over plain TCP,
//! every line parsed, values following what clients do.

use std::time::Duration;

use integration::Start;
use integration::image::{MIB, dense_file};
use integration::ops::{poll, run_entry, scrape};

#[test]
fn metrics_follow_client_reads_and_writes() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let source = dir.path().join("legacy.img");
    let data = dense_file(&source, 8 * MIB, 0x3e7);
    let start = Start::new(&source, dir.path().join("target.img"), dir.path())
        .chunk_size("64K")
        .no_hydrate(true)
        .args(&[
            "--id",
            "db01",
            "--metrics",
            "0",
            "--run-dir",
            run.to_str().unwrap(),
        ]);
    let mut running = start.spawn();
    let entry = run_entry(&run, "db01", Duration::from_secs(10));
    let addr = entry["metrics"]
        .as_str()
        .expect("metrics address")
        .to_string();
    assert!(
        addr.starts_with("127.0.0.1:"),
        "a bare port must bind loopback: {addr}"
    );

    let m = [("migration", "db01")];
    let before = scrape(&addr);
    assert!(
        before.content_type.starts_with("text/plain; version=0.0.4"),
        "{}",
        before.content_type
    );
    assert_eq!(before.value("stream_size_bytes", &m), (8 * MIB) as f64);
    assert_eq!(before.value("stream_present_bytes", &m), 0.0);
    assert_eq!(before.value("stream_connected_clients", &m), 0.0);
    assert_eq!(before.value("stream_fetched_bytes_total", &m), 0.0);
    assert_eq!(before.value("stream_source_reconnects_total", &m), 0.0);
    assert_eq!(before.value("stream_source_up", &m), 1.0);
    assert_eq!(
        before.value(
            "stream_phase",
            &[("migration", "db01"), ("phase", "streaming")]
        ),
        1.0
    );
    assert_eq!(
        before.value(
            "stream_phase",
            &[("migration", "db01"), ("phase", "finalized")]
        ),
        0.0
    );
    assert_eq!(before.types["stream_fetched_bytes_total"], "counter");
    assert_eq!(
        before.types["stream_foreground_fetch_duration_seconds"],
        "histogram"
    );
    let info = before
        .samples
        .iter()
        .find(|s| s.name == "stream_info")
        .expect("stream_info");
    assert_eq!(info.labels["source"], source.to_str().unwrap());

    // A client reads 1 MiB (16 chunks fetched on demand) and writes 4 KiB.
    let mut conn = running.open();
    assert_eq!(
        conn.read_ok(MIB, MIB as u32),
        data[MIB as usize..2 * MIB as usize]
    );
    conn.write_request(0, 9, 5 * MIB, &[0xab; 4096]).unwrap();
    let reply = conn.read_reply(0).unwrap();
    assert_eq!(reply.error(), None, "{reply:?}");

    let after = scrape(&addr);
    assert_eq!(after.value("stream_connected_clients", &m), 1.0);
    assert_eq!(
        after.value("stream_fetched_on_demand_chunks_total", &m),
        17.0
    );
    assert!(after.value("stream_fetched_bytes_total", &m) >= MIB as f64);
    assert_eq!(after.value("stream_client_written_bytes_total", &m), 4096.0);
    assert_eq!(after.value("stream_client_written_chunks", &m), 1.0);
    assert_eq!(
        after.value("stream_present_bytes", &m),
        (17 * 64 * 1024) as f64
    );
    // The histogram: cumulative buckets ending in +Inf == _count > 0.
    let h = "stream_foreground_fetch_duration_seconds";
    let count = after.value(&format!("{h}_count"), &m);
    assert!(count >= 1.0, "no foreground fetch recorded");
    let buckets: Vec<(f64, f64)> = after
        .samples
        .iter()
        .filter(|s| s.name == format!("{h}_bucket"))
        .map(|s| {
            let le = &s.labels["le"];
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().unwrap()
            };
            (le, s.value)
        })
        .collect();
    assert!(
        buckets
            .windows(2)
            .all(|w| w[0].0 < w[1].0 && w[0].1 <= w[1].1),
        "{buckets:?}"
    );
    assert_eq!(buckets.last().unwrap(), &(f64::INFINITY, count));
    assert!(after.value(&format!("{h}_sum"), &m) > 0.0);
    drop(conn);
    poll("the client counted gone", Duration::from_secs(10), || {
        (scrape(&addr).value("stream_connected_clients", &m) == 0.0).then_some(())
    });

    // Not a GET: refused, and the endpoint still serves afterwards.
    let mut s = std::net::TcpStream::connect(&addr).unwrap();
    use std::io::{Read, Write};
    s.write_all(b"POST /metrics HTTP/1.0\r\n\r\n").unwrap();
    let mut reply = String::new();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.read_to_string(&mut reply).unwrap();
    assert!(reply.starts_with("HTTP/1.0 405"), "{reply}");
    running.assert_alive();
    running.sigterm_and_wait(Duration::from_secs(30));
    assert!(
        !run.join("db01.json").exists(),
        "a clean stop left its run directory entry"
    );
}
