//! The client's one error enum.
//!
//! Two families, as in the server: *connection-fatal* errors (I/O, protocol
//! violations, a cancelled half-written request) close the connection, and
//! every request in flight or issued later gets [`ClientError::Disconnected`]
//! carrying the first fatal reason; *per-request* errors
//! ([`ClientError::Request`], [`ClientError::Unsupported`],
//! [`ClientError::InvalidArgument`]) fail one request and leave the
//! connection usable.

use std::io;
use std::time::Duration;

use crate::proto::{self, Errno};

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// The socket could not be opened.
    #[error("cannot connect to NBD server at {endpoint}")]
    Connect {
        endpoint: String,
        #[source]
        source: io::Error,
    },

    /// TLS credentials could not be loaded, or the TLS handshake failed
    /// (a wrong key, an untrusted or misnamed certificate).
    #[error("TLS with {endpoint}: {source}")]
    Tls {
        endpoint: String,
        #[source]
        source: crate::tls::TlsError,
    },

    /// We asked for TLS and the server refused `NBD_OPT_STARTTLS`; we never
    /// fall back to plaintext.
    #[error("server refused TLS ({reply}{}); it may not offer TLS: use an nbd:// URI only over a trusted link", message_suffix(.message))]
    TlsRefused {
        reply: &'static str,
        message: String,
    },

    /// The server requires TLS and we connected without it.
    #[error("server requires TLS (NBD_REP_ERR_TLS_REQD{}): use nbds:// with tls-psk-file= or tls-certificates=", message_suffix(.message))]
    TlsRequired { message: String },

    /// Connect plus negotiation took longer than the handshake timeout.
    #[error("NBD handshake with {endpoint} did not finish within {timeout:?}")]
    HandshakeTimeout { endpoint: String, timeout: Duration },

    /// Reading or writing the socket failed during `during`.
    #[error("I/O error during {during}")]
    Io {
        during: &'static str,
        #[source]
        source: io::Error,
    },

    /// The server sent something the protocol forbids, or something we do
    /// not support (oldstyle negotiation, an unknown reply magic...).
    #[error("NBD protocol violation by the server: {0}")]
    Protocol(String),

    /// The server answered an option with an error reply.
    #[error("server refused NBD_OPT_{option} with {reply}{}", message_suffix(.message))]
    OptionRefused {
        option: &'static str,
        /// Name of the reply type, e.g. `NBD_REP_ERR_UNKNOWN`.
        reply: &'static str,
        /// Raw reply type, for types we have no name for.
        code: u32,
        /// The server's message text (may be empty).
        message: String,
    },

    /// The server ended the connection instead of accepting
    /// `NBD_OPT_EXPORT_NAME`: the usual way old servers say "no such export".
    #[error("server closed the connection on NBD_OPT_EXPORT_NAME {export:?} (unknown export?)")]
    ExportRefused { export: String },

    /// The server failed one request with an NBD error.
    #[error("NBD_CMD_{command} offset {offset} length {length} failed: {errno}{}", message_suffix(.message))]
    Request {
        command: &'static str,
        offset: u64,
        length: u64,
        errno: Errno,
        message: String,
    },

    /// The export does not advertise what this request needs (a write to a
    /// read-only export, trim without `SEND_TRIM`, FUA without `SEND_FUA`).
    /// Refused locally: servers may disconnect on unadvertised commands.
    #[error("NBD_CMD_{command} is not supported by this export: {reason}")]
    Unsupported {
        command: &'static str,
        reason: &'static str,
    },

    /// The request cannot be expressed on the wire (too long for the
    /// negotiated maximum payload, offset overflow).
    #[error("invalid NBD request: {0}")]
    InvalidArgument(String),

    /// The connection is closed; `reason` is the first fatal error (or
    /// "disconnected by the client"). Open a new `Client` to go on.
    #[error("NBD connection closed: {reason}")]
    Disconnected { reason: String },
}

fn message_suffix(message: &str) -> String {
    if message.is_empty() {
        String::new()
    } else {
        format!(": {message}")
    }
}

impl ClientError {
    /// The NBD error number this error stands for, when there is one: the
    /// server's for [`ClientError::Request`], and the errno a server would
    /// have used for the requests refused locally (`ENOTSUP`, `EINVAL`).
    /// `None` for connection and protocol failures.
    pub fn errno(&self) -> Option<Errno> {
        match self {
            ClientError::Request { errno, .. } => Some(*errno),
            ClientError::Unsupported { .. } => Some(Errno::NotSup),
            ClientError::InvalidArgument(_) => Some(Errno::Inval),
            _ => None,
        }
    }

    /// True if this error ended the connection (as opposed to failing one
    /// request on a connection that goes on).
    pub fn is_connection_fatal(&self) -> bool {
        self.errno().is_none()
    }

    pub(crate) fn io(during: &'static str) -> impl FnOnce(io::Error) -> ClientError {
        move |source| ClientError::Io { during, source }
    }
}

/// Human name of an option reply type, for messages.
pub(crate) fn reply_name(reply: u32) -> &'static str {
    match reply {
        proto::REP_ACK => "NBD_REP_ACK",
        proto::REP_SERVER => "NBD_REP_SERVER",
        proto::REP_INFO => "NBD_REP_INFO",
        proto::REP_META_CONTEXT => "NBD_REP_META_CONTEXT",
        proto::REP_ERR_UNSUP => "NBD_REP_ERR_UNSUP",
        proto::REP_ERR_POLICY => "NBD_REP_ERR_POLICY",
        proto::REP_ERR_INVALID => "NBD_REP_ERR_INVALID",
        proto::REP_ERR_PLATFORM => "NBD_REP_ERR_PLATFORM",
        proto::REP_ERR_TLS_REQD => "NBD_REP_ERR_TLS_REQD",
        proto::REP_ERR_UNKNOWN => "NBD_REP_ERR_UNKNOWN",
        proto::REP_ERR_SHUTDOWN => "NBD_REP_ERR_SHUTDOWN",
        proto::REP_ERR_BLOCK_SIZE_REQD => "NBD_REP_ERR_BLOCK_SIZE_REQD",
        proto::REP_ERR_TOO_BIG => "NBD_REP_ERR_TOO_BIG",
        r if r & proto::REP_ERR_BIT != 0 => "an unknown error reply",
        _ => "an unknown reply",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_error_exposes_the_server_errno_and_message() {
        let e = ClientError::Request {
            command: "READ",
            offset: 10,
            length: 5,
            errno: Errno::Inval,
            message: "beyond the end".into(),
        };
        assert_eq!(e.errno(), Some(Errno::Inval));
        assert!(!e.is_connection_fatal());
        assert_eq!(
            e.to_string(),
            "NBD_CMD_READ offset 10 length 5 failed: EINVAL: beyond the end"
        );
    }

    #[test]
    fn option_refusal_names_option_reply_and_message() {
        let e = ClientError::OptionRefused {
            option: "GO",
            reply: reply_name(proto::REP_ERR_UNKNOWN),
            code: proto::REP_ERR_UNKNOWN,
            message: "no such export".into(),
        };
        assert_eq!(
            e.to_string(),
            "server refused NBD_OPT_GO with NBD_REP_ERR_UNKNOWN: no such export"
        );
        assert!(e.is_connection_fatal());
    }
}
