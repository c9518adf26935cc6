//! The connections of one source, each in a *slot*, and the task that
//! keeps a slot connected (invariant 7).
//!
//! One source holds several NBD connections, each in a *slot*: one
//! foreground slot for [`Class::Foreground`](lazy_fetch::source::Class::Foreground) reads (a client is waiting) and
//! N background slots (default 2) for hydration and block status. A 64 KiB
//! foreground read therefore never waits behind 1 MiB hydration reads on the
//! same TCP stream, nor behind their replies in the server's queue for that
//! connection.
//!
//! | thing                         | owner                                        | notes |
//! |-------------------------------|----------------------------------------------|-------|
//! | a slot's `Client`             | `SlotState::client`, under a std mutex never held across `.await` | readers take a clone (and its generation) and drop the lock before sending |
//! | (re)connecting a slot         | that slot's task alone (`run_slot`)        | so there is one connect attempt at a time per slot, never a herd of readers dialling |
//! | declaring a connection dead   | anyone: a reader that saw a connection-fatal error or a stall, or the slot task polling `is_closed` | only if the generation still matches, so a late reader cannot kill the *new* connection |
//! | outage record (`Outage`)      | the slot: set when its connection is lost or a connect fails, cleared by a successful connect | feeds [`Source::health`](lazy_fetch::source::Source::health) and the "unreachable since" messages |
//! | size refusal (`Common::refused`) | set by a slot task that reached a server of another size, cleared when one of the right size answers | while set, every read fails at once with `EIO` |
//! | the slot tasks                | [`NbdSource`](crate::NbdSource); aborted when it is dropped, which drops the clients and closes the sockets | |
//!
//! Reconnects back off exponentially per slot, from
//! [`NbdOptions::backoff_initial`](crate::NbdOptions::backoff_initial)
//! doubling to [`NbdOptions::backoff_max`](crate::NbdOptions::backoff_max);
//! a success resets the backoff and counts in [`NbdSource::reconnects`](crate::NbdSource::reconnects).

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use nbd_server::client::Client;
use tokio::sync::Notify;

use crate::connect::Common;
use crate::outage::Outage;

/// How often a slot task checks that an idle connection is still open.
const LIVENESS_POLL: Duration = Duration::from_millis(100);
/// The outage of a slot whose first connect attempt has not ended.
pub(crate) const NOT_CONNECTED_YET: &str = "not connected yet";

pub(crate) struct SlotState {
    pub(crate) client: Option<Client>,
    /// Bumped on every new connection.
    pub(crate) generation: u64,
    /// A connection was established once (a later one is a *re*connect).
    pub(crate) connected_once: bool,
    /// The current connection was checked against the fingerprint (or
    /// none was installed when it connected, see `run_slot`).
    pub(crate) fingerprint_checked: bool,
    pub(crate) outage: Option<Outage>,
}

pub(crate) struct Slot {
    pub(crate) name: String,
    pub(crate) state: Mutex<SlotState>,
    /// Readers ask the slot task to look at its connection now.
    pub(crate) wake: Notify,
}

impl Slot {
    pub(crate) fn new(name: String, client: Option<Client>, outage: Option<Outage>) -> Slot {
        Slot {
            name,
            state: Mutex::new(SlotState {
                connected_once: client.is_some(),
                fingerprint_checked: false,
                client,
                generation: 0,
                outage,
            }),
            wake: Notify::new(),
        }
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, SlotState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The open connection and its generation.
    pub(crate) fn live(&self) -> Option<(u64, Client)> {
        let st = self.lock();
        match &st.client {
            Some(c) if !c.is_closed() => Some((st.generation, c.clone())),
            _ => None,
        }
    }

    /// Forget connection `generation` (if it is still the current one).
    pub(crate) fn mark_dead(&self, generation: u64, why: String) {
        {
            let mut st = self.lock();
            if st.generation != generation || st.client.is_none() {
                return;
            }
            st.client = None;
            match &mut st.outage {
                Some(o) => o.last_error = why,
                None => st.outage = Some(Outage::new(why)),
            }
        }
        self.wake.notify_one();
    }

    pub(crate) fn outage(&self) -> Option<Outage> {
        self.lock().outage.clone()
    }
}

/// Keep one slot connected: wait while its connection lives, reconnect
/// with backoff when it does not. The only place a slot connects.
pub(crate) async fn run_slot(common: Arc<Common>, slot: Arc<Slot>) {
    let opts = &common.opts;
    let mut backoff = opts.backoff_initial;
    loop {
        while slot.live().is_some() {
            tokio::select! {
                _ = slot.wake.notified() => {}
                _ = tokio::time::sleep(LIVENESS_POLL) => {}
            }
        }
        {
            let mut st = slot.lock();
            if st.client.take().is_some() || st.outage.is_none() {
                let o = st
                    .outage
                    .get_or_insert_with(|| Outage::new("connection closed".into()));
                tracing::warn!(slot = %slot.name, uri = %common.location,
                    "NBD source connection lost: {}", o.last_error);
            }
        }
        common.notify_changed();
        let had_fingerprint = common.fingerprint().is_some();
        match common.connect_once().await {
            Ok(client) => {
                {
                    let mut st = slot.lock();
                    st.client = Some(client);
                    st.generation += 1;
                    st.fingerprint_checked = had_fingerprint;
                    st.outage = None;
                    if st.connected_once {
                        common.reconnects.fetch_add(1, Ordering::Relaxed);
                        tracing::info!(slot = %slot.name, uri = %common.location,
                            "NBD source reconnected");
                    }
                    st.connected_once = true;
                }
                backoff = opts.backoff_initial;
                // Installed while this connection was being made: check it
                // now (the install may have looked before it was stored).
                if !had_fingerprint && common.fingerprint().is_some() {
                    let _ = check_slot(&common, &slot).await;
                }
                common.notify_changed();
            }
            Err(why) => {
                tracing::debug!(slot = %slot.name, uri = %common.location,
                    "NBD source connect failed (next try in {backoff:?}): {why}");
                {
                    let mut st = slot.lock();
                    match &mut st.outage {
                        Some(o) => o.last_error = why,
                        None => st.outage = Some(Outage::new(why)),
                    }
                }
                common.notify_changed();
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(opts.backoff_max);
            }
        }
    }
}

/// Check the live connection of `slot` against the installed fingerprint
/// unless it was already; a mismatch drops the connection (and refuses the
/// source, see `check_fingerprint`).
pub(crate) async fn check_slot(common: &Common, slot: &Slot) -> Result<(), String> {
    let Some(fp) = common.fingerprint() else {
        return Ok(());
    };
    let (generation, client) = {
        let st = slot.lock();
        match &st.client {
            Some(c) if !st.fingerprint_checked && !c.is_closed() => (st.generation, c.clone()),
            _ => return Ok(()),
        }
    };
    match common.check_fingerprint(&client, &fp).await {
        Ok(()) => {
            let mut st = slot.lock();
            if st.generation == generation {
                st.fingerprint_checked = true;
            }
            Ok(())
        }
        Err(why) if common.refused().is_some() => {
            slot.mark_dead(generation, why.clone());
            Err(why)
        }
        // Could not read it: the connection is in doubt; let the slot
        // reconnect, which checks again.
        Err(why) => {
            slot.mark_dead(generation, why.clone());
            Ok(())
        }
    }
}
