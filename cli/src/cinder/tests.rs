//! The handoff against a local HTTP server on 127.0.0.1:0 that answers with
//! the api-ref samples in `vendor-fixtures/openstack/` (never a live cloud),
//! and the LV preflight on loop devices and a fake `/dev`.

use std::collections::{HashMap, VecDeque};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};

use super::auth::{self, Service};
use super::*;

macro_rules! fixture {
    ($path:literal) => {
        include_str!(concat!("../../../vendor-fixtures/openstack/", $path))
    };
}

const TOKEN_RESPONSE: &str =
    fixture!("keystone/auth-password-project-scoped-response+block-storage.json");
const TOKEN_RESPONSE_NO_V3: &str = fixture!("keystone/auth-password-project-scoped-response.json");
const KEYSTONE_401: &str = fixture!("keystone/error-401-unauthorized.json");
const MANAGE_RESPONSE: &str = fixture!("cinder/volume-manage-response.json");
const SHOW_RESPONSE: &str = fixture!("cinder/volume-show-response.json");
const LIST_DETAIL_RESPONSE: &str = fixture!("cinder/volumes-list-detailed-response.json");
const CINDER_400: &str = fixture!("cinder/fault-400-host-not-found.json");

/// The token of the api-ref's `auth-password-user-name-unscoped-response-HTTP.txt`.
const SUBJECT_TOKEN: &str = "ffe47524401e4d61adc7310f7e5b6191";
/// The project of the token sample.
const PROJECT_ID: &str = "a6944d763bf64ee6a275f1263fae0352";
/// The block-storage host the samples' catalog points at; served locally.
const SAMPLE_CINDER: &str = "http://23.253.248.171:8776";
const PASSWORD: &str = "devstacker";

// ---- a scripted HTTP/1.1 server ----------------------------------------

#[derive(Debug, Clone)]
struct Recorded {
    method: String,
    /// Path and query, as sent.
    target: String,
    /// Names lower-cased.
    headers: HashMap<String, String>,
    body: String,
}

impl Recorded {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .get(&name.to_ascii_lowercase())
            .map(String::as_str)
    }
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).expect("request body is JSON")
    }
}

struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

fn reply(status: u16, body: &str) -> Reply {
    Reply {
        status,
        headers: vec![("Content-Type".into(), "application/json".into())],
        body: body.to_owned(),
    }
}

/// Answers each request with the next scripted reply, records every request.
struct FakeCloud {
    base: String,
    script: Arc<Mutex<VecDeque<Reply>>>,
    seen: Arc<Mutex<Vec<Recorded>>>,
}

impl FakeCloud {
    fn start() -> FakeCloud {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let script = Arc::new(Mutex::new(VecDeque::<Reply>::new()));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (s, r) = (script.clone(), seen.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                serve(conn, &s, &r);
            }
        });
        FakeCloud { base, script, seen }
    }

    fn push(&self, r: Reply) {
        self.script.lock().unwrap().push_back(r);
    }

    /// The Keystone token sample, its catalog pointed at this server.
    fn push_token(&self, sample: &str) {
        let mut r = reply(201, &sample.replace(SAMPLE_CINDER, &self.base));
        r.headers
            .push(("X-Subject-Token".into(), SUBJECT_TOKEN.into()));
        self.push(r);
    }

    fn requests(&self) -> Vec<Recorded> {
        self.seen.lock().unwrap().clone()
    }

    fn volume_url(&self) -> String {
        format!("/v3/{PROJECT_ID}")
    }
}

fn serve(conn: TcpStream, script: &Mutex<VecDeque<Reply>>, seen: &Mutex<Vec<Recorded>>) {
    let mut reader = BufReader::new(conn.try_clone().unwrap());
    let mut line = String::new();
    if reader.read_line(&mut line).unwrap_or(0) == 0 {
        return;
    }
    let mut parts = line.split_whitespace();
    let method = parts.next().unwrap_or_default().to_owned();
    let target = parts.next().unwrap_or_default().to_owned();
    let mut headers = HashMap::new();
    loop {
        let mut h = String::new();
        reader.read_line(&mut h).unwrap();
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        let (k, v) = h.split_once(':').unwrap();
        headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_owned());
    }
    let len: usize = headers
        .get("content-length")
        .map_or(0, |v| v.parse().unwrap());
    let mut body = vec![0; len];
    reader.read_exact(&mut body).unwrap();
    seen.lock().unwrap().push(Recorded {
        method,
        target,
        headers,
        body: String::from_utf8(body).unwrap(),
    });
    let r = script.lock().unwrap().pop_front().unwrap_or_else(|| {
        reply(
            500,
            "{\"computeFault\": {\"code\": 500, \"message\": \"unscripted request\"}}",
        )
    });
    let mut out = format!("HTTP/1.1 {} Scripted\r\n", r.status);
    for (k, v) in &r.headers {
        out.push_str(&format!("{k}: {v}\r\n"));
    }
    out.push_str(&format!(
        "Content-Length: {}\r\nConnection: close\r\n\r\n{}",
        r.body.len(),
        r.body
    ));
    let mut conn = conn;
    let _ = conn.write_all(out.as_bytes());
}

// ---- settings ----------------------------------------------------------

fn settings(cloud: &FakeCloud, vars: &[(&str, &str)]) -> Settings {
    let mut map: HashMap<String, String> = vars
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    map.entry("OS_AUTH_URL".into())
        .or_insert_with(|| format!("{}/identity/v3", cloud.base));
    Settings::from_lookup(|k| map.get(k).cloned()).unwrap()
}

const PASSWORD_ENV: &[(&str, &str)] = &[
    ("OS_USERNAME", "admin"),
    ("OS_PASSWORD", PASSWORD),
    ("OS_USER_DOMAIN_NAME", "Default"),
    ("OS_PROJECT_NAME", "admin"),
    ("OS_PROJECT_DOMAIN_ID", "default"),
];

/// A client logged in with the password, its Keystone request checked.
fn logged_in(cloud: &FakeCloud) -> Client {
    cloud.push_token(TOKEN_RESPONSE);
    let client = Client::from_settings(&settings(cloud, PASSWORD_ENV))
        .unwrap()
        .with_poll_interval(Duration::from_millis(5));
    let login = &cloud.requests()[0];
    assert_eq!(login.method, "POST");
    assert_eq!(login.target, "/identity/v3/auth/tokens");
    client
}

// ---- Keystone ----------------------------------------------------------

#[test]
fn password_auth_sends_user_and_project_with_their_domains() {
    let cloud = FakeCloud::start();
    let client = logged_in(&cloud);

    let req = &cloud.requests()[0];
    assert_eq!(req.header("content-type"), Some("application/json"));
    assert_eq!(req.header("x-auth-token"), None);
    assert_eq!(
        req.json(),
        json!({"auth": {
            "identity": {
                "methods": ["password"],
                "password": {"user": {
                    "name": "admin", "domain": {"name": "Default"}, "password": PASSWORD
                }}
            },
            "scope": {"project": {"name": "admin", "domain": {"id": "default"}}}
        }})
    );
    // The public RegionOne block-storage endpoint, project id included once.
    assert_eq!(client.endpoint(), format!("{}/v3/{PROJECT_ID}", cloud.base));
}

#[test]
fn password_auth_by_user_and_project_ids_needs_no_domains() {
    let cloud = FakeCloud::start();
    cloud.push_token(TOKEN_RESPONSE);
    let s = settings(
        &cloud,
        &[
            ("OS_USER_ID", "ee4dfb6e5540447cb3741905149d9b6e"),
            ("OS_PASSWORD", PASSWORD),
            ("OS_PROJECT_ID", PROJECT_ID),
        ],
    );
    Client::from_settings(&s).unwrap();
    assert_eq!(
        cloud.requests()[0].json()["auth"],
        json!({
            "identity": {"methods": ["password"], "password": {"user": {
                "id": "ee4dfb6e5540447cb3741905149d9b6e", "password": PASSWORD
            }}},
            "scope": {"project": {"id": PROJECT_ID}}
        })
    );
}

#[test]
fn token_auth_exchanges_os_token_for_a_project_scoped_one() {
    let cloud = FakeCloud::start();
    cloud.push_token(TOKEN_RESPONSE);
    let s = settings(
        &cloud,
        &[("OS_TOKEN", "old-token-123"), ("OS_PROJECT_ID", PROJECT_ID)],
    );
    let client = Client::from_settings(&s).unwrap();

    // The shape of the api-ref's auth-token-scoped-request.json.
    assert_eq!(
        cloud.requests()[0].json(),
        json!({"auth": {
            "identity": {"methods": ["token"], "token": {"id": "old-token-123"}},
            "scope": {"project": {"id": PROJECT_ID}}
        }})
    );
    // And Cinder then sees the new token, not the old one.
    cloud.push(reply(200, r#"{"volumes": []}"#));
    client.find_volume_by_name("x").unwrap();
    assert_eq!(
        cloud.requests()[1].header("x-auth-token"),
        Some(SUBJECT_TOKEN)
    );
}

#[test]
fn explicit_endpoint_and_token_skip_keystone() {
    let cloud = FakeCloud::start();
    let s = Settings::from_lookup(|k| match k {
        "OS_TOKEN" => Some("tok-1".into()),
        "OS_ENDPOINT" => Some(format!("{}/v3/", cloud.base)),
        "OS_PROJECT_ID" => Some(PROJECT_ID.into()),
        "OS_VOLUME_API_VERSION" => Some("3.44".into()),
        _ => None,
    })
    .unwrap();
    let client = Client::from_settings(&s).unwrap();
    cloud.push(reply(200, r#"{"volumes": []}"#));
    assert_eq!(client.find_volume_by_name("db01").unwrap(), None);

    let reqs = cloud.requests();
    assert_eq!(reqs.len(), 1, "no Keystone call");
    assert_eq!(
        reqs[0].target,
        format!("/v3/{PROJECT_ID}/volumes/detail?name=db01")
    );
    assert_eq!(reqs[0].header("x-auth-token"), Some("tok-1"));
    assert_eq!(reqs[0].header("openstack-api-version"), Some("volume 3.44"));
}

#[test]
fn keystone_401_says_the_credentials_were_refused_without_the_password() {
    let cloud = FakeCloud::start();
    cloud.push(reply(401, KEYSTONE_401));
    let err = Client::from_settings(&settings(&cloud, PASSWORD_ENV)).unwrap_err();

    assert!(matches!(err, Error::Unauthorized { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(msg.contains("HTTP 401"), "{msg}");
    assert!(
        msg.contains(&format!("{}/identity/v3/auth/tokens", cloud.base)),
        "{msg}"
    );
    assert!(
        msg.contains("The request you have made requires authentication."),
        "{msg}"
    );
    assert!(!msg.contains(PASSWORD), "{msg}");
    assert!(!format!("{err:?}").contains(PASSWORD));
}

#[test]
fn missing_settings_are_named() {
    let err = Settings::from_lookup(|k| match k {
        "OS_AUTH_URL" => Some("http://k/v3".into()),
        "OS_USERNAME" => Some("u".into()),
        "OS_PASSWORD" => Some("p".into()),
        _ => None,
    })
    .unwrap_err();
    assert!(err.to_string().contains("OS_USER_DOMAIN_NAME"), "{err}");
    let s = format!(
        "{:?}",
        Settings::from_lookup(|k| match k {
            "OS_AUTH_URL" => Some("http://k/v3".into()),
            "OS_USER_ID" => Some("u".into()),
            "OS_PASSWORD" => Some("hunter2".into()),
            "OS_PROJECT_ID" => Some("p".into()),
            _ => None,
        })
        .unwrap()
    );
    assert!(!s.contains("hunter2"), "Debug shows the password: {s}");
}

// ---- the catalog -------------------------------------------------------

fn catalog(sample: &str) -> Vec<Service> {
    let v: Value = serde_json::from_str(sample).unwrap();
    serde_json::from_value(v["token"]["catalog"].clone()).unwrap()
}

#[test]
fn catalog_lookup_by_interface_and_region() {
    let c = catalog(TOKEN_RESPONSE);
    let p = PROJECT_ID;
    assert_eq!(
        auth::select_endpoint(&c, "public", None).unwrap(),
        format!("http://23.253.248.171:8776/v3/{p}")
    );
    assert_eq!(
        auth::select_endpoint(&c, "internal", Some("RegionOne")).unwrap(),
        format!("http://10.0.0.5:8776/v3/{p}")
    );
    assert_eq!(
        auth::select_endpoint(&c, "public", Some("RegionTwo")).unwrap(),
        format!("http://23.253.248.172:8776/v3/{p}")
    );
    let err = auth::select_endpoint(&c, "admin", Some("RegionTwo")).unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("interface admin in region RegionTwo"), "{msg}");
    assert!(msg.contains("block-storage public in RegionTwo"), "{msg}");
}

#[test]
fn catalog_falls_back_to_volumev3() {
    let c: Vec<Service> = catalog(TOKEN_RESPONSE)
        .into_iter()
        .filter(|s| s.kind != "block-storage")
        .collect();
    assert_eq!(
        auth::select_endpoint(&c, "public", Some("RegionOne")).unwrap(),
        format!("http://23.253.248.171:8776/v3/{PROJECT_ID}")
    );
}

#[test]
fn catalog_without_cinder_v3_is_refused_by_name() {
    // The verbatim api-ref sample only has volumev2 and volume.
    let cloud = FakeCloud::start();
    cloud.push_token(TOKEN_RESPONSE_NO_V3);
    let err = Client::from_settings(&settings(&cloud, PASSWORD_ENV)).unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("no Cinder v3 service"), "{msg}");
    assert!(msg.contains("volumev2"), "{msg}");
}

#[test]
fn project_id_is_appended_only_when_missing() {
    assert_eq!(
        auth::with_project("http://c/v3/", Some("p1")),
        "http://c/v3/p1"
    );
    assert_eq!(
        auth::with_project("http://c/v3/p1", Some("p1")),
        "http://c/v3/p1"
    );
    assert_eq!(
        auth::with_project("http://c/v3/p1/", None),
        "http://c/v3/p1"
    );
    assert_eq!(
        auth::tokens_url("http://k:5000"),
        "http://k:5000/v3/auth/tokens"
    );
    assert_eq!(
        auth::tokens_url("http://k:5000/v3/"),
        "http://k:5000/v3/auth/tokens"
    );
}

// ---- Cinder ------------------------------------------------------------

#[test]
fn manage_existing_sends_host_ref_name_and_bootable() {
    let cloud = FakeCloud::start();
    let client = logged_in(&cloud);
    cloud.push(reply(202, MANAGE_RESPONSE));

    let mut request = ManageRequest::new("cloud1@lvm#lvm", "db01-root", "db01");
    request.bootable = true;
    request.description = Some("migrated by stream".into());
    let volume = client.manage_existing(&request).unwrap();

    let req = &cloud.requests()[1];
    assert_eq!(req.method, "POST");
    assert_eq!(
        req.target,
        format!("{}/manageable_volumes", cloud.volume_url())
    );
    assert_eq!(req.header("x-auth-token"), Some(SUBJECT_TOKEN));
    assert_eq!(req.header("content-type"), Some("application/json"));
    assert_eq!(req.header("accept"), Some("application/json"));
    assert_eq!(
        req.json(),
        json!({"volume": {
            "host": "cloud1@lvm#lvm",
            "ref": {"source-name": "db01-root"},
            "name": "db01",
            "bootable": true,
            "description": "migrated by stream"
        }})
    );
    assert_eq!(volume.id, "23cf872b-c781-4cd4-847d-5f2ec8cbd91c");
    assert_eq!(volume.status, "creating");
    assert_eq!(volume.name.as_deref(), Some("New Volume"));
    assert_eq!(volume.size_gb, Some(0));
    assert!(
        !volume.bootable,
        "the sample answers \"bootable\": \"false\""
    );
    assert_eq!(
        volume.metadata.get("key1").map(String::as_str),
        Some("value1")
    );
}

#[test]
fn manage_existing_4xx_names_endpoint_status_and_cinder_message() {
    let cloud = FakeCloud::start();
    let client = logged_in(&cloud);
    cloud.push(reply(400, CINDER_400));

    let err = client
        .manage_existing(&ManageRequest::new("cloud1@lvm#lvm", "db01-root", "db01"))
        .unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, Error::Http { status: 400, .. }), "{err:?}");
    assert!(
        msg.contains(&format!(
            "POST {}/v3/{PROJECT_ID}/manageable_volumes",
            cloud.base
        )),
        "{msg}"
    );
    assert!(msg.contains("HTTP 400"), "{msg}");
    assert!(
        msg.contains("Host 'cloud1@lvm#lvm' not found (badRequest)"),
        "{msg}"
    );
    assert!(
        !msg.contains(SUBJECT_TOKEN) && !msg.contains(PASSWORD),
        "{msg}"
    );
}

#[test]
fn find_volume_by_name_found() {
    let cloud = FakeCloud::start();
    let client = logged_in(&cloud);
    // The sample's only volume has no name; give it the one we look for.
    cloud.push(reply(
        200,
        &LIST_DETAIL_RESPONSE.replace("\"name\": null", "\"name\": \"db 01\""),
    ));

    let found = client.find_volume_by_name("db 01").unwrap().expect("found");

    let req = &cloud.requests()[1];
    assert_eq!(req.method, "GET");
    assert_eq!(
        req.target,
        format!("{}/volumes/detail?name=db%2001", cloud.volume_url())
    );
    assert_eq!(req.header("x-auth-token"), Some(SUBJECT_TOKEN));
    assert_eq!(found.id, "cb49b381-9012-40cb-b8ee-80c19a4801b5");
    assert_eq!(found.size_gb, Some(10));
}

#[test]
fn find_volume_by_name_not_found() {
    let cloud = FakeCloud::start();
    let client = logged_in(&cloud);
    cloud.push(reply(200, r#"{"volumes": []}"#));
    assert_eq!(client.find_volume_by_name("db01").unwrap(), None);

    // An inexact server-side filter is not taken for a match.
    cloud.push(reply(
        200,
        &LIST_DETAIL_RESPONSE.replace("\"name\": null", "\"name\": \"db01-old\""),
    ));
    assert_eq!(client.find_volume_by_name("db01").unwrap(), None);
}

fn show(status: &str) -> Reply {
    reply(
        200,
        &SHOW_RESPONSE.replace("\"creating\"", &format!("\"{status}\"")),
    )
}

const SHOWN_ID: &str = "f7223234-1afc-4d19-bfa3-d19deb6235ef";

#[test]
fn wait_available_polls_until_available() {
    let cloud = FakeCloud::start();
    let client = logged_in(&cloud);
    cloud.push(show("creating"));
    cloud.push(show("creating"));
    cloud.push(show("available"));

    let v = client
        .wait_available(SHOWN_ID, Duration::from_secs(10))
        .unwrap();

    assert_eq!(v.status, "available");
    assert_eq!(v.size_gb, Some(10));
    let polls: Vec<_> = cloud.requests().into_iter().skip(1).collect();
    assert_eq!(polls.len(), 3);
    for p in polls {
        assert_eq!(p.method, "GET");
        assert_eq!(
            p.target,
            format!("{}/volumes/{SHOWN_ID}", cloud.volume_url())
        );
        assert_eq!(p.header("x-auth-token"), Some(SUBJECT_TOKEN));
    }
}

#[test]
fn wait_available_reports_error_managing() {
    for status in ["error_managing", "error"] {
        let cloud = FakeCloud::start();
        let client = logged_in(&cloud);
        cloud.push(show("creating"));
        cloud.push(show(status));

        let err = client
            .wait_available(SHOWN_ID, Duration::from_secs(10))
            .unwrap_err();

        assert!(matches!(err, Error::ManageFailed { .. }), "{err:?}");
        let msg = err.to_string();
        assert!(
            msg.contains("could not manage") && msg.contains(SHOWN_ID),
            "{msg}"
        );
        assert!(msg.contains("cinder-volume log"), "{msg}");
    }
}

#[test]
fn wait_available_times_out_with_the_last_status() {
    let cloud = FakeCloud::start();
    let client = logged_in(&cloud);
    for _ in 0..100 {
        cloud.push(show("creating"));
    }
    let err = client
        .wait_available(SHOWN_ID, Duration::from_millis(30))
        .unwrap_err();
    assert!(matches!(err, Error::Timeout { .. }), "{err:?}");
    assert!(err.to_string().contains("still creating"), "{err}");
}

// ---- the LV preflight --------------------------------------------------

mod lv {
    use std::fs;
    use std::os::unix::fs::symlink;
    use std::path::{Path, PathBuf};

    use test_support::loopdev::LoopDevice;

    use super::super::preflight::*;

    /// A loop device over a sparse file (test-support's, detached on
    /// drop), and the directory holding the file. One at a time: a loop
    /// number one test frees is soon another's, and the `losetup -d` that
    /// freed it can still hold it open while the other test reads the
    /// real `/proc` for holders.
    struct Loop {
        dev: PathBuf,
        _lo: LoopDevice,
        _dir: tempfile::TempDir,
        _one_at_a_time: std::sync::MutexGuard<'static, ()>,
    }

    static LOOPS: std::sync::Mutex<()> = std::sync::Mutex::new(());

    impl Loop {
        /// None where loop devices cannot be made (not root, no loop module).
        fn new(size: u64) -> Option<Loop> {
            let one_at_a_time = LOOPS.lock().unwrap_or_else(|e| e.into_inner());
            let dir = tempfile::tempdir().unwrap();
            let img = dir.path().join("disk.img");
            fs::File::create(&img).unwrap().set_len(size).unwrap();
            match LoopDevice::try_attach(&img, false) {
                Ok(lo) => Some(Loop {
                    dev: lo.path.clone(),
                    _lo: lo,
                    _dir: dir,
                    _one_at_a_time: one_at_a_time,
                }),
                Err(why) => {
                    eprintln!("skipped: losetup failed: {why}");
                    None
                }
            }
        }
    }

    /// A fake `/dev` where VG/LV and mapper/VG-LV point at `target`, an
    /// empty `/proc` and `/sys`.
    fn fake_roots(vg: &str, lv: &str, target: &Path) -> (tempfile::TempDir, Roots) {
        let dir = tempfile::tempdir().unwrap();
        let roots = Roots {
            dev: dir.path().join("dev"),
            proc: dir.path().join("proc"),
            sys: dir.path().join("sys"),
        };
        fs::create_dir_all(roots.dev.join(vg)).unwrap();
        fs::create_dir_all(roots.dev.join("mapper")).unwrap();
        fs::create_dir_all(&roots.proc).unwrap();
        fs::create_dir_all(&roots.sys).unwrap();
        symlink(target, roots.dev.join(vg).join(lv)).unwrap();
        let dm = format!("{}-{}", vg.replace('-', "--"), lv.replace('-', "--"));
        symlink(target, roots.dev.join("mapper").join(dm)).unwrap();
        (dir, roots)
    }

    const GIB2: u64 = 2 * GIB;

    #[test]
    fn lv_found_by_vg_lv_mapper_name_and_device_node() {
        let Some(lo) = Loop::new(GIB2) else { return };
        let (_d, roots) = fake_roots("vg-data", "db01-root", &lo.dev);
        let want = LvRef {
            vg: "vg-data".into(),
            lv: "db01-root".into(),
            size: GIB2,
        };
        for path in [
            roots.dev.join("vg-data/db01-root"),
            roots.dev.join("mapper/vg--data-db01--root"),
            lo.dev.clone(),
        ] {
            assert_eq!(
                preflight_lv_in(&roots, &path, GIB2 - 4096).unwrap(),
                want,
                "{path:?}"
            );
        }
        assert_eq!(want.full_name(), "vg-data/db01-root");
        assert_eq!(want.size_gib(), 2);
    }

    #[test]
    fn lv_named_like_a_cinder_volume_is_refused() {
        let Some(lo) = Loop::new(GIB) else { return };
        let name = "volume-23cf872b-c781-4cd4-847d-5f2ec8cbd91c";
        let (_d, roots) = fake_roots("cinder-volumes", name, &lo.dev);
        let err =
            preflight_lv_in(&roots, &roots.dev.join("cinder-volumes").join(name), GIB).unwrap_err();
        assert!(matches!(err, PreflightError::CinderName { .. }), "{err:?}");
        let msg = err.to_string();
        assert!(msg.contains(&format!("cinder-volumes/{name}")), "{msg}");
        assert!(
            msg.contains("without --cinder-manage") && msg.contains("lvrename"),
            "{msg}"
        );
    }

    #[test]
    fn lv_not_a_whole_gib_is_refused_with_the_size_to_extend_to() {
        let Some(lo) = Loop::new(GIB + 512 * 1024 * 1024) else {
            return;
        };
        let (_d, roots) = fake_roots("vg0", "db01", &lo.dev);
        let err = preflight_lv_in(&roots, &roots.dev.join("vg0/db01"), GIB).unwrap_err();
        assert!(
            matches!(err, PreflightError::NotWholeGib { gib: 2, .. }),
            "{err:?}"
        );
        assert!(err.to_string().contains("lvextend -L 2G vg0/db01"), "{err}");
    }

    #[test]
    fn lv_smaller_than_the_disk_is_refused() {
        let Some(lo) = Loop::new(GIB) else { return };
        let (_d, roots) = fake_roots("vg0", "db01", &lo.dev);
        let err = preflight_lv_in(&roots, &roots.dev.join("vg0/db01"), GIB + 1).unwrap_err();
        assert!(matches!(err, PreflightError::TooSmall { .. }), "{err:?}");
    }

    #[test]
    fn open_lv_is_refused_naming_the_pids() {
        let Some(lo) = Loop::new(GIB) else { return };
        let (d, roots) = fake_roots("vg0", "db01", &lo.dev);
        // A process of the fake /proc with the device on fd 7, another without.
        let p = roots.proc.join("4242");
        fs::create_dir_all(p.join("fd")).unwrap();
        fs::write(p.join("comm"), "qemu-system-x86\n").unwrap();
        symlink(&lo.dev, p.join("fd/7")).unwrap();
        symlink(d.path(), p.join("fd/3")).unwrap();
        let q = roots.proc.join("77");
        fs::create_dir_all(q.join("fd")).unwrap();
        symlink("/dev/null", q.join("fd/0")).unwrap();

        let err = preflight_lv_in(&roots, &roots.dev.join("vg0/db01"), GIB).unwrap_err();

        let PreflightError::Open { holders, .. } = &err else {
            panic!("{err:?}")
        };
        assert_eq!(
            holders,
            &[Holder::Process {
                pid: 4242,
                command: "qemu-system-x86".into()
            }]
        );
        let msg = err.to_string();
        assert!(
            msg.contains("vg0/db01") && msg.contains("PID 4242 (qemu-system-x86)"),
            "{msg}"
        );
    }

    #[test]
    fn open_lv_is_seen_in_the_real_proc() {
        let Some(lo) = Loop::new(GIB) else { return };
        let (_d, mut roots) = fake_roots("vg0", "db01", &lo.dev);
        roots.proc = "/proc".into();
        let held = fs::File::open(&lo.dev).unwrap();
        let err = preflight_lv_in(&roots, &roots.dev.join("vg0/db01"), GIB).unwrap_err();
        let me = std::process::id();
        assert!(
            matches!(&err, PreflightError::Open { holders, .. }
                if holders.iter().any(|h| matches!(h, Holder::Process { pid, .. } if *pid == me))),
            "{err:?}"
        );
        assert!(err.to_string().contains("this process"), "{err}");
        drop(held);
        preflight_lv_in(&roots, &roots.dev.join("vg0/db01"), GIB).unwrap();
    }

    #[test]
    fn mounts_and_stacked_devices_count_as_holders() {
        let Some(lo) = Loop::new(GIB) else { return };
        let (_d, roots) = fake_roots("vg0", "db01", &lo.dev);
        let meta = fs::metadata(&lo.dev).unwrap();
        let rdev = std::os::unix::fs::MetadataExt::rdev(&meta);
        let id = format!("{}:{}", libc::major(rdev), libc::minor(rdev));
        fs::create_dir_all(roots.proc.join("self")).unwrap();
        fs::write(
            roots.proc.join("self/mountinfo"),
            format!("36 35 {id} / /mnt/legacy rw,noatime shared:1 - ext4 /dev/vg0/db01 rw\n"),
        )
        .unwrap();
        fs::create_dir_all(roots.sys.join("dev/block").join(&id).join("holders/dm-9")).unwrap();

        let err = preflight_lv_in(&roots, &roots.dev.join("vg0/db01"), GIB).unwrap_err();
        let PreflightError::Open { holders, .. } = &err else {
            panic!("{err:?}")
        };
        assert_eq!(
            holders,
            &[
                Holder::Mount {
                    mount_point: "/mnt/legacy".into()
                },
                Holder::Device {
                    name: "dm-9".into()
                }
            ]
        );
    }

    #[test]
    fn block_device_outside_any_vg_is_refused() {
        let Some(lo) = Loop::new(GIB) else { return };
        let dir = tempfile::tempdir().unwrap();
        let roots = Roots {
            dev: dir.path().join("dev"),
            proc: dir.path().join("proc"),
            sys: dir.path().join("sys"),
        };
        fs::create_dir_all(roots.dev.join("disk/by-id")).unwrap();
        symlink(&lo.dev, roots.dev.join("disk/by-id/loop-xyz")).unwrap();
        let err = preflight_lv_in(&roots, &lo.dev, GIB).unwrap_err();
        assert!(matches!(err, PreflightError::NotAnLv { .. }), "{err:?}");
        assert!(err.to_string().contains("lvcreate -L <N>G"), "{err}");
    }

    #[test]
    fn regular_file_is_refused() {
        let f = tempfile::NamedTempFile::new().unwrap();
        let err = preflight_lv(f.path(), 0).unwrap_err();
        assert!(
            matches!(err, PreflightError::NotBlockDevice { .. }),
            "{err:?}"
        );
        let err = preflight_lv(Path::new("/nonexistent/vg/lv"), 0).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/vg/lv"), "{err}");
    }
}
