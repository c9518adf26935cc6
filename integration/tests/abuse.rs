//! Clients that misbehave must not take `stream start` down, nor starve
//! the clients that behave (issue 13): CACHE costs bounded memory, the
//! connection count is capped with the refusal logged, and replies nobody
//! reads wait within a budget instead of growing the process.

use std::time::{Duration, Instant};

use integration::image::MIB;
use integration::start::read_export;
use integration::wire::{CMD_CACHE, CMD_READ, request_bytes};
use integration::{Running, Start};

const STOP: Duration = Duration::from_secs(30);

fn reply_cookie(conn: &mut integration::wire::Conn) -> u64 {
    let head = conn.recv(16).unwrap();
    integration::wire::be64(&head[8..16])
}

/// Four CACHE requests of the whole 512 MiB disk at once: each used to
/// hold the range in memory (2.1 GB RSS); now they stream through runs.
#[test]
fn concurrent_whole_disk_caches_cost_bounded_memory() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("source.img");
    integration::image::repeating_file(&src, 512);
    let start = Start::new(&src, dir.path().join("target.img"), dir.path()).no_hydrate(true);
    let running = start.spawn();
    let before = integration::server::peak_rss_kib(running.pid());
    let mut conn = running.open();
    for cookie in 1..=4 {
        conn.send(&request_bytes(0, CMD_CACHE, cookie, 0, 512 * MIB as u32))
            .unwrap();
    }
    let mut answered: Vec<u64> = (0..4).map(|_| reply_cookie(&mut conn)).collect();
    answered.sort();
    assert_eq!(answered, vec![1, 2, 3, 4]);
    let st = running.status();
    assert_eq!(st["volume"]["hydration_complete"], true, "{st}");
    let peak = integration::server::peak_rss_kib(running.pid());
    eprintln!("CACHE 4 x 512 MiB: peak RSS {before} KiB before, {peak} KiB after");
    assert!(
        peak < 128 * 1024,
        "peak RSS {peak} KiB for 4 x 512 MiB CACHE (was 2.1 GB before the fix)"
    );
    drop(conn);
    running.sigterm_and_wait(STOP);
}

fn assert_refused(running: &Running) {
    // A refused connection is closed before any greeting: EOF at once.
    let mut c = running.connect();
    let deadline = Instant::now() + Duration::from_secs(10);
    match c.recv(8) {
        Err(_) => {}
        Ok(b) => panic!("a connection past the cap got {b:?}"),
    }
    assert!(Instant::now() < deadline);
}

/// Past --max-connections a connection is closed at once and the refusal
/// logged; the control plane answers; a slot frees when a client leaves.
#[test]
fn connections_past_the_cap_are_refused_and_logged_and_others_go_on() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("source.img");
    integration::image::repeating_file(&src, 8);
    let start = Start::new(&src, dir.path().join("target.img"), dir.path())
        .no_hydrate(true)
        .args(&["--max-connections", "3"]);
    let running = start.spawn();
    let mut good = running.open();
    let idle1 = running.connect(); // never negotiates
    let idle2 = running.connect();
    // Both idle sessions count once the server accepted them.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let mut probe = running.connect();
        if probe.recv(8).is_err() {
            break;
        }
        drop(probe);
        assert!(Instant::now() < deadline, "never reached the cap");
    }
    assert_refused(&running);
    assert!(
        running
            .log()
            .contains("refused a connection: 3 sessions already"),
        "{}",
        running.log()
    );
    // The served client and the control plane still work at the cap.
    let got = read_export(&mut good, 4096, 4096);
    assert_eq!(got.len(), 4096);
    let st = running.status();
    assert_eq!(st["volume"]["phase"], "streaming", "{st}");
    // One idle client leaves: a new client is served.
    drop(idle1);
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut again = loop {
        let mut c = running.connect();
        if c.greeting().is_ok() {
            break c;
        }
        assert!(Instant::now() < deadline, "no slot after a client left");
    };
    let _ = again.start();
    drop((idle2, again, good));
    running.sigterm_and_wait(STOP);
}

/// Eight clients each ask for two 16 MiB READs and never read the replies;
/// with a 32 MiB budget the process stays bounded and a client that reads
/// its replies keeps being served, right.
#[test]
fn replies_nobody_reads_wait_within_the_budget_and_others_are_served() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("source.img");
    integration::image::repeating_file(&src, 64);
    let start = Start::new(&src, dir.path().join("target.img"), dir.path())
        .no_hydrate(true)
        .args(&["--buffer-budget", "32M"]);
    let running = start.spawn();
    let mut hogs = Vec::new();
    for i in 0..8u64 {
        let mut c = running.open();
        for k in 0..2u64 {
            let off = (i * 2 + k) % 4 * 16 * MIB;
            c.send(&request_bytes(0, CMD_READ, k + 1, off, 16 * MIB as u32))
                .unwrap();
        }
        hogs.push(c);
    }
    let mut good = running.open();
    let t0 = Instant::now();
    for i in 0..50u64 {
        let off = 40 * MIB + i * 8192;
        let got = read_export(&mut good, off, 4096);
        let want: Vec<u8> = (off..off + 4096)
            .map(|b| ((b % MIB) % 251) as u8 | 1)
            .collect();
        assert_eq!(got, want, "read at {off}");
    }
    eprintln!("50 reads of 4 KiB beside 8 hogs: {:?}", t0.elapsed());
    let peak = integration::server::peak_rss_kib(running.pid());
    eprintln!("peak RSS with 8 x 2 x 16 MiB unread replies, 32 MiB budget: {peak} KiB");
    // 128 MiB for the process, the 32 MiB budget, 2 MiB reserve each.
    assert!(
        peak < (128 + 32 + 9 * 2) * 1024,
        "peak RSS {peak} KiB (was 1.08 GB for 32 such clients)"
    );
    drop(hogs);
    drop(good);
    running.sigterm_and_wait(STOP);
}
