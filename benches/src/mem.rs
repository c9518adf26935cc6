//! Resident memory of a process, from `/proc/PID/status`.
//!
//! `VmHWM` is the peak resident set since the process started, or since
//! the peak was last reset by writing `5` to `/proc/PID/clear_refs`
//! (Linux >= 4.0), which lets one run measure the peak of two phases.

use std::fs;
use std::io;

/// A `kB` field of `/proc/PID/status` (`VmHWM`, `VmRSS`, ...), in KiB.
pub fn status_kib(pid: u32, field: &str) -> io::Result<u64> {
    let text = fs::read_to_string(format!("/proc/{pid}/status"))?;
    parse_kib(&text, field)
        .ok_or_else(|| io::Error::other(format!("/proc/{pid}/status has no {field}")))
}

/// Start a new `VmHWM` peak from the current resident set.
pub fn reset_peak(pid: u32) -> io::Result<()> {
    fs::write(format!("/proc/{pid}/clear_refs"), "5")
}

fn parse_kib(status: &str, field: &str) -> Option<u64> {
    status.lines().find_map(|l| {
        let rest = l.strip_prefix(field)?.strip_prefix(':')?;
        rest.trim().strip_suffix("kB")?.trim().parse().ok()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_kib_field_and_not_its_prefix_namesakes() {
        let s = "VmPeak:\t  10 kB\nVmHWM:\t    2048 kB\nVmRSS:\t    1024 kB\n";
        assert_eq!(parse_kib(s, "VmHWM"), Some(2048));
        assert_eq!(parse_kib(s, "VmRSS"), Some(1024));
        assert_eq!(parse_kib(s, "Vm"), None);
    }

    #[test]
    fn own_peak_can_be_read_and_reset() {
        let pid = std::process::id();
        assert!(status_kib(pid, "VmHWM").unwrap() > 0);
        reset_peak(pid).unwrap();
    }
}
