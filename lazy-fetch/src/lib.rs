//! The lazy-fetch engine: a virtual disk that serves at once and fills
//! itself from a legacy disk.
//!
//! # Layout
//!
//! The data path, from a frontend down to the disks:
//!
//! - [`frontend`]: the thin adapter that lets the NBD server (and the FUSE
//!   frontend) serve a [`volume::Volume`] as a `BlockDevice`. The engine
//!   below knows nothing of either protocol.
//! - [`volume`]: reads, writes, trims and flushes on the virtual disk; the
//!   chunk state machine and where each engine invariant is enforced.
//! - [`presence`]: the atomic bitmaps (present, zero, written) of each chunk.
//! - [`inflight`]: single-flight locks of the chunks being changed.
//! - [`wal`]: the write-ahead log that keeps in-place writes to present
//!   chunks whole across a crash.
//! - [`hydrate`]: the background pass that fetches every absent chunk,
//!   rate-limited and yielding to foreground fetches.
//! - [`fingerprint`]: blake3 of sampled source chunks, checked on resume
//!   and on every reconnect so a different disk is never fetched.
//! - [`manifest`]: blake3 of every chunk and of the disk at finalize, and
//!   the verifier that compares the target with source and manifest.
//! - [`proof`]: the blake3 of every chunk of a disk as a small device,
//!   served by `stream export` beside the disk (source-side proof).
//! - [`state`]: the state directory: header, checkpoint, journal, lock; the
//!   order that makes the map durable only after the data.
//! - [`source`]: where chunks come from (`source/file.rs`; the NBD source
//!   is the `nbd-source` crate, so the engine depends on no protocol).
//! - [`target`]: where they go (`target/file.rs`: a file or block device).
//! - [`hashes`]: the kept manifest, the blake3 of each chunk recorded as it
//!   becomes present, and which records are stale.
//! - [`health`]: the source's outages told in the log as they start and end.
//! - [`watchdog`]: the client requests in flight, what each waits for, and
//!   the warning for one unanswered too long.
//! - [`units`], [`stats`], [`error`]: chunk geometry, counters, the error enum.

pub mod error;
pub mod fingerprint;
pub mod frontend;
pub mod hashes;
pub mod health;
pub mod hydrate;
pub mod inflight;
pub mod manifest;
pub mod presence;
pub mod proof;
pub mod source;
pub mod state;
pub mod stats;
pub mod target;
pub mod units;
pub mod volume;
pub mod wal;
pub mod watchdog;

pub use error::{Error, Result};
pub use volume::{OpenOptions, Volume};
