//! Fuzz targets of `nbd-server`.
//!
//! # Layout
//!
//! Bytes from the fuzzer go either through a whole server session or
//! straight into the codecs:
//!
//! - [`session`]: `handshake_and_requests`: the bytes are everything a
//!   client sends on one connection, replayed through
//!   `Server::serve_stream` over an in-memory duplex stream against
//!   [`memdisk::MemDisk`]; the server must neither panic nor hang.
//! - [`codecs`]: `option_parsing`: the option payload and reply decoders
//!   must never panic, and what they accept must re-encode to itself.
//! - [`client_session`]: `client_replies`: the bytes are everything a
//!   server sends; the async client negotiates and runs a fixed request
//!   sequence on a unix socketpair; it must neither panic nor hang.
//! - [`memdisk`]: a 1 MiB in-memory block device with every capability.
//! - [`spec_seeds`]: hand-built byte sequences from the NBD spec, the
//!   seeds the captured client sessions do not cover.
//!
//! `fuzz_targets/` holds the libFuzzer entry points (nightly, cargo-fuzz);
//! `tests/replay.rs` runs every corpus file through the same functions on
//! stable, so CI replays the corpus without a fuzzer.

pub mod client_session;
pub mod codecs;
pub mod memdisk;
pub mod session;
pub mod spec_seeds;
