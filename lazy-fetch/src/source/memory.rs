//! A source in memory, for engine tests: bytes, holes reported through
//! block status, an optional seeded delay per read (so concurrent fetches
//! finish in another order per seed), and a log of every read it served
//! (so a test can count fetches).

use std::io;
use std::ops::Range;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::{Class, Extent, Source};
use crate::state::SourceId;

pub struct MemorySource {
    data: Arc<Vec<u8>>,
    holes: Vec<Range<u64>>,
    /// xorshift state for the delays; 0: no delay.
    rng: Mutex<u64>,
    max_delay_us: u64,
    reads: Mutex<Vec<(u64, usize)>>,
}

impl MemorySource {
    /// `data`, with `holes` reported as such (they must read as zeros).
    pub fn new(data: Vec<u8>, holes: Vec<Range<u64>>) -> MemorySource {
        MemorySource {
            data: Arc::new(data),
            holes,
            rng: Mutex::new(0),
            max_delay_us: 0,
            reads: Mutex::new(Vec::new()),
        }
    }

    /// Each read first waits 0..`max_us` µs, drawn from `seed`.
    pub fn with_delays(mut self, seed: u64, max_us: u64) -> MemorySource {
        self.rng = Mutex::new(seed | 1);
        self.max_delay_us = max_us;
        self
    }

    /// Every read served so far: (offset, length).
    pub fn reads(&self) -> Vec<(u64, usize)> {
        self.reads.lock().expect("poisoned").clone()
    }

    fn delay(&self) -> Duration {
        if self.max_delay_us == 0 {
            return Duration::ZERO;
        }
        let mut x = self.rng.lock().expect("poisoned");
        *x ^= *x >> 12;
        *x ^= *x << 25;
        *x ^= *x >> 27;
        Duration::from_micros(x.wrapping_mul(0x2545_f491_4f6c_dd1d) % self.max_delay_us)
    }
}

impl Source for MemorySource {
    fn id(&self) -> SourceId {
        SourceId {
            kind: "memory".into(),
            location: "memory:test".into(),
            size: self.data.len() as u64,
        }
    }

    async fn read(&self, offset: u64, len: usize, _class: Class) -> io::Result<Vec<u8>> {
        let d = self.delay();
        if !d.is_zero() {
            tokio::time::sleep(d).await;
        }
        let s = usize::try_from(offset).map_err(io::Error::other)?;
        let out = self
            .data
            .get(s..s + len)
            .ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))?
            .to_vec();
        self.reads.lock().expect("poisoned").push((offset, len));
        Ok(out)
    }

    async fn block_status(&self, offset: u64, len: u64) -> io::Result<Option<Vec<Extent>>> {
        let end = offset + len;
        let mut out = Vec::new();
        let mut at = offset;
        while at < end {
            let hole = self.holes.iter().find(|h| h.contains(&at));
            let next = match hole {
                Some(h) => h.end.min(end),
                None => self
                    .holes
                    .iter()
                    .map(|h| h.start)
                    .filter(|&s| s > at)
                    .min()
                    .unwrap_or(end)
                    .min(end),
            };
            out.push(match hole {
                Some(_) => Extent {
                    length: next - at,
                    hole: true,
                    zero: true,
                },
                None => Extent::data(next - at),
            });
            at = next;
        }
        Ok(Some(out))
    }
}
