//! The state directory's file system is on the clients' write path: a
//! write to a copied chunk is logged there before it lands. Its room is
//! reserved up front, so a state file system that fills up does not turn
//! into client ENOSPC, and a short one is warned about (issue 13).

use std::io::Write;
use std::time::Duration;

use integration::Start;
use integration::fault::Tmpfs;
use integration::image::{MIB, dense_file};
use integration::wire::{CMD_CACHE, CMD_FLUSH, request_bytes};

const STOP: Duration = Duration::from_secs(30);

/// Write zeros into `path` until the file system says ENOSPC.
fn fill(path: &std::path::Path) {
    let mut f = std::fs::File::create(path).unwrap();
    let block = vec![0u8; 1 << 20];
    loop {
        match f.write_all(&block) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => break,
            Err(e) => panic!("filling {}: {e}", path.display()),
        }
    }
    let _ = f.flush();
}

#[test]
fn writes_to_copied_chunks_succeed_after_the_state_file_system_fills() {
    let dir = tempfile::tempdir().unwrap();
    let source = dir.path().join("source.img");
    dense_file(&source, 16 * MIB, 0x57a7e);
    let fs = Tmpfs::mount(&dir.path().join("statefs"), "96m");
    let start = Start::new(&source, dir.path().join("target.img"), dir.path())
        .state(fs.path.join("state"))
        .no_hydrate(true);
    let running = start.spawn();
    let mut conn = running.open();
    conn.send(&request_bytes(0, CMD_CACHE, 1, 0, (8 * MIB) as u32))
        .unwrap();
    assert_eq!(conn.finish(1).unwrap(), 0, "CACHE");
    assert_eq!(conn.command(0, CMD_FLUSH, 0, 0).unwrap(), 0, "FLUSH");

    // Something else fills the state's file system.
    fill(&fs.path.join("filler"));
    assert!(fs.free() < MIB, "{} bytes still free", fs.free());

    // 4 MiB of writes to copied chunks, no flush: each is logged first.
    let data = vec![0x5a; 64 * 1024];
    for i in 0..64u64 {
        conn.write_request(0, 100 + i, i * 128 * 1024, &data)
            .expect("send WRITE");
        assert_eq!(
            conn.finish(100 + i).expect("WRITE reply"),
            0,
            "write {i} to a copied chunk with the state file system full:\n{}",
            running.log()
        );
    }
    // The flush retires the generation and moves its reserve on.
    assert_eq!(conn.command(0, CMD_FLUSH, 0, 0).unwrap(), 0, "FLUSH");
    assert!(
        !running.log().contains("cannot reserve"),
        "{}",
        running.log()
    );
    drop(conn);
    std::fs::remove_file(fs.path.join("filler")).unwrap();
    running.sigterm_and_wait(STOP);
}

#[test]
fn a_state_file_system_short_of_room_is_warned_about_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let source = dir.path().join("source.img");
    dense_file(&source, 4 * MIB, 1);
    let fs = Tmpfs::mount(&dir.path().join("statefs"), "16m");
    let start = Start::new(&source, dir.path().join("target.img"), dir.path())
        .state(fs.path.join("state"))
        .no_hydrate(true);
    let running = start.spawn();
    let log = running.log();
    assert!(
        log.contains("MiB free; client writes to copied chunks are logged there"),
        "{log}"
    );
    running.sigterm_and_wait(STOP);
}
