//! The write-ahead log of in-place changes to present chunks.
//!
//! Why: a client write to a chunk the target already holds goes in place.
//! If the process dies in the middle of that `pwrite` (SIGKILL is checked
//! between pages of a buffered write), the chunk would hold part old, part
//! new bytes, which invariant 3 forbids even for unflushed writes. Writes
//! to absent or zero chunks need no log: recovery (see `volume`) returns
//! them to "old" as a whole.
//!
//! How: every change to a present chunk (a write, zeroing part of it,
//! trimming it) first appends a checksummed record (the bytes, or "zeros")
//! to `wal.<generation>` in the state directory, then changes the target.
//! Appends are serialized, so only the last record can be torn, and its
//! in-place change never started. After an unclean stop every complete
//! record of every generation left is replayed in order, which makes each
//! logged change whole (all new); a torn one stays all old. Because every
//! in-place change is logged, replaying an older generation followed by the
//! newer ones is always safe: any later change to the same bytes is
//! replayed after it.
//!
//! Lifetime: [`Wal::rotate`] (at the start of a flush) waits until no change
//! is between its log record and its target write, then starts a new
//! generation; once the flush has synced the target, the old file is
//! removed (usually before the kernel ever wrote it back). The log needs no
//! fsync: it guards against the process dying, and after a power loss the
//! unflushed writes it covers may be lost anyway (NBD semantics).
//!
//! Ownership: writers hold a read guard from before their append until
//! their target change is done; `rotate` takes the write guard.
//!
//! The record format is in `record.rs`, the room reserved for the log in
//! `reserve.rs`.

mod record;
mod reserve;
#[cfg(test)]
mod tests;

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use tokio::sync::{RwLock, RwLockReadGuard};

use crate::target::Target;
use crate::watchdog::{Wait, waiting};

use record::{encode, parse};
pub use reserve::RESERVE;
use reserve::{reserve, warn_if_short_of_room};

/// What a record does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Change<'a> {
    Write(&'a [u8]),
    Zero { len: u64, allocate: bool },
}

#[derive(Debug)]
struct Current {
    file: Arc<File>,
    generation: u64,
}

/// A change is between its log record and its target write: the current
/// generation cannot rotate while this lives.
///
/// The record is appended through the guard itself ([`Held::log`]), never
/// by taking the lock a second time: tokio's `RwLock` is fair, so a second
/// `read()` queues behind a waiting `rotate()`, which waits for the first
/// guard — the FLUSH that never returned (issue 12, case 1).
pub struct Held<'a> {
    current: RwLockReadGuard<'a, Current>,
    end: &'a Arc<Mutex<u64>>,
}

#[derive(Debug)]
pub struct Wal {
    dir: PathBuf,
    current: RwLock<Current>,
    /// Append position of the current file; serializes appends.
    end: Arc<Mutex<u64>>,
}

fn name(generation: u64) -> String {
    format!("wal.{generation}")
}

/// The generations present in `dir`, oldest first.
fn generations(dir: &Path) -> io::Result<Vec<u64>> {
    let mut g: Vec<u64> = fs::read_dir(dir)?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            e.file_name()
                .to_str()
                .and_then(|n| n.strip_prefix("wal."))
                .and_then(|n| n.parse().ok())
        })
        .collect();
    g.sort_unstable();
    Ok(g)
}

impl Wal {
    /// Start a new log in `dir` after any generation already there (which
    /// the caller has replayed, or removed with [`remove_all`]).
    /// With `reserve`, room for the log is taken up front ([`RESERVE`]);
    /// a volume opened read-only (a finalized migration) writes nothing.
    pub fn open(dir: &Path, reserve_room: bool) -> io::Result<Wal> {
        let generation = generations(dir)?.last().map_or(1, |g| g + 1);
        let file = Self::create(dir, generation)?;
        if reserve_room {
            warn_if_short_of_room(dir);
            reserve(&file, dir);
        }
        Ok(Wal {
            dir: dir.to_path_buf(),
            current: RwLock::new(Current {
                file: Arc::new(file),
                generation,
            }),
            end: Arc::new(Mutex::new(0)),
        })
    }

    fn create(dir: &Path, generation: u64) -> io::Result<File> {
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(dir.join(name(generation)))?;
        Ok(f)
    }

    /// Hold this from before [`Held::log`] until the target change is done.
    pub async fn hold(&self) -> Held<'_> {
        Held {
            current: waiting(Wait::Log, self.current.read()).await,
            end: &self.end,
        }
    }

    /// Bytes in the current generation.
    pub fn len(&self) -> u64 {
        *self.end.lock().expect("poisoned")
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Wait for every logged change to reach the target, then start a new
    /// generation. Returns the old one, to [`Wal::remove`] once the target
    /// is synced.
    pub async fn rotate(&self) -> io::Result<u64> {
        let mut cur = waiting(Wait::Log, self.current.write()).await;
        let old = cur.generation;
        let file = Self::create(&self.dir, old + 1)?;
        *cur = Current {
            file: Arc::new(file),
            generation: old + 1,
        };
        *self.end.lock().expect("poisoned") = 0;
        Ok(old)
    }

    /// Remove generations up to `upto` (their changes are durable), then
    /// move their reserve to the current one: reserving before the old one
    /// is gone would need room for two.
    pub fn remove(&self, upto: u64) -> io::Result<()> {
        for g in generations(&self.dir)? {
            if g <= upto {
                match fs::remove_file(self.dir.join(name(g))) {
                    Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
                    _ => {}
                }
            }
        }
        if let Ok(cur) = self.current.try_read() {
            reserve(&cur.file, &self.dir);
        }
        Ok(())
    }
}

impl Held<'_> {
    /// Append a record for `change` at `offset` to the held generation
    /// (blocking I/O on the pool).
    pub async fn log(&self, offset: u64, change: Change<'_>) -> io::Result<()> {
        let record = encode(offset, change);
        let file = self.current.file.clone();
        let end = self.end.clone();
        let append = tokio::task::spawn_blocking(move || {
            let mut at = end.lock().expect("poisoned");
            file.write_all_at(&record, *at)?;
            *at += record.len() as u64;
            Ok(())
        });
        waiting(Wait::Log, append).await.map_err(io::Error::other)?
    }
}

/// Replay every complete record of every generation in `dir`, oldest first,
/// onto `target`, then remove the files. Returns the number of records and
/// the byte ranges they changed.
pub async fn replay(dir: &Path, target: &Target) -> io::Result<(u64, Vec<(u64, u64)>)> {
    let mut n = 0;
    let mut touched = Vec::new();
    for g in generations(dir)? {
        let path = dir.join(name(g));
        let bytes = fs::read(&path)?;
        let mut at = 0usize;
        while let Some((offset, change, next)) = parse(&bytes, at) {
            match change {
                Change::Write(data) => {
                    touched.push((offset, data.len() as u64));
                    target.write_at(offset, data.to_vec()).await?;
                }
                Change::Zero { len, allocate } => {
                    touched.push((offset, len));
                    target.zero(offset, len, allocate).await?
                }
            }
            n += 1;
            at = next;
        }
        if at < bytes.len() {
            tracing::info!(
                "{}: the last change ({} bytes) was torn before it reached the target; it is dropped",
                path.display(),
                bytes.len() - at
            );
        }
    }
    if n > 0 {
        target.sync().await?;
    }
    remove_all(dir)?;
    Ok((n, touched))
}

/// Remove every generation in `dir` (after a clean stop they hold nothing
/// the target lacks).
pub fn remove_all(dir: &Path) -> io::Result<()> {
    for g in generations(dir)? {
        fs::remove_file(dir.join(name(g)))?;
    }
    Ok(())
}
