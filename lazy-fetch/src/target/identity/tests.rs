//! Aliases, content and markers on real files in a temporary directory.

use std::fs::File;
use std::os::unix::fs::FileExt;

use super::*;

fn file(dir: &Path, name: &str, len: u64) -> PathBuf {
    let p = dir.join(name);
    File::create(&p).unwrap().set_len(len).unwrap();
    p
}

#[test]
fn names_of_one_file_alias_and_two_files_do_not() {
    let d = tempfile::tempdir().unwrap();
    let a = file(d.path(), "a", 1 << 20);
    let b = file(d.path(), "b", 1 << 20);
    let sym = d.path().join("sym");
    std::os::unix::fs::symlink(&a, &sym).unwrap();
    let hard = d.path().join("hard");
    fs::hard_link(&a, &hard).unwrap();
    check_distinct(&a, &b).unwrap();
    check_distinct(&a, &d.path().join("missing")).unwrap();
    for t in [&a, &sym, &hard] {
        let e = check_distinct(&a, t).unwrap_err().to_string();
        assert!(e.contains("would overwrite the source"), "{e}");
    }
}

#[test]
fn nonzero_content_is_found_in_data_extents_only() {
    let d = tempfile::tempdir().unwrap();
    let sparse = file(d.path(), "sparse", 8 << 20);
    assert_eq!(first_nonzero(&sparse).unwrap(), (None, false));
    // Allocated zeros are data to SEEK_DATA, but not content.
    File::options()
        .write(true)
        .open(&sparse)
        .unwrap()
        .write_all_at(&vec![0; 1 << 20], 1 << 20)
        .unwrap();
    assert_eq!(first_nonzero(&sparse).unwrap(), (None, false));
    File::options()
        .write(true)
        .open(&sparse)
        .unwrap()
        .write_all_at(b"\0\0x", (5 << 20) + 7)
        .unwrap();
    assert_eq!(
        first_nonzero(&sparse).unwrap(),
        (Some((5 << 20) + 9), false)
    );
}

#[test]
fn a_finalized_marker_is_not_replaced_by_a_streaming_one() {
    let d = tempfile::tempdir().unwrap();
    let t = file(d.path(), "t", 4096);
    assert_eq!(read_marker(&t).unwrap(), None);
    let mut m = Marker {
        phase: "streaming".into(),
        state_dir: "/s".into(),
        source: "/src".into(),
        at: 1,
        migration: "m1".into(),
    };
    let place = write_marker(&t, &m).unwrap();
    assert_eq!(read_marker(&t).unwrap(), Some((m.clone(), place.clone())));
    m.phase = "finalized".into();
    write_marker(&t, &m).unwrap();
    // It follows the inode through a rename.
    let moved = d.path().join("moved");
    fs::rename(&t, &moved).unwrap();
    assert!(read_marker(&moved).unwrap().unwrap().0.is_finalized());
    m.phase = "streaming".into();
    write_marker(&moved, &m).unwrap_err();
    assert!(read_marker(&moved).unwrap().unwrap().0.is_finalized());
}
