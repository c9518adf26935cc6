//! A disk on a legacy host read through the host's own sshd, with nothing
//! installed there (issue 18): `ssh://[USER@]HOST[:PORT]/PATH`.
//!
//! The system's OpenSSH client (`session.rs`, which says why not a
//! library) runs the SFTP subsystem; a small SFTP v3 client (`sftp.rs`)
//! reads the disk with many requests in flight, or, where the server has
//! no SFTP, `dd` through a remote shell (`shell.rs`); `source.rs` is the
//! engine's source: two sessions, reconnects, retries, size checks.

mod session;
mod sftp;
mod shell;
mod source;
mod uri;

pub use session::ConnectError;
pub use source::{SshOptions, SshSource};
pub use uri::{SshUri, is_ssh};
