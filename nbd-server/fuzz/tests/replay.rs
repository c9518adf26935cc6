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

use nbd_server_fuzz::{codecs, session, spec_seeds};

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
