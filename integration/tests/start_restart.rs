//! Writes flushed through `stream start` survive a clean stop and resume,
//! and end up in the target after hydration.

use std::process::Command;
use std::time::Duration;

use integration::image::{KIB, MIB, assert_same_bytes, read_file};
use integration::start::mixed_image;
use integration::{Start, require_tool, run_ok};

const CHUNK: u64 = 64 * KIB;

/// qemu-io with `cmds` against `uri`; asserts no command failed.
fn qemu_io(uri: &str, cmds: &[String]) {
    let qemu_io = require_tool("qemu-io", "qemu-utils");
    let mut cmd = Command::new(qemu_io);
    cmd.args(["-f", "raw"]);
    for c in cmds {
        cmd.args(["-c", c]);
    }
    let out = run_ok(cmd.arg(uri), Duration::from_secs(60));
    let text = out.stdout_lossy() + &out.stderr_lossy();
    assert!(
        !text.contains("fail") && !text.contains("error") && !text.contains("Pattern verification"),
        "{}",
        out.describe()
    );
}

#[test]
fn writes_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let img = mixed_image(dir.path());
    let start = Start::new(&img.path, dir.path().join("target.img"), dir.path())
        .chunk_size("64K")
        .no_hydrate(true);
    let mut model = img.expected_all();
    // (pattern byte, offset, length)
    let writes: [(u8, u64, u64); 7] = [
        (0x11, CHUNK + 1000, 3000),              // inside an absent data chunk
        (0x22, 2 * MIB - 777, 2000),             // across a chunk boundary, in a hole
        (0x33, 3 * MIB + 5 * CHUNK - 10, 20),    // across a boundary, in data
        (0x44, 4 * MIB, 2 * CHUNK),              // two whole absent chunks
        (0x55, 12 * MIB - CHUNK / 2, 2 * CHUNK), // hole into data, three chunks
        (0x66, 16 * MIB - 513, 513),             // the last bytes of the disk
        (0x77, MIB + 4 * KIB - 1, 2),            // across the data/hole edge
    ];
    let mut cmds = Vec::new();
    for &(p, off, len) in &writes {
        cmds.push(format!("write -P {p:#x} {off} {len}"));
        model[off as usize..(off + len) as usize].fill(p);
    }
    cmds.push("flush".into());

    let running = start.spawn();
    qemu_io(&running.uri, &cmds);
    running.sigterm_and_wait(Duration::from_secs(30));

    // The same command line resumes; the patterns read back.
    let running = start.spawn();
    let reads: Vec<String> = writes
        .iter()
        .map(|&(p, off, len)| format!("read -P {p:#x} {off} {len}"))
        .collect();
    qemu_io(&running.uri, &reads);
    running.sigterm_and_wait(Duration::from_secs(30));

    let start = start.no_hydrate(false);
    let mut running = start.spawn();
    qemu_io(&running.uri, &reads);
    let st = running.wait_hydrated(Duration::from_secs(60));
    assert!(
        st["volume"]["chunks_written"].as_u64().unwrap() >= 7,
        "written chunks not counted: {st}"
    );
    running.sigterm_and_wait(Duration::from_secs(30));
    assert_same_bytes(
        &read_file(start.target_path()),
        &model,
        0,
        "target after hydration (source + writes)",
    );
}
