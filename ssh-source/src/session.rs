//! One SSH session: the system's `ssh` run as `ssh [options] HOST -s sftp`,
//! SFTP spoken over its stdin and stdout, the disk opened for reading; or,
//! where the legacy sshd offers no SFTP subsystem, a remote shell that
//! answers each read with `dd` (`shell.rs`).
//!
//! Why the system's OpenSSH client and not an SSH library: it is what the
//! operator's keys, agent, `~/.ssh/config` (ProxyJump, ciphers, ports) and
//! `known_hosts` already work with, it is on every cloud host, it carries
//! no crypto of ours (the binary keeps one TLS stack), and its ciphers are
//! OpenSSH's (AES-GCM in hardware). Its host key checking is OpenSSH's
//! own: `StrictHostKeyChecking=yes` (an unknown host is refused, and we
//! print the key's fingerprint from `ssh-keyscan`), or `accept-new` when
//! the operator says `--accept-new-host-key`; a *changed* key is always
//! refused. `BatchMode=yes`: no prompt ever waits for a password.

use std::io;
use std::process::Stdio;
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::process::{Child, ChildStdin, Command};

use crate::sftp::Sftp;
use crate::shell::Shell;
use crate::uri::SshUri;

/// Why a session could not be had, as the operator should hear it.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// Retrying cannot help: the operator must act.
    #[error("{0}")]
    Permanent(String),
    /// The host or the link may come back.
    #[error("{0}")]
    Transient(String),
    /// The server offers no SFTP subsystem (`connect` then tries a shell).
    #[error("{0}")]
    NoSftp(String),
}

impl ConnectError {
    pub fn is_permanent(&self) -> bool {
        matches!(self, ConnectError::Permanent(_) | ConnectError::NoSftp(_))
    }
}

/// How to reach the disk.
#[derive(Clone, Debug)]
pub struct Endpoint {
    pub uri: SshUri,
    /// `StrictHostKeyChecking=accept-new` instead of `yes`.
    pub accept_new_host_key: bool,
    pub connect_timeout: Duration,
}

/// How a session reads the disk.
enum Transport {
    Sftp {
        sftp: Sftp<ChildStdin>,
        handle: Vec<u8>,
    },
    Shell(Shell),
}

/// A live session with the disk open.
pub struct Session {
    transport: Transport,
    /// Killed when the session is dropped.
    _child: Child,
}

impl Session {
    pub fn is_dead(&self) -> bool {
        match &self.transport {
            Transport::Sftp { sftp, .. } => sftp.is_dead(),
            Transport::Shell(sh) => sh.is_dead(),
        }
    }

    /// Exactly `len` bytes at `offset`.
    pub async fn read_exact(&self, offset: u64, len: usize) -> io::Result<Vec<u8>> {
        match &self.transport {
            Transport::Sftp { sftp, handle } => sftp.read_exact(handle, offset, len).await,
            Transport::Shell(sh) => sh.read_exact(offset, len).await,
        }
    }

    /// Which way it reads, for the log.
    pub fn kind(&self) -> &'static str {
        match &self.transport {
            Transport::Sftp { .. } => "sftp",
            Transport::Shell(_) => "dd over a remote shell",
        }
    }

    /// The disk's size: what stat says for a file; for a block device
    /// (whose size stat gives as 0) the end found by reading single bytes,
    /// doubling then halving (about 2 × log2(size) round trips, once per
    /// session). The shell reports it itself.
    pub async fn size(&self) -> io::Result<u64> {
        let (sftp, handle) = match &self.transport {
            Transport::Sftp { sftp, handle } => (sftp, handle),
            Transport::Shell(sh) => return Ok(sh.size()),
        };
        let attrs = sftp.fstat(handle).await?;
        if let Some(size) = attrs.size.filter(|&n| n > 0 && !attrs.is_block_device()) {
            return Ok(size);
        }
        let readable =
            |at: u64| async move { sftp.read_once(handle, at, 1).await.map(|b| !b.is_empty()) };
        if !readable(0).await? {
            return Ok(0);
        }
        // Invariant: byte `lo` exists, byte `hi` does not.
        let mut lo = 0u64;
        let mut hi = 512u64;
        while readable(hi).await? {
            lo = hi;
            hi = hi
                .checked_mul(2)
                .ok_or_else(|| io::Error::other("no end found"))?;
        }
        while hi - lo > 1 {
            let mid = lo + (hi - lo) / 2;
            match readable(mid).await? {
                true => lo = mid,
                false => hi = mid,
            }
        }
        Ok(hi)
    }
}

/// What runs on the legacy host.
enum Remote {
    Sftp,
    /// A shell command line.
    Shell(String),
}

impl Endpoint {
    fn command(&self, remote: &Remote) -> Command {
        let u = &self.uri;
        let mut c = Command::new("ssh");
        let checking = match self.accept_new_host_key {
            true => "accept-new",
            false => "yes",
        };
        c.arg("-o")
            .arg("BatchMode=yes")
            .arg("-o")
            .arg(format!("StrictHostKeyChecking={checking}"))
            .arg("-o")
            .arg(format!(
                "ConnectTimeout={}",
                self.connect_timeout.as_secs().max(1)
            ))
            // A dead link is noticed by ssh itself within 15 s.
            .arg("-o")
            .arg("ServerAliveInterval=5")
            .arg("-o")
            .arg("ServerAliveCountMax=3")
            .arg("-o")
            .arg("LogLevel=ERROR")
            // AES-GCM first (AES instructions on both ends make it the
            // cheapest), the rest of ssh's own list after it, for old
            // servers that lack it.
            .arg("-o")
            .arg("Ciphers=^aes128-gcm@openssh.com,aes256-gcm@openssh.com");
        if let Some(k) = &u.known_hosts {
            c.arg("-o")
                .arg(format!("UserKnownHostsFile={}", k.display()));
        }
        if let Some(i) = &u.identity {
            c.arg("-i").arg(i);
        }
        if let Some(p) = u.port {
            c.arg("-p").arg(p.to_string());
        }
        if let Some(user) = &u.user {
            c.arg("-l").arg(user);
        }
        match remote {
            Remote::Sftp => c.arg("-s").arg(&u.host).arg("sftp"),
            Remote::Shell(line) => c.arg(&u.host).arg(line),
        };
        c.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        c
    }

    /// Start `ssh`, speak SFTP, open the disk; where the server offers no
    /// SFTP, read it with `dd` through a remote shell instead.
    pub async fn connect(&self) -> Result<Session, ConnectError> {
        match self.connect_with(&Remote::Sftp).await {
            Err(ConnectError::NoSftp(why)) => {
                let line = crate::shell::command_line(&self.uri.path);
                let s = self.connect_with(&Remote::Shell(line)).await.map_err(|e| {
                    ConnectError::Permanent(format!(
                        "{why}; reading it with dd through a remote shell failed too: {e}"
                    ))
                })?;
                tracing::info!(
                    "{}: no SFTP there, reading {} with dd through a remote shell",
                    self.uri.endpoint(),
                    self.uri.path
                );
                Ok(s)
            }
            other => other,
        }
    }

    async fn connect_with(&self, remote: &Remote) -> Result<Session, ConnectError> {
        let mut child = self.command(remote).spawn().map_err(|e| {
            ConnectError::Permanent(format!(
                "cannot run ssh (the OpenSSH client, Debian package openssh-client): {e}"
            ))
        })?;
        let stdin = child.stdin.take().expect("piped");
        let stdout = child.stdout.take().expect("piped");
        let mut stderr = child.stderr.take().expect("piped");
        // Everything ssh says goes to the log; the first lines explain a
        // failed start.
        let said = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let s = said.clone();
        let stderr_done = tokio::spawn(async move {
            let mut buf = [0u8; 4096];
            while let Ok(n) = stderr.read(&mut buf).await {
                if n == 0 {
                    break;
                }
                let text = String::from_utf8_lossy(&buf[..n]).into_owned();
                tracing::debug!("ssh: {}", text.trim_end());
                let mut s = s.lock().expect("poisoned");
                if s.len() < 16 * 1024 {
                    s.push_str(&text);
                }
            }
        });
        let limit = self.connect_timeout + Duration::from_secs(5);
        let started = tokio::time::timeout(limit, async {
            match remote {
                Remote::Sftp => {
                    let sftp = Sftp::start(stdout, stdin).await?;
                    let handle = sftp.open(&self.uri.path).await?;
                    io::Result::Ok(Transport::Sftp { sftp, handle })
                }
                Remote::Shell(_) => Ok(Transport::Shell(Shell::start(stdout, stdin).await?)),
            }
        })
        .await;
        match started {
            Ok(Ok(transport)) => Ok(Session {
                transport,
                _child: child,
            }),
            Ok(Err(e)) if matches!(e.kind(), io::ErrorKind::NotFound) => {
                Err(ConnectError::Permanent(format!(
                    "{}: no disk at {} on the legacy host ({e})",
                    self.uri.endpoint(),
                    self.uri.path
                )))
            }
            Ok(Err(e)) if matches!(e.kind(), io::ErrorKind::PermissionDenied) => {
                Err(ConnectError::Permanent(format!(
                    "{}: the login may not read {} ({e}); log in as a user who can (root for \
                     a block device)",
                    self.uri.endpoint(),
                    self.uri.path
                )))
            }
            other => {
                // ssh has exited, or hangs: its words say why, once its
                // stderr is read to the end (it may close stdout first).
                let _ = child.start_kill();
                let _ = tokio::time::timeout(Duration::from_secs(2), child.wait()).await;
                let _ = tokio::time::timeout(Duration::from_secs(2), stderr_done).await;
                let text = said.lock().expect("poisoned").clone();
                let detail = match other {
                    Ok(Err(e)) => e.to_string(),
                    _ => format!("no session within {limit:?}"),
                };
                Err(self.explain(&text, &detail).await)
            }
        }
    }

    /// Turn what ssh printed into an error the operator can act on.
    async fn explain(&self, said: &str, detail: &str) -> ConnectError {
        let who = self.uri.endpoint();
        let said_trimmed = said.trim();
        if said.contains("REMOTE HOST IDENTIFICATION HAS CHANGED")
            || said.contains("Host key for") && said.contains("has changed")
        {
            return ConnectError::Permanent(format!(
                "{who}: the host key has CHANGED since it was recorded in known_hosts. This \
                 may be another machine answering at that address; nothing was read. If the \
                 legacy host was reinstalled, remove its old key (ssh-keygen -R HOST) and \
                 check the new one. ssh said: {said_trimmed}"
            ));
        }
        if said.contains("Host key verification failed") || said.contains("host key is known") {
            let fp = self.fingerprints().await;
            return ConnectError::Permanent(format!(
                "{who}: its host key is not in known_hosts, so it is not trusted. {fp}Check \
                 the fingerprint on the legacy host (ssh-keygen -lf /etc/ssh/ssh_host_*_key.pub), \
                 then add it to known_hosts, or run again with --accept-new-host-key to \
                 record it on first use"
            ));
        }
        if said.contains("Permission denied") {
            return ConnectError::Permanent(format!(
                "{who}: the login was refused (no key accepted). Keys come from the ssh agent, \
                 ~/.ssh/id_* and ~/.ssh/config, or ?identity=FILE in the URI. ssh said: \
                 {said_trimmed}"
            ));
        }
        if said.contains("subsystem request failed") {
            return ConnectError::NoSftp(format!(
                "{who}: the legacy host's sshd does not offer SFTP (no `Subsystem sftp` in \
                 sshd_config). Enable it (Subsystem sftp /usr/libexec/openssh/sftp-server, or \
                 internal-sftp), or serve the disk with `stream export`"
            ));
        }
        let why = match said_trimmed.is_empty() {
            true => detail.to_string(),
            false => format!("{detail}; ssh said: {said_trimmed}"),
        };
        ConnectError::Transient(format!("{who}: {why}"))
    }

    /// "The host's keys: ED25519 SHA256:... " from ssh-keyscan, or nothing.
    async fn fingerprints(&self) -> String {
        let mut scan = Command::new("ssh-keyscan");
        if let Some(p) = self.uri.port {
            scan.arg("-p").arg(p.to_string());
        }
        scan.arg("-T").arg("5").arg(&self.uri.host);
        let Ok(out) = tokio::time::timeout(Duration::from_secs(10), scan.output()).await else {
            return String::new();
        };
        let Ok(out) = out else {
            return String::new();
        };
        let Ok(mut keygen) = Command::new("ssh-keygen")
            .args(["-l", "-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
        else {
            return String::new();
        };
        if let Some(mut i) = keygen.stdin.take() {
            use tokio::io::AsyncWriteExt;
            let _ = i.write_all(&out.stdout).await;
        }
        let Ok(Ok(out)) =
            tokio::time::timeout(Duration::from_secs(10), keygen.wait_with_output()).await
        else {
            return String::new();
        };
        let lines: Vec<String> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| l.trim().to_string())
            .filter(|l| !l.is_empty())
            .collect();
        match lines.is_empty() {
            true => String::new(),
            false => format!("It offers: {}. ", lines.join("; ")),
        }
    }
}
