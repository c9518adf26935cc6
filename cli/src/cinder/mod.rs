//! The Cinder handoff of `stream finalize --cinder-manage HOST@BACKEND#POOL`:
//! adopt the filled LV as a Cinder volume with the block-storage API's
//! manage-existing call, so Nova can boot from it.
//!
//! **Tested against the OpenStack API reference's recorded sample responses
//! only (`vendor-fixtures/openstack/`, served by a local HTTP server in the
//! tests), never against a live cloud.** The LV checks are tested on loop
//! devices and a fake `/dev`, never with LVM.
//!
//! # Layout
//!
//! - `preflight`: is the target an LV Cinder's LVM driver can adopt (named
//!   `/dev/VG/LV`, not `volume-*`, whole GiB, not open)? Local, no network.
//! - `auth`: `OS_*` settings, the Keystone v3 token and the block-storage
//!   endpoint from its catalog (or an explicit `OS_ENDPOINT`).
//! - `client`: `Client::manage_existing`, `find_volume_by_name`,
//!   `wait_available` over `http` (blocking `ureq`; call it from
//!   `tokio::task::spawn_blocking` in async code).
//! - `secret`: a password or token that is never printed, shared by `auth`
//!   and `http` (so neither depends on the other).
//!
//! # The order finalize follows (so that a re-run never manages twice)
//!
//! 1. `Client::from_env()`;
//! 2. `find_volume_by_name(NAME)`: if found, a previous run's manage call
//!    went through (its answer may have been lost): skip to 5. The LV has
//!    possibly been renamed to `volume-<uuid>` already, so this comes
//!    *before* the preflight;
//! 3. `preflight_lv(target, disk_size)`;
//! 4. `manage_existing(&ManageRequest)`;
//! 5. `wait_available(id, timeout)`; the volume's LV is then
//!    `/dev/VG/volume-<id>`.
//!
//! Errors name the endpoint, the HTTP status and Cinder's (or Keystone's)
//! message. The password and the token are never printed: they only travel
//! in request bodies and headers.

mod auth;
mod client;
mod http;
mod preflight;
mod secret;
#[cfg(test)]
mod tests;

use std::time::Duration;

// The API finalize uses; unused in the binary until it is wired.
#[allow(unused_imports)]
pub use auth::{Identity, NameOrId, Secret, Settings};
#[allow(unused_imports)]
pub use client::{Client, ManageRequest, ManagedVolume};
#[allow(unused_imports)]
pub use preflight::{GIB, Holder, LvRef, PreflightError, Roots, preflight_lv, preflight_lv_in};

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What can go wrong talking to Keystone and Cinder.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The `OS_*` environment is incomplete or contradictory.
    #[error("OpenStack settings: {0}")]
    Config(String),
    #[error("{method} {url}: {message}")]
    Transport {
        method: &'static str,
        url: String,
        message: String,
    },
    /// Keystone refused the credentials.
    #[error(
        "Keystone refused the credentials: POST {url}: HTTP 401: {message}; check \
         OS_USERNAME/OS_USER_ID, OS_PASSWORD (or OS_TOKEN), the user and project domains \
         and OS_PROJECT_NAME/OS_PROJECT_ID"
    )]
    Unauthorized { url: String, message: String },
    /// Any other answer that is not a success.
    #[error("{method} {url}: HTTP {status}: {message}")]
    Http {
        method: &'static str,
        url: String,
        status: u16,
        message: String,
    },
    #[error("{url}: {detail}")]
    BadResponse { url: String, detail: String },
    #[error("{0}")]
    NoEndpoint(String),
    #[error(
        "several Cinder volumes are named {name} ({ids}); use a unique --volume-name",
        ids = .ids.join(", ")
    )]
    Ambiguous { name: String, ids: Vec<String> },
    /// The driver failed to adopt the LV (`error_managing`, shown as `error`).
    #[error(
        "Cinder could not manage the LV: volume {id} is in status {status} (error_managing). \
         Look for the reason in the cinder-volume log of the backend host. The LV keeps its \
         own name unless the driver got as far as renaming it to volume-{id}. Remove the \
         failed record before retrying (openstack volume delete {id}: the LVM driver then \
         deletes an LV named volume-{id} if there is one, never an LV under another name)"
    )]
    ManageFailed { id: String, status: String },
    #[error("volume {id} is {status}, not available: it is not the volume this run is adopting")]
    UnexpectedStatus { id: String, status: String },
    #[error(
        "volume {id} still {status} after {waited:?}; run finalize again to keep waiting \
         (it will not manage the LV twice)"
    )]
    Timeout {
        id: String,
        status: String,
        waited: Duration,
    },
}
