//! Real OpenStack for the Cinder handoff tests (issue 17): Keystone,
//! RabbitMQ, cinder-api, cinder-scheduler and cinder-volume (LVM driver)
//! brought up on 127.0.0.1 by `integration/openstack/bring-up`, and the LVs
//! a migration streams into, arranged in the bring-up's volume group.
//!
//! - [`OpenStack::up`] runs the script (bounded; a failure panics with the
//!   script's own last lines, which name what is missing) and reads the
//!   credentials it wrote; drop runs `bring-up --stop`, which kills by the
//!   PIDs it recorded, removes the VG, detaches its loop device and deletes
//!   its work dir.
//! - [`OpenStack::openstack`] runs the python-openstackclient of the
//!   bring-up's venv: the volume as *Cinder* shows it, through a client
//!   that is not ours.
//! - [`ArrangedLv`]: what is real and what is arranged. There is no
//!   device-mapper here, so an LV cannot be activated and has no
//!   `/dev/VG/LV` block device. The LV itself is real: `lvcreate -an
//!   --zero n` in the bring-up's VG, so Cinder's LVM driver lists it,
//!   sizes it and renames it to `volume-<id>` exactly as in production.
//!   The data path is arranged: a loop device over the very extents LVM
//!   allocated to the LV on the PV (offset `pe_start + first_pe *
//!   extent_size`, length the LV's size: what a device-mapper linear
//!   target would map), reachable as `/dev/VG/LV` through a symlink so the
//!   finalize preflight finds the LV by its name. Bytes `stream` writes
//!   land in the LV's extents on the PV; after the rename they are read
//!   back through the extents of `volume-<id>`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::binary::workspace_root;
use crate::tool::{self, Output};

/// The backend pool the bring-up configures (`host = os-bringup`,
/// backend `lvm`).
pub const HOST: &str = "os-bringup@lvm#lvm";
/// The bring-up's volume group.
pub const VG: &str = "cinder-bringup";
/// The password the bring-up gives the `tenant` user.
pub const TENANT_PASSWORD: &str = "tenant-secret";

/// Bring-up from a cold venv is pip plus ~40 s; allow for a slow mirror.
const BRING_UP_TIMEOUT: Duration = Duration::from_secs(600);

/// The running services; `bring-up --stop` on drop.
pub struct OpenStack {
    script: PathBuf,
    /// `$WORK` of the bring-up.
    pub work: PathBuf,
    pub venv: PathBuf,
    /// `admin-openrc` as variables.
    pub admin: Vec<(String, String)>,
    /// `tenant-openrc` as variables.
    pub tenant: Vec<(String, String)>,
    /// How long the bring-up took.
    pub took: Duration,
}

impl OpenStack {
    /// Run `integration/openstack/bring-up`; panics, with its output, if it
    /// fails or takes longer than 10 minutes.
    pub fn up() -> OpenStack {
        // SAFETY: geteuid has no preconditions.
        let euid = unsafe { libc::geteuid() };
        assert_eq!(
            euid, 0,
            "the Cinder tests need root (loop devices, LVM): run them as root, as \
             integration/run-tests does"
        );
        for (tool, package) in [
            ("losetup", "mount"),
            ("python3", "python3"),
            ("bash", "bash"),
        ] {
            tool::require_tool(tool, package);
        }
        let root = workspace_root();
        let script = root.join("integration/openstack/bring-up");
        let work = std::env::var_os("OS_BRINGUP_WORK")
            .map(PathBuf::from)
            .unwrap_or_else(|| root.join("target/openstack-work"));
        let venv = std::env::var_os("OS_BRINGUP_VENV")
            .map(PathBuf::from)
            .unwrap_or_else(|| root.join("target/openstack-venv"));
        let t0 = Instant::now();
        let out = tool::run(
            Command::new("bash")
                .arg(&script)
                .env("OS_BRINGUP_WORK", &work)
                .env("OS_BRINGUP_VENV", &venv),
            BRING_UP_TIMEOUT,
        );
        let took = t0.elapsed();
        let mut os = OpenStack {
            script,
            work,
            venv,
            admin: Vec::new(),
            tenant: Vec::new(),
            took,
        };
        if !out.status.success() {
            let err = out.stderr_lossy();
            let tail: Vec<&str> = err.lines().rev().take(40).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            // Stop what did start (drop runs --stop) before failing.
            drop(os);
            panic!(
                "integration/openstack/bring-up failed after {took:?} (status {}); its last \
                 lines name the step and what is missing:\n{}",
                out.status,
                tail.join("\n")
            );
        }
        eprintln!("bring-up took {took:?}");
        os.admin = read_openrc(&os.work.join("admin-openrc"));
        os.tenant = read_openrc(&os.work.join("tenant-openrc"));
        os
    }

    /// A variable of `admin-openrc`.
    pub fn admin_var(&self, key: &str) -> String {
        self.admin
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.clone())
            .unwrap_or_else(|| panic!("{key} is not in admin-openrc"))
    }

    /// `admin-openrc` scoped to another project (as `OS_PROJECT_NAME`).
    pub fn admin_in(&self, project: &str) -> Vec<(String, String)> {
        self.admin
            .iter()
            .map(|(k, v)| match k.as_str() {
                "OS_PROJECT_NAME" => (k.clone(), project.to_owned()),
                _ => (k.clone(), v.clone()),
            })
            .collect()
    }

    /// The venv's `openstack` with only `creds` as `OS_*`; bounded.
    pub fn openstack(&self, creds: &[(String, String)], args: &[&str]) -> Output {
        let mut cmd = Command::new(self.venv.join("bin/openstack"));
        cmd.args(args);
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("OS_") {
                cmd.env_remove(k);
            }
        }
        cmd.envs(creds.iter().map(|(k, v)| (k, v)));
        tool::run(&mut cmd, Duration::from_secs(120))
    }

    /// [`OpenStack::openstack`] with `-f json`, asserting success.
    pub fn openstack_json(&self, creds: &[(String, String)], args: &[&str]) -> serde_json::Value {
        let mut all = args.to_vec();
        all.extend(["-f", "json"]);
        let out = self.openstack(creds, &all);
        assert!(
            out.status.success(),
            "openstack {args:?}: {}",
            out.describe()
        );
        serde_json::from_str(out.stdout_lossy().trim()).unwrap_or_else(|e| {
            panic!(
                "openstack {args:?} printed no JSON ({e}): {}",
                out.describe()
            )
        })
    }

    /// Every volume of every project, as the admin sees them.
    pub fn all_volumes(&self) -> Vec<serde_json::Value> {
        let v = self.openstack_json(&self.admin, &["volume", "list", "--all-projects", "--long"]);
        v.as_array().cloned().unwrap_or_default()
    }

    /// An LVM command with the bring-up's `lvm.conf` (activation off).
    pub fn lvm(&self, args: &[&str]) -> Output {
        let (cmd, rest) = args.split_first().expect("an LVM command");
        tool::run(
            Command::new(cmd)
                .args(rest)
                .env("LVM_SYSTEM_DIR", self.work.join("lvm")),
            Duration::from_secs(60),
        )
    }

    fn lvm_ok(&self, args: &[&str]) -> String {
        let out = self.lvm(args);
        assert!(out.status.success(), "{args:?}: {}", out.describe());
        out.stdout_lossy()
    }

    /// The LV names in the bring-up's VG (`lvs`).
    pub fn lv_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .lvm_ok(&["lvs", "--noheadings", "-o", "lv_name", VG])
            .split_whitespace()
            .map(str::to_owned)
            .collect();
        names.sort();
        names
    }

    /// Where the LV `lv`'s bytes are: (PV device, byte offset, size). One
    /// linear segment is asserted (a fresh VG allocates contiguously).
    pub fn extents(&self, lv: &str) -> (PathBuf, u64, u64) {
        let full = format!("{VG}/{lv}");
        let seg = self.lvm_ok(&[
            "lvs",
            "--noheadings",
            "--units",
            "b",
            "--nosuffix",
            "-o",
            "seg_pe_ranges,lv_size,vg_extent_size",
            &full,
        ]);
        let fields: Vec<&str> = seg.split_whitespace().collect();
        assert_eq!(fields.len(), 3, "{full} is not one linear segment: {seg:?}");
        // "/dev/loop0:0-255"
        let (pv, range) = fields[0].rsplit_once(':').expect("PV:FIRST-LAST");
        let first: u64 = range.split('-').next().unwrap().parse().unwrap();
        let size: u64 = fields[1].parse().unwrap();
        let extent: u64 = fields[2].parse().unwrap();
        let pe_start: u64 = self
            .lvm_ok(&[
                "pvs",
                "--noheadings",
                "--units",
                "b",
                "--nosuffix",
                "-o",
                "pe_start",
                pv,
            ])
            .trim()
            .parse()
            .unwrap();
        (PathBuf::from(pv), pe_start + first * extent, size)
    }
}

impl Drop for OpenStack {
    fn drop(&mut self) {
        let out = tool::run(
            Command::new("bash")
                .arg(&self.script)
                .arg("--stop")
                .env("OS_BRINGUP_WORK", &self.work)
                .env("OS_BRINGUP_VENV", &self.venv),
            Duration::from_secs(90),
        );
        if !out.status.success() {
            eprintln!("bring-up --stop failed: {}", out.describe());
        }
    }
}

/// `export A=b C=d` lines as pairs.
fn read_openrc(path: &Path) -> Vec<(String, String)> {
    let text =
        std::fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("export "))
        .flat_map(|l| l.split_whitespace())
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

/// A real LV in the bring-up's VG whose extents are also a loop device,
/// reachable as `/dev/VG/LV` (see the module docs). Drop detaches the loop
/// device and removes the symlink (and `/dev/VG` once empty); the LV
/// itself goes with the VG at `bring-up --stop`.
pub struct ArrangedLv {
    pub lv: String,
    /// `/dev/VG/LV`, a symlink to [`ArrangedLv::loop_dev`].
    pub path: PathBuf,
    pub loop_dev: PathBuf,
    pub size: u64,
}

impl ArrangedLv {
    /// `lvcreate -an --zero n -L SIZE -n LV VG`, then the loop device and
    /// the symlink. `/dev/VG/LV` must not exist yet.
    pub fn create(os: &OpenStack, lv: &str, size: u64) -> ArrangedLv {
        os.lvm_ok(&[
            "lvcreate",
            "-an",
            "--zero",
            "n",
            "-L",
            &format!("{size}b"),
            "-n",
            lv,
            VG,
        ]);
        let (pv, offset, lv_size) = os.extents(lv);
        assert_eq!(lv_size, size, "lvcreate made {lv} {lv_size} bytes");
        let out = tool::run(
            Command::new("losetup")
                .args(["-f", "--show", "--offset", &offset.to_string()])
                .args(["--sizelimit", &size.to_string()])
                .arg(&pv),
            Duration::from_secs(30),
        );
        assert!(out.status.success(), "losetup: {}", out.describe());
        let loop_dev = PathBuf::from(out.stdout_lossy().trim());
        let dir = Path::new("/dev").join(VG);
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("mkdir {}: {e}", dir.display()));
        let path = dir.join(lv);
        let made = ArrangedLv {
            lv: lv.to_owned(),
            path: path.clone(),
            loop_dev: loop_dev.clone(),
            size,
        };
        std::os::unix::fs::symlink(&loop_dev, &path).unwrap_or_else(|e| {
            panic!("symlink {} -> {}: {e}", path.display(), loop_dev.display())
        });
        made
    }
}

impl Drop for ArrangedLv {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
        if let Some(dir) = self.path.parent() {
            let _ = std::fs::remove_dir(dir); // only once empty
        }
        let out = tool::run(
            Command::new("losetup").arg("-d").arg(&self.loop_dev),
            Duration::from_secs(30),
        );
        if !out.status.success() {
            eprintln!("losetup -d {}: {}", self.loop_dev.display(), out.describe());
        }
    }
}

/// `len` bytes at `offset` of a device or file.
pub fn read_bytes(path: &Path, offset: u64, len: usize) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    let mut buf = vec![0; len];
    f.read_exact_at(&mut buf, offset)
        .unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    buf
}

/// A TCP proxy in front of cinder-api that forwards every request and its
/// answer, and records each request's head. Two faults on demand:
/// [`CinderProxy::lose_next_manage`] swallows the answer to the next `POST`
/// of a manage call (Cinder did the work, the client never hears of it);
/// [`CinderProxy::cap_version`] rewrites the highest microversion in the
/// version documents (`GET /` and `GET /v3/`), so the client meets a
/// Cinder from before 3.8 while every other call still reaches the real
/// one. cinder-api under uWSGI closes every connection after one answer
/// (`Connection: close`), so one request per connection is all it needs.
pub struct CinderProxy {
    pub addr: std::net::SocketAddr,
    shared: std::sync::Arc<ProxyState>,
    acceptor: Option<std::thread::JoinHandle<()>>,
}

#[derive(Default)]
struct ProxyState {
    lose: std::sync::atomic::AtomicBool,
    stop: std::sync::atomic::AtomicBool,
    cap: std::sync::Mutex<Option<String>>,
    heads: std::sync::Mutex<Vec<String>>,
}

impl CinderProxy {
    pub fn start(upstream: std::net::SocketAddr) -> CinderProxy {
        use std::sync::Arc;
        use std::sync::atomic::Ordering;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind the proxy");
        listener.set_nonblocking(true).expect("nonblocking");
        let addr = listener.local_addr().unwrap();
        let shared = Arc::new(ProxyState::default());
        let acceptor = {
            let shared = shared.clone();
            std::thread::spawn(move || {
                while !shared.stop.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((client, _)) => {
                            let shared = shared.clone();
                            std::thread::spawn(move || forward(client, upstream, &shared));
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                            // Not synchronisation: the accept loop's idle
                            // tick, so it sees `stop`.
                            std::thread::sleep(Duration::from_millis(20));
                        }
                        Err(_) => return,
                    }
                }
            })
        };
        CinderProxy {
            addr,
            shared,
            acceptor: Some(acceptor),
        }
    }

    pub fn lose_next_manage(&self) {
        self.shared
            .lose
            .store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// Whether the armed loss has happened.
    pub fn lost(&self) -> bool {
        !self.shared.lose.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Show `max` (e.g. `3.7`) as the highest microversion.
    pub fn cap_version(&self, max: &str) {
        *self.shared.cap.lock().unwrap() = Some(max.to_owned());
    }

    /// The heads (request line and headers) of every request so far.
    pub fn heads(&self) -> Vec<String> {
        self.shared.heads.lock().unwrap().clone()
    }
}

impl Drop for CinderProxy {
    fn drop(&mut self) {
        self.shared
            .stop
            .store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.acceptor.take() {
            let _ = t.join();
        }
    }
}

fn forward(mut client: std::net::TcpStream, upstream: std::net::SocketAddr, shared: &ProxyState) {
    use std::io::{Read, Write};
    let _ = client.set_nonblocking(false);
    let _ = client.set_read_timeout(Some(Duration::from_secs(60)));
    // The request: headers, then Content-Length bytes of body.
    let mut req = Vec::new();
    let mut buf = [0u8; 8192];
    let header_end = loop {
        let Ok(n) = client.read(&mut buf) else { return };
        if n == 0 {
            return;
        }
        req.extend_from_slice(&buf[..n]);
        if let Some(i) = req.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
    };
    let head = String::from_utf8_lossy(&req[..header_end]).to_string();
    shared.heads.lock().unwrap().push(head.clone());
    let length = content_length(&head);
    while req.len() < header_end + length {
        let Ok(n) = client.read(&mut buf) else { return };
        if n == 0 {
            return;
        }
        req.extend_from_slice(&buf[..n]);
    }
    let Ok(mut up) = std::net::TcpStream::connect(upstream) else {
        return;
    };
    let _ = up.set_read_timeout(Some(Duration::from_secs(60)));
    if up.write_all(&req).is_err() {
        return;
    }
    let mut answer = Vec::new();
    let _ = up.read_to_end(&mut answer);
    let first = head.lines().next().unwrap_or_default();
    let mut parts = first.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let is_manage = method == "POST"
        && (path.ends_with("/manageable_volumes") || path.ends_with("/os-volume-manage"));
    if is_manage
        && shared
            .lose
            .compare_exchange(
                true,
                false,
                std::sync::atomic::Ordering::SeqCst,
                std::sync::atomic::Ordering::SeqCst,
            )
            .is_ok()
    {
        // Cinder answered; the client never hears it.
        let _ = client.shutdown(std::net::Shutdown::Both);
        return;
    }
    let cap = shared.cap.lock().unwrap().clone();
    if let Some(cap) = cap {
        if method == "GET" && matches!(path, "/" | "/v3" | "/v3/") {
            answer = cap_versions(&answer, &cap);
        }
    }
    let _ = client.write_all(&answer);
}

fn content_length(head: &str) -> usize {
    head.lines()
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.trim().parse().ok())
        .unwrap_or(0)
}

/// The HTTP answer `raw` with every `"version"` of its version document
/// set to `cap`, and its Content-Length fixed.
fn cap_versions(raw: &[u8], cap: &str) -> Vec<u8> {
    let Some(end) = raw.windows(4).position(|w| w == b"\r\n\r\n") else {
        return raw.to_vec();
    };
    let head = String::from_utf8_lossy(&raw[..end]).to_string();
    let Ok(mut doc) = serde_json::from_slice::<serde_json::Value>(&raw[end + 4..]) else {
        return raw.to_vec();
    };
    if let Some(versions) = doc["versions"].as_array_mut() {
        for v in versions {
            v["version"] = cap.into();
        }
    }
    let body = doc.to_string();
    let head: Vec<String> = head
        .lines()
        .map(|l| {
            if l.to_ascii_lowercase().starts_with("content-length:") {
                format!("Content-Length: {}", body.len())
            } else {
                l.to_owned()
            }
        })
        .collect();
    format!("{}\r\n\r\n{body}", head.join("\r\n")).into_bytes()
}
