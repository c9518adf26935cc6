//! The server side of the fixed-newstyle handshake.
//!
//! ```text
//!  S: NBDMAGIC IHAVEOPT flags(FIXED_NEWSTYLE|NO_ZEROES)
//!  C: client flags            unknown bits -> hard disconnect
//!  loop:
//!    C: IHAVEOPT option length [data]
//!       bad magic             -> hard disconnect
//!       length > 1 MiB        -> ERR_TOO_BIG, hard disconnect (never awaited)
//!       length > 64 KiB       -> data discarded, ERR_TOO_BIG, go on
//!    S: replies; GO + ACK or EXPORT_NAME -> transmission; ABORT -> close
//!       STARTTLS + ACK -> the caller upgrades the stream, then [`resume`]
//!       goes on with the option loop over TLS (no new greeting)
//! ```
//!
//! TLS follows the spec's modes: with [`TlsPhase::Unavailable`] (NOTLS)
//! `STARTTLS` gets `ERR_POLICY`; with `Offered { required: false }`
//! (SELECTIVETLS with no TLS-only export) every option works before or
//! after the upgrade; with `Offered { required: true }` (FORCEDTLS) every
//! option but `STARTTLS` and `ABORT` gets `ERR_TLS_REQD`, and an
//! `EXPORT_NAME`, which cannot be refused, ends the session. Options
//! negotiated before the upgrade are forgotten after it; a second
//! `STARTTLS` gets `ERR_INVALID`.
//!
//! Every option gets a reply, errors included; only the cases above and an
//! `EXPORT_NAME` naming no export (which cannot be answered with an error)
//! end the session. The transmission flags are computed from the same
//! negotiated state for INFO and GO, so the two report the same values.

use std::io;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::device::Capabilities;
use crate::proto::{self, BlockSizes};
use crate::request::Negotiated;

/// Options up to this size are read and parsed.
pub const OPTION_MAX: u32 = 64 * 1024;
/// Options up to this size are skipped with `ERR_TOO_BIG`; larger ones end
/// the session, since waiting for gigabytes of option data is a denial of
/// service.
pub const OPTION_DISCARD_MAX: u32 = 1024 * 1024;

/// The id we give `base:allocation` in `SET_META_CONTEXT` replies.
pub const BASE_ALLOCATION_ID: u32 = 1;

/// What the handshake needs to know of one export.
#[derive(Clone, Debug)]
pub struct ExportInfo {
    pub name: String,
    pub description: Option<String>,
    pub size: u64,
    pub capabilities: Capabilities,
    pub block_sizes: BlockSizes,
    /// Shown by `NBD_OPT_LIST`; an unlisted export is still selected by
    /// its exact name.
    pub listed: bool,
}

/// How the handshake ended.
#[derive(Debug)]
pub enum Outcome {
    /// Enter transmission on `exports[export]`.
    Transmission {
        export: usize,
        negotiated: Negotiated,
    },
    /// The client sent `NBD_OPT_ABORT` (soft disconnect).
    Aborted,
    /// `NBD_OPT_STARTTLS` was acknowledged: run the TLS handshake on the
    /// stream, then [`resume`] with this value over the TLS stream.
    StartTls(Resume),
}

/// Where the session stands with TLS.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TlsPhase {
    /// This server has no TLS (NOTLS).
    Unavailable,
    /// TLS is offered and not started; `required` is FORCEDTLS.
    Offered { required: bool },
    /// The session runs over TLS.
    Active,
}

/// What survives a TLS upgrade: the client's flags, and nothing else.
#[derive(Debug)]
pub struct Resume {
    no_zeroes: bool,
}

/// Connection-fatal handshake failures.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HandshakeError {
    #[error("i/o during handshake: {0}")]
    Io(#[from] io::Error),
    #[error("client sent unknown flags {0:#x}")]
    ClientFlags(u32),
    #[error("bad option magic {0:#018x}")]
    OptionMagic(u64),
    #[error("option {option} carries {length} bytes, more than the {OPTION_DISCARD_MAX} we accept")]
    OptionTooLarge { option: u32, length: u32 },
    #[error("EXPORT_NAME for unknown export {0:?}")]
    UnknownExport(String),
    #[error("client sent EXPORT_NAME without STARTTLS, but this server requires TLS")]
    TlsRequired,
}

/// Transmission flags for an export, given what was negotiated.
pub fn transmission_flags(caps: &Capabilities, structured: bool) -> u16 {
    use proto::*;
    let mut f = TF_HAS_FLAGS;
    if !caps.write {
        f |= TF_READ_ONLY;
    }
    if caps.flush {
        f |= TF_SEND_FLUSH;
    }
    if caps.write && caps.fua {
        f |= TF_SEND_FUA;
    }
    if caps.rotational {
        f |= TF_ROTATIONAL;
    }
    if caps.write && caps.trim {
        f |= TF_SEND_TRIM;
    }
    if caps.write && caps.zero {
        f |= TF_SEND_WRITE_ZEROES;
        if caps.fast_zero {
            f |= TF_SEND_FAST_ZERO;
        }
    }
    if structured {
        f |= TF_SEND_DF;
    }
    if caps.multi_conn {
        f |= TF_CAN_MULTI_CONN;
    }
    if caps.cache {
        f |= TF_SEND_CACHE;
    }
    f
}

/// Find an export by name; the empty name is the default (first) export.
pub fn find_export(exports: &[ExportInfo], name: &str) -> Option<usize> {
    if name.is_empty() && !exports.is_empty() {
        return Some(0);
    }
    exports.iter().position(|e| e.name == name)
}

struct State {
    tls: TlsPhase,
    structured: bool,
    no_zeroes: bool,
    /// Export index the last SET_META_CONTEXT named, if it selected
    /// `base:allocation`.
    meta: Option<usize>,
}

/// Run the handshake on `stream` until transmission, abort, a TLS upgrade
/// (with `tls` other than [`TlsPhase::Unavailable`]) or a fatal error.
/// `shutting_down` is polled before each option so a server that is
/// stopping answers `ERR_SHUTDOWN`.
pub async fn negotiate<S>(
    stream: &mut S,
    exports: &[ExportInfo],
    tls: TlsPhase,
    shutting_down: &(dyn Fn() -> bool + Sync),
) -> Result<Outcome, HandshakeError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut hello = Vec::with_capacity(18);
    hello.extend_from_slice(&proto::NBDMAGIC.to_be_bytes());
    hello.extend_from_slice(&proto::IHAVEOPT.to_be_bytes());
    hello.extend_from_slice(&(proto::FLAG_FIXED_NEWSTYLE | proto::FLAG_NO_ZEROES).to_be_bytes());
    stream.write_all(&hello).await?;
    stream.flush().await?;

    let client_flags = stream.read_u32().await?;
    if client_flags & !(proto::FLAG_C_FIXED_NEWSTYLE | proto::FLAG_C_NO_ZEROES) != 0 {
        return Err(HandshakeError::ClientFlags(client_flags));
    }
    let st = State {
        tls,
        structured: false,
        no_zeroes: client_flags & proto::FLAG_C_NO_ZEROES != 0,
        meta: None,
    };
    haggle(stream, exports, st, shutting_down).await
}

/// Go on with option haggling over the TLS stream after
/// [`Outcome::StartTls`]; state negotiated before the upgrade is gone.
pub async fn resume<S>(
    stream: &mut S,
    exports: &[ExportInfo],
    resume: Resume,
    shutting_down: &(dyn Fn() -> bool + Sync),
) -> Result<Outcome, HandshakeError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let st = State {
        tls: TlsPhase::Active,
        structured: false,
        no_zeroes: resume.no_zeroes,
        meta: None,
    };
    haggle(stream, exports, st, shutting_down).await
}

async fn haggle<S>(
    stream: &mut S,
    exports: &[ExportInfo],
    mut st: State,
    shutting_down: &(dyn Fn() -> bool + Sync),
) -> Result<Outcome, HandshakeError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    loop {
        let mut header = [0u8; 16];
        stream.read_exact(&mut header).await?;
        let magic = proto::be_u64(&header[0..8]);
        if magic != proto::IHAVEOPT {
            return Err(HandshakeError::OptionMagic(magic));
        }
        let option = proto::be_u32(&header[8..12]);
        let length = proto::be_u32(&header[12..16]);
        if length > OPTION_MAX {
            let mut out = Vec::new();
            reply_error(
                &mut out,
                option,
                proto::REP_ERR_TOO_BIG,
                "option data too large",
            );
            if length > OPTION_DISCARD_MAX {
                stream.write_all(&out).await?;
                stream.flush().await?;
                return Err(HandshakeError::OptionTooLarge { option, length });
            }
            tokio::io::copy(
                &mut (&mut *stream).take(u64::from(length)),
                &mut tokio::io::sink(),
            )
            .await?;
            stream.write_all(&out).await?;
            stream.flush().await?;
            continue;
        }
        let mut data = vec![0u8; length as usize];
        stream.read_exact(&mut data).await?;
        tracing::trace!(option = proto::option_name(option), length, "option");

        let mut out = Vec::new();
        let done = handle_option(&mut st, exports, option, &data, &mut out, shutting_down)?;
        stream.write_all(&out).await?;
        stream.flush().await?;
        if let Some(outcome) = done {
            return Ok(outcome);
        }
    }
}

fn reply(out: &mut Vec<u8>, option: u32, kind: u32, data: &[u8]) {
    // Our replies: export names and descriptions (operator strings, from a
    // command line), info and context payloads of a few bytes.
    let len = proto::wire_u32(data.len(), "an option reply");
    out.extend_from_slice(&proto::option_reply_header(option, kind, len));
    out.extend_from_slice(data);
}

fn reply_error(out: &mut Vec<u8>, option: u32, kind: u32, message: &str) {
    reply(out, option, kind, message.as_bytes());
}

fn handle_option(
    st: &mut State,
    exports: &[ExportInfo],
    option: u32,
    data: &[u8],
    out: &mut Vec<u8>,
    shutting_down: &(dyn Fn() -> bool + Sync),
) -> Result<Option<Outcome>, HandshakeError> {
    use proto::*;
    if shutting_down() && option != OPT_ABORT {
        reply_error(out, option, REP_ERR_SHUTDOWN, "server is shutting down");
        return Ok(None);
    }
    if st.tls == (TlsPhase::Offered { required: true })
        && option != OPT_STARTTLS
        && option != OPT_ABORT
    {
        if option == OPT_EXPORT_NAME {
            return Err(HandshakeError::TlsRequired);
        }
        reply_error(
            out,
            option,
            REP_ERR_TLS_REQD,
            "this server requires TLS: send NBD_OPT_STARTTLS first",
        );
        return Ok(None);
    }
    match option {
        OPT_EXPORT_NAME => {
            let name = parse_string(data).ok().filter(|n| n.len() <= MAX_STRING);
            let Some(index) = name.as_deref().and_then(|n| find_export(exports, n)) else {
                // This option cannot be answered with an error: the spec
                // says to end the session.
                return Err(HandshakeError::UnknownExport(
                    String::from_utf8_lossy(&data[..data.len().min(256)]).into_owned(),
                ));
            };
            let e = &exports[index];
            let negotiated = negotiated(st, e, index);
            out.extend_from_slice(&e.size.to_be_bytes());
            out.extend_from_slice(&negotiated.transmission_flags.to_be_bytes());
            if !st.no_zeroes {
                out.extend_from_slice(&[0u8; 124]);
            }
            Ok(Some(Outcome::Transmission {
                export: index,
                negotiated,
            }))
        }
        OPT_ABORT => {
            reply(out, option, REP_ACK, &[]);
            Ok(Some(Outcome::Aborted))
        }
        OPT_LIST => {
            if !data.is_empty() {
                reply_error(out, option, REP_ERR_INVALID, "LIST takes no data");
                return Ok(None);
            }
            for e in exports.iter().filter(|e| e.listed) {
                let mut payload = proto::wire_u32(e.name.len(), "an export name")
                    .to_be_bytes()
                    .to_vec();
                payload.extend_from_slice(e.name.as_bytes());
                if let Some(d) = &e.description {
                    payload.extend_from_slice(d.as_bytes());
                }
                reply(out, option, REP_SERVER, &payload);
            }
            reply(out, option, REP_ACK, &[]);
            Ok(None)
        }
        OPT_STARTTLS => {
            if !data.is_empty() {
                reply_error(out, option, REP_ERR_INVALID, "STARTTLS takes no data");
                return Ok(None);
            }
            match st.tls {
                TlsPhase::Unavailable => reply_error(
                    out,
                    option,
                    REP_ERR_POLICY,
                    "TLS is not configured on this server",
                ),
                TlsPhase::Active => {
                    reply_error(out, option, REP_ERR_INVALID, "TLS is already active")
                }
                TlsPhase::Offered { .. } => {
                    reply(out, option, REP_ACK, &[]);
                    return Ok(Some(Outcome::StartTls(Resume {
                        no_zeroes: st.no_zeroes,
                    })));
                }
            }
            Ok(None)
        }
        OPT_INFO | OPT_GO => {
            let req = match InfoRequest::decode(data) {
                Ok(r) => r,
                Err(e) => {
                    reply_error(out, option, REP_ERR_INVALID, &e.to_string());
                    return Ok(None);
                }
            };
            let Some(index) = find_export(exports, &req.name) else {
                reply_error(
                    out,
                    option,
                    REP_ERR_UNKNOWN,
                    &format!("no export named {:?}", req.name),
                );
                return Ok(None);
            };
            let e = &exports[index];
            let negotiated = negotiated(st, e, index);
            let mut infos = vec![Info::Export {
                size: e.size,
                flags: negotiated.transmission_flags,
            }];
            if req.requests.contains(&INFO_NAME) {
                infos.push(Info::Name(e.name.clone()));
            }
            if let (true, Some(d)) = (req.requests.contains(&INFO_DESCRIPTION), &e.description) {
                infos.push(Info::Description(d.clone()));
            }
            // Always sent: clients that did not ask may ignore it, and the
            // values are the spec's defaults unless the device says otherwise.
            infos.push(Info::BlockSize(e.block_sizes));
            for info in infos {
                reply(out, option, REP_INFO, &info.encode());
            }
            reply(out, option, REP_ACK, &[]);
            if option == OPT_GO {
                return Ok(Some(Outcome::Transmission {
                    export: index,
                    negotiated,
                }));
            }
            Ok(None)
        }
        OPT_STRUCTURED_REPLY => {
            if !data.is_empty() {
                reply_error(
                    out,
                    option,
                    REP_ERR_INVALID,
                    "STRUCTURED_REPLY takes no data",
                );
            } else {
                st.structured = true;
                reply(out, option, REP_ACK, &[]);
            }
            Ok(None)
        }
        OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
            let set = option == OPT_SET_META_CONTEXT;
            if set {
                // Replaces the selection even when it fails.
                st.meta = None;
            }
            let req = match MetaContextRequest::decode(data) {
                Ok(r) => r,
                Err(e) => {
                    reply_error(out, option, REP_ERR_INVALID, &e.to_string());
                    return Ok(None);
                }
            };
            if set && !st.structured {
                reply_error(
                    out,
                    option,
                    REP_ERR_INVALID,
                    "structured replies must be negotiated first",
                );
                return Ok(None);
            }
            let Some(index) = find_export(exports, &req.export) else {
                reply_error(
                    out,
                    option,
                    REP_ERR_UNKNOWN,
                    &format!("no export named {:?}", req.export),
                );
                return Ok(None);
            };
            let matches = if set {
                req.queries.iter().any(|q| q == BASE_ALLOCATION)
            } else {
                req.queries.is_empty()
                    || req
                        .queries
                        .iter()
                        .any(|q| q == "base:" || q == BASE_ALLOCATION)
            };
            if matches {
                let id = if set { BASE_ALLOCATION_ID } else { 0 };
                let mut payload = id.to_be_bytes().to_vec();
                payload.extend_from_slice(BASE_ALLOCATION.as_bytes());
                reply(out, option, REP_META_CONTEXT, &payload);
                if set {
                    st.meta = Some(index);
                }
            }
            reply(out, option, REP_ACK, &[]);
            Ok(None)
        }
        _ => {
            reply_error(
                out,
                option,
                REP_ERR_UNSUP,
                &format!("option {option} ({}) is not supported", option_name(option)),
            );
            Ok(None)
        }
    }
}

fn negotiated(st: &State, e: &ExportInfo, index: usize) -> Negotiated {
    Negotiated {
        size: e.size,
        transmission_flags: transmission_flags(&e.capabilities, st.structured),
        structured: st.structured,
        base_allocation: (st.structured && st.meta == Some(index)).then_some(BASE_ALLOCATION_ID),
        max_payload: e.block_sizes.maximum,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::*;

    fn exports() -> Vec<ExportInfo> {
        vec![ExportInfo {
            name: "disk".into(),
            description: Some("a test disk".into()),
            size: 1 << 20,
            capabilities: Capabilities {
                write: true,
                flush: true,
                fua: true,
                trim: true,
                zero: true,
                fast_zero: true,
                cache: true,
                extents: true,
                multi_conn: true,
                rotational: false,
            },
            block_sizes: BlockSizes::default(),
            listed: true,
        }]
    }

    /// Drive `negotiate` with the given client bytes; return what the server
    /// wrote after its greeting and the outcome.
    async fn run(client: Vec<u8>) -> (Vec<u8>, Result<Outcome, HandshakeError>) {
        run_with(TlsPhase::Unavailable, client).await
    }

    async fn run_with(
        tls: TlsPhase,
        client: Vec<u8>,
    ) -> (Vec<u8>, Result<Outcome, HandshakeError>) {
        let (mut ours, mut theirs) = tokio::io::duplex(1 << 22);
        let ex = exports();
        let server = tokio::spawn(async move { negotiate(&mut theirs, &ex, tls, &|| false).await });
        let mut greeting = [0u8; 18];
        ours.read_exact(&mut greeting).await.unwrap();
        ours.write_all(&client).await.unwrap();
        let outcome = server.await.unwrap();
        let mut rest = Vec::new();
        // The server side is dropped when negotiate returns.
        ours.read_to_end(&mut rest).await.unwrap();
        (rest, outcome)
    }

    fn opt(option: u32, data: &[u8]) -> Vec<u8> {
        let mut v = option_header(option, proto::wire_u32(data.len(), "test option data")).to_vec();
        v.extend_from_slice(data);
        v
    }

    fn replies(mut b: &[u8]) -> Vec<(u32, u32, Vec<u8>)> {
        let mut out = vec![];
        while b.len() >= 20 {
            let h = OptionReplyHeader::decode(b[..20].try_into().unwrap()).unwrap();
            let data = b[20..20 + h.length as usize].to_vec();
            out.push((h.option, h.reply, data));
            b = &b[20 + h.length as usize..];
        }
        out
    }

    fn client_hello() -> Vec<u8> {
        (FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES)
            .to_be_bytes()
            .to_vec()
    }

    #[tokio::test]
    async fn info_and_go_report_the_same_export_and_flags() {
        let info = InfoRequest {
            name: "disk".into(),
            requests: vec![INFO_BLOCK_SIZE],
        }
        .encode();
        let mut c = client_hello();
        c.extend(opt(OPT_STRUCTURED_REPLY, &[]));
        c.extend(opt(OPT_INFO, &info));
        c.extend(opt(OPT_GO, &info));
        let (out, outcome) = run(c).await;
        let r = replies(&out);
        let infos = |opt_code| -> Vec<Vec<u8>> {
            r.iter()
                .filter(|(o, k, _)| *o == opt_code && *k == REP_INFO)
                .map(|(_, _, d)| d.clone())
                .collect()
        };
        assert!(!infos(OPT_INFO).is_empty());
        assert_eq!(infos(OPT_INFO), infos(OPT_GO));
        assert!(matches!(
            outcome,
            Ok(Outcome::Transmission { export: 0, .. })
        ));
    }

    #[tokio::test]
    async fn starttls_without_tls_is_an_error_reply_and_negotiation_goes_on() {
        let mut c = client_hello();
        c.extend(opt(OPT_STARTTLS, &[]));
        c.extend(opt(OPT_ABORT, &[]));
        let (out, outcome) = run(c).await;
        let r = replies(&out);
        assert_eq!(r[0].0, OPT_STARTTLS);
        assert_eq!(r[0].1, REP_ERR_POLICY);
        assert_eq!((r[1].0, r[1].1), (OPT_ABORT, REP_ACK));
        assert!(matches!(outcome, Ok(Outcome::Aborted)));
    }

    #[tokio::test]
    async fn forced_tls_answers_tls_reqd_until_starttls_is_acknowledged() {
        let go = InfoRequest {
            name: "disk".into(),
            requests: vec![],
        }
        .encode();
        let mut c = client_hello();
        c.extend(opt(OPT_LIST, &[]));
        c.extend(opt(OPT_GO, &go));
        c.extend(opt(OPT_STARTTLS, &[]));
        let (out, outcome) = run_with(TlsPhase::Offered { required: true }, c).await;
        let r = replies(&out);
        assert_eq!((r[0].0, r[0].1), (OPT_LIST, REP_ERR_TLS_REQD));
        assert_eq!((r[1].0, r[1].1), (OPT_GO, REP_ERR_TLS_REQD));
        assert_eq!((r[2].0, r[2].1), (OPT_STARTTLS, REP_ACK));
        assert_eq!(r.len(), 3);
        assert!(matches!(outcome, Ok(Outcome::StartTls(_))));
    }

    #[tokio::test]
    async fn forced_tls_ends_the_session_on_a_plaintext_export_name() {
        let mut c = client_hello();
        c.extend(opt(OPT_EXPORT_NAME, b"disk"));
        let (out, outcome) = run_with(TlsPhase::Offered { required: true }, c).await;
        assert!(out.is_empty());
        assert!(matches!(outcome, Err(HandshakeError::TlsRequired)));
    }

    #[tokio::test]
    async fn optional_tls_serves_plaintext_options() {
        let mut c = client_hello();
        c.extend(opt(OPT_STRUCTURED_REPLY, &[]));
        c.extend(opt(OPT_ABORT, &[]));
        let (out, outcome) = run_with(TlsPhase::Offered { required: false }, c).await;
        assert_eq!(replies(&out)[0].1, REP_ACK);
        assert!(matches!(outcome, Ok(Outcome::Aborted)));
    }

    #[tokio::test]
    async fn after_the_upgrade_options_work_and_a_second_starttls_is_invalid() {
        let (mut ours, mut theirs) = tokio::io::duplex(1 << 20);
        let ex = exports();
        let server = tokio::spawn(async move {
            let r = Resume { no_zeroes: true };
            resume(&mut theirs, &ex, r, &|| false).await
        });
        let mut c = opt(OPT_STARTTLS, &[]);
        c.extend(opt(OPT_ABORT, &[]));
        ours.write_all(&c).await.unwrap();
        let outcome = server.await.unwrap();
        let mut out = Vec::new();
        ours.read_to_end(&mut out).await.unwrap();
        let r = replies(&out);
        assert_eq!((r[0].0, r[0].1), (OPT_STARTTLS, REP_ERR_INVALID));
        assert!(matches!(outcome, Ok(Outcome::Aborted)));
    }

    #[tokio::test]
    async fn two_gib_option_is_refused_not_awaited() {
        let mut c = client_hello();
        c.extend_from_slice(&option_header(OPT_GO, 2 << 30));
        let (out, outcome) = run(c).await;
        assert_eq!(replies(&out)[0].1, REP_ERR_TOO_BIG);
        assert!(matches!(
            outcome,
            Err(HandshakeError::OptionTooLarge { .. })
        ));
    }

    #[tokio::test]
    async fn list_names_the_real_export_and_unknown_option_is_unsup() {
        let mut c = client_hello();
        c.extend(opt(OPT_LIST, &[]));
        c.extend(opt(77, b"xyz"));
        c.extend(opt(OPT_ABORT, &[]));
        let (out, _) = run(c).await;
        let r = replies(&out);
        assert_eq!(r[0].1, REP_SERVER);
        assert_eq!(&r[0].2[4..8], b"disk");
        assert_eq!(r[1].1, REP_ACK);
        assert_eq!((r[2].0, r[2].1), (77, REP_ERR_UNSUP));
    }

    #[tokio::test]
    async fn set_meta_context_selects_base_allocation_for_block_status() {
        let meta = MetaContextRequest {
            export: "disk".into(),
            queries: vec!["base:allocation".into(), "qemu:dirty-bitmap:x".into()],
        }
        .encode();
        let go = InfoRequest {
            name: "disk".into(),
            requests: vec![],
        }
        .encode();
        let mut c = client_hello();
        c.extend(opt(OPT_STRUCTURED_REPLY, &[]));
        c.extend(opt(OPT_SET_META_CONTEXT, &meta));
        c.extend(opt(OPT_GO, &go));
        let (out, outcome) = run(c).await;
        let r = replies(&out);
        let ctx: Vec<_> = r.iter().filter(|x| x.1 == REP_META_CONTEXT).collect();
        assert_eq!(ctx.len(), 1);
        assert_eq!(&ctx[0].2[4..], BASE_ALLOCATION.as_bytes());
        let Ok(Outcome::Transmission { negotiated, .. }) = outcome else {
            panic!("expected transmission")
        };
        assert_eq!(negotiated.base_allocation, Some(BASE_ALLOCATION_ID));
    }

    #[tokio::test]
    async fn unknown_export_in_go_is_err_unknown_and_export_name_disconnects() {
        let go = InfoRequest {
            name: "nope".into(),
            requests: vec![],
        }
        .encode();
        let mut c = client_hello();
        c.extend(opt(OPT_GO, &go));
        c.extend(opt(OPT_EXPORT_NAME, b"nope"));
        let (out, outcome) = run(c).await;
        assert_eq!(replies(&out)[0].1, REP_ERR_UNKNOWN);
        assert!(matches!(outcome, Err(HandshakeError::UnknownExport(_))));
    }

    #[tokio::test]
    async fn export_name_sends_zeroes_unless_no_zeroes_was_negotiated() {
        let mut c = FLAG_C_FIXED_NEWSTYLE.to_be_bytes().to_vec();
        c.extend(opt(OPT_EXPORT_NAME, b""));
        let (out, outcome) = run(c).await;
        assert_eq!(out.len(), 8 + 2 + 124);
        assert_eq!(&out[0..8], &(1u64 << 20).to_be_bytes());
        assert!(matches!(outcome, Ok(Outcome::Transmission { .. })));
    }

    #[tokio::test]
    async fn unknown_client_flags_end_the_session() {
        let (_, outcome) = run(0x80u32.to_be_bytes().to_vec()).await;
        assert!(matches!(outcome, Err(HandshakeError::ClientFlags(0x80))));
    }

    #[test]
    fn read_only_export_advertises_no_write_commands() {
        let caps = Capabilities {
            flush: true,
            multi_conn: true,
            ..Default::default()
        };
        let f = transmission_flags(&caps, true);
        assert_ne!(f & TF_READ_ONLY, 0);
        assert_eq!(f & (TF_SEND_TRIM | TF_SEND_WRITE_ZEROES | TF_SEND_FUA), 0);
        assert_ne!(f & TF_SEND_DF, 0);
    }
}
