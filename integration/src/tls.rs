//! TLS credentials made at test time, and nbdkit serving over TLS.
//!
//! [`Pki`] is a fresh CA with a server certificate (for `localhost` and
//! `127.0.0.1`) and a client certificate, made with the `openssl` command
//! into a temp directory and laid out as nbdkit, qemu and libnbd expect
//! them: `server/` (`ca-cert.pem`, `server-cert.pem`, `server-key.pem`),
//! `client/` (`ca-cert.pem`, `client-cert.pem`, `client-key.pem`),
//! `ca-only/` (`ca-cert.pem`, no client certificate) and `stranger/` (a
//! client certificate from another CA). Nothing is checked in, so nothing
//! expires. [`psk_file`] writes a `username:hexkey` file as `psktool` does.
//!
//! [`Nbdkit`] (from test-support) runs `nbdkit -f` on a unix socket with
//! the given arguments and kills it by PID on drop; readiness is the
//! socket accepting, polled with a deadline.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::tool::{require_tool, run_ok};

/// A test CA and the certificates it signed (see the module docs).
pub struct Pki {
    pub root: PathBuf,
}

impl Pki {
    /// Make the whole tree under `dir/pki`.
    pub fn generate(dir: &Path) -> Pki {
        let openssl = require_tool("openssl", "openssl");
        let root = dir.join("pki");
        let work = root.join("work");
        for d in ["server", "client", "ca-only", "stranger", "work"] {
            std::fs::create_dir_all(root.join(d)).unwrap();
        }
        let sh = |args: &[&str]| {
            run_ok(
                Command::new(&openssl).args(args).current_dir(&work),
                Duration::from_secs(60),
            );
        };
        let ca = |name: &str| {
            sh(&[
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-days",
                "3650",
                "-keyout",
                &format!("{name}-key.pem"),
                "-out",
                &format!("{name}-cert.pem"),
                "-subj",
                &format!("/CN={name}"),
                "-addext",
                "basicConstraints=critical,CA:TRUE",
                "-addext",
                "keyUsage=critical,keyCertSign,cRLSign",
            ]);
        };
        let leaf = |ca: &str, name: &str, ext: &str| {
            std::fs::write(work.join(format!("{name}.ext")), ext).unwrap();
            sh(&[
                "req",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-keyout",
                &format!("{name}-key.pem"),
                "-out",
                &format!("{name}.csr"),
                "-subj",
                &format!("/CN={name}"),
            ]);
            sh(&[
                "x509",
                "-req",
                "-in",
                &format!("{name}.csr"),
                "-CA",
                &format!("{ca}-cert.pem"),
                "-CAkey",
                &format!("{ca}-key.pem"),
                "-CAcreateserial",
                "-days",
                "3650",
                "-out",
                &format!("{name}-cert.pem"),
                "-extfile",
                &format!("{name}.ext"),
            ]);
        };
        ca("ca");
        ca("other-ca");
        let client_ext = "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\n\
                          extendedKeyUsage=clientAuth\n";
        leaf(
            "ca",
            "server",
            "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\n\
             extendedKeyUsage=serverAuth\nsubjectAltName=DNS:localhost,IP:127.0.0.1\n",
        );
        leaf("ca", "client", client_ext);
        leaf("other-ca", "stranger", client_ext);
        let copy = |from: &str, to: &str| {
            std::fs::copy(work.join(from), root.join(to)).unwrap();
        };
        copy("ca-cert.pem", "server/ca-cert.pem");
        copy("server-cert.pem", "server/server-cert.pem");
        copy("server-key.pem", "server/server-key.pem");
        copy("ca-cert.pem", "client/ca-cert.pem");
        copy("client-cert.pem", "client/client-cert.pem");
        copy("client-key.pem", "client/client-key.pem");
        copy("ca-cert.pem", "ca-only/ca-cert.pem");
        copy("ca-cert.pem", "stranger/ca-cert.pem");
        copy("stranger-cert.pem", "stranger/client-cert.pem");
        copy("stranger-key.pem", "stranger/client-key.pem");
        Pki { root }
    }

    /// What a server needs: `--tls-certificates` of ours and of nbdkit.
    pub fn server_dir(&self) -> PathBuf {
        self.root.join("server")
    }

    /// CA plus a client certificate the CA signed.
    pub fn client_dir(&self) -> PathBuf {
        self.root.join("client")
    }

    /// Only the CA: the client checks the server but shows no certificate.
    pub fn ca_only_dir(&self) -> PathBuf {
        self.root.join("ca-only")
    }

    /// The right CA, but a client certificate signed by another one.
    pub fn stranger_dir(&self) -> PathBuf {
        self.root.join("stranger")
    }
}

/// Write `dir/NAME` holding `user:KEY` with a random 32-byte key, in the
/// format `psktool -u user -p FILE` writes. Returns its path.
pub fn psk_file(dir: &Path, name: &str, user: &str) -> PathBuf {
    let mut key = [0u8; 32];
    let mut urandom = std::fs::File::open("/dev/urandom").unwrap();
    std::io::Read::read_exact(&mut urandom, &mut key).unwrap();
    let hex: String = key.iter().map(|b| format!("{b:02x}")).collect();
    let path = dir.join(name);
    std::fs::write(&path, format!("{user}:{hex}\n")).unwrap();
    path
}

/// A directory holding `keys.psk`, as qemu's `tls-creds-psk,dir=` wants it.
pub fn qemu_psk_dir(psk: &Path, dir: &Path) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::copy(psk, dir.join("keys.psk")).unwrap();
    dir.to_path_buf()
}

/// `nbdkit -f -U SOCK ARGS...` (`Nbdkit::spawn`), killed and reaped on
/// drop.
pub use test_support::nbdkit::Nbdkit;
