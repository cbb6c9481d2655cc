//! The per-request check: headers in, facts or one error out.

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use http::HeaderMap;
use serde_json::{Map, Value};

use super::error::{excerpt, NhsdError};
use super::policy::{HeaderRequirement, NhsdPolicy};
use super::resources::{self, Device, Organization, PractitionerRole, TargetIdentifier};
use super::{json, ALL_HEADERS};
use super::{
    CORRELATION_ID, END_USER_ORGANISATION, REQUESTING_PRACTITIONER, REQUESTING_SOFTWARE,
    REQUEST_ID, TARGET_IDENTIFIER,
};

/// What the headers established, for forwarding upstream and for the audit log. A field
/// is `None` when its header was absent (and allowed to be) or ignored by the policy.
///
/// Every string here has passed validation: no control characters anywhere; ODS and SDS
/// ids are ASCII letters and digits; identifier values, systems and versions are
/// printable ASCII. Only `organisation_name`, `software_name` and `snomed_role_display`
/// may contain non-ASCII text.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NhsdFacts {
    /// ODS code of the requesting organisation, upper-cased.
    pub ods_code: Option<String>,
    pub organisation_name: Option<String>,
    pub sds_role_profile_id: Option<String>,
    pub sds_user_id: Option<String>,
    /// SNOMED CT code of the practitioner's role.
    pub snomed_role_code: Option<String>,
    /// Identifier value of the requesting software instance.
    pub software_instance: Option<String>,
    pub software_name: Option<String>,
    pub software_version: Option<String>,
    pub target_system: Option<String>,
    pub target_value: Option<String>,
    /// `X-Request-ID` as sent (a hyphenated UUID).
    pub request_id: Option<String>,
    /// `X-Correlation-ID` as sent (a hyphenated UUID).
    pub correlation_id: Option<String>,
}

impl NhsdFacts {
    /// The target identifier as `(system, value)`.
    pub fn target_identifier(&self) -> Option<(&str, &str)> {
        Some((
            self.target_system.as_deref()?,
            self.target_value.as_deref()?,
        ))
    }
}

/// The headers [`upstream_fact_headers`] may set. The gateway must strip every one of
/// them (or every `x-fhirgate-*` header) from the client's request before forwarding, so
/// an upstream can trust them.
pub const FORWARDED_FACT_HEADERS: [&str; 8] = [
    "x-fhirgate-ods-code",
    "x-fhirgate-sds-role-profile-id",
    "x-fhirgate-sds-user-id",
    "x-fhirgate-software-name",
    "x-fhirgate-software-version",
    "x-fhirgate-software-instance",
    "x-fhirgate-target-system",
    "x-fhirgate-target-identifier",
];

/// The verified facts to set upstream, as `(lower-case header name, value)`; absent facts
/// are left out. Values never contain control characters (so no header splitting); all
/// are printable ASCII except `x-fhirgate-software-name`, which carries the sender's
/// product name and may contain non-ASCII UTF-8: escape it (fhirgate's
/// `forward::header_value` does) or build the value with `HeaderValue::from_bytes`.
/// `x-fhirgate-target-identifier` is the identifier's value; its system is separate.
pub fn upstream_fact_headers(f: &NhsdFacts) -> Vec<(&'static str, &str)> {
    let values = [
        &f.ods_code,
        &f.sds_role_profile_id,
        &f.sds_user_id,
        &f.software_name,
        &f.software_version,
        &f.software_instance,
        &f.target_system,
        &f.target_value,
    ];
    FORWARDED_FACT_HEADERS
        .into_iter()
        .zip(values)
        .filter_map(|(name, v)| v.as_deref().map(|v| (name, v)))
        .collect()
}

/// Validates every header the policy asks for and returns the facts they carry.
///
/// Headers are examined in [`ALL_HEADERS`] order and the first problem is returned. For
/// each: `Ignored` skips it entirely; otherwise it must occur at most once, `Required`
/// ones at least once, and a present value must be valid whatever its requirement.
/// Allow-lists are applied as soon as their header has been parsed.
pub fn check(headers: &HeaderMap, policy: &NhsdPolicy) -> Result<NhsdFacts, NhsdError> {
    let mut facts = NhsdFacts::default();
    for header in ALL_HEADERS {
        let need = policy.effective(header);
        if need == HeaderRequirement::Ignored {
            continue;
        }
        let limit = match header {
            REQUEST_ID | CORRELATION_ID => policy.max_encoded_bytes,
            _ => policy.encoded_limit(),
        };
        let Some(raw) = single(headers, header, limit)? else {
            if need == HeaderRequirement::Required {
                return Err(NhsdError::Missing { header });
            }
            continue;
        };
        match header {
            REQUEST_ID => facts.request_id = Some(uuid(header, raw)?),
            CORRELATION_ID => facts.correlation_id = Some(uuid(header, raw)?),
            TARGET_IDENTIFIER => {
                let t = resources::parse_target_identifier(header, &decode(header, raw, policy)?)?;
                allow_target(header, &t, policy)?;
                facts.target_system = Some(t.system);
                facts.target_value = Some(t.value);
            }
            END_USER_ORGANISATION => {
                let o = resources::parse_organization(header, &decode(header, raw, policy)?)?;
                allow_ods(header, &o, policy)?;
                let Organization { ods_code, name, .. } = o;
                facts.ods_code = Some(ods_code);
                facts.organisation_name = Some(name);
            }
            REQUESTING_SOFTWARE => {
                let d = resources::parse_device(header, &decode(header, raw, policy)?)?;
                let Device {
                    instance,
                    name,
                    version,
                } = d;
                facts.software_instance = Some(instance.value);
                facts.software_name = Some(name);
                facts.software_version = Some(version);
            }
            REQUESTING_PRACTITIONER => {
                let p = resources::parse_practitioner_role(header, &decode(header, raw, policy)?)?;
                let PractitionerRole {
                    sds_role_profile_id,
                    sds_user_id,
                    snomed_role_code,
                    ..
                } = p;
                facts.sds_role_profile_id = Some(sds_role_profile_id);
                facts.sds_user_id = sds_user_id;
                facts.snomed_role_code = snomed_role_code;
            }
            _ => {}
        }
    }
    Ok(facts)
}

/// The header's only value as text: refused if repeated, empty, longer than `limit`
/// (before anything else is done with it) or not visible ASCII.
fn single<'h>(
    headers: &'h HeaderMap,
    header: &'static str,
    limit: usize,
) -> Result<Option<&'h str>, NhsdError> {
    let mut all = headers.get_all(header).iter();
    let Some(v) = all.next() else {
        return Ok(None);
    };
    if all.next().is_some() {
        return Err(NhsdError::Duplicate { header });
    }
    if v.len() > limit {
        return Err(NhsdError::TooLarge { header, limit });
    }
    if v.is_empty() {
        return Err(NhsdError::InvalidValue {
            header,
            field: "value",
            reason: "is empty".into(),
        });
    }
    v.to_str()
        .map(Some)
        .map_err(|_| NhsdError::NotAscii { header })
}

/// A hyphenated UUID, as the specification's `format: uuid` and examples show.
fn uuid(header: &'static str, s: &str) -> Result<String, NhsdError> {
    if s.len() == 36 && uuid::Uuid::try_parse(s).is_ok() {
        Ok(s.to_owned())
    } else {
        Err(NhsdError::InvalidValue {
            header,
            field: "value",
            reason: "must be a hyphenated UUID (8-4-4-4-12 hex digits)".into(),
        })
    }
}

/// Strict Base64 (standard alphabet, canonical padding) then strict JSON object.
/// The caller has already bounded `s` by [`NhsdPolicy::encoded_limit`].
pub(super) fn decode(
    header: &'static str,
    s: &str,
    policy: &NhsdPolicy,
) -> Result<Map<String, Value>, NhsdError> {
    let bytes = STANDARD
        .decode(s)
        .map_err(|_| NhsdError::Base64 { header })?;
    if bytes.len() > policy.max_decoded_bytes {
        return Err(NhsdError::TooLarge {
            header,
            limit: policy.encoded_limit(),
        });
    }
    json::parse_object(&bytes).map_err(|detail| NhsdError::Json { header, detail })
}

fn allow_ods(header: &'static str, o: &Organization, policy: &NhsdPolicy) -> Result<(), NhsdError> {
    if policy.allowed_ods_codes.is_empty()
        || policy
            .allowed_ods_codes
            .iter()
            .any(|c| c.eq_ignore_ascii_case(&o.ods_code))
    {
        return Ok(());
    }
    Err(NhsdError::NotAllowed {
        header,
        what: "ODS code",
        value: excerpt(&o.ods_code),
        refusal: policy.refusal,
    })
}

fn allow_target(
    header: &'static str,
    t: &TargetIdentifier,
    policy: &NhsdPolicy,
) -> Result<(), NhsdError> {
    let matches = |entry: &String| match entry.split_once('|') {
        Some((system, value)) => system.eq_ignore_ascii_case(&t.system) && value == t.value,
        None => *entry == t.value,
    };
    if policy.allowed_target_identifiers.is_empty()
        || policy.allowed_target_identifiers.iter().any(matches)
    {
        return Ok(());
    }
    Err(NhsdError::NotAllowed {
        header,
        what: "target identifier",
        value: excerpt(&t.value),
        refusal: policy.refusal,
    })
}
