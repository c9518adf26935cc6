//! `stream export` serves, beside the disk and unlisted, the blake3 of
//! each chunk of the disk for every chunk size (`blake3/SIZE/NAME`), read
//! here by real NBD clients (nbdinfo, nbdcopy): 32 bytes per chunk, equal
//! to the hashes of the file's chunks, and changed by a flipped byte.

use std::process::Command;
use std::time::Duration;

use integration::image::MIB;
use integration::start::mixed_image;
use integration::{Export, require_tool, run_ok};

fn chunk_hashes(data: &[u8], chunk: usize) -> Vec<u8> {
    data.chunks(chunk)
        .flat_map(|c| *blake3::hash(c).as_bytes())
        .collect()
}

fn hashes_uri(server_uri: &str, chunk: u64) -> String {
    // nbd://127.0.0.1:PORT/ -> nbd://127.0.0.1:PORT/blake3/CHUNK/
    format!("{}/blake3/{chunk}/", server_uri.trim_end_matches('/'))
}

#[test]
fn hash_exports_are_unlisted_and_hold_the_blake3_of_each_chunk() {
    let nbdinfo = require_tool("nbdinfo", "libnbd-bin");
    let nbdcopy = require_tool("nbdcopy", "libnbd-bin");
    let dir = tempfile::tempdir().unwrap();
    let img = mixed_image(dir.path());
    let server = Export::new(&img.path).spawn();

    let list = run_ok(
        Command::new(&nbdinfo).args(["--list", "--json", &server.uri]),
        Duration::from_secs(30),
    );
    let listed = list.stdout_lossy();
    assert!(
        !listed.contains("blake3/"),
        "hash exports are not listed:\n{listed}"
    );

    let data = std::fs::read(&img.path).unwrap();
    for chunk in [4096u64, 65536, 1 << 20] {
        let out = dir.path().join(format!("hashes-{chunk}"));
        run_ok(
            Command::new(&nbdcopy)
                .arg(hashes_uri(&server.uri, chunk))
                .arg(&out),
            Duration::from_secs(60),
        );
        let got = std::fs::read(&out).unwrap();
        assert_eq!(got.len() as u64, (16 * MIB).div_ceil(chunk) * 32);
        assert!(
            got == chunk_hashes(&data, chunk as usize),
            "hashes of {chunk}-byte chunks differ from blake3 of the file's chunks"
        );
    }

    // A flipped byte in the source changes exactly its chunk's record.
    let before = std::fs::read(dir.path().join("hashes-65536")).unwrap();
    let at = 3 * MIB + 100;
    integration::fault::damage(&img.path, at, &[data[at as usize] ^ 0x01]);
    let out = dir.path().join("after");
    run_ok(
        Command::new(&nbdcopy)
            .arg(hashes_uri(&server.uri, 65536))
            .arg(&out),
        Duration::from_secs(60),
    );
    let after = std::fs::read(&out).unwrap();
    let changed: Vec<usize> = (0..before.len() / 32)
        .filter(|i| before[i * 32..i * 32 + 32] != after[i * 32..i * 32 + 32])
        .collect();
    assert_eq!(changed, vec![(at / 65536) as usize]);
}
