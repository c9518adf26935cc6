//! `option_parsing`: the option and reply codecs on arbitrary bytes.
//!
//! Every decoder gets the whole input. None may panic. What a decoder
//! accepts must survive encode -> decode unchanged, and where the format
//! has exactly one encoding of a value (everything but an unknown `NBD_INFO`
//! type, whose payload we do not keep) the re-encoding must be the input
//! itself: a strict decoder accepts no bytes it would not produce.

use nbd_server::proto::{
    self, ChunkHeader, Errno, Info, InfoRequest, MAX_STRING, MetaContextRequest, OptionReplyHeader,
    REPLY_TYPE_ERROR, REPLY_TYPE_ERROR_OFFSET, REQUEST_LEN, RequestHeader,
};

pub fn run(data: &[u8]) {
    info_request(data);
    meta_context_request(data);
    info(data);
    // The chunk type decides whether an offset trails the message: try both
    // error types, and whatever type the first two bytes name.
    error_chunk(REPLY_TYPE_ERROR, data);
    error_chunk(REPLY_TYPE_ERROR_OFFSET, data);
    if let [a, b, rest @ ..] = data {
        error_chunk(u16::from_be_bytes([*a, *b]), rest);
    }
    headers(data);
}

fn info_request(data: &[u8]) {
    if let Ok(r) = InfoRequest::decode(data) {
        let bytes = r.encode();
        assert_eq!(bytes, data, "InfoRequest re-encodes differently: {r:?}");
        assert_eq!(InfoRequest::decode(&bytes).as_ref(), Ok(&r));
    }
}

fn meta_context_request(data: &[u8]) {
    if let Ok(r) = MetaContextRequest::decode(data) {
        let bytes = r.encode();
        assert_eq!(
            bytes, data,
            "MetaContextRequest re-encodes differently: {r:?}"
        );
        assert_eq!(MetaContextRequest::decode(&bytes).as_ref(), Ok(&r));
    }
}

fn info(data: &[u8]) {
    if let Ok(i) = Info::decode(data) {
        let bytes = i.encode();
        assert_eq!(Info::decode(&bytes).as_ref(), Ok(&i), "Info round trip");
        if !matches!(i, Info::Unknown(_)) {
            assert_eq!(bytes, data, "Info re-encodes differently: {i:?}");
        }
    }
}

fn error_chunk(kind: u16, data: &[u8]) {
    let Ok(c) = proto::decode_error_chunk(kind, data) else {
        return;
    };
    assert_eq!(c.offset.is_some(), kind == REPLY_TYPE_ERROR_OFFSET);
    // The encoder takes an `Errno` (the set the spec allows) and caps the
    // message at 4096 bytes, so only such chunks can round-trip.
    let errno = Errno::from_code(c.error);
    if errno.code() != c.error || c.message.len() > MAX_STRING {
        return;
    }
    let bytes = proto::encode_error_chunk(errno, &c.message, c.offset);
    let back = proto::decode_error_chunk(kind, &bytes).expect("re-encoded chunk decodes");
    assert_eq!(back, c, "error chunk round trip");
}

fn headers(data: &[u8]) {
    if let Some(buf) = data.first_chunk::<REQUEST_LEN>() {
        if let Ok(h) = RequestHeader::decode(buf) {
            assert_eq!(&h.encode(), buf, "request header round trip");
        }
    }
    if let Some(buf) = data.first_chunk::<20>() {
        if let Some(h) = OptionReplyHeader::decode(buf) {
            assert_eq!(
                &proto::option_reply_header(h.option, h.reply, h.length),
                buf,
                "option reply header round trip"
            );
        }
        // A chunk header is the structured reply magic then 16 bytes.
        if buf[..4] == proto::STRUCTURED_REPLY_MAGIC.to_be_bytes() {
            let after: &[u8; 16] = buf[4..].try_into().expect("16 bytes");
            let h = ChunkHeader::decode_after_magic(after);
            assert_eq!(&h.encode(), buf, "chunk header round trip");
        }
    }
}
