//! What can be wrong with an NHSD header, and how each problem is reported.

use super::policy::Refusal;

/// The NHS code system that `nhs_code()` values come from. (The BaRS examples spell the
/// same URL `.../Codesystem/http-error-codes`.)
pub const HTTP_ERROR_CODES_SYSTEM: &str = "https://fhir.nhs.uk/CodeSystem/http-error-codes";

/// What is wrong with a header.
///
/// `Display` is the client-facing `OperationOutcome.issue.diagnostics`: it names the
/// header and the problem and never repeats the raw header value. The only client
/// strings it can contain (`found`, `value`) are built with `excerpt`: at most 32
/// characters of a conservative printable-ASCII set.
///
/// Mapping, following the BaRS failure scenarios (`NHSDigital/IOPS-FHIR-Simplifier-Backup`,
/// `.../Core/1.0.4/Error-Handling/Failure-Scenarios-1.0.x/Message-Routing.page.md` and
/// the GET /Slot "Common Failures"): missing or malformed input is 400 `REC_BAD_REQUEST`
/// with issue `required` (absent), `invalid` (undecodable), `structure` (not the schema)
/// or `value` ("not a GUID/UUID", a bad identifier); allow-list refusals follow
/// [`Refusal`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NhsdError {
    #[error("Missing required header {header}")]
    Missing { header: &'static str },

    #[error("Header {header} must be sent exactly once")]
    Duplicate { header: &'static str },

    #[error("Header {header} is too large (limit {limit} bytes)")]
    TooLarge { header: &'static str, limit: usize },

    #[error("Header {header} contains bytes that are not visible ASCII")]
    NotAscii { header: &'static str },

    #[error("Header {header} is not standard Base64 (RFC 4648 alphabet with = padding)")]
    Base64 { header: &'static str },

    /// `detail` is produced by this module, never copied from the input.
    #[error("Header {header} does not decode to a JSON object: {detail}")]
    Json {
        header: &'static str,
        detail: String,
    },

    /// `found` is an `excerpt` of the client's `resourceType`.
    #[error("Header {header} must be a FHIR {expected} resource, not resourceType '{found}'")]
    WrongResourceType {
        header: &'static str,
        expected: &'static str,
        found: String,
    },

    #[error("Header {header} is missing {field}")]
    MissingField {
        header: &'static str,
        field: &'static str,
    },

    /// A field of the wrong JSON type: the header "doesn't adhere to the schema", which
    /// the BaRS failure scenarios code `structure` (`value` is for a well-typed value
    /// that is wrong). `reason` is produced by this module, never copied from the input.
    #[error("Header {header} has an invalid {field}: {reason}")]
    WrongType {
        header: &'static str,
        field: &'static str,
        reason: String,
    },

    /// `reason` is produced by this module, never copied from the input.
    #[error("Header {header} has an invalid {field}: {reason}")]
    InvalidValue {
        header: &'static str,
        field: &'static str,
        reason: String,
    },

    /// `value` is an `excerpt` of the refused (already validated) value.
    #[error("Header {header}: {what} '{value}' is not allowed on this route")]
    NotAllowed {
        header: &'static str,
        what: &'static str,
        value: String,
        refusal: Refusal,
    },
}

impl NhsdError {
    /// The canonical name of the header at fault (one of [`super::ALL_HEADERS`]).
    pub fn header(&self) -> &'static str {
        match self {
            NhsdError::Missing { header }
            | NhsdError::Duplicate { header }
            | NhsdError::TooLarge { header, .. }
            | NhsdError::NotAscii { header }
            | NhsdError::Base64 { header }
            | NhsdError::Json { header, .. }
            | NhsdError::WrongResourceType { header, .. }
            | NhsdError::MissingField { header, .. }
            | NhsdError::WrongType { header, .. }
            | NhsdError::InvalidValue { header, .. }
            | NhsdError::NotAllowed { header, .. } => header,
        }
    }

    /// HTTP status: 400, or 403 / 401 for an allow-list refusal (see [`Refusal`]).
    pub fn status(&self) -> u16 {
        match self {
            NhsdError::NotAllowed {
                refusal: Refusal::Forbidden,
                ..
            } => 403,
            NhsdError::NotAllowed {
                refusal: Refusal::Unauthorized,
                ..
            } => 401,
            _ => 400,
        }
    }

    /// Code from [`HTTP_ERROR_CODES_SYSTEM`], receiver-side (`REC_`) as BaRS prescribes
    /// for a receiving endpoint.
    pub fn nhs_code(&self) -> &'static str {
        match self {
            NhsdError::NotAllowed {
                refusal: Refusal::Forbidden,
                ..
            } => "REC_FORBIDDEN",
            NhsdError::NotAllowed {
                refusal: Refusal::Unauthorized,
                ..
            } => "REC_UNAUTHORIZED",
            _ => "REC_BAD_REQUEST",
        }
    }

    /// FHIR `OperationOutcome.issue.code` (<http://hl7.org/fhir/issue-type>).
    pub fn fhir_issue_code(&self) -> &'static str {
        match self {
            // The BaRS failure scenarios: "400 | REC_BAD_REQUEST | invalid | ... a request
            // be received with no X-Request-Id or X-Correlation-Id".
            NhsdError::Missing {
                header: super::REQUEST_ID | super::CORRELATION_ID,
            } => "invalid",
            NhsdError::Missing { .. } | NhsdError::MissingField { .. } => "required",
            NhsdError::Duplicate { .. } | NhsdError::NotAscii { .. } | NhsdError::Base64 { .. } => {
                "invalid"
            }
            NhsdError::TooLarge { .. } => "too-long",
            NhsdError::Json { .. }
            | NhsdError::WrongResourceType { .. }
            | NhsdError::WrongType { .. } => "structure",
            NhsdError::InvalidValue { .. } => "value",
            NhsdError::NotAllowed { .. } => "forbidden",
        }
    }

    /// Short, stable label for logs and metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            NhsdError::Missing { .. } => "nhsd_missing",
            NhsdError::Duplicate { .. } => "nhsd_duplicate",
            NhsdError::TooLarge { .. } => "nhsd_too_large",
            NhsdError::NotAscii { .. } => "nhsd_not_ascii",
            NhsdError::Base64 { .. } => "nhsd_base64",
            NhsdError::Json { .. } => "nhsd_json",
            NhsdError::WrongResourceType { .. } => "nhsd_resource_type",
            NhsdError::MissingField { .. } => "nhsd_missing_field",
            NhsdError::WrongType { .. } => "nhsd_wrong_type",
            NhsdError::InvalidValue { .. } => "nhsd_invalid_value",
            NhsdError::NotAllowed { .. } => "nhsd_not_allowed",
        }
    }

    /// True for allow-list refusals (the request was well-formed but is not permitted).
    pub fn is_refusal(&self) -> bool {
        matches!(self, NhsdError::NotAllowed { .. })
    }
}

/// Longest excerpt of client text that may appear in diagnostics.
pub(super) const EXCERPT_CHARS: usize = 32;

/// A short, inert rendering of client text for diagnostics: letters, digits and
/// `-._:/|+=@ ` kept, anything else (controls, non-ASCII, quotes, markup) shown as `?`,
/// cut to [`EXCERPT_CHARS`] characters with a trailing `...`.
pub(super) fn excerpt(s: &str) -> String {
    let mut out: String = s
        .chars()
        .take(EXCERPT_CHARS)
        .map(|c| {
            if c.is_ascii_alphanumeric() || "-._:/|+=@ ".contains(c) {
                c
            } else {
                '?'
            }
        })
        .collect();
    if s.chars().nth(EXCERPT_CHARS).is_some() {
        out.push_str("...");
    }
    out
}
