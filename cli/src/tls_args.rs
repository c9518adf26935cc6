//! TLS flags of the NBD listeners (`stream export`, `stream start`), spelt
//! as nbdkit spells them, and the refusal to serve plaintext beyond this
//! host.
//!
//! The source side of `stream start` takes its TLS settings from the source
//! URI instead (`nbds://HOST/EXPORT?tls-psk-file=FILE`, as libnbd and
//! `nbdinfo` read them): the URI is recorded in the migration's state, so
//! a resumed `start` and `finalize` reconnect with the same credentials.

use std::net::ToSocketAddrs;
use std::path::PathBuf;

use anyhow::bail;
use nbd_server::tls::{ServerTls, ServerTlsConfig, TlsMode};

#[derive(clap::Args, Clone, Debug, Default)]
pub struct TlsArgs {
    /// TLS on the NBD listener: off, on (offered, plaintext clients still
    /// served) or require [default: require when --tls-psk or
    /// --tls-certificates is given, else off].
    #[arg(long, value_name = "off|on|require")]
    pub tls: Option<TlsMode>,
    /// PSK key file (`username:hexkey` lines, as `psktool` writes them);
    /// clients prove they hold a key in it.
    #[arg(long, value_name = "FILE", conflicts_with = "tls_certificates")]
    pub tls_psk: Option<PathBuf>,
    /// Directory with ca-cert.pem, server-cert.pem and server-key.pem.
    #[arg(long, value_name = "DIR")]
    pub tls_certificates: Option<PathBuf>,
    /// With --tls-certificates: accept only clients presenting a
    /// certificate signed by ca-cert.pem.
    #[arg(long, requires = "tls_certificates")]
    pub tls_verify_peer: bool,
    /// Serve without TLS on an address other hosts can reach. Only for
    /// networks where every host is trusted.
    #[arg(long)]
    pub insecure: bool,
}

impl TlsArgs {
    /// The mode after defaults: credentials alone mean `require`.
    pub fn mode(&self) -> TlsMode {
        match self.tls {
            Some(m) => m,
            None if self.tls_psk.is_some() || self.tls_certificates.is_some() => TlsMode::Require,
            None => TlsMode::Off,
        }
    }

    /// Load the credentials; `None` without TLS.
    pub fn server_tls(&self) -> anyhow::Result<Option<ServerTls>> {
        let mode = self.mode();
        if mode == TlsMode::Off && (self.tls_psk.is_some() || self.tls_certificates.is_some()) {
            bail!("--tls off contradicts --tls-psk/--tls-certificates: drop one or the other");
        }
        Ok(ServerTls::new(&ServerTlsConfig {
            mode,
            psk: self.tls_psk.clone(),
            certificates: self.tls_certificates.clone(),
            verify_peer: self.tls_verify_peer,
        })?)
    }

    /// Refuse a TCP listener on a non-loopback address unless TLS is
    /// required or `--insecure` is given. `listen` is `HOST:PORT`; a host
    /// name counts as loopback only if every address it resolves to is.
    pub fn check_listen(&self, listen: &str) -> anyhow::Result<()> {
        if self.mode() == TlsMode::Require || self.insecure {
            return Ok(());
        }
        let addrs: Vec<_> = match listen.to_socket_addrs() {
            Ok(a) => a.collect(),
            // Binding will fail with its own message.
            Err(_) => return Ok(()),
        };
        if !addrs.is_empty() && addrs.iter().all(|a| a.ip().is_loopback()) {
            return Ok(());
        }
        let why = match self.mode() {
            TlsMode::On => "--tls on still serves plaintext clients",
            _ => "without TLS, anyone on the network can read and change the disk",
        };
        bail!(
            "refusing to serve NBD on {listen}, which other hosts can reach: {why}. \
             Use --tls-psk FILE or --tls-certificates DIR (TLS required), or --insecure \
             if every host on this network is trusted"
        )
    }
}

/// The URI clients use: `nbds` when the listener offers TLS.
pub fn client_uri(plain: String, tls: Option<&ServerTls>) -> String {
    match (tls, plain.strip_prefix("nbd")) {
        (Some(_), Some(rest)) => format!("nbds{rest}"),
        _ => plain,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(f: impl FnOnce(&mut TlsArgs)) -> TlsArgs {
        let mut a = TlsArgs::default();
        f(&mut a);
        a
    }

    #[test]
    fn loopback_listeners_need_no_tls() {
        let plain = TlsArgs::default();
        for addr in ["127.0.0.1:0", "127.1.2.3:10809", "[::1]:0", "localhost:0"] {
            plain.check_listen(addr).unwrap();
        }
    }

    #[test]
    fn wildcard_listener_without_tls_is_refused_with_the_way_out() {
        let e = TlsArgs::default()
            .check_listen("0.0.0.0:10809")
            .unwrap_err()
            .to_string();
        assert!(e.contains("0.0.0.0:10809"), "{e}");
        assert!(e.contains("--tls-psk") && e.contains("--insecure"), "{e}");
        let on = args(|a| a.tls = Some(TlsMode::On));
        assert!(on.check_listen("0.0.0.0:1").is_err());
    }

    #[test]
    fn insecure_or_required_tls_passes_the_check() {
        args(|a| a.insecure = true)
            .check_listen("0.0.0.0:10809")
            .unwrap();
        args(|a| a.tls_psk = Some("k.psk".into()))
            .check_listen("0.0.0.0:10809")
            .unwrap();
    }

    #[test]
    fn credentials_alone_mean_require_and_off_with_credentials_is_an_error() {
        assert_eq!(
            args(|a| a.tls_psk = Some("k".into())).mode(),
            TlsMode::Require
        );
        assert_eq!(TlsArgs::default().mode(), TlsMode::Off);
        let e = args(|a| {
            a.tls = Some(TlsMode::Off);
            a.tls_psk = Some("k".into());
        })
        .server_tls()
        .unwrap_err();
        assert!(e.to_string().contains("contradicts"), "{e}");
    }

    #[test]
    fn tls_uri_uses_the_nbds_scheme() {
        let dir = tempfile::tempdir().unwrap();
        let psk = dir.path().join("k.psk");
        std::fs::write(&psk, "alice:00ff\n").unwrap();
        let tls = args(|a| a.tls_psk = Some(psk)).server_tls().unwrap();
        assert_eq!(
            client_uri("nbd+unix:///?socket=/s".into(), tls.as_ref()),
            "nbds+unix:///?socket=/s"
        );
        assert_eq!(client_uri("nbd://h:1/".into(), None), "nbd://h:1/");
    }
}
