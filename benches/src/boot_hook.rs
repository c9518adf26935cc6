//! HOOK for the real-OS boot benchmark of issue 6 (built by another
//! helper in `benches/src/boot.rs`).
//!
//! The suite calls [`run_boot`] for each peer when given `--boot`. Until
//! the boot module is wired in, it answers "not available" and the suite
//! reports the boot row as such. To wire it at merge: add `pub mod boot;`
//! to `lib.rs` and make [`run_boot`] call `crate::boot::run_boot(peer_uri,
//! ..)`, mapping its result to [`BootResult`].

/// What one boot measured.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BootResult {
    /// From the first guest read until the guest signalled "booted".
    pub seconds: f64,
    /// Bytes the boot read from the peer.
    pub bytes_fetched: u64,
}

/// Boot the fixture OS from the NBD export `peer_uri`. `Err` carries why
/// no figure is available.
pub fn run_boot(_peer_uri: &str) -> Result<BootResult, String> {
    Err("the boot benchmark (benches/src/boot.rs) is not wired into the suite yet".into())
}
