//! The process around the protocol: systemd socket activation (as
//! libnbd's `[ CMD ]` syntax does it) and shutdown on signals.

use std::process::Command;
use std::time::Duration;

use integration::binary::stream_bin;
use integration::image::file_hash;
use integration::{Export, SparseImage, require_tool, run_ok};

const T: Duration = Duration::from_secs(60);

#[test]
fn socket_activation_serves_nbdinfo() {
    let nbdinfo = require_tool("nbdinfo", "libnbd-bin");
    let dir = tempfile::tempdir().unwrap();
    let img = SparseImage::standard(dir.path());
    let out = run_ok(
        Command::new(&nbdinfo)
            .args(["--json", "--", "["])
            .arg(stream_bin())
            .arg("export")
            .arg(&img.path)
            .arg("]"),
        T,
    );
    let info: serde_json::Value =
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}\n{}", out.describe()));
    assert_eq!(info["exports"][0]["export-size"], img.size, "{info:#}");
    assert_eq!(info["exports"][0]["is_read_only"], true, "{info:#}");
}

#[test]
fn socket_activation_serves_nbdcopy() {
    let nbdcopy = require_tool("nbdcopy", "libnbd-bin");
    let dir = tempfile::tempdir().unwrap();
    let img = SparseImage::standard(dir.path());
    let out = dir.path().join("copy.img");
    run_ok(
        Command::new(&nbdcopy)
            .args(["--", "["])
            .arg(stream_bin())
            .arg("export")
            .arg(&img.path)
            .arg("]")
            .arg(&out),
        T,
    );
    assert_eq!(file_hash(&out), file_hash(&img.path));
}

#[test]
fn sigterm_with_no_clients_exits_zero() {
    let dir = tempfile::tempdir().unwrap();
    let img = SparseImage::standard(dir.path());
    let mut server = Export::new(&img.path).spawn();
    let status = server
        .signal_and_wait(libc::SIGTERM, Duration::from_secs(10))
        .expect("still running 10 s after SIGTERM");
    assert!(status.success(), "exit after SIGTERM: {status}");
}

#[test]
fn sigint_with_an_idle_client_exits_zero_and_closes_it() {
    let dir = tempfile::tempdir().unwrap();
    let img = SparseImage::standard(dir.path());
    let mut server = Export::new(&img.path).unix().spawn();
    let mut c = server.connect();
    c.negotiate("", true);
    assert_eq!(c.read_ok(0, 4096), img.expected(0, 4096));
    let status = server
        .signal_and_wait(libc::SIGINT, Duration::from_secs(10))
        .expect("still running 10 s after SIGINT with an idle client");
    assert!(status.success(), "exit after SIGINT: {status}");
    assert!(c.closed_within(Duration::from_secs(5)));
}

#[test]
fn sigterm_finishes_the_request_in_flight() {
    let dir = tempfile::tempdir().unwrap();
    let len = 16 << 20;
    let img = SparseImage::create(
        dir.path().join("big.img"),
        len as u64,
        &[integration::Region::new(0, len as u64)],
        11,
    );
    let mut server = Export::new(&img.path).spawn();
    let mut c = server.connect();
    c.negotiate("", false);
    // A 16 MiB READ cannot fit in the socket buffers: once its reply
    // header has arrived and the client stops reading, the server is
    // provably in the middle of it when the signal lands.
    c.request(0, integration::wire::CMD_READ, 9, 0, len as u32)
        .unwrap();
    let header = c.recv(16).expect("reply header of the READ");
    assert_eq!(
        &header[..8],
        &[0x67, 0x44, 0x66, 0x98, 0, 0, 0, 0],
        "simple reply, no error"
    );
    server.signal(libc::SIGTERM);
    let data = c
        .recv(len)
        .expect("the rest of the in-flight READ after SIGTERM");
    integration::image::assert_same_bytes(&data, &img.expected(0, len), 0, "in-flight READ");
    let status = server
        .wait(Duration::from_secs(10))
        .expect("still running 10 s after SIGTERM");
    assert!(status.success(), "exit after SIGTERM: {status}");
    assert!(c.closed_within(Duration::from_secs(5)));
}
