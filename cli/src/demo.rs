//! `stream demo`: the whole job on a small generated disk, on this machine.
//!
//! It runs the real commands as child processes, the way a cutover does:
//! `stream export` serves a generated "legacy" disk on a unix socket,
//! `stream start` migrates it into a target file over NBD, a client reads
//! from the new volume at once (before hydration is done), writes to it,
//! `stream status` is shown while hydration runs, and at the end the target
//! must equal the source plus the client's write.

use std::io::{BufRead, BufReader};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use nbd_server::client::Client;
use nbd_server::uri::NbdUri;

#[derive(clap::Args)]
pub struct DemoArgs {
    /// Size of the generated disk in MiB.
    #[arg(long, default_value_t = 256)]
    size_mib: u64,
    /// Keep the files in this directory instead of a temporary one.
    #[arg(long, value_name = "DIR")]
    dir: Option<PathBuf>,
    /// Limit hydration (e.g. 20M) to watch it progress.
    #[arg(long, value_name = "BYTES/s", default_value = "64M")]
    rate_limit: String,
}

/// A child process killed (by pid) and reaped when dropped.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Proc {
    /// Start `stream ARGS`; wait (bounded) for the URI it prints.
    fn stream(args: &[&str]) -> anyhow::Result<(Proc, String)> {
        let exe = std::env::current_exe().context("cannot find the stream binary")?;
        let mut child = Command::new(exe)
            .args(args)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("cannot run stream {}", args.join(" ")))?;
        let stdout = child.stdout.take().expect("piped");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let proc = Proc(child);
        let line = rx
            .recv_timeout(Duration::from_secs(30))
            .with_context(|| format!("stream {} did not become ready", args[0]))?;
        if line.trim().is_empty() {
            bail!("stream {} exited before it was ready", args[0]);
        }
        Ok((proc, line.trim().to_string()))
    }

    /// SIGTERM and wait (bounded) for a clean exit.
    fn stop(mut self) -> anyhow::Result<()> {
        // SAFETY: kill(2) on a child we own and have not reaped.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.0.try_wait()? {
                if !status.success() {
                    bail!("stopped with {status}");
                }
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("did not stop within 30 s of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// A deterministic "legacy disk": a boot sector, data regions of varied
/// size, an allocated all-zero region, and holes.
fn generate(path: &Path, size: u64) -> anyhow::Result<()> {
    let f = std::fs::File::create(path)?;
    f.set_len(size)?;
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let mut region = |off: u64, len: u64| -> std::io::Result<()> {
        // The low byte of each draw.
        let buf: Vec<u8> = (0..len).map(|_| next().to_le_bytes()[0]).collect();
        f.write_all_at(&buf, off)
    };
    region(0, 1 << 20)?;
    let mib = 1 << 20;
    let mut off = 4 * mib;
    let mut i = 0;
    while off + 4 * mib < size {
        region(off, (1 + i % 3) * mib)?;
        off += 9 * mib + (i % 5) * mib;
        i += 1;
    }
    f.write_all_at(&vec![0u8; 2 << 20], size / 2)?;
    f.sync_all()?;
    Ok(())
}

fn blake3_file(path: &Path) -> anyhow::Result<blake3::Hash> {
    let mut h = blake3::Hasher::new();
    h.update_reader(std::fs::File::open(path)?)?;
    Ok(h.finalize())
}

pub async fn run(args: DemoArgs) -> anyhow::Result<()> {
    let tmp;
    let dir = match &args.dir {
        Some(d) => {
            std::fs::create_dir_all(d)?;
            d.clone()
        }
        None => {
            tmp = tempdir()?;
            tmp.0.clone()
        }
    };
    let size = args.size_mib << 20;
    let legacy = dir.join("legacy.img");
    let target = dir.join("native.img");
    let state = dir.join("state");
    let _ = std::fs::remove_file(&target);
    let _ = std::fs::remove_dir_all(&state);
    crate::outln!(
        "1. generating a {} MiB legacy disk at {}",
        args.size_mib,
        legacy.display()
    );
    generate(&legacy, size)?;

    let legacy_sock = dir.join("legacy.sock");
    let (exporter, legacy_uri) = Proc::stream(&[
        "export",
        legacy.to_str().context("path is not UTF-8")?,
        "--socket",
        legacy_sock.to_str().context("path is not UTF-8")?,
    ])?;
    crate::outln!("2. legacy host: `stream export` serves it read-only at {legacy_uri}");

    let volume_sock = dir.join("volume.sock");
    let t0 = Instant::now();
    let (migration, volume_uri) = Proc::stream(&[
        "start",
        "--source",
        &legacy_uri,
        "--target",
        target.to_str().context("path is not UTF-8")?,
        "--state",
        state.to_str().context("path is not UTF-8")?,
        "--socket",
        volume_sock.to_str().context("path is not UTF-8")?,
        "--rate-limit",
        &args.rate_limit,
    ])?;
    crate::outln!(
        "3. cloud side: `stream start` serves the new volume at {volume_uri} after {:?}",
        t0.elapsed()
    );

    let uri = NbdUri::parse(&volume_uri)?;
    let client = Client::connect_uri(&uri).await?;
    // Read near the end first: hydration starts at the beginning, so these
    // chunks are fetched on demand, as a booting kernel's would be.
    let far = (size - (8 << 20)) & !((1 << 20) - 1);
    for (what, at) in [("a block near the end", far), ("the boot sector region", 0)] {
        let t1 = Instant::now();
        let got = client.read(at, 1 << 20).await?;
        let mut expect = vec![0u8; 1 << 20];
        std::fs::File::open(&legacy)?.read_exact_at(&mut expect, at)?;
        if got != expect {
            bail!("{what} read through the volume differs from the legacy disk");
        }
        crate::outln!(
            "4. the instance reads at once: 1 MiB of {what} (offset {at}) in {:?}, equal to the legacy disk",
            t1.elapsed()
        );
    }
    let note = b"written by the new instance while the copy runs\n";
    let at = size / 3 + 12345;
    client.write(at, note, false).await?;
    client.flush().await?;
    crate::outln!(
        "5. it writes too: {} bytes at offset {at}, flushed",
        note.len()
    );

    let status_args = [
        "status",
        "--state",
        state.to_str().context("path is not UTF-8")?,
    ];
    let exe = std::env::current_exe()?;
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let out = Command::new(&exe)
            .args(status_args)
            .arg("--json")
            .output()?;
        let reply: serde_json::Value = serde_json::from_slice(&out.stdout)
            .with_context(|| String::from_utf8_lossy(&out.stderr).into_owned())?;
        let v = &reply["volume"];
        let present = v["bytes_present"].as_u64().unwrap_or(0);
        crate::outln!(
            "   hydrating: {:5.1}% present, {} on demand, {} source holes skipped",
            100.0 * present as f64 / size as f64,
            v["chunks_fetched_on_demand"],
            v["chunks_source_holes"]
        );
        if v["hydration_complete"].as_bool() == Some(true) {
            break;
        }
        if Instant::now() > deadline {
            bail!("hydration did not complete within 10 minutes");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let status = Command::new(&exe).args(status_args).output()?;
    crate::outln!(
        "6. hydration complete:\n{}",
        String::from_utf8_lossy(&status.stdout)
    );
    // The instance shuts down for its one reboot: its NBD client goes, and
    // finalize takes the volume over from the running `stream start`.
    client.disconnect().await?;
    let out = Command::new(&exe)
        .args([
            "finalize",
            "--verify",
            "--state",
            state.to_str().context("path is not UTF-8")?,
        ])
        .env(
            "RUST_LOG",
            std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .stderr(Stdio::inherit())
        .output()
        .context("cannot run stream finalize")?;
    if !out.status.success() {
        bail!("stream finalize failed ({})", out.status);
    }
    crate::outln!(
        "7. `stream finalize --verify`:\n{}",
        String::from_utf8_lossy(&out.stdout)
    );
    // `start` handed over and exited; reap it.
    migration.stop().context("stream start")?;
    exporter.stop().context("stream export")?;

    // The target must be the legacy disk plus the instance's write.
    let mut expected = std::fs::read(&legacy)?;
    let at = usize::try_from(at).expect("an offset inside the disk just read into memory");
    expected[at..at + note.len()].copy_from_slice(note);
    let got = std::fs::read(&target)?;
    if got != expected {
        bail!("the target differs from the legacy disk plus the client's write");
    }
    crate::outln!(
        "8. the native target equals the legacy disk plus the instance's write (blake3 {}; legacy {})",
        &blake3_file(&target)?.to_hex()[..16],
        &blake3_file(&legacy)?.to_hex()[..16]
    );
    crate::outln!("demo complete in {:?}", t0.elapsed());
    Ok(())
}

/// A temporary directory removed on drop.
struct TempDir(PathBuf);

fn tempdir() -> anyhow::Result<TempDir> {
    let base = std::env::temp_dir().join(format!("stream-demo-{}", std::process::id()));
    std::fs::create_dir_all(&base)?;
    Ok(TempDir(base))
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
