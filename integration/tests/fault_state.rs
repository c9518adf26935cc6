//! A damaged state directory is detected at start and refused with an
//! error naming the file and the next step, never silently trusted; a torn
//! last journal batch (a flush that was never acknowledged) is cut off;
//! a second `stream start` on a state in use names the holder's PID.

use std::path::Path;
use std::time::Duration;

use integration::Start;
use integration::fault::{damage, truncate};
use integration::image::{KIB, MIB, read_file};
use integration::start::{mixed_image, read_export};
use integration::wire::CMD_FLUSH;

const CHUNK: u64 = 64 * KIB;

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        if !e.file_type().unwrap().is_file() {
            continue; // the control socket
        }
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

/// Two flushed writes (two journal batches), then SIGKILL: no clean close
/// folds the journal into the map.
fn state_with_two_batches(start: &Start) -> Vec<(u64, Vec<u8>)> {
    let running = start.spawn();
    let mut conn = running.open();
    let mut writes = Vec::new();
    for (i, at) in [2 * CHUNK, 9 * CHUNK].into_iter().enumerate() {
        let data = vec![0xa0 + i as u8; CHUNK as usize];
        conn.write_request(0, i as u64, at, &data).unwrap();
        assert_eq!(conn.finish(i as u64).unwrap(), 0, "WRITE");
        assert_eq!(conn.command(0, CMD_FLUSH, 0, 0).unwrap(), 0, "FLUSH");
        writes.push((at, data));
    }
    drop(conn);
    running.kill9();
    writes
}

#[test]
fn damaged_state_files_are_refused_with_the_file_and_the_next_step() {
    let dir = tempfile::tempdir().unwrap();
    let img = mixed_image(dir.path());
    let target = dir.path().join("target.img");
    let good = Start::new(&img.path, &target, dir.path())
        .chunk_size("64K")
        .no_hydrate(true);
    let writes = state_with_two_batches(&good);
    let journal_len = std::fs::metadata(good.state_dir().join("journal"))
        .unwrap()
        .len();
    assert!(journal_len > 16 + 2 * 24, "journal of {journal_len} bytes");
    let target_before = read_file(&target);

    type Damage = fn(&Path);
    let cases: [(&str, &str, Damage); 10] = [
        (
            "state.json: a digit changed (valid JSON)",
            "state.json",
            |d| {
                let p = d.join("state.json");
                let t = std::fs::read_to_string(&p)
                    .unwrap()
                    .replacen("65536", "65537", 1);
                std::fs::write(p, t).unwrap();
            },
        ),
        ("state.json: cut in half", "state.json", |d| {
            let p = d.join("state.json");
            truncate(&p, std::fs::metadata(&p).unwrap().len() / 2);
        }),
        ("state.json: empty", "state.json", |d| {
            truncate(&d.join("state.json"), 0)
        }),
        ("state.json: removed, map kept", "state.json", |d| {
            std::fs::remove_file(d.join("state.json")).unwrap()
        }),
        ("map: one byte flipped", "map", |d| {
            damage(&d.join("map"), 30, b"\xff")
        }),
        ("map: cut short", "map", |d| truncate(&d.join("map"), 20)),
        ("map: removed", "map", |d| {
            std::fs::remove_file(d.join("map")).unwrap()
        }),
        (
            "journal: first batch damaged, second intact",
            "journal",
            |d| damage(&d.join("journal"), 16 + 17, b"\x55"),
        ),
        ("journal: magic damaged", "journal", |d| {
            damage(&d.join("journal"), 0, b"X")
        }),
        ("journal: generation made newer", "journal", |d| {
            damage(&d.join("journal"), 8, b"\x7f")
        }),
    ];
    let mut refused = 0;
    for (i, (what, file, hurt)) in cases.iter().enumerate() {
        let state = dir.path().join(format!("state-{i}"));
        copy_dir(good.state_dir(), &state);
        hurt(&state);
        let before: Vec<_> = ["state.json", "map", "journal"]
            .iter()
            .map(|f| std::fs::read(state.join(f)).ok())
            .collect();
        let out = good.clone().state(&state).refused();
        let err = out.stderr_lossy();
        eprintln!("{what}: {}", err.lines().last().unwrap_or(""));
        assert!(
            err.contains(&state.join(file).display().to_string()),
            "{what}: the refusal does not name {file}: {}",
            out.describe()
        );
        assert!(
            err.contains("restore") || err.contains("new state directory"),
            "{what}: the refusal does not say what to do: {}",
            out.describe()
        );
        let after: Vec<_> = ["state.json", "map", "journal"]
            .iter()
            .map(|f| std::fs::read(state.join(f)).ok())
            .collect();
        assert_eq!(before, after, "{what}: the refused state was changed");
        refused += 1;
    }
    assert_eq!(
        read_file(&target),
        target_before,
        "a refusal touched the target"
    );
    eprintln!("{refused} damaged states refused");

    // A torn last batch (cut mid-batch) is a flush that was never
    // acknowledged: it is cut off, and the batch before it is kept.
    let state = dir.path().join("state-torn");
    copy_dir(good.state_dir(), &state);
    truncate(&state.join("journal"), journal_len - 5);
    let running = good.clone().state(&state).spawn();
    let st = running.status();
    assert!(
        st["volume"]["chunks_written"].as_u64().unwrap() >= 1,
        "the first flushed batch was lost: {st}"
    );
    let mut conn = running.open();
    let (at, data) = &writes[0];
    assert_eq!(
        &read_export(&mut conn, *at, CHUNK),
        data,
        "the first flushed write after the torn tail was cut"
    );
    drop(conn);
    running.sigterm_and_wait(Duration::from_secs(30));
}

#[test]
fn second_start_on_a_state_in_use_names_the_holder() {
    let dir = tempfile::tempdir().unwrap();
    let img = mixed_image(dir.path());
    let start = Start::new(&img.path, dir.path().join("target.img"), dir.path())
        .chunk_size("64K")
        .no_hydrate(true);
    let mut first = start.spawn();
    for _ in 0..3 {
        let out = start
            .clone()
            .socket(dir.path().join("second.sock"))
            .refused();
        let err = out.stderr_lossy();
        assert!(
            err.contains("in use") && err.contains(&first.pid().to_string()),
            "the refusal does not name the holder's pid {}: {}",
            first.pid(),
            out.describe()
        );
    }
    first.assert_alive();
    let mut conn = first.open();
    assert_eq!(
        read_export(&mut conn, 0, MIB),
        img.expected(0, MIB as usize)
    );
    drop(conn);
    first.sigterm_and_wait(Duration::from_secs(30));
}
