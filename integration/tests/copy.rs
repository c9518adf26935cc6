//! Whole-disk reads by real clients: nbdcopy, qemu-img and the `nbd`
//! crate's sync client (EXPORT_NAME and simple replies only).

use std::io::{Read, Seek, SeekFrom, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::process::Command;
use std::time::Duration;

use integration::image::{MIB, assert_same_bytes, file_hash, pattern, read_at};
use integration::server::Addr;
use integration::{Export, SparseImage, require_tool, run_ok};

const T: Duration = Duration::from_secs(120);

#[test]
fn nbdcopy_out_of_the_export_matches_the_file() {
    let nbdcopy = require_tool("nbdcopy", "libnbd-bin");
    let dir = tempfile::tempdir().unwrap();
    let img = SparseImage::standard(dir.path());
    for export in [Export::new(&img.path), Export::new(&img.path).unix()] {
        let server = export.spawn();
        let out = dir.path().join("copy.img");
        run_ok(Command::new(&nbdcopy).arg(&server.uri).arg(&out), T);
        assert_eq!(
            file_hash(&out),
            file_hash(&img.path),
            "copy of {}",
            server.uri
        );
        std::fs::remove_file(&out).unwrap();
    }
}

#[test]
fn qemu_img_compare_finds_the_export_identical_to_the_file() {
    let qemu_img = require_tool("qemu-img", "qemu-utils");
    let dir = tempfile::tempdir().unwrap();
    let img = SparseImage::standard(dir.path());
    let server = Export::new(&img.path).spawn();
    let out = run_ok(
        Command::new(&qemu_img)
            .args(["compare", "-f", "raw", "-F", "raw", &server.uri])
            .arg(&img.path),
        T,
    );
    assert!(
        out.stdout_lossy().contains("Images are identical"),
        "{}",
        out.describe()
    );
    let info = run_ok(
        Command::new(&qemu_img).args(["info", "--output=json", &server.uri]),
        T,
    );
    let info: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
    assert_eq!(info["virtual-size"], img.size);
}

#[test]
fn qemu_img_convert_out_of_the_export_matches_the_file() {
    let qemu_img = require_tool("qemu-img", "qemu-utils");
    let dir = tempfile::tempdir().unwrap();
    let img = SparseImage::standard(dir.path());
    let server = Export::new(&img.path).unix().spawn();
    let out = dir.path().join("converted.img");
    run_ok(
        Command::new(&qemu_img)
            .args(["convert", "-f", "raw", "-O", "raw", &server.uri])
            .arg(&out),
        T,
    );
    assert_eq!(file_hash(&out), file_hash(&img.path));
}

fn read_all_with_nbd_crate<S: Read + Write>(mut s: S, img: &SparseImage) {
    let export = nbd::client::handshake(&mut s, b"").expect("nbd crate handshake");
    assert_eq!(export.size, img.size);
    assert!(export.readonly, "read-only export not flagged read-only");
    let mut client = nbd::client::NbdClient::new(&mut s, &export);
    let mut buf = vec![0; 256 * 1024];
    let mut at = 0;
    while at < img.size {
        client.read_exact(&mut buf).expect("nbd crate read");
        assert_same_bytes(&buf, &img.expected(at, buf.len()), at, "nbd crate read");
        at += buf.len() as u64;
    }
    // Unaligned reads via Seek.
    for off in [1u64, MIB - 7, 2 * MIB + 4095, img.size - 10] {
        client.seek(SeekFrom::Start(off)).unwrap();
        let mut small = vec![0; 10];
        client.read_exact(&mut small).unwrap();
        assert_eq!(small, img.expected(off, 10), "at {off}");
    }
}

#[test]
fn nbd_crate_sync_client_reads_the_file_over_tcp_and_unix() {
    let dir = tempfile::tempdir().unwrap();
    let img = SparseImage::standard(dir.path());
    for export in [Export::new(&img.path), Export::new(&img.path).unix()] {
        let server = export.spawn();
        match &server.addr {
            Addr::Tcp(a) => {
                let s = TcpStream::connect(a).unwrap();
                s.set_nodelay(true).unwrap();
                s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                read_all_with_nbd_crate(s, &img);
            }
            Addr::Unix(p) => {
                let s = UnixStream::connect(p).unwrap();
                s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                read_all_with_nbd_crate(s, &img);
            }
        }
    }
}

#[test]
fn nbd_crate_sync_client_writes_land_in_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let img = SparseImage::standard(dir.path());
    let server = Export::new(&img.path).writable().unix().spawn();
    let Addr::Unix(p) = &server.addr else {
        unreachable!()
    };
    let mut s = UnixStream::connect(p).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let export = nbd::client::handshake(&mut s, b"").unwrap();
    assert!(!export.readonly);
    assert!(export.send_flush);
    let mut client = nbd::client::NbdClient::new(&mut s, &export);
    let data = pattern(42, 0, 6000);
    client.seek(SeekFrom::Start(MIB + 1)).unwrap();
    client.write_all(&data).unwrap();
    client.flush().unwrap();
    assert_eq!(read_at(&img.path, MIB + 1, 6000), data);
    assert_eq!(std::fs::metadata(&img.path).unwrap().len(), img.size);
}
