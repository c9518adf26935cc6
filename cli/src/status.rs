//! `stream status`: progress of a running migration, from its control socket.

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
    /// Print the raw reply as JSON (schema in docs/status.md).
    #[arg(long)]
    json: bool,
    /// Refresh every second until interrupted.
    #[arg(long)]
    watch: bool,
}

pub async fn run(args: StatusArgs) -> anyhow::Result<()> {
    let dir = crate::start::resolve_state(args.state, args.target)?;
    if !crate::start::exists(&dir) {
        anyhow::bail!(
            "{} holds no migration (wrong --state or --target?)",
            dir.display()
        );
    }
    let sock = state::control_socket(&dir);
    loop {
        let line = control::request(&sock, &Request::Status).await?;
        if args.json {
            println!("{}", line.trim());
        } else {
            let reply: StatusReply =
                serde_json::from_str(&line).context("unexpected reply from stream start")?;
            print!("{}", render(&reply));
        }
        if !args.watch {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        if !args.json {
            println!();
        }
    }
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
    let v = &r.volume;
    let n = |k: &str| v[k].as_u64().unwrap_or(0);
    let size = n("size") as f64;
    let present = n("bytes_present") as f64;
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
    let lat = |k: &str| {
        v[k].as_u64()
            .map(|us| format!("{:.1} ms", us as f64 / 1000.0))
            .unwrap_or_else(|| "-".into())
    };
    let health = &v["source_health"];
    let health = match health["detail"].as_str() {
        Some(d) => format!("{} ({d})", health["state"].as_str().unwrap_or("?")),
        None => health["state"].as_str().unwrap_or("?").to_string(),
    };
    format!(
        "migration  {} ({})\n\
         source     {} [{}]\n\
         target     {}\n\
         present    {:.1}% ({} of {}), {} chunks written by clients\n\
         fetched    {} from the source: {} chunks on demand, {} hydrated, {} source holes skipped\n\
         hydration  {}/s, {}\n\
         latency    foreground fetch p50 {} p99 {} ({} fetches)\n\
         clients    {} connected to {}\n",
        v["state_dir"].as_str().unwrap_or("?"),
        v["phase"].as_str().unwrap_or("?"),
        v["source"].as_str().unwrap_or("?"),
        health,
        v["target"].as_str().unwrap_or("?"),
        pct,
        human_bytes(present),
        human_bytes(size),
        n("chunks_written"),
        human_bytes(n("bytes_fetched") as f64),
        n("chunks_fetched_on_demand"),
        n("chunks_hydrated"),
        n("chunks_source_holes"),
        human_bytes(r.hydration_rate),
        eta,
        lat("foreground_fetch_p50_us"),
        lat("foreground_fetch_p99_us"),
        n("foreground_fetches"),
        r.connected_clients,
        r.export_uri,
    )
}

fn humantime(secs: f64) -> String {
    let s = secs.round() as u64;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
    }
}
