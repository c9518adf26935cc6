//! `stream finalize --cinder-manage` against a Keystone + Cinder stand-in
//! answering with the API reference samples (never a live cloud), the
//! target a loop device reachable as `/dev/VG/LV` through a symlink (no
//! LVM here). The manage call is sent once, even when its answer was lost
//! and finalize runs again.

use std::time::Duration;

use integration::fake_cloud::{FakeCloud, MANAGED_ID, PROJECT_ID};
use integration::finalize::{self, Finalize};
use integration::image::{assert_same_bytes, read_at};
use integration::start::ForgetMarker;
use integration::start::{DevLv, mixed_image};
use integration::{LoopDevice, Start};

const HOST: &str = "cloud1@lvmdriver-1#lvmdriver-1";

fn with_env(f: Finalize, cloud: &FakeCloud) -> Finalize {
    cloud.password_env().iter().fold(f, |f, (k, v)| f.env(k, v))
}

#[test]
fn cinder_manage_is_called_once() {
    let dir = tempfile::tempdir().unwrap();
    let img = mixed_image(dir.path());
    // A 1 GiB sparse device: a whole number of GiB, as Cinder counts.
    let backing = dir.path().join("lv.img");
    std::fs::File::create(&backing)
        .unwrap()
        .set_len(1 << 30)
        .unwrap();
    let dev = LoopDevice::attach(&backing, false);
    let vg = format!("stream-test-{}", std::process::id());
    let lv = DevLv::create(&vg, "mig-db01", &dev.path);

    let start = Start::new(&img.path, &lv.path, dir.path()).rate_limit(None);
    let state = start.state_dir().to_path_buf();
    let _marker = ForgetMarker(state.clone());
    let mut running = start.spawn();
    running.wait_hydrated(Duration::from_secs(60));
    running.sigterm_and_wait(Duration::from_secs(30));

    let cloud = FakeCloud::start();
    let cmd = with_env(
        Finalize::new(&state).args(&[
            "--verify",
            "--cinder-manage",
            HOST,
            "--volume-name",
            "db01",
            "--bootable",
        ]),
        &cloud,
    );

    // 1. Cinder adopts the LV but its answer is lost (HTTP 500).
    cloud.fail_next_manage();
    let out = cmd.run_fails(Duration::from_secs(120));
    assert!(
        out.stderr_lossy().contains("500"),
        "the failure does not show Cinder's answer: {}",
        out.describe()
    );
    let calls = cloud.manage_calls();
    assert_eq!(calls.len(), 1, "manage calls: {calls:?}");
    let m = &calls[0];
    assert_eq!(m.target, format!("/v3/{PROJECT_ID}/manageable_volumes"));
    let body = m.json();
    assert_eq!(body["volume"]["host"], HOST, "{body}");
    assert_eq!(body["volume"]["ref"]["source-name"], "mig-db01", "{body}");
    assert_eq!(body["volume"]["name"], "db01", "{body}");
    assert_eq!(body["volume"]["bootable"], true, "{body}");
    let login = &cloud.requests()[0];
    assert_eq!(
        (login.method.as_str(), login.target.as_str()),
        ("POST", "/identity/v3/auth/tokens")
    );
    let auth = login.json();
    assert_eq!(
        auth["auth"]["identity"]["password"]["user"]["name"], "admin",
        "{auth}"
    );
    assert_eq!(auth["auth"]["scope"]["project"]["name"], "admin", "{auth}");
    let h = finalize::header(&state);
    assert_ne!(
        h["phase"], "finalized",
        "finalized without an answer from Cinder: {h}"
    );

    // 2. Again: the volume is found by name, no second manage call.
    let out = cmd
        .clone()
        .args(&["--json"])
        .run_ok(Duration::from_secs(120));
    let report = finalize::json_stdout(&out);
    assert_eq!(report["phase"], "finalized", "{report}");
    assert_eq!(report["cinder_volume_id"], MANAGED_ID, "{report}");
    assert_eq!(
        cloud.manage_calls().len(),
        1,
        "a second manage call: {:?}",
        cloud.requests()
    );
    assert!(
        cloud
            .requests()
            .iter()
            .any(|r| r.method == "GET" && r.target.contains("/volumes/detail?name=db01")),
        "the re-run did not look the volume up by name: {:?}",
        cloud.requests()
    );
    assert_eq!(finalize::header(&state)["phase"], "finalized");

    // 3. Once more, as text: prints the volume id, calls nothing.
    let seen = cloud.requests().len();
    let out = cmd.run_ok(Duration::from_secs(60));
    assert!(
        out.stdout_lossy().contains(MANAGED_ID),
        "the volume id is not printed: {}",
        out.describe()
    );
    assert_eq!(cloud.manage_calls().len(), 1);
    assert_eq!(
        cloud.requests().len(),
        seen,
        "a finalized migration called Cinder again"
    );

    let got = read_at(&lv.path, 0, img.size as usize);
    assert_same_bytes(&got, &img.expected_all(), 0, "the LV after finalize");
    drop(lv);
    drop(dev);
}
