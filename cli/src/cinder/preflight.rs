//! Is this LV ready to be adopted by Cinder's LVM driver?
//!
//! What the driver does on manage-existing (cinder/volume/drivers/lvm.py):
//! it looks the LV up by name in its volume group, reports its size rounded
//! *up* to a whole GiB, and renames it to `volume-<uuid>`. Hence the checks,
//! in this order, each failing with what to do:
//!
//! 1. the target is a block device reachable as `/dev/VG/LV` (given as that,
//!    as `/dev/mapper/VG-LV`, as `/dev/dm-N` or through any symlink);
//! 2. the LV is not named `volume-*`: that is Cinder's own name template, so
//!    the driver would take it for a volume it already manages;
//! 3. its size is a whole number of GiB, so the size Cinder records is the
//!    size of the device, and at least the size of the migrated disk;
//! 4. nothing holds it open: no process has a file descriptor on it, it is
//!    not mounted, no device (dm, loop) is stacked on it. Cinder's own list of
//!    manageable volumes marks an open LV "not safe to manage".
//!
//! The roots (`/dev`, `/proc`, `/sys`) are injectable so tests can run on
//! loop devices and a fake `/dev` of symlinks; LVM itself is never called.

use std::fs;
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Component, Path, PathBuf};

/// One GiB, the unit in which Cinder counts volume sizes.
pub const GIB: u64 = 1 << 30;

/// Cinder's default `volume_name_template` is `volume-%s`.
const CINDER_PREFIX: &str = "volume-";

/// An LV found by [`preflight_lv`]: what goes into `ref.source-name`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LvRef {
    /// Volume group name.
    pub vg: String,
    /// Logical volume name (the `source-name` of the manage request).
    pub lv: String,
    /// Size of the device in bytes (a whole number of GiB once checked).
    pub size: u64,
}

impl LvRef {
    /// `VG/LV`, as LVM commands take it.
    pub fn full_name(&self) -> String {
        format!("{}/{}", self.vg, self.lv)
    }

    #[cfg(test)]
    /// The size in GiB Cinder will record.
    pub fn size_gib(&self) -> u64 {
        self.size.div_ceil(GIB)
    }
}

/// Where the system directories are; `Roots::default()` is the real system.
#[derive(Debug, Clone)]
pub struct Roots {
    pub dev: PathBuf,
    pub proc: PathBuf,
    pub sys: PathBuf,
}

impl Default for Roots {
    fn default() -> Self {
        Roots {
            dev: "/dev".into(),
            proc: "/proc".into(),
            sys: "/sys".into(),
        }
    }
}

/// Something that keeps the LV open.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Holder {
    /// A process with a file descriptor on the device.
    Process { pid: u32, command: String },
    /// The device is mounted here (in our mount namespace).
    Mount { mount_point: String },
    /// A device stacked on it (`/sys/dev/block/M:m/holders`), e.g. `dm-4`.
    Device { name: String },
}

impl std::fmt::Display for Holder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Holder::Process { pid, command } if *pid == std::process::id() => {
                write!(f, "PID {pid} ({command}, this process)")
            }
            Holder::Process { pid, command } => write!(f, "PID {pid} ({command})"),
            Holder::Mount { mount_point } => write!(f, "a mount on {mount_point}"),
            Holder::Device { name } => write!(f, "device {name} stacked on it"),
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PreflightError {
    #[error("cannot use {path} for Cinder: {source}")]
    Stat {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "{path} is not a block device; --cinder-manage needs the target to be an LVM \
         logical volume (/dev/VG/LV) on the cinder-volume host"
    )]
    NotBlockDevice { path: PathBuf },
    #[error(
        "{path} is a block device but not reachable as {dev}/VG/LV, so it is not an LVM \
         logical volume Cinder's LVM driver can adopt; stream into an LV \
         (lvcreate -L <N>G -n <name> <vg>) or skip --cinder-manage"
    )]
    NotAnLv { path: PathBuf, dev: PathBuf },
    #[error(
        "LV {vg}/{lv} is named like a Cinder volume (volume-*): Cinder would take it for a \
         volume it already manages. If it is a Cinder volume, it needs no manage call: \
         finalize without --cinder-manage. Otherwise rename it first: lvrename {vg} {lv} <new-name>"
    )]
    CinderName { vg: String, lv: String },
    #[error("cannot read the size of LV {vg}/{lv}: {source}")]
    Size {
        vg: String,
        lv: String,
        #[source]
        source: io::Error,
    },
    #[error(
        "LV {vg}/{lv} is {size} bytes, not a whole number of GiB: Cinder would record \
         {gib} GiB for a smaller device. Extend it to a whole GiB first: \
         lvextend -L {gib}G {vg}/{lv}"
    )]
    NotWholeGib {
        vg: String,
        lv: String,
        size: u64,
        gib: u64,
    },
    #[error(
        "LV {vg}/{lv} ({size} bytes) is smaller than the migrated disk ({volume_size} bytes); \
         it cannot hold the volume"
    )]
    TooSmall {
        vg: String,
        lv: String,
        size: u64,
        volume_size: u64,
    },
    #[error(
        "LV {vg}/{lv} is open ({holders}); Cinder renames the LV on manage and must have it \
         to itself: shut the instance down, stop what serves or mounts it, then run \
         finalize again",
        holders = list(.holders)
    )]
    Open {
        vg: String,
        lv: String,
        holders: Vec<Holder>,
    },
}

fn list(holders: &[Holder]) -> String {
    holders
        .iter()
        .map(|h| h.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// Check `target` on the real system; see the module docs for the checks.
pub fn preflight_lv(target: &Path, volume_size: u64) -> Result<LvRef, PreflightError> {
    preflight_lv_in(&Roots::default(), target, volume_size)
}

/// [`preflight_lv`] with the system directories at `roots`.
pub fn preflight_lv_in(
    roots: &Roots,
    target: &Path,
    volume_size: u64,
) -> Result<LvRef, PreflightError> {
    let meta = fs::metadata(target).map_err(|source| PreflightError::Stat {
        path: target.to_owned(),
        source,
    })?;
    if !meta.file_type().is_block_device() {
        return Err(PreflightError::NotBlockDevice {
            path: target.to_owned(),
        });
    }
    let rdev = meta.rdev();
    let (vg, lv) = find_lv(roots, target, rdev).ok_or_else(|| PreflightError::NotAnLv {
        path: target.to_owned(),
        dev: roots.dev.clone(),
    })?;

    if lv.starts_with(CINDER_PREFIX) {
        return Err(PreflightError::CinderName { vg, lv });
    }

    let size = device_size(target).map_err(|source| PreflightError::Size {
        vg: vg.clone(),
        lv: lv.clone(),
        source,
    })?;
    if size % GIB != 0 {
        let gib = size.div_ceil(GIB);
        return Err(PreflightError::NotWholeGib { vg, lv, size, gib });
    }
    if size < volume_size {
        return Err(PreflightError::TooSmall {
            vg,
            lv,
            size,
            volume_size,
        });
    }

    // Scanned after our own descriptor (device_size) is closed.
    let holders = holders(roots, rdev);
    if !holders.is_empty() {
        return Err(PreflightError::Open { vg, lv, holders });
    }
    Ok(LvRef { vg, lv, size })
}

/// The (VG, LV) names of `target` without the size and holder checks: what
/// finalize asks Cinder about before the handover, while a running `stream
/// start` still holds the LV open.
pub fn lv_names(target: &Path) -> Result<(String, String), PreflightError> {
    let roots = Roots::default();
    let meta = fs::metadata(target).map_err(|source| PreflightError::Stat {
        path: target.to_owned(),
        source,
    })?;
    if !meta.file_type().is_block_device() {
        return Err(PreflightError::NotBlockDevice {
            path: target.to_owned(),
        });
    }
    find_lv(&roots, target, meta.rdev()).ok_or_else(|| PreflightError::NotAnLv {
        path: target.to_owned(),
        dev: roots.dev.clone(),
    })
}

/// Size of a block device: seeking to its end works without an ioctl.
fn device_size(path: &Path) -> io::Result<u64> {
    let mut f = fs::File::open(path)?;
    f.seek(SeekFrom::End(0))
}

/// The (VG, LV) whose `<dev>/VG/LV` is the device `rdev`: from the path as
/// given, then from its canonical form, then by scanning `<dev>/mapper` and
/// `<dev>/*/*`. A name only counts once `<dev>/VG/LV` is that very device.
fn find_lv(roots: &Roots, target: &Path, rdev: u64) -> Option<(String, String)> {
    let is_it = |(vg, lv): &(String, String)| {
        fs::metadata(roots.dev.join(vg).join(lv))
            .map(|m| m.file_type().is_block_device() && m.rdev() == rdev)
            .unwrap_or(false)
    };
    let mut named = vec![target.to_owned()];
    if let Ok(canonical) = fs::canonicalize(target) {
        named.push(canonical);
    }
    if let Some(found) = named
        .iter()
        .filter_map(|p| name_from_path(&roots.dev, p))
        .find(is_it)
    {
        return Some(found);
    }

    let entries = |dir: &Path| -> Vec<PathBuf> {
        fs::read_dir(dir)
            .map(|rd| rd.filter_map(|e| e.ok().map(|e| e.path())).collect())
            .unwrap_or_default()
    };
    let mut scan = entries(&roots.dev.join("mapper"));
    for dir in entries(&roots.dev) {
        if dir.is_dir() && !dir.is_symlink() {
            scan.extend(entries(&dir));
        }
    }
    scan.sort();
    scan.iter()
        .filter_map(|p| name_from_path(&roots.dev, p))
        .find(is_it)
}

/// `<dev>/VG/LV` or `<dev>/mapper/VG-LV` read lexically as (VG, LV).
fn name_from_path(dev: &Path, path: &Path) -> Option<(String, String)> {
    let rest = path.strip_prefix(dev).ok()?;
    let parts: Vec<&str> = rest
        .components()
        .map(|c| match c {
            Component::Normal(s) => s.to_str(),
            _ => None,
        })
        .collect::<Option<_>>()?;
    let (vg, lv) = match parts.as_slice() {
        ["mapper", name] => decode_dm_name(name)?,
        [vg, lv] => ((*vg).to_owned(), (*lv).to_owned()),
        _ => return None,
    };
    // Directories of /dev that are not volume groups.
    const NOT_VG: &[&str] = &["mapper", "disk", "block", "char", "bus", "input", "net"];
    (lvm_name(&vg) && lvm_name(&lv) && !NOT_VG.contains(&vg.as_str())).then_some((vg, lv))
}

/// Device-mapper names of LVs are `VG-LV` with every `-` inside a name
/// doubled. Internal devices (`vg-lv-real`, `vg-pool-tpool`) do not parse.
fn decode_dm_name(name: &str) -> Option<(String, String)> {
    let mut vg = String::new();
    let mut lv: Option<String> = None;
    let mut chars = name.chars().peekable();
    while let Some(c) = chars.next() {
        let part = lv.as_mut().unwrap_or(&mut vg);
        if c != '-' {
            part.push(c);
        } else if chars.peek() == Some(&'-') {
            chars.next();
            part.push('-');
        } else if lv.is_none() {
            lv = Some(String::new());
        } else {
            return None;
        }
    }
    let lv = lv?;
    (!vg.is_empty() && !lv.is_empty()).then_some((vg, lv))
}

/// LVM's characters for VG and LV names: `[A-Za-z0-9+_.-]`, no leading `-`.
fn lvm_name(s: &str) -> bool {
    !s.is_empty()
        && !s.starts_with('-')
        && s != "."
        && s != ".."
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "+_.-".contains(c))
}

/// Everything keeping the device `rdev` open that we can see: descriptors of
/// every process in `<proc>`, mounts in `<proc>/self/mountinfo`, devices in
/// `<sys>/dev/block/M:m/holders`. Unreadable entries (processes that exit
/// while we look) are skipped.
pub fn holders(roots: &Roots, rdev: u64) -> Vec<Holder> {
    let mut found = Vec::new();
    let (major, minor) = (libc::major(rdev), libc::minor(rdev));

    let mut pids: Vec<u32> = fs::read_dir(&roots.proc)
        .map(|rd| {
            rd.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    pids.sort_unstable();
    for pid in pids {
        let proc_dir = roots.proc.join(pid.to_string());
        let Ok(fds) = fs::read_dir(proc_dir.join("fd")) else {
            continue;
        };
        let holds = fds.filter_map(Result::ok).any(|fd| {
            fs::metadata(fd.path())
                .map(|m| m.file_type().is_block_device() && m.rdev() == rdev)
                .unwrap_or(false)
        });
        if holds {
            let command = fs::read_to_string(proc_dir.join("comm"))
                .map(|s| s.trim_end().to_owned())
                .unwrap_or_else(|_| "?".into());
            found.push(Holder::Process { pid, command });
        }
    }

    let dev_id = format!("{major}:{minor}");
    if let Ok(mountinfo) = fs::read_to_string(roots.proc.join("self/mountinfo")) {
        for line in mountinfo.lines() {
            let fields: Vec<&str> = line.split(' ').collect();
            if fields.get(2) == Some(&dev_id.as_str()) {
                if let Some(mp) = fields.get(4) {
                    found.push(Holder::Mount {
                        mount_point: (*mp).to_owned(),
                    });
                }
            }
        }
    }

    let holders_dir = roots.sys.join("dev/block").join(&dev_id).join("holders");
    if let Ok(rd) = fs::read_dir(holders_dir) {
        let mut names: Vec<String> = rd
            .filter_map(|e| Some(e.ok()?.file_name().to_str()?.to_owned()))
            .collect();
        names.sort();
        found.extend(names.into_iter().map(|name| Holder::Device { name }));
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dm_names_decode_doubled_hyphens() {
        let pair = |a: &str, b: &str| Some((a.to_owned(), b.to_owned()));
        assert_eq!(decode_dm_name("vg0-lv0"), pair("vg0", "lv0"));
        assert_eq!(
            decode_dm_name("vg--data-db01--root"),
            pair("vg-data", "db01-root")
        );
        assert_eq!(decode_dm_name("vg0-pool-tpool"), None);
        assert_eq!(decode_dm_name("nohyphen"), None);
        assert_eq!(decode_dm_name("-lv"), None);
    }

    #[test]
    fn only_vg_lv_shaped_paths_name_an_lv() {
        let dev = Path::new("/dev");
        let pair = |a: &str, b: &str| Some((a.to_owned(), b.to_owned()));
        assert_eq!(
            name_from_path(dev, Path::new("/dev/vg0/lv0")),
            pair("vg0", "lv0")
        );
        assert_eq!(
            name_from_path(dev, Path::new("/dev/mapper/vg0-lv0")),
            pair("vg0", "lv0")
        );
        assert_eq!(name_from_path(dev, Path::new("/dev/block/253:0")), None);
        assert_eq!(name_from_path(dev, Path::new("/dev/disk/by-id/x")), None);
        assert_eq!(name_from_path(dev, Path::new("/dev/dm-0")), None);
    }
}
