//! Our NBD client over TLS against nbdkit (GnuTLS): `stream start` with an
//! `nbds+unix://` source using a PSK file, our client with X.509 client
//! certificates and server name checks, and the refusals an operator meets:
//! a wrong key, a plaintext URI to a TLS-only server, an untrusted server.
//! Last, `stream start` serving its own export over TLS.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use integration::image::{assert_same_file, dense_file};
use integration::start::mixed_image;
use integration::tls::{Nbdkit, Pki, psk_file};
use integration::{Start, require_tool, run};
use nbd_server::client::{Client, ClientError};
use nbd_server::uri::NbdUri;

const T: Duration = Duration::from_secs(60);

fn uri(socket: &Path, params: &str) -> String {
    format!("nbds+unix:///?socket={}{params}", socket.display())
}

/// Run `f` on a runtime, bounded so a hang fails instead of stalling CI.
fn bounded<F: std::future::Future<Output = ()>>(f: F) {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
        .block_on(async {
            tokio::time::timeout(T, f)
                .await
                .expect("test did not finish within its deadline")
        })
}

async fn connect(uri: &str) -> Result<Client, ClientError> {
    Client::connect_uri(&NbdUri::parse(uri).unwrap()).await
}

#[test]
fn stream_start_reads_and_hydrates_from_nbdkit_over_tls_psk() {
    let qemu_img = require_tool("qemu-img", "qemu-utils");
    let dir = tempfile::tempdir().unwrap();
    let img = mixed_image(dir.path());
    let psk = psk_file(dir.path(), "keys.psk", "alice");
    let psk_arg = format!("--tls-psk={}", psk.display());
    // One thread: nbdkit 1.32 can abort when a connection with requests in
    // flight on several threads is cut (see the common test notes).
    let kit = Nbdkit::spawn(
        dir.path(),
        &[
            "-t",
            "1",
            "--tls=require",
            &psk_arg,
            "file",
            img.path.to_str().unwrap(),
        ],
    );
    let source = uri(&kit.socket, &format!("&tls-psk-file={}", psk.display()));
    let start = Start::new(&source, dir.path().join("target.img"), dir.path()).no_hydrate(true);
    let running = start.spawn();
    let out = run(
        Command::new(&qemu_img)
            .args(["compare", "-f", "raw", "-F", "raw", &running.uri])
            .arg(&img.path),
        T,
    );
    assert!(
        out.status.success(),
        "{}\n{}",
        out.describe(),
        running.log()
    );
    running.sigterm_and_wait(Duration::from_secs(30));

    // Resumed: the state recorded the URI with its TLS parameters.
    let start = start.no_hydrate(false);
    let mut running = start.spawn();
    running.wait_hydrated(T);
    running.sigterm_and_wait(Duration::from_secs(30));
    assert_same_file(start.target_path(), &img.path);
    assert!(!kit.log().contains("TLS handshake"), "{}", kit.log());
}

#[test]
fn wrong_psk_or_plaintext_to_a_tls_only_source_is_refused_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("source.img");
    dense_file(&img, 1 << 20, 3);
    let psk = psk_file(dir.path(), "keys.psk", "alice");
    let wrong = psk_file(dir.path(), "wrong.psk", "alice");
    let psk_arg = format!("--tls-psk={}", psk.display());
    let kit = Nbdkit::spawn(
        dir.path(),
        &[
            "-t",
            "1",
            "--tls=require",
            &psk_arg,
            "file",
            img.to_str().unwrap(),
        ],
    );
    let target = dir.path().join("target.img");

    let bad = uri(&kit.socket, &format!("&tls-psk-file={}", wrong.display()));
    let out = Start::new(&bad, &target, dir.path()).refused();
    let err = out.stderr_lossy();
    assert!(err.contains("TLS handshake failed"), "{err}");
    assert!(err.contains("wrong key"), "{err}");

    let plain = format!("nbd+unix:///?socket={}", kit.socket.display());
    let out = Start::new(&plain, &target, dir.path()).refused();
    let err = out.stderr_lossy();
    assert!(err.contains("server requires TLS"), "{err}");
    assert!(err.contains("nbds://"), "{err}");

    let missing = uri(&kit.socket, "&tls-psk-file=/nonexistent/keys.psk");
    let out = Start::new(&missing, &target, dir.path()).refused();
    let err = out.stderr_lossy();
    assert!(
        err.contains("cannot read the PSK file /nonexistent/keys.psk"),
        "{err}"
    );
}

#[test]
fn our_client_presents_its_certificate_and_checks_nbdkits_name() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("source.img");
    let want = dense_file(&img, 1 << 20, 4);
    let pki = Pki::generate(dir.path());
    let certs = format!("--tls-certificates={}", pki.server_dir().display());
    let kit = Nbdkit::spawn(
        dir.path(),
        &[
            "-t",
            "1",
            "--tls=require",
            &certs,
            "--tls-verify-peer",
            "file",
            img.to_str().unwrap(),
        ],
    );
    let with = |d: &Path, extra: &str| {
        uri(
            &kit.socket,
            &format!("&tls-certificates={}{extra}", d.display()),
        )
    };
    bounded(async {
        // Unix socket: chain checked; with tls-hostname the name too.
        for u in [
            with(&pki.client_dir(), ""),
            with(&pki.client_dir(), "&tls-hostname=localhost"),
        ] {
            let c = connect(&u).await.unwrap_or_else(|e| panic!("{u}: {e}"));
            assert_eq!(c.read(4096, 512).await.unwrap(), want[4096..4608]);
            c.disconnect().await.unwrap();
        }
        // A name the certificate does not carry.
        let e = connect(&with(&pki.client_dir(), "&tls-hostname=db01.example"))
            .await
            .unwrap_err();
        assert!(matches!(e, ClientError::Tls { .. }), "{e:?}");
        assert!(format!("{e}").contains("certificate verify failed"), "{e}");
        // nbdkit demands a client certificate signed by its CA.
        for d in [pki.ca_only_dir(), pki.stranger_dir()] {
            let e = connect(&with(&d, "")).await.unwrap_err();
            assert!(
                matches!(e, ClientError::Tls { .. }) && e.to_string().contains("certificate"),
                "{}: {e:?}",
                d.display()
            );
        }
        // A server certificate from a CA we do not trust.
        let e = connect(&uri(
            &kit.socket,
            &format!(
                "&tls-certificates={}",
                dir.path().join("pki/nothing").display()
            ),
        ))
        .await
        .unwrap_err();
        assert!(matches!(e, ClientError::Tls { .. }), "{e:?}");
        assert!(format!("{e}").contains("ca-cert.pem"), "{e}");
    });
}

#[test]
fn our_client_with_a_psk_reads_from_nbdkit_and_refuses_a_plaintext_server() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("source.img");
    let want = dense_file(&img, 1 << 20, 5);
    let psk = psk_file(dir.path(), "keys.psk", "alice");
    let psk_arg = format!("--tls-psk={}", psk.display());
    let tls_dir = dir.path().join("tls");
    let plain_dir = dir.path().join("plain");
    std::fs::create_dir_all(&tls_dir).unwrap();
    std::fs::create_dir_all(&plain_dir).unwrap();
    let kit = Nbdkit::spawn(
        &tls_dir,
        &[
            "-t",
            "1",
            "--tls=require",
            &psk_arg,
            "file",
            img.to_str().unwrap(),
        ],
    );
    let plain = Nbdkit::spawn(&plain_dir, &["-t", "1", "file", img.to_str().unwrap()]);
    let key = format!("&tls-psk-file={}", psk.display());
    bounded(async {
        let c = connect(&uri(&kit.socket, &key)).await.unwrap();
        assert_eq!(c.size(), 1 << 20);
        assert_eq!(c.read(0, 65536).await.unwrap(), want[..65536]);
        assert!(c.can_block_status());
        c.disconnect().await.unwrap();
        // nbds:// never falls back to plaintext.
        let e = connect(&uri(&plain.socket, &key)).await.unwrap_err();
        assert!(matches!(e, ClientError::TlsRefused { .. }), "{e:?}");
    });
}

#[test]
fn stream_start_serves_its_export_over_tls() {
    let nbdinfo = require_tool("nbdinfo", "libnbd-bin");
    let dir = tempfile::tempdir().unwrap();
    let img = mixed_image(dir.path());
    let psk = psk_file(dir.path(), "keys.psk", "alice");
    let start = Start::new(&img.path, dir.path().join("target.img"), dir.path())
        .no_hydrate(true)
        .args(&["--tls-psk", psk.to_str().unwrap()]);
    let running = start.spawn();
    assert!(running.uri.starts_with("nbds+unix://"), "{}", running.uri);
    let sock = dir.path().join("nbd.sock");
    let good = format!(
        "nbds+unix://alice@/?socket={}&tls-psk-file={}",
        sock.display(),
        psk.display()
    );
    let out = run(Command::new(&nbdinfo).arg(&good), T);
    assert!(
        out.status.success(),
        "{}\n{}",
        out.describe(),
        running.log()
    );
    assert!(
        out.stdout_lossy().contains("with TLS"),
        "{}",
        out.describe()
    );
    let plain = format!("nbd+unix:///?socket={}", sock.display());
    let out = run(Command::new(&nbdinfo).arg(&plain), T);
    assert!(!out.status.success(), "{}", out.describe());
    running.sigterm_and_wait(Duration::from_secs(30));
}
