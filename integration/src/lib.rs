//! End-to-end harness: the real `stream` binary driven by real NBD clients.
//!
//! # Layout
//!
//! A test traces the same path a migration does, from a disk image on one
//! side to an NBD client on the other:
//!
//! - [`image`]: disk images with a known layout (data regions with
//!   deterministic pseudo-random bytes, holes between them) and content
//!   hashes and comparisons.
//! - [`binary`]: finds or builds the `stream` binary once per test process.
//! - [`server`]: runs `stream export` on a temp unix socket or
//!   `127.0.0.1:0`, reads the URI it prints, and kills it on drop.
//! - [`proxy`]: a TCP proxy whose connections a test cuts at will.
//! - [`start`]: runs `stream start` (again and again with the same
//!   arguments, to resume), polls `stream status --json` with a deadline,
//!   stops it with SIGTERM or SIGKILL; loop devices detached on drop.
//! - [`finalize`]: runs `stream finalize` (to completion, or in the
//!   background to be SIGKILLed at a chosen point) and `stream verify`;
//!   reads `state.json`.
//! - [`openstack`]: real Keystone and Cinder from
//!   `integration/openstack/bring-up` (stopped on drop), LVs in its volume
//!   group with a loop device over their extents, the `openstack` CLI, and
//!   a proxy in front of cinder-api that loses an answer or shows an older
//!   version document.
//! - [`tool`]: the outside clients (nbdinfo, nbdcopy, qemu-img, qemu-io, fio,
//!   python3 with libnbd): a clear panic naming the Debian package when one
//!   is missing, and every run bounded by a deadline.
//! - [`fuse`]: around a FUSE mount: loop devices, ext4 fixtures, kernel
//!   mounts and stale FUSE mounts, each undone on drop, and a watchdog.
//! - [`tls`]: a test CA with server and client certificates, PSK files,
//!   and nbdkit serving over TLS.
//! - [`ops`]: what an operator's script sees: `--json` documents checked
//!   against the JSON Schemas of `docs/schema/`, the Prometheus endpoint
//!   scraped over plain TCP and its exposition text parsed, the run
//!   directory.
//! - [`wire`]: a tiny blocking NBD client speaking exact bytes, for the
//!   protocol corner cases no well-behaved client will produce.
//!
//! Nothing here sleeps to synchronise: readiness is the URI line on stdout,
//! completion is a reply or an exit status, each awaited with a deadline.

pub mod binary;
pub mod fault;
pub mod finalize;
pub mod fuse;
pub mod guest;
pub mod image;
pub mod openstack;
pub mod ops;
pub mod proxy;
pub mod server;
pub mod soak;
pub mod start;
pub mod tls;
pub mod tool;
pub mod wire;

pub use image::{Region, SparseImage};
pub use server::{Export, Server};
pub use start::{LoopDevice, Running, Start};
pub use tool::{require_tool, run, run_ok};
