//! A TCP proxy on `127.0.0.1:0` in front of an NBD server, whose every
//! connection the test can cut at will: the network failing under a
//! migration.
//!
//! Plain threads: one accepts, two pump each connection. [`Proxy::cut`]
//! shuts down both sockets of every open connection (the client sees EOF
//! or a reset, as when a link drops) and keeps accepting new ones;
//! [`Proxy::refuse`] makes it close every new connection at once (the
//! source host is down) until it is called again with `false`;
//! [`Proxy::hold`] stops forwarding bytes either way while the sockets stay
//! open (a stalled link: nothing arrives, nothing fails) until released.

use std::io;
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;

struct Shared {
    upstream: SocketAddr,
    open: Mutex<Vec<TcpStream>>,
    stop: AtomicBool,
    refusing: AtomicBool,
    holding: AtomicBool,
    accepted: AtomicU64,
    bytes: AtomicU64,
}

/// A running proxy; stops and cuts everything on drop.
pub struct Proxy {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    acceptor: Option<thread::JoinHandle<()>>,
}

impl Proxy {
    /// `stream export` of `path` over TCP with a proxy in front of it: the
    /// source whose connections a test cuts, holds or refuses. Stop the
    /// proxy before the export (drop order: declare the export first).
    pub fn in_front_of_export(path: &std::path::Path) -> (crate::server::Server, Proxy) {
        let export = crate::Export::new(path).spawn();
        let crate::server::Addr::Tcp(upstream) = export.addr else {
            panic!("stream export on TCP printed {}", export.uri);
        };
        let proxy = Proxy::start(upstream);
        (export, proxy)
    }

    /// Listens on `127.0.0.1:0` and forwards every connection to `upstream`.
    pub fn start(upstream: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind proxy");
        let addr = listener.local_addr().expect("proxy address");
        let shared = Arc::new(Shared {
            upstream,
            open: Mutex::new(Vec::new()),
            stop: AtomicBool::new(false),
            refusing: AtomicBool::new(false),
            holding: AtomicBool::new(false),
            accepted: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
        });
        let s = shared.clone();
        let acceptor = thread::spawn(move || {
            for client in listener.incoming() {
                if s.stop.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(client) = client else { continue };
                if s.refusing.load(Ordering::SeqCst) {
                    let _ = client.shutdown(Shutdown::Both);
                    continue;
                }
                if let Err(e) = forward(&s, client) {
                    eprintln!("proxy: cannot forward a connection: {e}");
                }
            }
        });
        Proxy {
            addr,
            shared,
            acceptor: Some(acceptor),
        }
    }

    /// `nbd://127.0.0.1:PORT/NAME` through the proxy.
    pub fn uri(&self, name: &str) -> String {
        format!("nbd://{}/{name}", self.addr)
    }

    /// The port it listens on (127.0.0.1).
    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Cuts every open connection; returns how many there were.
    pub fn cut(&self) -> usize {
        let mut open = self.shared.open.lock().expect("poisoned");
        let n = open.len() / 2;
        for s in open.drain(..) {
            let _ = s.shutdown(Shutdown::Both);
        }
        n
    }

    /// While `yes`, every new connection is closed at once and nothing is
    /// forwarded; `refuse(true)` also cuts the open ones.
    pub fn refuse(&self, yes: bool) {
        self.shared.refusing.store(yes, Ordering::SeqCst);
        if yes {
            self.cut();
        }
    }

    /// While `yes`, bytes read from either side are kept, not forwarded
    /// (and new connections get no greeting); `hold(false)` sends them on.
    pub fn hold(&self, yes: bool) {
        self.shared.holding.store(yes, Ordering::SeqCst);
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> u64 {
        self.shared.accepted.load(Ordering::SeqCst)
    }

    /// Bytes forwarded so far, both ways.
    pub fn bytes(&self) -> u64 {
        self.shared.bytes.load(Ordering::SeqCst)
    }
}

fn forward(s: &Arc<Shared>, client: TcpStream) -> io::Result<()> {
    let server = TcpStream::connect(s.upstream)?;
    client.set_nodelay(true)?;
    server.set_nodelay(true)?;
    {
        let mut open = s.open.lock().expect("poisoned");
        open.push(client.try_clone()?);
        open.push(server.try_clone()?);
    }
    s.accepted.fetch_add(1, Ordering::SeqCst);
    pump(s, client.try_clone()?, server.try_clone()?);
    pump(s, server, client);
    Ok(())
}

/// Copies `from` to `to` until either ends, then shuts both down.
fn pump(s: &Arc<Shared>, mut from: TcpStream, mut to: TcpStream) {
    let s = s.clone();
    thread::spawn(move || {
        let mut buf = vec![0; 256 * 1024];
        loop {
            let n = match io::Read::read(&mut from, &mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            // A stall: keep the bytes until released (or the proxy stops).
            while s.holding.load(Ordering::SeqCst) && !s.stop.load(Ordering::SeqCst) {
                thread::sleep(std::time::Duration::from_millis(5));
            }
            if io::Write::write_all(&mut to, &buf[..n]).is_err() {
                break;
            }
            s.bytes.fetch_add(n as u64, Ordering::SeqCst);
        }
        let _ = from.shutdown(Shutdown::Both);
        let _ = to.shutdown(Shutdown::Both);
    });
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        // Wake the acceptor so it sees `stop`.
        let _ = TcpStream::connect(self.addr);
        self.cut();
        if let Some(a) = self.acceptor.take() {
            let _ = a.join();
        }
    }
}
