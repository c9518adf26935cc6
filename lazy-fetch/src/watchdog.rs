//! Requests in flight, what each waits for, and the watchdog that names a
//! request unanswered for too long.
//!
//! Why: a guest whose request is never answered freezes, and before this
//! module the only sign was silence (issue 12, case 1). Every client
//! request a frontend serves is registered in [`Requests`] for its life
//! ([`Requests::track`]); the engine notes at each point where a request
//! can wait (a chunk's lock, a source read, the target, the write-ahead
//! log, the one-at-a-time flush) what it waits for ([`waiting_for`]), in
//! a task-local cell of the request, so nothing is threaded through the
//! call chain. [`Requests::overdue`] reports each request once when it
//! passes the bound; `stream status` shows the oldest one's age.
//!
//! Cost on the I/O path: one table insert and removal per request, and a
//! task-local lookup plus an uncontended mutex per wait point.
//!
//! Ownership: the table holds an entry while the request's future lives
//! (the guard in `track` removes it on completion and on cancellation).

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

// tokio's clock, so tests can pause and advance it.
use tokio::time::Instant;

/// What a request waits for at the moment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wait {
    /// Nothing in particular: running in the engine.
    Engine,
    /// The single-flight lock of a chunk another request or a fetch holds.
    ChunkLock(u64),
    /// A read of the source (`offset`, `len`).
    SourceRead { offset: u64, len: u64 },
    /// Target I/O (read, write, zeroing).
    Target,
    /// The target's sync during a flush.
    TargetSync,
    /// The write-ahead log (its generation or an append).
    Log,
    /// Another flush in progress (flushes run one at a time).
    FlushQueue,
    /// Persisting the presence map's journal.
    Journal,
}

impl fmt::Display for Wait {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Wait::Engine => f.write_str("the engine"),
            Wait::ChunkLock(c) => write!(f, "the lock of chunk {c} (a fetch or write of it)"),
            Wait::SourceRead { offset, len } => {
                write!(f, "a source read of {len} bytes at {offset}")
            }
            Wait::Target => f.write_str("target I/O"),
            Wait::TargetSync => f.write_str("the target's sync"),
            Wait::Log => f.write_str("the write-ahead log"),
            Wait::FlushQueue => f.write_str("an earlier flush"),
            Wait::Journal => f.write_str("the journal (presence map)"),
        }
    }
}

tokio::task_local! {
    static CURRENT: Arc<Mutex<Wait>>;
}

/// Note what the current request (if this task serves one) waits for.
pub fn waiting_for(wait: Wait) {
    let _ = CURRENT.try_with(|w| *w.lock().expect("poisoned") = wait);
}

/// Await `fut` noted as waiting for `wait`, then back in the engine.
pub async fn waiting<F: Future>(wait: Wait, fut: F) -> F::Output {
    waiting_for(wait);
    let out = fut.await;
    waiting_for(Wait::Engine);
    out
}

#[derive(Debug)]
struct Entry {
    command: &'static str,
    offset: u64,
    len: u64,
    started: Instant,
    wait: Arc<Mutex<Wait>>,
    warned: bool,
}

/// One request in flight, as reported.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outstanding {
    pub command: &'static str,
    pub offset: u64,
    pub len: u64,
    pub age: Duration,
    pub wait: Wait,
}

impl fmt::Display for Outstanding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} of {} bytes at offset {} unanswered for {:.1} s, waiting for {}",
            self.command,
            self.len,
            self.offset,
            self.age.as_secs_f64(),
            self.wait
        )
    }
}

/// The requests in flight on a volume.
#[derive(Debug, Default)]
pub struct Requests {
    next: AtomicU64,
    table: Mutex<HashMap<u64, Entry>>,
}

struct Remove<'a>(&'a Requests, u64);

impl Drop for Remove<'_> {
    fn drop(&mut self) {
        self.0.table.lock().expect("poisoned").remove(&self.1);
    }
}

impl Requests {
    /// Run `fut` (the engine's side of one client request) registered.
    pub async fn track<F: Future>(
        &self,
        command: &'static str,
        offset: u64,
        len: u64,
        fut: F,
    ) -> F::Output {
        let wait = Arc::new(Mutex::new(Wait::Engine));
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        self.table.lock().expect("poisoned").insert(
            id,
            Entry {
                command,
                offset,
                len,
                started: Instant::now(),
                wait: wait.clone(),
                warned: false,
            },
        );
        let _remove = Remove(self, id);
        CURRENT.scope(wait, fut).await
    }

    pub fn len(&self) -> usize {
        self.table.lock().expect("poisoned").len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Every request in flight, oldest first.
    pub fn snapshot(&self) -> Vec<Outstanding> {
        let t = self.table.lock().expect("poisoned");
        let mut v: Vec<Outstanding> = t.values().map(describe).collect();
        v.sort_by_key(|o| std::cmp::Reverse(o.age));
        v
    }

    /// Age of the oldest request in flight.
    pub fn oldest_age(&self) -> Option<Duration> {
        let t = self.table.lock().expect("poisoned");
        t.values().map(|e| e.started.elapsed()).max()
    }

    /// Requests older than `bound` not reported before; each is reported
    /// once.
    pub fn overdue(&self, bound: Duration) -> Vec<Outstanding> {
        let mut t = self.table.lock().expect("poisoned");
        let mut v = Vec::new();
        for e in t.values_mut() {
            if !e.warned && e.started.elapsed() >= bound {
                e.warned = true;
                v.push(describe(e));
            }
        }
        v
    }
}

fn describe(e: &Entry) -> Outstanding {
    Outstanding {
        command: e.command,
        offset: e.offset,
        len: e.len,
        age: e.started.elapsed(),
        wait: *e.wait.lock().expect("poisoned"),
    }
}

/// How often the watchdog looks.
const SCAN: Duration = Duration::from_secs(1);

/// Log, once each at WARN, the requests unanswered for `bound`, until the
/// task is dropped.
pub async fn run(requests: Arc<Requests>, bound: Duration) {
    let mut tick = tokio::time::interval(SCAN.min(bound));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        for r in requests.overdue(bound) {
            tracing::warn!("a client request is stuck: {r}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_stuck_request_is_reported_once_with_what_it_waits_for() {
        let reqs = Arc::new(Requests::default());
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let r = reqs.clone();
        let stuck = tokio::spawn(async move {
            r.track("FLUSH", 0, 0, async {
                waiting_for(Wait::Log);
                let _ = rx.await;
            })
            .await
        });
        tokio::task::yield_now().await;
        assert_eq!(reqs.len(), 1);
        assert!(reqs.overdue(Duration::from_secs(30)).is_empty());
        tokio::time::advance(Duration::from_secs(31)).await;
        let late = reqs.overdue(Duration::from_secs(30));
        assert_eq!(late.len(), 1);
        assert_eq!((late[0].command, late[0].wait), ("FLUSH", Wait::Log));
        assert!(
            late[0]
                .to_string()
                .contains("waiting for the write-ahead log")
        );
        assert!(reqs.overdue(Duration::from_secs(30)).is_empty(), "once");
        assert!(reqs.oldest_age().unwrap() >= Duration::from_secs(31));
        tx.send(()).unwrap();
        stuck.await.unwrap();
        assert!(reqs.is_empty());
        assert_eq!(reqs.oldest_age(), None);
    }

    #[tokio::test]
    async fn a_cancelled_request_leaves_the_table() {
        let reqs = Requests::default();
        let fut = reqs.track("READ", 4096, 512, std::future::pending::<()>());
        let r = tokio::time::timeout(Duration::from_millis(1), fut).await;
        assert!(r.is_err());
        assert!(reqs.is_empty());
    }
}
