//! A block device as the target: after hydration its first `size` bytes
//! are the source, the zero regions included (stale bytes zeroed).

use std::time::Duration;

use integration::image::{MIB, assert_same_bytes, dense_file, read_at};
use integration::start::ForgetMarker;
use integration::start::mixed_image;
use integration::{LoopDevice, Start};

#[test]
fn block_device_target() {
    let dir = tempfile::tempdir().unwrap();
    let img = mixed_image(dir.path());
    // Larger than the source, full of garbage that must not show through.
    let backing = dir.path().join("loop-backing.img");
    let garbage = dense_file(&backing, img.size + 4 * MIB, 0xbad);
    let dev = LoopDevice::attach(&backing, false);

    // The garbage is data a new migration would refuse to overwrite
    // without being told (issue 12 case 4).
    let start = Start::new(&img.path, &dev.path, dir.path())
        .rate_limit(None)
        .args(&["--overwrite-target"]);
    let marker = ForgetMarker(start.state_dir().to_path_buf());
    let mut running = start.spawn();
    running.wait_hydrated(Duration::from_secs(60));
    running.sigterm_and_wait(Duration::from_secs(30));

    let got = read_at(&dev.path, 0, img.size as usize);
    assert_same_bytes(&got, &img.expected_all(), 0, "block device after hydration");
    // Past the volume the device is left alone.
    let tail = read_at(&dev.path, img.size, MIB as usize);
    assert_same_bytes(
        &tail,
        &garbage[img.size as usize..(img.size + MIB) as usize],
        img.size,
        "device past the volume",
    );
    assert_eq!(
        marker.entries().len(),
        1,
        "the block device's marker in {}",
        ForgetMarker::registry().display()
    );
}
