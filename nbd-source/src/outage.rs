//! A slot's outage: since when it has had no usable connection and the
//! last error, told in `stream status` and in the messages of reads that
//! gave up, with the time in UTC (no time-zone crate for one format).

use std::time::{Instant, SystemTime, UNIX_EPOCH};

/// Since when a slot has had no usable connection, and why.
#[derive(Clone, Debug)]
pub(crate) struct Outage {
    pub(crate) since: Instant,
    since_wall: SystemTime,
    pub(crate) last_error: String,
}

impl Outage {
    pub(crate) fn new(last_error: String) -> Outage {
        Outage {
            since: Instant::now(),
            since_wall: SystemTime::now(),
            last_error,
        }
    }

    pub(crate) fn since_text(&self) -> String {
        format!(
            "{} ({:.1} s ago)",
            utc(self.since_wall),
            self.since.elapsed().as_secs_f64()
        )
    }
}

/// `t` as an RFC 3339 UTC time, to the second.
pub(crate) fn utc(t: SystemTime) -> String {
    let secs = t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn utc_formats_known_instants() {
        assert_eq!(utc(UNIX_EPOCH), "1970-01-01T00:00:00Z");
        let t = UNIX_EPOCH + Duration::from_secs(1_709_210_096);
        assert_eq!(utc(t), "2024-02-29T12:34:56Z");
    }
}
