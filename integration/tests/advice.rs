//! What `stream` tells the operator after finalize took over must be true
//! (issue 13): the running `stream start` does not say "run the same
//! command to resume", and `stream status` of a finalized migration does
//! not say to start it.

use std::time::Duration;

use integration::Start;
use integration::finalize::Finalize;
use integration::start::{log_tail, mixed_image, status_json};

#[test]
fn after_the_handover_start_and_status_say_it_is_finalized() {
    let dir = tempfile::tempdir().unwrap();
    let img = mixed_image(dir.path());
    let start = Start::new(&img.path, dir.path().join("target.img"), dir.path());
    let state = start.state_dir().to_path_buf();
    let mut running = start.spawn();
    running.wait_hydrated(Duration::from_secs(60));
    let reaped = running.reap_in_background(Duration::from_secs(120));
    Finalize::new(&state).run_ok(Duration::from_secs(120));
    let status = reaped.join().unwrap().expect("stream start exited");
    assert!(status.success(), "{status}");

    let log = log_tail(&start.log_path());
    assert!(
        log.contains("handed over to `stream finalize`")
            && !log.contains("run the same command to resume"),
        "start's last words after the handover:\n{log}"
    );

    let out = status_json(&state);
    assert!(out.status.success(), "{}", out.describe());
    let doc: serde_json::Value = serde_json::from_str(out.stdout_lossy().trim()).unwrap();
    assert_eq!(doc["phase"], "finalized", "{doc}");
    let text = integration::run_ok(
        std::process::Command::new(integration::binary::stream_bin())
            .args(["status", "--state"])
            .arg(&state),
        Duration::from_secs(30),
    )
    .stdout_lossy();
    assert!(
        text.contains("finalized")
            && text.contains("native storage")
            && !text.contains("start the migration"),
        "{text}"
    );
}
