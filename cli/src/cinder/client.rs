//! The block-storage calls of the handoff: negotiate the API version,
//! check that the host, volume type, zone and LV are there, manage the LV,
//! find the volume a migration made (by its id or the migration id in its
//! metadata, never by name), wait for it to settle.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde::Deserialize;
use serde_json::{Value, json};

use super::auth::{self, Secret, Settings};
use super::http::{Http, Response, describe_error};
use super::version::{self, Api};
use super::{Error, Result};

/// What to adopt: `POST /v3/{project_id}/manageable_volumes`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManageRequest {
    /// The cinder-volume service: `HOST@BACKEND#POOL`.
    pub host: String,
    /// The LV name within the backend's volume group (`ref.source-name`).
    pub source_name: String,
    /// The new volume's name (a label: re-runs find the volume by id or
    /// metadata, never by name).
    pub name: String,
    pub bootable: bool,
    pub description: Option<String>,
    pub volume_type: Option<String>,
    pub availability_zone: Option<String>,
    pub metadata: BTreeMap<String, String>,
}

impl ManageRequest {
    pub fn new(
        host: impl Into<String>,
        source_name: impl Into<String>,
        name: impl Into<String>,
    ) -> Self {
        ManageRequest {
            host: host.into(),
            source_name: source_name.into(),
            name: name.into(),
            bootable: false,
            description: None,
            volume_type: None,
            availability_zone: None,
            metadata: BTreeMap::new(),
        }
    }

    /// The JSON body, as in the api-ref's "Manage an existing volume";
    /// unset optional fields are left out so Cinder applies its defaults.
    pub fn body(&self) -> Value {
        let mut volume = json!({
            "host": self.host,
            "ref": { "source-name": self.source_name },
            "name": self.name,
            "bootable": self.bootable,
        });
        if let Some(d) = &self.description {
            volume["description"] = json!(d);
        }
        if let Some(t) = &self.volume_type {
            volume["volume_type"] = json!(t);
        }
        if let Some(az) = &self.availability_zone {
            volume["availability_zone"] = json!(az);
        }
        if !self.metadata.is_empty() {
            volume["metadata"] = json!(self.metadata);
        }
        json!({ "volume": volume })
    }
}

/// A Cinder volume as the API shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManagedVolume {
    pub id: String,
    pub name: Option<String>,
    /// As the API shows it: `managing` reads `creating`, `error_managing`
    /// reads `error` (cinder/api/v3/views/volumes.py).
    pub status: String,
    /// GiB; 0 in the answer to the manage call, before the driver sized it.
    pub size_gb: Option<u64>,
    pub bootable: bool,
    /// `os-vol-host-attr:host` (shown to admins only).
    pub host: Option<String>,
    /// `os-vol-tenant-attr:tenant_id` (shown to admins only).
    pub project_id: Option<String>,
    pub volume_type: Option<String>,
    pub availability_zone: Option<String>,
    pub metadata: BTreeMap<String, String>,
    pub created_at: Option<String>,
}

#[derive(Deserialize)]
struct VolumeJson {
    id: String,
    #[serde(default)]
    name: Option<String>,
    status: String,
    #[serde(default)]
    size: Option<u64>,
    /// `"true"`/`"false"` in the api-ref samples; a bool is accepted too.
    #[serde(default)]
    bootable: Value,
    #[serde(default, rename = "os-vol-host-attr:host")]
    host: Option<String>,
    #[serde(default, rename = "os-vol-tenant-attr:tenant_id")]
    project_id: Option<String>,
    #[serde(default)]
    volume_type: Option<String>,
    #[serde(default)]
    availability_zone: Option<String>,
    #[serde(default)]
    metadata: BTreeMap<String, Value>,
    #[serde(default)]
    created_at: Option<String>,
}

impl From<VolumeJson> for ManagedVolume {
    fn from(v: VolumeJson) -> Self {
        let bootable = match &v.bootable {
            Value::Bool(b) => *b,
            Value::String(s) => s.eq_ignore_ascii_case("true"),
            _ => false,
        };
        let metadata = v
            .metadata
            .into_iter()
            .map(|(k, v)| match v {
                Value::String(s) => (k, s),
                other => (k, other.to_string()),
            })
            .collect();
        ManagedVolume {
            id: v.id,
            name: v.name,
            status: v.status,
            size_gb: v.size,
            bootable,
            host: v.host,
            project_id: v.project_id,
            volume_type: v.volume_type,
            availability_zone: v.availability_zone,
            metadata,
            created_at: v.created_at,
        }
    }
}

#[derive(Deserialize)]
struct OneVolume {
    volume: VolumeJson,
}

#[derive(Deserialize)]
struct Volumes {
    volumes: Vec<VolumeJson>,
}

/// One entry of `GET manageable_volumes/detail?host=...` (3.8).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manageable {
    pub source_name: String,
    pub size_gb: Option<u64>,
    pub safe_to_manage: bool,
    pub reason_not_safe: Option<String>,
    /// Set when the LV is a Cinder volume already.
    pub cinder_id: Option<String>,
}

#[derive(Deserialize)]
struct ManageableJson {
    #[serde(default)]
    reference: BTreeMap<String, Value>,
    #[serde(default)]
    size: Option<u64>,
    #[serde(default)]
    safe_to_manage: bool,
    #[serde(default)]
    reason_not_safe: Option<String>,
    #[serde(default)]
    cinder_id: Option<String>,
}

#[derive(Deserialize)]
struct ManageableList {
    #[serde(rename = "manageable-volumes")]
    volumes: Vec<ManageableJson>,
}

/// Statuses on the way to `available` after a manage call.
const IN_PROGRESS: &[&str] = &["creating", "managing"];
/// Statuses of a failed manage call (the API shows `error_managing` as `error`).
pub const FAILED: &[&str] = &["error", "error_managing"];

/// Cinder's reason for leaving an LV alone when it is open; an LV served by
/// a running `stream start` is open until the handover.
pub const IN_USE: &str = "Volume in use";

/// An authenticated block-storage client for one project, at the API
/// version negotiated with this Cinder.
pub struct Client {
    http: Http,
    token: Secret,
    /// `https://cinder:8776/v3/PROJECT_ID`, no trailing slash.
    volume_url: String,
    project_id: Option<String>,
    api: Api,
    poll_interval: Duration,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("volume_url", &self.volume_url)
            .field("api", &self.api)
            .finish_non_exhaustive()
    }
}

impl Client {
    /// Log in (see [`auth`]) and read Cinder's version document (see
    /// [`version`]): both fail here, before anything is changed anywhere.
    pub fn connect(settings: &Settings) -> Result<Client> {
        let http = Http::new(settings.cacert.as_deref())?;
        let session = auth::authenticate(&http, settings)?;
        // Never OS_VOLUME_API_VERSION: that is the CLI's setting, and the
        // version this code relies on is the one it negotiates.
        let api = negotiate(&http, &session.token, &session.volume_url)?;
        Ok(Client {
            http,
            token: session.token,
            volume_url: session.volume_url,
            project_id: session.project_id,
            api,
            poll_interval: Duration::from_secs(1),
        })
    }

    /// The block-storage URL of the project, e.g. for messages.
    pub fn endpoint(&self) -> &str {
        &self.volume_url
    }

    /// The project the token is scoped to: where a managed volume goes.
    pub fn project_id(&self) -> Option<&str> {
        self.project_id.as_deref()
    }

    pub fn api(&self) -> Api {
        self.api
    }

    fn get(&self, url: &str) -> Result<Response> {
        let header = self.api.header();
        self.http
            .send("GET", url, Some(&self.token), header.as_deref(), None)
    }

    fn get_ok<T: serde::de::DeserializeOwned>(&self, url: &str) -> Result<T> {
        let response = self.get(url)?;
        expect_ok("GET", url, response)
    }

    /// Ask Cinder to adopt the LV. Cinder answers 202 at once with a volume
    /// in `creating`; the driver renames the LV afterwards, so follow with
    /// [`Client::wait_settled`]. Not idempotent: a caller that may run
    /// twice looks for the volume first ([`Client::find_by_metadata`]).
    pub fn manage_existing(&self, request: &ManageRequest) -> Result<ManagedVolume> {
        let path = match self.api {
            Api::Manageable(_) => "manageable_volumes",
            Api::Legacy(_) => "os-volume-manage",
        };
        let url = format!("{}/{path}", self.volume_url);
        let header = self.api.header();
        let response = self.http.send(
            "POST",
            &url,
            Some(&self.token),
            header.as_deref(),
            Some(&request.body()),
        )?;
        let body: OneVolume = expect_ok("POST", &url, response)?;
        Ok(body.volume.into())
    }

    /// The one volume of the project whose metadata has `key` = `value`
    /// (`GET volumes/detail?metadata=...`, checked exactly here too).
    pub fn find_by_metadata(&self, key: &str, value: &str) -> Result<Option<ManagedVolume>> {
        let filter = serde_json::json!({ key: value }).to_string();
        let url = format!(
            "{}/volumes/detail?metadata={}",
            self.volume_url,
            encode(&filter)
        );
        let body: Volumes = self.get_ok(&url)?;
        let mut found: Vec<ManagedVolume> = body
            .volumes
            .into_iter()
            .map(ManagedVolume::from)
            .filter(|v| v.metadata.get(key).map(String::as_str) == Some(value))
            .collect();
        match found.len() {
            0 => Ok(None),
            1 => Ok(found.pop()),
            _ => Err(Error::Ambiguous {
                migration_id: value.to_owned(),
                ids: found.into_iter().map(|v| v.id).collect(),
            }),
        }
    }

    /// `GET volumes/{id}`; `None` on 404.
    pub fn volume(&self, id: &str) -> Result<Option<ManagedVolume>> {
        let url = format!("{}/volumes/{}", self.volume_url, encode(id));
        let response = self.get(&url)?;
        if response.status == 404 {
            return Ok(None);
        }
        let body: OneVolume = expect_ok("GET", &url, response)?;
        Ok(Some(body.volume.into()))
    }

    /// The backend pools (`HOST@BACKEND#POOL`) the scheduler knows; admin only.
    pub fn pools(&self) -> Result<Vec<String>> {
        #[derive(Deserialize)]
        struct Pool {
            name: String,
        }
        #[derive(Deserialize)]
        struct Pools {
            pools: Vec<Pool>,
        }
        let url = format!("{}/scheduler-stats/get_pools", self.volume_url);
        let body: Pools = self.get_ok(&url)?;
        Ok(body.pools.into_iter().map(|p| p.name).collect())
    }

    /// Volume types as (id, name).
    pub fn volume_types(&self) -> Result<Vec<(String, String)>> {
        #[derive(Deserialize)]
        struct Type {
            id: String,
            #[serde(default)]
            name: String,
        }
        #[derive(Deserialize)]
        struct Types {
            volume_types: Vec<Type>,
        }
        let url = format!("{}/types", self.volume_url);
        let body: Types = self.get_ok(&url)?;
        Ok(body
            .volume_types
            .into_iter()
            .map(|t| (t.id, t.name))
            .collect())
    }

    /// Names of the availability zones that are available.
    pub fn availability_zones(&self) -> Result<Vec<String>> {
        let url = format!("{}/os-availability-zone", self.volume_url);
        let body: Value = self.get_ok(&url)?;
        Ok(body["availabilityZoneInfo"]
            .as_array()
            .map(|zones| {
                zones
                    .iter()
                    .filter(|z| z["zoneState"]["available"] != false)
                    .filter_map(|z| z["zoneName"].as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default())
    }

    /// What the backend at `host` could adopt (3.8 and later); admin only.
    pub fn manageable(&self, host: &str) -> Result<Vec<Manageable>> {
        let url = format!(
            "{}/manageable_volumes/detail?host={}",
            self.volume_url,
            encode(host)
        );
        let body: ManageableList = self.get_ok(&url)?;
        Ok(body
            .volumes
            .into_iter()
            .map(|m| Manageable {
                source_name: m
                    .reference
                    .get("source-name")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_owned(),
                size_gb: m.size,
                safe_to_manage: m.safe_to_manage,
                reason_not_safe: m.reason_not_safe,
                cinder_id: m.cinder_id,
            })
            .collect())
    }

    /// Everything a manage call needs, checked read-only: the pool, the
    /// volume type, the zone, and (3.8) the LV in the backend's list of
    /// manageable volumes. `lv_may_be_open`: before the handover a running
    /// `stream start` holds the LV, which Cinder reports as in use.
    pub fn check_manage(&self, request: &ManageRequest, lv_may_be_open: bool) -> Result<()> {
        let pools = self.pools()?;
        let host = &request.host;
        let known = pools.iter().any(|p| {
            p == host
                || (!host.contains('#')
                    && p.strip_prefix(host.as_str())
                        .is_some_and(|rest| rest.starts_with('#')))
        });
        if !known {
            return Err(Error::Unknown(format!(
                "Cinder has no backend pool {host} (its scheduler knows: {})",
                list_or_none(&pools)
            )));
        }
        if let Some(t) = &request.volume_type {
            let types = self.volume_types()?;
            if !types.iter().any(|(id, name)| id == t || name == t) {
                let names: Vec<String> = types.into_iter().map(|(_, n)| n).collect();
                return Err(Error::Unknown(format!(
                    "Cinder has no volume type {t:?} visible to this project (it has: {})",
                    list_or_none(&names)
                )));
            }
        }
        if let Some(az) = &request.availability_zone {
            let zones = self.availability_zones()?;
            if !zones.contains(az) {
                return Err(Error::Unknown(format!(
                    "Cinder has no available availability zone {az:?} (it has: {})",
                    list_or_none(&zones)
                )));
            }
        }
        if let Api::Manageable(_) = self.api {
            let lvs = self.manageable(host)?;
            let lv = &request.source_name;
            match lvs.iter().find(|m| &m.source_name == lv) {
                None => {
                    let names: Vec<String> = lvs.iter().map(|m| m.source_name.clone()).collect();
                    return Err(Error::Unknown(format!(
                        "the backend {host} has no LV {lv} in its volume group (Cinder lists: {})",
                        list_or_none(&names)
                    )));
                }
                Some(m) if m.cinder_id.is_some() => {
                    return Err(Error::Unknown(format!(
                        "LV {lv} on {host} is Cinder volume {} already",
                        m.cinder_id.as_deref().unwrap_or_default()
                    )));
                }
                Some(m) if !m.safe_to_manage => {
                    let reason = m.reason_not_safe.as_deref().unwrap_or("no reason given");
                    if !(lv_may_be_open && reason == IN_USE) {
                        return Err(Error::Unknown(format!(
                            "Cinder will not manage LV {lv} on {host}: {reason}"
                        )));
                    }
                }
                Some(_) => {}
            }
        }
        Ok(())
    }

    /// Cinder's user messages about a volume (3.3 and later): the reason a
    /// manage call failed, as Cinder words it.
    pub fn fault(&self, id: &str) -> String {
        const NONE: &str = "Cinder recorded no reason; look in the cinder-volume log";
        if !self.api.has_messages() {
            return NONE.into();
        }
        let url = format!("{}/messages?resource_uuid={}", self.volume_url, encode(id));
        let Ok(body) = self.get_ok::<Value>(&url) else {
            return NONE.into();
        };
        let texts: Vec<String> = body["messages"]
            .as_array()
            .map(|ms| {
                ms.iter()
                    .filter_map(|m| m["user_message"].as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default();
        if texts.is_empty() {
            NONE.into()
        } else {
            format!("Cinder says: {}", texts.join("; "))
        }
    }

    /// Poll the volume until it is `available`. A failed manage
    /// (`error_managing`, shown as `error`) ends the wait with Cinder's
    /// reason; so does any status other than `creating`/`managing`, and the
    /// timeout.
    pub fn wait_settled(&self, id: &str, timeout: Duration) -> Result<ManagedVolume> {
        let deadline = Instant::now() + timeout;
        loop {
            let volume = self
                .volume(id)?
                .ok_or_else(|| Error::RecordedVolumeMissing {
                    id: id.to_owned(),
                    project: self.project_id.clone().unwrap_or_default(),
                })?;
            let status = volume.status.as_str();
            if status == "available" {
                return Ok(volume);
            }
            if FAILED.contains(&status) {
                return Err(Error::ManageFailed {
                    id: id.to_owned(),
                    status: volume.status,
                    fault: self.fault(id),
                });
            }
            if !IN_PROGRESS.contains(&status) {
                return Err(Error::UnexpectedStatus {
                    id: id.to_owned(),
                    status: volume.status,
                });
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(Error::Timeout {
                    id: id.to_owned(),
                    status: volume.status,
                    waited: timeout,
                });
            }
            std::thread::sleep(self.poll_interval.min(deadline - now));
        }
    }
}

/// Read the version document and choose the API (see [`version`]): first
/// `{root}/v3/` with the token, else `{root}/`.
fn negotiate(http: &Http, token: &Secret, volume_url: &str) -> Result<Api> {
    let root = version::root_of(volume_url).ok_or_else(|| Error::Version {
        url: volume_url.to_owned(),
        detail: "the block-storage endpoint has no /v3 in its path, so it is not Cinder's v3 \
                 API"
        .into(),
    })?;
    let mut tried = Vec::new();
    for url in [format!("{root}/v3/"), format!("{root}/")] {
        let response = http.send("GET", &url, Some(token), None, None)?;
        // The root answers 300 Multiple Choices on some deployments.
        if (200..300).contains(&response.status) || response.status == 300 {
            if let Some(versions) = version::parse_document(&response.body) {
                return version::choose(&versions).map_err(|detail| Error::Version { url, detail });
            }
        }
        tried.push(format!("{url} (HTTP {})", response.status));
    }
    Err(Error::Version {
        url: root,
        detail: format!(
            "no version document at {}; is this Cinder?",
            tried.join(", ")
        ),
    })
}

fn expect_ok<T: serde::de::DeserializeOwned>(
    method: &'static str,
    url: &str,
    response: Response,
) -> Result<T> {
    if response.status == 403 {
        return Err(Error::Forbidden {
            method,
            url: url.to_owned(),
            message: describe_error(&response.body),
        });
    }
    if !(200..300).contains(&response.status) {
        return Err(Error::Http {
            method,
            url: url.to_owned(),
            status: response.status,
            message: describe_error(&response.body),
        });
    }
    response.json(url)
}

fn list_or_none(items: &[String]) -> String {
    if items.is_empty() {
        "none".into()
    } else {
        items.join(", ")
    }
}

/// Percent-encode a query value or path segment (RFC 3986 unreserved kept).
fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}
