//! fio's nbd engine (libnbd, many requests in flight): random writes
//! verified by checksum, and random reads of a read-only export.

use std::process::Command;
use std::time::Duration;

use integration::image::MIB;
use integration::{Export, SparseImage, require_tool, run_ok};
use serde_json::Value;

fn fio_jobs(out: &integration::tool::Output) -> Vec<Value> {
    let text = out.stdout_lossy();
    // fio may print "connected to NBD server" before the JSON.
    let start = text
        .find('{')
        .unwrap_or_else(|| panic!("{}", out.describe()));
    let v: Value = serde_json::from_str(&text[start..])
        .unwrap_or_else(|e| panic!("fio JSON ({e}):\n{}", out.describe()));
    v["jobs"].as_array().expect("jobs").clone()
}

#[test]
fn fio_random_writes_verify_through_the_export() {
    let fio = require_tool("fio", "fio");
    let dir = tempfile::tempdir().unwrap();
    let img = SparseImage::create(dir.path().join("fio.img"), 32 * MIB, &[], 0);
    let server = Export::new(&img.path).writable().spawn();
    let uri = format!("--uri={}", server.uri);
    let out = run_ok(
        Command::new(&fio).current_dir(dir.path()).args([
            "--name=randwrite-verify",
            "--verify_state_save=0",
            "--ioengine=nbd",
            &uri,
            "--rw=randwrite",
            "--bsrange=512-64k",
            "--bs_unaligned=0",
            "--size=16M",
            "--iodepth=8",
            "--verify=crc32c",
            "--verify_fatal=1",
            "--output-format=json",
        ]),
        Duration::from_secs(180),
    );
    for job in fio_jobs(&out) {
        assert_eq!(job["error"], 0, "{job:#}");
        assert!(job["write"]["io_bytes"].as_u64().unwrap() > 0, "{job:#}");
    }
    assert_eq!(std::fs::metadata(&img.path).unwrap().len(), 32 * MIB);
}

#[test]
fn fio_random_reads_of_a_readonly_export() {
    let fio = require_tool("fio", "fio");
    let dir = tempfile::tempdir().unwrap();
    let img = SparseImage::standard(dir.path());
    let server = Export::new(&img.path).unix().spawn();
    let uri = format!("--uri={}", server.uri);
    let out = run_ok(
        Command::new(&fio).current_dir(dir.path()).args([
            "--name=randread",
            "--ioengine=nbd",
            &uri,
            "--rw=randread",
            "--bs=4k",
            "--size=8M",
            "--iodepth=16",
            "--output-format=json",
        ]),
        Duration::from_secs(180),
    );
    for job in fio_jobs(&out) {
        assert_eq!(job["error"], 0, "{job:#}");
        assert_eq!(
            job["read"]["io_bytes"].as_u64().unwrap(),
            8 * MIB,
            "{job:#}"
        );
    }
}
