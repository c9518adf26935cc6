//! An NBD export as the engine's source: `nbd://host[:port]/export` or
//! `nbd+unix:///export?socket=PATH`, or their TLS forms `nbds://`,
//! `nbds+unix://` with credentials in the URI (`tls-psk-file=`,
//! `tls-certificates=`): loaded once when the source is opened, used by
//! every connection and reconnect.
//!
//! A crate of its own so that the engine (`lazy-fetch`) knows nothing of
//! the NBD protocol: this crate implements `lazy_fetch::source::Source` on
//! top of `nbd_server::client`, and the engine sees only that trait.
//!
//! # Layout
//!
//! - `source.rs`: [`NbdSource`], what it owns and its `Source` methods.
//! - `open.rs`: parsing the URI and TLS credentials, the first connection
//!   (a new migration) or none (a resume).
//! - `slot.rs`: the connections, one foreground and N background slots, and
//!   the task that keeps each connected (reconnects with backoff).
//! - `connect.rs`: one connect attempt and the checks a new connection
//!   passes before it serves (size, fingerprint).
//! - `retry.rs`: the request path: which slot, how long, what is retried.
//! - `outage.rs`: since when a slot is down, told in health and errors.
//! - `options.rs`, `error.rs`: the tuning, the open errors and the errno a
//!   failed read carries ([`errno_of`]).
//! - `hashes.rs`: [`RemoteHashes`], the source's chunk hashes read from its
//!   hash export (the client half of `lazy_fetch::proof`).

mod connect;
mod error;
mod hashes;
mod open;
mod options;
mod outage;
mod retry;
mod slot;
mod source;

pub use error::{NbdSourceError, errno_of};
pub use hashes::RemoteHashes;
pub use options::NbdOptions;
pub use source::NbdSource;
