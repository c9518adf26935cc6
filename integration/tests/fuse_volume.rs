//! The streaming volume through the FUSE frontend: a real ext4 file system
//! from a fixture source image, mounted from a loop device on `disk.raw`;
//! writes fsynced through it survive a restart of the volume; and NBD and
//! FUSE serving the same volume at once see each other's writes.

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use fuse_frontend::{Mount, MountOptions};
use integration::fuse::{FsMount, LoopDevice, Watchdog, ext4_image, require_fuse};
use integration::image::{MIB, bytes_hash, file_hash, pattern, read_at};
use integration::{SparseImage, require_tool, run};
use lazy_fetch::frontend::VolumeDevice;
use lazy_fetch::source::file::FileSource;
use lazy_fetch::{OpenOptions as VolumeOptions, Volume};
use nbd_server::{Export, Listener, Server, Shutdown};

const DEADLINE: Duration = Duration::from_secs(240);

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

struct Paths {
    source: PathBuf,
    target: PathBuf,
    state: PathBuf,
}

fn open_volume(rt: &tokio::runtime::Runtime, p: &Paths) -> Arc<Volume<FileSource>> {
    rt.block_on(Volume::open(
        FileSource::open(&p.source).unwrap(),
        &VolumeOptions {
            target: p.target.clone(),
            state_dir: p.state.clone(),
            chunk_size: None,
            allow_finalized: false,
            serving: true,
            ..Default::default()
        },
    ))
    .unwrap_or_else(|e| panic!("open the volume: {e}"))
}

fn mkdir(path: PathBuf) -> PathBuf {
    std::fs::create_dir_all(&path).unwrap();
    path
}

/// Unmount the FUSE file and let go of the volume *without* a clean close:
/// what is durable is only what a flush (an fsync) made durable.
fn stop_uncleanly(rt: &tokio::runtime::Runtime, m: Mount, volume: Arc<Volume<FileSource>>) {
    m.unmount().unwrap();
    rt.block_on(volume.idle());
    assert_eq!(
        Arc::strong_count(&volume),
        1,
        "someone still holds the volume"
    );
    drop(volume);
}

#[test]
fn ext4_from_the_source_mounts_read_only_and_fsynced_writes_survive_a_restart() {
    require_fuse();
    require_tool("losetup", "mount");
    let tmp = tempfile::tempdir().unwrap();
    let files: Vec<(&str, Vec<u8>)> = vec![
        ("etc/hostname", b"legacy-box\n".to_vec()),
        ("var/lib/big.bin", pattern(7, 0, 5 * MIB as usize)),
        ("home/user/notes.txt", pattern(8, 0, 123_457)),
    ];
    let p = Paths {
        source: tmp.path().join("legacy.img"),
        target: tmp.path().join("target.raw"),
        state: tmp.path().join("state"),
    };
    ext4_image(&p.source, 64 * MIB, &files);
    let fuse_dir = mkdir(tmp.path().join("fuse"));
    let fs_dir = mkdir(tmp.path().join("ext4"));
    let _dog = Watchdog::start("ext4_via_loop", DEADLINE, &[&fs_dir, &fuse_dir]);
    let rt = runtime();

    // 1. Read-only: the fixture's files, fetched lazily through the volume.
    let volume = open_volume(&rt, &p);
    let m = Mount::new(
        VolumeDevice(volume.clone()),
        &fuse_dir,
        &MountOptions::default(),
        rt.handle().clone(),
    )
    .unwrap();
    {
        let lo = LoopDevice::attach(&m.file(), true);
        let fs = FsMount::mount(&lo.path, &fs_dir, "ro,noload");
        for (name, bytes) in &files {
            assert_eq!(
                file_hash(&fs_dir.join(name)),
                bytes_hash(bytes),
                "{name} through ext4 on a loop device on disk.raw"
            );
        }
        fs.unmount();
    }

    // 2. Read-write: a new file and an overwrite, each fsynced.
    let new_file = pattern(9, 0, 3 * MIB as usize + 17);
    {
        let lo = LoopDevice::attach(&m.file(), false);
        let fs = FsMount::mount(&lo.path, &fs_dir, "rw");
        let mut f = std::fs::File::create(fs_dir.join("written-after-cutover.bin")).unwrap();
        f.write_all(&new_file).unwrap();
        f.sync_all().unwrap();
        drop(f);
        let f = OpenOptions::new()
            .write(true)
            .open(fs_dir.join("etc/hostname"))
            .unwrap();
        f.write_all_at(b"cloud-box!\n", 0).unwrap();
        f.sync_all().unwrap();
        drop(f);
        fs.unmount();
    }
    stop_uncleanly(&rt, m, volume);

    // 3. Restart: reopen the volume from its state dir, mount again, check.
    let volume = open_volume(&rt, &p);
    let m = Mount::new(
        VolumeDevice(volume.clone()),
        &fuse_dir,
        &MountOptions::default(),
        rt.handle().clone(),
    )
    .unwrap();
    {
        let lo = LoopDevice::attach(&m.file(), true);
        let fs = FsMount::mount(&lo.path, &fs_dir, "ro,noload");
        assert_eq!(
            file_hash(&fs_dir.join("written-after-cutover.bin")),
            bytes_hash(&new_file)
        );
        assert_eq!(
            std::fs::read(fs_dir.join("etc/hostname")).unwrap(),
            b"cloud-box!\n"
        );
        for (name, bytes) in &files[1..] {
            assert_eq!(file_hash(&fs_dir.join(name)), bytes_hash(bytes), "{name}");
        }
        fs.unmount();
    }
    m.unmount().unwrap();
    rt.block_on(volume.close()).unwrap();
}

#[test]
fn a_write_fsynced_on_disk_raw_survives_an_unclean_restart() {
    require_fuse();
    let tmp = tempfile::tempdir().unwrap();
    let img = SparseImage::standard(tmp.path());
    let p = Paths {
        source: img.path.clone(),
        target: tmp.path().join("target.raw"),
        state: tmp.path().join("state"),
    };
    let dir = mkdir(tmp.path().join("fuse"));
    let _dog = Watchdog::start("fsync_survives", DEADLINE, &[&dir]);
    let rt = runtime();
    let volume = open_volume(&rt, &p);
    let m = Mount::new(
        VolumeDevice(volume.clone()),
        &dir,
        &MountOptions::default(),
        rt.handle().clone(),
    )
    .unwrap();
    // Straddles a data region and a hole, and partial chunks at both ends.
    let at = 3 * MIB - 100_000;
    let data = pattern(42, at, 300_000);
    let f = OpenOptions::new().write(true).open(m.file()).unwrap();
    f.write_all_at(&data, at).unwrap();
    f.sync_data().unwrap();
    drop(f);
    stop_uncleanly(&rt, m, volume);

    let volume = open_volume(&rt, &p);
    let m = Mount::new(
        VolumeDevice(volume.clone()),
        &dir,
        &MountOptions::default(),
        rt.handle().clone(),
    )
    .unwrap();
    assert_eq!(read_at(&m.file(), at, data.len()), data);
    let before = read_at(&m.file(), 0, at as usize);
    assert_eq!(before, img.expected(0, at as usize));
    m.unmount().unwrap();
    rt.block_on(volume.close()).unwrap();
}

fn qemu_io(uri: &str, cmd: &str) -> String {
    let qemu_io = require_tool("qemu-io", "qemu-utils");
    let out = run(
        Command::new(qemu_io).args(["-f", "raw", uri, "-c", cmd]),
        Duration::from_secs(60),
    );
    let text = out.stdout_lossy();
    assert!(
        out.status.success() && !text.contains("failed") && !text.contains("error"),
        "{}",
        out.describe()
    );
    text
}

#[test]
fn nbd_and_fuse_on_one_volume_see_each_others_writes() {
    require_fuse();
    let tmp = tempfile::tempdir().unwrap();
    let img = SparseImage::standard(tmp.path());
    let p = Paths {
        source: img.path.clone(),
        target: tmp.path().join("target.raw"),
        state: tmp.path().join("state"),
    };
    let dir = mkdir(tmp.path().join("fuse"));
    let _dog = Watchdog::start("nbd_and_fuse", DEADLINE, &[&dir]);
    let rt = runtime();
    let volume = open_volume(&rt, &p);
    let device = VolumeDevice(volume.clone());

    let socket = tmp.path().join("nbd.sock");
    let listener = {
        let _in_runtime = rt.enter();
        Listener::bind_unix(&socket).unwrap()
    };
    let uri = listener.uri("").unwrap();
    let server = Server::new(vec![Export {
        name: String::new(),
        description: None,
        device: device.clone(),
    }]);
    let shutdown = Shutdown::new();
    let serving = {
        let (server, shutdown) = (server.clone(), shutdown.clone());
        rt.spawn(async move { server.serve(listener, shutdown).await })
    };
    let m = Mount::new(device, &dir, &MountOptions::default(), rt.handle().clone()).unwrap();
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(m.file())
        .unwrap();

    // NBD writes, the file reads (no page cache in between to go stale).
    for round in 0..3u8 {
        let byte = 0x50 + round;
        qemu_io(&uri, &format!("write -P {byte} 1M 64k"));
        let mut buf = vec![0u8; 64 * 1024];
        file.read_exact_at(&mut buf, MIB).unwrap();
        assert!(buf.iter().all(|&b| b == byte), "round {round}: stale read");
    }
    // The file writes, NBD reads; an absent chunk (in a hole) and a present one.
    for (byte, at) in [(0xa5u8, 5 * MIB + 4096), (0xa6, MIB + 8192)] {
        file.write_all_at(&[byte; 16 * 1024], at).unwrap();
        qemu_io(&uri, &format!("read -P {byte} {at} 16k"));
    }
    // Punch through the file, NBD sees zeros.
    // SAFETY: an fd we own.
    let r = unsafe {
        libc::fallocate(
            std::os::fd::AsRawFd::as_raw_fd(&file),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            (2 * MIB) as i64,
            (MIB / 2) as i64,
        )
    };
    assert_eq!(r, 0, "{}", std::io::Error::last_os_error());
    qemu_io(&uri, &format!("read -P 0 {} 512k", 2 * MIB));
    drop(file);

    m.unmount().unwrap();
    shutdown.trigger();
    rt.block_on(serving).unwrap().unwrap();
    rt.block_on(volume.close()).unwrap();
}
