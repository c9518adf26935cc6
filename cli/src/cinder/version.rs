//! Which block-storage API a Cinder speaks, from its version document, and
//! so which manage call and `OpenStack-API-Version` header we use.
//!
//! Real Cinder answers `POST /v3/{project}/manageable_volumes` with **404**
//! when the request carries no microversion header (it is then taken as
//! 3.0, and the resource only exists from 3.8). So the header is never left
//! to the environment: every Cinder request carries the version we chose.
//!
//! The document is `GET {root}/v3/` (with the token) or `GET {root}/`; both
//! answer `{"versions": [{"id": "v3.0", "status": "CURRENT", "version":
//! "3.71", "min_version": "3.0", ...}]}` on Cinder 29 (`version` is the
//! highest microversion, empty on an API without microversions).
//!
//! | the v3 entry offers            | we use                                   |
//! |--------------------------------|------------------------------------------|
//! | max >= 3.8                     | `manageable_volumes`, header `volume 3.8` (or MIN if above) |
//! | microversions, max < 3.8       | legacy `os-volume-manage`, header `volume MAX` |
//! | no microversions               | legacy `os-volume-manage`, no header     |
//! | no v3 entry                    | an error naming what it offers           |
//!
//! 3.8 is pinned, not the highest offered: it is the version whose answers
//! the tests read, and it also has the user messages (3.3) we read a
//! failure's reason from. Below 3.8 the highest offered is used, so a 3.3
//! to 3.7 Cinder still gives that reason.

use serde::Deserialize;

/// The microversion we pin when the cloud has it.
pub const MANAGEABLE: Microversion = Microversion(3, 8);
/// User messages (`GET messages`) appeared in 3.3.
pub const MESSAGES: Microversion = Microversion(3, 3);

/// `3.N` of the block-storage API v3.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Microversion(pub u32, pub u32);

impl Microversion {
    /// `"3.71"`; `None` for an empty or malformed string.
    pub fn parse(s: &str) -> Option<Microversion> {
        let (major, minor) = s.trim().split_once('.')?;
        Some(Microversion(major.parse().ok()?, minor.parse().ok()?))
    }
}

impl std::fmt::Display for Microversion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.0, self.1)
    }
}

/// How we talk to this Cinder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Api {
    /// `POST manageable_volumes` (and the manageable list) at this version.
    Manageable(Microversion),
    /// `POST os-volume-manage`, the extension of Cinder before 3.8; the
    /// header when the API has microversions at all.
    Legacy(Option<Microversion>),
}

impl Api {
    /// The `OpenStack-API-Version` header value, e.g. `volume 3.8`.
    pub fn header(&self) -> Option<String> {
        match self {
            Api::Manageable(v) | Api::Legacy(Some(v)) => Some(format!("volume {v}")),
            Api::Legacy(None) => None,
        }
    }

    /// The version every request is sent at.
    pub fn version(&self) -> Option<Microversion> {
        match self {
            Api::Manageable(v) | Api::Legacy(Some(v)) => Some(*v),
            Api::Legacy(None) => None,
        }
    }

    /// Whether `GET messages` (a failure's reason) is there.
    pub fn has_messages(&self) -> bool {
        self.version().is_some_and(|v| v >= MESSAGES)
    }
}

impl std::fmt::Display for Api {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Api::Manageable(v) => write!(f, "manageable_volumes at volume {v}"),
            Api::Legacy(Some(v)) => write!(f, "the legacy os-volume-manage at volume {v}"),
            Api::Legacy(None) => f.write_str("the legacy os-volume-manage, no microversion"),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
pub struct ApiVersion {
    pub id: String,
    #[serde(default)]
    pub status: String,
    /// The highest microversion; empty without microversions.
    #[serde(default)]
    pub version: String,
    #[serde(default)]
    pub min_version: String,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Document {
    Many { versions: Vec<ApiVersion> },
    One { version: ApiVersion },
}

/// The versions of a version document (`{"versions": [...]}` or
/// `{"version": {...}}`); `None` if it is neither.
pub fn parse_document(body: &str) -> Option<Vec<ApiVersion>> {
    match serde_json::from_str::<Document>(body).ok()? {
        Document::Many { versions } => Some(versions),
        Document::One { version } => Some(vec![version]),
    }
}

/// Choose the API from the versions offered (see the module's table).
pub fn choose(versions: &[ApiVersion]) -> Result<Api, String> {
    let v3 = versions
        .iter()
        .filter(|v| v.id == "v3" || v.id.starts_with("v3."))
        .find(|v| !v.status.eq_ignore_ascii_case("DELETED"));
    let Some(v3) = v3 else {
        let offered: Vec<String> = versions
            .iter()
            .map(|v| format!("{} ({})", v.id, v.status))
            .collect();
        return Err(format!(
            "this Cinder offers no block-storage API v3 (it offers: {})",
            if offered.is_empty() {
                "nothing".to_owned()
            } else {
                offered.join(", ")
            }
        ));
    };
    let max = Microversion::parse(&v3.version);
    let min = Microversion::parse(&v3.min_version).unwrap_or(Microversion(3, 0));
    Ok(match max {
        Some(max) if max >= MANAGEABLE => Api::Manageable(min.max(MANAGEABLE)),
        Some(max) => Api::Legacy(Some(max)),
        None => Api::Legacy(None),
    })
}

/// Where the version document is: the endpoint up to its `/v3` segment
/// (`https://c:8776/v3/PROJECT` -> `https://c:8776`, keeping any prefix such
/// as `/volume`). `None` when the URL has no `/v3` segment.
pub fn root_of(volume_url: &str) -> Option<String> {
    let (scheme, rest) = volume_url.split_once("://")?;
    let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
    let segments: Vec<&str> = path.split('/').collect();
    let at = segments
        .iter()
        .rposition(|s| *s == "v3" || s.starts_with("v3."))?;
    let prefix = segments[..at].join("/");
    Some(if prefix.is_empty() {
        format!("{scheme}://{authority}")
    } else {
        format!("{scheme}://{authority}/{prefix}")
    })
}
