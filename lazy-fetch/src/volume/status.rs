//! The snapshot of a volume's progress and counters (`stream status`).

use super::*;

/// A snapshot of a volume's progress and counters (`stream status`).
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct Status {
    pub phase: Phase,
    pub source: String,
    pub target: String,
    pub state_dir: String,
    pub size: u64,
    pub chunk_size: u64,
    pub chunks_total: u64,
    pub chunks_present: u64,
    pub bytes_present: u64,
    pub chunks_zero: u64,
    pub chunks_written: u64,
    pub bytes_fetched: u64,
    pub chunks_fetched_on_demand: u64,
    pub chunks_hydrated: u64,
    pub chunks_source_holes: u64,
    pub chunks_found_zero: u64,
    /// Seeded copies confirmed equal to the source without a fetch.
    #[serde(default)]
    pub chunks_confirmed: u64,
    /// Seeded copies not yet compared (absent until then).
    #[serde(default)]
    pub chunks_to_confirm: u64,
    /// Chunks fetched around misses on a far link, in this run, and how
    /// many of them clients read since.
    #[serde(default)]
    pub chunks_prefetched: u64,
    #[serde(default)]
    pub prefetched_chunks_read: u64,
    pub foreground_fetches: u64,
    pub foreground_fetch_p50_us: Option<u64>,
    pub foreground_fetch_p99_us: Option<u64>,
    pub source_health: crate::source::Health,
    /// `down` with the error while target writes fail (a full target).
    pub target_health: crate::source::Health,
    pub source_errors: u64,
    pub target_errors: u64,
    pub hydration_complete: bool,
    /// `stream detach` shared the target with the guest: the guest may
    /// run from it directly already (see `Volume::prepare_detach`).
    #[serde(default)]
    pub target_shared: bool,
    /// A migration copied by `stream seed` (its passes, and whether the
    /// cutover is still to come).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<crate::state::SeedRecord>,
    pub uptime_secs: f64,
    /// Client requests in flight now.
    pub requests_in_flight: u64,
    /// Age of the oldest of them (a stuck request shows here).
    pub oldest_request_secs: Option<f64>,
}

impl<S: Source> Volume<S> {
    pub fn status(&self) -> Status {
        let h = self.header();
        let g = self.geometry;
        let present = self.map.present_count();
        let last = ChunkIndex(g.chunks() - 1);
        // Every chunk is chunk_size long but the last.
        let short = g.chunk_size() - (g.bytes(last).end - g.bytes(last).start);
        let bytes_present =
            present * g.chunk_size() - if self.map.is_present(last) { short } else { 0 };
        let s = &self.stats;
        Status {
            phase: h.phase,
            source: h.source.location,
            target: h.target.path,
            state_dir: self.state.path().display().to_string(),
            size: g.size(),
            chunk_size: g.chunk_size(),
            chunks_total: g.chunks(),
            chunks_present: present,
            bytes_present,
            chunks_zero: self.map.zero_count(),
            chunks_written: self.map.written_count(),
            bytes_fetched: Stats::get(&s.bytes_fetched),
            chunks_fetched_on_demand: Stats::get(&s.chunks_fetched_on_demand),
            chunks_hydrated: Stats::get(&s.chunks_hydrated),
            chunks_source_holes: Stats::get(&s.chunks_source_holes),
            chunks_found_zero: Stats::get(&s.chunks_found_zero),
            chunks_confirmed: Stats::get(&s.chunks_confirmed),
            chunks_to_confirm: self.candidates_left(),
            chunks_prefetched: Stats::get(&s.chunks_prefetched),
            prefetched_chunks_read: Stats::get(&s.prefetched_chunks_read),
            foreground_fetches: s.foreground_fetch.count(),
            foreground_fetch_p50_us: s.foreground_fetch.quantile_us(0.5),
            foreground_fetch_p99_us: s.foreground_fetch.quantile_us(0.99),
            source_health: self.source.health(),
            target_health: self.target.health(),
            source_errors: Stats::get(&s.source_errors),
            target_errors: Stats::get(&s.target_errors),
            hydration_complete: self.map.is_complete(),
            target_shared: self.target_shared(),
            seed: self.header().seed,
            uptime_secs: self.opened.elapsed().as_secs_f64(),
            requests_in_flight: self.requests.len() as u64,
            oldest_request_secs: self.requests.oldest_age().map(|d| d.as_secs_f64()),
        }
    }
}
