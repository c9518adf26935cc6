//! A `--state` directory whose control socket path is longer than a unix
//! socket address holds (108 bytes) works: start serves, status and
//! finalize reach it (issue 13: it was refused as "too long").

use std::time::Duration;

use integration::Start;
use integration::finalize::Finalize;
use integration::start::mixed_image;

#[test]
fn a_state_directory_with_a_long_path_works_end_to_end() {
    let dir = tempfile::tempdir().unwrap();
    let img = mixed_image(dir.path());
    let deep = dir
        .path()
        .join("a-directory-name-of-sixty-characters-for-the-long-path-test")
        .join("and-another-one-of-about-sixty-characters-so-the-path-is-long")
        .join("state");
    assert!(deep.join("control.sock").as_os_str().len() > 130);
    let start = Start::new(&img.path, dir.path().join("target.img"), dir.path()).state(&deep);
    let mut running = start.spawn();
    let st = running.wait_hydrated(Duration::from_secs(60));
    assert_eq!(st["volume"]["hydration_complete"], true, "{st}");
    let reaped = running.reap_in_background(Duration::from_secs(120));
    Finalize::new(&deep).run_ok(Duration::from_secs(120));
    assert!(
        reaped
            .join()
            .unwrap()
            .expect("stream start exited")
            .success()
    );
}
