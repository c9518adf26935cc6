//! `stream start --metrics ADDR`: a Prometheus endpoint (text exposition
//! format 0.0.4, written by hand: a few counters, gauges and one
//! histogram) on a tiny HTTP/1.0 listener. Any path answers the metrics
//! (`/metrics` is the convention); only GET and HEAD are served.
//!
//! `ADDR` is `PORT` (bound on 127.0.0.1) or `IP:PORT`, honoured as given:
//! exposing the endpoint beyond loopback is an explicit choice.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use crate::source::AnySource;
use anyhow::Context;
use lazy_fetch::source::Health;
use lazy_fetch::state::Phase;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::control::Context_;

/// `9100` -> 127.0.0.1:9100; `0.0.0.0:9100`, `[::1]:9100` as given.
pub fn parse_addr(s: &str) -> Result<SocketAddr, String> {
    if let Ok(port) = s.parse::<u16>() {
        return Ok(SocketAddr::from(([127, 0, 0, 1], port)));
    }
    s.parse().map_err(|_| {
        format!("{s:?} is not a metrics address: give a PORT (on 127.0.0.1) or IP:PORT")
    })
}

pub async fn bind(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr).await.with_context(|| {
        format!("cannot listen for metrics on {addr} (port in use? pick another --metrics port, or 0 for any)")
    })
}

pub async fn serve(listener: TcpListener, ctx: Arc<Context_<AnySource>>, id: String) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let ctx = ctx.clone();
        let id = id.clone();
        tokio::spawn(async move {
            if let Err(e) = answer(stream, &ctx, &id).await {
                tracing::debug!("metrics request failed: {e:#}");
            }
        });
    }
}

async fn answer(mut stream: TcpStream, ctx: &Context_<AnySource>, id: &str) -> anyhow::Result<()> {
    // Read the request head (bounded in size and time); the body, if any,
    // is ignored.
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    tokio::time::timeout(Duration::from_secs(5), async {
        while !head.windows(4).any(|w| w == b"\r\n\r\n") && !head.windows(2).any(|w| w == b"\n\n") {
            let n = stream.read(&mut buf).await?;
            if n == 0 || head.len() > 16 * 1024 {
                break;
            }
            head.extend_from_slice(&buf[..n]);
        }
        anyhow::Ok(())
    })
    .await
    .context("request head timed out")??;
    let line = String::from_utf8_lossy(&head);
    let method = line.split_whitespace().next().unwrap_or("");
    let (status, body) = match method {
        "GET" | "HEAD" => ("200 OK", render(ctx, id)),
        _ => ("405 Method Not Allowed", "only GET\n".to_string()),
    };
    let mut reply = format!(
        "HTTP/1.0 {status}\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    if method != "HEAD" {
        reply.push_str(&body);
    }
    stream.write_all(reply.as_bytes()).await?;
    stream.shutdown().await?;
    Ok(())
}

/// A label value, escaped as the exposition format asks.
fn label(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// The exposition text. Every sample carries `migration="ID"`, so one
/// Prometheus job can scrape every migration of a host.
pub fn render(ctx: &Context_<AnySource>, id: &str) -> String {
    let v = &ctx.volume;
    let st = v.status();
    let stats = &v.stats;
    let get = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
    let reconnects = match v.source() {
        AnySource::Nbd(s) => s.reconnects(),
        AnySource::File(_) | AnySource::Ssh(_) => 0,
    };
    let m = format!("migration=\"{}\"", label(id));
    let mut o = String::new();
    let mut metric = |name: &str, kind: &str, help: &str, value: String| {
        let _ = writeln!(o, "# HELP {name} {help}");
        let _ = writeln!(o, "# TYPE {name} {kind}");
        let _ = writeln!(o, "{name}{{{m}}} {value}");
    };
    metric(
        "stream_size_bytes",
        "gauge",
        "Size of the migrated disk.",
        st.size.to_string(),
    );
    metric(
        "stream_present_bytes",
        "gauge",
        "Bytes of the volume present in the target.",
        st.bytes_present.to_string(),
    );
    metric(
        "stream_chunks_total",
        "gauge",
        "Chunks of the volume.",
        st.chunks_total.to_string(),
    );
    metric(
        "stream_chunks_present",
        "gauge",
        "Chunks present in the target.",
        st.chunks_present.to_string(),
    );
    metric(
        "stream_fetched_bytes_total",
        "counter",
        "Bytes read from the source over the whole migration.",
        st.bytes_fetched.to_string(),
    );
    metric(
        "stream_fetched_on_demand_chunks_total",
        "counter",
        "Chunks fetched because a client needed them.",
        st.chunks_fetched_on_demand.to_string(),
    );
    metric(
        "stream_hydrated_chunks_total",
        "counter",
        "Chunks made present by background hydration or readahead.",
        st.chunks_hydrated.to_string(),
    );
    metric(
        "stream_source_hole_chunks_total",
        "counter",
        "Chunks the source reported as holes (never fetched).",
        st.chunks_source_holes.to_string(),
    );
    metric(
        "stream_confirmed_chunks_total",
        "counter",
        "Seeded copies found equal to the source by hash (never fetched).",
        st.chunks_confirmed.to_string(),
    );
    metric(
        "stream_candidate_chunks",
        "gauge",
        "Seeded copies still to compare with the source after a cutover.",
        st.chunks_to_confirm.to_string(),
    );
    metric(
        "stream_client_written_bytes_total",
        "counter",
        "Bytes clients wrote, trimmed or zeroed in this run.",
        get(&stats.bytes_written_by_clients).to_string(),
    );
    metric(
        "stream_client_written_chunks",
        "gauge",
        "Chunks a client has written over the whole migration.",
        st.chunks_written.to_string(),
    );
    metric(
        "stream_source_reconnects_total",
        "counter",
        "Times the NBD source connection was re-established in this run.",
        reconnects.to_string(),
    );
    metric(
        "stream_source_errors_total",
        "counter",
        "Failed source reads in this run.",
        st.source_errors.to_string(),
    );
    metric(
        "stream_target_errors_total",
        "counter",
        "Failed target writes or syncs in this run.",
        st.target_errors.to_string(),
    );
    metric(
        "stream_source_up",
        "gauge",
        "1 when the source is reachable, 0 while reconnecting or down.",
        u8::from(matches!(st.source_health, Health::Up)).to_string(),
    );
    metric(
        "stream_connected_clients",
        "gauge",
        "NBD clients connected to the export.",
        (ctx.clients)().to_string(),
    );
    metric(
        "stream_hydration_rate_bytes_per_second",
        "gauge",
        "Bytes made present per second over the last 10 s.",
        ctx.rate.sample(st.bytes_present).to_string(),
    );
    metric(
        "stream_uptime_seconds",
        "gauge",
        "Seconds since this stream start opened the volume.",
        format!("{:.3}", st.uptime_secs),
    );
    // One sample per phase, 1 for the current one.
    let _ = writeln!(
        o,
        "# HELP stream_phase The migration's phase (1 for the current one)."
    );
    let _ = writeln!(o, "# TYPE stream_phase gauge");
    for (p, name) in [
        (Phase::Streaming, "streaming"),
        (Phase::Finalizing, "finalizing"),
        (Phase::Finalized, "finalized"),
    ] {
        let _ = writeln!(
            o,
            "stream_phase{{{m},phase=\"{name}\"}} {}",
            u8::from(st.phase == p)
        );
    }
    // The foreground fetch histogram: engine buckets are powers of two in
    // microseconds; `le` is their upper bound in seconds.
    let h = &stats.foreground_fetch;
    let counts = h.bucket_counts();
    let name = "stream_foreground_fetch_duration_seconds";
    let _ = writeln!(
        o,
        "# HELP {name} Time a client waited for a chunk to be fetched from the source (this run)."
    );
    let _ = writeln!(o, "# TYPE {name} histogram");
    let mut cumulative = 0u64;
    for (i, c) in counts.iter().enumerate().take(counts.len() - 1) {
        cumulative += c;
        let le = (2u64 << i) as f64 / 1e6;
        let _ = writeln!(o, "{name}_bucket{{{m},le=\"{le}\"}} {cumulative}");
    }
    cumulative += counts[counts.len() - 1];
    let _ = writeln!(o, "{name}_bucket{{{m},le=\"+Inf\"}} {cumulative}");
    let _ = writeln!(o, "{name}_sum{{{m}}} {}", h.sum_us() as f64 / 1e6);
    let _ = writeln!(o, "{name}_count{{{m}}} {cumulative}");
    let _ = writeln!(
        o,
        "# HELP stream_info The migration's source, target and state directory."
    );
    let _ = writeln!(o, "# TYPE stream_info gauge");
    let _ = writeln!(
        o,
        "stream_info{{{m},source=\"{}\",target=\"{}\",state_dir=\"{}\",export=\"{}\"}} 1",
        label(&st.source),
        label(&st.target),
        label(&st.state_dir),
        label(&ctx.export_uri)
    );
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bare_port_means_loopback() {
        assert_eq!(parse_addr("9100").unwrap().to_string(), "127.0.0.1:9100");
        assert_eq!(
            parse_addr("0.0.0.0:9100").unwrap().to_string(),
            "0.0.0.0:9100"
        );
        assert!(parse_addr("localhost").is_err());
    }
}
