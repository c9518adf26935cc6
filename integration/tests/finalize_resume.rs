//! An interrupted `stream finalize` resumes: SIGKILLed while it waits for
//! a client (the migration keeps serving), then while it writes the
//! manifest after the handover (`--force` having dropped the client), the
//! same command finishes without losing the client's writes.

use std::io::Write;
use std::time::Duration;

use integration::Start;
use integration::finalize::{self, Finalize};
use integration::image::{KIB, MIB, assert_same_bytes, pattern, read_file};
use integration::wire::{CMD_FLUSH, Conn};

const SIZE: u64 = 256 * MIB;
const CHUNK: u64 = 4 * KIB;

/// A dense source of `SIZE` bytes, quick to make: one MiB of pattern,
/// each copy stamped with its index so no two MiB are alike.
fn dense_source(path: &std::path::Path) -> Vec<u8> {
    let block = pattern(0xf1a1, 0, MIB as usize);
    let mut all = Vec::with_capacity(SIZE as usize);
    for i in 0..SIZE / MIB {
        let mut b = block.clone();
        b[..8].copy_from_slice(&i.to_le_bytes());
        all.extend_from_slice(&b);
    }
    let mut f = std::fs::File::create(path).unwrap();
    f.write_all(&all).unwrap();
    f.sync_all().unwrap();
    all
}

fn write_flush(conn: &mut Conn, model: &mut [u8], writes: &[(u8, u64, u64)]) {
    for (i, &(p, off, len)) in writes.iter().enumerate() {
        let cookie = 0x2000 + i as u64;
        conn.write_request(0, cookie, off, &vec![p; len as usize])
            .expect("send WRITE");
        assert_eq!(conn.finish(cookie).expect("WRITE reply"), 0);
        model[off as usize..(off + len) as usize].fill(p);
    }
    assert_eq!(conn.command(0, CMD_FLUSH, 0, 0).expect("FLUSH"), 0);
}

#[test]
fn interrupted_finalize_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("source.img");
    let mut model = dense_source(&src);
    let start = Start::new(&src, dir.path().join("target.img"), dir.path())
        .chunk_size("4K")
        .rate_limit(Some("1M"));
    let state = start.state_dir().to_path_buf();
    let mut running = start.spawn();
    let mut conn = running.open();
    let writes = [
        (0xa1, 3 * CHUNK + 5, 100),
        (0xa2, 100 * MIB - 10, 20),
        (0xa3, SIZE - CHUNK, CHUNK),
    ];
    write_flush(&mut conn, &mut model, &writes);

    // 1. Killed while it waits for the connected client: the migration
    //    keeps serving, the client keeps its data.
    let fin = Finalize::new(&state).spawn(dir.path());
    let mut fin = fin;
    fin.wait_for(
        "finalize to wait for the client",
        Duration::from_secs(120),
        |f| f.stderr().contains("waiting for 1 NBD client"),
    );
    fin.kill9();
    running.assert_alive();
    let st = finalize::status(&state);
    assert_eq!(st["connected_clients"], 1, "{st}");
    assert_eq!(st["volume"]["phase"], "streaming", "{st}");
    let (p, off, len) = writes[1];
    assert_eq!(conn.read_ok(off, len as u32), vec![p; len as usize]);
    // More writes after the interrupted finalize: they must end up in the target.
    write_flush(&mut conn, &mut model, &[(0xb1, 7 * CHUNK, 2 * CHUNK)]);

    // 2. --force drops the client; killed while the manifest is written,
    //    after `stream start` handed over and exited.
    let reaper = running.reap_in_background(Duration::from_secs(120));
    let mut fin = Finalize::new(&state).args(&["--force"]).spawn(dir.path());
    let tmp = state.join(".manifest.chunks.tmp");
    fin.wait_for(
        "the manifest to be in progress",
        Duration::from_secs(120),
        |_| tmp.exists(),
    );
    fin.kill9();
    let status = reaper.join().unwrap().expect("stream start did not exit");
    assert!(status.success(), "stream start exited with {status}");
    assert!(
        conn.closed_within(Duration::from_secs(10)),
        "--force left the client connected"
    );
    let h = finalize::header(&state);
    assert_eq!(h["phase"], "finalizing", "{h}");
    assert_ne!(h["finalize"]["manifest_written"], true, "{h}");
    assert!(
        !state.join("manifest.json").exists(),
        "manifest.json before the manifest completed"
    );

    // 3. The same command again: finishes, everything written is there.
    let out = Finalize::new(&state)
        .args(&["--verify", "--json"])
        .run_ok(Duration::from_secs(120));
    let report = finalize::json_stdout(&out);
    assert_eq!(report["phase"], "finalized", "{report}");
    assert_eq!(
        report["verify"]["mismatches"],
        serde_json::json!([]),
        "{report}"
    );
    // 1 + 2 (across a boundary) + 1 + 2 chunks.
    assert_eq!(
        report["manifest"]["counts"]["written_by_clients"], 6,
        "{report}"
    );
    let target = start.target_path();
    integration::finalize::assert_manifest_matches_target(&report, &state, target);
    assert_same_bytes(
        &read_file(target),
        &model,
        0,
        "target after the resumed finalize",
    );
    assert!(
        !tmp.exists(),
        "the interrupted manifest's temp file is left behind"
    );
}
