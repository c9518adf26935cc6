//! A QEMU Machine Protocol client, as much as `stream detach` needs: one
//! command at a time over QEMU's QMP unix socket (`-qmp
//! unix:PATH,server=on,wait=off`).
//!
//! The protocol (qemu docs/interop/qmp-spec): QEMU greets with `{"QMP":
//! ...}`, the client enters command mode with `qmp_capabilities`, then each
//! `{"execute": NAME, "arguments": ..., "id": N}` is answered by one
//! `{"return": ...}` or `{"error": {"class", "desc"}}` line carrying the same
//! id; asynchronous `{"event": ...}` lines may come in between and are
//! skipped here. A libvirt guest's monitor belongs to libvirt: there each
//! command goes through `virsh qemu-monitor-command`, which answers the same
//! `return` or `error` objects.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};

/// One answer takes at most this long (a reopen drains the guest's I/O:
/// seconds at worst, not minutes).
const ANSWER_WITHIN: Duration = Duration::from_secs(60);

/// QEMU's monitor: its own QMP socket, or a libvirt guest's, which only
/// libvirt may hold, reached through `virsh qemu-monitor-command` (libvirt
/// then marks the domain tainted by custom monitor commands).
pub enum Qmp {
    Socket(Socket),
    Libvirt { domain: String, uri: Option<String> },
}

pub struct Socket {
    path: PathBuf,
    lines: Lines<BufReader<OwnedReadHalf>>,
    wr: OwnedWriteHalf,
    next_id: u64,
}

/// A command QEMU refused, with its own words.
#[derive(Debug, thiserror::Error)]
#[error("QEMU refused {command}: {desc} ({class})")]
pub struct Refused {
    pub command: String,
    pub class: String,
    pub desc: String,
}

impl Qmp {
    /// Connect to QEMU's own QMP socket.
    pub async fn connect(path: &Path) -> anyhow::Result<Qmp> {
        Socket::connect(path).await.map(Qmp::Socket)
    }

    /// A libvirt domain's monitor, through virsh (`uri` as `virsh -c`;
    /// virsh's default, e.g. LIBVIRT_DEFAULT_URI, when `None`).
    pub async fn libvirt(domain: &str, uri: Option<&str>) -> anyhow::Result<Qmp> {
        let qmp = Qmp::Libvirt {
            domain: domain.to_string(),
            uri: uri.map(str::to_string),
        };
        // Fails early, with virsh's words, on a wrong domain or URI.
        let mut probe = qmp;
        probe.execute("query-status", json!({})).await?;
        Ok(probe)
    }

    /// Run `command`; its `return` value, or [`Refused`].
    pub async fn execute(&mut self, command: &str, arguments: Value) -> anyhow::Result<Value> {
        match self {
            Qmp::Socket(s) => s.execute(command, arguments).await,
            Qmp::Libvirt { domain, uri } => virsh(domain, uri.as_deref(), command, arguments).await,
        }
    }
}

/// One command through `virsh qemu-monitor-command`, which prints QEMU's
/// answer line (`{"return": ...}`), or fails with libvirt's message.
async fn virsh(
    domain: &str,
    uri: Option<&str>,
    command: &str,
    arguments: Value,
) -> anyhow::Result<Value> {
    let mut req = json!({ "execute": command });
    if arguments.as_object().is_some_and(|o| !o.is_empty()) {
        req["arguments"] = arguments;
    }
    let mut cmd = tokio::process::Command::new("virsh");
    if let Some(uri) = uri {
        cmd.arg("-c").arg(uri);
    }
    cmd.arg("qemu-monitor-command")
        .arg(domain)
        .arg(req.to_string())
        .kill_on_drop(true);
    let out = tokio::time::timeout(ANSWER_WITHIN, cmd.output())
        .await
        .with_context(|| format!("virsh did not answer {command} within {ANSWER_WITHIN:?}"))?
        .context("cannot run virsh (Debian package libvirt-clients)")?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        return Err(Refused {
            command: command.to_string(),
            class: "libvirt".into(),
            desc: stderr
                .trim()
                .trim_start_matches("error: ")
                .replace('\n', "; "),
        }
        .into());
    }
    let v: Value = serde_json::from_str(stdout.trim())
        .with_context(|| format!("virsh printed something that is not JSON: {stdout}"))?;
    match v.get("return") {
        Some(r) => Ok(r.clone()),
        None => Err(Refused {
            command: command.to_string(),
            class: v["error"]["class"].as_str().unwrap_or("?").to_string(),
            desc: v["error"]["desc"].as_str().unwrap_or("?").to_string(),
        }
        .into()),
    }
}

impl Socket {
    /// Connect and enter command mode.
    async fn connect(path: &Path) -> anyhow::Result<Socket> {
        let stream = crate::control::connect(path).await.with_context(|| {
            format!(
                "cannot connect to QEMU's QMP socket {} (start QEMU with \
                 `-qmp unix:{},server=on,wait=off`; a libvirt guest's monitor is libvirt's own)",
                path.display(),
                path.display()
            )
        })?;
        let (rd, wr) = stream.into_split();
        let mut qmp = Socket {
            path: path.to_path_buf(),
            lines: BufReader::new(rd).lines(),
            wr,
            next_id: 0,
        };
        let greeting = qmp.line().await?;
        if greeting.get("QMP").is_none() {
            bail!(
                "{} is not a QMP socket (it said {greeting})",
                path.display()
            );
        }
        qmp.execute("qmp_capabilities", json!({})).await?;
        Ok(qmp)
    }

    async fn line(&mut self) -> anyhow::Result<Value> {
        let line = tokio::time::timeout(ANSWER_WITHIN, self.lines.next_line())
            .await
            .with_context(|| {
                format!(
                    "QEMU did not answer on {} within {ANSWER_WITHIN:?}",
                    self.path.display()
                )
            })?
            .with_context(|| format!("reading from {}", self.path.display()))?
            .with_context(|| format!("QEMU closed {}", self.path.display()))?;
        serde_json::from_str(&line)
            .with_context(|| format!("QEMU sent something that is not JSON: {line}"))
    }

    async fn execute(&mut self, command: &str, arguments: Value) -> anyhow::Result<Value> {
        self.next_id += 1;
        let id = self.next_id;
        let mut req = json!({ "execute": command, "id": id });
        if arguments.as_object().is_some_and(|o| !o.is_empty()) {
            req["arguments"] = arguments;
        }
        let mut text = serde_json::to_string(&req)?;
        text.push('\n');
        self.wr
            .write_all(text.as_bytes())
            .await
            .with_context(|| format!("writing to {}", self.path.display()))?;
        loop {
            let v = self.line().await?;
            if v.get("event").is_some() || v.get("id") != Some(&json!(id)) {
                continue;
            }
            if let Some(r) = v.get("return") {
                return Ok(r.clone());
            }
            let e = &v["error"];
            return Err(Refused {
                command: command.to_string(),
                class: e["class"].as_str().unwrap_or("?").to_string(),
                desc: e["desc"].as_str().unwrap_or("?").to_string(),
            }
            .into());
        }
    }
}
