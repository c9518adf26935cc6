//! The NBD protocol at the byte level: each pitfall of a hand-written
//! server is one test, named by the outcome the spec (`doc/proto.md`)
//! requires. A raw client ([`integration::wire`]) sends exactly the bytes
//! a test needs; a second "survivor" connection proves that whatever one
//! client does, the server keeps serving the others.

use std::time::{Duration, Instant};

use integration::image::{KIB, MIB, assert_same_bytes, pattern, read_at, read_file};
use integration::wire::*;
use integration::{Export, Server, SparseImage};

const CLOSE_WAIT: Duration = Duration::from_secs(5);

struct Fixture {
    _dir: tempfile::TempDir,
    img: SparseImage,
    server: Server,
}

fn fixture(writable: bool) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let img = SparseImage::standard(dir.path());
    let mut export = Export::new(&img.path).name("disk0");
    if writable {
        export = export.writable();
    }
    let server = export.spawn();
    Fixture {
        _dir: dir,
        img,
        server,
    }
}

impl Fixture {
    /// A connection in the transmission phase with structured replies and
    /// base:allocation; returns the context id too.
    fn structured(&self) -> (Conn, ExportInfo, u32) {
        let mut c = self.server.connect();
        let (info, ctx) = c.negotiate("disk0", true);
        (c, info, ctx.unwrap())
    }

    /// A connection in the transmission phase with simple replies only.
    fn simple(&self) -> (Conn, ExportInfo) {
        let mut c = self.server.connect();
        let (info, _) = c.negotiate("disk0", false);
        (c, info)
    }

    /// Asserts `c` still reads the image correctly (data and hole).
    fn assert_serves(&self, c: &mut Conn, what: &str) {
        for (off, len) in [(4096u64, 8192u32), (MIB - 100, 200), (2 * MIB + 7, 4000)] {
            let got = c
                .read(0, off, len)
                .unwrap_or_else(|e| panic!("{what}: READ {off}+{len}: {e}"));
            assert_eq!(got.error, None, "{what}: READ {off}+{len}: {got:?}");
            assert_same_bytes(&got.data, &self.img.expected(off, len as usize), off, what);
        }
    }

    fn assert_file_intact(&self) {
        assert_eq!(
            std::fs::metadata(&self.img.path).unwrap().len(),
            self.img.size,
            "backing file changed size"
        );
        assert_same_bytes(
            &read_file(&self.img.path),
            &self.img.expected_all(),
            0,
            "backing file",
        );
    }
}

// ---------------------------------------------------------------- handshake

#[test]
fn go_reports_size_flags_and_block_sizes() {
    let f = fixture(false);
    let mut c = f.server.connect();
    let hs = c.greeting().unwrap();
    assert!(hs & FLAG_NO_ZEROES != 0, "NO_ZEROES not offered: {hs:#x}");
    c.send(&(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).to_be_bytes())
        .unwrap();
    let info = c.go("disk0");
    assert_eq!(info.size, f.img.size);
    for flag in [TF_HAS_FLAGS, TF_READ_ONLY, TF_CAN_MULTI_CONN] {
        assert!(
            info.flags & flag != 0,
            "flag {flag:#x} missing in {:#x}",
            info.flags
        );
    }
    let (min, pref, max) = info.block_size.expect("NBD_INFO_BLOCK_SIZE was requested");
    assert!(min.is_power_of_two() && min <= 65536, "minimum {min}");
    assert!(
        pref.is_power_of_two() && pref >= min.max(512),
        "preferred {pref}"
    );
    assert!(max >= pref && max % min == 0, "maximum {max}");
    f.assert_serves(&mut c, "after GO");
}

#[test]
fn info_and_go_report_the_same_size_and_flags() {
    let f = fixture(true);
    let mut c = f.server.connect();
    c.start().unwrap();
    let info = c
        .info_or_go(
            OPT_INFO,
            "disk0",
            &[INFO_BLOCK_SIZE, INFO_NAME, INFO_DESCRIPTION],
        )
        .unwrap()
        .expect("INFO refused");
    let go = c
        .info_or_go(
            OPT_GO,
            "disk0",
            &[INFO_BLOCK_SIZE, INFO_NAME, INFO_DESCRIPTION],
        )
        .unwrap()
        .expect("GO refused");
    assert_eq!(info.size, go.size);
    assert_eq!(info.flags, go.flags);
    assert_eq!(info.block_size, go.block_size);
    assert_eq!(go.size, f.img.size);
    assert_eq!(
        go.flags & TF_READ_ONLY,
        0,
        "writable export flagged read-only"
    );
    f.assert_serves(&mut c, "after INFO then GO");
}

#[test]
fn list_names_the_real_export() {
    let f = fixture(false);
    let mut c = f.server.connect();
    c.start().unwrap();
    c.send_option(OPT_LIST, &[]).unwrap();
    let mut names = Vec::new();
    loop {
        let r = c.read_option_reply().unwrap();
        match r.kind {
            REP_SERVER => {
                let n = be32(&r.data) as usize;
                names.push(String::from_utf8(r.data[4..4 + n].to_vec()).unwrap());
            }
            REP_ACK => break,
            _ => panic!("LIST refused: {r:?}"),
        }
    }
    assert_eq!(names, ["disk0"]);
    // Negotiation goes on after LIST.
    c.go("disk0");
    f.assert_serves(&mut c, "after LIST");
}

#[test]
fn unknown_export_name_is_refused_and_negotiation_continues() {
    let f = fixture(false);
    let mut c = f.server.connect();
    c.start().unwrap();
    let r = c.info_or_go(OPT_GO, "no-such-disk", &[]).unwrap();
    let err = r.expect_err("GO of an unknown export succeeded");
    assert!(
        err.kind == REP_ERR_UNKNOWN || err.kind == REP_ERR_INVALID,
        "GO of an unknown export: {err:?}"
    );
    c.go("disk0");
    f.assert_serves(&mut c, "after a refused GO");
}

#[test]
fn unknown_option_gets_unsup_and_negotiation_continues() {
    let f = fixture(false);
    let mut c = f.server.connect();
    c.start().unwrap();
    let r = c.option(0x4242, b"whatever").unwrap();
    assert_eq!(r.kind, REP_ERR_UNSUP, "unknown option: {r:?}");
    c.go("disk0");
    f.assert_serves(&mut c, "after an unknown option");
}

#[test]
fn export_name_option_enters_transmission_with_and_without_zeroes() {
    let f = fixture(false);
    for no_zeroes in [true, false] {
        let mut c = f.server.connect();
        c.greeting().unwrap();
        let flags = FLAG_C_FIXED_NEWSTYLE | if no_zeroes { FLAG_C_NO_ZEROES } else { 0 };
        c.send(&flags.to_be_bytes()).unwrap();
        c.send_option(OPT_EXPORT_NAME, b"disk0").unwrap();
        let reply = c.recv(if no_zeroes { 10 } else { 134 }).unwrap();
        assert_eq!(be64(&reply), f.img.size);
        assert!(be16(&reply[8..]) & TF_READ_ONLY != 0);
        assert!(reply[10..].iter().all(|&b| b == 0), "padding not zero");
        f.assert_serves(&mut c, "after EXPORT_NAME");
    }
}

#[test]
fn abort_is_acknowledged_then_the_connection_closes() {
    let f = fixture(false);
    let mut c = f.server.connect();
    c.start().unwrap();
    c.send_option(OPT_ABORT, &[]).unwrap();
    // The spec says the server SHOULD send an ACK; a close alone is allowed.
    if let Ok(r) = c.read_option_reply() {
        assert_eq!((r.option, r.kind), (OPT_ABORT, REP_ACK), "{r:?}");
    }
    assert!(c.closed_within(CLOSE_WAIT), "connection open after ABORT");
}

#[test]
fn starttls_gets_an_error_reply_and_negotiation_continues() {
    let f = fixture(false);
    let mut c = f.server.connect();
    c.start().unwrap();
    let r = c.option(OPT_STARTTLS, &[]).unwrap();
    assert!(
        r.is_error(),
        "STARTTLS accepted by a server without TLS: {r:?}"
    );
    c.structured_reply().unwrap();
    c.go("disk0");
    f.assert_serves(&mut c, "after STARTTLS was refused");
}

#[test]
fn option_length_of_2gib_is_refused_not_awaited() {
    let f = fixture(false);
    let mut survivor = f.structured().0;
    let mut c = f.server.connect();
    c.start().unwrap();
    let mut header = Vec::new();
    header.extend_from_slice(&IHAVEOPT.to_be_bytes());
    header.extend_from_slice(&OPT_INFO.to_be_bytes());
    header.extend_from_slice(&0x8000_0000u32.to_be_bytes());
    c.send(&header).unwrap();
    // Either an error reply (then maybe a close) or a close, promptly: a
    // server waiting for 2 GiB of option data would time this read out.
    let started = Instant::now();
    match c.read_option_reply() {
        Ok(r) => assert!(r.is_error(), "2 GiB option answered with {r:?}"),
        Err(e) => assert!(
            !matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ),
            "no answer to a 2 GiB option within {:?}: the server is waiting for the data",
            started.elapsed()
        ),
    }
    f.assert_serves(&mut survivor, "survivor after a 2 GiB option");
}

#[test]
fn list_meta_context_offers_base_allocation() {
    let f = fixture(false);
    let mut c = f.server.connect();
    c.start().unwrap();
    c.structured_reply().unwrap();
    let all = c.meta_context(OPT_LIST_META_CONTEXT, "disk0", &[]);
    assert!(all.iter().any(|(_, n)| n == "base:allocation"), "{all:?}");
    let some = c.meta_context(OPT_LIST_META_CONTEXT, "disk0", &["base:"]);
    assert!(some.iter().any(|(_, n)| n == "base:allocation"), "{some:?}");
    let none = c.meta_context(OPT_SET_META_CONTEXT, "disk0", &["qemu:dirty-bitmap:x"]);
    assert!(none.is_empty(), "selected an unknown context: {none:?}");
}

// ------------------------------------------------------------- transmission

#[test]
fn simple_reads_return_the_file_content() {
    let f = fixture(false);
    let (mut c, _) = f.simple();
    for (off, len) in [
        (0, 4096),
        (1, 1),
        (MIB - 3, 2 * MIB as u32),
        (6 * MIB + 123, 1000),
    ] {
        let r = c.read(0, off, len).unwrap();
        assert!(r.simple, "structured reply without negotiation: {r:?}");
        assert_same_bytes(
            &r.data,
            &f.img.expected(off, len as usize),
            off,
            "simple READ",
        );
    }
}

#[test]
fn structured_read_of_a_hole_sends_a_hole_chunk() {
    let f = fixture(false);
    let (mut c, ..) = f.structured();
    let hole = c.read(0, MIB, MIB as u32).unwrap();
    assert_eq!(hole.error, None);
    assert!(
        !hole.simple,
        "simple reply to READ after structured replies"
    );
    assert!(hole.data.iter().all(|&b| b == 0));
    assert!(
        hole.chunk_kinds.contains(&REPLY_TYPE_OFFSET_HOLE),
        "a read of a hole sent no hole chunk: {:?}",
        hole.chunk_kinds
    );
    // Across data, hole and data again.
    let (off, len) = (MIB - 1000, MIB as u32 + 2000);
    let mixed = c.read(0, off, len).unwrap();
    assert_eq!(mixed.error, None);
    assert_same_bytes(
        &mixed.data,
        &f.img.expected(off, len as usize),
        off,
        "mixed READ",
    );
    assert!(mixed.chunk_kinds.contains(&REPLY_TYPE_OFFSET_DATA));
}

#[test]
fn df_read_comes_as_one_data_chunk() {
    let f = fixture(false);
    let (mut c, info, _) = f.structured();
    assert!(
        info.flags & TF_SEND_DF != 0,
        "DF not advertised: {:#x}",
        info.flags
    );
    let (off, len) = (MIB - 4096, 8192u32);
    let r = c.read(CMD_FLAG_DF, off, len).unwrap();
    assert_eq!(r.error, None);
    assert_eq!(
        r.chunk_kinds,
        [REPLY_TYPE_OFFSET_DATA],
        "DF read fragmented"
    );
    assert_same_bytes(&r.data, &f.img.expected(off, len as usize), off, "DF READ");
}

/// Walks BLOCK_STATUS over the whole export and merges equal neighbours.
fn block_map(c: &mut Conn, ctx: u32, size: u64) -> Vec<(u64, u64, u32)> {
    let mut map: Vec<(u64, u64, u32)> = Vec::new();
    let mut at = 0;
    while at < size {
        let len = (size - at).min(u64::from(u32::MAX / 2)) as u32;
        let extents = c
            .block_status(0, ctx, at, len)
            .unwrap()
            .unwrap_or_else(|e| panic!("BLOCK_STATUS at {at}: errno {e}"));
        assert!(!extents.is_empty(), "no extents at {at}");
        for (n, flags) in extents {
            assert!(n > 0, "zero-length extent at {at}");
            let n = u64::from(n).min(size - at);
            match map.last_mut() {
                Some(last) if last.2 == flags && last.0 + last.1 == at => last.1 += n,
                _ => map.push((at, n, flags)),
            }
            at += n;
            if at >= size {
                break;
            }
        }
    }
    map
}

#[test]
fn block_status_reports_the_holes_and_data_of_the_file() {
    let f = fixture(false);
    let (mut c, _, ctx) = f.structured();
    let map = block_map(&mut c, ctx, f.img.size);
    let mut expected: Vec<(u64, u64, u32)> = f
        .img
        .data
        .iter()
        .map(|r| (r.offset, r.len, 0))
        .chain(
            f.img
                .holes()
                .iter()
                .map(|h| (h.offset, h.len, STATE_HOLE | STATE_ZERO)),
        )
        .collect();
    expected.sort();
    assert_eq!(map, expected, "block status map (offset, length, flags)");

    let one = c
        .block_status(CMD_FLAG_REQ_ONE, ctx, 0, 4 * MIB as u32)
        .unwrap()
        .unwrap();
    assert_eq!(one.len(), 1, "REQ_ONE gave {one:?}");
    assert!(u64::from(one[0].0) <= MIB);
}

#[test]
fn read_error_after_structured_reply_is_structured() {
    let f = fixture(false);
    let (mut c, ..) = f.structured();
    let r = c.read(0, f.img.size - 512, 1024).unwrap();
    assert!(
        !r.simple,
        "simple reply to a failed READ after structured replies: {r:?}"
    );
    assert_eq!(r.error, Some(EINVAL), "READ past the end: {r:?}");
    f.assert_serves(&mut c, "after a failed structured READ");
}

#[test]
fn readonly_export_refuses_writes_with_eperm() {
    let f = fixture(false);
    let (mut c, ..) = f.structured();
    c.write_request(0, 1, 4096, &[0xaa; 4096]).unwrap();
    assert_eq!(c.finish(1).unwrap(), EPERM, "WRITE on a read-only export");
    assert_eq!(c.command(0, CMD_TRIM, 0, 4096).unwrap(), EPERM, "TRIM");
    assert_eq!(
        c.command(0, CMD_WRITE_ZEROES, 0, 4096).unwrap(),
        EPERM,
        "WRITE_ZEROES"
    );
    f.assert_serves(&mut c, "after refused writes");
    f.assert_file_intact();
}

/// Payload bytes that parse as a valid READ request header: a server that
/// forgot to consume a rejected WRITE's payload would answer it.
fn decoy_payload(len: usize) -> Vec<u8> {
    request_bytes(0, CMD_READ, 0xdec0, 0, 512).repeat(len / 28 + 1)[..len].to_vec()
}

#[test]
fn rejected_write_still_consumes_its_payload() {
    let ro = fixture(false);
    let (mut c, ..) = ro.structured();
    c.write_request(0, 7, 0, &decoy_payload(4096)).unwrap();
    assert_eq!(c.finish(7).unwrap(), EPERM);
    // The next reply must be for our READ, not for a decoy in the payload.
    ro.assert_serves(&mut c, "after an EPERM write (read-only)");

    let rw = fixture(true);
    let (mut c, ..) = rw.structured();
    c.write_request(0, 8, rw.img.size - 100, &decoy_payload(4096))
        .unwrap();
    assert_eq!(c.finish(8).unwrap(), ENOSPC);
    c.write_request(1 << 12, 9, 0, &decoy_payload(4096))
        .unwrap();
    assert_eq!(c.finish(9).unwrap(), EINVAL, "WRITE with an unknown flag");
    rw.assert_serves(&mut c, "after rejected writes (writable)");
    rw.assert_file_intact();
}

#[test]
fn zero_length_requests_get_a_reply() {
    let f = fixture(true);
    for structured in [false, true] {
        let mut c = f.server.connect();
        c.negotiate("disk0", structured);
        for cmd in [
            CMD_READ,
            CMD_WRITE,
            CMD_FLUSH,
            CMD_TRIM,
            CMD_CACHE,
            CMD_WRITE_ZEROES,
        ] {
            let cookie = 0x2e00 + u64::from(cmd);
            c.request(0, cmd, cookie, 4096, 0).unwrap();
            let replies = c.read_full_reply(0).unwrap_or_else(|e| {
                panic!("no reply to zero-length command {cmd} (structured={structured}): {e}")
            });
            for r in &replies {
                assert_eq!(r.cookie(), cookie);
                if let Some(e) = r.error() {
                    assert!(SPEC_ERRNOS.contains(&e), "errno {e} for command {cmd}");
                }
            }
        }
        if structured {
            c.request(0, CMD_BLOCK_STATUS, 0x2e07, 4096, 0).unwrap();
            let replies = c
                .read_full_reply(0)
                .expect("reply to zero-length BLOCK_STATUS");
            assert!(replies.iter().all(|r| r.cookie() == 0x2e07));
        }
        f.assert_serves(&mut c, "after zero-length requests");
    }
    f.assert_file_intact();
}

#[test]
fn past_the_end_requests_get_einval_or_enospc_and_the_file_never_grows() {
    let f = fixture(true);
    let (mut c, _, ctx) = f.structured();
    let size = f.img.size;
    for (off, len) in [
        (size - 512, 1024u32),
        (size, 1),
        (size + MIB, 4096),
        (u64::MAX - 100, 4096),
    ] {
        let r = c.read(0, off, len).unwrap();
        assert_eq!(r.error, Some(EINVAL), "READ {off}+{len}: {r:?}");
        assert_eq!(
            c.command(0, CMD_TRIM, off, len).unwrap(),
            EINVAL,
            "TRIM {off}+{len}"
        );
        assert_eq!(
            c.block_status(0, ctx, off, len).unwrap(),
            Err(EINVAL),
            "BLOCK_STATUS {off}+{len}"
        );
        c.write_request(0, 3, off, &vec![0x55; len as usize])
            .unwrap();
        let e = c.finish(3).unwrap();
        assert_eq!(e, ENOSPC, "WRITE {off}+{len}");
        let e = c.command(0, CMD_WRITE_ZEROES, off, len).unwrap();
        assert_eq!(e, ENOSPC, "WRITE_ZEROES {off}+{len}");
    }
    f.assert_serves(&mut c, "after past-the-end requests");
    f.assert_file_intact();
}

#[test]
fn write_zeroes_of_64mib_works_without_buffering_it() {
    let dir = tempfile::tempdir().unwrap();
    let img = SparseImage::create(
        dir.path().join("big.img"),
        96 * MIB,
        &[integration::Region::new(16 * MIB, 64 * MIB)],
        9,
    );
    let server = Export::new(&img.path).writable().spawn();
    let mut c = server.connect();
    c.negotiate("", true);
    let before = server.rss_kib();
    let started = Instant::now();
    let e = c
        .command(0, CMD_WRITE_ZEROES, 16 * MIB, 64 * MIB as u32)
        .unwrap();
    assert_eq!(e, 0, "WRITE_ZEROES of 64 MiB");
    let after = server.rss_kib();
    assert!(
        after < before + 32 * 1024,
        "server RSS went from {before} KiB to {after} KiB for a 64 MiB WRITE_ZEROES"
    );
    assert!(started.elapsed() < Duration::from_secs(30));
    // NO_HOLE asks for allocated zeroes; the content is the same.
    let e = c
        .command(CMD_FLAG_NO_HOLE, CMD_WRITE_ZEROES, 3, 5000)
        .unwrap();
    assert_eq!(e, 0, "WRITE_ZEROES NO_HOLE");
    assert_eq!(c.command(0, CMD_FLUSH, 0, 0).unwrap(), 0);
    let content = read_file(&img.path);
    assert_eq!(content.len() as u64, 96 * MIB);
    assert!(
        content[16 * MIB as usize..80 * MIB as usize]
            .iter()
            .all(|&b| b == 0)
    );
    assert!(content[3..5003].iter().all(|&b| b == 0));
    assert_same_bytes(
        &content[80 * MIB as usize..],
        &img.expected(80 * MIB, 16 * MIB as usize),
        80 * MIB,
        "after the zeroed range",
    );
}

#[test]
fn fast_zero_fails_fast_with_enotsup_or_succeeds() {
    let f = fixture(true);
    let (mut c, info, _) = f.structured();
    assert!(
        info.flags & TF_SEND_FAST_ZERO != 0,
        "FAST_ZERO not advertised"
    );
    for (off, len) in [(0u64, MIB as u32), (MIB, MIB as u32), (MIB - 4096, 8192)] {
        let started = Instant::now();
        let e = c
            .command(CMD_FLAG_FAST_ZERO, CMD_WRITE_ZEROES, off, len)
            .unwrap();
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "FAST_ZERO took {:?}",
            started.elapsed()
        );
        match e {
            0 => assert!(
                read_at(&f.img.path, off, len as usize)
                    .iter()
                    .all(|&b| b == 0)
            ),
            ENOTSUP => {}
            e => panic!("FAST_ZERO {off}+{len}: errno {e}, expected 0 or ENOTSUP"),
        }
    }
}

#[test]
fn writes_flush_fua_trim_and_cache_land_in_the_file() {
    let f = fixture(true);
    let (mut c, info, _) = f.structured();
    for flag in [
        TF_SEND_FLUSH,
        TF_SEND_FUA,
        TF_SEND_TRIM,
        TF_SEND_WRITE_ZEROES,
        TF_SEND_CACHE,
        TF_CAN_MULTI_CONN,
    ] {
        assert!(
            info.flags & flag != 0,
            "flag {flag:#x} missing in {:#x}",
            info.flags
        );
    }
    let data = pattern(77, 0, 10_000);
    c.write_request(0, 1, 4097, &data).unwrap();
    assert_eq!(c.finish(1).unwrap(), 0);
    c.write_request(CMD_FLAG_FUA, 2, MIB + 13, &data[..3000])
        .unwrap();
    assert_eq!(c.finish(2).unwrap(), 0, "FUA write into a hole");
    assert_eq!(c.command(0, CMD_FLUSH, 0, 0).unwrap(), 0);
    assert_eq!(c.command(0, CMD_CACHE, 0, MIB as u32).unwrap(), 0);
    assert_eq!(c.command(0, CMD_TRIM, 2 * MIB, 64 * KIB as u32).unwrap(), 0);
    assert_eq!(c.read_ok(4097, 10_000), data);
    assert_eq!(read_at(&f.img.path, 4097, 10_000), data);
    assert_eq!(read_at(&f.img.path, MIB + 13, 3000), data[..3000].to_vec());
    // Multi-conn: another connection sees the flushed writes.
    let (mut other, ..) = f.structured();
    assert_eq!(other.read_ok(MIB + 13, 3000), data[..3000].to_vec());
    assert_eq!(std::fs::metadata(&f.img.path).unwrap().len(), f.img.size);
}

#[test]
fn pipelined_requests_are_answered_by_cookie() {
    let f = fixture(false);
    let (mut c, ..) = f.structured();
    let reqs: Vec<(u64, u64, u32)> = (0..32u64)
        .map(|i| {
            (
                1000 + i,
                (i * 257 * KIB) % (f.img.size - 64 * KIB),
                4096 + (i as u32) * 100,
            )
        })
        .collect();
    let mut bytes = Vec::new();
    for &(cookie, off, len) in &reqs {
        bytes.extend_from_slice(&request_bytes(0, CMD_READ, cookie, off, len));
    }
    c.send(&bytes).unwrap();
    let mut got: std::collections::HashMap<u64, Vec<u8>> = Default::default();
    let mut done = std::collections::HashSet::new();
    while done.len() < reqs.len() {
        let r = c.read_reply(0).unwrap();
        let cookie = r.cookie();
        let &(_, off, len) = reqs.iter().find(|q| q.0 == cookie).expect("unknown cookie");
        let buf = got.entry(cookie).or_insert_with(|| vec![0; len as usize]);
        if let Reply::Chunk {
            kind: REPLY_TYPE_OFFSET_DATA,
            payload,
            ..
        } = &r
        {
            let at = (be64(payload) - off) as usize;
            buf[at..at + payload.len() - 8].copy_from_slice(&payload[8..]);
        }
        assert_eq!(r.error(), None, "{r:?}");
        if r.is_last() {
            done.insert(cookie);
        }
    }
    for (cookie, off, len) in reqs {
        assert_same_bytes(
            &got[&cookie],
            &f.img.expected(off, len as usize),
            off,
            "pipelined READ",
        );
    }
}

#[test]
fn disc_closes_the_connection() {
    let f = fixture(false);
    let (mut c, ..) = f.structured();
    c.request(0, CMD_DISC, 1, 0, 0).unwrap();
    assert!(c.closed_within(CLOSE_WAIT), "connection open after DISC");
}

// ---------------------------------------------------------- malformed input

#[test]
fn unknown_command_gets_einval_and_the_connection_continues() {
    let f = fixture(true);
    for structured in [false, true] {
        let mut c = f.server.connect();
        c.negotiate("disk0", structured);
        assert_eq!(c.command(0, 99, 0, 512).unwrap(), EINVAL, "command 99");
        f.assert_serves(&mut c, "after an unknown command");
    }
}

#[test]
fn unknown_flags_get_einval() {
    let f = fixture(true);
    let (mut c, ..) = f.structured();
    let r = c.read(1 << 12, 0, 512).unwrap();
    assert_eq!(r.error, Some(EINVAL), "READ with unknown flag: {r:?}");
    assert!(!r.simple, "simple reply to READ after structured replies");
    assert_eq!(
        c.command(1 << 13, CMD_FLUSH, 0, 0).unwrap(),
        EINVAL,
        "FLUSH with unknown flag"
    );
    assert_eq!(
        c.command(1 << 12, CMD_TRIM, 0, 512).unwrap(),
        EINVAL,
        "TRIM with unknown flag"
    );
    f.assert_serves(&mut c, "after unknown flags");
    f.assert_file_intact();
}

#[test]
fn only_the_error_numbers_of_the_spec_are_sent() {
    let f = fixture(false);
    let (mut c, _, ctx) = f.structured();
    let mut seen = Vec::new();
    let size = f.img.size;
    for (flags, cmd, off, len) in [
        (0, 99u16, 0u64, 512u32),
        (0, CMD_TRIM, 0, 512),
        (0, CMD_WRITE_ZEROES, 0, 512),
        (CMD_FLAG_FAST_ZERO, CMD_WRITE_ZEROES, 0, 512),
        (0, CMD_READ, size, 512),
        (0, CMD_CACHE, size, 512),
        (0, CMD_BLOCK_STATUS, size, 512),
        (CMD_FLAG_FUA, CMD_READ, 0, 512),
        (1 << 15, CMD_READ, 0, 512),
        (0, CMD_READ, 0, 0xffff_ffff),
        (0, 0xffff, 0, 0),
    ] {
        let cookie = 0xe0 + u64::from(cmd);
        c.request(flags, cmd, cookie, off, len).unwrap();
        for r in c.read_full_reply(0).unwrap() {
            if let Some(e) = r.error() {
                seen.push((cmd, flags, e));
            }
        }
    }
    c.write_request(0, 5, 0, &[1; 512]).unwrap();
    for r in c.read_full_reply(0).unwrap() {
        if let Some(e) = r.error() {
            seen.push((CMD_WRITE, 0, e));
        }
    }
    let _ = ctx;
    let bad: Vec<_> = seen
        .iter()
        .filter(|(_, _, e)| !SPEC_ERRNOS.contains(e))
        .collect();
    assert!(
        bad.is_empty(),
        "errors outside the spec's list (cmd, flags, errno): {bad:?}"
    );
    assert!(
        seen.len() >= 10,
        "expected errors for bad requests, got {seen:?}"
    );
}

#[test]
fn bad_request_magic_disconnects_while_other_connections_continue() {
    let mut f = fixture(false);
    let (mut survivor, ..) = f.structured();
    let (mut c, ..) = f.structured();
    let mut req = request_bytes(0, CMD_READ, 1, 0, 512);
    req[0..4].copy_from_slice(&0xdead_beefu32.to_be_bytes());
    c.send(&req).unwrap();
    assert!(
        c.closed_within(CLOSE_WAIT),
        "bad request magic did not end the connection"
    );
    f.server.assert_alive();
    f.assert_serves(&mut survivor, "survivor after a bad magic");
}

#[test]
fn garbage_after_the_handshake_ends_only_that_connection() {
    let mut f = fixture(true);
    let (mut survivor, ..) = f.structured();
    let (mut c, ..) = f.structured();
    let _ = c.send(&pattern(3, 0, 64 * 1024));
    assert!(
        c.closed_within(CLOSE_WAIT),
        "garbage did not end the connection"
    );
    // Garbage during negotiation too.
    let mut n = f.server.connect();
    n.start().unwrap();
    let _ = n.send(&pattern(4, 0, 4096));
    assert!(
        n.closed_within(CLOSE_WAIT),
        "garbage options did not end the connection"
    );
    f.server.assert_alive();
    f.assert_serves(&mut survivor, "survivor after garbage");
    f.assert_file_intact();
}

#[test]
fn truncated_requests_do_not_hurt_the_server() {
    let mut f = fixture(true);
    let (mut survivor, ..) = f.structured();
    {
        let (mut c, ..) = f.structured();
        c.send(&request_bytes(0, CMD_READ, 1, 0, 512)[..13])
            .unwrap();
    }
    {
        let (mut c, ..) = f.structured();
        let mut b = request_bytes(0, CMD_WRITE, 2, 0, 4096).to_vec();
        b.extend_from_slice(&[0x77; 100]);
        c.send(&b).unwrap();
    }
    {
        let mut c = f.server.connect();
        c.start().unwrap();
        c.send(&option_bytes(OPT_GO, &go_data("disk0", &[]))[..20])
            .unwrap();
    }
    {
        let mut c = f.server.connect();
        c.send(&[0, 0]).unwrap();
    }
    // A new connection is served and the survivor too.
    let (mut fresh, ..) = f.structured();
    f.assert_serves(&mut fresh, "new connection after truncated requests");
    f.assert_serves(&mut survivor, "survivor after truncated requests");
    f.server.assert_alive();
    // The truncated WRITE must not have been applied in part.
    assert_eq!(read_at(&f.img.path, 0, 100), f.img.expected(0, 100));
}

#[test]
fn oversized_requests_get_an_error_or_a_clean_disconnect() {
    let mut f = fixture(true);
    let (mut survivor, ..) = f.structured();
    // A READ of 4 GiB - 1: error (EINVAL/EOVERFLOW) or disconnect.
    let (mut c, ..) = f.structured();
    c.request(0, CMD_READ, 1, 0, 0xffff_ffff).unwrap();
    match c.read_full_reply(0) {
        Ok(replies) => {
            let e = replies.iter().find_map(|r| r.error());
            assert!(
                matches!(e, Some(EINVAL | EOVERFLOW)),
                "4 GiB READ: {replies:?}"
            );
            f.assert_serves(&mut c, "after a refused 4 GiB READ");
        }
        Err(_) => assert!(c.closed_within(CLOSE_WAIT)),
    }
    // A WRITE announcing 1 GiB of payload: the server may refuse it and
    // disconnect (it cannot skip the payload cheaply) but must not die.
    let (mut w, ..) = f.structured();
    w.request(0, CMD_WRITE, 2, 0, 1 << 30).unwrap();
    let _ = w.send(&[0x11; 64 * 1024]);
    drop(w);
    f.server.assert_alive();
    f.assert_serves(&mut survivor, "survivor after oversized requests");
    assert_eq!(read_at(&f.img.path, 0, 4096), f.img.expected(0, 4096));
}
