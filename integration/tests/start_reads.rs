//! `stream start` serves the source's content before anything is copied,
//! and copies it exactly; extents it reports as zero read as zeros.

use std::process::Command;
use std::time::Duration;

use integration::image::{KIB, MIB, assert_same_bytes, assert_same_file, bytes_hash, file_hash};
use integration::start::{MapExtent, mixed_image, nbdinfo_map, read_export};
use integration::{Region, Running, Start, require_tool, run, run_ok};

const HYDRATE_TIMEOUT: Duration = Duration::from_secs(60);
const STOP_TIMEOUT: Duration = Duration::from_secs(30);

#[test]
fn start_reads_equal_the_source() {
    let qemu_img = require_tool("qemu-img", "qemu-utils");
    let nbdcopy = require_tool("nbdcopy", "libnbd-bin");
    let dir = tempfile::tempdir().unwrap();
    let img = mixed_image(dir.path());
    let start = Start::new(&img.path, dir.path().join("target.img"), dir.path()).no_hydrate(true);
    let mut running = start.spawn();

    let st = running.status();
    assert_eq!(
        st["volume"]["chunks_hydrated"], 0,
        "hydrated with --no-hydrate: {st}"
    );
    assert_eq!(st["volume"]["hydration_complete"], false, "{st}");

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

    let copy = dir.path().join("copy.img");
    run_ok(
        Command::new(&nbdcopy).arg(&running.uri).arg(&copy),
        Duration::from_secs(60),
    );
    assert_eq!(
        file_hash(&copy),
        bytes_hash(&img.expected_all()),
        "nbdcopy of the export differs from the source"
    );
    running.assert_alive();
    running.sigterm_and_wait(STOP_TIMEOUT);

    // Resume with the background copy on; the target must end identical.
    let start = start.no_hydrate(false);
    let mut running = start.spawn();
    running.wait_hydrated(HYDRATE_TIMEOUT);
    running.sigterm_and_wait(STOP_TIMEOUT);
    assert_same_file(start.target_path(), &img.path);
}

/// Asserts every extent the export flags zero reads as zeros, that no
/// region a client wrote non-zero bytes to lies inside one, and (when
/// `full`, which fetches every chunk) that the whole export reads as `model`.
fn check_zero_extents(
    running: &Running,
    stage: &str,
    written: &[Region],
    model: &[u8],
    full: bool,
) {
    let map = nbdinfo_map(&running.uri);
    let mut conn = running.open();
    for e in map.iter().filter(|e| e.is_zero()) {
        let bytes = read_export(&mut conn, e.offset, e.length);
        if let Some(at) = bytes.iter().position(|&b| b != 0) {
            panic!(
                "{stage}: extent {e:?} is flagged zero but byte {} reads {:#04x}\nmap: {map:?}\n{}",
                e.offset + at as u64,
                bytes[at],
                running.log()
            );
        }
        for w in written {
            assert!(
                w.end() <= e.offset || e.offset + e.length <= w.offset,
                "{stage}: written region {w:?} lies in zero extent {e:?}\nmap: {map:?}"
            );
        }
    }
    if full {
        let all = read_export(&mut conn, 0, model.len() as u64);
        assert_same_bytes(&all, model, 0, &format!("{stage}: export content"));
    }
}

fn zero_extents(map: &[MapExtent]) -> usize {
    map.iter().filter(|e| e.is_zero()).count()
}

#[test]
fn zero_extents_are_really_zero() {
    let qemu_io = require_tool("qemu-io", "qemu-utils");
    let dir = tempfile::tempdir().unwrap();
    let img = mixed_image(dir.path());
    let start = Start::new(&img.path, dir.path().join("target.img"), dir.path()).no_hydrate(true);
    let running = start.spawn();
    let mut model = img.expected_all();

    // Fresh: the source's holes must show, and read as zeros.
    let fresh = nbdinfo_map(&running.uri);
    assert!(
        zero_extents(&fresh) > 0,
        "no zero extents on a sparse source: {fresh:?}"
    );
    check_zero_extents(&running, "fresh", &[], &model, false);
    // Reads fetch a few chunks: across the data/hole edge at 1 MiB + 4 KiB,
    // and in the allocated zero region (found all zero when fetched).
    let mut conn = running.open();
    for (off, len) in [(MIB - 5000, 70_000), (5 * MIB + 300, 100_000)] {
        let got = read_export(&mut conn, off, len);
        let want = &model[off as usize..(off + len) as usize];
        assert_same_bytes(&got, want, off, "read");
    }
    drop(conn);
    check_zero_extents(&running, "after reads", &[], &model, false);

    // Client writes: data into a hole and into the allocated zero region,
    // zeros over data, a discard over data, a write-zeroes of a partial chunk.
    let written = [
        Region::new(MIB + 100 * KIB + 7, 3000),
        Region::new(5 * MIB + 64 * KIB - 100, 200),
        Region::new(14 * MIB, 64 * KIB),
    ];
    let mut cmd = Command::new(&qemu_io);
    cmd.args(["-f", "raw"]);
    for (i, w) in written.iter().enumerate() {
        cmd.args([
            "-c",
            &format!("write -P {} {} {}", 0xa1 + i, w.offset, w.len),
        ]);
        model[w.offset as usize..w.end() as usize].fill(0xa1 + i as u8);
    }
    let zeroed = [
        (3 * MIB, 128 * KIB),
        (12 * MIB + 1000, 5000),
        (6 * MIB + 12345, 300_000),
    ];
    for (off, len) in zeroed {
        cmd.args(["-c", &format!("write -z {off} {len}")]);
        model[off as usize..(off + len) as usize].fill(0);
    }
    let discarded = (4 * MIB, 256 * KIB);
    cmd.args(["-c", &format!("discard {} {}", discarded.0, discarded.1)]);
    cmd.args(["-c", "flush"]).arg(&running.uri);
    let out = run_ok(&mut cmd, Duration::from_secs(60));
    let text = out.stdout_lossy() + &out.stderr_lossy();
    assert!(
        !text.contains("fail") && !text.contains("error"),
        "{}",
        out.describe()
    );

    // A discarded range reads as zeros or as what it held: take what it reads
    // when it is one of the two, per chunk.
    let mut conn = running.open();
    let got = read_export(&mut conn, discarded.0, discarded.1);
    for (i, piece) in got.chunks(64 * KIB as usize).enumerate() {
        let at = discarded.0 as usize + i * 64 * KIB as usize;
        let old = &model[at..at + piece.len()];
        assert!(
            piece == old || piece.iter().all(|&b| b == 0),
            "discarded chunk at {at} reads neither its old bytes nor zeros"
        );
        model[at..at + piece.len()].copy_from_slice(piece);
    }
    drop(conn);
    check_zero_extents(
        &running,
        "after writes, zeroes and discard",
        &written,
        &model,
        false,
    );
    running.sigterm_and_wait(STOP_TIMEOUT);

    let start = start.no_hydrate(false);
    let mut running = start.spawn();
    check_zero_extents(&running, "after restart", &written, &model, false);
    running.wait_hydrated(HYDRATE_TIMEOUT);
    check_zero_extents(&running, "after hydration", &written, &model, true);
    running.sigterm_and_wait(STOP_TIMEOUT);
    assert_same_bytes(
        &integration::image::read_file(start.target_path()),
        &model,
        0,
        "target after hydration",
    );
}
