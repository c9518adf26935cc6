//! The state directory's tests: journal replay, torn and damaged files,
//! the lock, checkpoints.

use std::fs::OpenOptions;

use super::journal::entry;
use super::*;
use crate::presence::ChunkState;
use crate::units::ChunkIndex;

pub(super) fn sample_header() -> Header {
    Header {
        format: FORMAT.into(),
        version: VERSION,
        source: SourceId {
            kind: "file".into(),
            location: "/src".into(),
            size: 1 << 20,
        },
        target: TargetId {
            path: "/tgt".into(),
            kind: "file".into(),
            size: 1 << 20,
            dev: 1,
            ino: 2,
            created_sparse: true,
        },
        size: 1 << 20,
        chunk_size: 65536,
        phase: Phase::Streaming,
        created_at: 0,
        finalized_at: None,
        finalize: None,
        migration_id: None,
        detach: None,
        seed: None,
    }
}

fn header() -> Header {
    sample_header()
}

#[test]
fn journal_replay_restores_recorded_states() {
    let dir = tempfile::tempdir().unwrap();
    {
        let (st, map) = StateDir::create(dir.path(), &header()).unwrap();
        map.set(ChunkIndex(3), ChunkState::Data, false);
        st.record(ChunkIndex(3), ChunkState::Data, false);
        st.record(ChunkIndex(5), ChunkState::Zero, true);
        let e = st.take_pending();
        st.append(&e).unwrap();
        // Recorded but never persisted: must not survive.
        st.record(ChunkIndex(7), ChunkState::Data, false);
    }
    let (_st, h, map) = StateDir::open(dir.path()).unwrap();
    assert_eq!(h, header());
    assert_eq!(map.state(ChunkIndex(3)), ChunkState::Data);
    assert_eq!(map.state(ChunkIndex(5)), ChunkState::Zero);
    assert!(map.is_written(ChunkIndex(5)));
    assert_eq!(map.state(ChunkIndex(7)), ChunkState::Absent);
}

#[test]
fn consecutive_records_coalesce_into_one_run_and_replay_whole() {
    let dir = tempfile::tempdir().unwrap();
    {
        let (st, _) = StateDir::create(dir.path(), &header()).unwrap();
        for i in 0..10 {
            st.record(ChunkIndex(i), ChunkState::Zero, false);
        }
        st.record(ChunkIndex(10), ChunkState::Data, false);
        st.record(ChunkIndex(12), ChunkState::Data, false);
        assert_eq!(st.pending(), 3);
        let e = st.take_pending();
        st.append(&e).unwrap();
    }
    let (_, _, map) = StateDir::open(dir.path()).unwrap();
    assert_eq!(map.state(ChunkIndex(9)), ChunkState::Zero);
    assert_eq!(map.state(ChunkIndex(10)), ChunkState::Data);
    assert_eq!(map.state(ChunkIndex(11)), ChunkState::Absent);
    assert_eq!(map.present_count(), 12);
}

#[test]
fn second_open_of_a_locked_state_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (_st, _) = StateDir::create(dir.path(), &header()).unwrap();
    let e = StateDir::open(dir.path()).unwrap_err();
    assert!(matches!(e, Error::Locked { .. }), "{e}");
}

#[test]
fn torn_journal_tail_is_cut_and_earlier_batches_kept() {
    let dir = tempfile::tempdir().unwrap();
    {
        let (st, _) = StateDir::create(dir.path(), &header()).unwrap();
        st.append(&[entry(ChunkIndex(1), 1, ChunkState::Data, false)])
            .unwrap();
        st.append(&[entry(ChunkIndex(2), 1, ChunkState::Data, false)])
            .unwrap();
    }
    let j = dir.path().join("journal");
    let len = fs::metadata(&j).unwrap().len();
    OpenOptions::new()
        .write(true)
        .open(&j)
        .unwrap()
        .set_len(len - 5)
        .unwrap();
    let (st, _, map) = StateDir::open(dir.path()).unwrap();
    assert!(map.is_present(ChunkIndex(1)));
    assert!(!map.is_present(ChunkIndex(2)));
    // Appending after the cut continues the sequence.
    st.append(&[entry(ChunkIndex(4), 1, ChunkState::Data, false)])
        .unwrap();
    drop(st);
    let (_, _, map) = StateDir::open(dir.path()).unwrap();
    assert!(map.is_present(ChunkIndex(4)));
}

#[test]
fn damage_in_the_middle_of_the_journal_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    {
        let (st, _) = StateDir::create(dir.path(), &header()).unwrap();
        for i in 0..3 {
            st.append(&[entry(ChunkIndex(i), 1, ChunkState::Data, false)])
                .unwrap();
        }
    }
    let j = dir.path().join("journal");
    let mut bytes = fs::read(&j).unwrap();
    bytes[16 + 17] ^= 0xff; // inside the first batch's entry
    fs::write(&j, bytes).unwrap();
    let e = StateDir::open(dir.path()).unwrap_err();
    assert!(matches!(e, Error::StateCorrupt { .. }), "{e}");
}

#[test]
fn lost_header_with_progress_is_refused_not_started_afresh() {
    let dir = tempfile::tempdir().unwrap();
    {
        let (st, _) = StateDir::create(dir.path(), &header()).unwrap();
        st.append(&[entry(ChunkIndex(1), 1, ChunkState::Data, true)])
            .unwrap();
    }
    fs::remove_file(dir.path().join("state.json")).unwrap();
    let e = StateDir::create(dir.path(), &header()).unwrap_err();
    assert!(matches!(e, Error::StateCorrupt { .. }), "{e}");

    // A crash while creating (no header, nothing recorded) starts afresh.
    let dir = tempfile::tempdir().unwrap();
    drop(StateDir::create(dir.path(), &header()).unwrap());
    fs::remove_file(dir.path().join("state.json")).unwrap();
    StateDir::create(dir.path(), &header()).unwrap();
}

#[test]
fn damaged_journal_header_is_refused_not_taken_for_stale() {
    for damage in [0usize, 9] {
        let dir = tempfile::tempdir().unwrap();
        {
            let (st, _) = StateDir::create(dir.path(), &header()).unwrap();
            st.append(&[entry(ChunkIndex(1), 1, ChunkState::Data, true)])
                .unwrap();
        }
        let j = dir.path().join("journal");
        let mut bytes = fs::read(&j).unwrap();
        // The magic, or the generation made newer than the map's.
        bytes[damage] ^= 0x40;
        fs::write(&j, bytes).unwrap();
        let e = StateDir::open(dir.path()).unwrap_err();
        assert!(
            matches!(e, Error::StateCorrupt { .. }),
            "byte {damage}: {e}"
        );
    }
}

#[test]
fn damaged_header_or_map_is_refused_not_trusted() {
    let dir = tempfile::tempdir().unwrap();
    drop(StateDir::create(dir.path(), &header()).unwrap());
    let p = dir.path().join("state.json");
    let text = fs::read_to_string(&p).unwrap().replace("65536", "65537");
    fs::write(&p, text).unwrap();
    assert!(matches!(
        StateDir::open(dir.path()).unwrap_err(),
        Error::StateCorrupt { .. }
    ));

    let dir = tempfile::tempdir().unwrap();
    drop(StateDir::create(dir.path(), &header()).unwrap());
    let m = dir.path().join("map");
    let mut bytes = fs::read(&m).unwrap();
    bytes[30] ^= 1;
    fs::write(&m, bytes).unwrap();
    assert!(matches!(
        StateDir::open(dir.path()).unwrap_err(),
        Error::StateCorrupt { .. }
    ));
}

#[test]
fn missing_or_empty_journal_is_refused_not_recreated() {
    for how in ["removed", "emptied"] {
        let dir = tempfile::tempdir().unwrap();
        {
            let (st, _) = StateDir::create(dir.path(), &header()).unwrap();
            st.append(&[entry(ChunkIndex(1), 1, ChunkState::Data, true)])
                .unwrap();
        }
        let j = dir.path().join("journal");
        if how == "removed" {
            fs::remove_file(&j).unwrap();
        } else {
            fs::write(&j, b"").unwrap();
        }
        let e = StateDir::open(dir.path()).unwrap_err();
        assert!(matches!(e, Error::StateCorrupt { .. }), "{how}: {e}");
        assert!(e.to_string().contains("journal"), "{how}: {e}");
        // Refused, not replaced by a new journal.
        assert_eq!(j.exists(), how == "emptied", "{how}");
    }
}

#[test]
fn deleting_the_lock_file_does_not_admit_a_second_open() {
    let dir = tempfile::tempdir().unwrap();
    let (_st, _) = StateDir::create(dir.path(), &header()).unwrap();
    fs::remove_file(dir.path().join("lock")).unwrap();
    let e = StateDir::open(dir.path()).unwrap_err();
    assert!(matches!(e, Error::Locked { .. }), "{e}");
}

#[test]
fn damaged_state_advice_does_not_say_restore_a_backup() {
    let e = Error::StateCorrupt {
        path: "/s/map".into(),
        detail: "x".into(),
    }
    .to_string();
    assert!(!e.contains("from a backup"), "{e}");
    assert!(e.contains("do not restore an older copy"), "{e}");
}

#[test]
fn checkpoint_supersedes_the_old_journal() {
    let dir = tempfile::tempdir().unwrap();
    {
        let (st, map) = StateDir::create(dir.path(), &header()).unwrap();
        map.set(ChunkIndex(2), ChunkState::Zero, false);
        st.append(&[entry(ChunkIndex(2), 1, ChunkState::Zero, false)])
            .unwrap();
        st.checkpoint(&map_bytes(&map)).unwrap();
        st.append(&[entry(ChunkIndex(9), 1, ChunkState::Data, true)])
            .unwrap();
    }
    let (_, _, map) = StateDir::open(dir.path()).unwrap();
    assert_eq!(map.state(ChunkIndex(2)), ChunkState::Zero);
    assert_eq!(map.state(ChunkIndex(9)), ChunkState::Data);
    assert_eq!(map.present_count(), 2);
}
