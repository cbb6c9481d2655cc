//! The typed objects carried by the Base64 headers, and their validating parsers.
//!
//! Shapes follow the BaRS API specification examples
//! (`NHSDigital/booking-and-referral-fhir-api`, `specification/booking-and-referral-1.2.0.yaml`,
//! `components.parameters.*_HParam`, "Example object before encoding"):
//!
//! * `NHSD-End-User-Organisation`: `{"resourceType": "Organization", "identifier":
//!   [{"system": "https://fhir.nhs.uk/Id/ods-organization-code", "value": "A1001"}],
//!   "name": "My service provider name"}`. The standard: "It Shall include the ODS code
//!   and the human readable name"; "Other identifiers are permitted".
//! * `NHSD-Requesting-Practitioner`: `{"resourceType": "PractitionerRole", "identifier":
//!   [{"system": "https://fhir.nhs.uk/Id/sds-role-profile-id", "value": "100334993514"}],
//!   "code": [{"coding": [{"system": "http://snomed.info/sct", "code": "62247001",
//!   "display": "General practitioner"}]}]}`. "It shall include their sds role id and a
//!   SNOMED code related to their role where applicable".
//! * `NHSD-Requesting-Software`: `{"resourceType": "Device", "identifier": [{"system":
//!   "https://consumersupplier.com/Id/device-identifier", "value": "SUPP-APP-1"}],
//!   "deviceName": {"name": "Supplier product name", "type": "manufacturer-name"},
//!   "version": {"value": "1.0.0"}}`. BaRS defines `deviceName` and `version` as single
//!   objects (API change log 1.8.0: "deviceName ... now shows correctly as an Object as
//!   defined by the schema"); FHIR R4 makes them arrays, so both forms are accepted.
//! * `NHSD-Target-Identifier`: `{"value": "2000011147", "system":
//!   "https://fhir.nhs.uk/Id/dos-service-id"}` ("A Base64 encoded object containing value
//!   and system properties"); no `resourceType`.
//!
//! Every identifier must carry both `system` and `value`. Unknown members are ignored.

use serde_json::{Map, Value};

use super::error::{excerpt, NhsdError};
use super::json::kind;
use super::{ODS_SYSTEM, SDS_ROLE_PROFILE_SYSTEM, SDS_USER_SYSTEM, SNOMED_SYSTEM};

/// Longest identifier `system` (a URI), in bytes.
pub const MAX_SYSTEM_LEN: usize = 256;
/// Longest identifier `value`, code or version, in bytes.
pub const MAX_VALUE_LEN: usize = 128;
/// Longest human-readable name or display text, in characters.
pub const MAX_TEXT_CHARS: usize = 256;
/// Most entries accepted in any array (identifiers, codes, codings, names, versions).
pub const MAX_ENTRIES: usize = 16;

/// An identifier: `system` and `value`, both present and valid.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identifier {
    pub system: String,
    pub value: String,
}

/// `NHSD-Target-Identifier`.
pub type TargetIdentifier = Identifier;

/// `NHSD-End-User-Organisation`: a FHIR `Organization`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Organization {
    /// The ODS code, upper-cased.
    pub ods_code: String,
    pub name: String,
    /// Any further identifiers, validated but not interpreted.
    pub other_identifiers: Vec<Identifier>,
}

/// `NHSD-Requesting-Practitioner`: a FHIR `PractitionerRole`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PractitionerRole {
    pub sds_role_profile_id: String,
    pub sds_user_id: Option<String>,
    /// The first SNOMED CT coding of `code`, if any.
    pub snomed_role_code: Option<String>,
    pub snomed_role_display: Option<String>,
}

/// `NHSD-Requesting-Software`: a FHIR `Device`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Device {
    /// The first identifier: the instance of the product.
    pub instance: Identifier,
    /// The product name (`deviceName.name`, the first one if an array).
    pub name: String,
    /// The product version (`version.value`, the first one if an array).
    pub version: String,
}

/// A valid ODS code: 3 to 10 ASCII letters or digits (any case; facts carry it
/// upper-cased). Trusts are 3 (`RYG`), sites and practices 5 or 6 (`RYG01`, `A81001`).
pub fn is_valid_ods_code(code: &str) -> bool {
    (3..=10).contains(&code.len()) && code.bytes().all(|b| b.is_ascii_alphanumeric())
}

/// A valid SNOMED CT identifier: 6 to 18 digits, no leading zero.
fn is_valid_sctid(code: &str) -> bool {
    (6..=18).contains(&code.len())
        && code.bytes().all(|b| b.is_ascii_digit())
        && !code.starts_with('0')
}

/// Parses and validates an `NHSD-End-User-Organisation` object.
pub fn parse_organization(
    header: &'static str,
    obj: &Map<String, Value>,
) -> Result<Organization, NhsdError> {
    let cx = Cx { header };
    cx.resource_type(obj, "Organization")?;
    let ids = cx.identifiers(obj)?;
    let (ods, other): (Vec<_>, Vec<_>) = ids.into_iter().partition(|i| i.system == ODS_SYSTEM);
    let ods_code = cx.one(ods, "identifier (ods-organization-code)", "ODS code")?;
    if !is_valid_ods_code(&ods_code) {
        return Err(cx.invalid(
            "identifier (ods-organization-code)",
            "an ODS code is 3 to 10 letters or digits",
        ));
    }
    let name = cx.required_str(obj, "name", "name", Kind::Text)?.to_owned();
    Ok(Organization {
        ods_code: ods_code.to_ascii_uppercase(),
        name,
        other_identifiers: other,
    })
}

/// Parses and validates an `NHSD-Requesting-Practitioner` object.
pub fn parse_practitioner_role(
    header: &'static str,
    obj: &Map<String, Value>,
) -> Result<PractitionerRole, NhsdError> {
    let cx = Cx { header };
    cx.resource_type(obj, "PractitionerRole")?;
    let ids = cx.identifiers(obj)?;
    let mut role = Vec::new();
    let mut user = Vec::new();
    for id in ids {
        if id.system == SDS_ROLE_PROFILE_SYSTEM {
            role.push(id);
        } else if id.system == SDS_USER_SYSTEM {
            user.push(id);
        }
    }
    let sds_role_profile_id = cx.one(
        role,
        "identifier (sds-role-profile-id)",
        "SDS role profile id",
    )?;
    cx.sds_id(&sds_role_profile_id, "identifier (sds-role-profile-id)")?;
    let sds_user_id = if user.is_empty() {
        None
    } else {
        Some(cx.one(user, "identifier (sds-user-id)", "SDS user id")?)
    };
    if let Some(u) = &sds_user_id {
        cx.sds_id(u, "identifier (sds-user-id)")?;
    }

    let mut snomed = None;
    if let Some(codes) = cx.optional_array(obj, "code", "code")? {
        for concept in codes {
            let concept = cx.object(concept, "code")?;
            let Some(codings) = cx.optional_array(concept, "coding", "code.coding")? else {
                continue;
            };
            for coding in codings {
                let coding = cx.object(coding, "code.coding")?;
                let system = cx.optional_str(coding, "system", "code.coding.system", Kind::Uri)?;
                let code = cx.optional_str(coding, "code", "code.coding.code", Kind::Token)?;
                let display =
                    cx.optional_str(coding, "display", "code.coding.display", Kind::Text)?;
                if system != Some(SNOMED_SYSTEM) {
                    continue;
                }
                let Some(code) = code else {
                    return Err(cx.missing("code.coding.code"));
                };
                if !is_valid_sctid(code) {
                    return Err(
                        cx.invalid("code.coding.code", "a SNOMED CT code is 6 to 18 digits")
                    );
                }
                if snomed.is_none() {
                    snomed = Some((code.to_owned(), display.map(str::to_owned)));
                }
            }
        }
    }
    let (snomed_role_code, snomed_role_display) = match snomed {
        Some((c, d)) => (Some(c), d),
        None => (None, None),
    };
    Ok(PractitionerRole {
        sds_role_profile_id,
        sds_user_id,
        snomed_role_code,
        snomed_role_display,
    })
}

/// Parses and validates an `NHSD-Requesting-Software` object.
pub fn parse_device(header: &'static str, obj: &Map<String, Value>) -> Result<Device, NhsdError> {
    let cx = Cx { header };
    cx.resource_type(obj, "Device")?;
    let instance = cx
        .identifiers(obj)?
        .into_iter()
        .next()
        .ok_or_else(|| cx.missing("identifier"))?;
    let names = cx.object_or_array(obj, "deviceName")?;
    let mut name = None;
    for entry in names {
        let n = cx.required_str(entry, "name", "deviceName.name", Kind::Text)?;
        cx.optional_str(entry, "type", "deviceName.type", Kind::Token)?;
        name.get_or_insert(n);
    }
    let versions = cx.object_or_array(obj, "version")?;
    let mut version = None;
    for entry in versions {
        let v = cx.required_str(entry, "value", "version.value", Kind::Token)?;
        version.get_or_insert(v);
    }
    Ok(Device {
        instance,
        // object_or_array never returns an empty list, so both are set.
        name: name.ok_or_else(|| cx.missing("deviceName"))?.to_owned(),
        version: version.ok_or_else(|| cx.missing("version"))?.to_owned(),
    })
}

/// Parses and validates an `NHSD-Target-Identifier` object.
pub fn parse_target_identifier(
    header: &'static str,
    obj: &Map<String, Value>,
) -> Result<TargetIdentifier, NhsdError> {
    Cx { header }.identifier(obj, "system", "value")
}

/// What a string field may contain.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// Printable ASCII without spaces, at most [`MAX_SYSTEM_LEN`] bytes.
    Uri,
    /// Printable ASCII (inner spaces allowed), at most [`MAX_VALUE_LEN`] bytes.
    Token,
    /// Any Unicode except control characters, at most [`MAX_TEXT_CHARS`] characters.
    Text,
}

/// Error-building context for one header.
struct Cx {
    header: &'static str,
}

impl Cx {
    fn missing(&self, field: &'static str) -> NhsdError {
        NhsdError::MissingField {
            header: self.header,
            field,
        }
    }

    /// A field of the wrong JSON type (`structure`, not `value`: see [`NhsdError::WrongType`]).
    fn wrong_type(&self, field: &'static str, reason: impl Into<String>) -> NhsdError {
        NhsdError::WrongType {
            header: self.header,
            field,
            reason: reason.into(),
        }
    }

    fn invalid(&self, field: &'static str, reason: impl Into<String>) -> NhsdError {
        NhsdError::InvalidValue {
            header: self.header,
            field,
            reason: reason.into(),
        }
    }

    fn resource_type(
        &self,
        obj: &Map<String, Value>,
        expected: &'static str,
    ) -> Result<(), NhsdError> {
        match obj.get("resourceType") {
            None => Err(self.missing("resourceType")),
            Some(Value::String(s)) if s == expected => Ok(()),
            Some(Value::String(s)) => Err(NhsdError::WrongResourceType {
                header: self.header,
                expected,
                found: excerpt(s),
            }),
            Some(other) => Err(self.wrong_type(
                "resourceType",
                format!("must be a string, not {}", kind(other)),
            )),
        }
    }

    fn check_str(&self, field: &'static str, s: &str, k: Kind) -> Result<(), NhsdError> {
        if s.is_empty() {
            return Err(self.invalid(field, "must not be empty"));
        }
        if s.trim().is_empty() {
            return Err(self.invalid(field, "must not be blank"));
        }
        if s.trim() != s {
            return Err(self.invalid(field, "must not start or end with whitespace"));
        }
        match k {
            Kind::Uri | Kind::Token => {
                let max = if k == Kind::Uri {
                    MAX_SYSTEM_LEN
                } else {
                    MAX_VALUE_LEN
                };
                if s.len() > max {
                    return Err(self.invalid(field, format!("is longer than {max} bytes")));
                }
                let ok = |b: u8| (0x21..0x7f).contains(&b) || (k == Kind::Token && b == b' ');
                if !s.bytes().all(ok) {
                    let what = if k == Kind::Uri {
                        "must be printable ASCII without spaces"
                    } else {
                        "must be printable ASCII"
                    };
                    return Err(self.invalid(field, what));
                }
            }
            Kind::Text => {
                if s.chars().nth(MAX_TEXT_CHARS).is_some() {
                    return Err(
                        self.invalid(field, format!("is longer than {MAX_TEXT_CHARS} characters"))
                    );
                }
                if s.chars().any(char::is_control) {
                    return Err(self.invalid(field, "must not contain control characters"));
                }
            }
        }
        Ok(())
    }

    fn optional_str<'a>(
        &self,
        obj: &'a Map<String, Value>,
        key: &str,
        field: &'static str,
        k: Kind,
    ) -> Result<Option<&'a str>, NhsdError> {
        match obj.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => {
                self.check_str(field, s, k)?;
                Ok(Some(s))
            }
            Some(other) => {
                Err(self.wrong_type(field, format!("must be a string, not {}", kind(other))))
            }
        }
    }

    fn required_str<'a>(
        &self,
        obj: &'a Map<String, Value>,
        key: &str,
        field: &'static str,
        k: Kind,
    ) -> Result<&'a str, NhsdError> {
        self.optional_str(obj, key, field, k)?
            .ok_or_else(|| self.missing(field))
    }

    fn object<'a>(
        &self,
        v: &'a Value,
        field: &'static str,
    ) -> Result<&'a Map<String, Value>, NhsdError> {
        match v {
            Value::Object(m) => Ok(m),
            other => Err(self.wrong_type(field, format!("must be an object, not {}", kind(other)))),
        }
    }

    fn optional_array<'a>(
        &self,
        obj: &'a Map<String, Value>,
        key: &str,
        field: &'static str,
    ) -> Result<Option<&'a [Value]>, NhsdError> {
        match obj.get(key) {
            None => Ok(None),
            Some(Value::Array(a)) if a.is_empty() => Err(self.invalid(field, "must not be empty")),
            Some(Value::Array(a)) if a.len() > MAX_ENTRIES => {
                Err(self.invalid(field, format!("has more than {MAX_ENTRIES} entries")))
            }
            Some(Value::Array(a)) => Ok(Some(a)),
            Some(other) => {
                Err(self.wrong_type(field, format!("must be an array, not {}", kind(other))))
            }
        }
    }

    /// A member that BaRS sends as one object and FHIR R4 as an array of objects.
    /// Never returns an empty list.
    fn object_or_array<'a>(
        &self,
        obj: &'a Map<String, Value>,
        key: &'static str,
    ) -> Result<Vec<&'a Map<String, Value>>, NhsdError> {
        match obj.get(key) {
            None => Err(self.missing(key)),
            Some(Value::Object(m)) => Ok(vec![m]),
            Some(Value::Array(_)) => {
                let items = self.optional_array(obj, key, key)?.unwrap_or_default();
                items.iter().map(|v| self.object(v, key)).collect()
            }
            Some(other) => Err(self.wrong_type(
                key,
                format!(
                    "must be an object or an array of objects, not {}",
                    kind(other)
                ),
            )),
        }
    }

    fn identifier(
        &self,
        obj: &Map<String, Value>,
        system_field: &'static str,
        value_field: &'static str,
    ) -> Result<Identifier, NhsdError> {
        let system = self.required_str(obj, "system", system_field, Kind::Uri)?;
        let value = self.required_str(obj, "value", value_field, Kind::Token)?;
        Ok(Identifier {
            system: system.to_owned(),
            value: value.to_owned(),
        })
    }

    /// The required, non-empty `identifier` array.
    fn identifiers(&self, obj: &Map<String, Value>) -> Result<Vec<Identifier>, NhsdError> {
        let key = "identifier";
        let items = self
            .optional_array(obj, key, key)?
            .ok_or_else(|| self.missing(key))?;
        items
            .iter()
            .map(|v| {
                let m = self.object(v, key)?;
                self.identifier(m, "identifier.system", "identifier.value")
            })
            .collect()
    }

    /// The value of the single identifier in `ids`.
    fn one(
        &self,
        ids: Vec<Identifier>,
        field: &'static str,
        what: &str,
    ) -> Result<String, NhsdError> {
        let mut it = ids.into_iter();
        match (it.next(), it.next()) {
            (None, _) => Err(self.missing(field)),
            (Some(id), None) => Ok(id.value),
            (Some(_), Some(_)) => Err(self.invalid(field, format!("more than one {what}"))),
        }
    }

    fn sds_id(&self, id: &str, field: &'static str) -> Result<(), NhsdError> {
        if id.len() > 32 || !id.bytes().all(|b| b.is_ascii_alphanumeric()) {
            return Err(self.invalid(field, "an SDS id is 1 to 32 letters or digits"));
        }
        Ok(())
    }
}
