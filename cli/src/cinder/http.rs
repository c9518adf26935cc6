//! The few HTTP exchanges we need, on a blocking `ureq` agent over
//! native-tls, which is OpenSSL on Linux: the binary's one TLS stack
//! (ARCHITECTURE.md), with the system's CA store unless `OS_CACERT` names
//! a bundle (then only that bundle, as the OpenStack clients do).
//!
//! Status codes are answers, not transport errors: the callers turn them
//! into errors that name the URL, the status and Cinder's or Keystone's
//! message. Request bodies (which may carry a password) are never logged.

use std::path::Path;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde_json::Value;

use super::secret::Secret;
use super::{Error, Result};

/// Time allowed for one whole exchange.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

pub struct Http {
    agent: ureq::Agent,
    /// `OS_CACERT`, for the hint on a certificate that does not verify.
    cacert: Option<std::path::PathBuf>,
}

/// What came back: the status, the body as text, and Keystone's token.
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub body: String,
    pub subject_token: Option<String>,
}

impl Response {
    pub fn json<T: DeserializeOwned>(&self, url: &str) -> Result<T> {
        serde_json::from_str(&self.body).map_err(|e| Error::BadResponse {
            url: url.to_owned(),
            detail: format!("unexpected JSON ({e})"),
        })
    }
}

impl Http {
    pub fn new(cacert: Option<&Path>) -> Result<Http> {
        let tls = ureq::tls::TlsConfig::builder().provider(ureq::tls::TlsProvider::NativeTls);
        let mut config = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(REQUEST_TIMEOUT))
            .user_agent(concat!("stream/", env!("CARGO_PKG_VERSION")));
        if let Some(path) = cacert {
            let pem = std::fs::read(path).map_err(|e| {
                Error::Config(format!("cannot read OS_CACERT {}: {e}", path.display()))
            })?;
            let certs: Vec<ureq::tls::Certificate<'static>> = ureq::tls::parse_pem(&pem)
                .filter_map(|item| match item {
                    Ok(ureq::tls::PemItem::Certificate(c)) => Some(c),
                    _ => None,
                })
                .collect();
            if certs.is_empty() {
                return Err(Error::Config(format!(
                    "OS_CACERT {} holds no PEM certificate",
                    path.display()
                )));
            }
            config = config.tls_config(
                tls.root_certs(ureq::tls::RootCerts::new_with_certs(&certs))
                    .build(),
            );
        } else {
            config = config.tls_config(
                tls.root_certs(ureq::tls::RootCerts::PlatformVerifier)
                    .build(),
            );
        }
        Ok(Http {
            agent: config.build().into(),
            cacert: cacert.map(Path::to_path_buf),
        })
    }

    /// One request: `token` goes into `X-Auth-Token`, `api_version` into
    /// `OpenStack-API-Version` (e.g. `volume 3.8`); `body` is sent as JSON.
    pub fn send(
        &self,
        method: &'static str,
        url: &str,
        token: Option<&Secret>,
        api_version: Option<&str>,
        body: Option<&Value>,
    ) -> Result<Response> {
        let transport = |e: ureq::Error| {
            let mut message = e.to_string();
            if message.contains("certificate verify failed") {
                message.push_str(&match &self.cacert {
                    Some(c) => format!(
                        "; the server's certificate is not signed by a CA in OS_CACERT {}",
                        c.display()
                    ),
                    None => "; the server's certificate is not signed by a CA of the system \
                             store: set OS_CACERT to the cloud's CA bundle"
                        .to_owned(),
                });
            }
            Error::Transport {
                method,
                url: url.to_owned(),
                message,
            }
        };
        let mut headers: Vec<(&str, String)> = vec![("Accept", "application/json".into())];
        if let Some(token) = token {
            headers.push(("X-Auth-Token", token.expose().to_owned()));
        }
        if let Some(v) = api_version {
            headers.push(("OpenStack-API-Version", v.to_owned()));
        }
        let result = match (method, body) {
            ("POST", Some(body)) => {
                let mut req = self.agent.post(url);
                for (k, v) in &headers {
                    req = req.header(*k, v);
                }
                let bytes = serde_json::to_vec(body).expect("a JSON value serializes");
                req.header("Content-Type", "application/json")
                    .send(&bytes[..])
            }
            ("GET", None) => {
                let mut req = self.agent.get(url);
                for (k, v) in &headers {
                    req = req.header(*k, v);
                }
                req.call()
            }
            _ => unreachable!("only POST with a body and GET without are used"),
        };
        let mut response = result.map_err(transport)?;
        let status = response.status().as_u16();
        let subject_token = response
            .headers()
            .get("X-Subject-Token")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let body = response.body_mut().read_to_string().map_err(transport)?;
        Ok(Response {
            status,
            body,
            subject_token,
        })
    }
}

/// The message of an OpenStack error body: Cinder's
/// `{"badRequest": {"code": 400, "message": "..."}}` or Keystone's
/// `{"error": {"code": 401, "title": "...", "message": "..."}}`; otherwise
/// the start of the text.
pub fn describe_error(body: &str) -> String {
    if let Ok(Value::Object(map)) = serde_json::from_str::<Value>(body) {
        for (kind, inner) in &map {
            if let Some(message) = inner.get("message").and_then(Value::as_str) {
                let kind = inner.get("title").and_then(Value::as_str).unwrap_or(kind);
                return format!("{message} ({kind})");
            }
        }
    }
    let text: String = body.split_whitespace().collect::<Vec<_>>().join(" ");
    match text.char_indices().nth(300) {
        _ if text.is_empty() => "no message".into(),
        Some((cut, _)) => format!("{}...", &text[..cut]),
        None => text,
    }
}
