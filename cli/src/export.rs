//! `stream export`: a local disk as a read-only NBD export.

use std::io::Write;
use std::os::fd::OwnedFd;
use std::path::PathBuf;

use std::io;
use std::sync::Arc;

use anyhow::Context;
use lazy_fetch::proof::{self, HashDevice};
use nbd_server::{
    BlockDevice, Capabilities, Export, Extent, FileDevice, Listener, Piece, Server, Shutdown,
    ZeroFlags,
};

#[derive(clap::Args)]
pub struct ExportArgs {
    /// The disk to serve: a regular file or a block device.
    path: PathBuf,
    /// TCP address to listen on; port 0 picks a free port.
    #[arg(
        long,
        value_name = "ADDR",
        default_value = "127.0.0.1:10809",
        conflicts_with = "socket"
    )]
    listen: String,
    /// Listen on this unix socket instead of TCP.
    #[arg(long, value_name = "PATH")]
    socket: Option<PathBuf>,
    /// Export name clients select (the empty name selects it too).
    #[arg(long, default_value = "")]
    name: String,
    /// Description shown to clients (e.g. by `nbdinfo --list`).
    #[arg(long)]
    description: Option<String>,
    /// Accept writes. A legacy disk is served read-only; this is for tests.
    #[arg(long)]
    writable: bool,
    #[command(flatten)]
    tls: crate::tls_args::TlsArgs,
    #[command(flatten)]
    limits: crate::limits::LimitArgs,
    /// When ready, print one JSON object (schema in docs/json-schema.md)
    /// instead of the bare URI.
    #[arg(long)]
    json: bool,
}

pub async fn run(args: ExportArgs, activation: Option<OwnedFd>) -> anyhow::Result<()> {
    let device = FileDevice::open(&args.path, args.writable)
        .with_context(|| format!("cannot serve {}", args.path.display()))?;
    let size = device.size();
    let activated = activation.is_some();
    let tls = args.tls.server_tls()?;
    if activation.is_none() && args.socket.is_none() {
        args.tls.check_listen(&args.listen)?;
    }
    let listener = match (activation, &args.socket) {
        (Some(fd), _) => Listener::from_activation_fd(fd).context("socket activation")?,
        (None, Some(path)) => Listener::bind_unix(path).with_context(|| {
            format!(
                "the export of {}: choose another --socket",
                args.path.display()
            )
        })?,
        (None, None) => Listener::bind_tcp(&args.listen).await.with_context(|| {
            // A name is looked up first (glibc's NSS); a failure there is
            // no busy port. The static build meets this on legacy hosts.
            let hint = if args.listen.parse::<std::net::SocketAddr>().is_ok() {
                "choose another --listen address (one port per export)"
            } else {
                "give --listen a numeric address (IP:PORT): host names resolve only \
                 through /etc/hosts and DNS"
            };
            format!("the export of {}: {hint}", args.path.display())
        })?,
    };
    let uri = crate::tls_args::client_uri(listener.uri(&args.name)?, tls.as_ref());
    // Beside the disk, unlisted: the blake3 of its chunks for every chunk
    // size a migration may use (`lazy_fetch::proof`), so the cloud side
    // proves its copy with 32 bytes per chunk over the link.
    let disk = Arc::new(device);
    let hashes = proof::chunk_sizes()
        .map(|chunk| Export {
            name: proof::export_name(chunk, &args.name),
            description: Some(format!(
                "blake3 of each {chunk}-byte chunk of {}",
                args.path.display()
            )),
            device: Served::Hashes(HashDevice::new(disk.clone(), chunk)),
        })
        .collect();
    let server = Server::with_unlisted(
        vec![Export {
            name: args.name.clone(),
            description: args.description.clone(),
            device: Served::Disk(disk),
        }],
        hashes,
        tls,
        args.limits.limits(),
    );
    let shutdown = Shutdown::new();
    crate::shutdown_on_signals(shutdown.clone(), crate::DEFAULT_STOP_TIMEOUT, Vec::new)?;
    tracing::info!(
        "serving {} ({size} bytes, {}) at {uri}",
        args.path.display(),
        if args.writable {
            "writable"
        } else {
            "read-only"
        }
    );
    if !activated {
        // The one line on stdout: scripts and tests read the URI from it.
        // Under socket activation stdout belongs to the client program.
        let mut out = std::io::stdout().lock();
        if args.json {
            let ready = serde_json::json!({
                "schema": crate::control::SCHEMA,
                "event": "ready",
                "pid": std::process::id(),
                "export_uri": uri,
                "path": args.path,
                "size": size,
                "writable": args.writable,
            });
            writeln!(out, "{ready}")?;
        } else {
            writeln!(out, "{uri}")?;
        }
        out.flush()?;
    }
    server.serve(listener, shutdown).await?;
    tracing::info!("stopped");
    Ok(())
}

/// What `stream export` serves: the disk, and the hashes of its chunks.
enum Served {
    Disk(Arc<FileDevice>),
    Hashes(HashDevice<FileDevice>),
}

impl BlockDevice for Served {
    fn size(&self) -> u64 {
        match self {
            Served::Disk(d) => d.size(),
            Served::Hashes(h) => h.size(),
        }
    }

    fn capabilities(&self) -> Capabilities {
        match self {
            Served::Disk(d) => d.capabilities(),
            Served::Hashes(h) => h.capabilities(),
        }
    }

    fn block_sizes(&self) -> nbd_server::device::BlockSizes {
        match self {
            Served::Disk(d) => d.block_sizes(),
            Served::Hashes(h) => h.block_sizes(),
        }
    }

    async fn read(&self, offset: u64, len: u32) -> io::Result<Vec<Piece>> {
        match self {
            Served::Disk(d) => d.read(offset, len).await,
            Served::Hashes(h) => h.read(offset, len).await,
        }
    }

    async fn write(&self, offset: u64, data: Vec<u8>, fua: bool) -> io::Result<()> {
        match self {
            Served::Disk(d) => d.write(offset, data, fua).await,
            Served::Hashes(h) => h.write(offset, data, fua).await,
        }
    }

    async fn flush(&self) -> io::Result<()> {
        match self {
            Served::Disk(d) => d.flush().await,
            Served::Hashes(h) => h.flush().await,
        }
    }

    async fn trim(&self, offset: u64, len: u64, fua: bool) -> io::Result<()> {
        match self {
            Served::Disk(d) => d.trim(offset, len, fua).await,
            Served::Hashes(h) => h.trim(offset, len, fua).await,
        }
    }

    async fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> io::Result<()> {
        match self {
            Served::Disk(d) => d.write_zeroes(offset, len, flags).await,
            Served::Hashes(h) => h.write_zeroes(offset, len, flags).await,
        }
    }

    async fn cache(&self, offset: u64, len: u64) -> io::Result<()> {
        match self {
            Served::Disk(d) => d.cache(offset, len).await,
            Served::Hashes(h) => h.cache(offset, len).await,
        }
    }

    async fn block_status(&self, offset: u64, len: u64) -> io::Result<Vec<Extent>> {
        match self {
            Served::Disk(d) => d.block_status(offset, len).await,
            Served::Hashes(h) => h.block_status(offset, len).await,
        }
    }
}
