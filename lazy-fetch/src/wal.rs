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

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::{RwLock, RwLockReadGuard};

use crate::target::Target;
use crate::watchdog::{Wait, waiting};

/// Records since the length became 64 bits ("WRE2").
const RECORD_MAGIC: u32 = 0x5752_4532;
/// Records of earlier releases, whose length was 32 bits ("WREC"): still
/// replayed, so an upgrade after a crash loses nothing.
const RECORD_MAGIC_V1: u32 = 0x5752_4543;
const HEADER_LEN: usize = 4 + 1 + 8 + 8;
const HEADER_LEN_V1: usize = 4 + 1 + 8 + 4;
const HASH_LEN: usize = 16;

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

fn hash16(parts: &[&[u8]]) -> [u8; HASH_LEN] {
    let mut h = blake3::Hasher::new();
    for p in parts {
        h.update(p);
    }
    let mut out = [0u8; HASH_LEN];
    out.copy_from_slice(&h.finalize().as_bytes()[..HASH_LEN]);
    out
}

fn encode(offset: u64, change: Change<'_>) -> Vec<u8> {
    let (kind, len, data): (u8, u64, &[u8]) = match change {
        Change::Write(d) => (0, d.len() as u64, d),
        Change::Zero { len, allocate } => (1 + u8::from(allocate), len, &[]),
    };
    let mut v = Vec::with_capacity(HEADER_LEN + data.len() + HASH_LEN);
    v.extend_from_slice(&RECORD_MAGIC.to_le_bytes());
    v.push(kind);
    v.extend_from_slice(&offset.to_le_bytes());
    v.extend_from_slice(&len.to_le_bytes());
    v.extend_from_slice(data);
    let h = hash16(&[&v]);
    v.extend_from_slice(&h);
    v
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

/// Space reserved for the current generation, allocated when the log
/// opens and moved to each new generation once the old one is removed. The state directory's file system is on
/// the clients' write path (a write to a copied chunk is logged before it
/// lands), so a full `/var/lib/stream` would turn into client ENOSPC; the
/// reserve means the log never needs new blocks until it holds this much
/// between two flushes (issue 13).
pub const RESERVE: u64 = 64 << 20;

static RESERVE_WARNED: AtomicBool = AtomicBool::new(false);

/// Allocate [`RESERVE`] bytes for `f` without changing its size (replay
/// reads only what was written). A file system that cannot is told once.
fn reserve(f: &File, dir: &Path) {
    // SAFETY: fallocate on an fd we own; no memory is passed.
    let r = unsafe {
        libc::fallocate64(
            f.as_raw_fd(),
            libc::FALLOC_FL_KEEP_SIZE,
            0,
            RESERVE as libc::off64_t,
        )
    };
    if r == 0 {
        return;
    }
    let e = io::Error::last_os_error();
    let unsupported = matches!(e.raw_os_error(), Some(libc::EOPNOTSUPP | libc::ENOSYS));
    if !unsupported && !RESERVE_WARNED.swap(true, Ordering::Relaxed) {
        tracing::warn!(
            "state directory {}: cannot reserve {} MiB for the write-ahead log ({e}): client \
             writes to copied chunks fail with ENOSPC once its file system is full; free space there",
            dir.display(),
            RESERVE >> 20
        );
    }
}

/// Warn at start when the state directory's file system has little room.
fn warn_if_short_of_room(dir: &Path) {
    let Ok(c) = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()) else {
        return;
    };
    // SAFETY: statvfs with a NUL-terminated path and a zeroed out-struct.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: as above: a valid path and a struct we own.
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return;
    }
    let free = st.f_bavail as u64 * st.f_frsize as u64;
    if free < 4 * RESERVE {
        tracing::warn!(
            "state directory {}: only {} MiB free; client writes to copied chunks are logged \
             there before they land (up to {} MiB between flushes) and fail with ENOSPC when it \
             fills: give it more room (see docs/operations.md)",
            dir.display(),
            free >> 20,
            RESERVE >> 20
        );
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

fn parse(bytes: &[u8], at: usize) -> Option<(u64, Change<'_>, usize)> {
    let magic = u32::from_le_bytes(bytes.get(at..at + 4)?.try_into().ok()?);
    let header_len = match magic {
        RECORD_MAGIC => HEADER_LEN,
        RECORD_MAGIC_V1 => HEADER_LEN_V1,
        _ => return None,
    };
    let h = bytes.get(at..at + header_len)?;
    let kind = h[4];
    let offset = u64::from_le_bytes(h[5..13].try_into().ok()?);
    let len = match magic {
        RECORD_MAGIC => u64::from_le_bytes(h[13..21].try_into().ok()?),
        _ => u64::from(u32::from_le_bytes(h[13..17].try_into().ok()?)),
    };
    let data_len = if kind == 0 {
        usize::try_from(len).ok()?
    } else {
        0
    };
    let body_end = (at + header_len).checked_add(data_len)?;
    let hash = bytes.get(body_end..body_end + HASH_LEN)?;
    if hash16(&[&bytes[at..body_end]]) != hash {
        return None;
    }
    let change = match kind {
        0 => Change::Write(&bytes[at + header_len..body_end]),
        1 | 2 => Change::Zero {
            len,
            allocate: kind == 2,
        },
        _ => return None,
    };
    Some((offset, change, body_end + HASH_LEN))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_a_torn_one_is_not_parsed() {
        let mut bytes = encode(100, Change::Write(b"hello"));
        bytes.extend(encode(
            7,
            Change::Zero {
                len: 4096,
                allocate: true,
            },
        ));
        let (off, c, next) = parse(&bytes, 0).unwrap();
        assert_eq!((off, c), (100, Change::Write(b"hello")));
        let (off, c, end) = parse(&bytes, next).unwrap();
        assert_eq!(
            (off, c),
            (
                7,
                Change::Zero {
                    len: 4096,
                    allocate: true
                }
            )
        );
        assert_eq!(end, bytes.len());
        bytes.truncate(bytes.len() - 1);
        assert!(parse(&bytes, next).is_none());
    }

    use proptest::prelude::*;

    fn change() -> impl Strategy<Value = (u64, Option<Vec<u8>>, u64, bool)> {
        (
            any::<u64>(),
            proptest::option::of(proptest::collection::vec(any::<u8>(), 0..300)),
            any::<u64>(),
            any::<bool>(),
        )
    }

    proptest! {
        /// Any sequence of records parses back as written, and cutting the
        /// log anywhere loses only the records from the cut on.
        #[test]
        fn any_log_parses_back_and_a_cut_keeps_the_whole_records_before_it(
            records in proptest::collection::vec(change(), 1..20),
            cut in any::<prop::sample::Index>(),
        ) {
            let mut bytes = Vec::new();
            let mut ends = Vec::new();
            for (off, data, len, allocate) in &records {
                let c = match data {
                    Some(d) => Change::Write(d),
                    None => Change::Zero { len: *len, allocate: *allocate },
                };
                bytes.extend(encode(*off, c));
                ends.push(bytes.len());
            }
            let mut at = 0;
            for (i, (off, data, len, allocate)) in records.iter().enumerate() {
                let (o, c, next) = parse(&bytes, at).expect("a whole record");
                let want = match data {
                    Some(d) => Change::Write(d),
                    None => Change::Zero { len: *len, allocate: *allocate },
                };
                prop_assert_eq!((o, c, next), (*off, want, ends[i]));
                at = next;
            }
            let cut = cut.index(bytes.len());
            let whole = ends.iter().filter(|&&e| e <= cut).count();
            let mut at = 0;
            let mut n = 0;
            while let Some((_, _, next)) = parse(&bytes[..cut], at) {
                at = next;
                n += 1;
            }
            prop_assert_eq!(n, whole);
        }

        /// Garbage never panics the parser.
        #[test]
        fn arbitrary_bytes_never_panic_the_parser(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let mut at = 0;
            while let Some((_, _, next)) = parse(&bytes, at) {
                prop_assert!(next > at);
                at = next;
            }
        }
    }

    /// Issue 12, case 11: a length was 32 bits, so a zero record of 4 GiB
    /// or more replayed a wrong (wrapped) range.
    #[test]
    fn a_zero_record_over_4_gib_keeps_its_length() {
        let len = (5u64 << 30) + 4096;
        let bytes = encode(
            1 << 40,
            Change::Zero {
                len,
                allocate: false,
            },
        );
        let (off, c, end) = parse(&bytes, 0).unwrap();
        assert_eq!(
            (off, c, end),
            (
                1 << 40,
                Change::Zero {
                    len,
                    allocate: false
                },
                bytes.len()
            )
        );
    }

    /// A log left by an earlier release (32-bit lengths) still replays.
    #[test]
    fn records_of_the_previous_format_still_parse() {
        let mut v = Vec::new();
        v.extend_from_slice(&RECORD_MAGIC_V1.to_le_bytes());
        v.push(0);
        v.extend_from_slice(&4096u64.to_le_bytes());
        v.extend_from_slice(&3u32.to_le_bytes());
        v.extend_from_slice(b"abc");
        let h = hash16(&[&v]);
        v.extend_from_slice(&h);
        let (off, c, end) = parse(&v, 0).unwrap();
        assert_eq!((off, c, end), (4096, Change::Write(b"abc"), v.len()));
    }

    /// Issue 12, case 1: a writer holding the generation appended its record
    /// by taking the lock again, behind a queued `rotate` that waited for the
    /// writer: a FLUSH that never returned. On a current-thread runtime the
    /// order is exact: the writer holds, the rotation queues, the writer logs.
    #[tokio::test(flavor = "current_thread")]
    async fn logging_while_a_rotation_waits_does_not_deadlock() {
        let dir = tempfile::tempdir().unwrap();
        let wal = Arc::new(Wal::open(dir.path(), true).unwrap());
        let held = wal.hold().await;
        let w = wal.clone();
        let rotation = tokio::spawn(async move { w.rotate().await });
        // Let the rotation run until it waits for `held`.
        tokio::task::yield_now().await;
        assert!(!rotation.is_finished());
        tokio::time::timeout(
            std::time::Duration::from_secs(20),
            held.log(0, Change::Write(b"x")),
        )
        .await
        .expect("the append waited for the rotation that waits for it")
        .unwrap();
        drop(held);
        assert_eq!(rotation.await.unwrap().unwrap(), 1);
        assert_eq!(wal.len(), 0);
    }
}
