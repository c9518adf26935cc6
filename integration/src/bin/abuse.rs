//! `cargo run --release -p integration --bin abuse [-- --size-mib 512]`:
//! `stream start` under each abuse of issue 13, one fresh process each,
//! beside a well-behaved client that reads 4 KiB at random (QD1) from the
//! part of the disk already copied. For each: the process's peak RSS, the
//! good client's p50/p99 against the same reads with no abuse, and its
//! errors. Prints a markdown table (docs/RELIABILITY.md keeps the figures).
//! `STREAM_BIN=target/release/stream` measures a release build.

use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

use integration::Start;
use integration::image::MIB;
use integration::start::Running;
use integration::wire::{CMD_CACHE, CMD_READ, Conn, request_bytes};

const GOOD_READS: usize = 3000;
/// The first part of the disk, made present before measuring.
const HOT_MIB: u64 = 64;

/// The good client: `GOOD_READS` random 4 KiB reads of the hot part.
/// Returns (p50, p99) in microseconds and the number of errors.
fn good_client(conn: &mut Conn) -> (f64, f64, usize) {
    let mut lat = Vec::with_capacity(GOOD_READS);
    let mut errors = 0;
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for _ in 0..GOOD_READS {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let off = (x % (HOT_MIB * MIB / 4096)) * 4096;
        let t = Instant::now();
        match conn.read(0, off, 4096) {
            Ok(r) if r.error.is_none() && r.data.len() == 4096 => {}
            _ => errors += 1,
        }
        lat.push(t.elapsed().as_secs_f64() * 1e6);
    }
    lat.sort_by(|a, b| a.partial_cmp(b).unwrap());
    (lat[lat.len() / 2], lat[lat.len() * 99 / 100], errors)
}

fn fresh(dir: &Path, src: &Path, extra: &[&str]) -> Running {
    let _ = std::fs::remove_dir_all(dir.join("state"));
    let _ = std::fs::remove_file(dir.join("target.img"));
    let start = Start::new(src, dir.join("target.img"), dir)
        .no_hydrate(true)
        .args(extra);
    let running = start.spawn();
    // Make the hot part present.
    let mut c = running.open();
    c.send(&request_bytes(0, CMD_CACHE, 1, 0, (HOT_MIB * MIB) as u32))
        .unwrap();
    let _ = c.recv(16).unwrap();
    running
}

fn main() {
    let mut size_mib = 512u64;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--size-mib" => size_mib = args.next().and_then(|v| v.parse().ok()).expect("MiB"),
            other => panic!("unknown argument {other:?}: use --size-mib N"),
        }
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let src = dir.join("source.img");
    integration::image::repeating_file(&src, size_mib);
    let budget_mib = 256;

    println!(
        "| abuse | peak RSS (MiB) | good p50 (µs) | good p99 (µs) | p99 / idle p99 | good errors |"
    );
    println!("|---|---|---|---|---|---|");

    // Idle: the same reads, nothing else.
    let running = fresh(dir, &src, &[]);
    let mut good = running.open();
    let (p50, idle99, e) = good_client(&mut good);
    println!(
        "| none (idle) | {:.0} | {p50:.0} | {idle99:.0} | 1.00 | {e} |",
        integration::server::peak_rss_kib(running.pid()) as f64 / 1024.0
    );
    drop(running);

    // CACHE: 4 connections x 4 requests of the whole disk at once.
    let running = fresh(dir, &src, &[]);
    let mut good = running.open();
    let mut hogs: Vec<Conn> = Vec::new();
    for _ in 0..4 {
        let mut c = running.open();
        for k in 0..4u64 {
            let len = (size_mib * MIB).min(u64::from(u32::MAX) & !0xfff) as u32;
            c.send(&request_bytes(0, CMD_CACHE, k + 1, 0, len)).unwrap();
        }
        hogs.push(c);
    }
    let (p50, p99, e) = good_client(&mut good);
    println!(
        "| 16 CACHE of the whole {size_mib} MiB disk on 4 connections | {:.0} | {p50:.0} | {p99:.0} | {:.2} | {e} |",
        integration::server::peak_rss_kib(running.pid()) as f64 / 1024.0,
        p99 / idle99
    );
    drop(hogs);
    drop(running);

    // Slow readers: 32 connections x 2 READs of 32 MiB never read.
    let running = fresh(dir, &src, &[]);
    let mut good = running.open();
    let mut hogs: Vec<Conn> = Vec::new();
    for i in 0..32u64 {
        let mut c = running.open();
        for k in 0..2u64 {
            let off = ((i * 2 + k) * 32 * MIB) % (size_mib * MIB - 32 * MIB);
            c.send(&request_bytes(0, CMD_READ, k + 1, off, (32 * MIB) as u32))
                .unwrap();
        }
        hogs.push(c);
    }
    thread::sleep(Duration::from_secs(2)); // let them fill what they can
    let (p50, p99, e) = good_client(&mut good);
    println!(
        "| 32 connections x 2 READs of 32 MiB never read (budget {budget_mib} MiB) | {:.0} | {p50:.0} | {p99:.0} | {:.2} | {e} |",
        integration::server::peak_rss_kib(running.pid()) as f64 / 1024.0,
        p99 / idle99
    );
    drop(hogs);
    drop(running);

    // Idle connections: 20,000 attempts that never negotiate, kept open
    // (the cap refuses past 128; refused ones are closed at once).
    let running = fresh(dir, &src, &[]);
    let mut good = running.open();
    let mut idle = Vec::new();
    let mut kept = 0;
    for _ in 0..20_000 {
        if let Ok(c) = Conn::connect(&running.addr) {
            idle.push(c);
            kept += 1;
        }
        if idle.len() >= 900 {
            // Stay inside this process's own open-file limit.
            idle.drain(..450);
        }
    }
    let (p50, p99, e) = good_client(&mut good);
    let st = running.status();
    println!(
        "| 20,000 connections that never negotiate ({kept} opened, {} kept) | {:.0} | {p50:.0} | {p99:.0} | {:.2} | {e} (status answered: {}) |",
        idle.len(),
        integration::server::peak_rss_kib(running.pid()) as f64 / 1024.0,
        p99 / idle99,
        st["volume"]["phase"]
    );
    drop(idle);
    drop(running);
}
