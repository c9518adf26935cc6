//! A restart of `stream start` (kill -9, then the same command line) is
//! invisible to a client that reconnects: qemu-io with QEMU's NBD driver
//! and `reconnect-delay` keeps writing and reading across each restart,
//! with every command answered without error and the patterns read back.
//! The gap (kill to the first I/O answered by the new process) is printed.

use std::time::{Duration, Instant};

use integration::Start;
use integration::fault::QemuIo;
use integration::image::{KIB, MIB, assert_same_bytes};
use integration::start::{mixed_image, read_export};

const CHUNK: u64 = 64 * KIB;
const ROUNDS: u64 = 5;
const IO: Duration = Duration::from_secs(60);

#[test]
fn qemu_reconnects_across_kill9_restarts_without_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let img = mixed_image(dir.path());
    let start = Start::new(&img.path, dir.path().join("target.img"), dir.path())
        .chunk_size("64K")
        .rate_limit(Some("1M"));
    let mut model = img.expected_all();
    let mut running = start.spawn();
    let socket = dir.path().join("nbd.sock");
    let mut q = QemuIo::nbd_unix(&socket, 30);
    let mut written: Vec<(u8, u64, u64)> = Vec::new();
    let mut gaps = Vec::new();
    for round in 0..ROUNDS {
        // Before the crash: writes in absent and present chunks, flushed.
        for k in 0..3u64 {
            let p = (0x10 + round * 16 + k) as u8;
            let off = (round * 3 + k) * MIB / 2 + k * 4097;
            let len = CHUNK + 513 * (k + 1);
            q.run(&format!("write -P {p:#x} {off} {len}"), IO);
            model[off as usize..(off + len) as usize].fill(p);
            written.push((p, off, len));
        }
        q.run("flush", IO);
        // The crash, and a write sent while nothing serves.
        running.kill9();
        let killed = Instant::now();
        let p = (0x80 + round) as u8;
        let off = 15 * MIB + round * 2 * CHUNK + 100;
        let cmd = format!("write -P {p:#x} {off} {CHUNK}");
        let writer = std::thread::spawn(move || {
            q.run(&cmd, IO);
            (q, killed.elapsed())
        });
        running = start.spawn();
        let ready = killed.elapsed();
        let (q2, gap) = writer.join().expect("qemu-io across the restart");
        q = q2;
        model[off as usize..(off + CHUNK) as usize].fill(p);
        written.push((p, off, CHUNK));
        q.run("flush", IO);
        eprintln!(
            "restart {round}: new process ready after {ready:?}; gap (kill to the write answered) {gap:?}"
        );
        gaps.push(gap);
        // Everything written so far reads back.
        for &(p, off, len) in &written {
            q.run(&format!("read -P {p:#x} {off} {len}"), IO);
        }
    }
    let status = q.quit();
    assert!(status.success(), "qemu-io exited with {status}");
    gaps.sort();
    eprintln!(
        "reconnect gaps over {ROUNDS} kill -9 restarts: min {:?} median {:?} max {:?}",
        gaps[0],
        gaps[gaps.len() / 2],
        gaps[gaps.len() - 1]
    );
    let mut conn = running.open();
    let got = read_export(&mut conn, 0, img.size);
    assert_same_bytes(&got, &model, 0, "the export after the restarts");
    drop(conn);
    running.sigterm_and_wait(Duration::from_secs(30));
}
