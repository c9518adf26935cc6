//! `stream status`: progress of a running migration, from its control
//! socket; with no `--state`/`--target`, every migration registered in the
//! run directory (`rundir`), one line each.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use lazy_fetch::state;

use crate::control::{self, Request, StatusReply};

#[derive(clap::Args)]
pub struct StatusArgs {
    /// State directory of the migration.
    #[arg(long, value_name = "DIR")]
    state: Option<PathBuf>,
    /// Or its target (the state directory is derived as `stream start` does).
    #[arg(long, value_name = "PATH")]
    target: Option<PathBuf>,
    /// Print JSON: the control socket's reply, or with no --state/--target
    /// the list (schemas in docs/json-schema.md).
    #[arg(long)]
    json: bool,
    /// Refresh every second until interrupted (with --json: one line per
    /// second); a progress bar on a terminal.
    #[arg(long)]
    watch: bool,
}

pub async fn run(args: StatusArgs) -> anyhow::Result<()> {
    if args.state.is_none() && args.target.is_none() {
        return list(&args).await;
    }
    let dir = crate::locate::resolve_state(args.state, args.target)?;
    if !lazy_fetch::state::StateDir::exists(&dir) {
        anyhow::bail!(
            "{} holds no migration (wrong --state or --target? `stream status` with no \
             argument lists the running ones)",
            dir.display()
        );
    }
    // A finalized migration has no `stream start` and must never get one
    // again: say what it is, not how to start it.
    if let Ok(h) = state::StateDir::read_header(&dir)
        && h.phase == state::Phase::Finalized
    {
        let cinder = h
            .finalize
            .as_ref()
            .and_then(|f| f.cinder.as_ref())
            .and_then(|c| c.volume_id.clone());
        if args.json {
            let doc = serde_json::json!({
                "schema": control::SCHEMA,
                "phase": "finalized",
                "state_dir": dir,
                "source": h.source.location,
                "target": h.target.path,
                "finalized_at": h.finalized_at,
                "cinder_volume_id": cinder,
            });
            crate::outln!("{doc}");
        } else {
            crate::outln!(
                "migration  {} (finalized)\ntarget     {} is native storage now: boot the \
                 instance from it{}; nothing serves it and `stream start` refuses it\n",
                dir.display(),
                h.target.path,
                cinder
                    .map(|id| format!(" (Cinder volume {id})"))
                    .unwrap_or_default()
            );
        }
        return Ok(());
    }
    let sock = state::control_socket(&dir);
    // A seeded migration between passes runs no process: say where it is
    // from its state.
    if let Ok(h) = state::StateDir::read_header(&dir)
        && let Some(seed) = h.seed.as_ref().filter(|s| s.cutover_pending)
        && control::connect(&sock).await.is_err()
    {
        if args.json {
            let doc = serde_json::json!({
                "schema": control::SCHEMA,
                "phase": "seeded",
                "state_dir": dir,
                "source": h.source.location,
                "target": h.target.path,
                "seed": seed,
            });
            crate::outln!("{doc}");
        } else {
            crate::outln!(
                "migration  {} (seeded: {} pass(es), {} chunks changed in the last; cutover to \
                 come)\nsource     {}\ntarget     {} holds the copy: run `stream seed` again \
                 for another pass, or stop the legacy server and run `stream start` to cut over\n",
                dir.display(),
                seed.passes,
                seed.changed_last_pass,
                h.source.location,
                h.target.path
            );
        }
        return Ok(());
    }
    let bars = args.watch && !args.json && crate::output::bars_enabled();
    let mut bar = None;
    loop {
        let line = control::request(&sock, &Request::Status).await?;
        if args.json {
            crate::outln!("{}", line.trim());
        } else {
            let reply: StatusReply = serde_json::from_str(&line).with_context(|| {
                format!(
                    "unexpected reply from the stream start on {} (a different version?)",
                    sock.display()
                )
            })?;
            if bars {
                // The details once, then one bar that follows the progress.
                let b = bar.get_or_insert_with(|| {
                    crate::out!("{}", render(&reply));
                    crate::output::byte_bar_with_msg(reply.volume.size, "present")
                });
                b.set_position(reply.volume.bytes_present);
                b.set_message(rate_eta(&reply));
            } else {
                crate::out!("{}", render(&reply));
            }
        }
        if !args.watch {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        if !args.json && !bars {
            crate::outln!();
        }
    }
}

/// One migration of the run directory, as `stream status` lists it.
#[derive(serde::Serialize)]
struct Listed {
    id: String,
    /// Its `stream start` answers on the control socket.
    running: bool,
    pid: u32,
    state_dir: std::path::PathBuf,
    source: String,
    target: String,
    export_uri: String,
    metrics: Option<String>,
    /// The control socket's status reply, when running.
    status: Option<StatusReply>,
    /// Why it is not running (the registration is stale: killed or crashed).
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

async fn list(args: &StatusArgs) -> anyhow::Result<()> {
    let run_dir = crate::rundir::dir();
    let mut bars: std::collections::HashMap<String, indicatif::ProgressBar> = Default::default();
    let use_bars = args.watch && !args.json && crate::output::bars_enabled();
    loop {
        let mut listed = Vec::new();
        for e in crate::rundir::list(&run_dir)? {
            let (status, error) = match control::request(&e.control_socket, &Request::Status).await
            {
                Ok(line) => match serde_json::from_str::<StatusReply>(&line) {
                    Ok(r) => (Some(r), None),
                    Err(e) => (
                        None,
                        Some(format!("unexpected reply (a different version?): {e}")),
                    ),
                },
                Err(err) => (None, Some(format!("{err:#}"))),
            };
            listed.push(Listed {
                id: e.id,
                running: status.is_some(),
                pid: e.pid,
                state_dir: e.state_dir,
                source: e.source,
                target: e.target,
                export_uri: e.export_uri,
                metrics: e.metrics,
                status,
                error,
            });
        }
        if args.json {
            let doc = serde_json::json!({
                "schema": control::SCHEMA,
                "run_dir": run_dir,
                "migrations": listed,
            });
            crate::outln!("{doc}");
        } else if use_bars {
            for l in &listed {
                let b = bars.entry(l.id.clone()).or_insert_with(|| {
                    let size = l.status.as_ref().map_or(0, |s| s.volume.size);
                    crate::output::byte_bar_with_msg(size, &l.id)
                });
                match &l.status {
                    Some(r) => {
                        b.set_position(r.volume.bytes_present);
                        b.set_message(rate_eta(r));
                    }
                    None => b.set_message("not running"),
                }
            }
        } else {
            crate::out!("{}", table(&run_dir, &listed));
        }
        if !args.watch {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        if !args.json && !use_bars {
            crate::outln!();
        }
    }
}

fn table(run_dir: &std::path::Path, listed: &[Listed]) -> String {
    use std::fmt::Write as _;
    if listed.is_empty() {
        return format!(
            "no migration is registered in {} (start one with `stream start`, or pass --run-dir)\n",
            run_dir.display()
        );
    }
    let mut o = format!(
        "{:<20} {:<11} {:>7} {:>12} {:>10} {:>7}  {}\n",
        "ID", "PHASE", "PRESENT", "RATE", "ETA", "CLIENTS", "EXPORT"
    );
    for l in listed {
        let _ = match &l.status {
            Some(r) => {
                let v = &r.volume;
                let size = v.size.max(1) as f64;
                let present = v.bytes_present as f64;
                writeln!(
                    o,
                    "{:<20} {:<11} {:>6.1}% {:>10}/s {:>10} {:>7}  {}",
                    l.id,
                    phase_name(v.phase),
                    100.0 * present / size,
                    human_bytes(r.hydration_rate),
                    eta(r.eta_secs),
                    r.connected_clients,
                    r.export_uri
                )
            }
            None => writeln!(
                o,
                "{:<20} {:<11} {:>7} {:>12} {:>10} {:>7}  (state {})",
                l.id,
                "not running",
                "-",
                "-",
                "-",
                "-",
                l.state_dir.display()
            ),
        };
    }
    o
}

fn eta(secs: Option<f64>) -> String {
    match secs {
        Some(0.0) => "done".to_string(),
        Some(s) => humantime(s),
        None => "unknown".to_string(),
    }
}

/// "12.3 MiB/s, ETA 4m10s, 1 client(s)" for a progress bar.
pub fn rate_eta(r: &StatusReply) -> String {
    format!(
        "{}/s, ETA {}, {} client(s)",
        human_bytes(r.hydration_rate),
        eta(r.eta_secs),
        r.connected_clients
    )
}

pub fn human_bytes(n: f64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = n;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{v:.0} {}", UNITS[u])
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

fn render(r: &StatusReply) -> String {
    use lazy_fetch::source::Health;
    let v = &r.volume;
    let size = v.size as f64;
    let present = v.bytes_present as f64;
    let pct = if size > 0.0 {
        100.0 * present / size
    } else {
        100.0
    };
    let eta = match r.eta_secs {
        Some(0.0) => "done".to_string(),
        Some(s) => format!("ETA {}", humantime(s)),
        None => "ETA unknown".to_string(),
    };
    let lat = |us: Option<u64>| {
        us.map(|us| format!("{:.1} ms", us as f64 / 1000.0))
            .unwrap_or_else(|| "-".into())
    };
    let health = match &v.source_health {
        Health::Up => "up".to_string(),
        Health::Reconnecting(d) => format!("reconnecting ({d})"),
        Health::Down(d) => format!("down ({d})"),
    };
    let target = match &v.target_health {
        Health::Up => v.target.clone(),
        Health::Reconnecting(d) | Health::Down(d) => format!("{} [{d}]", v.target),
    };
    format!(
        "migration  {} ({})\n\
         source     {} [{}]\n\
         target     {}\n\
         present    {:.1}% ({} of {}), {} chunks written by clients\n\
         fetched    {} from the source: {} chunks on demand, {} prefetched around them ({} read \
         since), {} hydrated, {} source holes skipped\n\
         hydration  {}/s, {}\n\
         latency    foreground fetch p50 {} p99 {} ({} fetches)\n\
         clients    {} connected to {}\n\
         requests   {} in flight{}\n",
        v.state_dir,
        match (v.target_shared, &v.seed) {
            (true, _) => format!(
                "{}, target shared with the guest by `stream detach`",
                phase_name(v.phase)
            ),
            (false, Some(s)) => format!(
                "{}, seeded in {} pass(es), {} chunks changed in the last; {} copied chunks \
                 confirmed by hash, {} still to compare",
                phase_name(v.phase),
                s.passes,
                s.changed_last_pass,
                v.chunks_confirmed,
                v.chunks_to_confirm
            ),
            (false, None) => phase_name(v.phase).to_string(),
        },
        v.source,
        health,
        target,
        pct,
        human_bytes(present),
        human_bytes(size),
        v.chunks_written,
        human_bytes(v.bytes_fetched as f64),
        v.chunks_fetched_on_demand,
        v.chunks_prefetched,
        v.prefetched_chunks_read,
        v.chunks_hydrated,
        v.chunks_source_holes,
        human_bytes(r.hydration_rate),
        eta,
        lat(v.foreground_fetch_p50_us),
        lat(v.foreground_fetch_p99_us),
        v.foreground_fetches,
        r.connected_clients,
        r.export_uri,
        v.requests_in_flight,
        match v.oldest_request_secs {
            Some(age) => format!(", oldest {age:.1} s"),
            None => String::new(),
        },
    )
}

/// A phase as its JSON name.
fn phase_name(p: lazy_fetch::state::Phase) -> &'static str {
    match p {
        lazy_fetch::state::Phase::Streaming => "streaming",
        lazy_fetch::state::Phase::Finalizing => "finalizing",
        lazy_fetch::state::Phase::Finalized => "finalized",
    }
}

fn humantime(secs: f64) -> String {
    #[expect(
        clippy::cast_possible_truncation,
        reason = "a float to int `as` saturates: a huge or infinite ETA shows as huge, never wraps"
    )]
    let s = secs.round() as u64;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
    }
}
