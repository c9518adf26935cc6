//! What needs no server: the `OS_*` settings, the Keystone request bodies,
//! the catalog lookup, the version document and the API it chooses, the
//! manage request body; and the LV preflight on loop devices and a fake
//! `/dev`.
//!
//! Every exchange with Keystone and Cinder is tested against the real
//! services (`integration/tests/cinder_real.rs`), not a scripted server
//! here: a stand-in that answered what we expected is what hid real
//! Cinder's 404 on `manageable_volumes` without a microversion header.

use std::collections::HashMap;

use serde_json::{Value, json};

use super::auth::{self, Identity, NameOrId, Service, Settings};
use super::client::ManageRequest;
use super::version::{self, Api, Microversion};
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
const CINDER_400: &str = fixture!("cinder/fault-400-host-not-found.json");

/// The project of the token sample.
const PROJECT_ID: &str = "a6944d763bf64ee6a275f1263fae0352";
const PASSWORD: &str = "devstacker";

/// `GET /` of Cinder 29.0.0 as the bring-up serves it (captured verbatim).
const CINDER_29_VERSIONS: &str = r#"{"versions": [{"id": "v3.0", "status": "CURRENT", "version": "3.71", "min_version": "3.0", "updated": "2023-08-31T00:00:00Z", "links": [{"rel": "describedby", "type": "text/html", "href": "https://docs.openstack.org/"}, {"rel": "self", "href": "http://127.0.0.1:8776/v3/"}], "media-types": [{"base": "application/json", "type": "application/vnd.openstack.volume+json;version=3"}]}]}"#;

fn settings(vars: &[(&str, &str)]) -> Result<Settings> {
    let map: HashMap<String, String> = vars
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    Settings::from_lookup(|k| map.get(k).cloned())
}

const PASSWORD_ENV: &[(&str, &str)] = &[
    ("OS_AUTH_URL", "http://k:5000/v3"),
    ("OS_USERNAME", "admin"),
    ("OS_PASSWORD", PASSWORD),
    ("OS_USER_DOMAIN_NAME", "Default"),
    ("OS_PROJECT_NAME", "admin"),
    ("OS_PROJECT_DOMAIN_ID", "default"),
];

// ---- Keystone ----------------------------------------------------------

#[test]
fn password_auth_sends_user_and_project_with_their_domains() {
    let s = settings(PASSWORD_ENV).unwrap();
    assert_eq!(
        auth::token_request(&s.identity, s.project.as_ref()),
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
}

#[test]
fn password_auth_by_user_and_project_ids_needs_no_domains() {
    let s = settings(&[
        ("OS_AUTH_URL", "http://k:5000"),
        ("OS_USER_ID", "ee4dfb6e5540447cb3741905149d9b6e"),
        ("OS_PASSWORD", PASSWORD),
        ("OS_PROJECT_ID", PROJECT_ID),
    ])
    .unwrap();
    assert_eq!(
        auth::token_request(&s.identity, s.project.as_ref())["auth"],
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
    let s = settings(&[
        ("OS_AUTH_URL", "http://k:5000/v3"),
        ("OS_TOKEN", "old-token-123"),
        ("OS_PROJECT_ID", PROJECT_ID),
    ])
    .unwrap();
    // The shape of the api-ref's auth-token-scoped-request.json.
    assert_eq!(
        auth::token_request(&s.identity, s.project.as_ref()),
        json!({"auth": {
            "identity": {"methods": ["token"], "token": {"id": "old-token-123"}},
            "scope": {"project": {"id": PROJECT_ID}}
        }})
    );
}

#[test]
fn application_credential_by_id_or_by_name_and_user_sends_no_scope() {
    let s = settings(&[
        ("OS_AUTH_URL", "http://k:5000/v3"),
        ("OS_AUTH_TYPE", "v3applicationcredential"),
        ("OS_APPLICATION_CREDENTIAL_ID", "ac1"),
        ("OS_APPLICATION_CREDENTIAL_SECRET", "s3cret"),
    ])
    .unwrap();
    assert_eq!(
        auth::token_request(&s.identity, s.project.as_ref()),
        json!({"auth": {"identity": {
            "methods": ["application_credential"],
            "application_credential": {"id": "ac1", "secret": "s3cret"}
        }}})
    );
    assert!(
        !format!("{s:?}").contains("s3cret"),
        "Debug shows the secret"
    );

    let s = settings(&[
        ("OS_AUTH_URL", "http://k:5000/v3"),
        ("OS_APPLICATION_CREDENTIAL_NAME", "migrate"),
        ("OS_APPLICATION_CREDENTIAL_SECRET", "s3cret"),
        ("OS_USERNAME", "ops"),
        ("OS_USER_DOMAIN_NAME", "Default"),
        // Ignored: the credential is bound to its project.
        ("OS_PROJECT_NAME", "other"),
        ("OS_PROJECT_DOMAIN_NAME", "Default"),
    ])
    .unwrap();
    assert_eq!(
        auth::token_request(&s.identity, s.project.as_ref()),
        json!({"auth": {"identity": {
            "methods": ["application_credential"],
            "application_credential": {
                "name": "migrate", "secret": "s3cret",
                "user": {"name": "ops", "domain": {"name": "Default"}}
            }
        }}})
    );
    let mut s = s;
    let err = s.scope_to("tenant").unwrap_err();
    assert!(err.to_string().contains("bound to the project"), "{err}");
}

#[test]
fn project_flag_scopes_by_id_or_by_name_in_the_project_domain() {
    let mut s = settings(PASSWORD_ENV).unwrap();
    s.scope_to("tenant").unwrap();
    assert_eq!(
        s.project,
        Some(NameOrId::Name {
            name: "tenant".into(),
            domain: Box::new(NameOrId::Id("default".into()))
        })
    );
    s.scope_to("7218eb777ab74a9680871ef9b8616826").unwrap();
    assert_eq!(
        s.project,
        Some(NameOrId::Id("7218eb777ab74a9680871ef9b8616826".into()))
    );
    // The Unauthorized error names the grant the manage call needs.
    let err = Error::Unauthorized {
        url: "http://k:5000/v3/auth/tokens".into(),
        message: auth_message(KEYSTONE_401),
        user: s.user_label(),
        project: "tenant".into(),
    };
    let msg = err.to_string();
    assert!(
        msg.contains("openstack role add --user admin --project tenant admin"),
        "{msg}"
    );
    assert!(!msg.contains(PASSWORD), "{msg}");
}

fn auth_message(body: &str) -> String {
    super::http::describe_error(body)
}

#[test]
fn error_bodies_give_their_message() {
    assert_eq!(
        auth_message(KEYSTONE_401),
        "The request you have made requires authentication. (Unauthorized)"
    );
    assert!(auth_message(CINDER_400).contains("(badRequest)"));
}

#[test]
fn missing_settings_are_named() {
    let err = settings(&[
        ("OS_AUTH_URL", "http://k/v3"),
        ("OS_USERNAME", "u"),
        ("OS_PASSWORD", "p"),
    ])
    .unwrap_err();
    assert!(err.to_string().contains("OS_USER_DOMAIN_NAME"), "{err}");
    let err = settings(&[
        ("OS_AUTH_URL", "http://k/v3"),
        ("OS_APPLICATION_CREDENTIAL_SECRET", "x"),
    ])
    .unwrap_err();
    assert!(
        err.to_string().contains("OS_APPLICATION_CREDENTIAL_ID"),
        "{err}"
    );
    let s = format!(
        "{:?}",
        settings(&[
            ("OS_AUTH_URL", "http://k/v3"),
            ("OS_USER_ID", "u"),
            ("OS_PASSWORD", "hunter2"),
            ("OS_PROJECT_ID", "p"),
        ])
        .unwrap()
    );
    assert!(!s.contains("hunter2"), "Debug shows the password: {s}");
}

#[test]
fn endpoint_override_needs_a_token_or_keystone() {
    let err = settings(&[("OS_ENDPOINT", "http://c/v3"), ("OS_PASSWORD", "p")]).unwrap_err();
    assert!(err.to_string().contains("OS_ENDPOINT"), "{err}");
    let s = settings(&[
        ("OS_ENDPOINT", "http://proxy:1/v3"),
        ("OS_AUTH_URL", "http://k/v3"),
        ("OS_USER_ID", "u"),
        ("OS_PASSWORD", "p"),
        ("OS_PROJECT_ID", "p1"),
    ])
    .unwrap();
    assert!(matches!(s.identity, Identity::Password { .. }));
    assert_eq!(s.endpoint.as_deref(), Some("http://proxy:1/v3"));
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
    let err = auth::select_endpoint(&catalog(TOKEN_RESPONSE_NO_V3), "public", None).unwrap_err();
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

// ---- the version document and the header ------------------------------

fn doc(id: &str, max: &str, min: &str) -> version::ApiVersion {
    serde_json::from_value(
        json!({"id": id, "status": "CURRENT", "version": max, "min_version": min}),
    )
    .unwrap()
}

#[test]
fn cinder_29_gets_manageable_volumes_at_3_8() {
    let versions = version::parse_document(CINDER_29_VERSIONS).unwrap();
    let api = version::choose(&versions).unwrap();
    assert_eq!(api, Api::Manageable(Microversion(3, 8)));
    assert_eq!(api.header().as_deref(), Some("volume 3.8"));
    assert!(api.has_messages());
    assert_eq!(api.to_string(), "manageable_volumes at volume 3.8");
}

#[test]
fn before_3_8_the_legacy_extension_at_the_highest_version() {
    let api = version::choose(&[doc("v3.0", "3.7", "3.0")]).unwrap();
    assert_eq!(api, Api::Legacy(Some(Microversion(3, 7))));
    assert_eq!(api.header().as_deref(), Some("volume 3.7"));
    assert!(api.has_messages(), "3.7 has the user messages of 3.3");
    let api = version::choose(&[doc("v3.0", "3.2", "3.0")]).unwrap();
    assert!(!api.has_messages());
    // A v3 without microversions: no header at all.
    let api = version::choose(&[doc("v3.0", "", "")]).unwrap();
    assert_eq!(api, Api::Legacy(None));
    assert_eq!(api.header(), None);
    // A minimum above 3.8 (a future Cinder): manageable_volumes at that minimum.
    let api = version::choose(&[doc("v3.0", "3.90", "3.50")]).unwrap();
    assert_eq!(api, Api::Manageable(Microversion(3, 50)));
}

#[test]
fn versions_compare_as_numbers_not_strings() {
    // "3.10" > "3.8" although it sorts before it as text.
    let api = version::choose(&[doc("v3.0", "3.10", "3.0")]).unwrap();
    assert_eq!(api, Api::Manageable(Microversion(3, 8)));
    assert!(Microversion::parse("3.71") > Microversion::parse("3.8"));
    assert_eq!(Microversion::parse("3"), None);
    assert_eq!(Microversion::parse(""), None);
}

#[test]
fn a_cinder_without_v3_is_refused_naming_what_it_offers() {
    let err = version::choose(&[doc("v2.0", "", "")]).unwrap_err();
    assert!(err.contains("v2.0 (CURRENT)"), "{err}");
    let one = r#"{"version": {"id": "v3.0", "status": "CURRENT", "version": "3.60", "min_version": "3.0"}}"#;
    let api = version::choose(&version::parse_document(one).unwrap()).unwrap();
    assert_eq!(api, Api::Manageable(Microversion(3, 8)));
    assert!(version::parse_document(r#"{"error": "x"}"#).is_none());
}

#[test]
fn the_version_document_is_at_the_root_before_v3() {
    assert_eq!(
        version::root_of(&format!("http://127.0.0.1:8776/v3/{PROJECT_ID}")).as_deref(),
        Some("http://127.0.0.1:8776")
    );
    assert_eq!(
        version::root_of("https://cloud.example/volume/v3/p1").as_deref(),
        Some("https://cloud.example/volume")
    );
    assert_eq!(version::root_of("https://cloud.example/volume/v2/p1"), None);
}

// ---- the manage request ------------------------------------------------

#[test]
fn manage_body_has_host_ref_name_and_only_the_options_given() {
    let mut r = ManageRequest::new("os-bringup@lvm#lvm", "mig-db01", "db01");
    assert_eq!(
        r.body(),
        json!({"volume": {
            "host": "os-bringup@lvm#lvm",
            "ref": {"source-name": "mig-db01"},
            "name": "db01",
            "bootable": false
        }})
    );
    r.bootable = true;
    r.volume_type = Some("fast".into());
    r.availability_zone = Some("nova".into());
    r.metadata
        .insert("stream_migration_id".into(), "m-1".into());
    assert_eq!(
        r.body(),
        json!({"volume": {
            "host": "os-bringup@lvm#lvm",
            "ref": {"source-name": "mig-db01"},
            "name": "db01",
            "bootable": true,
            "volume_type": "fast",
            "availability_zone": "nova",
            "metadata": {"stream_migration_id": "m-1"}
        }})
    );
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

// ---- clouds.yaml -------------------------------------------------------

#[test]
fn os_cloud_reads_its_entry_as_os_variables() {
    let yaml = r#"
clouds:
  other:
    auth: {auth_url: "http://x", username: u, password: p}
  bringup:
    region_name: RegionOne
    interface: internal
    cacert: /etc/ssl/private-ca.pem
    auth:
      auth_url: http://127.0.0.1:5000/v3
      username: admin
      password: admin-secret
      project_name: tenant
      user_domain_name: Default
      project_domain_name: Default
"#;
    let vars = super::clouds::vars_of("bringup", yaml).unwrap();
    let s = Settings::from_lookup(|k| vars.get(k).cloned()).unwrap();
    assert_eq!(s.auth_url.as_deref(), Some("http://127.0.0.1:5000/v3"));
    assert_eq!(s.interface, "internal");
    assert_eq!(s.region.as_deref(), Some("RegionOne"));
    assert_eq!(
        s.cacert.as_deref(),
        Some(std::path::Path::new("/etc/ssl/private-ca.pem"))
    );
    assert_eq!(s.project_label(), "tenant");
    assert_eq!(s.user_label(), "admin");

    let err = super::clouds::vars_of("nope", yaml).unwrap_err();
    assert!(err.contains("other, bringup"), "{err}");
    let err = super::clouds::vars_of(
        "c",
        "clouds:\n  c:\n    verify: false\n    auth: {auth_url: http://x}\n",
    )
    .unwrap_err();
    assert!(err.contains("verify: false"), "{err}");
}

#[test]
fn os_cloud_application_credential() {
    let yaml = "clouds:\n  ac:\n    auth_type: v3applicationcredential\n    auth:\n      auth_url: http://k/v3\n      application_credential_id: ac1\n      application_credential_secret: s3\n";
    let vars = super::clouds::vars_of("ac", yaml).unwrap();
    let s = Settings::from_lookup(|k| vars.get(k).cloned()).unwrap();
    assert!(s.identity.is_application_credential());
}

// ---- reachability ------------------------------------------------------

#[test]
fn unreachable_keystone_is_named_before_anything_else() {
    // Port 1 on loopback: nothing listens, the connection is refused at once.
    let s = settings(&[
        ("OS_AUTH_URL", "http://127.0.0.1:1/v3"),
        ("OS_USER_ID", "u"),
        ("OS_PASSWORD", PASSWORD),
        ("OS_PROJECT_ID", "p"),
    ])
    .unwrap();
    let err = Client::connect(&s).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, Error::Transport { .. }), "{err:?}");
    assert!(
        msg.contains("POST http://127.0.0.1:1/v3/auth/tokens"),
        "{msg}"
    );
    assert!(!msg.contains(PASSWORD), "{msg}");
}
