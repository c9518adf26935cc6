//! Issue 18: a disk on a legacy host read through its own sshd, nothing
//! installed there: `stream start --source ssh://...` against a real
//! OpenSSH server (Debian's `openssh-server`, `sftp-server`) on 127.0.0.1.
//! Lazy reads, hydration and finalize --verify from a file and from a
//! block device (a loop device, whose size stat reports as 0); the host
//! key checks (unknown: refused with the fingerprint, accepted on first use
//! only when told; changed: refused); a missing disk; a server without
//! SFTP (read with dd through a remote shell); and the link cut again and
//! again during hydration, a stall and a refusing host, through a proxy in
//! front of sshd.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use integration::finalize::Finalize;
use integration::proxy::Proxy;
use integration::start::mixed_image;
use integration::{LoopDevice, Start, tool};
use test_support::sshd::Sshd;

const T: Duration = Duration::from_secs(120);

/// nbdcopy of the whole export into `out`, compared with `want`.
fn copy_and_compare(uri: &str, out: &Path, want: &Path) {
    tool::run_ok(
        Command::new(tool::require_tool("nbdcopy", "libnbd-bin"))
            .arg(uri)
            .arg(out),
        T,
    );
    assert!(
        std::fs::read(out).unwrap() == std::fs::read(want).unwrap(),
        "what the export served differs from the legacy disk"
    );
}

fn migrate(sshd: &Sshd, disk: &Path, image: &Path, dir: &Path) {
    let target = dir.join("target.img");
    let source = sshd.uri(disk);
    // Lazy reads first: every chunk fetched on demand through SFTP.
    let start = Start::new(&source, &target, dir).no_hydrate(true);
    let running = start.spawn();
    copy_and_compare(&running.uri, &dir.join("copy.img"), image);
    let st = running.status();
    assert!(
        st["volume"]["chunks_fetched_on_demand"].as_u64().unwrap() > 0,
        "{st}"
    );
    assert_eq!(st["volume"]["source"], source.as_str(), "{st}");
    drop(running);
    // Then hydration (a resume: the size is checked on the new session),
    // then finalize --verify reads the source again and compares.
    let mut running = Start::new(&source, &target, dir).spawn();
    running.wait_hydrated(T);
    let reaped = running.reap_in_background(T);
    Finalize::new(start.state_dir())
        .args(&["--verify"])
        .run_ok(T);
    assert!(reaped.join().unwrap().expect("start exited").success());
    assert!(std::fs::read(&target).unwrap() == std::fs::read(image).unwrap());
}

#[test]
fn a_file_migrates_through_sshd_lazily_then_hydrated_and_verified() {
    let dir = tempfile::tempdir().unwrap();
    let sshd = Sshd::start(dir.path());
    let img = mixed_image(dir.path());
    let work = dir.path().join("m");
    std::fs::create_dir(&work).unwrap();
    migrate(&sshd, &img.path, &img.path, &work);
}

#[test]
fn a_block_device_migrates_through_sshd_its_size_found_by_reading() {
    let dir = tempfile::tempdir().unwrap();
    let sshd = Sshd::start(dir.path());
    let img = mixed_image(dir.path());
    let dev = LoopDevice::attach(&img.path, true);
    let work = dir.path().join("m");
    std::fs::create_dir(&work).unwrap();
    migrate(&sshd, &dev.path, &img.path, &work);
}

#[test]
fn without_sftp_the_disk_is_read_with_dd_through_a_remote_shell() {
    let dir = tempfile::tempdir().unwrap();
    let sshd = Sshd::start_with(dir.path(), false);
    let img = mixed_image(dir.path());
    let work = dir.path().join("m");
    std::fs::create_dir(&work).unwrap();
    migrate(&sshd, &img.path, &img.path, &work);
    let log = std::fs::read_to_string(work.join("start.log")).unwrap();
    assert!(log.contains("with dd through a remote shell"), "{log}");
}

#[test]
fn host_keys_unknown_are_refused_with_the_fingerprint_and_changed_always() {
    let dir = tempfile::tempdir().unwrap();
    let sshd = Sshd::start(dir.path());
    let img = mixed_image(dir.path());
    let target = dir.path().join("target.img");
    let empty = dir.path().join("known_hosts.empty");
    std::fs::write(&empty, "").unwrap();
    let uri = |kh: &Path| {
        format!(
            "ssh://root@127.0.0.1:{}{}?identity={}&known-hosts={}",
            sshd.port,
            img.path.display(),
            sshd.identity.display(),
            kh.display()
        )
    };
    // Unknown: refused, the fingerprint shown, nothing created.
    let out = Start::new(uri(&empty), &target, dir.path()).refused();
    let err = out.stderr_lossy();
    let fp = tool::run_ok(
        Command::new("ssh-keygen")
            .args(["-l", "-f"])
            .arg(dir.path().join("sshd/host_key.pub")),
        T,
    );
    let fp = fp.stdout_lossy();
    let sha = fp.split_whitespace().nth(1).unwrap();
    assert!(
        err.contains("not in known_hosts")
            && err.contains(sha)
            && err.contains("--accept-new-host-key"),
        "{err}"
    );
    assert!(!dir.path().join("state").exists(), "nothing was created");
    assert_eq!(std::fs::read_to_string(&empty).unwrap(), "");

    // Changed: refused even with --accept-new-host-key.
    let other = dir.path().join("other_key");
    tool::run_ok(
        Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-f"])
            .arg(&other),
        T,
    );
    let other_pub = std::fs::read_to_string(other.with_extension("pub")).unwrap();
    let wrong = dir.path().join("known_hosts.wrong");
    let key: Vec<&str> = other_pub.split_whitespace().take(2).collect();
    std::fs::write(
        &wrong,
        format!("[127.0.0.1]:{} {}\n", sshd.port, key.join(" ")),
    )
    .unwrap();
    let out = Start::new(uri(&wrong), &target, dir.path())
        .args(&["--accept-new-host-key"])
        .refused();
    let err = out.stderr_lossy();
    assert!(err.contains("CHANGED"), "{err}");
    assert!(!dir.path().join("state").exists(), "nothing was created");

    // Accepted on first use when told: recorded, and the migration runs.
    let running = Start::new(uri(&empty), &target, dir.path())
        .no_hydrate(true)
        .args(&["--accept-new-host-key"])
        .spawn();
    copy_and_compare(&running.uri, &dir.path().join("copy.img"), &img.path);
    let recorded = std::fs::read_to_string(&empty).unwrap();
    assert!(
        recorded.contains(sshd.host_key_pub.split_whitespace().nth(1).unwrap()),
        "known_hosts now holds the key: {recorded}"
    );
}

#[test]
fn a_missing_disk_is_a_clear_error_that_creates_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let sshd = Sshd::start(dir.path());
    let missing = dir.path().join("no-such.img");
    let out = Start::new(sshd.uri(&missing), dir.path().join("t.img"), dir.path()).refused();
    let err = out.stderr_lossy();
    assert!(
        err.contains("no disk at") && err.contains("no-such.img"),
        "{err}"
    );
    assert!(!dir.path().join("state").exists());
    assert!(!dir.path().join("t.img").exists());
}

/// An sshd with a proxy in front (the fault seam), a legacy disk of
/// `mib` MiB with data in its first `data_mib`, and the source URI
/// through the proxy.
struct Proxied {
    _sshd: Sshd,
    img: integration::SparseImage,
    proxy: Proxy,
    target: std::path::PathBuf,
    source: String,
}

fn proxied(dir: &Path, mib: u64, data_mib: u64, seed: u64) -> Proxied {
    let sshd = Sshd::start(dir);
    let img = integration::SparseImage::create(
        dir.join("legacy.img"),
        mib << 20,
        &[integration::Region {
            offset: 0,
            len: data_mib << 20,
        }],
        seed,
    );
    let proxy = Proxy::start(format!("127.0.0.1:{}", sshd.port).parse().unwrap());
    let source = sshd.uri_via(proxy.port(), &img.path);
    Proxied {
        _sshd: sshd,
        img,
        proxy,
        target: dir.join("target.img"),
        source,
    }
}

#[test]
fn hydration_survives_the_link_cut_again_and_again() {
    let dir = tempfile::tempdir().unwrap();
    let Proxied {
        _sshd,
        img,
        proxy,
        target,
        source,
    } = proxied(dir.path(), 64, 48, 7);
    // Slow enough that the cuts land while it runs.
    let start = Start::new(&source, &target, dir.path()).rate_limit(Some("16M"));
    let mut running = start.spawn();
    let mut cuts = 0;
    for _ in 0..5 {
        // Cut once something moved since the last cut.
        let before = proxy.bytes();
        let deadline = std::time::Instant::now() + T;
        while proxy.bytes() < before + (1 << 20) {
            assert!(
                std::time::Instant::now() < deadline,
                "no progress after a cut"
            );
            running.assert_alive();
            std::thread::sleep(Duration::from_millis(5));
        }
        cuts += proxy.cut();
    }
    assert!(cuts >= 5, "{cuts} connections cut");
    let st = running.wait_hydrated(T);
    assert!(
        st["volume"]["hydration_complete"].as_bool().unwrap(),
        "{st}"
    );
    let reaped = running.reap_in_background(T);
    Finalize::new(start.state_dir())
        .args(&["--verify"])
        .run_ok(T);
    assert!(reaped.join().unwrap().expect("start exited").success());
    assert!(std::fs::read(&target).unwrap() == std::fs::read(&img.path).unwrap());
}

/// Polls `stream status` until `pred` holds (bounded).
fn wait_status(
    running: &mut integration::Running,
    what: &str,
    pred: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = std::time::Instant::now() + T;
    loop {
        running.assert_alive();
        let st = running.status();
        if pred(&st) {
            return st;
        }
        assert!(std::time::Instant::now() < deadline, "never {what}: {st}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_stalled_link_and_a_host_that_refuses_are_waited_out() {
    let dir = tempfile::tempdir().unwrap();
    let Proxied {
        _sshd,
        img,
        proxy,
        target,
        source,
    } = proxied(dir.path(), 32, 32, 9);
    let start = Start::new(&source, &target, dir.path())
        .rate_limit(Some("8M"))
        .args(&["--source-stall-timeout", "1s"]);
    let mut running = start.spawn();
    let moving = |st: &serde_json::Value| st["volume"]["chunks_present"].as_u64().unwrap() > 16;
    wait_status(&mut running, "hydrating", moving);

    // A stall: bytes held, nothing answered. The session is given up
    // after the stall timeout; new ones get no greeting while it lasts.
    proxy.hold(true);
    wait_status(&mut running, "reconnecting after the stall", |st| {
        st["volume"]["source_health"]["state"] == "reconnecting"
    });
    proxy.hold(false);
    let present = running.status()["volume"]["chunks_present"]
        .as_u64()
        .unwrap();
    wait_status(&mut running, "hydrating again after the stall", |st| {
        st["volume"]["chunks_present"].as_u64().unwrap() > present + 16
    });

    // The host goes away (connections refused), then comes back.
    proxy.refuse(true);
    wait_status(&mut running, "reconnecting while refused", |st| {
        st["volume"]["source_health"]["state"] == "reconnecting"
    });
    proxy.refuse(false);
    let st = running.wait_hydrated(T);
    assert_eq!(st["volume"]["source_health"]["state"], "up", "{st}");
    let reaped = running.reap_in_background(T);
    Finalize::new(start.state_dir())
        .args(&["--verify"])
        .run_ok(T);
    assert!(reaped.join().unwrap().expect("start exited").success());
    assert!(std::fs::read(&target).unwrap() == std::fs::read(&img.path).unwrap());
}
