//! Seeds built by hand from the NBD spec (`doc/proto.md`), for the paths
//! real clients rarely take: `EXPORT_NAME`, `LIST`, `INFO`, `ABORT`,
//! unknown options, read-only writes, out-of-bounds and malformed
//! requests. `tests/replay.rs` writes them into `corpus/` (see there).

use nbd_server::proto::*;

const CLIENT_FLAGS: u32 = FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES;

fn option(out: &mut Vec<u8>, opt: u32, payload: &[u8]) {
    out.extend_from_slice(&option_header(opt, payload.len() as u32));
    out.extend_from_slice(payload);
}

fn request(out: &mut Vec<u8>, command: u16, flags: u16, offset: u64, length: u32) {
    let cookie = out.len() as u64;
    out.extend_from_slice(
        &RequestHeader {
            flags,
            command,
            cookie,
            offset,
            length,
        }
        .encode(),
    );
}

fn write(out: &mut Vec<u8>, flags: u16, offset: u64, data: &[u8]) {
    request(out, CMD_WRITE, flags, offset, data.len() as u32);
    out.extend_from_slice(data);
}

fn info_request(name: &str, requests: &[u16]) -> Vec<u8> {
    InfoRequest {
        name: name.into(),
        requests: requests.to_vec(),
    }
    .encode()
}

fn meta(export: &str, queries: &[&str]) -> Vec<u8> {
    MetaContextRequest {
        export: export.into(),
        queries: queries.iter().map(|q| q.to_string()).collect(),
    }
    .encode()
}

fn start(flags: u32) -> Vec<u8> {
    flags.to_be_bytes().to_vec()
}

/// `(name, bytes)` seeds of whole client sessions.
pub fn sessions() -> Vec<(&'static str, Vec<u8>)> {
    let mut seeds = Vec::new();

    // The modern path: structured replies, base:allocation, GO; reads and
    // block status with every flag; a clean disconnect.
    let mut s = start(CLIENT_FLAGS);
    option(&mut s, OPT_STRUCTURED_REPLY, &[]);
    option(&mut s, OPT_SET_META_CONTEXT, &meta("", &[BASE_ALLOCATION]));
    option(
        &mut s,
        OPT_GO,
        &info_request("", &[INFO_BLOCK_SIZE, INFO_NAME, INFO_DESCRIPTION]),
    );
    request(&mut s, CMD_READ, 0, 0, 4096);
    request(&mut s, CMD_READ, CMD_FLAG_DF, 4096, 65536);
    request(&mut s, CMD_READ, 0, 1020 * 1024, 4096);
    request(&mut s, CMD_BLOCK_STATUS, 0, 0, 1 << 20);
    request(&mut s, CMD_BLOCK_STATUS, CMD_FLAG_REQ_ONE, 512 * 1024, 4096);
    request(&mut s, CMD_DISC, 0, 0, 0);
    seeds.push(("spec-go-structured-read-status-disc", s));

    // Discovery: LIST, INFO, LIST_META_CONTEXT, unknown and TLS options,
    // then ABORT.
    let mut s = start(CLIENT_FLAGS);
    option(&mut s, OPT_LIST, &[]);
    option(&mut s, OPT_INFO, &info_request("disk", &[INFO_BLOCK_SIZE]));
    option(&mut s, OPT_INFO, &info_request("missing", &[]));
    option(&mut s, OPT_LIST_META_CONTEXT, &meta("", &[]));
    option(
        &mut s,
        OPT_LIST_META_CONTEXT,
        &meta("ro", &["base:", "qemu:"]),
    );
    option(&mut s, 99, b"junk");
    option(&mut s, OPT_STARTTLS, &[]);
    option(&mut s, OPT_ABORT, &[]);
    seeds.push(("spec-list-info-meta-abort", s));

    // Old fixed-newstyle: EXPORT_NAME, simple replies, every write command.
    let mut s = start(FLAG_C_FIXED_NEWSTYLE);
    option(&mut s, OPT_EXPORT_NAME, b"disk");
    write(&mut s, 0, 0, &[0xab; 512]);
    write(&mut s, CMD_FLAG_FUA, 4096, &[0xcd; 4096]);
    request(&mut s, CMD_FLUSH, 0, 0, 0);
    request(&mut s, CMD_TRIM, 0, 8192, 8192);
    request(&mut s, CMD_WRITE_ZEROES, 0, 65536, 65536);
    request(&mut s, CMD_WRITE_ZEROES, CMD_FLAG_NO_HOLE, 131072, 4096);
    request(&mut s, CMD_WRITE_ZEROES, CMD_FLAG_FAST_ZERO, 0, 4096);
    request(&mut s, CMD_CACHE, 0, 0, 1 << 20);
    request(&mut s, CMD_READ, 0, 0, 8192);
    request(&mut s, CMD_DISC, 0, 0, 0);
    seeds.push(("spec-export-name-writes", s));

    // Writes to the read-only export must fail per request, not end it.
    let mut s = start(CLIENT_FLAGS);
    option(&mut s, OPT_STRUCTURED_REPLY, &[]);
    option(&mut s, OPT_GO, &info_request("ro", &[]));
    write(&mut s, 0, 0, &[1; 512]);
    request(&mut s, CMD_TRIM, 0, 0, 4096);
    request(&mut s, CMD_WRITE_ZEROES, 0, 0, 4096);
    request(&mut s, CMD_FLUSH, 0, 0, 0);
    request(&mut s, CMD_READ, 0, 0, 512);
    request(&mut s, CMD_DISC, 0, 0, 0);
    seeds.push(("spec-readonly-writes", s));

    // Bad requests: out of bounds, zero and oversized lengths, unknown
    // command and flags, block status without a context, then bad magic.
    let mut s = start(CLIENT_FLAGS);
    option(&mut s, OPT_GO, &info_request("", &[]));
    request(&mut s, CMD_READ, 0, (1 << 20) - 512, 4096);
    request(&mut s, CMD_READ, 0, u64::MAX - 100, 4096);
    request(&mut s, CMD_READ, 0, 0, 0);
    request(&mut s, CMD_READ, 0, 0, 64 << 20);
    request(&mut s, 42, 0, 0, 512);
    request(&mut s, CMD_READ, 0x8000, 0, 512);
    request(&mut s, CMD_BLOCK_STATUS, 0, 0, 4096);
    write(&mut s, 0, (1 << 20) - 256, &[7; 512]);
    request(&mut s, CMD_TRIM, 0, 0, 0);
    s.extend_from_slice(&[0xde, 0xad, 0xbe, 0xef]);
    s.extend_from_slice(&[0; 24]);
    seeds.push(("spec-bad-requests", s));

    // Options the server should refuse or ignore before GO: extended
    // headers, a repeated STRUCTURED_REPLY with a payload, a GO for an
    // unknown export, a truncated INFO payload.
    let mut s = start(CLIENT_FLAGS);
    option(&mut s, OPT_EXTENDED_HEADERS, &[]);
    option(&mut s, OPT_STRUCTURED_REPLY, &[1, 2, 3]);
    option(&mut s, OPT_STRUCTURED_REPLY, &[]);
    option(&mut s, OPT_GO, &info_request("nope", &[]));
    option(&mut s, OPT_GO, &[0, 0, 0, 9, b'd']);
    option(
        &mut s,
        OPT_SET_META_CONTEXT,
        &meta("disk", &["base:allocation", "x:y"]),
    );
    option(&mut s, OPT_GO, &info_request("disk", &[INFO_EXPORT]));
    request(&mut s, CMD_BLOCK_STATUS, 0, 0, 1 << 20);
    request(&mut s, CMD_DISC, 0, 0, 0);
    seeds.push(("spec-refused-options-then-go", s));

    // Without fixed newstyle, with an option length beyond the input.
    let mut s = start(0);
    option(&mut s, OPT_EXPORT_NAME, b"");
    seeds.push(("spec-not-fixed-newstyle", s));
    let mut s = start(CLIENT_FLAGS);
    s.extend_from_slice(&option_header(OPT_GO, 0xffff_fff0));
    s.extend_from_slice(&[0; 8]);
    seeds.push(("spec-huge-option-length", s));

    // Many requests in flight at once, no DISC (the client just closes).
    let mut s = start(CLIENT_FLAGS);
    option(&mut s, OPT_STRUCTURED_REPLY, &[]);
    option(&mut s, OPT_GO, &info_request("", &[]));
    for i in 0..64u64 {
        request(&mut s, CMD_READ, 0, (i * 16384) % (1 << 20), 16384);
    }
    seeds.push(("spec-pipelined-reads-no-disc", s));

    seeds
}

/// `(name, bytes)` seeds of option payloads and reply chunks.
pub fn codecs() -> Vec<(&'static str, Vec<u8>)> {
    let mut seeds = vec![
        (
            "spec-info-request",
            info_request("disk", &[INFO_BLOCK_SIZE, INFO_NAME]),
        ),
        ("spec-info-request-empty", info_request("", &[])),
        (
            "spec-meta-context",
            meta("", &[BASE_ALLOCATION, "qemu:dirty-bitmap:x"]),
        ),
        ("spec-meta-context-none", meta("disk", &[])),
        (
            "spec-info-export",
            Info::Export {
                size: 1 << 30,
                flags: TF_HAS_FLAGS | TF_READ_ONLY,
            }
            .encode(),
        ),
        ("spec-info-name", Info::Name("disk".into()).encode()),
        (
            "spec-info-description",
            Info::Description("a disk".into()).encode(),
        ),
        (
            "spec-info-block-size",
            Info::BlockSize(BlockSizes::default()).encode(),
        ),
        (
            "spec-error-chunk",
            encode_error_chunk(Errno::Io, "boom", None),
        ),
        (
            "spec-error-chunk-offset",
            encode_error_chunk(Errno::Inval, "bad", Some(512)),
        ),
    ];
    seeds.push((
        "spec-request-header",
        RequestHeader {
            flags: CMD_FLAG_FUA,
            command: CMD_WRITE,
            cookie: 1,
            offset: 4096,
            length: 512,
        }
        .encode()
        .to_vec(),
    ));
    seeds.push((
        "spec-option-reply-header",
        option_reply_header(OPT_GO, REP_INFO, 12).to_vec(),
    ));
    seeds
}
