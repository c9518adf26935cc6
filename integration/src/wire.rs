//! A tiny blocking NBD client that speaks exact bytes.
//!
//! Real clients never send a bad magic, a 2 GiB option or a write past the
//! end; this one does whatever a test asks and reports exactly what came
//! back. Every socket read has a timeout ([`IO_TIMEOUT`]) so a server that
//! goes silent fails the test instead of hanging it. Constants follow the
//! NBD spec (`doc/proto.md`) and are written out here on purpose: the tests
//! check the server's codec, so they must not share it.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use crate::server::Addr;

pub const IO_TIMEOUT: Duration = Duration::from_secs(10);

pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
pub const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

pub const FLAG_FIXED_NEWSTYLE: u16 = 1;
pub const FLAG_NO_ZEROES: u16 = 2;
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1;
pub const FLAG_C_NO_ZEROES: u32 = 2;

pub const TF_HAS_FLAGS: u16 = 1 << 0;
pub const TF_READ_ONLY: u16 = 1 << 1;
pub const TF_SEND_FLUSH: u16 = 1 << 2;
pub const TF_SEND_FUA: u16 = 1 << 3;
pub const TF_SEND_TRIM: u16 = 1 << 5;
pub const TF_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub const TF_SEND_DF: u16 = 1 << 7;
pub const TF_CAN_MULTI_CONN: u16 = 1 << 8;
pub const TF_SEND_CACHE: u16 = 1 << 10;
pub const TF_SEND_FAST_ZERO: u16 = 1 << 11;

pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_STARTTLS: u32 = 5;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;
pub const OPT_LIST_META_CONTEXT: u32 = 9;
pub const OPT_SET_META_CONTEXT: u32 = 10;

pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_META_CONTEXT: u32 = 4;
pub const REP_ERR_BIT: u32 = 1 << 31;
pub const REP_ERR_UNSUP: u32 = REP_ERR_BIT + 1;
pub const REP_ERR_POLICY: u32 = REP_ERR_BIT + 2;
pub const REP_ERR_INVALID: u32 = REP_ERR_BIT + 3;
pub const REP_ERR_TLS_REQD: u32 = REP_ERR_BIT + 5;
pub const REP_ERR_UNKNOWN: u32 = REP_ERR_BIT + 6;
pub const REP_ERR_TOO_BIG: u32 = REP_ERR_BIT + 9;

pub const INFO_EXPORT: u16 = 0;
pub const INFO_NAME: u16 = 1;
pub const INFO_DESCRIPTION: u16 = 2;
pub const INFO_BLOCK_SIZE: u16 = 3;

pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_CACHE: u16 = 5;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const CMD_BLOCK_STATUS: u16 = 7;

pub const CMD_FLAG_FUA: u16 = 1 << 0;
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
pub const CMD_FLAG_DF: u16 = 1 << 2;
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
pub const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;

pub const REPLY_FLAG_DONE: u16 = 1;
pub const REPLY_TYPE_NONE: u16 = 0;
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
pub const REPLY_TYPE_ERROR: u16 = (1 << 15) + 1;
pub const REPLY_TYPE_ERROR_OFFSET: u16 = (1 << 15) + 2;

pub const STATE_HOLE: u32 = 1;
pub const STATE_ZERO: u32 = 2;

pub const EPERM: u32 = 1;
pub const EIO: u32 = 5;
pub const ENOMEM: u32 = 12;
pub const EINVAL: u32 = 22;
pub const ENOSPC: u32 = 28;
pub const EOVERFLOW: u32 = 75;
pub const ENOTSUP: u32 = 95;
pub const ESHUTDOWN: u32 = 108;
/// The only error numbers the spec lets a server send.
pub const SPEC_ERRNOS: [u32; 8] = [
    EPERM, EIO, ENOMEM, EINVAL, ENOSPC, EOVERFLOW, ENOTSUP, ESHUTDOWN,
];

/// The socket under the client.
pub enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.read(buf),
            Stream::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write(buf),
            Stream::Unix(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.flush(),
            Stream::Unix(s) => s.flush(),
        }
    }
}

impl Stream {
    pub fn connect(addr: &Addr) -> io::Result<Stream> {
        let stream = match addr {
            Addr::Tcp(a) => {
                let s = TcpStream::connect_timeout(a, IO_TIMEOUT)?;
                s.set_nodelay(true)?;
                s.set_read_timeout(Some(IO_TIMEOUT))?;
                s.set_write_timeout(Some(IO_TIMEOUT))?;
                Stream::Tcp(s)
            }
            Addr::Unix(p) => {
                let s = UnixStream::connect(p)?;
                s.set_read_timeout(Some(IO_TIMEOUT))?;
                s.set_write_timeout(Some(IO_TIMEOUT))?;
                Stream::Unix(s)
            }
        };
        Ok(stream)
    }

    fn set_read_timeout(&self, t: Duration) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.set_read_timeout(Some(t)),
            Stream::Unix(s) => s.set_read_timeout(Some(t)),
        }
    }
}

/// One option reply.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OptReply {
    pub option: u32,
    pub kind: u32,
    pub data: Vec<u8>,
}

impl OptReply {
    pub fn is_error(&self) -> bool {
        self.kind & REP_ERR_BIT != 0
    }
}

/// What INFO or GO told about an export.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ExportInfo {
    pub size: u64,
    pub flags: u16,
    /// (minimum, preferred, maximum), when the server sent NBD_INFO_BLOCK_SIZE.
    pub block_size: Option<(u32, u32, u32)>,
    pub name: Option<String>,
    pub description: Option<String>,
}

/// One transmission reply: a simple reply or one structured chunk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reply {
    /// A simple reply; `data` is the READ payload that followed a success.
    Simple {
        error: u32,
        cookie: u64,
        data: Vec<u8>,
    },
    Chunk {
        flags: u16,
        kind: u16,
        cookie: u64,
        payload: Vec<u8>,
    },
}

impl Reply {
    pub fn cookie(&self) -> u64 {
        match self {
            Reply::Simple { cookie, .. } | Reply::Chunk { cookie, .. } => *cookie,
        }
    }

    /// The error number of a simple error reply or an error chunk.
    pub fn error(&self) -> Option<u32> {
        match self {
            Reply::Simple { error: 0, .. } => None,
            Reply::Simple { error, .. } => Some(*error),
            Reply::Chunk { kind, payload, .. } if kind & (1 << 15) != 0 => Some(
                u32::from_be_bytes(payload[..4].try_into().expect("error chunk payload")),
            ),
            Reply::Chunk { .. } => None,
        }
    }

    /// True for a simple reply and for the chunk that ends a structured one.
    pub fn is_last(&self) -> bool {
        match self {
            Reply::Simple { .. } => true,
            Reply::Chunk { flags, .. } => flags & REPLY_FLAG_DONE != 0,
        }
    }
}

/// A whole READ reply put back together.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ReadResult {
    pub data: Vec<u8>,
    /// Chunk types in arrival order (`None` for a simple reply).
    pub chunk_kinds: Vec<u16>,
    pub simple: bool,
    pub error: Option<u32>,
}

/// A blocking NBD client connection.
pub struct Conn {
    pub stream: Stream,
}

pub fn be16(b: &[u8]) -> u16 {
    u16::from_be_bytes(b[..2].try_into().unwrap())
}

pub fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes(b[..4].try_into().unwrap())
}

pub fn be64(b: &[u8]) -> u64 {
    u64::from_be_bytes(b[..8].try_into().unwrap())
}

/// The bytes of one option header plus its data.
pub fn option_bytes(option: u32, data: &[u8]) -> Vec<u8> {
    let mut b = Vec::with_capacity(16 + data.len());
    b.extend_from_slice(&IHAVEOPT.to_be_bytes());
    b.extend_from_slice(&option.to_be_bytes());
    b.extend_from_slice(&(data.len() as u32).to_be_bytes());
    b.extend_from_slice(data);
    b
}

/// The 28 bytes of one request header.
pub fn request_bytes(flags: u16, cmd: u16, cookie: u64, offset: u64, len: u32) -> [u8; 28] {
    let mut b = [0; 28];
    b[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
    b[4..6].copy_from_slice(&flags.to_be_bytes());
    b[6..8].copy_from_slice(&cmd.to_be_bytes());
    b[8..16].copy_from_slice(&cookie.to_be_bytes());
    b[16..24].copy_from_slice(&offset.to_be_bytes());
    b[24..28].copy_from_slice(&len.to_be_bytes());
    b
}

/// Data of NBD_OPT_GO / NBD_OPT_INFO: name and information requests.
pub fn go_data(name: &str, infos: &[u16]) -> Vec<u8> {
    let mut d = Vec::new();
    d.extend_from_slice(&(name.len() as u32).to_be_bytes());
    d.extend_from_slice(name.as_bytes());
    d.extend_from_slice(&(infos.len() as u16).to_be_bytes());
    for i in infos {
        d.extend_from_slice(&i.to_be_bytes());
    }
    d
}

/// Data of NBD_OPT_{SET,LIST}_META_CONTEXT.
pub fn meta_context_data(name: &str, queries: &[&str]) -> Vec<u8> {
    let mut d = Vec::new();
    d.extend_from_slice(&(name.len() as u32).to_be_bytes());
    d.extend_from_slice(name.as_bytes());
    d.extend_from_slice(&(queries.len() as u32).to_be_bytes());
    for q in queries {
        d.extend_from_slice(&(q.len() as u32).to_be_bytes());
        d.extend_from_slice(q.as_bytes());
    }
    d
}

impl Conn {
    pub fn connect(addr: &Addr) -> io::Result<Conn> {
        Ok(Conn {
            stream: Stream::connect(addr)?,
        })
    }

    pub fn send(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.stream.write_all(bytes)?;
        self.stream.flush()
    }

    pub fn recv(&mut self, n: usize) -> io::Result<Vec<u8>> {
        let mut buf = vec![0; n];
        self.stream.read_exact(&mut buf)?;
        Ok(buf)
    }

    /// Reads the server greeting; returns the handshake flags.
    pub fn greeting(&mut self) -> io::Result<u16> {
        let b = self.recv(18)?;
        assert_eq!(be64(&b[0..]), NBDMAGIC, "greeting magic");
        assert_eq!(be64(&b[8..]), IHAVEOPT, "newstyle magic");
        let flags = be16(&b[16..]);
        assert!(
            flags & FLAG_FIXED_NEWSTYLE != 0,
            "server is not fixed newstyle: {flags:#x}"
        );
        Ok(flags)
    }

    /// Greeting plus client flags `FIXED_NEWSTYLE | NO_ZEROES`.
    pub fn start(&mut self) -> io::Result<()> {
        let flags = self.greeting()?;
        let mut client = FLAG_C_FIXED_NEWSTYLE;
        if flags & FLAG_NO_ZEROES != 0 {
            client |= FLAG_C_NO_ZEROES;
        }
        self.send(&client.to_be_bytes())
    }

    pub fn send_option(&mut self, option: u32, data: &[u8]) -> io::Result<()> {
        self.send(&option_bytes(option, data))
    }

    pub fn read_option_reply(&mut self) -> io::Result<OptReply> {
        let h = self.recv(20)?;
        assert_eq!(be64(&h), OPT_REPLY_MAGIC, "option reply magic in {h:02x?}");
        let len = be32(&h[16..]) as usize;
        assert!(len <= 1 << 20, "option reply of {len} bytes");
        Ok(OptReply {
            option: be32(&h[8..]),
            kind: be32(&h[12..]),
            data: self.recv(len)?,
        })
    }

    /// Sends one option and reads one reply to it.
    pub fn option(&mut self, option: u32, data: &[u8]) -> io::Result<OptReply> {
        self.send_option(option, data)?;
        let r = self.read_option_reply()?;
        assert_eq!(r.option, option, "reply to another option: {r:?}");
        Ok(r)
    }

    /// NBD_OPT_STRUCTURED_REPLY; asserts the ACK.
    pub fn structured_reply(&mut self) -> io::Result<()> {
        let r = self.option(OPT_STRUCTURED_REPLY, &[])?;
        assert_eq!(r.kind, REP_ACK, "structured reply refused: {r:?}");
        Ok(())
    }

    /// NBD_OPT_INFO or NBD_OPT_GO: collects NBD_REP_INFO replies up to the
    /// ACK; `Err(reply)` is the error reply when the server refused.
    pub fn info_or_go(
        &mut self,
        option: u32,
        name: &str,
        infos: &[u16],
    ) -> io::Result<Result<ExportInfo, OptReply>> {
        self.send_option(option, &go_data(name, infos))?;
        let mut info = ExportInfo::default();
        let mut saw_export = false;
        loop {
            let r = self.read_option_reply()?;
            assert_eq!(r.option, option, "reply to another option: {r:?}");
            if r.is_error() {
                return Ok(Err(r));
            }
            match r.kind {
                REP_ACK => break,
                REP_INFO => {
                    let d = &r.data;
                    match be16(d) {
                        INFO_EXPORT => {
                            assert_eq!(d.len(), 12, "NBD_INFO_EXPORT length");
                            info.size = be64(&d[2..]);
                            info.flags = be16(&d[10..]);
                            saw_export = true;
                        }
                        INFO_NAME => {
                            info.name = Some(String::from_utf8_lossy(&d[2..]).into_owned())
                        }
                        INFO_DESCRIPTION => {
                            info.description = Some(String::from_utf8_lossy(&d[2..]).into_owned())
                        }
                        INFO_BLOCK_SIZE => {
                            assert_eq!(d.len(), 14, "NBD_INFO_BLOCK_SIZE length");
                            info.block_size = Some((be32(&d[2..]), be32(&d[6..]), be32(&d[10..])));
                        }
                        other => panic!("unknown NBD_INFO type {other}"),
                    }
                }
                other => panic!("unexpected reply type {other:#x} to option {option}"),
            }
        }
        assert!(saw_export, "ACK without NBD_INFO_EXPORT");
        Ok(Ok(info))
    }

    /// NBD_OPT_GO that must succeed.
    pub fn go(&mut self, name: &str) -> ExportInfo {
        self.info_or_go(OPT_GO, name, &[INFO_BLOCK_SIZE])
            .expect("GO i/o")
            .unwrap_or_else(|r| panic!("GO refused: {r:?}"))
    }

    /// NBD_OPT_SET_META_CONTEXT: the (id, name) pairs the server selected.
    pub fn set_meta_context(&mut self, name: &str, queries: &[&str]) -> Vec<(u32, String)> {
        self.meta_context(OPT_SET_META_CONTEXT, name, queries)
    }

    pub fn meta_context(
        &mut self,
        option: u32,
        name: &str,
        queries: &[&str],
    ) -> Vec<(u32, String)> {
        self.send_option(option, &meta_context_data(name, queries))
            .expect("send meta context");
        let mut out = Vec::new();
        loop {
            let r = self.read_option_reply().expect("meta context reply");
            assert_eq!(r.option, option);
            match r.kind {
                REP_ACK => return out,
                REP_META_CONTEXT => out.push((
                    be32(&r.data),
                    String::from_utf8_lossy(&r.data[4..]).into_owned(),
                )),
                _ => panic!("meta context refused: {r:?}"),
            }
        }
    }

    /// Full negotiation to the transmission phase of export `name`:
    /// optionally structured replies and base:allocation, then GO.
    /// Returns the export and, when asked, the base:allocation context id.
    pub fn negotiate(&mut self, name: &str, structured: bool) -> (ExportInfo, Option<u32>) {
        self.start().expect("handshake start");
        let mut ctx = None;
        if structured {
            self.structured_reply().expect("structured reply");
            let sel = self.set_meta_context(name, &["base:allocation"]);
            assert_eq!(sel.len(), 1, "base:allocation not selected: {sel:?}");
            assert_eq!(sel[0].1, "base:allocation");
            ctx = Some(sel[0].0);
        }
        (self.go(name), ctx)
    }

    pub fn request(
        &mut self,
        flags: u16,
        cmd: u16,
        cookie: u64,
        offset: u64,
        len: u32,
    ) -> io::Result<()> {
        self.send(&request_bytes(flags, cmd, cookie, offset, len))
    }

    /// A WRITE request with its payload in one send.
    pub fn write_request(
        &mut self,
        flags: u16,
        cookie: u64,
        offset: u64,
        data: &[u8],
    ) -> io::Result<()> {
        let mut b = request_bytes(flags, CMD_WRITE, cookie, offset, data.len() as u32).to_vec();
        b.extend_from_slice(data);
        self.send(&b)
    }

    /// Reads one simple reply or one structured chunk. `read_len` is the
    /// payload length that follows a successful simple READ reply (0 for
    /// every other command).
    pub fn read_reply(&mut self, read_len: usize) -> io::Result<Reply> {
        let m = self.recv(4)?;
        match be32(&m) {
            SIMPLE_REPLY_MAGIC => {
                let h = self.recv(12)?;
                let error = be32(&h);
                let cookie = be64(&h[4..]);
                let data = if error == 0 {
                    self.recv(read_len)?
                } else {
                    Vec::new()
                };
                Ok(Reply::Simple {
                    error,
                    cookie,
                    data,
                })
            }
            STRUCTURED_REPLY_MAGIC => {
                let h = self.recv(16)?;
                let len = be32(&h[12..]) as usize;
                assert!(len <= 64 << 20, "chunk of {len} bytes");
                Ok(Reply::Chunk {
                    flags: be16(&h),
                    kind: be16(&h[2..]),
                    cookie: be64(&h[4..]),
                    payload: self.recv(len)?,
                })
            }
            other => Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("reply magic {other:#010x}"),
            )),
        }
    }

    /// Reads every reply piece up to the last one for `cookie`.
    pub fn read_full_reply(&mut self, read_len: usize) -> io::Result<Vec<Reply>> {
        let mut out = Vec::new();
        loop {
            let r = self.read_reply(read_len)?;
            let last = r.is_last();
            out.push(r);
            if last {
                return Ok(out);
            }
        }
    }

    /// Sends a command without payload and returns its error (0 on
    /// success), asserting the reply carries `cookie`.
    pub fn command(&mut self, flags: u16, cmd: u16, offset: u64, len: u32) -> io::Result<u32> {
        let cookie = 0xc0de_0000 + u64::from(cmd);
        self.request(flags, cmd, cookie, offset, len)?;
        self.finish(cookie)
    }

    /// Reads the full reply of a non-READ request; returns its error or 0.
    pub fn finish(&mut self, cookie: u64) -> io::Result<u32> {
        let replies = self.read_full_reply(0)?;
        let mut err = 0;
        for r in &replies {
            assert_eq!(r.cookie(), cookie, "reply for another cookie: {r:?}");
            if let Some(e) = r.error() {
                err = e;
            }
        }
        Ok(err)
    }

    /// READ of `len` at `offset`, put back together from whatever replies
    /// the server sent (simple, or data/hole/error chunks).
    pub fn read(&mut self, flags: u16, offset: u64, len: u32) -> io::Result<ReadResult> {
        let cookie = 0x5eed_0000_0000u64.wrapping_add(offset);
        self.request(flags, CMD_READ, cookie, offset, len)?;
        let mut res = ReadResult {
            data: vec![0; len as usize],
            ..Default::default()
        };
        for r in self.read_full_reply(len as usize)? {
            assert_eq!(r.cookie(), cookie, "reply for another cookie: {r:?}");
            match r {
                Reply::Simple { error, data, .. } => {
                    res.simple = true;
                    if error != 0 {
                        res.error = Some(error);
                    } else {
                        res.data = data;
                    }
                }
                Reply::Chunk {
                    kind, ref payload, ..
                } => {
                    res.chunk_kinds.push(kind);
                    match kind {
                        REPLY_TYPE_OFFSET_DATA => {
                            let at = be64(payload) - offset;
                            let bytes = &payload[8..];
                            res.data[at as usize..at as usize + bytes.len()].copy_from_slice(bytes);
                        }
                        REPLY_TYPE_OFFSET_HOLE => {
                            let at = (be64(payload) - offset) as usize;
                            let n = be32(&payload[8..]) as usize;
                            res.data[at..at + n].fill(0);
                        }
                        REPLY_TYPE_NONE => {}
                        _ => {
                            res.error = Some(r.error().expect("error chunk"));
                        }
                    }
                }
            }
        }
        Ok(res)
    }

    /// READ that must succeed; returns the bytes.
    pub fn read_ok(&mut self, offset: u64, len: u32) -> Vec<u8> {
        let r = self.read(0, offset, len).expect("READ i/o");
        assert_eq!(r.error, None, "READ {offset}+{len} failed: {r:?}");
        r.data
    }

    /// BLOCK_STATUS: the (length, flags) extents of context `ctx`.
    pub fn block_status(
        &mut self,
        flags: u16,
        ctx: u32,
        offset: u64,
        len: u32,
    ) -> io::Result<Result<Vec<(u32, u32)>, u32>> {
        let cookie = 0xb5;
        self.request(flags, CMD_BLOCK_STATUS, cookie, offset, len)?;
        let mut extents = Vec::new();
        let mut error = None;
        for r in self.read_full_reply(0)? {
            assert_eq!(r.cookie(), cookie);
            if let Some(e) = r.error() {
                error = Some(e);
                continue;
            }
            if let Reply::Chunk {
                kind: REPLY_TYPE_BLOCK_STATUS,
                payload,
                ..
            } = r
            {
                assert_eq!(be32(&payload), ctx, "block status for another context");
                for e in payload[4..].chunks(8) {
                    extents.push((be32(e), be32(&e[4..])));
                }
            }
        }
        Ok(match error {
            Some(e) => Err(e),
            None => Ok(extents),
        })
    }

    /// Waits up to `timeout` for the server to close the connection,
    /// discarding whatever it sends first (e.g. an error reply). True when
    /// the connection ended (EOF or reset), false when it stayed open.
    pub fn closed_within(&mut self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut buf = [0; 4096];
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            self.stream.set_read_timeout(left).expect("set timeout");
            match self.stream.read(&mut buf) {
                Ok(0) => return true,
                Ok(_) => continue,
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    return false;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => return true,
            }
        }
    }
}
