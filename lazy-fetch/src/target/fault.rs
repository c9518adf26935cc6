//! Any backend with faults injected: failing writes or syncs with an errno
//! (a full target, a dying disk), and seeded scheduling jitter that makes
//! each I/O take a different, reproducible time, so the order in which
//! concurrent requests finish varies from seed to seed.

use std::io;
use std::sync::Arc;
use std::sync::Mutex;
use std::time::Duration;

use super::Backend;

/// What to inject; change it while the target is in use with
/// [`FaultBackend::set`].
#[derive(Clone, Debug, Default)]
pub struct Faults {
    /// Writes and zeroing fail with this errno.
    pub write_errno: Option<i32>,
    /// Syncs fail with this errno.
    pub sync_errno: Option<i32>,
    /// Each I/O first waits 0..=this many microseconds (seeded).
    pub jitter_us: u64,
}

#[derive(Debug)]
pub struct FaultBackend {
    inner: Arc<dyn Backend>,
    faults: Mutex<Faults>,
    rng: Mutex<u64>,
}

impl FaultBackend {
    pub fn new(inner: Arc<dyn Backend>, seed: u64) -> FaultBackend {
        FaultBackend {
            inner,
            faults: Mutex::new(Faults::default()),
            rng: Mutex::new(seed | 1),
        }
    }

    pub fn set(&self, faults: Faults) {
        *self.faults.lock().expect("poisoned") = faults;
    }

    fn before(&self, write: bool, sync: bool) -> io::Result<()> {
        let f = self.faults.lock().expect("poisoned").clone();
        if f.jitter_us > 0 {
            let r = {
                // xorshift64*: deterministic per seed.
                let mut x = self.rng.lock().expect("poisoned");
                *x ^= *x >> 12;
                *x ^= *x << 25;
                *x ^= *x >> 27;
                x.wrapping_mul(0x2545_f491_4f6c_dd1d)
            };
            let us = r % (f.jitter_us + 1);
            if us > 0 {
                std::thread::sleep(Duration::from_micros(us));
            }
        }
        match (write, sync, f.write_errno, f.sync_errno) {
            (true, _, Some(e), _) | (_, true, _, Some(e)) => Err(io::Error::from_raw_os_error(e)),
            _ => Ok(()),
        }
    }
}

impl Backend for FaultBackend {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.before(false, false)?;
        self.inner.read_at(buf, offset)
    }

    fn write_at(&self, data: &[u8], offset: u64) -> io::Result<()> {
        self.before(true, false)?;
        self.inner.write_at(data, offset)
    }

    fn write_bulk(&self, data: &[u8], offset: u64) -> io::Result<()> {
        self.before(true, false)?;
        self.inner.write_bulk(data, offset)
    }

    fn zero(&self, offset: u64, len: u64, allocate: bool) -> io::Result<()> {
        self.before(true, false)?;
        self.inner.zero(offset, len, allocate)
    }

    fn sync(&self) -> io::Result<()> {
        self.before(false, true)?;
        self.inner.sync()
    }

    fn data_extents(&self, offset: u64, end: u64) -> io::Result<Vec<(u64, u64)>> {
        self.inner.data_extents(offset, end)
    }

    fn identity(&self) -> (u64, u64) {
        self.inner.identity()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::target::memory::MemoryBackend;

    #[test]
    fn injected_errnos_fail_writes_and_syncs_but_not_reads() {
        let f = FaultBackend::new(Arc::new(MemoryBackend::new(8192)), 1);
        f.set(Faults {
            write_errno: Some(libc::ENOSPC),
            sync_errno: Some(libc::EIO),
            jitter_us: 5,
        });
        let e = f.write_at(&[1], 0).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ENOSPC));
        assert_eq!(f.sync().unwrap_err().raw_os_error(), Some(libc::EIO));
        f.read_at(&mut [0; 4], 0).unwrap();
        f.set(Faults::default());
        f.write_at(&[1], 0).unwrap();
    }
}
