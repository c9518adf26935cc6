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

use std::fs;
use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;

use super::{MAX_DEPTH, major, minor, read_trim, read_u64, sysfs};
use crate::error::{Error, Result};

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
