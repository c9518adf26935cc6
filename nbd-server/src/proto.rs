//! Wire constants and fixed-size headers of the NBD protocol.
//!
//! Everything here is a pure function of bytes: no I/O, no state. The
//! reference is the NBD spec (NetworkBlockDevice/nbd, `doc/proto.md`);
//! names follow it without the `NBD_` prefix. Server and client both encode
//! and decode through this module, and the fuzz targets drive it directly.

use std::fmt;

/// `NBDMAGIC`, first 8 bytes the server sends.
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`, the newstyle magic and the magic of every client option.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Magic of every option reply in fixed newstyle negotiation.
pub const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;
/// Extended headers (experimental); we never negotiate them, but a request
/// with this magic is recognised so it can be reported as such.
pub const EXTENDED_REQUEST_MAGIC: u32 = 0x21e4_1c71;

// Handshake flags (server, 16 bits).
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
// Client flags (32 bits).
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

// Transmission flags (16 bits).
pub const TF_HAS_FLAGS: u16 = 1 << 0;
pub const TF_READ_ONLY: u16 = 1 << 1;
pub const TF_SEND_FLUSH: u16 = 1 << 2;
pub const TF_SEND_FUA: u16 = 1 << 3;
pub const TF_ROTATIONAL: u16 = 1 << 4;
pub const TF_SEND_TRIM: u16 = 1 << 5;
pub const TF_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub const TF_SEND_DF: u16 = 1 << 7;
pub const TF_CAN_MULTI_CONN: u16 = 1 << 8;
pub const TF_SEND_CACHE: u16 = 1 << 10;
pub const TF_SEND_FAST_ZERO: u16 = 1 << 11;

// Options.
pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_STARTTLS: u32 = 5;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;
pub const OPT_LIST_META_CONTEXT: u32 = 9;
pub const OPT_SET_META_CONTEXT: u32 = 10;
pub const OPT_EXTENDED_HEADERS: u32 = 11;

// Option reply types.
pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_META_CONTEXT: u32 = 4;
pub const REP_ERR_BIT: u32 = 1 << 31;
pub const REP_ERR_UNSUP: u32 = REP_ERR_BIT + 1;
pub const REP_ERR_POLICY: u32 = REP_ERR_BIT + 2;
pub const REP_ERR_INVALID: u32 = REP_ERR_BIT + 3;
pub const REP_ERR_PLATFORM: u32 = REP_ERR_BIT + 4;
pub const REP_ERR_TLS_REQD: u32 = REP_ERR_BIT + 5;
pub const REP_ERR_UNKNOWN: u32 = REP_ERR_BIT + 6;
pub const REP_ERR_SHUTDOWN: u32 = REP_ERR_BIT + 7;
pub const REP_ERR_BLOCK_SIZE_REQD: u32 = REP_ERR_BIT + 8;
pub const REP_ERR_TOO_BIG: u32 = REP_ERR_BIT + 9;

// NBD_INFO types.
pub const INFO_EXPORT: u16 = 0;
pub const INFO_NAME: u16 = 1;
pub const INFO_DESCRIPTION: u16 = 2;
pub const INFO_BLOCK_SIZE: u16 = 3;

// Commands.
pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_CACHE: u16 = 5;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const CMD_BLOCK_STATUS: u16 = 7;

// Command flags.
pub const CMD_FLAG_FUA: u16 = 1 << 0;
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
pub const CMD_FLAG_DF: u16 = 1 << 2;
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
pub const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;

// Structured reply flags and types.
pub const REPLY_FLAG_DONE: u16 = 1 << 0;
pub const REPLY_TYPE_NONE: u16 = 0;
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
pub const REPLY_TYPE_ERROR_BIT: u16 = 1 << 15;
pub const REPLY_TYPE_ERROR: u16 = REPLY_TYPE_ERROR_BIT + 1;
pub const REPLY_TYPE_ERROR_OFFSET: u16 = REPLY_TYPE_ERROR_BIT + 2;

// `base:allocation` state flags.
pub const STATE_HOLE: u32 = 1 << 0;
pub const STATE_ZERO: u32 = 1 << 1;

/// The one metadata context we implement.
pub const BASE_ALLOCATION: &str = "base:allocation";

/// Longest string the spec allows (export names, messages, queries).
pub const MAX_STRING: usize = MAX_STRING_U32 as usize;
/// [`MAX_STRING`] as the wire's u32, for limits computed from it.
pub const MAX_STRING_U32: u32 = 4096;
/// The payload limit the spec says no one should treat as denial of
/// service; we advertise it as our maximum payload.
pub const MAX_PAYLOAD: u32 = block_device::MAX_PAYLOAD;

/// Size of a request header on the wire.
pub const REQUEST_LEN: usize = 28;
/// Size of a simple reply header.
pub const SIMPLE_REPLY_LEN: usize = 16;
/// Size of a structured reply chunk header.
pub const CHUNK_HEADER_LEN: usize = 20;

/// The error numbers the spec allows on the wire, and nothing else.
///
/// Any other errno a backend produces is mapped onto one of these by
/// [`Errno::from_io`], so a client never sees a value outside the list.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Errno {
    Perm,
    Io,
    NoMem,
    Inval,
    NoSpc,
    Overflow,
    NotSup,
    Shutdown,
}

impl Errno {
    pub const fn code(self) -> u32 {
        match self {
            Errno::Perm => 1,
            Errno::Io => 5,
            Errno::NoMem => 12,
            Errno::Inval => 22,
            Errno::NoSpc => 28,
            Errno::Overflow => 75,
            Errno::NotSup => 95,
            Errno::Shutdown => 108,
        }
    }

    /// Decode a wire value. The spec says an unexpected value is to be
    /// treated as `EINVAL`.
    pub const fn from_code(code: u32) -> Errno {
        match code {
            1 => Errno::Perm,
            5 => Errno::Io,
            12 => Errno::NoMem,
            22 => Errno::Inval,
            28 => Errno::NoSpc,
            75 => Errno::Overflow,
            95 => Errno::NotSup,
            108 => Errno::Shutdown,
            _ => Errno::Inval,
        }
    }

    /// The local errno of the same meaning (for `io::Error::from_raw_os_error`).
    pub const fn to_os(self) -> i32 {
        match self {
            Errno::Perm => libc::EPERM,
            Errno::Io => libc::EIO,
            Errno::NoMem => libc::ENOMEM,
            Errno::Inval => libc::EINVAL,
            Errno::NoSpc => libc::ENOSPC,
            Errno::Overflow => libc::EOVERFLOW,
            Errno::NotSup => libc::ENOTSUP,
            Errno::Shutdown => libc::ESHUTDOWN,
        }
    }

    /// Map a backend's `io::Error` onto the allowed set. `EDQUOT` and
    /// `EFBIG` are `ENOSPC` as the spec asks; `EROFS`/`EACCES` are `EPERM`;
    /// anything unknown is `EIO`.
    pub fn from_io(err: &std::io::Error) -> Errno {
        match crate::device::errno_of(err) {
            libc::EPERM | libc::EACCES | libc::EROFS => Errno::Perm,
            libc::ENOMEM => Errno::NoMem,
            libc::EINVAL => Errno::Inval,
            libc::ENOSPC | libc::EDQUOT | libc::EFBIG => Errno::NoSpc,
            libc::EOVERFLOW => Errno::Overflow,
            libc::EOPNOTSUPP => Errno::NotSup,
            libc::ESHUTDOWN => Errno::Shutdown,
            _ => Errno::Io,
        }
    }

    pub fn to_io(self) -> std::io::Error {
        std::io::Error::from_raw_os_error(self.to_os())
    }
}

impl fmt::Display for Errno {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match self {
            Errno::Perm => "EPERM",
            Errno::Io => "EIO",
            Errno::NoMem => "ENOMEM",
            Errno::Inval => "EINVAL",
            Errno::NoSpc => "ENOSPC",
            Errno::Overflow => "EOVERFLOW",
            Errno::NotSup => "ENOTSUP",
            Errno::Shutdown => "ESHUTDOWN",
        };
        f.write_str(name)
    }
}

/// Human name of an option, for logs and error messages.
pub fn option_name(opt: u32) -> &'static str {
    match opt {
        OPT_EXPORT_NAME => "EXPORT_NAME",
        OPT_ABORT => "ABORT",
        OPT_LIST => "LIST",
        OPT_STARTTLS => "STARTTLS",
        OPT_INFO => "INFO",
        OPT_GO => "GO",
        OPT_STRUCTURED_REPLY => "STRUCTURED_REPLY",
        OPT_LIST_META_CONTEXT => "LIST_META_CONTEXT",
        OPT_SET_META_CONTEXT => "SET_META_CONTEXT",
        OPT_EXTENDED_HEADERS => "EXTENDED_HEADERS",
        _ => "unknown",
    }
}

/// Human name of a command.
pub fn command_name(cmd: u16) -> &'static str {
    match cmd {
        CMD_READ => "READ",
        CMD_WRITE => "WRITE",
        CMD_DISC => "DISC",
        CMD_FLUSH => "FLUSH",
        CMD_TRIM => "TRIM",
        CMD_CACHE => "CACHE",
        CMD_WRITE_ZEROES => "WRITE_ZEROES",
        CMD_BLOCK_STATUS => "BLOCK_STATUS",
        _ => "unknown",
    }
}

/// A transmission-phase request header (28 bytes, big endian).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RequestHeader {
    pub flags: u16,
    pub command: u16,
    pub cookie: u64,
    pub offset: u64,
    pub length: u32,
}

/// The first four bytes of a request were not `NBD_REQUEST_MAGIC`: the
/// stream cannot be resynchronised and the connection must end.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("bad request magic {0:#010x}")]
pub struct BadMagic(pub u32);

impl RequestHeader {
    pub fn decode(buf: &[u8; REQUEST_LEN]) -> Result<Self, BadMagic> {
        let magic = be_u32(&buf[0..4]);
        if magic != REQUEST_MAGIC {
            return Err(BadMagic(magic));
        }
        Ok(RequestHeader {
            flags: be_u16(&buf[4..6]),
            command: be_u16(&buf[6..8]),
            cookie: be_u64(&buf[8..16]),
            offset: be_u64(&buf[16..24]),
            length: be_u32(&buf[24..28]),
        })
    }

    pub fn encode(&self) -> [u8; REQUEST_LEN] {
        let mut b = [0u8; REQUEST_LEN];
        b[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        b[4..6].copy_from_slice(&self.flags.to_be_bytes());
        b[6..8].copy_from_slice(&self.command.to_be_bytes());
        b[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        b[16..24].copy_from_slice(&self.offset.to_be_bytes());
        b[24..28].copy_from_slice(&self.length.to_be_bytes());
        b
    }
}

/// Header of a simple reply.
pub fn simple_reply_header(error: u32, cookie: u64) -> [u8; SIMPLE_REPLY_LEN] {
    let mut b = [0u8; SIMPLE_REPLY_LEN];
    b[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    b[4..8].copy_from_slice(&error.to_be_bytes());
    b[8..16].copy_from_slice(&cookie.to_be_bytes());
    b
}

/// Header of one structured reply chunk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChunkHeader {
    pub flags: u16,
    pub kind: u16,
    pub cookie: u64,
    pub length: u32,
}

impl ChunkHeader {
    pub fn encode(&self) -> [u8; CHUNK_HEADER_LEN] {
        let mut b = [0u8; CHUNK_HEADER_LEN];
        b[0..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
        b[4..6].copy_from_slice(&self.flags.to_be_bytes());
        b[6..8].copy_from_slice(&self.kind.to_be_bytes());
        b[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        b[16..20].copy_from_slice(&self.length.to_be_bytes());
        b
    }

    /// Decode the 16 bytes that follow the structured reply magic.
    pub fn decode_after_magic(buf: &[u8; 16]) -> Self {
        ChunkHeader {
            flags: be_u16(&buf[0..2]),
            kind: be_u16(&buf[2..4]),
            cookie: be_u64(&buf[4..12]),
            length: be_u32(&buf[12..16]),
        }
    }

    pub fn is_done(&self) -> bool {
        self.flags & REPLY_FLAG_DONE != 0
    }
}

/// Header of a client option (16 bytes).
pub fn option_header(option: u32, length: u32) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[0..8].copy_from_slice(&IHAVEOPT.to_be_bytes());
    b[8..12].copy_from_slice(&option.to_be_bytes());
    b[12..16].copy_from_slice(&length.to_be_bytes());
    b
}

/// Header of a server option reply (20 bytes).
pub fn option_reply_header(option: u32, reply: u32, length: u32) -> [u8; 20] {
    let mut b = [0u8; 20];
    b[0..8].copy_from_slice(&OPT_REPLY_MAGIC.to_be_bytes());
    b[8..12].copy_from_slice(&option.to_be_bytes());
    b[12..16].copy_from_slice(&reply.to_be_bytes());
    b[16..20].copy_from_slice(&length.to_be_bytes());
    b
}

/// A decoded option reply header (the client side of [`option_reply_header`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OptionReplyHeader {
    pub option: u32,
    pub reply: u32,
    pub length: u32,
}

impl OptionReplyHeader {
    pub fn decode(buf: &[u8; 20]) -> Option<Self> {
        if be_u64(&buf[0..8]) != OPT_REPLY_MAGIC {
            return None;
        }
        Some(OptionReplyHeader {
            option: be_u32(&buf[8..12]),
            reply: be_u32(&buf[12..16]),
            length: be_u32(&buf[16..20]),
        })
    }
}

/// The payload of `NBD_OPT_INFO`/`NBD_OPT_GO`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InfoRequest {
    pub name: String,
    pub requests: Vec<u16>,
}

/// The payload of `NBD_OPT_{LIST,SET}_META_CONTEXT`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MetaContextRequest {
    pub export: String,
    pub queries: Vec<String>,
}

/// Why an option payload could not be parsed; answered with
/// `NBD_REP_ERR_INVALID` (or `TOO_BIG` for oversized strings).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum OptionParseError {
    #[error("option data is truncated or has trailing bytes")]
    Length,
    #[error("string is longer than the protocol's 4096-byte limit")]
    StringTooLong,
    #[error("string is not valid UTF-8 or contains NUL")]
    BadString,
}

/// A cursor over an option payload that refuses to read past its end.
struct Cursor<'a> {
    buf: &'a [u8],
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], OptionParseError> {
        if self.buf.len() < n {
            return Err(OptionParseError::Length);
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }
    fn u16(&mut self) -> Result<u16, OptionParseError> {
        Ok(be_u16(self.take(2)?))
    }
    fn u32(&mut self) -> Result<u32, OptionParseError> {
        Ok(be_u32(self.take(4)?))
    }
    fn string(&mut self, len: u32) -> Result<String, OptionParseError> {
        let len = len as usize;
        if len > MAX_STRING {
            return Err(OptionParseError::StringTooLong);
        }
        parse_string(self.take(len)?)
    }
    fn end(&self) -> Result<(), OptionParseError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(OptionParseError::Length)
        }
    }
}

/// A protocol string: UTF-8 without NUL.
pub fn parse_string(bytes: &[u8]) -> Result<String, OptionParseError> {
    if bytes.contains(&0) {
        return Err(OptionParseError::BadString);
    }
    String::from_utf8(bytes.to_vec()).map_err(|_| OptionParseError::BadString)
}

impl InfoRequest {
    pub fn decode(data: &[u8]) -> Result<Self, OptionParseError> {
        let mut c = Cursor { buf: data };
        let name_len = c.u32()?;
        let name = c.string(name_len)?;
        let n = c.u16()?;
        let mut requests = Vec::with_capacity(n as usize);
        for _ in 0..n {
            requests.push(c.u16()?);
        }
        c.end()?;
        Ok(InfoRequest { name, requests })
    }

    /// The client checks the name against [`MAX_STRING`] before it
    /// builds a request; it asks for a few info types.
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(6 + self.name.len() + 2 * self.requests.len());
        v.extend_from_slice(&wire_u32(self.name.len(), "an export name").to_be_bytes());
        v.extend_from_slice(self.name.as_bytes());
        let n = u16::try_from(self.requests.len()).expect("a few info types");
        v.extend_from_slice(&n.to_be_bytes());
        for r in &self.requests {
            v.extend_from_slice(&r.to_be_bytes());
        }
        v
    }
}

impl MetaContextRequest {
    pub fn decode(data: &[u8]) -> Result<Self, OptionParseError> {
        let mut c = Cursor { buf: data };
        let name_len = c.u32()?;
        let export = c.string(name_len)?;
        let n = c.u32()?;
        // Every query takes at least 4 bytes: refuse counts the payload
        // cannot hold before allocating for them.
        if n as usize > c.buf.len() / 4 {
            return Err(OptionParseError::Length);
        }
        let mut queries = Vec::with_capacity(n as usize);
        for _ in 0..n {
            let len = c.u32()?;
            queries.push(c.string(len)?);
        }
        c.end()?;
        Ok(MetaContextRequest { export, queries })
    }

    /// As [`InfoRequest::encode`]: a checked name and a few queries.
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(&wire_u32(self.export.len(), "an export name").to_be_bytes());
        v.extend_from_slice(self.export.as_bytes());
        v.extend_from_slice(&wire_u32(self.queries.len(), "a few queries").to_be_bytes());
        for q in &self.queries {
            v.extend_from_slice(&wire_u32(q.len(), "a query").to_be_bytes());
            v.extend_from_slice(q.as_bytes());
        }
        v
    }
}

/// Block size constraints (`NBD_INFO_BLOCK_SIZE`): a property of the
/// device, defined with it.
pub use block_device::BlockSizes;

/// One `NBD_REP_INFO` payload, decoded (client side).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Info {
    Export { size: u64, flags: u16 },
    Name(String),
    Description(String),
    BlockSize(BlockSizes),
    Unknown(u16),
}

impl Info {
    pub fn decode(data: &[u8]) -> Result<Self, OptionParseError> {
        let mut c = Cursor { buf: data };
        let kind = c.u16()?;
        let info = match kind {
            INFO_EXPORT => {
                let size = be_u64(c.take(8)?);
                let flags = c.u16()?;
                c.end()?;
                Info::Export { size, flags }
            }
            INFO_NAME | INFO_DESCRIPTION => {
                // The rest of the payload, from the server: never truncated.
                let len =
                    u32::try_from(c.buf.len()).map_err(|_| OptionParseError::StringTooLong)?;
                let s = c.string(len)?;
                if kind == INFO_NAME {
                    Info::Name(s)
                } else {
                    Info::Description(s)
                }
            }
            INFO_BLOCK_SIZE => {
                let minimum = c.u32()?;
                let preferred = c.u32()?;
                let maximum = c.u32()?;
                c.end()?;
                Info::BlockSize(BlockSizes {
                    minimum,
                    preferred,
                    maximum,
                })
            }
            other => Info::Unknown(other),
        };
        Ok(info)
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::new();
        match self {
            Info::Export { size, flags } => {
                v.extend_from_slice(&INFO_EXPORT.to_be_bytes());
                v.extend_from_slice(&size.to_be_bytes());
                v.extend_from_slice(&flags.to_be_bytes());
            }
            Info::Name(s) => {
                v.extend_from_slice(&INFO_NAME.to_be_bytes());
                v.extend_from_slice(s.as_bytes());
            }
            Info::Description(s) => {
                v.extend_from_slice(&INFO_DESCRIPTION.to_be_bytes());
                v.extend_from_slice(s.as_bytes());
            }
            Info::BlockSize(b) => {
                v.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
                v.extend_from_slice(&b.minimum.to_be_bytes());
                v.extend_from_slice(&b.preferred.to_be_bytes());
                v.extend_from_slice(&b.maximum.to_be_bytes());
            }
            Info::Unknown(kind) => v.extend_from_slice(&kind.to_be_bytes()),
        }
        v
    }
}

/// The payload of an error chunk: `(error, message)`; the trailing offset of
/// `ERROR_OFFSET` is returned separately by [`decode_error_chunk`].
pub fn encode_error_chunk(errno: Errno, message: &str, offset: Option<u64>) -> Vec<u8> {
    // Messages are for humans; keep them within the string limit.
    // Cut at a character boundary: the message must stay UTF-8.
    let mut cut = message.len().min(MAX_STRING);
    while !message.is_char_boundary(cut) {
        cut -= 1;
    }
    let msg = &message.as_bytes()[..cut];
    let mut v = Vec::with_capacity(6 + msg.len() + 8);
    v.extend_from_slice(&errno.code().to_be_bytes());
    v.extend_from_slice(
        &u16::try_from(msg.len())
            .expect("cut to MAX_STRING")
            .to_be_bytes(),
    );
    v.extend_from_slice(msg);
    if let Some(off) = offset {
        v.extend_from_slice(&off.to_be_bytes());
    }
    v
}

/// An error chunk as a client sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ErrorChunk {
    pub error: u32,
    pub message: String,
    pub offset: Option<u64>,
}

/// Decode the payload of a chunk whose type has the error bit set.
pub fn decode_error_chunk(kind: u16, data: &[u8]) -> Result<ErrorChunk, OptionParseError> {
    let mut c = Cursor { buf: data };
    let error = c.u32()?;
    let len = c.u16()?;
    let msg = c.take(len as usize)?;
    let message = String::from_utf8_lossy(msg).into_owned();
    let offset = if kind == REPLY_TYPE_ERROR_OFFSET {
        Some(be_u64(c.take(8)?))
    } else {
        None
    };
    // The message length accounts for every byte: anything after it is a
    // malformed chunk, not a longer message.
    c.end()?;
    Ok(ErrorChunk {
        error,
        message,
        offset,
    })
}

pub(crate) fn be_u16(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}
pub(crate) fn be_u32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}
pub(crate) fn be_u64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_be_bytes(a)
}

/// A length our own side puts on the wire as a u32: names, messages,
/// queries and payloads this process built, each far below 4 GiB (`what`
/// says which bound holds). Never for a length a peer sent.
pub(crate) fn wire_u32(len: usize, what: &str) -> u32 {
    u32::try_from(len).unwrap_or_else(|_| panic!("{what} of {len} bytes does not fit a u32 length"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_chunk_with_trailing_bytes_is_refused() {
        let mut v = encode_error_chunk(Errno::Io, "bad", None);
        assert!(decode_error_chunk(REPLY_TYPE_ERROR, &v).is_ok());
        v.push(0);
        assert!(decode_error_chunk(REPLY_TYPE_ERROR, &v).is_err());
        let mut v = encode_error_chunk(Errno::Io, "bad", Some(7));
        assert_eq!(
            decode_error_chunk(REPLY_TYPE_ERROR_OFFSET, &v)
                .unwrap()
                .offset,
            Some(7)
        );
        v.push(0);
        assert!(decode_error_chunk(REPLY_TYPE_ERROR_OFFSET, &v).is_err());
    }

    #[test]
    fn long_error_message_is_cut_at_a_character_boundary() {
        // 4095 ASCII bytes then a 3-byte character across the 4096 limit.
        let message = format!("{}€", "a".repeat(MAX_STRING - 1));
        let v = encode_error_chunk(Errno::Io, &message, None);
        let len = u16::from_be_bytes([v[4], v[5]]) as usize;
        assert_eq!(len, MAX_STRING - 1);
        let back = decode_error_chunk(REPLY_TYPE_ERROR, &v).unwrap();
        assert_eq!(back.message, "a".repeat(MAX_STRING - 1));
    }

    #[test]
    fn request_header_round_trips() {
        let h = RequestHeader {
            flags: CMD_FLAG_FUA,
            command: CMD_WRITE,
            cookie: 0xdead_beef_0bad_cafe,
            offset: 1 << 40,
            length: 4096,
        };
        assert_eq!(RequestHeader::decode(&h.encode()), Ok(h));
    }

    #[test]
    fn request_with_wrong_magic_is_refused() {
        let mut b = [0u8; REQUEST_LEN];
        b[0..4].copy_from_slice(&EXTENDED_REQUEST_MAGIC.to_be_bytes());
        assert_eq!(
            RequestHeader::decode(&b),
            Err(BadMagic(EXTENDED_REQUEST_MAGIC))
        );
    }

    #[test]
    fn info_request_round_trips_and_rejects_trailing_bytes() {
        let r = InfoRequest {
            name: "disk".into(),
            requests: vec![INFO_BLOCK_SIZE, INFO_NAME],
        };
        let mut bytes = r.encode();
        assert_eq!(InfoRequest::decode(&bytes), Ok(r));
        bytes.push(0);
        assert_eq!(InfoRequest::decode(&bytes), Err(OptionParseError::Length));
    }

    #[test]
    fn info_request_with_name_longer_than_payload_is_invalid() {
        let mut bytes = vec![];
        bytes.extend_from_slice(&100u32.to_be_bytes());
        bytes.extend_from_slice(b"abc");
        assert_eq!(InfoRequest::decode(&bytes), Err(OptionParseError::Length));
    }

    #[test]
    fn meta_context_with_huge_query_count_is_refused_without_allocating() {
        let mut bytes = vec![];
        bytes.extend_from_slice(&0u32.to_be_bytes());
        bytes.extend_from_slice(&u32::MAX.to_be_bytes());
        assert_eq!(
            MetaContextRequest::decode(&bytes),
            Err(OptionParseError::Length)
        );
    }

    #[test]
    fn meta_context_round_trips() {
        let r = MetaContextRequest {
            export: "".into(),
            queries: vec!["base:allocation".into(), "qemu:".into()],
        };
        assert_eq!(MetaContextRequest::decode(&r.encode()), Ok(r));
    }

    #[test]
    fn errno_mapping_stays_within_the_allowed_set() {
        for raw in 0..200 {
            let e = Errno::from_io(&std::io::Error::from_raw_os_error(raw));
            assert_eq!(Errno::from_code(e.code()), e);
        }
        assert_eq!(
            Errno::from_io(&std::io::Error::from_raw_os_error(libc::EDQUOT)),
            Errno::NoSpc
        );
        assert_eq!(Errno::from_code(9999), Errno::Inval);
    }

    #[test]
    fn error_chunk_round_trips_with_offset() {
        let bytes = encode_error_chunk(Errno::Io, "boom", Some(512));
        let c = decode_error_chunk(REPLY_TYPE_ERROR_OFFSET, &bytes).unwrap();
        assert_eq!(c.error, 5);
        assert_eq!(c.message, "boom");
        assert_eq!(c.offset, Some(512));
    }

    #[test]
    fn info_decodes_what_it_encodes() {
        for info in [
            Info::Export {
                size: 1 << 30,
                flags: TF_HAS_FLAGS | TF_READ_ONLY,
            },
            Info::Name("disk".into()),
            Info::Description("a disk".into()),
            Info::BlockSize(BlockSizes::default()),
        ] {
            assert_eq!(Info::decode(&info.encode()), Ok(info));
        }
    }
}
