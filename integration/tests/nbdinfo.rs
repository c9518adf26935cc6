//! nbdinfo (libnbd-bin) against `stream export`: listing, the allocation
//! map of a sparse file, and every capability the server advertises.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use integration::{Export, Server, SparseImage, require_tool, run, run_ok};
use serde_json::Value;

const T: Duration = Duration::from_secs(60);

fn nbdinfo() -> PathBuf {
    require_tool("nbdinfo", "libnbd-bin")
}

fn json(args: &[&str]) -> Value {
    let out = run_ok(Command::new(nbdinfo()).args(args), T);
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("nbdinfo output is not JSON ({e}):\n{}", out.describe()))
}

/// `nbdinfo --can/--is WHAT URI`: exit 0 is true, 2 is false.
fn flag(kind: &str, what: &str, uri: &str) -> bool {
    let out = run(Command::new(nbdinfo()).args([kind, what, uri]), T);
    match out.status.code() {
        Some(0) => true,
        Some(2) => false,
        _ => panic!("{}", out.describe()),
    }
}

fn export_of(info: &Value) -> &Value {
    let exports = info["exports"].as_array().expect("exports array");
    assert_eq!(exports.len(), 1, "{info:#}");
    &exports[0]
}

fn standard(
    dir: &tempfile::TempDir,
    export: impl FnOnce(Export) -> Export,
) -> (SparseImage, Server) {
    let img = SparseImage::standard(dir.path());
    let server = export(Export::new(&img.path)).spawn();
    (img, server)
}

#[test]
fn list_names_the_export_with_its_description() {
    let dir = tempfile::tempdir().unwrap();
    let (img, server) = standard(&dir, |e| e.name("legacy-sda").description("the old box"));
    let out = run_ok(Command::new(nbdinfo()).args(["--list", &server.uri]), T);
    assert!(
        out.stdout_lossy().contains("legacy-sda"),
        "{}",
        out.describe()
    );
    let list = json(&["--list", "--json", &server.uri]);
    let e = export_of(&list);
    assert_eq!(e["export-name"], "legacy-sda");
    assert_eq!(e["export-size"], img.size);
    assert_eq!(e["description"], "the old box", "{list:#}");
}

#[test]
fn json_reports_size_protocol_and_block_sizes() {
    let dir = tempfile::tempdir().unwrap();
    let (img, server) = standard(&dir, |e| e.unix());
    assert!(server.uri.starts_with("nbd+unix://"), "{}", server.uri);
    let info = json(&["--json", &server.uri]);
    assert_eq!(info["protocol"], "newstyle-fixed", "{info:#}");
    assert_eq!(info["structured"], true, "{info:#}");
    assert_eq!(info["TLS"], false);
    let e = export_of(&info);
    assert_eq!(e["export-size"], img.size);
    assert_eq!(e["is_read_only"], true);
    let contexts: Vec<&str> = e["contexts"]
        .as_array()
        .expect("contexts")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(contexts.contains(&"base:allocation"), "{info:#}");
    if let (Some(min), Some(pref), Some(max)) = (
        e["block_size_minimum"].as_u64(),
        e["block_size_preferred"].as_u64(),
        e["block_size_maximum"].as_u64(),
    ) {
        assert!(min <= pref && pref <= max, "{info:#}");
    }
}

#[test]
fn map_shows_the_holes_of_a_sparse_file() {
    let dir = tempfile::tempdir().unwrap();
    let (img, server) = standard(&dir, |e| e);
    let map = json(&["--map", "--json", &server.uri]);
    // Merge neighbours of the same type: a server may split extents.
    let mut merged: Vec<(u64, u64, u64)> = Vec::new();
    for ext in map.as_array().expect("map array") {
        let (off, len, ty) = (
            ext["offset"].as_u64().unwrap(),
            ext["length"].as_u64().unwrap(),
            ext["type"].as_u64().unwrap(),
        );
        match merged.last_mut() {
            Some(last) if last.2 == ty && last.0 + last.1 == off => last.1 += len,
            _ => merged.push((off, len, ty)),
        }
    }
    let mut expected: Vec<(u64, u64, u64)> = img
        .data
        .iter()
        .map(|r| (r.offset, r.len, 0))
        .chain(img.holes().iter().map(|h| (h.offset, h.len, 3)))
        .collect();
    expected.sort();
    assert_eq!(
        merged, expected,
        "nbdinfo --map (offset, length, type):\n{map:#}"
    );
}

#[test]
fn writable_export_advertises_every_capability() {
    let dir = tempfile::tempdir().unwrap();
    let (_img, server) = standard(&dir, |e| e.writable());
    for cap in [
        "connect",
        "read",
        "write",
        "flush",
        "fua",
        "trim",
        "zero",
        "fast-zero",
        "df",
        "multi-conn",
        "cache",
        "structured-reply",
    ] {
        assert!(
            flag("--can", cap, &server.uri),
            "writable export cannot {cap}"
        );
    }
    assert!(!flag("--is", "read-only", &server.uri));
    assert!(!flag("--is", "tls", &server.uri));
    let info = json(&["--json", &server.uri]);
    let e = export_of(&info);
    for key in [
        "can_cache",
        "can_df",
        "can_fast_zero",
        "can_flush",
        "can_fua",
        "can_multi_conn",
        "can_trim",
        "can_zero",
    ] {
        assert_eq!(e[key], true, "{key} in {info:#}");
    }
    assert_eq!(e["is_read_only"], false);
}

#[test]
fn readonly_export_is_read_only_and_still_advertises_reads() {
    let dir = tempfile::tempdir().unwrap();
    let (_img, server) = standard(&dir, |e| e);
    assert!(flag("--is", "read-only", &server.uri));
    assert!(!flag("--can", "write", &server.uri));
    for cap in ["read", "df", "multi-conn", "cache", "structured-reply"] {
        assert!(
            flag("--can", cap, &server.uri),
            "read-only export cannot {cap}"
        );
    }
}
