//! qemu-io on a writable export: patterns at unaligned offsets, discard
//! and write-zeroes, then the file itself is checked.

use std::process::Command;
use std::time::Duration;

use integration::image::{MIB, assert_same_bytes, read_file};
use integration::{Export, SparseImage, require_tool, run_ok};

#[test]
fn qemu_io_writes_reads_discards_and_zeroes_through_the_export() {
    let qemu_io = require_tool("qemu-io", "qemu-utils");
    let dir = tempfile::tempdir().unwrap();
    let img = SparseImage::standard(dir.path());
    let server = Export::new(&img.path).writable().spawn();
    let cmds = [
        "write -P 0xab 1000 5000",
        "read -P 0xab 1000 5000",
        "write -P 0xcd 1048575 3",
        "read -P 0xcd 1048575 3",
        "write -P 0x11 2097152 65536",
        "discard 2162688 65536",
        "write -z 4194304 65536",
        "read -P 0 4194304 65536",
        "write -z 6291456 4097",
        "read -P 0 6291456 4097",
        "flush",
    ];
    let mut cmd = Command::new(&qemu_io);
    cmd.args(["-f", "raw"]);
    for c in cmds {
        cmd.args(["-c", c]);
    }
    cmd.arg(&server.uri);
    let out = run_ok(&mut cmd, Duration::from_secs(60));
    let text = out.stdout_lossy() + &out.stderr_lossy();
    assert!(
        !text.contains("fail") && !text.contains("error"),
        "{}",
        out.describe()
    );
    drop(server);

    let file = read_file(&img.path);
    let mut expected = img.expected_all();
    expected[1000..6000].fill(0xab);
    expected[1048575..1048578].fill(0xcd);
    expected[2097152..2162688].fill(0x11);
    expected[4194304..4194304 + 65536].fill(0);
    expected[6291456..6291456 + 4097].fill(0);
    // A discarded range reads back as zero or as what it held before.
    let d = 2162688..2162688 + 65536;
    assert!(
        file[d.clone()] == expected[d.clone()] || file[d.clone()].iter().all(|&b| b == 0),
        "discarded range holds neither the old data nor zeroes"
    );
    expected[d.clone()].copy_from_slice(&file[d]);
    assert_eq!(file.len() as u64, 8 * MIB);
    assert_same_bytes(&file, &expected, 0, "file after qemu-io");
}
