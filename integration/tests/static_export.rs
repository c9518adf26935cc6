//! The static `stream` (`dist/build-static-export`, issue 18) serving
//! `stream export` from an empty chroot: a directory holding only the
//! binary and the disk image, no `/lib`, `/etc`, `/dev` or `/proc`, and no
//! environment but `RUST_LOG`. Whatever the binary needed from the system
//! at run time (a shared library, the dynamic loader, a device node, a
//! config file) would be missing there, so a read that matches the image
//! byte for byte shows the legacy host needs nothing installed.
//!
//! Read from outside by nbdinfo and nbdcopy: the disk and one hash export
//! (`blake3/65536/`) over TCP on 127.0.0.1, then over a unix socket inside
//! the chroot with TLS-PSK, and over TCP with X.509 certificates; the key
//! and certificate files are the only other files a chroot gets, since
//! `stream export` reads them at start. SIGTERM still stops it cleanly.
//! Host names resolve through the files and dns services glibc has built
//! in: a name in the chroot's `/etc/hosts` works, one found nowhere fails
//! with the resolver's message (docs/static-export.md).
//!
//! Before any of it, the binary must have no ELF interpreter and `ldd`
//! must list no library. It is built by `dist/build-static-export` on
//! first use (about 3 minutes from clean on 2 busy cores, a second when
//! fresh), or taken from `STREAM_STATIC_BIN`. chroot(2) needs root.

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use integration::binary::{without_package_env, workspace_root};
use integration::image::{dense_file, read_file};
use integration::server::{Addr, READY_TIMEOUT, parse_uri, read_uri_line};
use integration::tls::{Pki, psk_file};
use integration::{require_tool, run, run_ok};
use test_support::child::ChildGuard;

const T: Duration = Duration::from_secs(60);
/// Not a multiple of the 64 KiB chunk: the last hash covers a short chunk.
const SIZE: u64 = 5 * 1024 * 1024 + 4096;
const CHUNK: usize = 65536;

/// The static binary: `STREAM_STATIC_BIN`, else built once per test
/// process by `dist/build-static-export`.
fn static_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let bin = match std::env::var_os("STREAM_STATIC_BIN") {
            Some(bin) => workspace_root().join(PathBuf::from(bin)),
            None => {
                let script = workspace_root().join("dist/build-static-export");
                let mut cmd = Command::new(&script);
                cmd.current_dir(workspace_root());
                without_package_env(&mut cmd);
                // A cold build of the whole tree: 3 minutes on 2 busy cores.
                let out = run(&mut cmd, Duration::from_secs(1200));
                assert!(out.status.success(), "{}", out.describe());
                let stdout = out.stdout_lossy();
                let path = stdout.lines().last().unwrap_or_default().trim();
                PathBuf::from(path)
            }
        };
        assert!(bin.is_file(), "no static binary at {}", bin.display());
        assert!(
            !has_interpreter(&bin),
            "{} names an ELF interpreter (a dynamic loader): it is not static",
            bin.display()
        );
        // What an operator would check: ldd lists no library (its words
        // for a static-pie, or for a non-PIE static executable).
        let ldd = require_tool("ldd", "libc-bin");
        let out = run(Command::new(ldd).arg(&bin), T);
        let said = format!("{}{}", out.stdout_lossy(), out.stderr_lossy());
        assert!(
            (said.contains("statically linked") || said.contains("not a dynamic executable"))
                && !said.contains("=>"),
            "{}",
            out.describe()
        );
        bin
    })
}

/// Whether the ELF file has a `PT_INTERP` program header, i.e. needs a
/// dynamic loader (and with it shared libraries) to run.
fn has_interpreter(bin: &Path) -> bool {
    let data = read_file(bin);
    assert!(
        data.len() > 64 && data[..4] == *b"\x7fELF" && data[4] == 2 && data[5] == 1,
        "{} is not a 64-bit little-endian ELF file",
        bin.display()
    );
    let u16_at = |at: usize| u16::from_le_bytes([data[at], data[at + 1]]) as usize;
    let phoff = u64::from_le_bytes(data[0x20..0x28].try_into().unwrap()) as usize;
    let (phentsize, phnum) = (u16_at(0x36), u16_at(0x38));
    const PT_INTERP: u32 = 3;
    (0..phnum).any(|i| {
        let at = phoff + i * phentsize;
        u32::from_le_bytes(data[at..at + 4].try_into().unwrap()) == PT_INTERP
    })
}

/// A root directory for chroot(2) holding the static binary as `/stream`
/// and a disk image as `/disk.img`, nothing else until a test adds a file.
struct Jail {
    root: tempfile::TempDir,
    /// Outside the root: the server's stderr.
    logs: tempfile::TempDir,
    disk: Vec<u8>,
}

impl Jail {
    fn new(seed: u64) -> Jail {
        // SAFETY: geteuid has no preconditions.
        let root_user = unsafe { libc::geteuid() } == 0;
        assert!(
            root_user,
            "the static export tests chroot(2) into an empty directory: run them as root"
        );
        let root = tempfile::Builder::new()
            .prefix("stream-jail-")
            .tempdir()
            .unwrap();
        std::fs::copy(static_bin(), root.path().join("stream")).unwrap();
        let disk = dense_file(&root.path().join("disk.img"), SIZE, seed);
        let logs = tempfile::tempdir().unwrap();
        let jail = Jail { root, logs, disk };
        assert_eq!(jail.entries(), ["disk.img", "stream"]);
        jail
    }

    fn path(&self, inside: &str) -> PathBuf {
        self.root.path().join(inside.trim_start_matches('/'))
    }

    /// Every path under the root, relative, sorted.
    fn entries(&self) -> Vec<String> {
        fn walk(dir: &Path, base: &Path, out: &mut Vec<String>) {
            for e in std::fs::read_dir(dir).unwrap() {
                let path = e.unwrap().path();
                out.push(path.strip_prefix(base).unwrap().display().to_string());
                if path.is_dir() {
                    walk(&path, base, out);
                }
            }
        }
        let mut out = Vec::new();
        walk(self.root.path(), self.root.path(), &mut out);
        out.sort();
        out
    }

    /// `/stream ARGS` inside the root, with an empty environment but
    /// `RUST_LOG`.
    fn command(&self, args: &[&str]) -> Command {
        let root = CString::new(self.root.path().as_os_str().as_bytes()).unwrap();
        let mut cmd = Command::new("/stream");
        cmd.args(args)
            .env_clear()
            .env("RUST_LOG", "debug")
            .stdin(Stdio::null());
        // SAFETY: runs between fork and exec and calls only chroot(2) and
        // chdir(2), both async-signal-safe; `root` was allocated before.
        unsafe {
            cmd.pre_exec(move || {
                if libc::chroot(root.as_ptr()) != 0 || libc::chdir(c"/".as_ptr()) != 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        cmd
    }

    /// Starts `/stream export ARGS` in the root and waits for its URI line.
    fn export(&self, args: &[&str]) -> Running {
        let log = self.logs.path().join("stderr.log");
        let mut cmd = self.command(&[&["export", "/disk.img"], args].concat());
        cmd.stdout(Stdio::piped())
            .stderr(File::create(&log).unwrap());
        let mut child = ChildGuard::spawn("static stream export", &mut cmd).unwrap();
        match read_uri_line(child.child_mut(), READY_TIMEOUT) {
            Ok(uri) => Running { child, uri, log },
            Err(why) => panic!(
                "the static stream export did not get ready: {why}\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            ),
        }
    }

    fn assert_copy_is_the_disk(&self, uri: &str) {
        let nbdcopy = require_tool("nbdcopy", "libnbd-bin");
        let out = self.logs.path().join("copy.img");
        run_ok(Command::new(nbdcopy).arg(uri).arg(&out), T);
        assert!(
            read_file(&out) == self.disk,
            "nbdcopy {uri} read other bytes than the image"
        );
    }
}

/// A server in a jail; stopped by PID on drop.
struct Running {
    child: ChildGuard,
    uri: String,
    log: PathBuf,
}

impl Running {
    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn tcp_port(&self) -> u16 {
        match parse_uri(&self.uri) {
            Some((Addr::Tcp(a), _)) if a.ip().is_loopback() && a.port() != 0 => a.port(),
            _ => panic!("{} is not a loopback TCP URI\n{}", self.uri, self.log()),
        }
    }

    /// SIGTERM ends it cleanly (status 0) within the guard's grace.
    fn stop_cleanly(self) {
        let log = self.log();
        let (status, termed) = self.child.stop().unwrap();
        assert!(
            termed && status.success(),
            "SIGTERM: {status}, termed {termed}\n{log}"
        );
    }
}

fn chunk_hashes(data: &[u8]) -> Vec<u8> {
    data.chunks(CHUNK)
        .flat_map(|c| *blake3::hash(c).as_bytes())
        .collect()
}

#[test]
fn from_an_empty_chroot_over_tcp_nbdinfo_and_nbdcopy_read_the_disk_and_its_hashes() {
    let nbdinfo = require_tool("nbdinfo", "libnbd-bin");
    let nbdcopy = require_tool("nbdcopy", "libnbd-bin");
    let jail = Jail::new(21);
    let server = jail.export(&["--listen", "127.0.0.1:0"]);
    server.tcp_port();

    let out = run_ok(Command::new(&nbdinfo).args(["--json", &server.uri]), T);
    let info: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let export = &info["exports"][0];
    assert_eq!(export["export-size"], SIZE, "{info:#}");
    assert_eq!(export["is_read_only"], true, "{info:#}");
    jail.assert_copy_is_the_disk(&server.uri);

    let hashes_uri = format!("{}/blake3/{CHUNK}/", server.uri.trim_end_matches('/'));
    let hashes = jail.logs.path().join("hashes");
    run_ok(Command::new(&nbdcopy).arg(&hashes_uri).arg(&hashes), T);
    assert!(
        read_file(&hashes) == chunk_hashes(&jail.disk),
        "{hashes_uri} differs from the blake3 of the image's 64 KiB chunks"
    );
    // It wrote nothing into its root.
    assert_eq!(jail.entries(), ["disk.img", "stream"]);
    server.stop_cleanly();
}

#[test]
fn from_an_empty_chroot_on_a_unix_socket_with_tls_psk_nbdcopy_reads_the_disk() {
    let jail = Jail::new(22);
    psk_file(jail.root.path(), "keys.psk", "alice");
    let server = jail.export(&["--socket", "/nbd.sock", "--tls-psk", "/keys.psk"]);
    // The URI names the socket as the server sees it, inside the root.
    match parse_uri(&server.uri) {
        Some((Addr::Unix(p), _)) if server.uri.starts_with("nbds+unix://") => {
            assert_eq!(p, Path::new("/nbd.sock"), "{}", server.uri)
        }
        _ => panic!("{} is not a TLS unix URI\n{}", server.uri, server.log()),
    }
    let uri = format!(
        "nbds+unix://alice@/?socket={}&tls-psk-file={}",
        jail.path("nbd.sock").display(),
        jail.path("keys.psk").display()
    );
    jail.assert_copy_is_the_disk(&uri);
    server.stop_cleanly();
}

#[test]
fn from_an_empty_chroot_with_x509_certificates_nbdcopy_reads_the_disk() {
    let jail = Jail::new(23);
    let pki = Pki::generate(jail.logs.path());
    std::fs::create_dir(jail.path("pki")).unwrap();
    for f in ["ca-cert.pem", "server-cert.pem", "server-key.pem"] {
        std::fs::copy(pki.server_dir().join(f), jail.path("pki").join(f)).unwrap();
    }
    let server = jail.export(&[
        "--listen",
        "127.0.0.1:0",
        "--tls-certificates",
        "/pki",
        "--tls-verify-peer",
    ]);
    let uri = format!(
        "nbds://127.0.0.1:{}/?tls-certificates={}",
        server.tcp_port(),
        pki.client_dir().display()
    );
    jail.assert_copy_is_the_disk(&uri);
    server.stop_cleanly();
}

/// glibc's files and dns services are built into the static binary; with
/// no `/etc` a name resolves nowhere (`.invalid` never resolves in DNS,
/// RFC 6761, whatever resolver the machine runs), with one line in the
/// chroot's `/etc/hosts` it does.
#[test]
fn in_a_chroot_a_host_name_resolves_through_its_etc_hosts_only() {
    const NAME: &str = "legacy-host.invalid";
    let jail = Jail::new(24);
    let listen = format!("{NAME}:0");
    let out = run(
        &mut jail.command(&["export", "/disk.img", "--listen", &listen]),
        T,
    );
    assert!(!out.status.success(), "{}", out.describe());
    let err = out.stderr_lossy();
    assert!(
        err.contains(&format!("cannot listen on {listen}"))
            && err.contains("name resolution")
            && err.contains("numeric address"),
        "{}",
        out.describe()
    );

    std::fs::create_dir(jail.path("etc")).unwrap();
    std::fs::write(jail.path("etc/hosts"), format!("127.0.0.1 {NAME}\n")).unwrap();
    std::fs::write(jail.path("etc/nsswitch.conf"), "hosts: files\n").unwrap();
    let server = jail.export(&["--listen", &listen]);
    assert!(
        server.uri.starts_with("nbd://127.0.0.1:"),
        "{}\n{}",
        server.uri,
        server.log()
    );
    server.tcp_port();
    jail.assert_copy_is_the_disk(&server.uri);
    server.stop_cleanly();
}
