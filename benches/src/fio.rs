//! One fio run with the `nbd` ioengine, and its JSON report.
//!
//! fio prints "connected to NBD server" on stdout before any report, so the
//! JSON goes to a file (`--output`), never through stdout.

use std::fs;
use std::io;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use test_support::child::ChildGuard;

/// A fio access pattern.
#[derive(Clone, Copy, Debug)]
pub struct Workload {
    /// Short name used in tables and file names.
    pub name: &'static str,
    pub rw: &'static str,
    pub block_size: &'static str,
    pub iodepth: u32,
}

/// 4 KiB random reads at queue depth 16.
pub const RAND_READ_4K: Workload = Workload {
    name: "randread 4k qd16",
    rw: "randread",
    block_size: "4k",
    iodepth: 16,
};

/// 4 KiB random reads at queue depth 1: the latency of one request alone.
pub const RAND_READ_4K_QD1: Workload = Workload {
    name: "randread 4k qd1",
    rw: "randread",
    block_size: "4k",
    iodepth: 1,
};

/// 64 KiB random reads at queue depth 1.
pub const RAND_READ_64K_QD1: Workload = Workload {
    name: "randread 64k qd1",
    rw: "randread",
    block_size: "64k",
    iodepth: 1,
};

/// 1 MiB sequential reads at queue depth 4.
pub const SEQ_READ_1M: Workload = Workload {
    name: "seqread 1M qd4",
    rw: "read",
    block_size: "1M",
    iodepth: 4,
};

/// What one fio run measured (the read direction of its single job).
#[derive(Clone, Debug, PartialEq)]
pub struct FioResult {
    pub iops: f64,
    pub bw_bytes: f64,
    pub io_bytes: u64,
    pub total_ios: u64,
    pub runtime: Duration,
    pub clat_p50_ns: u64,
    pub clat_p99_ns: u64,
    /// fio's own CPU use (user + system, percent of one core).
    pub client_cpu_pct: f64,
}

/// Run `workload` against `uri` for `runtime`, writing the JSON report to
/// `json_out`. fio is killed if it overruns its runtime by a wide margin.
pub fn run(
    uri: &str,
    workload: Workload,
    runtime: Duration,
    json_out: &Path,
) -> io::Result<FioResult> {
    run_with(uri, workload, Some(runtime), json_out, &[])
}

/// Longest a size-based run (no `runtime`) may take.
const SIZE_BASED_BOUND: Duration = Duration::from_secs(120);

/// Like [`run`], with `extra` fio options (e.g. `--offset=`, `--size=` to
/// confine the job to a region). Without a `runtime` the job is
/// size-based: it reads its region once (bounded by [`SIZE_BASED_BOUND`]).
pub fn run_with(
    uri: &str,
    workload: Workload,
    runtime: Option<Duration>,
    json_out: &Path,
    extra: &[String],
) -> io::Result<FioResult> {
    let mut cmd = Command::new("fio");
    cmd.args([
        "--name=bench",
        "--ioengine=nbd",
        &format!("--uri={uri}"),
        &format!("--rw={}", workload.rw),
        &format!("--bs={}", workload.block_size),
        &format!("--iodepth={}", workload.iodepth),
        "--numjobs=1",
        "--norandommap",
        "--randrepeat=0",
        "--output-format=json",
        &format!("--output={}", json_out.display()),
    ])
    .args(extra)
    .stdin(Stdio::null())
    .stdout(Stdio::null());
    if let Some(runtime) = runtime {
        cmd.args([
            "--time_based".to_string(),
            format!("--runtime={}", runtime.as_secs().max(1)),
        ]);
    }
    let mut guard = ChildGuard::spawn("fio", &mut cmd)?;
    let bound = runtime.map_or(SIZE_BASED_BOUND, |r| r + Duration::from_secs(30));
    let status = guard
        .wait_timeout(bound)?
        .ok_or_else(|| io::Error::other(format!("fio ran past {bound:?} against {uri}")))?;
    if !status.success() {
        return Err(io::Error::other(format!(
            "fio against {uri} failed: {status}"
        )));
    }
    parse(&fs::read_to_string(json_out)?)
}

/// Parse fio's `--output-format=json` report of one job.
pub fn parse(json: &str) -> io::Result<FioResult> {
    let v: serde_json::Value =
        serde_json::from_str(json).map_err(|e| io::Error::other(format!("fio JSON: {e}")))?;
    let job = &v["jobs"][0];
    if job["error"].as_i64().unwrap_or(0) != 0 {
        return Err(io::Error::other(format!("fio job error {}", job["error"])));
    }
    let read = &job["read"];
    let num = |x: &serde_json::Value, what: &str| {
        x.as_f64()
            .ok_or_else(|| io::Error::other(format!("fio JSON lacks {what}")))
    };
    let pct = &read["clat_ns"]["percentile"];
    Ok(FioResult {
        iops: num(&read["iops"], "read.iops")?,
        bw_bytes: num(&read["bw_bytes"], "read.bw_bytes")?,
        io_bytes: num(&read["io_bytes"], "read.io_bytes")? as u64,
        total_ios: num(&read["total_ios"], "read.total_ios")? as u64,
        runtime: Duration::from_millis(num(&read["runtime"], "read.runtime")? as u64),
        clat_p50_ns: num(&pct["50.000000"], "clat p50")? as u64,
        clat_p99_ns: num(&pct["99.000000"], "clat p99")? as u64,
        client_cpu_pct: num(&job["usr_cpu"], "usr_cpu")? + num(&job["sys_cpu"], "sys_cpu")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_fields_of_a_fio_report() {
        let json = r#"{"jobs":[{"error":0,"usr_cpu":9.5,"sys_cpu":20.5,
            "read":{"iops":1220.5,"bw_bytes":1279556027,"io_bytes":2560000000,
            "total_ios":2441,"runtime":2001,
            "clat_ns":{"percentile":{"50.000000":2211840,"99.000000":16056320}}}}]}"#;
        let r = parse(json).unwrap();
        assert_eq!(r.iops, 1220.5);
        assert_eq!(r.total_ios, 2441);
        assert_eq!(r.runtime, Duration::from_millis(2001));
        assert_eq!(r.clat_p99_ns, 16_056_320);
        assert_eq!(r.client_cpu_pct, 30.0);
    }

    #[test]
    fn a_report_without_percentiles_is_an_error() {
        let json = r#"{"jobs":[{"error":0,"read":{"iops":1}}]}"#;
        assert!(parse(json).is_err());
    }
}
