//! The tuning of an NBD source: connections, windows, backoff. The rules
//! these numbers feed are in `slot.rs` (reconnects) and `retry.rs` (reads).

use std::time::Duration;

/// Tuning of an [`NbdSource`](crate::NbdSource).
#[derive(Clone, Debug)]
pub struct NbdOptions {
    /// Connections for hydration and block status (at least 1).
    pub background_connections: usize,
    /// Bound on one connect plus handshake.
    pub connect_timeout: Duration,
    /// How long a foreground read keeps retrying before `EIO`.
    pub foreground_retry_window: Duration,
    /// How long a background read or block status keeps retrying.
    pub background_retry_window: Duration,
    /// A request without a reply for this long marks its connection dead.
    pub stall_timeout: Duration,
    /// First reconnect backoff after a failed attempt.
    pub backoff_initial: Duration,
    /// Cap of the doubling backoff.
    pub backoff_max: Duration,
    /// How many times a read the server failed with `EIO` is resent.
    pub server_eio_retries: u32,
}

impl Default for NbdOptions {
    fn default() -> Self {
        NbdOptions {
            background_connections: 2,
            connect_timeout: Duration::from_secs(10),
            foreground_retry_window: Duration::from_secs(30),
            background_retry_window: Duration::from_secs(30),
            stall_timeout: Duration::from_secs(20),
            backoff_initial: Duration::from_millis(100),
            backoff_max: Duration::from_secs(5),
            server_eio_retries: 2,
        }
    }
}
