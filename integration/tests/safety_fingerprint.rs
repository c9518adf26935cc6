//! Issue 12, "Data safety", case 8: another legacy disk of the same size
//! behind the same URI is noticed, between runs and during one, and none of
//! its bytes reach the target.
//!
//! Disk A and disk B are pseudo-random files of the same size; nbdkit
//! serves one, then (killed by PID) the other on the same socket.

use std::path::Path;
use std::time::Duration;

use integration::Start;
use integration::fault::Nbdkit;
use integration::finalize::Finalize;
use integration::image::{KIB, MIB, dense_file, read_file};

const SIZE: u64 = 16 * MIB;
const CHUNK: u64 = 64 * KIB;

/// Asserts every chunk of the target is a hole (absent) or disk A's; a
/// chunk of disk B (or anything else) is named.
fn assert_only_disk_a(target: &Path, a: &[u8], b: &[u8]) -> usize {
    let t = read_file(target);
    assert_eq!(t.len(), a.len());
    let mut from_a = 0;
    for (i, chunk) in t.chunks(CHUNK as usize).enumerate() {
        let r = i * CHUNK as usize..(i + 1) * CHUNK as usize;
        if chunk == &a[r.clone()] {
            from_a += 1;
            continue;
        }
        let what = if chunk == &b[r.clone()] {
            "disk B's bytes"
        } else {
            "bytes of neither disk"
        };
        assert!(
            chunk.iter().all(|&x| x == 0),
            "chunk {i} (bytes {}..{}) of the target holds {what}",
            r.start,
            r.end
        );
    }
    from_a
}

/// Swaps the disk behind `dir/nbdkit.sock`: kills `old` by PID (on drop),
/// then serves `file` on the same socket.
fn swap(old: Nbdkit, dir: &Path, file: &Path) -> Nbdkit {
    let socket = old.socket.clone();
    drop(old);
    // A SIGKILLed nbdkit leaves its socket file behind.
    let _ = std::fs::remove_file(&socket);
    let new = Nbdkit::file(dir, file, &[]);
    assert_eq!(new.socket, socket);
    new
}

#[test]
fn another_disk_behind_the_same_uri_is_refused_on_resume() {
    let dir = tempfile::tempdir().unwrap();
    let a = dense_file(&dir.path().join("a.img"), SIZE, 0xa);
    let b = dense_file(&dir.path().join("b.img"), SIZE, 0xb);
    let kit = Nbdkit::file(dir.path(), &dir.path().join("a.img"), &[]);
    let start = Start::new(kit.uri(), dir.path().join("target.img"), dir.path())
        .chunk_size("64K")
        .rate_limit(Some("1M"));
    let mut running = start.spawn();
    running.wait_for("some chunks", Duration::from_secs(30), |st| {
        st["volume"]["bytes_present"].as_u64().unwrap_or(0) >= 2 * MIB
    });
    running.sigterm_and_wait(Duration::from_secs(30));
    assert!(
        start.state_dir().join("fingerprint.json").exists(),
        "no fingerprint recorded"
    );
    let before = read_file(start.target_path());

    let kit = swap(kit, dir.path(), &dir.path().join("b.img"));
    let out = start.refused();
    let stderr = out.stderr_lossy();
    assert!(
        stderr.contains("is not the disk this migration started from") && stderr.contains("chunk "),
        "the refusal does not name the chunk and what to do: {}",
        out.describe()
    );
    assert_eq!(
        read_file(start.target_path()),
        before,
        "the refused start changed the target"
    );
    assert_only_disk_a(start.target_path(), &a, &b);

    // finalize (no start running: it would hydrate here) refuses as well.
    let out = Finalize::new(start.state_dir()).run_fails(Duration::from_secs(60));
    assert!(
        out.stderr_lossy()
            .contains("is not the disk this migration started from"),
        "{}",
        out.describe()
    );
    assert_eq!(
        read_file(start.target_path()),
        before,
        "the refused finalize changed the target"
    );

    // The original disk back: the migration resumes and completes.
    let kit = swap(kit, dir.path(), &dir.path().join("a.img"));
    let mut running = start.spawn();
    running.wait_hydrated(Duration::from_secs(60));
    running.sigterm_and_wait(Duration::from_secs(30));
    assert_eq!(
        read_file(start.target_path()),
        a,
        "the resumed migration is not disk A"
    );
    drop(kit);
}

#[test]
fn another_disk_swapped_in_during_a_run_is_never_fetched() {
    let dir = tempfile::tempdir().unwrap();
    let a = dense_file(&dir.path().join("a.img"), SIZE, 0xa);
    let b = dense_file(&dir.path().join("b.img"), SIZE, 0xb);
    let kit = Nbdkit::file(dir.path(), &dir.path().join("a.img"), &[]);
    let start = Start::new(kit.uri(), dir.path().join("target.img"), dir.path())
        .chunk_size("64K")
        .rate_limit(Some("1M"));
    let mut running = start.spawn();
    running.wait_for("some chunks", Duration::from_secs(30), |st| {
        st["volume"]["bytes_present"].as_u64().unwrap_or(0) >= 2 * MIB
    });

    let kit = swap(kit, dir.path(), &dir.path().join("b.img"));
    // The source reconnects to disk B, checks it, and refuses it.
    let refused = |st: &serde_json::Value| {
        st["volume"]["source_health"]["state"] == "down"
            && st["volume"]["source_health"]["detail"]
                .as_str()
                .is_some_and(|d| d.contains("is not the disk this migration started from"))
    };
    let st = running.wait_for("the source to be refused", Duration::from_secs(60), |st| {
        refused(st) || st["volume"]["hydration_complete"] == true
    });
    if !refused(&st) {
        // Hydrated from disk B: name the first chunk of B in the target.
        running.sigterm_and_wait(Duration::from_secs(30));
        assert_only_disk_a(start.target_path(), &a, &b);
        panic!("disk B was not refused: {st}");
    }
    // Hydration keeps trying (and failing) for a while: nothing of B lands.
    let grown_from = st["volume"]["bytes_present"].as_u64().unwrap();
    running.wait_for("hydration to back off", Duration::from_secs(30), |st| {
        st["volume"]["source_errors"].as_u64().unwrap_or(0) >= 2
    });
    let st = running.status();
    assert_eq!(
        st["volume"]["bytes_present"].as_u64().unwrap(),
        grown_from,
        "chunks were made present from the refused disk: {st}"
    );
    running.sigterm_and_wait(Duration::from_secs(30));
    let from_a = assert_only_disk_a(start.target_path(), &a, &b);
    assert!(
        from_a >= 32,
        "only {from_a} chunks of disk A arrived before the swap"
    );
    drop(kit);
}

/// A client's partial write into a chunk not yet fetched is overlaid on
/// the source's bytes: the sample is of the source's bytes, so the same
/// disk still resumes, and another one is still refused.
#[test]
fn client_writes_do_not_enter_the_fingerprint() {
    let qemu_io = integration::require_tool("qemu-io", "qemu-utils");
    let dir = tempfile::tempdir().unwrap();
    let a = dense_file(&dir.path().join("a.img"), SIZE, 0xa);
    let _b = dense_file(&dir.path().join("b.img"), SIZE, 0xb);
    let kit = Nbdkit::file(dir.path(), &dir.path().join("a.img"), &[]);
    let start = Start::new(kit.uri(), dir.path().join("target.img"), dir.path())
        .chunk_size("64K")
        .no_hydrate(true);
    let running = start.spawn();
    // 512 bytes into the first chunk of each of two regions: fetched,
    // overlaid, written whole.
    for offset in [1000u64, SIZE / 2 + 3000] {
        integration::run_ok(
            std::process::Command::new(&qemu_io)
                .args(["-f", "raw", "-c"])
                .arg(format!("write -P 0x5a {offset} 512"))
                .arg(&running.uri),
            Duration::from_secs(60),
        );
    }
    running.sigterm_and_wait(Duration::from_secs(30));
    let fp = std::fs::read_to_string(start.state_dir().join("fingerprint.json")).unwrap();
    let fp: serde_json::Value = serde_json::from_str(&fp).unwrap();
    let samples = fp["samples"].as_array().expect("samples");
    assert_eq!(samples.len(), 2, "{fp}");
    for s in samples {
        let c = s["chunk"].as_u64().unwrap() as usize;
        let chunk = &a[c * CHUNK as usize..(c + 1) * CHUNK as usize];
        assert_eq!(
            s["blake3"].as_str().unwrap(),
            blake3::hash(chunk).to_hex().as_str(),
            "chunk {c}'s sample is not disk A's bytes (the client's write leaked in?)"
        );
    }
    // The same disk resumes...
    let running = start.spawn();
    running.sigterm_and_wait(Duration::from_secs(30));
    // ...another one does not.
    let kit = swap(kit, dir.path(), &dir.path().join("b.img"));
    let out = start.refused();
    assert!(
        out.stderr_lossy()
            .contains("is not the disk this migration started from"),
        "{}",
        out.describe()
    );
    drop(kit);
}
