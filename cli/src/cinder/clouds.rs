//! `OS_CLOUD`: the cloud's entry in `clouds.yaml`, read as the `OS_*`
//! variables it stands for, so [`super::auth::Settings`] has one way in.
//!
//! The file is the first of `OS_CLIENT_CONFIG_FILE`, `./clouds.yaml`,
//! `~/.config/openstack/clouds.yaml`, `/etc/openstack/clouds.yaml` that
//! exists (as openstacksdk looks). With `OS_CLOUD` set, the settings come
//! from that entry alone, as with the openstack CLI; `secure.yaml` and
//! `clouds-public.yaml` are not read (say so rather than half-merge them).
//!
//! | clouds.yaml                                  | as                        |
//! |----------------------------------------------|---------------------------|
//! | `auth.auth_url`, `username`, `user_id`, `password`, `token` | `OS_AUTH_URL`, ... |
//! | `auth.project_name`/`project_id` (`tenant_*`) | `OS_PROJECT_NAME`/`_ID`  |
//! | `auth.user_domain_*`, `project_domain_*`      | `OS_USER_DOMAIN_*`, ...  |
//! | `auth.application_credential_{id,name,secret}` | `OS_APPLICATION_CREDENTIAL_*` |
//! | `auth_type`, `region_name`, `interface`, `cacert` | `OS_AUTH_TYPE`, `OS_REGION_NAME`, `OS_INTERFACE`, `OS_CACERT` |
//! | `verify: false`                               | refused: no way to turn verification off |

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use yaml_rust2::{Yaml, YamlLoader};

use super::{Error, Result};

/// Where `clouds.yaml` is looked for, in order.
pub fn candidates(lookup: &dyn Fn(&str) -> Option<String>) -> Vec<PathBuf> {
    let mut files = Vec::new();
    if let Some(f) = lookup("OS_CLIENT_CONFIG_FILE") {
        files.push(PathBuf::from(f));
    }
    files.push(PathBuf::from("clouds.yaml"));
    if let Some(home) = lookup("HOME") {
        files.push(Path::new(&home).join(".config/openstack/clouds.yaml"));
    }
    files.push(PathBuf::from("/etc/openstack/clouds.yaml"));
    files
}

/// The `OS_*` variables of cloud `name` in the first file of `files` that
/// exists.
pub fn load(name: &str, files: &[PathBuf]) -> Result<HashMap<String, String>> {
    let Some(file) = files.iter().find(|f| f.is_file()) else {
        return Err(Error::Config(format!(
            "OS_CLOUD={name} but there is no clouds.yaml (looked at {})",
            files
                .iter()
                .map(|f| f.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        )));
    };
    let text = std::fs::read_to_string(file)
        .map_err(|e| Error::Config(format!("cannot read {}: {e}", file.display())))?;
    vars_of(name, &text).map_err(|e| Error::Config(format!("{}: {e}", file.display())))
}

/// The `OS_*` variables of cloud `name` in the YAML `text`.
pub fn vars_of(name: &str, text: &str) -> std::result::Result<HashMap<String, String>, String> {
    let docs = YamlLoader::load_from_str(text).map_err(|e| format!("not YAML: {e}"))?;
    let doc = docs.first().ok_or("empty")?;
    let clouds = &doc["clouds"];
    let cloud = &clouds[name];
    if cloud.is_badvalue() {
        let names: Vec<String> = clouds
            .as_hash()
            .map(|h| {
                h.keys()
                    .filter_map(|k| k.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default();
        return Err(format!(
            "no cloud {name:?} under clouds: (it has: {})",
            if names.is_empty() {
                "none".to_owned()
            } else {
                names.join(", ")
            }
        ));
    }
    if cloud["verify"].as_bool() == Some(false) {
        return Err(format!(
            "cloud {name:?} has verify: false; stream does not turn TLS verification off: give \
             the CA as cacert instead"
        ));
    }
    let text_of = |y: &Yaml| -> Option<String> {
        match y {
            Yaml::String(s) => Some(s.clone()),
            Yaml::Integer(i) => Some(i.to_string()),
            Yaml::Real(r) => Some(r.clone()),
            Yaml::Boolean(b) => Some(b.to_string()),
            _ => None,
        }
    };
    let mut vars = HashMap::new();
    let auth = &cloud["auth"];
    for (key, var) in [
        ("auth_url", "OS_AUTH_URL"),
        ("username", "OS_USERNAME"),
        ("user_id", "OS_USER_ID"),
        ("password", "OS_PASSWORD"),
        ("token", "OS_TOKEN"),
        ("project_name", "OS_PROJECT_NAME"),
        ("tenant_name", "OS_PROJECT_NAME"),
        ("project_id", "OS_PROJECT_ID"),
        ("tenant_id", "OS_PROJECT_ID"),
        ("user_domain_name", "OS_USER_DOMAIN_NAME"),
        ("user_domain_id", "OS_USER_DOMAIN_ID"),
        ("project_domain_name", "OS_PROJECT_DOMAIN_NAME"),
        ("project_domain_id", "OS_PROJECT_DOMAIN_ID"),
        ("application_credential_id", "OS_APPLICATION_CREDENTIAL_ID"),
        (
            "application_credential_name",
            "OS_APPLICATION_CREDENTIAL_NAME",
        ),
        (
            "application_credential_secret",
            "OS_APPLICATION_CREDENTIAL_SECRET",
        ),
    ] {
        if let Some(v) = text_of(&auth[key]) {
            vars.entry(var.to_owned()).or_insert(v);
        }
    }
    for (key, var) in [
        ("auth_type", "OS_AUTH_TYPE"),
        ("region_name", "OS_REGION_NAME"),
        ("interface", "OS_INTERFACE"),
        ("cacert", "OS_CACERT"),
    ] {
        if let Some(v) = text_of(&cloud[key]) {
            vars.insert(var.to_owned(), v);
        }
    }
    Ok(vars)
}
