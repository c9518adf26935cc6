//! What the tests and benchmark harnesses of every crate share, so each
//! does not carry its own copy (issue 14).
//!
//! # Layout
//!
//! - [`rng`]: seeded randomness ([`Rng`], xorshift64*) and a
//!   position-addressed stream ([`rng::splitmix64`]), so a failing seed
//!   reproduces the same run anywhere.
//! - [`child`]: [`child::ChildGuard`], the guard that owns a child process
//!   and on drop stops it by PID (SIGTERM, a bounded grace, SIGKILL) and
//!   reaps it; [`child::wait_deadline`] and [`child::kill_and_reap`] for
//!   harnesses that keep a bare `std::process::Child`.
//! - [`tool`]: outside tools: [`tool::require_tool`] fails naming the
//!   Debian package to install; [`tool::run`] runs one bounded by a
//!   deadline, output captured.
//! - [`nbdkit`]: nbdkit on a unix socket (plugin, filters, parameters),
//!   returned once the socket accepts connections, stopped on drop.
//! - [`loopdev`]: loop devices over files, detached on drop.
//! - [`sshd`]: Debian's sshd on 127.0.0.1 with its own host and user
//!   keys and a known_hosts that trusts it, stopped on drop.
//!
//! Nothing here sleeps to synchronise: readiness is a socket accepting or a
//! process exiting, polled against a deadline that only bounds the wait.
//!
//! This crate depends on no product crate of the workspace, so any crate
//! can dev-depend on it. The richer harness only the end-to-end tests use
//! (the `stream` binary, its status, faults, proxies) stays in
//! `integration/src`, built on these pieces; the in-memory and fault
//! backends stay in the engine (`lazy_fetch::source::memory`,
//! `lazy_fetch::target::{memory, fault}`), where its own tests reach them.

pub mod child;
pub mod loopdev;
pub mod nbdkit;
pub mod rng;
pub mod sshd;
pub mod tool;

pub use rng::Rng;
