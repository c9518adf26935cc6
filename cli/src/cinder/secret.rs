//! A password or token: kept apart so the HTTP layer and authentication
//! both use it without depending on each other.

/// A password or token: never printed.
#[derive(Clone)]
pub struct Secret(pub(super) String);

impl Secret {
    pub(crate) fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}
