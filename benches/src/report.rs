//! The header and the file handling every benchmark report shares: the
//! machine and tool versions, and writing a generated section between its
//! markers in `RESULTS.md` without touching the other sections.

use std::fs;
use std::io;
use std::path::Path;
use std::process::Command;

/// nproc, kernel, CPU and tool versions, for the report header.
pub fn machine() -> Vec<(&'static str, String)> {
    let nproc = std::thread::available_parallelism().map_or(0, |n| n.get());
    let kernel = fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_string();
    let cpu = fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|l| l.trim_start_matches([' ', '\t', ':']).to_string())
        .unwrap_or_default();
    let manifest = env!("CARGO_MANIFEST_DIR");
    vec![
        ("machine", format!("{nproc} CPUs ({cpu}), kernel {kernel}")),
        (
            "stream",
            format!(
                "commit {}{}",
                shell_line("git", &["-C", manifest, "rev-parse", "--short", "HEAD"]),
                if shell_line("git", &["-C", manifest, "status", "--porcelain"]).is_empty() {
                    ""
                } else {
                    " (dirty tree)"
                }
            ),
        ),
        ("fio", shell_line("fio", &["--version"])),
        ("qemu-nbd", shell_line("qemu-nbd", &["--version"])),
        ("nbdkit", shell_line("nbdkit", &["--version"])),
        ("libnbd", shell_line("nbdinfo", &["--version"])),
    ]
}

/// First line of a short command's stdout (empty if it fails).
pub fn shell_line(program: &str, args: &[&str]) -> String {
    Command::new(program)
        .args(args)
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .map(str::to_string)
        })
        .unwrap_or_default()
}

/// Put `section` (which carries its own markers) into `path`: replace the
/// old marked section if there is one, else append; text outside the
/// markers (hand-written analysis) is kept.
pub fn write_between_markers(path: &Path, section: &str, begin: &str, end: &str) -> io::Result<()> {
    let old = fs::read_to_string(path).unwrap_or_default();
    let new = match (old.find(begin), old.find(end)) {
        (Some(b), Some(e)) if b < e => {
            format!(
                "{}{}{}",
                &old[..b],
                section.trim_end(),
                &old[e + end.len()..]
            )
        }
        _ if old.is_empty() => format!("# Benchmark results\n\n{section}"),
        _ => format!("{}\n{section}", old.trim_end()),
    };
    fs::write(path, new)
}

/// The 1, 5 and 15 minute load averages, as `/proc/loadavg` prints them.
pub fn loadavg() -> String {
    fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

/// The opening lines of a generated section: its begin marker, title, the
/// command that produced it (`cargo run --release -p stream-benches --bin
/// BIN --` and this process's arguments), the date and the machine.
pub fn write_header(out: &mut String, begin: &str, title: &str, bin: &str) {
    use std::fmt::Write;
    let args: Vec<String> = std::env::args().skip(1).collect();
    let _ = writeln!(out, "{begin}");
    let _ = writeln!(out, "## {title}\n");
    let _ = writeln!(
        out,
        "- command: `cargo run --release -p stream-benches --bin {bin} -- {}`",
        args.join(" ")
    );
    let _ = writeln!(
        out,
        "- date: {}",
        shell_line("date", &["-u", "+%Y-%m-%d %H:%M UTC"])
    );
    for (k, v) in machine() {
        let _ = writeln!(out, "- {k}: {v}");
    }
}
