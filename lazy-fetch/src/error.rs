//! Errors of the engine, one enum for the layer.
//!
//! Variants name the operation and carry its fields; [`Error::to_io`] maps
//! them onto an errno a frontend can send (NBD maps that onto its wire
//! values): a source that cannot be reached is `EIO`, a full target is
//! `ENOSPC`, everything the user must fix before starting is refused at
//! start and never reaches a client.

use std::io;
use std::path::PathBuf;

use crate::units::ChunkIndex;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    #[error("fetching chunk {index} from the source failed: {source}")]
    FetchChunk {
        index: ChunkIndex,
        #[source]
        source: io::Error,
    },
    #[error("writing chunk {index} to the target failed: {source}")]
    WriteTarget {
        index: ChunkIndex,
        #[source]
        source: io::Error,
    },
    #[error("reading the target failed at offset {offset}: {source}")]
    ReadTarget {
        offset: u64,
        #[source]
        source: io::Error,
    },
    #[error("syncing the target failed: {0}")]
    SyncTarget(#[source] io::Error),
    #[error("persisting the presence map in {dir} failed: {source}")]
    PersistMap {
        dir: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("state directory {dir}: {source}")]
    StateIo {
        dir: PathBuf,
        #[source]
        source: io::Error,
    },
    // No "restore the state from a backup": an older copy of the state
    // forgets every write flushed after it was taken, and would fetch the
    // source's data over them without a word.
    #[error(
        "state file {path} is damaged ({detail}); it is not trusted, and nothing was \
         changed. Keep this state directory and the target as they are, and do not restore \
         an older copy of the state: it would forget the writes flushed since the copy was \
         made and fetch the source's data over them. If the original file can be put back \
         (moved, or on storage that recovers), put it back and run the same command. \
         Otherwise this migration cannot be resumed without losing clients' writes; to \
         start it again from the source, discarding them, use a new state directory and \
         `stream start --overwrite-target`"
    )]
    StateCorrupt { path: PathBuf, detail: String },
    #[error(
        "this state directory belongs to another migration: its {what} is {recorded}, \
         but {given} was given. Use the original {what}, or another --state directory"
    )]
    Mismatch {
        what: &'static str,
        recorded: String,
        given: String,
    },
    #[error(
        "state directory {dir} is in use by another `stream start` ({holder}); \
         stop it first, or use `stream status` to watch it"
    )]
    Locked { dir: PathBuf, holder: String },
    #[error(
        "migration in {dir} is finalized: the target is native storage now and is not served again"
    )]
    Finalized { dir: PathBuf },
    #[error("the source is unavailable: {0}")]
    SourceUnavailable(String),
    #[error("{0}")]
    Invalid(String),
}

/// What a frontend needs to know about an error.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The source could not deliver data (EIO to the client).
    Source,
    /// The target is full (ENOSPC).
    NoSpace,
    /// Any other I/O failure (EIO).
    Io,
    /// Wrong arguments or state; refused before serving.
    Refused,
}

fn is_nospace(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::ENOSPC | libc::EDQUOT | libc::EFBIG)
    )
}

impl Error {
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::FetchChunk { .. } | Error::SourceUnavailable(_) => ErrorKind::Source,
            Error::WriteTarget { source, .. } if is_nospace(source) => ErrorKind::NoSpace,
            Error::SyncTarget(source) | Error::PersistMap { source, .. } if is_nospace(source) => {
                ErrorKind::NoSpace
            }
            Error::WriteTarget { .. }
            | Error::ReadTarget { .. }
            | Error::SyncTarget(_)
            | Error::PersistMap { .. }
            | Error::StateIo { .. } => ErrorKind::Io,
            _ => ErrorKind::Refused,
        }
    }

    /// The error as an `io::Error` with the errno a client should see
    /// (read back by every frontend with `block_device::errno_of`).
    pub fn to_io(&self) -> io::Error {
        let errno = match self.kind() {
            ErrorKind::NoSpace => libc::ENOSPC,
            ErrorKind::Refused => libc::EINVAL,
            ErrorKind::Source | ErrorKind::Io => libc::EIO,
        };
        block_device::with_errno(errno, self.to_string())
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
