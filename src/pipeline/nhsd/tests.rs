//! Table tests for `check`, the resources, the policy, the errors and the CLI helpers.

use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE};
use base64::Engine;
use http::{HeaderMap, HeaderValue};
use serde_json::{json, Value};

use super::error::excerpt;
use super::*;

// ---- helpers ----

fn hv(s: &str) -> HeaderValue {
    HeaderValue::from_str(s).expect("test header values are visible ASCII")
}

fn enc(v: &Value) -> String {
    STANDARD.encode(v.to_string())
}

fn enc_str(s: &str) -> String {
    STANDARD.encode(s)
}

fn example(header: &str) -> Value {
    example_resource(header).expect("example exists")
}

/// The example set with `skip` left out.
fn without(skip: &[&str]) -> HeaderMap {
    let mut m = HeaderMap::new();
    for (k, v) in example_headers() {
        if !skip.contains(&k) {
            m.append(k, hv(&v));
        }
    }
    m
}

/// The example set with `header` replaced by `value`.
fn with_value(header: &'static str, value: HeaderValue) -> HeaderMap {
    let mut m = without(&[header]);
    m.insert(header, value);
    m
}

fn with(header: &'static str, value: &str) -> HeaderMap {
    with_value(header, hv(value))
}

fn with_json(header: &'static str, v: &Value) -> HeaderMap {
    with(header, &enc(v))
}

/// The example set with `header`'s example object edited by `f`.
fn edit(header: &'static str, f: impl FnOnce(&mut Value)) -> HeaderMap {
    let mut v = example(header);
    f(&mut v);
    with_json(header, &v)
}

fn refuse(m: &HeaderMap) -> NhsdError {
    refuse_with(m, &NhsdPolicy::default())
}

fn refuse_with(m: &HeaderMap, p: &NhsdPolicy) -> NhsdError {
    match check(m, p) {
        Ok(f) => panic!("expected a refusal, got {f:?}"),
        Err(e) => e,
    }
}

fn field_of(e: &NhsdError) -> Option<&'static str> {
    match e {
        NhsdError::MissingField { field, .. }
        | NhsdError::WrongType { field, .. }
        | NhsdError::InvalidValue { field, .. } => Some(field),
        _ => None,
    }
}

/// `v` with member `key` removed.
fn remove(v: &mut Value, key: &str) {
    if let Some(o) = v.as_object_mut() {
        o.remove(key);
    }
}

/// `v[key]` (an array) with `item` appended.
fn push(v: &mut Value, key: &str, item: Value) {
    if let Some(a) = v[key].as_array_mut() {
        a.push(item);
    }
}

fn org_with_ods(ods: &str) -> HeaderMap {
    edit(END_USER_ORGANISATION, |v| {
        v["identifier"][0]["value"] = json!(ods);
    })
}

fn expected_example_facts() -> NhsdFacts {
    NhsdFacts {
        ods_code: Some("A1001".into()),
        organisation_name: Some("My service provider name".into()),
        sds_role_profile_id: Some("100334993514".into()),
        sds_user_id: None,
        snomed_role_code: Some("62247001".into()),
        software_instance: Some("SUPP-APP-1".into()),
        software_name: Some("Supplier product name".into()),
        software_version: Some("1.0.0".into()),
        target_system: Some(DOS_SERVICE_SYSTEM.into()),
        target_value: Some("2000011147".into()),
        request_id: Some(EXAMPLE_REQUEST_ID.into()),
        correlation_id: Some(EXAMPLE_CORRELATION_ID.into()),
    }
}

// Base64 examples copied from the specification's schemas
// (NHSDigital/booking-and-referral-fhir-api, specification/schemas/*.yaml).
const SPEC_ORGANISATION: &str = "eyJyZXNvdXJjZVR5cGUiOiJPcmdhbml6YXRpb24iLCJpZGVudGlmaWVyIjpbeyJ2YWx1ZSI6IkExMDAxIiwic3lzdGVtIjoiaHR0cHM6Ly9maGlyLm5ocy51ay9JZC9vZHMtb3JnYW5pemF0aW9uLWNvZGUifV0sIm5hbWUiOiJNeSBzZXJ2aWNlIHByb3ZpZGVyIG5hbWUifQo=";
const SPEC_SOFTWARE: &str = "eyJyZXNvdXJjZVR5cGUiOiJEZXZpY2UiLCJpZGVudGlmaWVyIjpbeyJzeXN0ZW0iOiJodHRwczovL2NvbnN1bWVyc3VwcGxpZXIuY29tL0lkL2RldmljZS1pZGVudGlmaWVyIiwidmFsdWUiOiJTVVBQLUFQUC0xIn1dLCJkZXZpY2VOYW1lIjp7Im5hbWUiOiJTdXBwbGllciBwcm9kdWN0IG5hbWUiLCJ0eXBlIjoibWFudWZhY3R1cmVyLW5hbWUifSwidmVyc2lvbiI6eyJ2YWx1ZSI6IjEuMC4wIn19Cg==";
const SPEC_TARGET: &str = "eyJ2YWx1ZSI6ICJOSFMwMDAxIiwgInN5c3RlbSI6ICJ0ZXN0cyJ9";
/// The current specification's practitioner example is a placeholder whose
/// resourceType is the literal "string".
const SPEC_PRACTITIONER_PLACEHOLDER: &str = "eyJyZXNvdXJjZVR5cGUiOiJzdHJpbmciLCJpZGVudGlmaWVyIjpbeyJ2YWx1ZSI6InN0cmluZyIsInN5c3RlbSI6InN0cmluZyJ9XSwiY29kZSI6W3siY29kaW5nIjpbeyJzeXN0ZW0iOiJzdHJpbmciLCJjb2RlIjoic3RyaW5nIiwiZGlzcGxheSI6InN0cmluZyJ9XX1dfQo=";

// ---- valid input ----

#[test]
fn example_set_yields_every_fact() {
    let facts = check(&without(&[]), &NhsdPolicy::default()).expect("examples are valid");
    assert_eq!(facts, expected_example_facts());
    assert_eq!(
        facts.target_identifier(),
        Some((DOS_SERVICE_SYSTEM, "2000011147"))
    );
}

#[test]
fn specification_base64_examples_are_accepted_verbatim() {
    let m = {
        let mut m = with(END_USER_ORGANISATION, SPEC_ORGANISATION);
        m.insert(REQUESTING_SOFTWARE, hv(SPEC_SOFTWARE));
        m.insert(TARGET_IDENTIFIER, hv(SPEC_TARGET));
        m
    };
    let f = check(&m, &NhsdPolicy::default()).expect("spec examples are valid");
    assert_eq!(f.ods_code.as_deref(), Some("A1001"));
    assert_eq!(
        f.organisation_name.as_deref(),
        Some("My service provider name")
    );
    assert_eq!(f.software_name.as_deref(), Some("Supplier product name"));
    assert_eq!(f.software_version.as_deref(), Some("1.0.0"));
    assert_eq!(f.software_instance.as_deref(), Some("SUPP-APP-1"));
    assert_eq!(f.target_identifier(), Some(("tests", "NHS0001")));
}

#[test]
fn fhir_r4_array_forms_of_device_name_and_version_are_accepted() {
    let m = edit(REQUESTING_SOFTWARE, |v| {
        v["deviceName"] = json!([
            {"name": "Product", "type": "manufacturer-name"},
            {"name": "Other name", "type": "user-friendly-name"}
        ]);
        v["version"] = json!([{"value": "2.3.4"}, {"value": "9"}]);
    });
    let f = check(&m, &NhsdPolicy::default()).expect("R4 arrays are valid");
    assert_eq!(f.software_name.as_deref(), Some("Product"));
    assert_eq!(f.software_version.as_deref(), Some("2.3.4"));
}

#[test]
fn practitioner_with_user_id_and_extra_codings_is_accepted() {
    let m = edit(REQUESTING_PRACTITIONER, |v| {
        push(
            v,
            "identifier",
            json!({"system": SDS_USER_SYSTEM, "value": "555021935107"}),
        );
        v["code"][0]["coding"]
            .as_array_mut()
            .expect("array")
            .insert(
                0,
                json!({"system": "https://example.org/roles", "code": "R8000"}),
            );
        v["practitioner"] = json!({"reference": "Practitioner/1"});
    });
    let f = check(&m, &NhsdPolicy::default()).expect("valid");
    assert_eq!(f.sds_role_profile_id.as_deref(), Some("100334993514"));
    assert_eq!(f.sds_user_id.as_deref(), Some("555021935107"));
    assert_eq!(f.snomed_role_code.as_deref(), Some("62247001"));
}

#[test]
fn unknown_members_and_other_identifiers_are_ignored() {
    let m = edit(END_USER_ORGANISATION, |v| {
        v["id"] = json!("org-1");
        v["meta"] = json!({"profile": ["https://example.org/x"]});
        push(
            v,
            "identifier",
            json!({"system": "https://example.org/other", "value": "X 1"}),
        );
    });
    let f = check(&m, &NhsdPolicy::default()).expect("valid");
    assert_eq!(f.ods_code.as_deref(), Some("A1001"));
}

#[test]
fn ods_code_is_upper_cased_and_allow_list_ignores_case() {
    let m = org_with_ods("ryg01");
    let p = NhsdPolicy {
        allowed_ods_codes: vec!["RYG01".into()],
        ..NhsdPolicy::default()
    };
    assert_eq!(
        check(&m, &p).expect("allowed").ods_code.as_deref(),
        Some("RYG01")
    );
}

#[test]
fn optional_absent_and_ignored_headers_give_no_facts() {
    let f = check(&without(&[REQUESTING_PRACTITIONER]), &NhsdPolicy::default())
        .expect("practitioner is optional");
    assert_eq!(f.sds_role_profile_id, None);
    assert_eq!(f.snomed_role_code, None);

    let p = NhsdPolicy {
        target_identifier: HeaderRequirement::Ignored,
        request_id: HeaderRequirement::Ignored,
        ..NhsdPolicy::default()
    };
    let mut m = with(TARGET_IDENTIFIER, "garbage!!");
    m.append(REQUEST_ID, hv("not-a-uuid"));
    let f = check(&m, &p).expect("ignored headers are not read");
    assert_eq!(f.target_identifier(), None);
    assert_eq!(f.request_id, None);
    assert_eq!(f.ods_code.as_deref(), Some("A1001"));
}

#[test]
fn header_lookup_ignores_name_case() {
    let mut m = HeaderMap::new();
    for (k, v) in example_headers() {
        let lower: http::HeaderName = k.to_ascii_lowercase().parse().expect("valid name");
        m.insert(lower, hv(&v));
    }
    assert_eq!(
        check(&m, &NhsdPolicy::default()).expect("valid"),
        expected_example_facts()
    );
}

#[test]
fn upper_case_uuids_are_accepted_as_sent() {
    let id = EXAMPLE_REQUEST_ID.to_ascii_uppercase();
    let f = check(&with(REQUEST_ID, &id), &NhsdPolicy::default()).expect("valid");
    assert_eq!(f.request_id.as_deref(), Some(id.as_str()));
}

#[test]
fn target_allow_list_matches_value_or_system_and_value() {
    let m = without(&[]);
    for (entry, ok) in [
        ("2000011147", true),
        ("https://fhir.nhs.uk/Id/dos-service-id|2000011147", true),
        ("HTTPS://FHIR.NHS.UK/Id/DOS-SERVICE-ID|2000011147", true),
        (
            "https://fhir.nhs.uk/Id/ods-organization-code|2000011147",
            false,
        ),
        ("20000111470", false),
        ("200001114", false),
    ] {
        let p = NhsdPolicy {
            allowed_target_identifiers: vec!["1".into(), entry.into()],
            ..NhsdPolicy::default()
        };
        match check(&m, &p) {
            Ok(_) => assert!(ok, "{entry} should refuse"),
            Err(e) => {
                assert!(!ok, "{entry} should allow, got {e}");
                assert!(
                    matches!(e, NhsdError::NotAllowed { header, .. } if header == TARGET_IDENTIFIER)
                );
            }
        }
    }
}

// ---- malformed input: one table, each case names the variant and header ----

struct Case {
    name: &'static str,
    headers: HeaderMap,
    header: &'static str,
    /// `NhsdError::reason()`, which is one label per variant.
    kind: &'static str,
    field: Option<&'static str>,
}

fn case(
    name: &'static str,
    headers: HeaderMap,
    header: &'static str,
    kind: &'static str,
    field: Option<&'static str>,
) -> Case {
    Case {
        name,
        headers,
        header,
        kind,
        field,
    }
}

fn malformed_cases() -> Vec<Case> {
    use self::{
        CORRELATION_ID as CORR, END_USER_ORGANISATION as ORG, REQUESTING_PRACTITIONER as PRAC,
        REQUESTING_SOFTWARE as SOFT, REQUEST_ID as RID, TARGET_IDENTIFIER as TGT,
    };
    const B64: &str = "nhsd_base64";
    const JSON: &str = "nhsd_json";
    const MISSING_FIELD: &str = "nhsd_missing_field";
    const INVALID: &str = "nhsd_invalid_value";
    // BaRS failure scenarios: "400 | REC_BAD_REQUEST | structure | The
    // NHSD-Target-Identifier header doesn't adhere to the schema"; a field of the wrong
    // JSON type is that, not a bad `value`.
    const WRONG_TYPE: &str = "nhsd_wrong_type";
    const ODS: Option<&str> = Some("identifier (ods-organization-code)");

    // An organisation whose standard encoding contains '+' or '/', so URL-safe differs.
    let org_symbols = {
        let mut v = example(ORG);
        v["name"] = json!("Practice ??? >>> ~~~ ??? >>> ~~~");
        v
    };
    let std_enc = enc(&org_symbols);
    assert!(std_enc.contains(['+', '/']), "precondition: {std_enc}");
    let url_safe = URL_SAFE.encode(org_symbols.to_string());
    // An organisation whose length is not a multiple of 3, so padding is needed.
    let unpadded = STANDARD_NO_PAD.encode(example(ORG).to_string());
    assert_ne!(unpadded, enc(&example(ORG)), "precondition: needs padding");

    let deep = format!("{{\"a\":{}{}}}", "[".repeat(40), "]".repeat(40));
    let deeper = format!("{}{}", "[".repeat(500), "]".repeat(500));
    let long_name = "N".repeat(300);
    let many_ids: Vec<Value> = (0..17)
        .map(|i| json!({"system": "https://example.org/id", "value": format!("v{i}")}))
        .collect();

    vec![
        // transport and encoding
        case("not base64", with(ORG, "not base64!!"), ORG, B64, None),
        case("URL-safe alphabet", with(ORG, &url_safe), ORG, B64, None),
        case("missing padding", with(ORG, &unpadded), ORG, B64, None),
        case("inner space", with(ORG, "eyJh IjoxfQ=="), ORG, B64, None),
        case(
            "non-canonical trailing bits",
            with(TGT, "QR=="),
            TGT,
            B64,
            None,
        ),
        case(
            "non-ASCII header bytes",
            with_value(
                ORG,
                HeaderValue::from_bytes(b"eyJ\xfffQ==").expect("obs-text"),
            ),
            ORG,
            "nhsd_not_ascii",
            None,
        ),
        case(
            "empty value",
            with_value(SOFT, HeaderValue::from_static("")),
            SOFT,
            INVALID,
            Some("value"),
        ),
        case(
            "huge value",
            with(ORG, &"QUFB".repeat(5000)),
            ORG,
            "nhsd_too_large",
            None,
        ),
        case(
            "huge request id",
            with(RID, &"a".repeat(9000)),
            RID,
            "nhsd_too_large",
            None,
        ),
        case(
            "duplicate organisation header",
            {
                let mut m = without(&[]);
                m.append(ORG, hv(&enc(&example(ORG))));
                m
            },
            ORG,
            "nhsd_duplicate",
            None,
        ),
        case(
            "duplicate request id",
            {
                let mut m = without(&[]);
                m.append(RID, hv("6f1b5b56-55b6-4c4f-9b0c-0f7d1d3e2a10"));
                m
            },
            RID,
            "nhsd_duplicate",
            None,
        ),
        // JSON
        case("not JSON", with(ORG, &enc_str("hello")), ORG, JSON, None),
        case("JSON array", with(ORG, &enc_str("[1,2]")), ORG, JSON, None),
        case(
            "JSON string",
            with(SOFT, &enc_str("\"Device\"")),
            SOFT,
            JSON,
            None,
        ),
        case("JSON null", with(PRAC, &enc_str("null")), PRAC, JSON, None),
        case(
            "truncated JSON",
            with(ORG, &enc_str("{\"resourceType\":")),
            ORG,
            JSON,
            None,
        ),
        case(
            "trailing data",
            with(TGT, &enc_str("{\"system\":\"a\",\"value\":\"b\"} x")),
            TGT,
            JSON,
            None,
        ),
        case(
            "byte order mark",
            with(ORG, &enc_str("\u{feff}{}")),
            ORG,
            JSON,
            None,
        ),
        case(
            "repeated key",
            with(
                ORG,
                &enc_str(r#"{"resourceType":"Organization","resourceType":"Patient"}"#),
            ),
            ORG,
            JSON,
            None,
        ),
        case(
            "repeated nested key",
            with(
                TGT,
                &enc_str(r#"{"system":"s","value":"a","x":{"k":1,"k":2}}"#),
            ),
            TGT,
            JSON,
            None,
        ),
        case(
            "deeply nested garbage",
            with(ORG, &enc_str(&deep)),
            ORG,
            JSON,
            None,
        ),
        case(
            "nesting past serde's limit",
            with(ORG, &enc_str(&deeper)),
            ORG,
            JSON,
            None,
        ),
        case(
            "invalid UTF-8",
            with(ORG, &STANDARD.encode(b"{\"name\":\"\xff\xfe\"}")),
            ORG,
            JSON,
            None,
        ),
        case(
            "target as array",
            with(TGT, &enc_str(r#"[{"system":"s","value":"v"}]"#)),
            TGT,
            JSON,
            None,
        ),
        // Organization
        case(
            "wrong resourceType",
            edit(ORG, |v| v["resourceType"] = json!("Patient")),
            ORG,
            "nhsd_resource_type",
            None,
        ),
        case(
            "missing resourceType",
            edit(ORG, |v| remove(v, "resourceType")),
            ORG,
            MISSING_FIELD,
            Some("resourceType"),
        ),
        case(
            "numeric resourceType",
            edit(ORG, |v| v["resourceType"] = json!(7)),
            ORG,
            WRONG_TYPE,
            Some("resourceType"),
        ),
        case(
            "missing identifier",
            edit(ORG, |v| remove(v, "identifier")),
            ORG,
            MISSING_FIELD,
            Some("identifier"),
        ),
        case(
            "identifier not an array",
            edit(ORG, |v| {
                v["identifier"] = json!({"system": ODS_SYSTEM, "value": "A1001"})
            }),
            ORG,
            WRONG_TYPE,
            Some("identifier"),
        ),
        case(
            "empty identifier array",
            edit(ORG, |v| v["identifier"] = json!([])),
            ORG,
            INVALID,
            Some("identifier"),
        ),
        case(
            "too many identifiers",
            edit(ORG, |v| v["identifier"] = json!(many_ids)),
            ORG,
            INVALID,
            Some("identifier"),
        ),
        case(
            "wrong identifier system",
            edit(ORG, |v| {
                v["identifier"][0]["system"] = json!("https://fhir.nhs.uk/Id/ods-site-code")
            }),
            ORG,
            MISSING_FIELD,
            ODS,
        ),
        case(
            "empty ODS code",
            org_with_ods(""),
            ORG,
            INVALID,
            Some("identifier.value"),
        ),
        case(
            "whitespace-only ODS code",
            org_with_ods("   "),
            ORG,
            INVALID,
            Some("identifier.value"),
        ),
        case(
            "padded ODS code",
            org_with_ods(" A1001"),
            ORG,
            INVALID,
            Some("identifier.value"),
        ),
        case(
            "ODS code with a hyphen",
            org_with_ods("A1-01"),
            ORG,
            INVALID,
            ODS,
        ),
        case("ODS code too short", org_with_ods("AB"), ORG, INVALID, ODS),
        case(
            "ODS code too long",
            org_with_ods("ABCDEFGHIJK"),
            ORG,
            INVALID,
            ODS,
        ),
        case(
            "two ODS codes",
            edit(ORG, |v| {
                push(
                    v,
                    "identifier",
                    json!({"system": ODS_SYSTEM, "value": "RYG"}),
                )
            }),
            ORG,
            INVALID,
            ODS,
        ),
        case(
            "identifier without value",
            edit(ORG, |v| v["identifier"] = json!([{"system": ODS_SYSTEM}])),
            ORG,
            MISSING_FIELD,
            Some("identifier.value"),
        ),
        case(
            "identifier value not a string",
            edit(ORG, |v| v["identifier"][0]["value"] = json!(1001)),
            ORG,
            WRONG_TYPE,
            Some("identifier.value"),
        ),
        case(
            "missing name",
            edit(ORG, |v| remove(v, "name")),
            ORG,
            MISSING_FIELD,
            Some("name"),
        ),
        case(
            "whitespace-only name",
            edit(ORG, |v| v["name"] = json!(" \t ")),
            ORG,
            INVALID,
            Some("name"),
        ),
        case(
            "control character in name",
            edit(ORG, |v| v["name"] = json!("A\u{7}B")),
            ORG,
            INVALID,
            Some("name"),
        ),
        case(
            "name too long",
            edit(ORG, |v| v["name"] = json!(long_name)),
            ORG,
            INVALID,
            Some("name"),
        ),
        case(
            "name not a string",
            edit(ORG, |v| v["name"] = json!(["x"])),
            ORG,
            WRONG_TYPE,
            Some("name"),
        ),
        // PractitionerRole
        case(
            "specification placeholder practitioner",
            with(PRAC, SPEC_PRACTITIONER_PLACEHOLDER),
            PRAC,
            "nhsd_resource_type",
            None,
        ),
        case(
            "no SDS role profile id",
            edit(PRAC, |v| {
                v["identifier"][0]["system"] = json!(SDS_USER_SYSTEM)
            }),
            PRAC,
            MISSING_FIELD,
            Some("identifier (sds-role-profile-id)"),
        ),
        case(
            "SDS role profile id with punctuation",
            edit(PRAC, |v| v["identifier"][0]["value"] = json!("1003-3499")),
            PRAC,
            INVALID,
            Some("identifier (sds-role-profile-id)"),
        ),
        case(
            "SNOMED code not digits",
            edit(PRAC, |v| v["code"][0]["coding"][0]["code"] = json!("abc")),
            PRAC,
            INVALID,
            Some("code.coding.code"),
        ),
        case(
            "SNOMED coding without code",
            edit(PRAC, |v| {
                v["code"][0]["coding"] = json!([{"system": SNOMED_SYSTEM}])
            }),
            PRAC,
            MISSING_FIELD,
            Some("code.coding.code"),
        ),
        case(
            "code not an array",
            edit(PRAC, |v| v["code"] = json!({"coding": []})),
            PRAC,
            WRONG_TYPE,
            Some("code"),
        ),
        // Device
        case(
            "missing version",
            edit(SOFT, |v| remove(v, "version")),
            SOFT,
            MISSING_FIELD,
            Some("version"),
        ),
        case(
            "deviceName a string",
            edit(SOFT, |v| v["deviceName"] = json!("Product")),
            SOFT,
            WRONG_TYPE,
            Some("deviceName"),
        ),
        case(
            "empty deviceName.name",
            edit(SOFT, |v| v["deviceName"]["name"] = json!("")),
            SOFT,
            INVALID,
            Some("deviceName.name"),
        ),
        case(
            "empty deviceName array",
            edit(SOFT, |v| v["deviceName"] = json!([])),
            SOFT,
            INVALID,
            Some("deviceName"),
        ),
        case(
            "non-ASCII version",
            edit(SOFT, |v| v["version"]["value"] = json!("1.0.0\u{e9}")),
            SOFT,
            INVALID,
            Some("version.value"),
        ),
        case(
            "device without identifier",
            edit(SOFT, |v| remove(v, "identifier")),
            SOFT,
            MISSING_FIELD,
            Some("identifier"),
        ),
        // Target identifier
        case(
            "target without system",
            with_json(TGT, &json!({"value": "2000011147"})),
            TGT,
            MISSING_FIELD,
            Some("system"),
        ),
        case(
            "whitespace-only target value",
            with_json(TGT, &json!({"system": DOS_SERVICE_SYSTEM, "value": "  "})),
            TGT,
            INVALID,
            Some("value"),
        ),
        case(
            "target system with spaces",
            with_json(TGT, &json!({"system": "https://x y", "value": "1"})),
            TGT,
            INVALID,
            Some("system"),
        ),
        case(
            "target value newline",
            with_json(
                TGT,
                &json!({"system": DOS_SERVICE_SYSTEM, "value": "1\r\nX-Evil: 1"}),
            ),
            TGT,
            INVALID,
            Some("value"),
        ),
        // transaction ids
        case(
            "request id not a UUID",
            with(RID, "1234"),
            RID,
            INVALID,
            Some("value"),
        ),
        case(
            "request id simple form",
            with(RID, "c1ab3fba6bae4ba4b2575a87c44d4a91"),
            RID,
            INVALID,
            Some("value"),
        ),
        case(
            "request id braced",
            with(RID, "{c1ab3fba-6bae-4ba4-b257-5a87c44d4a91}"),
            RID,
            INVALID,
            Some("value"),
        ),
        case(
            "request id trailing space",
            with(RID, "c1ab3fba-6bae-4ba4-b257-5a87c44d4a91 "),
            RID,
            INVALID,
            Some("value"),
        ),
        case(
            "request id bad hex",
            with(RID, "g1ab3fba-6bae-4ba4-b257-5a87c44d4a91"),
            RID,
            INVALID,
            Some("value"),
        ),
        case(
            "correlation id URN",
            with(CORR, "urn:uuid:9562466f-c982-4bd5-bb0e-255e9f5e6689"),
            CORR,
            INVALID,
            Some("value"),
        ),
        // absent required headers
        case("no request id", without(&[RID]), RID, "nhsd_missing", None),
        case(
            "no correlation id",
            without(&[CORR]),
            CORR,
            "nhsd_missing",
            None,
        ),
        case("no target", without(&[TGT]), TGT, "nhsd_missing", None),
        case(
            "no organisation",
            without(&[ORG]),
            ORG,
            "nhsd_missing",
            None,
        ),
        case("no software", without(&[SOFT]), SOFT, "nhsd_missing", None),
    ]
}

#[test]
fn malformed_headers_are_refused_with_the_right_variant_and_header() {
    let cases = malformed_cases();
    assert!(cases.len() >= 15);
    for c in cases {
        let e = refuse(&c.headers);
        assert_eq!(e.header(), c.header, "{}: {e}", c.name);
        assert_eq!(e.reason(), c.kind, "{}: {e:?}", c.name);
        assert_eq!(field_of(&e), c.field, "{}: {e:?}", c.name);
        assert_eq!(e.status(), 400, "{}", c.name);
        assert_eq!(e.nhs_code(), "REC_BAD_REQUEST", "{}", c.name);

        // Diagnostics name the header, stay short and printable, and never echo the
        // offending raw value.
        let text = e.to_string();
        assert!(text.contains(c.header), "{}: {text}", c.name);
        assert!(text.len() < 300, "{}: {text}", c.name);
        assert!(
            text.bytes().all(|b| (0x20..0x7f).contains(&b)),
            "{}: {text}",
            c.name
        );
        for v in c.headers.get_all(c.header) {
            if v.len() >= 8 {
                let raw = String::from_utf8_lossy(v.as_bytes());
                assert!(!text.contains(raw.as_ref()), "{}: echoed {raw}", c.name);
            }
        }
    }
}

#[test]
fn allow_list_refusals_are_403_or_401_by_policy() {
    let p = NhsdPolicy {
        allowed_ods_codes: vec!["RYG".into()],
        ..NhsdPolicy::default()
    };
    let e = refuse_with(&without(&[]), &p);
    assert_eq!(
        e,
        NhsdError::NotAllowed {
            header: END_USER_ORGANISATION,
            what: "ODS code",
            value: "A1001".into(),
            refusal: Refusal::Forbidden,
        }
    );
    assert_eq!(
        (e.status(), e.nhs_code(), e.fhir_issue_code()),
        (403, "REC_FORBIDDEN", "forbidden")
    );
    assert!(e.is_refusal());
    assert!(e.to_string().contains("ODS code"), "{e}");

    let p = NhsdPolicy {
        allowed_target_identifiers: vec!["2000099999".into()],
        refusal: Refusal::Unauthorized,
        ..NhsdPolicy::default()
    };
    let e = refuse_with(&without(&[]), &p);
    assert_eq!(e.header(), TARGET_IDENTIFIER);
    assert_eq!(
        (e.status(), e.nhs_code(), e.fhir_issue_code()),
        (401, "REC_UNAUTHORIZED", "forbidden")
    );
}

#[test]
fn an_allow_list_makes_its_header_required_even_if_policy_says_otherwise() {
    for need in [HeaderRequirement::Optional, HeaderRequirement::Ignored] {
        let p = NhsdPolicy {
            end_user_organisation: need,
            allowed_ods_codes: vec!["A1001".into()],
            target_identifier: need,
            allowed_target_identifiers: vec!["2000011147".into()],
            ..NhsdPolicy::default()
        };
        assert_eq!(
            refuse_with(&without(&[END_USER_ORGANISATION]), &p),
            NhsdError::Missing {
                header: END_USER_ORGANISATION
            }
        );
        assert_eq!(
            refuse_with(&without(&[TARGET_IDENTIFIER]), &p),
            NhsdError::Missing {
                header: TARGET_IDENTIFIER
            }
        );
        assert!(check(&without(&[]), &p).is_ok());
    }
}

#[test]
fn sizes_are_refused_before_decoding() {
    // 128 decoded bytes encode to at most 172 characters.
    let p = NhsdPolicy {
        max_decoded_bytes: 128,
        ..NhsdPolicy::default()
    };
    let mut v = example(END_USER_ORGANISATION);
    v["name"] = json!("N".repeat(200));
    let e = refuse_with(&with_json(END_USER_ORGANISATION, &v), &p);
    assert_eq!(
        e,
        NhsdError::TooLarge {
            header: END_USER_ORGANISATION,
            limit: 172
        }
    );
    assert_eq!(e.fhir_issue_code(), "too-long");
    // Far too long to be anything: refused as too large, not as bad Base64.
    let e = refuse_with(&with(END_USER_ORGANISATION, &"!".repeat(200)), &p);
    assert_eq!(e.reason(), "nhsd_too_large");
    // The examples fit comfortably under that limit.
    let p = NhsdPolicy {
        max_decoded_bytes: 256,
        max_encoded_bytes: 344,
        ..NhsdPolicy::default()
    };
    assert!(check(&without(&[]), &p).is_ok());
}

#[test]
fn diagnostics_never_carry_markup_from_the_client() {
    let e = refuse(&edit(END_USER_ORGANISATION, |v| {
        v["resourceType"] = json!("<script>alert(1)</script>");
    }));
    let text = e.to_string();
    assert!(matches!(
        e,
        NhsdError::WrongResourceType {
            expected: "Organization",
            ..
        }
    ));
    assert!(!text.contains('<') && !text.contains('>'), "{text}");

    let e = refuse(&with(
        TARGET_IDENTIFIER,
        &enc_str(r#"{"<img src=x>":1,"<img src=x>":2}"#),
    ));
    assert!(!e.to_string().contains("img"), "{e}");
    assert_eq!(e.fhir_issue_code(), "structure");
}

#[test]
fn excerpt_is_short_and_inert() {
    assert_eq!(excerpt("A1001"), "A1001");
    assert_eq!(excerpt("<b>\"x'\u{e9}\r\n"), "?b??x????");
    let long = excerpt(&"x".repeat(100));
    assert_eq!(long.len(), 35);
    assert!(long.ends_with("..."));
}

#[test]
fn every_variant_maps_to_status_nhs_code_and_issue_code() {
    let h = END_USER_ORGANISATION;
    let table = [
        (
            NhsdError::Missing { header: h },
            400,
            "REC_BAD_REQUEST",
            "required",
        ),
        (
            NhsdError::Duplicate { header: h },
            400,
            "REC_BAD_REQUEST",
            "invalid",
        ),
        (
            NhsdError::TooLarge {
                header: h,
                limit: 1,
            },
            400,
            "REC_BAD_REQUEST",
            "too-long",
        ),
        (
            NhsdError::NotAscii { header: h },
            400,
            "REC_BAD_REQUEST",
            "invalid",
        ),
        (
            NhsdError::Base64 { header: h },
            400,
            "REC_BAD_REQUEST",
            "invalid",
        ),
        (
            NhsdError::Json {
                header: h,
                detail: "x".into(),
            },
            400,
            "REC_BAD_REQUEST",
            "structure",
        ),
        (
            NhsdError::WrongResourceType {
                header: h,
                expected: "Organization",
                found: "Patient".into(),
            },
            400,
            "REC_BAD_REQUEST",
            "structure",
        ),
        (
            NhsdError::MissingField {
                header: h,
                field: "name",
            },
            400,
            "REC_BAD_REQUEST",
            "required",
        ),
        (
            NhsdError::InvalidValue {
                header: h,
                field: "name",
                reason: "bad".into(),
            },
            400,
            "REC_BAD_REQUEST",
            "value",
        ),
        (
            NhsdError::NotAllowed {
                header: h,
                what: "ODS code",
                value: "X".into(),
                refusal: Refusal::Forbidden,
            },
            403,
            "REC_FORBIDDEN",
            "forbidden",
        ),
        (
            NhsdError::NotAllowed {
                header: h,
                what: "ODS code",
                value: "X".into(),
                refusal: Refusal::Unauthorized,
            },
            401,
            "REC_UNAUTHORIZED",
            "forbidden",
        ),
    ];
    let mut reasons = std::collections::BTreeSet::new();
    for (e, status, code, issue) in table {
        assert_eq!(
            (e.status(), e.nhs_code(), e.fhir_issue_code()),
            (status, code, issue),
            "{e:?}"
        );
        assert_eq!(e.header(), h);
        assert!(e.to_string().contains(h));
        reasons.insert(e.reason());
    }
    assert_eq!(reasons.len(), 10, "one reason label per variant");
}

// ---- policy ----

#[test]
fn policy_defaults_follow_the_specification() {
    let p = NhsdPolicy::default();
    use HeaderRequirement::*;
    assert_eq!(
        [
            p.request_id,
            p.correlation_id,
            p.target_identifier,
            p.end_user_organisation,
            p.requesting_software,
            p.requesting_practitioner
        ],
        [Required, Required, Required, Required, Required, Optional]
    );
    assert_eq!((p.max_encoded_bytes, p.max_decoded_bytes), (8192, 6144));
    assert_eq!(p.refusal, Refusal::Forbidden);
    assert_eq!(p.validate("nhsd.headers"), Ok(()));
    assert_eq!(HeaderRequirement::default(), Optional);
}

#[test]
fn policy_deserializes_with_defaults_and_refuses_unknown_fields() {
    let p: NhsdPolicy = serde_json::from_value(json!({
        "requesting_software": "optional",
        "target_identifier": "ignored",
        "allowed_ods_codes": ["RYG"],
        "refusal": "unauthorized",
        "max_encoded_bytes": 4096
    }))
    .expect("valid policy");
    assert_eq!(p.requesting_software, HeaderRequirement::Optional);
    assert_eq!(p.target_identifier, HeaderRequirement::Ignored);
    assert_eq!(p.end_user_organisation, HeaderRequirement::Required);
    assert_eq!(p.refusal, Refusal::Unauthorized);
    assert_eq!((p.max_encoded_bytes, p.max_decoded_bytes), (4096, 6144));

    for bad in [
        json!({"exempt_paths": ["/metadata"]}),
        json!({"request_id": "Required"}),
        json!({"request_id": "mandatory"}),
        json!({"allowed_ods_codes": "RYG"}),
    ] {
        assert!(
            serde_json::from_value::<NhsdPolicy>(bad.clone()).is_err(),
            "{bad}"
        );
    }
}

#[test]
fn policy_validate_names_the_field() {
    let base = NhsdPolicy::default;
    let cases = [
        (
            NhsdPolicy {
                max_encoded_bytes: 10,
                ..base()
            },
            "p.max_encoded_bytes",
        ),
        (
            NhsdPolicy {
                max_decoded_bytes: 1 << 20,
                ..base()
            },
            "p.max_decoded_bytes",
        ),
        (
            NhsdPolicy {
                allowed_ods_codes: vec!["RYG".into(), "R-G".into()],
                ..base()
            },
            "p.allowed_ods_codes[1]",
        ),
        (
            NhsdPolicy {
                allowed_target_identifiers: vec!["|123".into()],
                ..base()
            },
            "p.allowed_target_identifiers[0]",
        ),
        (
            NhsdPolicy {
                allowed_target_identifiers: vec![" 123".into()],
                ..base()
            },
            "p.allowed_target_identifiers[0]",
        ),
        (
            NhsdPolicy {
                allowed_ods_codes: vec!["RYG".into()],
                end_user_organisation: HeaderRequirement::Optional,
                ..base()
            },
            "p.allowed_ods_codes",
        ),
        (
            NhsdPolicy {
                allowed_target_identifiers: vec!["1".into()],
                target_identifier: HeaderRequirement::Ignored,
                ..base()
            },
            "p.allowed_target_identifiers",
        ),
    ];
    for (p, field) in cases {
        let (f, reason) = p.validate("p").expect_err(field);
        assert_eq!(f, field, "{reason}");
        assert!(!reason.is_empty());
    }
    let ok = NhsdPolicy {
        allowed_ods_codes: vec!["ryg01".into()],
        allowed_target_identifiers: vec![
            "2000011147".into(),
            "https://fhir.nhs.uk/Id/dos-service-id|2000011147".into(),
        ],
        ..base()
    };
    assert_eq!(ok.validate("p"), Ok(()));
}

// ---- forwarded facts ----

#[test]
fn upstream_fact_headers_carry_verified_facts_only() {
    let mut facts = expected_example_facts();
    facts.sds_user_id = Some("555021935107".into());
    let got = upstream_fact_headers(&facts);
    assert_eq!(
        got,
        vec![
            ("x-fhirgate-ods-code", "A1001"),
            ("x-fhirgate-sds-role-profile-id", "100334993514"),
            ("x-fhirgate-sds-user-id", "555021935107"),
            ("x-fhirgate-software-name", "Supplier product name"),
            ("x-fhirgate-software-version", "1.0.0"),
            ("x-fhirgate-software-instance", "SUPP-APP-1"),
            ("x-fhirgate-target-system", DOS_SERVICE_SYSTEM),
            ("x-fhirgate-target-identifier", "2000011147"),
        ]
    );
    for (name, value) in &got {
        assert!(FORWARDED_FACT_HEADERS.contains(name));
        assert_eq!(http::HeaderName::from_static(name).as_str(), *name);
        assert!(HeaderValue::from_str(value).is_ok(), "{name}");
    }
    assert!(upstream_fact_headers(&NhsdFacts::default()).is_empty());
}

// ---- CLI helpers ----

#[test]
fn example_headers_are_complete_and_compact() {
    let ex = example_headers();
    assert_eq!(ex.iter().map(|(k, _)| *k).collect::<Vec<_>>(), ALL_HEADERS);
    for (k, v) in &ex {
        assert!(HeaderValue::from_str(v).is_ok(), "{k}");
        if ENCODED_HEADERS.contains(k) {
            let bytes = STANDARD.decode(v).expect("standard Base64");
            let text = String::from_utf8(bytes).expect("UTF-8");
            assert!(
                !text.contains(": ") && !text.contains('\n'),
                "compact: {text}"
            );
        }
    }
}

#[test]
fn encode_then_decode_round_trips_every_example() {
    for h in ENCODED_HEADERS {
        let json = serde_json::to_string_pretty(&example(h)).expect("serialise");
        let encoded = encode_header(&h.to_ascii_lowercase(), &json).expect("valid example");
        let decoded = decode_header(h, &encoded).expect("decodable");
        let (body, verdict) = decoded.rsplit_once('\n').expect("verdict line");
        assert_eq!(
            serde_json::from_str::<Value>(body).expect("pretty JSON"),
            example(h)
        );
        assert!(verdict.starts_with(&format!("{h}: valid (")), "{verdict}");
    }
    let d = decode_header("x-request-id", EXAMPLE_REQUEST_ID).expect("ok");
    assert_eq!(
        d,
        format!("X-Request-ID: valid (request id {EXAMPLE_REQUEST_ID})")
    );
}

#[test]
fn encode_refuses_what_the_gateway_would_refuse() {
    let org = example(END_USER_ORGANISATION).to_string();
    for (name, json, needle) in [
        ("NHSD-Unknown", org.as_str(), "unknown header"),
        (REQUEST_ID, EXAMPLE_REQUEST_ID, "unknown header"),
        (END_USER_ORGANISATION, "{not json", "not valid JSON"),
        (END_USER_ORGANISATION, "[1]", "must be a JSON object"),
        (
            END_USER_ORGANISATION,
            r#"{"resourceType":"Organization","resourceType":"Organization"}"#,
            "repeated object key",
        ),
        (REQUESTING_SOFTWARE, org.as_str(), "FHIR Device"),
    ] {
        let e = encode_header(name, json).expect_err(name);
        assert!(e.contains(needle), "{name}: {e}");
    }
}

#[test]
fn decode_explains_invalid_values() {
    let d = decode_header(REQUESTING_PRACTITIONER, SPEC_PRACTITIONER_PLACEHOLDER).expect("decodes");
    assert!(d.contains("\"resourceType\": \"string\""), "{d}");
    assert!(d.ends_with("INVALID: Header NHSD-Requesting-Practitioner must be a FHIR PractitionerRole resource, not resourceType 'string'"), "{d}");

    let url_safe = URL_SAFE.encode(r#"{"system":"s","value":"?????????"}"#);
    assert!(url_safe.contains(['-', '_']), "precondition: {url_safe}");
    let e = decode_header(TARGET_IDENTIFIER, &url_safe).expect_err("URL-safe");
    assert!(e.contains("URL-safe or unpadded"), "{e}");

    let e = decode_header(TARGET_IDENTIFIER, &enc_str("[]")).expect_err("array");
    assert!(e.contains("not a JSON object"), "{e}");

    let d = decode_header(CORRELATION_ID, "nope").expect("verdict only");
    assert!(d.starts_with("X-Correlation-ID: INVALID:"), "{d}");
}

/// README.md's refusal table says what the gateway sends: each NHSD row's issue code is
/// the one `fhir_issue_code` gives for that kind of error.
#[test]
fn readme_refusal_table_matches_the_issue_codes_sent() {
    let readme = include_str!("../../../README.md");
    let h = END_USER_ORGANISATION;
    for (row, e) in [
        ("NHSD header missing", NhsdError::Missing { header: h }),
        (
            "`X-Request-ID` / `X-Correlation-ID` missing",
            NhsdError::Missing { header: REQUEST_ID },
        ),
        (
            "`X-Request-ID` / `X-Correlation-ID` missing",
            NhsdError::Missing {
                header: CORRELATION_ID,
            },
        ),
        (
            "NHSD header not standard Base64",
            NhsdError::Base64 { header: h },
        ),
        (
            "not visible ASCII, or sent twice",
            NhsdError::NotAscii { header: h },
        ),
        (
            "not visible ASCII, or sent twice",
            NhsdError::Duplicate { header: h },
        ),
        (
            "decodes to something that is not a JSON object",
            NhsdError::Json {
                header: h,
                detail: String::new(),
            },
        ),
        (
            "to the wrong resource",
            NhsdError::WrongResourceType {
                header: h,
                expected: "Organization",
                found: String::new(),
            },
        ),
        (
            "NHSD header over `max_encoded_bytes`",
            NhsdError::TooLarge {
                header: h,
                limit: 1,
            },
        ),
        (
            "a field of the wrong JSON type",
            NhsdError::WrongType {
                header: h,
                field: "x",
                reason: String::new(),
            },
        ),
        (
            "NHSD header field invalid",
            NhsdError::InvalidValue {
                header: h,
                field: "x",
                reason: String::new(),
            },
        ),
    ] {
        let line = readme
            .lines()
            .find(|l| l.starts_with('|') && l.contains(row))
            .unwrap_or_else(|| panic!("README table has a row for {row:?}"));
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        // | situation | status | NHS code | issue code |
        assert_eq!(cells[2], e.status().to_string(), "{line}");
        assert_eq!(cells[3], format!("`{}`", e.nhs_code()), "{line}");
        assert_eq!(cells[4], format!("`{}`", e.fhir_issue_code()), "{line}");
    }
}
