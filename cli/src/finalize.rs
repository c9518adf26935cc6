//! `stream finalize` and `stream verify`.
//!
//! Finalize is a re-runnable state machine whose progress lives in the
//! state header (`FinalizeRecord`), so an interrupted run (killed, source
//! lost, Cinder unreachable) picks up where it stopped:
//!
//! ```text
//!  handover      a running `stream start` hydrates the rest at full speed,
//!                waits for its clients to go (or drops them: --force), stops
//!  hydrate       (no start running) hydrate here; a source that cannot be
//!                reached ends the run non-zero, saying what is missing
//!  flush         target and map durable
//!  manifest      blake3 of every chunk and of the disk   [manifest_written]
//!  verify        with --verify: compare with source and manifest [verified]
//!  cinder        with --cinder-manage: adopt the LV      [cinder intent, then id]
//!  finalized     phase = finalized; never served again
//! ```
//!
//! Clients are gone before the manifest is written: the issue lists
//! "manifest, verify, wait for clients", but a client still writing after
//! the manifest would make it wrong, so we wait first (ARCHITECTURE.md).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::source::AnySource;
use anyhow::{Context, bail};
use lazy_fetch::manifest::{self, Manifest, VerifyReport};
use lazy_fetch::state::{self, FinalizeRecord, Header, Phase, StateDir};
use lazy_fetch::{OpenOptions, Volume, hydrate};
use serde::Serialize;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

use crate::control::{Event, Request};

#[derive(clap::Args)]
pub struct FinalizeArgs {
    /// State directory of the migration.
    #[arg(long, value_name = "DIR")]
    state: Option<PathBuf>,
    /// Or its target (the state directory is derived as `stream start` does).
    #[arg(long, value_name = "PATH")]
    target: Option<PathBuf>,
    /// Also re-read source and target and compare every chunk (see `stream verify`).
    #[arg(long)]
    verify: bool,
    /// Disconnect NBD clients that are still connected instead of waiting.
    #[arg(long)]
    force: bool,
    /// Give up waiting for hydration or for clients after this long (e.g.
    /// 30s, 10m, 2h); the migration keeps serving.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    timeout: Option<Duration>,
    /// Print the result as JSON (schema in docs/status.md).
    #[arg(long)]
    json: bool,
    /// Adopt the target LV into Cinder (LVM driver) on this
    /// HOST@BACKEND#POOL with the manage-existing call; credentials from
    /// OS_CLOUD (clouds.yaml) or the usual OS_* environment (OS_AUTH_URL,
    /// OS_USERNAME, OS_PASSWORD, OS_PROJECT_NAME, domains; or OS_TOKEN; or
    /// an application credential), OS_CACERT for a private CA. Cinder's default policy lets only admins manage: the
    /// user needs the admin role on the project the volume goes into.
    /// Credentials, host, type, zone and LV are checked before a running
    /// `stream start` is stopped.
    #[arg(long, value_name = "HOST@BACKEND#POOL")]
    cinder_manage: Option<String>,
    /// Project (id, or name in OS_PROJECT_DOMAIN_*) the volume goes into,
    /// where the tenant can boot it [default: OS_PROJECT_*].
    #[arg(long, value_name = "PROJECT", requires = "cinder_manage")]
    project: Option<String>,
    /// Name of the Cinder volume [default: stream-LV]. Only a label: a
    /// re-run finds the volume by its recorded id or by the migration id in
    /// its metadata, never by name.
    #[arg(long, value_name = "NAME", requires = "cinder_manage")]
    volume_name: Option<String>,
    /// Volume type (name or id) of the managed volume [default: Cinder's].
    #[arg(long, value_name = "TYPE", requires = "cinder_manage")]
    volume_type: Option<String>,
    /// Availability zone of the managed volume [default: Cinder's].
    #[arg(long, value_name = "ZONE", requires = "cinder_manage")]
    availability_zone: Option<String>,
    /// Mark the managed volume bootable.
    #[arg(long, requires = "cinder_manage")]
    bootable: bool,
}

#[derive(clap::Args)]
pub struct VerifyArgs {
    /// State directory of the migration.
    #[arg(long, value_name = "DIR")]
    state: Option<PathBuf>,
    /// Or its target.
    #[arg(long, value_name = "PATH")]
    target: Option<PathBuf>,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

impl FinalizeArgs {
    /// What `stream detach` runs once the guest left the export: finalize
    /// without verifying (the guest writes the target directly now, so a
    /// comparison with the source would report its writes; `stream verify`
    /// runs before the switch) and without Cinder (the guest holds the LV).
    pub fn after_detach(state: PathBuf, timeout: Option<Duration>, json: bool) -> FinalizeArgs {
        FinalizeArgs {
            state: Some(state),
            target: None,
            verify: false,
            force: false,
            timeout,
            json,
            cinder_manage: None,
            project: None,
            volume_name: None,
            volume_type: None,
            availability_zone: None,
            bootable: false,
        }
    }
}

/// `30`, `30s`, `10m`, `2h`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = num
        .parse()
        .map_err(|_| format!("cannot parse duration {s:?} (use e.g. 30s, 10m, 2h)"))?;
    let secs = match unit {
        "" | "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        _ => {
            return Err(format!(
                "cannot parse duration {s:?} (use e.g. 30s, 10m, 2h)"
            ));
        }
    };
    Ok(Duration::from_secs(secs))
}

#[derive(Serialize)]
struct FinalizeReport {
    schema: u32,
    phase: Phase,
    /// What to boot from now.
    native_path: String,
    manifest: Manifest,
    #[serde(skip_serializing_if = "Option::is_none")]
    verify: Option<VerifyReport>,
    /// The Cinder volume the target became, with --cinder-manage.
    #[serde(skip_serializing_if = "Option::is_none")]
    cinder_volume_id: Option<String>,
}

/// Progress of one step on stderr: a bar on a terminal; else a plain line
/// now and then; with `--json` a JSON event line at most every second (and
/// at the end) instead. Nothing with `--quiet` but the JSON events.
pub(crate) struct Step {
    name: &'static str,
    json: bool,
    bar: indicatif::ProgressBar,
    /// When the last line was printed, and the count it showed.
    last: std::sync::Mutex<Option<(Instant, u64)>>,
}

impl Step {
    pub(crate) fn chunks(name: &'static str, json: bool) -> Step {
        let bar = if json {
            indicatif::ProgressBar::hidden()
        } else {
            crate::output::chunk_bar(0, name)
        };
        Step {
            name,
            json,
            bar,
            last: std::sync::Mutex::new(None),
        }
    }

    pub(crate) fn bytes(name: &'static str, json: bool, total: u64) -> Step {
        let bar = if json {
            indicatif::ProgressBar::hidden()
        } else {
            crate::output::byte_bar(total, name)
        };
        Step {
            name,
            json,
            bar,
            last: std::sync::Mutex::new(None),
        }
    }

    /// Whether a line is due (the first, the last, then one per interval).
    fn due(&self, done: u64, total: u64, every: Duration) -> bool {
        let mut last = self.last.lock().expect("poisoned");
        let due = match *last {
            None => true,
            Some((_, shown)) if shown == done => false,
            Some((t, _)) => done >= total || t.elapsed() >= every,
        };
        if due {
            *last = Some((Instant::now(), done));
        }
        due
    }

    pub(crate) fn update(&self, unit: &str, done: u64, total: u64, rate: Option<f64>) {
        self.bar.set_length(total);
        self.bar.set_position(done);
        if self.json {
            if self.due(done, total, Duration::from_secs(1)) {
                event(serde_json::json!({
                    "event": "progress", "step": self.name, "unit": unit,
                    "done": done, "total": total, "rate": rate,
                }));
            }
        } else if !crate::output::bars_enabled() && self.due(done, total, Duration::from_secs(5)) {
            let pct = 100.0 * done as f64 / total.max(1) as f64;
            crate::output::note(&match rate {
                Some(r) => format!(
                    "  {}: {pct:.1}% of {total} {unit} ({}/s)",
                    self.name,
                    crate::status::human_bytes(r)
                ),
                None => format!("  {}: {done}/{total} {unit} ({pct:.1}%)", self.name),
            });
        }
    }
}

impl Drop for Step {
    fn drop(&mut self) {
        self.bar.finish_and_clear();
    }
}

/// A `--json` event line on stderr (stdout keeps the one final document).
fn event(mut v: serde_json::Value) {
    v["schema"] = crate::control::SCHEMA.into();
    eprintln!("{v}");
}

/// Say what happens next: a JSON event, or a line unless `--quiet`.
fn say(json: bool, name: &str, text: &str) {
    if json {
        event(serde_json::json!({ "event": name, "message": text }));
    } else {
        crate::output::note(&format!("  {text}"));
    }
}

/// Ask a running `stream start` to hand the volume over. Returns false if
/// none is running.
async fn handover(dir: &std::path::Path, args: &FinalizeArgs) -> anyhow::Result<bool> {
    let sock = state::control_socket(dir);
    let Ok(stream) = crate::control::connect(&sock).await else {
        return Ok(false);
    };
    let (rd, mut wr) = stream.into_split();
    let req = Request::Handover {
        force: args.force,
        timeout_secs: args.timeout.map(|t| t.as_secs()),
    };
    wr.write_all(serde_json::to_string(&req)?.as_bytes())
        .await?;
    wr.write_all(b"\n").await?;
    let mut lines = BufReader::new(rd).lines();
    let mut pid = None;
    let mut hydrating: Option<Step> = None;
    let mut waiting = None;
    while let Some(line) = lines.next_line().await? {
        let ev = serde_json::from_str::<Event>(&line).with_context(|| {
            format!(
                "unexpected answer from the stream start on {} (a different version?): {line}",
                sock.display()
            )
        })?;
        match ev {
            Event::Hydrating {
                bytes_present,
                size,
                rate,
            } => hydrating
                .get_or_insert_with(|| Step::bytes("hydrate", args.json, size))
                .update("bytes", bytes_present, size, Some(rate)),
            Event::WaitingForClients { connected } => {
                hydrating = None;
                if waiting != Some(connected) {
                    waiting = Some(connected);
                    if args.json {
                        event(serde_json::json!({
                            "event": "waiting_for_clients", "connected": connected,
                        }));
                    } else {
                        crate::output::note(&format!(
                            "  waiting for {connected} NBD client(s) to disconnect (shut the instance down, or use --force)"
                        ));
                    }
                }
            }
            Event::Stopping { pid: p } => pid = Some(p),
            Event::Error { message } => bail!("{message}"),
            Event::Prepared => bail!("unexpected answer from the stream start: {line}"),
        }
    }
    drop(hydrating);
    let Some(pid) = pid else {
        bail!("the running `stream start` closed the control connection without handing over");
    };
    // Wait for it to save its state and exit: the kernel releases its lock
    // on the state at exit, even before its parent reaps it (a zombie keeps
    // its /proc entry, so that is no sign).
    let deadline = Instant::now() + Duration::from_secs(120);
    while lazy_fetch::state::StateDir::in_use(dir)? {
        if Instant::now() > deadline {
            bail!(
                "`stream start` (pid {pid}) did not let go of {} within 120 s of handing over",
                dir.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(true)
}

async fn open(
    dir: &std::path::Path,
    header: &Header,
    allow_finalized: bool,
) -> anyhow::Result<Arc<Volume<AnySource>>> {
    // Finalize's own reads (no `stream start` running) use the default
    // stall timeout; a running start hydrates with its own.
    let stall = nbd_source::NbdOptions::default().stall_timeout;
    let source = crate::start::open_source(
        &header.source.location,
        Some(header.source.size),
        stall,
        false,
    )
    .await?;
    let volume = Volume::open(
        source,
        &OpenOptions {
            target: PathBuf::from(&header.target.path),
            state_dir: dir.to_path_buf(),
            chunk_size: None,
            allow_finalized,
            serving: false,
            target_device: None,
            source_may_differ: false,
        },
    )
    .await
    .with_context(|| format!("cannot open the migration in {}", dir.display()))?;
    Ok(volume)
}

pub async fn run(args: FinalizeArgs) -> anyhow::Result<()> {
    let (dir, header) = crate::locate::existing(args.state.clone(), args.target.clone())?;
    if header.phase == Phase::Finalized {
        return already_finalized(&dir, &header, &args).await;
    }
    // Cinder is asked first: bad credentials, an unreachable cloud, an
    // unknown host, type, zone or LV end the run here, before a running
    // `stream start` is stopped or anything is written.
    let cinder = match &args.cinder_manage {
        Some(host) => Some(cinder_check(&header, host.clone(), &args).await?),
        None => None,
    };
    if handover(&dir, &args).await? {
        say(
            args.json,
            "handed_over",
            "the running `stream start` handed the volume over and stopped",
        );
    }
    let volume = open(&dir, &header, false).await?;

    if !volume.map().is_complete() {
        say(args.json, "hydrating", "hydrating the rest at full speed");
        hydrate_here(&volume, args.timeout, args.json).await?;
    }
    volume.update_header(|h| {
        h.phase = Phase::Finalizing;
        h.finalize.get_or_insert_with(|| FinalizeRecord {
            started_at: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
            ..Default::default()
        });
    })?;
    volume.flush().await?;

    let record = volume.header().finalize.unwrap_or_default();
    let manifest = match Manifest::load(&dir) {
        Ok(m) if record.manifest_written => m,
        _ => {
            let step = Step::chunks("manifest", args.json);
            let m = manifest::write(&volume, &|d, t| step.update("chunks", d, t, None)).await?;
            volume.update_header(|h| {
                if let Some(f) = h.finalize.as_mut() {
                    f.manifest_written = true;
                }
            })?;
            m
        }
    };
    let verify = if args.verify && !record.verified {
        let step = Step::chunks("verify", args.json);
        let r = manifest::verify(&volume, &manifest, &|d, t| {
            step.update("chunks", d, t, None)
        })
        .await?;
        drop(step);
        if !r.ok() {
            print_mismatches(&r);
            volume.close().await?;
            bail!(
                "verification failed: {} mismatching range(s); the migration is not finalized",
                r.mismatches.len()
            );
        }
        volume.update_header(|h| {
            if let Some(f) = h.finalize.as_mut() {
                f.verified = true;
            }
        })?;
        Some(r)
    } else {
        None
    };
    if let Some(checked) = cinder {
        // Cinder refuses an LV that is open: every handle goes first.
        volume.close().await?;
        drop(volume);
        let header = cinder_step(&dir, &header, checked, &args).await?;
        return report(&args, &header, manifest, verify);
    }
    let header = volume.update_header(|h| h.phase = Phase::Finalized)?;
    volume.close().await?;
    report(&args, &header, manifest, verify)
}

/// `stream finalize` of a migration finalized already: its target belongs
/// to the new instance and is never written again. `--verify` verifies it
/// read-only (chunks the instance wrote since differ from the manifest, and
/// are reported as such); `--cinder-manage` is done if it was done, and
/// refused otherwise (the instance may be running from the target).
async fn already_finalized(
    dir: &std::path::Path,
    header: &Header,
    args: &FinalizeArgs,
) -> anyhow::Result<()> {
    let m = Manifest::load(dir)?;
    let when = header
        .finalized_at
        .map(|t| format!(" (at {t}, unix seconds)"))
        .unwrap_or_default();
    if let Some(host) = &args.cinder_manage {
        let done = header.finalize.as_ref().and_then(|f| f.cinder.as_ref());
        match done {
            Some(c) if c.volume_id.is_some() && &c.host == host => {}
            Some(c) => bail!(
                "this migration was finalized{when} into Cinder on {}, not {host}: the target \
                 {} is Cinder volume {} now; nothing was changed",
                c.host,
                header.target.path,
                c.volume_id.as_deref().unwrap_or("(unknown id)")
            ),
            None => bail!(
                "this migration was finalized{when} without --cinder-manage: the target {} \
                 belongs to the new instance now and may be in use, so `stream finalize` will \
                 not hand it to Cinder afterwards (Cinder renames the LV). Once nothing uses it, \
                 adopt it with `cinder manage {host} {}`; nothing was changed",
                header.target.path,
                header.target.path,
            ),
        }
    }
    let verify = if args.verify {
        let volume = open(dir, header, true).await?;
        anyhow::ensure!(
            volume.read_only(),
            "internal error: a finalized target was not opened read-only; nothing was verified"
        );
        let step = Step::chunks("verify", args.json);
        let r = manifest::verify(&volume, &m, &|d, t| step.update("chunks", d, t, None)).await?;
        drop(step);
        // Read-only: no close (nothing to save, and nothing may be written).
        drop(volume);
        if !r.ok() {
            print_mismatches(&r);
            bail!(
                "verification failed: {} mismatching range(s). The migration was finalized{when} \
                 and its target left as it was; if the new instance has written to it since, \
                 its chunks differ from the manifest and this is expected",
                r.mismatches.len()
            );
        }
        Some(r)
    } else {
        None
    };
    report(args, header, m, verify)
}

/// The metadata key naming the migration a Cinder volume came from: how a
/// re-run whose answer from Cinder was lost finds the volume (never by
/// name: another volume may have the same name).
pub const MIGRATION_KEY: &str = "stream_migration_id";

/// What `cinder_check` found: a client at the negotiated API version, the
/// request it checked, and the volume an earlier run made, if any.
struct CinderChecked {
    client: Arc<crate::cinder::Client>,
    request: crate::cinder::ManageRequest,
    existing: Option<crate::cinder::ManagedVolume>,
}

/// The migration id Cinder's metadata carries; states made before markers
/// have none, and get one derived from what identifies their target.
fn migration_id(header: &Header) -> String {
    header.migration_id.clone().unwrap_or_else(|| {
        format!(
            "{}-{}-{}",
            header.created_at, header.target.dev, header.target.ino
        )
    })
}

/// Read-only: log in (scoped to `--project`), negotiate the API version,
/// find the volume an earlier run made (by its recorded id, else by the
/// migration id in its metadata), else check the host, type, zone and LV.
async fn cinder_check(
    header: &Header,
    host: String,
    args: &FinalizeArgs,
) -> anyhow::Result<CinderChecked> {
    use crate::cinder;
    let target = PathBuf::from(&header.target.path);
    let recorded = header.finalize.as_ref().and_then(|f| f.cinder.clone());
    if let Some(r) = &recorded {
        if r.host != host {
            bail!(
                "this migration's LV was handed to Cinder on {} already, not {host}; \
                 nothing was changed",
                r.host
            );
        }
    }
    let migration = migration_id(header);
    let name = args
        .volume_name
        .clone()
        .or_else(|| recorded.as_ref().and_then(|r| r.volume_name.clone()));
    let project = args.project.clone();
    let (volume_type, zone, bootable) = (
        args.volume_type.clone(),
        args.availability_zone.clone(),
        args.bootable,
    );
    tokio::task::spawn_blocking(move || -> anyhow::Result<CinderChecked> {
        let mut settings = cinder::Settings::from_env()?;
        if let Some(p) = &project {
            settings.scope_to(p)?;
        }
        let client = cinder::Client::connect(&settings)?;
        let recorded_id = recorded.as_ref().and_then(|r| r.volume_id.clone());
        let existing = match &recorded_id {
            Some(id) => client.volume(id)?,
            None => None,
        };
        let existing = match existing {
            Some(v) => Some(v),
            None => {
                if let Some(id) = &recorded_id {
                    // Deleted since (as the error_managing message tells
                    // the operator to do): manage again, once the checks
                    // below find the LV under its own name.
                    eprintln!(
                        "  Cinder volume {id}, recorded by an earlier run, is gone from project \
                         {}; looking for this migration's volume again",
                        settings.project_label()
                    );
                }
                client.find_by_metadata(MIGRATION_KEY, &migration)?
            }
        };
        if let Some(v) = &existing {
            if cinder::FAILED.contains(&v.status.as_str()) {
                return Err(cinder::Error::ManageFailed {
                    id: v.id.clone(),
                    status: v.status.clone(),
                    fault: client.fault(&v.id),
                }
                .into());
            }
        }
        // The LV's name: recorded by an earlier run (it may be renamed to
        // volume-<id> since), else from the target path.
        // Once Cinder has the volume the LV may be renamed and its old
        // path gone: the names then only label the request, never sent.
        let (vg, lv) = match (&existing, recorded.as_ref()) {
            (Some(_), Some(r)) if !r.source_name.is_empty() => {
                (String::new(), r.source_name.clone())
            }
            (Some(_), _) => cinder::lv_names(&target).unwrap_or_default(),
            (None, _) => cinder::lv_names(&target)?,
        };
        let name = name.unwrap_or_else(|| format!("stream-{lv}"));
        let mut request = cinder::ManageRequest::new(host, lv.clone(), name);
        request.bootable = bootable;
        request.volume_type = volume_type;
        request.availability_zone = zone;
        request.metadata.insert(MIGRATION_KEY.into(), migration);
        if !vg.is_empty() {
            request
                .metadata
                .insert("stream_source_lv".into(), format!("{vg}/{lv}"));
        }
        if existing.is_none() {
            client.check_manage(&request, true)?;
        }
        Ok(CinderChecked {
            client: Arc::new(client),
            request,
            existing,
        })
    })
    .await?
}

/// Adopt the target LV into Cinder, in the order that makes a re-run safe
/// (see `cinder`): use the volume an earlier run made if `cinder_check`
/// found one, else preflight the closed LV, record the intent, call
/// manage, record the id; wait until the volume settles, check it, then
/// mark the migration finalized.
async fn cinder_step(
    dir: &std::path::Path,
    header: &Header,
    checked: CinderChecked,
    args: &FinalizeArgs,
) -> anyhow::Result<Header> {
    use crate::cinder;
    let (state, mut h, _) = StateDir::open(dir)?;
    let target = PathBuf::from(&header.target.path);
    let size = header.size;
    let save = |h: &Header| state.write_header(h);
    let CinderChecked {
        client,
        request,
        existing,
    } = checked;
    let host = request.host.clone();
    let volume = match existing {
        Some(v) => {
            say(
                args.json,
                "cinder_found",
                &format!(
                    "Cinder already has this migration's volume {} ({}, {}); not calling manage again",
                    v.id,
                    v.name.as_deref().unwrap_or("unnamed"),
                    v.status
                ),
            );
            v
        }
        None => {
            let lv = {
                let target = target.clone();
                tokio::task::spawn_blocking(move || cinder::preflight_lv(&target, size)).await??
            };
            anyhow::ensure!(
                lv.lv == request.source_name,
                "the target is LV {} now, not {} as checked before the handover; nothing was \
                 handed to Cinder",
                lv.full_name(),
                request.source_name
            );
            // Again, strictly: nothing holds the LV now.
            {
                let (client, request) = (client.clone(), request.clone());
                tokio::task::spawn_blocking(move || client.check_manage(&request, false)).await??;
            }
            say(
                args.json,
                "cinder_manage",
                &format!(
                    "asking Cinder at {} ({}) to manage LV {} on {host} as {:?}",
                    client.endpoint(),
                    client.api(),
                    lv.full_name(),
                    request.name
                ),
            );
            if let Some(f) = h.finalize.as_mut() {
                f.cinder = Some(state::CinderRecord {
                    host: host.clone(),
                    source_name: lv.lv.clone(),
                    volume_name: Some(request.name.clone()),
                    volume_id: None,
                });
            }
            save(&h)?;
            let client2 = client.clone();
            tokio::task::spawn_blocking(move || client2.manage_existing(&request)).await??
        }
    };
    // Found by an earlier run without a recorded intent: record it now.
    if let Some(f) = h.finalize.as_mut() {
        f.cinder
            .get_or_insert_with(|| state::CinderRecord {
                host: host.clone(),
                volume_name: volume.name.clone(),
                ..Default::default()
            })
            .volume_id = Some(volume.id.clone());
    }
    save(&h)?;
    let id = volume.id.clone();
    let waiting = client.clone();
    let ready = tokio::task::spawn_blocking(move || {
        waiting.wait_settled(&id, std::time::Duration::from_secs(600))
    })
    .await??;
    // The volume as Cinder shows it must be the LV we filled.
    let gib = header.target.size.div_ceil(cinder::GIB);
    anyhow::ensure!(
        ready.size_gb == Some(gib),
        "Cinder volume {} is available but {} GiB, and the LV is {} bytes ({gib} GiB): \
         check it before booting from it; the migration is not marked finalized",
        ready.id,
        ready
            .size_gb
            .map_or("an unknown number of".into(), |s| s.to_string()),
        header.target.size
    );
    if let (Some(want), Some(got)) = (client.project_id(), ready.project_id.as_deref()) {
        anyhow::ensure!(
            want == got,
            "Cinder volume {} is in project {got}, not {want}; the migration is not marked \
             finalized",
            ready.id
        );
    }
    say(
        args.json,
        "cinder_available",
        &format!(
            "Cinder volume {} ({}) is {}: {gib} GiB, project {}, host {}{}; its LV is volume-{} now",
            ready.id,
            ready.name.as_deref().unwrap_or("unnamed"),
            ready.status,
            ready
                .project_id
                .as_deref()
                .or(client.project_id())
                .unwrap_or("?"),
            ready.host.as_deref().unwrap_or(&host),
            if ready.bootable { ", bootable" } else { "" },
            ready.id
        ),
    );
    h.phase = Phase::Finalized;
    h.finalized_at.get_or_insert(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
    );
    save(&h)?;
    Ok(h)
}

/// Hydrate without a running `stream start`; fail, saying what is missing,
/// when the source makes no progress for a minute (or `timeout` expires).
async fn hydrate_here(
    volume: &Arc<Volume<AnySource>>,
    timeout: Option<Duration>,
    json: bool,
) -> anyhow::Result<()> {
    let st = volume.status();
    let size = st.size;
    let step = Step::bytes("hydrate", json, size);
    // Start the bar where the migration is, so its rate counts only new bytes.
    step.bar.set_position(st.bytes_present);
    step.bar.reset_eta();
    let stop = Arc::new(tokio::sync::Notify::new());
    let task = tokio::spawn(hydrate::run(volume.clone(), hydrate::Options::default(), {
        let stop = stop.clone();
        async move { stop.notified().await }
    }));
    let deadline = timeout.map(|t| Instant::now() + t);
    let mut last = (Instant::now(), volume.map().present_count());
    while !volume.map().is_complete() {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let present = volume.map().present_count();
        step.update("bytes", volume.status().bytes_present, size, None);
        if present > last.1 {
            last = (Instant::now(), present);
        }
        if last.0.elapsed() > Duration::from_secs(60)
            || deadline.is_some_and(|d| Instant::now() > d)
        {
            stop.notify_one();
            let _ = task.await;
            let st = volume.status();
            volume.close().await?;
            bail!(
                "hydration cannot finish: {} of {} chunks ({} bytes) are still missing; source {} is {:?}. \
                 Nothing is lost: run `stream finalize` again (or `stream start`) once the source is reachable",
                st.chunks_total - st.chunks_present,
                st.chunks_total,
                st.size - st.bytes_present,
                st.source,
                st.source_health
            );
        }
    }
    let _ = task.await;
    Ok(())
}

fn print_mismatches(r: &VerifyReport) {
    for m in &r.mismatches {
        eprintln!(
            "  MISMATCH bytes {}..{} ({} bytes) differ from the {}",
            m.offset,
            m.offset + m.length,
            m.length,
            m.against
        );
    }
}

fn report(
    args: &FinalizeArgs,
    header: &Header,
    manifest: Manifest,
    verify: Option<VerifyReport>,
) -> anyhow::Result<()> {
    let native = header.target.path.clone();
    let cinder_volume_id = header
        .finalize
        .as_ref()
        .and_then(|f| f.cinder.as_ref())
        .and_then(|c| c.volume_id.clone());
    if args.json {
        let r = FinalizeReport {
            schema: crate::control::SCHEMA,
            phase: header.phase,
            native_path: native,
            manifest,
            verify,
            cinder_volume_id,
        };
        crate::outln!("{}", serde_json::to_string(&r)?);
        return Ok(());
    }
    match &cinder_volume_id {
        Some(id) => crate::outln!(
            "finalized: the target is Cinder volume {id} now; boot the instance from it (its LV is renamed volume-{id})"
        ),
        None => crate::outln!("finalized: boot the instance from {native}"),
    }
    crate::outln!(
        "  {} bytes, chunk hashes blake3 {}; {} chunks: {} fetched on demand, {} hydrated, {} written by clients, {} zero",
        manifest.size,
        manifest.chunk_hashes_blake3,
        manifest.counts.chunks,
        manifest.counts.fetched_on_demand,
        manifest.counts.hydrated,
        manifest.counts.written_by_clients,
        manifest.counts.zero
    );
    if let Some(v) = verify {
        crate::outln!(
            "  verified: {} chunks equal the source, {} client-written chunks equal the manifest",
            v.chunks_compared_with_source,
            v.chunks_compared_with_manifest
        );
    }
    Ok(())
}

pub async fn verify(args: VerifyArgs) -> anyhow::Result<()> {
    let (dir, header) = crate::locate::existing(args.state, args.target)?;
    let manifest = Manifest::load(&dir).with_context(|| {
        format!(
            "{} has no manifest yet: run `stream finalize` first (it writes one)",
            dir.display()
        )
    })?;
    // A finalized target is opened read-only (see `Volume::open`): an
    // interrupted verify leaves nothing to recover, and never changes it.
    let volume = open(&dir, &header, true).await?;
    anyhow::ensure!(
        header.phase != Phase::Finalized || volume.read_only(),
        "internal error: a finalized target was not opened read-only; nothing was verified"
    );
    let step = Step::chunks("verify", args.json);
    let r = manifest::verify(&volume, &manifest, &|d, t| {
        step.update("chunks", d, t, None)
    })
    .await?;
    drop(step);
    if !volume.read_only() {
        volume.close().await?;
    }
    drop(volume);
    if args.json {
        #[derive(Serialize)]
        struct Versioned<'a> {
            schema: u32,
            #[serde(flatten)]
            report: &'a VerifyReport,
        }
        let doc = Versioned {
            schema: crate::control::SCHEMA,
            report: &r,
        };
        crate::outln!("{}", serde_json::to_string(&doc)?);
    } else if r.ok() {
        let how = if r.source_hashes {
            format!(
                "by the hashes the source computed ({} bytes of hashes and {} bytes of data \
                 read from it)",
                r.source_hash_bytes, r.source_bytes_read
            )
        } else {
            format!("{} bytes read from the source", r.source_bytes_read)
        };
        crate::outln!(
            "verified: {} chunks equal the source, {} client-written chunks equal the manifest ({how})",
            r.chunks_compared_with_source,
            r.chunks_compared_with_manifest,
        );
    }
    if !r.ok() {
        print_mismatches(&r);
        bail!(
            "verification failed: {} mismatching range(s)",
            r.mismatches.len()
        );
    }
    Ok(())
}
