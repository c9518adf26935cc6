//! What goes wrong opening an NBD source, and how a read's errno survives
//! the trip through `io::Error`: the engine maps errors onto errnos by one
//! rule (`block_device::errno_of`), so a failed source read must carry the
//! errno the server (or the retry rules) chose, not a generic one.

use std::io;

use nbd_server::client::ClientError;
use nbd_server::uri::UriError;

/// Why an NBD source could not be opened.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NbdSourceError {
    #[error("source {uri:?} is not a valid NBD URI: {source}")]
    Uri {
        uri: String,
        #[source]
        source: UriError,
    },
    #[error("source {uri}: {source}")]
    Tls {
        uri: String,
        #[source]
        source: nbd_server::tls::TlsError,
    },
    #[error("source {uri} is unreachable: {source}{}", source_chain(.source))]
    Connect {
        uri: String,
        #[source]
        source: ClientError,
    },
    #[error("source {uri} is empty (0 bytes)")]
    Empty { uri: String },
}

pub(crate) fn source_chain(e: &ClientError) -> String {
    let mut s = String::new();
    let mut cur = std::error::Error::source(e);
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// The message of a failed read, keeping its errno through `io::Error`.
#[derive(Debug)]
struct ReadError {
    errno: i32,
    message: String,
}

impl std::fmt::Display for ReadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for ReadError {}

pub(crate) fn errno_error(errno: i32, message: String) -> io::Error {
    io::Error::new(
        io::Error::from_raw_os_error(errno).kind(),
        ReadError { errno, message },
    )
}

/// The errno of an error returned by [`NbdSource`](crate::NbdSource) (or of a plain OS error).
pub fn errno_of(e: &io::Error) -> Option<i32> {
    e.raw_os_error().or_else(|| {
        e.get_ref()
            .and_then(|inner| inner.downcast_ref::<ReadError>())
            .map(|x| x.errno)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errno_survives_io_error_wrapping() {
        let e = errno_error(libc::EIO, "x".into());
        assert_eq!(errno_of(&e), Some(libc::EIO));
        assert_eq!(e.to_string(), "x");
    }
}
