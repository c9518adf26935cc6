//! **Markers** ([`read_marker`], [`write_marker`]). A migration marks its
//! target when it is created, and again when it is finalized, so a target
//! is recognised after its state directory is gone: a regular file carries
//! the `user.stream.migration` extended attribute (it travels with the
//! inode, through renames); a block device, whose node cannot carry one
//! and holds raw data only, has an entry in the registry directory
//! (`/var/lib/stream/targets`, or `$STREAM_TARGET_REGISTRY`), keyed by what
//! identifies the device across reboots: the device-mapper UUID (LVM), a
//! loop device's backing file (device, inode, birth time, offset), the
//! disk's WWID or serial plus the partition number, else MAJ:MIN. A file
//! on a filesystem without user xattrs falls back to the registry, keyed by
//! device, inode and birth time.

use std::ffi::CString;
use std::fs::{self, File};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::{MAX_DEPTH, major, minor, read_trim, read_u64, sysfs};

/// The extended attribute marking a target file.
pub const XATTR: &str = "user.stream.migration";
/// Environment variable overriding the registry directory.
pub const REGISTRY_ENV: &str = "STREAM_TARGET_REGISTRY";
const REGISTRY_DEFAULT: &str = "/var/lib/stream/targets";

/// What a migration leaves on its target.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Marker {
    /// `streaming` or `finalized`.
    pub phase: String,
    /// The state directory of the migration that marked it.
    pub state_dir: String,
    pub source: String,
    /// Unix seconds.
    pub at: u64,
    /// The migration's `migration_id`: which migration this is, wherever
    /// its state directory moved (empty: unknown).
    #[serde(default)]
    pub migration: String,
}

impl Marker {
    pub fn is_finalized(&self) -> bool {
        self.phase == "finalized"
    }
}

/// Where a marker is kept: the file's xattr or a registry entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MarkerPlace {
    Xattr,
    Registry(PathBuf),
}

impl std::fmt::Display for MarkerPlace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            MarkerPlace::Xattr => write!(f, "extended attribute {XATTR}"),
            MarkerPlace::Registry(p) => write!(f, "registry entry {}", p.display()),
        }
    }
}

pub fn registry_dir() -> PathBuf {
    std::env::var_os(REGISTRY_ENV)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(REGISTRY_DEFAULT))
}

fn birth_ns(m: &fs::Metadata) -> u128 {
    m.created()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

fn sanitize(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

fn block_key(maj: u64, min: u64, depth: usize) -> String {
    let sys = sysfs(maj, min);
    if depth < MAX_DEPTH && sys.join("partition").exists() {
        let n = read_trim(&sys.join("partition")).unwrap_or_default();
        let start = read_u64(&sys.join("start")).unwrap_or(0);
        if let Some((pmaj, pmin)) = read_trim(&sys.join("../dev"))
            .as_deref()
            .and_then(|d| d.split_once(':'))
            .and_then(|(a, b)| Some((a.parse().ok()?, b.parse().ok()?)))
        {
            return format!("{}-part{n}-{start}", block_key(pmaj, pmin, depth + 1));
        }
    }
    if let Some(uuid) = read_trim(&sys.join("dm/uuid")).filter(|u| !u.is_empty()) {
        return format!("dm-{}", sanitize(&uuid));
    }
    if let Some(backing) = read_trim(&sys.join("loop/backing_file")) {
        let off = read_u64(&sys.join("loop/offset")).unwrap_or(0);
        if let Ok(m) = fs::metadata(&backing) {
            return if m.file_type().is_block_device() && depth < MAX_DEPTH {
                format!(
                    "loop-{off}-{}",
                    block_key(major(m.rdev()), minor(m.rdev()), depth + 1)
                )
            } else {
                format!("loop-{off}-file-{}-{}-{}", m.dev(), m.ino(), birth_ns(&m))
            };
        }
    }
    for f in ["wwid", "device/wwid", "serial", "device/serial"] {
        if let Some(id) = read_trim(&sys.join(f)).filter(|s| !s.is_empty()) {
            return format!("disk-{}", sanitize(&id));
        }
    }
    format!("dev-{maj}-{min}")
}

fn registry_entry(path: &Path) -> io::Result<PathBuf> {
    let m = fs::metadata(path)?;
    let key = if m.file_type().is_block_device() {
        block_key(major(m.rdev()), minor(m.rdev()), 0)
    } else {
        format!("file-{}-{}-{}", m.dev(), m.ino(), birth_ns(&m))
    };
    Ok(registry_dir().join(format!("{key}.json")))
}

fn cpath(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes()).map_err(io::Error::other)
}

fn get_xattr(path: &Path) -> io::Result<Option<Vec<u8>>> {
    let p = cpath(path)?;
    let name = CString::new(XATTR).expect("no NUL");
    let mut buf = vec![0u8; 4096];
    // SAFETY: valid C strings and a buffer of the length given.
    let n = unsafe {
        libc::getxattr(
            p.as_ptr(),
            name.as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    };
    if n < 0 {
        let e = io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(libc::ENODATA) | Some(libc::ENOTSUP) => Ok(None),
            _ => Err(e),
        };
    }
    buf.truncate(n as usize);
    Ok(Some(buf))
}

fn set_xattr(path: &Path, value: &[u8]) -> io::Result<()> {
    let p = cpath(path)?;
    let name = CString::new(XATTR).expect("no NUL");
    // SAFETY: valid C strings and a buffer of the length given.
    let r = unsafe {
        libc::setxattr(
            p.as_ptr(),
            name.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The marker a migration left on `target`, and where it was found.
pub fn read_marker(target: &Path) -> io::Result<Option<(Marker, MarkerPlace)>> {
    let m = fs::metadata(target)?;
    if m.file_type().is_file()
        && let Some(v) = get_xattr(target)?
        && let Ok(marker) = serde_json::from_slice::<Marker>(&v)
    {
        return Ok(Some((marker, MarkerPlace::Xattr)));
    }
    let entry = registry_entry(target)?;
    match fs::read(&entry) {
        Ok(v) => Ok(serde_json::from_slice::<Marker>(&v)
            .ok()
            .map(|m| (m, MarkerPlace::Registry(entry)))),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Mark `target` (a finalized marker is never replaced by a streaming
/// one). Returns where the marker went.
pub fn write_marker(target: &Path, marker: &Marker) -> io::Result<MarkerPlace> {
    if !marker.is_finalized()
        && let Ok(Some((old, _))) = read_marker(target)
        && old.is_finalized()
    {
        return Err(io::Error::other("the target is marked finalized"));
    }
    let value = serde_json::to_vec(marker).expect("marker serialises");
    let m = fs::metadata(target)?;
    if m.file_type().is_file() {
        match set_xattr(target, &value) {
            Ok(()) => {
                File::open(target)?.sync_all()?;
                return Ok(MarkerPlace::Xattr);
            }
            Err(e) if e.raw_os_error() == Some(libc::ENOTSUP) => {}
            Err(e) => return Err(e),
        }
    }
    let entry = registry_entry(target)?;
    let dir = entry.parent().expect("registry entries have a parent");
    fs::create_dir_all(dir)?;
    let tmp = dir.join(format!(
        ".{}.tmp",
        entry.file_name().expect("named").to_string_lossy()
    ));
    {
        let f = File::create(&tmp)?;
        f.write_all_at(&value, 0)?;
        f.sync_all()?;
    }
    fs::rename(&tmp, &entry)?;
    File::open(dir)?.sync_all()?;
    Ok(MarkerPlace::Registry(entry))
}
