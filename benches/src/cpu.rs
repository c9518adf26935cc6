//! CPU time of a process, from `/proc/PID/stat`.
//!
//! `utime` + `stime` of a thread-group leader cover every thread of the
//! process, including threads that have already exited, so a sample
//! before and after a fio run gives what the server spent on it. The
//! resolution is one clock tick (10 ms at the usual 100 Hz), small next to
//! a run of several seconds.

use std::fs;
use std::io;
use std::time::Duration;

/// User + system CPU time consumed so far by process `pid`.
pub fn process_cpu_time(pid: u32) -> io::Result<Duration> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let ticks = parse_stat_ticks(&stat)
        .ok_or_else(|| io::Error::other(format!("unparsable /proc/{pid}/stat")))?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let hz = if hz > 0 { hz as u64 } else { 100 };
    Ok(Duration::from_nanos(ticks * 1_000_000_000 / hz))
}

/// `utime + stime` in clock ticks. The command name (field 2) is in
/// parentheses and may itself contain spaces and parentheses, so fields
/// are counted from the last `)`.
fn parse_stat_ticks(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    // After the name: state(3) ppid pgrp session tty_nr tpgid flags minflt
    // cminflt majflt cmajflt utime(14) stime(15).
    let utime: u64 = fields.nth(11)?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn name_with_spaces_and_parens_does_not_shift_fields() {
        let stat = "42 (a) b (c) S 1 42 42 0 -1 4194560 10 0 0 0 7 3 0 0 20 0 1 0";
        assert_eq!(parse_stat_ticks(stat), Some(10));
    }

    #[test]
    fn own_process_has_a_cpu_time() {
        assert!(process_cpu_time(std::process::id()).is_ok());
    }
}
