//! `stream start` refuses to mix two migrations: another target, source or
//! chunk size for an existing state, a target file of the wrong size, and a
//! second process on a state in use.

use std::time::Duration;

use integration::Start;
use integration::image::MIB;
use integration::start::{mixed_image, read_export};

const STOP: Duration = Duration::from_secs(30);

/// Asserts the refusal's stderr says `what` (case-insensitive).
fn says(out: &integration::tool::Output, what: &[&str]) {
    let err = out.stderr_lossy().to_lowercase();
    for w in what {
        assert!(
            err.contains(&w.to_lowercase()),
            "the refusal does not mention {w:?}: {}",
            out.describe()
        );
    }
}

#[test]
fn mismatched_state_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let img = mixed_image(dir.path());
    let target = dir.path().join("target.img");
    let start = Start::new(&img.path, &target, dir.path())
        .chunk_size("64K")
        .no_hydrate(true);
    start.spawn().sigterm_and_wait(STOP);

    // Another target file, of the right size.
    let other_target = dir.path().join("other-target.img");
    std::fs::File::create(&other_target)
        .unwrap()
        .set_len(img.size)
        .unwrap();
    let out = start.clone().target(&other_target).refused();
    says(&out, &["target", "other-target.img"]);

    // Another source, same size and content but another file.
    let other_source = dir.path().join("other-source.img");
    std::fs::copy(&img.path, &other_source).unwrap();
    let out = start.clone().source(&other_source).refused();
    says(&out, &["source", "other-source.img"]);

    // Another chunk size.
    let out = start.clone().chunk_size("128K").refused();
    says(&out, &["chunk size", "131072"]);

    // A new migration to an existing target file of the wrong size.
    let small = dir.path().join("small-target.img");
    std::fs::File::create(&small)
        .unwrap()
        .set_len(img.size - MIB)
        .unwrap();
    let out = start
        .clone()
        .target(&small)
        .state(dir.path().join("state-small"))
        .refused();
    says(&out, &["small-target.img", &(img.size - MIB).to_string()]);
    assert_eq!(
        std::fs::metadata(&small).unwrap().len(),
        img.size - MIB,
        "refused target resized"
    );

    // The untouched original still resumes.
    let mut first = start.spawn();
    // A second process on the same state is refused (lock) ...
    let second = start
        .clone()
        .socket(dir.path().join("second.sock"))
        .refused();
    says(&second, &["in use"]);
    // ... and the first keeps serving and answering status.
    first.assert_alive();
    let mut conn = first.open();
    let got = read_export(&mut conn, 0, MIB);
    assert_eq!(
        got,
        img.expected(0, MIB as usize),
        "first process after the refusal"
    );
    drop(conn);
    let st = first.status();
    assert_eq!(
        st["pid"],
        first.pid(),
        "status answered by another process: {st}"
    );
    first.sigterm_and_wait(STOP);

    // Nothing was left running that would make status answer.
    let out = integration::start::status_json(start.state_dir());
    assert!(
        !out.status.success(),
        "status with nothing running: {}",
        out.describe()
    );
}
