//! Loop devices over files, detached on drop: a real block device for
//! tests of block-device paths, LVM-like layouts and FUSE-backed files.
//! Attaching needs root and the loop module; [`LoopDevice::try_attach`]
//! says why it failed, so a test can skip where loop devices cannot be
//! made, and [`LoopDevice::attach`] panics with it.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::tool::{find_tool, run};

/// How long `losetup` may take.
const LOSETUP: Duration = Duration::from_secs(30);

/// A loop device attached to a file; detached (by its name) on drop.
pub struct LoopDevice {
    /// `/dev/loopN`.
    pub path: PathBuf,
}

impl LoopDevice {
    /// `losetup --find --show [--read-only] FILE`, or why not (losetup
    /// missing, not root, no free device).
    pub fn try_attach(file: &Path, read_only: bool) -> Result<LoopDevice, String> {
        let losetup =
            find_tool("losetup").ok_or("losetup is not in PATH (Debian package `mount`)")?;
        let mut cmd = Command::new(losetup);
        cmd.args(["--find", "--show"]);
        if read_only {
            cmd.arg("--read-only");
        }
        let out = run(cmd.arg(file), LOSETUP);
        let name = out.stdout_lossy().trim().to_owned();
        if !out.status.success() || !name.starts_with("/dev/loop") {
            return Err(out.describe());
        }
        Ok(LoopDevice {
            path: PathBuf::from(name),
        })
    }

    /// [`LoopDevice::try_attach`]; panics with the reason.
    pub fn attach(file: &Path, read_only: bool) -> LoopDevice {
        LoopDevice::try_attach(file, read_only)
            .unwrap_or_else(|why| panic!("cannot attach {}: {why}", file.display()))
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let out = run(Command::new("losetup").arg("-d").arg(&self.path), LOSETUP);
        if !out.status.success() {
            eprintln!("detaching {}: {}", self.path.display(), out.describe());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Where loop devices can be made (root, loop module), one reads its
    /// file and is gone after drop; elsewhere the reason is given.
    #[test]
    fn a_loop_device_reads_its_file_and_is_detached_on_drop() {
        let dir = std::env::temp_dir().join(format!("ts-loop-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("disk.img");
        std::fs::write(&file, vec![7u8; 1 << 20]).unwrap();
        match LoopDevice::try_attach(&file, true) {
            Ok(lo) => {
                let path = lo.path.clone();
                assert_eq!(std::fs::read(&path).unwrap(), vec![7u8; 1 << 20]);
                drop(lo);
                let out = run(Command::new("losetup").arg(&path), LOSETUP);
                assert!(
                    !out.stdout_lossy().contains("disk.img"),
                    "{}",
                    out.describe()
                );
            }
            Err(why) => eprintln!("skipped: {why}"),
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
