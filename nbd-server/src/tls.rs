//! TLS for both sides of the protocol: credentials, and the upgrade of a
//! stream after `NBD_OPT_STARTTLS`.
//!
//! One stack, OpenSSL (through `tokio-openssl`), does both kinds of
//! credentials the other NBD tools use, and interoperates with the GnuTLS
//! inside nbdkit, qemu and libnbd:
//!
//! - **PSK**: a key file of `username:hexkey` lines, as GnuTLS `psktool`
//!   writes it and nbdkit (`--tls-psk`), qemu (`tls-creds-psk`, file
//!   `keys.psk`) and libnbd (`tls-psk-file=`) read it. The server looks the
//!   client's identity up in the file; the client sends the first entry, or
//!   the one named by the URI's user name. With TLS 1.3 this is an external
//!   PSK with (EC)DHE (`psk_dhe_ke`), which GnuTLS negotiates by default.
//! - **X.509**: a directory holding `ca-cert.pem`, `server-cert.pem` and
//!   `server-key.pem` (server), or `ca-cert.pem` and optionally
//!   `client-cert.pem` + `client-key.pem` (client): the layout nbdkit, qemu
//!   and libnbd share. A server with `verify_peer` demands a client
//!   certificate signed by `ca-cert.pem`; a client always checks the
//!   server's chain, and its name when it knows one (the URI host, or
//!   `tls-hostname=`).
//!
//! Nothing here knows the NBD protocol: the handshake modules decide when to
//! upgrade, then call [`ServerTls::accept`] or [`ClientTls::connect`].

use std::fmt;
use std::io;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;

use openssl::error::ErrorStack;
use openssl::ssl::{
    Ssl, SslContext, SslContextBuilder, SslFiletype, SslMethod, SslMode, SslVerifyMode, SslVersion,
};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_openssl::SslStream;

/// Whether a server offers TLS, as nbdkit's `--tls` spells it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum TlsMode {
    /// No TLS: `NBD_OPT_STARTTLS` is refused with `NBD_REP_ERR_POLICY`.
    #[default]
    Off,
    /// TLS offered; plaintext clients are served too.
    On,
    /// TLS demanded: every option but `STARTTLS` and `ABORT` gets
    /// `NBD_REP_ERR_TLS_REQD` until the upgrade.
    Require,
}

impl std::str::FromStr for TlsMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "off" | "no" | "false" => Ok(TlsMode::Off),
            "on" | "yes" | "true" => Ok(TlsMode::On),
            "require" => Ok(TlsMode::Require),
            _ => Err(format!(
                "unknown TLS mode {s:?}: expected off, on or require"
            )),
        }
    }
}

impl fmt::Display for TlsMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TlsMode::Off => "off",
            TlsMode::On => "on",
            TlsMode::Require => "require",
        })
    }
}

/// Why TLS could not be set up or completed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    #[error("cannot read the PSK file {}", path.display())]
    ReadPsk {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("PSK file {}, line {line}: {reason} (expected username:hexkey, as psktool writes)", path.display())]
    PskSyntax {
        path: PathBuf,
        line: usize,
        reason: String,
    },
    #[error("PSK file {} holds no keys; create one with: psktool -u USER -p {}", path.display(), path.display())]
    PskEmpty { path: PathBuf },
    #[error("PSK file {} has no key for user {username:?}", path.display())]
    PskUnknownUser { path: PathBuf, username: String },
    #[error("cannot load {what} from {}: {reason}", path.display())]
    Credentials {
        what: &'static str,
        path: PathBuf,
        reason: String,
    },
    #[error("TLS configuration: {0}")]
    Config(String),
    #[error("OpenSSL setup failed: {0}")]
    Setup(#[from] ErrorStack),
    #[error("TLS handshake failed (wrong key or untrusted certificate?): {0}")]
    Handshake(String),
    /// With TLS 1.3 a client learns that the server refused its
    /// certificate only when the next read fails.
    #[error(
        "the server ended the session right after the TLS handshake ({0}): it may have refused our client certificate"
    )]
    Rejected(String),
}

/// A parsed PSK key file: `username:hexkey` per line.
#[derive(Clone)]
pub struct PskFile {
    path: PathBuf,
    entries: Vec<(String, Vec<u8>)>,
}

impl fmt::Debug for PskFile {
    /// Names the file and its users, never the keys.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PskFile")
            .field("path", &self.path)
            .field(
                "users",
                &self.entries.iter().map(|e| &e.0).collect::<Vec<_>>(),
            )
            .finish()
    }
}

/// Longest PSK we accept (OpenSSL's `PSK_MAX_PSK_LEN`).
const PSK_MAX: usize = 256;
/// Longest identity OpenSSL passes (`PSK_MAX_IDENTITY_LEN`).
const IDENTITY_MAX: usize = 128;

impl PskFile {
    pub fn load(path: &Path) -> Result<PskFile, TlsError> {
        let text = std::fs::read_to_string(path).map_err(|source| TlsError::ReadPsk {
            path: path.to_path_buf(),
            source,
        })?;
        PskFile::parse(&text, path)
    }

    /// Parse the text of a key file; `path` only names it in errors. Blank
    /// lines are skipped; anything else must be `username:hexkey`.
    pub fn parse(text: &str, path: &Path) -> Result<PskFile, TlsError> {
        let syntax = |line: usize, reason: String| TlsError::PskSyntax {
            path: path.to_path_buf(),
            line,
            reason,
        };
        let mut entries = Vec::new();
        for (i, raw) in text.lines().enumerate() {
            let line = i + 1;
            let l = raw.trim_end_matches('\r');
            if l.trim().is_empty() {
                continue;
            }
            let Some((user, hex)) = l.rsplit_once(':') else {
                return Err(syntax(line, "no ':' between user name and key".into()));
            };
            if user.is_empty() {
                return Err(syntax(line, "empty user name".into()));
            }
            if user.len() > IDENTITY_MAX {
                return Err(syntax(
                    line,
                    format!("user name longer than {IDENTITY_MAX} bytes"),
                ));
            }
            let key = decode_hex(hex.trim()).map_err(|r| syntax(line, r))?;
            if key.is_empty() {
                return Err(syntax(line, "empty key".into()));
            }
            if key.len() > PSK_MAX {
                return Err(syntax(line, format!("key longer than {PSK_MAX} bytes")));
            }
            entries.push((user.to_string(), key));
        }
        if entries.is_empty() {
            return Err(TlsError::PskEmpty {
                path: path.to_path_buf(),
            });
        }
        Ok(PskFile {
            path: path.to_path_buf(),
            entries,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The key of `username`, if the file has one.
    pub fn key(&self, username: &str) -> Option<&[u8]> {
        self.entries
            .iter()
            .find(|(u, _)| u == username)
            .map(|(_, k)| k.as_slice())
    }

    /// The entry a client uses: `username`'s, or the first.
    pub fn entry(&self, username: Option<&str>) -> Result<(&str, &[u8]), TlsError> {
        match username {
            Some(u) => self
                .entries
                .iter()
                .find(|(name, _)| name == u)
                .map(|(name, k)| (name.as_str(), k.as_slice()))
                .ok_or(TlsError::PskUnknownUser {
                    path: self.path.clone(),
                    username: u.to_string(),
                }),
            None => {
                let (u, k) = &self.entries[0];
                Ok((u.as_str(), k.as_slice()))
            }
        }
    }
}

fn decode_hex(s: &str) -> Result<Vec<u8>, String> {
    if s.len() % 2 != 0 {
        return Err("key has an odd number of hex digits".into());
    }
    s.as_bytes()
        .chunks(2)
        .map(|p| {
            let d = |c: u8| (c as char).to_digit(16);
            match (d(p[0]), d(p[1])) {
                (Some(h), Some(l)) => Ok(u8::try_from(h * 16 + l).expect("two hex digits")),
                _ => Err(format!(
                    "key is not hexadecimal (found {:?})",
                    String::from_utf8_lossy(p)
                )),
            }
        })
        .collect()
}

/// What a server is told on its command line.
#[derive(Clone, Debug, Default)]
pub struct ServerTlsConfig {
    pub mode: TlsMode,
    pub psk: Option<PathBuf>,
    pub certificates: Option<PathBuf>,
    /// X.509: demand a client certificate signed by `ca-cert.pem`.
    pub verify_peer: bool,
}

/// A server's TLS credentials, loaded once and shared by its connections.
#[derive(Clone)]
pub struct ServerTls {
    mode: TlsMode,
    ctx: Arc<SslContext>,
    kind: &'static str,
}

impl fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ServerTls({}, {})", self.mode, self.kind)
    }
}

impl ServerTls {
    /// Load the credentials `config` names. `Ok(None)` for `--tls off`.
    pub fn new(config: &ServerTlsConfig) -> Result<Option<ServerTls>, TlsError> {
        if config.mode == TlsMode::Off {
            return Ok(None);
        }
        let mut b = base_context()?;
        let kind = match (&config.psk, &config.certificates) {
            (Some(_), Some(_)) => {
                return Err(TlsError::Config(
                    "give either --tls-psk or --tls-certificates, not both".into(),
                ));
            }
            (None, None) => {
                return Err(TlsError::Config(format!(
                    "--tls {} needs credentials: --tls-psk FILE or --tls-certificates DIR",
                    config.mode
                )));
            }
            (Some(path), None) => {
                let psk = PskFile::load(path)?;
                set_psk_only(&mut b)?;
                b.set_psk_server_callback(move |_ssl, identity, out| {
                    let id = identity.map(String::from_utf8_lossy).unwrap_or_default();
                    match psk.key(&id) {
                        Some(k) if k.len() <= out.len() => {
                            out[..k.len()].copy_from_slice(k);
                            Ok(k.len())
                        }
                        _ => {
                            tracing::info!(identity = %id, "TLS-PSK client with an unknown identity");
                            Ok(0)
                        }
                    }
                });
                "psk"
            }
            (None, Some(dir)) => {
                let file = |name: &str| dir.join(name);
                let cert = file("server-cert.pem");
                b.set_certificate_chain_file(&cert)
                    .map_err(creds("the server certificate", cert.clone()))?;
                let key = file("server-key.pem");
                b.set_private_key_file(&key, SslFiletype::PEM)
                    .map_err(creds("the server key", key.clone()))?;
                b.check_private_key()
                    .map_err(creds("a key matching the certificate", key))?;
                let ca = file("ca-cert.pem");
                if config.verify_peer {
                    b.set_ca_file(&ca)
                        .map_err(creds("the CA certificate", ca.clone()))?;
                    b.set_verify(SslVerifyMode::PEER | SslVerifyMode::FAIL_IF_NO_PEER_CERT);
                } else {
                    b.set_verify(SslVerifyMode::NONE);
                }
                "x509"
            }
        };
        Ok(Some(ServerTls {
            mode: config.mode,
            ctx: Arc::new(b.build()),
            kind,
        }))
    }

    /// TLS demanded of every client (`--tls require`).
    pub fn required(&self) -> bool {
        self.mode == TlsMode::Require
    }

    /// `"psk"` or `"x509"`, for logs.
    pub fn kind(&self) -> &'static str {
        self.kind
    }

    /// Run the server side of the TLS handshake on `stream`.
    pub async fn accept<S>(&self, stream: S) -> Result<SslStream<S>, TlsError>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let ssl = Ssl::new(&self.ctx)?;
        let mut s = SslStream::new(ssl, stream)?;
        Pin::new(&mut s)
            .accept()
            .await
            .map_err(|e| TlsError::Handshake(describe(&e)))?;
        log_session("accepted", s.ssl());
        Ok(s)
    }
}

/// What a client is told: by the URI (`tls-psk-file=`, `tls-certificates=`,
/// `tls-hostname=`, `tls-verify-peer=`, the user name) or by flags.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct ClientTlsConfig {
    pub psk: Option<PathBuf>,
    pub username: Option<String>,
    pub certificates: Option<PathBuf>,
    /// The name to check the server certificate against; `None` checks the
    /// chain only.
    pub hostname: Option<String>,
    /// `false` skips the check of the server certificate (X.509 only).
    pub verify_peer: bool,
}

/// A client's TLS credentials, ready to upgrade connections.
#[derive(Clone)]
pub struct ClientTls {
    ctx: Arc<SslContext>,
    hostname: Option<String>,
    verify_peer: bool,
    kind: &'static str,
}

impl fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ClientTls({}, host {:?})", self.kind, self.hostname)
    }
}

impl ClientTls {
    /// Load the credentials `config` names. Without PSK or a certificate
    /// directory, the server certificate is checked against the system's
    /// trusted CAs.
    pub fn new(config: &ClientTlsConfig) -> Result<ClientTls, TlsError> {
        let mut b = base_context()?;
        let kind = match (&config.psk, &config.certificates) {
            (Some(_), Some(_)) => {
                return Err(TlsError::Config(
                    "give either a PSK file or a certificate directory, not both".into(),
                ));
            }
            (Some(path), None) => {
                let psk = PskFile::load(path)?;
                let (user, key) = psk.entry(config.username.as_deref())?;
                let (user, key) = (user.as_bytes().to_vec(), key.to_vec());
                set_psk_only(&mut b)?;
                b.set_psk_client_callback(move |_ssl, _hint, identity, out| {
                    if user.len() >= identity.len() || key.len() > out.len() {
                        return Ok(0);
                    }
                    identity[..user.len()].copy_from_slice(&user);
                    identity[user.len()] = 0;
                    out[..key.len()].copy_from_slice(&key);
                    Ok(key.len())
                });
                "psk"
            }
            (None, Some(dir)) => {
                let ca = dir.join("ca-cert.pem");
                if config.verify_peer {
                    b.set_ca_file(&ca)
                        .map_err(creds("the CA certificate", ca.clone()))?;
                }
                let (cert, key) = (dir.join("client-cert.pem"), dir.join("client-key.pem"));
                if cert.exists() && key.exists() {
                    b.set_certificate_chain_file(&cert)
                        .map_err(creds("the client certificate", cert.clone()))?;
                    b.set_private_key_file(&key, SslFiletype::PEM)
                        .map_err(creds("the client key", key.clone()))?;
                    b.check_private_key()
                        .map_err(creds("a key matching the certificate", key))?;
                }
                "x509"
            }
            (None, None) => {
                b.set_default_verify_paths()?;
                "x509"
            }
        };
        if kind == "x509" && config.verify_peer {
            b.set_verify(SslVerifyMode::PEER);
        } else {
            b.set_verify(SslVerifyMode::NONE);
        }
        Ok(ClientTls {
            ctx: Arc::new(b.build()),
            hostname: config.hostname.clone(),
            verify_peer: config.verify_peer,
            kind,
        })
    }

    /// Run the client side of the TLS handshake on `stream`.
    pub async fn connect<S>(&self, stream: S) -> Result<SslStream<S>, TlsError>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let mut ssl = Ssl::new(&self.ctx)?;
        if let Some(host) = &self.hostname {
            if let Ok(ip) = host.parse::<IpAddr>() {
                if self.verify_peer {
                    ssl.param_mut().set_ip(ip)?;
                }
            } else {
                ssl.set_hostname(host)?;
                if self.verify_peer {
                    ssl.param_mut().set_host(host)?;
                }
            }
        }
        let mut s = SslStream::new(ssl, stream)?;
        Pin::new(&mut s)
            .connect()
            .await
            .map_err(|e| TlsError::Handshake(describe(&e)))?;
        log_session("connected", s.ssl());
        Ok(s)
    }
}

fn log_session(what: &str, ssl: &openssl::ssl::SslRef) {
    tracing::debug!(
        version = ssl.version_str(),
        cipher = ssl.current_cipher().map(|c| c.name()).unwrap_or("?"),
        "TLS session {what}"
    );
}

/// TLS 1.2 or later; partial writes allowed so the async wrapper works.
fn base_context() -> Result<SslContextBuilder, TlsError> {
    let mut b = SslContext::builder(SslMethod::tls())?;
    b.set_min_proto_version(Some(SslVersion::TLS1_2))?;
    b.set_mode(SslMode::ACCEPT_MOVING_WRITE_BUFFER);
    Ok(b)
}

/// PSK needs cipher suites whose hash matches the key's (SHA-256 in TLS
/// 1.3, as GnuTLS binds external keys to it) and, in TLS 1.2, PSK suites,
/// preferring those with forward secrecy as GnuTLS does.
fn set_psk_only(b: &mut SslContextBuilder) -> Result<(), TlsError> {
    b.set_ciphersuites("TLS_AES_128_GCM_SHA256:TLS_CHACHA20_POLY1305_SHA256")?;
    // Our order, not GnuTLS's (which puts ChaCha20 first once AES-256 is
    // out): AES-GCM runs on the CPU's AES instructions.
    b.set_options(openssl::ssl::SslOptions::CIPHER_SERVER_PREFERENCE);
    b.set_cipher_list("ECDHE-PSK:DHE-PSK:PSK:!aNULL:!eNULL:!3DES:!RC4:!MD5")?;
    Ok(())
}

/// The error for a credential file that failed to load: "no such file"
/// when it is not there (the usual mistake), else OpenSSL's reasons, once
/// each.
fn creds(what: &'static str, path: PathBuf) -> impl FnOnce(ErrorStack) -> TlsError {
    move |stack| {
        let reason = if !path.exists() {
            "no such file (a certificate directory holds ca-cert.pem, and \
             server-cert.pem + server-key.pem or client-cert.pem + client-key.pem)"
                .to_string()
        } else {
            let mut reasons: Vec<&str> = Vec::new();
            for r in stack.errors().iter().filter_map(|e| e.reason()) {
                if !reasons.contains(&r) {
                    reasons.push(r);
                }
            }
            reasons.join("; ")
        };
        TlsError::Credentials { what, path, reason }
    }
}

/// An OpenSSL error as one line: the reason in the error stack, or the I/O
/// error under it.
fn describe(e: &openssl::ssl::Error) -> String {
    if let Some(stack) = e.ssl_error() {
        let reasons: Vec<String> = stack
            .errors()
            .iter()
            .map(|x| x.reason().unwrap_or("unknown").to_string())
            .collect();
        if !reasons.is_empty() {
            return reasons.join("; ");
        }
    }
    if let Some(io) = e.io_error() {
        return format!("connection closed during the TLS handshake: {io}");
    }
    match e.code() {
        openssl::ssl::ErrorCode::ZERO_RETURN | openssl::ssl::ErrorCode::SYSCALL => {
            "the peer closed the connection during the TLS handshake".into()
        }
        _ => e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<PskFile, TlsError> {
        PskFile::parse(text, Path::new("keys.psk"))
    }

    #[test]
    fn psk_file_as_psktool_writes_it_parses() {
        let f = parse("alice:0123456789abcdefABCDEF\nbob:ff00\n").unwrap();
        assert_eq!(
            f.key("alice").unwrap(),
            &[
                0x01, 0x23, 0x45, 0x67, 0x89, 0xab, 0xcd, 0xef, 0xab, 0xcd, 0xef
            ]
        );
        assert_eq!(f.entry(None).unwrap().0, "alice");
        assert_eq!(f.entry(Some("bob")).unwrap().1, &[0xff, 0x00]);
        assert!(matches!(
            f.entry(Some("carol")),
            Err(TlsError::PskUnknownUser { .. })
        ));
    }

    #[test]
    fn blank_lines_and_crlf_are_tolerated() {
        let f = parse("\nalice:00ff\r\n\n").unwrap();
        assert_eq!(f.key("alice").unwrap(), &[0, 0xff]);
    }

    #[test]
    fn malformed_psk_files_name_the_line_and_the_fault() {
        for (text, line, fault) in [
            ("alice\n", 1, "no ':'"),
            ("alice:00\nbob:xyz1\n", 2, "not hexadecimal"),
            ("alice:abc\n", 1, "odd number"),
            (":00ff\n", 1, "empty user name"),
            ("alice:\n", 1, "empty key"),
        ] {
            match parse(text) {
                Err(e @ TlsError::PskSyntax { line: l, .. }) => {
                    assert_eq!(l, line, "{text:?}");
                    let msg = e.to_string();
                    assert!(msg.contains(fault), "{text:?}: {msg}");
                    assert!(msg.contains("keys.psk"), "{msg}");
                }
                other => panic!("{text:?}: expected a syntax error, got {other:?}"),
            }
        }
    }

    #[test]
    fn empty_psk_file_is_refused_with_the_command_to_make_one() {
        let e = parse("\n\n").unwrap_err();
        assert!(matches!(e, TlsError::PskEmpty { .. }));
        assert!(e.to_string().contains("psktool"), "{e}");
    }

    #[test]
    fn debug_output_never_shows_keys() {
        let f = parse("alice:deadbeef\n").unwrap();
        let s = format!("{f:?}");
        assert!(s.contains("alice") && !s.contains("deadbeef"), "{s}");
    }

    #[test]
    fn tls_modes_parse_as_nbdkit_spells_them() {
        assert_eq!("require".parse::<TlsMode>().unwrap(), TlsMode::Require);
        assert_eq!("on".parse::<TlsMode>().unwrap(), TlsMode::On);
        assert_eq!("off".parse::<TlsMode>().unwrap(), TlsMode::Off);
        assert!("maybe".parse::<TlsMode>().is_err());
    }

    #[test]
    fn server_without_credentials_is_refused() {
        let e = ServerTls::new(&ServerTlsConfig {
            mode: TlsMode::Require,
            ..Default::default()
        })
        .unwrap_err();
        assert!(e.to_string().contains("--tls-psk"), "{e}");
        assert!(
            ServerTls::new(&ServerTlsConfig::default())
                .unwrap()
                .is_none()
        );
    }

    /// Our server and our client agree over PSK, and a wrong key fails the
    /// handshake on both sides rather than falling back to anything.
    #[tokio::test]
    async fn psk_handshake_between_our_sides_and_a_wrong_key_fails() {
        let dir = tempfile::tempdir().unwrap();
        let good = dir.path().join("good.psk");
        let bad = dir.path().join("bad.psk");
        std::fs::write(&good, "alice:000102030405060708090a0b0c0d0e0f\n").unwrap();
        std::fs::write(&bad, "alice:ff0102030405060708090a0b0c0d0e0f\n").unwrap();
        let server = ServerTls::new(&ServerTlsConfig {
            mode: TlsMode::Require,
            psk: Some(good.clone()),
            ..Default::default()
        })
        .unwrap()
        .unwrap();
        for (key, ok) in [(good, true), (bad, false)] {
            let client = ClientTls::new(&ClientTlsConfig {
                psk: Some(key),
                verify_peer: true,
                ..Default::default()
            })
            .unwrap();
            let (a, b) = tokio::io::duplex(1 << 16);
            // Both ends stay alive until both handshakes are over.
            let (c, s) = tokio::join!(client.connect(b), server.accept(a));
            let (c, s) = (c.map(|_| ()), s.map(|_| ()));
            assert_eq!(
                (c.is_ok(), s.is_ok()),
                (ok, ok),
                "client {c:?} server {s:?}"
            );
        }
    }
}
