//! The block-storage calls of the handoff: manage an existing LV, find a
//! volume by name, wait for it to become available.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde::Deserialize;
use serde_json::{Value, json};

use super::auth::{self, Secret, Settings};
use super::http::{Http, describe_error};
use super::{Error, Result};

/// What to adopt: `POST /v3/{project_id}/manageable_volumes`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManageRequest {
    /// The cinder-volume service: `HOST@BACKEND#POOL`.
    pub host: String,
    /// The LV name within the backend's volume group (`ref.source-name`).
    pub source_name: String,
    /// The new volume's name; keep it unique, a re-run looks it up.
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

/// Statuses on the way to `available` after a manage call.
const IN_PROGRESS: &[&str] = &["creating", "managing"];
/// Statuses of a failed manage call (the API shows `error_managing` as `error`).
const FAILED: &[&str] = &["error", "error_managing"];

/// An authenticated block-storage client for one project.
pub struct Client {
    http: Http,
    token: Secret,
    /// `https://cinder:8776/v3/PROJECT_ID`, no trailing slash.
    volume_url: String,
    poll_interval: Duration,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("volume_url", &self.volume_url)
            .finish_non_exhaustive()
    }
}

impl Client {
    /// Authenticate from the `OS_*` environment (see [`auth`]).
    pub fn from_env() -> Result<Client> {
        Client::from_settings(&Settings::from_env()?)
    }

    pub fn from_settings(settings: &Settings) -> Result<Client> {
        let http = Http::new(settings.cacert.as_deref(), settings.microversion.clone())?;
        let session = auth::authenticate(&http, settings)?;
        Ok(Client {
            http,
            token: session.token,
            volume_url: session.volume_url,
            poll_interval: Duration::from_secs(2),
        })
    }

    /// How often [`Client::wait_available`] asks (default 2 s).
    #[cfg(test)]
    pub fn with_poll_interval(mut self, interval: Duration) -> Self {
        self.poll_interval = interval;
        self
    }

    /// The block-storage URL of the project, e.g. for messages.
    pub fn endpoint(&self) -> &str {
        &self.volume_url
    }

    /// Ask Cinder to adopt the LV. Cinder answers 202 at once with a volume
    /// in `creating`; the driver renames the LV afterwards, so follow with
    /// [`Client::wait_available`]. Not idempotent: a caller that may run
    /// twice looks for the volume by name first.
    pub fn manage_existing(&self, request: &ManageRequest) -> Result<ManagedVolume> {
        let url = format!("{}/manageable_volumes", self.volume_url);
        let response = self
            .http
            .send("POST", &url, Some(&self.token), Some(&request.body()))?;
        let body: OneVolume = self.expect_ok("POST", &url, response)?;
        Ok(body.volume.into())
    }

    /// The volume named exactly `name`, if any
    /// (`GET volumes/detail?name=NAME`). Several with that name is an error.
    pub fn find_volume_by_name(&self, name: &str) -> Result<Option<ManagedVolume>> {
        let url = format!("{}/volumes/detail?name={}", self.volume_url, encode(name));
        let response = self.http.send("GET", &url, Some(&self.token), None)?;
        let body: Volumes = self.expect_ok("GET", &url, response)?;
        // The filter may be inexact on some deployments: keep exact names only.
        let mut found: Vec<ManagedVolume> = body
            .volumes
            .into_iter()
            .map(ManagedVolume::from)
            .filter(|v| v.name.as_deref() == Some(name))
            .collect();
        match found.len() {
            0 => Ok(None),
            1 => Ok(found.pop()),
            _ => Err(Error::Ambiguous {
                name: name.to_owned(),
                ids: found.into_iter().map(|v| v.id).collect(),
            }),
        }
    }

    /// `GET volumes/{id}`.
    pub fn volume(&self, id: &str) -> Result<ManagedVolume> {
        let url = format!("{}/volumes/{}", self.volume_url, encode(id));
        let response = self.http.send("GET", &url, Some(&self.token), None)?;
        let body: OneVolume = self.expect_ok("GET", &url, response)?;
        Ok(body.volume.into())
    }

    /// Poll the volume until it is `available`. A failed manage
    /// (`error_managing`, shown as `error`) and any status other than
    /// `creating`/`managing` end the wait with an error; so does `timeout`.
    pub fn wait_available(&self, id: &str, timeout: Duration) -> Result<ManagedVolume> {
        let deadline = Instant::now() + timeout;
        loop {
            let volume = self.volume(id)?;
            let status = volume.status.as_str();
            if status == "available" {
                return Ok(volume);
            }
            if FAILED.contains(&status) {
                return Err(Error::ManageFailed {
                    id: id.to_owned(),
                    status: volume.status,
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

    fn expect_ok<T: serde::de::DeserializeOwned>(
        &self,
        method: &'static str,
        url: &str,
        response: super::http::Response,
    ) -> Result<T> {
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
