//! Single-flight locks, one per chunk that someone is working on.
//!
//! Every operation that changes a chunk's content or state (a fetch, a
//! client write, trim or write-zeroes, the hydrator) holds the chunk's lock
//! for the whole change: fetch, target write, map update, journal entry.
//! That is what makes invariant 2 hold: a chunk is fetched at most once at
//! a time, and a client write that meets a fetch waits for the fetch to land
//! and then applies on top of it, so source data can never overwrite an
//! acknowledged write. Reads of present chunks take no lock.
//!
//! Ownership: the table maps a chunk to an `Arc<Mutex<()>>` only while some
//! task holds or waits for it. A [`ChunkGuard`] owns one clone; dropping it
//! (also when a waiting future is cancelled) releases the lock and removes
//! the entry if nobody else holds a clone. The check runs under the shard's
//! std mutex, which is also where clones are handed out, so it cannot race.
//! Memory is proportional to the chunks in flight, not to the disk.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::{Mutex as AsyncMutex, OwnedMutexGuard};

use crate::units::ChunkIndex;

const SHARDS: usize = 64;

type Entry = Arc<AsyncMutex<()>>;

#[derive(Debug)]
pub struct ChunkLocks {
    shards: Vec<Mutex<HashMap<u64, Entry>>>,
}

impl Default for ChunkLocks {
    fn default() -> Self {
        ChunkLocks {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
        }
    }
}

/// Holds the lock of one chunk until dropped.
pub struct ChunkGuard {
    locks: Arc<ChunkLocks>,
    index: ChunkIndex,
    entry: Entry,
    guard: Option<OwnedMutexGuard<()>>,
}

impl ChunkLocks {
    fn shard(&self, c: ChunkIndex) -> &Mutex<HashMap<u64, Entry>> {
        &self.shards[usize::try_from(c.0 % SHARDS as u64).expect("below SHARDS")]
    }

    fn entry(self: &Arc<Self>, c: ChunkIndex) -> ChunkGuard {
        let entry = self
            .shard(c)
            .lock()
            .expect("poisoned")
            .entry(c.0)
            .or_default()
            .clone();
        ChunkGuard {
            locks: self.clone(),
            index: c,
            entry,
            guard: None,
        }
    }

    /// Wait for and take the lock of chunk `c`.
    pub async fn lock(self: &Arc<Self>, c: ChunkIndex) -> ChunkGuard {
        let mut g = self.entry(c);
        let lock = g.entry.clone().lock_owned();
        g.guard = Some(crate::watchdog::waiting(crate::watchdog::Wait::ChunkLock(c.0), lock).await);
        g
    }

    /// Take the lock of chunk `c` if nobody holds it.
    pub fn try_lock(self: &Arc<Self>, c: ChunkIndex) -> Option<ChunkGuard> {
        let mut g = self.entry(c);
        g.guard = Some(g.entry.clone().try_lock_owned().ok()?);
        Some(g)
    }

    /// Chunks with a holder or waiter (for tests and stats).
    pub fn in_flight(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().expect("poisoned").len())
            .sum()
    }
}

impl ChunkGuard {
    pub fn index(&self) -> ChunkIndex {
        self.index
    }
}

impl Drop for ChunkGuard {
    fn drop(&mut self) {
        self.guard.take();
        let mut shard = self.locks.shard(self.index).lock().expect("poisoned");
        // One clone in the table, one here: nobody else holds or waits.
        if Arc::strong_count(&self.entry) == 2 {
            shard.remove(&self.index.0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn second_locker_waits_and_table_empties_after() {
        let locks = Arc::new(ChunkLocks::default());
        let g = locks.lock(ChunkIndex(5)).await;
        assert!(locks.try_lock(ChunkIndex(5)).is_none());
        assert!(locks.try_lock(ChunkIndex(6)).is_some());
        let l2 = locks.clone();
        let waiter = tokio::spawn(async move { l2.lock(ChunkIndex(5)).await.index() });
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        drop(g);
        assert_eq!(waiter.await.unwrap(), ChunkIndex(5));
        assert_eq!(locks.in_flight(), 0);
    }

    #[tokio::test]
    async fn cancelled_waiter_leaves_no_entry() {
        let locks = Arc::new(ChunkLocks::default());
        let g = locks.lock(ChunkIndex(1)).await;
        let fut = locks.lock(ChunkIndex(1));
        let r = tokio::time::timeout(std::time::Duration::from_millis(1), fut).await;
        assert!(r.is_err());
        drop(g);
        assert_eq!(locks.in_flight(), 0);
    }
}
