//! What one NBD server lets its clients take (`stream start`, `stream
//! export`): connections at once and the memory their requests hold. The
//! mechanisms are in `nbd_server::server::Limits` and
//! `nbd_server::connection`; this is their flags and the file-descriptor
//! headroom they need.

use lazy_fetch::units::parse_size;
use nbd_server::server::{DEFAULT_MAX_CONNECTIONS, Limits};

/// File descriptors kept beyond one per client: the state directory, the
/// source's connections, the control socket, metrics, FUSE.
const FD_HEADROOM: u64 = 256;

#[derive(clap::Args, Debug, Clone)]
pub struct LimitArgs {
    /// Clients served at once (connections, counted from accept); more are
    /// accepted and closed at once, and the refusal is logged.
    #[arg(long, value_name = "N", default_value_t = DEFAULT_MAX_CONNECTIONS)]
    pub max_connections: usize,
    /// Request and reply data held in memory at once across all clients,
    /// beyond 2 MiB each: a client that does not read its replies waits
    /// for room instead of growing the process (at least 32M).
    #[arg(long, value_name = "SIZE", default_value = "256M", value_parser = parse_size)]
    pub buffer_budget: u64,
}

impl LimitArgs {
    /// The limits, with the process's open-file limit raised to what they
    /// need (soft up to hard); fewer connections, with a warning, when even
    /// the hard limit is short.
    pub fn limits(&self) -> Limits {
        let mut max = self.max_connections.max(1);
        let need = max as u64 + FD_HEADROOM;
        match raise_nofile(need) {
            Ok(have) if have < need => {
                // `have < max + FD_HEADROOM`, so `fit <= max`, a usize.
                let fit = usize::try_from(have.saturating_sub(FD_HEADROOM).max(1))
                    .expect("at most max_connections");
                tracing::warn!(
                    "the open-file limit is {have}: serving at most {fit} clients instead of \
                     {max} (raise `ulimit -n` or LimitNOFILE= to serve more)"
                );
                max = fit;
            }
            Ok(_) => {}
            Err(e) => tracing::warn!("cannot read the open-file limit: {e}"),
        }
        Limits {
            max_connections: max,
            buffer_budget: self.buffer_budget,
        }
    }
}

/// Raise the soft RLIMIT_NOFILE towards `want` (up to the hard limit);
/// returns the soft limit in force.
fn raise_nofile(want: u64) -> std::io::Result<u64> {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid pointer to a local struct.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    if r.rlim_cur >= want {
        return Ok(r.rlim_cur);
    }
    let raised = libc::rlimit {
        rlim_cur: want.min(r.rlim_max),
        rlim_max: r.rlim_max,
    };
    // SAFETY: setrlimit only reads `raised`, a live, initialised local.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } != 0 {
        return Ok(r.rlim_cur);
    }
    Ok(raised.rlim_cur)
}
