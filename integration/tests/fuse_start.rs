//! `stream start --mount DIR` through the real binary: the volume as
//! DIR/disk.raw beside the NBD export, the two seeing each other's writes,
//! unmounted on SIGTERM and SIGINT, `--mount-only`, and mount points that
//! must be refused before any state is created.

use std::io::{BufRead, BufReader};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use integration::fuse::{Watchdog, require_fuse};
use integration::image::read_file;
use integration::start::{Start, mixed_image, read_export};
use integration::{binary, tool};

const STOP: Duration = Duration::from_secs(30);

fn mounted(dir: &Path) -> bool {
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let dir = dir.to_str().unwrap();
    mounts.lines().any(|l| l.split(' ').nth(4) == Some(dir))
}

#[test]
fn mount_serves_the_volume_beside_nbd_and_unmounts_on_sigterm() {
    require_fuse();
    let tmp = tempfile::tempdir().unwrap();
    let mnt = tmp.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let _dog = Watchdog::start("fuse_start sigterm", Duration::from_secs(120), &[&mnt]);
    let img = mixed_image(tmp.path());
    let start = Start::new(&img.path, tmp.path().join("target.img"), tmp.path())
        .no_hydrate(true)
        .args(&["--mount", mnt.to_str().unwrap()]);
    let run = start.spawn();
    assert!(mounted(&mnt), "DIR is mounted once stream start is ready");
    let file = mnt.join("disk.raw");
    // Lazily fetched through FUSE: equal to the source.
    assert!(
        read_file(&file) == read_file(&img.path),
        "disk.raw differs from the source"
    );

    // A write through the file, fsynced, is seen over NBD...
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&file)
        .unwrap();
    f.write_all_at(&[0xab; 5000], 3_000_000).unwrap();
    f.sync_all().unwrap();
    let mut conn = run.open();
    assert_eq!(read_export(&mut conn, 3_000_000, 5000), vec![0xab; 5000]);
    // ...and a write over NBD is seen through the file.
    conn.write_request(0, 7, 8_000_000, &[0x5c; 700]).unwrap();
    assert_eq!(conn.finish(7).unwrap(), 0, "NBD write");
    assert_eq!(conn.command(0, 3, 0, 0).unwrap(), 0, "NBD flush");
    let mut back = vec![0u8; 700];
    f.read_exact_at(&mut back, 8_000_000).unwrap();
    assert_eq!(back, vec![0x5c; 700]);
    drop(conn);
    drop(f);

    run.sigterm_and_wait(STOP);
    assert!(!mounted(&mnt), "SIGTERM unmounts DIR");
}

#[test]
fn mount_only_prints_the_file_and_unmounts_on_sigint() {
    require_fuse();
    let tmp = tempfile::tempdir().unwrap();
    let mnt = tmp.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let _dog = Watchdog::start("fuse_start sigint", Duration::from_secs(120), &[&mnt]);
    let img = mixed_image(tmp.path());
    let mut child = Command::new(binary::stream_bin())
        .args(["start", "--mount-only", "--mount"])
        .arg(&mnt)
        .arg("--source")
        .arg(&img.path)
        .arg("--target")
        .arg(tmp.path().join("target.img"))
        .arg("--state")
        .arg(tmp.path().join("state"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let file = mnt.join("disk.raw");
    assert_eq!(
        line.trim(),
        file.to_str().unwrap(),
        "--mount-only prints the file"
    );
    assert!(read_file(&file) == read_file(&img.path));
    // No NBD export: the state directory has no NBD socket of ours.
    assert!(!tmp.path().join("nbd.sock").exists());
    // SAFETY: kill(2) on our own unreaped child.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let status = tool::wait_deadline(&mut child, STOP).expect("exits after SIGINT");
    assert!(status.success(), "clean exit after SIGINT: {status}");
    assert!(!mounted(&mnt), "SIGINT unmounts DIR");
}

#[test]
fn bad_mount_points_are_refused_before_any_state_is_created() {
    require_fuse();
    let tmp = tempfile::tempdir().unwrap();
    let img = mixed_image(tmp.path());
    let full = tmp.path().join("full");
    std::fs::create_dir(&full).unwrap();
    std::fs::write(full.join("something"), b"x").unwrap();
    for (dir, why) in [
        (tmp.path().join("missing"), "does not exist"),
        (full.clone(), "not empty"),
    ] {
        let start = Start::new(&img.path, tmp.path().join("target.img"), tmp.path())
            .args(&["--mount", dir.to_str().unwrap()]);
        let out = start.refused();
        let err = String::from_utf8_lossy(&out.stderr).to_lowercase();
        assert!(
            err.contains(why) || err.contains("no such file"),
            "refusal of {} should say {why:?}: {err}",
            dir.display()
        );
        assert!(
            !tmp.path().join("state").join("state.json").exists(),
            "no state is created when the mount point is refused"
        );
    }
}
