//! Benchmarks of `stream` against its peers (qemu-nbd, nbdkit).
//!
//! # Layout
//!
//! A measurement runs from a test file, through one NBD server under test,
//! to fio's `nbd` engine as the client, with the server's CPU time read
//! from `/proc` around each fio run:
//!
//! - [`testfile`]: the test file: pseudo-random, fully allocated, read once
//!   so every server starts from the same hot page cache.
//! - [`servers`]: how each server is started (unix socket or TCP), waited
//!   for, and checked with `nbdinfo` before it is measured.
//! - [`child`]: the guard that owns every child process: killed by PID and
//!   reaped when dropped, so no server outlives the harness.
//! - [`fio`]: one fio run and the parsing of its JSON report.
//! - [`cpu`]: user + system CPU time of a process from `/proc/PID/stat`.
//! - [`stats`], medians and ranges of repeated runs.
//! - [`report`]: machine and tool versions for a report header, and
//!   writing one generated section of `RESULTS.md` between its markers.
//!
//! - [`lazy`]: `stream start` under test (a lazily fetched volume) and the
//!   status its control socket reports; sources for it come from
//!   [`servers::start_nbdkit_source`] (nbdkit with a delay filter).
//! - [`mem`]: peak and current resident memory from `/proc/PID/status`.
//! - [`boot`]: a real OS (`vendor-fixtures/boot/build-image`) booted with
//!   qemu under TCG from an NBD export, timed to a console marker line.
//!
//! The `export-bench` binary measures `stream export`; `start-bench`
//! measures `stream start` (cold and warm reads, hydration, memory);
//! `boot_bench` the time to boot through each peer.

pub mod boot;
pub mod child;
pub mod cpu;
pub mod fio;
pub mod lazy;
pub mod mem;
pub mod report;
pub mod servers;
pub mod stats;
pub mod testfile;
