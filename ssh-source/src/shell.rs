//! The fallback where the legacy sshd offers no SFTP subsystem: a remote
//! shell that reads the disk with `dd`, one request at a time.
//!
//! The command line (POSIX sh, as old as CentOS 5's bash and coreutils
//! 5.97: no `iflag=skip_bytes`) first prints `size N` (from `blockdev
//! --getsize64`, or `wc -c` for a file), then for every line `OFFSET LEN`
//! on its stdin writes exactly those bytes: `dd` in 512-byte blocks when
//! both are multiples of 512 (every chunk of a block device), in bytes
//! otherwise (a file's short tail). One request at a time per session, so
//! each costs a round trip and a `dd` process on the legacy host: slower
//! than SFTP, there for hosts that have nothing else.

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::process::{ChildStdin, ChildStdout};

/// The remote command line for the disk at `path`.
pub fn command_line(path: &str) -> String {
    let quoted = format!("'{}'", path.replace('\'', "'\\''"));
    format!(
        "p={quoted}; [ -r \"$p\" ] || {{ echo \"stream: cannot read $p\" >&2; exit 3; }}; \
         s=$(blockdev --getsize64 \"$p\" 2>/dev/null || wc -c < \"$p\") || exit 3; \
         echo \"size $s\"; \
         while read o n; do \
         if [ $((o % 512)) -eq 0 ] && [ $((n % 512)) -eq 0 ]; then \
         dd if=\"$p\" bs=512 skip=$((o / 512)) count=$((n / 512)) 2>/dev/null; \
         else dd if=\"$p\" bs=1 skip=$o count=$n 2>/dev/null; fi; done"
    )
}

/// A remote shell serving reads.
pub struct Shell {
    io: tokio::sync::Mutex<(ChildStdin, BufReader<ChildStdout>)>,
    size: u64,
    dead: AtomicBool,
}

impl Shell {
    /// Read the `size N` line the command prints first.
    pub async fn start(stdout: ChildStdout, stdin: ChildStdin) -> io::Result<Shell> {
        let mut out = BufReader::new(stdout);
        let mut line = String::new();
        out.read_line(&mut line).await?;
        let size = line
            .trim()
            .strip_prefix("size ")
            .and_then(|n| n.trim().parse().ok())
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("the remote shell did not report the disk's size (said {line:?})"),
                )
            })?;
        Ok(Shell {
            io: tokio::sync::Mutex::new((stdin, out)),
            size,
            dead: AtomicBool::new(false),
        })
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn is_dead(&self) -> bool {
        self.dead.load(Ordering::Acquire)
    }

    pub async fn read_exact(&self, offset: u64, len: usize) -> io::Result<Vec<u8>> {
        let ended = || {
            io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "the remote shell has ended",
            )
        };
        let mut io = self.io.lock().await;
        if self.is_dead() {
            return Err(ended());
        }
        // A request that does not end whole (an error, or dropped half way
        // by a stall timeout) leaves its answer, or part of it, in the
        // stream, which the next request would take for its own: the
        // session ends with it.
        let mut step = Step {
            dead: &self.dead,
            whole: false,
        };
        let result = async {
            io.0.write_all(format!("{offset} {len}\n").as_bytes())
                .await?;
            io.0.flush().await?;
            let mut buf = vec![0u8; len];
            io.1.read_exact(&mut buf).await?;
            io::Result::Ok(buf)
        }
        .await;
        step.whole = result.is_ok();
        result.map_err(|e| io::Error::new(io::ErrorKind::ConnectionAborted, e))
    }
}

/// Marks the shell dead when dropped before its request was `whole`.
struct Step<'a> {
    dead: &'a AtomicBool,
    whole: bool,
}

impl Drop for Step<'_> {
    fn drop(&mut self) {
        if !self.whole {
            self.dead.store(true, Ordering::Release);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The command line run by this machine's `sh` against `path`, as ssh
    /// would run it on the legacy host.
    async fn local_shell(path: &std::path::Path) -> (tokio::process::Child, Shell) {
        let mut child = tokio::process::Command::new("sh")
            .arg("-c")
            .arg(command_line(path.to_str().unwrap()))
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let sh = Shell::start(child.stdout.take().unwrap(), child.stdin.take().unwrap())
            .await
            .unwrap();
        (child, sh)
    }

    #[test]
    fn the_path_is_quoted_for_the_remote_shell() {
        let line = command_line("/srv/it's here.img");
        assert!(line.starts_with("p='/srv/it'\\''s here.img';"), "{line}");
    }

    /// The command line, run by this machine's sh against a file of an odd
    /// size: the size line, an aligned read, and the short tail.
    #[tokio::test]
    async fn the_command_line_serves_aligned_reads_and_the_tail() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.img");
        let data: Vec<u8> = (0..5000u32).map(|i| (i * 7 % 251) as u8).collect();
        std::fs::write(&path, &data).unwrap();
        let (_child, sh) = local_shell(&path).await;
        assert_eq!(sh.size(), 5000);
        assert_eq!(sh.read_exact(512, 1024).await.unwrap(), data[512..1536]);
        assert_eq!(sh.read_exact(4096, 904).await.unwrap(), data[4096..]);
        assert_eq!(sh.read_exact(0, 4096).await.unwrap(), data[..4096]);
    }

    /// A read dropped after its request went out (what the stall timeout
    /// does) ends the session: the next read fails rather than take the
    /// dropped one's answer for its own.
    #[tokio::test]
    async fn a_read_cut_short_ends_the_session_instead_of_misreading() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.img");
        let data: Vec<u8> = (0..(1u32 << 20)).map(|i| (i % 251) as u8).collect();
        std::fs::write(&path, &data).unwrap();
        let (_child, sh) = local_shell(&path).await;
        // Polled once: the request is written, the answer not yet read.
        let cut = futures_util::FutureExt::now_or_never(sh.read_exact(0, 1 << 20));
        assert!(cut.is_none(), "the read finished in one poll");
        assert!(sh.is_dead());
        let next = sh.read_exact(4096, 4096).await;
        assert!(next.is_err(), "a read after a cut one must not succeed");
    }
}
