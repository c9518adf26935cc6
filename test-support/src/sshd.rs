//! A real OpenSSH server (Debian's `openssh-server`) for the SSH source's
//! tests and benchmark, on `127.0.0.1`, with its own host key, one user key, and a
//! known_hosts file that trusts it; `sftp-server` is Debian's
//! `/usr/lib/openssh/sftp-server`, as on a legacy host. It runs as root
//! (the tests do) with `-D -e`, is ready when it prints that it listens,
//! and is stopped by PID on drop.

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::Duration;

use crate::child::ChildGuard;
use crate::tool::{require_tool, run_ok};

const READY: Duration = Duration::from_secs(20);

pub struct Sshd {
    pub port: u16,
    /// The client's private key (`?identity=`).
    pub identity: PathBuf,
    /// A known_hosts that trusts this server (`?known-hosts=`).
    pub known_hosts: PathBuf,
    /// The server's public host key, as `TYPE BASE64`.
    pub host_key_pub: String,
    _child: ChildGuard,
}

fn sshd_path() -> PathBuf {
    let p = PathBuf::from("/usr/sbin/sshd");
    if !p.exists() {
        panic!("/usr/sbin/sshd is missing: install the Debian package openssh-server");
    }
    p
}

impl Sshd {
    /// Start one in `dir` (keys and config are written there).
    pub fn start(dir: &Path) -> Sshd {
        Sshd::start_with(dir, true)
    }

    /// Start one; without `sftp` it offers no SFTP subsystem (a legacy
    /// host where it was turned off).
    pub fn start_with(dir: &Path, sftp: bool) -> Sshd {
        let keygen = require_tool("ssh-keygen", "openssh-client");
        require_tool("ssh", "openssh-client");
        let sftp_server = Path::new("/usr/lib/openssh/sftp-server");
        assert!(
            sftp_server.exists(),
            "{} is missing: install the Debian package openssh-sftp-server",
            sftp_server.display()
        );
        let dir = dir.join("sshd");
        std::fs::create_dir_all(&dir).unwrap();
        for name in ["host_key", "user_key"] {
            // Fresh keys each start (ssh-keygen asks before overwriting).
            for f in [name.to_string(), format!("{name}.pub")] {
                let _ = std::fs::remove_file(dir.join(f));
            }
            run_ok(
                Command::new(&keygen)
                    .args(["-q", "-t", "ed25519", "-N", "", "-f"])
                    .arg(dir.join(name)),
                Duration::from_secs(30),
            );
        }
        std::fs::copy(dir.join("user_key.pub"), dir.join("authorized_keys")).unwrap();
        // The privilege separation directory sshd insists on.
        std::fs::create_dir_all("/run/sshd").unwrap();
        // A free port: bind, learn, release (sshd cannot report port 0).
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let config = format!(
            "ListenAddress 127.0.0.1\nPort {port}\nHostKey {d}/host_key\n\
             AuthorizedKeysFile {d}/authorized_keys\nPasswordAuthentication no\n\
             KbdInteractiveAuthentication no\nPermitRootLogin prohibit-password\n\
             StrictModes no\nUsePAM no\nPidFile none\n{subsystem}",
            d = dir.display(),
            subsystem = match sftp {
                true => format!("Subsystem sftp {}\n", sftp_server.display()),
                false => String::new(),
            }
        );
        std::fs::write(dir.join("sshd_config"), config).unwrap();
        let mut cmd = Command::new(sshd_path());
        cmd.args(["-D", "-e", "-f"])
            .arg(dir.join("sshd_config"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = ChildGuard::spawn("sshd", &mut cmd).unwrap().kill_on_drop();
        let stderr = child.child_mut().stderr.take().unwrap();
        let log = dir.join("sshd.log");
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            let mut out = std::fs::File::create(log).unwrap();
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                use std::io::Write;
                let _ = writeln!(out, "{line}");
                if line.contains("Server listening on") {
                    let _ = tx.send(());
                }
            }
        });
        if rx.recv_timeout(READY).is_err() {
            panic!(
                "sshd did not listen on 127.0.0.1:{port} within {READY:?}: {}",
                std::fs::read_to_string(dir.join("sshd.log")).unwrap_or_default()
            );
        }
        let host_key_pub = std::fs::read_to_string(dir.join("host_key.pub"))
            .unwrap()
            .split_whitespace()
            .take(2)
            .collect::<Vec<_>>()
            .join(" ");
        let known_hosts = dir.join("known_hosts");
        std::fs::write(&known_hosts, format!("[127.0.0.1]:{port} {host_key_pub}\n")).unwrap();
        Sshd {
            port,
            identity: dir.join("user_key"),
            known_hosts,
            host_key_pub,
            _child: child,
        }
    }

    /// The master sshd's PID (each session runs in processes below it).
    pub fn pid(&self) -> u32 {
        self._child.pid()
    }

    /// `ssh://root@127.0.0.1:PORT/PATH?identity=...&known-hosts=...`.
    pub fn uri(&self, path: &Path) -> String {
        format!(
            "ssh://root@127.0.0.1:{}{}?identity={}&known-hosts={}",
            self.port,
            path.display(),
            self.identity.display(),
            self.known_hosts.display()
        )
    }

    /// The same through another port (a proxy in front of this server),
    /// with a known_hosts that trusts this server's key at that port.
    pub fn uri_via(&self, port: u16, path: &Path) -> String {
        let kh = self
            .known_hosts
            .with_file_name(format!("known_hosts.{port}"));
        std::fs::write(&kh, format!("[127.0.0.1]:{port} {}\n", self.host_key_pub)).unwrap();
        format!(
            "ssh://root@127.0.0.1:{port}{}?identity={}&known-hosts={}",
            path.display(),
            self.identity.display(),
            kh.display()
        )
    }
}
