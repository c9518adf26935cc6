//! `stream detach`: move a running QEMU guest from the stream's NBD export
//! onto the target itself, live, then finalize the migration.
//!
//! Why `blockdev-reopen` (ARCHITECTURE.md, "Live detach"): the target
//! already holds every byte the export serves, so the guest's format node
//! only needs a new `file` child. QEMU drains the node's in-flight
//! requests, swaps the child and carries on: the guest pauses for the
//! drain, nothing is copied, and the cost does not grow with the disk. A
//! mirror job (`blockdev-mirror`, `virsh blockcopy --pivot`) would re-read
//! the whole disk through the export and write it again onto the same
//! target before it could pivot.
//!
//! The steps, each safe to repeat after a crash at any point:
//!
//! ```text
//!  find      the guest's disk (-device id or node name) and its nbd child,
//!            which must be this migration's export
//!  prepare   the running `stream start` hydrates the rest at full speed,
//!            flushes, and shares the target (nothing of the stream writes
//!            it on its own any more; Volume::prepare_detach)
//!  add       a file/host_device node for the target          [detach.json]
//!  reopen    the format node onto it: the switch
//!  del       the old nbd node: QEMU disconnects from the export
//!  finalize  `stream finalize` (the export has no client left, so the
//!            running start hands over at once), migration finalized
//! ```
//!
//! A re-run finds which side of the switch the guest is on by asking QEMU
//! (the format node's `file` child), not by trusting a record.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use lazy_fetch::state::{self, Phase};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

use crate::control::{Event, Request};
use crate::finalize::{self, FinalizeArgs};
use crate::qmp::Qmp;

#[derive(clap::Args)]
pub struct DetachArgs {
    /// State directory of the migration.
    #[arg(long, value_name = "DIR")]
    state: Option<PathBuf>,
    /// Or its target (the state directory is derived as `stream start` does).
    #[arg(long, value_name = "PATH")]
    target: Option<PathBuf>,
    /// QEMU's QMP socket, as given to QEMU with
    /// `-qmp unix:PATH,server=on,wait=off`.
    #[arg(
        long,
        value_name = "PATH",
        required_unless_present = "libvirt",
        conflicts_with = "libvirt"
    )]
    qmp: Option<PathBuf>,
    /// Or the libvirt domain the guest runs as (its monitor is reached with
    /// `virsh qemu-monitor-command`; libvirt marks the domain tainted, and
    /// its XML still names the NBD disk: see docs/cutover.md).
    #[arg(long, value_name = "DOMAIN")]
    libvirt: Option<String>,
    /// libvirt connection URI for --libvirt [default: virsh's, e.g.
    /// LIBVIRT_DEFAULT_URI or qemu:///system as root].
    #[arg(long, value_name = "URI", requires = "libvirt")]
    libvirt_uri: Option<String>,
    /// The guest's disk: the id of its `-device` (e.g. `vda`; libvirt's
    /// `virtio-disk0`) or the node name of its raw format node.
    #[arg(long, value_name = "ID")]
    device: String,
    /// Node name QEMU gives the target.
    #[arg(long, value_name = "NAME", default_value = "stream-native")]
    node_name: String,
    /// How the guest's discards reach the target after the switch: `ignore`
    /// (QEMU's default) or `unmap`.
    #[arg(long, value_name = "MODE", default_value = "ignore", value_parser = ["ignore", "unmap"])]
    discard: String,
    /// Give up waiting for hydration, or for the export's last client, after
    /// this long (e.g. 30s, 10m, 2h); the guest keeps running from the export.
    #[arg(long, value_name = "DURATION", value_parser = finalize::parse_duration)]
    timeout: Option<Duration>,
    /// Print the result as JSON (the switch as an event on stderr, the
    /// finalize report on stdout).
    #[arg(long)]
    json: bool,
}

/// What a run needs to finish after a crash: which QEMU nodes it touched.
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
struct Record {
    format_node: String,
    nbd_node: String,
    native_node: String,
}

const RECORD_FILE: &str = "detach.json";

/// The guest's disk as QEMU has it now.
#[derive(Debug)]
struct Disk {
    /// The raw format node the device uses.
    format_node: String,
    /// Its `file` child.
    child: Child,
    read_only: bool,
    cache: Value,
    detect_zeroes: String,
}

#[derive(Debug)]
struct Child {
    node: String,
    driver: String,
    filename: String,
}

pub async fn run(args: DetachArgs) -> anyhow::Result<()> {
    let (dir, header) = crate::locate::existing(args.state.clone(), args.target.clone())?;
    let target = PathBuf::from(&header.target.path);
    let mut qmp = match (&args.qmp, &args.libvirt) {
        (Some(path), _) => Qmp::connect(path).await?,
        (None, Some(domain)) => Qmp::libvirt(domain, args.libvirt_uri.as_deref()).await?,
        (None, None) => bail!("say where the guest runs: --qmp SOCKET or --libvirt DOMAIN"),
    };
    let disk = find_disk(&mut qmp, &args.device).await?;
    if disk.read_only {
        bail!(
            "the guest's disk {} is read-only in QEMU: it cannot run from the target",
            args.device
        );
    }
    if !is_native(&disk.child, &target) {
        if disk.child.driver != "nbd" {
            bail!(
                "the guest's disk {} reads from {} ({}), neither this migration's export nor \
                 its target {}: nothing to detach",
                args.device,
                disk.child.filename,
                disk.child.driver,
                target.display()
            );
        }
        if header.phase == Phase::Finalized {
            bail!(
                "the migration is finalized, yet the guest's disk {} still reads from the NBD \
                 export {}: switch it by hand, or restart the guest from {}",
                args.device,
                disk.child.filename,
                target.display()
            );
        }
        switch(&mut qmp, &args, &dir, &target, &disk).await?;
    } else {
        say(
            args.json,
            "switched",
            json!({"already": true}),
            &format!(
                "the guest's disk {} already runs from {}",
                args.device,
                target.display()
            ),
        );
    }
    remove_nbd_node(&mut qmp, &dir).await?;
    // Finalized already (a re-run): finalize only reports it again.
    finalize::run(FinalizeArgs::after_detach(dir, args.timeout, args.json)).await
}

/// prepare, add, reopen.
async fn switch(
    qmp: &mut Qmp,
    args: &DetachArgs,
    dir: &Path,
    target: &Path,
    disk: &Disk,
) -> anyhow::Result<()> {
    let status = crate::control::request(&state::control_socket(dir), &Request::Status)
        .await
        .with_context(|| {
            format!(
                "the guest's disk {} reads from the export {}, but no `stream start` serves this \
             migration: run its `stream start` command again (the guest reconnects), then \
             `stream detach` again",
                args.device, disk.child.filename
            )
        })?;
    let status: crate::control::StatusReply = serde_json::from_str(&status)?;
    if !same_export(&disk.child.filename, &status.export_uri) {
        bail!(
            "the guest's disk {} reads from {}, not from this migration's export {}: \
             refusing to put this migration's target under it",
            args.device,
            disk.child.filename,
            status.export_uri
        );
    }
    prepare(dir, args).await?;
    let record = Record {
        format_node: disk.format_node.clone(),
        nbd_node: disk.child.node.clone(),
        native_node: args.node_name.clone(),
    };
    write_record(dir, &record)?;
    add_native_node(qmp, args, target, disk).await?;
    let t0 = Instant::now();
    qmp.execute(
        "blockdev-reopen",
        json!({ "options": [{
            "driver": "raw",
            "node-name": disk.format_node,
            "file": args.node_name,
            "read-only": false,
            "cache": disk.cache,
            "detect-zeroes": disk.detect_zeroes,
            "discard": args.discard,
        }]}),
    )
    .await
    .context("switching the guest's disk onto the target")?;
    let reopen = t0.elapsed();
    let now = find_disk(qmp, &disk.format_node).await?;
    if !is_native(&now.child, target) {
        bail!(
            "QEMU accepted the switch but the disk still reads from {}",
            now.child.filename
        );
    }
    say(
        args.json,
        "switched",
        json!({ "reopen_ms": reopen.as_secs_f64() * 1e3, "node": args.node_name }),
        &format!(
            "switched: the guest's disk {} runs from {} (the switch took {:.1} ms)",
            args.device,
            target.display(),
            reopen.as_secs_f64() * 1e3
        ),
    );
    Ok(())
}

/// Ask the running `stream start` to share the target (control request
/// `prepare_detach`), showing the hydration it waits for.
async fn prepare(dir: &Path, args: &DetachArgs) -> anyhow::Result<()> {
    let sock = state::control_socket(dir);
    let stream = crate::control::connect(&sock)
        .await
        .with_context(|| format!("no running `stream start` answers on {}", sock.display()))?;
    let (rd, mut wr) = stream.into_split();
    let req = Request::PrepareDetach {
        timeout_secs: args.timeout.map(|t| t.as_secs()),
    };
    wr.write_all(serde_json::to_string(&req)?.as_bytes())
        .await?;
    wr.write_all(b"\n").await?;
    let mut lines = BufReader::new(rd).lines();
    let mut hydrating: Option<finalize::Step> = None;
    while let Some(line) = lines.next_line().await? {
        match serde_json::from_str::<Event>(&line)
            .with_context(|| format!("unexpected answer from the stream start: {line}"))?
        {
            Event::Hydrating {
                bytes_present,
                size,
                rate,
            } => hydrating
                .get_or_insert_with(|| finalize::Step::bytes("hydrate", args.json, size))
                .update("bytes", bytes_present, size, Some(rate)),
            Event::Prepared => return Ok(()),
            Event::Error { message } => bail!("{message}"),
            other => bail!("unexpected answer from the stream start: {other:?}"),
        }
    }
    bail!("the running `stream start` closed the control connection before the target was shared")
}

async fn add_native_node(
    qmp: &mut Qmp,
    args: &DetachArgs,
    target: &Path,
    disk: &Disk,
) -> anyhow::Result<()> {
    if let Some(existing) = named_node(qmp, &args.node_name).await? {
        // An earlier run added it and stopped before the switch.
        if existing.1 == target.to_string_lossy() {
            return Ok(());
        }
        bail!(
            "QEMU already has a node named {} (for {}): choose another --node-name",
            args.node_name,
            existing.1
        );
    }
    let block = std::fs::metadata(target)
        .with_context(|| format!("cannot stat the target {}", target.display()))?
        .file_type();
    let driver = if std::os::unix::fs::FileTypeExt::is_block_device(&block) {
        "host_device"
    } else {
        "file"
    };
    qmp.execute(
        "blockdev-add",
        json!({
            "driver": driver,
            "node-name": args.node_name,
            "filename": target,
            "read-only": false,
            "cache": disk.cache,
            "discard": args.discard,
        }),
    )
    .await
    .with_context(|| format!("opening the target {} in QEMU", target.display()))?;
    Ok(())
}

/// The old nbd node, once nothing uses it: QEMU then disconnects from the
/// export, which lets the running `stream start` hand over.
async fn remove_nbd_node(qmp: &mut Qmp, dir: &Path) -> anyhow::Result<()> {
    let Some(record) = read_record(dir)? else {
        return Ok(());
    };
    if named_node(qmp, &record.nbd_node).await?.is_none() {
        return Ok(());
    }
    match qmp
        .execute("blockdev-del", json!({ "node-name": record.nbd_node }))
        .await
    {
        Ok(_) => Ok(()),
        Err(e) => {
            // A node QEMU made for `-drive` is not the monitor's to delete;
            // without users it goes by itself.
            tracing::warn!("the old NBD node {} stays: {e:#}", record.nbd_node);
            Ok(())
        }
    }
}

/// The device's (or node's) raw format node and its `file` child.
async fn find_disk(qmp: &mut Qmp, device: &str) -> anyhow::Result<Disk> {
    let blocks = qmp.execute("query-block", json!({})).await?;
    let mut names = Vec::new();
    let mut found = None;
    for b in blocks.as_array().into_iter().flatten() {
        let Some(ins) = b.get("inserted") else {
            continue;
        };
        let qdev = b["qdev"].as_str().unwrap_or("");
        let node = ins["node-name"].as_str().unwrap_or("");
        names.push(if qdev.is_empty() { node } else { qdev }.to_string());
        let matches = b["device"].as_str() == Some(device)
            || node == device
            || qdev == device
            || qdev.split('/').any(|part| part == device);
        if matches {
            found = Some(ins.clone());
        }
    }
    let Some(ins) = found else {
        bail!(
            "QEMU has no disk {device:?} (its disks: {}); give the id of the guest's -device \
             or the node name of its format node",
            names.join(", ")
        );
    };
    let format_node = ins["node-name"].as_str().unwrap_or("").to_string();
    if ins["drv"].as_str() != Some("raw") {
        bail!(
            "the guest's disk {device} is a {} node; only a raw node over the export can be \
             switched",
            ins["drv"]
        );
    }
    let child = file_child(qmp, &format_node).await?;
    Ok(Disk {
        format_node,
        child,
        read_only: ins["ro"].as_bool().unwrap_or(false),
        cache: json!({
            "direct": ins["cache"]["direct"].as_bool().unwrap_or(false),
            "no-flush": ins["cache"]["no-flush"].as_bool().unwrap_or(false),
        }),
        detect_zeroes: ins["detect_zeroes"].as_str().unwrap_or("off").to_string(),
    })
}

/// The `file` child of `node`, from QEMU's block graph.
async fn file_child(qmp: &mut Qmp, node: &str) -> anyhow::Result<Child> {
    let graph = qmp
        .execute("x-debug-query-block-graph", json!({}))
        .await
        .context("reading QEMU's block graph")?;
    let nodes = graph["nodes"].as_array().cloned().unwrap_or_default();
    let id_of = |name: &str| {
        nodes
            .iter()
            .find(|n| n["type"] == "block-driver" && n["name"] == name)
            .and_then(|n| n["id"].as_u64())
    };
    let Some(parent) = id_of(node) else {
        bail!("QEMU's block graph has no node {node}");
    };
    let child_id = graph["edges"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|e| e["parent"].as_u64() == Some(parent) && e["name"] == "file")
        .and_then(|e| e["child"].as_u64());
    let Some(name) = child_id.and_then(|id| {
        nodes
            .iter()
            .find(|n| n["id"].as_u64() == Some(id))
            .and_then(|n| n["name"].as_str())
    }) else {
        bail!("the node {node} has no file child in QEMU's block graph");
    };
    let name = name.to_string();
    let Some((driver, filename)) = named_node(qmp, &name).await? else {
        bail!("QEMU lists no node {name}");
    };
    Ok(Child {
        node: name,
        driver,
        filename,
    })
}

/// Driver and file name of the node called `name`, if QEMU has one.
async fn named_node(qmp: &mut Qmp, name: &str) -> anyhow::Result<Option<(String, String)>> {
    let nodes = qmp
        .execute("query-named-block-nodes", json!({ "flat": true }))
        .await?;
    Ok(nodes
        .as_array()
        .into_iter()
        .flatten()
        .find(|n| n["node-name"] == name)
        .map(|n| {
            (
                n["drv"].as_str().unwrap_or("").to_string(),
                n["file"].as_str().unwrap_or("").to_string(),
            )
        }))
}

fn is_native(child: &Child, target: &Path) -> bool {
    matches!(child.driver.as_str(), "file" | "host_device")
        && same_file(Path::new(&child.filename), target)
}

fn same_file(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => a == b,
    }
}

/// Whether QEMU's name for an NBD node (`nbd+unix://?socket=PATH`,
/// `nbd+unix:///NAME?socket=PATH`, `nbd://HOST:PORT[/NAME]`) and our export
/// URI (`nbd+unix:///NAME?socket=PATH`, `nbd://HOST:PORT/NAME`) name the same
/// export: the same socket file, or the same TCP port, and the same name.
fn same_export(qemu: &str, ours: &str) -> bool {
    fn parts(uri: &str) -> (Option<String>, Option<String>, String) {
        let (head, query) = uri.split_once('?').unwrap_or((uri, ""));
        let socket = query
            .split('&')
            .find_map(|kv| kv.strip_prefix("socket="))
            .map(str::to_string);
        let rest = head.split_once("://").map_or(head, |(_, r)| r);
        let (authority, name) = rest.split_once('/').unwrap_or((rest, ""));
        let port = authority
            .rsplit_once(':')
            .map(|(_, p)| p.to_string())
            .or_else(|| (socket.is_none()).then(|| "10809".to_string()));
        (socket, port, name.to_string())
    }
    let (qs, qp, qn) = parts(qemu);
    let (os, op, on) = parts(ours);
    if qn != on {
        return false;
    }
    match (qs, os) {
        (Some(a), Some(b)) => same_file(Path::new(&a), Path::new(&b)),
        (None, None) => qp == op,
        _ => false,
    }
}

fn say(json: bool, name: &str, mut fields: Value, text: &str) {
    if json {
        fields["event"] = name.into();
        fields["schema"] = crate::control::SCHEMA.into();
        eprintln!("{fields}");
    } else {
        crate::output::note(text);
    }
}

fn write_record(dir: &Path, record: &Record) -> anyhow::Result<()> {
    let path = dir.join(RECORD_FILE);
    let tmp = dir.join(format!("{RECORD_FILE}.tmp"));
    std::fs::write(&tmp, serde_json::to_vec(record)?)
        .and_then(|()| std::fs::File::open(&tmp)?.sync_all())
        .and_then(|()| std::fs::rename(&tmp, &path))
        .with_context(|| format!("cannot write {}", path.display()))
}

fn read_record(dir: &Path) -> anyhow::Result<Option<Record>> {
    let path = dir.join(RECORD_FILE);
    match std::fs::read(&path) {
        Ok(b) => {
            Ok(Some(serde_json::from_slice(&b).with_context(|| {
                format!("{} is damaged", path.display())
            })?))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::same_export;

    #[test]
    fn qemu_and_stream_names_of_one_export_match() {
        assert!(same_export(
            "nbd+unix://?socket=/run/s.sock",
            "nbd+unix:///?socket=/run/s.sock"
        ));
        assert!(same_export(
            "nbd+unix:///disk?socket=/run/s.sock",
            "nbd+unix:///disk?socket=/run/s.sock"
        ));
        assert!(same_export(
            "nbd://127.0.0.1:10809",
            "nbd://127.0.0.1:10809/"
        ));
        assert!(same_export(
            "nbd://localhost:10810/d",
            "nbd://127.0.0.1:10810/d"
        ));
        assert!(!same_export(
            "nbd://127.0.0.1:10810",
            "nbd://127.0.0.1:10809/"
        ));
        assert!(!same_export(
            "nbd+unix:///other?socket=/run/s.sock",
            "nbd+unix:///?socket=/run/s.sock"
        ));
        assert!(!same_export(
            "nbd+unix://?socket=/run/a.sock",
            "nbd+unix:///?socket=/run/b.sock"
        ));
        assert!(!same_export(
            "nbd://127.0.0.1:10809",
            "nbd+unix:///?socket=/run/s.sock"
        ));
    }
}
