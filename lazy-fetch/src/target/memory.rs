//! A target in memory, for engine tests: the bytes, which 4 KiB pages hold
//! data (so recovery's hole scan works as on a sparse file), and the image
//! as of the last sync (what a power loss would leave).

use std::io;
use std::sync::Mutex;

use super::Backend;

const PAGE: u64 = 4096;

#[derive(Debug)]
pub struct MemoryBackend {
    inner: Mutex<Inner>,
}

#[derive(Debug)]
struct Inner {
    bytes: Vec<u8>,
    /// One flag per page: written since it was last punched.
    allocated: Vec<bool>,
    /// The bytes at the last sync.
    durable: Vec<u8>,
    syncs: u64,
}

impl MemoryBackend {
    /// A target of `size` bytes, all holes.
    pub fn new(size: u64) -> MemoryBackend {
        let len = usize::try_from(size).expect("an in-memory target fits in memory");
        MemoryBackend {
            inner: Mutex::new(Inner {
                bytes: vec![0; len],
                allocated: vec![false; in_memory(size.div_ceil(PAGE))],
                durable: vec![0; len],
                syncs: 0,
            }),
        }
    }

    /// What a reader sees now.
    pub fn image(&self) -> Vec<u8> {
        self.inner.lock().expect("poisoned").bytes.clone()
    }

    /// What the last sync made durable.
    pub fn durable_image(&self) -> Vec<u8> {
        self.inner.lock().expect("poisoned").durable.clone()
    }

    pub fn syncs(&self) -> u64 {
        self.inner.lock().expect("poisoned").syncs
    }
}

fn range(len: usize, offset: u64, n: u64) -> io::Result<std::ops::Range<usize>> {
    let end = offset
        .checked_add(n)
        .filter(|&e| e <= len as u64)
        .ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))?;
    Ok(in_memory(offset)..in_memory(end))
}

/// An offset, length or page number of the target, which is held in
/// memory whole: it fits a usize.
fn in_memory(n: u64) -> usize {
    usize::try_from(n).expect("inside the in-memory target")
}

impl Backend for MemoryBackend {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let t = self.inner.lock().expect("poisoned");
        let r = range(t.bytes.len(), offset, buf.len() as u64)?;
        buf.copy_from_slice(&t.bytes[r]);
        Ok(())
    }

    fn write_at(&self, data: &[u8], offset: u64) -> io::Result<()> {
        let mut t = self.inner.lock().expect("poisoned");
        let r = range(t.bytes.len(), offset, data.len() as u64)?;
        t.bytes[r.clone()].copy_from_slice(data);
        for p in r.start as u64 / PAGE..(r.end as u64).div_ceil(PAGE) {
            t.allocated[in_memory(p)] = true;
        }
        Ok(())
    }

    fn zero(&self, offset: u64, len: u64, allocate: bool) -> io::Result<()> {
        let mut t = self.inner.lock().expect("poisoned");
        let r = range(t.bytes.len(), offset, len)?;
        t.bytes[r.clone()].fill(0);
        // Pages wholly inside are punched unless asked to stay allocated.
        let (first, last) = ((r.start as u64).div_ceil(PAGE), r.end as u64 / PAGE);
        for p in first..last.max(first) {
            t.allocated[in_memory(p)] = allocate;
        }
        Ok(())
    }

    fn sync(&self) -> io::Result<()> {
        let mut t = self.inner.lock().expect("poisoned");
        t.durable = t.bytes.clone();
        t.syncs += 1;
        Ok(())
    }

    fn data_extents(&self, offset: u64, end: u64) -> io::Result<Vec<(u64, u64)>> {
        let t = self.inner.lock().expect("poisoned");
        let mut out: Vec<(u64, u64)> = Vec::new();
        for p in offset / PAGE..end.div_ceil(PAGE) {
            if !t.allocated[in_memory(p)] {
                continue;
            }
            let (s, e) = ((p * PAGE).max(offset), ((p + 1) * PAGE).min(end));
            match out.last_mut() {
                Some(l) if l.1 == s => l.1 = e,
                _ => out.push((s, e)),
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_allocate_punches_free_and_sync_takes_the_durable_image() {
        let m = MemoryBackend::new(4 * PAGE);
        m.write_at(&[7; 10], PAGE + 5).unwrap();
        assert_eq!(m.data_extents(0, 4 * PAGE).unwrap(), vec![(PAGE, 2 * PAGE)]);
        m.sync().unwrap();
        m.zero(0, 4 * PAGE, false).unwrap();
        assert!(m.data_extents(0, 4 * PAGE).unwrap().is_empty());
        assert!(m.image().iter().all(|&b| b == 0));
        assert_eq!(m.durable_image()[in_memory(PAGE) + 5], 7);
        assert!(m.write_at(&[1], 4 * PAGE).is_err());
    }
}
