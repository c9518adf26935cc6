//! The CI version of the soak (`integration/src/soak.rs`): 75 seconds of
//! random writes, flushes and reads with source cuts and kill -9 restarts,
//! then `stream finalize --verify` and the target compared with the model.
//! The long run is `cargo run -p integration --bin soak -- --minutes 10`.

use std::time::Duration;

use integration::image::MIB;
use integration::soak::{Options, run};

#[test]
fn fault_soak_short() {
    let dir = tempfile::tempdir().unwrap();
    let mut opts = Options::new(Duration::from_secs(75));
    opts.size = 32 * MIB;
    opts.kill_every = Duration::from_secs(10);
    if let Ok(seed) = std::env::var("STREAM_SOAK_SEED") {
        opts.seed = seed.parse().expect("STREAM_SOAK_SEED is a number");
    }
    let report = run(dir.path(), &opts);
    eprintln!("soak report: {}", report.json());
    assert!(report.kills >= 4, "{report:?}");
    assert!(report.cuts >= 8, "{report:?}");
    assert!(report.flushes > 10 && report.writes > 100, "{report:?}");
}
