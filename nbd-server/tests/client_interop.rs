//! The NBD client against real servers: nbdkit 1.32 (file, memory plugins;
//! delay and exportname filters; `--no-sr`) and qemu-nbd.
//!
//! Each test starts its own server on a socket in a fresh temporary
//! directory, waits for it by polling `connect` against a deadline, runs
//! under a `tokio::time::timeout`, and kills the server it started through
//! test-support's `ChildGuard` (`Drop` kills by PID and reaps). A missing
//! tool fails the test with the Debian package to install; nothing passes
//! silently.

#![allow(
    clippy::cast_possible_truncation,
    reason = "test fixtures: offsets and sizes of small in-memory disks, byte patterns"
)]

use std::future::Future;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nbd_server::Extent;
use nbd_server::client::{Client, ClientError};
use nbd_server::proto::Errno;
use nbd_server::uri::{Endpoint, NbdUri};
use test_support::Rng;
use test_support::child::ChildGuard;
use test_support::nbdkit::Nbdkit;
use test_support::tool::require_tool;

/// Bound for one whole test.
const TEST_TIMEOUT: Duration = Duration::from_secs(60);
/// Bound for a server to start listening.
const START_TIMEOUT: Duration = Duration::from_secs(15);
const MIB: u64 = 1 << 20;

/// A server process this test started; killed by PID and reaped on drop
/// (its [`ChildGuard`]).
struct ServerGuard {
    _child: ChildGuard,
    endpoint: Endpoint,
    /// Holds the socket and image; removed after the server is gone.
    _dir: tempfile::TempDir,
}

/// Spawn `cmd` (which must listen on `endpoint`) and wait until a connect
/// succeeds, the process dies, or the deadline passes.
fn spawn_and_wait(mut cmd: Command, endpoint: Endpoint, dir: tempfile::TempDir) -> ServerGuard {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut child = ChildGuard::spawn(format!("{cmd:?}"), &mut cmd)
        .unwrap_or_else(|e| panic!("{e}"))
        .kill_on_drop();
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        let up = match &endpoint {
            Endpoint::Unix(p) => std::os::unix::net::UnixStream::connect(p).is_ok(),
            Endpoint::Tcp { host, port } => {
                std::net::TcpStream::connect((host.as_str(), *port)).is_ok()
            }
        };
        if up {
            return ServerGuard {
                _child: child,
                endpoint,
                _dir: dir,
            };
        }
        if let Some(status) = child.try_wait().unwrap() {
            let mut err = String::new();
            if let Some(mut e) = child.child_mut().stderr.take() {
                use std::io::Read;
                let _ = e.read_to_string(&mut err);
            }
            panic!("{cmd:?} exited with {status} before listening: {err}");
        }
        assert!(
            Instant::now() < deadline,
            "{cmd:?} did not listen within {START_TIMEOUT:?}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn sock_in(dir: &tempfile::TempDir) -> PathBuf {
    dir.path().join("nbd.sock")
}

/// `nbdkit -f -U SOCK ARGS...` (test-support's launcher), serving from
/// `dir`.
fn nbdkit(args: &[&str], dir: tempfile::TempDir) -> ServerGuard {
    let kit = Nbdkit::spawn(dir.path(), args);
    ServerGuard {
        endpoint: Endpoint::Unix(kit.socket.clone()),
        _child: kit.guard,
        _dir: dir,
    }
}

/// `nbdkit ... file FILE`, serving `image` from `dir`.
fn nbdkit_file(extra: &[&str], dir: tempfile::TempDir, image: &Path) -> ServerGuard {
    let image = image.to_str().unwrap().to_string();
    let mut args: Vec<&str> = extra.to_vec();
    args.push("file");
    args.push(&image);
    nbdkit(&args, dir)
}

/// `qemu-nbd -f raw --socket=SOCK --persistent --shared=8 EXTRA... FILE`.
fn qemu_nbd(extra: &[&str], dir: tempfile::TempDir, image: &Path) -> ServerGuard {
    let qemu_nbd = require_tool("qemu-nbd", "qemu-utils");
    let sock = sock_in(&dir);
    let mut cmd = Command::new(qemu_nbd);
    cmd.args(["-f", "raw"])
        .arg(format!("--socket={}", sock.display()))
        .args(["--persistent", "--shared=8"])
        .args(extra)
        .arg(image);
    spawn_and_wait(cmd, Endpoint::Unix(sock), dir)
}

/// Deterministic bytes that differ at every offset (so a misplaced chunk
/// shows).
fn pattern(len: usize, seed: u64) -> Vec<u8> {
    Rng::new(seed).filled(len)
}

/// A temp dir holding `disk.img` of `size` bytes filled with `pattern`.
fn dense_image(size: u64) -> (tempfile::TempDir, PathBuf, Vec<u8>) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("disk.img");
    let data = pattern(size as usize, 0x5eed);
    std::fs::write(&path, &data).unwrap();
    (dir, path, data)
}

/// A temp dir holding an 8 MiB `disk.img`: data in [0, 1 MiB) and
/// [6 MiB, 7 MiB), holes elsewhere.
fn sparse_image() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sparse.img");
    let f = std::fs::File::create(&path).unwrap();
    f.set_len(8 * MIB).unwrap();
    f.write_all_at(&pattern(MIB as usize, 1), 0).unwrap();
    f.write_all_at(&pattern(MIB as usize, 2), 6 * MIB).unwrap();
    f.sync_all().unwrap();
    (dir, path)
}

async fn connect(server: &ServerGuard) -> Client {
    Client::connect(&server.endpoint, "")
        .await
        .unwrap_or_else(|e| panic!("connect to {}: {e}", server.endpoint))
}

async fn bounded<F: Future<Output = ()>>(f: F) {
    tokio::time::timeout(TEST_TIMEOUT, f)
        .await
        .expect("test exceeded its time bound");
}

// --- checks shared by several servers -------------------------------------

/// 300 reads at random unaligned offsets and lengths equal the file.
async fn check_random_reads(c: &Client, want: &[u8]) {
    let mut rng = Rng::new(0xabcdef);
    let size = want.len() as u64;
    for _ in 0..300 {
        let off = rng.below(size);
        let len = 1 + rng.below((size - off).min(300_000)) as u32;
        let got = c.read(off, len).await.unwrap();
        assert!(
            got == want[off as usize..off as usize + len as usize],
            "read at {off} len {len} differs from the file"
        );
    }
}

/// A read crossing the end fails with EINVAL; the connection goes on.
async fn check_past_end_read(c: &Client, want: &[u8]) {
    let size = c.size();
    let e = c.read(size - 10, 20).await.unwrap_err();
    assert_eq!(e.errno(), Some(Errno::Inval), "{e}");
    assert!(!e.is_connection_fatal());
    assert!(!c.is_closed());
    assert_eq!(c.read(0, 10).await.unwrap(), want[..10]);
}

/// Writes (one with FUA if offered), flush, read back.
async fn check_write_flush_read_back(c: &Client) {
    assert!(c.can_write() && c.can_flush());
    let a = pattern(70_000, 77);
    let b = pattern(513, 78);
    c.write(12_345, &a, false).await.unwrap();
    c.write(3 * MIB + 1, &b, c.can_fua()).await.unwrap();
    c.flush().await.unwrap();
    assert_eq!(c.read(12_345, a.len() as u32).await.unwrap(), a);
    assert_eq!(c.read(3 * MIB + 1, b.len() as u32).await.unwrap(), b);
}

/// Trim and write-zeroes (with and without NO_HOLE) read back as zero.
async fn check_trim_and_zero(c: &Client) {
    assert!(c.can_trim() && c.can_zero());
    // Aligned ranges, so a punch-hole trim covers them exactly.
    c.trim(MIB, 64 * 1024).await.unwrap();
    c.write_zeroes(2 * MIB + 100, 5000, false).await.unwrap();
    c.write_zeroes(2 * MIB + 10_000, 4096, true).await.unwrap();
    c.flush().await.unwrap();
    assert_eq!(c.read(MIB, 64 * 1024).await.unwrap(), vec![0; 64 * 1024]);
    assert_eq!(c.read(2 * MIB + 100, 5000).await.unwrap(), vec![0; 5000]);
    assert_eq!(c.read(2 * MIB + 10_000, 4096).await.unwrap(), vec![0; 4096]);
    // The bytes around stay data.
    assert_ne!(c.read(2 * MIB + 99, 1).await.unwrap(), vec![0]);
}

/// Walk block status over the whole sparse image, asking again where a
/// reply covered less.
async fn extent_map(c: &Client) -> Vec<(u64, Extent)> {
    let mut out = vec![];
    let mut off = 0;
    while off < c.size() {
        let len = (c.size() - off).min(u32::MAX as u64 / 2) as u32;
        let extents = c.block_status(off, len).await.unwrap();
        assert!(!extents.is_empty());
        for e in extents {
            assert!(e.length > 0);
            out.push((off, e));
            off += e.length;
        }
    }
    assert_eq!(off, c.size());
    out
}

fn state_at(map: &[(u64, Extent)], at: u64) -> Extent {
    map.iter()
        .find(|(o, e)| *o <= at && at < o + e.length)
        .map(|(_, e)| *e)
        .unwrap_or_else(|| panic!("no extent covers {at}: {map:?}"))
}

async fn check_sparse_block_status(c: &Client) {
    assert!(
        c.can_block_status(),
        "server did not select base:allocation"
    );
    let map = extent_map(c).await;
    for at in [0, MIB / 2, MIB - 1, 6 * MIB, 7 * MIB - 1] {
        let e = state_at(&map, at);
        assert!(!e.hole && !e.zero, "{at} should be data: {map:?}");
    }
    for at in [MIB, 3 * MIB, 6 * MIB - 1, 7 * MIB, 8 * MIB - 1] {
        let e = state_at(&map, at);
        assert!(e.hole && e.zero, "{at} should be a hole: {map:?}");
    }
}

/// 64 reads in flight at once on one connection, each checked.
async fn check_concurrent_reads(c: &Client, want: &[u8]) {
    let mut tasks = vec![];
    for i in 0..64u64 {
        let c = c.clone();
        let off = i * 61_441 % (want.len() as u64 - 70_000);
        let len = 4096 + (i as u32 * 997) % 60_000;
        tasks.push(tokio::spawn(
            async move { (off, len, c.read(off, len).await) },
        ));
    }
    for t in tasks {
        let (off, len, r) = t.await.unwrap();
        assert!(
            r.unwrap() == want[off as usize..(off + len as u64) as usize],
            "concurrent read at {off} len {len} differs"
        );
    }
}

// --- nbdkit ----------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbdkit_file_reports_size_and_flags() {
    bounded(async {
        let (dir, img, _) = dense_image(4 * MIB);
        let server = nbdkit_file(&[], dir, &img);
        let c = connect(&server).await;
        assert_eq!(c.size(), 4 * MIB);
        assert!(c.structured_replies());
        assert!(c.can_block_status());
        assert!(c.can_write() && c.can_flush() && c.can_trim() && c.can_zero());
        assert_ne!(c.transmission_flags() & nbd_server::proto::TF_HAS_FLAGS, 0);
        let bs = c.block_sizes();
        assert!(bs.minimum.is_power_of_two() && bs.maximum >= bs.minimum);
        c.disconnect().await.unwrap();
        assert!(c.is_closed());
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbdkit_reads_at_random_unaligned_offsets_equal_the_file() {
    bounded(async {
        let (dir, img, want) = dense_image(4 * MIB);
        let server = nbdkit_file(&[], dir, &img);
        let c = connect(&server).await;
        check_random_reads(&c, &want).await;
    })
    .await
}

/// With a 200 ms delay on every read, 64 reads finish in far less than
/// 64 x 200 ms only if they really were in flight together.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbdkit_serves_64_reads_in_flight_on_one_connection() {
    bounded(async {
        let (dir, img, want) = dense_image(4 * MIB);
        let img = img.to_str().unwrap().to_string();
        let server = nbdkit(
            &[
                "--threads=64",
                "--filter=delay",
                "file",
                &img,
                "rdelay=200ms",
            ],
            dir,
        );
        let c = connect(&server).await;
        let start = Instant::now();
        check_concurrent_reads(&c, &want).await;
        let took = start.elapsed();
        assert!(
            took < Duration::from_millis(64 * 200 / 4),
            "64 delayed reads took {took:?}: they were not in flight together"
        );
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbdkit_writes_flush_and_read_back() {
    bounded(async {
        let (dir, img, _) = dense_image(4 * MIB);
        let server = nbdkit_file(&[], dir, &img);
        let c = connect(&server).await;
        check_write_flush_read_back(&c).await;
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbdkit_trim_and_write_zeroes_read_back_as_zero() {
    bounded(async {
        let (dir, img, _) = dense_image(4 * MIB);
        let server = nbdkit_file(&[], dir, &img);
        let c = connect(&server).await;
        check_trim_and_zero(&c).await;
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbdkit_block_status_shows_the_hole_of_a_sparse_file() {
    bounded(async {
        let (dir, img) = sparse_image();
        let server = nbdkit_file(&[], dir, &img);
        let c = connect(&server).await;
        check_sparse_block_status(&c).await;
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbdkit_past_the_end_read_is_einval_and_the_connection_survives() {
    bounded(async {
        let (dir, img, want) = dense_image(MIB);
        let server = nbdkit_file(&[], dir, &img);
        let c = connect(&server).await;
        check_past_end_read(&c, &want).await;
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbdkit_unknown_export_is_a_clear_error() {
    bounded(async {
        let dir = tempfile::tempdir().unwrap();
        let server = nbdkit(
            &[
                "--filter=exportname",
                "memory",
                "1M",
                "exportname-strict=true",
                "exportname=disk",
            ],
            dir,
        );
        let good = Client::connect(&server.endpoint, "disk").await.unwrap();
        assert_eq!(good.size(), MIB);
        match Client::connect(&server.endpoint, "nope").await {
            Err(e @ ClientError::OptionRefused { option: "GO", .. }) => {
                let msg = e.to_string();
                assert!(msg.contains("NBD_REP_ERR"), "{msg}");
            }
            other => panic!("expected an option refusal, got {other:?}"),
        }
    })
    .await
}

/// `--no-sr`: no structured replies, so every reply is simple and block
/// status falls back to "all data".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbdkit_without_structured_replies_uses_simple_replies() {
    bounded(async {
        let (dir, img, want) = dense_image(4 * MIB);
        let server = nbdkit_file(&["--no-sr"], dir, &img);
        let c = connect(&server).await;
        assert!(!c.structured_replies());
        assert!(!c.can_block_status());
        check_random_reads(&c, &want).await;
        check_concurrent_reads(&c, &want).await;
        check_past_end_read(&c, &want).await;
        check_write_flush_read_back(&c).await;
        check_trim_and_zero(&c).await;
        assert_eq!(
            c.block_status(100, 4096).await.unwrap(),
            vec![Extent::data(4096)]
        );
        // Errors on writes come back as simple replies too.
        let e = c.write(c.size(), b"x", false).await.unwrap_err();
        assert_eq!(e.errno(), Some(Errno::NoSpc), "{e}");
        assert!(!c.is_closed());
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbdkit_over_tcp_with_a_uri() {
    bounded(async {
        let nbdkit = require_tool("nbdkit", "nbdkit");
        let dir = tempfile::tempdir().unwrap();
        // Pick a free port; nbdkit 1.32 cannot be told to choose one.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut cmd = Command::new(nbdkit);
        cmd.args(["-f", "-i", "127.0.0.1", "-p"])
            .arg(port.to_string())
            .args(["pattern", "8M"]);
        let endpoint = Endpoint::Tcp {
            host: "127.0.0.1".into(),
            port,
        };
        let _server = spawn_and_wait(cmd, endpoint, dir);
        let uri = NbdUri::parse(&format!("nbd://127.0.0.1:{port}/")).unwrap();
        let c = Client::connect_uri(&uri).await.unwrap();
        assert_eq!(c.size(), 8 * MIB);
        assert!(!c.can_write());
        // The pattern plugin stores each 8-byte big-endian offset.
        let got = c.read(8 * 1000, 16).await.unwrap();
        let mut want = 8000u64.to_be_bytes().to_vec();
        want.extend_from_slice(&8008u64.to_be_bytes());
        assert_eq!(got, want);
        let e = c.write(0, b"x", false).await.unwrap_err();
        assert!(matches!(e, ClientError::Unsupported { .. }), "{e}");
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unix_uri_connects_and_tls_to_a_plaintext_server_is_refused_not_downgraded() {
    bounded(async {
        let (dir, img, want) = dense_image(MIB);
        let server = nbdkit_file(&[], dir, &img);
        let Endpoint::Unix(sock) = &server.endpoint else {
            unreachable!()
        };
        let uri = NbdUri {
            endpoint: Endpoint::Unix(sock.clone()),
            export: String::new(),
            tls: false,
            tls_params: Default::default(),
        };
        let parsed = NbdUri::parse(&uri.to_string()).unwrap();
        let c = Client::connect_uri(&parsed).await.unwrap();
        assert_eq!(c.read(0, 64).await.unwrap(), want[..64]);
        // nbds:// to a server without TLS: STARTTLS is refused, and the
        // client stops there instead of going on in plaintext.
        let tls = NbdUri {
            tls: true,
            ..parsed
        };
        match Client::connect_uri(&tls).await {
            Err(e @ ClientError::TlsRefused { .. }) => {
                assert!(e.to_string().contains("server refused TLS"), "{e}")
            }
            other => panic!("expected TlsRefused, got {other:?}"),
        }
    })
    .await
}

// --- qemu-nbd ----------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_nbd_reports_size_and_flags() {
    bounded(async {
        let (dir, img, _) = dense_image(4 * MIB);
        let server = qemu_nbd(&[], dir, &img);
        let c = connect(&server).await;
        assert_eq!(c.size(), 4 * MIB);
        assert!(c.structured_replies() && c.can_block_status());
        assert!(c.can_write() && c.can_flush() && c.can_zero() && c.can_trim());
        c.disconnect().await.unwrap();
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_nbd_reads_equal_the_file_also_64_in_flight() {
    bounded(async {
        let (dir, img, want) = dense_image(4 * MIB);
        let server = qemu_nbd(&[], dir, &img);
        let c = connect(&server).await;
        check_random_reads(&c, &want).await;
        check_concurrent_reads(&c, &want).await;
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_nbd_writes_trims_and_zeroes_read_back() {
    bounded(async {
        let (dir, img, _) = dense_image(4 * MIB);
        // Without --discard=unmap qemu-nbd accepts trims and ignores them.
        let server = qemu_nbd(&["--discard=unmap"], dir, &img);
        let c = connect(&server).await;
        check_write_flush_read_back(&c).await;
        check_trim_and_zero(&c).await;
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_nbd_block_status_shows_the_hole_of_a_sparse_file() {
    bounded(async {
        let (dir, img) = sparse_image();
        let server = qemu_nbd(&[], dir, &img);
        let c = connect(&server).await;
        check_sparse_block_status(&c).await;
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_nbd_past_the_end_read_is_einval_and_the_connection_survives() {
    bounded(async {
        let (dir, img, want) = dense_image(MIB);
        let server = qemu_nbd(&[], dir, &img);
        let c = connect(&server).await;
        check_past_end_read(&c, &want).await;
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_nbd_unknown_export_is_a_clear_error() {
    bounded(async {
        let (dir, img, _) = dense_image(MIB);
        let server = qemu_nbd(&["--export-name=disk"], dir, &img);
        assert!(Client::connect(&server.endpoint, "disk").await.is_ok());
        match Client::connect(&server.endpoint, "nope").await {
            Err(ClientError::OptionRefused {
                option: "GO",
                reply,
                message,
                ..
            }) => {
                assert_eq!(reply, "NBD_REP_ERR_UNKNOWN");
                assert!(!message.is_empty(), "qemu-nbd explains the refusal");
            }
            other => panic!("expected NBD_REP_ERR_UNKNOWN, got {other:?}"),
        }
    })
    .await
}
