//! BaRS `NHSD-*` request headers: decode, validate, and extract the facts a receiver may
//! act on. Pure functions over a `HeaderMap`; no I/O.
//!
//! Source: NHS Booking and Referral Standard, "Security and Authorisation" (seed
//! `004_a55ebf0b25ae53fe.txt`): "Each of these HTTP headers are objects and will therefore
//! need to be added in the form of a standard Base64 encoded string", excluding
//! `/metadata` and `/MessageDefinition`. Shapes and identifier systems follow the BaRS
//! API specification examples (Organization with an `ods-organization-code` identifier
//! and a name; PractitionerRole with an `sds-role-profile-id` identifier and a SNOMED
//! role code; Device with an instance identifier, `deviceName` and `version`; the target
//! identifier as a bare `{system, value}` identifier such as a `dos-service-id`). Error
//! codes follow the BaRS failure scenarios: a bad or missing header is 400
//! `REC_BAD_REQUEST`.
//!
//! Decoding is strict: the standard alphabet with canonical padding, as the standard
//! says. URL-safe or unpadded values are refused rather than guessed at, so two parties
//! can never disagree about what a header says.

use std::fmt;

use base64::Engine;
use http::HeaderMap;
use serde::Deserialize;

pub const END_USER_ORGANISATION: &str = "NHSD-End-User-Organisation";
pub const REQUESTING_PRACTITIONER: &str = "NHSD-Requesting-Practitioner";
pub const REQUESTING_SOFTWARE: &str = "NHSD-Requesting-Software";
pub const TARGET_IDENTIFIER: &str = "NHSD-Target-Identifier";
pub const REQUEST_ID: &str = "X-Request-ID";
pub const CORRELATION_ID: &str = "X-Correlation-ID";

pub const ODS_SYSTEM: &str = "https://fhir.nhs.uk/Id/ods-organization-code";
pub const SDS_ROLE_PROFILE_SYSTEM: &str = "https://fhir.nhs.uk/Id/sds-role-profile-id";
pub const SDS_USER_SYSTEM: &str = "https://fhir.nhs.uk/Id/sds-user-id";
pub const SNOMED_SYSTEM: &str = "http://snomed.info/sct";

/// Longest string accepted in any field of a decoded header.
const MAX_FIELD_CHARS: usize = 256;

/// Whether a route needs a header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum HeaderRequirement {
    /// Missing is refused; present must be valid.
    Required,
    /// Missing is fine; present must be valid.
    #[default]
    Optional,
    /// Not looked at (still forwarded unchanged).
    Ignored,
}

/// Which headers a route needs and what values it accepts.
///
/// Defaults follow what BaRS receivers are told to expect on every request except
/// `/metadata` and `/MessageDefinition`: the two transaction ids, the target identifier,
/// the end-user organisation and the requesting software are required; the requesting
/// practitioner is optional ("where applicable").
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NhsdPolicy {
    pub end_user_organisation: HeaderRequirement,
    pub requesting_practitioner: HeaderRequirement,
    pub requesting_software: HeaderRequirement,
    pub target_identifier: HeaderRequirement,
    pub request_id: HeaderRequirement,
    pub correlation_id: HeaderRequirement,
    /// ODS codes allowed in `NHSD-End-User-Organisation`; empty allows any.
    pub allowed_ods_codes: Vec<String>,
    /// Target identifiers allowed, as `value` or `system|value`; empty allows any.
    pub allowed_target_identifiers: Vec<String>,
    /// Longest encoded header value accepted, checked before decoding.
    pub max_encoded_bytes: usize,
}

impl Default for NhsdPolicy {
    fn default() -> Self {
        NhsdPolicy {
            end_user_organisation: HeaderRequirement::Required,
            requesting_practitioner: HeaderRequirement::Optional,
            requesting_software: HeaderRequirement::Required,
            target_identifier: HeaderRequirement::Required,
            request_id: HeaderRequirement::Required,
            correlation_id: HeaderRequirement::Required,
            allowed_ods_codes: Vec::new(),
            allowed_target_identifiers: Vec::new(),
            max_encoded_bytes: 8192,
        }
    }
}

impl NhsdPolicy {
    /// Checks values serde cannot; the message names the field (relative to `prefix`).
    pub fn validate(&self, prefix: &str) -> Result<(), (String, String)> {
        if !(256..=65536).contains(&self.max_encoded_bytes) {
            return Err((
                format!("{prefix}.max_encoded_bytes"),
                "must be between 256 and 65536".into(),
            ));
        }
        for (i, c) in self.allowed_ods_codes.iter().enumerate() {
            if !valid_ods(c) {
                return Err((
                    format!("{prefix}.allowed_ods_codes[{i}]"),
                    format!("{c:?} is not an ODS code (3-10 upper-case letters or digits)"),
                ));
            }
        }
        for (i, t) in self.allowed_target_identifiers.iter().enumerate() {
            if t.trim().is_empty() {
                return Err((
                    format!("{prefix}.allowed_target_identifiers[{i}]"),
                    "must not be empty".into(),
                ));
            }
        }
        Ok(())
    }
}

/// What the headers established, for forwarding upstream and for the audit log.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NhsdFacts {
    pub ods_code: Option<String>,
    pub organisation_name: Option<String>,
    pub sds_role_profile_id: Option<String>,
    pub sds_user_id: Option<String>,
    pub snomed_role_code: Option<String>,
    pub software_instance: Option<String>,
    pub software_name: Option<String>,
    pub software_version: Option<String>,
    pub target_system: Option<String>,
    pub target_value: Option<String>,
    pub request_id: Option<String>,
    pub correlation_id: Option<String>,
}

/// Headers the gateway sets upstream from verified facts. Clients cannot set them: every
/// `x-fhirgate-*` header is stripped before forwarding.
pub fn upstream_fact_headers(f: &NhsdFacts) -> Vec<(&'static str, &str)> {
    [
        ("x-fhirgate-ods-code", &f.ods_code),
        ("x-fhirgate-sds-role-profile-id", &f.sds_role_profile_id),
        ("x-fhirgate-software-name", &f.software_name),
        ("x-fhirgate-software-version", &f.software_version),
        ("x-fhirgate-software-instance", &f.software_instance),
        ("x-fhirgate-target-identifier", &f.target_value),
    ]
    .into_iter()
    .filter_map(|(name, value)| value.as_deref().map(|v| (name, v)))
    .collect()
}

/// What is wrong with a header. `Display` is the client-facing diagnostics: it names the
/// header and the problem and never repeats the value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NhsdError {
    Missing {
        header: &'static str,
    },
    Duplicate {
        header: &'static str,
    },
    TooLarge {
        header: &'static str,
        limit: usize,
    },
    NotAscii {
        header: &'static str,
    },
    Base64 {
        header: &'static str,
    },
    Json {
        header: &'static str,
        detail: String,
    },
    WrongResourceType {
        header: &'static str,
        expected: &'static str,
    },
    MissingField {
        header: &'static str,
        field: &'static str,
    },
    InvalidValue {
        header: &'static str,
        field: &'static str,
        reason: &'static str,
    },
    NotAllowed {
        header: &'static str,
        what: &'static str,
    },
}

impl NhsdError {
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
            | NhsdError::InvalidValue { header, .. }
            | NhsdError::NotAllowed { header, .. } => header,
        }
    }

    /// HTTP status: 403 for allow-list refusals, 400 otherwise.
    pub fn status(&self) -> u16 {
        match self {
            NhsdError::NotAllowed { .. } => 403,
            _ => 400,
        }
    }

    /// Code from `https://fhir.nhs.uk/CodeSystem/http-error-codes`.
    pub fn nhs_code(&self) -> &'static str {
        match self {
            NhsdError::NotAllowed { .. } => "REC_FORBIDDEN",
            _ => "REC_BAD_REQUEST",
        }
    }

    /// FHIR `OperationOutcome.issue.code`.
    pub fn fhir_issue_code(&self) -> &'static str {
        match self {
            NhsdError::Missing { .. } | NhsdError::MissingField { .. } => "required",
            NhsdError::Duplicate { .. } => "invalid",
            NhsdError::TooLarge { .. } => "too-long",
            NhsdError::NotAscii { .. }
            | NhsdError::Base64 { .. }
            | NhsdError::Json { .. }
            | NhsdError::WrongResourceType { .. } => "structure",
            NhsdError::InvalidValue { .. } => "value",
            NhsdError::NotAllowed { .. } => "forbidden",
        }
    }

    /// Short label for logs and metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            NhsdError::NotAllowed { .. } => "nhsd_not_allowed",
            NhsdError::Missing { .. } => "nhsd_missing",
            _ => "nhsd_invalid",
        }
    }
}

impl fmt::Display for NhsdError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NhsdError::Missing { header } => write!(f, "Missing required header {header}"),
            NhsdError::Duplicate { header } => {
                write!(f, "Header {header} must be sent exactly once")
            }
            NhsdError::TooLarge { header, limit } => {
                write!(f, "Header {header} is longer than {limit} bytes")
            }
            NhsdError::NotAscii { header } => {
                write!(
                    f,
                    "Header {header} contains bytes that are not printable ASCII"
                )
            }
            NhsdError::Base64 { header } => write!(
                f,
                "Header {header} is not valid standard Base64 (RFC 4648 alphabet, padded)"
            ),
            NhsdError::Json { header, detail } => {
                write!(
                    f,
                    "Header {header} does not decode to the expected JSON: {detail}"
                )
            }
            NhsdError::WrongResourceType { header, expected } => {
                write!(f, "Header {header} must hold a FHIR {expected} resource")
            }
            NhsdError::MissingField { header, field } => {
                write!(f, "Header {header} is missing {field}")
            }
            NhsdError::InvalidValue {
                header,
                field,
                reason,
            } => {
                write!(f, "Header {header} has an invalid {field}: {reason}")
            }
            NhsdError::NotAllowed { header, what } => {
                write!(f, "The {what} in header {header} is not permitted here")
            }
        }
    }
}

impl std::error::Error for NhsdError {}

// ---- FHIR shapes, only the parts the gateway checks (unknown members are ignored) ----

#[derive(Deserialize)]
struct Identifier {
    system: Option<String>,
    value: Option<String>,
}

#[derive(Deserialize)]
struct Coding {
    system: Option<String>,
    code: Option<String>,
}

#[derive(Deserialize)]
struct CodeableConcept {
    #[serde(default)]
    coding: Vec<Coding>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Organization {
    resource_type: Option<String>,
    #[serde(default)]
    identifier: Vec<Identifier>,
    name: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct PractitionerRole {
    resource_type: Option<String>,
    #[serde(default)]
    identifier: Vec<Identifier>,
    #[serde(default)]
    code: Vec<CodeableConcept>,
}

#[derive(Deserialize)]
struct DeviceName {
    name: Option<String>,
}

#[derive(Deserialize)]
struct DeviceVersion {
    value: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Device {
    resource_type: Option<String>,
    #[serde(default)]
    identifier: Vec<Identifier>,
    #[serde(default)]
    device_name: Vec<DeviceName>,
    #[serde(default)]
    version: Vec<DeviceVersion>,
}

/// The one value of a header, or `None` when absent.
fn single<'h>(headers: &'h HeaderMap, header: &'static str) -> Result<Option<&'h str>, NhsdError> {
    let mut values = headers.get_all(header).iter();
    let Some(first) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err(NhsdError::Duplicate { header });
    }
    let s = first.to_str().map_err(|_| NhsdError::NotAscii { header })?;
    Ok(Some(s.trim()))
}

/// Size-checks, Base64-decodes and JSON-parses one header value.
fn decode<T: for<'de> Deserialize<'de>>(
    header: &'static str,
    value: &str,
    max: usize,
) -> Result<T, NhsdError> {
    if value.len() > max {
        return Err(NhsdError::TooLarge { header, limit: max });
    }
    if value.is_empty() {
        return Err(NhsdError::Base64 { header });
    }
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(value)
        .map_err(|_| NhsdError::Base64 { header })?;
    // serde_json's own messages can quote the input; report only the category and place.
    serde_json::from_slice(&bytes).map_err(|e| NhsdError::Json {
        header,
        detail: match e.classify() {
            serde_json::error::Category::Data => {
                format!(
                    "wrong JSON shape at line {} column {}",
                    e.line(),
                    e.column()
                )
            }
            serde_json::error::Category::Eof => "JSON ends too early".into(),
            _ => format!("not JSON (line {} column {})", e.line(), e.column()),
        },
    })
}

/// A present, non-blank, bounded, control-free string.
fn text(
    header: &'static str,
    field: &'static str,
    value: Option<&String>,
) -> Result<String, NhsdError> {
    let v = value.map(|s| s.trim()).unwrap_or("");
    if v.is_empty() {
        return Err(NhsdError::MissingField { header, field });
    }
    if v.chars().count() > MAX_FIELD_CHARS {
        return Err(NhsdError::InvalidValue {
            header,
            field,
            reason: "longer than 256 characters",
        });
    }
    if v.chars().any(char::is_control) {
        return Err(NhsdError::InvalidValue {
            header,
            field,
            reason: "contains control characters",
        });
    }
    Ok(v.to_owned())
}

fn resource_type(
    header: &'static str,
    expected: &'static str,
    found: Option<&String>,
) -> Result<(), NhsdError> {
    if found.map(String::as_str) == Some(expected) {
        Ok(())
    } else {
        Err(NhsdError::WrongResourceType { header, expected })
    }
}

fn identifier_with<'a>(ids: &'a [Identifier], system: &str) -> Option<&'a Identifier> {
    ids.iter().find(|i| i.system.as_deref() == Some(system))
}

/// ODS organisation codes: 3 to 10 upper-case letters and digits.
pub fn valid_ods(code: &str) -> bool {
    (3..=10).contains(&code.len())
        && code
            .bytes()
            .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit())
}

fn check_organisation(
    value: &str,
    policy: &NhsdPolicy,
    facts: &mut NhsdFacts,
) -> Result<(), NhsdError> {
    const H: &str = END_USER_ORGANISATION;
    let org: Organization = decode(H, value, policy.max_encoded_bytes)?;
    resource_type(H, "Organization", org.resource_type.as_ref())?;
    let ods = identifier_with(&org.identifier, ODS_SYSTEM).ok_or(NhsdError::MissingField {
        header: H,
        field: "an identifier with system https://fhir.nhs.uk/Id/ods-organization-code",
    })?;
    let code = text(H, "ODS code", ods.value.as_ref())?;
    if !valid_ods(&code) {
        return Err(NhsdError::InvalidValue {
            header: H,
            field: "ODS code",
            reason: "must be 3-10 upper-case letters or digits",
        });
    }
    if !policy.allowed_ods_codes.is_empty() && !policy.allowed_ods_codes.contains(&code) {
        return Err(NhsdError::NotAllowed {
            header: H,
            what: "ODS code",
        });
    }
    facts.organisation_name = Some(text(H, "name", org.name.as_ref())?);
    facts.ods_code = Some(code);
    Ok(())
}

fn check_practitioner(
    value: &str,
    policy: &NhsdPolicy,
    facts: &mut NhsdFacts,
) -> Result<(), NhsdError> {
    const H: &str = REQUESTING_PRACTITIONER;
    let role: PractitionerRole = decode(H, value, policy.max_encoded_bytes)?;
    resource_type(H, "PractitionerRole", role.resource_type.as_ref())?;
    let profile = identifier_with(&role.identifier, SDS_ROLE_PROFILE_SYSTEM).ok_or(
        NhsdError::MissingField {
            header: H,
            field: "an identifier with system https://fhir.nhs.uk/Id/sds-role-profile-id",
        },
    )?;
    let id = text(H, "SDS role profile id", profile.value.as_ref())?;
    if !id.bytes().all(|b| b.is_ascii_alphanumeric()) || id.len() > 64 {
        return Err(NhsdError::InvalidValue {
            header: H,
            field: "SDS role profile id",
            reason: "must be up to 64 letters or digits",
        });
    }
    facts.sds_role_profile_id = Some(id);
    if let Some(user) = identifier_with(&role.identifier, SDS_USER_SYSTEM) {
        facts.sds_user_id = Some(text(H, "SDS user id", user.value.as_ref())?);
    }
    // The SNOMED role code is optional ("where applicable"), but must be well formed.
    for c in role.code.iter().flat_map(|c| &c.coding) {
        if c.system.as_deref() == Some(SNOMED_SYSTEM) {
            let code = text(H, "SNOMED role code", c.code.as_ref())?;
            if !(6..=18).contains(&code.len()) || !code.bytes().all(|b| b.is_ascii_digit()) {
                return Err(NhsdError::InvalidValue {
                    header: H,
                    field: "SNOMED role code",
                    reason: "must be a SNOMED CT concept id (6-18 digits)",
                });
            }
            facts.snomed_role_code = Some(code);
        }
    }
    Ok(())
}

fn check_software(
    value: &str,
    policy: &NhsdPolicy,
    facts: &mut NhsdFacts,
) -> Result<(), NhsdError> {
    const H: &str = REQUESTING_SOFTWARE;
    let device: Device = decode(H, value, policy.max_encoded_bytes)?;
    resource_type(H, "Device", device.resource_type.as_ref())?;
    let instance = device.identifier.first().ok_or(NhsdError::MissingField {
        header: H,
        field: "an instance identifier",
    })?;
    text(H, "identifier.system", instance.system.as_ref())?;
    facts.software_instance = Some(text(H, "identifier.value", instance.value.as_ref())?);
    let name = device.device_name.first().ok_or(NhsdError::MissingField {
        header: H,
        field: "deviceName (product name)",
    })?;
    facts.software_name = Some(text(H, "deviceName.name", name.name.as_ref())?);
    let version = device.version.first().ok_or(NhsdError::MissingField {
        header: H,
        field: "version",
    })?;
    facts.software_version = Some(text(H, "version.value", version.value.as_ref())?);
    Ok(())
}

fn check_target(value: &str, policy: &NhsdPolicy, facts: &mut NhsdFacts) -> Result<(), NhsdError> {
    const H: &str = TARGET_IDENTIFIER;
    let id: Identifier = decode(H, value, policy.max_encoded_bytes)?;
    let system = text(H, "system", id.system.as_ref())?;
    if !(system.starts_with("https://")
        || system.starts_with("http://")
        || system.starts_with("urn:"))
    {
        return Err(NhsdError::InvalidValue {
            header: H,
            field: "system",
            reason: "must be a URI",
        });
    }
    let value = text(H, "value", id.value.as_ref())?;
    if !policy.allowed_target_identifiers.is_empty() {
        let pair = format!("{system}|{value}");
        if !policy
            .allowed_target_identifiers
            .iter()
            .any(|a| *a == value || *a == pair)
        {
            return Err(NhsdError::NotAllowed {
                header: H,
                what: "target identifier",
            });
        }
    }
    facts.target_system = Some(system);
    facts.target_value = Some(value);
    Ok(())
}

/// A hyphenated UUID, as BaRS requires for the transaction headers.
fn check_uuid(header: &'static str, value: &str) -> Result<String, NhsdError> {
    if value.len() == 36 && uuid::Uuid::try_parse(value).is_ok() {
        Ok(value.to_owned())
    } else {
        Err(NhsdError::InvalidValue {
            header,
            field: "value",
            reason: "must be a UUID (8-4-4-4-12 hex)",
        })
    }
}

type Check = fn(&str, &NhsdPolicy, &mut NhsdFacts) -> Result<(), NhsdError>;

/// Validates every header the policy asks for and returns the facts they carry.
pub fn check(headers: &HeaderMap, policy: &NhsdPolicy) -> Result<NhsdFacts, NhsdError> {
    let mut facts = NhsdFacts::default();
    // Transaction ids first: BaRS lists their absence as the first failure scenario.
    let ids: [(&'static str, HeaderRequirement); 2] = [
        (REQUEST_ID, policy.request_id),
        (CORRELATION_ID, policy.correlation_id),
    ];
    for (header, need) in ids {
        if need == HeaderRequirement::Ignored {
            continue;
        }
        match single(headers, header)? {
            Some(v) => {
                let id = check_uuid(header, v)?;
                if header == REQUEST_ID {
                    facts.request_id = Some(id);
                } else {
                    facts.correlation_id = Some(id);
                }
            }
            None if need == HeaderRequirement::Required => {
                return Err(NhsdError::Missing { header })
            }
            None => {}
        }
    }
    let resources: [(&'static str, HeaderRequirement, Check); 4] = [
        (TARGET_IDENTIFIER, policy.target_identifier, check_target),
        (
            END_USER_ORGANISATION,
            policy.end_user_organisation,
            check_organisation,
        ),
        (
            REQUESTING_SOFTWARE,
            policy.requesting_software,
            check_software,
        ),
        (
            REQUESTING_PRACTITIONER,
            policy.requesting_practitioner,
            check_practitioner,
        ),
    ];
    for (header, need, check) in resources {
        if need == HeaderRequirement::Ignored {
            continue;
        }
        match single(headers, header)? {
            Some(v) => check(v, policy, &mut facts)?,
            None if need == HeaderRequirement::Required => {
                return Err(NhsdError::Missing { header })
            }
            None => {}
        }
    }
    Ok(facts)
}

// ---- CLI helpers (`fhirgate nhsd encode|decode|example`) ----

/// The header names this module understands, for the CLI.
pub const HEADERS: [&str; 4] = [
    END_USER_ORGANISATION,
    REQUESTING_PRACTITIONER,
    REQUESTING_SOFTWARE,
    TARGET_IDENTIFIER,
];

fn canonical(name: &str) -> Result<&'static str, String> {
    HEADERS
        .iter()
        .find(|h| h.eq_ignore_ascii_case(name))
        .copied()
        .ok_or_else(|| {
            format!(
                "unknown header {name:?}; expected one of {}",
                HEADERS.join(", ")
            )
        })
}

fn check_one(header: &'static str, encoded: &str) -> Result<NhsdFacts, NhsdError> {
    let policy = NhsdPolicy {
        max_encoded_bytes: 65536,
        ..NhsdPolicy::default()
    };
    let mut facts = NhsdFacts::default();
    match header {
        END_USER_ORGANISATION => check_organisation(encoded, &policy, &mut facts)?,
        REQUESTING_PRACTITIONER => check_practitioner(encoded, &policy, &mut facts)?,
        REQUESTING_SOFTWARE => check_software(encoded, &policy, &mut facts)?,
        _ => check_target(encoded, &policy, &mut facts)?,
    }
    Ok(facts)
}

/// Compacts `json`, Base64-encodes it, and checks the result the way the gateway will.
pub fn encode_header(name: &str, json: &str) -> Result<String, String> {
    let header = canonical(name)?;
    let value: serde_json::Value =
        serde_json::from_str(json).map_err(|e| format!("not JSON: {e}"))?;
    let encoded = base64::engine::general_purpose::STANDARD.encode(value.to_string());
    check_one(header, &encoded).map_err(|e| e.to_string())?;
    Ok(encoded)
}

/// Decodes a header value to pretty JSON and says whether the gateway would accept it.
pub fn decode_header(name: &str, value: &str) -> Result<String, String> {
    let header = canonical(name)?;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(value.trim())
        .map_err(|_| NhsdError::Base64 { header }.to_string())?;
    let json: serde_json::Value =
        serde_json::from_slice(&bytes).map_err(|e| format!("decoded bytes are not JSON: {e}"))?;
    let pretty = serde_json::to_string_pretty(&json).map_err(|e| e.to_string())?;
    let verdict = match check_one(header, value.trim()) {
        Ok(_) => "valid".to_string(),
        Err(e) => format!("INVALID: {e}"),
    };
    Ok(format!("{pretty}\n{header}: {verdict}"))
}

/// A complete, valid set of BaRS headers built from the specification's examples.
pub fn example_headers() -> Vec<(&'static str, String)> {
    let enc =
        |v: serde_json::Value| base64::engine::general_purpose::STANDARD.encode(v.to_string());
    vec![
        (
            REQUEST_ID,
            "c1ab3fba-6bae-4ba4-b257-5a87c44d4a91".to_string(),
        ),
        (
            CORRELATION_ID,
            "9562466f-c982-4bd5-bb0e-255e9f5e6689".to_string(),
        ),
        (
            TARGET_IDENTIFIER,
            enc(
                serde_json::json!({"system": "https://fhir.nhs.uk/Id/dos-service-id", "value": "2000011147"}),
            ),
        ),
        (
            END_USER_ORGANISATION,
            enc(serde_json::json!({"resourceType": "Organization",
                "identifier": [{"system": ODS_SYSTEM, "value": "A1001"}],
                "name": "My service provider name"})),
        ),
        (
            REQUESTING_SOFTWARE,
            enc(serde_json::json!({"resourceType": "Device",
                "identifier": [{"system": "https://consumersupplier.com/Id/device-identifier", "value": "SUPP-APP-1"}],
                "deviceName": [{"name": "Supplier product name", "type": "manufacturer-name"}],
                "version": [{"value": "1.0.0"}]})),
        ),
        (
            REQUESTING_PRACTITIONER,
            enc(serde_json::json!({"resourceType": "PractitionerRole",
                "identifier": [{"system": SDS_ROLE_PROFILE_SYSTEM, "value": "100334993514"}],
                "code": [{"coding": [{"system": SNOMED_SYSTEM, "code": "62247001", "display": "General practitioner"}]}]})),
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn b64(s: &str) -> String {
        base64::engine::general_purpose::STANDARD.encode(s)
    }

    fn full() -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in example_headers() {
            h.insert(k, HeaderValue::from_str(&v).unwrap());
        }
        h
    }

    fn with(header: &'static str, value: &str) -> HeaderMap {
        let mut h = full();
        h.insert(header, HeaderValue::from_str(value).unwrap());
        h
    }

    #[test]
    fn spec_examples_are_valid_and_give_facts() {
        let f = check(&full(), &NhsdPolicy::default()).expect("valid");
        assert_eq!(f.ods_code.as_deref(), Some("A1001"));
        assert_eq!(
            f.organisation_name.as_deref(),
            Some("My service provider name")
        );
        assert_eq!(f.sds_role_profile_id.as_deref(), Some("100334993514"));
        assert_eq!(f.snomed_role_code.as_deref(), Some("62247001"));
        assert_eq!(f.software_instance.as_deref(), Some("SUPP-APP-1"));
        assert_eq!(f.software_name.as_deref(), Some("Supplier product name"));
        assert_eq!(f.software_version.as_deref(), Some("1.0.0"));
        assert_eq!(
            f.target_system.as_deref(),
            Some("https://fhir.nhs.uk/Id/dos-service-id")
        );
        assert_eq!(f.target_value.as_deref(), Some("2000011147"));
        assert_eq!(
            f.request_id.as_deref(),
            Some("c1ab3fba-6bae-4ba4-b257-5a87c44d4a91")
        );
        let up = upstream_fact_headers(&f);
        assert!(up.contains(&("x-fhirgate-ods-code", "A1001")));
        assert!(up.contains(&("x-fhirgate-software-version", "1.0.0")));
    }

    #[test]
    fn spec_encoded_example_with_trailing_newline_is_accepted() {
        // Exactly as published in a BaRS receiver's examples (JSON followed by "\n").
        let v = "eyJyZXNvdXJjZVR5cGUiOiJPcmdhbml6YXRpb24iLCJpZGVudGlmaWVyIjpbeyJ2YWx1ZSI6IkExMDAxIiwic3lzdGVtIjoiaHR0cHM6Ly9maGlyLm5ocy51ay9JZC9vZHMtb3JnYW5pemF0aW9uLWNvZGUifV0sIm5hbWUiOiJNeSBzZXJ2aWNlIHByb3ZpZGVyIG5hbWUifQo=";
        let f = check(&with(END_USER_ORGANISATION, v), &NhsdPolicy::default()).unwrap();
        assert_eq!(f.ods_code.as_deref(), Some("A1001"));
    }

    #[test]
    fn malformed_headers_each_get_a_specific_error() {
        use NhsdError as E;
        const ORG: &str = END_USER_ORGANISATION;
        let org = |json: &str| (ORG, b64(json));
        let huge = format!(
            r#"{{"resourceType":"Organization","identifier":[{{"system":"{ODS_SYSTEM}","value":"A1001"}}],"name":"{}"}}"#,
            "x".repeat(300)
        );
        let nested = format!("{}{}", "[".repeat(2000), "]".repeat(2000));
        type Case = ((&'static str, String), fn(&NhsdError) -> bool);
        let cases: Vec<Case> = vec![
            ((ORG, "%%%not base64%%%".into()), |e| {
                matches!(
                    e,
                    E::Base64 {
                        header: END_USER_ORGANISATION
                    }
                )
            }),
            ((ORG, b64("{}").trim_end_matches('=').into()), |e| {
                matches!(e, E::Base64 { .. })
            }),
            ((ORG, "eyJ-_w==".into()), |e| matches!(e, E::Base64 { .. })),
            (org("not json"), |e| matches!(e, E::Json { .. })),
            (org("[1,2,3]"), |e| matches!(e, E::Json { .. })),
            (org(r#"{"resourceType":"Patient"}"#), |e| {
                matches!(
                    e,
                    E::WrongResourceType {
                        expected: "Organization",
                        ..
                    }
                )
            }),
            (org(r#"{"resourceType":"Organization","name":"X"}"#), |e| {
                matches!(e, E::MissingField { .. })
            }),
            (
                org(
                    r#"{"resourceType":"Organization","identifier":[{"system":"https://example.org/ods","value":"A1001"}],"name":"X"}"#,
                ),
                |e| matches!(e, E::MissingField { .. }),
            ),
            (
                org(&format!(
                    r#"{{"resourceType":"Organization","identifier":[{{"system":"{ODS_SYSTEM}","value":""}}],"name":"X"}}"#
                )),
                |e| {
                    matches!(
                        e,
                        E::MissingField {
                            field: "ODS code",
                            ..
                        }
                    )
                },
            ),
            (
                org(&format!(
                    r#"{{"resourceType":"Organization","identifier":[{{"system":"{ODS_SYSTEM}","value":"a1!"}}],"name":"X"}}"#
                )),
                |e| {
                    matches!(
                        e,
                        E::InvalidValue {
                            field: "ODS code",
                            ..
                        }
                    )
                },
            ),
            (
                org(&format!(
                    r#"{{"resourceType":"Organization","identifier":[{{"system":"{ODS_SYSTEM}","value":"A1001"}}],"name":"   "}}"#
                )),
                |e| matches!(e, E::MissingField { field: "name", .. }),
            ),
            (org(&huge), |e| {
                matches!(e, E::InvalidValue { field: "name", .. })
            }),
            (
                org(&format!(
                    r#"{{"resourceType":"Organization","identifier":"A1001","name":"X","s":"{ODS_SYSTEM}"}}"#
                )),
                |e| matches!(e, E::Json { .. }),
            ),
            (org(&nested), |e| matches!(e, E::Json { .. })),
            ((ORG, "A".repeat(9000)), |e| {
                matches!(e, E::TooLarge { limit: 8192, .. })
            }),
            ((REQUEST_ID, "not-a-uuid".into()), |e| {
                matches!(
                    e,
                    E::InvalidValue {
                        header: REQUEST_ID,
                        ..
                    }
                )
            }),
            (
                (CORRELATION_ID, "9562466fc9824bd5bb0e255e9f5e6689".into()),
                |e| {
                    matches!(
                        e,
                        E::InvalidValue {
                            header: CORRELATION_ID,
                            ..
                        }
                    )
                },
            ),
            (
                (
                    REQUESTING_SOFTWARE,
                    b64(
                        r#"{"resourceType":"Device","identifier":[{"system":"s","value":"i"}],"deviceName":[{"name":"n"}]}"#,
                    ),
                ),
                |e| {
                    matches!(
                        e,
                        E::MissingField {
                            field: "version",
                            ..
                        }
                    )
                },
            ),
            (
                (
                    REQUESTING_SOFTWARE,
                    b64(
                        r#"{"resourceType":"Device","deviceName":[{"name":"n"}],"version":[{"value":"1"}]}"#,
                    ),
                ),
                |e| {
                    matches!(
                        e,
                        E::MissingField {
                            header: REQUESTING_SOFTWARE,
                            ..
                        }
                    )
                },
            ),
            (
                (
                    REQUESTING_PRACTITIONER,
                    b64(&format!(
                        r#"{{"resourceType":"PractitionerRole","identifier":[{{"system":"{SDS_ROLE_PROFILE_SYSTEM}","value":"1"}}],"code":[{{"coding":[{{"system":"{SNOMED_SYSTEM}","code":"GP"}}]}}]}}"#
                    )),
                ),
                |e| {
                    matches!(
                        e,
                        E::InvalidValue {
                            field: "SNOMED role code",
                            ..
                        }
                    )
                },
            ),
            (
                (
                    REQUESTING_PRACTITIONER,
                    b64(r#"{"resourceType":"PractitionerRole"}"#),
                ),
                |e| {
                    matches!(
                        e,
                        E::MissingField {
                            header: REQUESTING_PRACTITIONER,
                            ..
                        }
                    )
                },
            ),
            (
                (TARGET_IDENTIFIER, b64(r#"{"system":"dos","value":"1"}"#)),
                |e| {
                    matches!(
                        e,
                        E::InvalidValue {
                            field: "system",
                            ..
                        }
                    )
                },
            ),
            (
                (
                    TARGET_IDENTIFIER,
                    b64(r#"{"system":"https://fhir.nhs.uk/Id/dos-service-id","value":"a\u0000b"}"#),
                ),
                |e| matches!(e, E::InvalidValue { field: "value", .. }),
            ),
        ];
        for ((header, value), expect) in cases {
            let err = check(&with(header, &value), &NhsdPolicy::default())
                .expect_err(&format!("{header} = {value:.60} must be refused"));
            assert!(expect(&err), "{header}: unexpected {err:?}");
            assert_eq!(err.header(), header);
            let text = err.to_string();
            assert!(
                text.contains(header),
                "diagnostics must name the header: {text}"
            );
            assert!(
                !text.contains(&value[..value.len().min(24)]) || value.len() < 8,
                "value echoed: {text}"
            );
            assert_eq!(err.status(), 400);
        }
    }

    #[test]
    fn missing_duplicate_and_non_ascii_headers() {
        let mut h = full();
        h.remove(TARGET_IDENTIFIER);
        assert_eq!(
            check(&h, &NhsdPolicy::default()),
            Err(NhsdError::Missing {
                header: TARGET_IDENTIFIER
            })
        );
        let mut h = full();
        h.remove(REQUESTING_PRACTITIONER);
        assert!(
            check(&h, &NhsdPolicy::default()).is_ok(),
            "practitioner is optional"
        );
        let mut h = full();
        h.append(
            REQUEST_ID,
            HeaderValue::from_static("c1ab3fba-6bae-4ba4-b257-5a87c44d4a92"),
        );
        assert_eq!(
            check(&h, &NhsdPolicy::default()),
            Err(NhsdError::Duplicate { header: REQUEST_ID })
        );
        let mut h = full();
        h.insert(
            END_USER_ORGANISATION,
            HeaderValue::from_bytes(b"\xe9\xe9").unwrap(),
        );
        assert_eq!(
            check(&h, &NhsdPolicy::default()),
            Err(NhsdError::NotAscii {
                header: END_USER_ORGANISATION
            })
        );
        let ignored = NhsdPolicy {
            target_identifier: HeaderRequirement::Ignored,
            ..NhsdPolicy::default()
        };
        let h = with(TARGET_IDENTIFIER, "garbage");
        assert!(
            check(&h, &ignored).is_ok(),
            "ignored headers are not inspected"
        );
    }

    #[test]
    fn allow_lists_refuse_with_403() {
        let p = NhsdPolicy {
            allowed_ods_codes: vec!["RYG".into()],
            ..NhsdPolicy::default()
        };
        let e = check(&full(), &p).unwrap_err();
        assert_eq!(
            e,
            NhsdError::NotAllowed {
                header: END_USER_ORGANISATION,
                what: "ODS code"
            }
        );
        assert_eq!((e.status(), e.nhs_code()), (403, "REC_FORBIDDEN"));
        let p = NhsdPolicy {
            allowed_ods_codes: vec!["A1001".into()],
            allowed_target_identifiers: vec![
                "https://fhir.nhs.uk/Id/dos-service-id|2000011147".into()
            ],
            ..NhsdPolicy::default()
        };
        assert!(check(&full(), &p).is_ok());
        let p = NhsdPolicy {
            allowed_target_identifiers: vec!["999".into()],
            ..NhsdPolicy::default()
        };
        assert!(matches!(
            check(&full(), &p),
            Err(NhsdError::NotAllowed {
                header: TARGET_IDENTIFIER,
                ..
            })
        ));
    }

    #[test]
    fn policy_validation_names_fields() {
        let p = NhsdPolicy {
            allowed_ods_codes: vec!["bad code".into()],
            ..NhsdPolicy::default()
        };
        assert_eq!(
            p.validate("nhsd").unwrap_err().0,
            "nhsd.allowed_ods_codes[0]"
        );
        let p = NhsdPolicy {
            max_encoded_bytes: 10,
            ..NhsdPolicy::default()
        };
        assert_eq!(
            p.validate("routes[1].nhsd").unwrap_err().0,
            "routes[1].nhsd.max_encoded_bytes"
        );
    }

    #[test]
    fn cli_helpers_round_trip() {
        let json = r#"{"resourceType":"Organization","identifier":[{"system":"https://fhir.nhs.uk/Id/ods-organization-code","value":"RYG"}],"name":"Trust"}"#;
        let enc = encode_header("nhsd-end-user-organisation", json).unwrap();
        let dec = decode_header(END_USER_ORGANISATION, &enc).unwrap();
        assert!(dec.contains("\"RYG\"") && dec.ends_with("valid"), "{dec}");
        assert!(encode_header(END_USER_ORGANISATION, r#"{"resourceType":"Device"}"#).is_err());
        assert!(decode_header("X-Unknown", &enc).is_err());
        let bad = decode_header(TARGET_IDENTIFIER, &b64(r#"{"system":"x"}"#)).unwrap();
        assert!(bad.contains("INVALID"), "{bad}");
    }

    mod prop {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(512))]

            /// Arbitrary header bytes never panic, and anything accepted carries facts
            /// that satisfy the documented invariants.
            #[test]
            fn never_panics_on_raw_bytes(idx in 0usize..6, raw in proptest::collection::vec(any::<u8>(), 0..600)) {
                let names = [END_USER_ORGANISATION, REQUESTING_PRACTITIONER, REQUESTING_SOFTWARE, TARGET_IDENTIFIER, REQUEST_ID, CORRELATION_ID];
                if let Ok(v) = HeaderValue::from_bytes(&raw) {
                    let mut h = full();
                    h.insert(names[idx], v);
                    if let Ok(f) = check(&h, &NhsdPolicy::default()) {
                        prop_assert!(f.ods_code.as_deref().is_some_and(valid_ods));
                        prop_assert!(f.request_id.is_some() && f.correlation_id.is_some());
                    }
                }
            }

            /// Arbitrary JSON-ish text, Base64-encoded properly, never panics either.
            #[test]
            fn never_panics_on_encoded_text(idx in 0usize..4, text in "\\PC{0,400}") {
                let mut h = full();
                let v = base64::engine::general_purpose::STANDARD.encode(&text);
                h.insert(HEADERS[idx], HeaderValue::from_str(&v).unwrap());
                let _ = check(&h, &NhsdPolicy::default());
            }

            /// Structured near-misses: valid JSON with arbitrary field values.
            #[test]
            fn arbitrary_field_values(system in "\\PC{0,80}", value in "\\PC{0,80}", name in "\\PC{0,80}") {
                let json = serde_json::json!({"resourceType": "Organization",
                    "identifier": [{"system": system, "value": value}], "name": name});
                let v = base64::engine::general_purpose::STANDARD.encode(json.to_string());
                let h = with(END_USER_ORGANISATION, &v);
                if let Ok(f) = check(&h, &NhsdPolicy::default()) {
                    prop_assert_eq!(system, ODS_SYSTEM);
                    prop_assert!(f.ods_code.as_deref().is_some_and(valid_ods));
                    prop_assert!(f.organisation_name.is_some_and(|n| !n.is_empty()));
                }
            }
        }
    }
}
