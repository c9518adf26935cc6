//! `handshake_and_requests`: one whole client session of fuzzer bytes.
//!
//! The input is everything the client sends, start to end: the client
//! flags, options, then transmission requests and write payloads. It is
//! written into one end of a `tokio::io::duplex`, after which the client
//! closes its write half; whatever the server answers is read and
//! discarded, so the server never blocks on a full pipe. The server must:
//!
//! - never panic (a panic in a spawned connection task is re-raised here);
//! - end the session once the input is exhausted: the runtime's clock is
//!   paused and auto-advances when every task is idle, so a server waiting
//!   for bytes that will never come trips the [`SESSION_LIMIT`] at once
//!   instead of slowing the fuzzer; a busy loop is left to libFuzzer's
//!   `-timeout`;
//! - close its end when done, so the client reader sees end-of-file.

use std::sync::Arc;
use std::time::Duration;

use nbd_server::server::{Export, Server, Shutdown};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::memdisk::MemDisk;

/// Longer than any timer the server has (the 30 s handshake limit), so
/// only a session that would never end trips it.
pub const SESSION_LIMIT: Duration = Duration::from_secs(600);
/// Duplex buffer per direction; small, so back-pressure paths are run.
const PIPE: usize = 64 * 1024;

fn server() -> Arc<Server<MemDisk>> {
    Server::new(vec![
        Export {
            name: "disk".into(),
            description: Some("1 MiB in-memory fuzz disk".into()),
            device: MemDisk::new(true),
        },
        Export {
            name: "ro".into(),
            description: None,
            device: MemDisk::new(false),
        },
    ])
}

/// Run one session of `input` as the client's bytes; panics on a server
/// panic or a session that does not end.
pub fn run(input: &[u8]) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .expect("tokio runtime");
    let input = input.to_vec();
    rt.block_on(async move {
        let (client, server_end) = tokio::io::duplex(PIPE);
        let (mut rd, mut wr) = tokio::io::split(client);
        let srv = server();
        // Spawned, so a panic inside the session surfaces as a JoinError
        // we re-raise, exactly like a panic on this task.
        let session = tokio::spawn(async move {
            srv.serve_stream(server_end, "fuzz".into(), Shutdown::new())
                .await
        });
        let writer = async move {
            // The server may hang up early; the rest of the input is moot.
            let _ = wr.write_all(&input).await;
            let _ = wr.shutdown().await;
            wr
        };
        let reader = async move {
            let mut buf = vec![0u8; PIPE];
            let mut total = 0u64;
            while let Ok(n) = rd.read(&mut buf).await {
                if n == 0 {
                    break;
                }
                total += n as u64;
            }
            total
        };
        let all = async {
            let (wr, _) = tokio::join!(writer, reader);
            match session.await {
                Ok(()) => {}
                Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
                Err(e) => panic!("session task failed: {e}"),
            }
            drop(wr);
        };
        if tokio::time::timeout(SESSION_LIMIT, all).await.is_err() {
            panic!("session did not end within {SESSION_LIMIT:?} after the client closed");
        }
    });
}
