//! NBD URIs: `nbd://host[:port][/export]`, `nbd+unix:///export?socket=PATH`
//! and their TLS forms `nbds://`, `nbds+unix://`.
//!
//! The reference is the NBD URI document (NetworkBlockDevice/nbd,
//! `doc/uri.md`), which defers to RFC 3986 for syntax. What this parser
//! accepts, and refuses with a named [`UriError`]:
//!
//! - The scheme is one of the four above (compared without case). `nbds`
//!   schemes parse with `tls = true`: the client then insists on TLS and
//!   never falls back to plaintext.
//! - TCP URIs need a host: a name, an IPv4 address or an `[IPv6]` literal.
//!   The port defaults to 10809. User info (`user@`) is the TLS-PSK user
//!   name, so it is only accepted with `nbds` schemes (also as
//!   `nbds+unix://user@/...`).
//! - Unix URIs take no host and need exactly one `socket=` parameter.
//!   A socket starting with NUL (`%00`) names a Linux abstract socket.
//! - The export name is the path without its leading `/`, percent-decoded;
//!   it must be UTF-8 without NUL and at most 4096 bytes.
//! - With `nbds` schemes, the TLS parameters libnbd understands:
//!   `tls-psk-file=FILE`, `tls-certificates=DIR`, `tls-username=NAME`,
//!   `tls-hostname=NAME` and `tls-verify-peer=0|1|false|true` (see
//!   [`TlsParams`]). On plaintext schemes they are refused, as is any other
//!   parameter, and fragments: refused rather than silently dropped, as the
//!   URI document asks ("SHOULD be diagnosed").
//!
//! [`NbdUri`]'s `Display` writes a URI that parses back to the same value;
//! the port is always written out so logs are unambiguous.

use std::ffi::OsString;
use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::PathBuf;

use crate::proto::MAX_STRING;

/// The port IANA assigned to NBD.
pub const DEFAULT_PORT: u16 = 10809;

/// Where an NBD server listens.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Endpoint {
    /// A host name or IP address (IPv6 without brackets) and a port.
    Tcp { host: String, port: u16 },
    /// A unix socket path; a leading NUL byte means the abstract namespace.
    Unix(PathBuf),
}

impl fmt::Display for Endpoint {
    /// `host:port`, `[v6]:port` or the socket path, for messages.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Endpoint::Tcp { host, port } if host.contains(':') => write!(f, "[{host}]:{port}"),
            Endpoint::Tcp { host, port } => write!(f, "{host}:{port}"),
            Endpoint::Unix(path) => write!(f, "{}", path.display()),
        }
    }
}

/// A parsed NBD URI.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct NbdUri {
    pub endpoint: Endpoint,
    /// The export name (may be empty: the server's default export).
    pub export: String,
    /// The scheme demands TLS (`nbds`, `nbds+unix`).
    pub tls: bool,
    /// TLS credentials and checks named in the URI (only with `tls`).
    pub tls_params: TlsParams,
}

/// The TLS query parameters of an `nbds` URI, as libnbd names them.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct TlsParams {
    /// `tls-psk-file=`: a `username:hexkey` key file.
    pub psk_file: Option<PathBuf>,
    /// `tls-certificates=`: a directory with `ca-cert.pem` (and optionally
    /// `client-cert.pem`, `client-key.pem`).
    pub certificates: Option<PathBuf>,
    /// The PSK user name: `user@` in the authority or `tls-username=`.
    pub username: Option<String>,
    /// `tls-hostname=`: the name the server certificate must carry
    /// (default: the URI host; none for unix sockets).
    pub hostname: Option<String>,
    /// `tls-verify-peer=`: check the server certificate (default yes).
    pub verify_peer: Option<bool>,
}

/// Why a string is not an NBD URI we can use.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum UriError {
    #[error("not a URI: expected SCHEME://..., e.g. nbd://host/export")]
    NotAUri,
    #[error("unknown scheme {0:?}: expected nbd, nbds, nbd+unix or nbds+unix")]
    Scheme(String),
    #[error("a TCP NBD URI needs a host, e.g. nbd://localhost/export")]
    MissingHost,
    #[error("invalid host {0:?}")]
    BadHost(String),
    #[error("invalid port {0:?}: expected a number from 1 to 65535")]
    BadPort(String),
    #[error("user info in the authority is the TLS user name; it needs nbds:// or nbds+unix://")]
    UserInfo,
    #[error("{0} is a TLS parameter; it needs nbds:// or nbds+unix://")]
    TlsParamWithoutTls(String),
    #[error("invalid value {value:?} for {param}: {expected}")]
    BadParam {
        param: String,
        value: String,
        expected: &'static str,
    },
    #[error("a unix-socket NBD URI takes no host (got {0:?}); use nbd+unix:///export?socket=PATH")]
    AuthorityWithUnix(String),
    #[error("a unix-socket NBD URI needs a socket parameter: nbd+unix:///export?socket=PATH")]
    MissingSocket,
    #[error("the socket parameter is only valid with nbd+unix:// or nbds+unix://")]
    SocketOnTcp,
    #[error("query parameter {0:?} given more than once")]
    DuplicateParam(String),
    #[error(
        "unsupported query parameter {0:?} (understood: socket, tls-psk-file, tls-certificates, tls-username, tls-hostname, tls-verify-peer)"
    )]
    UnknownParam(String),
    #[error("NBD URIs have no fragment (found '#')")]
    Fragment,
    #[error("bad percent-encoding in the {0}")]
    BadPercent(&'static str),
    #[error("the {0} is not valid UTF-8 once percent-decoded")]
    NotUtf8(&'static str),
    #[error("the export name contains a NUL byte")]
    NulInExport,
    #[error("the export name is longer than the protocol's {MAX_STRING}-byte limit")]
    ExportTooLong,
}

impl NbdUri {
    /// Parse an NBD URI; see the module documentation for what is accepted.
    pub fn parse(s: &str) -> Result<NbdUri, UriError> {
        let (scheme, rest) = s.split_once("://").ok_or(UriError::NotAUri)?;
        let (unix, tls) = match scheme.to_ascii_lowercase().as_str() {
            "nbd" => (false, false),
            "nbds" => (false, true),
            "nbd+unix" => (true, false),
            "nbds+unix" => (true, true),
            _ => return Err(UriError::Scheme(scheme.to_string())),
        };
        if rest.contains('#') {
            return Err(UriError::Fragment);
        }
        let (hier, query) = match rest.split_once('?') {
            Some((h, q)) => (h, Some(q)),
            None => (rest, None),
        };
        let (authority, path) = match hier.find('/') {
            Some(i) => hier.split_at(i),
            None => (hier, ""),
        };

        let export_bytes = percent_decode(path.strip_prefix('/').unwrap_or(path), "export name")?;
        if export_bytes.contains(&0) {
            return Err(UriError::NulInExport);
        }
        if export_bytes.len() > MAX_STRING {
            return Err(UriError::ExportTooLong);
        }
        let export =
            String::from_utf8(export_bytes).map_err(|_| UriError::NotUtf8("export name"))?;

        let mut socket: Option<PathBuf> = None;
        let mut p = TlsParams::default();
        let mut seen = std::collections::HashSet::new();
        for param in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
            let (key, value) = param.split_once('=').unwrap_or((param, ""));
            let key = String::from_utf8(percent_decode(key, "query")?)
                .map_err(|_| UriError::NotUtf8("query"))?;
            if !seen.insert(key.clone()) {
                return Err(UriError::DuplicateParam(key));
            }
            let path = || -> Result<PathBuf, UriError> {
                Ok(PathBuf::from(OsString::from_vec(percent_decode(
                    value, "query",
                )?)))
            };
            let text = || -> Result<String, UriError> {
                String::from_utf8(percent_decode(value, "query")?)
                    .map_err(|_| UriError::NotUtf8("query"))
            };
            if key.starts_with("tls-") && !tls {
                return Err(UriError::TlsParamWithoutTls(key));
            }
            match key.as_str() {
                "socket" => socket = Some(path()?),
                "tls-psk-file" => p.psk_file = Some(path()?),
                "tls-certificates" => p.certificates = Some(path()?),
                "tls-username" => p.username = Some(text()?),
                "tls-hostname" => p.hostname = Some(text()?),
                "tls-verify-peer" => {
                    p.verify_peer = Some(match text()?.as_str() {
                        "1" | "true" | "yes" | "on" => true,
                        "0" | "false" | "no" | "off" => false,
                        v => {
                            return Err(UriError::BadParam {
                                param: key,
                                value: v.to_string(),
                                expected: "0 or 1",
                            });
                        }
                    })
                }
                _ => return Err(UriError::UnknownParam(key)),
            }
        }

        // `user@` is the TLS user name.
        let authority = match authority.rsplit_once('@') {
            Some(_) if !tls => return Err(UriError::UserInfo),
            Some((user, host)) => {
                let user = String::from_utf8(percent_decode(user, "user name")?)
                    .map_err(|_| UriError::NotUtf8("user name"))?;
                if p.username.is_some() {
                    return Err(UriError::DuplicateParam("tls-username".into()));
                }
                p.username = Some(user);
                host
            }
            None => authority,
        };

        let endpoint = if unix {
            if !authority.is_empty() {
                return Err(UriError::AuthorityWithUnix(authority.to_string()));
            }
            match socket {
                Some(p) if !p.as_os_str().is_empty() => Endpoint::Unix(p),
                _ => return Err(UriError::MissingSocket),
            }
        } else {
            if socket.is_some() {
                return Err(UriError::SocketOnTcp);
            }
            let (host, port) = parse_authority(authority)?;
            Endpoint::Tcp { host, port }
        };
        Ok(NbdUri {
            endpoint,
            export,
            tls,
            tls_params: p,
        })
    }

    /// What the client needs to connect with TLS, or `None` for a
    /// plaintext URI. The certificate name defaults to the URI host.
    pub fn client_tls(&self) -> Option<crate::tls::ClientTlsConfig> {
        if !self.tls {
            return None;
        }
        let p = &self.tls_params;
        let host = match &self.endpoint {
            Endpoint::Tcp { host, .. } => Some(host.clone()),
            Endpoint::Unix(_) => None,
        };
        Some(crate::tls::ClientTlsConfig {
            psk: p.psk_file.clone(),
            username: p.username.clone(),
            certificates: p.certificates.clone(),
            hostname: p.hostname.clone().or(host),
            verify_peer: p.verify_peer.unwrap_or(true),
        })
    }
}

impl std::str::FromStr for NbdUri {
    type Err = UriError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        NbdUri::parse(s)
    }
}

impl fmt::Display for NbdUri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = if self.tls { "nbds" } else { "nbd" };
        let mut sep = '?';
        match &self.endpoint {
            Endpoint::Tcp { .. } => {
                write!(f, "{s}://{}/", self.endpoint)?;
                write_encoded(f, self.export.as_bytes())?;
            }
            Endpoint::Unix(path) => {
                write!(f, "{s}+unix:///")?;
                write_encoded(f, self.export.as_bytes())?;
                f.write_str("?socket=")?;
                write_encoded(f, path.as_os_str().as_bytes())?;
                sep = '&';
            }
        }
        let p = &self.tls_params;
        let verify = p.verify_peer.map(|v| if v { "1" } else { "0" });
        for (key, value) in [
            (
                "tls-psk-file",
                p.psk_file.as_ref().map(|v| v.as_os_str().as_bytes()),
            ),
            (
                "tls-certificates",
                p.certificates.as_ref().map(|v| v.as_os_str().as_bytes()),
            ),
            ("tls-username", p.username.as_ref().map(|v| v.as_bytes())),
            ("tls-hostname", p.hostname.as_ref().map(|v| v.as_bytes())),
            ("tls-verify-peer", verify.map(str::as_bytes)),
        ] {
            if let Some(v) = value {
                write!(f, "{sep}{key}=")?;
                write_encoded(f, v)?;
                sep = '&';
            }
        }
        Ok(())
    }
}

/// `[userinfo@]host[:port]` with userinfo refused and host required.
fn parse_authority(authority: &str) -> Result<(String, u16), UriError> {
    if authority.contains('@') {
        return Err(UriError::UserInfo);
    }
    if authority.is_empty() {
        return Err(UriError::MissingHost);
    }
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let (addr, after) = v6
            .split_once(']')
            .ok_or_else(|| UriError::BadHost(authority.to_string()))?;
        let addr: Ipv6Addr = addr
            .parse()
            .map_err(|_| UriError::BadHost(authority.to_string()))?;
        let port = match after {
            "" => None,
            p => Some(
                p.strip_prefix(':')
                    .ok_or_else(|| UriError::BadHost(authority.to_string()))?,
            ),
        };
        (addr.to_string(), port)
    } else {
        let (host, port) = match authority.split_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
        };
        if host.is_empty() {
            return Err(UriError::MissingHost);
        }
        // A reg-name or IPv4 literal; we do not percent-decode host names.
        let ok = host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-._~".contains(&b));
        if !ok {
            return Err(UriError::BadHost(host.to_string()));
        }
        // Canonicalise IPv4 literals ("127.000.0.1" is not one, and is
        // refused by the resolver later anyway).
        let host = match host.parse::<Ipv4Addr>() {
            Ok(v4) => v4.to_string(),
            Err(_) => host.to_string(),
        };
        (host, port)
    };
    let port = match port {
        // RFC 3986 allows an empty port: it means the default.
        None | Some("") => DEFAULT_PORT,
        Some(p) => match p.parse::<u16>() {
            Ok(n) if n != 0 && p.bytes().all(|b| b.is_ascii_digit()) => n,
            _ => return Err(UriError::BadPort(p.to_string())),
        },
    };
    Ok((host, port))
}

fn percent_decode(s: &str, what: &'static str) -> Result<Vec<u8>, UriError> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = b.get(i + 1..i + 3).ok_or(UriError::BadPercent(what))?;
            let hi = hex_value(hex[0]).ok_or(UriError::BadPercent(what))?;
            let lo = hex_value(hex[1]).ok_or(UriError::BadPercent(what))?;
            out.push(hi << 4 | lo);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    Ok(out)
}

fn hex_value(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

/// Percent-encode everything but unreserved characters and `/`.
fn write_encoded(f: &mut fmt::Formatter<'_>, bytes: &[u8]) -> fmt::Result {
    for &b in bytes {
        if b.is_ascii_alphanumeric() || b"-._~/".contains(&b) {
            write!(f, "{}", b as char)?;
        } else {
            write!(f, "%{b:02X}")?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tcp(host: &str, port: u16) -> Endpoint {
        Endpoint::Tcp {
            host: host.into(),
            port,
        }
    }

    #[test]
    fn export_names_from_the_uri_document_examples() {
        for (uri, export) in [
            ("nbd://example.com/disk", "disk"),
            ("nbd+unix:///disk?socket=sock", "disk"),
            ("nbd://example.com/", ""),
            ("nbd://example.com", ""),
            ("nbd://example.com//disk", "/disk"),
            ("nbd://example.com/hello%20world", "hello world"),
        ] {
            let u = NbdUri::parse(uri).unwrap_or_else(|e| panic!("{uri}: {e}"));
            assert_eq!(u.export, export, "{uri}");
        }
    }

    #[test]
    fn tcp_uri_defaults_to_port_10809() {
        let u = NbdUri::parse("nbd://example.com/disk").unwrap();
        assert_eq!(u.endpoint, tcp("example.com", DEFAULT_PORT));
        assert!(!u.tls);
    }

    #[test]
    fn tcp_uri_with_explicit_port_uses_it() {
        let u = NbdUri::parse("nbd://example.com:10810/export").unwrap();
        assert_eq!(u.endpoint, tcp("example.com", 10810));
        assert_eq!(u.export, "export");
    }

    #[test]
    fn empty_port_means_the_default() {
        let u = NbdUri::parse("nbd://h:/").unwrap();
        assert_eq!(u.endpoint, tcp("h", DEFAULT_PORT));
    }

    #[test]
    fn ipv6_literal_is_unbracketed_in_the_endpoint() {
        let u = NbdUri::parse("nbd://[::1]:1234/x").unwrap();
        assert_eq!(u.endpoint, tcp("::1", 1234));
        let u = NbdUri::parse("nbd://[fe80::1]").unwrap();
        assert_eq!(u.endpoint, tcp("fe80::1", DEFAULT_PORT));
    }

    #[test]
    fn unix_uri_takes_its_socket_from_the_query() {
        let u = NbdUri::parse("nbd+unix:///disk?socket=/run/nbd%20x.sock").unwrap();
        assert_eq!(u.endpoint, Endpoint::Unix("/run/nbd x.sock".into()));
        assert_eq!(u.export, "disk");
    }

    #[test]
    fn abstract_socket_keeps_its_leading_nul() {
        let u = NbdUri::parse("nbd+unix:///?socket=%00/abstract").unwrap();
        assert_eq!(
            u.endpoint,
            Endpoint::Unix(PathBuf::from(OsString::from_vec(b"\0/abstract".to_vec())))
        );
        assert_eq!(u.export, "");
    }

    #[test]
    fn tls_parameters_and_user_name_are_read_from_nbds_uris() {
        let u = NbdUri::parse(
            "nbds://alice@h:10810/e?tls-psk-file=/k/keys.psk&tls-hostname=srv&tls-verify-peer=0",
        )
        .unwrap();
        assert_eq!(u.endpoint, tcp("h", 10810));
        assert_eq!(u.tls_params.username.as_deref(), Some("alice"));
        assert_eq!(
            u.tls_params.psk_file.as_deref(),
            Some(std::path::Path::new("/k/keys.psk"))
        );
        let c = u.client_tls().unwrap();
        assert_eq!(c.hostname.as_deref(), Some("srv"));
        assert!(!c.verify_peer);
        assert_eq!(NbdUri::parse(&u.to_string()).unwrap(), u);

        let u = NbdUri::parse("nbds+unix:///e?socket=/s&tls-certificates=/pki").unwrap();
        let c = u.client_tls().unwrap();
        assert_eq!(c.hostname, None);
        assert!(c.verify_peer);
        assert_eq!(NbdUri::parse(&u.to_string()).unwrap(), u);
        assert_eq!(NbdUri::parse("nbd://h/e").unwrap().client_tls(), None);
    }

    #[test]
    fn tls_parameters_on_plaintext_uris_are_refused() {
        assert_eq!(
            NbdUri::parse("nbd://h/e?tls-psk-file=k").unwrap_err(),
            UriError::TlsParamWithoutTls("tls-psk-file".into())
        );
        assert!(matches!(
            NbdUri::parse("nbds://h/e?tls-verify-peer=maybe").unwrap_err(),
            UriError::BadParam { .. }
        ));
    }

    #[test]
    fn tls_schemes_set_tls() {
        assert!(NbdUri::parse("nbds://h/e").unwrap().tls);
        assert!(NbdUri::parse("nbds+unix:///e?socket=s").unwrap().tls);
        assert!(NbdUri::parse("NBDS://h/e").unwrap().tls);
    }

    #[test]
    fn malformed_uris_are_refused_with_a_named_reason() {
        for (uri, err) in [
            ("/dev/sda", UriError::NotAUri),
            ("http://h/e", UriError::Scheme("http".into())),
            ("nbd:///e", UriError::MissingHost),
            ("nbd://:10809/e", UriError::MissingHost),
            ("nbd://h:0/e", UriError::BadPort("0".into())),
            ("nbd://h:65536/e", UriError::BadPort("65536".into())),
            ("nbd://h:+80/e", UriError::BadPort("+80".into())),
            ("nbd://h:x/e", UriError::BadPort("x".into())),
            ("nbd://[::1/e", UriError::BadHost("[::1".into())),
            ("nbd://[nope]/e", UriError::BadHost("[nope]".into())),
            ("nbd://a:b:c/e", UriError::BadPort("b:c".into())),
            ("nbd://h%20x/e", UriError::BadHost("h%20x".into())),
            ("nbd://user@h/e", UriError::UserInfo),
            (
                "nbd+unix://h/e?socket=s",
                UriError::AuthorityWithUnix("h".into()),
            ),
            ("nbd+unix:///e", UriError::MissingSocket),
            ("nbd+unix:///e?socket=", UriError::MissingSocket),
            ("nbd://h/e?socket=s", UriError::SocketOnTcp),
            (
                "nbd+unix:///e?socket=a&socket=b",
                UriError::DuplicateParam("socket".into()),
            ),
            (
                "nbd+unix:///e?socket=s&tls-type=x509",
                UriError::TlsParamWithoutTls("tls-type".into()),
            ),
            (
                "nbds+unix:///e?socket=s&tls-type=x509",
                UriError::UnknownParam("tls-type".into()),
            ),
            (
                "nbds://alice@h/e?tls-username=bob",
                UriError::DuplicateParam("tls-username".into()),
            ),
            ("nbd://h/e#frag", UriError::Fragment),
            ("nbd://h/e%zz", UriError::BadPercent("export name")),
            ("nbd://h/e%2", UriError::BadPercent("export name")),
            ("nbd://h/e%00", UriError::NulInExport),
            ("nbd://h/%ff", UriError::NotUtf8("export name")),
        ] {
            assert_eq!(NbdUri::parse(uri), Err(err), "{uri}");
        }
    }

    #[test]
    fn export_longer_than_4096_bytes_is_refused() {
        let uri = format!("nbd://h/{}", "a".repeat(MAX_STRING + 1));
        assert_eq!(NbdUri::parse(&uri), Err(UriError::ExportTooLong));
    }

    #[test]
    fn display_writes_a_uri_that_parses_back_to_the_same_value() {
        for uri in [
            "nbd://example.com/disk",
            "nbd://example.com",
            "nbd://example.com//disk",
            "nbd://example.com/hello%20world",
            "nbd://[::1]:1234/x",
            "nbds://10.0.0.1:99/a%3Fb%23c%25",
            "nbd+unix:///disk?socket=/tmp/a%20b%26c",
            "nbds+unix:///?socket=%00/abstract",
            "nbd://h/caf%C3%A9",
        ] {
            let u = NbdUri::parse(uri).unwrap();
            let shown = u.to_string();
            assert_eq!(NbdUri::parse(&shown), Ok(u), "{uri} -> {shown}");
        }
    }

    #[test]
    fn display_of_a_simple_uri_is_readable() {
        let u = NbdUri::parse("nbd://example.com/hello%20world").unwrap();
        assert_eq!(u.to_string(), "nbd://example.com:10809/hello%20world");
        let u = NbdUri::parse("nbd+unix:///disk?socket=/run/a.sock").unwrap();
        assert_eq!(u.to_string(), "nbd+unix:///disk?socket=/run/a.sock");
        let u = NbdUri::parse("nbd://[::1]/").unwrap();
        assert_eq!(u.to_string(), "nbd://[::1]:10809/");
    }
}
