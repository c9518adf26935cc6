//! Readahead: sequential reads of absent data (a booting OS) start a
//! background fetch of the chunks that follow, in a growing window.

use super::*;

/// Readahead state. One task at a time fetches chunks `at..until`; a
/// sequential read that wants more extends `until` while it runs, so no
/// request for readahead is ever dropped.
#[derive(Debug, Default)]
pub(super) struct Readahead {
    /// Byte offset a sequential read would start at next.
    next: u64,
    window: u64,
    at: u64,
    until: u64,
    running: bool,
}

impl<S: Source> Volume<S> {
    /// Sequential reads of absent data (a booting OS) start readahead of the
    /// chunks that follow, in a window that doubles up to [`MAX_READAHEAD`].
    pub(super) fn note_sequential(self: &Arc<Self>, offset: u64, len: u64) {
        let end = offset + len;
        let next = self.geometry.chunk_of(end.min(self.geometry.size() - 1)).0;
        {
            let mut ra = self.readahead.lock().expect("poisoned");
            let sequential =
                offset == ra.next && offset != 0 || (offset < ra.next && end > ra.next);
            ra.next = end;
            if !sequential {
                ra.window = 0;
                return;
            }
            ra.window = (ra.window * 2).clamp(4, MAX_READAHEAD);
            let until = (next + ra.window).min(self.geometry.chunks());
            if ra.running {
                // Extend the window of the task that runs.
                ra.at = ra.at.max(next);
                ra.until = ra.until.max(until);
            } else {
                (ra.at, ra.until) = (next, until);
            }
            if ra.running || ra.at >= ra.until {
                return;
            }
            ra.running = true;
        }
        self.readahead_alive.0.fetch_add(1, Ordering::AcqRel);
        let volume = self.clone();
        let alive = self.readahead_alive.clone();
        tokio::spawn(async move {
            loop {
                let (i, until) = {
                    let mut ra = volume.readahead.lock().expect("poisoned");
                    if ra.at >= ra.until {
                        ra.running = false;
                        break;
                    }
                    (ra.at, ra.until)
                };
                let n = match volume
                    .fetch_run_from(
                        ChunkIndex(i),
                        usize::try_from(until - i).map_or(MAX_RUN, |n| n.min(MAX_RUN)),
                        Class::Foreground,
                    )
                    .await
                {
                    // Present or busy (a client is fetching it): move on.
                    Ok(0) | Err(_) => 1,
                    Ok(n) => n as u64,
                };
                let mut ra = volume.readahead.lock().expect("poisoned");
                ra.at = ra.at.max(i + n);
            }
            drop(volume);
            alive.0.fetch_sub(1, Ordering::AcqRel);
            alive.1.notify_waiters();
        });
    }
}
