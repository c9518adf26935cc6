//! A synthetic boot-like read trace and its replay over NBD.
//!
//! A boot reads a few percent of its disk: files read front to back in
//! small requests (which a server can read ahead of), interleaved with
//! scattered 4 KiB reads (metadata, libraries' pages). [`generate`] makes
//! such a trace deterministically from a seed: until [`TOUCH_PERCENT`] (3 %) of
//! the disk is covered, each event is with probability 0.3 a sequential
//! run of 64 KiB .. 1 MiB in 16 KiB reads, else one random 4 KiB read.
//!
//! [`replay`] issues the trace in order with up to `depth` requests in
//! flight (a booting guest has a few readers at once) through our own NBD
//! client, checks every reply's length, and returns the wall time.

use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use nbd_server::client::Client;
use nbd_server::uri::NbdUri;
use test_support::Rng;

/// Share of the disk the trace reads.
pub const TOUCH_PERCENT: u64 = 3;
const SEQ_REQUEST: u32 = 16 << 10;
const RANDOM_REQUEST: u32 = 4 << 10;
/// Longest a replay may take.
const REPLAY_TIMEOUT: Duration = Duration::from_secs(300);

/// One read of the trace.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Read {
    pub offset: u64,
    pub len: u32,
}

/// The trace for a disk of `size` bytes (at least 2 MiB).
pub fn generate(size: u64, seed: u64) -> Vec<Read> {
    let mut rng = Rng::new(seed);
    let budget = size * TOUCH_PERCENT / 100;
    let mut out = Vec::new();
    let mut total = 0u64;
    while total < budget {
        if rng.below(10) < 3 {
            let run = (64 << 10) + rng.below(15) * (64 << 10);
            let start = rng.below((size - run) / 4096) * 4096;
            let mut off = start;
            while off < start + run {
                out.push(Read {
                    offset: off,
                    len: SEQ_REQUEST,
                });
                off += u64::from(SEQ_REQUEST);
            }
            total += run;
        } else {
            let off = rng.below(size / 4096) * 4096;
            out.push(Read {
                offset: off,
                len: RANDOM_REQUEST,
            });
            total += u64::from(RANDOM_REQUEST);
        }
    }
    out
}

/// Bytes the trace reads.
pub fn bytes(trace: &[Read]) -> u64 {
    trace.iter().map(|r| u64::from(r.len)).sum()
}

/// Replay `trace` against `uri` with up to `depth` reads in flight; the
/// wall time from the first request to the last reply (the connection is
/// made before the clock starts).
pub fn replay(uri: &str, trace: &[Read], depth: usize) -> io::Result<Duration> {
    let uri = NbdUri::parse(uri).map_err(|e| io::Error::other(format!("{uri}: {e}")))?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let trace: Arc<Vec<Read>> = Arc::new(trace.to_vec());
    rt.block_on(async move {
        let client = Client::connect_uri(&uri)
            .await
            .map_err(|e| io::Error::other(format!("connect {uri}: {e}")))?;
        let next = Arc::new(AtomicUsize::new(0));
        let t0 = Instant::now();
        let mut workers = Vec::new();
        for _ in 0..depth.max(1) {
            let (client, next, trace) = (client.clone(), next.clone(), trace.clone());
            workers.push(tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(r) = trace.get(i) else {
                        return Ok::<(), io::Error>(());
                    };
                    let data = client.read(r.offset, r.len).await.map_err(|e| {
                        io::Error::other(format!("read {}+{}: {e}", r.offset, r.len))
                    })?;
                    if data.len() != r.len as usize {
                        return Err(io::Error::other(format!(
                            "read {}+{} returned {} bytes",
                            r.offset,
                            r.len,
                            data.len()
                        )));
                    }
                }
            }));
        }
        let all = async {
            for w in workers {
                w.await.map_err(io::Error::other)??;
            }
            Ok::<(), io::Error>(())
        };
        tokio::time::timeout(REPLAY_TIMEOUT, all)
            .await
            .map_err(|_| io::Error::other(format!("trace replay ran past {REPLAY_TIMEOUT:?}")))??;
        let took = t0.elapsed();
        let _ = client.disconnect().await;
        Ok(took)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trace_is_deterministic_in_bounds_and_touches_the_budget() {
        let size = 256 << 20;
        let a = generate(size, 7);
        assert_eq!(a, generate(size, 7));
        assert!(a.iter().all(|r| r.offset + u64::from(r.len) <= size));
        let b = bytes(&a);
        assert!(b >= size * TOUCH_PERCENT / 100 && b < size * (TOUCH_PERCENT + 1) / 100);
        // Both kinds of reads are present.
        assert!(a.iter().any(|r| r.len == RANDOM_REQUEST));
        assert!(a.iter().any(|r| r.len == SEQ_REQUEST));
    }
}
