//! `stream start --mount DIR` and `--mount-only`: the volume also (or only)
//! served as the file `DIR/disk.raw` through `fuse_frontend`. Wiring
//! only: checks, mount and unmount off the async threads, messages.
//!
//! Order in `stream start`: [`preflight`] before the volume is opened (a
//! bad mount point fails before any state is created), [`mount`] once the
//! volume serves, and [`MountHandle::unmount`] after the shutdown signal
//! and *before* the volume is closed, so no FUSE request reaches a closed
//! volume.

use std::path::{Path, PathBuf};

use anyhow::Context;
use fuse_frontend::{Mount, MountError, MountOptions};
use nbd_server::BlockDevice;

/// The FUSE options of `stream start` (flattened into its arguments).
#[derive(clap::Args, Clone, Debug, Default)]
pub struct MountArgs {
    /// Also serve the volume as the file DIR/disk.raw (FUSE), for
    /// hypervisors, losetup and tools that want a path. DIR must be an
    /// empty directory; it is unmounted on SIGINT/SIGTERM.
    #[arg(long, value_name = "DIR")]
    pub mount: Option<PathBuf>,
    /// Serve only DIR/disk.raw: no NBD export.
    #[arg(long, requires = "mount")]
    pub mount_only: bool,
    /// Let other users (e.g. the hypervisor's) open DIR/disk.raw.
    #[arg(long, requires = "mount")]
    pub allow_other: bool,
}

/// Check the mount point and FUSE itself, before anything is started.
pub fn preflight(dir: &Path) -> anyhow::Result<()> {
    fuse_frontend::preflight(dir).with_context(|| format!("cannot use --mount {}", dir.display()))
}

/// A mounted `DIR/disk.raw`. Dropping it unmounts too (without waiting
/// long for requests in flight); [`MountHandle::unmount`] is the clean way.
#[derive(Debug)]
pub struct MountHandle {
    mount: Option<Mount>,
}

impl MountHandle {
    /// Unmount and wait for the requests in flight. A file still open
    /// (a loop device, a VM) is unmounted lazily with a warning, not an
    /// error: the migration state is saved either way.
    pub async fn unmount(mut self) -> anyhow::Result<()> {
        let Some(mount) = self.mount.take() else {
            return Ok(());
        };
        let dir = mount.dir().to_path_buf();
        match tokio::task::spawn_blocking(move || mount.unmount()).await? {
            Ok(()) => {
                tracing::info!("unmounted {}", dir.display());
                Ok(())
            }
            Err(e @ MountError::Busy { .. }) => {
                tracing::warn!("{e}");
                Ok(())
            }
            Err(e) => Err(e).with_context(|| format!("unmounting {}", dir.display())),
        }
    }
}

/// Mount `device` on `args.mount`, if asked; requests run on the current
/// tokio runtime.
pub async fn mount<D: BlockDevice>(
    device: D,
    args: &MountArgs,
) -> anyhow::Result<Option<MountHandle>> {
    let Some(dir) = args.mount.clone() else {
        return Ok(None);
    };
    let opts = MountOptions {
        allow_other: args.allow_other,
        ..MountOptions::default()
    };
    let runtime = tokio::runtime::Handle::current();
    let shown = dir.clone();
    let mount = tokio::task::spawn_blocking(move || Mount::new(device, &dir, &opts, runtime))
        .await?
        .with_context(|| format!("cannot mount on {}", shown.display()))?;
    Ok(Some(MountHandle { mount: Some(mount) }))
}
