//! The configuration error every stage's config type returns, and the serde helper for
//! durations. A leaf: stage modules that own a config section (auth, nhsd, service, ...)
//! import this, not the root [`crate::config`], so config and the stages do not import
//! each other.

use std::fmt;

/// A configuration error: the dotted path of the field and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub field: String,
    pub reason: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.reason)
    }
}

impl std::error::Error for ConfigError {}

/// Builds a [`ConfigError`]; every stage that validates configuration uses this.
pub(crate) fn err(field: impl Into<String>, reason: impl Into<String>) -> ConfigError {
    ConfigError {
        field: field.into(),
        reason: reason.into(),
    }
}

/// Refuses a URL with credentials in it (`https://user:secret@host/`). RFC 9110 §4.2.4
/// forbids sending userinfo in an http(s) target URI, so nothing here would use them; they
/// would only sit in the config and be printed (by `fhirgate check`, in logs) where a
/// secret must not be. Credentials live in files (`client_secret_file`, client keys).
pub(crate) fn no_userinfo(uri: &http::Uri) -> Result<(), String> {
    match uri.authority() {
        Some(a) if a.as_str().contains('@') => Err(
            "must not contain user:password@ (RFC 9110 §4.2.4: userinfo is never sent); \
             remove it and put credentials in a file (client certificate, client_secret_file)"
                .into(),
        ),
        _ => Ok(()),
    }
}
