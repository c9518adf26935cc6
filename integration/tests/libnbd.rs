//! libnbd itself (python3-libnbd) where the point is libnbd's own
//! strictness: it drops a connection on a reply it considers a protocol
//! violation, so "the next request still works" proves the server sent
//! what the spec requires.

use std::process::Command;
use std::time::Duration;

use integration::tool::require_python_nbd;
use integration::{Export, SparseImage, run_ok};

const SCRIPT: &str = r#"
import errno, sys, nbd
uri, path, size = sys.argv[1], sys.argv[2], int(sys.argv[3])
expected = open(path, "rb").read()
h = nbd.NBD()
h.set_strict_mode(0)   # let bad requests reach the server
h.add_meta_context("base:allocation")
h.connect_uri(uri)
assert h.get_structured_replies_negotiated()
assert h.can_meta_context("base:allocation")

def expect_errno(what, want, fn):
    try:
        fn()
    except nbd.Error as e:
        assert e.errnum == want, f"{what}: errno {e.errnum} ({e.string}), expected {want}"
        return
    raise AssertionError(f"{what} succeeded")

expect_errno("pread past the end", errno.EINVAL, lambda: h.pread(1024, size - 512))
assert h.aio_is_ready(), "connection dropped after a structured READ error"
assert h.pread(4096, 0) == expected[:4096]
expect_errno("pwrite past the end", errno.ENOSPC, lambda: h.pwrite(b"x" * 1024, size - 512))
expect_errno("zero past the end", errno.ENOSPC, lambda: h.zero(1024, size - 512))
expect_errno("trim past the end", errno.EINVAL, lambda: h.trim(1024, size - 512))
assert h.pread(100, 1048570) == expected[1048570:1048670]

try:
    h.zero(65536, 0, nbd.CMD_FLAG_FAST_ZERO)
except nbd.Error as e:
    assert e.errnum == errno.ENOTSUP, f"fast zero: {e.errnum} {e.string}"

h.pwrite(b"\x42" * 5000, 3 * 1048576 + 17, nbd.CMD_FLAG_FUA)
assert h.pread(5000, 3 * 1048576 + 17) == b"\x42" * 5000
h.flush()
assert h.aio_is_ready()
h.shutdown()
print("OK")
"#;

#[test]
fn libnbd_keeps_the_connection_through_structured_errors() {
    let python = require_python_nbd();
    let dir = tempfile::tempdir().unwrap();
    let img = SparseImage::standard(dir.path());
    let server = Export::new(&img.path).writable().spawn();
    let out = run_ok(
        Command::new(python)
            .args(["-c", SCRIPT, &server.uri])
            .arg(&img.path)
            .arg(img.size.to_string()),
        Duration::from_secs(60),
    );
    assert_eq!(out.stdout_lossy().trim(), "OK", "{}", out.describe());
    assert_eq!(std::fs::metadata(&img.path).unwrap().len(), img.size);
}
