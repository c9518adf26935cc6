//! Outages of the source, told in the log as they start and end.
//!
//! The source reports its health (`Source::health`: up, reconnecting with
//! the last error, down); this task looks every second and logs each
//! change once, with the cause, and the outage's length when it ends
//! (issue 13: a 41 s outage left nothing in the log). The target logs its
//! own edges as its writes fail and recover (`target::Target::note`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::source::{Health, Source};
use crate::volume::Volume;

const LOOK: Duration = Duration::from_secs(1);

/// One look: the message for a change from `was` to `now`, if any.
/// `since` is when the current outage began (kept across looks).
fn edge(
    source: &str,
    was: &Health,
    now: &Health,
    since: &mut Option<Instant>,
) -> Option<(bool, String)> {
    let kind = |h: &Health| std::mem::discriminant(h);
    if kind(was) == kind(now) {
        return None;
    }
    match now {
        Health::Up => {
            let took = since.take().map_or(0.0, |t| t.elapsed().as_secs_f64());
            let cause = match was {
                Health::Reconnecting(d) | Health::Down(d) => d.as_str(),
                Health::Up => "",
            };
            Some((
                false,
                format!(
                    "source {source} is reachable again after an outage of {took:.1} s ({cause})"
                ),
            ))
        }
        Health::Reconnecting(d) => {
            since.get_or_insert_with(Instant::now);
            Some((
                true,
                format!("source {source} is unreachable, reconnecting: {d}"),
            ))
        }
        Health::Down(d) => {
            since.get_or_insert_with(Instant::now);
            Some((
                true,
                format!(
                    "source {source} is down: {d}; client reads of data not yet copied fail \
                     with EIO until it is back"
                ),
            ))
        }
    }
}

/// Log the source's outages until the task is dropped.
pub async fn log_source_outages<S: Source>(volume: Arc<Volume<S>>) {
    let source = volume.header().source.location;
    let mut was = Health::Up;
    let mut since = None;
    let mut tick = tokio::time::interval(LOOK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let now = volume.source().health();
        if let Some((bad, msg)) = edge(&source, &was, &now, &mut since) {
            if bad {
                tracing::warn!("{msg}");
            } else {
                tracing::info!("{msg}");
            }
        }
        was = now;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_edge_is_told_once_with_cause_and_length() {
        let mut since = None;
        let down = Health::Reconnecting("connection refused".into());
        assert!(edge("s", &Health::Up, &Health::Up, &mut since).is_none());
        let (bad, m) = edge("s", &Health::Up, &down, &mut since).unwrap();
        assert!(bad && m.contains("connection refused"), "{m}");
        assert!(edge("s", &down, &down, &mut since).is_none());
        let (bad, m) = edge("s", &down, &Health::Up, &mut since).unwrap();
        assert!(
            !bad && m.contains("after an outage of") && m.contains("refused"),
            "{m}"
        );
        assert!(since.is_none());
    }
}
