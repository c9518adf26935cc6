//! The FUSE frontend over a plain `FileDevice`, mounted in this process:
//! content, the operations a file has, request sizes, and the mount point's
//! lifecycle (refusals, stale mounts, unmount on drop, a busy unmount).

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use fuse_frontend::{FILE_NAME, Mount, MountError, MountOptions, mounted_at, preflight};
use integration::fuse::{StaleMount, Watchdog, require_fuse};
use integration::image::{KIB, MIB, read_at};
use integration::{SparseImage, require_tool, run};
use nbd_server::{BlockDevice, Capabilities, Extent, FileDevice, Piece, ZeroFlags};

const DEADLINE: Duration = Duration::from_secs(120);

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn mount_dir(tmp: &Path) -> PathBuf {
    let dir = tmp.join("mnt");
    std::fs::create_dir(&dir).unwrap();
    dir
}

fn mount<D: BlockDevice>(device: D, dir: &Path, rt: &tokio::runtime::Runtime) -> Mount {
    Mount::new(device, dir, &MountOptions::default(), rt.handle().clone())
        .unwrap_or_else(|e| panic!("mount on {}: {e}", dir.display()))
}

fn os_error(r: io::Result<impl std::fmt::Debug>) -> i32 {
    r.expect_err("expected an error").raw_os_error().unwrap()
}

#[test]
fn qemu_img_compare_finds_the_file_identical_to_its_source() {
    require_fuse();
    let qemu_img = require_tool("qemu-img", "qemu-utils");
    let tmp = tempfile::tempdir().unwrap();
    let img = SparseImage::standard(tmp.path());
    let dir = mount_dir(tmp.path());
    let _dog = Watchdog::start("qemu_img_compare", DEADLINE, &[&dir]);
    let rt = runtime();
    let m = mount(FileDevice::open(&img.path, false).unwrap(), &dir, &rt);

    let out = run(
        Command::new(&qemu_img)
            .args(["compare", "-f", "raw", "-F", "raw"])
            .arg(m.file())
            .arg(&img.path),
        DEADLINE,
    );
    assert!(out.status.success(), "{}", out.describe());
    let names: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(names, [FILE_NAME]);
    assert_eq!(std::fs::metadata(m.file()).unwrap().len(), img.size);
    // A read-only device is a read-only file.
    let err = os_error(OpenOptions::new().write(true).open(m.file()));
    assert_eq!(err, libc::EROFS);
    m.unmount().unwrap();
}

#[test]
fn writes_fsync_fallocate_reach_the_device_and_the_size_is_fixed() {
    require_fuse();
    let tmp = tempfile::tempdir().unwrap();
    let img = SparseImage::standard(tmp.path());
    let dir = mount_dir(tmp.path());
    let _dog = Watchdog::start("writes_fsync_fallocate", DEADLINE, &[&dir]);
    let rt = runtime();
    let m = mount(FileDevice::open(&img.path, true).unwrap(), &dir, &rt);
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(m.file())
        .unwrap();

    // A write across a data/hole boundary, then fsync.
    let data = vec![0x5a; 256 * KIB as usize];
    f.write_all_at(&data, MIB - 128 * KIB).unwrap();
    f.sync_all().unwrap();
    assert_eq!(read_at(&img.path, MIB - 128 * KIB, data.len()), data);

    // Punch hole and zero range read back as zeros, through both paths.
    let punch = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
    let zero = libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE;
    for (mode, off) in [(punch, 100 * KIB), (zero, 2 * MIB + 4 * KIB)] {
        // SAFETY: an fd we own.
        let r = unsafe { libc::fallocate(f.as_raw_fd(), mode, off as i64, 64 * 1024) };
        assert_eq!(r, 0, "fallocate {mode:#x}: {}", io::Error::last_os_error());
        let mut buf = vec![1u8; 64 * KIB as usize];
        f.read_exact_at(&mut buf, off).unwrap();
        assert!(buf.iter().all(|&b| b == 0), "mode {mode:#x} left data");
        assert!(read_at(&img.path, off, buf.len()).iter().all(|&b| b == 0));
    }
    // The bytes around them are untouched.
    assert_eq!(
        read_at(&m.file(), 2 * MIB, 4096),
        img.expected(2 * MIB, 4096)
    );

    // The size is the device's.
    assert_eq!(os_error(f.set_len(img.size + 4096)), libc::EPERM);
    assert_eq!(os_error(f.set_len(0)), libc::EPERM);
    f.set_len(img.size).unwrap();
    let err = os_error(OpenOptions::new().write(true).truncate(true).open(m.file()));
    assert_eq!(err, libc::EPERM);
    assert_eq!(os_error(f.write_all_at(b"x", img.size)), libc::ENOSPC);
    assert_eq!(f.write_at(&[7; 8192], img.size - 4096).unwrap(), 4096);
    assert_eq!(f.metadata().unwrap().len(), img.size);
    assert_eq!(std::fs::metadata(&img.path).unwrap().len(), img.size);
    // Nothing can be created beside disk.raw.
    assert!(File::create(dir.join("other")).is_err());

    // SEEK_DATA / SEEK_HOLE follow the device's extents.
    // SAFETY: an fd we own.
    let data_at = unsafe { libc::lseek(f.as_raw_fd(), (3 * MIB) as i64, libc::SEEK_DATA) };
    assert_eq!(data_at as u64, 6 * MIB);
    // SAFETY: an fd we own.
    let hole_at = unsafe { libc::lseek(f.as_raw_fd(), (2 * MIB) as i64, libc::SEEK_HOLE) };
    assert_eq!(hole_at as u64, 3 * MIB);
    drop(f);
    m.unmount().unwrap();
}

/// A file device that records the largest read and write it was asked for.
struct Recording {
    inner: FileDevice,
    max_read: AtomicU64,
    max_write: AtomicU64,
}

impl BlockDevice for Recording {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }
    async fn read(&self, offset: u64, len: u32) -> io::Result<Vec<Piece>> {
        self.max_read.fetch_max(u64::from(len), Ordering::Relaxed);
        self.inner.read(offset, len).await
    }
    async fn write(&self, offset: u64, data: Vec<u8>, fua: bool) -> io::Result<()> {
        self.max_write
            .fetch_max(data.len() as u64, Ordering::Relaxed);
        self.inner.write(offset, data, fua).await
    }
    async fn flush(&self) -> io::Result<()> {
        self.inner.flush().await
    }
    async fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> io::Result<()> {
        self.inner.write_zeroes(offset, len, flags).await
    }
    async fn block_status(&self, offset: u64, len: u64) -> io::Result<Vec<Extent>> {
        self.inner.block_status(offset, len).await
    }
}

#[test]
fn one_mib_reads_and_writes_arrive_whole() {
    require_fuse();
    let tmp = tempfile::tempdir().unwrap();
    let img = SparseImage::standard(tmp.path());
    let dir = mount_dir(tmp.path());
    let _dog = Watchdog::start("one_mib_requests", DEADLINE, &[&dir]);
    let rt = runtime();
    let dev = Arc::new(Recording {
        inner: FileDevice::open(&img.path, true).unwrap(),
        max_read: AtomicU64::new(0),
        max_write: AtomicU64::new(0),
    });
    let m = mount(dev.clone(), &dir, &rt);
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(m.file())
        .unwrap();
    // Page-aligned buffers, as O_DIRECT users (qemu, fio, a loop device)
    // have: an unaligned one spans 257 pages, one more than a request takes.
    let mut backing = vec![0u8; (MIB + 4096) as usize];
    let skip = backing.as_ptr().align_offset(4096);
    let buf = &mut backing[skip..skip + MIB as usize];
    f.read_exact_at(buf, 2 * MIB).unwrap();
    assert_eq!(buf, img.expected(2 * MIB, MIB as usize));
    buf.fill(3);
    f.write_all_at(buf, 4 * MIB).unwrap();
    assert_eq!(dev.max_read.load(Ordering::Relaxed), MIB);
    assert_eq!(dev.max_write.load(Ordering::Relaxed), MIB);
    drop(f);
    m.unmount().unwrap();
}

#[test]
fn a_mounted_non_empty_or_stale_mount_point_is_refused_with_the_fix() {
    require_fuse();
    let tmp = tempfile::tempdir().unwrap();
    let img = SparseImage::standard(tmp.path());
    let dir = mount_dir(tmp.path());
    let stale_dir = tmp.path().join("stale");
    std::fs::create_dir(&stale_dir).unwrap();
    let _dog = Watchdog::start("refusals", DEADLINE, &[&dir, &stale_dir]);
    let rt = runtime();

    let m = mount(FileDevice::open(&img.path, false).unwrap(), &dir, &rt);
    let again = Mount::new(
        FileDevice::open(&img.path, false).unwrap(),
        &dir,
        &MountOptions::default(),
        rt.handle().clone(),
    );
    match again {
        Err(e @ MountError::AlreadyMounted { .. }) => {
            assert!(e.to_string().contains("(fuse"), "{e}")
        }
        other => panic!("second mount on {}: {other:?}", dir.display()),
    }
    m.unmount().unwrap();

    std::fs::write(tmp.path().join("mnt/left-over"), b"x").unwrap();
    assert!(matches!(preflight(&dir), Err(MountError::NotEmpty { .. })));
    assert!(matches!(
        preflight(&tmp.path().join("missing")),
        Err(MountError::Missing { .. })
    ));

    let stale = StaleMount::create(&stale_dir);
    let err = preflight(&stale.dir).unwrap_err();
    assert!(matches!(err, MountError::Stale { .. }), "{err:?}");
    let text = err.to_string();
    assert!(
        text.contains(&format!("fusermount3 -u {}", stale_dir.display())),
        "{text}"
    );
    drop(stale);
    preflight(&stale_dir).unwrap();
}

#[test]
fn dropping_the_mount_unmounts_and_the_dir_can_be_mounted_again() {
    require_fuse();
    let tmp = tempfile::tempdir().unwrap();
    let img = SparseImage::standard(tmp.path());
    let dir = mount_dir(tmp.path());
    let _dog = Watchdog::start("drop_unmounts", DEADLINE, &[&dir]);
    let rt = runtime();
    for _ in 0..2 {
        let m = mount(FileDevice::open(&img.path, false).unwrap(), &dir, &rt);
        assert!(mounted_at(&dir).is_some_and(|t| t.starts_with("fuse")));
        assert_eq!(read_at(&m.file(), 0, 4096), img.expected(0, 4096));
        drop(m);
        assert_eq!(mounted_at(&dir), None);
        preflight(&dir).unwrap();
    }
}

#[test]
fn unmounting_a_file_still_open_detaches_it_and_says_so() {
    require_fuse();
    let tmp = tempfile::tempdir().unwrap();
    let img = SparseImage::standard(tmp.path());
    let dir = mount_dir(tmp.path());
    let _dog = Watchdog::start("busy_unmount", DEADLINE, &[&dir]);
    let rt = runtime();
    let m = mount(FileDevice::open(&img.path, false).unwrap(), &dir, &rt);
    let held = File::open(m.file()).unwrap();
    match m.unmount() {
        Err(MountError::Busy { .. }) => {}
        other => panic!("unmount with an open file: {other:?}"),
    }
    assert_eq!(mounted_at(&dir), None);
    // The holder's requests fail rather than reach a device being closed.
    let mut buf = [0u8; 4096];
    assert_eq!(os_error(held.read_at(&mut buf, 0)), libc::EIO);
    drop(held);
}
