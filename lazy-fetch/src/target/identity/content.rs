//! **Content** ([`first_nonzero`]). A regular file is checked exactly and
//! cheaply: only its data extents (`SEEK_DATA`) are read, up to the first
//! non-zero byte. A block device has no extents to ask for, and reading a
//! whole terabyte at start is not cheap; it is sampled: the first and the
//! last MiB (partition tables, boot sectors, filesystem and LVM labels and
//! the GPT backup live there, so any formatted or used disk shows there)
//! and 256 blocks of 4 KiB spread evenly between them.

use std::fs::File;
use std::io;
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::path::Path;

const SAMPLE_EDGE: u64 = 1 << 20;
const SAMPLES: u64 = 256;
const SAMPLE_LEN: u64 = 4096;

fn nonzero_in(f: &File, start: u64, end: u64) -> io::Result<Option<u64>> {
    let mut buf = vec![0u8; crate::units::mem_len(SAMPLE_EDGE)];
    let mut at = start;
    while at < end {
        let n = (end - at).min(SAMPLE_EDGE) as usize;
        let got = f.read_at(&mut buf[..n], at)?;
        if got == 0 {
            break;
        }
        if let Some(i) = buf[..got].iter().position(|&b| b != 0) {
            return Ok(Some(at + i as u64));
        }
        at += got as u64;
    }
    Ok(None)
}

/// The offset of a non-zero byte in `target`, if one is found (exactly for
/// files, by sampling for block devices; see the module docs), and whether
/// the check was a sample.
pub fn first_nonzero(target: &Path) -> io::Result<(Option<u64>, bool)> {
    let f = File::open(target)?;
    let m = f.metadata()?;
    if !m.file_type().is_block_device() {
        for (s, e, data) in block_device::file::extents(&f, 0, m.len(), usize::MAX)? {
            if data && let Some(at) = nonzero_in(&f, s, e)? {
                return Ok((Some(at), false));
            }
        }
        return Ok((None, false));
    }
    use std::io::Seek;
    let size = (&f).seek(io::SeekFrom::End(0))?;
    if let Some(at) = nonzero_in(&f, 0, size.min(SAMPLE_EDGE))? {
        return Ok((Some(at), true));
    }
    if let Some(at) = nonzero_in(&f, size.saturating_sub(SAMPLE_EDGE), size)? {
        return Ok((Some(at), true));
    }
    if size > 2 * SAMPLE_EDGE {
        let span = size - 2 * SAMPLE_EDGE;
        for i in 0..SAMPLES {
            let at = (SAMPLE_EDGE + span / SAMPLES * i) & !(SAMPLE_LEN - 1);
            if let Some(x) = nonzero_in(&f, at, (at + SAMPLE_LEN).min(size))? {
                return Ok((Some(x), true));
            }
        }
    }
    Ok((None, true))
}
