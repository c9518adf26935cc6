//! Every `--json` output of a cutover, parsed against the published JSON
//! Schemas (`docs/schema/`), and stderr free of terminal escapes when it is
//! not a terminal.

use std::time::Duration;

use integration::image::{MIB, dense_file};
use integration::ops::{Spawned, assert_valid, is_plain, stream};
use integration::tool;

const T: Duration = Duration::from_secs(30);

#[test]
fn a_cutover_scripted_with_json_follows_the_schemas() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let legacy = dir.path().join("legacy.img");
    dense_file(&legacy, 8 * MIB, 0x0505);

    // The legacy side: `stream export --json`.
    let cmd = stream(
        &run,
        &[
            "export",
            "--json",
            "--listen",
            "127.0.0.1:0",
            legacy.to_str().unwrap(),
        ],
    );
    let export = Spawned::new(cmd, &dir.path().join("export.log"));
    let ready = assert_valid("export-ready", &export.line(T));
    assert_eq!(ready["size"], 8 * MIB, "{ready}");
    assert_eq!(ready["writable"], false, "{ready}");
    let source = ready["export_uri"].as_str().unwrap().to_string();
    assert!(source.starts_with("nbd://127.0.0.1:"), "{ready}");

    // The cloud side: `stream start --json`, slow enough to watch.
    let target = dir.path().join("db01.raw");
    let cmd = stream(
        &run,
        &[
            "start",
            "--json",
            "--source",
            &source,
            "--listen",
            "127.0.0.1:0",
            "--rate-limit",
            "2M",
            "--metrics",
            "0",
            "--target",
            target.to_str().unwrap(),
        ],
    );
    let mut start = Spawned::new(cmd, &dir.path().join("start.log"));
    let ready = assert_valid("start-ready", &start.line(T));
    assert_eq!(ready["id"], "db01.raw", "{ready}");
    assert_eq!(ready["pid"], start.child.id(), "{ready}");
    assert_eq!(ready["run_dir"], run.to_str().unwrap(), "{ready}");
    assert!(ready["metrics"].as_str().unwrap().starts_with("127.0.0.1:"));
    let state = ready["state_dir"].as_str().unwrap().to_string();
    assert!(
        std::path::Path::new(&state).is_absolute(),
        "state_dir {state} is relative: a script in another directory cannot use it"
    );

    // `stream status --json` of that migration, then of every migration.
    let out = tool::run_ok(
        &mut stream(&run, &["status", "--json", "--state", &state]),
        T,
    );
    let st = assert_valid("status", &out.stdout_lossy());
    assert_eq!(st["pid"], start.child.id(), "{st}");
    assert!(is_plain(&out.stderr_lossy()), "{}", out.describe());
    let out = tool::run_ok(&mut stream(&run, &["status", "--json"]), T);
    let list = assert_valid("status-list", &out.stdout_lossy());
    let migrations = list["migrations"].as_array().unwrap();
    assert_eq!(migrations.len(), 1, "{list}");
    assert_eq!(migrations[0]["running"], true, "{list}");
    assert_valid("status", &migrations[0]["status"].to_string());

    // `stream status --watch --json`: one valid line per second.
    let watch = Spawned::new(
        stream(&run, &["status", "--watch", "--json", "--state", &state]),
        &dir.path().join("watch.log"),
    );
    for _ in 0..2 {
        assert_valid("status", &watch.line(T));
    }
    drop(watch);

    // `stream finalize --json`: progress events on stderr, one report on stdout.
    let out = tool::run_ok(
        &mut stream(&run, &["finalize", "--json", "--verify", "--state", &state]),
        Duration::from_secs(120),
    );
    let report = assert_valid("finalize", &out.stdout_lossy());
    assert_eq!(report["native_path"], target.to_str().unwrap(), "{report}");
    assert_valid("verify", &report["verify"].to_string());
    let err = out.stderr_lossy();
    assert!(is_plain(&err), "escape codes on a non-terminal: {err:?}");
    let events: Vec<serde_json::Value> = err
        .lines()
        .filter(|l| l.starts_with('{') && l.contains("\"event\""))
        .map(|l| assert_valid("finalize-event", l))
        .collect();
    for (step, unit) in [
        ("hydrate", "bytes"),
        ("manifest", "chunks"),
        ("verify", "chunks"),
    ] {
        let last = events
            .iter()
            .rfind(|e| e["event"] == "progress" && e["step"] == step)
            .unwrap_or_else(|| panic!("no {step} progress event in {err}"));
        assert_eq!(last["unit"], unit, "{last}");
        assert_eq!(
            last["done"], last["total"],
            "{step} did not end at 100%: {last}"
        );
    }
    assert!(
        events.iter().any(|e| e["event"] == "handed_over"),
        "no handed_over event: {err}"
    );
    assert!(start.wait(T).success(), "{}", start.stderr());
    let out = tool::run_ok(&mut stream(&run, &["status", "--json"]), T);
    let list = assert_valid("status-list", &out.stdout_lossy());
    assert_eq!(
        list["migrations"],
        serde_json::json!([]),
        "the handed-over start left its registration"
    );

    // `stream verify --json` of the finalized migration.
    let out = tool::run_ok(
        &mut stream(&run, &["verify", "--json", "--state", &state]),
        T,
    );
    let v = assert_valid("verify", &out.stdout_lossy());
    assert_eq!(v["schema"], 1, "{v}");
    assert_eq!(v["chunks_checked"], 128, "{v}");
    assert_eq!(v["mismatches"], serde_json::json!([]), "{v}");
    drop(export);
}

#[test]
fn json_logs_are_one_object_per_line() {
    let dir = tempfile::tempdir().unwrap();
    let legacy = dir.path().join("legacy.img");
    dense_file(&legacy, MIB, 1);
    let mut cmd = stream(
        &dir.path().join("run"),
        &[
            "--log-format",
            "json",
            "export",
            "--listen",
            "127.0.0.1:0",
            legacy.to_str().unwrap(),
        ],
    );
    cmd.env("RUST_LOG", "info");
    let mut export = Spawned::new(cmd, &dir.path().join("export.log"));
    let uri = export.line(T);
    assert!(uri.starts_with("nbd://"), "{uri}");
    export.signal(libc::SIGTERM);
    assert!(export.wait(T).success());
    let log = export.stderr();
    let lines: Vec<&str> = log.lines().collect();
    assert!(
        lines.len() >= 2,
        "expected serving and stopped lines: {log}"
    );
    for line in lines {
        let v: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("log line is not JSON ({e}): {line:?}"));
        assert!(
            v["level"].is_string() && v["fields"]["message"].is_string(),
            "{v}"
        );
    }
    // A failing command says what failed as JSON too, naming the object.
    let out = tool::run(
        &mut stream(
            &dir.path().join("run"),
            &[
                "--log-format",
                "json",
                "status",
                "--state",
                "/nonexistent/state",
            ],
        ),
        T,
    );
    assert!(!out.status.success());
    let err = out.stderr_lossy();
    let v: serde_json::Value = serde_json::from_str(err.trim())
        .unwrap_or_else(|e| panic!("error is not one JSON line ({e}): {err:?}"));
    assert_eq!(v["level"], "ERROR", "{v}");
    let msg = v["fields"]["error"].as_str().unwrap_or_default();
    assert!(
        msg.contains("/nonexistent/state") && msg.contains("stream status"),
        "the error names neither the state dir nor the next step: {v}"
    );
}
