//! Issue 12, "Data safety", the cases of `stream start`: the legacy disk is
//! only ever read, and what a migration knows is never lost in silence.
//!
//! - a target that is the source under another name (path, symlink, hard
//!   link, bind mount, loop device, another device node, a partition and
//!   its disk) is refused; two partitions of one disk are not aliases;
//! - a target that is not new (foreign data, another migration's marker,
//!   a lost state) is refused unless `--overwrite-target`; a finalized one
//!   always, for files (xattr) and block devices (registry);
//! - a removed or emptied `journal` is refused, with advice that does not
//!   say "restore a backup";
//! - removing the `lock` file does not admit a second `stream start`.
//!
//! Block devices are real loop devices, detached by the name `losetup`
//! printed; markers of block devices go to a registry inside the test's
//! temporary directory (`STREAM_TARGET_REGISTRY`).

use std::io::Write;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use integration::Start;
use integration::finalize::Finalize;
use integration::image::{KIB, MIB, read_file};
use integration::start::{LoopDevice, mixed_image, read_export};
use integration::tool::{self, Output};
use integration::wire::CMD_FLUSH;

const STOP: Duration = Duration::from_secs(30);
const CHUNK: u64 = 64 * KIB;

fn says(out: &Output, what: &[&str]) {
    let err = out.stderr_lossy().to_lowercase();
    for w in what {
        assert!(
            err.contains(&w.to_lowercase()),
            "the refusal does not mention {w:?}: {}",
            out.describe()
        );
    }
}

fn registry(dir: &Path) -> PathBuf {
    dir.join("registry")
}

/// `start`'s command line with the test's registry, run to completion; it
/// must be refused (non-zero, no URI).
fn refused_env(start: &Start, dir: &Path) -> Output {
    let mut cmd = start.command();
    cmd.env("STREAM_TARGET_REGISTRY", registry(dir));
    let out = tool::run(&mut cmd, Duration::from_secs(30));
    assert!(
        !out.status.success() && out.stdout.is_empty(),
        "stream start was expected to refuse, but: {}",
        out.describe()
    );
    out
}

/// A `stream start` with the test's registry, killed by PID on drop.
struct Spawned {
    child: Option<Child>,
    log: PathBuf,
}

impl Spawned {
    fn new(start: &Start, dir: &Path) -> Spawned {
        let log = start.log_path();
        let err = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap();
        let mut child = start
            .command()
            .env("STREAM_TARGET_REGISTRY", registry(dir))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(err)
            .spawn()
            .unwrap();
        let ready =
            integration::server::read_uri_line(&mut child, integration::server::READY_TIMEOUT);
        let s = Spawned {
            child: Some(child),
            log,
        };
        if let Err(why) = ready {
            panic!("stream start did not get ready: {why}\n{}", s.log());
        }
        s
    }

    fn log(&self) -> String {
        integration::start::log_tail(&self.log)
    }

    fn sigterm_and_wait(mut self) {
        let mut child = self.child.take().unwrap();
        // SAFETY: kill(2) on our own unreaped child.
        assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGTERM) }, 0);
        let status = tool::wait_deadline(&mut child, STOP);
        assert!(
            status.is_some_and(|s| s.success()),
            "stream start after SIGTERM: {status:?}\n{}",
            self.log()
        );
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            test_support::child::kill_and_reap(&mut c);
        }
    }
}

/// `mount --bind FROM ONTO`; unmounted (that mount point) on drop.
struct BindMount(PathBuf);

impl BindMount {
    fn new(from: &Path, onto: &Path) -> BindMount {
        let mount = tool::require_tool("mount", "mount");
        tool::run_ok(
            Command::new(mount).arg("--bind").arg(from).arg(onto),
            Duration::from_secs(30),
        );
        BindMount(onto.to_path_buf())
    }
}

impl Drop for BindMount {
    fn drop(&mut self) {
        let out = tool::run(Command::new("umount").arg(&self.0), Duration::from_secs(30));
        if !out.status.success() {
            eprintln!("umount {}: {}", self.0.display(), out.describe());
        }
    }
}

/// A loop device with partitions (`losetup -P`); detached by its name.
struct PartLoop {
    path: PathBuf,
}

impl PartLoop {
    fn attach(file: &Path, parts: usize) -> PartLoop {
        let losetup = tool::require_tool("losetup", "mount");
        let out = tool::run_ok(
            Command::new(losetup)
                .args(["--find", "--show", "--partscan"])
                .arg(file),
            Duration::from_secs(30),
        );
        let name = out.stdout_lossy().trim().to_owned();
        assert!(name.starts_with("/dev/loop"), "losetup printed {name:?}");
        let dev = PartLoop {
            path: PathBuf::from(name),
        };
        // A kernel without the DOS label parser (this machine's 6.18 finds
        // no partitions at `--partscan`) gets them from partx, which reads
        // the table itself and adds them with BLKPG.
        if !(1..=parts).all(|n| dev.part(n).exists()) {
            let partx = tool::require_tool("partx", "util-linux");
            tool::run_ok(
                Command::new(partx).arg("--add").arg(&dev.path),
                Duration::from_secs(30),
            );
        }
        // The kernel adds the partitions' nodes as it scans the table.
        let deadline = Instant::now() + Duration::from_secs(10);
        while !(1..=parts).all(|n| dev.part(n).exists()) {
            assert!(
                Instant::now() < deadline,
                "{} has no partition nodes after 10 s",
                dev.path.display()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        dev
    }

    fn part(&self, n: usize) -> PathBuf {
        PathBuf::from(format!("{}p{n}", self.path.display()))
    }
}

impl Drop for PartLoop {
    fn drop(&mut self) {
        let out = tool::run(
            Command::new("losetup").arg("-d").arg(&self.path),
            Duration::from_secs(30),
        );
        if !out.status.success() {
            eprintln!("detaching {}: {}", self.path.display(), out.describe());
        }
    }
}

/// A second device node for the block device `dev` (same `st_rdev`).
fn mknod_alias(dev: &Path, at: &Path) {
    let rdev = std::fs::metadata(dev).unwrap().rdev();
    let c = std::ffi::CString::new(at.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: a valid C string; mknod creates a node, nothing else.
    let r = unsafe { libc::mknod(c.as_ptr(), libc::S_IFBLK | 0o600, rdev) };
    assert_eq!(
        r,
        0,
        "mknod {}: {}",
        at.display(),
        std::io::Error::last_os_error()
    );
}

fn case_dir(dir: &Path, name: &str) -> PathBuf {
    let d = dir.join(name);
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn a_target_that_is_the_source_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let img = mixed_image(dir.path());
    let before = read_file(&img.path);

    let link = dir.path().join("link.img");
    std::os::unix::fs::symlink(&img.path, &link).unwrap();
    let hard = dir.path().join("hard.img");
    std::fs::hard_link(&img.path, &hard).unwrap();
    let bind_point = dir.path().join("bind.img");
    std::fs::File::create(&bind_point).unwrap();
    let _bind = BindMount::new(&img.path, &bind_point);
    let lo = LoopDevice::attach(&img.path, false);
    let node = dir.path().join("node");
    mknod_alias(&lo.path, &node);

    let cases: [(&str, &Path, &Path); 7] = [
        ("the same path", &img.path, &img.path),
        ("a symlink to the source", &img.path, &link),
        ("a hard link of the source", &hard, &img.path),
        ("a bind mount of the source", &img.path, &bind_point),
        ("a loop device over the source", &img.path, &lo.path),
        (
            "the source a loop device over the target",
            &lo.path,
            &img.path,
        ),
        ("another node of the source device", &lo.path, &node),
    ];
    for (i, (what, source, target)) in cases.into_iter().enumerate() {
        let start = Start::new(source, target, &case_dir(dir.path(), &format!("case-{i}")));
        let out = start.refused();
        eprintln!(
            "{what}: {}",
            out.stderr_lossy().lines().last().unwrap_or("")
        );
        says(&out, &["would overwrite the source"]);
        assert!(
            !start.state_dir().join("state.json").exists(),
            "{what}: a state was created"
        );
        assert!(read_file(&img.path) == before, "{what}: the source changed");
    }
}

#[test]
fn a_partition_and_its_disk_are_refused_two_partitions_are_not() {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.img");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(40 * MIB)
        .unwrap();
    let sfdisk = tool::require_tool("sfdisk", "fdisk");
    let mut child = Command::new(sfdisk)
        .arg(&disk)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"label: dos\nstart=2048, size=32768\nstart=34816, size=32768\n")
        .unwrap();
    let st = tool::wait_deadline(&mut child, Duration::from_secs(30));
    assert!(st.is_some_and(|s| s.success()), "sfdisk: {st:?}");
    let lo = PartLoop::attach(&disk, 2);
    // Something on the first partition, so the accepted copy below reads data.
    std::fs::OpenOptions::new()
        .write(true)
        .open(lo.part(1))
        .unwrap()
        .write_all_at(&[0x5a; 4096], 0)
        .unwrap();
    let table = read_file(&disk)[..512].to_vec();

    let (p1, p2) = (lo.part(1), lo.part(2));
    let cases: [(&str, &Path, &Path); 5] = [
        ("disk source, partition target", &lo.path, &p1),
        ("partition source, disk target", &p1, &lo.path),
        ("backing file source, partition target", &disk, &p2),
        ("partition source, backing file target", &p2, &disk),
        (
            "another node of the partition",
            &p1,
            &dir.path().join("p1-node"),
        ),
    ];
    mknod_alias(&p1, &dir.path().join("p1-node"));
    for (i, (what, source, target)) in cases.into_iter().enumerate() {
        let d = case_dir(dir.path(), &format!("case-{i}"));
        let out = refused_env(&Start::new(source, target, &d), dir.path());
        eprintln!(
            "{what}: {}",
            out.stderr_lossy().lines().last().unwrap_or("")
        );
        says(&out, &["would overwrite the source"]);
    }
    assert_eq!(
        read_file(&disk)[..512],
        table[..],
        "the partition table changed"
    );

    // Two partitions of one disk do not overlap: a migration between them
    // is no alias, and runs.
    let d = case_dir(dir.path(), "p1-to-p2");
    let ok = Spawned::new(&Start::new(&p1, &p2, &d).no_hydrate(true), dir.path());
    ok.sigterm_and_wait();
}

#[test]
fn a_target_file_on_a_filesystem_on_the_source_device_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let backing = dir.path().join("fs.img");
    std::fs::File::create(&backing)
        .unwrap()
        .set_len(64 * MIB)
        .unwrap();
    let mkfs = tool::require_tool("mkfs.ext4", "e2fsprogs");
    tool::run_ok(
        Command::new(mkfs).args(["-q", "-F"]).arg(&backing),
        Duration::from_secs(60),
    );
    let lo = LoopDevice::attach(&backing, false);
    let mnt = dir.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    // Dropped before `lo`: unmounted before the device is detached.
    let _mounted = Mounted::new(&lo.path, &mnt);
    // The target does not exist yet (it would be created there), and
    // one that does.
    let existing = mnt.join("existing.img");
    std::fs::File::create(&existing)
        .unwrap()
        .set_len(64 * MIB)
        .unwrap();
    for (i, target) in [mnt.join("new.img"), existing].iter().enumerate() {
        let d = case_dir(dir.path(), &format!("case-{i}"));
        let out = Start::new(&lo.path, target, &d).refused();
        says(&out, &["would overwrite the source", "filesystem on"]);
        if i == 0 {
            assert!(
                !target.exists(),
                "a refused start created {}",
                target.display()
            );
        } else {
            assert!(
                read_file(target).iter().all(|&b| b == 0),
                "a refused start wrote {}",
                target.display()
            );
        }
    }
}

/// `mount DEV DIR`; unmounted (that mount point) on drop.
struct Mounted(PathBuf);

impl Mounted {
    fn new(dev: &Path, at: &Path) -> Mounted {
        let mount = tool::require_tool("mount", "mount");
        tool::run_ok(
            Command::new(mount).arg(dev).arg(at),
            Duration::from_secs(30),
        );
        Mounted(at.to_path_buf())
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        let out = tool::run(Command::new("umount").arg(&self.0), Duration::from_secs(30));
        if !out.status.success() {
            eprintln!("umount {}: {}", self.0.display(), out.describe());
        }
    }
}

fn write_flush(conn: &mut integration::wire::Conn, at: u64, byte: u8) -> Vec<u8> {
    let data = vec![byte; CHUNK as usize];
    conn.write_request(0, 1, at, &data).unwrap();
    assert_eq!(conn.finish(1).unwrap(), 0, "WRITE");
    assert_eq!(conn.command(0, CMD_FLUSH, 0, 0).unwrap(), 0, "FLUSH");
    data
}

#[test]
fn a_target_that_is_not_new_is_refused_unless_overwrite_target() {
    let dir = tempfile::tempdir().unwrap();
    let img = mixed_image(dir.path());

    // Foreign data in an existing target file of the right size.
    let foreign = dir.path().join("foreign.img");
    let f = std::fs::File::create(&foreign).unwrap();
    f.set_len(img.size).unwrap();
    f.write_all_at(b"someone's data", 7 * MIB).unwrap();
    drop(f);
    let before = read_file(&foreign);
    let start = Start::new(&img.path, &foreign, &case_dir(dir.path(), "foreign"));
    let out = start.refused();
    says(&out, &["not new", "7340032", "--overwrite-target"]);
    assert!(read_file(&foreign) == before, "a refusal wrote the target");
    // The operator says it may go.
    start
        .clone()
        .args(&["--overwrite-target"])
        .spawn()
        .sigterm_and_wait(STOP);

    // A migration with a flushed write whose state is lost.
    let target = dir.path().join("target.img");
    let first = Start::new(&img.path, &target, &case_dir(dir.path(), "first")).no_hydrate(true);
    let running = first.spawn();
    let mut conn = running.open();
    write_flush(&mut conn, 2 * CHUNK, 0xc7);
    drop(conn);
    running.sigterm_and_wait(STOP);
    let before = read_file(&target);
    std::fs::remove_dir_all(first.state_dir()).unwrap();
    let out = first.refused();
    says(&out, &["belongs to a migration", "--overwrite-target"]);
    // A fresh --state, another source: the same.
    let other_source = dir.path().join("other-source.img");
    std::fs::copy(&img.path, &other_source).unwrap();
    let out = first
        .clone()
        .source(&other_source)
        .state(dir.path().join("fresh-state"))
        .refused();
    says(&out, &["belongs to a migration", "--overwrite-target"]);
    assert!(read_file(&target) == before, "a refusal wrote the target");

    // A target that holds nothing but zeros yet, known by its marker alone.
    let zeros = dir.path().join("zeros.img");
    let z = Start::new(&img.path, &zeros, &case_dir(dir.path(), "zeros")).no_hydrate(true);
    z.spawn().sigterm_and_wait(STOP);
    assert!(
        read_file(&zeros).iter().all(|&b| b == 0),
        "nothing wrote the target"
    );
    let out = z.clone().state(dir.path().join("zeros-state-2")).refused();
    says(&out, &["belongs to a migration", "zeros"]);

    // Taken over by a new migration with --overwrite-target: the old state
    // no longer describes the target, and resuming it is refused.
    let taken = z
        .clone()
        .state(dir.path().join("zeros-state-3"))
        .args(&["--overwrite-target"]);
    let running = taken.spawn();
    let mut conn = running.open();
    let data = write_flush(&mut conn, 4 * CHUNK, 0x91);
    drop(conn);
    running.sigterm_and_wait(STOP);
    let out = z.refused();
    says(&out, &["taken over by another migration", "zeros-state-3"]);
    let running = taken.spawn();
    let mut conn = running.open();
    assert!(
        read_export(&mut conn, 4 * CHUNK, CHUNK) == data,
        "the new migration's flushed write after the refused resume"
    );
    drop(conn);
    running.sigterm_and_wait(STOP);
}

#[test]
fn a_finalized_target_is_refused_even_with_overwrite_target() {
    let dir = tempfile::tempdir().unwrap();
    let img = mixed_image(dir.path());

    // A file: the marker is its extended attribute.
    let target = dir.path().join("target.img");
    let start = Start::new(&img.path, &target, &case_dir(dir.path(), "file"));
    start.spawn().sigterm_and_wait(STOP);
    Finalize::new(start.state_dir()).run_ok(Duration::from_secs(120));
    let before = read_file(&target);
    for state in [
        dir.path().join("new-state"),
        start.state_dir().to_path_buf(),
    ] {
        // The state lost, or a fresh one, with and without the flag.
        let _ = std::fs::remove_dir_all(dir.path().join("new-state"));
        let s = start.clone().state(&state);
        says(&s.refused(), &["finalized"]);
        says(&s.args(&["--overwrite-target"]).refused(), &["finalized"]);
        std::fs::remove_dir_all(start.state_dir()).ok();
    }
    assert!(read_file(&target) == before, "a refusal wrote the target");

    // A block device: the marker is in the registry.
    let backing = dir.path().join("backing.img");
    std::fs::File::create(&backing)
        .unwrap()
        .set_len(img.size)
        .unwrap();
    let lo = LoopDevice::attach(&backing, false);
    let start = Start::new(&img.path, &lo.path, &case_dir(dir.path(), "block"));
    Spawned::new(&start, dir.path()).sigterm_and_wait();
    Finalize::new(start.state_dir())
        .env(
            "STREAM_TARGET_REGISTRY",
            registry(dir.path()).to_str().unwrap(),
        )
        .run_ok(Duration::from_secs(120));
    let fresh = start
        .clone()
        .state(dir.path().join("block-state-2"))
        .args(&["--overwrite-target"]);
    says(&refused_env(&fresh, dir.path()), &["finalized", "registry"]);
}

#[test]
fn a_block_device_with_data_is_refused_unless_overwrite_target() {
    let dir = tempfile::tempdir().unwrap();
    let img = mixed_image(dir.path());
    let backing = dir.path().join("backing.img");
    let f = std::fs::File::create(&backing).unwrap();
    f.set_len(img.size).unwrap();
    // A filesystem-like label in the first MiB.
    f.write_all_at(b"\x53\xef label", 1080).unwrap();
    drop(f);
    let lo = LoopDevice::attach(&backing, false);
    let start = Start::new(&img.path, &lo.path, &case_dir(dir.path(), "block"));
    let out = refused_env(&start, dir.path());
    says(&out, &["not new", "1080", "sampling", "--overwrite-target"]);
    let s = Spawned::new(&start.clone().args(&["--overwrite-target"]), dir.path());
    s.sigterm_and_wait();
}

#[test]
fn a_lost_journal_is_refused_and_the_advice_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let img = mixed_image(dir.path());
    let target = dir.path().join("target.img");
    let start = Start::new(&img.path, &target, dir.path())
        .chunk_size("64K")
        .no_hydrate(true);
    let running = start.spawn();
    let mut conn = running.open();
    let data = write_flush(&mut conn, 3 * CHUNK, 0x3c);
    drop(conn);
    // No clean close: the flushed write is recorded only in the journal.
    running.kill9();
    let journal = start.state_dir().join("journal");
    let saved = std::fs::read(&journal).unwrap();
    assert!(saved.len() > 16, "the flush left no journal batch");

    for how in ["removed", "emptied"] {
        if how == "removed" {
            std::fs::remove_file(&journal).unwrap();
        } else {
            std::fs::write(&journal, b"").unwrap();
        }
        let out = start.refused();
        eprintln!(
            "journal {how}: {}",
            out.stderr_lossy().lines().last().unwrap_or("")
        );
        says(
            &out,
            &[
                &journal.display().to_string(),
                "do not restore an older copy",
            ],
        );
        let err = out.stderr_lossy();
        assert!(
            !err.contains("from a backup"),
            "the advice still says to restore a backup: {}",
            out.describe()
        );
        assert_eq!(
            std::fs::read(&journal).ok().filter(|j| !j.is_empty()),
            None,
            "journal {how}: a refusal recreated the journal"
        );
    }
    // Put back, as the advice says: the flushed write is there.
    std::fs::write(&journal, &saved).unwrap();
    let running = start.spawn();
    let mut conn = running.open();
    assert!(
        read_export(&mut conn, 3 * CHUNK, CHUNK) == data,
        "the flushed write after the journal was put back"
    );
    drop(conn);
    running.sigterm_and_wait(STOP);
}

#[test]
fn removing_the_lock_file_does_not_admit_a_second_start() {
    let dir = tempfile::tempdir().unwrap();
    let img = mixed_image(dir.path());
    let target = dir.path().join("target.img");
    let start = Start::new(&img.path, &target, dir.path()).no_hydrate(true);
    let mut first = start.spawn();
    std::fs::remove_file(start.state_dir().join("lock")).unwrap();
    let second = start
        .clone()
        .socket(dir.path().join("second.sock"))
        .refused();
    says(&second, &["in use"]);
    // The first still serves, and its flushed write stays.
    first.assert_alive();
    let mut conn = first.open();
    let data = write_flush(&mut conn, 5 * CHUNK, 0x6e);
    assert!(read_export(&mut conn, 5 * CHUNK, CHUNK) == data);
    drop(conn);
    let st = first.status();
    assert_eq!(
        st["pid"],
        first.pid(),
        "status answered by another process: {st}"
    );
    first.sigterm_and_wait(STOP);
    let running = start.spawn();
    let mut conn = running.open();
    assert!(
        read_export(&mut conn, 5 * CHUNK, CHUNK) == data,
        "the flushed write after a restart"
    );
    drop(conn);
    running.sigterm_and_wait(STOP);
}
