//! The soak: one migration under everything at once for a bounded time,
//! then `stream finalize --verify` and a byte-for-byte check of the target
//! against a model.
//!
//! A dense source is served by `stream export` behind a [`Proxy`];
//! `stream start` hydrates it at a rate that spreads the copy over most of
//! the run. One client writes random ranges (1 byte to 256 KiB, anywhere)
//! with flushes between them and reads ranges back; the proxy cuts every
//! source connection every few seconds; every so often the client sends a
//! few writes without waiting for their replies and `stream start` is
//! SIGKILLed and started again with the same command line.
//!
//! The model: `durable` is the disk as of the last completed flush,
//! `view` adds the writes acknowledged since. Until a crash every read
//! must equal `view`. After a crash a write that was not flushed may be
//! lost, kept, or kept in part (NBD allows it), so each byte it covered
//! must equal the durable byte or the byte of one of those writes; every
//! other byte must equal `durable`. What is read back becomes the model.
//! At the end the target must equal the model exactly.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::finalize::{self, Finalize};
use crate::image::{KIB, MIB, dense_file, pattern, read_file};
use crate::proxy::Proxy;
use crate::server::Addr;
use crate::start::Start;
use crate::wire::{CMD_FLUSH, Conn};
use crate::{Export, image};
use test_support::Rng;

#[derive(Clone, Debug)]
pub struct Options {
    pub duration: Duration,
    pub size: u64,
    pub seed: u64,
    /// Mean seconds between source cuts and between kill -9 restarts.
    pub cut_every: Duration,
    pub kill_every: Duration,
}

impl Options {
    pub fn new(duration: Duration) -> Options {
        Options {
            duration,
            size: 64 * MIB,
            seed: 0x50a6,
            cut_every: Duration::from_secs(4),
            kill_every: Duration::from_secs(15),
        }
    }
}

/// What a soak did, and that nothing was lost.
#[derive(Clone, Debug, Default)]
pub struct Report {
    pub seconds: f64,
    pub writes: u64,
    pub bytes_written: u64,
    pub flushes: u64,
    pub reads_checked: u64,
    pub cuts: u64,
    pub kills: u64,
    /// Writes sent without waiting for their reply just before a kill.
    pub writes_in_flight_at_kill: u64,
    /// Unflushed writes found lost (wholly or in part) after a kill:
    /// allowed by NBD, counted for the record.
    pub unflushed_lost: u64,
    pub source_connections: u64,
    pub verify_chunks_checked: u64,
    pub verify_mismatches: u64,
}

impl Report {
    pub fn json(&self) -> String {
        format!(
            "{{\"seconds\":{:.0},\"writes\":{},\"bytes_written\":{},\"flushes\":{},\
             \"reads_checked\":{},\"source_cuts\":{},\"kill9_restarts\":{},\
             \"writes_in_flight_at_kill\":{},\"unflushed_writes_lost\":{},\
             \"source_connections\":{},\"verify_chunks_checked\":{},\
             \"verify_mismatches\":{},\"data_lost\":\"none\"}}",
            self.seconds,
            self.writes,
            self.bytes_written,
            self.flushes,
            self.reads_checked,
            self.cuts,
            self.kills,
            self.writes_in_flight_at_kill,
            self.unflushed_lost,
            self.source_connections,
            self.verify_chunks_checked,
            self.verify_mismatches
        )
    }
}

/// Around `mean` (half to one and a half of it).
fn around(rng: &mut Rng, mean: Duration) -> Duration {
    let ms = mean.as_millis() as u64;
    Duration::from_millis(ms / 2 + rng.below(ms + 1))
}

struct Model {
    durable: Vec<u8>,
    view: Vec<u8>,
    /// Acknowledged or in-flight writes since the last flush.
    pending: Vec<(u64, Vec<u8>)>,
}

impl Model {
    fn write(&mut self, off: u64, data: Vec<u8>) {
        self.view[off as usize..off as usize + data.len()].copy_from_slice(&data);
        self.pending.push((off, data));
    }

    fn flushed(&mut self) {
        for (off, data) in self.pending.drain(..) {
            self.durable[off as usize..off as usize + data.len()].copy_from_slice(&data);
        }
        debug_assert!(self.durable == self.view);
    }

    /// Checks `got` at `off` after a crash (see the module doc) and adopts
    /// it; returns how many pending writes were not kept whole.
    fn after_crash(&mut self, off: u64, got: &[u8]) -> u64 {
        for (i, &b) in got.iter().enumerate() {
            let at = off as usize + i;
            if b == self.durable[at] {
                continue;
            }
            let from_pending = self.pending.iter().any(|(o, d)| {
                let o = *o as usize;
                at >= o && at < o + d.len() && d[at - o] == b
            });
            assert!(
                from_pending,
                "byte {at} reads {b:#04x}: neither the flushed {:#04x} nor any unflushed write",
                self.durable[at]
            );
        }
        let lost = self
            .pending
            .iter()
            .filter(|(o, d)| {
                let (s, e) = (*o as usize, *o as usize + d.len());
                let (gs, ge) = (off as usize, off as usize + got.len());
                s >= gs && e <= ge && got[s - gs..e - gs] != d[..]
            })
            .count() as u64;
        self.durable[off as usize..off as usize + got.len()].copy_from_slice(got);
        self.view[off as usize..off as usize + got.len()].copy_from_slice(got);
        lost
    }
}

fn read_range(conn: &mut Conn, off: u64, len: u64) -> Vec<u8> {
    crate::start::read_export(conn, off, len)
}

/// Runs a soak in `dir`; panics (with the seed) on any loss.
pub fn run(dir: &Path, opts: &Options) -> Report {
    let began = Instant::now();
    eprintln!("soak: {opts:?} in {}", dir.display());
    let size = opts.size;
    let source = dir.join("source.img");
    let bytes = dense_file(&source, size, opts.seed);
    let export = Export::new(&source).spawn();
    let Addr::Tcp(upstream) = export.addr else {
        panic!("stream export on TCP printed {}", export.uri);
    };
    let proxy = Proxy::start(upstream);
    // Spread hydration over about 70% of the run.
    let rate = (size as f64 / (opts.duration.as_secs_f64() * 0.7)).max(64.0 * 1024.0) as u64;
    let target: PathBuf = dir.join("target.img");
    let start = Start::new(proxy.uri(""), &target, dir)
        .chunk_size("64K")
        .rate_limit(Some(&rate.to_string()));
    let mut model = Model {
        durable: bytes.clone(),
        view: bytes,
        pending: Vec::new(),
    };
    let mut rng = Rng::new(opts.seed);
    let mut report = Report::default();
    let mut running = start.spawn();
    let mut conn = running.open();
    let mut next_cut = Instant::now() + around(&mut rng, opts.cut_every);
    let mut next_kill = Instant::now() + around(&mut rng, opts.kill_every);
    let deadline = began + opts.duration;
    let mut cookie = 0u64;
    let mut write_id = 0u64;
    let mut new_write = |rng: &mut Rng| {
        let len = match rng.below(4) {
            0 => 1 + rng.below(512),
            1 => 4 * KIB * (1 + rng.below(4)),
            2 => 64 * KIB * (1 + rng.below(2)),
            _ => 1 + rng.below(256 * KIB),
        };
        let off = if rng.below(2) == 0 {
            rng.below(size - len + 1)
        } else {
            (rng.below(size / (4 * KIB)) * 4 * KIB).min(size - len)
        };
        write_id += 1;
        (
            off,
            pattern(
                opts.seed ^ write_id.wrapping_mul(0x9e37_79b9),
                off,
                len as usize,
            ),
        )
    };
    while Instant::now() < deadline {
        let now = Instant::now();
        if now >= next_cut {
            report.cuts += proxy.cut().min(1) as u64;
            next_cut = now + around(&mut rng, opts.cut_every);
        }
        if now >= next_kill {
            // A few writes on the wire, then the crash.
            let n = rng.below(4);
            for _ in 0..n {
                let (off, data) = new_write(&mut rng);
                cookie += 1;
                conn.write_request(0, cookie, off, &data)
                    .expect("send WRITE");
                model.write(off, data);
                report.writes_in_flight_at_kill += 1;
            }
            running.kill9();
            report.kills += 1;
            running = start.spawn();
            conn = running.open();
            // Check every unflushed write, and a few random ranges.
            let mut ranges: Vec<(u64, u64)> = model
                .pending
                .iter()
                .map(|(o, d)| (*o, d.len() as u64))
                .collect();
            for _ in 0..4 {
                let len = 1 + rng.below(128 * KIB);
                ranges.push((rng.below(size - len), len));
            }
            for (off, len) in ranges {
                let got = read_range(&mut conn, off, len);
                report.unflushed_lost += model.after_crash(off, &got);
                report.reads_checked += 1;
            }
            // Pending writes that were never read back whole were adopted
            // range by range above; none is pending any more.
            model.pending.clear();
            model.durable.clone_from(&model.view);
            next_kill = Instant::now() + around(&mut rng, opts.kill_every);
            continue;
        }
        match rng.below(10) {
            0..=6 => {
                let (off, data) = new_write(&mut rng);
                cookie += 1;
                conn.write_request(0, cookie, off, &data)
                    .expect("send WRITE");
                let err = conn.finish(cookie).expect("WRITE reply");
                assert_eq!(err, 0, "WRITE {off}+{} failed with {err}", data.len());
                report.writes += 1;
                report.bytes_written += data.len() as u64;
                model.write(off, data);
            }
            7 => {
                let err = conn.command(0, CMD_FLUSH, 0, 0).expect("FLUSH reply");
                assert_eq!(err, 0, "FLUSH failed with {err}");
                model.flushed();
                report.flushes += 1;
            }
            _ => {
                let len = 1 + rng.below(256 * KIB);
                let off = rng.below(size - len);
                let got = read_range(&mut conn, off, len);
                image::assert_same_bytes(
                    &got,
                    &model.view[off as usize..(off + len) as usize],
                    off,
                    "soak read",
                );
                report.reads_checked += 1;
            }
        }
    }
    // The end: flush, hand over to finalize, prove the copy.
    assert_eq!(conn.command(0, CMD_FLUSH, 0, 0).expect("FLUSH"), 0);
    model.flushed();
    report.flushes += 1;
    drop(conn);
    report.source_connections = proxy.accepted();
    let reaper = running.reap_in_background(Duration::from_secs(900));
    let out = Finalize::new(start.state_dir())
        .args(&["--verify", "--json"])
        .run_ok(Duration::from_secs(900));
    let rep = finalize::json_stdout(&out);
    let v = &rep["verify"];
    report.verify_chunks_checked = v["chunks_checked"].as_u64().unwrap_or(0);
    report.verify_mismatches = v["mismatches"]
        .as_array()
        .map_or(u64::MAX, |m| m.len() as u64);
    assert_eq!(report.verify_mismatches, 0, "finalize --verify: {rep}");
    assert_eq!(report.verify_chunks_checked, size / (64 * KIB), "{rep}");
    let status = reaper.join().expect("reaper");
    assert!(
        status.is_some_and(|s| s.success()),
        "stream start after the handover: {status:?}"
    );
    image::assert_same_bytes(
        &read_file(&target),
        &model.durable,
        0,
        "target after the soak",
    );
    // The manifest, built mostly from hashes kept across every kill and
    // cut, describes the target chunk for chunk.
    finalize::assert_manifest_matches_target(&rep, start.state_dir(), &target);
    drop(export);
    report.seconds = began.elapsed().as_secs_f64();
    report
}
