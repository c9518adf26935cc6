//! The suite's peers against real tools: each copying peer must leave a
//! target equal to the source, and every peer must serve the source's
//! bytes. Needs nbdkit, nbdinfo, nbdcopy, qemu-img, qemu-nbd and
//! qemu-storage-daemon (Debian: nbdkit, libnbd-bin, qemu-utils).

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use stream_benches::peers::{Peer, PeerKind, PeerSpec};
use stream_benches::scratch::ScratchDir;
use stream_benches::{servers, testfile, trace};
use test_support::tool::require_tool;

const SIZE: u64 = 16 << 20;

/// Fails naming the Debian package when `tool` is missing.
fn require(tool: &str) {
    let package = match tool {
        "nbdkit" => "nbdkit",
        "nbdinfo" | "nbdcopy" => "libnbd-bin",
        _ => "qemu-utils",
    };
    require_tool(tool, package);
}

fn scratch(name: &str) -> ScratchDir {
    let d = std::env::temp_dir().join(format!("peers-{name}-{}", std::process::id()));
    let _ = fs::remove_dir_all(&d);
    fs::create_dir_all(&d).unwrap();
    ScratchDir(d)
}

/// Start `kind` over an nbdkit file source of `image`, hydrating; wait
/// for the copy, read a few ranges through the peer, stop it, and return
/// the target's path (inside `dir`).
fn hydrate_through(kind: PeerKind, image: &Path, dir: &Path) -> PathBuf {
    let src = servers::start_nbdkit_source(
        &[],
        "file",
        &[image.display().to_string()],
        SIZE,
        dir,
        "src",
    )
    .unwrap();
    let peer_dir = dir.join("peer");
    let mut peer = Peer::start(&PeerSpec {
        kind,
        source_uri: &src.uri,
        source_socket: &dir.join("nbdkit-src.sock"),
        size: SIZE,
        dir: &peer_dir,
        stream_bin: Path::new("/nonexistent"),
        hydrate: true,
        copy_timeout: Duration::from_secs(60),
    })
    .unwrap();
    let (took, samples) = peer
        .wait_hydrated(Duration::from_secs(60))
        .unwrap()
        .expect("a copying peer reports its copy");
    assert!(took > Duration::ZERO);
    assert_eq!(samples.last().map(|s| s.1), Some(1.0));
    let reads = trace::generate(SIZE, 3);
    trace::replay(&peer.uri, &reads, 4).unwrap();
    assert!(peer.usage().unwrap().peak_rss_kib > 0);
    peer.stop().unwrap();
    src.guard.stop().unwrap();
    peer_dir.join("target.img")
}

#[test]
fn qemu_storage_daemon_block_stream_leaves_the_source_on_the_target() {
    for t in ["nbdkit", "nbdinfo", "qemu-img", "qemu-storage-daemon"] {
        require(t);
    }
    let d = scratch("qsd");
    let image = d.0.join("source.img");
    testfile::create(&image, SIZE).unwrap();
    let target = hydrate_through(PeerKind::Qsd, &image, &d.0);
    // The external data file keeps guest offsets: once streamed it is the
    // raw disk.
    assert!(fs::read(&target).unwrap() == fs::read(&image).unwrap());
}

#[test]
fn nbdcopy_then_qemu_nbd_leaves_the_source_on_the_target() {
    for t in ["nbdkit", "nbdinfo", "nbdcopy", "qemu-nbd"] {
        require(t);
    }
    let d = scratch("copy");
    let image = d.0.join("source.img");
    testfile::create(&image, SIZE).unwrap();
    let target = hydrate_through(PeerKind::CopyThenServe, &image, &d.0);
    assert!(fs::read(&target).unwrap() == fs::read(&image).unwrap());
}

#[test]
fn nbdkit_cache_serves_the_source_and_never_hydrates() {
    for t in ["nbdkit", "nbdinfo"] {
        require(t);
    }
    let d = scratch("cache");
    let image = d.0.join("source.img");
    testfile::create(&image, SIZE).unwrap();
    let src = servers::start_nbdkit_source(
        &[],
        "file",
        &[image.display().to_string()],
        SIZE,
        &d.0,
        "src",
    )
    .unwrap();
    let mut peer = Peer::start(&PeerSpec {
        kind: PeerKind::NbdkitCache,
        source_uri: &src.uri,
        source_socket: &d.0.join("nbdkit-src.sock"),
        size: SIZE,
        dir: &d.0.join("peer"),
        stream_bin: Path::new("/nonexistent"),
        hydrate: true,
        copy_timeout: Duration::from_secs(60),
    })
    .unwrap();
    assert!(
        peer.wait_hydrated(Duration::from_secs(5))
            .unwrap()
            .is_none()
    );
    // What it serves equals the source (nbdcopy through the peer).
    let copy = d.0.join("copy.img");
    fs::File::create(&copy).unwrap();
    let out = std::process::Command::new("nbdcopy")
        .arg(&peer.uri)
        .arg(&copy)
        .output()
        .unwrap();
    assert!(out.status.success(), "nbdcopy: {out:?}");
    assert!(fs::read(&copy).unwrap() == fs::read(&image).unwrap());
    peer.stop().unwrap();
    src.guard.stop().unwrap();
}
