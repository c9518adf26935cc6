//! The real-OS boot row of the suite: boots the fixture image
//! ([`crate::boot`]) from one peer's export and reports the time to the
//! guest's marker line.
//!
//! The suite serves the image's `disk.img` as the source (nbdkit's file
//! plugin behind the same link filters as every other source) and puts
//! each peer in front of it, so the boot goes through the same peer code
//! as every other scenario. The bytes each boot fetched are counted by
//! `boot_bench`, which puts nbdkit's stats filter on the source.

use std::path::PathBuf;
use std::time::Duration;

use crate::boot::{self, BootImage, BootSpec};

/// A boot that takes longer than this is a failure, not a figure.
const BOOT_TIMEOUT: Duration = Duration::from_secs(180);

/// What one boot measured.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BootResult {
    /// From the qemu process start to the guest's marker line.
    pub seconds: f64,
}

/// Boot `image` from the NBD export `peer_uri`, the console copied to
/// `log`. `Err` carries why no figure is available.
pub fn run_boot(peer_uri: &str, image: &BootImage, log: PathBuf) -> Result<BootResult, String> {
    let spec = BootSpec {
        disk: peer_uri,
        kernel: &image.kernel,
        initrd: &image.initrd,
        timeout: BOOT_TIMEOUT,
        log,
    };
    let r = boot::boot_once(&spec).map_err(|e| e.to_string())?;
    Ok(BootResult {
        seconds: r.seconds_to_marker(),
    })
}
