//! Records round-trip, torn ones are not parsed, and logging never
//! deadlocks against a rotation.

use super::record::{RECORD_MAGIC_V1, hash16};
use super::*;

#[test]
fn records_round_trip_and_a_torn_one_is_not_parsed() {
    let mut bytes = encode(100, Change::Write(b"hello"));
    bytes.extend(encode(
        7,
        Change::Zero {
            len: 4096,
            allocate: true,
        },
    ));
    let (off, c, next) = parse(&bytes, 0).unwrap();
    assert_eq!((off, c), (100, Change::Write(b"hello")));
    let (off, c, end) = parse(&bytes, next).unwrap();
    assert_eq!(
        (off, c),
        (
            7,
            Change::Zero {
                len: 4096,
                allocate: true
            }
        )
    );
    assert_eq!(end, bytes.len());
    bytes.truncate(bytes.len() - 1);
    assert!(parse(&bytes, next).is_none());
}

use proptest::prelude::*;

fn change() -> impl Strategy<Value = (u64, Option<Vec<u8>>, u64, bool)> {
    (
        any::<u64>(),
        proptest::option::of(proptest::collection::vec(any::<u8>(), 0..300)),
        any::<u64>(),
        any::<bool>(),
    )
}

proptest! {
    /// Any sequence of records parses back as written, and cutting the
    /// log anywhere loses only the records from the cut on.
    #[test]
    fn any_log_parses_back_and_a_cut_keeps_the_whole_records_before_it(
        records in proptest::collection::vec(change(), 1..20),
        cut in any::<prop::sample::Index>(),
    ) {
        let mut bytes = Vec::new();
        let mut ends = Vec::new();
        for (off, data, len, allocate) in &records {
            let c = match data {
                Some(d) => Change::Write(d),
                None => Change::Zero { len: *len, allocate: *allocate },
            };
            bytes.extend(encode(*off, c));
            ends.push(bytes.len());
        }
        let mut at = 0;
        for (i, (off, data, len, allocate)) in records.iter().enumerate() {
            let (o, c, next) = parse(&bytes, at).expect("a whole record");
            let want = match data {
                Some(d) => Change::Write(d),
                None => Change::Zero { len: *len, allocate: *allocate },
            };
            prop_assert_eq!((o, c, next), (*off, want, ends[i]));
            at = next;
        }
        let cut = cut.index(bytes.len());
        let whole = ends.iter().filter(|&&e| e <= cut).count();
        let mut at = 0;
        let mut n = 0;
        while let Some((_, _, next)) = parse(&bytes[..cut], at) {
            at = next;
            n += 1;
        }
        prop_assert_eq!(n, whole);
    }

    /// Garbage never panics the parser.
    #[test]
    fn arbitrary_bytes_never_panic_the_parser(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
        let mut at = 0;
        while let Some((_, _, next)) = parse(&bytes, at) {
            prop_assert!(next > at);
            at = next;
        }
    }
}

/// Issue 12, case 11: a length was 32 bits, so a zero record of 4 GiB
/// or more replayed a wrong (wrapped) range.
#[test]
fn a_zero_record_over_4_gib_keeps_its_length() {
    let len = (5u64 << 30) + 4096;
    let bytes = encode(
        1 << 40,
        Change::Zero {
            len,
            allocate: false,
        },
    );
    let (off, c, end) = parse(&bytes, 0).unwrap();
    assert_eq!(
        (off, c, end),
        (
            1 << 40,
            Change::Zero {
                len,
                allocate: false
            },
            bytes.len()
        )
    );
}

/// A log left by an earlier release (32-bit lengths) still replays.
#[test]
fn records_of_the_previous_format_still_parse() {
    let mut v = Vec::new();
    v.extend_from_slice(&RECORD_MAGIC_V1.to_le_bytes());
    v.push(0);
    v.extend_from_slice(&4096u64.to_le_bytes());
    v.extend_from_slice(&3u32.to_le_bytes());
    v.extend_from_slice(b"abc");
    let h = hash16(&[&v]);
    v.extend_from_slice(&h);
    let (off, c, end) = parse(&v, 0).unwrap();
    assert_eq!((off, c, end), (4096, Change::Write(b"abc"), v.len()));
}

/// Issue 12, case 1: a writer holding the generation appended its record
/// by taking the lock again, behind a queued `rotate` that waited for the
/// writer: a FLUSH that never returned. On a current-thread runtime the
/// order is exact: the writer holds, the rotation queues, the writer logs.
#[tokio::test(flavor = "current_thread")]
async fn logging_while_a_rotation_waits_does_not_deadlock() {
    let dir = tempfile::tempdir().unwrap();
    let wal = Arc::new(Wal::open(dir.path(), true).unwrap());
    let held = wal.hold().await;
    let w = wal.clone();
    let rotation = tokio::spawn(async move { w.rotate().await });
    // Let the rotation run until it waits for `held`.
    tokio::task::yield_now().await;
    assert!(!rotation.is_finished());
    tokio::time::timeout(
        std::time::Duration::from_secs(20),
        held.log(0, Change::Write(b"x")),
    )
    .await
    .expect("the append waited for the rotation that waits for it")
    .unwrap();
    drop(held);
    assert_eq!(rotation.await.unwrap().unwrap(), 1);
    assert_eq!(wal.len(), 0);
}
