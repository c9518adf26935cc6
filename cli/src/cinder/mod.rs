//! The Cinder handoff of `stream finalize --cinder-manage HOST@BACKEND#POOL`:
//! adopt the filled LV as a Cinder volume with the block-storage API's
//! manage-existing call, in the project where the tenant boots it.
//!
//! **Tested against real Keystone 30 and Cinder 29** (LVM driver) brought up
//! by `integration/openstack/bring-up`, in `integration/tests/cinder_real.rs`.
//! The unit tests beside this (`tests.rs`) cover only what needs no server.
//!
//! # Layout
//!
//! - `preflight`: is the target an LV Cinder's LVM driver can adopt (named
//!   `/dev/VG/LV`, not `volume-*`, whole GiB, not open)? Local, no network.
//! - `auth`: `OS_*` settings (password, token, application credential;
//!   `OS_CACERT`; `OS_CLOUD` through `clouds`, which reads `clouds.yaml`), the Keystone v3 token scoped to the volume's project,
//!   and the block-storage endpoint from its catalog (or `OS_ENDPOINT`).
//! - `version`: Cinder's version document and the API it leads to: the
//!   `manageable_volumes` resource at microversion 3.8, or the legacy
//!   `os-volume-manage` extension; the `OpenStack-API-Version` header
//!   every Cinder request carries.
//! - `client`: `Client::connect` (log in and negotiate), `check_manage`
//!   (pool, volume type, zone, LV in the backend's manageable list),
//!   `manage_existing`, `find_by_metadata`, `volume`, `wait_settled` (with
//!   Cinder's user message on failure), over `http` (blocking `ureq` on
//!   native-tls, i.e. OpenSSL; call it from `tokio::task::spawn_blocking`).
//! - `secret`: a password or token that is never printed, shared by `auth`
//!   and `http` (so neither depends on the other).
//!
//! # The order finalize follows (so that a re-run never manages twice)
//!
//! Before a running `stream start` is stopped or anything is written:
//!
//! 1. `Client::connect` (credentials, reachability, API version);
//! 2. the volume an earlier run made: by the id recorded in the state, else
//!    by the migration id in the metadata of the project's volumes
//!    (`stream_migration_id`), never by name; if found, skip to 6;
//! 3. `check_manage`: the pool exists, the volume type and zone exist, the
//!    LV is in the backend's manageable list (an LV held by the running
//!    `stream start` may read "Volume in use" here).
//!
//! After the handover, with every handle on the LV closed:
//!
//! 4. `preflight_lv(target, disk_size)`, `check_manage` again strictly;
//! 5. record the intent, `manage_existing`, record the id;
//! 6. `wait_settled(id, timeout)`: `available`, or Cinder's reason for
//!    `error_managing`; then the size (whole GiB) and project are checked
//!    and the migration is marked finalized. The LV is `VG/volume-<id>`.
//!
//! Errors name the endpoint, the HTTP status and Cinder's (or Keystone's)
//! message. The password and the token are never printed: they only travel
//! in request bodies and headers.

mod auth;
mod client;
mod clouds;
mod http;
mod preflight;
mod secret;
#[cfg(test)]
mod tests;
mod version;

use std::time::Duration;

pub use auth::Settings;
pub use client::{Client, FAILED, ManageRequest, ManagedVolume};
pub use preflight::{GIB, lv_names, preflight_lv};

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
    /// Keystone refused the credentials, or the scope.
    #[error(
        "Keystone refused to log {user} in to project {project}: POST {url}: HTTP 401: \
         {message}. Check OS_USERNAME/OS_USER_ID, OS_PASSWORD (or OS_TOKEN, or the \
         application credential), the user and project domains, and that the user has a \
         role on project {project} (for the manage call, the admin role: openstack role add \
         --user {user} --project {project} admin)"
    )]
    Unauthorized {
        url: String,
        message: String,
        user: String,
        project: String,
    },
    /// Cinder's policy refused a call.
    #[error(
        "{method} {url}: HTTP 403: {message}. Cinder's default policy lets only admins \
         manage volumes (volume_extension:volume_manage = rule:admin_api, which is \
         is_admin:True or role:admin in an admin project); log in as a user with the admin \
         role on the project the volume goes into"
    )]
    Forbidden {
        method: &'static str,
        url: String,
        message: String,
    },
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
    /// The version document offers nothing we can use.
    #[error("{url}: {detail}")]
    Version { url: String, detail: String },
    /// A name or value Cinder does not know (host, volume type, zone, LV).
    #[error("{0}; nothing was changed")]
    Unknown(String),
    #[error(
        "several Cinder volumes carry migration id {migration_id} ({ids}): remove the ones \
         that are not this migration's before running finalize again",
        ids = .ids.join(", ")
    )]
    Ambiguous {
        migration_id: String,
        ids: Vec<String>,
    },
    /// The volume recorded in the state is gone from Cinder.
    #[error(
        "Cinder volume {id}, recorded as this migration's, does not exist (any more) in \
         project {project}: it was deleted, or the credentials are for another project. \
         Nothing was changed"
    )]
    RecordedVolumeMissing { id: String, project: String },
    /// The driver failed to adopt the LV (`error_managing`, shown as `error`).
    #[error(
        "Cinder could not manage the LV: volume {id} is in status {status} (error_managing): \
         {fault}. The LV keeps its own name unless the driver got as far as renaming it to \
         volume-{id}. Remove the failed record before retrying (openstack volume delete {id}: \
         the LVM driver then deletes an LV named volume-{id} if there is one, never an LV \
         under another name)"
    )]
    ManageFailed {
        id: String,
        status: String,
        fault: String,
    },
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
