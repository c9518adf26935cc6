//! `NbdSource` against a real server, nbdkit 1.32 (file plugin; delay,
//! error and blocksize-policy filters), through a TCP proxy the test
//! controls: it can cut every connection, refuse new ones, stall, or point
//! at another server.
//!
//! Each test starts its own nbdkit on a unix socket in a fresh temporary
//! directory, waits for it by polling `connect` against a deadline, runs
//! under a `tokio::time::timeout`, and kills the server it started through a
//! guard (by PID, then reaped). Conditions are polled against deadlines,
//! never awaited with fixed sleeps. A missing nbdkit fails the test with the
//! Debian package to install.

#![allow(
    clippy::cast_possible_truncation,
    reason = "test fixtures: offsets and sizes of small in-memory disks, byte patterns"
)]

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use lazy_fetch::source::{Class, Health, Source};
use nbd_source::{NbdOptions, NbdSource, errno_of};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, UnixStream};
use tokio::sync::watch;
use tokio::task::JoinSet;

/// Bound for one whole test.
const TEST_TIMEOUT: Duration = Duration::from_secs(90);
/// Bound for a server to start listening.
const START_TIMEOUT: Duration = Duration::from_secs(15);
const KIB: usize = 1 << 10;
const MIB: usize = 1 << 20;

// ---------------------------------------------------------------------------
// nbdkit

/// An nbdkit this test started; killed by PID and reaped on drop.
struct Nbdkit {
    child: Child,
    sock: PathBuf,
    /// Holds the socket and image; removed after the server is gone.
    _dir: tempfile::TempDir,
}

impl Drop for Nbdkit {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `nbdkit -U SOCK -f --exit-with-parent ARGS... file IMAGE PARAMS...`
/// serving `content` (written sparsely: all-zero 64 KiB blocks are holes).
fn nbdkit(args: &[&str], params: &[&str], content: &[u8]) -> Nbdkit {
    if let Err(e) = Command::new("nbdkit")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
    {
        panic!(
            "`nbdkit` is needed by this test but cannot be run ({e}); install the Debian package `nbdkit`"
        );
    }
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.img");
    write_sparse(&image, content);
    let sock = dir.path().join("nbd.sock");
    let mut cmd = Command::new("nbdkit");
    cmd.arg("-U")
        .arg(&sock)
        .args(["-f", "--exit-with-parent"])
        .args(args)
        .arg("file")
        .arg(&image)
        .args(params)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("spawning {cmd:?}: {e}"));
    let mut guard = Nbdkit {
        child,
        sock,
        _dir: dir,
    };
    let deadline = Instant::now() + START_TIMEOUT;
    while std::os::unix::net::UnixStream::connect(&guard.sock).is_err() {
        if let Some(status) = guard.child.try_wait().unwrap() {
            let mut err = String::new();
            if let Some(mut e) = guard.child.stderr.take() {
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
    guard
}

fn write_sparse(path: &Path, content: &[u8]) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::create(path).unwrap();
    f.set_len(content.len() as u64).unwrap();
    for (i, block) in content.chunks(64 * KIB).enumerate() {
        if block.iter().any(|&b| b != 0) {
            f.write_all_at(block, (i * 64 * KIB) as u64).unwrap();
        }
    }
    f.sync_all().unwrap();
}

fn unix_uri(server: &Nbdkit) -> String {
    format!("nbd+unix:///?socket={}", server.sock.display())
}

/// Bytes that differ at every offset (so a misplaced read shows).
fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(len);
    v
}

// ---------------------------------------------------------------------------
// The proxy

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    /// Forward bytes both ways.
    Forward,
    /// Accept and close at once (new connections fail their handshake).
    Refuse,
    /// Accept and connect, but forward nothing until the mode changes.
    Stall,
    /// Forward requests, hold the server's replies until the mode changes:
    /// requests stay in flight without the server sleeping on them (nbdkit
    /// 1.32's delay filter aborts the server, `raw_send_socket: Assertion
    /// sock >= 0`, when a connection closes during its sleep).
    HoldReplies,
}

/// A TCP proxy on 127.0.0.1:0 in front of an nbdkit unix socket.
struct Proxy {
    addr: SocketAddr,
    mode: watch::Sender<Mode>,
    backend: Arc<Mutex<PathBuf>>,
    conns: Arc<Mutex<JoinSet<()>>>,
    /// Bytes forwarded towards the server (requests).
    to_server: Arc<AtomicU64>,
    accept: tokio::task::JoinHandle<()>,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.cut();
    }
}

impl Proxy {
    async fn start(backend: &Path) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (mode, _) = watch::channel(Mode::Forward);
        let backend = Arc::new(Mutex::new(backend.to_path_buf()));
        let conns = Arc::new(Mutex::new(JoinSet::new()));
        let to_server = Arc::new(AtomicU64::new(0));
        let accept = tokio::spawn({
            let (mode, backend, conns, to_server) = (
                mode.clone(),
                backend.clone(),
                conns.clone(),
                to_server.clone(),
            );
            async move {
                loop {
                    let Ok((tcp, _)) = listener.accept().await else {
                        return;
                    };
                    if *mode.borrow() == Mode::Refuse {
                        drop(tcp);
                        continue;
                    }
                    let path = backend.lock().unwrap().clone();
                    let mode = mode.subscribe();
                    let to_server = to_server.clone();
                    conns.lock().unwrap().spawn(async move {
                        let Ok(unix) = UnixStream::connect(&path).await else {
                            return;
                        };
                        let (cr, cw) = tcp.into_split();
                        let (sr, sw) = unix.into_split();
                        tokio::select! {
                            _ = pump(cr, sw, mode.clone(), Some(to_server), false) => {}
                            _ = pump(sr, cw, mode, None, true) => {}
                        }
                    });
                }
            }
        });
        Proxy {
            addr,
            mode,
            backend,
            conns,
            to_server,
            accept,
        }
    }

    fn uri(&self) -> String {
        format!("nbd://{}/", self.addr)
    }

    fn set_mode(&self, m: Mode) {
        self.mode.send_replace(m);
    }

    /// Close every connection open now (both sides).
    fn cut(&self) {
        self.conns.lock().unwrap().abort_all();
    }

    fn point_at(&self, backend: &Path) {
        *self.backend.lock().unwrap() = backend.to_path_buf();
    }
}

async fn pump(
    mut r: impl AsyncReadExt + Unpin,
    mut w: impl AsyncWriteExt + Unpin,
    mut mode: watch::Receiver<Mode>,
    counter: Option<Arc<AtomicU64>>,
    replies: bool,
) {
    let mut buf = vec![0u8; 256 * KIB];
    loop {
        let n = match r.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        let held = |m: &Mode| *m == Mode::Stall || (replies && *m == Mode::HoldReplies);
        if mode.wait_for(|m| !held(m)).await.is_err() {
            return;
        }
        if w.write_all(&buf[..n]).await.is_err() {
            return;
        }
        if let Some(c) = &counter {
            c.fetch_add(n as u64, Ordering::Relaxed);
        }
    }
}

// ---------------------------------------------------------------------------
// Helpers

async fn bounded<F: Future>(f: F) -> F::Output {
    // RUST_LOG=debug shows the source's reconnects when a test fails.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    tokio::time::timeout(TEST_TIMEOUT, f)
        .await
        .expect("test exceeded its time bound")
}

/// Poll `cond` every 10 ms until it holds or `within` passes.
async fn wait_until(what: &str, within: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !cond() {
        assert!(Instant::now() < deadline, "{what}: not within {within:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn short_windows(window: Duration) -> NbdOptions {
    NbdOptions {
        foreground_retry_window: window,
        background_retry_window: window,
        connect_timeout: Duration::from_secs(2),
        backoff_max: Duration::from_millis(400),
        ..NbdOptions::default()
    }
}

fn slice(data: &[u8], offset: u64, len: usize) -> &[u8] {
    &data[offset as usize..offset as usize + len]
}

// ---------------------------------------------------------------------------
// Tests

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_foreground_and_background_reads_equal_the_file() {
    bounded(async {
        let data = pattern(16 * MIB, 7);
        let server = nbdkit(&[], &[], &data);
        let src = Arc::new(
            NbdSource::connect(&unix_uri(&server), NbdOptions::default())
                .await
                .unwrap(),
        );
        let id = src.id();
        assert_eq!(id.kind, "nbd");
        assert_eq!(id.size, data.len() as u64);
        assert_eq!(
            id.location,
            unix_uri(&server),
            "location is the URI, stable"
        );

        let data = Arc::new(data);
        let mut tasks = JoinSet::new();
        let mut seed = 99u64;
        for i in 0..64 {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let (class, len) = if i % 2 == 0 {
                (Class::Foreground, 64 * KIB)
            } else {
                (Class::Background, MIB)
            };
            // Any offset, not only aligned ones.
            let offset = (seed >> 11) % (data.len() - len) as u64;
            let (src, data) = (src.clone(), data.clone());
            tasks.spawn(async move {
                let got = src.read(offset, len, class).await.unwrap();
                assert!(
                    got == slice(&data, offset, len),
                    "{class:?} read of {len} at {offset} differs from the file"
                );
            });
        }
        while let Some(r) = tasks.join_next().await {
            r.unwrap();
        }
        assert_eq!(src.health(), Health::Up);
        assert_eq!(src.reconnects(), 0);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_longer_than_the_server_maximum_are_split() {
    bounded(async {
        let data = pattern(4 * MIB, 3);
        let server = nbdkit(
            &["--filter=blocksize-policy"],
            &["blocksize-maximum=64K", "blocksize-error-policy=error"],
            &data,
        );
        let src = NbdSource::connect(&unix_uri(&server), NbdOptions::default())
            .await
            .unwrap();
        let got = src.read(12345, 3 * MIB, Class::Background).await.unwrap();
        assert!(got == slice(&data, 12345, 3 * MIB));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn block_status_shows_the_holes_of_a_sparse_file() {
    bounded(async {
        // 4 MiB: hole, 1 MiB of data, hole.
        let mut data = vec![0u8; 4 * MIB];
        data[MIB..2 * MIB].copy_from_slice(&pattern(MIB, 5));
        let server = nbdkit(&[], &[], &data);
        let src = NbdSource::connect(&unix_uri(&server), NbdOptions::default())
            .await
            .unwrap();

        // Ask until the whole disk is covered, as the engine does.
        let mut map = Vec::new();
        let mut at = 0u64;
        while at < data.len() as u64 {
            let extents = src
                .block_status(at, data.len() as u64 - at)
                .await
                .unwrap()
                .expect("nbdkit's file plugin reports allocation");
            assert!(!extents.is_empty());
            for e in extents {
                map.push((at, e.length, e.zero));
                at += e.length;
            }
        }
        let zero_at = |off: u64| {
            map.iter()
                .find(|(s, l, _)| (*s..s + l).contains(&off))
                .map(|x| x.2)
                .unwrap()
        };
        assert!(zero_at(0), "the first MiB is a hole: {map:?}");
        assert!(!zero_at(MIB as u64), "the second MiB is data: {map:?}");
        assert!(!zero_at(2 * MIB as u64 - 1), "{map:?}");
        assert!(zero_at(3 * MIB as u64), "the tail is a hole: {map:?}");

        // A length beyond u32 is capped, not refused.
        let big = src.block_status(0, 1 << 40).await.unwrap().unwrap();
        assert!(!big.is_empty());
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_cut_mid_stream_is_survived() {
    bounded(async {
        let data = Arc::new(pattern(34 * MIB, 11));
        // One thread per connection: nbdkit 1.32 can abort when a cut
        // connection is closed by one of its threads while another still
        // sends on it (see `Mode::HoldReplies`).
        let server = nbdkit(&["-t", "1"], &[], &data);
        let proxy = Proxy::start(&server.sock).await;
        let src = Arc::new(
            NbdSource::connect(&proxy.uri(), short_windows(Duration::from_secs(20)))
                .await
                .unwrap(),
        );

        let sent = proxy.to_server.load(Ordering::Relaxed);
        proxy.set_mode(Mode::HoldReplies);
        let mut tasks = JoinSet::new();
        for i in 0..32u64 {
            let (class, len) = if i % 4 == 0 {
                (Class::Foreground, 64 * KIB)
            } else {
                (Class::Background, MIB)
            };
            let offset = i * MIB as u64 + 4096 * i;
            let (src, data) = (src.clone(), data.clone());
            tasks.spawn(async move {
                let t = Instant::now();
                let got = match src.read(offset, len, class).await {
                    Ok(got) => got,
                    Err(e) => panic!(
                        "{class:?} read at {offset} failed after {:?} (health {:?}, {} reconnects): {e}",
                        t.elapsed(),
                        src.health(),
                        src.reconnects()
                    ),
                };
                assert!(got == slice(&data, offset, len), "read at {offset} differs");
            });
        }
        // Cut once most requests reached the server and none is answered:
        // the replies are held by the proxy, so all are in flight.
        wait_until("requests in flight", Duration::from_secs(10), || {
            proxy.to_server.load(Ordering::Relaxed) > sent + 28 * 20
        })
        .await;
        proxy.cut();
        proxy.set_mode(Mode::Forward);
        while let Some(r) = tasks.join_next().await {
            r.unwrap();
        }
        assert!(src.reconnects() > 0, "the cut forced reconnects");
        // Reads after the cut are right too.
        let got = src.read(777, 64 * KIB, Class::Foreground).await.unwrap();
        assert!(got == slice(&data, 777, 64 * KIB));
        wait_until("health back up", Duration::from_secs(10), || {
            src.health() == Health::Up
        })
        .await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn source_down_longer_than_the_window_fails_with_eio_then_recovers() {
    bounded(async {
        let data = pattern(4 * MIB, 13);
        let server = nbdkit(&[], &[], &data);
        let proxy = Proxy::start(&server.sock).await;
        let window = Duration::from_millis(1500);
        let src = NbdSource::connect(&proxy.uri(), short_windows(window))
            .await
            .unwrap();
        src.read(0, 64 * KIB, Class::Foreground).await.unwrap();

        proxy.set_mode(Mode::Refuse);
        proxy.cut();
        let t = Instant::now();
        let err = src
            .read(MIB as u64, 64 * KIB, Class::Foreground)
            .await
            .expect_err("the source is down");
        let took = t.elapsed();
        assert_eq!(errno_of(&err), Some(libc::EIO), "{err}");
        assert!(
            took >= window - Duration::from_millis(100) && took < window + Duration::from_secs(2),
            "failed after {took:?}, window {window:?}"
        );
        let msg = err.to_string();
        assert!(msg.contains("unreachable since"), "{msg}");
        assert!(msg.contains(&proxy.uri()), "{msg}");
        let bg = src
            .read(0, MIB, Class::Background)
            .await
            .expect_err("background reads fail too");
        assert_eq!(errno_of(&bg), Some(libc::EIO), "{bg}");
        match src.health() {
            Health::Down(why) => assert!(why.contains("unreachable since"), "{why}"),
            h => panic!("health should be down: {h:?}"),
        }

        proxy.set_mode(Mode::Forward);
        wait_until("health back up", Duration::from_secs(10), || {
            src.health() == Health::Up
        })
        .await;
        let got = src
            .read(MIB as u64, 64 * KIB, Class::Foreground)
            .await
            .unwrap();
        assert!(got == slice(&data, MIB as u64, 64 * KIB));
        assert!(src.reconnects() > 0);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lazy_returns_at_once_while_down_and_reads_once_up() {
    bounded(async {
        let data = pattern(4 * MIB, 17);
        let server = nbdkit(&[], &[], &data);
        let proxy = Proxy::start(&server.sock).await;
        proxy.set_mode(Mode::Refuse);

        let t = Instant::now();
        let src = Arc::new(
            NbdSource::lazy(
                &proxy.uri(),
                data.len() as u64,
                short_windows(Duration::from_secs(30)),
            )
            .unwrap(),
        );
        assert!(t.elapsed() < Duration::from_millis(100), "{:?}", t.elapsed());
        assert_eq!(src.id().size, data.len() as u64);
        assert!(
            matches!(src.health(), Health::Reconnecting(_)),
            "{:?}",
            src.health()
        );

        let reader = tokio::spawn({
            let src = src.clone();
            async move { src.read(2 * MIB as u64, 64 * KIB, Class::Foreground).await }
        });
        // Let it wait on the refused source for a few attempts.
        wait_until("a reconnect attempt failed", Duration::from_secs(10), || {
            matches!(src.health(), Health::Reconnecting(ref why) if !why.contains("not connected yet"))
        })
        .await;
        assert!(!reader.is_finished());
        proxy.set_mode(Mode::Forward);
        let got = reader.await.unwrap().unwrap();
        assert!(got == slice(&data, 2 * MIB as u64, 64 * KIB));
        wait_until("health up", Duration::from_secs(10), || src.health() == Health::Up).await;
        assert_eq!(src.reconnects(), 0, "a first connection is not a reconnect");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_of_another_size_at_reconnect_is_refused() {
    bounded(async {
        let original = pattern(4 * MIB, 19);
        let other = pattern(8 * MIB, 23);
        let a = nbdkit(&[], &[], &original);
        let b = nbdkit(&[], &[], &other);
        let proxy = Proxy::start(&a.sock).await;
        let src = NbdSource::connect(&proxy.uri(), short_windows(Duration::from_secs(30)))
            .await
            .unwrap();
        src.read(0, 64 * KIB, Class::Foreground).await.unwrap();

        proxy.point_at(&b.sock);
        proxy.cut();
        wait_until("health down", Duration::from_secs(10), || {
            matches!(src.health(), Health::Down(_))
        })
        .await;
        let Health::Down(why) = src.health() else {
            unreachable!()
        };
        assert!(why.contains("8388608") && why.contains("4194304"), "{why}");

        let t = Instant::now();
        for class in [Class::Foreground, Class::Background] {
            let err = src
                .read(0, 64 * KIB, class)
                .await
                .expect_err("never data from another disk");
            assert_eq!(errno_of(&err), Some(libc::EIO), "{err}");
            assert!(err.to_string().contains("different disk"), "{err}");
        }
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "refused at once, not after the window: {:?}",
            t.elapsed()
        );

        // The right disk back: served again.
        proxy.point_at(&a.sock);
        wait_until("health up", Duration::from_secs(15), || {
            src.health() == Health::Up
        })
        .await;
        let got = src
            .read(MIB as u64, 64 * KIB, Class::Foreground)
            .await
            .unwrap();
        assert!(got == slice(&original, MIB as u64, 64 * KIB));

        // And a lazy source resumed against the wrong disk never serves it.
        let lazy = NbdSource::lazy(
            &unix_uri(&b),
            original.len() as u64,
            short_windows(Duration::from_secs(30)),
        )
        .unwrap();
        let err = lazy
            .read(0, 64 * KIB, Class::Foreground)
            .await
            .expect_err("another disk");
        assert_eq!(errno_of(&err), Some(libc::EIO), "{err}");
        assert!(matches!(lazy.health(), Health::Down(_)));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreground_reads_do_not_queue_behind_a_background_flood() {
    bounded(async {
        let data = Arc::new(pattern(48 * MIB, 29));
        let delay = Duration::from_millis(200);
        // Two server threads per connection: 40 background reads over two
        // connections take ten delays; a foreground read that shared their
        // connections would wait for most of them.
        let server = nbdkit(&["--filter=delay", "-t", "2"], &["delay-read=200ms"], &data);
        // Through the proxy, to see when the flood is on the wire.
        let proxy = Proxy::start(&server.sock).await;
        let src = Arc::new(
            NbdSource::connect(&proxy.uri(), NbdOptions::default())
                .await
                .unwrap(),
        );
        let sent = proxy.to_server.load(Ordering::Relaxed);
        let flood_started = Instant::now();
        let mut flood = JoinSet::new();
        for i in 0..40u64 {
            let src = src.clone();
            flood.spawn(async move { src.read(i * MIB as u64, MIB, Class::Background).await });
        }
        // Every background request (28 bytes each) has reached the server.
        wait_until("the flood is sent", Duration::from_secs(10), || {
            proxy.to_server.load(Ordering::Relaxed) >= sent + 40 * 28
        })
        .await;
        let t = Instant::now();
        let got = src
            .read(45 * MIB as u64, 64 * KIB, Class::Foreground)
            .await
            .unwrap();
        let took = t.elapsed();
        assert!(got == slice(&data, 45 * MIB as u64, 64 * KIB));
        let mut pending = flood.len();
        pending -= std::iter::from_fn(|| flood.try_join_next()).count();
        assert!(
            took < delay * 4,
            "foreground read took {took:?} with a {delay:?} delay per read"
        );
        assert!(
            pending > 0,
            "the flood was still running when the foreground read returned"
        );
        while let Some(r) = flood.join_next().await {
            r.unwrap().unwrap();
        }
        assert!(flood_started.elapsed() >= delay * 5, "the flood did queue");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_source_fails_connect_in_time_naming_the_uri() {
    bounded(async {
        let data = pattern(MIB, 31);
        let server = nbdkit(&[], &[], &data);
        let proxy = Proxy::start(&server.sock).await;
        let opts = NbdOptions {
            connect_timeout: Duration::from_millis(500),
            ..NbdOptions::default()
        };

        // Connections refused during the handshake.
        proxy.set_mode(Mode::Refuse);
        let Err(e) = NbdSource::connect(&proxy.uri(), opts.clone()).await else {
            panic!("connect must fail")
        };
        assert!(e.to_string().contains(&proxy.uri()), "{e}");

        // A server that accepts but never answers: bounded by the timeout.
        proxy.set_mode(Mode::Stall);
        let t = Instant::now();
        let Err(e) = NbdSource::connect(&proxy.uri(), opts.clone()).await else {
            panic!("connect must fail")
        };
        assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
        assert!(e.to_string().contains(&proxy.uri()), "{e}");

        // TLS credentials that cannot be loaded fail before any connect.
        let Err(e) =
            NbdSource::connect("nbds://127.0.0.1/x?tls-psk-file=/nonexistent.psk", opts).await
        else {
            panic!("a missing PSK file must be refused")
        };
        assert!(e.to_string().contains("PSK file"), "{e}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_request_errors_are_returned_at_once() {
    bounded(async {
        let data = pattern(4 * MIB, 37);
        let flag_dir = tempfile::tempdir().unwrap();
        let flag = flag_dir.path().join("inject");
        let flag_param = format!("error-file={}", flag.display());
        let server = nbdkit(
            &["--filter=error"],
            &["error=EIO", "error-pread-rate=100%", &flag_param],
            &data,
        );
        let src = NbdSource::connect(&unix_uri(&server), NbdOptions::default())
            .await
            .unwrap();

        std::fs::write(&flag, b"").unwrap();
        let t = Instant::now();
        let err = src
            .read(0, 64 * KIB, Class::Foreground)
            .await
            .expect_err("injected EIO");
        assert_eq!(errno_of(&err), Some(libc::EIO), "{err}");
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "a server error is not retried for the whole window: {:?}",
            t.elapsed()
        );
        assert_eq!(src.reconnects(), 0, "a request error keeps the connection");

        // Beyond the end: EINVAL without a round trip.
        let err = src
            .read(4 * MIB as u64 - 10, 64 * KIB, Class::Foreground)
            .await
            .expect_err("beyond the end");
        assert_eq!(errno_of(&err), Some(libc::EINVAL), "{err}");

        std::fs::remove_file(&flag).unwrap();
        let got = src.read(0, 64 * KIB, Class::Foreground).await.unwrap();
        assert!(got == slice(&data, 0, 64 * KIB));
        assert_eq!(src.health(), Health::Up);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_connection_is_abandoned_and_the_read_sent_again() {
    bounded(async {
        let data = pattern(4 * MIB, 41);
        let server = nbdkit(&[], &[], &data);
        let proxy = Proxy::start(&server.sock).await;
        let opts = NbdOptions {
            stall_timeout: Duration::from_millis(300),
            ..short_windows(Duration::from_secs(20))
        };
        let src = Arc::new(NbdSource::connect(&proxy.uri(), opts).await.unwrap());
        src.read(0, 64 * KIB, Class::Foreground).await.unwrap();

        proxy.set_mode(Mode::Stall);
        let reader = tokio::spawn({
            let src = src.clone();
            async move { src.read(3 * MIB as u64, 64 * KIB, Class::Foreground).await }
        });
        wait_until(
            "the stall is noticed",
            Duration::from_secs(10),
            || matches!(src.health(), Health::Reconnecting(ref why) if why.contains("no reply")),
        )
        .await;
        assert!(!reader.is_finished());
        proxy.set_mode(Mode::Forward);
        let got = reader.await.unwrap().unwrap();
        assert!(got == slice(&data, 3 * MIB as u64, 64 * KIB));
        assert!(src.reconnects() > 0);
    })
    .await;
}
