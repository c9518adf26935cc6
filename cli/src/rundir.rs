//! The run directory: where every `stream start` on this host registers
//! itself, so that `stream status` with no argument lists them all.
//!
//! `RUN/<ID>.json` names the migration's state directory, control socket,
//! export and metrics address. It is written (atomically) once the export
//! is ready and removed on a clean stop; an entry left by a killed start is
//! recognised because its control socket no longer answers, shown as "not
//! running" and replaced by the next start of that ID. The state directory
//! stays the authority: the entry only points at it.
//!
//! RUN is `--run-dir` or `$STREAM_RUN_DIR`, else `/run/stream` for root,
//! else `$XDG_RUNTIME_DIR/stream`, else `/tmp/stream-UID`.

use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::{Deserialize, Serialize};

pub const SCHEMA: u32 = 1;

static CHOSEN: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();

/// Record `--run-dir` (or `$STREAM_RUN_DIR`), once, from `main`.
pub fn set(dir: Option<PathBuf>) {
    let _ = CHOSEN.set(dir.unwrap_or_else(default_dir));
}

/// The run directory of this invocation.
pub fn dir() -> PathBuf {
    CHOSEN.get().cloned().unwrap_or_else(default_dir)
}

/// The run directory when none is given.
pub fn default_dir() -> PathBuf {
    // SAFETY: getuid(2) takes no arguments, touches no memory and cannot fail.
    let uid = unsafe { libc::getuid() };
    if uid == 0 {
        return PathBuf::from("/run/stream");
    }
    match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(d) if !d.is_empty() => PathBuf::from(d).join("stream"),
        _ => PathBuf::from(format!("/tmp/stream-{uid}")),
    }
}

/// One registered `stream start`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Entry {
    pub schema: u32,
    pub id: String,
    pub pid: u32,
    pub state_dir: PathBuf,
    pub control_socket: PathBuf,
    pub source: String,
    pub target: String,
    pub export_uri: String,
    pub metrics: Option<String>,
    /// Unix seconds.
    pub started_at: u64,
}

/// The default ID of a migration: the target's file name (`/dev/vg/lv` gives
/// `vg-lv`), with anything but `[A-Za-z0-9._-]` replaced by `_`.
pub fn default_id(target: &Path) -> String {
    let s = target.to_string_lossy();
    let name = match s.strip_prefix("/dev/") {
        Some(rest) => rest.replace('/', "-"),
        None => target
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "migration".into()),
    };
    sanitize(&name)
}

fn sanitize(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "._-".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// Check a user-given `--id`.
pub fn parse_id(s: &str) -> Result<String, String> {
    if s.is_empty() || s.starts_with('.') || sanitize(s) != s {
        return Err(format!(
            "{s:?} is not a usable migration id: use letters, digits, '.', '_' and '-', not starting with '.'"
        ));
    }
    Ok(s.to_string())
}

fn entry_path(run_dir: &Path, id: &str) -> PathBuf {
    run_dir.join(format!("{id}.json"))
}

/// The registration of a running start; removed when dropped.
pub struct Registration {
    path: PathBuf,
}

impl Drop for Registration {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Register `entry`. An ID held by another live migration (a different
/// state directory whose control socket answers) is refused when the user
/// chose it (`explicit`); a default ID then gets a suffix (`db01.raw-2`).
/// Returns `None`, with a warning, when the run directory is unusable: the
/// migration serves all the same, only `stream status` cannot list it.
pub async fn register(
    run_dir: &Path,
    entry: &mut Entry,
    explicit: bool,
) -> anyhow::Result<Option<Registration>> {
    if let Err(e) = std::fs::create_dir_all(run_dir) {
        tracing::warn!(
            "cannot create the run directory {} ({e}): `stream status` will not list this \
             migration; choose another with --run-dir or STREAM_RUN_DIR",
            run_dir.display()
        );
        return Ok(None);
    }
    let base = entry.id.clone();
    let mut n = 1;
    let mut replaced = 0;
    let path = loop {
        if n > 1 {
            entry.id = format!("{base}-{n}");
        }
        let path = entry_path(run_dir, &entry.id);
        if let Some(holder) = live_holder(&path, &entry.state_dir).await {
            if explicit || n >= 100 {
                anyhow::bail!(
                    "the migration id {:?} is taken in {} by the running migration of {} (pid {}); \
                     give this one another --id",
                    entry.id,
                    run_dir.display(),
                    holder.state_dir.display(),
                    holder.pid
                );
            }
            n += 1;
            continue;
        }
        // Claim the name atomically: a complete file is hard-linked under
        // it, which fails if another `stream start` got there first (tests
        // and scripts start several at once with the same target name).
        static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let seq = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let tmp = run_dir.join(format!(
            ".{}.{}-{seq}.json.tmp",
            entry.id,
            std::process::id()
        ));
        std::fs::write(&tmp, serde_json::to_vec_pretty(entry)?)
            .with_context(|| format!("cannot register the migration in {}", tmp.display()))?;
        let linked = std::fs::hard_link(&tmp, &path);
        let _ = std::fs::remove_file(&tmp);
        match linked {
            Ok(()) => break path,
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && replaced < 3 => {
                // Live (a racer that just registered): take the next name.
                // Stale (its process is gone) or ours from before: replace.
                if live_holder(&path, &entry.state_dir).await.is_some() {
                    n += 1;
                } else {
                    replaced += 1;
                    let _ = std::fs::remove_file(&path);
                }
            }
            Err(e) => {
                return Err(e).with_context(|| {
                    format!("cannot register the migration in {}", path.display())
                });
            }
        }
    };
    if entry.id != base {
        tracing::info!(
            "migration id {base:?} is taken by another running migration: registered as {:?} \
             (choose one with --id)",
            entry.id
        );
    }
    Ok(Some(Registration { path }))
}

/// Before anything is opened: refuse a chosen `--id` that a running
/// migration holds (whichever state directory it serves: if it is this
/// one, its lock would refuse us anyway, later).
pub async fn preflight(run_dir: &Path, id: &str) -> anyhow::Result<()> {
    let Some(old) = read(&entry_path(run_dir, id)) else {
        return Ok(());
    };
    if crate::control::connect(&old.control_socket).await.is_ok() {
        anyhow::bail!(
            "the migration id {id:?} is taken in {} by the running migration of {} (pid {}); \
             give this one another --id",
            run_dir.display(),
            old.state_dir.display(),
            old.pid
        );
    }
    Ok(())
}

/// The live migration of another state directory registered at `path`.
async fn live_holder(path: &Path, state_dir: &Path) -> Option<Entry> {
    let old = read(path)?;
    if old.state_dir == state_dir {
        return None;
    }
    crate::control::connect(&old.control_socket)
        .await
        .ok()
        .map(|_| old)
}

fn read(path: &Path) -> Option<Entry> {
    serde_json::from_slice(&std::fs::read(path).ok()?).ok()
}

/// Every entry of the run directory, sorted by ID (none if it is missing).
pub fn list(run_dir: &Path) -> anyhow::Result<Vec<Entry>> {
    let rd = match std::fs::read_dir(run_dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => {
            return Err(e)
                .with_context(|| format!("cannot list the run directory {}", run_dir.display()));
        }
    };
    let mut out = Vec::new();
    for e in rd.flatten() {
        let name = e.file_name();
        let name = name.to_string_lossy();
        if name.starts_with('.') || !name.ends_with(".json") {
            continue;
        }
        match read(&e.path()) {
            Some(entry) => out.push(entry),
            None => tracing::debug!("ignoring unreadable run entry {}", e.path().display()),
        }
    }
    out.sort_by(|a, b| a.id.cmp(&b.id));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_ids_are_file_names_or_flattened_devices() {
        assert_eq!(default_id(Path::new("/srv/disks/db01.raw")), "db01.raw");
        assert_eq!(default_id(Path::new("/dev/vg0/mig-db01")), "vg0-mig-db01");
        assert_eq!(default_id(Path::new("/x/a b")), "a_b");
    }

    /// Many `stream start`s registering the same default id at once (as
    /// parallel tests do) each get their own name; none fails or is lost.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn racing_registrations_each_get_a_name() {
        let dir = tempfile::tempdir().unwrap();
        let run_dir = dir.path().join("run");
        let mut tasks = Vec::new();
        let mut listeners = Vec::new();
        for i in 0..8 {
            let state_dir = dir.path().join(format!("state{i}"));
            std::fs::create_dir_all(&state_dir).unwrap();
            let control_socket = state_dir.join("control.sock");
            listeners.push(std::os::unix::net::UnixListener::bind(&control_socket).unwrap());
            let run_dir = run_dir.clone();
            tasks.push(tokio::spawn(async move {
                let mut entry = Entry {
                    schema: 1,
                    id: "target.img".into(),
                    pid: std::process::id(),
                    state_dir,
                    control_socket,
                    source: "s".into(),
                    target: "t".into(),
                    export_uri: "nbd://".into(),
                    metrics: None,
                    started_at: 0,
                };
                register(&run_dir, &mut entry, false)
                    .await
                    .map(|r| (entry.id, r))
            }));
        }
        let mut ids = Vec::new();
        let mut kept = Vec::new();
        for t in tasks {
            let (id, reg) = t.await.unwrap().unwrap();
            ids.push(id);
            kept.push(reg);
        }
        ids.sort();
        ids.dedup();
        assert_eq!(ids.len(), 8, "{ids:?}");
        assert_eq!(list(&run_dir).unwrap().len(), 8);
        drop(kept);
        drop(listeners);
    }

    #[test]
    fn ids_with_separators_are_refused() {
        assert!(parse_id("db01").is_ok());
        assert!(parse_id("../etc").is_err());
        assert!(parse_id("a/b").is_err());
        assert!(parse_id("").is_err());
    }
}
