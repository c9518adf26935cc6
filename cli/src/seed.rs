//! `stream seed`: copy the legacy disk into the target while the legacy
//! server still runs, in passes, so that the cutover moves only what
//! changed since (ARCHITECTURE.md, "Pre-copy").
//!
//! Each pass opens the migration (creating it on the first), compares what
//! was copied with the source (`Volume::changed_chunks`: the source's chunk
//! hashes from `stream export`, or a local read), forgets the chunks that
//! changed, and hydrates until every chunk is present again, recording the
//! blake3 of each chunk as it is copied. The state then says the copy is
//! not trusted until the cutover (`SeedRecord::cutover_pending`): `stream
//! start` repeats the comparison with the legacy server stopped and serves
//! at once, fetching only the changed chunks. A pass killed at any point is
//! resumed by the next one: the comparison finds what it had not copied.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use lazy_fetch::source::Source;
use lazy_fetch::state::{self, SeedRecord, StateDir};
use lazy_fetch::{OpenOptions, Volume, hydrate};
use serde::Serialize;

use crate::finalize::Step;

#[derive(clap::Args)]
pub struct SeedArgs {
    /// The legacy disk: an NBD URI (`stream export` on the legacy host
    /// serves chunk hashes, so later passes and the cutover compare 32 bytes
    /// per chunk instead of reading it) or a local path.
    #[arg(long, value_name = "URI|PATH")]
    source: String,
    /// Where the copy goes (file or block device), as for `stream start`.
    #[arg(long, value_name = "PATH")]
    target: PathBuf,
    /// State directory [default: derived from the target, as `stream start`].
    #[arg(long, value_name = "DIR")]
    state: Option<PathBuf>,
    /// Chunk size of a new migration (e.g. 64K, 1M).
    #[arg(long, value_name = "SIZE", value_parser = lazy_fetch::units::parse_size)]
    chunk_size: Option<u64>,
    /// Copy at most this many bytes per second (e.g. 50M), to spare the
    /// legacy server and the link.
    #[arg(long, value_name = "BYTES/s", value_parser = lazy_fetch::units::parse_size)]
    rate_limit: Option<u64>,
    /// Passes to run now; run the command again for more (each reports what
    /// changed since the previous one).
    #[arg(long, value_name = "N", default_value_t = 1)]
    passes: u32,
    /// Print one JSON report per pass on stdout.
    #[arg(long)]
    json: bool,
}

/// What one pass did.
#[derive(Debug, Serialize)]
pub struct PassReport {
    pub schema: u32,
    /// Passes complete on this migration, this one included.
    pub pass: u32,
    /// Chunks found changed since the previous pass (every chunk copied,
    /// for the first).
    pub changed_chunks: u64,
    pub chunks_total: u64,
    /// Bytes read from the source by this pass.
    pub bytes_copied: u64,
    /// What a cutover now would fetch if the disk changed as fast as during
    /// this pass: the changed chunks' bytes.
    pub cutover_estimate_bytes: u64,
    /// Whether the source computed its chunk hashes (`stream export`) for
    /// the comparison, instead of being read.
    pub source_hashes: bool,
    pub seconds: f64,
}

pub async fn run(args: SeedArgs) -> anyhow::Result<()> {
    if args.passes == 0 {
        bail!("--passes must be at least 1");
    }
    let state_dir = args
        .state
        .clone()
        .unwrap_or_else(|| state::default_dir(&args.target));
    for _ in 0..args.passes {
        let report = pass(&args, &state_dir).await?;
        if args.json {
            crate::outln!("{}", serde_json::to_string(&report)?);
        } else {
            crate::outln!(
                "pass {}: {} of {} chunks {} ({} copied in {:.1} s); a cutover now would fetch about {} bytes",
                report.pass,
                report.changed_chunks,
                report.chunks_total,
                if report.pass == 1 {
                    "copied"
                } else {
                    "changed since the last pass"
                },
                report.bytes_copied,
                report.seconds,
                report.cutover_estimate_bytes
            );
        }
    }
    Ok(())
}

async fn pass(args: &SeedArgs, state_dir: &std::path::Path) -> anyhow::Result<PassReport> {
    let t0 = Instant::now();
    let existing = StateDir::exists(state_dir)
        .then(|| StateDir::read_header(state_dir))
        .transpose()?;
    if let Some(h) = &existing {
        if h.seed.is_none() {
            bail!(
                "{} is a migration `stream start` began, not a seeded one: its clients may have \
                 written, so it cannot be seeded",
                state_dir.display()
            );
        }
        if !h.seed.as_ref().is_some_and(|s| s.cutover_pending) {
            bail!(
                "{}: the cutover has happened (`stream start` ran on this migration); seeding \
                 it again would undo clients' writes",
                state_dir.display()
            );
        }
    } else {
        StateDir::check_creatable(state_dir)
            .with_context(|| format!("cannot seed into {}", state_dir.display()))?;
        if !args.source.contains("://") {
            lazy_fetch::target::identity::check_distinct(
                std::path::Path::new(&args.source),
                &args.target,
            )?;
        }
    }
    let source = crate::start::open_source(
        &args.source,
        existing.as_ref().map(|h| h.source.size),
        nbd_source::NbdOptions::default().stall_timeout,
        false,
    )
    .await?;
    let volume = Volume::open(
        source,
        &OpenOptions {
            target: args.target.clone(),
            state_dir: state_dir.to_path_buf(),
            chunk_size: args.chunk_size,
            source_may_differ: true,
            ..Default::default()
        },
    )
    .await
    .with_context(|| format!("cannot seed into {}", state_dir.display()))?;
    if volume.header().seed.is_none() {
        // Marked before the first byte is copied: a killed first pass
        // leaves a seeded migration that the next pass resumes.
        volume.update_header(|h| {
            h.seed = Some(SeedRecord {
                cutover_pending: true,
                ..SeedRecord::default()
            })
        })?;
    }
    let g = volume.geometry();
    let before = volume.map().present_count();
    let (changed, source_hashes) = if before == 0 {
        (g.chunks(), false)
    } else {
        let step = Step::chunks("compare", args.json);
        let found = volume
            .changed_chunks(&|d, t| step.update("chunks", d, t, None))
            .await?;
        drop(step);
        let (list, hashes) = match found {
            Some(list) => (list, volume.source().id().kind != "file"),
            None => {
                tracing::warn!(
                    "the source serves no chunk hashes (nbdkit, qemu-nbd, an older stream \
                     export): this pass copies every chunk again"
                );
                ((0..g.chunks()).collect(), false)
            }
        };
        volume.forget_changed(&list).await?;
        // Absent chunks (a pass killed before it finished) are copied too.
        (g.chunks() - volume.map().present_count(), hashes)
    };
    let fetched = volume.status().bytes_fetched;
    let opts = hydrate::Options::limited(args.rate_limit);
    let step = Step::bytes("seed", args.json, g.size());
    let v = volume.clone();
    let (t_copy, present_at_start) = (Instant::now(), v.status().bytes_present);
    let watch = async {
        loop {
            let st = v.status();
            // The pass's average rate: the bar's ETA and the JSON `rate`.
            let secs = t_copy.elapsed().as_secs_f64();
            let rate = (secs >= 1.0)
                .then(|| st.bytes_present.saturating_sub(present_at_start) as f64 / secs);
            step.update("bytes", st.bytes_present, st.size, rate);
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    };
    tokio::select! {
        _ = hydrate::run(volume.clone(), opts, std::future::pending()) => {}
        _ = watch => {}
    }
    let st = volume.status();
    step.update("bytes", st.bytes_present, st.size, None);
    drop(step);
    let record = finish(&volume, changed)?;
    let bytes_copied = volume.status().bytes_fetched - fetched;
    volume.close().await?;
    Ok(PassReport {
        schema: crate::control::SCHEMA,
        pass: record.passes,
        changed_chunks: changed,
        chunks_total: g.chunks(),
        bytes_copied,
        cutover_estimate_bytes: changed.saturating_mul(g.chunk_size()).min(g.size()),
        source_hashes,
        seconds: t0.elapsed().as_secs_f64(),
    })
}

fn finish<S: lazy_fetch::source::Source>(
    volume: &Arc<Volume<S>>,
    changed: u64,
) -> anyhow::Result<SeedRecord> {
    let header = volume.update_header(|h| {
        let s = h.seed.get_or_insert_with(SeedRecord::default);
        s.passes += 1;
        s.changed_last_pass = changed;
        s.cutover_pending = true;
        s.last_pass_at = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
    })?;
    Ok(header.seed.unwrap_or_default())
}
