//! Plaintext NBD is only served where no other host can listen in: a TCP
//! listener on a non-loopback address needs required TLS or `--insecure`.

use std::process::{Command, Stdio};
use std::time::Duration;

use integration::binary::stream_bin;
use integration::image::dense_file;
use integration::server::read_uri_line;
use integration::tls::psk_file;
use integration::tool::run;

const T: Duration = Duration::from_secs(30);

/// Start `stream ARGS`, expect a URI line, then stop it by PID.
fn serves(args: &[&str]) -> String {
    let mut child = Command::new(stream_bin())
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start stream");
    let uri = read_uri_line(&mut child, T);
    test_support::child::kill_and_reap(&mut child);
    uri.unwrap_or_else(|e| panic!("stream {args:?} did not serve: {e}"))
}

#[test]
fn export_on_a_wildcard_address_without_tls_is_refused_and_insecure_overrides() {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.img");
    dense_file(&disk, 1 << 20, 1);
    let disk = disk.to_str().unwrap();

    let out = run(
        Command::new(stream_bin()).args(["export", disk, "--listen", "0.0.0.0:0"]),
        T,
    );
    assert!(
        !out.status.success() && out.stdout.is_empty(),
        "{}",
        out.describe()
    );
    let err = out.stderr_lossy();
    assert!(err.contains("refusing to serve NBD on 0.0.0.0:0"), "{err}");
    assert!(
        err.contains("--tls-psk") && err.contains("--insecure"),
        "{err}"
    );

    // --tls on still lets plaintext clients in: refused too.
    let psk = psk_file(dir.path(), "keys.psk", "alice");
    let psk = psk.to_str().unwrap();
    let out = run(
        Command::new(stream_bin()).args([
            "export",
            disk,
            "--listen",
            "0.0.0.0:0",
            "--tls",
            "on",
            "--tls-psk",
            psk,
        ]),
        T,
    );
    assert!(!out.status.success(), "{}", out.describe());
    assert!(
        out.stderr_lossy()
            .contains("--tls on still serves plaintext"),
        "{}",
        out.describe()
    );

    let uri = serves(&["export", disk, "--listen", "0.0.0.0:0", "--insecure"]);
    assert!(uri.starts_with("nbd://0.0.0.0:"), "{uri}");
    let uri = serves(&["export", disk, "--listen", "0.0.0.0:0", "--tls-psk", psk]);
    assert!(uri.starts_with("nbds://0.0.0.0:"), "{uri}");
    // Loopback needs nothing.
    let uri = serves(&["export", disk, "--listen", "127.0.0.1:0"]);
    assert!(uri.starts_with("nbd://127.0.0.1:"), "{uri}");
}

#[test]
fn start_on_a_wildcard_address_without_tls_is_refused_before_any_state_exists() {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.img");
    dense_file(&disk, 1 << 20, 2);
    let state = dir.path().join("state");
    let out = run(
        Command::new(stream_bin())
            .args(["start", "--source"])
            .arg(&disk)
            .arg("--target")
            .arg(dir.path().join("target.img"))
            .arg("--state")
            .arg(&state)
            .args(["--listen", "0.0.0.0:0"]),
        T,
    );
    assert!(
        !out.status.success() && out.stdout.is_empty(),
        "{}",
        out.describe()
    );
    assert!(
        out.stderr_lossy()
            .contains("refusing to serve NBD on 0.0.0.0:0"),
        "{}",
        out.describe()
    );
    assert!(!state.exists(), "a refused start left state behind");
}

#[test]
fn bad_tls_flags_are_refused_with_the_fix() {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.img");
    dense_file(&disk, 1 << 20, 3);
    let disk = disk.to_str().unwrap();
    let bad = dir.path().join("bad.psk");
    std::fs::write(&bad, "alice:zz00\n").unwrap();
    let sock = dir.path().join("s.sock");
    let sock = sock.to_str().unwrap();
    for (args, says) in [
        (
            vec!["--tls-psk", bad.to_str().unwrap()],
            "line 1: key is not hexadecimal",
        ),
        (vec!["--tls", "require"], "needs credentials"),
        (
            vec!["--tls-psk", "/nonexistent.psk"],
            "cannot read the PSK file",
        ),
        (
            vec!["--tls-certificates", dir.path().to_str().unwrap()],
            "server-cert.pem: no such file",
        ),
    ] {
        let out = run(
            Command::new(stream_bin())
                .args(["export", disk, "--socket", sock])
                .args(&args),
            T,
        );
        assert!(!out.status.success(), "{args:?}: {}", out.describe());
        assert!(
            out.stderr_lossy().contains(says),
            "{args:?}: {}",
            out.describe()
        );
    }
}
