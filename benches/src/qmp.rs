//! A minimal QMP client: the JSON monitor of `qemu-storage-daemon`.
//!
//! QMP is one JSON object per line over a unix socket: a greeting, then
//! `qmp_capabilities`, then commands whose replies are `{"return": ..}` or
//! `{"error": ..}`, with asynchronous `{"event": ..}` lines interleaved
//! (skipped here; job progress is polled with `query-block-jobs`).

use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

/// How long one command may take to answer.
const REPLY_TIMEOUT: Duration = Duration::from_secs(10);

pub struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Qmp {
    /// Connect to `sock` (retrying until `within` passes: the daemon creates
    /// it while starting), read the greeting and leave negotiation mode.
    pub fn connect(sock: &Path, within: Duration) -> io::Result<Qmp> {
        let deadline = Instant::now() + within;
        let stream = loop {
            match UnixStream::connect(sock) {
                Ok(s) => break s,
                Err(e) if Instant::now() >= deadline => {
                    return Err(io::Error::other(format!(
                        "QMP socket {}: {e}",
                        sock.display()
                    )));
                }
                Err(_) => thread::sleep(Duration::from_millis(20)),
            }
        };
        stream.set_read_timeout(Some(REPLY_TIMEOUT))?;
        stream.set_write_timeout(Some(REPLY_TIMEOUT))?;
        let mut q = Qmp {
            reader: BufReader::new(stream.try_clone()?),
            writer: stream,
        };
        let greeting = q.line()?;
        if greeting.get("QMP").is_none() {
            return Err(io::Error::other(format!("QMP greeting: {greeting}")));
        }
        q.execute("qmp_capabilities", serde_json::json!({}))?;
        Ok(q)
    }

    fn line(&mut self) -> io::Result<serde_json::Value> {
        let mut l = String::new();
        if self.reader.read_line(&mut l)? == 0 {
            return Err(io::Error::other("QMP: the daemon closed its monitor"));
        }
        serde_json::from_str(&l).map_err(|e| io::Error::other(format!("QMP reply {l:?}: {e}")))
    }

    /// Run `command` with `arguments`; the `return` value, or an error
    /// carrying QMP's own description.
    pub fn execute(
        &mut self,
        command: &str,
        arguments: serde_json::Value,
    ) -> io::Result<serde_json::Value> {
        let req = serde_json::json!({ "execute": command, "arguments": arguments });
        self.writer.write_all(format!("{req}\n").as_bytes())?;
        loop {
            let mut v = self.line()?;
            if v.get("event").is_some() {
                continue;
            }
            if let Some(e) = v.get("error") {
                return Err(io::Error::other(format!("QMP {command}: {e}")));
            }
            return Ok(v["return"].take());
        }
    }
}
