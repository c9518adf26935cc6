//! Crash loop: a client writes and flushes while `stream start` is killed
//! with SIGKILL at a random moment, again and again, with hydration
//! running under a rate limit. After every restart:
//!
//! - every write acknowledged before a completed FLUSH (or acknowledged
//!   with FUA) reads back exactly;
//! - every other write of that round reads back, per chunk it touched,
//!   either entirely as it was before or entirely as written: never a mix
//!   within one chunk of one write (across chunks a multi-chunk write may
//!   be torn, as on any disk: those are counted, not failed);
//!
//! and at the end, after full hydration, the export reads exactly as the
//! model (source + surviving writes) and the target file equals it.
//!
//! `STREAM_CRASH_SEED` replays a run (the seed is printed first);
//! `STREAM_CRASH_ROUNDS` changes the number of rounds (default 40);
//! `STREAM_CRASH_ALLOW_PAGE_TEARS=1` see [`allow_page_tears`].

use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use integration::image::{KIB, assert_same_bytes, pattern, read_file};
use integration::server::Addr;
use integration::start::{mixed_image, read_export};
use integration::wire::{CMD_FLAG_FUA, CMD_FLUSH, Conn};
use integration::{Running, Start};
use test_support::Rng;

const CHUNK: u64 = 64 * KIB;
/// Most writes one round's client sends.
const MAX_WRITES: usize = 300;

#[derive(Clone, Debug)]
struct Write {
    id: u64,
    offset: u64,
    len: u64,
    fua: bool,
    /// The reply said success.
    acked: bool,
    /// Acknowledged with FUA, or before a FLUSH that completed.
    durable: bool,
}

impl Write {
    fn range(&self) -> std::ops::Range<usize> {
        self.offset as usize..(self.offset + self.len) as usize
    }
}

/// The unique bytes of write `id`.
fn bytes_of(seed: u64, w: &Write) -> Vec<u8> {
    pattern(
        seed ^ w.id.wrapping_mul(0xa076_1d64_78bd_642f),
        w.offset,
        w.len as usize,
    )
}

/// Picks a write that overlaps none of `taken`: whole chunks, small
/// unaligned, across a chunk boundary, or medium unaligned.
fn pick(rng: &mut Rng, size: u64, taken: &[(u64, u64)]) -> Option<(u64, u64)> {
    for _ in 0..32 {
        let (off, len) = match rng.below(4) {
            0 => {
                let n = 1 + rng.below(2);
                (rng.below(size / CHUNK - n + 1) * CHUNK, n * CHUNK)
            }
            1 => {
                let len = 1 + rng.below(4096);
                (rng.below(size - len), len)
            }
            2 => {
                let len = 512 + rng.below(CHUNK * 3 / 2);
                // Starts before a boundary and ends after it.
                let boundary = CHUNK * (2 + rng.below(size / CHUNK - 3));
                (boundary - 1 - rng.below(len - 1), len)
            }
            _ => {
                let len = 1 + rng.below(2 * CHUNK);
                (rng.below(size - len), len)
            }
        };
        if off + len <= size && taken.iter().all(|&(o, l)| off + len <= o || o + l <= off) {
            return Some((off, len));
        }
    }
    None
}

/// One round's client: writes (some FUA) and flushes until the server
/// goes away or `MAX_WRITES`; every write is in `log` before it is sent.
fn client(addr: Addr, seed: u64, round_seed: u64, size: u64, log: Arc<Mutex<Vec<Write>>>) {
    let Ok(mut conn) = Conn::connect(&addr) else {
        return;
    };
    // The server may die during the handshake; that ends the round.
    let ok = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        conn.negotiate("", true);
    }));
    if ok.is_err() {
        return;
    }
    let mut rng = Rng::new(round_seed);
    let mut taken = Vec::new();
    for _ in 0..MAX_WRITES {
        let Some((offset, len)) = pick(&mut rng, size, &taken) else {
            break;
        };
        taken.push((offset, len));
        let mut w = Write {
            id: round_seed.wrapping_add(taken.len() as u64),
            offset,
            len,
            fua: rng.below(10) == 0,
            acked: false,
            durable: false,
        };
        let data = bytes_of(seed, &w);
        let index = {
            let mut log = log.lock().unwrap();
            log.push(w.clone());
            log.len() - 1
        };
        let flags = if w.fua { CMD_FLAG_FUA } else { 0 };
        let cookie = 0x1000 + index as u64;
        if conn.write_request(flags, cookie, offset, &data).is_err() {
            return;
        }
        match conn.finish(cookie) {
            Ok(0) => {
                w.acked = true;
                w.durable = w.fua;
                log.lock().unwrap()[index] = w;
            }
            // An error reply: not acknowledged, either outcome allowed.
            Ok(_) => {}
            Err(_) => return,
        }
        if rng.below(5) == 0 {
            match conn.command(0, CMD_FLUSH, 0, 0) {
                Ok(0) => {
                    for w in log.lock().unwrap().iter_mut().filter(|w| w.acked) {
                        w.durable = true;
                    }
                }
                Ok(_) => {}
                Err(_) => return,
            }
        }
    }
}

/// `STREAM_CRASH_ALLOW_PAGE_TEARS=1`: accept a chunk piece of an
/// unflushed write that is torn at 4 KiB page boundaries (each page all old
/// or all new). Off by default: the design promises no mix within a chunk
/// of one write, but an in-place `pwrite` cut short by SIGKILL tears at
/// page boundaries (see the report of this test); the knob lets the rest of
/// the checks run meanwhile.
fn allow_page_tears() -> bool {
    std::env::var_os("STREAM_CRASH_ALLOW_PAGE_TEARS").is_some_and(|v| v == "1")
}

/// Every 4 KiB page (by absolute offset) of the piece at `base` is all
/// old or all new.
fn page_torn(base: u64, got: &[u8], new: &[u8], old: &[u8]) -> bool {
    let mut i = 0;
    while i < got.len() {
        let page_end = (((base + i as u64) / 4096 + 1) * 4096 - base) as usize;
        let r = i..page_end.min(got.len());
        if got[r.clone()] != new[r.clone()] && got[r.clone()] != old[r.clone()] {
            return false;
        }
        i = r.end;
    }
    true
}

/// Runs of `got` that equal the new bytes (N), the old (O), both (=) or
/// neither (X), in 512-byte sectors (the absolute offset of each run).
fn describe_mix(base: u64, got: &[u8], new: &[u8], old: &[u8]) -> String {
    let mut runs: Vec<(u64, u64, char)> = Vec::new();
    let mut i = 0;
    while i < got.len() {
        // Sectors by absolute offset, so a run edge shows the real boundary.
        let end = ((((base + i as u64) / 512 + 1) * 512 - base) as usize).min(got.len());
        let r = i..end;
        let c = match (
            got[r.clone()] == new[r.clone()],
            got[r.clone()] == old[r.clone()],
        ) {
            (true, true) => '=',
            (true, false) => 'N',
            (false, true) => 'O',
            (false, false) => 'X',
        };
        let (s, e) = (base + i as u64, base + end as u64);
        match runs.last_mut() {
            Some(last) if last.2 == c => last.1 = e,
            _ => runs.push((s, e, c)),
        }
        i = end;
    }
    runs.iter()
        .map(|(s, e, c)| format!("{c} {s}..{e}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Checks the writes of the round that just crashed against what the
/// restarted export reads, and folds what it reads into `model`.
/// Returns how many multi-chunk writes were torn across chunks.
fn verify_round(
    running: &Running,
    seed: u64,
    round: usize,
    writes: &[Write],
    model: &mut [u8],
) -> usize {
    let mut conn = running.open();
    let mut torn = 0;
    for w in writes {
        let got = read_export(&mut conn, w.offset, w.len);
        let new = bytes_of(seed, w);
        let old = model[w.range()].to_vec();
        let what = format!(
            "seed {seed:#x} round {round}: write {} at {}+{} (fua {}, acked {}, durable {})",
            w.id, w.offset, w.len, w.fua, w.acked, w.durable
        );
        if w.durable {
            assert_same_bytes(&got, &new, w.offset, &format!("{what}: a flushed write"));
        } else {
            let mut outcomes = Vec::new();
            let mut at = w.offset;
            while at < w.offset + w.len {
                let end = ((at / CHUNK + 1) * CHUNK).min(w.offset + w.len);
                let r = (at - w.offset) as usize..(end - w.offset) as usize;
                let outcome = if got[r.clone()] == new[r.clone()] {
                    "new"
                } else if got[r.clone()] == old[r.clone()] {
                    "old"
                } else if allow_page_tears()
                    && page_torn(at, &got[r.clone()], &new[r.clone()], &old[r.clone()])
                {
                    eprintln!(
                        "{what}: chunk piece {at}..{end} torn at page granularity (allowed by \
                         STREAM_CRASH_ALLOW_PAGE_TEARS): {}",
                        describe_mix(at, &got[r.clone()], &new[r.clone()], &old[r.clone()])
                    );
                    "torn"
                } else {
                    panic!(
                        "{what}: chunk piece {at}..{end} is a mix of old and new bytes: {}\n{}",
                        describe_mix(at, &got[r.clone()], &new[r.clone()], &old[r]),
                        running.log()
                    );
                };
                outcomes.push(outcome);
                at = end;
            }
            if outcomes.windows(2).any(|p| p[0] != p[1]) {
                torn += 1;
            }
        }
        model[w.range()].copy_from_slice(&got);
    }
    torn
}

#[test]
fn crash_loop_keeps_every_flushed_write() {
    let seed = std::env::var("STREAM_CRASH_SEED")
        .ok()
        .map(|s| {
            let s = s.trim_start_matches("0x");
            u64::from_str_radix(s, 16).expect("STREAM_CRASH_SEED is hex")
        })
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    let rounds: usize = std::env::var("STREAM_CRASH_ROUNDS")
        .ok()
        .map(|s| s.parse().expect("STREAM_CRASH_ROUNDS is a number"))
        .unwrap_or(40);
    eprintln!("crash loop: STREAM_CRASH_SEED={seed:#x} STREAM_CRASH_ROUNDS={rounds}");
    let t0 = Instant::now();

    let dir = tempfile::tempdir().unwrap();
    let img = mixed_image(dir.path());
    let start = Start::new(&img.path, dir.path().join("target.img"), dir.path())
        .chunk_size("64K")
        .rate_limit(Some("1M"));
    let mut model = img.expected_all();
    let mut rng = Rng::new(seed);
    let mut last: Vec<Write> = Vec::new();
    let (mut torn, mut total, mut durable) = (0, 0, 0);
    for round in 0..rounds {
        let running = start.spawn();
        torn += verify_round(&running, seed, round, &last, &mut model);
        let log = Arc::new(Mutex::new(Vec::new()));
        let writer = {
            let (addr, log) = (running.addr.clone(), log.clone());
            let (size, round_seed) = (img.size, rng.next());
            thread::spawn(move || client(addr, seed, round_seed, size, log))
        };
        // The crash point: a random moment of the client's work.
        thread::sleep(Duration::from_millis(5 + rng.below(300)));
        running.kill9();
        writer.join().expect("client thread");
        last = log.lock().unwrap().clone();
        total += last.len();
        durable += last.iter().filter(|w| w.durable).count();
    }

    // Resume without the rate limit, check the last round, hydrate.
    let start = start.rate_limit(None);
    let mut running = start.spawn();
    torn += verify_round(&running, seed, rounds, &last, &mut model);
    running.wait_hydrated(Duration::from_secs(60));
    let mut conn = running.open();
    let all = read_export(&mut conn, 0, img.size);
    drop(conn);
    assert_same_bytes(
        &all,
        &model,
        0,
        &format!("seed {seed:#x}: export after hydration vs source + surviving writes"),
    );
    running.sigterm_and_wait(Duration::from_secs(30));
    assert_same_bytes(
        &read_file(start.target_path()),
        &all,
        0,
        &format!("seed {seed:#x}: target file vs export"),
    );
    eprintln!(
        "crash loop: {rounds} rounds, {total} writes ({durable} durable), \
         {torn} torn across chunks, in {:?}",
        t0.elapsed()
    );
}
