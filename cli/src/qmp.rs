//! A QEMU Machine Protocol client, as much as `stream detach` needs: one
//! command at a time over QEMU's QMP unix socket (`-qmp
//! unix:PATH,server=on,wait=off`).
//!
//! The protocol (qemu docs/interop/qmp-spec): QEMU greets with `{"QMP":
//! ...}`, the client enters command mode with `qmp_capabilities`, then each
//! `{"execute": NAME, "arguments": ..., "id": N}` is answered by one
//! `{"return": ...}` or `{"error": {"class", "desc"}}` line carrying the same
//! id; asynchronous `{"event": ...}` lines may come in between and are
//! skipped here.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};

/// One answer takes at most this long (a reopen drains the guest's I/O:
/// seconds at worst, not minutes).
const ANSWER_WITHIN: Duration = Duration::from_secs(60);

pub struct Qmp {
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
    /// Connect and enter command mode.
    pub async fn connect(path: &Path) -> anyhow::Result<Qmp> {
        let stream = crate::control::connect(path).await.with_context(|| {
            format!(
                "cannot connect to QEMU's QMP socket {} (start QEMU with \
                 `-qmp unix:{},server=on,wait=off`; a libvirt guest's monitor is libvirt's own)",
                path.display(),
                path.display()
            )
        })?;
        let (rd, wr) = stream.into_split();
        let mut qmp = Qmp {
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

    /// Run `command`; its `return` value, or [`Refused`].
    pub async fn execute(&mut self, command: &str, arguments: Value) -> anyhow::Result<Value> {
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
