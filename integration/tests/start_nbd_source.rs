//! `stream start` with an NBD source: `stream export` on the legacy side,
//! directly over a unix socket, or over TCP behind a proxy that cuts every
//! connection mid-hydration.

use std::process::Command;
use std::time::Duration;

use integration::image::{assert_same_bytes, assert_same_file};
use integration::proxy::Proxy;
use integration::start::{mixed_image, read_export};
use integration::{Export, Start, require_tool, run};

#[test]
fn source_over_nbd_unix_reads_equal() {
    let qemu_img = require_tool("qemu-img", "qemu-utils");
    let dir = tempfile::tempdir().unwrap();
    let img = mixed_image(dir.path());
    let export = Export::new(&img.path).unix().spawn();
    assert!(export.uri.starts_with("nbd+unix://"), "{}", export.uri);

    let start = Start::new(&export.uri, dir.path().join("target.img"), dir.path()).no_hydrate(true);
    let running = start.spawn();
    let out = run(
        Command::new(&qemu_img)
            .args(["compare", "-f", "raw", "-F", "raw", &running.uri])
            .arg(&img.path),
        Duration::from_secs(60),
    );
    assert!(
        out.status.success(),
        "export differs from the source: {}",
        out.describe()
    );
    running.sigterm_and_wait(Duration::from_secs(30));

    let start = start.no_hydrate(false);
    let mut running = start.spawn();
    running.wait_hydrated(Duration::from_secs(60));
    running.sigterm_and_wait(Duration::from_secs(30));
    assert_same_file(start.target_path(), &img.path);
}

#[test]
fn source_over_nbd_survives_a_cut() {
    let dir = tempfile::tempdir().unwrap();
    let img = mixed_image(dir.path());
    let (export, proxy) = Proxy::in_front_of_export(&img.path);
    // About 5 MiB of data at 2 MiB/s: a few seconds of hydration to cut into.
    let start = Start::new(proxy.uri(""), dir.path().join("target.img"), dir.path())
        .chunk_size("64K")
        .rate_limit(Some("2M"));
    let mut running = start.spawn();
    let mut conn = running.open();
    let probes = [
        (3 * 1024 * 1024 + 777, 100_000u64),
        (12 * 1024 * 1024, 300_000),
    ];
    let mut cuts = 0;
    let mut present = 0;
    for (round, probe) in probes.iter().chain(probes.iter()).enumerate() {
        let st = running.wait_for("more chunks present", Duration::from_secs(30), |st| {
            st["volume"]["chunks_present"].as_u64().unwrap_or(0) > present + 4
                || st["volume"]["hydration_complete"] == true
        });
        if st["volume"]["hydration_complete"] == true {
            break;
        }
        present = st["volume"]["chunks_present"].as_u64().unwrap();
        let n = proxy.cut();
        assert!(n > 0, "round {round}: no connection to cut");
        cuts += 1;
        // A client read right after the cut: served after a reconnect.
        let got = read_export(&mut conn, probe.0, probe.1);
        assert_same_bytes(
            &got,
            &img.expected(probe.0, probe.1 as usize),
            probe.0,
            &format!("read after cut {cuts}"),
        );
    }
    assert!(
        cuts >= 2,
        "hydration finished before the cuts ({cuts} cuts)"
    );
    drop(conn);
    let st = running.wait_hydrated(Duration::from_secs(60));
    assert!(proxy.accepted() > 1, "never reconnected: {st}");
    running.sigterm_and_wait(Duration::from_secs(30));
    assert_same_file(start.target_path(), &img.path);
    drop(export);
}
