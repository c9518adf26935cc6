//! The Cinder handoff's HTTPS: `OS_CACERT` is trusted, the system store
//! does not know a private CA, another CA is refused; all before anything
//! is changed. The bring-up's services speak plain HTTP, so the far end
//! here is a few lines of Python's `http.server` behind `ssl` with a
//! certificate from the test CA (`integration::tls::Pki`), answering every
//! request as Keystone answers a wrong password (401). What is under test
//! is the TLS client, not Keystone: a 401 *is* the proof the handshake
//! succeeded.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use integration::finalize::{self, Finalize};
use integration::start::mixed_image;
use integration::tls::Pki;
use integration::{Start, require_tool};
use test_support::child::ChildGuard;

const SERVER: &str = r#"
import http.server, ssl, sys
class H(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        self.rfile.read(int(self.headers.get('Content-Length', 0)))
        body = b'{"error": {"code": 401, "title": "Unauthorized", "message": "The request you have made requires authentication."}}'
        self.send_response(401)
        self.send_header('Content-Type', 'application/json')
        self.send_header('Content-Length', str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass
srv = http.server.HTTPServer(('127.0.0.1', 0), H)
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(sys.argv[1], sys.argv[2])
srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
print(srv.server_address[1], flush=True)
srv.serve_forever()
"#;

#[test]
fn os_cacert_is_trusted_and_unknown_cas_are_refused_before_any_change() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::generate(dir.path());
    let python = require_tool("python3", "python3");
    let server_dir = pki.server_dir();
    let mut guard = ChildGuard::spawn(
        "https stand-in",
        Command::new(python)
            .arg("-c")
            .arg(SERVER)
            .arg(server_dir.join("server-cert.pem"))
            .arg(server_dir.join("server-key.pem"))
            .stdout(Stdio::piped()),
    )
    .unwrap()
    .kill_on_drop();
    // Readiness: the port it prints once it listens.
    let stdout = guard.child_mut().stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = BufReader::new(stdout).read_line(&mut line);
        let _ = tx.send(line);
    });
    let port: u16 = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("the https stand-in printed no port within 30 s")
        .trim()
        .parse()
        .expect("a port number");

    // A finished-hydrating migration into a file: the Cinder step's checks
    // come before anything else, so the target kind does not matter here.
    let img = mixed_image(dir.path());
    let target = dir.path().join("target.img");
    let start = Start::new(&img.path, &target, dir.path()).rate_limit(None);
    let state = start.state_dir().to_path_buf();
    let mut running = start.spawn();
    running.wait_hydrated(Duration::from_secs(60));
    running.sigterm_and_wait(Duration::from_secs(30));
    let before = finalize::header(&state);

    let finalize_with = |cacert: Option<&std::path::Path>| {
        let mut f = Finalize::new(&state)
            .args(&["--cinder-manage", "host@lvm#lvm"])
            .env("OS_AUTH_URL", &format!("https://127.0.0.1:{port}/v3"))
            .env("OS_USER_ID", "u")
            .env("OS_PASSWORD", "p")
            .env("OS_PROJECT_ID", "p1");
        if let Some(c) = cacert {
            f = f.env("OS_CACERT", &c.display().to_string());
        }
        let t0 = Instant::now();
        let out = f.run_fails(Duration::from_secs(60));
        assert!(t0.elapsed() < Duration::from_secs(30), "{}", out.describe());
        assert_eq!(
            finalize::header(&state),
            before,
            "a refused login changed the state: {}",
            out.describe()
        );
        let err = out.stderr_lossy();
        eprintln!("OS_CACERT={cacert:?}: {err}");
        err
    };

    // The test CA as OS_CACERT: the handshake succeeds, Keystone's 401 is read.
    let err = finalize_with(Some(&pki.ca_only_dir().join("ca-cert.pem")));
    assert!(
        err.contains("Keystone refused") && err.contains("HTTP 401"),
        "with OS_CACERT: {err}"
    );
    // The system store does not know the test CA.
    let err = finalize_with(None);
    assert!(
        !err.contains("HTTP 401") && err.contains("set OS_CACERT to the cloud's CA bundle"),
        "without OS_CACERT: {err}"
    );
    // Another CA's certificate as OS_CACERT is no better.
    // (`work/other-ca-cert.pem`: the CA that signed the "stranger" client.)
    let err = finalize_with(Some(&pki.root.join("work/other-ca-cert.pem")));
    assert!(
        !err.contains("HTTP 401") && err.contains("not signed by a CA in OS_CACERT"),
        "with another CA: {err}"
    );
    drop(guard);
}
