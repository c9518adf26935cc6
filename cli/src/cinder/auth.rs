//! Settings from the usual `OS_*` environment, and a Keystone v3 token with
//! the block-storage endpoint from its service catalog.
//!
//! Two ways in:
//! - Keystone (`OS_AUTH_URL`): `POST {auth_url}/v3/auth/tokens` with the
//!   password (`OS_USERNAME`+`OS_USER_DOMAIN_*` or `OS_USER_ID`, and
//!   `OS_PASSWORD`) or an existing token (`OS_TOKEN`), scoped to the project
//!   (`OS_PROJECT_ID`, or `OS_PROJECT_NAME`+`OS_PROJECT_DOMAIN_*`). The token
//!   is the `X-Subject-Token` header; the endpoint is the catalog's
//!   `block-storage` service (else `volumev3`) at `OS_INTERFACE` (default
//!   `public`) in `OS_REGION_NAME` (any region if unset).
//! - Explicit (`OS_TOKEN` and `OS_ENDPOINT`): no Keystone call; `OS_ENDPOINT`
//!   is the block-storage URL (`https://cinder:8776/v3/PROJECT_ID`; with
//!   `OS_PROJECT_ID` set, the project is appended when missing).
//!
//! Secrets live in [`Secret`], whose `Debug` prints nothing; they are only
//! ever written into a request, never into an error or a log.

use serde::Deserialize;
use serde_json::{Value, json};

use super::http::{Http, describe_error};
pub use super::secret::Secret;
use super::{Error, Result};

/// A user, project or domain given by id or by name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NameOrId {
    Id(String),
    /// A name, within a domain (itself by id or name).
    Name {
        name: String,
        domain: Box<NameOrId>,
    },
    /// A domain name (domains need no domain).
    DomainName(String),
}

impl NameOrId {
    fn to_json(&self) -> Value {
        match self {
            NameOrId::Id(id) => json!({ "id": id }),
            NameOrId::Name { name, domain } => json!({ "name": name, "domain": domain.to_json() }),
            NameOrId::DomainName(name) => json!({ "name": name }),
        }
    }
}

#[derive(Debug, Clone)]
pub enum Identity {
    Password { user: NameOrId, password: Secret },
    Token(Secret),
}

/// Everything needed to reach Cinder, read from `OS_*` variables.
#[derive(Debug, Clone)]
pub struct Settings {
    /// `OS_AUTH_URL` (absent with an explicit endpoint).
    pub auth_url: Option<String>,
    pub identity: Identity,
    /// `OS_PROJECT_ID` / `OS_PROJECT_NAME` + domain.
    pub project: Option<NameOrId>,
    /// `OS_INTERFACE`, default `public` (`publicURL` is read as `public`).
    pub interface: String,
    /// `OS_REGION_NAME`.
    pub region: Option<String>,
    /// `OS_ENDPOINT`: skip Keystone and use this block-storage URL.
    pub endpoint: Option<String>,
    /// `OS_VOLUME_API_VERSION` when it names a microversion (`3.x`).
    pub microversion: Option<String>,
    /// `OS_CACERT`: extra CA bundle (PEM) for TLS.
    pub cacert: Option<std::path::PathBuf>,
}

impl Settings {
    pub fn from_env() -> Result<Settings> {
        Settings::from_lookup(|k| std::env::var(k).ok())
    }

    /// Settings from any variable source (tests pass a map); empty values
    /// count as unset.
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Settings> {
        let get = |k: &str| lookup(k).filter(|v| !v.trim().is_empty());
        let domain = |id_var: &str, name_var: &str| -> Option<NameOrId> {
            get(id_var)
                .map(NameOrId::Id)
                .or_else(|| get(name_var).map(NameOrId::DomainName))
        };
        let missing = |what: &str| Error::Config(format!("{what} is not set"));

        let endpoint = get("OS_ENDPOINT");
        let token = get("OS_TOKEN").map(Secret);
        let auth_url = get("OS_AUTH_URL");

        let identity = match (token, get("OS_PASSWORD")) {
            (Some(t), _) => Identity::Token(t),
            (None, _) if endpoint.is_some() => {
                return Err(Error::Config(
                    "OS_ENDPOINT is set without OS_TOKEN: an explicit endpoint needs a token \
                     (or unset OS_ENDPOINT to log in through Keystone)"
                        .into(),
                ));
            }
            (None, Some(password)) => {
                let user = match (get("OS_USER_ID"), get("OS_USERNAME")) {
                    (Some(id), _) => NameOrId::Id(id),
                    (None, Some(name)) => NameOrId::Name {
                        name,
                        domain: Box::new(
                            domain("OS_USER_DOMAIN_ID", "OS_USER_DOMAIN_NAME").ok_or_else(
                                || missing("OS_USER_DOMAIN_NAME (or OS_USER_DOMAIN_ID)"),
                            )?,
                        ),
                    },
                    (None, None) => return Err(missing("OS_USERNAME (or OS_USER_ID)")),
                };
                Identity::Password {
                    user,
                    password: Secret(password),
                }
            }
            (None, None) => return Err(missing("OS_PASSWORD (or OS_TOKEN)")),
        };

        let project = match (get("OS_PROJECT_ID"), get("OS_PROJECT_NAME")) {
            (Some(id), _) => Some(NameOrId::Id(id)),
            (None, Some(name)) => Some(NameOrId::Name {
                name,
                domain: Box::new(
                    domain("OS_PROJECT_DOMAIN_ID", "OS_PROJECT_DOMAIN_NAME").ok_or_else(|| {
                        missing("OS_PROJECT_DOMAIN_NAME (or OS_PROJECT_DOMAIN_ID)")
                    })?,
                ),
            }),
            (None, None) => None,
        };
        if endpoint.is_none() {
            if auth_url.is_none() {
                return Err(missing("OS_AUTH_URL"));
            }
            if project.is_none() {
                return Err(missing(
                    "OS_PROJECT_NAME (or OS_PROJECT_ID): Cinder needs a project-scoped token",
                ));
            }
        }

        let interface = get("OS_INTERFACE")
            .map(|i| i.trim_end_matches("URL").to_owned())
            .unwrap_or_else(|| "public".into());
        let microversion = match get("OS_VOLUME_API_VERSION") {
            None => None,
            Some(v) if v == "3" => None,
            Some(v) if v.starts_with("3.") => Some(v),
            Some(v) => {
                return Err(Error::Config(format!(
                    "OS_VOLUME_API_VERSION={v}: only the block-storage API v3 is supported"
                )));
            }
        };
        Ok(Settings {
            auth_url,
            identity,
            project,
            interface,
            region: get("OS_REGION_NAME"),
            endpoint,
            microversion,
            cacert: get("OS_CACERT").map(Into::into),
        })
    }
}

/// A token and the block-storage URL of its project (`.../v3/PROJECT_ID`).
#[derive(Debug, Clone)]
pub struct Session {
    pub token: Secret,
    pub volume_url: String,
}

/// `{auth_url}/auth/tokens`, whether `OS_AUTH_URL` ends in `/v3` or not.
pub fn tokens_url(auth_url: &str) -> String {
    let base = auth_url.trim_end_matches('/');
    if base.ends_with("/v3") {
        format!("{base}/auth/tokens")
    } else {
        format!("{base}/v3/auth/tokens")
    }
}

/// The body of `POST /v3/auth/tokens`.
pub fn token_request(identity: &Identity, project: Option<&NameOrId>) -> Value {
    let identity = match identity {
        Identity::Password { user, password } => {
            let mut user = user.to_json();
            user["password"] = json!(password.expose());
            json!({ "methods": ["password"], "password": { "user": user } })
        }
        Identity::Token(token) => {
            json!({ "methods": ["token"], "token": { "id": token.expose() } })
        }
    };
    let mut auth = json!({ "identity": identity });
    if let Some(project) = project {
        auth["scope"] = json!({ "project": project.to_json() });
    }
    json!({ "auth": auth })
}

#[derive(Debug, Deserialize)]
struct TokenBody {
    token: TokenInfo,
}

#[derive(Debug, Deserialize)]
struct TokenInfo {
    project: Option<Project>,
    #[serde(default)]
    catalog: Vec<Service>,
}

#[derive(Debug, Deserialize)]
struct Project {
    id: String,
}

/// One service of the catalog.
#[derive(Debug, Clone, Deserialize)]
pub struct Service {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub endpoints: Vec<Endpoint>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Endpoint {
    pub interface: String,
    #[serde(default)]
    pub region_id: Option<String>,
    #[serde(default)]
    pub region: Option<String>,
    pub url: String,
}

/// Catalog types of Cinder's v3 API, preferred first.
pub const BLOCK_STORAGE_TYPES: &[&str] = &["block-storage", "volumev3"];

/// The URL of the block-storage endpoint at `interface` in `region` (any
/// region when `None`).
pub fn select_endpoint(
    catalog: &[Service],
    interface: &str,
    region: Option<&str>,
) -> Result<String> {
    let in_region = |e: &Endpoint| {
        region.is_none_or(|r| e.region_id.as_deref() == Some(r) || e.region.as_deref() == Some(r))
    };
    for kind in BLOCK_STORAGE_TYPES {
        for service in catalog.iter().filter(|s| s.kind == *kind) {
            if let Some(e) = service
                .endpoints
                .iter()
                .find(|e| e.interface == interface && in_region(e))
            {
                return Ok(e.url.clone());
            }
        }
    }
    let offered: Vec<String> = catalog
        .iter()
        .filter(|s| BLOCK_STORAGE_TYPES.contains(&s.kind.as_str()))
        .flat_map(|s| {
            s.endpoints.iter().map(move |e| {
                format!(
                    "{} {} in {}",
                    s.kind,
                    e.interface,
                    e.region_id
                        .as_deref()
                        .or(e.region.as_deref())
                        .unwrap_or("no region")
                )
            })
        })
        .collect();
    let wanted = format!(
        "no block-storage (or volumev3) endpoint with interface {interface}{} in the service catalog",
        region
            .map(|r| format!(" in region {r}"))
            .unwrap_or_default()
    );
    let hint = if offered.is_empty() {
        let types: Vec<&str> = catalog.iter().map(|s| s.kind.as_str()).collect();
        format!(
            "the catalog has no Cinder v3 service (types: {})",
            types.join(", ")
        )
    } else {
        format!(
            "it offers: {}; set OS_INTERFACE / OS_REGION_NAME",
            offered.join("; ")
        )
    };
    Err(Error::NoEndpoint(format!("{wanted}: {hint}")))
}

/// `url` with the project id as its last path segment.
pub fn with_project(url: &str, project_id: Option<&str>) -> String {
    let url = url.trim_end_matches('/');
    match project_id {
        Some(p) if url.rsplit('/').next() != Some(p) => format!("{url}/{p}"),
        _ => url.to_owned(),
    }
}

/// Log in (or take the explicit endpoint) and find the block-storage URL.
pub fn authenticate(http: &Http, settings: &Settings) -> Result<Session> {
    if let (Some(endpoint), Identity::Token(token)) = (&settings.endpoint, &settings.identity) {
        let project_id = match &settings.project {
            Some(NameOrId::Id(id)) => Some(id.as_str()),
            _ => None,
        };
        return Ok(Session {
            token: token.clone(),
            volume_url: with_project(endpoint, project_id),
        });
    }
    let auth_url = settings
        .auth_url
        .as_deref()
        .ok_or_else(|| Error::Config("OS_AUTH_URL is not set".into()))?;
    let url = tokens_url(auth_url);
    let body = token_request(&settings.identity, settings.project.as_ref());
    let response = http.send("POST", &url, None, Some(&body))?;
    if response.status == 401 {
        return Err(Error::Unauthorized {
            url,
            message: describe_error(&response.body),
        });
    }
    if !(200..300).contains(&response.status) {
        return Err(Error::Http {
            method: "POST",
            url,
            status: response.status,
            message: describe_error(&response.body),
        });
    }
    let token = response
        .subject_token
        .clone()
        .ok_or_else(|| Error::BadResponse {
            url: url.clone(),
            detail: "no X-Subject-Token header".into(),
        })?;
    let parsed: TokenBody = response.json(&url)?;
    let project_id = parsed
        .token
        .project
        .map(|p| p.id)
        .ok_or_else(|| Error::BadResponse {
            url: url.clone(),
            detail: "the token is not scoped to a project".into(),
        })?;
    let endpoint = select_endpoint(
        &parsed.token.catalog,
        &settings.interface,
        settings.region.as_deref(),
    )?;
    Ok(Session {
        token: Secret(token),
        volume_url: with_project(&endpoint, Some(&project_id)),
    })
}
