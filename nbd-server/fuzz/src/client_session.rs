//! `client_replies`: the NBD client facing a server of fuzzer bytes.
//!
//! The input is everything the server sends, start to end: the greeting,
//! option replies, then transmission replies (simple replies and
//! structured chunks: data, holes, block status, errors). It is written
//! into one end of a unix socketpair; the client negotiates on the other
//! end and, if that succeeds, runs a fixed sequence of requests
//! ([`requests`]), so the cookies the replies must name are deterministic
//! and the seeds recorded from a real server ([`record`]) replay whole.
//! After the input the server side sends end-of-file. The client must
//! never panic, and every call must end (the clock is paused, so a client
//! waiting forever trips [`CLIENT_LIMIT`] at once); errors are its
//! business.

use std::sync::Arc;
use std::time::Duration;

use nbd_server::client::Client;
use nbd_server::server::{Server, Shutdown};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

use crate::memdisk::MemDisk;

/// Longer than any timer the client has.
pub const CLIENT_LIMIT: Duration = Duration::from_secs(600);

/// The requests of one session, in order; results are ignored.
async fn requests(c: &Client) {
    let _ = c.read(0, 4096).await;
    let _ = c.read(4096, 8192).await;
    if c.can_block_status() {
        let _ = c.block_status(0, 1 << 20).await;
    }
    if c.can_write() {
        let _ = c.write(512, &[0x5a; 1024], false).await;
    }
    if c.can_flush() {
        let _ = c.flush().await;
    }
    // Three in flight at once: replies may come in any order.
    let _ = tokio::join!(
        c.read(0, 512),
        c.read((1 << 20) - 512, 512),
        c.read(65536, 16384)
    );
    let _ = c.disconnect().await;
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .expect("tokio runtime")
}

/// Run the client against `input` as the server's bytes; panics on a
/// client panic or a call that does not end.
pub fn run(input: &[u8]) {
    let input = input.to_vec();
    runtime().block_on(async move {
        let (ours, theirs) = UnixStream::pair().expect("socketpair");
        let (mut rd, mut wr) = ours.into_split();
        let server = tokio::spawn(async move {
            let _ = wr.write_all(&input).await;
            // Then end-of-file (a server stalling with the socket open is
            // for the caller's timeouts, not the client's parser); keep
            // reading and dropping what the client sends, so it never
            // blocks on a full socket.
            let _ = wr.shutdown().await;
            let mut buf = vec![0u8; 65536];
            while let Ok(n) = rd.read(&mut buf).await {
                if n == 0 {
                    break;
                }
            }
        });
        let client = async move {
            if let Ok(c) = Client::over_unix_stream(theirs, "disk").await {
                requests(&c).await;
            }
        };
        if tokio::time::timeout(CLIENT_LIMIT, client).await.is_err() {
            panic!("a client call did not end within {CLIENT_LIMIT:?}");
        }
        server.abort();
    });
}

/// The bytes a real server (ours, over the 1 MiB memory disk) sends to the
/// client running [`requests`]: a seed that replays the whole session.
pub fn record() -> Vec<u8> {
    runtime().block_on(async move {
        let (client_end, proxy_end) = UnixStream::pair().expect("socketpair");
        let (proxy_side, server_side) = tokio::io::duplex(1 << 20);
        let srv = Server::new(vec![nbd_server::server::Export {
            name: "disk".into(),
            description: None,
            device: MemDisk::new(true),
        }]);
        let session: tokio::task::JoinHandle<()> = tokio::spawn({
            let srv = Arc::clone(&srv);
            async move {
                srv.serve_stream(server_side, "seed".into(), Shutdown::new())
                    .await
            }
        });
        let (mut pr, mut pw) = proxy_end.into_split();
        let (mut sr, mut sw) = tokio::io::split(proxy_side);
        let up = tokio::spawn(async move {
            let _ = tokio::io::copy(&mut pr, &mut sw).await;
            let _ = sw.shutdown().await;
        });
        let down = tokio::spawn(async move {
            let mut seen = Vec::new();
            let mut buf = vec![0u8; 65536];
            while let Ok(n) = sr.read(&mut buf).await {
                if n == 0 {
                    break;
                }
                seen.extend_from_slice(&buf[..n]);
                if pw.write_all(&buf[..n]).await.is_err() {
                    break;
                }
            }
            seen
        });
        let c = Client::over_unix_stream(client_end, "disk")
            .await
            .expect("client against our own server");
        requests(&c).await;
        drop(c);
        let _ = up.await;
        let _ = session.await;
        down.await.expect("recorder")
    })
}
