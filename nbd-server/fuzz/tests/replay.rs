//! Corpus replay on stable Rust: every file under `corpus/<target>/` runs
//! through the same function as the libFuzzer target, so CI catches a
//! regression on any saved input (seeds, and crashes once fixed and
//! added) without nightly or libFuzzer.
//!
//! `cargo test` (from `nbd-server/fuzz`) replays. The hand-built spec
//! seeds are checked to be present and current; rewrite them with
//! `WRITE_SPEC_SEEDS=1 cargo test spec_seeds`.

use std::fs;
use std::path::{Path, PathBuf};

use nbd_server_fuzz::{client_session, codecs, session, spec_seeds};

fn corpus(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("corpus")
        .join(target)
}

fn replay(target: &str, run: fn(&[u8])) {
    let dir = corpus(target);
    let mut files: Vec<PathBuf> = fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    assert!(!files.is_empty(), "empty corpus {}", dir.display());
    for f in &files {
        let data = fs::read(f).unwrap();
        eprintln!("{target}: {} ({} bytes)", f.display(), data.len());
        run(&data);
    }
}

#[test]
fn handshake_and_requests_corpus_replays_cleanly() {
    replay("handshake_and_requests", session::run);
}

#[test]
fn option_parsing_corpus_replays_cleanly() {
    replay("option_parsing", codecs::run);
}

#[test]
fn client_replies_corpus_replays_cleanly() {
    replay("client_replies", client_session::run);
}

/// The recorded server side of the client's request sequence is in the
/// corpus and current (rewrite with `WRITE_SPEC_SEEDS=1`), and every
/// prefix of it (a server that hung up at that byte) ends cleanly.
#[test]
fn client_replies_seed_is_current_and_its_prefixes_end_cleanly() {
    let seed = client_session::record();
    let path = corpus("client_replies").join("ours-requests-0");
    if std::env::var_os("WRITE_SPEC_SEEDS").is_some() {
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(&path, &seed).unwrap();
    }
    assert_eq!(
        fs::read(&path).ok().as_deref(),
        Some(&seed[..]),
        "{} is stale: WRITE_SPEC_SEEDS=1 cargo test --release",
        path.display()
    );
    for cut in (0..seed.len()).step_by(97) {
        client_session::run(&seed[..cut]);
    }
}

/// Every prefix of a real session is a session whose client vanished at
/// that byte: the server must end each one cleanly too.
#[test]
fn truncated_spec_sessions_end_cleanly() {
    for (_, bytes) in spec_seeds::sessions() {
        for cut in (0..bytes.len()).step_by(7) {
            session::run(&bytes[..cut]);
        }
    }
}

#[test]
fn spec_seeds_are_in_the_corpus() {
    let write = std::env::var_os("WRITE_SPEC_SEEDS").is_some();
    for (target, seeds) in [
        ("handshake_and_requests", spec_seeds::sessions()),
        ("option_parsing", spec_seeds::codecs()),
    ] {
        for (name, bytes) in seeds {
            let path = corpus(target).join(name);
            if write {
                fs::create_dir_all(corpus(target)).unwrap();
                fs::write(&path, &bytes).unwrap();
            } else {
                let on_disk = fs::read(&path).unwrap_or_default();
                assert!(
                    on_disk == bytes,
                    "{} is missing or stale: run WRITE_SPEC_SEEDS=1 cargo test spec_seeds",
                    path.display()
                );
            }
        }
    }
}
