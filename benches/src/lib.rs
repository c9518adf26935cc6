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
//! - every child process lives in test-support's `ChildGuard`: stopped by
//!   PID and reaped when dropped, so no server outlives the harness; the
//!   nbdkit sources are test-support's `Nbdkit`, its seeded `Rng` makes
//!   the test file and the trace.
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
//! - [`peers`]: the migrators the `suite` compares (stream start,
//!   qemu-storage-daemon with block-stream, nbdkit's cache filter, nbdcopy
//!   then serve) started in front of one source; [`qmp`] drives
//!   qemu-storage-daemon's monitor.
//! - [`trace`]: the synthetic boot-like read trace and its replay.
//! - [`plot`]: SVG charts (plotters).
//! - [`boot_hook`]: where the real-OS boot benchmark plugs in.
//! - [`scratch`]: a scratch directory removed on drop.
//!
//! The `suite` binary (run by `benches/run`) is the entry point of issue
//! 6: every peer, every scenario, one run. The older `export-bench`
//! measures `stream export`; `start-bench` measures `stream start` (cold
//! and warm reads, hydration, memory) in more depth against fewer peers; `boot_bench` boots the real OS
//! through each peer on its own; `detach_bench` (issue 15) measures the
//! guest's pause during `stream detach` and the cold cutover beside a
//! plain reboot; `seed_bench` (issue 16) what a delta cutover after
//! `stream seed` reads and how soon it serves, beside nbdcopy and rsync,
//! and a boot right after it.

pub mod bench_main;
pub mod boot;
pub mod boot_hook;
pub mod cpu;
pub mod fio;
pub mod lazy;
pub mod mem;
pub mod peers;
pub mod plot;
pub mod qmp;
pub mod report;
pub mod scratch;
pub mod servers;
pub mod stats;
pub mod testfile;
pub mod trace;
