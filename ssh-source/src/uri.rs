//! `ssh://[USER@]HOST[:PORT]/PATH[?identity=FILE&known-hosts=FILE]`: a disk
//! file or block device on a legacy host, read through its sshd.
//!
//! The query carries what `ssh` needs beyond the user's own configuration,
//! as NBD URIs carry their TLS settings: the state records the URI, so a
//! resume and `finalize` connect the same way. Both are paths on this
//! host; without them `ssh` uses the agent, `~/.ssh/id_*`, `~/.ssh/config`
//! and `~/.ssh/known_hosts` as for any login.

use std::path::PathBuf;

/// A parsed `ssh://` source URI.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SshUri {
    pub user: Option<String>,
    /// As given, without brackets for an IPv6 literal.
    pub host: String,
    pub port: Option<u16>,
    /// Absolute path of the disk on the legacy host.
    pub path: String,
    /// `identity=`: the private key to offer (besides the agent's).
    pub identity: Option<PathBuf>,
    /// `known-hosts=`: the known_hosts file to check the host key against.
    pub known_hosts: Option<PathBuf>,
}

/// Whether `spec` names an SSH source.
pub fn is_ssh(spec: &str) -> bool {
    spec.starts_with("ssh://")
}

fn decode(s: &str) -> Result<String, String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = s
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| format!("a bad %-escape in {s:?}"))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| format!("{s:?} is not UTF-8 once decoded"))
}

impl SshUri {
    pub fn parse(spec: &str) -> Result<SshUri, String> {
        let rest = spec
            .strip_prefix("ssh://")
            .ok_or_else(|| format!("{spec:?} is not an ssh:// URI"))?;
        let (rest, query) = match rest.split_once('?') {
            Some((r, q)) => (r, Some(q)),
            None => (rest, None),
        };
        let slash = rest
            .find('/')
            .ok_or_else(|| format!("{spec:?} names no disk: use ssh://[USER@]HOST[:PORT]/PATH"))?;
        let (authority, path) = rest.split_at(slash);
        let path = decode(path)?;
        if path.len() < 2 {
            return Err(format!(
                "{spec:?} names no disk: use ssh://[USER@]HOST[:PORT]/PATH"
            ));
        }
        let (user, hostport) = match authority.rsplit_once('@') {
            Some((u, h)) if !u.is_empty() => (Some(decode(u)?), h),
            Some(_) => return Err(format!("{spec:?}: an empty user before '@'")),
            None => (None, authority),
        };
        let (host, port) = if let Some(v6) = hostport.strip_prefix('[') {
            let (h, after) = v6
                .split_once(']')
                .ok_or_else(|| format!("{spec:?}: an unclosed '[' in the host"))?;
            match after.strip_prefix(':') {
                Some(p) => (h.to_string(), Some(p)),
                None if after.is_empty() => (h.to_string(), None),
                None => return Err(format!("{spec:?}: unexpected {after:?} after the host")),
            }
        } else {
            match hostport.rsplit_once(':') {
                Some((h, p)) => (h.to_string(), Some(p)),
                None => (hostport.to_string(), None),
            }
        };
        if host.is_empty() {
            return Err(format!("{spec:?} names no host"));
        }
        let port = port
            .map(|p| {
                p.parse::<u16>()
                    .ok()
                    .filter(|&p| p > 0)
                    .ok_or_else(|| format!("{spec:?}: {p:?} is not a port"))
            })
            .transpose()?;
        let mut uri = SshUri {
            user,
            host,
            port,
            path,
            identity: None,
            known_hosts: None,
        };
        for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let v = decode(v)?;
            if v.is_empty() {
                return Err(format!("{spec:?}: {k}= needs a value"));
            }
            match k {
                "identity" => uri.identity = Some(PathBuf::from(v)),
                "known-hosts" => uri.known_hosts = Some(PathBuf::from(v)),
                _ => {
                    return Err(format!(
                        "{spec:?}: unknown parameter {k:?} (known: identity=FILE, \
                         known-hosts=FILE)"
                    ));
                }
            }
        }
        Ok(uri)
    }

    /// `[USER@]HOST[:PORT]` for messages.
    pub fn endpoint(&self) -> String {
        let host = match self.host.contains(':') {
            true => format!("[{}]", self.host),
            false => self.host.clone(),
        };
        let user = self
            .user
            .as_ref()
            .map(|u| format!("{u}@"))
            .unwrap_or_default();
        let port = self.port.map(|p| format!(":{p}")).unwrap_or_default();
        format!("{user}{host}{port}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forms_that_parse() {
        let u = SshUri::parse("ssh://root@legacy:2222/dev/sda").unwrap();
        assert_eq!(u.user.as_deref(), Some("root"));
        assert_eq!((u.host.as_str(), u.port), ("legacy", Some(2222)));
        assert_eq!(u.path, "/dev/sda");
        let u =
            SshUri::parse("ssh://[::1]:22/srv/disk%20a.img?identity=/k&known-hosts=/kh").unwrap();
        assert_eq!((u.host.as_str(), u.port), ("::1", Some(22)));
        assert_eq!(u.path, "/srv/disk a.img");
        assert_eq!(u.identity, Some(PathBuf::from("/k")));
        assert_eq!(u.known_hosts, Some(PathBuf::from("/kh")));
        assert_eq!(u.endpoint(), "[::1]:22");
        let u = SshUri::parse("ssh://host/d").unwrap();
        assert_eq!(
            (u.user.clone(), u.port, u.endpoint()),
            (None, None, "host".into())
        );
    }

    #[test]
    fn forms_that_are_refused_with_the_reason() {
        for (bad, why) in [
            ("ssh://host", "names no disk"),
            ("ssh://host/", "names no disk"),
            ("ssh://host:0/d", "is not a port"),
            ("ssh://host:x/d", "is not a port"),
            ("ssh://@host/d", "empty user"),
            ("ssh:///d", "names no host"),
            ("ssh://host/d?key=1", "unknown parameter"),
            ("ssh://host/d?identity=", "needs a value"),
            ("ssh://host/d%zz", "bad %-escape"),
            ("nbd://host/d", "not an ssh://"),
        ] {
            let err = SshUri::parse(bad).unwrap_err();
            assert!(err.contains(why), "{bad}: {err}");
        }
    }
}
