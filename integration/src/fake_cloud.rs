//! Keystone and Cinder, as far as `stream finalize --cinder-manage` talks
//! to them: an HTTP/1.1 server on `127.0.0.1:0` answering with the API
//! reference samples in `vendor-fixtures/openstack/` (never a live cloud).
//!
//! Unlike the scripted server of `cli/src/cinder/tests.rs`, this one keeps
//! state, so several `stream finalize` processes can run against it:
//!
//! | request                                   | answer                                          |
//! |-------------------------------------------|-------------------------------------------------|
//! | `POST /identity/v3/auth/tokens`           | the project-scoped token sample, catalog pointed here, `X-Subject-Token` |
//! | `GET /v3/{project}/volumes/detail?name=N` | the list sample, holding the volumes named N     |
//! | `POST /v3/{project}/manageable_volumes`   | records a volume (the manage sample's id, the name asked for), 202 with the manage sample in `creating`; or 500 when [`FakeCloud::fail_next_manage`] was set, the volume recorded all the same (an answer lost on the way) |
//! | `GET /v3/{project}/volumes/{id}`          | the show sample, `available`, or 404             |
//!
//! Every request is recorded ([`FakeCloud::requests`]).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;

use serde_json::{Value, json};

use crate::binary;

/// The project of the token sample.
pub const PROJECT_ID: &str = "a6944d763bf64ee6a275f1263fae0352";
/// The token of the api-ref's unscoped response sample.
pub const SUBJECT_TOKEN: &str = "ffe47524401e4d61adc7310f7e5b6191";
/// The id in the manage response sample: the volume a manage call creates.
pub const MANAGED_ID: &str = "23cf872b-c781-4cd4-847d-5f2ec8cbd91c";
/// The block-storage host the token sample's catalog names.
const SAMPLE_CINDER: &str = "http://23.253.248.171:8776";

/// One request as received.
#[derive(Clone, Debug)]
pub struct Recorded {
    pub method: String,
    /// Path and query.
    pub target: String,
    /// Header names lower-cased.
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Recorded {
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("request body is not JSON ({e}): {}", self.body))
    }
}

#[derive(Default)]
struct Cloud {
    requests: Vec<Recorded>,
    /// Volumes as the show sample, with id, name, status filled in.
    volumes: Vec<Value>,
    fail_next_manage: bool,
}

/// The running stand-in; stops on drop.
pub struct FakeCloud {
    /// `http://127.0.0.1:PORT`.
    pub base: String,
    cloud: Arc<Mutex<Cloud>>,
    stop: Arc<AtomicBool>,
    acceptor: Option<thread::JoinHandle<()>>,
}

fn fixture(path: &str) -> String {
    let p = binary::workspace_root()
        .join("vendor-fixtures/openstack")
        .join(path);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("read {}: {e}", p.display()))
}

fn sample(path: &str) -> Value {
    serde_json::from_str(&fixture(path)).unwrap_or_else(|e| panic!("{path} is not JSON: {e}"))
}

impl FakeCloud {
    pub fn start() -> FakeCloud {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind fake cloud");
        let base = format!("http://{}", listener.local_addr().expect("address"));
        let cloud = Arc::new(Mutex::new(Cloud::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let (c, s, b) = (cloud.clone(), stop.clone(), base.clone());
        let acceptor = thread::spawn(move || {
            for conn in listener.incoming() {
                if s.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(conn) = conn else { continue };
                if let Err(e) = serve(conn, &b, &c) {
                    eprintln!("fake cloud: {e}");
                }
            }
        });
        FakeCloud {
            base,
            cloud,
            stop,
            acceptor: Some(acceptor),
        }
    }

    /// `OS_AUTH_URL` for this cloud.
    pub fn auth_url(&self) -> String {
        format!("{}/identity/v3", self.base)
    }

    /// The password environment of an admin (as `admin-openrc` sets it).
    pub fn password_env(&self) -> Vec<(String, String)> {
        [
            ("OS_AUTH_URL", self.auth_url().as_str()),
            ("OS_USERNAME", "admin"),
            ("OS_PASSWORD", "devstacker"),
            ("OS_USER_DOMAIN_NAME", "Default"),
            ("OS_PROJECT_NAME", "admin"),
            ("OS_PROJECT_DOMAIN_ID", "default"),
        ]
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
    }

    /// The next manage call records its volume but answers 500.
    pub fn fail_next_manage(&self) {
        self.cloud.lock().expect("poisoned").fail_next_manage = true;
    }

    pub fn requests(&self) -> Vec<Recorded> {
        self.cloud.lock().expect("poisoned").requests.clone()
    }

    /// The manage-existing calls received.
    pub fn manage_calls(&self) -> Vec<Recorded> {
        self.requests()
            .into_iter()
            .filter(|r| r.method == "POST" && r.target.ends_with("/manageable_volumes"))
            .collect()
    }
}

impl Drop for FakeCloud {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(self.base.trim_start_matches("http://"));
        if let Some(a) = self.acceptor.take() {
            let _ = a.join();
        }
    }
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let Ok(v) = u8::from_str_radix(&s[i + 1..i + 3], 16) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(if b[i] == b'+' { b' ' } else { b[i] });
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn serve(conn: TcpStream, base: &str, cloud: &Mutex<Cloud>) -> std::io::Result<()> {
    let mut reader = BufReader::new(conn.try_clone()?);
    let mut line = String::new();
    if reader.read_line(&mut line)? == 0 {
        return Ok(());
    }
    let mut parts = line.split_whitespace();
    let method = parts.next().unwrap_or_default().to_owned();
    let target = parts.next().unwrap_or_default().to_owned();
    let mut headers = Vec::new();
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h)? == 0 {
            break;
        }
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            headers.push((k.trim().to_ascii_lowercase(), v.trim().to_owned()));
        }
    }
    let len: usize = headers
        .iter()
        .find(|(k, _)| k == "content-length")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0);
    let mut body = vec![0; len];
    reader.read_exact(&mut body)?;
    let req = Recorded {
        method,
        target,
        headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    };
    let (status, extra, body) = {
        let mut c = cloud.lock().expect("poisoned");
        c.requests.push(req.clone());
        answer(&req, base, &mut c)
    };
    let mut out = format!("HTTP/1.1 {status} Fake\r\nContent-Type: application/json\r\n");
    for (k, v) in extra {
        out.push_str(&format!("{k}: {v}\r\n"));
    }
    out.push_str(&format!(
        "Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    ));
    let mut conn = conn;
    conn.write_all(out.as_bytes())?;
    conn.flush()
}

fn fault(status: u16, kind: &str, message: &str) -> (u16, Vec<(String, String)>, String) {
    (
        status,
        Vec::new(),
        json!({ kind: { "code": status, "message": message } }).to_string(),
    )
}

fn answer(req: &Recorded, base: &str, c: &mut Cloud) -> (u16, Vec<(String, String)>, String) {
    let volumes = format!("/v3/{PROJECT_ID}/volumes");
    let (path, query) = req.target.split_once('?').unwrap_or((&req.target, ""));
    let authorized = req.header("x-auth-token") == Some(SUBJECT_TOKEN);
    match (req.method.as_str(), path) {
        ("POST", "/identity/v3/auth/tokens") => (
            201,
            vec![("X-Subject-Token".into(), SUBJECT_TOKEN.into())],
            fixture("keystone/auth-password-project-scoped-response+block-storage.json")
                .replace(SAMPLE_CINDER, base),
        ),
        _ if !authorized => fault(401, "unauthorized", "no or wrong X-Auth-Token"),
        ("GET", p) if p == format!("{volumes}/detail") => {
            let name = query
                .split('&')
                .find_map(|kv| kv.strip_prefix("name="))
                .map(percent_decode);
            let mut list = sample("cinder/volumes-list-detailed-response.json");
            list["volumes"] = Value::Array(
                c.volumes
                    .iter()
                    .filter(|v| name.is_none() || v["name"].as_str() == name.as_deref())
                    .cloned()
                    .collect(),
            );
            (200, Vec::new(), list.to_string())
        }
        ("GET", p) if p.starts_with(&format!("{volumes}/")) => {
            let id = &p[volumes.len() + 1..];
            match c.volumes.iter().find(|v| v["id"] == id) {
                Some(v) => (200, Vec::new(), json!({ "volume": v }).to_string()),
                None => fault(
                    404,
                    "itemNotFound",
                    &format!("Volume {id} could not be found."),
                ),
            }
        }
        ("POST", p) if p == format!("/v3/{PROJECT_ID}/manageable_volumes") => {
            let body: Value = serde_json::from_str(&req.body).unwrap_or(Value::Null);
            let asked = &body["volume"];
            let mut stored = sample("cinder/volume-show-response.json")["volume"].clone();
            stored["id"] = json!(MANAGED_ID);
            stored["name"] = asked["name"].clone();
            stored["status"] = json!("available");
            stored["bootable"] = json!(asked["bootable"] == true).to_string().into();
            c.volumes.push(stored);
            if std::mem::take(&mut c.fail_next_manage) {
                return fault(
                    500,
                    "computeFault",
                    "The server has either erred or is incapable of performing the requested operation.",
                );
            }
            let mut r = sample("cinder/volume-manage-response.json");
            r["volume"]["name"] = asked["name"].clone();
            (202, Vec::new(), r.to_string())
        }
        _ => fault(404, "itemNotFound", &format!("no route for {path}")),
    }
}
