//! Sharing the target with a guest that is switched onto it live
//! (`stream detach`, docs/cutover.md).
//!
//! Why: a guest running from our export is switched by its hypervisor
//! (QEMU's `blockdev-reopen`) from the export to the target itself, with no
//! reboot. From the moment that may happen, two writers share the target:
//! us, for requests still arriving over NBD, and the guest, directly. Our
//! own bookkeeping must then never write the target on its own again:
//!
//! - no write-ahead log: a replay after a crash would put back bytes the
//!   guest may have written over directly since. A change cut short by a
//!   crash (the log's only job) was never answered, and QEMU's NBD client
//!   re-sends unanswered requests when it reconnects;
//! - no recovery that clears chunks (`recover`): data where the map says
//!   "zero" may be the guest's; such chunks are read from the target instead;
//! - nothing to fetch: every chunk is present before the target is shared,
//!   so hydration never writes it again.
//!
//! How: [`Volume::prepare_detach`] stops logging, flushes (the log rotates,
//! so every change logged before reaches the target and the log is
//! emptied), and only then records the shared state in the header
//! (`DetachRecord`, durable, never cleared). Crash at any point before that
//! record: an ordinary unclean start, the guest is still on the export.
//! After it: `open` takes the target as shared (no replay, no clearing; the
//! kept hashes are all distrusted, since which chunks the guest wrote is not
//! known).

use super::*;

impl<S: Source> Volume<S> {
    /// Whether the guest may write the target directly (see the module docs).
    pub fn target_shared(&self) -> bool {
        self.shared_target.load(Ordering::Acquire)
    }

    /// Make the target safe to share with a guest that writes it directly:
    /// every chunk must be present. Idempotent.
    pub async fn prepare_detach(&self) -> Result<()> {
        if self.read_only {
            return Err(Error::Invalid(
                "the migration is finalized: its target is no longer served".into(),
            ));
        }
        let missing = self.geometry.chunks() - self.map.present_count();
        if missing > 0 {
            return Err(Error::Invalid(format!(
                "{missing} chunks are not yet copied: the target can be shared with the \
                 guest only once hydration is complete"
            )));
        }
        self.shared_target.store(true, Ordering::Release);
        // The rotation waits for every change logged before the store above,
        // syncs the target and removes that log: afterwards there is nothing
        // to replay, and nothing is logged again.
        self.flush().await?;
        if self.header().detach.is_none() {
            self.update_header(|h| {
                h.detach = Some(state::DetachRecord {
                    prepared_at: now_secs(),
                })
            })?;
        }
        Ok(())
    }
}
