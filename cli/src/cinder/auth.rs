//! Settings from the usual `OS_*` environment, and a Keystone v3 token with
//! the block-storage endpoint from its service catalog.
//!
//! Two ways in:
//! - Keystone (`OS_AUTH_URL`): `POST {auth_url}/v3/auth/tokens` with the
//!   password (`OS_USERNAME`+`OS_USER_DOMAIN_*` or `OS_USER_ID`, and
//!   `OS_PASSWORD`), an existing token (`OS_TOKEN`) or an application
//!   credential (`OS_AUTH_TYPE=v3applicationcredential`,
//!   `OS_APPLICATION_CREDENTIAL_ID` or `_NAME` with the user, and
//!   `OS_APPLICATION_CREDENTIAL_SECRET`; bound to its own project), scoped
//!   to the project (`OS_PROJECT_ID`, or `OS_PROJECT_NAME`+
//!   `OS_PROJECT_DOMAIN_*`; `finalize --project` overrides it). The token
//!   is the `X-Subject-Token` header; the endpoint is the catalog's
//!   `block-storage` service (else `volumev3`) at `OS_INTERFACE` (default
//!   `public`) in `OS_REGION_NAME` (any region if unset).
//! - Explicit (`OS_TOKEN` and `OS_ENDPOINT`): no Keystone call; `OS_ENDPOINT`
//!   is the block-storage URL (`https://cinder:8776/v3/PROJECT_ID`; with
//!   `OS_PROJECT_ID` set, the project is appended when missing). With a
//!   password or application credential, `OS_ENDPOINT` only overrides the
//!   catalog's URL (the token's project is appended), as keystoneauth's
//!   endpoint override does.
//!
//! `OS_CLOUD` reads the same settings from `clouds.yaml` (`clouds`).
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
    Password {
        user: NameOrId,
        password: Secret,
    },
    Token(Secret),
    /// An application credential: by id, or by name with its user.
    ApplicationCredential {
        id: Option<String>,
        name: Option<(String, NameOrId)>,
        secret: Secret,
    },
}

impl Identity {
    /// Application credentials carry their own project: no scope is sent.
    pub fn is_application_credential(&self) -> bool {
        matches!(self, Identity::ApplicationCredential { .. })
    }
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
    /// `OS_CACERT`: extra CA bundle (PEM) for TLS.
    pub cacert: Option<std::path::PathBuf>,
}

impl Settings {
    /// From the environment; with `OS_CLOUD`, from that cloud's entry in
    /// `clouds.yaml` instead (see [`super::clouds`]).
    pub fn from_env() -> Result<Settings> {
        let env = |k: &str| std::env::var(k).ok().filter(|v| !v.trim().is_empty());
        match env("OS_CLOUD") {
            Some(cloud) => {
                let vars = super::clouds::load(&cloud, &super::clouds::candidates(&env))?;
                Settings::from_lookup(|k| vars.get(k).cloned())
                    .map_err(|e| Error::Config(format!("OS_CLOUD={cloud}: {e}")))
            }
            None => Settings::from_lookup(env),
        }
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
        let user = || -> Result<NameOrId> {
            match (get("OS_USER_ID"), get("OS_USERNAME")) {
                (Some(id), _) => Ok(NameOrId::Id(id)),
                (None, Some(name)) => Ok(NameOrId::Name {
                    name,
                    domain: Box::new(
                        domain("OS_USER_DOMAIN_ID", "OS_USER_DOMAIN_NAME")
                            .ok_or_else(|| missing("OS_USER_DOMAIN_NAME (or OS_USER_DOMAIN_ID)"))?,
                    ),
                }),
                (None, None) => Err(missing("OS_USERNAME (or OS_USER_ID)")),
            }
        };
        let app_cred = get("OS_AUTH_TYPE").is_some_and(|t| {
            matches!(
                t.as_str(),
                "v3applicationcredential" | "applicationcredential" | "application_credential"
            )
        }) || get("OS_APPLICATION_CREDENTIAL_SECRET").is_some();

        let identity = match (token, get("OS_PASSWORD")) {
            _ if app_cred && endpoint.is_none() => {
                let secret = get("OS_APPLICATION_CREDENTIAL_SECRET")
                    .map(Secret)
                    .ok_or_else(|| missing("OS_APPLICATION_CREDENTIAL_SECRET"))?;
                let id = get("OS_APPLICATION_CREDENTIAL_ID");
                let name = match (&id, get("OS_APPLICATION_CREDENTIAL_NAME")) {
                    (Some(_), _) => None,
                    (None, Some(name)) => Some((name, user()?)),
                    (None, None) => {
                        return Err(missing(
                            "OS_APPLICATION_CREDENTIAL_ID (or OS_APPLICATION_CREDENTIAL_NAME \
                             with OS_USERNAME)",
                        ));
                    }
                };
                Identity::ApplicationCredential { id, name, secret }
            }
            (Some(t), _) => Identity::Token(t),
            (None, _) if endpoint.is_some() && auth_url.is_none() => {
                return Err(Error::Config(
                    "OS_ENDPOINT is set without OS_TOKEN or OS_AUTH_URL: an explicit endpoint \
                     needs a token, or Keystone to get one from"
                        .into(),
                ));
            }
            (None, Some(password)) => Identity::Password {
                user: user()?,
                password: Secret(password),
            },
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
        if endpoint.is_none() || !matches!(identity, Identity::Token(_)) {
            if auth_url.is_none() {
                return Err(missing("OS_AUTH_URL"));
            }
            if project.is_none() && !identity.is_application_credential() {
                return Err(missing(
                    "OS_PROJECT_NAME (or OS_PROJECT_ID): Cinder needs a project-scoped token",
                ));
            }
        }

        let interface = get("OS_INTERFACE")
            .map(|i| i.trim_end_matches("URL").to_owned())
            .unwrap_or_else(|| "public".into());
        Ok(Settings {
            auth_url,
            identity,
            project,
            interface,
            region: get("OS_REGION_NAME"),
            endpoint,
            cacert: get("OS_CACERT").map(Into::into),
        })
    }

    /// Scope to `project` instead of `OS_PROJECT_*` (`finalize --project`):
    /// a 32-hex-digit value is an id, anything else a name in
    /// `OS_PROJECT_DOMAIN_*` (else the user's domain, else `Default`).
    pub fn scope_to(&mut self, project: &str) -> Result<()> {
        if self.identity.is_application_credential() {
            return Err(Error::Config(format!(
                "--project {project}: an application credential is bound to the project it was \
                 made in; make one in that project, or use a password or token"
            )));
        }
        let is_id = project.len() == 32 && project.chars().all(|c| c.is_ascii_hexdigit());
        self.project = Some(if is_id {
            NameOrId::Id(project.to_owned())
        } else {
            let domain = match (&self.project, &self.identity) {
                (Some(NameOrId::Name { domain, .. }), _) => (**domain).clone(),
                (
                    _,
                    Identity::Password {
                        user: NameOrId::Name { domain, .. },
                        ..
                    },
                ) => (**domain).clone(),
                _ => NameOrId::DomainName("Default".into()),
            };
            NameOrId::Name {
                name: project.to_owned(),
                domain: Box::new(domain),
            }
        });
        Ok(())
    }

    /// The project as given, for messages.
    pub fn project_label(&self) -> String {
        match &self.project {
            Some(NameOrId::Id(id)) => id.clone(),
            Some(NameOrId::Name { name, .. }) => name.clone(),
            Some(NameOrId::DomainName(n)) => n.clone(),
            None => "(the application credential's project)".into(),
        }
    }

    /// The user as given, for messages.
    pub fn user_label(&self) -> String {
        match &self.identity {
            Identity::Password { user, .. } => match user {
                NameOrId::Id(id) => id.clone(),
                NameOrId::Name { name, .. } | NameOrId::DomainName(name) => name.clone(),
            },
            Identity::Token(_) => "(the OS_TOKEN's user)".into(),
            Identity::ApplicationCredential { .. } => "(the application credential's user)".into(),
        }
    }
}

/// A token and the block-storage URL of its project (`.../v3/PROJECT_ID`).
#[derive(Debug, Clone)]
pub struct Session {
    pub token: Secret,
    pub volume_url: String,
    /// The project the token is scoped to (`None` with an explicit
    /// endpoint given without `OS_PROJECT_ID`).
    pub project_id: Option<String>,
}

fn identity_is_app_cred(auth: &Value) -> bool {
    auth["identity"]["methods"][0] == "application_credential"
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
        Identity::ApplicationCredential { id, name, secret } => {
            let mut cred = json!({ "secret": secret.expose() });
            if let Some(id) = id {
                cred["id"] = json!(id);
            } else if let Some((name, user)) = name {
                cred["name"] = json!(name);
                cred["user"] = user.to_json();
            }
            json!({ "methods": ["application_credential"], "application_credential": cred })
        }
    };
    let mut auth = json!({ "identity": identity });
    if let Some(project) = project.filter(|_| !identity_is_app_cred(&auth)) {
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
            project_id: project_id.map(str::to_owned),
        });
    }
    let auth_url = settings
        .auth_url
        .as_deref()
        .ok_or_else(|| Error::Config("OS_AUTH_URL is not set".into()))?;
    let url = tokens_url(auth_url);
    let body = token_request(&settings.identity, settings.project.as_ref());
    let response = http.send("POST", &url, None, None, Some(&body))?;
    if response.status == 401 {
        return Err(Error::Unauthorized {
            url,
            message: describe_error(&response.body),
            user: settings.user_label(),
            project: settings.project_label(),
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
    let endpoint = match &settings.endpoint {
        // OS_ENDPOINT with a password: Keystone for the token, this URL for Cinder.
        Some(e) => e.clone(),
        None => select_endpoint(
            &parsed.token.catalog,
            &settings.interface,
            settings.region.as_deref(),
        )?,
    };
    Ok(Session {
        token: Secret(token),
        volume_url: with_project(&endpoint, Some(&project_id)),
        project_id: Some(project_id),
    })
}
