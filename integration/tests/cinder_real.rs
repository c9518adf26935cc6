//! `stream finalize --cinder-manage` against REAL Keystone 30 and Cinder 29
//! (LVM driver, RabbitMQ), brought up once for every case here by
//! `integration/openstack/bring-up` and stopped on drop (issue 17).
//!
//! Real: Keystone (tokens, roles, the catalog), cinder-api and its default
//! policy, the scheduler, cinder-volume's LVM driver listing, sizing and
//! renaming the LV (`lvrename` through privsep), the LVs themselves in the
//! bring-up's volume group, the `stream` binary, the python-openstackclient
//! the assertions (and the manual fallback) use.
//!
//! Arranged (see `integration::openstack`): no device-mapper here, so an LV
//! has no block device; a loop device over the LV's own extents on the PV,
//! reached as `/dev/VG/LV` through a symlink, is the data path. And one
//! proxy in front of cinder-api loses the answer to one manage call.
//!
//! One test function, so the services come up once (~40 s with a cached
//! venv); the cases run in order and each says what it checks.

use std::time::{Duration, Instant};

use integration::finalize::{self, Finalize};
use integration::image::assert_same_bytes;
use integration::openstack::{ArrangedLv, CinderProxy, HOST, OpenStack, VG, read_bytes};
use integration::start::{ForgetMarker, Running, mixed_image};
use integration::{SparseImage, Start};

const GIB: u64 = 1 << 30;
const FINALIZE: Duration = Duration::from_secs(300);

fn finalize_as(state: &std::path::Path, creds: &[(String, String)], args: &[&str]) -> Finalize {
    creds
        .iter()
        .fold(Finalize::new(state).args(args), |f, (k, v)| f.env(k, v))
}

/// A migration into an arranged LV, hydrated; its `stream start` running.
/// Fields drop in order: the marker needs the state directory, the
/// tempdir holding it goes last.
struct Migration {
    _marker: ForgetMarker,
    img: SparseImage,
    /// Kept for its drop: the loop device and the symlink.
    _lv: ArrangedLv,
    state: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

fn migrate(os: &OpenStack, lv: &str) -> (Migration, Running) {
    let dir = tempfile::tempdir().unwrap();
    let img = mixed_image(dir.path());
    let lv = ArrangedLv::create(os, lv, GIB);
    let start = Start::new(&img.path, &lv.path, dir.path()).rate_limit(None);
    let state = start.state_dir().to_path_buf();
    let marker = ForgetMarker(state.clone());
    let mut running = start.spawn();
    running.wait_hydrated(Duration::from_secs(60));
    (
        Migration {
            _marker: marker,
            img,
            _lv: lv,
            state,
            _dir: dir,
        },
        running,
    )
}

/// Nothing changed: no volume in any project beyond `volumes`, the LVs as
/// before, the migration not handed to Cinder.
fn assert_unchanged(os: &OpenStack, m: &Migration, volumes: usize, lvs: &[String], what: &str) {
    let all = os.all_volumes();
    assert_eq!(all.len(), volumes, "{what}: volumes now {all:#?}");
    assert_eq!(os.lv_names(), lvs, "{what}: the LVs changed");
    let h = finalize::header(&m.state);
    assert_ne!(h["phase"], "finalized", "{what}: {h}");
    assert!(
        h["finalize"].is_null() || h["finalize"]["cinder"].is_null(),
        "{what}: a Cinder intent was recorded: {h}"
    );
}

fn assert_fails_with(out: &integration::tool::Output, needles: &[&str], what: &str) {
    let err = out.stderr_lossy();
    for n in needles {
        assert!(
            err.contains(n),
            "{what}: the error does not say {n:?}: {}",
            out.describe()
        );
    }
}

/// `volume show` as the admin: the volume as Cinder shows it.
fn show(os: &OpenStack, id: &str) -> serde_json::Value {
    os.openstack_json(&os.admin, &["volume", "show", id])
}

/// The bytes of `VG/lv` read from its extents on the PV.
fn lv_bytes(os: &OpenStack, lv: &str, len: usize) -> Vec<u8> {
    let (pv, offset, _) = os.extents(lv);
    read_bytes(&pv, offset, len)
}

#[test]
fn cinder_handoff_against_real_keystone_and_cinder() {
    let os = OpenStack::up();
    let tenant_id = os.openstack_json(&os.admin, &["project", "show", "tenant"])["id"]
        .as_str()
        .expect("tenant project id")
        .to_owned();
    let auth_url = os.admin_var("OS_AUTH_URL");
    // A volume type bound to the backend, as operators define them.
    os.openstack_json(
        &os.admin,
        &[
            "volume",
            "type",
            "create",
            "--property",
            "volume_backend_name=lvm",
            "lvm",
        ],
    );

    // ---- A: errors while `stream start` serves; then the handoff ----------
    let (a, mut a_running) = migrate(&os, "mig-db01");
    let lvs = os.lv_names();
    assert_eq!(lvs, ["mig-db01"]);
    let good_args = [
        "--cinder-manage",
        HOST,
        "--project",
        "tenant",
        "--volume-name",
        "db01",
        "--volume-type",
        "lvm",
        "--availability-zone",
        "nova",
        "--bootable",
        "--verify",
    ];

    // The admin has no role on the tenant project yet: Keystone refuses the
    // scope, and the message names the grant.
    let out = finalize_as(&a.state, &os.admin, &good_args).run_fails(FINALIZE);
    assert_fails_with(
        &out,
        &[
            "HTTP 401",
            "openstack role add --user admin --project tenant admin",
        ],
        "no role on the project",
    );
    a_running.assert_alive();
    assert_unchanged(&os, &a, 0, &lvs, "no role on the project");
    let out = os.openstack(
        &os.admin,
        &[
            "role",
            "add",
            "--user",
            "admin",
            "--project",
            "tenant",
            "admin",
        ],
    );
    assert!(out.status.success(), "{}", out.describe());

    // A token from `openstack token issue` (OS_TOKEN, exchanged for one
    // scoped to the project): the zone case below logs in with it.
    let token = os.openstack_json(&os.admin_in("tenant"), &["token", "issue"])["id"]
        .as_str()
        .expect("a token")
        .to_owned();
    let token_creds: Vec<(String, String)> = [
        ("OS_AUTH_URL", auth_url.as_str()),
        ("OS_TOKEN", token.as_str()),
        ("OS_PROJECT_NAME", "tenant"),
        ("OS_PROJECT_DOMAIN_NAME", "Default"),
    ]
    .iter()
    .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
    .collect();
    type Case<'a> = (&'a str, Vec<(String, String)>, Vec<&'a str>, Vec<&'a str>);
    let cases: [Case; 4] = [
        (
            "a wrong host",
            os.admin.clone(),
            vec![
                "--cinder-manage",
                "os-bringup@nope#lvm",
                "--project",
                "tenant",
            ],
            vec![
                "no backend pool os-bringup@nope#lvm",
                HOST,
                "nothing was changed",
            ],
        ),
        (
            "a wrong volume type",
            os.admin.clone(),
            vec![
                "--cinder-manage",
                HOST,
                "--project",
                "tenant",
                "--volume-type",
                "gold",
            ],
            vec!["no volume type \"gold\"", "lvm", "nothing was changed"],
        ),
        (
            "a wrong availability zone (OS_TOKEN)",
            token_creds,
            vec!["--cinder-manage", HOST, "--availability-zone", "mars"],
            vec!["no available availability zone \"mars\"", "nova"],
        ),
        (
            "a non-admin user",
            os.tenant.clone(),
            vec!["--cinder-manage", HOST],
            vec!["HTTP 403", "admin role"],
        ),
    ];
    for (what, creds, args, needles) in cases {
        let out = finalize_as(&a.state, &creds, &args).run_fails(FINALIZE);
        assert_fails_with(&out, &needles, what);
        a_running.assert_alive();
        assert_unchanged(&os, &a, 0, &lvs, what);
    }

    // The handoff: the running start hands over, the LV becomes the
    // tenant's volume.
    let t0 = Instant::now();
    let out = finalize_as(&a.state, &os.admin, &good_args)
        .args(&["--json"])
        .run_ok(FINALIZE);
    eprintln!("handoff took {:?}", t0.elapsed());
    let status = a_running.wait_exit(Duration::from_secs(60));
    assert!(
        status.success(),
        "stream start after the handover: {status}"
    );
    let report = integration::ops::assert_valid("finalize", &out.stdout_lossy());
    assert_eq!(report["phase"], "finalized", "{report}");
    // The event lines on stderr follow their schema, the Cinder ones too.
    let events: Vec<serde_json::Value> = out
        .stderr_lossy()
        .lines()
        .filter(|l| l.starts_with('{') && l.contains("\"event\""))
        .map(|l| integration::ops::assert_valid("finalize-event", l))
        .collect();
    let available = events
        .iter()
        .find(|e| e["event"] == "cinder_available")
        .unwrap_or_else(|| panic!("no cinder_available event: {}", out.describe()));
    assert!(
        available["message"].as_str().unwrap().contains("1 GiB"),
        "{available}"
    );
    let a_id = report["cinder_volume_id"]
        .as_str()
        .unwrap_or_else(|| panic!("no volume id: {report}"))
        .to_owned();
    let migration_a = finalize::header(&a.state)["migration_id"]
        .as_str()
        .expect("a migration id")
        .to_owned();
    let v = show(&os, &a_id);
    assert_eq!(v["status"], "available", "{v:#}");
    assert_eq!(
        v["size"], 1,
        "1 GiB LV, 16 MiB disk: Cinder counts whole GiB {v:#}"
    );
    assert_eq!(v["name"], "db01", "{v:#}");
    assert_eq!(
        v["os-vol-tenant-attr:tenant_id"],
        tenant_id.as_str(),
        "{v:#}"
    );
    assert_eq!(v["os-vol-host-attr:host"], HOST, "{v:#}");
    assert_eq!(v["type"], "lvm", "{v:#}");
    assert_eq!(v["availability_zone"], "nova", "{v:#}");
    assert_eq!(v["bootable"], true, "{v:#}");
    assert_eq!(
        v["properties"]["stream_migration_id"],
        migration_a.as_str(),
        "{v:#}"
    );
    assert_eq!(
        v["properties"]["stream_source_lv"],
        format!("{VG}/mig-db01"),
        "{v:#}"
    );
    let lvs = os.lv_names();
    assert_eq!(lvs, [format!("volume-{a_id}")], "lvs after the handoff");
    // What `stream` wrote is in the extents of Cinder's volume.
    let got = lv_bytes(&os, &format!("volume-{a_id}"), a.img.size as usize);
    assert_same_bytes(
        &got,
        &a.img.expected_all(),
        0,
        "volume-<id> after the handoff",
    );
    // The tenant sees it in its project.
    let tv = os.openstack_json(&os.tenant, &["volume", "show", &a_id]);
    assert_eq!(tv["status"], "available", "as the tenant sees it: {tv:#}");

    // A second run is a no-op: no Cinder call changes anything.
    let out = finalize_as(&a.state, &os.admin, &good_args)
        .args(&["--json"])
        .run_ok(FINALIZE);
    assert_eq!(
        finalize::json_stdout(&out)["cinder_volume_id"],
        a_id.as_str()
    );
    assert_eq!(os.all_volumes().len(), 1, "a second run made a volume");
    assert_eq!(os.lv_names(), lvs);

    // ---- B: a missing LV, then a lost answer, by identity not name ------
    let (b, b_running) = migrate(&os, "mig-web01");
    b_running.sigterm_and_wait(Duration::from_secs(30));
    // Named like A's volume on purpose: a re-run that looked volumes up by
    // name would take A's.
    let b_args = [
        "--cinder-manage",
        HOST,
        "--project",
        "tenant",
        "--volume-name",
        "db01",
    ];
    let out = os.lvm(&["lvrename", VG, "mig-web01", "mig-web01-away"]);
    assert!(out.status.success(), "{}", out.describe());
    let lvs_away = os.lv_names();
    // With an application credential made in the tenant project (it has
    // the admin role there, so it may manage): no --project, it is bound.
    let ac = os.openstack_json(
        &os.admin_in("tenant"),
        &["application", "credential", "create", "stream-test"],
    );
    let ac_creds: Vec<(String, String)> = [
        ("OS_AUTH_URL", auth_url.as_str()),
        ("OS_AUTH_TYPE", "v3applicationcredential"),
        (
            "OS_APPLICATION_CREDENTIAL_ID",
            ac["ID"].as_str().expect("ID"),
        ),
        (
            "OS_APPLICATION_CREDENTIAL_SECRET",
            ac["Secret"].as_str().expect("Secret"),
        ),
    ]
    .iter()
    .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
    .collect();
    let out = finalize_as(&b.state, &ac_creds, &["--cinder-manage", HOST]).run_fails(FINALIZE);
    assert_fails_with(
        &out,
        &["has no LV mig-web01", "nothing was changed"],
        "a missing LV",
    );
    assert_unchanged(&os, &b, 1, &lvs_away, "a missing LV");
    let out = os.lvm(&["lvrename", VG, "mig-web01-away", "mig-web01"]);
    assert!(out.status.success(), "{}", out.describe());

    // Cinder adopts the LV but the answer is lost on the way back.
    let proxy = CinderProxy::start("127.0.0.1:8776".parse().unwrap());
    proxy.lose_next_manage();
    let endpoint = format!("http://{}/v3", proxy.addr);
    let out = finalize_as(&b.state, &os.admin, &b_args)
        .env("OS_ENDPOINT", &endpoint)
        .run_fails(FINALIZE);
    assert!(
        proxy.lost(),
        "the manage call never went through the proxy: {}",
        out.describe()
    );
    let h = finalize::header(&b.state);
    assert_ne!(h["phase"], "finalized", "{h}");
    assert_eq!(h["finalize"]["cinder"]["source_name"], "mig-web01", "{h}");
    assert!(h["finalize"]["cinder"]["volume_id"].is_null(), "{h}");
    drop(proxy);

    // The re-run finds the volume by the migration id in its metadata, not
    // by its name (A's volume has it too), and sends no second manage call.
    // It logs in through OS_CLOUD and a clouds.yaml.
    let clouds = b._dir.path().join("clouds.yaml");
    std::fs::write(
        &clouds,
        format!(
            "clouds:\n  bringup:\n    region_name: RegionOne\n    auth:\n      auth_url: {}\n      \
             username: admin\n      password: {}\n      project_name: admin\n      \
             user_domain_name: Default\n      project_domain_name: Default\n",
            auth_url,
            os.admin_var("OS_PASSWORD")
        ),
    )
    .unwrap();
    let cloud_creds = vec![
        ("OS_CLOUD".to_owned(), "bringup".to_owned()),
        (
            "OS_CLIENT_CONFIG_FILE".to_owned(),
            clouds.display().to_string(),
        ),
    ];
    let out = finalize_as(&b.state, &cloud_creds, &b_args)
        .args(&["--json"])
        .run_ok(FINALIZE);
    assert_fails_with(&out, &["already has this migration's volume"], "the re-run");
    let b_id = finalize::json_stdout(&out)["cinder_volume_id"]
        .as_str()
        .expect("an id")
        .to_owned();
    assert_ne!(b_id, a_id, "the re-run took the other volume named db01");
    let all = os.all_volumes();
    assert_eq!(all.len(), 2, "a second manage call: {all:#?}");
    let v = show(&os, &b_id);
    assert_eq!(v["status"], "available", "{v:#}");
    assert_eq!(
        v["properties"]["stream_migration_id"],
        finalize::header(&b.state)["migration_id"],
        "{v:#}"
    );
    assert!(os.lv_names().contains(&format!("volume-{b_id}")));
    let got = lv_bytes(&os, &format!("volume-{b_id}"), b.img.size as usize);
    assert_same_bytes(&got, &b.img.expected_all(), 0, "B's volume");

    // ---- D: a Cinder from before 3.8: the legacy os-volume-manage -------
    // The proxy shows 3.7 as the highest microversion; every call still
    // reaches the real cinder-api, which keeps the legacy extension.
    let (d, d_running) = migrate(&os, "mig-old01");
    d_running.sigterm_and_wait(Duration::from_secs(30));
    let proxy = CinderProxy::start("127.0.0.1:8776".parse().unwrap());
    proxy.cap_version("3.7");
    let old_endpoint = format!("http://{}/v3", proxy.addr);
    let d_args = [
        "--cinder-manage",
        HOST,
        "--project",
        "tenant",
        "--volume-name",
        "old01",
    ];
    let d_finalize = || finalize_as(&d.state, &os.admin, &d_args).env("OS_ENDPOINT", &old_endpoint);
    // A missing LV: before 3.8 there is no manageable list to check it
    // against, so Cinder fails the manage itself (error_managing).
    let out = os.lvm(&["lvrename", VG, "mig-old01", "mig-old01-away"]);
    assert!(out.status.success(), "{}", out.describe());
    let before = os.all_volumes().len();
    let out = d_finalize().run_fails(FINALIZE);
    eprintln!("legacy, missing LV: {}", out.stderr_lossy());
    assert_fails_with(
        &out,
        &["(error_managing)", "openstack volume delete"],
        "legacy, missing LV",
    );
    let heads = proxy.heads();
    let manage: Vec<&String> = heads
        .iter()
        .filter(|h| h.starts_with("POST ") && h.contains("/os-volume-manage "))
        .collect();
    assert_eq!(manage.len(), 1, "one legacy manage call: {heads:#?}");
    assert!(
        manage[0]
            .to_ascii_lowercase()
            .contains("openstack-api-version: volume 3.7"),
        "{}",
        manage[0]
    );
    assert!(
        !heads.iter().any(|h| h.contains("manageable_volumes")),
        "a 3.8 call to a 3.7 Cinder: {heads:#?}"
    );
    let failed_id = finalize::header(&d.state)["finalize"]["cinder"]["volume_id"]
        .as_str()
        .expect("the failed volume's id is recorded")
        .to_owned();
    assert!(os.lv_names().contains(&"mig-old01-away".to_owned()));
    // As the message says: delete the failed record. The LVM driver then
    // deletes only an LV named volume-<id>, never the LV under its name.
    let out = os.openstack(&os.admin, &["volume", "delete", &failed_id]);
    assert!(out.status.success(), "{}", out.describe());
    let deadline = Instant::now() + Duration::from_secs(60);
    while os.all_volumes().len() != before {
        // Each `openstack` call takes ~2 s: the poll paces itself.
        assert!(
            Instant::now() < deadline,
            "volume {failed_id} not deleted in 60 s"
        );
    }
    assert!(os.lv_names().contains(&"mig-old01-away".to_owned()));
    let out = os.lvm(&["lvrename", VG, "mig-old01-away", "mig-old01"]);
    assert!(out.status.success(), "{}", out.describe());
    // The re-run: the recorded volume is gone, so it manages again.
    let out = d_finalize().args(&["--json"]).run_ok(FINALIZE);
    let d_id = finalize::json_stdout(&out)["cinder_volume_id"]
        .as_str()
        .expect("an id")
        .to_owned();
    assert_ne!(d_id, failed_id);
    let v = show(&os, &d_id);
    assert_eq!(v["status"], "available", "{v:#}");
    assert_eq!(v["size"], 1, "{v:#}");
    assert_eq!(
        v["os-vol-tenant-attr:tenant_id"],
        tenant_id.as_str(),
        "{v:#}"
    );
    assert!(os.lv_names().contains(&format!("volume-{d_id}")));
    let got = lv_bytes(&os, &format!("volume-{d_id}"), d.img.size as usize);
    assert_same_bytes(&got, &d.img.expected_all(), 0, "D's volume");
    drop(proxy);

    // ---- C: the manual fallback of docs/cutover.md, command for command --
    let (c, c_running) = migrate(&os, "mig-app01");
    c_running.sigterm_and_wait(Duration::from_secs(30));
    finalize_as(&c.state, &[], &["--verify"]).run_ok(FINALIZE);
    let migration_c = finalize::header(&c.state)["migration_id"]
        .as_str()
        .expect("a migration id")
        .to_owned();
    let in_tenant = os.admin_in("tenant");
    let property = format!("stream_migration_id={migration_c}");
    let made = os.openstack_json(
        &in_tenant,
        &[
            "volume",
            "create",
            "--remote-source",
            "source-name=mig-app01",
            "--host",
            HOST,
            "--type",
            "lvm",
            "--availability-zone",
            "nova",
            "--bootable",
            "--property",
            &property,
            "app01",
        ],
    );
    let c_id = made["id"].as_str().expect("an id").to_owned();
    let deadline = Instant::now() + Duration::from_secs(60);
    let v = loop {
        // Each `openstack` call takes ~2 s: the poll paces itself.
        let v = os.openstack_json(
            &in_tenant,
            &[
                "volume", "show", "app01", "-c", "status", "-c", "id", "-c", "size",
            ],
        );
        if v["status"] != "creating" || Instant::now() > deadline {
            break v;
        }
    };
    assert_eq!(v["status"], "available", "{v:#}");
    assert_eq!(v["id"], c_id.as_str());
    assert_eq!(v["size"], 1);
    assert_eq!(
        show(&os, &c_id)["os-vol-tenant-attr:tenant_id"],
        tenant_id.as_str()
    );
    assert!(os.lv_names().contains(&format!("volume-{c_id}")));
    let got = lv_bytes(&os, &format!("volume-{c_id}"), c.img.size as usize);
    assert_same_bytes(&got, &c.img.expected_all(), 0, "C's volume");

    drop((a, b, c, d));
    drop(os);
}
