//! systemd's readiness protocol (`Type=notify`): one datagram to
//! `$NOTIFY_SOCKET` saying `READY=1` once the export serves, `STOPPING=1`
//! when it stops, `STATUS=...` for `systemctl status`. Without
//! `NOTIFY_SOCKET` (not under systemd) nothing is sent.

use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};

/// Send `state` (newline-separated `KEY=VALUE` lines); failures are logged,
/// never fatal: the service still runs.
pub fn notify(state: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let path = path.to_string_lossy().into_owned();
    let sent = (|| -> std::io::Result<()> {
        let sock = UnixDatagram::unbound()?;
        let addr = match path.strip_prefix('@') {
            // An abstract socket (systemd's default for user managers).
            Some(name) => SocketAddr::from_abstract_name(name.as_bytes())?,
            None => SocketAddr::from_pathname(&path)?,
        };
        sock.send_to_addr(state.as_bytes(), &addr)?;
        Ok(())
    })();
    if let Err(e) = sent {
        tracing::warn!("cannot notify systemd at NOTIFY_SOCKET={path}: {e}");
    }
}
