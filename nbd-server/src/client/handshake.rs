//! The client side of fixed-newstyle negotiation.
//!
//! The order of options, and what each failure means:
//!
//! | step                          | on success                      | on an error reply                      |
//! |-------------------------------|---------------------------------|----------------------------------------|
//! | greeting, client flags        | `NO_ZEROES` if offered          | (no reply) oldstyle / not fixed: fatal |
//! | `OPT_STARTTLS` (TLS only)     | the caller upgrades the stream  | fatal: we never fall back to plaintext |
//! | `OPT_STRUCTURED_REPLY`        | structured replies on           | off, go on (`TLS_REQD`/`SHUTDOWN` fatal) |
//! | `OPT_SET_META_CONTEXT`        | remember `base:allocation` id   | no block status, go on (same exceptions) |
//! | `OPT_GO` + `INFO_BLOCK_SIZE`  | size, flags, block sizes        | `ERR_UNSUP`: fall back; others fatal   |
//! | `OPT_EXPORT_NAME` (fallback)  | size, flags (+124 zero bytes)   | the server just closes: fatal          |
//!
//! Every length the server sends is checked against [`MAX_OPTION_REPLY`]
//! before anything is allocated for it. The caller bounds the whole
//! exchange with a timeout.

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::error::{ClientError, reply_name};
use crate::proto::{
    self, BASE_ALLOCATION, BlockSizes, FLAG_C_FIXED_NEWSTYLE, FLAG_C_NO_ZEROES,
    FLAG_FIXED_NEWSTYLE, FLAG_NO_ZEROES, IHAVEOPT, INFO_BLOCK_SIZE, Info, InfoRequest, MAX_STRING,
    MAX_STRING_U32, MetaContextRequest, NBDMAGIC, OPT_EXPORT_NAME, OPT_GO, OPT_SET_META_CONTEXT,
    OPT_STARTTLS, OPT_STRUCTURED_REPLY, OptionReplyHeader, REP_ACK, REP_ERR_BIT, REP_ERR_SHUTDOWN,
    REP_ERR_TLS_REQD, REP_ERR_UNSUP, REP_INFO, REP_META_CONTEXT, TF_HAS_FLAGS,
};

/// Largest option reply payload we accept: the longest legal one is a
/// 4096-byte string plus a few bytes of fixed fields (`REP_INFO` name or
/// description, `REP_META_CONTEXT`, an error message).
pub(crate) const MAX_OPTION_REPLY: u32 = MAX_STRING_U32 + 64;

/// The magic an oldstyle server sends where newstyle servers send
/// `IHAVEOPT`.
const OLDSTYLE_MAGIC: u64 = 0x0000_4202_8186_1253;

/// What negotiation settled, for the life of the connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Negotiated {
    pub size: u64,
    /// Transmission flags; zero if the server did not set `HAS_FLAGS`.
    pub flags: u16,
    pub block_sizes: BlockSizes,
    pub structured: bool,
    /// The id of `base:allocation`, if the server selected it.
    pub allocation: Option<u32>,
}

/// Negotiate `export` on a freshly connected stream.
pub(crate) async fn negotiate<S>(s: &mut S, export: &str) -> Result<Negotiated, ClientError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    check_export(export)?;
    let no_zeroes = greet(s).await?;
    options(s, export, no_zeroes).await
}

fn check_export(export: &str) -> Result<(), ClientError> {
    if export.len() > MAX_STRING {
        return Err(ClientError::InvalidArgument(format!(
            "export name is {} bytes; the protocol allows {MAX_STRING}",
            export.len()
        )));
    }
    Ok(())
}

/// The first half of a TLS session: greeting and `NBD_OPT_STARTTLS`. On
/// success the caller runs the TLS handshake, then [`options`] over it.
/// Returns whether `NO_ZEROES` was agreed.
pub(crate) async fn start_tls<S>(s: &mut S, export: &str) -> Result<bool, ClientError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    check_export(export)?;
    let no_zeroes = greet(s).await?;
    send_option(s, OPT_STARTTLS, &[]).await?;
    let (reply, data) = read_reply(s, OPT_STARTTLS).await?;
    match reply {
        REP_ACK => Ok(no_zeroes),
        r if r & REP_ERR_BIT != 0 => Err(ClientError::TlsRefused {
            reply: reply_name(r),
            message: String::from_utf8_lossy(&data).into_owned(),
        }),
        r => Err(unexpected(OPT_STARTTLS, r)),
    }
}

/// Greeting and client flags; returns whether `NO_ZEROES` was agreed.
async fn greet<S>(s: &mut S) -> Result<bool, ClientError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let io = ClientError::io("handshake");

    let mut greeting = [0u8; 18];
    s.read_exact(&mut greeting).await.map_err(io)?;
    let magic = proto::be_u64(&greeting[0..8]);
    if magic != NBDMAGIC {
        return Err(ClientError::Protocol(format!(
            "not an NBD server: greeting starts with {magic:#018x}"
        )));
    }
    match proto::be_u64(&greeting[8..16]) {
        IHAVEOPT => {}
        OLDSTYLE_MAGIC => {
            return Err(ClientError::Protocol(
                "server uses oldstyle negotiation, which is not supported".into(),
            ));
        }
        other => {
            return Err(ClientError::Protocol(format!(
                "unknown negotiation magic {other:#018x}"
            )));
        }
    }
    let server_flags = proto::be_u16(&greeting[16..18]);
    if server_flags & FLAG_FIXED_NEWSTYLE == 0 {
        return Err(ClientError::Protocol(
            "server does not offer fixed newstyle negotiation".into(),
        ));
    }
    let no_zeroes = server_flags & FLAG_NO_ZEROES != 0;
    let mut client_flags = FLAG_C_FIXED_NEWSTYLE;
    if no_zeroes {
        client_flags |= FLAG_C_NO_ZEROES;
    }
    s.write_all(&client_flags.to_be_bytes())
        .await
        .map_err(ClientError::io("handshake"))?;
    Ok(no_zeroes)
}

/// The options, from structured replies to `GO` (or `EXPORT_NAME`).
pub(crate) async fn options<S>(
    s: &mut S,
    export: &str,
    no_zeroes: bool,
) -> Result<Negotiated, ClientError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let structured = structured_replies(s).await?;
    let allocation = if structured {
        meta_context(s, export).await?
    } else {
        // Block status needs structured replies; do not even ask.
        None
    };

    let (size, flags, block_sizes) = match go(s, export).await? {
        Some(v) => v,
        None => {
            let (size, flags) = export_name(s, export, no_zeroes).await?;
            (size, flags, BlockSizes::default())
        }
    };
    let flags = if flags & TF_HAS_FLAGS != 0 { flags } else { 0 };
    Ok(Negotiated {
        size,
        flags,
        block_sizes,
        structured,
        allocation,
    })
}

async fn send_option<S>(s: &mut S, option: u32, data: &[u8]) -> Result<(), ClientError>
where
    S: AsyncWrite + Unpin,
{
    let mut msg = Vec::with_capacity(16 + data.len());
    // Option data: an export name checked against MAX_STRING, fixed queries.
    let len = proto::wire_u32(data.len(), "option data");
    msg.extend_from_slice(&proto::option_header(option, len));
    msg.extend_from_slice(data);
    s.write_all(&msg)
        .await
        .map_err(ClientError::io("handshake"))?;
    s.flush().await.map_err(ClientError::io("handshake"))
}

/// Read one option reply to `option`, refusing oversized payloads.
async fn read_reply<S>(s: &mut S, option: u32) -> Result<(u32, Vec<u8>), ClientError>
where
    S: AsyncRead + Unpin,
{
    let mut h = [0u8; 20];
    s.read_exact(&mut h)
        .await
        .map_err(ClientError::io("handshake"))?;
    let hdr = OptionReplyHeader::decode(&h).ok_or_else(|| {
        ClientError::Protocol(format!(
            "bad option reply magic {:#018x}",
            proto::be_u64(&h[0..8])
        ))
    })?;
    if hdr.option != option {
        return Err(ClientError::Protocol(format!(
            "reply to option {} ({}) while NBD_OPT_{} was pending",
            hdr.option,
            proto::option_name(hdr.option),
            proto::option_name(option)
        )));
    }
    if hdr.length > MAX_OPTION_REPLY {
        return Err(ClientError::Protocol(format!(
            "{} to NBD_OPT_{} carries {} bytes, more than the {MAX_OPTION_REPLY} we accept",
            reply_name(hdr.reply),
            proto::option_name(option),
            hdr.length
        )));
    }
    let mut data = vec![0u8; hdr.length as usize];
    s.read_exact(&mut data)
        .await
        .map_err(ClientError::io("handshake"))?;
    Ok((hdr.reply, data))
}

fn refused(option: u32, reply: u32, data: &[u8]) -> ClientError {
    if reply == REP_ERR_TLS_REQD {
        return ClientError::TlsRequired {
            message: String::from_utf8_lossy(data).into_owned(),
        };
    }
    ClientError::OptionRefused {
        option: proto::option_name(option),
        reply: reply_name(reply),
        code: reply,
        message: String::from_utf8_lossy(data).into_owned(),
    }
}

fn unexpected(option: u32, reply: u32) -> ClientError {
    ClientError::Protocol(format!(
        "unexpected {} ({reply:#x}) in reply to NBD_OPT_{}",
        reply_name(reply),
        proto::option_name(option)
    ))
}

/// An error reply to an optional feature: these two end negotiation,
/// anything else only means "not available here".
fn is_fatal_refusal(reply: u32) -> bool {
    matches!(reply, REP_ERR_TLS_REQD | REP_ERR_SHUTDOWN)
}

async fn structured_replies<S>(s: &mut S) -> Result<bool, ClientError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    send_option(s, OPT_STRUCTURED_REPLY, &[]).await?;
    let (reply, data) = read_reply(s, OPT_STRUCTURED_REPLY).await?;
    match reply {
        REP_ACK => Ok(true),
        r if r & REP_ERR_BIT != 0 && is_fatal_refusal(r) => {
            Err(refused(OPT_STRUCTURED_REPLY, r, &data))
        }
        r if r & REP_ERR_BIT != 0 => {
            tracing::debug!(reply = reply_name(r), "server refused structured replies");
            Ok(false)
        }
        r => Err(unexpected(OPT_STRUCTURED_REPLY, r)),
    }
}

async fn meta_context<S>(s: &mut S, export: &str) -> Result<Option<u32>, ClientError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let req = MetaContextRequest {
        export: export.to_string(),
        queries: vec![BASE_ALLOCATION.to_string()],
    };
    send_option(s, OPT_SET_META_CONTEXT, &req.encode()).await?;
    let mut id = None;
    loop {
        let (reply, data) = read_reply(s, OPT_SET_META_CONTEXT).await?;
        match reply {
            REP_META_CONTEXT => {
                if data.len() < 4 {
                    return Err(ClientError::Protocol(format!(
                        "NBD_REP_META_CONTEXT of {} bytes is too short",
                        data.len()
                    )));
                }
                let name = &data[4..];
                if name != BASE_ALLOCATION.as_bytes() {
                    return Err(ClientError::Protocol(format!(
                        "server selected meta context {:?}, which we did not ask for",
                        String::from_utf8_lossy(name)
                    )));
                }
                if id.is_some() {
                    return Err(ClientError::Protocol(
                        "server selected base:allocation twice".into(),
                    ));
                }
                id = Some(proto::be_u32(&data[0..4]));
            }
            REP_ACK => return Ok(id),
            r if r & REP_ERR_BIT != 0 && is_fatal_refusal(r) => {
                return Err(refused(OPT_SET_META_CONTEXT, r, &data));
            }
            r if r & REP_ERR_BIT != 0 => {
                tracing::debug!(reply = reply_name(r), "server refused base:allocation");
                return Ok(None);
            }
            r => return Err(unexpected(OPT_SET_META_CONTEXT, r)),
        }
    }
}

/// `OPT_GO`: `Some((size, flags, block sizes))`, or `None` if the server
/// does not know the option and `OPT_EXPORT_NAME` must be used instead.
async fn go<S>(s: &mut S, export: &str) -> Result<Option<(u64, u16, BlockSizes)>, ClientError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let req = InfoRequest {
        name: export.to_string(),
        requests: vec![INFO_BLOCK_SIZE],
    };
    send_option(s, OPT_GO, &req.encode()).await?;
    let mut export_info = None;
    let mut block_sizes = BlockSizes::default();
    loop {
        let (reply, data) = read_reply(s, OPT_GO).await?;
        match reply {
            REP_INFO => match Info::decode(&data) {
                Ok(Info::Export { size, flags }) => export_info = Some((size, flags)),
                Ok(Info::BlockSize(b)) => block_sizes = check_block_sizes(b)?,
                // Names, descriptions and info types we do not know.
                Ok(_) => {}
                Err(e) => {
                    return Err(ClientError::Protocol(format!(
                        "malformed NBD_REP_INFO: {e}"
                    )));
                }
            },
            REP_ACK => {
                let (size, flags) = export_info.ok_or_else(|| {
                    ClientError::Protocol("NBD_OPT_GO acknowledged without NBD_INFO_EXPORT".into())
                })?;
                return Ok(Some((size, flags, block_sizes)));
            }
            REP_ERR_UNSUP => return Ok(None),
            r if r & REP_ERR_BIT != 0 => return Err(refused(OPT_GO, r, &data)),
            r => return Err(unexpected(OPT_GO, r)),
        }
    }
}

/// The minimum must be a power of two no larger than 64 KiB and the maximum
/// at least the minimum; the preferred size is only a hint and is not
/// checked. Nothing else in these values can hurt us.
fn check_block_sizes(b: BlockSizes) -> Result<BlockSizes, ClientError> {
    if !b.minimum.is_power_of_two() || b.minimum > 65536 || b.maximum < b.minimum {
        return Err(ClientError::Protocol(format!(
            "invalid block sizes: minimum {}, preferred {}, maximum {}",
            b.minimum, b.preferred, b.maximum
        )));
    }
    Ok(b)
}

async fn export_name<S>(s: &mut S, export: &str, no_zeroes: bool) -> Result<(u64, u16), ClientError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    send_option(s, OPT_EXPORT_NAME, export.as_bytes()).await?;
    let mut buf = [0u8; 10 + 124];
    let len = if no_zeroes { 10 } else { buf.len() };
    match s.read_exact(&mut buf[..len]).await {
        Ok(_) => Ok((proto::be_u64(&buf[0..8]), proto::be_u16(&buf[8..10]))),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
            Err(ClientError::ExportRefused {
                export: export.to_string(),
            })
        }
        Err(e) => Err(ClientError::Io {
            during: "handshake",
            source: e,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::{Info, REP_ERR_UNKNOWN, TF_READ_ONLY, TF_SEND_FLUSH, option_reply_header};
    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream, duplex};

    /// A scripted server: reads each option the client sends and answers
    /// with the replies the test gives for it.
    async fn read_option(s: &mut DuplexStream) -> (u32, Vec<u8>) {
        let mut h = [0u8; 16];
        s.read_exact(&mut h).await.unwrap();
        assert_eq!(proto::be_u64(&h[0..8]), IHAVEOPT);
        let opt = proto::be_u32(&h[8..12]);
        let mut data = vec![0; proto::be_u32(&h[12..16]) as usize];
        s.read_exact(&mut data).await.unwrap();
        (opt, data)
    }

    async fn reply(s: &mut DuplexStream, opt: u32, rep: u32, data: &[u8]) {
        s.write_all(&option_reply_header(
            opt,
            rep,
            proto::wire_u32(data.len(), "a test reply"),
        ))
        .await
        .unwrap();
        s.write_all(data).await.unwrap();
    }

    async fn greet(s: &mut DuplexStream, flags: u16) -> u32 {
        s.write_all(&NBDMAGIC.to_be_bytes()).await.unwrap();
        s.write_all(&IHAVEOPT.to_be_bytes()).await.unwrap();
        s.write_all(&flags.to_be_bytes()).await.unwrap();
        s.read_u32().await.unwrap()
    }

    #[tokio::test]
    async fn full_negotiation_collects_size_flags_block_sizes_and_context() {
        let (mut c, mut s) = duplex(1 << 16);
        let server = tokio::spawn(async move {
            let cflags = greet(&mut s, FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).await;
            assert_eq!(cflags, FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES);
            let (opt, _) = read_option(&mut s).await;
            assert_eq!(opt, OPT_STRUCTURED_REPLY);
            reply(&mut s, opt, REP_ACK, &[]).await;
            let (opt, data) = read_option(&mut s).await;
            assert_eq!(opt, OPT_SET_META_CONTEXT);
            let req = MetaContextRequest::decode(&data).unwrap();
            assert_eq!(req.export, "disk");
            let mut ctx = 7u32.to_be_bytes().to_vec();
            ctx.extend_from_slice(BASE_ALLOCATION.as_bytes());
            reply(&mut s, opt, REP_META_CONTEXT, &ctx).await;
            reply(&mut s, opt, REP_ACK, &[]).await;
            let (opt, data) = read_option(&mut s).await;
            assert_eq!(opt, OPT_GO);
            assert_eq!(
                InfoRequest::decode(&data).unwrap().requests,
                vec![INFO_BLOCK_SIZE]
            );
            let flags = TF_HAS_FLAGS | TF_READ_ONLY | TF_SEND_FLUSH;
            let bs = BlockSizes {
                minimum: 512,
                preferred: 4096,
                maximum: 1 << 20,
            };
            reply(&mut s, opt, REP_INFO, &Info::BlockSize(bs).encode()).await;
            reply(&mut s, opt, REP_INFO, &Info::Unknown(99).encode()).await;
            let export = Info::Export {
                size: 1 << 30,
                flags,
            };
            reply(&mut s, opt, REP_INFO, &export.encode()).await;
            reply(&mut s, opt, REP_ACK, &[]).await;
        });
        let n = negotiate(&mut c, "disk").await.unwrap();
        server.await.unwrap();
        assert_eq!(
            n,
            Negotiated {
                size: 1 << 30,
                flags: TF_HAS_FLAGS | TF_READ_ONLY | TF_SEND_FLUSH,
                block_sizes: BlockSizes {
                    minimum: 512,
                    preferred: 4096,
                    maximum: 1 << 20
                },
                structured: true,
                allocation: Some(7),
            }
        );
    }

    #[tokio::test]
    async fn go_unsupported_falls_back_to_export_name_with_zero_padding() {
        let (mut c, mut s) = duplex(1 << 16);
        let server = tokio::spawn(async move {
            assert_eq!(
                greet(&mut s, FLAG_FIXED_NEWSTYLE).await,
                FLAG_C_FIXED_NEWSTYLE
            );
            let (opt, _) = read_option(&mut s).await;
            reply(&mut s, opt, REP_ERR_UNSUP, &[]).await;
            let (opt, _) = read_option(&mut s).await;
            assert_eq!(opt, OPT_GO);
            reply(&mut s, opt, REP_ERR_UNSUP, b"no GO here").await;
            let (opt, name) = read_option(&mut s).await;
            assert_eq!((opt, name.as_slice()), (OPT_EXPORT_NAME, &b"x"[..]));
            s.write_all(&4096u64.to_be_bytes()).await.unwrap();
            s.write_all(&TF_HAS_FLAGS.to_be_bytes()).await.unwrap();
            s.write_all(&[0u8; 124]).await.unwrap();
            s
        });
        let n = negotiate(&mut c, "x").await.unwrap();
        let _s = server.await.unwrap();
        assert_eq!(n.size, 4096);
        assert_eq!(n.flags, TF_HAS_FLAGS);
        assert!(!n.structured);
        assert_eq!(n.allocation, None);
    }

    #[tokio::test]
    async fn unknown_export_error_carries_the_server_message() {
        let (mut c, mut s) = duplex(1 << 16);
        tokio::spawn(async move {
            greet(&mut s, FLAG_FIXED_NEWSTYLE).await;
            let (opt, _) = read_option(&mut s).await;
            reply(&mut s, opt, REP_ERR_UNSUP, &[]).await;
            let (opt, _) = read_option(&mut s).await;
            reply(&mut s, opt, REP_ERR_UNKNOWN, b"export 'nope' not found").await;
            s
        });
        match negotiate(&mut c, "nope").await {
            Err(ClientError::OptionRefused {
                option: "GO",
                code: REP_ERR_UNKNOWN,
                message,
                ..
            }) => assert_eq!(message, "export 'nope' not found"),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[tokio::test]
    async fn oversized_option_reply_is_refused_before_allocating() {
        let (mut c, mut s) = duplex(1 << 16);
        tokio::spawn(async move {
            greet(&mut s, FLAG_FIXED_NEWSTYLE).await;
            let (opt, _) = read_option(&mut s).await;
            s.write_all(&option_reply_header(opt, REP_ERR_UNSUP, u32::MAX))
                .await
                .unwrap();
            s
        });
        match negotiate(&mut c, "").await {
            Err(ClientError::Protocol(m)) => assert!(m.contains("4294967295"), "{m}"),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[tokio::test]
    async fn oldstyle_server_is_refused_clearly() {
        let (mut c, mut s) = duplex(1 << 16);
        tokio::spawn(async move {
            s.write_all(&NBDMAGIC.to_be_bytes()).await.unwrap();
            s.write_all(&OLDSTYLE_MAGIC.to_be_bytes()).await.unwrap();
            s.write_all(&[0, 0]).await.unwrap();
            s
        });
        match negotiate(&mut c, "").await {
            Err(ClientError::Protocol(m)) => assert!(m.contains("oldstyle"), "{m}"),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[tokio::test]
    async fn go_ack_without_export_info_is_a_protocol_violation() {
        let (mut c, mut s) = duplex(1 << 16);
        tokio::spawn(async move {
            greet(&mut s, FLAG_FIXED_NEWSTYLE).await;
            let (opt, _) = read_option(&mut s).await;
            reply(&mut s, opt, REP_ERR_UNSUP, &[]).await;
            let (opt, _) = read_option(&mut s).await;
            reply(&mut s, opt, REP_ACK, &[]).await;
            s
        });
        assert!(matches!(
            negotiate(&mut c, "").await,
            Err(ClientError::Protocol(_))
        ));
    }
}
