//! `stream export` over TLS, driven by the clients that use GnuTLS: nbdinfo
//! and nbdcopy (libnbd) and qemu-img, with PSK and with X.509 certificates;
//! and what a client without the right credentials gets.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use integration::image::{dense_file, read_file};
use integration::server::{Addr, Server};
use integration::tls::{Pki, psk_file, qemu_psk_dir};
use integration::wire::{self, OPT_ABORT, OPT_GO, OPT_INFO, OPT_LIST, OPT_STARTTLS, REP_ACK};
use integration::{Export, require_tool, run};

const T: Duration = Duration::from_secs(60);
const SIZE: u64 = 3 * 1024 * 1024 + 4096;

fn socket_of(server: &Server) -> &Path {
    match &server.addr {
        Addr::Unix(p) => p,
        Addr::Tcp(a) => panic!("expected a unix socket, got {a}"),
    }
}

fn port_of(server: &Server) -> u16 {
    match &server.addr {
        Addr::Tcp(a) => a.port(),
        Addr::Unix(p) => panic!("expected TCP, got {}", p.display()),
    }
}

/// nbdcopy the whole export to a file and return its bytes.
fn nbdcopy(uri: &str, dir: &Path) -> Vec<u8> {
    let nbdcopy = require_tool("nbdcopy", "libnbd-bin");
    let out = dir.join("copy.img");
    let r = run(Command::new(nbdcopy).arg(uri).arg(&out), T);
    assert!(r.status.success(), "{}", r.describe());
    read_file(&out)
}

#[test]
fn nbdinfo_and_nbdcopy_with_a_psk_file_read_the_disk_over_tls() {
    let nbdinfo = require_tool("nbdinfo", "libnbd-bin");
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.img");
    let want = dense_file(&disk, SIZE, 7);
    let psk = psk_file(dir.path(), "keys.psk", "alice");
    let server = Export::new(&disk)
        .unix()
        .args(&["--tls-psk", psk.to_str().unwrap()])
        .spawn();
    assert!(server.uri.starts_with("nbds+unix://"), "{}", server.uri);
    // libnbd takes the PSK user name from the URI (else from getlogin).
    let uri = format!(
        "nbds+unix://alice@/?socket={}&tls-psk-file={}",
        socket_of(&server).display(),
        psk.display()
    );
    let out = run(Command::new(&nbdinfo).arg(&uri), T);
    assert!(out.status.success(), "{}\n{}", out.describe(), server.log());
    let text = out.stdout_lossy();
    assert!(text.contains("with TLS"), "{text}");
    assert!(text.contains(&format!("export-size: {SIZE}")), "{text}");
    assert!(
        nbdcopy(&uri, dir.path()) == want,
        "nbdcopy over TLS-PSK read other bytes"
    );
}

#[test]
fn a_wrong_psk_fails_the_tls_handshake_and_the_server_says_why() {
    let nbdinfo = require_tool("nbdinfo", "libnbd-bin");
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.img");
    dense_file(&disk, SIZE, 8);
    let psk = psk_file(dir.path(), "keys.psk", "alice");
    let wrong = psk_file(dir.path(), "wrong.psk", "alice");
    let stranger = psk_file(dir.path(), "stranger.psk", "mallory");
    let server = Export::new(&disk)
        .unix()
        .args(&["--tls-psk", psk.to_str().unwrap()])
        .spawn();
    for (user, key) in [("alice", &wrong), ("mallory", &stranger)] {
        let uri = format!(
            "nbds+unix://{user}@/?socket={}&tls-psk-file={}",
            socket_of(&server).display(),
            key.display()
        );
        let out = run(Command::new(&nbdinfo).arg(&uri), T);
        assert!(!out.status.success(), "{}", out.describe());
        assert!(
            out.stderr_lossy().contains("gnutls_handshake"),
            "{}",
            out.describe()
        );
    }
    let log = server.log();
    assert!(log.contains("binder does not verify"), "{log}");
    assert!(
        log.contains("unknown identity") && log.contains("mallory"),
        "{log}"
    );
}

#[test]
fn plaintext_client_gets_tls_reqd_for_every_option_but_starttls() {
    let nbdinfo = require_tool("nbdinfo", "libnbd-bin");
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.img");
    dense_file(&disk, SIZE, 9);
    let psk = psk_file(dir.path(), "keys.psk", "alice");
    let server = Export::new(&disk)
        .args(&["--tls-psk", psk.to_str().unwrap()])
        .spawn();
    assert!(server.uri.starts_with("nbds://"), "{}", server.uri);

    // The exact replies, on the wire.
    let mut c = server.connect();
    c.start().unwrap();
    for opt in [OPT_LIST, OPT_INFO, OPT_GO] {
        let data = if opt == OPT_LIST {
            vec![]
        } else {
            wire::go_data("", &[])
        };
        let r = c.option(opt, &data).unwrap();
        assert_eq!(r.kind, wire::REP_ERR_TLS_REQD, "option {opt}: {r:?}");
        assert!(
            String::from_utf8_lossy(&r.data).contains("requires TLS"),
            "{r:?}"
        );
    }
    assert_eq!(c.option(OPT_STARTTLS, &[]).unwrap().kind, REP_ACK);
    drop(c);
    let mut c = server.connect();
    c.start().unwrap();
    assert_eq!(c.option(OPT_ABORT, &[]).unwrap().kind, REP_ACK);

    // What an operator sees from nbdinfo: a failure, with our reason in
    // libnbd's debug output.
    let out = run(
        Command::new(&nbdinfo)
            .env("LIBNBD_DEBUG", "1")
            .arg(format!("nbd://127.0.0.1:{}/", port_of(&server))),
        T,
    );
    assert!(!out.status.success(), "{}", out.describe());
    assert!(
        out.stderr_lossy().contains("this server requires TLS"),
        "{}",
        out.describe()
    );
}

#[test]
fn tls_on_serves_both_plaintext_and_tls_clients() {
    let nbdinfo = require_tool("nbdinfo", "libnbd-bin");
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.img");
    dense_file(&disk, SIZE, 10);
    let psk = psk_file(dir.path(), "keys.psk", "alice");
    let server = Export::new(&disk)
        .unix()
        .args(&["--tls", "on", "--tls-psk", psk.to_str().unwrap()])
        .spawn();
    let sock = socket_of(&server).display().to_string();
    for (uri, mark) in [
        (format!("nbd+unix:///?socket={sock}"), "without TLS"),
        (
            format!(
                "nbds+unix://alice@/?socket={sock}&tls-psk-file={}",
                psk.display()
            ),
            "with TLS",
        ),
    ] {
        let out = run(Command::new(&nbdinfo).arg(&uri), T);
        assert!(out.status.success(), "{}", out.describe());
        assert!(out.stdout_lossy().contains(mark), "{}", out.describe());
    }
}

#[test]
fn nbdcopy_with_x509_over_tcp_checks_the_server_name_and_our_client_certificate() {
    let nbdinfo = require_tool("nbdinfo", "libnbd-bin");
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.img");
    let want = dense_file(&disk, SIZE, 11);
    let pki = Pki::generate(dir.path());
    let server = Export::new(&disk)
        .args(&[
            "--tls-certificates",
            pki.server_dir().to_str().unwrap(),
            "--tls-verify-peer",
        ])
        .spawn();
    let port = port_of(&server);
    // 127.0.0.1 is in the certificate; libnbd checks it.
    let uri = |dir: &Path| {
        format!(
            "nbds://127.0.0.1:{port}/?tls-certificates={}",
            dir.display()
        )
    };
    assert!(nbdcopy(&uri(&pki.client_dir()), dir.path()) == want);

    // No client certificate, or one from another CA: refused.
    for d in [pki.ca_only_dir(), pki.stranger_dir()] {
        let out = run(Command::new(&nbdinfo).arg(uri(&d)), T);
        assert!(!out.status.success(), "{}", out.describe());
    }
    let log = server.log();
    assert!(log.contains("peer did not return a certificate"), "{log}");
    assert!(log.contains("certificate verify failed"), "{log}");
}

#[test]
fn qemu_img_reads_over_tls_with_psk_and_x509_creds() {
    let qemu_img = require_tool("qemu-img", "qemu-utils");
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.img");
    dense_file(&disk, SIZE, 12);
    let psk = psk_file(dir.path(), "keys.psk", "alice");
    let qdir = qemu_psk_dir(&psk, &dir.path().join("qemu-psk"));
    let pki = Pki::generate(dir.path());

    let server = Export::new(&disk)
        .args(&["--tls-psk", psk.to_str().unwrap()])
        .spawn();
    let copy = dir.path().join("psk-copy.img");
    let out = run(
        Command::new(&qemu_img)
            .args(["convert", "-O", "raw", "--object"])
            .arg(format!(
                "tls-creds-psk,id=tls0,endpoint=client,username=alice,dir={}",
                qdir.display()
            ))
            .arg("--image-opts")
            .arg(format!(
                "driver=nbd,host=127.0.0.1,port={},tls-creds=tls0",
                port_of(&server)
            ))
            .arg(&copy),
        T,
    );
    assert!(out.status.success(), "{}\n{}", out.describe(), server.log());
    assert!(
        read_file(&copy) == read_file(&disk),
        "qemu-img over TLS-PSK read other bytes"
    );
    drop(server);

    let server = Export::new(&disk)
        .args(&["--tls-certificates", pki.server_dir().to_str().unwrap()])
        .spawn();
    let out = run(
        Command::new(&qemu_img)
            .args(["info", "--output=json", "--object"])
            .arg(format!(
                "tls-creds-x509,id=tls0,endpoint=client,dir={}",
                pki.ca_only_dir().display()
            ))
            .arg("--image-opts")
            .arg(format!(
                "driver=nbd,host=127.0.0.1,port={},tls-creds=tls0",
                port_of(&server)
            )),
        T,
    );
    assert!(out.status.success(), "{}\n{}", out.describe(), server.log());
    assert!(
        out.stdout_lossy()
            .contains(&format!("\"virtual-size\": {SIZE}")),
        "{}",
        out.describe()
    );
}
