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
