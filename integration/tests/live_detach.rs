//! Issue 15: one reboot, literally. A real guest (the boot fixture under
//! QEMU TCG) runs from `stream start`'s export while a writer in it writes
//! and syncs a counter; `stream start` is killed (-9) and restarted twice,
//! once while the kernel reads the disk at boot and once during the
//! writes; then `stream detach` moves the guest onto the target without
//! stopping it. The guest must see no I/O error, its writer must go on
//! across the switch and after the export is gone, and the target must
//! equal the disk as the guest sees it at the end (its sha256, taken in
//! the guest after a read-only remount).
//!
//! The same runs twice: with QEMU started directly (QMP socket), and as a
//! libvirt domain built around the runbook's own `<qemu:commandline>` disk
//! (docs/cutover.md), detached through libvirt's monitor. Every domain XML
//! of the runbook is checked with `virt-xml-validate`.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use integration::guest::{self, BootImage, Disk, Guest, Libvirtd};
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

/// Run `cmd` (a `stream detach --json`) until its first event named
/// `event` on stderr, then SIGKILL it; the event line (or how it ended
/// without one).
fn kill_at_event(cmd: &mut Command, event: &str) -> String {
    use std::io::BufRead;
    let mut child = cmd
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start stream detach");
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let want = format!("\"event\":\"{event}\"");
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            if line.contains(&want) {
                let _ = tx.send(line);
                return;
            }
        }
    });
    let seen = rx
        .recv_timeout(Duration::from_secs(120))
        .unwrap_or_else(|_| "(it ended or stalled before that event)".into());
    let _ = child.kill();
    let _ = child.wait();
    seen
}

/// Boot through `boot` (given the export's socket), crash `stream start`
/// twice, detach with `detach` (the arguments that say where the guest
/// runs), and check everything the module docs promise.
fn crash_twice_then_detach(
    dir: &Path,
    image: &BootImage,
    boot: impl FnOnce(&Path) -> Guest,
    detach: &[&str],
    kill_detach_at: &[&str],
) {
    let debugfs = tool::require_tool("debugfs", "e2fsprogs");
    let target = dir.join("target.raw");
    // Slow enough that both crashes come while chunks are still missing.
    let start = Start::new(&image.disk, &target, dir).rate_limit(Some("2M"));
    let mut running = start.spawn();
    let mut guest = boot(&dir.join("nbd.sock"));
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

    let detach_cmd = || {
        let mut cmd = Command::new(binary::stream_bin());
        cmd.arg("detach")
            .arg("--state")
            .arg(start.state_dir())
            .args(detach)
            .args(["--device", "vda", "--timeout", "120s", "--json"]);
        cmd
    };
    // `stream detach` killed while it waits for hydration, and again once
    // it has switched the guest: each re-run finds where the last one was.
    for event in kill_detach_at {
        let seen = kill_at_event(&mut detach_cmd(), event);
        eprintln!("stream detach killed after its first {event:?} event: {seen}");
    }
    let out = tool::run(&mut detach_cmd(), Duration::from_secs(240));
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
    // A run after a killed one that had switched says so.
    let reopen_ms = match switched["reopen_ms"].as_f64() {
        Some(ms) => ms,
        None => {
            assert_eq!(switched["already"], true, "{switched}");
            f64::NAN
        }
    };
    // Every event and the report follow the documented schemas.
    let events = integration::ops::schema("finalize-event");
    for line in out.stderr_lossy().lines().filter(|l| l.starts_with('{')) {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        assert!(events.is_valid(&v), "event off its schema: {line}");
    }
    let finalized = integration::ops::schema("finalize");
    let report: serde_json::Value =
        serde_json::from_str(out.stdout_lossy().trim()).unwrap_or_else(|e| {
            panic!(
                "stream detach --json printed no report ({e}): {}",
                out.describe()
            )
        });
    assert!(
        finalized.is_valid(&report),
        "report off its schema: {report}"
    );
    assert_eq!(report["phase"], "finalized", "{report}");
    assert_eq!(report["native_path"], target.to_str().unwrap());
    // Nothing of the stream serves the guest any more: `stream start`
    // handed over and exited.
    let status = running.wait_exit(Duration::from_secs(30));
    assert!(
        status.success(),
        "stream start after the handover: {status}"
    );
    // Once more, all done: it says so, and changes nothing.
    let again = tool::run(&mut detach_cmd(), Duration::from_secs(120));
    assert!(
        again.status.success(),
        "a detach after the detach: {}",
        again.describe()
    );
    let report_again: serde_json::Value = serde_json::from_str(again.stdout_lossy().trim())
        .unwrap_or_else(|e| {
            panic!(
                "no report from the repeated detach ({e}): {}",
                again.describe()
            )
        });
    assert!(finalized.is_valid(&report_again), "{report_again}");
    assert_eq!(report_again["manifest"], report["manifest"]);

    // The writer goes on, on the target alone.
    let after = last_count(&guest);
    guest.wait_line("ten more counts after the detach", boot, |l| {
        count(l) >= Some(after + 10)
    });
    guest.send_line("stop");
    let done = guest.wait_line("the writer's end", boot, |l| {
        l.starts_with("STREAM-WRITER-DONE") || l.starts_with("STREAM-WRITER-FAIL")
    });
    assert!(guest.wait_exit(Duration::from_secs(60)), "qemu failed");

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

#[test]
fn a_guest_survives_two_crashes_of_stream_start_and_moves_onto_the_target_live() {
    tool::require_tool("qemu-system-x86_64", "qemu-system-x86");
    let image = guest::boot_image();
    let dir = tempfile::tempdir().unwrap();
    let qmp = dir.path().join("qmp.sock");
    let log = dir.path().join("console.log");
    crash_twice_then_detach(
        dir.path(),
        &image,
        |nbd| Guest::start(&image, Disk::Nbd(nbd), &qmp, "/sbin/writer", &log),
        &["--qmp", qmp.to_str().unwrap()],
        &["progress", "switched"],
    );
}

/// The runbook's fenced ```xml blocks that hold a whole domain.
fn runbook_domains() -> Vec<String> {
    let doc = std::fs::read_to_string(binary::workspace_root().join("docs/cutover.md"))
        .expect("read docs/cutover.md");
    doc.split("```xml\n")
        .skip(1)
        .filter_map(|rest| rest.split_once("```").map(|(block, _)| block.to_string()))
        .filter(|block| block.trim_start().starts_with("<domain"))
        .collect()
}

#[test]
fn the_runbook_domain_xml_validates_and_its_disk_is_detached_through_libvirt() {
    tool::require_tool("qemu-system-x86_64", "qemu-system-x86");
    let validate = tool::require_tool("virt-xml-validate", "libvirt-clients");
    tool::require_tool("xmllint", "libxml2-utils");
    let dir = tempfile::tempdir().unwrap();
    let domains = runbook_domains();
    assert!(!domains.is_empty(), "docs/cutover.md has no domain XML");
    for (i, xml) in domains.iter().enumerate() {
        let file = dir.path().join(format!("runbook-{i}.xml"));
        std::fs::write(&file, xml).unwrap();
        let out = tool::run(
            Command::new(&validate).arg(&file).arg("domain"),
            Duration::from_secs(30),
        );
        assert!(
            out.status.success(),
            "the runbook's domain XML #{i} does not validate: {}\n{xml}",
            out.describe()
        );
    }

    // The guest: the fixture, booted by libvirt around the runbook's disk
    // (its <qemu:commandline>, with the export's address made this test's
    // socket: the runbook's is TCP on 10809).
    let disk = domains
        .iter()
        .find_map(|xml| {
            let s = xml.find("<qemu:commandline>")?;
            let e = xml.find("</qemu:commandline>")? + "</qemu:commandline>".len();
            Some(xml[s..e].to_string())
        })
        .expect("a runbook domain with the disk in <qemu:commandline>");
    let inet = r#""server":{"type":"inet","host":"127.0.0.1","port":"10809"}"#;
    assert!(disk.contains(inet), "the runbook's disk should name {inet}");
    let image = guest::boot_image();
    let _libvirtd = Libvirtd::ensure(dir.path());
    let name = format!("stream-test-{}", std::process::id());
    let console = dir.path().join("console.sock");
    let log = dir.path().join("console.log");
    let boot = |nbd: &Path| {
        let unix = format!(r#""server":{{"type":"unix","path":"{}"}}"#, nbd.display());
        let xml = format!(
            "<domain type='qemu' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>
  <name>{name}</name>
  <memory unit='MiB'>512</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='q35'>hvm</type>
    <kernel>{}</kernel>
    <initrd>{}</initrd>
    <cmdline>console=ttyS0 panic=-1 stream.init=/sbin/writer</cmdline>
  </os>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <serial type='unix'><source mode='connect' path='{}'/></serial>
  </devices>
  {}
</domain>
",
            image.kernel.display(),
            image.initrd.display(),
            console.display(),
            disk.replace(inet, &unix),
        );
        Guest::libvirt(&name, &xml, &console, dir.path(), &log)
    };
    crash_twice_then_detach(dir.path(), &image, boot, &["--libvirt", &name], &[]);
}
