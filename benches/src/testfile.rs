//! The test file every server exports.
//!
//! Pseudo-random bytes (test-support's xorshift64* `Rng`, fixed seed), so no server can take a
//! shortcut for zeros or holes, written in full and fsynced so every block
//! is allocated, then read once end to end so the page cache is hot for
//! every server alike (the machine has far more RAM than the file).

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use test_support::Rng;

const BLOCK: usize = 1 << 20;

/// Create `path` with `size` bytes (a multiple of 1 MiB) of pseudo-random
/// data and check that the filesystem allocated all of it.
pub fn create(path: &Path, size: u64) -> io::Result<()> {
    assert!(size % BLOCK as u64 == 0, "size must be a multiple of 1 MiB");
    let mut f = OpenOptions::new().write(true).create_new(true).open(path)?;
    let mut rng = Rng::new(0x9e37_79b9_7f4a_7c15);
    let mut buf = vec![0u8; BLOCK];
    for _ in 0..size / BLOCK as u64 {
        rng.fill(&mut buf);
        f.write_all(&buf)?;
    }
    f.sync_all()?;
    let allocated = f.metadata()?.blocks() * 512;
    if allocated < size {
        return Err(io::Error::other(format!(
            "{}: only {allocated} of {size} bytes allocated",
            path.display()
        )));
    }
    Ok(())
}

/// Read the whole file once (to make the page cache hot); returns the
/// number of bytes read.
pub fn warm(path: &Path) -> io::Result<u64> {
    let mut f = File::open(path)?;
    let mut buf = vec![0u8; BLOCK];
    let mut total = 0u64;
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            return Ok(total);
        }
        total += n as u64;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn created_file_has_no_zero_4k_block_and_is_allocated() {
        let dir = std::env::temp_dir().join(format!("testfile-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("t.img");
        create(&path, 2 << 20).unwrap();
        let data = std::fs::read(&path).unwrap();
        assert_eq!(data.len(), 2 << 20);
        assert!(data.chunks(4096).all(|b| b.iter().any(|&x| x != 0)));
        assert_eq!(warm(&path).unwrap(), 2 << 20);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
