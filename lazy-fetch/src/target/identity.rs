//! Who a path really is, for the checks that keep the legacy disk read-only
//! and a used target from being overwritten by accident.
//!
//! **Aliases** ([`check_distinct`]). A path is resolved to its *footprint*:
//! the spans of files (device and inode) and of block devices (major:minor
//! and a byte range) that a write through it can change.
//!
//! - a regular file: its own (device, inode), and the block device of the
//!   filesystem holding it (marked "through a filesystem");
//! - a block device: its own range; a partition also the range it covers on
//!   its disk (`/sys/dev/block/MAJ:MIN/partition`, `start`, `../dev`); a
//!   loop device also the range of its backing file or device
//!   (`loop/backing_file`, `loop/offset`), followed recursively.
//!
//! Two paths alias when their footprints share a span key with overlapping
//! ranges, unless both reached it through a filesystem (two files on the
//! same filesystem are distinct; their inodes tell). This catches the same
//! path, symlinks, hard links and bind mounts (same device and inode), the
//! same block device under two names (same `st_rdev`), a partition and its
//! disk, a loop device and its backing file, and a file living on a
//! filesystem on the other block device. Not seen: device-mapper and md
//! stacks (two LVs are told apart by their device numbers only, so an LV
//! and the PV under it are not caught), and NBD sources (a URI names no
//! local object).
//!
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
//!
//! **Content** ([`first_nonzero`]). A regular file is checked exactly and
//! cheaply: only its data extents (`SEEK_DATA`) are read, up to the first
//! non-zero byte. A block device has no extents to ask for, and reading a
//! whole terabyte at start is not cheap; it is sampled: the first and the
//! last MiB (partition tables, boot sectors, filesystem and LVM labels and
//! the GPT backup live there, so any formatted or used disk shows there)
//! and 256 blocks of 4 KiB spread evenly between them.

use std::ffi::CString;
use std::fs::{self, File};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// The extended attribute marking a target file.
pub const XATTR: &str = "user.stream.migration";
/// Environment variable overriding the registry directory.
pub const REGISTRY_ENV: &str = "STREAM_TARGET_REGISTRY";
const REGISTRY_DEFAULT: &str = "/var/lib/stream/targets";
const MAX_DEPTH: usize = 8;

fn major(dev: u64) -> u64 {
    ((dev >> 8) & 0xfff) | ((dev >> 32) & !0xfff)
}

fn minor(dev: u64) -> u64 {
    (dev & 0xff) | ((dev >> 12) & !0xff)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Key {
    File { dev: u64, ino: u64 },
    Disk { major: u64, minor: u64 },
}

#[derive(Clone, Copy, Debug)]
struct Span {
    key: Key,
    start: u64,
    end: u64,
    /// Reached as the filesystem holding a file, not written raw.
    via_fs: bool,
}

fn sysfs(major: u64, minor: u64) -> PathBuf {
    PathBuf::from(format!("/sys/dev/block/{major}:{minor}"))
}

fn read_trim(p: &Path) -> Option<String> {
    fs::read_to_string(p).ok().map(|s| s.trim().to_owned())
}

fn read_u64(p: &Path) -> Option<u64> {
    read_trim(p)?.parse().ok()
}

fn file_spans(m: &fs::Metadata, start: u64, end: u64, out: &mut Vec<Span>, depth: usize) {
    out.push(Span {
        key: Key::File {
            dev: m.dev(),
            ino: m.ino(),
        },
        start,
        end,
        via_fs: false,
    });
    disk_spans(
        major(m.dev()),
        minor(m.dev()),
        0,
        u64::MAX,
        true,
        out,
        depth + 1,
    );
}

fn disk_spans(
    maj: u64,
    min: u64,
    start: u64,
    end: u64,
    via_fs: bool,
    out: &mut Vec<Span>,
    depth: usize,
) {
    let sys = sysfs(maj, min);
    if depth > MAX_DEPTH || !sys.exists() {
        return; // no block device behind it (tmpfs, overlay, btrfs subvolumes)
    }
    out.push(Span {
        key: Key::Disk {
            major: maj,
            minor: min,
        },
        start,
        end,
        via_fs,
    });
    if sys.join("partition").exists() {
        let pstart = read_u64(&sys.join("start"))
            .unwrap_or(0)
            .saturating_mul(512);
        let psize = read_u64(&sys.join("size")).unwrap_or(u64::MAX / 512) * 512;
        let parent = read_trim(&sys.join("../dev"));
        if let Some((pmaj, pmin)) = parent.as_deref().and_then(|d| d.split_once(':'))
            && let (Ok(pmaj), Ok(pmin)) = (pmaj.parse(), pmin.parse())
        {
            let e = pstart.saturating_add(end.min(psize));
            disk_spans(
                pmaj,
                pmin,
                pstart.saturating_add(start),
                e,
                via_fs,
                out,
                depth + 1,
            );
        }
    }
    if let Some(backing) = read_trim(&sys.join("loop/backing_file")) {
        let off = read_u64(&sys.join("loop/offset")).unwrap_or(0);
        let (s, e) = (off.saturating_add(start), off.saturating_add(end));
        if let Ok(m) = fs::metadata(&backing) {
            if m.file_type().is_block_device() {
                disk_spans(
                    major(m.rdev()),
                    minor(m.rdev()),
                    s,
                    e,
                    via_fs,
                    out,
                    depth + 1,
                );
            } else if !via_fs {
                file_spans(&m, s, e, out, depth + 1);
            } else {
                // A filesystem on a loop device over a file: writing a file
                // in it changes the backing file.
                out.push(Span {
                    key: Key::File {
                        dev: m.dev(),
                        ino: m.ino(),
                    },
                    start: s,
                    end: e,
                    via_fs: true,
                });
            }
        }
    }
}

fn footprint(path: &Path) -> io::Result<Vec<Span>> {
    let m = fs::metadata(path)?;
    let mut out = Vec::new();
    if m.file_type().is_block_device() {
        disk_spans(
            major(m.rdev()),
            minor(m.rdev()),
            0,
            u64::MAX,
            false,
            &mut out,
            0,
        );
        if out.is_empty() {
            // Not in sysfs (no /sys mounted): the device number still tells.
            out.push(Span {
                key: Key::Disk {
                    major: major(m.rdev()),
                    minor: minor(m.rdev()),
                },
                start: 0,
                end: u64::MAX,
                via_fs: false,
            });
        }
    } else {
        file_spans(&m, 0, u64::MAX, &mut out, 0);
    }
    Ok(out)
}

fn describe(key: Key) -> String {
    match key {
        Key::File { dev, ino } => {
            format!("file (device {}:{}, inode {ino})", major(dev), minor(dev))
        }
        Key::Disk { major, minor } => {
            let name = fs::read_link(sysfs(major, minor))
                .ok()
                .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
                .unwrap_or_default();
            format!("block device {name} ({major}:{minor})")
        }
    }
}

/// Refuse when a write to `target` could change `source` (see the module
/// docs for what is compared). A missing target is distinct.
pub fn check_distinct(source: &Path, target: &Path) -> Result<()> {
    let t = match footprint(target) {
        Ok(t) => t,
        // Not there yet: it will be created on the filesystem holding its
        // directory, which may live on the source device.
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            let parent = target
                .parent()
                .filter(|p| !p.as_os_str().is_empty())
                .unwrap_or(Path::new("."));
            let Ok(m) = fs::metadata(parent) else {
                return Ok(()); // nowhere to create it; Target::open says so
            };
            let mut t = Vec::new();
            disk_spans(major(m.dev()), minor(m.dev()), 0, u64::MAX, true, &mut t, 0);
            t
        }
        Err(e) => {
            return Err(Error::Invalid(format!(
                "cannot identify the target {}: {e}",
                target.display()
            )));
        }
    };
    let s = footprint(source).map_err(|e| {
        Error::Invalid(format!(
            "cannot identify the source {}: {e}",
            source.display()
        ))
    })?;
    for a in &s {
        for b in &t {
            if a.key == b.key && a.start < b.end && b.start < a.end && !(a.via_fs && b.via_fs) {
                let how = match (a.via_fs, b.via_fs) {
                    (false, false) => "both are",
                    (true, _) => "the source lives on a filesystem on",
                    (_, true) => "the target lives on a filesystem on",
                };
                return Err(Error::Invalid(format!(
                    "the target {} would overwrite the source {}: {how} the same {}. \
                     The legacy disk is only ever read; give a target on other storage",
                    target.display(),
                    source.display(),
                    describe(a.key)
                )));
            }
        }
    }
    Ok(())
}

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

const SAMPLE_EDGE: u64 = 1 << 20;
const SAMPLES: u64 = 256;
const SAMPLE_LEN: u64 = 4096;

fn nonzero_in(f: &File, start: u64, end: u64) -> io::Result<Option<u64>> {
    let mut buf = vec![0u8; SAMPLE_EDGE as usize];
    let mut at = start;
    while at < end {
        let n = (end - at).min(SAMPLE_EDGE) as usize;
        let got = f.read_at(&mut buf[..n], at)?;
        if got == 0 {
            break;
        }
        if let Some(i) = buf[..got].iter().position(|&b| b != 0) {
            return Ok(Some(at + i as u64));
        }
        at += got as u64;
    }
    Ok(None)
}

/// The offset of a non-zero byte in `target`, if one is found (exactly for
/// files, by sampling for block devices; see the module docs), and whether
/// the check was a sample.
pub fn first_nonzero(target: &Path) -> io::Result<(Option<u64>, bool)> {
    let f = File::open(target)?;
    let m = f.metadata()?;
    if !m.file_type().is_block_device() {
        for (s, e, data) in block_device::file::extents(&f, 0, m.len(), usize::MAX)? {
            if data && let Some(at) = nonzero_in(&f, s, e)? {
                return Ok((Some(at), false));
            }
        }
        return Ok((None, false));
    }
    use std::io::Seek;
    let size = (&f).seek(io::SeekFrom::End(0))?;
    if let Some(at) = nonzero_in(&f, 0, size.min(SAMPLE_EDGE))? {
        return Ok((Some(at), true));
    }
    if let Some(at) = nonzero_in(&f, size.saturating_sub(SAMPLE_EDGE), size)? {
        return Ok((Some(at), true));
    }
    if size > 2 * SAMPLE_EDGE {
        let span = size - 2 * SAMPLE_EDGE;
        for i in 0..SAMPLES {
            let at = (SAMPLE_EDGE + span / SAMPLES * i) & !(SAMPLE_LEN - 1);
            if let Some(x) = nonzero_in(&f, at, (at + SAMPLE_LEN).min(size))? {
                return Ok((Some(x), true));
            }
        }
    }
    Ok((None, true))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(dir: &Path, name: &str, len: u64) -> PathBuf {
        let p = dir.join(name);
        File::create(&p).unwrap().set_len(len).unwrap();
        p
    }

    #[test]
    fn names_of_one_file_alias_and_two_files_do_not() {
        let d = tempfile::tempdir().unwrap();
        let a = file(d.path(), "a", 1 << 20);
        let b = file(d.path(), "b", 1 << 20);
        let sym = d.path().join("sym");
        std::os::unix::fs::symlink(&a, &sym).unwrap();
        let hard = d.path().join("hard");
        fs::hard_link(&a, &hard).unwrap();
        check_distinct(&a, &b).unwrap();
        check_distinct(&a, &d.path().join("missing")).unwrap();
        for t in [&a, &sym, &hard] {
            let e = check_distinct(&a, t).unwrap_err().to_string();
            assert!(e.contains("would overwrite the source"), "{e}");
        }
    }

    #[test]
    fn nonzero_content_is_found_in_data_extents_only() {
        let d = tempfile::tempdir().unwrap();
        let sparse = file(d.path(), "sparse", 8 << 20);
        assert_eq!(first_nonzero(&sparse).unwrap(), (None, false));
        // Allocated zeros are data to SEEK_DATA, but not content.
        File::options()
            .write(true)
            .open(&sparse)
            .unwrap()
            .write_all_at(&vec![0; 1 << 20], 1 << 20)
            .unwrap();
        assert_eq!(first_nonzero(&sparse).unwrap(), (None, false));
        File::options()
            .write(true)
            .open(&sparse)
            .unwrap()
            .write_all_at(b"\0\0x", (5 << 20) + 7)
            .unwrap();
        assert_eq!(
            first_nonzero(&sparse).unwrap(),
            (Some((5 << 20) + 9), false)
        );
    }

    #[test]
    fn a_finalized_marker_is_not_replaced_by_a_streaming_one() {
        let d = tempfile::tempdir().unwrap();
        let t = file(d.path(), "t", 4096);
        assert_eq!(read_marker(&t).unwrap(), None);
        let mut m = Marker {
            phase: "streaming".into(),
            state_dir: "/s".into(),
            source: "/src".into(),
            at: 1,
            migration: "m1".into(),
        };
        let place = write_marker(&t, &m).unwrap();
        assert_eq!(read_marker(&t).unwrap(), Some((m.clone(), place.clone())));
        m.phase = "finalized".into();
        write_marker(&t, &m).unwrap();
        // It follows the inode through a rename.
        let moved = d.path().join("moved");
        fs::rename(&t, &moved).unwrap();
        assert!(read_marker(&moved).unwrap().unwrap().0.is_finalized());
        m.phase = "streaming".into();
        write_marker(&moved, &m).unwrap_err();
        assert!(read_marker(&moved).unwrap().unwrap().0.is_finalized());
    }
}
