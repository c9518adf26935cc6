//! Issue 15: one reboot, literally. A real guest (the boot fixture under
//! QEMU TCG) runs from `stream start`'s export while a writer in it writes
//! and syncs a counter; `stream start` is killed (-9) and restarted twice,
//! once while the kernel reads the disk at boot and once during the
//! writes; then `stream detach` moves the guest onto the target without
//! stopping it. The guest must see no I/O error, its writer must go on
//! across the switch and after the export is gone, and the target must
//! equal the disk as the guest sees it at the end (its sha256, taken in
//! the guest after a read-only remount).

use std::process::Command;
use std::time::Duration;

use integration::guest::{self, Disk, Guest};
use integration::start::Start;
use integration::{binary, tool};

/// The writer's count on a `STREAM-COUNT n uptime` line.
fn count(line: &str) -> Option<u64> {
    line.strip_prefix("STREAM-COUNT ")?
        .split(' ')
        .next()?
        .parse()
        .ok()
}

fn last_count(g: &Guest) -> u64 {
    g.lines().iter().filter_map(|l| count(l)).max().unwrap_or(0)
}

fn field<'a>(line: &'a str, name: &str) -> &'a str {
    line.split(' ')
        .find_map(|w| w.strip_prefix(&format!("{name}=")))
        .unwrap_or_else(|| panic!("no {name}= in {line:?}"))
}

#[test]
fn a_guest_survives_two_crashes_of_stream_start_and_moves_onto_the_target_live() {
    tool::require_tool("qemu-system-x86_64", "qemu-system-x86");
    let debugfs = tool::require_tool("debugfs", "e2fsprogs");
    let image = guest::boot_image();
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("target.raw");
    let qmp = dir.path().join("qmp.sock");
    // Slow enough that both crashes come while chunks are still missing.
    let start = Start::new(&image.disk, &target, dir.path()).rate_limit(Some("20M"));
    let mut running = start.spawn();
    let mut guest = Guest::start(
        &image,
        Disk::Nbd(&dir.path().join("nbd.sock")),
        &qmp,
        "/sbin/writer",
        &dir.path().join("console.log"),
    );
    let boot = Duration::from_secs(180);

    // Crash 1: the kernel has just found the disk and reads it.
    guest.wait_line("the virtio disk", boot, |l| l.contains("[vda]"));
    running.kill9();
    running = start.spawn();
    // Crash 2: during the writes.
    guest.wait_line("count 5", boot, |l| count(l) >= Some(5));
    let st = running.status();
    assert!(
        !st["volume"]["hydration_complete"].as_bool().unwrap(),
        "hydration finished before the second crash: the test would prove less ({st})"
    );
    running.kill9();
    running = start.spawn();
    guest.wait_line("count 15", boot, |l| count(l) >= Some(15));

    let out = tool::run(
        Command::new(binary::stream_bin())
            .arg("detach")
            .arg("--state")
            .arg(start.state_dir())
            .arg("--qmp")
            .arg(&qmp)
            .args(["--device", "vda", "--timeout", "120s", "--json"]),
        Duration::from_secs(240),
    );
    assert!(
        out.status.success(),
        "stream detach: {}\n{}",
        out.describe(),
        running.log()
    );
    let switched: serde_json::Value = out
        .stderr_lossy()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v["event"] == "switched")
        .unwrap_or_else(|| panic!("no switched event: {}", out.describe()));
    let reopen_ms = switched["reopen_ms"].as_f64().expect("reopen_ms");
    let report: serde_json::Value =
        serde_json::from_str(out.stdout_lossy().trim()).unwrap_or_else(|e| {
            panic!(
                "stream detach --json printed no report ({e}): {}",
                out.describe()
            )
        });
    assert_eq!(report["phase"], "finalized", "{report}");
    assert_eq!(report["native_path"], target.to_str().unwrap());
    // Nothing of the stream serves the guest any more: `stream start`
    // handed over and exited.
    let status = running.wait_exit(Duration::from_secs(30));
    assert!(
        status.success(),
        "stream start after the handover: {status}"
    );

    // The writer goes on, on the target alone.
    let after = last_count(&guest);
    guest.wait_line("ten more counts after the detach", boot, |l| {
        count(l) >= Some(after + 10)
    });
    guest.send_line("stop");
    let done = guest.wait_line("the writer's end", boot, |l| {
        l.starts_with("STREAM-WRITER-DONE") || l.starts_with("STREAM-WRITER-FAIL")
    });
    let exit = guest.wait_exit(Duration::from_secs(60));
    assert!(exit.success(), "qemu: {exit}");

    let lines = guest.lines();
    let errors: Vec<_> = lines
        .iter()
        .filter(|l| {
            l.contains("I/O error") || l.contains("STREAM-WRITER-IOERR") || l.contains("FAIL")
        })
        .collect();
    assert!(errors.is_empty(), "the guest saw errors: {errors:#?}");
    assert_eq!(field(&done, "status"), "0", "{done}");
    assert_eq!(field(&done, "ioerrors"), "0", "{done}");
    let final_count: u64 = field(&done, "count").parse().unwrap();
    assert!(final_count >= after + 10, "{done}");

    // The target is the disk the guest saw, byte for byte ...
    let sum = tool::run_ok(
        Command::new("sha256sum").arg(&target),
        Duration::from_secs(60),
    );
    assert_eq!(
        sum.stdout_lossy().split(' ').next().unwrap(),
        field(&done, "sha256"),
        "the target differs from the guest's view of its disk"
    );
    // ... holding the writer's last count.
    let counter = tool::run_ok(
        Command::new(debugfs)
            .arg("-R")
            .arg("cat /data/counter")
            .arg(&target),
        Duration::from_secs(30),
    );
    assert_eq!(counter.stdout_lossy().trim(), final_count.to_string());
    eprintln!(
        "live detach: switch {reopen_ms:.1} ms; writer count {final_count} ({after} at the switch)"
    );
}
